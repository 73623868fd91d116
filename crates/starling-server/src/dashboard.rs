//! The operator dashboard: a page that reads the public JSON API (`/v1/tasks`, a task's
//! `rounds` and `privacy`) and `/metrics` every two seconds and draws the tasks, their open
//! rounds, loss and accuracy curves, the round history and the refused updates; with the admin
//! token it rolls a task back, pauses and resumes it, and lists and revokes its devices. Plain
//! HTML, CSS and JS from `crates/starling-server/dashboard/`, embedded with `include_bytes!` and
//! served like the device app ([`crate::web`]: FNV-1a `ETag`s, always revalidated) at
//! `/dashboard`, `/dashboard/` and `/dashboard/<file>`.
//!
//! Every answer carries a Content-Security-Policy that allows the page's own files and
//! requests to its own origin only: no inline script or style, no other origin, no framing.
//! The page keeps the admin token in `sessionStorage` and sends it only in the
//! `X-Starling-Admin-Token` header.

use std::sync::OnceLock;

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::Response;
use axum::routing::get;
use axum::Router;

use crate::web::{etag_of, no_such_file, respond, Asset};

/// An embedded file of `crates/starling-server/dashboard/`.
macro_rules! asset {
    ($name:literal, $type:literal) => {
        (
            $name,
            $type,
            include_bytes!(concat!("../dashboard/", $name)) as &[u8],
        )
    };
}

/// Every file of the dashboard. A unit test checks this list against the folder.
const ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("dashboard.js", "text/javascript; charset=utf-8"),
    asset!("dashboard.css", "text/css; charset=utf-8"),
];

/// Only the page's own files and its own origin: no inline code, no framing. (The icon is the
/// device app's, `/app/icon.svg`, the same origin.)
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

/// The dashboard's routes, to merge into the API's router.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/dashboard", get(page))
        .route("/dashboard/", get(page))
        .route("/dashboard/{file}", get(asset))
}

fn etags() -> &'static [String] {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    TAGS.get_or_init(|| ASSETS.iter().map(|(_, _, bytes)| etag_of(bytes)).collect())
}

fn serve(index: usize, headers: &HeaderMap) -> Response {
    let (_, content_type, bytes) = ASSETS[index];
    let mut response = respond(content_type, bytes, &etags()[index], headers);
    response.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    response
}

async fn page(headers: HeaderMap) -> Response {
    serve(0, &headers)
}

async fn asset(Path(file): Path<String>, headers: HeaderMap) -> Response {
    match ASSETS.iter().position(|(name, _, _)| *name == file) {
        Some(i) => serve(i, &headers),
        None => no_such_file("the dashboard", &file),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_of_the_folder_is_served() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/dashboard");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        let mut served: Vec<String> = ASSETS.iter().map(|(n, _, _)| n.to_string()).collect();
        served.sort();
        assert_eq!(
            files, served,
            "update ASSETS in dashboard.rs to match dashboard/"
        );
    }

    #[test]
    fn the_page_loads_only_its_own_files() {
        let html = std::str::from_utf8(ASSETS[0].2).unwrap();
        // No inline script or style: the policy would block them.
        assert!(!html.contains("<script>") && !html.contains("style="));
        for (name, _, _) in &ASSETS[1..] {
            assert!(html.contains(&format!("/dashboard/{name}")), "{name}");
        }
    }
}
