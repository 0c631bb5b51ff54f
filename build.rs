//! The `pipe` binary finds the ODBC drivers a distribution installs (steps/odbc_rpath.rs).
include!("steps/odbc_rpath.rs");

fn main() {
    println!("cargo:rerun-if-changed=steps/odbc_rpath.rs");
    odbc_driver_rpath();
}
