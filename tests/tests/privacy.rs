//! Personal data (principles 8 and 11): nothing a householder's devices
//! report is stored in clear, `hubctl privacy` says what is held, `hubctl
//! export` gives all of it back, and removing a device takes its data with
//! it and disables the rules that named it.

use hub_tests::{SimDevice, TestHub, WAIT, files_containing, hubctl};

/// A string that appears nowhere but in what the test stores.
const CANARY: &str = "canary-5d1f0c9e7b";

async fn export(hub: &TestHub, name: &str) -> serde_json::Value {
    let path = hub.dir.path().join(name);
    let (code, out, err) = hubctl(hub, &["export", "--out", path.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("mode 0600"), "{out}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

/// Waits until the export shows `done` (history is written in batches).
async fn export_until(
    hub: &TestHub,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    for n in 0.. {
        let doc = export(hub, &format!("export-{n}.json")).await;
        if done(&doc) {
            return doc;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not in the export within {WAIT:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    unreachable!()
}

#[tokio::test]
async fn personal_data_is_sealed_on_disk_listed_exported_and_removed_with_its_device() {
    let hub = TestHub::start().await.unwrap();
    let sensor_id = hub
        .enroll(&format!("{CANARY} bedroom sensor"))
        .await
        .unwrap();
    let other_id = hub.enroll("Hall lamp").await.unwrap();
    let sensor = SimDevice::connect(&sensor_id, hub.mqtt_addr).await.unwrap();
    let state = format!(r#"{{"note": "{CANARY} state", "t": 21}}"#);
    sensor
        .publish(&format!("d/{}/state", sensor_id.id), state.as_bytes(), true)
        .await
        .unwrap();
    let event = format!(r#"{{"who": "{CANARY} event"}}"#);
    sensor
        .publish(
            &format!("d/{}/event/door", sensor_id.id),
            event.as_bytes(),
            false,
        )
        .await
        .unwrap();
    let rules = format!(
        r#"[[rule]]
name = "night"
description = "{CANARY} rule"
trigger = {{ event = "{s}", name = "door" }}
actions = [{{ set_var = "who", value = "{{{{trigger.value}}}}" }}, {{ command = "{o}", name = "on" }}]

[[rule]]
name = "unrelated"
trigger = {{ start = true }}
actions = [{{ log = "started" }}]
"#,
        s = sensor_id.id,
        o = other_id.id
    );
    let path = hub.dir.path().join("rules.toml");
    std::fs::write(&path, rules).unwrap();
    let (code, _, err) = hubctl(&hub, &["rules", "apply", path.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    // The rule stores the event's payload in a variable.
    sensor
        .publish(
            &format!("d/{}/event/door", sensor_id.id),
            event.as_bytes(),
            false,
        )
        .await
        .unwrap();

    // Everything is in the export, each inventory category under its key.
    let doc = export_until(&hub, "state, events and the variable", |doc| {
        doc["history"].as_array().is_some_and(|h| h.len() >= 2)
            && doc["variables"]["who"].is_object()
    })
    .await;
    let text = doc.to_string();
    assert!(text.contains(&format!("{CANARY} bedroom sensor")));
    assert!(text.contains(&format!("{CANARY} state")));
    assert!(text.contains(&format!("{CANARY} event")));
    assert!(text.contains(&format!("{CANARY} rule")));
    assert_eq!(doc["format"], "hubd-export/1");
    let (code, out, err) = hubctl(&hub, &["privacy", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let inventory: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    for item in &inventory {
        if let Some(key) = item["export_key"].as_str() {
            let exported = &doc[key];
            assert!(
                !exported.is_null(),
                "inventory item {key:?} is not in the export"
            );
            if let Some(count) = item["count"].as_u64() {
                assert!(count > 0, "{item}");
            }
        }
    }
    let (code, out, _) = hubctl(&hub, &["privacy"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("hub.redb, table history (encrypted)"), "{out}");
    assert!(out.contains("7 days ([privacy] history_days)"), "{out}");

    // On disk, the canary is nowhere in clear: stop the hub so that every
    // write is flushed, then read every file of the state dir.
    let hub = hub.restart().await.unwrap();
    let leaks = files_containing(&hub.state_dir, CANARY.as_bytes());
    assert!(leaks.is_empty(), "personal data in clear in {leaks:?}");
    // It is all still there after the restart, sealed.
    let again = export(&hub, "after-restart.json").await;
    // last_seen moves when the sensor's session ends at the restart.
    let without_last_seen = |doc: &serde_json::Value| -> Vec<serde_json::Value> {
        doc["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                let mut d = d.clone();
                d.as_object_mut().unwrap().remove("last_seen");
                d
            })
            .collect()
    };
    assert_eq!(without_last_seen(&again), without_last_seen(&doc));
    assert_eq!(again["history"], doc["history"]);
    assert_eq!(again["variables"], doc["variables"]);

    // Removing the sensor takes its state and history with it and disables
    // the rule that named it, saying so.
    let (code, out, err) = hubctl(&hub, &["devices", "remove", &sensor_id.id]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("disabled the rules that named it: night"),
        "{out}"
    );
    let after = export(&hub, "after-remove.json").await;
    let text = after.to_string();
    assert!(!text.contains(&format!("{CANARY} state")), "{text}");
    assert!(!text.contains(&format!("{CANARY} bedroom")), "{text}");
    assert!(
        after["history"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["device"] != sensor_id.id.as_str())
    );
    let rules = after["rules"].as_array().unwrap();
    let night = rules.iter().find(|r| r["name"] == "night").unwrap();
    assert_eq!(night["enabled"], false);
    let unrelated = rules.iter().find(|r| r["name"] == "unrelated").unwrap();
    assert_eq!(unrelated["enabled"], true);
}
