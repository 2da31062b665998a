//! What survives a hub restart: devices' last retained state and metadata
//! come back before any device reconnects (principle 9).

use hub_proto::v1 as pb;
use hub_tests::{SimDevice, TestHub};

#[tokio::test]
async fn retained_state_and_meta_are_back_after_a_restart_before_devices_return() {
    let hub = TestHub::start().await.unwrap();
    let a = hub.enroll("a").await.unwrap();
    let b = hub.enroll("b").await.unwrap();
    let mut watch = hub.watch("d/+/+").await.unwrap();
    for (dev, state) in [(&a, "{\"on\":true}"), (&b, "{\"t\":19.5}")] {
        let session = SimDevice::connect(dev, hub.mqtt_addr).await.unwrap();
        session
            .publish(
                &format!("d/{}/meta", dev.id),
                b"{\"kind\":\"sensor\"}",
                true,
            )
            .await
            .unwrap();
        session
            .publish(&format!("d/{}/state", dev.id), state.as_bytes(), true)
            .await
            .unwrap();
        // A later, non-retained message does not replace the stored state.
        session
            .publish(&format!("d/{}/state", dev.id), b"transient", false)
            .await
            .unwrap();
        for _ in 0..3 {
            watch.next().await.unwrap();
        }
    }
    // Cleared state stays cleared.
    let session = SimDevice::connect(&b, hub.mqtt_addr).await.unwrap();
    session
        .publish(&format!("d/{}/meta", b.id), b"", true)
        .await
        .unwrap();
    watch.next().await.unwrap();
    drop((session, watch));

    let hub = hub.restart().await.unwrap();
    let mut watch = hub.watch("d/+/+").await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let m = watch.next().await.unwrap();
        assert!(m.retain);
        seen.push((m.topic, String::from_utf8(m.payload).unwrap()));
    }
    seen.sort();
    let mut expected = vec![
        (
            format!("d/{}/meta", a.id),
            "{\"kind\":\"sensor\"}".to_owned(),
        ),
        (format!("d/{}/state", a.id), "{\"on\":true}".to_owned()),
        (format!("d/{}/state", b.id), "{\"t\":19.5}".to_owned()),
    ];
    expected.sort();
    assert_eq!(seen, expected);

    // Removing a device removes its stored state too.
    hub.admin()
        .await
        .unwrap()
        .remove_device(pb::RemoveDeviceRequest {
            id: a.id.clone(),
            reset: false,
            reset_timeout_seconds: 0,
        })
        .await
        .unwrap();
    let hub = hub.restart().await.unwrap();
    let mut watch = hub.watch("d/+/+").await.unwrap();
    let m = watch.next().await.unwrap();
    assert_eq!(m.topic, format!("d/{}/state", b.id));
}
