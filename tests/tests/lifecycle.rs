//! Device lifecycle (principles 3 and 7): the signed firmware catalogue,
//! the firmware and support register, integrity alerts and isolation, and
//! the end-of-life policy, end to end through hubctl.

use std::path::{Path, PathBuf};

use hub_tests::ota;
use hub_tests::sim::{self, Fleet, FleetConfig, Kind};
use hub_tests::{SimDevice, TestHub, WAIT, hubctl};
use ring::signature::{Ed25519KeyPair, KeyPair};

/// A vendor's signing key, as a test makes one.
struct Vendor {
    pair: Ed25519KeyPair,
}

impl Vendor {
    fn new() -> Vendor {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        Vendor {
            pair: Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap(),
        }
    }

    /// The public key as `openssl pkey -pubout` writes it.
    fn public_pem(&self) -> String {
        let mut spki = hex::decode("302a300506032b6570032100").unwrap();
        spki.extend_from_slice(self.pair.public_key().as_ref());
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(spki);
        format!("-----BEGIN PUBLIC KEY-----\n{b64}\n-----END PUBLIC KEY-----\n")
    }

    fn sign(&self, model: &str, version: &str, image: &[u8]) -> String {
        let sha = hex::encode(ring::digest::digest(&ring::digest::SHA256, image));
        let msg = format!("hubd-firmware-v1\n{model}\n{version}\n{sha}\n");
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(self.pair.sign(msg.as_bytes()))
    }
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

async fn ok(hub: &TestHub, args: &[&str]) -> String {
    let (code, out, err) = hubctl(hub, args).await;
    assert_eq!(code, 0, "hubctl {args:?} failed: {err}");
    out
}

async fn trust(hub: &TestHub, vendor: &Vendor, model: &str) {
    let key = write(
        hub.dir.path(),
        &format!("{model}.pub"),
        vendor.public_pem().as_bytes(),
    );
    ok(
        hub,
        &[
            "firmware",
            "trust-key",
            "--model",
            model,
            key.to_str().unwrap(),
        ],
    )
    .await;
}

/// Runs `hubctl firmware add` on the given files; returns the exit code
/// and stderr.
async fn firmware_add(
    hub: &TestHub,
    img: &Path,
    model: &str,
    version: &str,
    sig: &Path,
    key: &Path,
) -> (u8, String) {
    let (code, _, err) = hubctl(
        hub,
        &[
            "firmware",
            "add",
            img.to_str().unwrap(),
            "--model",
            model,
            "--version",
            version,
            "--signature",
            sig.to_str().unwrap(),
            "--vendor-key",
            key.to_str().unwrap(),
        ],
    )
    .await;
    (code, err)
}

/// Adds `image` as `model` `version` signed by `vendor`; returns hubctl's
/// exit code and stderr.
async fn add(
    hub: &TestHub,
    vendor: &Vendor,
    signer: &Vendor,
    model: &str,
    version: &str,
    image: &[u8],
) -> (u8, String) {
    let dir = hub.dir.path();
    let img = write(dir, &format!("{model}-{version}.img"), image);
    let sig = write(
        dir,
        &format!("{model}-{version}.sig"),
        signer.sign(model, version, image).as_bytes(),
    );
    let key = write(dir, "vendor-key.pub", vendor.public_pem().as_bytes());
    firmware_add(hub, &img, model, version, &sig, &key).await
}

async fn catalogue(hub: &TestHub) -> serde_json::Value {
    let out = ok(hub, &["firmware", "list", "--json"]).await;
    serde_json::from_str(&out).unwrap()
}

async fn device(hub: &TestHub, id: &str) -> serde_json::Value {
    let out = ok(hub, &["devices", "show", id, "--json"]).await;
    serde_json::from_str(&out).unwrap()
}

async fn events(hub: &TestHub, id: &str) -> Vec<serde_json::Value> {
    let out = ok(hub, &["events", "--device", id, "--json"]).await;
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Polls the device's security events until one of `kind` is there
/// (policy events are recorded without waiting for the disk).
async fn event_until(hub: &TestHub, id: &str, kind: &str) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let log = events(hub, id).await;
        if let Some(e) = log.iter().find(|e| e["kind"] == kind) {
            return e.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {kind} event within {WAIT:?}: {log:#?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Polls `devices show` until `done` holds (reports reach the lifecycle
/// service asynchronously).
async fn device_until(
    hub: &TestHub,
    id: &str,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let d = device(hub, id).await;
        if done(&d) {
            return d;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {WAIT:?}; device is {d:#}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

fn meta(model: &str, version: &str, sha: &str, support_end: &str) -> Vec<u8> {
    serde_json::json!({
        "kind": "switch",
        "model": model,
        "vendor": "Acme",
        "firmware": version,
        "firmware_sha256": sha,
        "support_end": support_end,
    })
    .to_string()
    .into_bytes()
}

#[tokio::test]
async fn the_catalogue_takes_only_images_signed_by_a_key_trusted_for_their_model() {
    let hub = TestHub::start().await.unwrap();
    let vendor = Vendor::new();
    let image = b"Acme SW-1 firmware 1.1".repeat(100);

    // Before its key is trusted: refused, nothing stored.
    let (code, err) = add(&hub, &vendor, &vendor, "SW-1", "1.1", &image).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is not trusted for model SW-1"), "{err}");
    assert!(err.contains("nothing was stored"), "{err}");
    assert_eq!(catalogue(&hub).await["firmware"], serde_json::json!([]));

    trust(&hub, &vendor, "SW-1").await;
    // Signed by someone else.
    let mallory = Vendor::new();
    let (code, err) = add(&hub, &vendor, &mallory, "SW-1", "1.1", &image).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("signature: does not verify"), "{err}");
    // A signature over another version.
    let dir = hub.dir.path();
    let img = write(dir, "x.img", &image);
    let sig = write(dir, "x.sig", vendor.sign("SW-1", "1.0", &image).as_bytes());
    let key = write(dir, "x.pub", vendor.public_pem().as_bytes());
    let (code, err) = firmware_add(&hub, &img, "SW-1", "1.1", &sig, &key).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("does not verify"), "{err}");
    // A garbled signature file.
    let bad = write(dir, "bad.sig", b"not a signature");
    let (code, err) = firmware_add(&hub, &img, "SW-1", "1.1", &bad, &key).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("signature is not 64 raw bytes"), "{err}");
    // A key trusted for another model does not sign for this one.
    let (code, err) = add(&hub, &vendor, &vendor, "SW-2", "1.1", &image).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not trusted for model SW-2"), "{err}");
    assert_eq!(catalogue(&hub).await["firmware"], serde_json::json!([]));

    // The real thing.
    let (code, err) = add(&hub, &vendor, &vendor, "SW-1", "1.1", &image).await;
    assert_eq!(code, 0, "{err}");
    let list = catalogue(&hub).await;
    assert_eq!(list["firmware"][0]["sha256"], sha256(&image));
    assert_eq!(list["firmware"][0]["version"], "1.1");
    assert_eq!(list["keys"][0]["model"], "SW-1");
    // Once per model and version.
    let (code, err) = add(&hub, &vendor, &vendor, "SW-1", "1.1", &image).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("already has SW-1 1.1"), "{err}");
    let text = ok(&hub, &["firmware", "list"]).await;
    assert!(text.contains("SW-1") && text.contains("1.1"), "{text}");
}

#[tokio::test]
async fn a_device_reporting_an_unknown_firmware_hash_is_isolated_and_the_event_recorded() {
    let hub = TestHub::start().await.unwrap();
    let vendor = Vendor::new();
    trust(&hub, &vendor, "SW-1").await;
    let good = b"Acme SW-1 firmware 1.0".to_vec();
    assert_eq!(add(&hub, &vendor, &vendor, "SW-1", "1.0", &good).await.0, 0);

    // A device on recognised firmware is left alone.
    let fine = hub.enroll("Fine switch").await.unwrap();
    let fine_dev = SimDevice::connect(&fine, hub.mqtt_addr).await.unwrap();
    fine_dev
        .publish(
            &format!("d/{}/meta", fine.id),
            &meta("SW-1", "1.0", &sha256(&good), "2031-12-31"),
            true,
        )
        .await
        .unwrap();
    device_until(&hub, &fine.id, "firmware recorded", |d| {
        d["lifecycle"]["firmware"] == "1.0"
    })
    .await;

    let bad = hub.enroll("Tampered switch").await.unwrap();
    let bad_dev = SimDevice::connect(&bad, hub.mqtt_addr).await.unwrap();
    let tampered = sha256(b"Acme SW-1 firmware 1.0 with a backdoor");
    bad_dev
        .publish(
            &format!("d/{}/meta", bad.id),
            &meta("SW-1", "1.0", &tampered, "2031-12-31"),
            true,
        )
        .await
        .unwrap();
    let d = device_until(&hub, &bad.id, "isolation", |d| d["state"] == "isolated").await;
    assert_eq!(d["isolation_reason"], "firmware not recognised");
    assert_eq!(d["lifecycle"]["integrity"], "firmware not recognised");
    let unknown = event_until(&hub, &bad.id, "firmware.unknown").await;
    let log = events(&hub, &bad.id).await;
    assert_eq!(unknown["severity"], "alert");
    assert_eq!(unknown["evidence"]["seen_sha256"], tampered);
    assert_eq!(unknown["evidence"]["expected_sha256"], sha256(&good));
    assert!(
        log.iter().any(|e| e["kind"] == "device.isolated"),
        "{log:#?}"
    );
    // The other device is untouched; status counts the problem.
    let f = device(&hub, &fine.id).await;
    assert_eq!(f["state"], "active");
    assert_eq!(f["lifecycle"]["integrity"], serde_json::Value::Null);
    let status = hub.status().await.unwrap();
    assert_eq!(status.lifecycle.unwrap().integrity_problems, 1);
    let text = ok(&hub, &["devices", "list"]).await;
    assert!(text.contains("1.0 (!)"), "{text}");
    // The log verifies.
    let v = ok(&hub, &["events", "verify"]).await;
    assert!(v.contains("security log intact"), "{v}");
}

#[tokio::test]
async fn firmware_that_changes_without_an_offer_alerts_and_the_alert_only_policy_does_not_isolate()
{
    let hub = TestHub::start_with(|c| {
        c.lifecycle.on_integrity_failure = hubd::config::IntegrityPolicy::Alert;
    })
    .await
    .unwrap();
    let id = hub.enroll("Lamp").await.unwrap();
    let dev = SimDevice::connect(&id, hub.mqtt_addr).await.unwrap();
    let topic = format!("d/{}/meta", id.id);
    let before = sha256(b"image A");
    dev.publish(&topic, &meta("LAMP-9", "2.0", &before, "2031-12-31"), true)
        .await
        .unwrap();
    device_until(&hub, &id.id, "first report", |d| {
        d["lifecycle"]["firmware_sha256"] == before.as_str()
    })
    .await;
    let after = sha256(b"image B");
    dev.publish(&topic, &meta("LAMP-9", "2.0", &after, "2031-12-31"), true)
        .await
        .unwrap();
    let d = device_until(&hub, &id.id, "integrity flagged", |d| {
        !d["lifecycle"]["integrity"].is_null()
    })
    .await;
    assert_eq!(
        d["lifecycle"]["integrity"],
        "firmware changed without an update the hub offered"
    );
    assert_eq!(d["state"], "active", "alert only: not isolated");
    let changed = event_until(&hub, &id.id, "firmware.changed").await;
    assert_eq!(changed["evidence"]["before_sha256"], before);
    assert_eq!(changed["evidence"]["seen_sha256"], after);
    assert!(changed["message"].as_str().unwrap().contains("alert only"));
}

#[tokio::test]
async fn support_end_isolates_by_default_flags_without_the_policy_and_unknown_is_flagged() {
    let yesterday = (jiff::Zoned::now().date() - jiff::ToSpan::days(1)).to_string();
    for isolate in [true, false] {
        let hub = TestHub::start_with(|c| c.lifecycle.isolate_after_support_end = isolate)
            .await
            .unwrap();
        let old = hub.enroll("Old camera").await.unwrap();
        let dev = SimDevice::connect(&old, hub.mqtt_addr).await.unwrap();
        dev.publish(
            &format!("d/{}/meta", old.id),
            &meta("CAM-1", "3.1", &sha256(b"cam"), &yesterday),
            true,
        )
        .await
        .unwrap();
        let unknown = hub.enroll("Mystery plug").await.unwrap();

        let d = device_until(&hub, &old.id, "support ended", |d| {
            d["lifecycle"]["support_status"] == "ended"
        })
        .await;
        assert_eq!(d["lifecycle"]["support_end"], yesterday.as_str());
        assert_eq!(d["lifecycle"]["support_source"], "device");
        let d = if isolate {
            device_until(&hub, &old.id, "isolated", |d| d["state"] == "isolated").await
        } else {
            d
        };
        let ended = event_until(&hub, &old.id, "support.ended").await;
        assert_eq!(ended["severity"], "alert");
        let status = hub.status().await.unwrap().lifecycle.unwrap();
        assert_eq!(status.support_ended, 1);
        assert_eq!(status.support_unknown, 1, "the plug never said");
        if isolate {
            assert_eq!(
                d["isolation_reason"],
                format!("support ended on {yesterday}")
            );
            assert_eq!(status.ended_not_isolated, 0);
        } else {
            assert_eq!(d["state"], "active", "only flagged");
            assert_eq!(status.ended_not_isolated, 1);
            assert!(ended["message"].as_str().unwrap().contains("not isolated"));
            let text = ok(&hub, &["status"]).await;
            assert!(text.contains("1 past support and NOT isolated"), "{text}");
        }
        let u = device(&hub, &unknown.id).await;
        assert_eq!(u["lifecycle"]["support_status"], "unknown");
        assert_eq!(
            u["state"], "active",
            "unknown support is flagged, not isolated"
        );
    }
}

#[tokio::test]
async fn the_owner_sets_and_clears_the_support_end_and_a_release_is_not_overruled() {
    let hub = TestHub::start().await.unwrap();
    let id = hub.enroll("Thermostat").await.unwrap();
    let dev = SimDevice::connect(&id, hub.mqtt_addr).await.unwrap();
    dev.publish(
        &format!("d/{}/meta", id.id),
        &meta("TH-2", "1.0", &sha256(b"th"), "2035-01-31"),
        true,
    )
    .await
    .unwrap();
    device_until(&hub, &id.id, "reported", |d| {
        d["lifecycle"]["support_end"] == "2035-01-31"
    })
    .await;

    // Bad input is refused and changes nothing.
    for bad in ["2030-02-30", "31/12/2030", "1999-01-01"] {
        let (code, _, err) = hubctl(&hub, &["devices", "set-support", &id.id, bad]).await;
        assert_eq!(code, 1, "{bad}: {err}");
        assert!(err.contains("date"), "{err}");
    }
    assert_eq!(
        device(&hub, &id.id).await["lifecycle"]["support_end"],
        "2035-01-31"
    );

    let out = ok(&hub, &["devices", "set-support", &id.id, "2020-06-30"]).await;
    assert!(out.contains("2020-06-30") && out.contains("owner"), "{out}");
    let d = device_until(&hub, &id.id, "isolated", |d| d["state"] == "isolated").await;
    assert_eq!(d["isolation_reason"], "support ended on 2020-06-30");

    // The owner decides to keep using it: the policy does not isolate it again.
    ok(&hub, &["release", &id.id]).await;
    let hub = hub.restart().await.unwrap();
    let d = device(&hub, &id.id).await;
    assert_eq!(d["state"], "active");
    assert_eq!(d["lifecycle"]["support_status"], "ended");

    // Clearing goes back to the device's own date.
    ok(&hub, &["devices", "set-support", &id.id, "--clear"]).await;
    let d = device(&hub, &id.id).await;
    assert_eq!(d["lifecycle"]["support_end"], "2035-01-31");
    assert_eq!(d["lifecycle"]["support_source"], "device");
    let log = events(&hub, &id.id).await;
    let kinds: Vec<&str> = log.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    for k in [
        "support.changed",
        "support.ended",
        "device.isolated",
        "device.released",
    ] {
        assert!(kinds.contains(&k), "{k} missing from {kinds:?}");
    }
    let changed = log.iter().find(|e| e["kind"] == "support.changed").unwrap();
    assert!(
        changed["actor"].as_str().unwrap().starts_with("uid "),
        "{changed}"
    );
}

/// Adds an image signed by a simulated-maker key (`hub_tests::ota`).
async fn add_signed(hub: &TestHub, key: &ota::VendorKey, model: &str, version: &str, image: &[u8]) {
    let dir = hub.dir.path();
    let img = write(dir, &format!("{model}-{version}.img"), image);
    let sig = ota::base64_encode(&key.sign(model, version, image));
    let sig = write(dir, &format!("{model}-{version}.sig"), sig.as_bytes());
    let pubkey = write(
        dir,
        &format!("{version}-signer.pub"),
        key.public_pem().as_bytes(),
    );
    let (code, err) = firmware_add(hub, &img, model, version, &sig, &pubkey).await;
    assert_eq!(code, 0, "firmware add {model} {version}: {err}");
}

async fn trust_pem(hub: &TestHub, key: &ota::VendorKey, model: &str, name: &str) {
    let path = write(hub.dir.path(), name, key.public_pem().as_bytes());
    ok(
        hub,
        &[
            "firmware",
            "trust-key",
            "--model",
            model,
            path.to_str().unwrap(),
        ],
    )
    .await;
}

#[tokio::test]
async fn a_simulated_device_updates_over_its_own_connection_and_refuses_bad_firmware() {
    let hub = TestHub::start().await.unwrap();
    let maker = ota::VendorKey::hubsim();
    let model = Kind::Switch.model();
    trust_pem(&hub, &maker, model, "maker.pub").await;
    // The owner adds what the devices run now and the update.
    add_signed(&hub, &maker, model, "1.0", &Kind::Switch.image("1.0")).await;
    let v11 = ota::simulated_image(model, "1.1");
    add_signed(&hub, &maker, model, "1.1", &v11).await;

    let devices = sim::enroll_devices(&hub, 2, &[Kind::Switch]).await.unwrap();
    let (good, faulty) = (devices[0].0.id.clone(), devices[1].0.id.clone());
    let cfg = FleetConfig {
        rate: 0.0,
        firmware: Some("1.0".to_owned()),
        ..FleetConfig::default()
    };
    let fleet = Fleet::start(vec![devices[0].clone()], hub.mqtt_addr, cfg.clone());
    // This one's downloads are corrupted on the way (tampering).
    let tampered = Fleet::start(
        vec![devices[1].clone()],
        hub.mqtt_addr,
        FleetConfig {
            ota_fault_corrupt: true,
            ..cfg
        },
    );
    for id in [&good, &faulty] {
        let d = device_until(&hub, id, "1.0 reported", |d| {
            d["lifecycle"]["firmware"] == "1.0"
        })
        .await;
        assert_eq!(
            d["lifecycle"]["integrity"],
            serde_json::Value::Null,
            "1.0 is recognised"
        );
    }

    // 1.0 -> 1.1: the newest in the catalogue.
    let out = ok(&hub, &["firmware", "push", &good]).await;
    assert!(
        out.contains("offered HS-SW10 1.1") && out.contains("runs 1.0"),
        "{out}"
    );
    fleet
        .wait_until("installed", WAIT, |f| f.stats().updates_installed == 1)
        .await
        .unwrap();
    assert_eq!(
        fleet.firmware(&good),
        Some(("1.1".to_owned(), sha256(&v11)))
    );
    let d = device_until(&hub, &good, "1.1 reported", |d| {
        d["lifecycle"]["firmware"] == "1.1" && d["lifecycle"]["update_state"] == "installed"
    })
    .await;
    assert_eq!(d["lifecycle"]["firmware_sha256"], sha256(&v11));
    assert_eq!(
        d["state"], "active",
        "an offered update is no integrity failure"
    );
    assert_eq!(d["lifecycle"]["integrity"], serde_json::Value::Null);
    let installed = event_until(&hub, &good, "firmware.installed").await;
    assert_eq!(installed["evidence"]["reported_version"], "1.1");
    let kinds: Vec<String> = events(&hub, &good)
        .await
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect();
    assert!(kinds.contains(&"firmware.offered".to_owned()), "{kinds:?}");
    assert!(!kinds.contains(&"device.isolated".to_owned()), "{kinds:?}");

    // The hub will not offer what is not newer...
    let (code, _, err) = hubctl(&hub, &["firmware", "push", &good]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("1.1 is not newer"), "{err}");
    // ... and when told to anyway, the device's anti-rollback refuses it.
    ok(
        &hub,
        &["firmware", "push", &good, "--version", "1.0", "--force"],
    )
    .await;
    let d = device_until(&hub, &good, "rollback refused", |d| {
        d["lifecycle"]["update_state"] == "failed"
    })
    .await;
    assert!(
        d["lifecycle"]["update_error"]
            .as_str()
            .unwrap()
            .starts_with("rollback"),
        "{d:#}"
    );
    let refused = event_until(&hub, &good, "firmware.refused").await;
    assert_eq!(refused["evidence"]["error"], "rollback");
    assert_eq!(fleet.firmware(&good).unwrap().0, "1.1");

    // A tampered download: the device's hash check refuses it.
    ok(&hub, &["firmware", "push", &faulty]).await;
    let d = device_until(&hub, &faulty, "tampered refused", |d| {
        d["lifecycle"]["update_state"] == "failed"
    })
    .await;
    assert!(
        d["lifecycle"]["update_error"]
            .as_str()
            .unwrap()
            .starts_with("hash"),
        "{d:#}"
    );
    assert_eq!(tampered.firmware(&faulty).unwrap().0, "1.0");
    assert_eq!(
        event_until(&hub, &faulty, "firmware.refused").await["evidence"]["error"],
        "hash"
    );

    // A key the owner trusts but the maker never built in: the hub takes
    // the image, the device refuses its signature.
    let stranger = ota::VendorKey::generate().unwrap();
    trust_pem(&hub, &stranger, model, "stranger.pub").await;
    add_signed(
        &hub,
        &stranger,
        model,
        "1.2",
        &ota::simulated_image(model, "1.2"),
    )
    .await;
    ok(&hub, &["firmware", "push", &good]).await;
    let d = device_until(&hub, &good, "wrong key refused", |d| {
        d["lifecycle"]["update_version"] == "1.2" && d["lifecycle"]["update_state"] == "failed"
    })
    .await;
    assert!(
        d["lifecycle"]["update_error"]
            .as_str()
            .unwrap()
            .starts_with("signature"),
        "{d:#}"
    );
    assert_eq!(fleet.firmware(&good).unwrap().0, "1.1");
    assert_eq!(fleet.stats().updates_refused, 2);
    for id in [&good, &faulty] {
        assert_eq!(device(&hub, id).await["state"], "active");
    }
    let v = ok(&hub, &["events", "verify"]).await;
    assert!(v.contains("security log intact"), "{v}");
    fleet.stop().await;
    tampered.stop().await;
}

#[tokio::test]
async fn an_isolated_device_is_offered_nothing_and_bad_pushes_name_what_is_wrong() {
    let hub = TestHub::start().await.unwrap();
    let id = hub.enroll("Plug").await.unwrap();
    // No model reported yet.
    let (code, _, err) = hubctl(&hub, &["firmware", "push", &id.id]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("has not reported its model"), "{err}");
    let dev = SimDevice::connect(&id, hub.mqtt_addr).await.unwrap();
    dev.publish(
        &format!("d/{}/meta", id.id),
        &meta("PLUG-1", "1.0", &sha256(b"plug"), "2031-12-31"),
        true,
    )
    .await
    .unwrap();
    device_until(&hub, &id.id, "model", |d| {
        d["lifecycle"]["model"] == "PLUG-1"
    })
    .await;
    let (code, _, err) = hubctl(&hub, &["firmware", "push", &id.id]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no firmware for model PLUG-1"), "{err}");
    let (code, _, err) = hubctl(&hub, &["firmware", "push", &id.id, "--version", "9 9"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("version \"9 9\""), "{err}");
    ok(&hub, &["isolate", &id.id, "--reason", "testing"]).await;
    let (code, _, err) = hubctl(&hub, &["firmware", "push", &id.id]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is isolated"), "{err}");
}
