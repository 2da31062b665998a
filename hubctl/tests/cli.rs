//! The `hubctl` binary as a user meets it: exit codes and messages, in a
//! scrubbed environment so the host's `$HUBD_SOCKET` or `$XDG_*` cannot leak in.

use std::path::Path;
use std::process::{Command, Output};

/// Runs the real binary with only `PATH` and `HOME` set (both to `home`) plus `vars`.
fn hubctl(home: &Path, args: &[&str], vars: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hubctl"));
    cmd.env_clear()
        .env("PATH", home)
        .env("HOME", home)
        .args(args);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.output().expect("hubctl runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn missing_socket_via_option_exits_3() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("none.sock");
    let sock_arg = sock.to_str().expect("utf-8 temp path");
    let o = hubctl(dir.path(), &["--socket", sock_arg, "status"], &[]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert_eq!(
        stderr(&o),
        format!("hubctl: cannot reach hubd at {sock_arg}: is it running?\n")
    );
    assert!(o.stdout.is_empty());
}

#[test]
fn missing_socket_via_env_exits_3() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("none.sock");
    let o = hubctl(dir.path(), &["devices", "list"], &[("HUBD_SOCKET", &sock)]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("cannot reach hubd at"),
        "{}",
        stderr(&o)
    );
    assert!(
        stderr(&o).contains(&*sock.to_string_lossy()),
        "{}",
        stderr(&o)
    );
}

#[test]
fn option_beats_env_and_env_beats_default() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opt = dir.path().join("opt.sock");
    let env = dir.path().join("env.sock");
    let opt_arg = opt.to_str().expect("utf-8 temp path");
    let o = hubctl(
        dir.path(),
        &["status", "--socket", opt_arg],
        &[("HUBD_SOCKET", &env)],
    );
    assert!(stderr(&o).contains("opt.sock"), "{}", stderr(&o));
    // With no option or HUBD_SOCKET, RUNTIME_DIRECTORY places the socket.
    let o = hubctl(
        dir.path(),
        &["status"],
        &[("RUNTIME_DIRECTORY", dir.path())],
    );
    let expected = dir.path().join("hubd.sock");
    assert!(
        stderr(&o).contains(&*expected.to_string_lossy()),
        "{}",
        stderr(&o)
    );
    assert_eq!(o.status.code(), Some(3));
}

#[test]
fn socket_that_is_not_a_socket_exits_3() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"").expect("write");
    let o = hubctl(dir.path(), &["status"], &[("HUBD_SOCKET", &file)]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
}

#[test]
fn usage_errors_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    for args in [
        &["frobnicate"][..],
        &[],
        &["devices"],
        &["devices", "show"],
        &["devices", "enroll", "--name", "x"],
        &["status", "--bogus"],
        &["publish", "t"],
        &["publish", "t", "x", "--file", "f"],
        &["watch"],
        &["watch", "#", "--count", "0"],
        &["pair"],
        &["pair", "--name", "x", "--list"],
        &["pair", "--name", "x", "--allow-pub", "a/b"],
        &["pair", "--name", "x", "--window", "5 minutes"],
        &["isolate", "x"],
        &["release"],
        &["devices", "grant", "x"],
        &["devices", "revoke-grant", "x"],
        &["devices", "remove", "x", "--timeout", "5s"],
    ] {
        let o = hubctl(dir.path(), args, &[]);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(o.stdout.is_empty(), "{args:?}");
        assert!(!stderr(&o).is_empty(), "{args:?}");
    }
}

#[test]
fn help_and_version_exit_0_on_stdout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let o = hubctl(dir.path(), &["--help"], &[]);
    assert_eq!(o.status.code(), Some(0));
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(help.contains("Usage: hubctl"), "{help}");
    assert!(help.contains("--socket <PATH>"), "{help}");
    assert!(help.contains("HUBD_SOCKET"), "{help}");
    assert!(o.stderr.is_empty());

    let o = hubctl(dir.path(), &["devices", "enroll", "--help"], &[]);
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).contains("--force"));

    let o = hubctl(dir.path(), &["pair", "--help"], &[]);
    assert_eq!(o.status.code(), Some(0));
    let help = String::from_utf8_lossy(&o.stdout);
    for option in [
        "--name <NAME>",
        "--list",
        "--cancel <CLAIM_ID>",
        "--bundle <DIR>",
        "--allow-pub <FILTER>",
    ] {
        assert!(help.contains(option), "{option}: {help}");
    }

    let o = hubctl(dir.path(), &["--version"], &[]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!("hubctl {}\n", env!("CARGO_PKG_VERSION"))
    );
}
