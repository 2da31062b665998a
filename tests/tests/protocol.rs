//! MQTT behaviour at the edge: QoS 1 both ways, keep-alive, limits, malformed
//! input, version-specific refusals, and the slow-subscriber policy
//! (principles 5, 9 and 13).

use std::time::{Duration, Instant};

use hub_proto::v1 as pb;
use hub_tests::raw::{self, Session};
use hub_tests::{DeviceEvent, SimDevice, TestHub};
use rumqttc::QoS;

#[tokio::test]
async fn qos1_flows_both_ways_past_the_inflight_window() {
    let hub = TestHub::start().await.unwrap();
    let a = hub.enroll("a").await.unwrap();
    let mut dev = SimDevice::connect(&a, hub.mqtt_addr).await.unwrap();
    let state = format!("d/{}/state", a.id);
    let mut watch = hub.watch(&state).await.unwrap();

    // Device -> hub: every QoS 1 publish is acknowledged and routed.
    const N: usize = 250;
    for i in 0..N {
        dev.client
            .publish(&state, QoS::AtLeastOnce, false, i.to_string())
            .await
            .unwrap();
    }
    let mut acks = 0;
    while acks < N {
        match dev.next().await.unwrap() {
            DeviceEvent::PubAck(_) => acks += 1,
            DeviceEvent::Disconnected(why) => panic!("disconnected: {why}"),
            _ => {}
        }
    }
    for i in 0..N {
        assert_eq!(
            watch.next().await.unwrap().payload,
            i.to_string().as_bytes()
        );
    }

    // Hub -> device at QoS 1: more than the router's window of 100 arrives,
    // so the device's PUBACKs reach the router.
    let cmd = format!("d/{}/cmd/step", a.id);
    assert_eq!(
        dev.subscribe(&format!("d/{}/cmd/#", a.id), QoS::AtLeastOnce)
            .await
            .unwrap(),
        vec![1]
    );
    let mut admin = hub.admin().await.unwrap();
    for i in 0..N {
        admin
            .publish(pb::PublishRequest {
                topic: cmd.clone(),
                payload: i.to_string().into_bytes(),
                retain: false,
                qos: 1,
            })
            .await
            .unwrap();
    }
    for i in 0..N {
        let (topic, payload) = dev.next_message().await.unwrap();
        assert_eq!(
            (topic.as_str(), payload),
            (cmd.as_str(), i.to_string().into_bytes())
        );
    }
}

#[tokio::test]
async fn a_silent_client_is_closed_after_one_and_a_half_keep_alives() {
    let hub = TestHub::start().await.unwrap();
    let a = hub.enroll("a").await.unwrap();
    let started = Instant::now();
    let mut s = Session::open(
        hub.mqtt_addr,
        a.client_config().unwrap(),
        &raw::connect_with_keepalive(&a.id, 4, 1),
    )
    .await
    .unwrap();
    assert_eq!(
        s.read().await.unwrap(),
        None,
        "the hub should close the session"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1400),
        "closed too early: {took:?}"
    );

    // On MQTT 5 the hub says why: DISCONNECT with 0x8D (keep-alive timeout).
    let mut s = Session::open(
        hub.mqtt_addr,
        a.client_config().unwrap(),
        &raw::connect_with_keepalive(&a.id, 5, 1),
    )
    .await
    .unwrap();
    let (byte1, body) = s.read().await.unwrap().expect("a DISCONNECT");
    assert_eq!((byte1, body[0]), (0xe0, 0x8d));
}

#[tokio::test]
async fn no_connect_after_the_handshake_is_closed() {
    let hub = TestHub::start_with(|c| c.edge.connect_timeout = Duration::from_millis(300))
        .await
        .unwrap();
    let a = hub.enroll("a").await.unwrap();
    let tcp = tokio::net::TcpStream::connect(hub.mqtt_addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(a.client_config().unwrap())
        .connect(hub_tests::loopback_name(), tcp)
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(
        hub_tests::WAIT,
        tokio::io::AsyncReadExt::read(&mut tls, &mut buf),
    )
    .await
    .expect("closed in time")
    .unwrap_or(0);
    assert_eq!(n, 0);
    assert_eq!(
        hub.status()
            .await
            .unwrap()
            .counters
            .unwrap()
            .protocol_errors,
        1
    );
}

#[tokio::test]
async fn oversized_and_malformed_packets_end_the_session_and_nothing_else() {
    let hub = TestHub::start_with(|c| c.edge.max_packet_size = 1024)
        .await
        .unwrap();
    let a = hub.enroll("a").await.unwrap();
    let state = format!("d/{}/state", a.id);
    let cfg = a.client_config().unwrap();

    // v5: DISCONNECT 0x95 (packet too large).
    let mut s = Session::open(hub.mqtt_addr, cfg.clone(), &raw::connect_v5(&a.id))
        .await
        .unwrap();
    s.send(&raw::publish_packet(&state, &[b'x'; 2000], 0, 0, true))
        .await
        .unwrap();
    let (byte1, body) = s.read().await.unwrap().expect("a DISCONNECT");
    assert_eq!((byte1, body[0]), (0xe0, 0x95));

    // v3.1.1: the connection is closed.
    let mut s = Session::open(hub.mqtt_addr, cfg.clone(), &raw::connect_v4(&a.id))
        .await
        .unwrap();
    s.send(&raw::publish_packet(&state, &[b'x'; 2000], 0, 0, false))
        .await
        .unwrap();
    assert_eq!(s.read().await.unwrap(), None);

    // A PUBLISH whose topic length runs past the packet.
    let mut s = Session::open(hub.mqtt_addr, cfg.clone(), &raw::connect_v4(&a.id))
        .await
        .unwrap();
    s.send(&[0x30, 0x02, 0xff, 0xff]).await.unwrap();
    assert_eq!(s.read().await.unwrap(), None);

    // A topic with a wildcard, and one with a control character.
    for topic in [
        format!("d/{}/state/+", a.id),
        format!("d/{}/st\u{1}ate", a.id),
    ] {
        let mut s = Session::open(hub.mqtt_addr, cfg.clone(), &raw::connect_v5(&a.id))
            .await
            .unwrap();
        s.send(&raw::publish_packet(&topic, b"x", 0, 0, true))
            .await
            .unwrap();
        let (byte1, body) = s.read().await.unwrap().expect("a DISCONNECT");
        assert_eq!((byte1, body[0]), (0xe0, 0x90), "{topic:?}");
    }

    // QoS 2 is not offered.
    let mut s = Session::open(hub.mqtt_addr, cfg.clone(), &raw::connect_v5(&a.id))
        .await
        .unwrap();
    s.send(&raw::publish_packet(&state, b"x", 2, 7, true))
        .await
        .unwrap();
    let (byte1, body) = s.read().await.unwrap().expect("a DISCONNECT");
    assert_eq!((byte1, body[0]), (0xe0, 0x9b));

    let counters = hub.status().await.unwrap().counters.unwrap();
    assert_eq!(counters.protocol_errors, 6, "{counters:?}");
    // The hub is unharmed.
    let dev = SimDevice::connect(&a, hub.mqtt_addr).await.unwrap();
    let mut watch = hub.watch(&state).await.unwrap();
    dev.publish(&state, b"fine", false).await.unwrap();
    assert_eq!(watch.next().await.unwrap().payload, b"fine");
}

#[tokio::test]
async fn v5_subscribe_refusals_carry_reason_codes() {
    let hub = TestHub::start().await.unwrap();
    let a = hub.enroll("a").await.unwrap();
    let mut s = Session::open(
        hub.mqtt_addr,
        a.client_config().unwrap(),
        &raw::connect_v5(&a.id),
    )
    .await
    .unwrap();
    s.send(&raw::subscribe_packet(1, "#", 0, true))
        .await
        .unwrap();
    let (byte1, body) = s.read().await.unwrap().unwrap();
    // SUBACK: pkid, properties length 0, then one reason code.
    assert_eq!((byte1, body.as_slice()), (0x90, [0, 1, 0, 0x87].as_slice()));
    s.send(&raw::subscribe_packet(2, "a/#/b", 0, true))
        .await
        .unwrap();
    let (_, body) = s.read().await.unwrap().unwrap();
    assert_eq!(
        body,
        [0, 2, 0, 0x8f],
        "malformed filter: topic filter invalid"
    );
    // QoS 2 is granted as QoS 1.
    s.send(&raw::subscribe_packet(
        3,
        &format!("d/{}/cmd/#", a.id),
        2,
        true,
    ))
    .await
    .unwrap();
    let (_, body) = s.read().await.unwrap().unwrap();
    assert_eq!(body, [0, 3, 0, 1]);
}

#[tokio::test]
async fn a_subscriber_that_stops_reading_loses_qos0_messages_counted_and_nobody_else_suffers() {
    let hub = TestHub::start_with(|c| c.edge.outgoing_queue = 1)
        .await
        .unwrap();
    let slow_id = hub.enroll("slow").await.unwrap();
    let fast_id = hub.enroll("fast").await.unwrap();
    let mut slow = Session::open(
        hub.mqtt_addr,
        slow_id.client_config().unwrap(),
        &raw::connect_v4(&slow_id.id),
    )
    .await
    .unwrap();
    slow.send(&raw::subscribe_packet(
        1,
        &format!("d/{}/cmd/#", slow_id.id),
        0,
        false,
    ))
    .await
    .unwrap();
    assert_eq!(slow.read().await.unwrap().unwrap().0, 0x90);
    // From here on `slow` never reads: its socket buffers fill, then its queue.
    let mut admin = hub.admin().await.unwrap();
    let payload = vec![7u8; 64 * 1024];
    let mut dropped = 0;
    for _ in 0..2000 {
        admin
            .publish(pb::PublishRequest {
                topic: format!("d/{}/cmd/flood", slow_id.id),
                payload: payload.clone(),
                retain: false,
                qos: 0,
            })
            .await
            .unwrap();
        dropped = hub
            .status()
            .await
            .unwrap()
            .counters
            .unwrap()
            .dropped_slow_subscriber;
        if dropped > 0 {
            break;
        }
    }
    assert!(
        dropped > 0,
        "nothing was dropped: the flood never filled the queue"
    );

    // Another device is served as usual meanwhile.
    let mut fast = SimDevice::connect(&fast_id, hub.mqtt_addr).await.unwrap();
    fast.subscribe(&format!("d/{}/cmd/#", fast_id.id), QoS::AtMostOnce)
        .await
        .unwrap();
    hub.publish(&format!("d/{}/cmd/x", fast_id.id), b"ok", false)
        .await
        .unwrap();
    assert_eq!(fast.next_message().await.unwrap().1, b"ok");
    drop(slow);
}

#[tokio::test]
async fn a_full_hub_answers_server_busy() {
    let hub = TestHub::start_with(|c| c.edge.max_connections = 1)
        .await
        .unwrap();
    let a = hub.enroll("a").await.unwrap();
    let b = hub.enroll("b").await.unwrap();
    let _first = SimDevice::connect(&a, hub.mqtt_addr).await.unwrap();
    let cfg = b.client_config().unwrap();
    // 3.1.1: return code 3 (server unavailable); 5: 0x89 (server busy).
    assert_eq!(
        raw::try_connect(hub.mqtt_addr, cfg.clone(), &raw::connect_v4(&b.id)).await,
        raw::Outcome::ConnAck(3)
    );
    assert_eq!(
        raw::try_connect(hub.mqtt_addr, cfg, &raw::connect_v5(&b.id)).await,
        raw::Outcome::ConnAck(0x89)
    );
    // The device already connected may reconnect (a takeover is not a new slot).
    assert!(
        raw::try_connect(
            hub.mqtt_addr,
            a.client_config().unwrap(),
            &raw::connect_v4(&a.id)
        )
        .await
        .is_success()
    );
}
