//! `starling data fetch`: downloads a data set's files into a cache folder and checks each
//! one, unpacked, against its known SHA-256, so that `starling simulate --data` can point
//! at the folder. A file is written only once it checks out (through a `.part` file renamed
//! into place); files already there that check out are not fetched again.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

/// `starling data` subcommands.
#[derive(clap::Subcommand)]
pub(crate) enum Command {
    /// Download a data set (mnist, fashion-mnist, shakespeare) into a cache folder, checking
    /// every file, and print the folder to pass as `--data`.
    Fetch(FetchArgs),
}

/// Arguments of `starling data fetch`.
#[derive(clap::Args)]
pub(crate) struct FetchArgs {
    /// The data set: mnist, fashion-mnist or shakespeare.
    name: String,
    /// The folder to put the files in [default: $XDG_CACHE_HOME/starling/NAME, or
    /// ~/.cache/starling/NAME].
    #[arg(long, value_name = "DIR")]
    into: Option<PathBuf>,
    /// The base URL the files are downloaded from [default: the data set's public mirror;
    /// shakespeare has none, so it needs this].
    #[arg(long, value_name = "URL")]
    from: Option<String>,
    /// A JSON file `{"<file>": "<sha256 of the unpacked file>", ...}` to check against
    /// instead of the known sums (a private mirror of other files).
    #[arg(long, value_name = "FILE")]
    manifest: Option<PathBuf>,
    /// Download every file again, even those already there and checked.
    #[arg(long)]
    force: bool,
}

/// A data set's files (gzip) and the SHA-256 of each unpacked.
struct DataSet {
    name: &'static str,
    mirror: Option<&'static str>,
    files: &'static [(&'static str, &'static str)],
}

/// The IDX files' canonical sums (unpacked), as published with the data sets.
const DATA_SETS: [DataSet; 3] = [
    DataSet {
        name: "mnist",
        mirror: Some("https://ossci-datasets.s3.amazonaws.com/mnist/"),
        files: &[
            (
                "train-images-idx3-ubyte.gz",
                "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            ),
            (
                "train-labels-idx1-ubyte.gz",
                "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            ),
            (
                "t10k-images-idx3-ubyte.gz",
                "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            ),
            (
                "t10k-labels-idx1-ubyte.gz",
                "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
            ),
        ],
    },
    DataSet {
        name: "fashion-mnist",
        mirror: Some("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"),
        files: &[
            (
                "train-images-idx3-ubyte.gz",
                "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            ),
            (
                "train-labels-idx1-ubyte.gz",
                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            ),
            (
                "t10k-images-idx3-ubyte.gz",
                "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            ),
            (
                "t10k-labels-idx1-ubyte.gz",
                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
            ),
        ],
    },
    DataSet {
        name: "shakespeare",
        mirror: None,
        files: &[(
            "roles.json.gz",
            "3aa1c1aa0f80f6ee802d6a15126257b2329d3b2f21c93ddb93e737805da7fe7e",
        )],
    },
];

pub(crate) fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Fetch(a) => crate::runtime()?.block_on(fetch(a)),
    }
}

/// The default cache folder of a data set.
fn cache_dir(name: &str) -> anyhow::Result<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").context("no HOME; pass --into DIR")?)
            .join(".cache"),
    };
    Ok(base.join("starling").join(name))
}

/// The SHA-256 of a gzip file's unpacked content, as lowercase hex.
fn unpacked_sha256(gz: &[u8]) -> anyhow::Result<String> {
    let mut decoder = flate2::read::GzDecoder::new(gz);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = decoder.read(&mut buf).context("not a gzip file")?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Whether `path` exists and its unpacked content has the sum `want`.
fn checks_out(path: &Path, want: &str) -> bool {
    std::fs::read(path)
        .ok()
        .and_then(|bytes| unpacked_sha256(&bytes).ok())
        .is_some_and(|sum| sum == want)
}

async fn fetch(a: FetchArgs) -> anyhow::Result<ExitCode> {
    let names: Vec<&str> = DATA_SETS.iter().map(|d| d.name).collect();
    let Some(set) = DATA_SETS.iter().find(|d| d.name == a.name) else {
        bail!("unknown data set `{}` ({})", a.name, names.join(", "));
    };
    let files: Vec<(String, String)> = match &a.manifest {
        None => set
            .files
            .iter()
            .map(|(f, s)| ((*f).to_string(), (*s).to_string()))
            .collect(),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --manifest {}", path.display()))?;
            let map: BTreeMap<String, String> = serde_json::from_str(&text).with_context(|| {
                format!(
                    "--manifest {}: expected {{\"<file>\": \"<sha256>\", ...}}",
                    path.display()
                )
            })?;
            if map.is_empty() {
                bail!("--manifest {} lists no files", path.display());
            }
            map.into_iter().collect()
        }
    };
    let from = match (&a.from, set.mirror) {
        (Some(url), _) => url.clone(),
        (None, Some(mirror)) => mirror.to_string(),
        (None, None) => bail!(
            "`{}` has no public mirror; pass --from URL (a folder serving {})",
            set.name,
            files
                .iter()
                .map(|(f, _)| f.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let from = format!("{}/", from.trim_end_matches('/'));
    let into = match &a.into {
        Some(dir) => dir.clone(),
        None => cache_dir(set.name)?,
    };
    std::fs::create_dir_all(&into).with_context(|| format!("cannot create {}", into.display()))?;
    let http = starling_client::transport::http_client(None)?;
    for (file, want) in &files {
        if file.contains('/') || file.contains("..") {
            bail!("`{file}` is not a plain file name");
        }
        let path = into.join(file);
        if !a.force && checks_out(&path, want) {
            eprintln!("{file}: already there, checked");
            continue;
        }
        let url = format!("{from}{file}");
        let mut resp = http
            .get(&url)
            .send()
            .await
            .with_context(|| format!("cannot download {url}"))?;
        if !resp.status().is_success() {
            bail!("{url}: the server answered {}", resp.status());
        }
        let bar = match resp.content_length() {
            Some(n) => ProgressBar::new(n),
            None => ProgressBar::no_length(),
        }
        .with_style(
            ProgressStyle::with_template("{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec}")
                .expect("static template"),
        )
        .with_message(file.clone());
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .with_context(|| format!("downloading {url}"))?
        {
            bar.inc(chunk.len() as u64);
            body.extend_from_slice(&chunk);
        }
        bar.finish_and_clear();
        let got = unpacked_sha256(&body).with_context(|| url.clone())?;
        if got != *want {
            bail!(
                "{url}: the unpacked file's SHA-256 is {got}, not the expected {want}; \
                 nothing was written"
            );
        }
        let part = into.join(format!("{file}.part"));
        std::fs::write(&part, &body).with_context(|| format!("cannot write {}", part.display()))?;
        std::fs::rename(&part, &path)
            .with_context(|| format!("cannot move {} into place", part.display()))?;
        eprintln!("{file}: downloaded, {} bytes, checked", body.len());
    }
    println!("{}", into.display());
    Ok(ExitCode::SUCCESS)
}
