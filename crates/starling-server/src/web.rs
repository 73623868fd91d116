//! The device app's pages: the page's own files from `crates/starling-web/www/` and the wasm
//! modules with their JS glue that `scripts/build-web.sh` generates into `crates/starling-web/dist/`
//! (the main module, and secure aggregation's, which the page imports only for a secure round),
//! embedded in the binary so that `starling serve` needs no files beside it. The page is served at `/`, `/app` and `/app/`; its assets at `/app/<file>`.

use std::sync::OnceLock;

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

/// One embedded file: name under `/app/`, content type, bytes.
pub(crate) type Asset = (&'static str, &'static str, &'static [u8]);

/// An embedded file of `crates/starling-web/`: `www` (the page's own files) or `dist` (what
/// `scripts/build-web.sh` generates: the wasm modules and their JS glue).
macro_rules! asset {
    ($dir:literal, $name:literal, $type:literal) => {
        (
            $name,
            $type,
            include_bytes!(concat!("../../starling-web/", $dir, "/", $name)) as &[u8],
        )
    };
}

/// Every file of the app. A unit test checks this list against `www/` and `dist/`.
const ASSETS: &[Asset] = &[
    asset!("www", "index.html", "text/html; charset=utf-8"),
    asset!("www", "app.js", "text/javascript; charset=utf-8"),
    asset!("www", "job.js", "text/javascript; charset=utf-8"),
    asset!("www", "worker.js", "text/javascript; charset=utf-8"),
    asset!("www", "sw.js", "text/javascript; charset=utf-8"),
    asset!("www", "secure.js", "text/javascript; charset=utf-8"),
    asset!("dist", "starling_web.js", "text/javascript; charset=utf-8"),
    asset!("dist", "starling_web_bg.wasm", "application/wasm"),
    // Secure aggregation's module (with www/secure.js): imported only for a secure round.
    asset!(
        "dist",
        "starling_web_secure.js",
        "text/javascript; charset=utf-8"
    ),
    asset!("dist", "starling_web_secure_bg.wasm", "application/wasm"),
    asset!("www", "style.css", "text/css; charset=utf-8"),
    asset!("www", "manifest.webmanifest", "application/manifest+json"),
    asset!("www", "icon.svg", "image/svg+xml"),
    asset!("www", "icon-192.png", "image/png"),
    asset!("www", "icon-512.png", "image/png"),
];

/// The routes of the device app, to merge into the API's router.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(page))
        .route("/app", get(page))
        .route("/app/", get(page))
        .route("/app/{file}", get(asset))
}

/// FNV-1a of each file, computed once: the `ETag` that lets browsers revalidate cheaply.
fn etags() -> &'static [String] {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    TAGS.get_or_init(|| ASSETS.iter().map(|(_, _, bytes)| etag_of(bytes)).collect())
}

/// The quoted FNV-1a hash of an embedded file, its `ETag` (also the dashboard's).
pub(crate) fn etag_of(bytes: &[u8]) -> String {
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("\"{hash:016x}\"")
}

fn serve(index: usize, headers: &HeaderMap) -> Response {
    let (_, content_type, bytes) = ASSETS[index];
    respond(content_type, bytes, &etags()[index], headers)
}

/// An embedded file's answer (also the dashboard's): 304 when the request's `If-None-Match`
/// names `etag`, else the bytes; either way told to revalidate every time.
pub(crate) fn respond(
    content_type: &'static str,
    bytes: &'static [u8],
    etag: &str,
    headers: &HeaderMap,
) -> Response {
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let common = [
        (
            header::ETAG,
            HeaderValue::from_str(etag).expect("hex digits and quotes are a valid header"),
        ),
        // Always revalidate: a new server build must reach installed apps at once.
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (
            header::HeaderName::from_static("x-content-type-options"),
            HeaderValue::from_static("nosniff"),
        ),
    ];
    if fresh {
        return (StatusCode::NOT_MODIFIED, common).into_response();
    }
    (
        common,
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        bytes,
    )
        .into_response()
}

/// The answer for a file the app (`what`) does not have (also the dashboard's).
pub(crate) fn no_such_file(what: &str, file: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(serde_json::json!({"error": {
            "code": "not_found",
            "message": format!("{what} has no file `{file}`"),
        }})),
    )
        .into_response()
}

async fn page(headers: HeaderMap) -> Response {
    serve(0, &headers)
}

async fn asset(Path(file): Path<String>, headers: HeaderMap) -> Response {
    match ASSETS.iter().position(|(name, _, _)| *name == file) {
        Some(i) => serve(i, &headers),
        None => no_such_file("the device app", &file),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_built_file_is_served() {
        let app = concat!(env!("CARGO_MANIFEST_DIR"), "/../starling-web");
        let mut built: Vec<String> = ["www", "dist"]
            .iter()
            .flat_map(|d| std::fs::read_dir(format!("{app}/{d}")).unwrap())
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        built.sort();
        let mut served: Vec<String> = ASSETS.iter().map(|(n, _, _)| n.to_string()).collect();
        served.sort();
        assert_eq!(
            built, served,
            "update ASSETS in web.rs to match www/ and dist/"
        );
    }

    #[test]
    fn etags_differ_per_file() {
        let tags = etags();
        assert_eq!(tags.len(), ASSETS.len());
        assert_ne!(tags[0], tags[1]);
    }
}
