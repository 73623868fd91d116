//! The device app's integration tests, one binary: its files as served, and the app in headless Chromium.

mod browser;
mod serving;
