//! Docker over TLS without an engine: certificates made here with the
//! `openssl` CLI, and `openssl s_server` as a daemon that requires a client
//! certificate and answers `/version` and `/_ping` from files. Under
//! `CI=true` a missing `openssl` fails the test; elsewhere it is skipped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::config::{DockerConfig, TlsConfig};
use super::connect::{Connector, DockerEnv, DockerError, DockerHost, TlsFiles};
use super::testing::{free_port, unique};

fn openssl_available() -> bool {
    let ok = Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok && std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("the openssl CLI is required under CI=true");
    }
    if !ok {
        eprintln!("skipped: no openssl CLI here (set CI=true to make this a failure)");
    }
    ok
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all
/// P-256, in `dir` as the docker CLI names them (`ca.pem`, `cert.pem`,
/// `key.pem`), plus `server-*.pem` and a second, unrelated CA (`other-ca.pem`).
fn make_certs(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for ca in ["ca", "other-ca"] {
        let mut args = vec!["req", "-x509", "-days", "1", "-subj", "/CN=cascade test CA"];
        args.extend(ec);
        let (key, cert) = (format!("{ca}-key.pem"), format!("{ca}.pem"));
        args.extend(["-keyout", &key, "-out", &cert]);
        openssl(dir, &args);
    }
    std::fs::write(
        dir.join("server.ext"),
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write ext");
    std::fs::write(
        dir.join("client.ext"),
        "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
    )
    .expect("write ext");
    for (name, key, cert, ext) in [
        ("server", "server-key.pem", "server-cert.pem", "server.ext"),
        ("client", "key.pem", "cert.pem", "client.ext"),
    ] {
        let csr = format!("{name}.csr");
        let mut args = vec!["req", "-subj", "/CN=cascade test"];
        args.extend(ec);
        args.extend(["-keyout", key, "-out", &csr]);
        openssl(dir, &args);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-days",
                "1",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-extfile",
                ext,
                "-out",
                cert,
            ],
        );
    }
}

/// `openssl s_server` requiring a client certificate signed by `ca.pem`,
/// serving `version` and `_ping` from `www/`.
struct TlsDaemon {
    child: Child,
    port: u16,
}

impl TlsDaemon {
    fn start(dir: &Path) -> TlsDaemon {
        let www = dir.join("www");
        std::fs::create_dir_all(www.join("v1.41")).expect("www");
        let version = r#"{"Version":"20.10.0","ApiVersion":"1.41","MinAPIVersion":"1.12"}"#;
        std::fs::write(www.join("version"), version).expect("version");
        for ping in [www.join("_ping"), www.join("v1.41/_ping")] {
            std::fs::write(ping, "OK").expect("ping");
        }
        let port = free_port();
        let pem = |f: &str| dir.join(f).display().to_string();
        let child = Command::new("openssl")
            .args(["s_server", "-quiet", "-WWW", "-accept"])
            .arg(port.to_string())
            .args([
                "-cert",
                &pem("server-cert.pem"),
                "-key",
                &pem("server-key.pem"),
            ])
            .args([
                "-CAfile",
                &pem("ca.pem"),
                "-Verify",
                "1",
                "-verify_return_error",
            ])
            .current_dir(&www)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start openssl s_server");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "openssl s_server did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        TlsDaemon { child, port }
    }

    fn host(&self) -> DockerHost {
        DockerHost::Tcp(format!("tcp://127.0.0.1:{}", self.port))
    }
}

impl Drop for TlsDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dir() -> PathBuf {
    let dir = std::env::temp_dir().join(unique("cascade-t-tls"));
    std::fs::create_dir_all(&dir).expect("dir");
    dir
}

fn connector(host: DockerHost, tls: Option<TlsFiles>) -> Connector {
    Connector::with_host(host, Duration::from_secs(3), Duration::from_secs(3)).with_tls(tls)
}

fn files(dir: &Path, ca: &str, identity: bool) -> TlsFiles {
    TlsFiles {
        ca: dir.join(ca),
        identity: identity.then(|| (dir.join("cert.pem"), dir.join("key.pem"))),
        source: "tiers.docker.tls",
    }
}

#[tokio::test]
async fn the_environment_like_the_docker_cli_reaches_a_tls_daemon_with_a_client_certificate() {
    if !openssl_available() {
        return;
    }
    let dir = dir();
    make_certs(&dir);
    let daemon = TlsDaemon::start(&dir);

    let env = DockerEnv {
        host: Some(daemon.host().to_string()),
        tls_verify: true,
        cert_path: Some(dir.clone()),
    };
    let c = Connector::new(&DockerConfig::default(), &env);
    assert_eq!(
        c.tls(),
        Some(&TlsFiles {
            ca: dir.join("ca.pem"),
            identity: Some((dir.join("cert.pem"), dir.join("key.pem"))),
            source: "DOCKER_TLS_VERIFY and DOCKER_CERT_PATH",
        })
    );
    c.ping().await.expect("TLS ping with a client certificate");

    // The same through `tiers.docker.tls`, which wins over the environment.
    let config = DockerConfig {
        host: Some(daemon.host().to_string()),
        tls: Some(TlsConfig {
            ca: dir.join("ca.pem"),
            cert: Some(dir.join("cert.pem")),
            key: Some(dir.join("key.pem")),
            verify: true,
        }),
        ..DockerConfig::default()
    };
    let problems: Vec<_> = config
        .validate()
        .into_iter()
        .filter(|(k, _)| k.starts_with("tls"))
        .collect();
    assert!(problems.is_empty(), "{problems:?}");
    let c = Connector::new(&config, &DockerEnv::default());
    assert_eq!(c.tls().map(|t| t.source), Some("tiers.docker.tls"));
    c.ping().await.expect("TLS ping through the config");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_daemon_signed_by_another_ca_or_a_missing_client_certificate_is_refused_naming_the_files()
{
    if !openssl_available() {
        return;
    }
    let dir = dir();
    make_certs(&dir);
    let daemon = TlsDaemon::start(&dir);

    // The daemon's certificate does not chain to the configured CA.
    let error = connector(daemon.host(), Some(files(&dir, "other-ca.pem", true)))
        .ping()
        .await
        .expect_err("an unknown issuer is refused");
    let text = error.to_string();
    assert!(
        text.contains("TLS with tcp://127.0.0.1")
            && text.contains(&dir.join("other-ca.pem").display().to_string())
            && text.to_lowercase().contains("certificate"),
        "{text}"
    );
    assert!(
        !error.is_daemon_down(),
        "a TLS failure is not a daemon down: {error:?}"
    );

    // The daemon asks for a client certificate and gets none.
    let error = connector(daemon.host(), Some(files(&dir, "ca.pem", false)))
        .ping()
        .await
        .expect_err("no client certificate is refused");
    let text = error.to_string();
    assert!(!matches!(error, DockerError::NotRunning { .. }), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn unreadable_or_wrong_tls_files_are_named_before_any_connection() {
    if !openssl_available() {
        return;
    }
    let dir = dir();
    make_certs(&dir);
    // Nothing listens here: an error about a file proves no connection was tried.
    let host = DockerHost::Tcp(format!("tcp://127.0.0.1:{}", free_port()));

    let mut missing = files(&dir, "ca.pem", true);
    missing.identity = Some((dir.join("cert.pem"), dir.join("no-such-key.pem")));
    let text = connector(host.clone(), Some(missing))
        .ping()
        .await
        .expect_err("missing key")
        .to_string();
    assert!(
        text.contains(&format!(
            "cannot read the client key {} (from tiers.docker.tls)",
            dir.join("no-such-key.pem").display()
        )),
        "{text}"
    );

    // A certificate where the key should be.
    let mut swapped = files(&dir, "ca.pem", true);
    swapped.identity = Some((dir.join("cert.pem"), dir.join("cert.pem")));
    let text = connector(host.clone(), Some(swapped))
        .ping()
        .await
        .expect_err("not a key")
        .to_string();
    assert!(
        text.contains(&format!(
            "the client key {} holds no usable PEM private key",
            dir.join("cert.pem").display()
        )),
        "{text}"
    );

    // A key where the CA should be.
    let text = connector(host.clone(), Some(files(&dir, "key.pem", false)))
        .ping()
        .await
        .expect_err("not a certificate")
        .to_string();
    assert!(
        text.contains(&format!(
            "the CA certificate {} holds no PEM certificate",
            dir.join("key.pem").display()
        )),
        "{text}"
    );

    // TLS files for a unix socket (one that is there).
    std::fs::write(dir.join("docker.sock"), "").expect("write");
    let text = connector(
        DockerHost::Unix(dir.join("docker.sock")),
        Some(files(&dir, "ca.pem", true)),
    )
    .ping()
    .await
    .expect_err("TLS on a unix socket")
    .to_string();
    assert!(text.contains("applies to a tcp:// host only"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tls_is_chosen_like_the_docker_cli() {
    let config = DockerConfig::default();
    let plain = DockerEnv {
        host: Some("tcp://127.0.0.1:2376".into()),
        tls_verify: false,
        cert_path: Some("/certs".into()),
    };
    assert_eq!(
        Connector::new(&config, &plain).tls(),
        None,
        "no DOCKER_TLS_VERIFY, no TLS"
    );
    let verify = DockerEnv {
        tls_verify: true,
        ..plain.clone()
    };
    let tls = Connector::new(&config, &verify)
        .tls()
        .cloned()
        .expect("TLS");
    assert_eq!(tls.ca, Path::new("/certs/ca.pem"));
    assert_eq!(
        tls.identity, None,
        "without cert.pem and key.pem no client certificate is sent"
    );
}

#[test]
fn tls_configuration_problems_name_their_keys() {
    let problems = |tls: TlsConfig, host: Option<&str>| {
        DockerConfig {
            host: host.map(str::to_owned),
            tls: Some(tls),
            ..DockerConfig::default()
        }
        .validate()
        .into_iter()
        .filter(|(k, _)| k.starts_with("tls"))
        .collect::<Vec<_>>()
    };
    let dir = dir();
    std::fs::write(dir.join("ca.pem"), "x").expect("write");
    let ca = dir.join("ca.pem");

    let p = problems(
        TlsConfig {
            ca: ca.clone(),
            verify: false,
            ..TlsConfig::default()
        },
        Some("tcp://10.0.0.5:2376"),
    );
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].0, "tls.verify");
    assert!(p[0].1.contains("cannot verify"), "{p:?}");

    let p = problems(
        TlsConfig {
            ca: ca.clone(),
            cert: Some(dir.join("cert.pem")),
            ..TlsConfig::default()
        },
        None,
    );
    let keys: Vec<&str> = p.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["tls.key", "tls.cert"], "{p:?}");
    assert!(
        p[1].1.contains(&dir.join("cert.pem").display().to_string()),
        "{p:?}"
    );

    let p = problems(TlsConfig::default(), Some("unix:///var/run/docker.sock"));
    let keys: Vec<&str> = p.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["tls", "tls.ca"], "{p:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
