//! The admin API: gRPC (package `hub.v1`) on a Unix socket.
//!
//! This is the only module that knows protobuf: it converts between the
//! generated types and the domain by hand, and maps every domain error to a
//! gRPC status in one exhaustive `From`.
//!
//! Authorisation happens per connection, before any RPC runs: the accept loop
//! reads the peer's credentials with `SO_PEERCRED` and decides once whether
//! the caller may administer the hub (uid 0, the daemon's own uid, or a member
//! of the configured admin group). A refused connection stays open, and every
//! RPC on it answers `PERMISSION_DENIED`, so the caller learns why.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use hub_proto::v1 as pb;
use hub_proto::v1::admin_server::{Admin, AdminServer};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::unistd::{Gid, Group, Uid, User};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::automation::{self, AutomationHandle, RuleName};
use crate::bus::BusTx;
use crate::edge::{self, EdgeHandle};
use crate::lifecycle::LifecycleHandle;
use crate::model::{DeviceId, DeviceName, Grants, Qos, Role};
use crate::pairing::{SetupCode, WindowInfo};
use crate::registry::{self, RegistryHandle};
use crate::seclog::{Event, Kind, SecLog, Severity};
use crate::store::{self, DeviceRecord, DeviceState, RetainedKind};
use crate::wipe;

mod audit;
mod lifecycle;

/// The largest CSR accepted, PEM: a P-256 CSR is well under 1 KiB.
const MAX_CSR_BYTES: usize = 16 * 1024;

/// Errors binding or serving the admin socket.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("admin socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin socket {0}: another hubd is already listening there")]
    InUse(PathBuf),
    #[error("admin api: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Binds the admin socket at `path`: creates its directory if missing, removes
/// a stale socket left by a crash (but refuses if a live hubd answers there),
/// sets mode 0660 and, when `group` exists, that group.
pub async fn bind_admin_socket(path: &Path, group: &str) -> Result<UnixListener, Error> {
    let bind_err = |source| Error::Bind {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty() && !p.exists())
    {
        std::fs::create_dir_all(parent).map_err(bind_err)?;
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))
            .map_err(bind_err)?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(Error::InUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(bind_err)?;
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(bind_err)?;
    match Group::from_name(group) {
        // Under the packaged unit hubd runs with the admin group as its
        // primary group, so the socket is born with it: no chown, which the
        // unit's system call filter refuses.
        Ok(Some(g)) if socket_gid(path) == Some(g.gid.as_raw()) => {}
        Ok(Some(g)) => {
            if let Err(e) = nix::unistd::chown(path, None, Some(g.gid)) {
                warn!(socket = %path.display(), %group, error = %e, "cannot give the admin socket to the admin group");
            }
        }
        Ok(None) => {
            info!(%group, "admin group does not exist: only root and the hubd user may administer")
        }
        Err(e) => warn!(%group, error = %e, "cannot look up the admin group"),
    }
    Ok(listener)
}

/// The group that owns the file at `path`, if it can be read.
fn socket_gid(path: &Path) -> Option<u32> {
    std::fs::metadata(path).ok().map(|m| m.gid())
}

/// Who is on the other end of an admin connection, and whether they may act.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
    pub allowed: bool,
}

/// The admission rule, pure so it can be tested without other users: root,
/// the daemon's own uid, or a member (primary or supplementary) of the admin group.
pub fn may_administer(
    uid: u32,
    gid: u32,
    own_uid: u32,
    admin_gid: Option<u32>,
    groups: &[u32],
) -> bool {
    uid == 0
        || uid == own_uid
        || admin_gid.is_some_and(|admin| gid == admin || groups.contains(&admin))
}

fn caller_of(stream: &UnixStream, admin_group: &str) -> Caller {
    let Ok(cred) = getsockopt(stream, PeerCredentials) else {
        // No credentials, no entry: a caller we cannot identify is not allowed.
        return Caller {
            uid: u32::MAX,
            gid: u32::MAX,
            pid: 0,
            allowed: false,
        };
    };
    let (uid, gid) = (cred.uid(), cred.gid());
    let admin_gid = Group::from_name(admin_group)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw());
    let groups = match (admin_gid, User::from_uid(Uid::from_raw(uid))) {
        (Some(_), Ok(Some(user))) => {
            let name = std::ffi::CString::new(user.name).unwrap_or_default();
            nix::unistd::getgrouplist(&name, Gid::from_raw(gid))
                .map(|gs| gs.into_iter().map(Gid::as_raw).collect())
                .unwrap_or_default()
        }
        _ => Vec::new(),
    };
    let allowed = may_administer(uid, gid, Uid::effective().as_raw(), admin_gid, &groups);
    Caller {
        uid,
        gid,
        pid: cred.pid(),
        allowed,
    }
}

/// An accepted admin connection with the caller checked at accept time.
struct AdminConn {
    stream: UnixStream,
    caller: Caller,
}

impl Connected for AdminConn {
    type ConnectInfo = Caller;

    fn connect_info(&self) -> Caller {
        self.caller
    }
}

impl AsyncRead for AdminConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for AdminConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Everything the RPCs need.
#[derive(Clone)]
pub struct ApiState {
    pub registry: RegistryHandle,
    pub edge: EdgeHandle,
    pub automation: AutomationHandle,
    /// For the count of device events automation missed.
    pub bus: BusTx,
    /// `[hub] name` and `[privacy] history_days`, for privacy and export.
    pub hub_name: String,
    pub history_days: u32,
    /// Where a wipe is handed to the daemon, and the flag that refuses
    /// every other call while one runs.
    pub wipe: tokio::sync::mpsc::Sender<wipe::Job>,
    pub wiping: Arc<AtomicBool>,
    pub started: Instant,
    pub max_payload: usize,
    pub lifecycle: LifecycleHandle,
    /// `[lifecycle] isolate_after_support_end` and `support_warning_days`.
    pub lifecycle_cfg: (bool, u32),
    pub seclog: SecLog,
    /// `[seclog] retention_days`, for privacy.
    pub seclog_days: u32,
    /// `[lifecycle] max_image_size`: the admin socket takes messages this
    /// large (and 1 MiB more).
    pub max_image_size: usize,
    /// The state directory, for the audit's file checks.
    pub state_dir: PathBuf,
    /// `[edge] allow_tls12`, for the audit.
    pub allow_tls12: bool,
}

impl Service {
    /// Tells the edge which devices are isolated now.
    async fn refresh_isolated(&self) -> Result<(), Status> {
        let registry = self.state.registry.clone();
        let isolated = blocking(move || registry.isolated()).await?;
        self.state.edge.set_isolated(isolated);
        Ok(())
    }
}

struct Service {
    state: ApiState,
    /// Ends open `Watch` streams when the API stops: graceful shutdown waits
    /// for every stream, and a watch would otherwise never finish.
    stop: CancellationToken,
}

/// Serves the admin API on `listener` until `shutdown`.
pub async fn serve(
    listener: UnixListener,
    state: ApiState,
    admin_group: String,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let incoming = async_stream(listener, admin_group);
    let wiping = state.wiping.clone();
    // A firmware image travels in one AddFirmware request; every other
    // message is small (a rules file is at most 1 MiB).
    let max_message = state.max_image_size + 1024 * 1024;
    let server = AdminServer::new(Service {
        state,
        stop: shutdown.clone(),
    })
    .max_decoding_message_size(max_message)
    .max_encoding_message_size(usize::MAX);
    let service =
        tonic::service::interceptor::InterceptedService::new(server, move |request: Request<()>| {
            let request = authorize(request)?;
            // The wipe's own call is already past this point.
            if wiping.load(Ordering::SeqCst) {
                return Err(Status::unavailable(
                    "the hub is being wiped; try again when it has started afresh",
                ));
            }
            Ok(request)
        });
    tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await?;
    Ok(())
}

/// Turns the listener into a stream of checked connections.
fn async_stream(
    listener: UnixListener,
    admin_group: String,
) -> impl futures::Stream<Item = std::io::Result<AdminConn>> {
    futures::stream::unfold((listener, admin_group), |(listener, group)| async move {
        let conn = listener.accept().await.map(|(stream, _)| {
            let caller = caller_of(&stream, &group);
            if !caller.allowed {
                warn!(target: "security", uid = caller.uid, pid = caller.pid, "admin connection from a caller who may not administer");
            }
            AdminConn { stream, caller }
        });
        Some((conn, (listener, group)))
    })
}

fn authorize(request: Request<()>) -> Result<Request<()>, Status> {
    match request.extensions().get::<Caller>() {
        Some(caller) if caller.allowed => Ok(request),
        Some(caller) => Err(Status::permission_denied(format!(
            "uid {} may not administer this hub: run as root or as a member of the admin group",
            caller.uid
        ))),
        None => Err(Status::permission_denied("caller credentials unknown")),
    }
}

impl From<registry::Error> for Status {
    fn from(e: registry::Error) -> Status {
        match e {
            registry::Error::NotFound(_) => Status::not_found(e.to_string()),
            registry::Error::BadCsr(_) | registry::Error::BadGrant(_) => {
                Status::invalid_argument(e.to_string())
            }
            registry::Error::Revoked(_) | registry::Error::NotIntegration(_) => {
                Status::failed_precondition(e.to_string())
            }
            registry::Error::Ca(_) | registry::Error::Store(_) | registry::Error::KeyGen(_) => {
                Status::internal(e.to_string())
            }
        }
    }
}

impl From<automation::Error> for Status {
    fn from(e: automation::Error) -> Status {
        match e {
            automation::Error::Rules(ref problems) => Status::invalid_argument(format!(
                "refused, nothing changed ({} problem{}):\n{e}",
                problems.len(),
                if problems.len() == 1 { "" } else { "s" }
            )),
            automation::Error::BadName { .. } | automation::Error::BadEvent { .. } => {
                Status::invalid_argument(e.to_string())
            }
            automation::Error::UnknownRule(_) => Status::not_found(e.to_string()),
            automation::Error::Store(_) => Status::internal(e.to_string()),
            automation::Error::Stopped => Status::unavailable(e.to_string()),
        }
    }
}

/// The largest rules file accepted: far beyond any household's rules.
const MAX_RULES_TEXT: usize = 1024 * 1024;

/// The name a rules file is called by in messages ("rules" when the caller
/// gave none), once its size is checked.
fn rules_file(text: &str, file: String) -> Result<String, Status> {
    let file = if file.is_empty() {
        "rules".to_owned()
    } else {
        file
    };
    if text.len() > MAX_RULES_TEXT {
        return Err(Status::invalid_argument(format!(
            "{file}: {} bytes, more than the {MAX_RULES_TEXT} a rules file may have",
            text.len()
        )));
    }
    Ok(file)
}

fn rule_names(names: &[String]) -> Result<Vec<RuleName>, Status> {
    if names.is_empty() {
        return Err(Status::invalid_argument("names: name at least one rule"));
    }
    names
        .iter()
        .map(|n| RuleName::parse(n).map_err(|e| Status::invalid_argument(e.to_string())))
        .collect()
}

fn unix_or_zero(t: Option<jiff::Timestamp>) -> i64 {
    t.map_or(0, |t| t.as_second())
}

impl From<edge::Error> for Status {
    fn from(e: edge::Error) -> Status {
        match e {
            edge::Error::Topic { .. } => Status::invalid_argument(e.to_string()),
            edge::Error::Isolated(_) => Status::failed_precondition(e.to_string()),
            edge::Error::Pairing(_) => Status::failed_precondition(e.to_string()),
            edge::Error::Tls(_)
            | edge::Error::Restore(_)
            | edge::Error::Verifier(_)
            | edge::Error::Link(_)
            | edge::Error::Join(_)
            | edge::Error::Listener(_)
            | edge::Error::Seclog(_) => Status::internal(e.to_string()),
            edge::Error::Registry(r) => r.into(),
        }
    }
}

fn parse_id(field: &str, id: &str) -> Result<DeviceId, Status> {
    DeviceId::parse(id).map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

fn role_to_pb(role: Role) -> pb::Role {
    match role {
        Role::Device => pb::Role::Device,
        Role::Integration => pb::Role::Integration,
    }
}

fn role_from_pb(field: &str, role: i32) -> Result<Role, Status> {
    match pb::Role::try_from(role) {
        Ok(pb::Role::Unspecified | pb::Role::Device) => Ok(Role::Device),
        Ok(pb::Role::Integration) => Ok(Role::Integration),
        Err(_) => Err(Status::invalid_argument(format!(
            "{field}: unknown role {role}"
        ))),
    }
}

fn grants_to_pb(g: &Grants) -> pb::Grants {
    pb::Grants {
        publish: g.publish.clone(),
        subscribe: g.subscribe.clone(),
    }
}

fn grants_from_pb(g: Option<pb::Grants>) -> Grants {
    let g = g.unwrap_or_default();
    Grants {
        publish: g.publish,
        subscribe: g.subscribe,
    }
}

fn parse_name(name: &str) -> Result<DeviceName, Status> {
    DeviceName::parse(name).map_err(|e| Status::invalid_argument(format!("name: {e}")))
}

/// Role and grants of a new client: grants only for integrations.
fn role_and_grants(role: i32, grants: Option<pb::Grants>) -> Result<(Role, Grants), Status> {
    let role = role_from_pb("role", role)?;
    let grants = grants_from_pb(grants);
    if role == Role::Device && grants != Grants::default() {
        return Err(Status::invalid_argument(
            "grants: only integrations have grants (use role integration)",
        ));
    }
    registry::validate_grants(&grants).map_err(Status::from)?;
    Ok((role, grants))
}

fn window_to_pb(info: &WindowInfo, code: Option<&SetupCode>, uri: String) -> pb::PairingWindow {
    let remaining = info.expires_at.saturating_duration_since(Instant::now());
    pb::PairingWindow {
        claim_id: info.claim.clone(),
        name: info.name.clone(),
        role: role_to_pb(info.role) as i32,
        code: code.map(|c| c.to_string()).unwrap_or_default(),
        uri,
        expires_at: time::OffsetDateTime::now_utc().unix_timestamp() + remaining.as_secs() as i64,
        failures: info.failures,
        grants: Some(grants_to_pb(&info.grants)),
    }
}

impl Service {
    /// Records an admin's change in the security log, durably; a failure
    /// to record is logged (the change itself is already made).
    async fn note(&self, event: Event) {
        if let Err(e) = self.state.seclog.record_durable(event).await {
            warn!(error = %e, "cannot record an admin change in the security log");
        }
    }

    /// A device's message, with its lifecycle fields.
    fn device_pb(&self, d: &DeviceRecord, connected: bool) -> pb::Device {
        let mut p = device_to_pb(d, connected);
        lifecycle::fill_device(&mut p, d, &self.state.lifecycle);
        p
    }
}

fn device_to_pb(d: &DeviceRecord, connected: bool) -> pb::Device {
    pb::Device {
        id: d.id.to_string(),
        name: d.name.clone(),
        state: match d.state {
            DeviceState::Active => pb::DeviceState::Active,
            DeviceState::Isolated => pb::DeviceState::Isolated,
            DeviceState::Revoked => pb::DeviceState::Revoked,
        } as i32,
        role: role_to_pb(d.role) as i32,
        isolation_reason: d.isolation_reason.clone().unwrap_or_default(),
        grants: Some(grants_to_pb(&d.grants)),
        kind: d.kind.clone().unwrap_or_default(),
        connected,
        cert_serial: d.cert_serial.clone(),
        cert_not_after: d.cert_not_after,
        created_at: d.created_at,
        last_seen: d.last_seen,
        ..Default::default()
    }
}

/// Runs blocking registry work (redb, signing) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, registry::Error> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("task failed: {e}")))?
        .map_err(Status::from)
}

#[tonic::async_trait]
impl Admin for Service {
    type WatchStream =
        Pin<Box<dyn futures::Stream<Item = Result<pb::WatchMessage, Status>> + Send>>;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let filter = req.into_inner().filter;
        let rx = self.state.edge.watch(&filter).await?;
        let stop = self.stop.clone().cancelled_owned();
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx)
            .take_until(stop)
            .map(|m| {
                Ok(pb::WatchMessage {
                    topic: m.topic,
                    payload: m.payload.to_vec(),
                    retain: m.retain,
                })
            });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let registry = self.state.registry.clone();
        let devices = blocking(move || registry.devices()).await?;
        let known = devices.len();
        let summary = self.state.lifecycle.summary(&devices);
        let seclog = self.seclog_status().await?;
        let automation = self.state.automation.status().await?;
        let c = self.state.edge.counters();
        let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        Ok(Response::new(pb::StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            protocol_version: hub_proto::PROTOCOL_VERSION,
            uptime_seconds: self.state.started.elapsed().as_secs(),
            devices_known: known as u64,
            devices_connected: self.state.edge.connected().len() as u64,
            counters: Some(pb::MessageCounters {
                publishes_received: get(&c.publishes_received),
                publishes_sent: get(&c.publishes_sent),
                acl_denied: get(&c.acl_denied),
                dropped_slow_subscriber: get(&c.dropped_slow_subscriber),
                handshakes_ok: get(&c.handshakes_ok),
                handshakes_failed: get(&c.handshakes_failed),
                connections_refused: get(&c.connections_refused),
                sessions_refused: get(&c.sessions_refused),
                protocol_errors: get(&c.protocol_errors),
                connections_admitted: get(&c.connections_admitted),
                connections_deferred: get(&c.connections_deferred),
            }),
            ca_fingerprint: self.state.registry.ca_fingerprint().to_owned(),
            mqtt_listen: self.state.edge.local_addr().to_string(),
            clock_warning: crate::clock::warning().unwrap_or_default(),
            hub_name: self.state.hub_name.clone(),
            automation: Some(pb::AutomationStatus {
                rules: automation.rules,
                rules_enabled: automation.enabled,
                runs: automation.runs,
                refused: automation.refused,
                waiting_for_clock: automation.waiting_for_clock,
                events_dropped: self.state.bus.dropped(),
                problem: automation.problem.unwrap_or_default(),
            }),
            lifecycle: Some(pb::LifecycleStatus {
                support_ended: summary.support_ended,
                support_ending: summary.support_ending,
                support_unknown: summary.support_unknown,
                ended_not_isolated: summary.ended_not_isolated,
                integrity_problems: summary.integrity_problems,
                updates_in_progress: summary.updates_in_progress,
                updates_failed: summary.updates_failed,
                isolate_after_support_end: self.state.lifecycle_cfg.0,
                support_warning_days: self.state.lifecycle_cfg.1,
            }),
            seclog: Some(seclog),
        }))
    }

    async fn apply_rules(
        &self,
        req: Request<pb::ApplyRulesRequest>,
    ) -> Result<Response<pb::ApplyRulesResponse>, Status> {
        let actor = lifecycle::actor(&req);
        let req = req.into_inner();
        let file = rules_file(&req.text, req.file)?;
        let diff = self.state.automation.apply(&req.text, &file).await?;
        self.note(
            Event::new(
                Kind::RulesChanged,
                Severity::Info,
                format!(
                    "rules applied from {file}: {} added, {} changed, {} removed",
                    diff.added.len(),
                    diff.changed.len(),
                    diff.removed.len()
                ),
            )
            .actor(actor),
        )
        .await;
        Ok(Response::new(pb::ApplyRulesResponse {
            added: diff.added,
            changed: diff
                .changed
                .into_iter()
                .map(|(name, diff)| pb::RuleChange { name, diff })
                .collect(),
            removed: diff.removed,
            unchanged: diff.unchanged,
        }))
    }

    async fn list_rules(
        &self,
        _: Request<pb::ListRulesRequest>,
    ) -> Result<Response<pb::ListRulesResponse>, Status> {
        let rules = self.state.automation.rules().await?;
        let rules = rules
            .into_iter()
            .map(|r| pb::Rule {
                name: r.name,
                enabled: r.enabled,
                description: r.description.unwrap_or_default(),
                trigger: r.trigger,
                source: r.source,
                updated_at: r.updated_at,
                runs: r.runs,
                refused: r.refused,
                last_run: unix_or_zero(r.last_run),
                last_outcome: r.last_outcome.unwrap_or_default(),
                next_fire: unix_or_zero(r.next_fire),
            })
            .collect();
        Ok(Response::new(pb::ListRulesResponse { rules }))
    }

    async fn set_rules_enabled(
        &self,
        req: Request<pb::SetRulesEnabledRequest>,
    ) -> Result<Response<pb::SetRulesEnabledResponse>, Status> {
        let actor = lifecycle::actor(&req);
        let req = req.into_inner();
        let names = rule_names(&req.names)?;
        let changed = self
            .state
            .automation
            .set_enabled(&names, req.enabled)
            .await?;
        let verb = if req.enabled { "enabled" } else { "disabled" };
        self.note(
            Event::new(
                Kind::RulesChanged,
                Severity::Info,
                format!("rules {verb}: {}", changed.join(", ")),
            )
            .actor(actor),
        )
        .await;
        Ok(Response::new(pb::SetRulesEnabledResponse { changed }))
    }

    async fn remove_rules(
        &self,
        req: Request<pb::RemoveRulesRequest>,
    ) -> Result<Response<pb::RemoveRulesResponse>, Status> {
        let actor = lifecycle::actor(&req);
        let names = rule_names(&req.into_inner().names)?;
        self.state.automation.remove(&names).await?;
        self.note(
            Event::new(
                Kind::RulesChanged,
                Severity::Info,
                format!("{} rules removed", names.len()),
            )
            .actor(actor),
        )
        .await;
        Ok(Response::new(pb::RemoveRulesResponse {}))
    }

    async fn test_rules(
        &self,
        req: Request<pb::TestRulesRequest>,
    ) -> Result<Response<pb::TestRulesResponse>, Status> {
        let req = req.into_inner();
        let file = rules_file(&req.text, req.file)?;
        if req.events.is_empty() {
            return Err(Status::invalid_argument(
                "events: give at least one --event",
            ));
        }
        let at = (!req.at.is_empty()).then_some(req.at.as_str());
        let steps = self
            .state
            .automation
            .test(&req.text, &file, &req.events, at)
            .await?;
        let steps = steps
            .into_iter()
            .map(|step| pb::TestStep {
                event: step.event,
                rules: step
                    .rules
                    .into_iter()
                    .map(|r| {
                        let (outcome, condition, actions) = match r.outcome {
                            automation::dryrun::Outcome::Fires(a) => ("fires", 0, a),
                            automation::dryrun::Outcome::ConditionFails(i) => (
                                "condition_fails",
                                u32::try_from(i).unwrap_or(u32::MAX),
                                Vec::new(),
                            ),
                            automation::dryrun::Outcome::Disabled(a) => ("disabled", 0, a),
                        };
                        pb::TestRuleOutcome {
                            rule: r.rule,
                            outcome: outcome.to_owned(),
                            condition,
                            actions,
                        }
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::TestRulesResponse { steps }))
    }

    async fn privacy(
        &self,
        _: Request<pb::PrivacyRequest>,
    ) -> Result<Response<pb::PrivacyResponse>, Status> {
        let registry = self.state.registry.clone();
        let counts =
            blocking(move || registry.store().counts().map_err(registry::Error::from)).await?;
        let runs = self.state.automation.history(None, usize::MAX).await?.len();
        let days = self.state.history_days;
        let items = store::INVENTORY
            .iter()
            .map(|item| {
                let count = match item.table {
                    Some(table) => counts
                        .iter()
                        .find(|(name, _)| *name == table)
                        .map_or(-1, |(_, n)| i64::try_from(*n).unwrap_or(i64::MAX)),
                    None if item.export == Some("rule_runs") => runs as i64,
                    None => -1,
                };
                let retention = match item.retention {
                    store::Retention::UntilRemoved => "until you remove it".to_owned(),
                    store::Retention::LatestOnly => {
                        "the latest only; removed with its device".to_owned()
                    }
                    store::Retention::HistoryDays if days == 0 => {
                        "not kept ([privacy] history_days = 0)".to_owned()
                    }
                    store::Retention::HistoryDays => {
                        format!("{days} days ([privacy] history_days), pruned hourly")
                    }
                    store::Retention::MemoryOnly => {
                        "in memory only, the most recent runs; gone at restart".to_owned()
                    }
                    store::Retention::WithTheCa => {
                        "as long as this hub's CA (hubctl wipe ends it)".to_owned()
                    }
                    store::Retention::Journal => "the system journal's own settings".to_owned(),
                    store::Retention::SeclogDays => format!(
                        "{} days ([seclog] retention_days), pruned hourly",
                        self.state.seclog_days
                    ),
                };
                pb::PrivacyItem {
                    place: item.place.to_owned(),
                    holds: item.holds.to_owned(),
                    why: item.why.to_owned(),
                    retention,
                    count,
                    export_key: item.export.unwrap_or_default().to_owned(),
                }
            })
            .collect();
        Ok(Response::new(pb::PrivacyResponse { items }))
    }

    async fn export(
        &self,
        _: Request<pb::ExportRequest>,
    ) -> Result<Response<pb::ExportResponse>, Status> {
        let registry = self.state.registry.clone();
        let (devices, certs, retained, history, events) = blocking(move || {
            let store = registry.store();
            let first = store.seclog_anchor()?.first_seq;
            Ok::<_, registry::Error>((
                store.devices()?,
                store.all_certs()?,
                store.retained()?,
                store.history(None)?,
                store.seclog(first, usize::MAX)?,
            ))
        })
        .await?;
        let rules = self.state.automation.rules().await?;
        let variables = self.state.automation.variables().await?;
        let runs = self.state.automation.history(None, usize::MAX).await?;
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        let as_json = |bytes: &[u8]| {
            serde_json::from_slice::<serde_json::Value>(bytes)
                .unwrap_or_else(|_| serde_json::Value::String(text(bytes)))
        };
        let mut states: std::collections::BTreeMap<
            String,
            serde_json::Map<String, serde_json::Value>,
        > = Default::default();
        for (id, which, payload) in &retained {
            states
                .entry(id.to_string())
                .or_default()
                .insert(which.suffix().to_owned(), as_json(payload));
        }
        let doc = serde_json::json!({
            "format": "hubd-export/1",
            "hub": self.state.hub_name,
            "exported_at": jiff::Timestamp::now().round(jiff::Unit::Second).map_or_else(|_| String::new(), |t| t.to_string()),
            "devices": devices.iter().map(|d| serde_json::json!({
                "id": d.id.as_str(),
                "name": d.name,
                "kind": d.kind,
                "role": format!("{:?}", d.role).to_lowercase(),
                "state": format!("{:?}", d.state).to_lowercase(),
                "isolation_reason": d.isolation_reason,
                "grants": { "publish": d.grants.publish, "subscribe": d.grants.subscribe },
                "created_at": d.created_at,
                "last_seen": d.last_seen,
                "lifecycle": d.lifecycle,
            })).collect::<Vec<_>>(),
            "certificates": certs.iter().map(|c| serde_json::json!({
                "serial": c.serial_hex,
                "device": c.device.as_str(),
                "issued_at": c.issued_at,
                "not_after": c.not_after,
                "revoked_at": c.revoked_at,
            })).collect::<Vec<_>>(),
            "states": states,
            "history": history.iter().map(|h| serde_json::json!({
                "device": h.device.as_str(),
                "at_ms": h.at_ms,
                "topic": h.topic,
                "payload": h.payload,
            })).collect::<Vec<_>>(),
            "rules": rules.iter().map(|r| serde_json::json!({
                "name": r.name,
                "enabled": r.enabled,
                "source": r.source,
            })).collect::<Vec<_>>(),
            "variables": variables.into_iter().collect::<serde_json::Map<_, _>>(),
            "rule_runs": runs.iter().map(|r| serde_json::json!({
                "rule": r.rule,
                "at": r.at.to_string(),
                "trigger": r.trigger,
                "outcome": r.outcome.to_string(),
                "actions": r.actions,
            })).collect::<Vec<_>>(),
            "security_events": events,
        });
        let json = serde_json::to_vec_pretty(&doc)
            .map_err(|e| Status::internal(format!("export: {e}")))?;
        Ok(Response::new(pb::ExportResponse { json }))
    }

    async fn set_support(
        &self,
        req: Request<pb::SetSupportRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        self.set_support_rpc(req).await.map(Response::new)
    }

    async fn trust_vendor_key(
        &self,
        req: Request<pb::TrustVendorKeyRequest>,
    ) -> Result<Response<pb::TrustVendorKeyResponse>, Status> {
        self.trust_key_rpc(req).await.map(Response::new)
    }

    async fn add_firmware(
        &self,
        req: Request<pb::AddFirmwareRequest>,
    ) -> Result<Response<pb::Firmware>, Status> {
        self.add_firmware_rpc(req).await.map(Response::new)
    }

    async fn list_firmware(
        &self,
        _: Request<pb::ListFirmwareRequest>,
    ) -> Result<Response<pb::ListFirmwareResponse>, Status> {
        self.list_firmware_rpc().await.map(Response::new)
    }

    async fn push_firmware(
        &self,
        req: Request<pb::PushFirmwareRequest>,
    ) -> Result<Response<pb::PushFirmwareResponse>, Status> {
        self.push_firmware_rpc(req).await.map(Response::new)
    }

    type ListEventsStream = lifecycle::EventStream;

    async fn list_events(
        &self,
        req: Request<pb::ListEventsRequest>,
    ) -> Result<Response<Self::ListEventsStream>, Status> {
        self.list_events_rpc(req).await.map(Response::new)
    }

    async fn verify_events(
        &self,
        _: Request<pb::VerifyEventsRequest>,
    ) -> Result<Response<pb::VerifyEventsResponse>, Status> {
        self.verify_events_rpc().await.map(Response::new)
    }

    async fn audit(
        &self,
        _: Request<pb::AuditRequest>,
    ) -> Result<Response<pb::AuditResponse>, Status> {
        Ok(Response::new(self.audit_rpc().await?))
    }

    async fn wipe(
        &self,
        req: Request<pb::WipeRequest>,
    ) -> Result<Response<pb::WipeResponse>, Status> {
        let req = req.into_inner();
        if req.confirm_name != self.state.hub_name {
            return Err(Status::invalid_argument(format!(
                "confirm_name: {:?} is not this hub's name: type the hub's short name to wipe it",
                req.confirm_name
            )));
        }
        let reset_timeout = match req.reset_timeout_seconds {
            0 => Duration::from_secs(10),
            n => Duration::from_secs(u64::from(n.min(300))),
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = wipe::Job {
            request: wipe::Request { reset_timeout },
            reply,
        };
        self.state
            .wipe
            .try_send(job)
            .map_err(|_| Status::failed_precondition("a wipe is already running"))?;
        let report = answer
            .await
            .map_err(|_| Status::internal("the wipe stopped without a report"))?
            .map_err(|why| {
                Status::internal(format!(
                    "wipe failed: {why}; hubd finishes it when it next starts"
                ))
            })?;
        let receipt = hub_proto::receipt::Receipt {
            format: hub_proto::receipt::FORMAT.to_owned(),
            hub: report.hub,
            started_at: report.started_at,
            finished_at: report.finished_at,
            old_ca_fingerprint: report.old_ca_fingerprint,
            new_ca_fingerprint: report.new_ca_fingerprint,
            destroyed: report.destroyed,
            devices_acknowledged: report.acknowledged,
            devices_not_acknowledged: report.not_acknowledged,
            new_ca_pem: report.new_ca_pem,
        };
        let receipt = hub_proto::receipt::sign(&receipt, &report.new_ca_key_pkcs8)
            .map_err(|e| Status::internal(format!("signing the receipt: {e}")))?;
        Ok(Response::new(pb::WipeResponse { receipt }))
    }

    async fn rule_history(
        &self,
        req: Request<pb::RuleHistoryRequest>,
    ) -> Result<Response<pb::RuleHistoryResponse>, Status> {
        let req = req.into_inner();
        let rule = if req.rule.is_empty() {
            None
        } else {
            Some(
                RuleName::parse(&req.rule)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?
                    .to_string(),
            )
        };
        let limit = if req.limit == 0 {
            50
        } else {
            req.limit as usize
        };
        let runs = self.state.automation.history(rule, limit).await?;
        let runs = runs
            .into_iter()
            .map(|r| pb::RuleRun {
                rule: r.rule,
                at_ms: r.at.as_millisecond(),
                trigger: r.trigger,
                outcome: r.outcome.to_string(),
                actions: r.actions,
                repeats: r.repeats,
            })
            .collect();
        Ok(Response::new(pb::RuleHistoryResponse { runs }))
    }

    async fn list_devices(
        &self,
        _: Request<pb::ListDevicesRequest>,
    ) -> Result<Response<pb::ListDevicesResponse>, Status> {
        let registry = self.state.registry.clone();
        let devices = blocking(move || registry.devices()).await?;
        let devices = devices
            .iter()
            .map(|d| self.device_pb(d, self.state.edge.is_connected(&d.id)))
            .collect();
        Ok(Response::new(pb::ListDevicesResponse { devices }))
    }

    async fn get_device(
        &self,
        req: Request<pb::GetDeviceRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        let id = parse_id("id", &req.into_inner().id)?;
        let registry = self.state.registry.clone();
        let lookup = id.clone();
        let device = blocking(move || registry.device(&lookup)).await?;
        Ok(Response::new(
            self.device_pb(&device, self.state.edge.is_connected(&id)),
        ))
    }

    async fn enroll_device(
        &self,
        req: Request<pb::EnrollDeviceRequest>,
    ) -> Result<Response<pb::EnrollDeviceResponse>, Status> {
        let actor = lifecycle::actor(&req);
        let req = req.into_inner();
        let name = DeviceName::parse(&req.name)
            .map_err(|e| Status::invalid_argument(format!("name: {e}")))?;
        if req.csr_pem.len() > MAX_CSR_BYTES {
            return Err(Status::invalid_argument(format!(
                "csr_pem: {} bytes, more than the limit of {MAX_CSR_BYTES}",
                req.csr_pem.len()
            )));
        }
        if req.csr_pem.trim().is_empty() {
            return Err(Status::invalid_argument("csr_pem: empty"));
        }
        let registry = self.state.registry.clone();
        let enrolled =
            blocking(move || registry.enroll(&name, &req.csr_pem, Role::Device, Grants::default()))
                .await?;
        self.note(
            Event::new(
                Kind::DeviceEnrolled,
                Severity::Info,
                "device enrolled from its CSR",
            )
            .device(&enrolled.device.id)
            .actor(actor),
        )
        .await;
        Ok(Response::new(pb::EnrollDeviceResponse {
            device: Some(self.device_pb(&enrolled.device, false)),
            cert_pem: enrolled.cert_pem,
            ca_chain_pem: enrolled.ca_pem,
        }))
    }

    async fn revoke_device(
        &self,
        req: Request<pb::RevokeDeviceRequest>,
    ) -> Result<Response<pb::RevokeDeviceResponse>, Status> {
        let actor = lifecycle::actor(&req);
        let id = parse_id("id", &req.into_inner().id)?;
        let registry = self.state.registry.clone();
        let target = id.clone();
        let (device, crl) = blocking(move || registry.revoke(&target)).await?;
        // New handshakes see the CRL before the live session is cut, so the
        // device's reconnect is already refused.
        self.state.edge.set_crl(crl)?;
        let was_connected = self.state.edge.disconnect(&id).await;
        self.note(
            Event::new(Kind::DeviceRevoked, Severity::Info, "device revoked")
                .device(&id)
                .actor(actor),
        )
        .await;
        Ok(Response::new(pb::RevokeDeviceResponse {
            device: Some(self.device_pb(&device, false)),
            was_connected,
        }))
    }

    async fn disconnect_device(
        &self,
        req: Request<pb::DisconnectDeviceRequest>,
    ) -> Result<Response<pb::DisconnectDeviceResponse>, Status> {
        let id = parse_id("id", &req.into_inner().id)?;
        let registry = self.state.registry.clone();
        let lookup = id.clone();
        blocking(move || registry.device(&lookup)).await?;
        let was_connected = self.state.edge.disconnect(&id).await;
        Ok(Response::new(pb::DisconnectDeviceResponse {
            was_connected,
        }))
    }

    async fn open_pairing(
        &self,
        req: Request<pb::OpenPairingRequest>,
    ) -> Result<Response<pb::PairingWindow>, Status> {
        let actor = lifecycle::actor(&req);
        let req = req.into_inner();
        let name = parse_name(&req.name)?;
        let (role, grants) = role_and_grants(req.role, req.grants)?;
        let lifetime =
            (req.window_seconds > 0).then(|| Duration::from_secs(u64::from(req.window_seconds)));
        let opened = self
            .state
            .edge
            .open_pairing(name, role, grants, lifetime)
            .await?;
        self.note(
            Event::new(
                Kind::PairingOpened,
                Severity::Info,
                format!("pairing window {} opened", opened.info.claim),
            )
            .actor(actor),
        )
        .await;
        Ok(Response::new(window_to_pb(
            &opened.info,
            Some(&opened.code),
            opened.uri,
        )))
    }

    async fn list_pairing(
        &self,
        _: Request<pb::ListPairingRequest>,
    ) -> Result<Response<pb::ListPairingResponse>, Status> {
        let windows = self
            .state
            .edge
            .list_pairing()
            .await?
            .into_iter()
            .map(|(info, uri)| window_to_pb(&info, None, uri))
            .collect();
        Ok(Response::new(pb::ListPairingResponse { windows }))
    }

    async fn cancel_pairing(
        &self,
        req: Request<pb::CancelPairingRequest>,
    ) -> Result<Response<pb::PairingWindow>, Status> {
        let actor = lifecycle::actor(&req);
        let claim = req.into_inner().claim_id;
        let info = self.state.edge.cancel_pairing(&claim).await?;
        self.note(
            Event::new(
                Kind::PairingCancelled,
                Severity::Info,
                format!("pairing window {} cancelled", info.claim),
            )
            .actor(actor),
        )
        .await;
        Ok(Response::new(window_to_pb(&info, None, String::new())))
    }

    async fn enroll_bundle(
        &self,
        req: Request<pb::EnrollBundleRequest>,
    ) -> Result<Response<pb::EnrollBundleResponse>, Status> {
        let actor = lifecycle::actor(&req);
        let req = req.into_inner();
        let name = parse_name(&req.name)?;
        let (role, grants) = role_and_grants(req.role, req.grants)?;
        let registry = self.state.registry.clone();
        let (enrolled, key_pem) =
            blocking(move || registry.enroll_bundle(&name, role, grants)).await?;
        self.note(
            Event::new(
                Kind::DeviceEnrolled,
                Severity::Warning,
                "device enrolled with an offline bundle: the hub made its key",
            )
            .device(&enrolled.device.id)
            .actor(actor),
        )
        .await;
        Ok(Response::new(pb::EnrollBundleResponse {
            device: Some(self.device_pb(&enrolled.device, false)),
            key_pem,
            cert_pem: enrolled.cert_pem,
            ca_chain_pem: enrolled.ca_pem,
        }))
    }

    async fn rename_device(
        &self,
        req: Request<pb::RenameDeviceRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        let actor = lifecycle::actor(&req);
        let req = req.into_inner();
        let id = parse_id("id", &req.id)?;
        let name = parse_name(&req.name)?;
        let registry = self.state.registry.clone();
        let target = id.clone();
        let device = blocking(move || registry.rename(&target, &name)).await?;
        self.note(
            Event::new(Kind::DeviceRenamed, Severity::Info, "device renamed")
                .device(&id)
                .actor(actor),
        )
        .await;
        Ok(Response::new(
            self.device_pb(&device, self.state.edge.is_connected(&id)),
        ))
    }

    async fn remove_device(
        &self,
        req: Request<pb::RemoveDeviceRequest>,
    ) -> Result<Response<pb::RemoveDeviceResponse>, Status> {
        let actor = lifecycle::actor(&req);
        let req = req.into_inner();
        let id = parse_id("id", &req.id)?;
        let registry = self.state.registry.clone();
        let lookup = id.clone();
        blocking(move || registry.device(&lookup)).await?;
        let (mut reset_sent, mut reset_acknowledged) = (false, false);
        if req.reset {
            let wait = match req.reset_timeout_seconds {
                0 => Duration::from_secs(5),
                n => Duration::from_secs(u64::from(n.min(300))),
            };
            match self
                .state
                .edge
                .send_reset(&id, "removed from the hub")
                .await
            {
                Ok(mut acks) => {
                    reset_sent = true;
                    reset_acknowledged = tokio::time::timeout(wait, acks.recv())
                        .await
                        .is_ok_and(|m| m.is_some());
                }
                // An isolated device gets no commands, not even this one.
                Err(edge::Error::Isolated(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let registry = self.state.registry.clone();
        let target = id.clone();
        let (_, crl) = blocking(move || registry.remove(&target)).await?;
        self.state.edge.set_crl(crl)?;
        self.note(
            Event::new(Kind::DeviceRemoved, Severity::Info, "device removed")
                .device(&id)
                .actor(actor.clone())
                .evidence("reset_acknowledged", reset_acknowledged),
        )
        .await;
        let was_connected = self.state.edge.disconnect(&id).await;
        // Its retained state and metadata go too (empty retained messages).
        for which in RetainedKind::ALL {
            let topic = format!("d/{id}/{}", which.suffix());
            self.state
                .edge
                .publish(&topic, Bytes::new(), Qos::AtMostOnce, true)
                .await?;
        }
        self.refresh_isolated().await?;
        let rules_disabled = self.state.automation.disable_naming(&id).await?;
        Ok(Response::new(pb::RemoveDeviceResponse {
            was_connected,
            reset_sent,
            reset_acknowledged,
            rules_disabled,
        }))
    }

    async fn isolate_device(
        &self,
        req: Request<pb::IsolateDeviceRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        let actor = lifecycle::actor(&req);
        let req = req.into_inner();
        let id = parse_id("id", &req.id)?;
        let reason = req.reason.trim().to_owned();
        if reason.is_empty() || reason.chars().count() > 200 || reason.chars().any(char::is_control)
        {
            return Err(Status::invalid_argument(
                "reason: 1 to 200 characters without control characters are required",
            ));
        }
        let device = self.state.edge.isolate(&id, &reason, &actor).await?;
        Ok(Response::new(self.device_pb(&device, false)))
    }

    async fn release_device(
        &self,
        req: Request<pb::ReleaseDeviceRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        let actor = lifecycle::actor(&req);
        let id = parse_id("id", &req.into_inner().id)?;
        let device = self.state.edge.release(&id, &actor).await?;
        Ok(Response::new(self.device_pb(&device, false)))
    }

    async fn update_grants(
        &self,
        req: Request<pb::UpdateGrantsRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        let actor = lifecycle::actor(&req);
        let req = req.into_inner();
        let id = parse_id("id", &req.id)?;
        let change = grants_from_pb(req.grants);
        if change == Grants::default() {
            return Err(Status::invalid_argument("grants: name at least one filter"));
        }
        let registry = self.state.registry.clone();
        let target = id.clone();
        let device = blocking(move || registry.update_grants(&target, &change, req.revoke)).await?;
        // The new rights apply from the next session: end the current one.
        self.state.edge.disconnect(&id).await;
        self.note(
            Event::new(
                Kind::GrantsChanged,
                Severity::Info,
                format!(
                    "grants {}: publish {:?}, subscribe {:?}",
                    if req.revoke { "revoked" } else { "added" },
                    device.grants.publish,
                    device.grants.subscribe
                ),
            )
            .device(&id)
            .actor(actor),
        )
        .await;
        Ok(Response::new(self.device_pb(&device, false)))
    }

    async fn publish(
        &self,
        req: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let req = req.into_inner();
        if req.payload.len() > self.state.max_payload {
            return Err(Status::invalid_argument(format!(
                "payload: {} bytes, more than max_packet_size {}",
                req.payload.len(),
                self.state.max_payload
            )));
        }
        let qos = match req.qos {
            0 => Qos::AtMostOnce,
            1 => Qos::AtLeastOnce,
            other => {
                return Err(Status::invalid_argument(format!(
                    "qos: {other}: the hub publishes at QoS 0 or 1"
                )));
            }
        };
        self.state
            .edge
            .publish(&req.topic, Bytes::from(req.payload), qos, req.retain)
            .await?;
        Ok(Response::new(pb::PublishResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::may_administer;

    #[test]
    fn who_may_administer() {
        assert!(may_administer(0, 0, 1000, None, &[]));
        assert!(may_administer(1000, 1000, 1000, None, &[]));
        assert!(!may_administer(1001, 1001, 1000, None, &[]));
        assert!(!may_administer(1001, 1001, 1000, Some(50), &[1001, 20]));
        assert!(may_administer(1001, 1001, 1000, Some(50), &[1001, 50]));
        assert!(may_administer(1001, 50, 1000, Some(50), &[]));
    }
}
