//! The security log (principle 10): a hash chain that shows where it was
//! edited, entries streamed live to `events --follow`, and kept across
//! restarts.

use hub_proto::v1 as pb;
use hub_tests::{TestHub, WAIT, hubctl};

#[tokio::test]
async fn editing_one_stored_entry_makes_verify_fail_and_name_it() {
    let hub = TestHub::start().await.unwrap();
    for name in ["Lamp", "Kettle", "Door"] {
        hub.enroll(name).await.unwrap();
    }
    let (code, out, err) = hubctl(&hub, &["events", "verify"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("security log intact: 3 entries"), "{out}");

    // Stop the hub, decrypt entry #1 with the data key, change it, and
    // seal it again: the AEAD is satisfied, the chain is not.
    let stopped = hub.stop_for_restart().await.unwrap();
    {
        let store = hubd::daemon::open_store(&stopped.state_dir()).unwrap();
        let mut entries = store.seclog(0, usize::MAX).unwrap();
        assert_eq!(entries.len(), 3);
        let entry = &mut entries[1];
        assert_eq!(entry.kind, "device.enrolled");
        entry.actor = "uid 0".into();
        entry.message = "nothing to see here".into();
        store.overwrite_seclog_entry_for_tests(entry).unwrap();
    }
    let hub = stopped.start_again().await.unwrap();
    let (code, out, err) = hubctl(&hub, &["events", "verify"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains("entry #1 was changed after it was written"),
        "{err}"
    );
    assert!(err.contains("1 entries before it verified"), "{err}");
    let (code, out, _) = hubctl(&hub, &["events", "verify", "--json"]).await;
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["ok"].as_bool(), v["broken_seq"].as_u64()),
        (Some(false), Some(1))
    );
    // New entries still chain on from the (edited) head; verify keeps
    // pointing at the edit.
    hub.enroll("Window").await.unwrap();
    let (code, _, err) = hubctl(&hub, &["events", "verify"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("entry #1"), "{err}");
}

#[tokio::test]
async fn follow_streams_new_events_and_the_log_survives_a_restart() {
    let hub = TestHub::start().await.unwrap();
    let first = hub.enroll("Lamp").await.unwrap();
    let mut admin = hub.admin().await.unwrap();
    let mut stream = admin
        .list_events(pb::ListEventsRequest {
            device: String::new(),
            limit: 10,
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    let past = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(past.device, first.id);
    let second = hub.enroll("Kettle").await.unwrap();
    let live = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        (live.kind.as_str(), live.device.as_str()),
        ("device.enrolled", second.id.as_str())
    );
    assert_eq!(
        live.prev, past.hash,
        "each entry carries the previous one's hash"
    );
    assert!(live.actor.starts_with("uid "), "{live:?}");
    drop(stream);

    let hub = hub.restart().await.unwrap();
    let (code, out, err) = hubctl(&hub, &["events", "--device", &second.id]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("device.enrolled") && out.contains(&second.id),
        "{out}"
    );
    assert!(!out.contains(&first.id), "filtered by device: {out}");
    let (code, out, _) = hubctl(&hub, &["events", "verify"]).await;
    assert_eq!(code, 0, "{out}");
}
