//! End-to-end tests of the MQTT edge: the handshake matrix, identity, the
//! topic ACL, retained state, commands, revocation and admission.
//! Principles 1, 5, 6 and 13.

use std::time::{Duration, Instant};

use hub_proto::v1 as pb;
use hub_tests::raw::{self, Outcome};
use hub_tests::{DeviceIdentity, SimDevice, TestHub, client_config, key_and_csr};
use hubd::ca::Ca;
use hubd::model::DeviceId;
use rumqttc::QoS;
use time::OffsetDateTime;

/// A cert for `id` signed by `ca` with the given validity, as a DeviceIdentity.
fn identity_from(
    ca: &Ca,
    id: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> DeviceIdentity {
    let (key, csr) = key_and_csr().unwrap();
    let issued = ca
        .issue_from_csr_with_validity(&DeviceId::parse(id).unwrap(), &csr, not_before, not_after)
        .unwrap();
    DeviceIdentity {
        id: id.to_owned(),
        key_pem: key.serialize_pem(),
        cert_pem: issued.pem,
        ca_pem: ca.ca_pem().to_owned(),
    }
}

#[tokio::test]
async fn handshake_matrix_refuses_everything_but_a_valid_device_cert() {
    let hub = TestHub::start().await.unwrap();
    let addr = hub.mqtt_addr;
    let good = hub.enroll("good").await.unwrap();

    // A valid device: CONNACK success, on 3.1.1 and on 5.
    let cfg = good.client_config().unwrap();
    assert_eq!(
        raw::try_connect(addr, cfg.clone(), &raw::connect_v4(&good.id)).await,
        Outcome::ConnAck(0)
    );
    assert_eq!(
        raw::try_connect(addr, cfg, &raw::connect_v5(&good.id)).await,
        Outcome::ConnAck(0)
    );

    // No client certificate.
    let no_cert = client_config(&good.ca_pem, None, None).unwrap();
    let out = raw::try_connect(addr, no_cert, &raw::connect_v4(&good.id)).await;
    assert!(matches!(out, Outcome::Refused(_)), "no cert: {out:?}");

    // A certificate from a foreign CA, naming the same device id.
    let foreign_dir = tempfile::tempdir().unwrap();
    let foreign = Ca::open_or_create(&foreign_dir.path().join("ca"), &[], 30).unwrap();
    let now = OffsetDateTime::now_utc();
    let mut forged = identity_from(&foreign, &good.id, now, now + time::Duration::days(1));
    forged.ca_pem = good.ca_pem.clone(); // the client still trusts the real hub
    let out = raw::try_connect(
        addr,
        forged.client_config().unwrap(),
        &raw::connect_v4(&good.id),
    )
    .await;
    assert!(matches!(out, Outcome::Refused(_)), "foreign CA: {out:?}");

    // An expired certificate from the real hub CA.
    let hub_ca = Ca::open_or_create(&hub.state_dir.join("ca"), &[], 90).unwrap();
    let expired = identity_from(
        &hub_ca,
        &good.id,
        now - time::Duration::days(10),
        now - time::Duration::days(1),
    );
    let out = raw::try_connect(
        addr,
        expired.client_config().unwrap(),
        &raw::connect_v4(&good.id),
    )
    .await;
    assert!(matches!(out, Outcome::Refused(_)), "expired: {out:?}");

    // A certificate the hub CA signed but never recorded (not enrolled).
    let stray = identity_from(&hub_ca, "stray", now, now + time::Duration::days(1));
    let out = raw::try_connect(
        addr,
        stray.client_config().unwrap(),
        &raw::connect_v4("stray"),
    )
    .await;
    assert_eq!(
        out,
        Outcome::ConnAck(5),
        "unregistered device must be refused as not authorised"
    );

    // TLS 1.2 when the config does not allow it.
    let tls12 = client_config(
        &good.ca_pem,
        Some((&good.cert_pem, &good.key_pem)),
        Some(&[&rustls::version::TLS12]),
    )
    .unwrap();
    let out = raw::try_connect(addr, tls12, &raw::connect_v4(&good.id)).await;
    assert!(matches!(out, Outcome::Refused(_)), "tls 1.2: {out:?}");

    // Plaintext MQTT on the TLS port.
    let out = raw::try_plaintext(addr, &raw::connect_v4(&good.id)).await;
    assert!(matches!(out, Outcome::Refused(_)), "plaintext: {out:?}");

    // A revoked certificate.
    let revoked = hub.enroll("revoked").await.unwrap();
    hub.admin()
        .await
        .unwrap()
        .revoke_device(pb::RevokeDeviceRequest {
            id: revoked.id.clone(),
        })
        .await
        .unwrap();
    let out = raw::try_connect(
        addr,
        revoked.client_config().unwrap(),
        &raw::connect_v4(&revoked.id),
    )
    .await;
    assert!(matches!(out, Outcome::Refused(_)), "revoked: {out:?}");

    let counters = hub.status().await.unwrap().counters.unwrap();
    assert!(counters.handshakes_failed >= 5, "{counters:?}");
}

#[tokio::test]
async fn tls12_is_offered_only_when_allowed() {
    let hub = TestHub::start_with(|c| c.edge.allow_tls12 = true)
        .await
        .unwrap();
    let dev = hub.enroll("old client").await.unwrap();
    let tls12 = client_config(
        &dev.ca_pem,
        Some((&dev.cert_pem, &dev.key_pem)),
        Some(&[&rustls::version::TLS12]),
    )
    .unwrap();
    assert!(
        raw::try_connect(hub.mqtt_addr, tls12, &raw::connect_v4(&dev.id))
            .await
            .is_success()
    );
}

#[tokio::test]
async fn client_id_must_match_the_certificate() {
    let hub = TestHub::start().await.unwrap();
    let a = hub.enroll("a").await.unwrap();
    let b = hub.enroll("b").await.unwrap();
    let cfg = a.client_config().unwrap();
    // 3.1.1: return code 2 (identifier rejected); 5: 0x85 (client identifier not valid).
    assert_eq!(
        raw::try_connect(hub.mqtt_addr, cfg.clone(), &raw::connect_v4(&b.id)).await,
        Outcome::ConnAck(2)
    );
    assert_eq!(
        raw::try_connect(hub.mqtt_addr, cfg.clone(), &raw::connect_v5(&b.id)).await,
        Outcome::ConnAck(0x85)
    );
    // An empty client id is assigned the certificate's.
    assert!(
        raw::try_connect(hub.mqtt_addr, cfg, &raw::connect_v4(""))
            .await
            .is_success()
    );
    assert!(
        SimDevice::connect_as(&a, "someone-else", hub.mqtt_addr)
            .await
            .is_err()
    );
    assert_eq!(
        hub.status()
            .await
            .unwrap()
            .counters
            .unwrap()
            .sessions_refused,
        3
    );
}

#[tokio::test]
async fn devices_are_confined_to_their_own_topics() {
    let hub = TestHub::start().await.unwrap();
    let a_id = hub.enroll("a").await.unwrap();
    let b_id = hub.enroll("b").await.unwrap();
    let mut b = SimDevice::connect(&b_id, hub.mqtt_addr).await.unwrap();
    assert_eq!(
        b.subscribe(&format!("d/{}/cmd/#", b_id.id), QoS::AtMostOnce)
            .await
            .unwrap(),
        vec![0]
    );
    let mut a = SimDevice::connect(&a_id, hub.mqtt_addr).await.unwrap();
    let mut watch = hub.watch("#").await.unwrap();

    // Subscriptions outside A's rights are refused with 0x80 (3.1.1).
    for filter in [
        format!("d/{}/#", b_id.id),
        "#".into(),
        "$SYS/#".into(),
        "d/+/state".into(),
        "d/+/cmd/#".into(),
    ] {
        assert_eq!(
            a.subscribe(&filter, QoS::AtMostOnce).await.unwrap(),
            vec![0x80],
            "{filter}"
        );
    }
    // A mixed SUBSCRIBE gets per-filter answers.
    a.client
        .subscribe_many([
            rumqttc::SubscribeFilter::new(format!("d/{}/cmd/#", a_id.id), QoS::AtLeastOnce),
            rumqttc::SubscribeFilter::new(format!("d/{}/cmd/#", b_id.id), QoS::AtMostOnce),
            rumqttc::SubscribeFilter::new("$hub/broadcast/#".into(), QoS::AtMostOnce),
        ])
        .await
        .unwrap();
    loop {
        match a.next().await.unwrap() {
            hub_tests::DeviceEvent::SubAck(codes) => {
                assert_eq!(codes, vec![1, 0x80, 0]);
                break;
            }
            hub_tests::DeviceEvent::Disconnected(why) => panic!("disconnected: {why}"),
            _ => {}
        }
    }

    // A's publish to B's topics is dropped; its own goes through, in order,
    // so seeing its own proves the forbidden one never reached the router.
    a.publish(&format!("d/{}/state", b_id.id), b"{\"on\":true}", false)
        .await
        .unwrap();
    a.publish(&format!("d/{}/cmd/open", b_id.id), b"{}", false)
        .await
        .unwrap();
    a.publish(&format!("d/{}/state", a_id.id), b"{\"t\":21}", false)
        .await
        .unwrap();
    let m = watch.next().await.unwrap();
    assert_eq!(m.topic, format!("d/{}/state", a_id.id));
    assert_eq!(m.payload, b"{\"t\":21}");
    assert!(
        b.next_within(Duration::from_millis(200)).await.is_none(),
        "B got a message from A"
    );
    let counters = hub.status().await.unwrap().counters.unwrap();
    assert_eq!(counters.acl_denied, 8, "{counters:?}");
}

#[tokio::test]
async fn unauthorised_publishes_get_reason_codes_on_v5_and_repeated_ones_disconnect_v3() {
    let hub = TestHub::start_with(|c| c.edge.max_acl_violations = 3)
        .await
        .unwrap();
    let a = hub.enroll("a").await.unwrap();
    let b = hub.enroll("b").await.unwrap();
    let mut dev = SimDevice::connect(&a, hub.mqtt_addr).await.unwrap();
    for _ in 0..3 {
        dev.publish(&format!("d/{}/state", b.id), b"x", false)
            .await
            .unwrap();
    }
    let why = dev.disconnected().await.unwrap();
    assert!(!why.is_empty());

    // MQTT 5: a QoS 1 publish to a foreign topic is answered with PUBACK 0x87.
    let mut options =
        rumqttc::v5::MqttOptions::new(a.id.clone(), "127.0.0.1", hub.mqtt_addr.port());
    options.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(a.client_config().unwrap()),
    ));
    let (client, mut events) = rumqttc::v5::AsyncClient::new(options, 10);
    client
        .publish(
            format!("d/{}/state", b.id),
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            "x",
        )
        .await
        .unwrap();
    let reason = tokio::time::timeout(hub_tests::WAIT, async {
        loop {
            if let rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubAck(ack)) =
                events.poll().await.unwrap()
            {
                return ack.reason;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(
        reason,
        rumqttc::v5::mqttbytes::v5::PubAckReason::NotAuthorized
    );
}

#[tokio::test]
async fn retained_state_reaches_later_subscribers_and_hub_commands_reach_the_device() {
    let hub = TestHub::start().await.unwrap();
    let a_id = hub.enroll("a").await.unwrap();
    let mut a = SimDevice::connect(&a_id, hub.mqtt_addr).await.unwrap();
    let state = format!("d/{}/state", a_id.id);
    a.publish(&state, b"{\"on\":false}", true).await.unwrap();
    // Wait until the hub has routed it before a new subscriber arrives.
    let mut first = hub.watch(&state).await.unwrap();
    let m = first.next().await.unwrap();
    assert_eq!(m.payload, b"{\"on\":false}");

    let mut later = hub.watch(&state).await.unwrap();
    let m = later.next().await.unwrap();
    assert!(m.retain, "a late subscriber gets the retained state");
    assert_eq!(m.payload, b"{\"on\":false}");

    assert_eq!(
        a.subscribe(&format!("d/{}/cmd/#", a_id.id), QoS::AtLeastOnce)
            .await
            .unwrap(),
        vec![1]
    );
    hub.publish(&format!("d/{}/cmd/x", a_id.id), b"{\"on\":true}", false)
        .await
        .unwrap();
    let (topic, payload) = a.next_message().await.unwrap();
    assert_eq!(topic, format!("d/{}/cmd/x", a_id.id));
    assert_eq!(payload, b"{\"on\":true}");
}

#[tokio::test]
async fn last_will_is_published_when_a_device_vanishes() {
    let hub = TestHub::start().await.unwrap();
    let a_id = hub.enroll("a").await.unwrap();
    let will_topic = format!("d/{}/event/offline", a_id.id);
    let mut watch = hub.watch(&will_topic).await.unwrap();
    let mut options = rumqttc::MqttOptions::new(a_id.id.clone(), "127.0.0.1", hub.mqtt_addr.port());
    options.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(a_id.client_config().unwrap()),
    ));
    options.set_last_will(rumqttc::LastWill::new(
        &will_topic,
        "gone",
        QoS::AtMostOnce,
        false,
    ));
    let (client, mut events) = rumqttc::AsyncClient::new(options, 10);
    loop {
        if let rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) = events.poll().await.unwrap()
        {
            break;
        }
    }
    // Drop the connection without DISCONNECT.
    drop(events);
    drop(client);
    let m = watch.next().await.unwrap();
    assert_eq!(m.payload, b"gone");
}

#[tokio::test]
async fn a_will_on_a_foreign_topic_is_refused_at_connect() {
    let hub = TestHub::start().await.unwrap();
    let a_id = hub.enroll("a").await.unwrap();
    let mut options = rumqttc::MqttOptions::new(a_id.id.clone(), "127.0.0.1", hub.mqtt_addr.port());
    options.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(a_id.client_config().unwrap()),
    ));
    options.set_last_will(rumqttc::LastWill::new(
        "d/other/state",
        "x",
        QoS::AtMostOnce,
        false,
    ));
    let (_client, mut events) = rumqttc::AsyncClient::new(options, 10);
    match events.poll().await {
        Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, rumqttc::ConnectReturnCode::NotAuthorized)
        }
        other => panic!("expected refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn revoking_a_connected_device_closes_it_within_a_second_and_refuses_reconnects() {
    let hub = TestHub::start().await.unwrap();
    let a_id = hub.enroll("a").await.unwrap();
    let mut a = SimDevice::connect(&a_id, hub.mqtt_addr).await.unwrap();
    let mut admin = hub.admin().await.unwrap();
    let started = Instant::now();
    let resp = admin
        .revoke_device(pb::RevokeDeviceRequest {
            id: a_id.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.was_connected);
    assert_eq!(resp.device.unwrap().state, pb::DeviceState::Revoked as i32);
    a.disconnected().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
    // The reconnect is refused at the handshake, with no restart in between.
    assert!(SimDevice::connect(&a_id, hub.mqtt_addr).await.is_err());
    let out = raw::try_connect(
        hub.mqtt_addr,
        a_id.client_config().unwrap(),
        &raw::connect_v4(&a_id.id),
    )
    .await;
    assert!(matches!(out, Outcome::Refused(_)), "{out:?}");
    // The refusal survives a restart too.
    let hub = hub.restart().await.unwrap();
    let out = raw::try_connect(
        hub.mqtt_addr,
        a_id.client_config().unwrap(),
        &raw::connect_v4(&a_id.id),
    )
    .await;
    assert!(matches!(out, Outcome::Refused(_)), "{out:?}");
}

#[tokio::test]
async fn idle_sockets_do_not_lock_out_a_real_device() {
    let hub = TestHub::start().await.unwrap();
    let a_id = hub.enroll("a").await.unwrap();
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(tokio::net::TcpStream::connect(hub.mqtt_addr).await.unwrap());
    }
    let started = Instant::now();
    // The device may be asked to wait for an admission token, never refused.
    let dev = SimDevice::connect(&a_id, hub.mqtt_addr).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    drop(dev);
    drop(idle);
}

#[tokio::test]
async fn a_second_session_takes_over_the_first() {
    let hub = TestHub::start().await.unwrap();
    let a_id = hub.enroll("a").await.unwrap();
    let mut first = SimDevice::connect(&a_id, hub.mqtt_addr).await.unwrap();
    let mut second = SimDevice::connect(&a_id, hub.mqtt_addr).await.unwrap();
    first.disconnected().await.unwrap();
    assert_eq!(
        second
            .subscribe(&format!("d/{}/cmd/#", a_id.id), QoS::AtMostOnce)
            .await
            .unwrap(),
        vec![0]
    );
    hub.publish(&format!("d/{}/cmd/y", a_id.id), b"1", false)
        .await
        .unwrap();
    assert_eq!(second.next_message().await.unwrap().1, b"1");
    assert_eq!(hub.status().await.unwrap().devices_connected, 1);
}
