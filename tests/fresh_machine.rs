//! README's first command on a fresh machine: the `pipe` binary needs no system ODBC driver
//! manager (unixODBC is built in), and an `odbc` connection whose driver is not installed
//! fails its step with an error that names the driver and the package that provides it.

use crate::util::{pipe_bin, Env};
use std::process::Command;

#[test]
fn the_binary_has_no_dynamic_dependency_on_libodbc() {
    let out = Command::new("ldd")
        .arg(pipe_bin())
        .output()
        .expect("ldd (Debian's libc-bin)");
    let libs = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ldd failed: {libs}");
    // ldd lists at least libc for a dynamically linked binary: the check below can fail.
    assert!(libs.contains("libc.so"), "unexpected ldd output: {libs}");
    for lib in ["libodbc", "libodbcinst", "libltdl"] {
        assert!(
            !libs.contains(lib),
            "pipe links {lib} dynamically; a machine without unixODBC cannot run it:\n{libs}"
        );
    }
}

#[test]
fn an_odbc_driver_that_is_not_installed_is_named_with_its_package() {
    let env = Env::new();
    // An empty odbcinst.ini: the machine has no ODBC driver registered, whatever this one has.
    let ini = env.path().join("odbc-empty");
    std::fs::create_dir_all(&ini).unwrap();
    std::fs::write(ini.join("odbcinst.ini"), "").unwrap();
    std::fs::write(ini.join("odbc.ini"), "").unwrap();
    let p = env.write(
        "p.yaml",
        r#"pipeline: odbc_missing_driver
connections:
  erp: { type: odbc, connection_string: "Driver={PostgreSQL Unicode};Server=127.0.0.1;Port=5432;Database=test;Uid=postgres;" }
steps:
  read:
    type: sql.query
    connection: erp
    with: { query: "SELECT 1 AS one" }
  after:
    type: log
    needs: [read]
    always: true
    with: { message: "teardown ran" }
"#,
    );
    let out = Command::new(pipe_bin())
        .current_dir(env.path())
        .env("PIPE_HOME", env.state())
        .env("ODBCSYSINI", &ini)
        .env("ODBCINSTINI", "odbcinst.ini")
        .env("ODBCINI", ini.join("odbc.ini"))
        .env("HOME", env.path())
        .args(["run", p.to_str().unwrap()])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("the ODBC driver `PostgreSQL Unicode` is not installed"),
        "{text}"
    );
    assert!(text.contains("apt-get install odbc-postgresql"), "{text}");
    assert!(
        text.contains("after  succeeded"),
        "the always: step runs: {text}"
    );
}
