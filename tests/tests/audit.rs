//! `hubctl audit` end to end (principle 12: "audit on a fresh hub passes and
//! flags seeded misconfigurations"): a fresh hub passes, and each seeded
//! fault fails exactly its own check.
//!
//! The `listeners` check reads every listening TCP socket of the process
//! the hub runs in, and here that is this test process. So this file holds
//! ONE test that runs its scenarios one after the other, with at most one
//! hub running at a time: a second test (or hub) in this binary running at
//! the same time would show up as an undeclared listener.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;

use hub_tests::{TestHub, hubctl};

/// Every check's status, by id, from `hubctl audit --json`, and the exit code.
async fn audit(hub: &TestHub) -> (u8, BTreeMap<String, String>, serde_json::Value) {
    let (code, out, err) = hubctl(hub, &["audit", "--json"]).await;
    let json: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("audit --json: {e}\n{out}\n{err}"));
    let statuses = json["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .map(|c| {
            (
                c["id"].as_str().unwrap().to_owned(),
                c["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    (code, statuses, json)
}

/// Asserts the audit fails `id` and that no other check changed from `before`.
async fn fails_only(hub: &TestHub, id: &str, before: &BTreeMap<String, String>) {
    let (code, after, json) = audit(hub).await;
    assert_eq!(code, 1, "a failed check exits 1: {json:#}");
    assert_eq!(after[id], "fail", "{id} should fail: {json:#}");
    for (check, status) in &after {
        if check != id {
            assert_eq!(
                Some(status),
                before.get(check),
                "{check} changed with the {id} fault: {json:#}"
            );
        }
    }
    let failed = json["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap();
    assert!(
        !failed["fix"].as_str().unwrap().is_empty(),
        "a failure says how to fix it: {failed:#}"
    );
}

#[tokio::test]
async fn a_fresh_hub_passes_and_each_seeded_fault_fails_its_own_check() {
    // (a) A fresh hub: exit 0, every check pass or warn, and the text
    // output names principle and provision.
    let hub = TestHub::start().await.unwrap();
    let (code, before, json) = audit(&hub).await;
    assert_eq!(code, 0, "{json:#}");
    for id in [
        "listeners",
        "tls",
        "key_files",
        "certificates",
        "support_end_isolation",
        "firmware_integrity",
        "pairing",
        "disclosure",
        "retention",
        "seclog_chain",
        "clock",
    ] {
        let status = before
            .get(id)
            .unwrap_or_else(|| panic!("{id} missing: {json:#}"));
        assert!(status == "pass" || status == "warn", "{id}: {json:#}");
    }
    let (code, text, _) = hubctl(&hub, &["audit"]).await;
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("PASS  key_files  4 Store credentials securely (EN 303 645 5.4-1): "),
        "{text}"
    );
    assert!(text.contains("11 checks: "), "{text}");

    // (b1) A data key others can read.
    let key = hub.state_dir.join("keys").join("data.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    fails_only(&hub, "key_files", &before).await;
    let (code, text, err) = hubctl(&hub, &["audit"]).await;
    assert_eq!(code, 1);
    assert!(
        text.contains(&format!("fix: chmod 600 {}", key.display())),
        "{text}"
    );
    assert!(err.contains("key_files"), "{err}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // (b2) An open pairing window (its listener is declared, so only
    // `pairing` fails).
    let (code, out, err) = hubctl(&hub, &["pair", "--name", "X", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let opened: serde_json::Value = serde_json::from_str(&out).unwrap();
    let claim = opened["claim_id"].as_str().unwrap().to_owned();
    fails_only(&hub, "pairing", &before).await;
    let (code, text, _) = hubctl(&hub, &["audit"]).await;
    assert_eq!(code, 1);
    assert!(
        text.contains(&format!("fix: hubctl pair --cancel {claim}")),
        "{text}"
    );
    let (code, _, err) = hubctl(&hub, &["pair", "--cancel", &claim]).await;
    assert_eq!(code, 0, "{err}");

    // (b3) A listener the hub did not declare, in its process.
    let extra = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let extra_addr = extra.local_addr().unwrap();
    fails_only(&hub, "listeners", &before).await;
    let (_, text, _) = hubctl(&hub, &["audit"]).await;
    assert!(text.contains(&extra_addr.to_string()), "{text}");
    drop(extra);
    let (code, after, json) = audit(&hub).await;
    assert_eq!((code, &after), (0, &before), "{json:#}");
    hub.stop().await.unwrap();

    // (b4) A device past its support end, with isolation by policy off.
    let hub = TestHub::start_with(|c| c.lifecycle.isolate_after_support_end = false)
        .await
        .unwrap();
    let device = hub.enroll("lamp").await.unwrap();
    let (code, before, json) = audit(&hub).await;
    assert_eq!(code, 0, "{json:#}");
    let (code, _, err) = hubctl(&hub, &["devices", "set-support", &device.id, "2020-01-01"]).await;
    assert_eq!(code, 0, "{err}");
    fails_only(&hub, "support_end_isolation", &before).await;
    let (_, text, _) = hubctl(&hub, &["audit"]).await;
    assert!(text.contains(&device.id), "{text}");
    hub.stop().await.unwrap();
}
