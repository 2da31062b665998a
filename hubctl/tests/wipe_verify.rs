//! `hubctl wipe verify`: a receipt signed as the hub signs it (with
//! `hub_proto::receipt::sign` and an rcgen CA) verifies offline with its
//! summary printed; a changed byte fails with exit 1 naming the problem; and
//! the wipe's own options do not go with `verify`.

use std::path::Path;

use hub_proto::receipt::{self, Receipt};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, PKCS_ECDSA_P256_SHA256};

/// Runs hubctl with an empty environment; returns the exit code, stdout and stderr.
fn hubctl(args: &[&str]) -> (u8, String, String) {
    let mut out = Vec::new();
    let mut err = Vec::new();
    let argv = std::iter::once("hubctl").chain(args.iter().copied());
    let code = hubctl::run_with_env(argv, &|_| None, &mut out, &mut err);
    (
        code,
        String::from_utf8(out).expect("utf-8 stdout"),
        String::from_utf8(err).expect("utf-8 stderr"),
    )
}

/// A receipt signed by a fresh P-256 CA, as the file the hub hands out.
fn signed_receipt() -> (Receipt, String) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let ca = params.self_signed(&key).expect("ca");
    let destroyed = [
        ("certificates", 12),
        ("devices", 10),
        ("events", 5300),
        ("rules", 4),
        ("states", 10),
        ("variables", 2),
    ];
    let receipt = Receipt {
        format: receipt::FORMAT.to_owned(),
        hub: "home".to_owned(),
        started_at: "2026-11-22T10:00:00Z".to_owned(),
        finished_at: "2026-11-22T10:00:03Z".to_owned(),
        old_ca_fingerprint: receipt::fingerprint(b"the old ca"),
        new_ca_fingerprint: receipt::fingerprint(ca.der()),
        destroyed: destroyed
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
        devices_acknowledged: vec!["a".to_owned(), "b".to_owned()],
        devices_not_acknowledged: vec!["c".to_owned()],
        new_ca_pem: ca.pem(),
    };
    let text = receipt::sign(&receipt, &key.serialize_der()).expect("signs");
    (receipt, text)
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

#[test]
fn a_valid_receipt_verifies_with_its_summary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("receipt.json");
    let (receipt, text) = signed_receipt();
    std::fs::write(&path, &text).expect("write");

    let (code, out, err) = hubctl(&["wipe", "verify", path_str(&path)]);
    assert_eq!(code, hubctl::EXIT_OK, "{err}");
    assert_eq!(err, "");
    assert_eq!(
        out,
        format!(
            "receipt valid: hub \"home\" wiped 2026-11-22T10:00:00Z .. 2026-11-22T10:00:03Z\n\
             old ca: {}\n\
             new ca: {}\n\
             destroyed: certificates 12, devices 10, events 5300, rules 4, states 10, variables 2\n\
             devices that acknowledged the reset: a, b\n\
             devices that did not: c\n",
            receipt.old_ca_fingerprint, receipt.new_ca_fingerprint
        )
    );

    let (code, out, err) = hubctl(&["wipe", "verify", "--json", path_str(&path)]);
    assert_eq!(code, hubctl::EXIT_OK, "{err}");
    let shown: Receipt = serde_json::from_str(&out).expect("the receipt as json");
    assert_eq!(shown, receipt);
}

#[test]
fn a_changed_byte_fails_naming_the_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("receipt.json");
    let (_, text) = signed_receipt();
    let shown = format!("wipe verify {}", path.display());

    // One more device "destroyed": still well-formed, so only the signature tells.
    let changed = text.replacen("\"devices\":10", "\"devices\":11", 1);
    assert_ne!(changed, text);
    std::fs::write(&path, &changed).expect("write");
    let (code, out, err) = hubctl(&["wipe", "verify", path_str(&path)]);
    assert_eq!(code, hubctl::EXIT_FAILED, "{err}");
    assert_eq!(out, "");
    assert_eq!(
        err,
        format!(
            "hubctl: {shown}: the receipt's signature does not match: it was changed after \
             it was signed, or not signed by the new CA it names\n"
        )
    );

    // A space added: the layout is no longer the hub's.
    std::fs::write(&path, text.replacen(',', ", ", 1)).expect("write");
    let (code, _, err) = hubctl(&["wipe", "verify", path_str(&path)]);
    assert_eq!(code, hubctl::EXIT_FAILED, "{err}");
    assert_eq!(
        err,
        format!(
            "hubctl: {shown}: the receipt was changed after it was signed: its text is not exactly what the hub wrote\n"
        )
    );

    // Any single byte, each in turn: always exit 1 with the file named.
    let bytes = text.as_bytes();
    for i in (0..bytes.len()).step_by(bytes.len() / 40) {
        let mut changed = bytes.to_vec();
        changed[i] ^= 0x01;
        std::fs::write(&path, &changed).expect("write");
        let (code, out, err) = hubctl(&["wipe", "verify", path_str(&path)]);
        assert_eq!(code, hubctl::EXIT_FAILED, "byte {i}: {err}");
        assert_eq!(out, "", "byte {i}");
        assert!(
            err.starts_with(&format!("hubctl: {shown}: ")),
            "byte {i}: {err}"
        );
    }
}

#[test]
fn a_missing_file_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("none.json");
    let (code, _, err) = hubctl(&["wipe", "verify", path_str(&path)]);
    assert_eq!(code, hubctl::EXIT_FAILED, "{err}");
    assert!(
        err.starts_with(&format!("hubctl: wipe verify {}: ", path.display())),
        "{err}"
    );
}

#[test]
fn the_wipe_options_do_not_go_with_verify() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("receipt.json");
    let (_, text) = signed_receipt();
    std::fs::write(&path, &text).expect("write");
    let p = path_str(&path);
    for args in [
        &["wipe", "verify", p, "--yes"][..],
        &["wipe", "--yes", "verify", p],
        &["wipe", "--receipt", "r.json", "verify", p],
        &["wipe", "verify", p, "--receipt", "r.json"],
        &["wipe", "verify"],
    ] {
        let (code, out, err) = hubctl(args);
        assert_eq!(code, hubctl::EXIT_USAGE, "{args:?}: {err}");
        assert_eq!(out, "", "{args:?}");
    }
}
