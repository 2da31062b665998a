//! Principle 9 end to end: simulated devices come back by themselves after a
//! hub restart, spread out in time rather than "in a massive scale
//! reconnect", and find their retained state again; and a fleet keeps
//! working when there is no network but loopback (no route, no DNS).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hub_tests::sim::{self, Fleet, FleetConfig, Kind};
use hub_tests::{TestHub, WAIT};

/// Longest any fleet-wide condition may take. Generous: each wait ends as
/// soon as its condition holds.
const FLEET_WAIT: Duration = Duration::from_secs(60);

/// The acceptance test's fleet.
const DEVICES: usize = 50;

/// The hub's admission rate (and burst) in the restart test: below the fleet
/// size, so a fleet that reconnected all at once would exceed it in one
/// second, and the assertion has teeth.
const ADMISSION_RATE: u32 = 40;

/// A faster backoff than the shipped one (1 s to 60 s) so the test takes
/// seconds, with the same shape.
fn test_fleet_config() -> FleetConfig {
    FleetConfig {
        // State only on (re)connect, so each device's retained state is
        // exactly the one it announced.
        rate: 0.0,
        backoff_base: Duration::from_millis(200),
        backoff_cap: Duration::from_secs(5),
        ..FleetConfig::default()
    }
}

/// Waits until the hub has taken in `n` PUBLISHes from devices (polling the
/// status RPC, bounded), so every announced retained state is in the router.
async fn wait_publishes_received(hub: &TestHub, n: u64) {
    let deadline = tokio::time::Instant::now() + FLEET_WAIT;
    loop {
        let counters = hub.status().await.unwrap().counters.unwrap_or_default();
        if counters.publishes_received >= n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the hub took in {} of {n} publishes within {FLEET_WAIT:?}",
            counters.publishes_received
        );
        // Polling the hub's own counter, as the harness polls readiness.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads `d/+/state` as the hub and returns the retained state of `n`
/// distinct devices (the ones the router hands a new subscription).
async fn retained_states(hub: &TestHub, n: usize) -> HashMap<String, String> {
    let mut watch = hub.watch("d/+/state").await.unwrap();
    let mut seen = HashMap::new();
    while seen.len() < n {
        let m = watch
            .next()
            .await
            .unwrap_or_else(|e| panic!("{} of {n} retained states arrived, then: {e}", seen.len()));
        if !m.retain {
            continue;
        }
        let id = m
            .topic
            .strip_prefix("d/")
            .and_then(|t| t.strip_suffix("/state"))
            .expect("the filter is d/+/state")
            .to_owned();
        seen.insert(id, String::from_utf8(m.payload).unwrap());
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_devices_return_by_themselves_spread_out_after_a_hub_restart() {
    let hub = TestHub::start_with(|c| {
        c.edge.admission_rate = ADMISSION_RATE;
        c.edge.admission_burst = ADMISSION_RATE;
    })
    .await
    .unwrap();
    let devices = sim::enroll_devices(&hub, DEVICES, &Kind::ALL)
        .await
        .unwrap();
    let fleet = Fleet::start(devices, hub.mqtt_addr, test_fleet_config());
    fleet.wait_connected(DEVICES, FLEET_WAIT).await.unwrap();
    // Meta and state from every device.
    wait_publishes_received(&hub, 2 * DEVICES as u64).await;
    let expected: HashMap<String, String> = fleet.last_states().into_iter().collect();

    // The hub goes away (as at a power cut and reboot, same state dir and
    // address) and stays away until the devices have backed off a few times:
    // four failed attempts per device on average is about 2 s at base 200 ms.
    let before = fleet.stats();
    let stopped_at = Instant::now();
    let stopped = hub.stop_for_restart().await.unwrap();
    fleet
        .wait_until("every session ended", FLEET_WAIT, |f| {
            f.stats().connected == 0
        })
        .await
        .unwrap();
    let failed_while_down = before.failures + 4 * DEVICES as u64;
    fleet
        .wait_until("four failed attempts per device", FLEET_WAIT, |f| {
            f.stats().failures >= failed_while_down
        })
        .await
        .unwrap();
    let down = fleet.attempt_histogram(stopped_at, Duration::from_secs(1));

    let up = Instant::now();
    let hub = stopped.start_again().await.unwrap();
    fleet
        .wait_until("all 50 devices back", FLEET_WAIT, |f| {
            f.connected_since(up) == DEVICES
        })
        .await
        .unwrap();

    // Spread: no second after the restart holds more attempts than the hub
    // admits per second.
    let histogram = fleet.attempt_histogram(up, Duration::from_secs(1));
    let back_after = fleet.last_connected_at().unwrap() - up;
    eprintln!(
        "attempts per second after the restart: {histogram:?}; all back after {back_after:?}; \
         while down: {down:?}"
    );
    let peak = histogram.iter().copied().max().unwrap_or(0);
    assert!(
        peak <= u64::from(ADMISSION_RATE),
        "a second held {peak} attempts, more than the admission rate {ADMISSION_RATE}: {histogram:?}"
    );
    assert!(histogram.iter().sum::<u64>() >= DEVICES as u64);
    let stats = fleet.stats();
    assert_eq!(stats.gave_up, 0);
    assert_eq!(stats.busy, 0, "{stats:?}");
    let counters = hub.status().await.unwrap().counters.unwrap_or_default();
    assert_eq!(
        counters.connections_refused, 0,
        "admission control never had to refuse a device"
    );

    // Their retained states are back.
    wait_publishes_received(&hub, 2 * DEVICES as u64).await;
    assert_eq!(retained_states(&hub, DEVICES).await, expected);

    fleet.stop().await;
    hub.stop().await.unwrap();
}

/// Item 4 of the issue on its own: the hub republishes the retained device
/// state it stored, at start, before any device is back to repeat it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_device_state_is_restored_from_the_store_at_start() {
    const N: usize = 6;
    let hub = TestHub::start().await.unwrap();
    let devices = sim::enroll_devices(&hub, N, &Kind::ALL).await.unwrap();
    let fleet = Fleet::start(devices, hub.mqtt_addr, test_fleet_config());
    fleet.wait_connected(N, FLEET_WAIT).await.unwrap();
    wait_publishes_received(&hub, 2 * N as u64).await;
    let expected: HashMap<String, String> = fleet.last_states().into_iter().collect();
    // The devices are gone for good, so whatever the hub knows after the
    // restart it kept itself (and on a new port, nobody could tell it).
    fleet.stop().await;
    let hub = hub.restart().await.unwrap();
    assert_eq!(retained_states(&hub, N).await, expected);
    hub.stop().await.unwrap();
}

/// Set in the child process that runs inside a network namespace.
const IN_NETNS: &str = "HUB_TESTS_IN_NETNS";

/// The test's own name, for re-running exactly it inside the namespace.
const NETNS_TEST: &str = "a_fleet_keeps_working_with_only_loopback_and_no_dns";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_keeps_working_with_only_loopback_and_no_dns() {
    if std::env::var_os(IN_NETNS).is_some() {
        // The child: only `lo` exists here.
        let interfaces = std::fs::read_to_string("/proc/net/dev").unwrap();
        let names: Vec<&str> = interfaces
            .lines()
            .skip(2)
            .filter_map(|l| l.split(':').next())
            .map(str::trim)
            .collect();
        assert_eq!(names, ["lo"], "the namespace has only loopback");
        loopback_fleet_scenario().await;
        return;
    }
    if netns_available().await {
        // Re-run this test alone in a new network namespace (a user
        // namespace makes that unprivileged): no route, no DNS server.
        let exe = std::env::current_exe().unwrap();
        let child = tokio::process::Command::new("unshare")
            .args(["--user", "--map-root-user", "--net", "sh", "-c"])
            .arg("ip link set lo up && exec \"$0\" \"$@\"")
            .arg(&exe)
            .args([NETNS_TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env(IN_NETNS, "1")
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(180), child)
            .await
            .expect("the namespaced run finishes within 180 s")
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("--- inside the network namespace ---\n{stdout}\n{stderr}");
        assert!(out.status.success(), "the namespaced run failed");
        assert!(stdout.contains("1 passed"), "the test ran in the namespace");
    } else {
        eprintln!(
            "note: cannot create a network namespace here (unshare or ip missing, or user \
             namespaces disabled); running on this host's loopback with IP addresses only"
        );
        loopback_fleet_scenario().await;
    }
}

/// Whether `unshare` can give us a network namespace with loopback up.
async fn netns_available() -> bool {
    tokio::process::Command::new("unshare")
        .args([
            "--user",
            "--map-root-user",
            "--net",
            "sh",
            "-c",
            "ip link set lo up",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

/// A loopback port that was free a moment ago (for the pairing listener,
/// which the hub binds only while a window is open).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A hub and a fleet on loopback, addressed by IP only: readings flow, a
/// switch obeys a command, and `hubsim run` pairs and runs devices.
async fn loopback_fleet_scenario() {
    let hub = TestHub::start_with(|c| {
        c.pairing.listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        // An address, not this machine's name: nothing to resolve.
        c.pairing.advertise_host = "127.0.0.1".to_owned();
        c.pairing.attempt_interval = Duration::ZERO;
    })
    .await
    .unwrap();
    assert!(hub.mqtt_addr.ip().is_loopback());

    let devices = sim::enroll_devices(&hub, 6, &Kind::ALL).await.unwrap();
    let switch = devices
        .iter()
        .find(|(_, k)| *k == Kind::Switch)
        .map(|(d, _)| d.id.clone())
        .unwrap();
    let fleet = Fleet::start(
        devices,
        hub.mqtt_addr,
        FleetConfig {
            rate: 5.0,
            ..FleetConfig::default()
        },
    );
    fleet.wait_connected(6, FLEET_WAIT).await.unwrap();

    // Readings flow: a dozen live sensor states reach the hub.
    let mut states = hub.watch("d/+/state").await.unwrap();
    let mut live = 0;
    while live < 12 {
        if !states.next().await.unwrap().retain {
            live += 1;
        }
    }

    // A switch obeys a command and acknowledges it.
    let mut acks = hub.watch(&format!("d/{switch}/ack/set")).await.unwrap();
    hub.publish(&format!("d/{switch}/cmd/set"), br#"{"on":true}"#, false)
        .await
        .unwrap();
    let ack = acks.next().await.unwrap();
    let ack: serde_json::Value = serde_json::from_slice(&ack.payload).unwrap();
    assert_eq!(ack, serde_json::json!({"ok": true, "on": true}));
    fleet
        .wait_until("the switch reports it is on", WAIT, |f| {
            f.last_states()
                .iter()
                .any(|(id, s)| *id == switch && s == r#"{"on":true}"#)
        })
        .await
        .unwrap();
    let stats = fleet.stats();
    assert_eq!(stats.failures, 0, "{stats:?}");
    fleet.stop().await;

    // `hubsim run` pairs two devices through pairing windows (the URI names
    // 127.0.0.1) and runs them, finding the MQTT address in the status.
    let dir = tempfile::tempdir().unwrap();
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_hubsim"))
        .args(["run", "--devices", "2", "--rate", "2", "--duration", "3s"])
        .arg("--socket")
        .arg(&hub.socket)
        .arg("--dir")
        .arg(dir.path())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(FLEET_WAIT, run)
        .await
        .expect("hubsim run ends after its --duration")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "hubsim run: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let value = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| panic!("no {name:?} row in {stdout}"))
    };
    assert_eq!(value("connected (peak)"), "2/2", "{stdout}");
    assert!(
        value("messages published").parse::<u64>().unwrap() > 2,
        "{stdout}"
    );
    assert_eq!(value("devices that gave up"), "0");
    // Both identities were written for the next run.
    for i in 0..2 {
        assert!(dir.path().join(i.to_string()).join("device.json").exists());
    }
    hub.stop().await.unwrap();
}
