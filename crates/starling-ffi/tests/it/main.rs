//! starling-ffi's tests: a C program linked against the library drives a device through
//! real servers (`c`), and the committed header is what cbindgen generates (`header`).

mod c;
mod header;
