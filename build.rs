//! Release builds of the `cascade` executable place the functions an idle
//! cascade has run side by side (`src/link-order/symbols.txt`, written by
//! `src/link-order/generate.sh`). A page fault on code maps the 64 KiB
//! around it, so start-up code spread over the whole executable made most
//! of an idle cascade's resident memory; gathered, it is a few megabytes.
//!
//! Only where the linker is LLD (Rust's default for x86_64 Linux), which
//! reads the list; names it does not find are skipped without a warning.

use std::path::Path;

fn main() {
    let list = Path::new("src/link-order/symbols.txt");
    println!("cargo:rerun-if-changed={}", list.display());
    let release = std::env::var("PROFILE").as_deref() == Ok("release");
    let target = std::env::var("TARGET").unwrap_or_default();
    if !release || target != "x86_64-unknown-linux-gnu" || !list.exists() {
        return;
    }
    let list = list
        .canonicalize()
        .expect("src/link-order/symbols.txt has a full path");
    println!(
        "cargo:rustc-link-arg-bin=cascade=-Wl,--symbol-ordering-file={}",
        list.display()
    );
    println!("cargo:rustc-link-arg-bin=cascade=-Wl,--no-warn-symbol-ordering");
}
