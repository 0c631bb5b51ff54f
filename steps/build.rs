//! The steps crate's tests load ODBC drivers like the `pipe` binary does.
include!("odbc_rpath.rs");

fn main() {
    println!("cargo:rerun-if-changed=odbc_rpath.rs");
    odbc_driver_rpath();
}
