//! hubctl against a fake hubd: a tonic `Admin` server with canned answers on a
//! Unix socket in a temp dir, driven through `hubctl::run_with_env` exactly as
//! `main` drives it, with the output text asserted.

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hub_proto::v1;
use hub_proto::v1::admin_server::{Admin, AdminServer};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

/// 2026-11-22 14:03:00 UTC.
const EXPIRES: i64 = 1_795_356_180;
/// 2025-11-22 14:03:00 UTC.
const CREATED: i64 = 1_763_820_180;
/// 2025-11-23 09:41:00 UTC.
const SEEN: i64 = 1_763_890_860;

const CERT_PEM: &str = "-----BEGIN CERTIFICATE-----\nZmFrZS1kZXZpY2U=\n-----END CERTIFICATE-----\n";
const CA_PEM: &str = "-----BEGIN CERTIFICATE-----\nZmFrZS1jYQ==\n-----END CERTIFICATE-----\n";
const CSR_PEM: &str =
    "-----BEGIN CERTIFICATE REQUEST-----\nZmFrZS1jc3I=\n-----END CERTIFICATE REQUEST-----\n";

const KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----\nZmFrZS1rZXk=\n-----END PRIVATE KEY-----\n";

/// 2026-01-05 10:20:30 UTC: when the fake's pairing windows expire.
const PAIR_EXPIRES: i64 = 1_767_608_430;
const CLAIM: &str = "c1a1m";
const SETUP_CODE: &str = "7K3M-Q8ZP-4WXN-JR2T-HV5A";
const PAIR_URI: &str = "hubpair://192.0.2.10:8884/?ca=sha256:abababababababababababababababababababababababababababababababab&claim=c1a1m";

const REASON: &str = "no firmware updates since 2021";

fn device(id: &str, name: &str, connected: bool, last_seen: i64) -> v1::Device {
    v1::Device {
        id: id.into(),
        name: name.into(),
        state: v1::DeviceState::Active.into(),
        connected,
        cert_serial: "3f9a".into(),
        cert_not_after: EXPIRES,
        created_at: CREATED,
        last_seen,
        role: v1::Role::Device.into(),
        isolation_reason: String::new(),
        grants: None,
        kind: String::new(),
        ..Default::default()
    }
}

fn grants(publish: &[&str], subscribe: &[&str]) -> v1::Grants {
    v1::Grants {
        publish: publish.iter().map(|f| (*f).to_owned()).collect(),
        subscribe: subscribe.iter().map(|f| (*f).to_owned()).collect(),
    }
}

/// An integration, an active device and an isolated one, ordered by name as hubd orders them.
fn devices() -> Vec<v1::Device> {
    vec![
        v1::Device {
            role: v1::Role::Integration.into(),
            grants: Some(grants(&["d/+/cmd/#"], &["d/+/state"])),
            ..device("h0m3as", "Home Assistant", true, SEEN)
        },
        device("7h3k2m", "Küche Thermostat", true, SEEN),
        v1::Device {
            state: v1::DeviceState::Isolated.into(),
            isolation_reason: REASON.into(),
            ..device("a1b2c3", "台所のセンサー", false, 0)
        },
    ]
}

/// A request to one of the RPCs that change something, as the fake received it.
#[derive(Debug, Clone, PartialEq)]
enum Call {
    OpenPairing(v1::OpenPairingRequest),
    CancelPairing(v1::CancelPairingRequest),
    EnrollBundle(v1::EnrollBundleRequest),
    Rename(v1::RenameDeviceRequest),
    Remove(v1::RemoveDeviceRequest),
    Isolate(v1::IsolateDeviceRequest),
    Release(v1::ReleaseDeviceRequest),
    UpdateGrants(v1::UpdateGrantsRequest),
}

type Calls = Arc<Mutex<Vec<Call>>>;

/// The calls recorded so far, emptying the record.
fn take_calls(calls: &Calls) -> Vec<Call> {
    std::mem::take(&mut *calls.lock().expect("calls lock"))
}

/// The windows the fake lists: the one it opens and an integration's.
fn pairing_windows() -> Vec<v1::PairingWindow> {
    vec![
        v1::PairingWindow {
            claim_id: CLAIM.into(),
            name: "Hall light".into(),
            role: v1::Role::Device.into(),
            code: String::new(),
            uri: PAIR_URI.into(),
            expires_at: PAIR_EXPIRES,
            failures: 0,
            grants: None,
        },
        v1::PairingWindow {
            claim_id: "9x8y7z".into(),
            name: "Node-RED\u{1b}[31m".into(),
            role: v1::Role::Integration.into(),
            code: String::new(),
            uri: PAIR_URI.replace(CLAIM, "9x8y7z"),
            expires_at: PAIR_EXPIRES + 3_600,
            failures: 3,
            grants: Some(grants(&[], &["d/+/state"])),
        },
    ]
}

/// The fake hubd. With `deny` set it refuses everything, as hubd does for a
/// peer outside the hubadmin group.
#[derive(Default)]
struct FakeHub {
    /// Refuse every call with PERMISSION_DENIED.
    deny: bool,
    /// How many EnrollDevice calls arrived.
    enrolls: Arc<AtomicUsize>,
    /// Every Publish request that arrived, refused ones included.
    published: Arc<Mutex<Vec<v1::PublishRequest>>>,
    /// The filter of every Watch that arrived.
    watched: Arc<Mutex<Vec<String>>>,
    /// End each watch stream after [`watch_messages`]; otherwise it stays open
    /// until the client leaves, as hubd's does.
    end_watch: bool,
    /// Every request to an RPC of pairing, isolation and the registry.
    calls: Calls,
}

impl FakeHub {
    fn record(&self, call: Call) {
        self.calls.lock().expect("calls lock").push(call);
    }

    fn check<T>(&self, _req: &Request<T>) -> Result<(), Status> {
        if self.deny {
            return Err(Status::permission_denied(
                "peer uid 1000 is not in group hubadmin",
            ));
        }
        Ok(())
    }
}

/// What the fake streams to every Watch: one UTF-8 payload with a newline in
/// it, one binary and retained.
fn watch_messages() -> Vec<v1::WatchMessage> {
    vec![
        v1::WatchMessage {
            topic: "d/7h3k2m/state".into(),
            payload: "21.5 °C\n".into(),
            retain: false,
        },
        v1::WatchMessage {
            topic: "d/a1b2c3/raw".into(),
            payload: vec![0x00, 0xff, 0x10, 0x80],
            retain: true,
        },
    ]
}

fn find(id: &str) -> Result<v1::Device, Status> {
    devices()
        .into_iter()
        .find(|d| d.id == id)
        .ok_or_else(|| Status::not_found("no such device"))
}

#[tonic::async_trait]
impl Admin for FakeHub {
    type WatchStream = Pin<Box<dyn Stream<Item = Result<v1::WatchMessage, Status>> + Send>>;

    async fn watch(
        &self,
        req: Request<v1::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.check(&req)?;
        let filter = req.into_inner().filter;
        self.watched
            .lock()
            .expect("watched lock")
            .push(filter.clone());
        if filter.contains('#') && !filter.ends_with('#') {
            return Err(Status::invalid_argument(
                "filter: '#' must be the last level",
            ));
        }
        let messages = tokio_stream::iter(watch_messages().into_iter().map(Ok));
        if self.end_watch {
            Ok(Response::new(Box::pin(messages)))
        } else {
            Ok(Response::new(Box::pin(
                messages.chain(tokio_stream::pending()),
            )))
        }
    }

    async fn status(
        &self,
        req: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        self.check(&req)?;
        Ok(Response::new(v1::StatusResponse {
            version: "0.1.0".into(),
            protocol_version: hub_proto::PROTOCOL_VERSION,
            uptime_seconds: 90_061,
            devices_known: 2,
            devices_connected: 1,
            counters: Some(v1::MessageCounters {
                publishes_received: 120,
                publishes_sent: 80,
                acl_denied: 3,
                dropped_slow_subscriber: 0,
                handshakes_ok: 9,
                handshakes_failed: 1,
                connections_refused: 0,
                sessions_refused: 2,
                protocol_errors: 0,
                connections_admitted: 10,
                connections_deferred: 1,
            }),
            ca_fingerprint: "ab".repeat(32),
            mqtt_listen: "0.0.0.0:8883".into(),
            clock_warning: String::new(),
            hub_name: "home".into(),
            automation: Some(v1::AutomationStatus {
                rules: 3,
                rules_enabled: 2,
                runs: 7,
                refused: 1,
                waiting_for_clock: false,
                events_dropped: 0,
                problem: String::new(),
            }),
            ..Default::default()
        }))
    }

    async fn list_devices(
        &self,
        req: Request<v1::ListDevicesRequest>,
    ) -> Result<Response<v1::ListDevicesResponse>, Status> {
        self.check(&req)?;
        Ok(Response::new(v1::ListDevicesResponse {
            devices: devices(),
        }))
    }

    async fn get_device(
        &self,
        req: Request<v1::GetDeviceRequest>,
    ) -> Result<Response<v1::Device>, Status> {
        self.check(&req)?;
        find(&req.get_ref().id).map(Response::new)
    }

    async fn enroll_device(
        &self,
        req: Request<v1::EnrollDeviceRequest>,
    ) -> Result<Response<v1::EnrollDeviceResponse>, Status> {
        self.check(&req)?;
        self.enrolls.fetch_add(1, Ordering::SeqCst);
        let req = req.into_inner();
        if req.csr_pem != CSR_PEM {
            return Err(Status::invalid_argument("csr: not the one the test sent"));
        }
        Ok(Response::new(v1::EnrollDeviceResponse {
            device: Some(device("n3wd3v", &req.name, false, 0)),
            cert_pem: CERT_PEM.into(),
            ca_chain_pem: CA_PEM.into(),
        }))
    }

    async fn revoke_device(
        &self,
        req: Request<v1::RevokeDeviceRequest>,
    ) -> Result<Response<v1::RevokeDeviceResponse>, Status> {
        self.check(&req)?;
        let mut device = find(&req.get_ref().id)?;
        let was_connected = device.connected;
        device.state = v1::DeviceState::Revoked.into();
        device.connected = false;
        Ok(Response::new(v1::RevokeDeviceResponse {
            device: Some(device),
            was_connected,
        }))
    }

    /// Records the request; refuses wildcards in the topic, as hubd does.
    async fn publish(
        &self,
        req: Request<v1::PublishRequest>,
    ) -> Result<Response<v1::PublishResponse>, Status> {
        self.check(&req)?;
        let req = req.into_inner();
        let wildcard = req.topic.contains(['+', '#']);
        self.published.lock().expect("published lock").push(req);
        if wildcard {
            return Err(Status::invalid_argument(
                "topic: a topic name has no wildcards",
            ));
        }
        Ok(Response::new(v1::PublishResponse {}))
    }

    async fn disconnect_device(
        &self,
        req: Request<v1::DisconnectDeviceRequest>,
    ) -> Result<Response<v1::DisconnectDeviceResponse>, Status> {
        self.check(&req)?;
        let device = find(&req.get_ref().id)?;
        Ok(Response::new(v1::DisconnectDeviceResponse {
            was_connected: device.connected,
        }))
    }

    /// Echoes name, role and grants with the canned code, URI and expiry.
    async fn open_pairing(
        &self,
        req: Request<v1::OpenPairingRequest>,
    ) -> Result<Response<v1::PairingWindow>, Status> {
        self.check(&req)?;
        let req = req.into_inner();
        self.record(Call::OpenPairing(req.clone()));
        if req.name.is_empty() {
            return Err(Status::invalid_argument("name: 1 to 64 characters"));
        }
        Ok(Response::new(v1::PairingWindow {
            claim_id: CLAIM.into(),
            name: req.name,
            role: req.role,
            code: SETUP_CODE.into(),
            uri: PAIR_URI.into(),
            expires_at: PAIR_EXPIRES,
            failures: 0,
            grants: req.grants,
        }))
    }

    async fn list_pairing(
        &self,
        req: Request<v1::ListPairingRequest>,
    ) -> Result<Response<v1::ListPairingResponse>, Status> {
        self.check(&req)?;
        Ok(Response::new(v1::ListPairingResponse {
            windows: pairing_windows(),
        }))
    }

    async fn cancel_pairing(
        &self,
        req: Request<v1::CancelPairingRequest>,
    ) -> Result<Response<v1::PairingWindow>, Status> {
        self.check(&req)?;
        let req = req.into_inner();
        self.record(Call::CancelPairing(req.clone()));
        pairing_windows()
            .into_iter()
            .find(|w| w.claim_id == req.claim_id)
            .map(Response::new)
            .ok_or_else(|| Status::not_found("no open pairing window with that claim id"))
    }

    async fn enroll_bundle(
        &self,
        req: Request<v1::EnrollBundleRequest>,
    ) -> Result<Response<v1::EnrollBundleResponse>, Status> {
        self.check(&req)?;
        let req = req.into_inner();
        self.record(Call::EnrollBundle(req.clone()));
        Ok(Response::new(v1::EnrollBundleResponse {
            device: Some(v1::Device {
                role: req.role,
                grants: req.grants,
                ..device("n3wd3v", &req.name, false, 0)
            }),
            key_pem: KEY_PEM.into(),
            cert_pem: CERT_PEM.into(),
            ca_chain_pem: CA_PEM.into(),
        }))
    }

    async fn rename_device(
        &self,
        req: Request<v1::RenameDeviceRequest>,
    ) -> Result<Response<v1::Device>, Status> {
        self.check(&req)?;
        let req = req.into_inner();
        self.record(Call::Rename(req.clone()));
        let mut device = find(&req.id)?;
        device.name = req.name;
        Ok(Response::new(device))
    }

    /// A connected device gets the reset; only 7h3k2m acknowledges it.
    async fn remove_device(
        &self,
        req: Request<v1::RemoveDeviceRequest>,
    ) -> Result<Response<v1::RemoveDeviceResponse>, Status> {
        self.check(&req)?;
        let req = req.into_inner();
        self.record(Call::Remove(req.clone()));
        let device = find(&req.id)?;
        let reset_sent = req.reset && device.connected;
        Ok(Response::new(v1::RemoveDeviceResponse {
            was_connected: device.connected,
            reset_sent,
            reset_acknowledged: reset_sent && device.id == "7h3k2m",
            rules_disabled: Vec::new(),
        }))
    }

    async fn isolate_device(
        &self,
        req: Request<v1::IsolateDeviceRequest>,
    ) -> Result<Response<v1::Device>, Status> {
        self.check(&req)?;
        let req = req.into_inner();
        self.record(Call::Isolate(req.clone()));
        let mut device = find(&req.id)?;
        device.state = v1::DeviceState::Isolated.into();
        device.isolation_reason = req.reason;
        Ok(Response::new(device))
    }

    async fn release_device(
        &self,
        req: Request<v1::ReleaseDeviceRequest>,
    ) -> Result<Response<v1::Device>, Status> {
        self.check(&req)?;
        let req = req.into_inner();
        self.record(Call::Release(req.clone()));
        let mut device = find(&req.id)?;
        device.state = v1::DeviceState::Active.into();
        device.isolation_reason.clear();
        Ok(Response::new(device))
    }

    /// Adds or removes filters; a device (not an integration) is refused.
    async fn update_grants(
        &self,
        req: Request<v1::UpdateGrantsRequest>,
    ) -> Result<Response<v1::Device>, Status> {
        self.check(&req)?;
        let req = req.into_inner();
        self.record(Call::UpdateGrants(req.clone()));
        let mut device = find(&req.id)?;
        if device.role != i32::from(v1::Role::Integration) {
            return Err(Status::failed_precondition(
                "only an integration has grants",
            ));
        }
        let change = req.grants.unwrap_or_default();
        let have = device.grants.get_or_insert_with(v1::Grants::default);
        for (list, filters) in [
            (&mut have.publish, change.publish),
            (&mut have.subscribe, change.subscribe),
        ] {
            for filter in filters {
                if req.revoke {
                    list.retain(|f| *f != filter);
                } else if !list.contains(&filter) {
                    list.push(filter);
                }
            }
        }
        Ok(Response::new(device))
    }

    // `hubctl rules`, `privacy` and `export` are tested against the real hubd
    // (tests/tests/automation.rs, tests/tests/privacy.rs): their answers come
    // from the rules engine and the store, which a fake would only mimic.

    async fn apply_rules(
        &self,
        _: Request<v1::ApplyRulesRequest>,
    ) -> Result<Response<v1::ApplyRulesResponse>, Status> {
        Err(Status::unimplemented("not in the fake hub"))
    }

    async fn list_rules(
        &self,
        _: Request<v1::ListRulesRequest>,
    ) -> Result<Response<v1::ListRulesResponse>, Status> {
        Err(Status::unimplemented("not in the fake hub"))
    }

    async fn set_rules_enabled(
        &self,
        _: Request<v1::SetRulesEnabledRequest>,
    ) -> Result<Response<v1::SetRulesEnabledResponse>, Status> {
        Err(Status::unimplemented("not in the fake hub"))
    }

    async fn remove_rules(
        &self,
        _: Request<v1::RemoveRulesRequest>,
    ) -> Result<Response<v1::RemoveRulesResponse>, Status> {
        Err(Status::unimplemented("not in the fake hub"))
    }

    async fn test_rules(
        &self,
        _: Request<v1::TestRulesRequest>,
    ) -> Result<Response<v1::TestRulesResponse>, Status> {
        Err(Status::unimplemented("not in the fake hub"))
    }

    async fn rule_history(
        &self,
        _: Request<v1::RuleHistoryRequest>,
    ) -> Result<Response<v1::RuleHistoryResponse>, Status> {
        Err(Status::unimplemented("not in the fake hub"))
    }

    async fn privacy(
        &self,
        _: Request<v1::PrivacyRequest>,
    ) -> Result<Response<v1::PrivacyResponse>, Status> {
        Err(Status::unimplemented("not in the fake hub"))
    }

    async fn export(
        &self,
        _: Request<v1::ExportRequest>,
    ) -> Result<Response<v1::ExportResponse>, Status> {
        Err(Status::unimplemented("not in the fake hub"))
    }

    // The wipe is tested against the real hubd (tests/tests/wipe.rs).
    async fn wipe(
        &self,
        _: Request<v1::WipeRequest>,
    ) -> Result<Response<v1::WipeResponse>, Status> {
        Err(Status::unimplemented("not in the fake hub"))
    }

    async fn set_support(
        &self,
        _: Request<v1::SetSupportRequest>,
    ) -> Result<Response<v1::Device>, Status> {
        Err(Status::unimplemented("not in the fake hub"))
    }

    async fn trust_vendor_key(
        &self,
        _: Request<v1::TrustVendorKeyRequest>,
    ) -> Result<Response<v1::TrustVendorKeyResponse>, Status> {
        Err(Status::unimplemented("not in the fake hub"))
    }

    async fn add_firmware(
        &self,
        _: Request<v1::AddFirmwareRequest>,
    ) -> Result<Response<v1::Firmware>, Status> {
        Err(Status::unimplemented("not in the fake hub"))
    }

    async fn list_firmware(
        &self,
        _: Request<v1::ListFirmwareRequest>,
    ) -> Result<Response<v1::ListFirmwareResponse>, Status> {
        Err(Status::unimplemented("not in the fake hub"))
    }

    async fn push_firmware(
        &self,
        _: Request<v1::PushFirmwareRequest>,
    ) -> Result<Response<v1::PushFirmwareResponse>, Status> {
        Err(Status::unimplemented("not in the fake hub"))
    }

    type ListEventsStream = Pin<Box<dyn Stream<Item = Result<v1::SecurityEvent, Status>> + Send>>;

    async fn list_events(
        &self,
        _: Request<v1::ListEventsRequest>,
    ) -> Result<Response<Self::ListEventsStream>, Status> {
        Err(Status::unimplemented("not in the fake hub"))
    }

    async fn verify_events(
        &self,
        _: Request<v1::VerifyEventsRequest>,
    ) -> Result<Response<v1::VerifyEventsResponse>, Status> {
        Err(Status::unimplemented("not in the fake hub"))
    }

    async fn audit(
        &self,
        _: Request<v1::AuditRequest>,
    ) -> Result<Response<v1::AuditResponse>, Status> {
        Err(Status::unimplemented("not in the fake hub"))
    }
}

/// A running fake hub; the server task ends with the test's runtime.
struct Hub {
    _dir: tempfile::TempDir,
    socket: PathBuf,
}

/// Binds the socket before returning, so the first connection cannot race the server.
fn start(hub: FakeHub) -> Hub {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("hubd.sock");
    let listener = UnixListener::bind(&socket).expect("bind fake hubd socket");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AdminServer::new(hub))
            .serve_with_incoming(UnixListenerStream::new(listener)),
    );
    Hub { _dir: dir, socket }
}

struct Run {
    code: u8,
    out: String,
    err: String,
}

/// Runs hubctl with `HUBD_SOCKET` = `socket` as its only environment variable.
async fn hubctl(socket: &Path, args: &[&str]) -> Run {
    let socket = socket.as_os_str().to_owned();
    let argv: Vec<OsString> = std::iter::once("hubctl")
        .chain(args.iter().copied())
        .map(OsString::from)
        .collect();
    tokio::task::spawn_blocking(move || {
        let env = |name: &str| (name == "HUBD_SOCKET").then(|| socket.clone());
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = hubctl::run_with_env(argv, &env, &mut out, &mut err);
        Run {
            code,
            out: String::from_utf8(out).expect("utf-8 stdout"),
            err: String::from_utf8(err).expect("utf-8 stderr"),
        }
    })
    .await
    .expect("hubctl thread")
}

/// A device's lifecycle in JSON when the hub knows nothing of it.
fn unknown_lifecycle() -> serde_json::Value {
    serde_json::json!({
        "model": null, "vendor": null, "firmware": null, "firmware_sha256": null,
        "support_end": null, "support_source": null, "support_status": "unknown",
        "integrity": null, "update_version": null, "update_state": null, "update_error": null,
    })
}

/// Asserts success and returns stdout.
async fn ok(socket: &Path, args: &[&str]) -> String {
    let r = hubctl(socket, args).await;
    assert_eq!((r.code, r.err.as_str()), (0, ""), "{args:?}");
    r.out
}

#[tokio::test]
async fn status_human_and_json() {
    let hub = start(FakeHub::default());
    let fp = "ab".repeat(32);
    assert_eq!(
        ok(&hub.socket, &["status"]).await,
        format!(
            "version:                 0.1.0\n\
             protocol:                1\n\
             uptime:                  1d 1h 1m 1s\n\
             devices:                 2 known, 1 connected\n\
             mqtt listen:             0.0.0.0:8883\n\
             ca fingerprint:          {fp}\n\
             publishes received:      120\n\
             publishes sent:          80\n\
             acl denied:              3\n\
             dropped slow subscriber: 0\n\
             handshakes ok:           9\n\
             handshakes failed:       1\n\
             connections admitted:    10\n\
             connections deferred:    1\n\
             connections refused:     0\n\
             sessions refused:        2\n\
             protocol errors:         0\n\
             rules:                   3 (2 enabled), 7 runs, 1 refused by loop protection\n\
             device support:          0 ended, 0 ending within 0 days, 0 unknown\n\
             security events:         0 entries\n"
        )
    );

    let json: serde_json::Value =
        serde_json::from_str(&ok(&hub.socket, &["status", "--json"]).await).expect("json");
    assert_eq!(
        json,
        serde_json::json!({
            "version": "0.1.0",
            "protocol_version": 1,
            "uptime_seconds": 90_061,
            "devices_known": 2,
            "devices_connected": 1,
            "counters": {
                "publishes_received": 120,
                "publishes_sent": 80,
                "acl_denied": 3,
                "dropped_slow_subscriber": 0,
                "handshakes_ok": 9,
                "handshakes_failed": 1,
                "connections_refused": 0,
                "sessions_refused": 2,
                "protocol_errors": 0,
                "connections_admitted": 10,
                "connections_deferred": 1,
            },
            "ca_fingerprint": fp,
            "mqtt_listen": "0.0.0.0:8883",
            "clock_warning": null,
            "automation": {
                "rules": 3,
                "rules_enabled": 2,
                "runs": 7,
                "refused": 1,
                "waiting_for_clock": false,
                "events_dropped": 0,
                "problem": null,
            },
            "lifecycle": {
                "support_ended": 0, "support_ending": 0, "support_unknown": 0,
                "ended_not_isolated": 0, "integrity_problems": 0,
                "updates_in_progress": 0, "updates_failed": 0,
                "isolate_after_support_end": false, "support_warning_days": 0,
            },
            "seclog": { "entries": 0, "dropped": 0, "recent_alerts": 0, "last_alert": null },
        })
    );
}

#[tokio::test]
async fn devices_list_human_and_json() {
    let hub = start(FakeHub::default());
    assert_eq!(
        ok(&hub.socket, &["devices", "list"]).await,
        "ID      NAME              ROLE         KIND  STATE     CONNECTED  FIRMWARE  SUPPORT  CERT EXPIRES      LAST SEEN         REASON\n\
         h0m3as  Home Assistant    integration  -     active    yes        -         -        2026-11-22 14:03  2025-11-23 09:41  -\n\
         7h3k2m  Küche Thermostat  device       -     active    yes        -         unknown  2026-11-22 14:03  2025-11-23 09:41  -\n\
         a1b2c3  台所のセンサー    device       -     isolated  no         -         unknown  2026-11-22 14:03  -                 no firmware updates since 2021\n"
    );

    let json: serde_json::Value =
        serde_json::from_str(&ok(&hub.socket, &["devices", "list", "--json"]).await).expect("json");
    assert_eq!(
        json,
        serde_json::json!({ "devices": [
            {
                "id": "h0m3as",
                "name": "Home Assistant",
                "state": "active",
                "connected": true,
                "cert_serial": "3f9a",
                "cert_not_after": EXPIRES,
                "cert_not_after_rfc3339": "2026-11-22T14:03:00Z",
                "created_at": CREATED,
                "created_at_rfc3339": "2025-11-22T14:03:00Z",
                "last_seen": SEEN,
                "last_seen_rfc3339": "2025-11-23T09:41:00Z",
                "role": "integration",
                "isolation_reason": null,
                "kind": null,
                "grants": { "publish": ["d/+/cmd/#"], "subscribe": ["d/+/state"] },
                "lifecycle": unknown_lifecycle(),
            },
            {
                "id": "7h3k2m",
                "name": "Küche Thermostat",
                "state": "active",
                "connected": true,
                "cert_serial": "3f9a",
                "cert_not_after": EXPIRES,
                "cert_not_after_rfc3339": "2026-11-22T14:03:00Z",
                "created_at": CREATED,
                "created_at_rfc3339": "2025-11-22T14:03:00Z",
                "last_seen": SEEN,
                "last_seen_rfc3339": "2025-11-23T09:41:00Z",
                "role": "device",
                "isolation_reason": null,
                "kind": null,
                "grants": { "publish": [], "subscribe": [] },
                "lifecycle": unknown_lifecycle(),
            },
            {
                "id": "a1b2c3",
                "name": "台所のセンサー",
                "state": "isolated",
                "connected": false,
                "cert_serial": "3f9a",
                "cert_not_after": EXPIRES,
                "cert_not_after_rfc3339": "2026-11-22T14:03:00Z",
                "created_at": CREATED,
                "created_at_rfc3339": "2025-11-22T14:03:00Z",
                "last_seen": null,
                "last_seen_rfc3339": null,
                "role": "device",
                "isolation_reason": REASON,
                "kind": null,
                "grants": { "publish": [], "subscribe": [] },
                "lifecycle": unknown_lifecycle(),
            },
        ]})
    );
}

#[tokio::test]
async fn devices_show_human_and_json() {
    let hub = start(FakeHub::default());
    assert_eq!(
        ok(&hub.socket, &["devices", "show", "7h3k2m"]).await,
        "id:               7h3k2m\n\
         name:             Küche Thermostat\n\
         role:             device\n\
         kind:             -\n\
         state:            active\n\
         isolation reason: -\n\
         connected:        yes\n\
         cert serial:      3f9a\n\
         cert expires:     2026-11-22 14:03\n\
         created:          2025-11-22 14:03\n\
         last seen:        2025-11-23 09:41\n\
         may publish:      -\n\
         may subscribe:    -\n\
         model:            -\n\
         vendor:           -\n\
         firmware:         -\n\
         firmware sha256:  -\n\
         integrity:        -\n\
         support:          unknown\n\
         update:           -\n"
    );
    assert_eq!(
        ok(&hub.socket, &["devices", "show", "a1b2c3"]).await,
        "id:               a1b2c3\n\
         name:             台所のセンサー\n\
         role:             device\n\
         kind:             -\n\
         state:            isolated\n\
         isolation reason: no firmware updates since 2021\n\
         connected:        no\n\
         cert serial:      3f9a\n\
         cert expires:     2026-11-22 14:03\n\
         created:          2025-11-22 14:03\n\
         last seen:        -\n\
         may publish:      -\n\
         may subscribe:    -\n\
         model:            -\n\
         vendor:           -\n\
         firmware:         -\n\
         firmware sha256:  -\n\
         integrity:        -\n\
         support:          unknown\n\
         update:           -\n"
    );
    let human = ok(&hub.socket, &["devices", "show", "h0m3as"]).await;
    assert!(
        human.contains("\nrole:             integration\n"),
        "{human}"
    );
    assert!(
        human.contains("\nmay publish:      d/+/cmd/#\nmay subscribe:    d/+/state\n"),
        "{human}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(&hub.socket, &["devices", "show", "a1b2c3", "--json"]).await)
            .expect("json");
    assert_eq!(json["id"], "a1b2c3");
    assert_eq!(json["last_seen"], serde_json::Value::Null);
    assert_eq!(json["state"], "isolated");
    assert_eq!(json["role"], "device");
    assert_eq!(json["isolation_reason"], REASON);
    assert_eq!(
        json["grants"],
        serde_json::json!({ "publish": [], "subscribe": [] })
    );
}

#[tokio::test]
async fn devices_revoke_and_disconnect() {
    let hub = start(FakeHub::default());
    assert_eq!(
        ok(&hub.socket, &["devices", "revoke", "7h3k2m"]).await,
        "revoked 7h3k2m (its session was closed)\n"
    );
    assert_eq!(
        ok(&hub.socket, &["devices", "revoke", "a1b2c3"]).await,
        "revoked a1b2c3\n"
    );
    assert_eq!(
        ok(&hub.socket, &["devices", "disconnect", "7h3k2m"]).await,
        "disconnected 7h3k2m\n"
    );
    assert_eq!(
        ok(&hub.socket, &["devices", "disconnect", "a1b2c3"]).await,
        "a1b2c3 was not connected\n"
    );
}

#[tokio::test]
async fn not_found_exits_1_naming_the_command() {
    let hub = start(FakeHub::default());
    for (args, message) in [
        (
            &["devices", "revoke", "abc"][..],
            "hubctl: devices revoke abc: no such device\n",
        ),
        (
            &["devices", "show", "abc"],
            "hubctl: devices show abc: no such device\n",
        ),
        (
            &["devices", "disconnect", "abc"],
            "hubctl: devices disconnect abc: no such device\n",
        ),
    ] {
        let r = hubctl(&hub.socket, args).await;
        assert_eq!(r.code, 1, "{args:?}");
        assert_eq!(r.err, message);
        assert_eq!(r.out, "");
    }
}

#[tokio::test]
async fn permission_denied_exits_1_with_the_hint() {
    let hub = start(FakeHub {
        deny: true,
        ..FakeHub::default()
    });
    let r = hubctl(&hub.socket, &["devices", "list", "--json"]).await;
    assert_eq!(r.code, 1);
    assert_eq!(r.out, "");
    assert_eq!(
        r.err,
        "hubctl: devices list: peer uid 1000 is not in group hubadmin\n\
         hubctl: you are not allowed to administer this hub: \
         run as root or as a member of the hubadmin group\n"
    );
}

#[tokio::test]
async fn enroll_writes_files_and_refuses_to_overwrite() {
    let enrolls = Arc::new(AtomicUsize::new(0));
    let hub = start(FakeHub {
        enrolls: Arc::clone(&enrolls),
        ..FakeHub::default()
    });
    let work = tempfile::tempdir().expect("tempdir");
    let csr = work.path().join("device.csr");
    std::fs::write(&csr, CSR_PEM).expect("write csr");
    let out_dir = work.path().join("new").join("bundle");
    let csr_arg = csr.to_str().expect("utf-8 temp path");
    let out_arg = out_dir.to_str().expect("utf-8 temp path");
    let args = [
        "devices",
        "enroll",
        "--name",
        "Hall light",
        "--csr",
        csr_arg,
        "--out",
        out_arg,
    ];

    assert_eq!(ok(&hub.socket, &args).await, "n3wd3v\n");
    assert_eq!(
        std::fs::read_to_string(out_dir.join("cert.pem")).expect("cert"),
        CERT_PEM
    );
    assert_eq!(
        std::fs::read_to_string(out_dir.join("ca.pem")).expect("ca"),
        CA_PEM
    );
    let mode = std::fs::metadata(&out_dir)
        .expect("out dir")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
    assert_eq!(enrolls.load(Ordering::SeqCst), 1);

    // A second enrolment into the same place is refused before hubd is asked.
    let r = hubctl(&hub.socket, &args).await;
    assert_eq!(r.code, 1);
    assert_eq!(
        r.err,
        format!(
            "hubctl: devices enroll Hall light: {}: already exists (use --force to replace it)\n",
            out_dir.join("cert.pem").display()
        )
    );
    assert_eq!(enrolls.load(Ordering::SeqCst), 1);

    let forced: Vec<&str> = args.iter().copied().chain(["--force"]).collect();
    assert_eq!(ok(&hub.socket, &forced).await, "n3wd3v\n");
    assert_eq!(enrolls.load(Ordering::SeqCst), 2);
    assert_eq!(
        std::fs::read_to_string(out_dir.join("cert.pem")).expect("cert"),
        CERT_PEM
    );
}

#[tokio::test]
async fn enroll_refuses_a_private_key_without_asking_hubd() {
    let enrolls = Arc::new(AtomicUsize::new(0));
    let hub = start(FakeHub {
        enrolls: Arc::clone(&enrolls),
        ..FakeHub::default()
    });
    let work = tempfile::tempdir().expect("tempdir");
    let key = work.path().join("device.key");
    std::fs::write(
        &key,
        "-----BEGIN EC PRIVATE KEY-----\nAA==\n-----END EC PRIVATE KEY-----\n",
    )
    .expect("write key");
    let key_arg = key.to_str().expect("utf-8 temp path");
    let out_arg = work.path().to_str().expect("utf-8 temp path");
    let r = hubctl(
        &hub.socket,
        &[
            "devices", "enroll", "--name", "x", "--csr", key_arg, "--out", out_arg,
        ],
    )
    .await;
    assert_eq!(r.code, 1);
    assert!(r.err.contains("holds a private key"), "{}", r.err);
    assert_eq!(enrolls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn unreachable_socket_exits_3() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("none.sock");
    let r = hubctl(&socket, &["status"]).await;
    assert_eq!(r.code, 3);
    assert_eq!(
        r.err,
        format!(
            "hubctl: cannot reach hubd at {}: is it running?\n",
            socket.display()
        )
    );
}

/// The Publish requests recorded so far as (topic, payload, retain), emptying the record.
fn take_published(published: &Mutex<Vec<v1::PublishRequest>>) -> Vec<(String, Vec<u8>, bool)> {
    std::mem::take(&mut *published.lock().expect("published lock"))
        .into_iter()
        .map(|r| (r.topic, r.payload, r.retain))
        .collect()
}

#[tokio::test]
async fn publish_sends_topic_payload_and_retain() {
    let published = Arc::new(Mutex::new(Vec::new()));
    let hub = start(FakeHub {
        published: Arc::clone(&published),
        ..FakeHub::default()
    });
    assert_eq!(
        ok(&hub.socket, &["publish", "d/7h3k2m/cmd/on", "1"]).await,
        ""
    );
    assert_eq!(
        ok(
            &hub.socket,
            &["publish", "d/7h3k2m/cmd/mode", "eco mode", "--retain"]
        )
        .await,
        ""
    );
    // An empty payload is a payload (it clears a retained message).
    assert_eq!(
        ok(
            &hub.socket,
            &["publish", "--retain", "d/7h3k2m/cmd/mode", ""]
        )
        .await,
        ""
    );
    assert_eq!(
        take_published(&published),
        [
            ("d/7h3k2m/cmd/on".to_owned(), b"1".to_vec(), false),
            ("d/7h3k2m/cmd/mode".to_owned(), b"eco mode".to_vec(), true),
            ("d/7h3k2m/cmd/mode".to_owned(), Vec::new(), true),
        ]
    );

    // --file sends the file's bytes as they are, binary included.
    let work = tempfile::tempdir().expect("tempdir");
    let file = work.path().join("payload.bin");
    std::fs::write(&file, [0x00, 0xff, b'\n']).expect("write payload");
    let file_arg = file.to_str().expect("utf-8 temp path");
    assert_eq!(
        ok(
            &hub.socket,
            &["publish", "d/a1b2c3/cmd/raw", "--file", file_arg]
        )
        .await,
        ""
    );
    assert_eq!(
        take_published(&published),
        [(
            "d/a1b2c3/cmd/raw".to_owned(),
            vec![0x00, 0xff, b'\n'],
            false
        )]
    );

    // A missing file fails before hubd is asked.
    let missing = work.path().join("nope");
    let missing_arg = missing.to_str().expect("utf-8 temp path");
    let r = hubctl(&hub.socket, &["publish", "t", "--file", missing_arg]).await;
    assert_eq!(r.code, 1);
    assert!(
        r.err
            .starts_with(&format!("hubctl: publish t: {missing_arg}: ")),
        "{}",
        r.err
    );
    assert!(take_published(&published).is_empty());
}

#[tokio::test]
async fn publish_reads_the_payload_from_stdin() {
    let published = Arc::new(Mutex::new(Vec::new()));
    let hub = start(FakeHub {
        published: Arc::clone(&published),
        ..FakeHub::default()
    });
    // The real binary, since `run_with_env` reads the process's stdin.
    let socket = hub.socket.clone();
    let output = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hubctl"))
            .env_clear()
            .env("HUBD_SOCKET", &socket)
            .args(["publish", "d/7h3k2m/cmd/set", "--file", "-", "--retain"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("hubctl runs");
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin.write_all(b"{\"target\": 21}\n").expect("write stdin");
        drop(stdin);
        child.wait_with_output().expect("hubctl exits")
    })
    .await
    .expect("hubctl thread");
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.stdout.is_empty());
    assert_eq!(
        take_published(&published),
        [(
            "d/7h3k2m/cmd/set".to_owned(),
            b"{\"target\": 21}\n".to_vec(),
            true
        )]
    );
}

#[tokio::test]
async fn publish_refused_exits_1_with_hubds_reason() {
    let published = Arc::new(Mutex::new(Vec::new()));
    let hub = start(FakeHub {
        published: Arc::clone(&published),
        ..FakeHub::default()
    });
    let r = hubctl(&hub.socket, &["publish", "d/+/cmd/on", "1"]).await;
    assert_eq!(r.code, 1);
    assert_eq!(r.out, "");
    assert_eq!(
        r.err,
        "hubctl: publish d/+/cmd/on: topic: a topic name has no wildcards\n"
    );
    assert_eq!(take_published(&published).len(), 1);

    let hub = start(FakeHub {
        deny: true,
        ..FakeHub::default()
    });
    let r = hubctl(&hub.socket, &["publish", "d/x/cmd/on", "1"]).await;
    assert_eq!(r.code, 1);
    assert_eq!(
        r.err,
        "hubctl: publish d/x/cmd/on: peer uid 1000 is not in group hubadmin\n\
         hubctl: you are not allowed to administer this hub: \
         run as root or as a member of the hubadmin group\n"
    );
}

/// The two lines of [`watch_messages`] in the human format.
const WATCH_HUMAN: &str = "d/7h3k2m/state 21.5 °C\\n\n\
                           d/a1b2c3/raw <4 bytes: 00ff1080>\n";

#[tokio::test]
async fn watch_count_prints_human_and_json_lines() {
    let watched = Arc::new(Mutex::new(Vec::new()));
    let hub = start(FakeHub {
        watched: Arc::clone(&watched),
        ..FakeHub::default()
    });
    // The fake keeps the stream open after two messages: --count ends it.
    assert_eq!(
        ok(&hub.socket, &["watch", "d/#", "--count", "2"]).await,
        WATCH_HUMAN
    );
    assert_eq!(
        ok(&hub.socket, &["watch", "#", "--count", "2", "--json"]).await,
        "{\"topic\":\"d/7h3k2m/state\",\"payload\":\"21.5 °C\\n\",\"retain\":false}\n\
         {\"topic\":\"d/a1b2c3/raw\",\"payload\":null,\"payload_base64\":\"AP8QgA==\",\"retain\":true}\n"
    );
    assert_eq!(
        ok(&hub.socket, &["watch", "d/+/state", "--count", "1"]).await,
        "d/7h3k2m/state 21.5 °C\\n\n"
    );
    assert_eq!(
        *watched.lock().expect("watched lock"),
        ["d/#", "#", "d/+/state"]
    );
}

#[tokio::test]
async fn watch_stream_end_and_refusal() {
    let hub = start(FakeHub {
        end_watch: true,
        ..FakeHub::default()
    });
    // Without --count, hubd ending the stream ends hubctl successfully.
    assert_eq!(ok(&hub.socket, &["watch", "#"]).await, WATCH_HUMAN);
    // With it, fewer messages than asked for is a failure, after printing them.
    let r = hubctl(&hub.socket, &["watch", "#", "--count", "3"]).await;
    assert_eq!(r.code, 1);
    assert_eq!(r.out, WATCH_HUMAN);
    assert_eq!(
        r.err,
        "hubctl: watch #: hubd ended the stream after 2 of 3 messages\n"
    );
    let r = hubctl(&hub.socket, &["watch", "d/#/state", "--count", "1"]).await;
    assert_eq!(r.code, 1);
    assert_eq!(r.out, "");
    assert_eq!(
        r.err,
        "hubctl: watch d/#/state: filter: '#' must be the last level\n"
    );
}

/// A FakeHub that records its calls, and the record.
fn recording() -> (FakeHub, Calls) {
    let calls = Calls::default();
    let hub = FakeHub {
        calls: Arc::clone(&calls),
        ..FakeHub::default()
    };
    (hub, calls)
}

/// The QR code hubctl must print for [`PAIR_URI`], rendered here independently.
fn expected_qr() -> String {
    use qrcode::render::unicode::Dense1x2;
    qrcode::QrCode::new(PAIR_URI.as_bytes())
        .expect("the URI fits in a QR code")
        .render::<Dense1x2>()
        .dark_color(Dense1x2::Light)
        .light_color(Dense1x2::Dark)
        .quiet_zone(true)
        .build()
}

#[tokio::test]
async fn pair_prints_code_uri_expiry_and_qr() {
    let (fake, calls) = recording();
    let hub = start(fake);
    let out = ok(&hub.socket, &["pair", "--name", "Hall light"]).await;
    assert_eq!(
        out,
        format!(
            "pairing window c1a1m open for Hall light (device)\n\
             \n    setup code:  {SETUP_CODE}\n\n\
             uri:     {PAIR_URI}\n\
             expires: 2026-01-05 10:20:30 UTC\n\
             \n{qr}\n\n\
             Give the device the URI and the setup code, which works once (a simulated \
             device: hubsim pair --uri '{PAIR_URI}' --code {SETUP_CODE} --out DIR)\n",
            qr = expected_qr()
        )
    );
    // The default role is sent explicitly; the window is hubd's default.
    assert_eq!(
        take_calls(&calls),
        [Call::OpenPairing(v1::OpenPairingRequest {
            name: "Hall light".into(),
            role: v1::Role::Device.into(),
            window_seconds: 0,
            grants: None,
        })]
    );
}

#[tokio::test]
async fn pair_json_has_exactly_the_documented_keys() {
    let (fake, calls) = recording();
    let hub = start(fake);
    let out = ok(
        &hub.socket,
        &[
            "pair",
            "--name",
            "Home Assistant",
            "--role",
            "integration",
            "--window",
            "90s",
            "--allow-sub",
            "d/+/state",
            "--allow-pub",
            "d/+/cmd/#",
            "--allow-sub",
            "$hub/isolation/+",
            "--json",
        ],
    )
    .await;
    let json: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        json,
        serde_json::json!({
            "claim_id": CLAIM,
            "code": SETUP_CODE,
            "uri": PAIR_URI,
            "expires_at": PAIR_EXPIRES,
            "expires_at_rfc3339": "2026-01-05T10:20:30Z",
        })
    );
    // No QR code and nothing else around the JSON.
    assert!(out.starts_with('{') && out.ends_with("}\n"), "{out}");
    assert_eq!(
        take_calls(&calls),
        [Call::OpenPairing(v1::OpenPairingRequest {
            name: "Home Assistant".into(),
            role: v1::Role::Integration.into(),
            window_seconds: 90,
            grants: Some(grants(&["d/+/cmd/#"], &["d/+/state", "$hub/isolation/+"])),
        })]
    );
}

#[tokio::test]
async fn pair_usage_errors_exit_2_without_asking_hubd() {
    let (fake, calls) = recording();
    let hub = start(fake);
    for args in [
        &["pair"][..],
        &["pair", "--name", "x", "--list"],
        &["pair", "--list", "--cancel", CLAIM],
        &["pair", "--name", "x", "--allow-pub", "a/b"],
        &[
            "pair",
            "--name",
            "x",
            "--role",
            "device",
            "--allow-sub",
            "a/b",
        ],
        &["pair", "--name", "x", "--window", "0"],
        &["pair", "--name", "x", "--window", "soon"],
        &["pair", "--name", "x", "--bundle", "d", "--window", "5m"],
        &["pair", "--list", "--role", "integration"],
    ] {
        let r = hubctl(&hub.socket, args).await;
        assert_eq!(r.code, 2, "{args:?}: {}", r.err);
        assert_eq!(r.out, "", "{args:?}");
        assert!(r.err.starts_with("error: "), "{args:?}: {}", r.err);
    }
    let r = hubctl(&hub.socket, &["pair", "--name", "x", "--allow-pub", "a/b"]).await;
    assert!(
        r.err.starts_with(
            "error: --allow-pub and --allow-sub need --role integration: \
             a device has only its own topics\n\nUsage: hubctl pair "
        ),
        "{}",
        r.err
    );
    assert!(take_calls(&calls).is_empty());
}

#[tokio::test]
async fn pair_list_and_cancel() {
    let (fake, calls) = recording();
    let hub = start(fake);
    assert_eq!(
        ok(&hub.socket, &["pair", "--list"]).await,
        "CLAIM   NAME                ROLE         EXPIRES                  FAILURES\n\
         c1a1m   Hall light          device       2026-01-05 10:20:30 UTC  0\n\
         9x8y7z  Node-RED\\u{1b}[31m  integration  2026-01-05 11:20:30 UTC  3\n"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(&hub.socket, &["pair", "--list", "--json"]).await).expect("json");
    assert_eq!(
        json,
        serde_json::json!({ "windows": [
            {
                "claim_id": CLAIM,
                "name": "Hall light",
                "role": "device",
                "expires_at": PAIR_EXPIRES,
                "expires_at_rfc3339": "2026-01-05T10:20:30Z",
                "failures": 0,
                "grants": { "publish": [], "subscribe": [] },
            },
            {
                "claim_id": "9x8y7z",
                "name": "Node-RED\u{1b}[31m",
                "role": "integration",
                "expires_at": PAIR_EXPIRES + 3_600,
                "expires_at_rfc3339": "2026-01-05T11:20:30Z",
                "failures": 3,
                "grants": { "publish": [], "subscribe": ["d/+/state"] },
            },
        ]})
    );

    assert_eq!(
        ok(&hub.socket, &["pair", "--cancel", CLAIM]).await,
        "cancelled pairing window c1a1m for Hall light\n"
    );
    let r = hubctl(&hub.socket, &["pair", "--cancel", "nope"]).await;
    assert_eq!(r.code, 1);
    assert_eq!(r.out, "");
    assert_eq!(
        r.err,
        "hubctl: pair --cancel nope: no open pairing window with that claim id\n"
    );
    assert_eq!(
        take_calls(&calls),
        [
            Call::CancelPairing(v1::CancelPairingRequest {
                claim_id: CLAIM.into()
            }),
            Call::CancelPairing(v1::CancelPairingRequest {
                claim_id: "nope".into()
            }),
        ]
    );
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

fn bundle_warning(key: &Path) -> String {
    format!(
        "hubctl: warning: the hub made this device's private key and it travelled \
         to {}: copy it to the device only over a channel you trust, then delete \
         every other copy. A device that can make its own key should pair with \
         `hubctl pair` instead, so that its key never leaves it.\n",
        key.display()
    )
}

#[tokio::test]
async fn pair_bundle_writes_0600_files_and_warns() {
    let (fake, calls) = recording();
    let hub = start(fake);
    let work = tempfile::tempdir().expect("tempdir");
    let dir = work.path().join("new").join("porch");
    let dir_arg = dir.to_str().expect("utf-8 temp path");
    let args = ["pair", "--name", "Porch sensor", "--bundle", dir_arg];

    let r = hubctl(&hub.socket, &args).await;
    assert_eq!(r.code, 0, "{}", r.err);
    assert_eq!(r.out, "n3wd3v\n");
    assert_eq!(r.err, bundle_warning(&dir.join("key.pem")));
    for (file, pem) in [
        ("key.pem", KEY_PEM),
        ("cert.pem", CERT_PEM),
        ("ca.pem", CA_PEM),
    ] {
        let path = dir.join(file);
        assert_eq!(std::fs::read_to_string(&path).expect(file), pem);
        assert_eq!(mode_of(&path), 0o600, "{file}");
    }
    assert_eq!(mode_of(&dir), 0o700);
    assert_eq!(
        take_calls(&calls),
        [Call::EnrollBundle(v1::EnrollBundleRequest {
            name: "Porch sensor".into(),
            role: v1::Role::Device.into(),
            grants: None,
        })]
    );

    // Existing files are refused before hubd makes a key.
    let r = hubctl(&hub.socket, &args).await;
    assert_eq!(r.code, 1);
    assert_eq!(r.out, "");
    assert_eq!(
        r.err,
        format!(
            "hubctl: pair Porch sensor --bundle: {}: already exists (use --force to replace it)\n",
            dir.join("key.pem").display()
        )
    );
    assert!(take_calls(&calls).is_empty());
    // Any one of the three is enough to refuse.
    let other = work.path().join("other");
    std::fs::create_dir(&other).expect("mkdir");
    std::fs::write(other.join("ca.pem"), "old").expect("write");
    let other_arg = other.to_str().expect("utf-8 temp path");
    let r = hubctl(&hub.socket, &["pair", "--name", "x", "--bundle", other_arg]).await;
    assert_eq!(r.code, 1);
    assert!(r.err.contains("ca.pem: already exists"), "{}", r.err);
    assert!(take_calls(&calls).is_empty());

    // --force replaces them, still 0600, even over a file that was wider open.
    std::fs::set_permissions(dir.join("cert.pem"), std::fs::Permissions::from_mode(0o644))
        .expect("chmod");
    let forced: Vec<&str> = args.iter().copied().chain(["--force"]).collect();
    let r = hubctl(&hub.socket, &forced).await;
    assert_eq!((r.code, r.out.as_str()), (0, "n3wd3v\n"), "{}", r.err);
    for file in ["key.pem", "cert.pem", "ca.pem"] {
        assert_eq!(mode_of(&dir.join(file)), 0o600, "{file}");
    }
    assert_eq!(take_calls(&calls).len(), 1);

    // An integration's bundle carries its grants.
    let ha = work.path().join("ha");
    let ha_arg = ha.to_str().expect("utf-8 temp path");
    let r = hubctl(
        &hub.socket,
        &[
            "pair",
            "--name",
            "HA",
            "--bundle",
            ha_arg,
            "--role",
            "integration",
            "--allow-sub",
            "d/+/state",
        ],
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.err);
    assert_eq!(
        take_calls(&calls),
        [Call::EnrollBundle(v1::EnrollBundleRequest {
            name: "HA".into(),
            role: v1::Role::Integration.into(),
            grants: Some(grants(&[], &["d/+/state"])),
        })]
    );
}

#[tokio::test]
async fn devices_rename_prints_the_device() {
    let (fake, calls) = recording();
    let hub = start(fake);
    assert_eq!(
        ok(
            &hub.socket,
            &["devices", "rename", "7h3k2m", "Hall thermostat"]
        )
        .await,
        "id:    7h3k2m\n\
         name:  Hall thermostat\n\
         role:  device\n\
         state: active\n"
    );
    assert_eq!(
        take_calls(&calls),
        [Call::Rename(v1::RenameDeviceRequest {
            id: "7h3k2m".into(),
            name: "Hall thermostat".into(),
        })]
    );
    let r = hubctl(&hub.socket, &["devices", "rename", "nope", "x"]).await;
    assert_eq!(r.code, 1);
    assert_eq!(r.err, "hubctl: devices rename nope: no such device\n");
}

#[tokio::test]
async fn devices_remove_reports_connection_and_reset() {
    let (fake, calls) = recording();
    let hub = start(fake);
    for (args, want) in [
        (
            &["devices", "remove", "7h3k2m"][..],
            "removed 7h3k2m (was connected)\n",
        ),
        (
            &["devices", "remove", "a1b2c3"],
            "removed a1b2c3 (was not connected)\n",
        ),
        (
            &["devices", "remove", "7h3k2m", "--reset"],
            "removed 7h3k2m (was connected; reset acknowledged)\n",
        ),
        (
            &["devices", "remove", "h0m3as", "--reset", "--timeout", "2s"],
            "removed h0m3as (was connected; reset sent, not acknowledged)\n",
        ),
        (
            &["devices", "remove", "a1b2c3", "--reset"],
            "removed a1b2c3 (was not connected; reset not sent)\n",
        ),
    ] {
        assert_eq!(ok(&hub.socket, args).await, want, "{args:?}");
    }
    let remove = |id: &str, reset: bool, reset_timeout_seconds: u32| {
        Call::Remove(v1::RemoveDeviceRequest {
            id: id.into(),
            reset,
            reset_timeout_seconds,
        })
    };
    assert_eq!(
        take_calls(&calls),
        [
            remove("7h3k2m", false, 0),
            remove("a1b2c3", false, 0),
            remove("7h3k2m", true, 0),
            remove("h0m3as", true, 2),
            remove("a1b2c3", true, 0),
        ]
    );
    // --timeout only means something with --reset.
    let r = hubctl(
        &hub.socket,
        &["devices", "remove", "7h3k2m", "--timeout", "2s"],
    )
    .await;
    assert_eq!(r.code, 2, "{}", r.err);
    assert!(take_calls(&calls).is_empty());
}

#[tokio::test]
async fn isolate_and_release() {
    let (fake, calls) = recording();
    let hub = start(fake);
    assert_eq!(
        ok(
            &hub.socket,
            &[
                "isolate",
                "7h3k2m",
                "--reason",
                "vendor stopped updates\x1b[2J"
            ]
        )
        .await,
        "id:               7h3k2m\n\
         name:             Küche Thermostat\n\
         role:             device\n\
         state:            isolated\n\
         isolation reason: vendor stopped updates\\u{1b}[2J\n"
    );
    assert_eq!(
        ok(&hub.socket, &["release", "a1b2c3"]).await,
        "id:    a1b2c3\n\
         name:  台所のセンサー\n\
         role:  device\n\
         state: active\n"
    );
    assert_eq!(
        take_calls(&calls),
        [
            Call::Isolate(v1::IsolateDeviceRequest {
                id: "7h3k2m".into(),
                reason: "vendor stopped updates\x1b[2J".into(),
            }),
            Call::Release(v1::ReleaseDeviceRequest {
                id: "a1b2c3".into()
            }),
        ]
    );

    // The reason is required, and may not be empty.
    for args in [
        &["isolate", "7h3k2m"][..],
        &["isolate", "7h3k2m", "--reason", ""],
    ] {
        let r = hubctl(&hub.socket, args).await;
        assert_eq!(r.code, 2, "{args:?}: {}", r.err);
        assert_eq!(r.out, "");
    }
    let r = hubctl(&hub.socket, &["isolate", "7h3k2m"]).await;
    assert!(r.err.contains("--reason <TEXT>"), "{}", r.err);
    assert!(take_calls(&calls).is_empty());

    let r = hubctl(&hub.socket, &["release", "nope"]).await;
    assert_eq!(r.code, 1);
    assert_eq!(r.err, "hubctl: release nope: no such device\n");
}

#[tokio::test]
async fn grant_and_revoke_grant() {
    let (fake, calls) = recording();
    let hub = start(fake);
    assert_eq!(
        ok(
            &hub.socket,
            &[
                "devices",
                "grant",
                "h0m3as",
                "--allow-sub",
                "d/+/meta",
                "--allow-pub",
                "d/7h3k2m/cmd/#",
            ]
        )
        .await,
        "id:            h0m3as\n\
         name:          Home Assistant\n\
         role:          integration\n\
         state:         active\n\
         may publish:   d/+/cmd/#, d/7h3k2m/cmd/#\n\
         may subscribe: d/+/state, d/+/meta\n"
    );
    assert_eq!(
        ok(
            &hub.socket,
            &[
                "devices",
                "revoke-grant",
                "h0m3as",
                "--allow-pub",
                "d/+/cmd/#"
            ]
        )
        .await,
        "id:            h0m3as\n\
         name:          Home Assistant\n\
         role:          integration\n\
         state:         active\n\
         may publish:   -\n\
         may subscribe: d/+/state\n"
    );
    assert_eq!(
        take_calls(&calls),
        [
            Call::UpdateGrants(v1::UpdateGrantsRequest {
                id: "h0m3as".into(),
                grants: Some(grants(&["d/7h3k2m/cmd/#"], &["d/+/meta"])),
                revoke: false,
            }),
            Call::UpdateGrants(v1::UpdateGrantsRequest {
                id: "h0m3as".into(),
                grants: Some(grants(&["d/+/cmd/#"], &[])),
                revoke: true,
            }),
        ]
    );

    // At least one filter is a usage error before hubd is asked.
    for args in [
        &["devices", "grant", "h0m3as"][..],
        &["devices", "revoke-grant", "h0m3as"],
    ] {
        let r = hubctl(&hub.socket, args).await;
        assert_eq!(r.code, 2, "{args:?}: {}", r.err);
        assert!(
            r.err.contains("--allow-pub <FILTER>|--allow-sub <FILTER>"),
            "{}",
            r.err
        );
    }
    assert!(take_calls(&calls).is_empty());

    // hubd's refusal for a device is passed on.
    let r = hubctl(
        &hub.socket,
        &["devices", "grant", "7h3k2m", "--allow-sub", "#"],
    )
    .await;
    assert_eq!(r.code, 1);
    assert_eq!(
        r.err,
        "hubctl: devices grant 7h3k2m: only an integration has grants\n"
    );
}
