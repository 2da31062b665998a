//! Real clients: Mosquitto's `mosquitto_pub` and `mosquitto_sub` (package
//! mosquitto-clients, which .ci/run installs) with a device certificate.
//! This test fails loudly when they are missing rather than skipping.

use std::path::Path;
use std::process::Output;

use hub_tests::{DeviceIdentity, TestHub};

fn require(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "\n\n!!! {tool} is not installed: `apt-get install -y mosquitto-clients` (.ci/run does this) !!!\n\n"
    );
}

async fn mosquitto(
    tool: &str,
    dir: &Path,
    dev: &DeviceIdentity,
    port: u16,
    args: &[&str],
) -> Output {
    let (key, cert, ca) = dev.write_to(dir).unwrap();
    let mut cmd = tokio::process::Command::new(tool);
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-i", &dev.id])
        .arg("--cafile")
        .arg(ca)
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .args(args)
        .kill_on_drop(true);
    tokio::time::timeout(hub_tests::WAIT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{tool} {args:?} did not finish"))
        .unwrap()
}

#[tokio::test]
async fn mosquitto_clients_connect_publish_and_are_refused_elsewhere() {
    require("mosquitto_pub");
    require("mosquitto_sub");
    let hub = TestHub::start().await.unwrap();
    let a = hub.enroll("a").await.unwrap();
    let b = hub.enroll("b").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = hub.mqtt_addr.port();
    let state = format!("d/{}/state", a.id);
    let mut watch = hub.watch("d/+/state").await.unwrap();

    // Its own state topic, MQTT 3.1.1 and 5, QoS 1: accepted and routed.
    for version in ["mqttv311", "mqttv5"] {
        let out = mosquitto(
            "mosquitto_pub",
            dir.path(),
            &a,
            port,
            &["-V", version, "-q", "1", "-t", &state, "-m", version],
        )
        .await;
        assert!(
            out.status.success(),
            "{version}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let m = watch.next().await.unwrap();
        assert_eq!(
            (m.topic.as_str(), m.payload.as_slice()),
            (state.as_str(), version.as_bytes())
        );
    }

    // Another device's state topic, MQTT 5 QoS 1: the PUBACK says not authorised.
    let foreign = format!("d/{}/state", b.id);
    let out = mosquitto(
        "mosquitto_pub",
        dir.path(),
        &a,
        port,
        &["-V", "mqttv5", "-q", "1", "-t", &foreign, "-m", "spoof"],
    )
    .await;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.to_lowercase().contains("not authori"),
        "mosquitto_pub said: {said}"
    );

    // Subscribing to another device's topics is refused.
    let out = mosquitto(
        "mosquitto_sub",
        dir.path(),
        &a,
        port,
        &[
            "-V",
            "mqttv5",
            "-t",
            &format!("d/{}/#", b.id),
            "-C",
            "1",
            "-W",
            "5",
        ],
    )
    .await;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.to_lowercase().contains("denied"),
        "mosquitto_sub said: {said}"
    );

    // The spoofed message never reached anyone: the next state seen is A's own.
    let out = mosquitto(
        "mosquitto_pub",
        dir.path(),
        &a,
        port,
        &["-t", &state, "-m", "last"],
    )
    .await;
    assert!(out.status.success());
    assert_eq!(watch.next().await.unwrap().payload, b"last");

    // A client id that is not the certificate's is refused.
    let mut wrong = a.clone();
    wrong.id = b.id.clone();
    wrong.key_pem = a.key_pem.clone();
    let out = mosquitto(
        "mosquitto_pub",
        dir.path(),
        &wrong,
        port,
        &["-t", &state, "-m", "x"],
    )
    .await;
    assert!(!out.status.success());
}

#[tokio::test]
async fn a_csr_made_by_openssl_as_the_readme_shows_enrols_and_connects() {
    require("openssl");
    let hub = TestHub::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key.pem");
    let csr = dir.path().join("req.csr");
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        key.to_str().unwrap(),
    ]);
    run(&[
        "req",
        "-new",
        "-key",
        key.to_str().unwrap(),
        "-subj",
        "/CN=device",
        "-out",
        csr.to_str().unwrap(),
    ]);
    let resp = hub
        .admin()
        .await
        .unwrap()
        .enroll_device(hub_proto::v1::EnrollDeviceRequest {
            name: "openssl device".into(),
            csr_pem: std::fs::read_to_string(&csr).unwrap(),
        })
        .await
        .unwrap()
        .into_inner();
    let dev = DeviceIdentity {
        id: resp.device.unwrap().id,
        key_pem: std::fs::read_to_string(&key).unwrap(),
        cert_pem: resp.cert_pem,
        ca_pem: resp.ca_chain_pem,
    };
    // openssl's "EC PRIVATE KEY" (SEC1) form works with rustls too.
    hub_tests::SimDevice::connect(&dev, hub.mqtt_addr)
        .await
        .unwrap();
}
