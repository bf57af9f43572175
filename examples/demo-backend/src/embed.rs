//! The stand-in "model": decoding a 16-bit PCM WAV body and turning its samples
//! into a deterministic, L2-normalised vector. Nothing here knows anything about
//! speakers; it only has the right shape.

use std::io::Cursor;

/// Length of every embedding, matching ECAPA-TDNN.
pub const EMBEDDING_DIM: usize = 192;

/// Longest clip accepted, in seconds; the real service caps input the same way.
pub const MAX_AUDIO_SECONDS: u64 = 60;

/// Decoded audio, interleaved when stereo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Audio {
    pub samples: Vec<i16>,
    pub sample_rate: u32,
    pub channels: u16,
    pub frames: u32,
}

impl Audio {
    pub fn duration_s(&self) -> f64 {
        f64::from(self.frames) / f64::from(self.sample_rate)
    }
}

/// Parses a WAV body, accepting only what the real service accepts. The error
/// is a sentence meant for the client that sent the file.
pub(crate) fn decode_wav(bytes: &[u8]) -> Result<Audio, String> {
    let reader = hound::WavReader::new(Cursor::new(bytes)).map_err(|e| match e {
        hound::Error::Unsupported => "unsupported WAV encoding; expected 16-bit PCM".to_string(),
        other => format!("not a WAV file: {other}"),
    })?;
    let spec = reader.spec();
    match (spec.sample_format, spec.bits_per_sample) {
        (hound::SampleFormat::Int, 16) => {}
        (hound::SampleFormat::Int, bits) => {
            return Err(format!(
                "unsupported sample format: {bits}-bit integer PCM; expected 16-bit PCM"
            ));
        }
        (hound::SampleFormat::Float, bits) => {
            return Err(format!(
                "unsupported sample format: {bits}-bit float; expected 16-bit PCM"
            ));
        }
    }
    if !matches!(spec.channels, 1 | 2) {
        return Err(format!(
            "unsupported channel count: {}; expected 1 or 2",
            spec.channels
        ));
    }
    if spec.sample_rate == 0 {
        return Err("invalid sample rate: 0 Hz".to_string());
    }
    let frames = reader.duration();
    if frames == 0 {
        return Err("audio is empty".to_string());
    }
    // Checked from the header before decoding so an oversized clip costs nothing.
    if u64::from(frames) > MAX_AUDIO_SECONDS * u64::from(spec.sample_rate) {
        return Err(format!("audio too long: max {MAX_AUDIO_SECONDS} s"));
    }
    let samples = reader
        .into_samples::<i16>()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("corrupt or truncated WAV data: {e}"))?;
    Ok(Audio {
        samples,
        sample_rate: spec.sample_rate,
        channels: spec.channels,
        frames,
    })
}

/// A deterministic stand-in for a speaker embedding: always
/// [`EMBEDDING_DIM`] floats with unit L2 norm.
///
/// The audio is mixed to mono and feature-hashed: each frame's value is added,
/// with a hashed sign, to a hashed bucket (a count sketch). That is linear and
/// O(frames), so identical audio gives an identical vector, a change of gain
/// gives the same vector, and different audio gives an unrelated one. The
/// sample rate seeds the hash so the same samples at another rate differ.
/// Digital silence has no direction, so it maps to the first basis vector.
/// A trailing partial frame is ignored; `channels == 0` is treated as mono.
pub fn embed(samples: &[i16], sample_rate: u32, channels: u16) -> Vec<f32> {
    let channels = usize::from(channels.max(1));
    let seed = splitmix64(u64::from(sample_rate));
    // f64 so an hour of samples summed into one bucket loses nothing visible.
    let mut sketch = [0f64; EMBEDDING_DIM];
    for (t, frame) in samples.chunks_exact(channels).enumerate() {
        let mono = frame.iter().map(|&s| f64::from(s)).sum::<f64>() / channels as f64;
        let h = splitmix64(seed ^ t as u64);
        let bucket = (h % EMBEDDING_DIM as u64) as usize;
        let sign = if h >> 63 == 0 { 1.0 } else { -1.0 };
        sketch[bucket] += sign * mono;
    }
    let norm = sketch.iter().map(|x| x * x).sum::<f64>().sqrt();
    if norm == 0.0 {
        let mut unit = vec![0.0; EMBEDDING_DIM];
        unit[0] = 1.0;
        return unit;
    }
    sketch.iter().map(|x| (x / norm) as f32).collect()
}

/// SplitMix64 finaliser: a cheap, well-mixed, dependency-free hash of a u64.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
