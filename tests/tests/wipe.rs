//! The ownership-transfer wipe end to end (principle 11): one command,
//! devices told to reset, every key and record destroyed beyond recovery,
//! a new CA that no old certificate chains to, and a signed receipt that
//! verifies and breaks on any changed byte.

use hub_tests::{DeviceEvent, SimDevice, TestHub, files_containing, hubctl};

const CANARY: &str = "canary-wipe-93c1f7";

/// `hubctl wipe --yes` with a reset timeout; returns the receipt's path and
/// what hubctl printed, after checking it succeeded.
async fn wipe(hub: &TestHub, timeout: &str) -> (std::path::PathBuf, String) {
    let receipt_path = hub.dir.path().join("receipt.json");
    let args = [
        "wipe",
        "--yes",
        "--timeout",
        timeout,
        "--receipt",
        receipt_path.to_str().unwrap(),
    ];
    let (code, out, err) = hubctl(hub, &args).await;
    assert_eq!(code, 0, "{out}{err}");
    (receipt_path, out)
}

#[tokio::test]
async fn wipe_resets_devices_destroys_everything_and_signs_a_receipt() {
    let hub = TestHub::start().await.unwrap();
    let polite_id = hub.enroll(&format!("{CANARY} polite")).await.unwrap();
    let deaf_id = hub.enroll("Deaf plug").await.unwrap();
    let offline_id = hub.enroll("Offline lamp").await.unwrap();
    let mut polite = SimDevice::connect(&polite_id, hub.mqtt_addr).await.unwrap();
    polite
        .subscribe(
            &format!("d/{}/cmd/#", polite_id.id),
            rumqttc::QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    let mut deaf = SimDevice::connect(&deaf_id, hub.mqtt_addr).await.unwrap();
    deaf.subscribe(
        &format!("d/{}/cmd/#", deaf_id.id),
        rumqttc::QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    polite
        .publish(
            &format!("d/{}/state", polite_id.id),
            format!(r#"{{"note":"{CANARY} state"}}"#).as_bytes(),
            true,
        )
        .await
        .unwrap();
    let rules = hub.dir.path().join("rules.toml");
    std::fs::write(
        &rules,
        format!(
            "[[rule]]\nname = \"r\"\ndescription = \"{CANARY} rule\"\ntrigger = {{ start = true }}\nactions = [{{ log = \"x\" }}]\n"
        ),
    )
    .unwrap();
    let (code, _, err) = hubctl(&hub, &["rules", "apply", rules.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    let old_status = hub.status().await.unwrap();
    let old_key = std::fs::read(hub.state_dir.join("keys/data.key")).unwrap();
    assert_eq!(old_key.len(), 32);

    // The polite device acknowledges the reset and forgets its credentials;
    // the deaf one never answers; the third is offline.
    let polite_task = tokio::spawn(async move {
        loop {
            match polite.next().await.unwrap() {
                DeviceEvent::Message { topic, .. } if topic.ends_with("/cmd/reset") => {
                    let ack = format!("d/{}/ack/reset", polite.id);
                    polite.publish(&ack, b"{}", false).await.unwrap();
                    // Kept connected until the hub closes: dropping it now
                    // would abort the event loop before the ack is sent.
                    let _ = polite.disconnected().await;
                    return topic;
                }
                _ => continue,
            }
        }
    });
    let (receipt_path, out) = wipe(&hub, "2s").await;
    let reset_topic = polite_task.await.unwrap();
    assert_eq!(reset_topic, format!("d/{}/cmd/reset", polite_id.id));
    drop(polite_id); // the device forgot its credentials
    assert!(out.contains("wiped"), "{out}");
    // The deaf device was told too.
    let mut told_deaf = false;
    while let Some(event) = deaf.next_within(std::time::Duration::from_millis(1)).await {
        if let DeviceEvent::Message { topic, .. } = event {
            told_deaf |= topic.ends_with("/cmd/reset");
        }
    }
    assert!(told_deaf, "the deaf device got no reset command");

    // The receipt verifies, and says who acknowledged.
    let (code, out, err) = hubctl(
        &hub,
        &["wipe", "verify", receipt_path.to_str().unwrap(), "--json"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let receipt: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(receipt["old_ca_fingerprint"], old_status.ca_fingerprint);
    let mut not_acked: Vec<&str> = receipt["devices_not_acknowledged"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    not_acked.sort();
    let mut expected = vec![deaf_id.id.as_str(), offline_id.id.as_str()];
    expected.sort();
    assert_eq!(not_acked, expected);
    assert_eq!(receipt["destroyed"]["devices"], 3);
    assert_eq!(receipt["destroyed"]["rules"], 1);
    // A changed byte breaks it.
    let mut bytes = std::fs::read(&receipt_path).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    let tampered = hub.dir.path().join("tampered.json");
    std::fs::write(&tampered, &bytes).unwrap();
    let (code, _, err) = hubctl(&hub, &["wipe", "verify", tampered.to_str().unwrap()]).await;
    assert_eq!(code, 1, "a changed receipt verified");
    assert!(!err.is_empty());

    // The hub is fresh and healthy: new CA, no devices, no rules.
    let status = hub.status().await.unwrap();
    assert_ne!(status.ca_fingerprint, old_status.ca_fingerprint);
    assert_eq!(receipt["new_ca_fingerprint"], status.ca_fingerprint);
    assert_eq!(status.devices_known, 0);
    assert_eq!(status.automation.unwrap().rules, 0);
    assert!(!hub.state_dir.join("WIPE").exists());
    // The new security log starts with the wipe, and nothing of the old one.
    let deadline = tokio::time::Instant::now() + hub_tests::WAIT;
    let events = loop {
        let (code, out, err) = hubctl(&hub, &["events", "--json"]).await;
        assert_eq!(code, 0, "{err}");
        let events: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if !events.is_empty() || tokio::time::Instant::now() > deadline {
            break events;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    // (Old devices knocking with old certificates may follow it.)
    assert_eq!(events[0]["kind"], "wipe", "{events:#?}");
    assert_eq!(events.iter().filter(|e| e["kind"] == "wipe").count(), 1);
    assert!(
        !events.iter().any(|e| e["kind"] == "device.enrolled"),
        "{events:#?}"
    );
    assert_eq!(events[0]["evidence"]["old_ca"], old_status.ca_fingerprint);
    assert_eq!(events[0]["evidence"]["new_ca"], status.ca_fingerprint);
    // Nothing of the old hub is left on disk: no canary, no old data key.
    let leaks = files_containing(&hub.state_dir, CANARY.as_bytes());
    assert!(leaks.is_empty(), "{leaks:?}");
    let key_copies = files_containing(&hub.state_dir, &old_key);
    assert!(
        key_copies.is_empty(),
        "the old data key survives in {key_copies:?}"
    );
    // Old certificates no longer chain to the hub's CA.
    assert!(
        SimDevice::connect(&deaf_id, hub.mqtt_addr).await.is_err(),
        "an old certificate was accepted after the wipe"
    );
    // And a new device pairs and connects as on a new hub.
    let fresh = hub.enroll("New owner's lamp").await.unwrap();
    SimDevice::connect(&fresh, hub.mqtt_addr).await.unwrap();
}

#[tokio::test]
async fn a_wipe_needs_the_hub_name() {
    let hub = TestHub::start().await.unwrap();
    let mut admin = hub.admin().await.unwrap();
    let err = admin
        .wipe(hub_proto::v1::WipeRequest {
            confirm_name: "not-it".into(),
            reset_timeout_seconds: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("not this hub's name"), "{err}");
    assert_eq!(hub.status().await.unwrap().devices_known, 0);
}

#[tokio::test]
async fn simulated_devices_obey_the_wipe_and_forget_their_credentials() {
    use hub_tests::sim::{Fleet, FleetConfig, Kind};
    let hub = TestHub::start().await.unwrap();
    let mut devices = Vec::new();
    for i in 0..4 {
        let kind = if i % 2 == 0 {
            Kind::Sensor
        } else {
            Kind::Switch
        };
        devices.push((hub.enroll(&format!("sim {i}")).await.unwrap(), kind));
    }
    let fleet = Fleet::start(
        devices,
        hub.mqtt_addr,
        FleetConfig {
            rate: 0.0,
            backoff_base: std::time::Duration::from_millis(200),
            backoff_cap: std::time::Duration::from_secs(2),
            ..FleetConfig::default()
        },
    );
    fleet
        .wait_connected(4, std::time::Duration::from_secs(20))
        .await
        .unwrap();
    // Each device subscribes to its commands before it publishes its meta
    // and state: once the hub has those 8, every subscription is in place.
    let deadline = tokio::time::Instant::now() + hub_tests::WAIT;
    while hub
        .status()
        .await
        .unwrap()
        .counters
        .unwrap()
        .publishes_received
        < 8
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "devices did not announce themselves"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (receipt_path, out) = wipe(&hub, "10s").await;
    assert!(
        out.contains("devices that did not: none"),
        "every simulated device acknowledges: {out}"
    );
    let stats = fleet.stats();
    assert_eq!(stats.forgot, 4);
    let mut forgotten = fleet.forgotten();
    forgotten.sort();
    let receipt = hub_proto::receipt::verify(&std::fs::read(&receipt_path).unwrap()).unwrap();
    assert_eq!(receipt.devices_acknowledged, forgotten);
    fleet.stop().await;
}
