//! The device app's integration tests, one binary: its files as served, and the app in headless Chromium
//! (`secure.rs`: a secure round beside native devices);
//! also the server's operator dashboard in headless Chromium, which shares the browser helpers.

mod browser;
mod dashboard;
mod secure;
mod serving;
