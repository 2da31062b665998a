//! Pairing, renewal, isolation, integrations and removal, end to end
//! (principles 1, 3, 5, 6 and 12).

use std::net::SocketAddr;
use std::time::Duration;

use hub_proto::v1 as pb;
use hub_tests::pair::{PairError, pair};
use hub_tests::raw::{self, Outcome};
use hub_tests::{DeviceIdentity, SimDevice, TestHub, WAIT, key_and_csr};
use rumqttc::QoS;

/// A loopback port that was free a moment ago, for a listener that the test
/// must find closed, open and closed again at the same address.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn pairing_hub() -> TestHub {
    TestHub::start_with(|c| {
        c.pairing.listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        c.pairing.attempt_interval = Duration::ZERO;
    })
    .await
    .unwrap()
}

async fn open(
    hub: &TestHub,
    name: &str,
    role: pb::Role,
    grants: Option<pb::Grants>,
    secs: u32,
) -> pb::PairingWindow {
    hub.admin()
        .await
        .unwrap()
        .open_pairing(pb::OpenPairingRequest {
            name: name.into(),
            role: role as i32,
            window_seconds: secs,
            grants,
        })
        .await
        .unwrap()
        .into_inner()
}

async fn port_open(addr: SocketAddr) -> bool {
    tokio::net::TcpStream::connect(addr).await.is_ok()
}

/// Waits (bounded) until the port refuses connections.
async fn wait_closed(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while port_open(addr).await {
        assert!(tokio::time::Instant::now() < deadline, "{addr} still open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn refused_with(result: Result<DeviceIdentity, PairError>, expected: &str) -> String {
    match result {
        Err(PairError::Refused { error, message }) => {
            assert_eq!(error, expected, "{message}");
            message
        }
        Err(other) => panic!("expected refusal {expected}, got {other}"),
        Ok(id) => panic!("expected refusal {expected}, paired as {}", id.id),
    }
}

#[tokio::test]
async fn pair_a_device_with_hubctl_and_hubsim_then_it_connects() {
    let hub = pairing_hub().await;
    let socket = hub.socket.display().to_string();
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let args = [
            "hubctl",
            "--socket",
            &socket,
            "pair",
            "--name",
            "Kitchen sensor",
            "--json",
        ];
        let code = hubctl::run_with_env(args, &|_| None, &mut out, &mut err);
        (
            code,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{err}");
    let window: serde_json::Value = serde_json::from_str(&out).unwrap();
    let (uri, setup) = (
        window["uri"].as_str().unwrap(),
        window["code"].as_str().unwrap(),
    );
    assert!(uri.starts_with("hubpair://127.0.0.1:"), "{uri}");
    assert!(uri.contains(&hub.status().await.unwrap().ca_fingerprint));

    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("dev");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_hubsim"))
        .args(["pair", "--uri", uri, "--code", setup, "--out"])
        .arg(&out_dir)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(out_dir.join("key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let identity = hub_tests::pair::read_identity(&out_dir).unwrap();
    assert_eq!(identity.id, id);

    let mut watch = hub.watch(&format!("d/{id}/state")).await.unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_hubsim"))
        .args(["connect", "--port", &hub.mqtt_addr.port().to_string()])
        .args(["--state", "{\"t\":20}", "--dir"])
        .arg(&out_dir)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(watch.next().await.unwrap().payload, b"{\"t\":20}");
    let listed = hub
        .admin()
        .await
        .unwrap()
        .get_device(pb::GetDeviceRequest { id })
        .await
        .unwrap();
    assert_eq!(listed.into_inner().name, "Kitchen sensor");
}

#[tokio::test]
async fn the_pairing_port_is_open_only_while_a_window_is() {
    let hub = pairing_hub().await;
    let addr = hub.config.pairing.listen;
    assert!(!port_open(addr).await, "open with no window");

    let w = open(&hub, "a", pb::Role::Device, None, 0).await;
    assert!(port_open(addr).await);
    hub.admin()
        .await
        .unwrap()
        .cancel_pairing(pb::CancelPairingRequest {
            claim_id: w.claim_id,
        })
        .await
        .unwrap();
    wait_closed(addr).await;

    let w = open(&hub, "b", pb::Role::Device, None, 0).await;
    assert!(port_open(addr).await);
    pair(&w.uri, &w.code).await.unwrap();
    wait_closed(addr).await;

    let _w = open(&hub, "c", pb::Role::Device, None, 1).await;
    assert!(port_open(addr).await);
    // Expiry after 1 s closes it with no one asking.
    wait_closed(addr).await;
}

#[tokio::test]
async fn used_expired_cancelled_and_wrong_codes_are_refused_with_their_reason() {
    let hub = pairing_hub().await;
    let mut admin = hub.admin().await.unwrap();

    let w = open(&hub, "used", pb::Role::Device, None, 0).await;
    let _keep_open = open(&hub, "keeps the listener open", pb::Role::Device, None, 0).await;
    pair(&w.uri, &w.code).await.unwrap();
    let msg = refused_with(pair(&w.uri, &w.code).await, "used");
    assert!(msg.contains("already used"), "{msg}");

    let w = open(&hub, "cancelled", pb::Role::Device, None, 0).await;
    admin
        .cancel_pairing(pb::CancelPairingRequest {
            claim_id: w.claim_id.clone(),
        })
        .await
        .unwrap();
    refused_with(pair(&w.uri, &w.code).await, "cancelled");

    let w = open(&hub, "expires", pb::Role::Device, None, 1).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let listed = admin
            .list_pairing(pb::ListPairingRequest {})
            .await
            .unwrap()
            .into_inner();
        if !listed.windows.iter().any(|x| x.claim_id == w.claim_id) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    refused_with(pair(&w.uri, &w.code).await, "expired");

    // Wrong codes: counted, and the fifth closes the window for good.
    let w = open(&hub, "guessed", pb::Role::Device, None, 0).await;
    let wrong = "0000-0000-0000-0000-0";
    let mut last = String::new();
    for attempt in 1..=5 {
        let result = pair(&w.uri, wrong).await;
        last = match result {
            Err(PairError::Refused { error, message }) => {
                if attempt < 5 {
                    assert_eq!(error, "wrong_code", "{message}");
                }
                error
            }
            other => panic!("attempt {attempt}: {other:?}"),
        };
    }
    assert_eq!(last, "closed");
    refused_with(pair(&w.uri, &w.code).await, "closed");
    let devices = admin
        .list_devices(pb::ListDevicesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        devices.devices.len(),
        1,
        "only the first pairing enrolled a device"
    );
}

#[tokio::test]
async fn a_device_pinning_another_hub_refuses_to_pair() {
    let real = pairing_hub().await;
    let other = pairing_hub().await;
    let genuine = open(&real, "a", pb::Role::Device, None, 0).await;
    let impostor = open(&other, "a", pb::Role::Device, None, 0).await;
    // The device holds the real hub's URI (CA pin), but reaches the impostor.
    let real_port = real.config.pairing.listen.port().to_string();
    let other_port = other.config.pairing.listen.port().to_string();
    let redirected = genuine.uri.replace(&real_port, &other_port);
    match pair(&redirected, &impostor.code).await {
        Err(PairError::Pin(why)) => assert!(why.contains("fingerprint"), "{why}"),
        other => panic!("expected a pin failure, got {other:?}"),
    }
    // The genuine hub still pairs.
    pair(&genuine.uri, &genuine.code).await.unwrap();
}

#[tokio::test]
async fn a_device_renews_its_certificate_and_the_old_one_dies() {
    let hub = TestHub::start().await.unwrap();
    let old = hub.enroll("renewing").await.unwrap();
    let mut dev = SimDevice::connect(&old, hub.mqtt_addr).await.unwrap();
    let answer_topic = format!("d/{}/cert/new", old.id);
    assert_eq!(
        dev.subscribe(&answer_topic, QoS::AtLeastOnce)
            .await
            .unwrap(),
        vec![1]
    );
    let (key, csr) = key_and_csr().unwrap();
    dev.client
        .publish(
            format!("d/{}/cert/csr", old.id),
            QoS::AtLeastOnce,
            false,
            csr,
        )
        .await
        .unwrap();
    let (topic, payload) = dev.next_message().await.unwrap();
    assert_eq!(topic, answer_topic);
    let answer: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    let renewed = DeviceIdentity {
        id: old.id.clone(),
        key_pem: key.serialize_pem(),
        cert_pem: answer["cert"].as_str().expect("a certificate").to_owned(),
        ca_pem: answer["ca"].as_str().unwrap().to_owned(),
    };
    drop(dev);

    // The old certificate still works until the new one has been used.
    SimDevice::connect(&old, hub.mqtt_addr).await.unwrap();
    let new_session = SimDevice::connect(&renewed, hub.mqtt_addr).await.unwrap();
    assert_eq!(new_session.id, old.id, "same device id");
    let out = raw::try_connect(
        hub.mqtt_addr,
        old.client_config().unwrap(),
        &raw::connect_v4(&old.id),
    )
    .await;
    assert!(
        matches!(out, Outcome::Refused(_)),
        "old certificate still accepted: {out:?}"
    );
    let device = hub
        .admin()
        .await
        .unwrap()
        .get_device(pb::GetDeviceRequest { id: old.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(device.name, "renewing");

    // A garbage CSR gets an error answer, not a certificate.
    let mut dev = SimDevice::connect(&renewed, hub.mqtt_addr).await.unwrap();
    dev.subscribe(&answer_topic, QoS::AtLeastOnce)
        .await
        .unwrap();
    dev.publish(&format!("d/{}/cert/csr", old.id), b"not a csr", false)
        .await
        .unwrap();
    let (_, payload) = dev.next_message().await.unwrap();
    let answer: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert!(
        answer["error"].as_str().unwrap().contains("csr"),
        "{answer}"
    );
}

/// Pairs an integration with the given grants.
async fn integration(hub: &TestHub, publish: &[&str], subscribe: &[&str]) -> DeviceIdentity {
    let grants = pb::Grants {
        publish: publish.iter().map(|s| s.to_string()).collect(),
        subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
    };
    let hub_addr = hub.config.pairing.listen;
    let w = open(
        hub,
        "Home Assistant",
        pb::Role::Integration,
        Some(grants),
        0,
    )
    .await;
    assert!(w.uri.contains(&hub_addr.port().to_string()));
    pair(&w.uri, &w.code).await.unwrap()
}

#[tokio::test]
async fn integrations_get_exactly_their_grants() {
    let hub = pairing_hub().await;
    let a = hub.enroll("a").await.unwrap();
    let b = hub.enroll("b").await.unwrap();
    let ha_id = integration(&hub, &[], &["d/+/state"]).await;
    let mut ha = SimDevice::connect(&ha_id, hub.mqtt_addr).await.unwrap();
    assert_eq!(
        ha.subscribe("d/+/state", QoS::AtMostOnce).await.unwrap(),
        vec![0]
    );
    assert_eq!(
        ha.subscribe("d/+/cmd/#", QoS::AtMostOnce).await.unwrap(),
        vec![0x80]
    );
    for dev in [&a, &b] {
        let d = SimDevice::connect(dev, hub.mqtt_addr).await.unwrap();
        d.publish(&format!("d/{}/state", dev.id), dev.id.as_bytes(), false)
            .await
            .unwrap();
        let (topic, _) = ha.next_message().await.unwrap();
        assert_eq!(topic, format!("d/{}/state", dev.id));
    }

    // Not granted: its command never reaches the device.
    let mut target = SimDevice::connect(&a, hub.mqtt_addr).await.unwrap();
    target
        .subscribe(&format!("d/{}/cmd/#", a.id), QoS::AtMostOnce)
        .await
        .unwrap();
    ha.publish(&format!("d/{}/cmd/y", a.id), b"denied", false)
        .await
        .unwrap();
    // Granted now (the integration reconnects with its new rights).
    hub.admin()
        .await
        .unwrap()
        .update_grants(pb::UpdateGrantsRequest {
            id: ha_id.id.clone(),
            grants: Some(pb::Grants {
                publish: vec!["d/+/cmd/#".into()],
                subscribe: vec![],
            }),
            revoke: false,
        })
        .await
        .unwrap();
    ha.disconnected().await.unwrap();
    let ha = SimDevice::connect(&ha_id, hub.mqtt_addr).await.unwrap();
    ha.publish(&format!("d/{}/cmd/y", a.id), b"allowed", false)
        .await
        .unwrap();
    let (_, payload) = target.next_message().await.unwrap();
    assert_eq!(
        payload, b"allowed",
        "the ungranted command must not have arrived first"
    );
}

#[tokio::test]
async fn an_isolated_device_reports_but_hears_no_commands_until_released() {
    let hub = pairing_hub().await;
    let dev_id = hub.enroll("old camera").await.unwrap();
    let ha_id = integration(&hub, &["d/+/cmd/#"], &[]).await;
    let ha = SimDevice::connect(&ha_id, hub.mqtt_addr).await.unwrap();
    let mut dev = SimDevice::connect(&dev_id, hub.mqtt_addr).await.unwrap();
    let cmd = format!("d/{}/cmd/#", dev_id.id);
    dev.subscribe(&cmd, QoS::AtMostOnce).await.unwrap();

    let mut admin = hub.admin().await.unwrap();
    let device = admin
        .isolate_device(pb::IsolateDeviceRequest {
            id: dev_id.id.clone(),
            reason: "no updates since 2019".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(device.state, pb::DeviceState::Isolated as i32);
    assert_eq!(device.isolation_reason, "no updates since 2019");
    dev.disconnected().await.unwrap();

    // Reconnected with the isolated profile.
    let mut dev = SimDevice::connect(&dev_id, hub.mqtt_addr).await.unwrap();
    assert_eq!(
        dev.subscribe(&cmd, QoS::AtMostOnce).await.unwrap(),
        vec![0x80]
    );
    let notice = format!("$hub/isolation/{}", dev_id.id);
    assert_eq!(
        dev.subscribe(&notice, QoS::AtMostOnce).await.unwrap(),
        vec![0]
    );
    let (topic, payload) = dev.next_message().await.unwrap();
    assert_eq!(topic, notice);
    assert!(String::from_utf8_lossy(&payload).contains("no updates since 2019"));
    let mut watch = hub.watch(&format!("d/{}/#", dev_id.id)).await.unwrap();
    ha.publish(&format!("d/{}/cmd/on", dev_id.id), b"integration", false)
        .await
        .unwrap();
    let hub_cmd = hub
        .publish(&format!("d/{}/cmd/on", dev_id.id), b"automation", false)
        .await;
    assert!(hub_cmd.unwrap_err().to_string().contains("isolated"));
    dev.publish(&format!("d/{}/state", dev_id.id), b"still here", false)
        .await
        .unwrap();
    // The state arrives; the integration's command, sent before it, did not.
    let m = watch.next().await.unwrap();
    assert_eq!(
        (m.topic, m.payload),
        (format!("d/{}/state", dev_id.id), b"still here".to_vec())
    );

    // Isolation survives a restart.
    drop((dev, ha, watch));
    let hub = hub.restart().await.unwrap();
    let mut dev = SimDevice::connect(&dev_id, hub.mqtt_addr).await.unwrap();
    assert_eq!(
        dev.subscribe(&cmd, QoS::AtMostOnce).await.unwrap(),
        vec![0x80]
    );

    let mut admin = hub.admin().await.unwrap();
    admin
        .release_device(pb::ReleaseDeviceRequest {
            id: dev_id.id.clone(),
        })
        .await
        .unwrap();
    dev.disconnected().await.unwrap();
    let mut dev = SimDevice::connect(&dev_id, hub.mqtt_addr).await.unwrap();
    assert_eq!(dev.subscribe(&cmd, QoS::AtMostOnce).await.unwrap(), vec![0]);
    hub.publish(&format!("d/{}/cmd/on", dev_id.id), b"flows again", false)
        .await
        .unwrap();
    assert_eq!(dev.next_message().await.unwrap().1, b"flows again");
}

#[tokio::test]
async fn removing_a_device_deletes_it_and_kills_its_certificate() {
    let hub = TestHub::start().await.unwrap();
    let dev_id = hub.enroll("sold").await.unwrap();
    let mut dev = SimDevice::connect(&dev_id, hub.mqtt_addr).await.unwrap();
    dev.subscribe(&format!("d/{}/cmd/#", dev_id.id), QoS::AtLeastOnce)
        .await
        .unwrap();
    let admin_task = {
        let socket = hub.socket.clone();
        let id = dev_id.id.clone();
        tokio::spawn(async move {
            hub_proto::admin_client(socket)
                .await
                .unwrap()
                .remove_device(pb::RemoveDeviceRequest {
                    id,
                    reset: true,
                    reset_timeout_seconds: 5,
                })
                .await
                .unwrap()
                .into_inner()
        })
    };
    // The device obeys the reset and acknowledges it.
    let (topic, _) = dev.next_message().await.unwrap();
    assert_eq!(topic, format!("d/{}/cmd/reset", dev_id.id));
    dev.publish(&format!("d/{}/ack/reset", dev_id.id), b"{}", false)
        .await
        .unwrap();
    let answer = admin_task.await.unwrap();
    assert!(
        answer.reset_sent && answer.reset_acknowledged && answer.was_connected,
        "{answer:?}"
    );
    dev.disconnected().await.unwrap();

    let e = hub
        .admin()
        .await
        .unwrap()
        .get_device(pb::GetDeviceRequest {
            id: dev_id.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let out = raw::try_connect(
        hub.mqtt_addr,
        dev_id.client_config().unwrap(),
        &raw::connect_v4(&dev_id.id),
    )
    .await;
    assert!(matches!(out, Outcome::Refused(_)), "{out:?}");
}

#[tokio::test]
async fn an_offline_bundle_carries_a_working_key() {
    let hub = TestHub::start().await.unwrap();
    let bundle = hub
        .admin()
        .await
        .unwrap()
        .enroll_bundle(pb::EnrollBundleRequest {
            name: "cheap plug".into(),
            role: pb::Role::Device as i32,
            grants: None,
        })
        .await
        .unwrap()
        .into_inner();
    let identity = DeviceIdentity {
        id: bundle.device.unwrap().id,
        key_pem: bundle.key_pem,
        cert_pem: bundle.cert_pem,
        ca_pem: bundle.ca_chain_pem,
    };
    SimDevice::connect(&identity, hub.mqtt_addr).await.unwrap();
}

#[tokio::test]
async fn a_simulated_device_renews_by_itself_when_less_than_30_days_remain() {
    let hub = TestHub::start_with(|c| c.ca.device_validity_days = 20)
        .await
        .unwrap();
    let old = hub.enroll("short-lived").await.unwrap();
    assert!(hub_tests::renew::renewal_due(&old, time::OffsetDateTime::now_utc()).unwrap());
    let (_session, renewed) = hub_tests::renew::connect_renewing(&old, hub.mqtt_addr)
        .await
        .unwrap();
    assert_eq!(renewed.id, old.id);
    assert_ne!(renewed.cert_pem, old.cert_pem);
    // The new certificate has been used, so the old one is dead.
    let out = raw::try_connect(
        hub.mqtt_addr,
        old.client_config().unwrap(),
        &raw::connect_v4(&old.id),
    )
    .await;
    assert!(matches!(out, Outcome::Refused(_)), "{out:?}");

    // A fresh certificate is not renewed.
    let hub = TestHub::start().await.unwrap();
    let fresh = hub.enroll("fresh").await.unwrap();
    let (_session, same) = hub_tests::renew::connect_renewing(&fresh, hub.mqtt_addr)
        .await
        .unwrap();
    assert_eq!(same.cert_pem, fresh.cert_pem);
}

#[tokio::test]
async fn the_registry_records_the_kind_a_device_states_in_its_metadata() {
    let hub = TestHub::start().await.unwrap();
    let id = hub.enroll("hall").await.unwrap();
    let dev = SimDevice::connect(&id, hub.mqtt_addr).await.unwrap();
    let meta = format!("d/{}/meta", id.id);
    let mut watch = hub.watch(&meta).await.unwrap();
    dev.publish(&meta, br#"{"kind":"Not A Kind!"}"#, true)
        .await
        .unwrap();
    dev.publish(&meta, br#"{"kind":"switch","model":"X1"}"#, true)
        .await
        .unwrap();
    watch.next().await.unwrap();
    watch.next().await.unwrap();
    let mut admin = hub.admin().await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let device = admin
            .get_device(pb::GetDeviceRequest { id: id.id.clone() })
            .await
            .unwrap()
            .into_inner();
        if device.kind == "switch" {
            break;
        }
        assert!(
            device.kind.is_empty(),
            "malformed kind stored: {:?}",
            device.kind
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "kind never recorded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
