//! The admin API and hubctl against a real hub: peer-credential checks on the
//! Unix socket (principle 6), request validation (principle 13), and the
//! householder's commands.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;

use hub_proto::v1 as pb;
use hub_tests::{SimDevice, TestHub, hubctl, key_and_csr};
use tonic::Code;

#[tokio::test]
async fn hubctl_status_list_show_revoke() {
    let hub = TestHub::start().await.unwrap();
    let a = hub.enroll("Kitchen sensor").await.unwrap();
    let b = hub.enroll("Hall light").await.unwrap();
    let _online = SimDevice::connect(&a, hub.mqtt_addr).await.unwrap();

    let (code, out, err) = hubctl(&hub, &["status"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&hub.status().await.unwrap().ca_fingerprint),
        "{out}"
    );

    let (code, out, _) = hubctl(&hub, &["status", "--json"]).await;
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["devices_known"], 2);
    assert_eq!(json["devices_connected"], 1);

    let (code, out, _) = hubctl(&hub, &["devices", "list"]).await;
    assert_eq!(code, 0);
    // Sorted by name: Hall light before Kitchen sensor.
    let hall = out.find("Hall light").unwrap();
    let kitchen = out.find("Kitchen sensor").unwrap();
    assert!(hall < kitchen, "{out}");

    let (code, out, _) = hubctl(&hub, &["devices", "list", "--json"]).await;
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let devices = json["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2);
    let online = devices.iter().find(|d| d["id"] == a.id.as_str()).unwrap();
    assert_eq!(online["connected"], true);

    let (code, out, _) = hubctl(&hub, &["devices", "show", &b.id]).await;
    assert_eq!(code, 0);
    assert!(out.contains("Hall light") && out.contains(&b.id), "{out}");

    let (code, _, err) = hubctl(&hub, &["devices", "show", "nosuchdevice"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("no such device"), "{err}");

    let (code, _, err) = hubctl(&hub, &["devices", "revoke", &b.id]).await;
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = hubctl(&hub, &["devices", "show", &b.id, "--json"]).await;
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["state"], "revoked");
}

#[tokio::test]
async fn hubctl_enroll_writes_the_files_a_device_needs() {
    let hub = TestHub::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_key, csr) = key_and_csr().unwrap();
    let csr_path = dir.path().join("req.csr");
    std::fs::write(&csr_path, csr).unwrap();
    let out_dir = dir.path().join("dev");
    let (code, out, err) = hubctl(
        &hub,
        &[
            "devices",
            "enroll",
            "--name",
            "Porch",
            "--csr",
            csr_path.to_str().unwrap(),
            "--out",
            out_dir.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let id = out.trim();
    assert!(
        std::fs::read_to_string(out_dir.join("cert.pem"))
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    let ca = std::fs::read_to_string(out_dir.join("ca.pem")).unwrap();
    assert!(ca.contains("BEGIN CERTIFICATE"));
    let device = hub
        .admin()
        .await
        .unwrap()
        .get_device(pb::GetDeviceRequest { id: id.to_owned() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(device.name, "Porch");
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_change_nothing() {
    let hub = TestHub::start().await.unwrap();
    let mut admin = hub.admin().await.unwrap();
    let (_key, csr) = key_and_csr().unwrap();
    let cases = [
        ("", csr.clone(), "name"),
        ("a\u{7}bell", csr.clone(), "control"),
        (&*"x".repeat(65), csr.clone(), "longer than 64"),
        ("ok", String::new(), "csr_pem"),
        (
            "ok",
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into(),
            "csr",
        ),
        ("ok", "x".repeat(20_000), "limit"),
    ];
    for (name, csr_pem, expect) in cases {
        let e = admin
            .enroll_device(pb::EnrollDeviceRequest {
                name: name.to_owned(),
                csr_pem,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{name:?}: {e:?}");
        assert!(e.message().contains(expect), "{name:?}: {}", e.message());
    }
    // An RSA or P-384 key is refused by name.
    let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&p384)
        .unwrap()
        .pem()
        .unwrap();
    let e = admin
        .enroll_device(pb::EnrollDeviceRequest {
            name: "big key".into(),
            csr_pem: csr,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("P-256"), "{}", e.message());

    for id in ["", "UPPER", "a/b", "#"] {
        let e = admin
            .get_device(pb::GetDeviceRequest { id: id.into() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{id:?}");
    }
    let e = admin
        .revoke_device(pb::RevokeDeviceRequest {
            id: "unknown".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = admin
        .publish(pb::PublishRequest {
            topic: "d/+/cmd".into(),
            payload: vec![],
            retain: false,
            qos: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("wildcard"), "{}", e.message());

    let devices = admin
        .list_devices(pb::ListDevicesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        devices.devices.is_empty(),
        "a refused request stored something"
    );
}

#[tokio::test]
async fn broadcast_from_the_hub_reaches_devices() {
    let hub = TestHub::start().await.unwrap();
    let a = hub.enroll("a").await.unwrap();
    let mut dev = SimDevice::connect(&a, hub.mqtt_addr).await.unwrap();
    assert_eq!(
        dev.subscribe("$hub/broadcast/#", rumqttc::QoS::AtMostOnce)
            .await
            .unwrap(),
        vec![0]
    );
    hub.publish("$hub/broadcast/time", b"12:00", false)
        .await
        .unwrap();
    let (topic, payload) = dev.next_message().await.unwrap();
    assert_eq!(topic, "$hub/broadcast/time");
    assert_eq!(payload, b"12:00");
}

/// Set in the child process of the test below: the socket to probe.
const PROBE_ENV: &str = "HUB_TEST_PROBE_SOCKET";

/// Not a test of its own: when the test below re-runs this binary as another
/// uid, this calls every RPC and prints each status code.
#[tokio::test]
async fn permission_probe_child() {
    let Some(socket) = std::env::var_os(PROBE_ENV) else {
        return;
    };
    let mut admin = hub_proto::admin_client(socket).await.unwrap();
    let codes = [
        (
            "status",
            admin.status(pb::StatusRequest {}).await.map(|_| ()),
        ),
        (
            "list",
            admin
                .list_devices(pb::ListDevicesRequest {})
                .await
                .map(|_| ()),
        ),
        (
            "get",
            admin
                .get_device(pb::GetDeviceRequest { id: "x".into() })
                .await
                .map(|_| ()),
        ),
        (
            "enroll",
            admin
                .enroll_device(pb::EnrollDeviceRequest {
                    name: "x".into(),
                    csr_pem: "x".into(),
                })
                .await
                .map(|_| ()),
        ),
        (
            "revoke",
            admin
                .revoke_device(pb::RevokeDeviceRequest { id: "x".into() })
                .await
                .map(|_| ()),
        ),
        (
            "disconnect",
            admin
                .disconnect_device(pb::DisconnectDeviceRequest { id: "x".into() })
                .await
                .map(|_| ()),
        ),
        (
            "publish",
            admin
                .publish(pb::PublishRequest {
                    topic: "d/x/cmd/y".into(),
                    payload: vec![],
                    retain: false,
                    qos: 0,
                })
                .await
                .map(|_| ()),
        ),
        (
            "watch",
            admin
                .watch(pb::WatchRequest { filter: "#".into() })
                .await
                .map(|_| ()),
        ),
    ];
    for (rpc, result) in codes {
        let code = match result {
            Ok(()) => "Ok".to_owned(),
            Err(s) => format!("{:?}", s.code()),
        };
        println!("probe {rpc}={code}");
    }
}

#[tokio::test]
async fn a_caller_whose_uid_is_not_allowed_gets_permission_denied_on_every_rpc() {
    if std::env::var_os(PROBE_ENV).is_some() {
        return;
    }
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!(
            "!!! NOT RUN: this test needs root to run a probe as uid 65534; CI runs it as root !!!"
        );
        return;
    }
    let hub = TestHub::start().await.unwrap();
    // Let the probe reach the socket at all: the file mode is the first
    // defence, peer credentials the second, and this tests the second.
    std::fs::set_permissions(hub.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        hub.socket.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(&hub.socket, std::fs::Permissions::from_mode(0o666)).unwrap();

    let exe = std::env::current_exe().unwrap();
    let socket = hub.socket.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(exe)
            .args([
                "permission_probe_child",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(PROBE_ENV, socket)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The harness may print "test ... " before the first line on the same line.
    let probes: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.find("probe ").map(|i| &l[i..]))
        .collect();
    assert_eq!(
        probes.len(),
        8,
        "probe output: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in probes {
        assert!(line.ends_with("=PermissionDenied"), "{line}");
    }
    // Root (this process) is still served.
    hub.status().await.unwrap();
}

#[tokio::test]
async fn an_open_watch_does_not_hold_up_shutdown() {
    let hub = TestHub::start().await.unwrap();
    let _watch = hub.watch("#").await.unwrap();
    let started = std::time::Instant::now();
    hub.stop().await.unwrap();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "shutdown took {:?}",
        started.elapsed()
    );
}
