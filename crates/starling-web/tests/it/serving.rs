//! `starling serve` serves the device app: the page at `/`, `/app` and `/app/`, its files
//! with the content types browsers insist on (`application/wasm` for streaming compilation,
//! `application/manifest+json` for installing), and a manifest whose icons exist.

use anyhow::Result;
use reqwest::header::{CONTENT_TYPE, ETAG, IF_NONE_MATCH};
use reqwest::StatusCode;
use serde_json::Value;
use starling_server::Settings;

async fn start() -> Result<(starling_server::Running, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let mut settings = Settings::default();
    settings.server.data_dir = dir.path().to_path_buf();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    Ok((starling_server::spawn(settings, listener).await?, dir))
}

fn content_type(r: &reqwest::Response) -> String {
    r.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn the_page_its_files_and_the_manifest_are_served() -> Result<()> {
    let (server, _dir) = start().await?;
    let http = reqwest::Client::new();
    let get = |path: &str| http.get(format!("{}{path}", server.url())).send();

    for path in ["/", "/app", "/app/"] {
        let r = get(path).await?;
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        assert_eq!(content_type(&r), "text/html; charset=utf-8", "{path}");
        let html = r.text().await?;
        assert!(html.contains("/app/app.js") && html.contains("/app/manifest.webmanifest"));
    }

    let r = get("/app/starling_web_bg.wasm").await?;
    assert_eq!(content_type(&r), "application/wasm");
    let etag = r.headers()[ETAG].clone();
    let wasm = r.bytes().await?;
    assert_eq!(&wasm[..4], b"\0asm");
    let again = http
        .get(format!("{}/app/starling_web_bg.wasm", server.url()))
        .header(IF_NONE_MATCH, etag)
        .send()
        .await?;
    assert_eq!(again.status(), StatusCode::NOT_MODIFIED);

    for (file, ty) in [
        ("app.js", "text/javascript; charset=utf-8"),
        ("worker.js", "text/javascript; charset=utf-8"),
        ("starling_web.js", "text/javascript; charset=utf-8"),
        ("style.css", "text/css; charset=utf-8"),
        ("sw.js", "text/javascript; charset=utf-8"),
        ("secure.js", "text/javascript; charset=utf-8"),
        ("starling_web_secure.js", "text/javascript; charset=utf-8"),
        ("starling_web_secure_bg.wasm", "application/wasm"),
    ] {
        let r = get(&format!("/app/{file}")).await?;
        assert_eq!(r.status(), StatusCode::OK, "{file}");
        assert_eq!(content_type(&r), ty, "{file}");
    }

    let r = get("/app/manifest.webmanifest").await?;
    assert_eq!(content_type(&r), "application/manifest+json");
    let manifest: Value = r.json().await?;
    assert_eq!(manifest["display"], "standalone");
    assert_eq!(manifest["start_url"], "/app/");
    let icons = manifest["icons"].as_array().unwrap();
    for size in ["192x192", "512x512"] {
        assert!(
            icons
                .iter()
                .any(|i| i["sizes"] == size && i["type"] == "image/png"),
            "installable apps need a {size} PNG icon"
        );
    }
    for icon in icons {
        let src = icon["src"].as_str().unwrap();
        let r = get(src).await?;
        assert_eq!(r.status(), StatusCode::OK, "{src}");
        assert_eq!(content_type(&r), icon["type"].as_str().unwrap(), "{src}");
    }

    let r = get("/app/no-such-file.js").await?;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let body: Value = r.json().await?;
    assert_eq!(body["error"]["code"], "not_found");
    // The API is still there beside the app.
    assert_eq!(get("/v1/health").await?.status(), StatusCode::OK);

    server.stop().await?;
    Ok(())
}
