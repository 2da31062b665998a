//! The `hubd` binary as systemd runs it: readiness on NOTIFY_SOCKET only after
//! the listeners are bound, SIGTERM handled within 5 s with exit 0, state kept
//! across restarts, and refusal to start with a key readable by others.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hub_proto::v1 as pb;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const WAIT: Duration = Duration::from_secs(20);

struct Hubd {
    child: Child,
    notify: UnixDatagram,
    mqtt: String,
    socket: PathBuf,
}

/// Starts the binary with a scrubbed environment and a NOTIFY_SOCKET of our own.
fn spawn(dir: &Path, tag: &str) -> (Child, UnixDatagram, PathBuf) {
    spawn_with_env(dir, tag, &[])
}

fn spawn_with_env(dir: &Path, tag: &str, extra: &[(&str, &str)]) -> (Child, UnixDatagram, PathBuf) {
    let notify_path = dir.join(format!("notify-{tag}.sock"));
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(WAIT)).unwrap();
    let socket = dir.join("run").join("hubd.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_hubd"))
        .args(["--listen", "127.0.0.1:0", "--state-dir"])
        .arg(dir.join("state"))
        .arg("--socket")
        .arg(&socket)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", dir)
        .env("NOTIFY_SOCKET", &notify_path)
        .envs(extra.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (child, notify, socket)
}

/// Reads notifications until READY=1; returns the MQTT address from STATUS.
fn wait_ready(notify: &UnixDatagram) -> String {
    let mut mqtt = None;
    let mut buf = [0u8; 4096];
    loop {
        let n = notify.recv(&mut buf).expect("READY=1 within the timeout");
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        for line in msg.lines() {
            if let Some(status) = line.strip_prefix("STATUS=serving mqtt on ") {
                mqtt = status.split(',').next().map(str::to_owned);
            }
        }
        if msg.lines().any(|l| l == "READY=1") {
            return mqtt.expect("a STATUS line naming the MQTT address comes with READY=1");
        }
    }
}

fn start(dir: &Path, tag: &str) -> Hubd {
    let (child, notify, socket) = spawn(dir, tag);
    let mqtt = wait_ready(&notify);
    Hubd {
        child,
        notify,
        mqtt,
        socket,
    }
}

/// SIGTERM, then the exit status, how long it took and what was notified.
fn terminate(mut hubd: Hubd) -> (std::process::ExitStatus, Duration, Vec<String>) {
    let started = Instant::now();
    kill(Pid::from_raw(hubd.child.id() as i32), Signal::SIGTERM).unwrap();
    let status = loop {
        if let Some(status) = hubd.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "hubd ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    hubd.notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = hubd.notify.recv(&mut buf) {
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    (status, started.elapsed(), seen)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn ready_after_bind_sigterm_exits_zero_and_state_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let hubd = start(dir.path(), "1");
    // READY=1 has arrived: both listeners must already accept.
    std::net::TcpStream::connect(&hubd.mqtt).expect("mqtt listener bound before READY=1");
    let rt = rt();
    let id = rt.block_on(async {
        let mut admin = hub_proto::admin_client(&hubd.socket).await.unwrap();
        let status = admin
            .status(pb::StatusRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(status.mqtt_listen, hubd.mqtt);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let resp = admin
            .enroll_device(pb::EnrollDeviceRequest {
                name: "Kitchen sensor".into(),
                csr_pem: csr,
            })
            .await
            .unwrap()
            .into_inner();
        resp.device.unwrap().id
    });

    let (status, took, seen) = terminate(hubd);
    assert!(status.success(), "exit status {status:?}");
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    assert!(seen.iter().any(|m| m.contains("STOPPING=1")), "{seen:?}");

    let hubd = start(dir.path(), "2");
    rt.block_on(async {
        let mut admin = hub_proto::admin_client(&hubd.socket).await.unwrap();
        let device = admin
            .get_device(pb::GetDeviceRequest { id: id.clone() })
            .await
            .expect("the device enrolled before shutdown is still known")
            .into_inner();
        assert_eq!(device.name, "Kitchen sensor");
    });
    let (status, _, _) = terminate(hubd);
    assert!(status.success());
}

#[test]
fn a_key_readable_by_others_stops_hubd_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (status, ..) = terminate(start(dir.path(), "1"));
    assert!(status.success());
    let key = dir.path().join("state").join("ca").join("ca.key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();

    let (child, _notify, _) = spawn(dir.path(), "2");
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "hubd started with a 0644 key");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&key.display().to_string()),
        "stderr does not name the key: {stderr}"
    );
}

#[test]
fn two_fresh_state_dirs_have_different_cas() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let fingerprint = |dir: &Path| {
        let hubd = start(dir, "1");
        let fp = rt().block_on(async {
            let mut admin = hub_proto::admin_client(&hubd.socket).await.unwrap();
            admin
                .status(pb::StatusRequest {})
                .await
                .unwrap()
                .into_inner()
                .ca_fingerprint
        });
        terminate(hubd);
        fp
    };
    let (fa, fb) = (fingerprint(a.path()), fingerprint(b.path()));
    assert_eq!(fa.len(), 64);
    assert_ne!(fa, fb);
    let key = |dir: &Path| std::fs::read(dir.join("state/ca/ca.key")).unwrap();
    assert_ne!(key(a.path()), key(b.path()));
    for dir in [a.path(), b.path()] {
        for name in ["ca.key", "server.key"] {
            let mode = std::fs::metadata(dir.join("state/ca").join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
        let mode = std::fs::metadata(dir.join("state"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "state dir");
    }
}

#[test]
fn config_flags() {
    let dir = tempfile::tempdir().unwrap();
    let hubd = env!("CARGO_BIN_EXE_hubd");
    let out = Command::new(hubd)
        .arg("--print-default-config")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        hubd::Config::DEFAULT_TOML
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[edge]\nlisten = \"nowhere\"\n").unwrap();
    let out = Command::new(hubd)
        .arg("--check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("listen") && stderr.contains("nowhere"),
        "{stderr}"
    );

    let good = dir.path().join("good.toml");
    std::fs::write(&good, hubd::Config::DEFAULT_TOML).unwrap();
    let out = Command::new(hubd)
        .arg("--check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_watchdog_is_fed_when_systemd_asks() {
    let dir = tempfile::tempdir().unwrap();
    // 400 ms: hubd must send WATCHDOG=1 at half that.
    let (child, notify, socket) = spawn_with_env(dir.path(), "1", &[("WATCHDOG_USEC", "400000")]);
    let mqtt = wait_ready(&notify);
    let mut buf = [0u8; 4096];
    let mut pings = 0;
    while pings < 3 {
        let n = notify.recv(&mut buf).expect("WATCHDOG=1 keeps coming");
        if String::from_utf8_lossy(&buf[..n])
            .lines()
            .any(|l| l == "WATCHDOG=1")
        {
            pings += 1;
        }
    }
    let (status, ..) = terminate(Hubd {
        child,
        notify,
        mqtt,
        socket,
    });
    assert!(status.success());
}

#[test]
fn relative_paths_on_the_command_line_are_taken_from_the_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(WAIT)).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_hubd"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            "state",
            "--socket",
            "run/hubd.sock",
        ])
        .current_dir(dir.path())
        .env_clear()
        .env("HOME", dir.path())
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mqtt = wait_ready(&notify);
    assert!(dir.path().join("state/ca/ca.pem").is_file());
    let socket = dir.path().join("run/hubd.sock");
    assert!(socket.exists());
    let (status, ..) = terminate(Hubd {
        child,
        notify,
        mqtt,
        socket,
    });
    assert!(status.success());
}

/// What a client was told succeeded before the crash.
#[derive(Default)]
struct Acknowledged {
    enrolled: Vec<String>,
    isolated: Vec<String>,
}

fn csr() -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap()
}

/// Enrols and isolates devices as fast as hubd answers, recording every
/// acknowledged change, until the connection breaks (the crash).
async fn stream_changes(socket: PathBuf, acked: std::sync::Arc<std::sync::Mutex<Acknowledged>>) {
    let Ok(mut admin) = hub_proto::admin_client(&socket).await else {
        return;
    };
    for n in 0u32.. {
        let enrolled = admin
            .enroll_device(pb::EnrollDeviceRequest {
                name: format!("device {n}"),
                csr_pem: csr(),
            })
            .await;
        let Ok(enrolled) = enrolled else { return };
        let id = enrolled.into_inner().device.unwrap().id;
        acked.lock().unwrap().enrolled.push(id.clone());
        if n % 2 == 0 {
            let isolated = admin
                .isolate_device(pb::IsolateDeviceRequest {
                    id: id.clone(),
                    reason: format!("crash test {n}"),
                })
                .await;
            if isolated.is_err() {
                return;
            }
            acked.lock().unwrap().isolated.push(id);
        }
    }
}

#[test]
fn kill_9_during_writes_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    // A worker thread keeps the writes going while this thread picks the
    // moment to kill.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Acknowledged::default()));
    // Crash points spread over the first few hundred milliseconds of writes.
    let delays_ms = [40u64, 170, 90, 260, 15, 130, 210, 60, 300, 110];
    for cycle in 0..20 {
        let hubd = start(dir.path(), &format!("c{cycle}"));
        // Everything acknowledged in earlier cycles is there, and the store
        // opened clean (hubd got to READY=1).
        rt.block_on(async {
            let mut admin = hub_proto::admin_client(&hubd.socket).await.unwrap();
            let devices = admin
                .list_devices(pb::ListDevicesRequest {})
                .await
                .unwrap()
                .into_inner()
                .devices;
            let acked = acked.lock().unwrap();
            for id in &acked.enrolled {
                let d = devices
                    .iter()
                    .find(|d| &d.id == id)
                    .unwrap_or_else(|| panic!("cycle {cycle}: acknowledged enrolment {id} lost"));
                if acked.isolated.contains(id) {
                    assert_eq!(
                        d.state,
                        pb::DeviceState::Isolated as i32,
                        "cycle {cycle}: acknowledged isolation of {id} lost"
                    );
                }
            }
        });
        let writer = rt.spawn(stream_changes(hubd.socket.clone(), acked.clone()));
        std::thread::sleep(Duration::from_millis(delays_ms[cycle % delays_ms.len()]));
        let mut child = hubd.child;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        rt.block_on(writer).unwrap();
    }
    let acked = acked.lock().unwrap();
    assert!(
        acked.enrolled.len() > 20,
        "too few writes to mean anything: {}",
        acked.enrolled.len()
    );
}

#[test]
fn a_fresh_user_without_a_runtime_dir_gets_a_private_state_dir_and_a_working_socket() {
    // What `cargo run --release --bin hubd` meets on a machine with no
    // XDG_RUNTIME_DIR (ssh without a login session, containers): no flags at
    // all but a free port.
    let home = tempfile::tempdir().unwrap();
    let notify_path = home.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(WAIT)).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_hubd"))
        .args(["--listen", "127.0.0.1:0"])
        .env_clear()
        .env("HOME", home.path())
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mqtt = wait_ready(&notify);
    let state = home.path().join(".local/share/hubd");
    let mode = std::fs::metadata(&state).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    let socket = state.join("hubd.sock");
    rt().block_on(async {
        let mut admin = hub_proto::admin_client(&socket).await.unwrap();
        admin.status(pb::StatusRequest {}).await.unwrap();
    });
    let (status, ..) = terminate(Hubd {
        child,
        notify,
        mqtt,
        socket,
    });
    assert!(status.success());
}

/// Rules for the crash test: no devices needed, one variable shared.
const CRASH_RULES: &str = r#"
[[rule]]
name = "set mode"
trigger = { start = true }
actions = [{ set_var = "mode", value = "home" }]
[[rule]]
name = "morning"
trigger = { at = "07:30", days = ["mon-fri"] }
conditions = [{ var = "mode", op = "==", value = "home" }]
actions = [{ log = "morning" }]
[[rule]]
name = "hourly"
trigger = { every = "1h" }
actions = [{ log = "tick" }]
[[rule]]
name = "weekend"
enabled = false
trigger = { cron = "0 0 9 * * sat,sun" }
actions = [{ log = "weekend" }]
"#;

/// What the crash test was told: each rule's enabled state, and a change
/// in flight when hubd died (it may or may not have been committed).
#[derive(Default)]
struct RuleStates {
    enabled: std::collections::BTreeMap<String, bool>,
    in_flight: Option<(String, bool)>,
    /// Acknowledged changes in all.
    acked: usize,
}

async fn rules_enabled(socket: &Path) -> std::collections::BTreeMap<String, bool> {
    let mut admin = hub_proto::admin_client(socket).await.unwrap();
    let rules = admin
        .list_rules(pb::ListRulesRequest {})
        .await
        .unwrap()
        .into_inner()
        .rules;
    rules.into_iter().map(|r| (r.name, r.enabled)).collect()
}

/// Flips rules on and off as fast as hubd answers, recording each change
/// hubd acknowledged, until the connection breaks (the crash).
async fn toggle_rules(socket: PathBuf, states: std::sync::Arc<std::sync::Mutex<RuleStates>>) {
    let Ok(mut admin) = hub_proto::admin_client(&socket).await else {
        return;
    };
    let names: Vec<String> = states.lock().unwrap().enabled.keys().cloned().collect();
    for n in 0usize.. {
        let name = names[n % names.len()].clone();
        let enabled = !states.lock().unwrap().enabled[&name];
        states.lock().unwrap().in_flight = Some((name.clone(), enabled));
        let answer = admin
            .set_rules_enabled(pb::SetRulesEnabledRequest {
                names: vec![name.clone()],
                enabled,
            })
            .await;
        if answer.is_err() {
            return;
        }
        let mut s = states.lock().unwrap();
        s.enabled.insert(name, enabled);
        s.in_flight = None;
        s.acked += 1;
    }
}

#[test]
fn rules_and_their_enabled_state_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let states = std::sync::Arc::new(std::sync::Mutex::new(RuleStates::default()));
    {
        let hubd = start(dir.path(), "r0");
        rt.block_on(async {
            let mut admin = hub_proto::admin_client(&hubd.socket).await.unwrap();
            admin
                .apply_rules(pb::ApplyRulesRequest {
                    text: CRASH_RULES.to_owned(),
                    file: "crash.toml".to_owned(),
                })
                .await
                .unwrap();
            states.lock().unwrap().enabled = rules_enabled(&hubd.socket).await;
        });
        let mut child = hubd.child;
        child.kill().unwrap(); // SIGKILL straight after the acknowledgement
        child.wait().unwrap();
    }
    assert_eq!(states.lock().unwrap().enabled.len(), 4);
    let delays_ms = [60u64, 15, 140, 35, 90, 200];
    for cycle in 0..6 {
        let hubd = start(dir.path(), &format!("r{}", cycle + 1));
        let stored = rt.block_on(rules_enabled(&hubd.socket));
        {
            let mut s = states.lock().unwrap();
            let names: Vec<&String> = stored.keys().collect();
            let expected: Vec<&String> = s.enabled.keys().collect();
            assert_eq!(names, expected, "cycle {cycle}: the rule set changed");
            for (name, enabled) in &stored {
                let acked = s.enabled[name];
                let maybe = s.in_flight.as_ref() == Some(&(name.clone(), *enabled));
                assert!(
                    *enabled == acked || maybe,
                    "cycle {cycle}: rule {name:?} is {enabled}, acknowledged {acked}"
                );
            }
            // What is stored is the truth from here on.
            s.enabled = stored;
            s.in_flight = None;
        }
        let writer = rt.spawn(toggle_rules(hubd.socket.clone(), states.clone()));
        std::thread::sleep(Duration::from_millis(delays_ms[cycle % delays_ms.len()]));
        let mut child = hubd.child;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        rt.block_on(writer).unwrap();
    }
    let acked = states.lock().unwrap().acked;
    assert!(acked > 10, "too few changes to mean anything: {acked}");
}

/// What a hub looks like from outside: its CA and its devices.
fn identity(socket: &Path) -> (String, usize) {
    rt().block_on(async {
        let mut admin = hub_proto::admin_client(socket).await.unwrap();
        let status = admin
            .status(pb::StatusRequest {})
            .await
            .unwrap()
            .into_inner();
        (status.ca_fingerprint, status.devices_known as usize)
    })
}

fn enroll_some(socket: &Path, n: usize) {
    rt().block_on(async {
        let mut admin = hub_proto::admin_client(socket).await.unwrap();
        for i in 0..n {
            admin
                .enroll_device(pb::EnrollDeviceRequest {
                    name: format!("device {i}"),
                    csr_pem: csr(),
                })
                .await
                .unwrap();
        }
    });
}

#[test]
fn a_start_that_finds_an_unfinished_wipe_finishes_it() {
    let dir = tempfile::tempdir().unwrap();
    let hubd = start(dir.path(), "w0");
    enroll_some(&hubd.socket, 3);
    let (old_ca, devices) = identity(&hubd.socket);
    assert_eq!(devices, 3);
    let (status, _, _) = terminate(hubd);
    assert!(status.success());
    // The state a crash leaves right after the marker was written, and a
    // part of the erase done (the data key already gone).
    let state = dir.path().join("state");
    std::fs::write(
        state.join("WIPE"),
        format!(r#"{{"started_at":"2026-11-22T10:00:00Z","old_ca_fingerprint":"{old_ca}"}}"#),
    )
    .unwrap();
    std::fs::remove_file(state.join("keys/data.key")).unwrap();
    let hubd = start(dir.path(), "w1");
    let (new_ca, devices) = identity(&hubd.socket);
    assert_ne!(new_ca, old_ca);
    assert_eq!(devices, 0);
    assert!(!state.join("WIPE").exists());
    let (status, _, _) = terminate(hubd);
    assert!(status.success());
    // And it stays finished.
    let hubd = start(dir.path(), "w2");
    assert_eq!(identity(&hubd.socket), (new_ca, 0));
    terminate(hubd);
}

#[test]
fn kill_9_during_a_wipe_leaves_the_old_hub_or_a_new_one_never_a_mix() {
    let dir = tempfile::tempdir().unwrap();
    let delays_ms = [0u64, 3, 8, 15, 30, 60];
    let (mut finished, mut untouched) = (0, 0);
    for (cycle, delay) in delays_ms.iter().enumerate() {
        let hubd = start(dir.path(), &format!("k{cycle}"));
        let (before_ca, before) = identity(&hubd.socket);
        if before == 0 {
            enroll_some(&hubd.socket, 2);
        }
        let (old_ca, devices) = identity(&hubd.socket);
        assert_eq!(old_ca, before_ca);
        assert_eq!(devices, 2);
        let socket = hubd.socket.clone();
        let wiper = std::thread::spawn(move || {
            rt().block_on(async {
                let mut admin = hub_proto::admin_client(&socket).await.unwrap();
                let _ = admin
                    .wipe(pb::WipeRequest {
                        confirm_name: "hub".into(),
                        reset_timeout_seconds: 1,
                    })
                    .await;
            })
        });
        std::thread::sleep(Duration::from_millis(*delay));
        let mut child = hubd.child;
        child.kill().unwrap(); // SIGKILL, somewhere in the wipe
        child.wait().unwrap();
        wiper.join().unwrap();
        let hubd = start(dir.path(), &format!("k{cycle}b"));
        let (ca, devices) = identity(&hubd.socket);
        if ca == old_ca {
            assert_eq!(devices, 2, "cycle {cycle}: old CA but devices lost");
            untouched += 1;
        } else {
            assert_eq!(devices, 0, "cycle {cycle}: new CA with old devices");
            finished += 1;
        }
        assert!(!dir.path().join("state/WIPE").exists());
        let (status, _, _) = terminate(hubd);
        assert!(status.success());
    }
    // Both outcomes are fine; the test is that nothing else happens.
    eprintln!("kill -9 during a wipe: {finished} finished on restart, {untouched} untouched");
    assert_eq!(finished + untouched, delays_ms.len());
}
