//! The pairing listener: TLS with server authentication only, bound only
//! while at least one pairing window is open, speaking a two-message MQTT
//! exchange that the edge answers itself (nothing is routed).
//!
//! The exchange, for device makers (ARCHITECTURE.md has it too):
//!
//! 1. The device reads the pairing URI
//!    `hubpair://HOST:PORT/?ca=sha256:HEX&claim=CLAIM` and the setup code.
//! 2. TLS to HOST:PORT. The device pins the hub CA: the server sends
//!    `[server certificate, CA certificate]`; the CA's SHA-256 must equal HEX
//!    and the server certificate must chain to it (its names need not match
//!    HOST: the pin replaces the name check).
//! 3. MQTT 3.1.1 or 5 CONNECT (any client id, no credentials), then
//!    SUBSCRIBE `pair/response`, then PUBLISH to `pair/request`:
//!    `{"claim":"CLAIM","code":"CODE","csr":"PEM"}` with a CSR for the
//!    device's own ECDSA P-256 key (the key never leaves the device).
//! 4. The hub answers on `pair/response`, then closes:
//!    `{"ok":true,"device_id":"ID","cert":"PEM","ca":"PEM"}` or
//!    `{"ok":false,"error":"CODE","message":"why"}` with error codes
//!    `wrong_code`, `expired`, `used`, `cancelled`, `closed`,
//!    `unknown_claim`, `rate_limited`, `bad_request`, `bad_csr`, `internal`.
//!
//! A CSR is checked before the code is: a malformed CSR does not spend the
//! one-time code. Wrong codes count against the window; too many close it.
//! Attempts from one address are rate limited.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{
    ConnAck, ConnAckProperties, ConnectReturnCode, Packet, PingResp, Publish, QoS, SubAck,
    SubscribeReasonCode,
};
use rustls::ServerConfig;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Codec, EdgeHandle, Error, Shared, connect_level, read_packet};
use crate::config::PairingSection;
use crate::model::{DeviceName, Grants, Role};
use crate::pairing::{Closed, PairError, PairingUri, SetupCode, WindowInfo, Windows};

/// The largest packet the pairing listener reads: a CSR is well under 2 KiB.
const MAX_PAIRING_PACKET: usize = 16 * 1024;

/// How long one pairing connection may last in all.
const PAIRING_SESSION_LIMIT: Duration = Duration::from_secs(30);

const REQUEST_TOPIC: &str = "pair/request";
const RESPONSE_TOPIC: &str = "pair/response";

/// Windows and the listener that serves them.
pub(crate) struct PairingState {
    /// Open and recently closed windows.
    windows: Windows,
    /// The bound listener, while any window is open.
    listener: Option<Bound>,
}

/// A bound pairing listener.
struct Bound {
    /// Its address, for the pairing URI.
    addr: SocketAddr,
    /// Cancelled to close it.
    stop: CancellationToken,
}

impl PairingState {
    pub(crate) fn new(cfg: &PairingSection) -> Self {
        PairingState {
            windows: Windows::new(cfg.max_failures, cfg.attempt_interval),
            listener: None,
        }
    }

    /// Closes the listener if no window is open any more.
    fn close_if_idle(&mut self) {
        if self.windows.is_empty()
            && let Some(bound) = self.listener.take()
        {
            bound.stop.cancel();
            info!(addr = %bound.addr, "pairing listener closed: no window open");
        }
    }
}

/// A window just opened: its code is shown once.
#[derive(Debug, Clone)]
pub struct OpenedWindow {
    pub info: WindowInfo,
    pub code: SetupCode,
    pub uri: String,
}

impl EdgeHandle {
    /// Opens a pairing window, binding the pairing listener if it is not bound.
    pub async fn open_pairing(
        &self,
        name: DeviceName,
        role: Role,
        grants: Grants,
        lifetime: Option<Duration>,
    ) -> Result<OpenedWindow, Error> {
        let shared = &self.shared;
        let lifetime = lifetime.unwrap_or(shared.pairing_cfg.window);
        if lifetime.is_zero() || lifetime > shared.pairing_cfg.max_window {
            return Err(Error::Pairing(format!(
                "window of {} s: must be between 1 s and max_window ({} s)",
                lifetime.as_secs(),
                shared.pairing_cfg.max_window.as_secs()
            )));
        }
        let mut state = shared.pairing.lock().await;
        let addr = match &state.listener {
            Some(bound) => bound.addr,
            None => {
                let listener = TcpListener::bind(shared.pairing_cfg.listen)
                    .await
                    .map_err(|e| {
                        Error::Pairing(format!(
                            "[pairing] listen = \"{}\": cannot bind: {e}",
                            shared.pairing_cfg.listen
                        ))
                    })?;
                let addr = listener.local_addr().map_err(Error::Listener)?;
                let stop = CancellationToken::new();
                let tls = shared.pairing_tls()?;
                shared
                    .tracker
                    .spawn(accept_loop(shared.clone(), listener, tls, stop.clone()));
                shared.tracker.spawn(janitor(shared.clone(), stop.clone()));
                info!(%addr, "pairing listener open");
                state.listener = Some(Bound { addr, stop });
                addr
            }
        };
        let (info, code) = state.windows.open(
            name.as_str().to_owned(),
            role,
            grants,
            lifetime,
            Instant::now(),
        );
        drop(state);
        shared.pairing_changed.notify_one();
        let uri = self.pairing_uri(addr, &info.claim)?;
        info!(target: "security", claim = %info.claim, name = %info.name, ?role, "pairing window opened");
        Ok(OpenedWindow { info, code, uri })
    }

    /// The open windows with their URIs (codes are never shown again).
    pub async fn list_pairing(&self) -> Result<Vec<(WindowInfo, String)>, Error> {
        let mut state = self.shared.pairing.lock().await;
        let windows = state.windows.list(Instant::now());
        let addr = state.listener.as_ref().map(|b| b.addr);
        state.close_if_idle();
        drop(state);
        let mut out = Vec::with_capacity(windows.len());
        for info in windows {
            let uri = match addr {
                Some(addr) => self.pairing_uri(addr, &info.claim)?,
                None => String::new(),
            };
            out.push((info, uri));
        }
        Ok(out)
    }

    /// Cancels a window; the listener closes with the last one.
    pub async fn cancel_pairing(&self, claim: &str) -> Result<WindowInfo, Error> {
        let mut state = self.shared.pairing.lock().await;
        let result = state.windows.cancel(claim, Instant::now());
        state.close_if_idle();
        drop(state);
        self.shared.pairing_changed.notify_one();
        let info = result.map_err(|e| Error::Pairing(e.to_string()))?;
        info!(target: "security", claim = %info.claim, "pairing window cancelled");
        Ok(info)
    }

    /// The address the pairing listener is bound to, while it is.
    pub async fn pairing_addr(&self) -> Option<SocketAddr> {
        self.shared
            .pairing
            .lock()
            .await
            .listener
            .as_ref()
            .map(|b| b.addr)
    }

    fn pairing_uri(&self, addr: SocketAddr, claim: &str) -> Result<String, Error> {
        let cfg = &self.shared.pairing_cfg;
        let host = if !cfg.advertise_host.is_empty() {
            cfg.advertise_host.clone()
        } else if !addr.ip().is_unspecified() {
            addr.ip().to_string()
        } else {
            crate::ca::machine_hostname().unwrap_or_else(|| "localhost".to_owned())
        };
        let uri = PairingUri::new(
            &host,
            addr.port(),
            self.shared.registry.ca_fingerprint(),
            claim,
        )
        .map_err(|e| Error::Pairing(format!("pairing URI: {e}")))?;
        Ok(uri.to_string())
    }
}

impl Shared {
    /// The pairing listener's TLS: the edge's server certificate, no client
    /// certificates (the device has none yet).
    fn pairing_tls(&self) -> Result<Arc<ServerConfig>, Error> {
        let material = super::lock(&self.material).clone();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let versions: &[&rustls::SupportedProtocolVersion] = if material.allow_tls12 {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13]
        };
        let config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)?
            .with_no_client_auth()
            .with_single_cert(
                material.server.cert_chain.clone(),
                material.server.key.clone_key(),
            )?;
        Ok(Arc::new(config))
    }
}

/// Expires windows on time and closes the listener when none is left.
async fn janitor(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let next = shared.pairing.lock().await.windows.next_expiry();
        let wait = async {
            match next {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = shared.pairing_changed.notified() => continue,
            _ = wait => {}
        }
        let mut state = shared.pairing.lock().await;
        for info in state.windows.expire(Instant::now()) {
            info!(target: "security", claim = %info.claim, "pairing window expired");
        }
        state.close_if_idle();
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    stop: CancellationToken,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    warn!(error = %e, "pairing accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let session_shared = shared.clone();
        let tls = tls.clone();
        shared.tracker.spawn(async move {
            let limit = tokio::time::timeout(
                PAIRING_SESSION_LIMIT,
                session(session_shared, tcp, peer, tls),
            );
            if limit.await.is_err() {
                warn!(%peer, "pairing connection timed out");
            }
        });
    }
}

/// What the hub answers on `pair/response`.
fn answer_error(error: &str, message: &str) -> serde_json::Value {
    serde_json::json!({"ok": false, "error": error, "message": message})
}

async fn session(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr, tls: Arc<ServerConfig>) {
    let mut stream = match tokio::time::timeout(
        shared.cfg.handshake_timeout,
        TlsAcceptor::from(tls).accept(tcp),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            warn!(target: "security", %peer, error = %e, "pairing tls handshake failed");
            return;
        }
        Err(_) => return,
    };
    let mut buf = BytesMut::with_capacity(4096);
    let level = loop {
        match connect_level(&buf) {
            Ok(Some(level)) => break level,
            Ok(None) => {}
            Err(why) => {
                warn!(%peer, reason = why, "pairing: no valid CONNECT");
                return;
            }
        }
        match tokio::io::AsyncReadExt::read_buf(&mut stream, &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    };
    let mut codec = match level {
        4 => Codec::V4(V4),
        5 => Codec::V5(V5),
        _ => return,
    };
    let mut out = BytesMut::new();
    match read_packet(&mut stream, &mut buf, &mut codec, MAX_PAIRING_PACKET).await {
        Ok((Packet::Connect(..), _)) => {}
        _ => return,
    }
    let props = codec.is_v5().then(|| ConnAckProperties {
        max_qos: Some(0),
        retain_available: Some(0),
        topic_alias_max: Some(0),
        ..Default::default()
    });
    let ack = ConnAck {
        session_present: false,
        code: ConnectReturnCode::Success,
    };
    if codec.write(Packet::ConnAck(ack, props), &mut out).is_err() {
        return;
    }
    loop {
        if !out.is_empty() {
            if stream.write_all(&out).await.is_err() || stream.flush().await.is_err() {
                return;
            }
            out.clear();
        }
        let packet = match read_packet(&mut stream, &mut buf, &mut codec, MAX_PAIRING_PACKET).await
        {
            Ok((p, _)) => p,
            Err(_) => return,
        };
        match packet {
            Packet::Subscribe(sub, _) => {
                let return_codes = sub
                    .filters
                    .iter()
                    .map(|f| match f.path == RESPONSE_TOPIC {
                        true => SubscribeReasonCode::Success(QoS::AtMostOnce),
                        false if codec.is_v5() => SubscribeReasonCode::NotAuthorized,
                        false => SubscribeReasonCode::Failure,
                    })
                    .collect();
                let ack = SubAck {
                    pkid: sub.pkid,
                    return_codes,
                };
                if codec.write(Packet::SubAck(ack, None), &mut out).is_err() {
                    return;
                }
            }
            Packet::PingReq(_) => {
                if codec.write(Packet::PingResp(PingResp), &mut out).is_err() {
                    return;
                }
            }
            Packet::Publish(publish, _) if publish.topic.as_ref() == REQUEST_TOPIC.as_bytes() => {
                let answer = handle_request(&shared, peer.ip(), &publish.payload).await;
                let reply = Publish::new(
                    Bytes::from_static(RESPONSE_TOPIC.as_bytes()),
                    Bytes::from(answer.to_string()),
                    false,
                );
                if codec.write(Packet::Publish(reply, None), &mut out).is_ok() {
                    let _ = stream.write_all(&out).await;
                    let _ = stream.flush().await;
                }
                let _ = stream.shutdown().await;
                return;
            }
            // Anything else (another topic, DISCONNECT, QoS 2...) ends the exchange.
            _ => return,
        }
    }
}

/// Checks a pairing request and, if the code is right, enrols the device.
async fn handle_request(shared: &Arc<Shared>, source: IpAddr, payload: &[u8]) -> serde_json::Value {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Request {
        claim: String,
        code: String,
        csr: String,
    }
    let request: Request = match serde_json::from_slice(payload) {
        Ok(r) => r,
        Err(e) => {
            return answer_error(
                "bad_request",
                &format!("the request must be JSON {{\"claim\",\"code\",\"csr\"}}: {e}"),
            );
        }
    };
    // The CSR first: a malformed one must not spend the one-time code.
    if let Err(e) = shared.registry.check_csr(&request.csr) {
        return answer_error("bad_csr", &e.to_string());
    }
    let attempt = {
        let mut state = shared.pairing.lock().await;
        let result = state
            .windows
            .attempt(&request.claim, &request.code, source, Instant::now());
        state.close_if_idle();
        result
    };
    shared.pairing_changed.notify_one();
    let info = match attempt {
        Ok(info) => info,
        Err(e) => {
            shared.seclog.record(
                crate::seclog::Event::new(
                    crate::seclog::Kind::PairingFailed,
                    crate::seclog::Severity::Warning,
                    format!("pairing attempt for window {} refused: {e}", request.claim),
                )
                .actor(source.to_string()),
            );
            let code = match &e {
                PairError::UnknownClaim => "unknown_claim",
                PairError::Closed(Closed::Used) => "used",
                PairError::Closed(Closed::Expired) => "expired",
                PairError::Closed(Closed::Cancelled) => "cancelled",
                PairError::Closed(Closed::TooManyFailures) => "closed",
                PairError::WrongCode { .. } | PairError::BadCode(_) => "wrong_code",
                PairError::RateLimited { .. } => "rate_limited",
            };
            return answer_error(code, &e.to_string());
        }
    };
    let name = match DeviceName::parse(&info.name) {
        Ok(n) => n,
        Err(e) => return answer_error("internal", &format!("window name: {e}")),
    };
    let registry = shared.registry.clone();
    let (role, grants, csr) = (info.role, info.grants.clone(), request.csr);
    let enrolled =
        tokio::task::spawn_blocking(move || registry.enroll(&name, &csr, role, grants)).await;
    match enrolled {
        Ok(Ok(e)) => {
            shared.seclog.record(
                crate::seclog::Event::new(
                    crate::seclog::Kind::PairingUsed,
                    crate::seclog::Severity::Info,
                    format!("device paired through window {}", info.claim),
                )
                .device(&e.device.id)
                .actor(source.to_string()),
            );
            serde_json::json!({
                "ok": true,
                "device_id": e.device.id.to_string(),
                "cert": e.cert_pem,
                "ca": e.ca_pem,
            })
        }
        Ok(Err(e)) => answer_error("internal", &e.to_string()),
        Err(_) => answer_error("internal", "enrolment failed inside the hub"),
    }
}
