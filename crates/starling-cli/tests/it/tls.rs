//! HTTPS end to end: `starling serve --tls-cert --tls-key` and `starling device --ca-cert` as
//! separate processes, with a CA and a server certificate made here (rcgen). A device trusting
//! the CA completes a round; one trusting another CA is refused at once with a message naming
//! the certificate problem; bad certificate files stop the server at start; and on the TLS
//! port a plain-HTTP request and stalled handshakes are dropped (freeing their connection
//! slots at the header timeout) while the server keeps serving.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use starling_core::data::{synthetic_line, to_csv};

use crate::common::{fails, starling, write_config, ServeProcess};

/// A certificate authority made for a test.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    /// Writes the CA's certificate as PEM.
    fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.issuer.pem()).unwrap();
        path.to_path_buf()
    }

    /// A server certificate for 127.0.0.1 and localhost signed by this CA, written as
    /// `cert.pem` and `key.pem` in `dir`.
    fn server_files(&self, dir: &Path) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "starling test server");
        let cert = params.signed_by(&key, &*self.issuer).unwrap();
        let (cert_file, key_file) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        (cert_file, key_file)
    }
}

/// `starling serve --tls-cert cert --tls-key key` on a free port.
fn serve_tls(config: &Path, data: &Path, cert: &Path, key: &Path) -> ServeProcess {
    let mut cmd = starling();
    cmd.args(["serve", "--port", "0", "--tls-cert"])
        .arg(cert)
        .arg("--tls-key")
        .arg(key)
        .env_remove("PORT")
        .env_remove("STARLING_PORT");
    let server = ServeProcess::start_with(cmd, config, data, "info");
    assert!(
        server.url.starts_with("https://127.0.0.1:"),
        "{}",
        server.url
    );
    server
}

/// A blocking HTTPS client that trusts `ca` alone, optionally from another local address. It
/// keeps no connection open between requests, so that each request is a new handshake and
/// no idle connection holds a slot.
fn https_client(ca: &Path, from: Option<IpAddr>) -> reqwest::blocking::Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap();
    reqwest::blocking::Client::builder()
        .add_root_certificate(ca)
        .https_only(true)
        .pool_max_idle_per_host(0)
        .local_address(from)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn health(client: &reqwest::blocking::Client, url: &str) -> Result<(), String> {
    let r = client
        .get(format!("{url}/v1/health"))
        .send()
        .map_err(|e| format!("{e:?}"))?;
    if r.status() == reqwest::StatusCode::OK {
        Ok(())
    } else {
        Err(format!("health answered {}", r.status()))
    }
}

const ONE_DEVICE_TASK: &str = r#"
[[tasks]]
name = "linear"
admission = "open"
model = "linear"
# One device per round: a test-sized round, said explicitly.
min_cohort = 1
max_assignments_per_address = 10
[tasks.rounds]
goal = 1
min = 1
deadline_secs = 60
retry_secs = 0.2
"#;

#[test]
fn a_device_completes_a_round_over_https_and_a_wrong_ca_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Starling test CA");
    let ca_file = ca.write(&dir.path().join("ca.pem"));
    let (cert, key) = ca.server_files(dir.path());
    let config = write_config(dir.path(), ONE_DEVICE_TASK);
    let server = serve_tls(&config, &dir.path().join("data"), &cert, &key);
    let csv = dir.path().join("device.csv");
    let data = synthetic_line(2.0, 1.0, (-2.0, 2.0), 40, 0.1, 7);
    std::fs::write(&csv, to_csv(&data)).unwrap();

    let out = starling()
        .args(["device", "--server", &server.url, "--rounds", "1"])
        .args(["--give-up-after", "30", "--ca-cert"])
        .arg(&ca_file)
        .arg("--data")
        .arg(&csv)
        .env("STARLING_LOG", "info")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the device failed:\n{stderr}");
    assert!(stderr.contains("update accepted"), "{stderr}");
    // Round 1 commits (just after its last upload is accepted): version 1 is served.
    let client = https_client(&ca_file, None);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let task: serde_json::Value = client
            .get(format!("{}/v1/tasks/linear", server.url))
            .send()
            .unwrap()
            .json()
            .unwrap();
        if task["version"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "round 1 never committed: {task}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // A device that trusts another CA (and the built-in roots, which do not know this one)
    // is refused during the handshake: a clear message, no retries, a failing exit.
    let other = Ca::new("Some other CA");
    let other_file = other.write(&dir.path().join("other-ca.pem"));
    for ca_args in [vec!["--ca-cert".as_ref(), other_file.as_os_str()], vec![]] {
        let started = Instant::now();
        let stderr = fails(
            starling()
                .args(["device", "--server", &server.url, "--rounds", "1"])
                // Were it retried, it would end in 20 s, not in 300.
                .args(["--give-up-after", "20"])
                .args(&ca_args)
                .arg("--data")
                .arg(&csv)
                .env("STARLING_LOG", "info"),
        );
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(10),
            "refusal took {took:?}:\n{stderr}"
        );
        assert!(
            stderr.contains("TLS: the server's certificate was refused")
                && stderr.contains("UnknownIssuer")
                && stderr.contains("not signed by a trusted CA")
                && stderr.contains("--ca-cert"),
            "{stderr}"
        );
        assert!(
            !stderr.contains("retrying"),
            "a TLS refusal was retried:\n{stderr}"
        );
    }

    // A --ca-cert file without a certificate is named before anything is sent.
    let not_pem = dir.path().join("not-a-cert.pem");
    std::fs::write(&not_pem, "hello\n").unwrap();
    let stderr = fails(
        starling()
            .args(["device", "--server", &server.url, "--ca-cert"])
            .arg(&not_pem)
            .arg("--data")
            .arg(&csv),
    );
    assert!(
        stderr.contains("not-a-cert.pem") && stderr.contains("no CA certificate found"),
        "{stderr}"
    );
    server.terminate();
}

#[test]
fn bad_certificate_files_stop_the_server_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Starling test CA");
    let (cert, key) = ca.server_files(dir.path());
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let (_, other_key) = ca.server_files(&other);
    let config = write_config(dir.path(), ONE_DEVICE_TASK);
    let serve = |cert: &Path, key: &Path| {
        let mut cmd = starling();
        cmd.args(["serve", "--port", "0", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--tls-cert")
            .arg(cert)
            .arg("--tls-key")
            .arg(key);
        fails(&mut cmd)
    };
    let e = serve(&dir.path().join("missing.pem"), &key);
    assert!(
        e.contains("TLS: cannot read the certificate file") && e.contains("missing.pem"),
        "{e}"
    );
    let e = serve(&cert, &config);
    assert!(e.contains("starling.toml holds no PEM private key"), "{e}");
    let e = serve(&cert, &other_key);
    assert!(e.contains("does not belong to the certificate"), "{e}");
    // A certificate without its key: the flag...
    let e = fails(
        starling()
            .args(["serve", "--port", "0", "--tls-cert"])
            .arg(&cert),
    );
    assert!(e.contains("--tls-key"), "{e}");
    // ... and the environment.
    let e = fails(
        starling()
            .args(["serve", "--port", "0", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .env("STARLING_TLS_CERT", &cert)
            .env_remove("STARLING_TLS_KEY"),
    );
    assert!(
        e.contains("server.tls_cert is set but server.tls_key is not"),
        "{e}"
    );
}

/// Reads until the peer closes (or `limit` passes); what arrived, and how long it took.
fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!(
                "the server kept the connection open for {:?} ({e})",
                started.elapsed()
            ),
        }
    }
    (got, started.elapsed())
}

/// A counter or gauge of the server's `/metrics`.
fn metric(client: &reqwest::blocking::Client, url: &str, name: &str) -> u64 {
    let text = client
        .get(format!("{url}/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

/// Waits until the server counts `n` open connections, the one asking included.
fn wait_open_connections(client: &reqwest::blocking::Client, url: &str, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let open = metric(client, url, "starling_connections_open");
        if open == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{open} connections open, not {n}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn plain_http_and_stalled_handshakes_on_the_tls_port_are_dropped_without_harm() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Starling test CA");
    let ca_file = ca.write(&dir.path().join("ca.pem"));
    let (cert, key) = ca.server_files(dir.path());
    let config = write_config(
        dir.path(),
        "[server]\nheader_timeout_secs = 2.0\nmax_connections_per_address = 3\n",
    );
    let server = serve_tls(&config, &dir.path().join("data"), &cert, &key);
    let addr = server.url.trim_start_matches("https://").to_string();
    let client = https_client(&ca_file, None);
    // Another local address, whose connections do not count against 127.0.0.1's.
    let elsewhere = https_client(&ca_file, Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))));
    health(&client, &server.url).unwrap();

    // Plain HTTP to the TLS port: no HTTP answer, and the connection is closed at once.
    let mut plain = TcpStream::connect(&addr).unwrap();
    plain
        .write_all(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let (answer, took) = read_until_closed(&mut plain, Duration::from_secs(5));
    assert!(
        !answer.starts_with(b"HTTP/"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert!(took < Duration::from_millis(1500), "closed after {took:?}");
    health(&client, &server.url).unwrap();
    wait_open_connections(&elsewhere, &server.url, 1);

    // Three clients from 127.0.0.1 that never finish a handshake (one silent, two with a
    // piece of a ClientHello) hold all of that address's connection slots...
    let opened = Instant::now();
    let mut stalled: Vec<TcpStream> = (0..3)
        .map(|i| {
            let mut s = TcpStream::connect(&addr).unwrap();
            if i > 0 {
                s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).unwrap();
            }
            s
        })
        .collect();
    wait_open_connections(&elsewhere, &server.url, 4);
    // ... so a fourth from there is closed at once, while another address is served.
    let refused = metric(
        &elsewhere,
        &server.url,
        "starling_connections_refused_total",
    );
    assert!(health(&client, &server.url).is_err());
    assert_eq!(
        metric(
            &elsewhere,
            &server.url,
            "starling_connections_refused_total"
        ),
        refused + 1
    );
    health(&elsewhere, &server.url).unwrap();
    // The header timeout (2 s) closes the stalled connections and frees their slots.
    for s in &mut stalled {
        read_until_closed(s, Duration::from_secs(10));
    }
    let closed_after = opened.elapsed();
    assert!(
        closed_after >= Duration::from_millis(1900) && closed_after < Duration::from_secs(8),
        "stalled handshakes closed after {closed_after:?}"
    );
    health(&client, &server.url).unwrap();
    let out = server.terminate();
    assert!(!out.contains("ERROR"), "{out}");
}

/// `starling admin` trusts what `starling device` trusts: against an https server it needs
/// the private CA (`--ca-cert`), and with it the rollback goes through.
#[test]
fn starling_admin_speaks_https_with_the_private_ca() {
    const TOKEN: &str = "admin-token-for-the-tls-test";
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Starling test CA");
    let ca_file = ca.write(&dir.path().join("ca.pem"));
    let (cert, key) = ca.server_files(dir.path());
    let config = write_config(
        dir.path(),
        &format!("[server]\nadmin_token = \"{TOKEN}\"\n{ONE_DEVICE_TASK}"),
    );
    let server = serve_tls(&config, &dir.path().join("data"), &cert, &key);
    let admin = |ca: Option<&Path>| {
        let mut cmd = starling();
        cmd.args(["admin", "rollback", "--server", &server.url])
            .args(["--task", "linear", "--version", "0", "--json"])
            .env("STARLING_ADMIN_TOKEN", TOKEN);
        if let Some(ca) = ca {
            cmd.arg("--ca-cert").arg(ca);
        }
        cmd
    };
    let stderr = fails(&mut admin(None));
    assert!(stderr.contains("cannot reach"), "{stderr}");
    let out = admin(Some(&ca_file)).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (answer["restored"].as_u64(), answer["version"].as_u64()),
        (Some(0), Some(1))
    );
    server.terminate();
}
