//! The runner under tokio's paused time, with a clock that moves with it:
//! schedules across both DST changes, waiting for an unset clock, delays
//! and their cancellation, loop protection, and variables that outlive the
//! runner.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::*;
use crate::bus::{self, BusTx};
use crate::ca::Ca;
use crate::config::CaSection;
use crate::store::{DataKey, Store};

type Sent = Arc<Mutex<Vec<(Timestamp, String, Value)>>>;

struct Rig {
    _dir: tempfile::TempDir,
    registry: RegistryHandle,
    sent: Sent,
    trusted: Arc<AtomicBool>,
    base: Timestamp,
    start: tokio::time::Instant,
}

struct Running {
    handle: AutomationHandle,
    bus: BusTx,
    stop: CancellationToken,
    tracker: TaskTracker,
}

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn id(s: &str) -> DeviceId {
    DeviceId::parse(s).unwrap()
}

impl Rig {
    /// A store holding `rules`, and a clock that reads `base` now.
    fn new(rules: &str, base: &str) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::open_or_create(&dir.path().join("ca"), &[], 90).unwrap();
        let store = Store::open(&dir.path().join("hub.redb"), DataKey::ephemeral()).unwrap();
        let parsed = ruleset::parse_file(rules, "t.toml", &|_| true).unwrap();
        let records: Vec<RuleRecord> = parsed
            .iter()
            .enumerate()
            .map(|(i, s)| RuleRecord {
                id: format!("{i:016x}"),
                position: i as u32,
                name: s.rule.name.to_string(),
                source: s.source.clone(),
                updated_at: 0,
            })
            .collect();
        store.replace_rules(&records).unwrap();
        Rig {
            _dir: dir,
            registry: RegistryHandle::new(store, ca, CaSection::default()),
            sent: Arc::default(),
            trusted: Arc::new(AtomicBool::new(true)),
            base: ts(base),
            start: tokio::time::Instant::now(),
        }
    }

    fn now(&self) -> Timestamp {
        let elapsed = tokio::time::Instant::now() - self.start;
        self.base + SignedDuration::try_from(elapsed).unwrap()
    }

    async fn run(&self) -> Running {
        let (bus, events) = bus::channel(64);
        let sent = self.sent.clone();
        let (base, t0) = (self.base, self.start);
        let clock_now =
            move || base + SignedDuration::try_from(tokio::time::Instant::now() - t0).unwrap();
        let publish: Publisher = Arc::new(move |topic: String, payload: Bytes| {
            let sent = sent.clone();
            let at = clock_now();
            Box::pin(async move {
                if topic.starts_with("d/iso-1/") {
                    return Err(SendError::Isolated("iso-1".into()));
                }
                let value = serde_json::from_slice(&payload).unwrap();
                sent.lock().unwrap().push((at, topic, value));
                Ok(())
            }) as CommandFuture
        });
        let trusted = self.trusted.clone();
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let handle = start(
            Setup {
                registry: self.registry.clone(),
                events,
                publish,
                tz: TimeZone::get("Europe/London").unwrap(),
                history: 100,
                clock: Clock::new(clock_now, move || trusted.load(Ordering::SeqCst)),
            },
            &tracker,
            stop.clone(),
        )
        .await
        .unwrap();
        Running {
            handle,
            bus,
            stop,
            tracker,
        }
    }

    fn sent(&self) -> Vec<(Timestamp, String, Value)> {
        self.sent.lock().unwrap().clone()
    }
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// Registers a device straight in the store (the dry run checks ids).
fn add_device(store: &Store, device: &str) {
    use crate::model::{Grants, Role};
    use crate::store::{CertRecord, DeviceRecord, DeviceState};
    let serial = format!("{:x}", device.len() + 0xa0);
    let record = DeviceRecord {
        id: id(device),
        name: device.to_owned(),
        state: DeviceState::Active,
        created_at: 0,
        last_seen: 0,
        cert_serial: serial.clone(),
        cert_not_after: i64::MAX,
        role: Role::Device,
        isolation_reason: None,
        grants: Grants::default(),
        kind: None,
        lifecycle: Default::default(),
    };
    let cert = CertRecord {
        serial_hex: serial,
        device: id(device),
        issued_at: 0,
        not_after: i64::MAX,
        revoked_at: None,
    };
    store.enroll(&record, &cert).unwrap();
}

/// Button 1 is pressed.
fn press() -> HubEvent {
    HubEvent::Event {
        device: id("button-1"),
        name: "press".into(),
        payload: Bytes::from_static(b"{}"),
    }
}

/// Lets virtual time pass (paused time: instant in real time).
async fn pass(d: Duration) {
    tokio::time::sleep(d).await;
}

#[tokio::test(start_paused = true)]
async fn at_fires_once_a_day_across_spring_forward() {
    let rig = Rig::new(
        r#"[[rule]]
name = "lamp"
trigger = { at = "01:30" }
actions = [{ command = "lamp-1", name = "on" }]
"#,
        "2025-03-29T12:00:00Z",
    );
    let running = rig.run().await;
    pass(Duration::from_secs(3 * 86_400)).await;
    let runs = running.handle.history(None, 10).await.unwrap();
    let mut at: Vec<Timestamp> = runs.iter().map(|r| r.at).collect();
    at.reverse();
    assert_eq!(
        at,
        [
            // 01:30 does not exist on the 30th: the moment the clocks jump.
            ts("2025-03-30T01:00:00Z"),
            ts("2025-03-31T00:30:00Z"),
            ts("2025-04-01T00:30:00Z"),
        ]
    );
    assert_eq!(rig.sent().len(), 3);
    assert!(runs.iter().all(|r| r.outcome == Outcome::Completed));
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn at_fires_once_across_fall_back() {
    let rig = Rig::new(
        r#"[[rule]]
name = "lamp"
trigger = { at = "01:30" }
actions = [{ command = "lamp-1", name = "on" }]
"#,
        "2025-10-25T12:00:00Z",
    );
    let running = rig.run().await;
    pass(Duration::from_secs(2 * 86_400)).await;
    let sent: Vec<Timestamp> = rig.sent().iter().map(|s| s.0).collect();
    // 01:30 happens twice on the 26th: only the first (BST) fires.
    assert_eq!(
        sent,
        [ts("2025-10-26T00:30:00Z"), ts("2025-10-27T01:30:00Z")]
    );
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn schedules_wait_while_the_clock_is_not_set() {
    let rig = Rig::new(
        r#"[[rule]]
name = "tick"
trigger = { every = "1m" }
actions = [{ command = "lamp-1", name = "tick" }]
"#,
        "2025-01-01T00:00:30Z",
    );
    rig.trusted.store(false, Ordering::SeqCst);
    let running = rig.run().await;
    pass(Duration::from_secs(5 * 60)).await;
    assert!(rig.sent().is_empty(), "{:?}", rig.sent());
    let status = running.handle.status().await.unwrap();
    assert!(status.waiting_for_clock);

    rig.trusted.store(true, Ordering::SeqCst);
    let set_at = rig.now();
    pass(Duration::from_secs(4 * 60)).await;
    let sent = rig.sent();
    assert!(sent.len() >= 2, "{sent:?}");
    for (at, _, _) in &sent {
        assert!(*at > set_at, "fired for time that passed unset: {at}");
        assert_eq!(at.as_second() % 60, 0, "not on the minute: {at}");
    }
    assert!(!running.handle.status().await.unwrap().waiting_for_clock);
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_delay_resumes_the_run_and_disabling_the_rule_cancels_it() {
    let rig = Rig::new(
        r#"[[rule]]
name = "pulse"
trigger = { event = "button-1", name = "press" }
actions = [
  { command = "lamp-1", name = "on" },
  { delay = "10s" },
  { command = "lamp-1", name = "off" },
]
"#,
        "2025-06-01T12:00:00Z",
    );
    let running = rig.run().await;
    running.bus.send(press());
    pass(Duration::from_secs(1)).await;
    let runs = running.handle.history(None, 10).await.unwrap();
    assert_eq!(runs[0].outcome, Outcome::Running);
    assert_eq!(runs[0].actions, ["command d/lamp-1/cmd/on {}", "delay 10s"]);
    pass(Duration::from_secs(10)).await;
    let runs = running.handle.history(None, 10).await.unwrap();
    assert_eq!(runs[0].outcome, Outcome::Completed);
    let sent = rig.sent();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[1].0.duration_since(sent[0].0).as_secs(), 10);

    // Pressed again, and the rule is disabled while the run waits.
    running.bus.send(press());
    pass(Duration::from_secs(1)).await;
    let name = RuleName::parse("pulse").unwrap();
    let changed = running.handle.set_enabled(&[name], false).await.unwrap();
    assert_eq!(changed, ["pulse"]);
    pass(Duration::from_secs(20)).await;
    let runs = running.handle.history(None, 10).await.unwrap();
    assert_eq!(runs[0].outcome, Outcome::Cancelled);
    assert_eq!(
        rig.sent().len(),
        3,
        "the off command of a cancelled run was sent"
    );
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn refusals_fold_into_one_history_entry_and_isolation_fails_the_run() {
    let rig = Rig::new(
        r#"[[rule]]
name = "chatty"
max_runs_per_minute = 2
trigger = { event = "button-1", name = "press" }
actions = [{ command = "iso-1", name = "on" }, { command = "lamp-1", name = "on" }]
"#,
        "2025-06-01T12:00:00Z",
    );
    let running = rig.run().await;
    for _ in 0..10 {
        running.bus.send(press());
    }
    pass(Duration::from_millis(10)).await;
    let runs = running.handle.history(None, 10).await.unwrap();
    assert_eq!(runs.len(), 3, "{runs:#?}");
    assert!(
        matches!(&runs[0].outcome, Outcome::Refused(why) if why.starts_with("ran 2 times")),
        "{runs:#?}"
    );
    assert_eq!(runs[0].repeats, 7);
    for run in &runs[1..] {
        assert_eq!(
            run.outcome,
            Outcome::Failed("not sent: iso-1 is isolated".into())
        );
        assert_eq!(
            run.actions,
            [
                "command d/iso-1/cmd/on {} (not sent: iso-1 is isolated)",
                "command d/lamp-1/cmd/on {}"
            ]
        );
    }
    let status = running.handle.status().await.unwrap();
    assert_eq!((status.runs, status.refused), (2, 8));
    // A minute later the rule may run again.
    pass(Duration::from_secs(61)).await;
    running.bus.send(press());
    pass(Duration::from_millis(10)).await;
    assert_eq!(running.handle.status().await.unwrap().runs, 3);
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn variables_outlive_the_runner_and_states_seed_the_previous_value() {
    let rig = Rig::new(
        r#"[[rule]]
name = "night"
trigger = { start = true }
actions = [{ set_var = "mode", value = "night" }]
"#,
        "2025-06-01T12:00:00Z",
    );
    let running = rig.run().await;
    pass(Duration::from_millis(10)).await;
    running.stop().await;
    // Without the rule that set it, the variable can only come from the store.
    let store = rig.registry.store();
    store.replace_rules(&[]).unwrap();
    add_device(store, "sensor-1");
    // A state stored by the edge before the restart.
    store
        .put_retained(&[(
            id("sensor-1"),
            RetainedKind::State,
            br#"{"t": 30}"#.to_vec(),
        )])
        .unwrap();

    let running = rig.run().await;
    let probe = r#"[[rule]]
name = "set"
trigger = { start = true }
actions = [{ set_var = "mode", value = "x" }]
[[rule]]
name = "probe"
trigger = { state = "sensor-1", pointer = "/t", op = ">", value = 25 }
conditions = [{ var = "mode", op = "==", value = "night" }]
actions = [{ log = "hot at night" }]
"#;
    // Still hot: no edge, because the stored state is the previous one.
    let steps = running
        .handle
        .test(
            probe,
            "probe.toml",
            &[r#"d/sensor-1/state={"t": 31}"#.to_owned()],
            None,
        )
        .await
        .unwrap();
    assert!(steps[0].rules.is_empty(), "{steps:#?}");
    // Cooled and hot again: it fires, because "mode" is still "night".
    let steps = running
        .handle
        .test(
            probe,
            "probe.toml",
            &[
                r#"d/sensor-1/state={"t": 20}"#.to_owned(),
                r#"d/sensor-1/state={"t": 31}"#.to_owned(),
            ],
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        steps[1].rules[0].outcome,
        dryrun::Outcome::Fires(vec!["log: hot at night".into()])
    );
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_rule_applied_later_sees_the_state_that_came_before_it() {
    let rig = Rig::new("", "2025-06-01T12:00:00Z");
    add_device(rig.registry.store(), "sensor-1");
    add_device(rig.registry.store(), "lamp-1");
    let running = rig.run().await;
    let state = |t: u32| HubEvent::State {
        device: id("sensor-1"),
        payload: Bytes::from(format!(r#"{{"t": {t}}}"#)),
    };
    // No rule looks at the sensor yet: its state is kept, unparsed.
    running.bus.send(state(30));
    pass(Duration::from_millis(10)).await;
    let rules = r#"[[rule]]
name = "hot"
trigger = { state = "sensor-1", pointer = "/t", op = ">", value = 25 }
actions = [{ command = "lamp-1", name = "on" }]
"#;
    running.handle.apply(rules, "r.toml").await.unwrap();
    // Still hot is not a crossing; cooling and heating again is.
    for t in [31, 20, 26] {
        running.bus.send(state(t));
    }
    pass(Duration::from_millis(10)).await;
    let sent = rig.sent();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].1, "d/lamp-1/cmd/on");
    running.stop().await;
}
