//! Automations end to end (principle 9: the hub keeps working without the
//! internet): rules applied with hubctl, run by the hub on real device
//! traffic, refused whole when bad, stopped when they loop, never sending to
//! an isolated device, and kept across restarts. One test runs the whole
//! sensor-to-switch path in a network namespace that has nothing but
//! loopback.

use std::path::PathBuf;
use std::time::Duration;

use hub_tests::{SimDevice, TestHub, WAIT, hubctl};

/// Writes a rules file into the hub's temp dir.
fn rules_file(hub: &TestHub, name: &str, text: &str) -> PathBuf {
    let path = hub.dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

async fn apply(hub: &TestHub, name: &str, text: &str) -> String {
    let path = rules_file(hub, name, text);
    let (code, out, err) = hubctl(hub, &["rules", "apply", path.to_str().unwrap()]).await;
    assert_eq!(code, 0, "rules apply failed: {err}");
    out
}

async fn list(hub: &TestHub) -> Vec<serde_json::Value> {
    let (code, out, err) = hubctl(hub, &["rules", "list", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

async fn history(hub: &TestHub) -> Vec<serde_json::Value> {
    let (code, out, err) = hubctl(hub, &["rules", "history", "--json", "--limit", "100"]).await;
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

/// Waits (polling the hub, up to [`WAIT`]) until the history satisfies `done`.
async fn history_until(
    hub: &TestHub,
    what: &str,
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let h = history(hub).await;
        if done(&h) {
            return h;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not in the history within {WAIT:?}: {h:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next command a device receives (skipping acks), as (topic, JSON).
async fn next_command(device: &mut SimDevice) -> (String, serde_json::Value) {
    let (topic, payload) = device.next_message().await.unwrap();
    (topic, serde_json::from_slice(&payload).unwrap())
}

fn threshold_rules(sensor: &str, switch: &str) -> String {
    format!(
        r#"
# Fan on when it gets hot.
[[rule]]
name = "fan on when hot"
trigger = {{ state = "{sensor}", pointer = "/temperature", op = ">", value = 25 }}
actions = [
  {{ command = "{switch}", name = "set", payload = {{ on = true, because = "{{{{trigger.value}}}}" }} }},
  {{ log = "hot: {{{{trigger.value}}}}" }},
]

[[rule]]
name = "fan off when cool"
trigger = {{ state = "{sensor}", pointer = "/temperature", op = "<", value = 22 }}
actions = [{{ command = "{switch}", name = "set", payload = {{ on = false }} }}]
"#
    )
}

/// A sensor crossing a threshold makes the hub command a switch, which
/// acts and reports its new state.
async fn threshold_scenario(hub: &TestHub) {
    let sensor_id = hub.enroll("Kitchen sensor").await.unwrap();
    let switch_id = hub.enroll("Kitchen fan").await.unwrap();
    let sensor = SimDevice::connect(&sensor_id, hub.mqtt_addr).await.unwrap();
    let mut switch = SimDevice::connect(&switch_id, hub.mqtt_addr).await.unwrap();
    let cmd_filter = format!("d/{}/cmd/#", switch_id.id);
    switch
        .subscribe(&cmd_filter, rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut switch_state = hub
        .watch(&format!("d/{}/state", switch_id.id))
        .await
        .unwrap();

    let out = apply(
        hub,
        "rules.toml",
        &threshold_rules(&sensor_id.id, &switch_id.id),
    )
    .await;
    assert!(out.contains("+ fan on when hot  (added)"), "{out}");
    assert!(
        out.contains("applied: 2 added, 0 changed, 0 removed"),
        "{out}"
    );

    let state_topic = format!("d/{}/state", sensor_id.id);
    sensor
        .publish(&state_topic, br#"{"temperature": 21.5}"#, true)
        .await
        .unwrap();
    sensor
        .publish(&state_topic, br#"{"temperature": 26}"#, true)
        .await
        .unwrap();
    // The first state (21.5) is below 22, but it is a first state: "off"
    // fires on it (no previous state held the test). Then 26 turns it on.
    let (topic, payload) = next_command(&mut switch).await;
    assert_eq!(topic, format!("d/{}/cmd/set", switch_id.id));
    assert_eq!(payload, serde_json::json!({"on": false}));
    let (topic, payload) = next_command(&mut switch).await;
    assert_eq!(topic, format!("d/{}/cmd/set", switch_id.id));
    assert_eq!(payload, serde_json::json!({"on": true, "because": 26}));

    // The switch does what it is told and reports it.
    switch
        .publish(
            &format!("d/{}/state", switch_id.id),
            br#"{"on": true}"#,
            true,
        )
        .await
        .unwrap();
    let reported = switch_state.next().await.unwrap();
    assert_eq!(reported.payload, br#"{"on": true}"#);

    // Staying hot is not a new crossing: no second command. The sensor's
    // next crossing back down is, and it arrives after nothing else.
    sensor
        .publish(&state_topic, br#"{"temperature": 27}"#, true)
        .await
        .unwrap();
    sensor
        .publish(&state_topic, br#"{"temperature": 20}"#, true)
        .await
        .unwrap();
    let (_, payload) = next_command(&mut switch).await;
    assert_eq!(payload, serde_json::json!({"on": false}));

    let runs = history_until(hub, "three runs", |h| h.len() >= 3).await;
    assert!(runs.iter().all(|r| r["outcome"] == "ok"), "{runs:#?}");
    let hot = runs
        .iter()
        .find(|r| r["rule"] == "fan on when hot")
        .unwrap();
    assert_eq!(
        hot["actions"],
        serde_json::json!([
            format!(
                r#"command d/{}/cmd/set {{"because":26,"on":true}}"#,
                switch_id.id
            ),
            "log: hot: 26"
        ])
    );
}

#[tokio::test]
async fn a_sensor_crossing_a_threshold_commands_a_switch() {
    let hub = TestHub::start().await.unwrap();
    threshold_scenario(&hub).await;
    let status = hub.status().await.unwrap().automation.unwrap();
    assert_eq!((status.rules, status.rules_enabled, status.runs), (2, 2, 3));
    assert_eq!(status.events_dropped, 0);
}

/// The same, in a network namespace of its own with only `lo`: no DNS, no
/// route, no internet. The test re-runs itself inside `unshare -rn`.
#[test]
fn automations_run_with_the_network_reduced_to_loopback() {
    const INNER: &str = "HUB_TEST_INSIDE_NETNS";
    if std::env::var_os(INNER).is_some() {
        // Inside: prove the namespace has nothing but loopback, then run.
        let dev = std::fs::read_to_string("/proc/net/dev").unwrap();
        let interfaces: Vec<&str> = dev
            .lines()
            .skip(2)
            .filter_map(|l| l.split(':').next())
            .map(str::trim)
            .collect();
        assert_eq!(interfaces, ["lo"], "the namespace has other interfaces");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let hub = TestHub::start().await.unwrap();
            threshold_scenario(&hub).await;
        });
        return;
    }
    let unshare = ["/usr/bin/unshare", "/bin/unshare"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or_else(|| {
            panic!(
                "MISSING PROGRAM: unshare (util-linux) is needed to run hubd in a network \
                 namespace with only loopback; install util-linux (.ci/run does)"
            )
        });
    let ip = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or_else(|| {
            panic!(
                "MISSING PROGRAM: ip (iproute2) is needed to bring up loopback in the test's \
                 network namespace; install iproute2 (.ci/run does)"
            )
        });
    let me = std::env::current_exe().unwrap();
    let output = std::process::Command::new(unshare)
        .args(["--user", "--map-root-user", "--net", "--", "sh", "-c"])
        .arg(format!(
            "{ip} link set lo up && exec \"$0\" --exact \
             automations_run_with_the_network_reduced_to_loopback --nocapture --test-threads=1"
        ))
        .arg(&me)
        .env(INNER, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "inside the loopback-only namespace the scenario failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(
        stdout.contains("1 passed"),
        "the inner test did not run:\n{stdout}\n{stderr}"
    );
}

#[tokio::test]
async fn a_bad_file_is_refused_whole_and_the_stored_rules_keep_running() {
    let hub = TestHub::start().await.unwrap();
    let sensor_id = hub.enroll("Hall sensor").await.unwrap();
    let switch_id = hub.enroll("Hall light").await.unwrap();
    let sensor = SimDevice::connect(&sensor_id, hub.mqtt_addr).await.unwrap();
    let mut switch = SimDevice::connect(&switch_id, hub.mqtt_addr).await.unwrap();
    switch
        .subscribe(
            &format!("d/{}/cmd/#", switch_id.id),
            rumqttc::QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    apply(
        &hub,
        "good.toml",
        &threshold_rules(&sensor_id.id, &switch_id.id),
    )
    .await;

    // One good rule and three bad ones: nothing of it may be applied.
    let bad = format!(
        r#"[[rule]]
name = "fine"
trigger = {{ start = true }}
actions = [{{ log = "started" }}]

[[rule]]
name = "ghost"
trigger = {{ state = "no-such-device", pointer = "/t", op = ">", value = 1 }}
actions = [{{ log = "x" }}]

[[rule]]
name = "pointer"
trigger = {{ state = "{sensor}", pointer = "temperature", op = ">", value = 1 }}
actions = [{{ log = "x" }}]

[[rule]]
name = "typo"
trigger = {{ start = true }}
actoins = [{{ log = "x" }}]
"#,
        sensor = sensor_id.id
    );
    let path = rules_file(&hub, "bad.toml", &bad);
    let (code, out, err) = hubctl(&hub, &["rules", "apply", path.to_str().unwrap()]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.is_empty(), "{out}");
    let file = path.display().to_string();
    for (line, rule, what) in [
        (8, "ghost", "no-such-device"),
        (13, "pointer", "pointer"),
        (19, "typo", "actoins"),
    ] {
        let expected = format!("{file}:{line}: rule \"{rule}\": ");
        let found = err
            .lines()
            .find(|l| l.contains(&expected))
            .unwrap_or_else(|| panic!("no line with {expected:?} in:\n{err}"));
        assert!(found.contains(what), "{found}");
    }
    assert!(err.contains("nothing changed"), "{err}");

    // The stored rules are the good file's, and they still run.
    let names: Vec<String> = list(&hub)
        .await
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["fan on when hot", "fan off when cool"]);
    let topic = format!("d/{}/state", sensor_id.id);
    sensor
        .publish(&topic, br#"{"temperature": 24}"#, true)
        .await
        .unwrap();
    sensor
        .publish(&topic, br#"{"temperature": 30}"#, true)
        .await
        .unwrap();
    let (_, payload) = next_command(&mut switch).await;
    assert_eq!(payload["on"], true);
}

#[tokio::test]
async fn loop_protection_stops_a_rule_that_retriggers_itself() {
    let hub = TestHub::start().await.unwrap();
    let echo_id = hub.enroll("Echo").await.unwrap();
    let mut echo = SimDevice::connect(&echo_id, hub.mqtt_addr).await.unwrap();
    echo.subscribe(
        &format!("d/{}/cmd/#", echo_id.id),
        rumqttc::QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    // A rule that commands the device whose events trigger it. Its
    // condition on the device's own state passes validation (the command's
    // effect could stop the loop), but this device never reports a state,
    // so only loop protection can stop it.
    let rules = format!(
        r#"[[rule]]
name = "ping pong"
max_runs_per_minute = 5
trigger = {{ event = "{id}", name = "pong" }}
conditions = [{{ state = "{id}", pointer = "/done", op = "!=", value = true }}]
actions = [{{ command = "{id}", name = "ping", payload = {{ n = "{{{{trigger.value}}}}" }} }}]
"#,
        id = echo_id.id
    );
    apply(&hub, "loop.toml", &rules).await;
    let pong = format!("d/{}/event/pong", echo_id.id);
    echo.publish(&pong, b"0", false).await.unwrap();
    // The device answers every command with another event, as a device
    // that echoes would.
    for n in 1..=5 {
        let (topic, payload) = next_command(&mut echo).await;
        assert_eq!(topic, format!("d/{}/cmd/ping", echo_id.id));
        assert_eq!(payload, serde_json::json!({"n": n - 1}));
        echo.publish(&pong, n.to_string().as_bytes(), false)
            .await
            .unwrap();
    }
    // The sixth run is refused: the loop is broken, the history says why.
    let h = history_until(&hub, "a refused run", |h| {
        h.iter().any(|r| {
            r["outcome"]
                .as_str()
                .is_some_and(|o| o.starts_with("refused: ran 5 times in the last minute"))
        })
    })
    .await;
    assert_eq!(
        h.iter().filter(|r| r["outcome"] == "ok").count(),
        5,
        "{h:#?}"
    );
    let status = hub.status().await.unwrap().automation.unwrap();
    assert_eq!((status.runs, status.refused), (5, 1));
    // Nothing more was sent after the refusal: the last message the device
    // got was the fifth command, and the refused run sent nothing.
    assert!(h[0]["actions"].as_array().unwrap().is_empty(), "{h:#?}");
}

#[tokio::test]
async fn commands_to_an_isolated_device_are_not_sent_and_are_logged() {
    let hub = TestHub::start().await.unwrap();
    let button_id = hub.enroll("Button").await.unwrap();
    let lamp_id = hub.enroll("Old lamp").await.unwrap();
    let button = SimDevice::connect(&button_id, hub.mqtt_addr).await.unwrap();
    let rules = format!(
        r#"[[rule]]
name = "press"
trigger = {{ event = "{b}", name = "press" }}
actions = [{{ command = "{l}", name = "toggle" }}, {{ set_var = "pressed", value = true }}]
"#,
        b = button_id.id,
        l = lamp_id.id
    );
    apply(&hub, "press.toml", &rules).await;
    let (code, _, err) = hubctl(&hub, &["isolate", &lamp_id.id, "--reason", "no updates"]).await;
    assert_eq!(code, 0, "{err}");
    // The lamp reconnects with the isolated profile and listens for commands.
    let mut lamp = SimDevice::connect(&lamp_id, hub.mqtt_addr).await.unwrap();
    lamp.subscribe(
        &format!("$hub/isolation/{}", lamp_id.id),
        rumqttc::QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    let (topic, _) = lamp.next_message().await.unwrap();
    assert_eq!(topic, format!("$hub/isolation/{}", lamp_id.id));

    button
        .publish(&format!("d/{}/event/press", button_id.id), b"{}", false)
        .await
        .unwrap();
    let h = history_until(&hub, "the press", |h| {
        h.first().is_some_and(|r| r["outcome"] != "running")
    })
    .await;
    let run = &h[0];
    assert_eq!(
        run["outcome"],
        format!("failed: not sent: {} is isolated", lamp_id.id)
    );
    // The other action still ran.
    assert_eq!(
        run["actions"],
        serde_json::json!([
            format!(
                "command d/{}/cmd/toggle {{}} (not sent: {} is isolated)",
                lamp_id.id, lamp_id.id
            ),
            "set pressed = true"
        ])
    );
    // An isolated device may not even subscribe to its commands.
    let codes = lamp
        .subscribe(
            &format!("d/{}/cmd/#", lamp_id.id),
            rumqttc::QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    assert_eq!(codes, [0x80]);
}

#[tokio::test]
async fn hubctl_manages_rules_diff_enable_disable_remove_test_and_history() {
    let hub = TestHub::start().await.unwrap();
    let sensor = hub.enroll("Porch sensor").await.unwrap();
    let lamp = hub.enroll("Porch lamp").await.unwrap();
    let v1 = format!(
        r#"[[rule]]
name = "dusk"
trigger = {{ state = "{s}", pointer = "/lux", op = "<", value = 10 }}
conditions = [{{ var = "mode", op = "!=", value = "away" }}]
actions = [{{ command = "{l}", name = "set", payload = {{ on = true }} }}]

[[rule]]
name = "away"
trigger = {{ event = "{s}", name = "away" }}
actions = [{{ set_var = "mode", value = "away" }}]

[[rule]]
name = "gone soon"
trigger = {{ every = "1h" }}
actions = [{{ log = "tick" }}]
"#,
        s = sensor.id,
        l = lamp.id
    );
    apply(&hub, "v1.toml", &v1).await;
    // The same file again changes nothing.
    let out = apply(&hub, "v1.toml", &v1).await;
    assert_eq!(out, "no changes (3 rules, all as stored)\n");

    let v2 = v1
        .replace("value = 10", "value = 15")
        .replace(
            "[[rule]]\nname = \"gone soon\"\ntrigger = { every = \"1h\" }\nactions = [{ log = \"tick\" }]\n",
            "[[rule]]\nname = \"new\"\ntrigger = { online = \"LAMP\" }\nactions = [{ log = \"lamp back\" }]\n",
        )
        .replace("LAMP", &lamp.id);
    let out = apply(&hub, "v2.toml", &v2).await;
    assert_eq!(
        out,
        format!(
            "+ new  (added)\n\
             ~ dusk  (changed)\n    \
             - trigger = {{ state = \"{s}\", pointer = \"/lux\", op = \"<\", value = 10 }}\n    \
             + trigger = {{ state = \"{s}\", pointer = \"/lux\", op = \"<\", value = 15 }}\n\
             - gone soon  (removed)\n\
             applied: 1 added, 1 changed, 1 removed, 1 unchanged\n",
            s = sensor.id
        )
    );

    // Disable, show, enable.
    let (code, out, _) = hubctl(&hub, &["rules", "disable", "dusk"]).await;
    assert_eq!((code, out.as_str()), (0, "dusk: disabled\n"));
    let (code, out, _) = hubctl(&hub, &["rules", "disable", "dusk"]).await;
    assert_eq!((code, out.as_str()), (0, "dusk: already disabled\n"));
    let (code, out, _) = hubctl(&hub, &["rules", "show", "dusk"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("enabled:     no\n"), "{out}");
    assert!(out.contains("enabled = false"), "{out}");
    assert!(
        out.contains(&format!("trigger:     state of {} /lux < 15", sensor.id)),
        "{out}"
    );
    let (code, out, _) = hubctl(&hub, &["rules", "list"]).await;
    assert_eq!(code, 0);
    assert!(out.starts_with("NAME "), "{out}");
    assert!(out.contains("dusk "), "{out}");

    // A dry run: what the rules in a file would do, nothing sent.
    let path = rules_file(&hub, "v2.toml", &v2);
    let lux = format!("d/{}/state={{\"lux\": 3}}", sensor.id);
    let away = format!("d/{}/event/away", sensor.id);
    let lux_again = format!("d/{}/state={{\"lux\": 50}}", sensor.id);
    let (code, out, err) = hubctl(
        &hub,
        &[
            "rules",
            "test",
            path.to_str().unwrap(),
            "--event",
            &lux,
            "--event",
            &away,
            "--event",
            &lux_again,
            "--event",
            &lux,
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        format!(
            "event d/{s}/state {{\"lux\":3}}\n  \
             rule \"dusk\" fires\n    \
             command d/{l}/cmd/set {{\"on\":true}}\n\
             event d/{s}/event/away {{}}\n  \
             rule \"away\" fires\n    \
             set mode = \"away\"\n\
             event d/{s}/state {{\"lux\":50}}\n  \
             no rule is triggered\n\
             event d/{s}/state {{\"lux\":3}}\n  \
             rule \"dusk\" does not run: condition 1 does not hold\n",
            s = sensor.id,
            l = lamp.id
        )
    );
    // Nothing ran for real.
    assert!(history(&hub).await.is_empty());
    let (code, _, err) = hubctl(
        &hub,
        &[
            "rules",
            "test",
            path.to_str().unwrap(),
            "--event",
            "d/x/cmd/set={}",
        ],
    )
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("event \"d/x/cmd/set={}\": "), "{err}");

    // Removing a rule that another depends on is refused, naming why.
    let (code, _, err) = hubctl(&hub, &["rules", "remove", "away"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("\"mode\" is never set"), "{err}");
    let (code, _, err) = hubctl(&hub, &["rules", "remove", "nope"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("no rule named \"nope\""), "{err}");
    let (code, out, err) = hubctl(&hub, &["rules", "remove", "dusk", "away"]).await;
    assert_eq!(
        (code, out.as_str()),
        (0, "removed dusk\nremoved away\n"),
        "{err}"
    );
    let left: Vec<String> = list(&hub)
        .await
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(left, ["new"]);

    // A device coming online runs the remaining rule; history shows it.
    let _online = SimDevice::connect(&lamp, hub.mqtt_addr).await.unwrap();
    let h = history_until(&hub, "the online rule", |h| !h.is_empty()).await;
    assert_eq!(h[0]["rule"], "new");
    assert_eq!(h[0]["trigger"], format!("{} online", lamp.id));
    assert_eq!(h[0]["actions"], serde_json::json!(["log: lamp back"]));
    let (code, out, _) = hubctl(&hub, &["rules", "history"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("  new  ok  (on "), "{out}");
}

#[tokio::test]
async fn rules_and_their_enabled_state_survive_a_restart() {
    let hub = TestHub::start().await.unwrap();
    let sensor_id = hub.enroll("Sensor").await.unwrap();
    let switch_id = hub.enroll("Switch").await.unwrap();
    let mut rules = threshold_rules(&sensor_id.id, &switch_id.id);
    rules.push_str(
        r#"
[[rule]]
name = "remember"
trigger = { event = "SENSOR", name = "mode" }
actions = [{ set_var = "mode", value = "{{trigger.value}}" }]
[[rule]]
name = "use"
trigger = { event = "SENSOR", name = "check" }
conditions = [{ var = "mode", op = "==", value = "night" }]
actions = [{ command = "SWITCH", name = "night" }]
"#
        .replace("SENSOR", &sensor_id.id)
        .replace("SWITCH", &switch_id.id)
        .as_str(),
    );
    apply(&hub, "rules.toml", &rules).await;
    let (code, _, _) = hubctl(&hub, &["rules", "disable", "fan off when cool"]).await;
    assert_eq!(code, 0);
    // A hub variable set by a rule survives too.
    {
        let sensor = SimDevice::connect(&sensor_id, hub.mqtt_addr).await.unwrap();
        sensor
            .publish(
                &format!("d/{}/event/mode", sensor_id.id),
                br#""night""#,
                false,
            )
            .await
            .unwrap();
        history_until(&hub, "remember", |h| {
            h.iter().any(|r| r["rule"] == "remember")
        })
        .await;
    }
    let before = list(&hub).await;

    let hub = hub.restart().await.unwrap();
    let after = list(&hub).await;
    let summary = |rules: &[serde_json::Value]| -> Vec<(String, bool, String)> {
        rules
            .iter()
            .map(|r| {
                (
                    r["name"].as_str().unwrap().to_owned(),
                    r["enabled"].as_bool().unwrap(),
                    r["source"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    assert_eq!(summary(&after), summary(&before));
    assert!(!after[1]["enabled"].as_bool().unwrap());

    // After the restart the variable still holds: the "use" rule fires.
    let sensor = SimDevice::connect(&sensor_id, hub.mqtt_addr).await.unwrap();
    let mut switch = SimDevice::connect(&switch_id, hub.mqtt_addr).await.unwrap();
    switch
        .subscribe(
            &format!("d/{}/cmd/#", switch_id.id),
            rumqttc::QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    sensor
        .publish(&format!("d/{}/event/check", sensor_id.id), b"{}", false)
        .await
        .unwrap();
    let (topic, _) = next_command(&mut switch).await;
    assert_eq!(topic, format!("d/{}/cmd/night", switch_id.id));
}
