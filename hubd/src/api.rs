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

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

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

use crate::edge::{self, EdgeHandle};
use crate::model::{DeviceId, DeviceName, Qos};
use crate::registry::{self, RegistryHandle};
use crate::store::{DeviceRecord, DeviceState};

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
    pub started: Instant,
    pub max_payload: usize,
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
    let service = AdminServer::with_interceptor(
        Service {
            state,
            stop: shutdown.clone(),
        },
        authorize,
    );
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
            registry::Error::BadCsr(_) => Status::invalid_argument(e.to_string()),
            registry::Error::Ca(_) => Status::internal(e.to_string()),
            registry::Error::Store(_) => Status::internal(e.to_string()),
        }
    }
}

impl From<edge::Error> for Status {
    fn from(e: edge::Error) -> Status {
        match e {
            edge::Error::Topic { .. } => Status::invalid_argument(e.to_string()),
            edge::Error::Tls(_)
            | edge::Error::Verifier(_)
            | edge::Error::Link(_)
            | edge::Error::Join(_)
            | edge::Error::Listener(_) => Status::internal(e.to_string()),
        }
    }
}

fn parse_id(field: &str, id: &str) -> Result<DeviceId, Status> {
    DeviceId::parse(id).map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

fn device_to_pb(d: &DeviceRecord, connected: bool) -> pb::Device {
    pb::Device {
        id: d.id.to_string(),
        name: d.name.clone(),
        state: match d.state {
            DeviceState::Active => pb::DeviceState::Active,
            DeviceState::Revoked => pb::DeviceState::Revoked,
        } as i32,
        connected,
        cert_serial: d.cert_serial.clone(),
        cert_not_after: d.cert_not_after,
        created_at: d.created_at,
        last_seen: d.last_seen,
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
        let known = blocking(move || registry.devices().map(|d| d.len())).await?;
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
            }),
            ca_fingerprint: self.state.registry.ca_fingerprint().to_owned(),
            mqtt_listen: self.state.edge.local_addr().to_string(),
        }))
    }

    async fn list_devices(
        &self,
        _: Request<pb::ListDevicesRequest>,
    ) -> Result<Response<pb::ListDevicesResponse>, Status> {
        let registry = self.state.registry.clone();
        let devices = blocking(move || registry.devices()).await?;
        let devices = devices
            .iter()
            .map(|d| device_to_pb(d, self.state.edge.is_connected(&d.id)))
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
        Ok(Response::new(device_to_pb(
            &device,
            self.state.edge.is_connected(&id),
        )))
    }

    async fn enroll_device(
        &self,
        req: Request<pb::EnrollDeviceRequest>,
    ) -> Result<Response<pb::EnrollDeviceResponse>, Status> {
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
        let enrolled = blocking(move || registry.enroll(&name, &req.csr_pem)).await?;
        Ok(Response::new(pb::EnrollDeviceResponse {
            device: Some(device_to_pb(&enrolled.device, false)),
            cert_pem: enrolled.cert_pem,
            ca_chain_pem: enrolled.ca_pem,
        }))
    }

    async fn revoke_device(
        &self,
        req: Request<pb::RevokeDeviceRequest>,
    ) -> Result<Response<pb::RevokeDeviceResponse>, Status> {
        let id = parse_id("id", &req.into_inner().id)?;
        let registry = self.state.registry.clone();
        let target = id.clone();
        let (device, crl) = blocking(move || registry.revoke(&target)).await?;
        // New handshakes see the CRL before the live session is cut, so the
        // device's reconnect is already refused.
        self.state.edge.set_crl(crl)?;
        let was_connected = self.state.edge.disconnect(&id).await;
        Ok(Response::new(pb::RevokeDeviceResponse {
            device: Some(device_to_pb(&device, false)),
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
