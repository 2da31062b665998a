//! Security telemetry (principle 10) end to end: normal traffic raises
//! nothing; a flood, a device probing other devices' topics and one
//! reconnecting in a tight loop each raise the right anomaly, which the
//! isolate policy acts on; alerts reach `$hub/alerts`; refused handshakes
//! throttle their address but never the admin socket. Baselines over
//! minutes of simulated time are in `hubd::telemetry`'s unit tests.

use std::time::Duration;

use hub_tests::raw::{self, Outcome};
use hub_tests::sim::{self, Fleet, FleetConfig, Kind};
use hub_tests::{SimDevice, TestHub, WAIT, hubctl};
use hubd::config::AnomalyPolicy;

/// Short windows, so baselines form in seconds; every anomaly isolates.
async fn hub() -> TestHub {
    TestHub::start_with(|c| {
        let t = &mut c.telemetry;
        t.window = Duration::from_secs(2);
        t.warmup_windows = 2;
        t.min_messages = 40;
        t.max_acl_denials = 5;
        t.max_reconnects = 6;
        t.on_message_rate = AnomalyPolicy::Isolate;
        t.on_probing = AnomalyPolicy::Isolate;
        t.on_reconnects = AnomalyPolicy::Isolate;
    })
    .await
    .unwrap()
}

async fn json(hub: &TestHub, args: &[&str]) -> serde_json::Value {
    let (code, out, err) = hubctl(hub, args).await;
    assert_eq!(code, 0, "hubctl {args:?}: {err}");
    serde_json::from_str(&out).unwrap()
}

async fn anomalies(hub: &TestHub) -> Vec<serde_json::Value> {
    let (code, out, err) = hubctl(hub, &["events", "--json", "--limit", "10000"]).await;
    assert_eq!(code, 0, "{err}");
    out.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["kind"] == "anomaly")
        .collect()
}

/// Waits until the device is isolated and returns its record.
async fn isolated(hub: &TestHub, id: &str) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let d = json(hub, &["devices", "show", id, "--json"]).await;
        if d["state"] == "isolated" {
            return d;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} not isolated: {d:#}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Publishes `n` states at `per_second`, paced by an interval.
async fn steady(dev: &SimDevice, per_second: u64, n: u64) {
    let topic = format!("d/{}/state", dev.id);
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / per_second));
    for i in 0..n {
        tick.tick().await;
        dev.publish(&topic, format!(r#"{{"t":{i}}}"#).as_bytes(), false)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn normal_traffic_is_quiet_and_floods_probes_and_reconnect_loops_are_isolated() {
    let hub = hub().await;
    let mut alerts = hub.watch("$hub/alerts").await.unwrap();

    // A small fleet going about its business for a few windows.
    let devices = sim::enroll_devices(&hub, 4, &[Kind::Sensor, Kind::Switch])
        .await
        .unwrap();
    let fleet = Fleet::start(
        devices,
        hub.mqtt_addr,
        FleetConfig {
            rate: 5.0,
            ..FleetConfig::default()
        },
    );
    fleet.wait_connected(4, WAIT).await.unwrap();

    // The flooder behaves for three windows, then sends 50 times as much.
    let flooder_id = hub.enroll("Flooder").await.unwrap();
    let flooder = SimDevice::connect(&flooder_id, hub.mqtt_addr)
        .await
        .unwrap();
    steady(&flooder, 10, 60).await;
    assert!(
        anomalies(&hub).await.is_empty(),
        "normal traffic raised anomalies"
    );
    let topic = format!("d/{}/state", flooder_id.id);
    for i in 0..1000 {
        // Stops early once the hub cut it off.
        if flooder
            .publish(&topic, format!(r#"{{"t":{i}}}"#).as_bytes(), false)
            .await
            .is_err()
        {
            break;
        }
    }
    let d = isolated(&hub, &flooder_id.id).await;
    assert_eq!(d["isolation_reason"], "anomaly: message flood");
    let alert = alerts.next().await.unwrap();
    let alert: serde_json::Value = serde_json::from_slice(&alert.payload).unwrap();
    assert_eq!(alert["kind"], "anomaly");
    assert_eq!(alert["device"], flooder_id.id.as_str());
    assert_eq!(alert["evidence"]["anomaly"], "message_rate");
    assert!(
        alert["evidence"]["expected"]
            .as_str()
            .unwrap()
            .contains("baseline"),
        "{alert}"
    );

    // The prober reaches for another device's topics.
    let prober_id = hub.enroll("Prober").await.unwrap();
    let prober = SimDevice::connect(&prober_id, hub.mqtt_addr).await.unwrap();
    for i in 0..5 {
        let _ = prober
            .publish(
                &format!("d/{}/cmd/set", flooder_id.id),
                format!("{i}").as_bytes(),
                false,
            )
            .await;
    }
    let d = isolated(&hub, &prober_id.id).await;
    assert_eq!(
        d["isolation_reason"],
        "anomaly: probing other devices' topics"
    );

    // The looper reconnects as fast as it can.
    let looper_id = hub.enroll("Looper").await.unwrap();
    for _ in 0..12 {
        let dev = SimDevice::connect(&looper_id, hub.mqtt_addr).await.unwrap();
        drop(dev);
        let d = json(&hub, &["devices", "show", &looper_id.id, "--json"]).await;
        if d["state"] == "isolated" {
            break;
        }
    }
    let d = isolated(&hub, &looper_id.id).await;
    assert_eq!(
        d["isolation_reason"],
        "anomaly: reconnecting in a tight loop"
    );

    // Each anomaly is one event with its evidence; the fleet raised none.
    let found = anomalies(&hub).await;
    let mut kinds: Vec<(String, String)> = found
        .iter()
        .map(|e| {
            (
                e["device"].as_str().unwrap().to_owned(),
                e["evidence"]["anomaly"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    kinds.sort();
    let mut want = vec![
        (flooder_id.id.clone(), "message_rate".to_owned()),
        (prober_id.id.clone(), "probing".to_owned()),
        (looper_id.id.clone(), "reconnects".to_owned()),
    ];
    want.sort();
    assert_eq!(kinds, want, "{found:#?}");
    for (id, _) in fleet.devices() {
        let d = json(&hub, &["devices", "show", &id, "--json"]).await;
        assert_eq!(d["state"], "active", "{id} is a normal device");
    }
    let status = json(&hub, &["status", "--json"]).await;
    assert!(
        status["seclog"]["recent_alerts"].as_u64().unwrap() >= 3,
        "{status:#}"
    );
    let text = hubctl(&hub, &["status"]).await.1;
    assert!(text.contains("alerts (24h)"), "{text}");
    fleet.stop().await;
}

#[tokio::test]
async fn refused_handshakes_throttle_the_address_but_never_the_admin_socket() {
    let hub = TestHub::start_with(|c| {
        c.telemetry.max_handshake_failures = 5;
        c.telemetry.throttle = Duration::from_secs(600);
    })
    .await
    .unwrap();
    let good = hub.enroll("Good").await.unwrap();
    // No client certificate: every handshake is refused.
    let anonymous = hub_tests::client_config(&good.ca_pem, None, None).unwrap();
    for _ in 0..5 {
        let outcome =
            raw::try_connect(hub.mqtt_addr, anonymous.clone(), &raw::connect_v4("x")).await;
        assert!(matches!(outcome, Outcome::Refused(_)), "{outcome:?}");
    }
    // 127.0.0.1 is throttled now: even a valid device is turned away
    // before its handshake.
    let before = hub
        .status()
        .await
        .unwrap()
        .counters
        .unwrap()
        .connections_refused;
    assert!(SimDevice::connect(&good, hub.mqtt_addr).await.is_err());
    let after = hub
        .status()
        .await
        .unwrap()
        .counters
        .unwrap()
        .connections_refused;
    assert!(after > before, "{before} -> {after}");
    // The owner still administers the hub, and sees why.
    let (code, out, err) = hubctl(&hub, &["events", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let events: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let refused = events
        .iter()
        .filter(|e| e["kind"] == "handshake.refused")
        .count();
    assert_eq!(refused, 5, "{events:#?}");
    let throttled = events
        .iter()
        .find(|e| e["kind"] == "throttled")
        .unwrap_or_else(|| panic!("{events:#?}"));
    assert_eq!(throttled["severity"], "alert");
    assert_eq!(throttled["actor"], "127.0.0.1");
}
