//! What the systemd unit promises, checked without building the package
//! (that is `packaging/check-deb.sh`, which `.ci/run` calls): its
//! `systemd-analyze security` exposure (principle 6), Type=notify with a
//! watchdog, an identity that matches the sysusers and tmpfiles entries, and
//! the files `hubctl about` points to being ones the package installs.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The most `systemd-analyze security` may score the unit (DESIGN.md).
const MAX_EXPOSURE: f64 = 1.5;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace root")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The values of `key=` lines of a unit-like file, in order.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim().to_owned())
        .collect()
}

fn unit_value(unit: &str, key: &str) -> String {
    let values = unit_values(unit, key);
    assert_eq!(values.len(), 1, "{key}= is set {} times", values.len());
    values[0].clone()
}

#[test]
fn the_unit_scores_at_most_1_5_in_systemd_analyze_security() {
    let unit = root().join("packaging/hubd.service");
    let output = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "!!! systemd-analyze is missing ({e}): apt-get install systemd (.ci/run installs it) !!!"
            )
        });
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "systemd-analyze failed: {stderr}\n{stdout}"
    );
    // "→ Overall exposure level for hubd.service: 1.2 OK 🙂"
    let line = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level for hubd.service:"))
        .unwrap_or_else(|| panic!("no overall exposure line in:\n{stdout}"));
    let score: f64 = line
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number in {line:?}"));
    println!("{line}");
    assert!(
        score <= MAX_EXPOSURE,
        "hubd.service exposure {score} > {MAX_EXPOSURE}:\n{stdout}"
    );
}

#[test]
fn the_unit_is_notify_watchdog_and_runs_as_the_packaged_user() {
    let unit = read("packaging/hubd.service");
    for (key, value) in [
        ("Type", "notify"),
        ("Restart", "on-failure"),
        ("User", "hubd"),
        ("Group", "hubadmin"),
        ("StateDirectory", "hubd"),
        ("StateDirectoryMode", "0700"),
        ("RuntimeDirectory", "hubd"),
        ("RuntimeDirectoryMode", "0750"),
        ("ConfigurationDirectory", "hubd"),
        ("ExecStart", "/usr/bin/hubd --config /etc/hubd/hubd.toml"),
        ("CapabilityBoundingSet", ""),
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
    ] {
        assert_eq!(unit_value(&unit, key), value, "{key}=");
    }
    assert!(!unit_value(&unit, "WatchdogSec").is_empty());
    assert_eq!(
        unit_values(&unit, "SystemCallFilter"),
        ["@system-service", "~@privileged @resources"]
    );
    // No password, no key material: nothing secret is in the unit.
    let lower = unit.to_lowercase();
    assert!(!lower.contains("password") && !lower.contains("private key"));
}

#[test]
fn sysusers_and_tmpfiles_match_the_units_identity() {
    let unit = read("packaging/hubd.service");
    let user = unit_value(&unit, "User");
    let group = unit_value(&unit, "Group");
    let sysusers = read("packaging/hubd.sysusers");
    let entries: Vec<Vec<&str>> = sysusers
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert!(
        entries
            .iter()
            .any(|e| e[..2] == ["u", user.as_str()] && e.last() == Some(&"/var/lib/hubd")),
        "no system user {user} with home /var/lib/hubd in {entries:?}"
    );
    assert!(
        entries.iter().any(|e| e[..2] == ["g", group.as_str()]),
        "no group {group} in {entries:?}"
    );
    let tmpfiles = read("packaging/hubd.tmpfiles");
    let state: Vec<&str> = tmpfiles
        .lines()
        .find(|l| l.starts_with("d /var/lib/hubd "))
        .expect("a tmpfiles entry for /var/lib/hubd")
        .split_whitespace()
        .collect();
    assert_eq!(state[2..5], ["0700", user.as_str(), group.as_str()]);
}

#[test]
fn the_paths_hubctl_about_names_are_files_the_package_installs() {
    let mut out = Vec::new();
    let mut err = Vec::new();
    let code = hubctl::run(["hubctl", "about", "--json"], &mut out, &mut err);
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&err));
    let about: serde_json::Value = serde_json::from_slice(&out).expect("JSON");
    let manifest = read("hubd/Cargo.toml");
    for key in ["security_policy", "privacy_notice", "support_statement"] {
        let path = about[key].as_str().expect("a path");
        let dest = path.trim_start_matches('/');
        assert!(
            manifest.contains(&format!("\"{dest}\"")),
            "{key} {path} is not an asset of the package (hubd/Cargo.toml)"
        );
    }
}
