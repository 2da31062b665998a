//! The pure lifecycle rules: versions, dates, support status, meta
//! parsing, the integrity decision, vendor keys and signatures.

use super::*;
use crate::store::UpdateRecord;

fn d(s: &str) -> Date {
    parse_date(s).unwrap()
}

#[test]
fn versions_order_numerically_by_segment() {
    use Ordering::*;
    for (a, b, want) in [
        ("1.10.0", "1.9.3", Greater),
        ("1.1", "1.1.1", Less),
        ("1.0", "1.0", Equal),
        ("2.0.0", "10.0.0", Less),
        ("1.0.0-rc1", "1.0.0-rc2", Less),
        ("1.2.3", "1.2.3+build7", Less),
        ("0.9", "1.0", Less),
    ] {
        assert_eq!(version_cmp(a, b), want, "{a} vs {b}");
        assert_eq!(version_cmp(b, a), want.reverse(), "{b} vs {a}");
    }
}

#[test]
fn support_status_covers_the_end_date_and_warns_before_it() {
    let end = Some(d("2030-06-30"));
    assert_eq!(support_status(end, d("2030-01-01"), 90), SupportStatus::Ok);
    assert_eq!(
        support_status(end, d("2030-04-01"), 90),
        SupportStatus::EndsSoon
    );
    assert_eq!(
        support_status(end, d("2030-06-30"), 90),
        SupportStatus::EndsSoon
    );
    assert_eq!(
        support_status(end, d("2030-07-01"), 90),
        SupportStatus::Ended
    );
    assert_eq!(
        support_status(None, d("2030-07-01"), 90),
        SupportStatus::Unknown
    );
    assert_eq!(
        support_status(end, d("2030-06-30"), 0),
        SupportStatus::EndsSoon
    );
}

#[test]
fn the_owners_support_end_wins_over_the_devices() {
    let mut l = Lifecycle {
        support_end_reported: Some("2031-12-31".into()),
        ..Default::default()
    };
    assert_eq!(support_end(&l), Some((d("2031-12-31"), "device")));
    l.support_end_owner = Some("2027-01-31".into());
    assert_eq!(support_end(&l), Some((d("2027-01-31"), "owner")));
}

#[test]
fn dates_are_checked() {
    for bad in [
        "2030-13-01",
        "2030-02-30",
        "30-01-01",
        "2030-1-1",
        "1999-12-31",
        "tomorrow",
        "",
    ] {
        assert!(parse_date(bad).is_err(), "{bad}");
    }
    assert!(parse_date("2030-02-28").is_ok());
}

#[test]
fn meta_fields_are_kept_when_well_formed_and_named_when_not() {
    let r = parse_meta(
        br#"{"kind":"switch","model":"HS-SW10","vendor":"hubsim","firmware":"1.8.0",
            "firmware_sha256":"ABC","support_end":"2031-13-01","extra":1}"#,
    )
    .unwrap();
    assert_eq!(r.kind.as_deref(), Some("switch"));
    assert_eq!(r.model.as_deref(), Some("HS-SW10"));
    assert_eq!(r.firmware.as_deref(), Some("1.8.0"));
    assert_eq!(r.firmware_sha256, None);
    assert_eq!(r.support_end, None);
    assert_eq!(r.problems.len(), 2, "{:?}", r.problems);
    assert!(r.problems[0].contains("firmware_sha256"));
    assert!(parse_meta(b"not json").is_none());
    assert!(parse_meta(b"[1,2]").is_none());
}

fn entry(model: &str, version: &str, sha: &str) -> FirmwareRecord {
    FirmwareRecord {
        model: model.into(),
        version: version.into(),
        sha256: sha.into(),
        size: 1,
        signature: vec![0; 64],
        key_id: "k".into(),
        added_at: 0,
    }
}

fn report(model: &str, version: &str, sha: &str) -> MetaReport {
    MetaReport {
        model: Some(model.into()),
        firmware: Some(version.into()),
        firmware_sha256: Some(sha.into()),
        ..Default::default()
    }
}

#[test]
fn integrity_recognised_unknown_and_unoffered_changes() {
    let a = "a".repeat(64);
    let b = "b".repeat(64);
    let c = "c".repeat(64);
    let catalogue = vec![entry("M", "1.0", &a), entry("M", "1.1", &b)];
    let none = Lifecycle::default();
    // Recognised.
    assert_eq!(
        check_integrity(&report("M", "1.0", &a), &none, &catalogue),
        None
    );
    // Known model, known version, other hash.
    assert_eq!(
        check_integrity(&report("M", "1.0", &c), &none, &catalogue),
        Some(Integrity::NotRecognised {
            version: "1.0".into(),
            seen: c.clone(),
            expected: Some(a.clone())
        })
    );
    // Known model, unknown version.
    assert!(matches!(
        check_integrity(&report("M", "9.9", &a), &none, &catalogue),
        Some(Integrity::NotRecognised { expected: None, .. })
    ));
    // A model the catalogue does not know: not judged on first sight.
    assert_eq!(
        check_integrity(&report("X", "1.0", &c), &none, &catalogue),
        None
    );
    // ... but a change nobody offered is.
    let before = Lifecycle {
        model: Some("X".into()),
        firmware: Some("1.0".into()),
        firmware_sha256: Some(a.clone()),
        ..Default::default()
    };
    assert_eq!(
        check_integrity(&report("X", "1.0", &c), &before, &catalogue),
        Some(Integrity::ChangedWithoutUpdate {
            before: a.clone(),
            seen: c.clone()
        })
    );
    // An offered update to that hash is fine; a failed one is not.
    let mut offered = before.clone();
    offered.update = Some(UpdateRecord {
        offer: "o".into(),
        version: "1.1".into(),
        sha256: c.clone(),
        state: UpdateState::Downloading,
        error: None,
        at: 0,
    });
    assert_eq!(
        check_integrity(&report("X", "1.1", &c), &offered, &catalogue),
        None
    );
    offered.update.as_mut().unwrap().state = UpdateState::Failed;
    assert!(check_integrity(&report("X", "1.1", &c), &offered, &catalogue).is_some());
    // The same hash again is no change.
    assert_eq!(
        check_integrity(&report("X", "1.0", &a), &before, &catalogue),
        None
    );
}

#[test]
fn keys_and_signatures_parse_from_pem_raw_hex_and_base64() {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    use ring::signature::KeyPair;
    let public: [u8; 32] = pair.public_key().as_ref().try_into().unwrap();
    let mut spki = ED25519_SPKI_PREFIX.to_vec();
    spki.extend_from_slice(&public);
    let pem = format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        base64(&spki)
    );
    assert_eq!(parse_vendor_key(pem.as_bytes()).unwrap(), public);
    assert_eq!(parse_vendor_key(&public).unwrap(), public);
    assert_eq!(
        parse_vendor_key(hex::encode(public).as_bytes()).unwrap(),
        public
    );
    assert_eq!(
        parse_vendor_key(base64(&public).as_bytes()).unwrap(),
        public
    );
    let err = parse_vendor_key(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
        .unwrap_err();
    assert!(err.0.contains("private key"), "{err}");
    assert!(parse_vendor_key(b"short").is_err());

    let image = b"firmware image";
    let sha = sha256_hex(image);
    let sig = pair.sign(&signed_message("M", "1.1", &sha));
    let sig: [u8; 64] = sig.as_ref().try_into().unwrap();
    assert_eq!(parse_signature(&sig).unwrap(), sig);
    assert_eq!(parse_signature(base64(&sig).as_bytes()).unwrap(), sig);
    assert_eq!(
        parse_signature(format!("{}\n", hex::encode(sig)).as_bytes()).unwrap(),
        sig
    );
    assert!(verify_signature(&public, "M", "1.1", &sha, &sig));
    assert!(!verify_signature(&public, "M", "1.0", &sha, &sig));
    assert!(!verify_signature(&public, "N", "1.1", &sha, &sig));
    assert!(!verify_signature(
        &public,
        "M",
        "1.1",
        &sha256_hex(b"other"),
        &sig
    ));
    assert!(parse_signature(b"too short").is_err());
}

#[test]
fn models_and_versions_are_validated() {
    assert!(validate_model("HS-SW10").is_ok());
    assert!(validate_model("a/b").is_err());
    assert!(validate_model(" x").is_err());
    assert!(validate_model("").is_err());
    assert!(validate_version("1.2.3-rc1+b5").is_ok());
    assert!(validate_version("1.2 3").is_err());
    assert!(validate_version(&"1".repeat(33)).is_err());
}
