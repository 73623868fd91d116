//! `include/starling.h` is committed (so that a C host needs no Rust tooling to read it, and
//! a library build needs no cbindgen); this regenerates it from `src/lib.rs` and fails when
//! the two differ. `STARLING_BLESS=1` writes the regenerated header instead.

use std::path::Path;

#[test]
fn the_committed_header_is_what_cbindgen_generates() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).unwrap();
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen reads src/lib.rs")
        .write(&mut generated);
    let path = crate_dir.join("include/starling.h");
    if std::env::var_os("STARLING_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "include/starling.h is out of date: regenerate it with \
         `STARLING_BLESS=1 cargo test -p starling-ffi --test it header`"
    );
}
