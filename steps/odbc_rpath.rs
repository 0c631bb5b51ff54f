// Shared by build.rs (the `pipe` binary, its tests and benches) and steps/build.rs (the
// steps crate's own tests): the directories where Linux distributions install ODBC drivers
// become the binary's RUNPATH.
//
// `pipe` links unixODBC's driver manager in (odbc-sys `vendored-unix-odbc`), so it needs no
// libodbc on the machine. Drivers stay shared libraries named in odbcinst.ini, and Debian
// registers them by bare file name (`Driver=psqlodbcw.so`) in /usr/lib/<triple>/odbc, which
// its own libodbc knows and the built-in one does not. dlopen searches the RUNPATH of the
// calling object, here the executable, so the same odbcinst.ini works unchanged.
fn odbc_driver_rpath() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    let triple = format!("{arch}-linux-{env}");
    for dir in [
        format!("/usr/lib/{triple}/odbc"),
        "/usr/lib64/odbc".to_string(),
        "/usr/lib/odbc".to_string(),
        "/usr/local/lib/odbc".to_string(),
    ] {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
