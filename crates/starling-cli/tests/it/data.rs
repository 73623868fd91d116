//! `starling data fetch` against a local HTTP server serving the core's fixture files (the
//! real IDX format): files land in the folder only once their unpacked SHA-256 checks out,
//! a second fetch downloads nothing, and a corrupt file is refused with nothing written.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::common::{fails, starling};

const FILES: [&str; 4] = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
];

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../starling-core/tests/fixtures/mnist")
}

/// Serves the files of `dir` over HTTP/1.1 (one request a connection) on a free port;
/// returns its base URL and a count of the requests it answered.
fn serve_dir(dir: PathBuf) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut line = String::new();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            // Skip the headers.
            let mut header = String::new();
            while reader.read_line(&mut header).is_ok() && header.trim_end() != "" {
                header.clear();
            }
            let name = line
                .split_whitespace()
                .nth(1)
                .unwrap_or("/")
                .trim_start_matches('/');
            count.fetch_add(1, Ordering::SeqCst);
            let answer = match std::fs::read(dir.join(name)) {
                Ok(body) => {
                    let mut a = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                    .into_bytes();
                    a.extend_from_slice(&body);
                    a
                }
                Err(_) => {
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .to_vec()
                }
            };
            let _ = stream.write_all(&answer);
        }
    });
    (url, served)
}

/// The manifest of `dir`'s files: the SHA-256 of each, unpacked.
fn manifest(dir: &Path, at: &Path) -> PathBuf {
    let map: serde_json::Map<String, serde_json::Value> = FILES
        .iter()
        .map(|f| {
            let mut unpacked = Vec::new();
            flate2::read::GzDecoder::new(std::fs::read(dir.join(f)).unwrap().as_slice())
                .read_to_end(&mut unpacked)
                .unwrap();
            let sum: String = Sha256::digest(&unpacked)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            (f.to_string(), sum.into())
        })
        .collect();
    std::fs::write(at, serde_json::to_string(&map).unwrap()).unwrap();
    at.to_path_buf()
}

#[test]
fn fetch_downloads_checks_and_does_not_fetch_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let (url, served) = serve_dir(fixtures());
    let m = manifest(&fixtures(), &tmp.path().join("manifest.json"));
    let into = tmp.path().join("cache/mnist");
    let fetch = || {
        starling()
            .args(["data", "fetch", "mnist", "--from", &url, "--manifest"])
            .arg(&m)
            .arg("--into")
            .arg(&into)
            .output()
            .unwrap()
    };
    let out = fetch();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        into.display().to_string()
    );
    for f in FILES {
        assert_eq!(
            std::fs::read(into.join(f)).unwrap(),
            std::fs::read(fixtures().join(f)).unwrap(),
            "{f}"
        );
    }
    assert_eq!(served.load(Ordering::SeqCst), 4);
    // Again: everything is there and checks out, so nothing is requested.
    let out = fetch();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already there, checked"));
    assert_eq!(served.load(Ordering::SeqCst), 4);
    // And the simulator reads the folder.
    let out = starling()
        .args(["simulate", "--dataset", "mnist", "--data"])
        .arg(&into)
        .args([
            "--model",
            "logistic",
            "--devices",
            "5",
            "--rounds",
            "1",
            "--json",
            "--out",
        ])
        .arg(tmp.path().join("sim"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_corrupt_file_is_refused_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let mirror = tmp.path().join("mirror");
    std::fs::create_dir(&mirror).unwrap();
    for f in FILES {
        std::fs::copy(fixtures().join(f), mirror.join(f)).unwrap();
    }
    let m = manifest(&mirror, &tmp.path().join("manifest.json"));
    // The mirror's labels change after the manifest was made: a byte flipped in the data.
    let labels = mirror.join("t10k-labels-idx1-ubyte.gz");
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(std::fs::read(&labels).unwrap().as_slice())
        .read_to_end(&mut raw)
        .unwrap();
    let last = raw.len() - 1;
    raw[last] ^= 1;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&raw).unwrap();
    std::fs::write(&labels, gz.finish().unwrap()).unwrap();
    let (url, _) = serve_dir(mirror);
    let into = tmp.path().join("cache");
    let stderr = fails(
        starling()
            .args(["data", "fetch", "mnist", "--from", &url, "--manifest"])
            .arg(&m)
            .arg("--into")
            .arg(&into),
    );
    assert!(
        stderr.contains("t10k-labels-idx1-ubyte.gz") && stderr.contains("SHA-256"),
        "{stderr}"
    );
    assert!(!into.join("t10k-labels-idx1-ubyte.gz").exists());
    assert!(!into.join("t10k-labels-idx1-ubyte.gz.part").exists());
}

#[test]
fn unknown_sets_and_missing_mirrors_are_named() {
    let stderr = fails(starling().args(["data", "fetch", "cifar"]));
    assert!(
        stderr.contains("unknown data set `cifar` (mnist, fashion-mnist, shakespeare)"),
        "{stderr}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let stderr = fails(
        starling()
            .args(["data", "fetch", "shakespeare", "--into"])
            .arg(tmp.path()),
    );
    assert!(
        stderr.contains("has no public mirror; pass --from URL"),
        "{stderr}"
    );
}

/// The character LSTM end to end on the committed Shakespeare fixture: two roles as two
/// devices, one round, every character of the held-out sequences predicted. The per-step
/// accuracy is a fraction of characters (a count per example would exceed 1), and the
/// round's training examples are whole 80-character sequences.
#[test]
fn the_character_lstm_simulates_a_round_on_shakespeare_roles() {
    let tmp = tempfile::tempdir().unwrap();
    let roles = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../starling-core/tests/fixtures/shakespeare/roles.json.gz");
    let out_dir = tmp.path().join("sim");
    let out = starling()
        .args(["simulate", "--dataset", "shakespeare", "--data"])
        .arg(&roles)
        .args([
            "--model",
            "lstm",
            "--devices",
            "2",
            "--per-round",
            "2",
            "--rounds",
            "1",
            "--lr",
            "4",
            "--json",
            "--out",
        ])
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(v["rounds"], 1, "{v}");
    let accuracy = v["final_accuracy"].as_f64().unwrap();
    assert!(accuracy > 0.0 && accuracy < 1.0, "{v}");
    assert!(v["final_loss"].as_f64().unwrap().is_finite(), "{v}");
    let csv = std::fs::read_to_string(out_dir.join("results.csv")).unwrap();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let row: Vec<&str> = csv.lines().nth(1).unwrap().split(',').collect();
    let examples: usize = row[header.iter().position(|h| *h == "examples").unwrap()]
        .parse()
        .unwrap();
    // The fixture's first two roles with 64 LEAF samples hold 1,486 and 1,469 characters:
    // 18 sequences of 80 (with the character after) each, of which the last 20% (4) are
    // held out.
    assert_eq!(examples, 14 + 14, "sequences trained on\n{csv}");
}
