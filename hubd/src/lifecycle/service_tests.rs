//! The lifecycle service with an injected clock: support ends while the
//! hub runs, and the policy acts once, on the day after the end date.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use jiff::civil::Date;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::*;
use crate::ca::Ca;
use crate::config::{CaSection, LifecycleSection};
use crate::model::{DeviceId, Grants, Role};
use crate::registry::RegistryHandle;
use crate::seclog::SecLog;
use crate::store::{CertRecord, DataKey, DeviceRecord, DeviceState, Store};

struct Rig {
    _dir: tempfile::TempDir,
    registry: RegistryHandle,
    seclog: SecLog,
    today: Arc<Mutex<Date>>,
    isolated: Arc<Mutex<Vec<(String, String)>>>,
    handle: LifecycleHandle,
    _reports: mpsc::Sender<crate::bus::DeviceReport>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

fn add_device(store: &Store, id: &str, support_end: &str) {
    let cert = CertRecord {
        serial_hex: hex::encode(id),
        device: DeviceId::parse(id).unwrap(),
        issued_at: 0,
        not_after: i64::MAX,
        revoked_at: None,
    };
    let lifecycle = crate::store::Lifecycle {
        support_end_reported: Some(support_end.to_owned()),
        ..Default::default()
    };
    let record = DeviceRecord {
        id: DeviceId::parse(id).unwrap(),
        name: id.to_owned(),
        state: DeviceState::Active,
        created_at: 0,
        last_seen: 0,
        cert_serial: cert.serial_hex.clone(),
        cert_not_after: i64::MAX,
        role: Role::Device,
        isolation_reason: None,
        grants: Grants::default(),
        kind: None,
        lifecycle,
    };
    store.enroll(&record, &cert).unwrap();
}

async fn rig(isolate_after_support_end: bool, today: &str) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::open_or_create(&dir.path().join("ca"), &[], 90).unwrap();
    let store = Store::open(&dir.path().join("hub.redb"), DataKey::ephemeral()).unwrap();
    add_device(&store, "cam-1", "2030-06-30");
    add_device(&store, "cam-2", "2031-01-01");
    let registry = RegistryHandle::new(store.clone(), ca, CaSection::default());
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let seclog = SecLog::start(store, &tasks, stop.clone()).unwrap();
    let today = Arc::new(Mutex::new(today.parse::<Date>().unwrap()));
    let isolated = Arc::new(Mutex::new(Vec::new()));
    let (reports, rx) = mpsc::channel(8);
    let publish: Publisher = Arc::new(|_, _: Bytes, _| Box::pin(async { Ok(()) }));
    let (iso, reg) = (isolated.clone(), registry.clone());
    let isolate: Isolator = Arc::new(move |id: DeviceId, reason: String| {
        let (iso, reg) = (iso.clone(), reg.clone());
        Box::pin(async move {
            reg.isolate(&id, &reason).map_err(|e| e.to_string())?;
            iso.lock().unwrap().push((id.to_string(), reason));
            Ok(())
        })
    });
    let clock_today = today.clone();
    let handle = start(
        Setup {
            registry: registry.clone(),
            seclog: seclog.clone(),
            cfg: LifecycleSection {
                isolate_after_support_end,
                ..LifecycleSection::default()
            },
            reports: rx,
            publish,
            isolate,
            clock: Clock::new(move || *clock_today.lock().unwrap()),
        },
        &tasks,
        stop.clone(),
    )
    .await
    .unwrap();
    Rig {
        _dir: dir,
        registry,
        seclog,
        today,
        isolated,
        handle,
        _reports: reports,
        stop,
        tasks,
    }
}

impl Rig {
    fn set_today(&self, date: &str) {
        *self.today.lock().unwrap() = date.parse().unwrap();
    }

    fn isolated(&self) -> Vec<(String, String)> {
        self.isolated.lock().unwrap().clone()
    }

    async fn ended_events(&self) -> Vec<String> {
        // A durable marker flushes what the sweep queued before it.
        self.seclog
            .record_durable(crate::seclog::Event::new(
                crate::seclog::Kind::Wipe,
                crate::seclog::Severity::Info,
                "marker",
            ))
            .await
            .unwrap();
        let store = self.seclog.store().clone();
        store
            .seclog(0, usize::MAX)
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == "support.ended")
            .map(|e| format!("{} {}", e.device.unwrap_or_default(), e.message))
            .collect()
    }

    async fn stop(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

#[tokio::test]
async fn support_that_ends_while_the_hub_runs_isolates_once_the_day_after() {
    let rig = rig(true, "2030-06-29").await;
    assert!(rig.isolated().is_empty());
    let cam1 = rig
        .registry
        .device(&DeviceId::parse("cam-1").unwrap())
        .unwrap();
    assert_eq!(rig.handle.support_of(&cam1).0, SupportStatus::EndsSoon);

    // The last day of support: still supported.
    rig.set_today("2030-06-30");
    rig.handle.sweep().await.unwrap();
    assert!(rig.isolated().is_empty());

    // The day after: isolated, with the reason, and an alert.
    rig.set_today("2030-07-01");
    rig.handle.sweep().await.unwrap();
    assert_eq!(
        rig.isolated(),
        vec![("cam-1".to_owned(), "support ended on 2030-06-30".to_owned())]
    );
    let events = rig.ended_events().await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(
        events[0].contains("isolated by the end-of-life policy"),
        "{events:?}"
    );

    // Later sweeps do not repeat it, even once the owner released it.
    rig.registry
        .release(&DeviceId::parse("cam-1").unwrap())
        .unwrap();
    rig.set_today("2030-08-01");
    rig.handle.sweep().await.unwrap();
    assert_eq!(rig.isolated().len(), 1);
    assert_eq!(rig.ended_events().await.len(), 1);

    // The second camera's turn comes.
    rig.set_today("2031-01-02");
    rig.handle.sweep().await.unwrap();
    assert_eq!(rig.isolated().len(), 2);
    let summary = rig.handle.summary(&rig.registry.devices().unwrap());
    assert_eq!(summary.support_ended, 2);
    assert_eq!(
        summary.ended_not_isolated, 1,
        "cam-1 was released by its owner"
    );
    rig.stop().await;
}

#[tokio::test]
async fn without_the_policy_an_ended_device_is_flagged_and_alerted_not_isolated() {
    let rig = rig(false, "2030-07-01").await;
    // The start-up sweep acts at once.
    rig.handle.sweep().await.unwrap();
    assert!(rig.isolated().is_empty());
    let events = rig.ended_events().await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(events[0].starts_with("cam-1 "), "{events:?}");
    assert!(events[0].contains("not isolated"), "{events:?}");
    let summary = rig.handle.summary(&rig.registry.devices().unwrap());
    assert_eq!((summary.support_ended, summary.ended_not_isolated), (1, 1));
    rig.stop().await;
}
