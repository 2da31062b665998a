//! The network edge: hubd's own MQTT-over-mTLS listener in front of the
//! rumqttd router.
//!
//! DESIGN.md ("The network edge") says why hubd owns this instead of rumqttd's
//! server. In short, per connection:
//!
//! 1. The accept loop admits through a token bucket (excess waits a little, then
//!    is refused) and a cap on pending handshakes; at the cap the *oldest* pending
//!    handshake is evicted, so sockets that never send a byte cannot lock real
//!    devices out.
//! 2. The TLS handshake runs in the connection's own task with a timeout, using
//!    the current `rustls::ServerConfig` from an `ArcSwap` (swapped live when the
//!    CRL changes).
//! 3. The device id comes from the verified certificate; the MQTT client id must
//!    equal it (empty: assigned). The registry decides the principal.
//! 4. The CONNECT's protocol level picks rumqttd's v4 or v5 codec, so MQTT 3.1.1
//!    and 5 share the port. Every PUBLISH and SUBSCRIBE passes `acl` before it
//!    reaches the router through a local link, one per connection.
//!
//! Outgoing traffic goes through a bounded queue per connection to a writer
//! task. The overflow policy for slow subscribers: a QoS 0 message that finds the
//! queue full is dropped and counted (`dropped_slow_subscriber`); QoS 1 messages
//! are never dropped here, because the router already paces them with its
//! inflight window of 100 unacknowledged messages per connection.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{
    self, ConnAck, ConnAckProperties, Connect, ConnectReturnCode, Disconnect, DisconnectReasonCode,
    LastWill, Packet, PingResp, Protocol, PubAck, PubAckReason, Publish, PublishProperties, QoS,
    SubAck, Subscribe, SubscribeReasonCode,
};
use rumqttd::{Notification, Router, RouterConfig};
use rustls::DigitallySignedStruct;
use rustls::DistinguishedName;
use rustls::ServerConfig;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::acl::{self, Principal, TopicLimits};
use crate::bus::{BusTx, DeviceReport, HubEvent};

mod pairing_listener;
use crate::ca::{self, ServerIdentity};
use crate::config::AnomalyPolicy;
use crate::config::EdgeSection;
use crate::config::PairingSection;
use crate::model::{DeviceId, Qos};
use crate::registry::{self, RegistryHandle};
use crate::seclog::{self, SecLog, Severity};
use crate::store::{DeviceRecord, HistoryRecord, RetainedKind};
use crate::telemetry::{Anomaly, Telemetry};
pub use pairing_listener::OpenedWindow;

/// Client id of the hub's own router link. `_` cannot appear in a device id,
/// so it can never collide with one.
const HUB_CLIENT_ID: &str = "_hub";

/// Queue slots kept free for acknowledgements and QoS 1 messages: QoS 0
/// messages are dropped rather than take them.
const RESERVED_SLOTS: usize = 128;

/// rumqttd's router refuses every subscription that starts with `$` (other
/// than `$share/`), so `$hub/...` topics are kept in the router with this
/// character in place of the leading `$`, and mapped back on the way out.
/// Nothing from outside can name it: `acl` refuses control characters.
const ROUTER_DOLLAR: char = '\u{1}';

/// A device-facing topic or filter as the router stores it.
fn escape_dollar(topic: &str) -> String {
    match topic.strip_prefix('$') {
        Some(rest) => format!("{ROUTER_DOLLAR}{rest}"),
        None => topic.to_owned(),
    }
}

/// The same, for a topic that is already bytes (PUBLISH, will).
fn escape_dollar_bytes(topic: Bytes) -> Bytes {
    if topic.first() == Some(&b'$') {
        let mut escaped = BytesMut::with_capacity(topic.len());
        escaped.extend_from_slice(&[ROUTER_DOLLAR as u8]);
        escaped.extend_from_slice(&topic[1..]);
        escaped.freeze()
    } else {
        topic
    }
}

/// A router topic as devices and the admin API see it.
fn unescape_dollar_bytes(topic: Bytes) -> Bytes {
    if topic.first() == Some(&(ROUTER_DOLLAR as u8)) {
        let mut unescaped = BytesMut::with_capacity(topic.len());
        unescaped.extend_from_slice(b"$");
        unescaped.extend_from_slice(&topic[1..]);
        unescaped.freeze()
    } else {
        topic
    }
}

/// Retained updates waiting for the store; beyond this they are dropped (the
/// router still has them, and the device republishes on reconnect).
const RETAINED_QUEUE: usize = 4096;

/// Longest a new connection may wait for an admission token before it is refused.
const MAX_ADMISSION_DELAY: Duration = Duration::from_secs(2);

/// Errors that stop the edge from starting or a hub publish from being sent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
    #[error("tls: client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("router: {0}")]
    Link(String),
    #[error("router: link setup task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("mqtt listener: {0}")]
    Listener(std::io::Error),
    #[error("cannot restore retained device state: {0}")]
    Restore(String),
    #[error("device {0} is isolated: commands to it are not sent")]
    Isolated(String),
    #[error("pairing: {0}")]
    Pairing(String),
    #[error("topic {topic:?}: {source}")]
    Topic {
        topic: String,
        source: acl::TopicError,
    },
    #[error(transparent)]
    Registry(registry::Error),
    #[error("security log: {0}")]
    Seclog(String),
}

/// Message and connection counters, reported by `Status`.
#[derive(Debug, Default)]
pub struct Counters {
    /// PUBLISH packets accepted from devices and passed to the router.
    pub publishes_received: AtomicU64,
    /// PUBLISH packets queued for devices.
    pub publishes_sent: AtomicU64,
    /// PUBLISH and SUBSCRIBE refused by the topic ACL.
    pub acl_denied: AtomicU64,
    /// QoS 0 messages dropped because a subscriber's queue was full.
    pub dropped_slow_subscriber: AtomicU64,
    /// Handshakes that completed with a valid client certificate.
    pub handshakes_ok: AtomicU64,
    /// Handshakes that failed, timed out or were evicted.
    pub handshakes_failed: AtomicU64,
    /// Connections closed by admission control before any handshake.
    pub connections_refused: AtomicU64,
    /// Connections whose admission was deferred by the token bucket.
    pub connections_deferred: AtomicU64,
    /// Connections let through admission (at once or after a wait).
    pub connections_admitted: AtomicU64,
    /// MQTT sessions refused after the handshake (identity, gate, will ACL).
    pub sessions_refused: AtomicU64,
    /// Malformed, oversized or unsupported packets that ended a connection.
    pub protocol_errors: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Everything the TLS configuration is built from; kept so a new CRL or server
/// certificate can be swapped in without a restart.
#[derive(Clone)]
pub struct TlsMaterial {
    /// The hub CA certificate: the only trust anchor for client certificates.
    pub ca_der: CertificateDer<'static>,
    /// The edge's certificate chain and key.
    pub server: ServerIdentity,
    /// The current CRL, DER.
    pub crl: Vec<u8>,
    /// Whether TLS 1.2 (ECDHE-ECDSA AEAD suites only) is offered.
    pub allow_tls12: bool,
}

impl TlsMaterial {
    /// Builds the rustls configuration from this material.
    pub fn build(&self) -> Result<Arc<ServerConfig>, Error> {
        tls_config(
            self.ca_der.clone(),
            &self.server,
            vec![CertificateRevocationListDer::from(self.crl.clone())],
            self.allow_tls12,
        )
    }
}

/// Builds the rustls server configuration: TLS 1.3 (and TLS 1.2 ECDHE-ECDSA
/// AEAD suites only when `allow_tls12`), client certificates mandatory and
/// chained to the hub CA, end-entity revocation checked against `crls`.
pub fn tls_config(
    ca_der: CertificateDer<'static>,
    server: &ServerIdentity,
    crls: Vec<CertificateRevocationListDer<'static>>,
    allow_tls12: bool,
) -> Result<Arc<ServerConfig>, Error> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.retain(|suite| match suite {
        rustls::SupportedCipherSuite::Tls13(_) => true,
        rustls::SupportedCipherSuite::Tls12(s) => {
            allow_tls12
                && s.sign
                    .contains(&rustls::SignatureScheme::ECDSA_NISTP256_SHA256)
        }
    });
    let provider = Arc::new(provider);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_der)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .with_crls(crls)
        // The hub CA is the trust anchor itself; only device certificates can be revoked.
        .only_check_end_entity_revocation()
        .build()?;
    let verifier = Arc::new(ClockTolerantVerifier {
        inner: verifier,
        floor: unix_time(crate::clock::build_time()),
    });
    let versions: &[&rustls::SupportedProtocolVersion] = if allow_tls12 {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(server.cert_chain.clone(), server.key.clone_key())?;
    Ok(Arc::new(config))
}

fn unix_time(t: time::OffsetDateTime) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(
        u64::try_from(t.unix_timestamp()).unwrap_or(0),
    ))
}

/// Checks client certificates as if the time were never earlier than
/// `floor` (the build time): a hub whose clock has not been set yet must not
/// refuse every device as "not yet valid". Expiry is still checked against
/// the later of the two, so a wrong clock never makes an expired
/// certificate valid.
#[derive(Debug)]
struct ClockTolerantVerifier {
    /// The webpki verifier that does the real work.
    inner: Arc<dyn ClientCertVerifier>,
    /// The earliest time a check is made at.
    floor: UnixTime,
}

impl ClientCertVerifier for ClockTolerantVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let at = if now.as_secs() < self.floor.as_secs() {
            self.floor
        } else {
            now
        };
        self.inner.verify_client_cert(end_entity, intermediates, at)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Makes router links: a closure so the router's event type, which rumqttd
/// does not export, never has to be named.
type LinkFactory =
    Arc<dyn Fn(&str, bool) -> Result<(LinkTx, LinkRx, Notification), String> + Send + Sync>;

/// A live device session, as the registry of sessions sees it.
struct SessionEntry {
    /// Distinguishes this session from a later one of the same device.
    number: u64,
    /// Cancelled to end the session (revoke, disconnect, takeover).
    kick: CancellationToken,
    /// Cancelled by the session task when it has fully ended, router link included.
    ended: CancellationToken,
}

/// State shared by the accept loop, every connection task and the handle.
struct Shared {
    /// Edge settings from the config.
    cfg: EdgeSection,
    /// The live TLS configuration; swapped whole when the CRL changes.
    tls: ArcSwap<ServerConfig>,
    /// What `tls` was built from.
    material: Mutex<TlsMaterial>,
    /// Live sessions by device id.
    sessions: Mutex<HashMap<DeviceId, SessionEntry>>,
    /// Source of session numbers.
    next_session: AtomicU64,
    /// Counters for `Status`.
    counters: Counters,
    /// Makes a router link for a new session.
    links: LinkFactory,
    /// Decides who may hold a session; enrols and renews.
    registry: RegistryHandle,
    /// Devices cut off from commands, for the ACL; swapped whole on change.
    isolated: ArcSwap<HashSet<DeviceId>>,
    /// Open pairing windows and the pairing listener, if bound.
    pairing: tokio::sync::Mutex<pairing_listener::PairingState>,
    /// Wakes the pairing janitor when windows change.
    pairing_changed: tokio::sync::Notify,
    /// `[pairing]` settings.
    pairing_cfg: PairingSection,
    /// Tasks of the edge (sessions, pairing), for shutdown.
    tracker: TaskTracker,
    /// The hub's own link, for commands and notices the hub publishes.
    hub_tx: tokio::sync::Mutex<LinkTx>,
    /// The bound MQTT address.
    local_addr: SocketAddr,
    /// Source of unique client ids for the hub's watch links.
    next_watch: AtomicU64,
    /// Source of packet ids for the hub's QoS 1 publishes.
    next_hub_pkid: AtomicU64,
    /// Retained device state and metadata on their way to the store.
    retained_tx: mpsc::Sender<(DeviceId, RetainedKind, Vec<u8>)>,
    /// What devices do, for automation: states, events, online, offline.
    bus: Option<BusTx>,
    /// What devices say of themselves (meta) and their half of firmware
    /// updates, for the lifecycle service.
    reports: Option<mpsc::Sender<DeviceReport>>,
    /// Where security events go.
    seclog: SecLog,
    /// Per-device baselines and anomalies; refused-handshake throttling.
    telemetry: Arc<Telemetry>,
    /// Device states and events on their way to the history (none when
    /// `[privacy] history_days` is 0).
    history_tx: Option<mpsc::Sender<HistoryRecord>>,
    /// Cancels watch tasks at shutdown.
    shutdown: CancellationToken,
}

/// A message the hub saw on a watched filter.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub retain: bool,
}

/// A cloneable handle on the running edge: counters, kicks, live TLS swaps and
/// hub publishes.
#[derive(Clone)]
pub struct EdgeHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for EdgeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeHandle")
            .field("local_addr", &self.shared.local_addr)
            .finish_non_exhaustive()
    }
}

impl EdgeHandle {
    /// The address the MQTT listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    /// Devices with a live session.
    pub fn connected(&self) -> Vec<DeviceId> {
        lock(&self.shared.sessions).keys().cloned().collect()
    }

    pub fn is_connected(&self, id: &DeviceId) -> bool {
        lock(&self.shared.sessions).contains_key(id)
    }

    /// Replaces the set of isolated devices the ACL consults.
    pub fn set_isolated(&self, isolated: HashSet<DeviceId>) {
        self.shared.isolated.store(Arc::new(isolated));
    }

    /// Installs a new CRL for every handshake from now on (no restart).
    pub fn set_crl(&self, crl: Vec<u8>) -> Result<(), Error> {
        self.update_tls(|m| m.crl = crl)
    }

    /// Installs a renewed server certificate for every handshake from now on.
    pub fn set_server_identity(&self, server: ServerIdentity) -> Result<(), Error> {
        self.update_tls(|m| m.server = server)
    }

    fn update_tls(&self, change: impl FnOnce(&mut TlsMaterial)) -> Result<(), Error> {
        let mut material = lock(&self.shared.material);
        let mut next = material.clone();
        change(&mut next);
        let config = next.build()?;
        *material = next;
        self.shared.tls.store(config);
        Ok(())
    }

    /// Ends the device's live session, if any, and waits (up to 1 s) until it
    /// is gone. Returns whether there was one.
    pub async fn disconnect(&self, id: &DeviceId) -> bool {
        let ended = {
            let sessions = lock(&self.shared.sessions);
            match sessions.get(id) {
                Some(entry) => {
                    entry.kick.cancel();
                    entry.ended.clone()
                }
                None => return false,
            }
        };
        if tokio::time::timeout(Duration::from_secs(1), ended.cancelled())
            .await
            .is_err()
        {
            warn!(device = %id, "session did not end within 1 s of being kicked");
        }
        true
    }

    /// Publishes as the hub itself (no ACL: the hub may publish anywhere), at
    /// QoS 0 or 1. The router's acknowledgement of a QoS 1 message goes to the
    /// hub link's drain task.
    pub async fn publish(
        &self,
        topic: &str,
        payload: Bytes,
        qos: Qos,
        retain: bool,
    ) -> Result<(), Error> {
        acl::validate_topic(topic, limits(&self.shared.cfg)).map_err(|source| Error::Topic {
            topic: topic.to_owned(),
            source,
        })?;
        if let Some(target) = acl::command_target(topic)
            && self.shared.isolated.load().contains(target)
        {
            warn!(target: "security", device = target, %topic, "command to an isolated device not sent");
            return Err(Error::Isolated(target.to_owned()));
        }
        let topic = Bytes::from(escape_dollar(topic));
        let publish = match qos {
            Qos::AtMostOnce => Publish::new(topic, payload, retain),
            Qos::AtLeastOnce => {
                // Packet ids 1..=65535 in turn: the hub never has that many in flight.
                let n = self.shared.next_hub_pkid.fetch_add(1, Ordering::Relaxed);
                let pkid = (n % 65535 + 1) as u16;
                publish_with_qos(topic, payload, QoS::AtLeastOnce, retain, pkid)
            }
        };
        let mut tx = self.shared.hub_tx.lock().await;
        tx.send(Packet::Publish(publish, None))
            .await
            .map_err(|e| Error::Link(e.to_string()))?;
        Ok(())
    }
}

impl EdgeHandle {
    /// Isolates a device now: records it (durably, with the reason), tells
    /// the ACL, posts the retained notice on `$hub/isolation/<id>`, ends its
    /// session (it reconnects with the isolated profile) and logs a
    /// security event naming `actor`.
    pub async fn isolate(
        &self,
        id: &DeviceId,
        reason: &str,
        actor: &str,
    ) -> Result<DeviceRecord, Error> {
        let registry = self.shared.registry.clone();
        let (target, why) = (id.clone(), reason.to_owned());
        let device = tokio::task::spawn_blocking(move || registry.isolate(&target, &why))
            .await?
            .map_err(Error::Registry)?;
        self.refresh_isolated().await?;
        let notice = serde_json::json!({"isolated": true, "reason": reason}).to_string();
        self.publish(
            &format!("$hub/isolation/{id}"),
            Bytes::from(notice),
            Qos::AtLeastOnce,
            true,
        )
        .await?;
        self.disconnect(id).await;
        let severity = if actor.starts_with("uid ") {
            Severity::Info
        } else {
            Severity::Alert
        };
        self.shared
            .seclog
            .record_durable(
                seclog::Event::new(
                    seclog::Kind::DeviceIsolated,
                    severity,
                    format!("isolated: {reason}"),
                )
                .device(id)
                .actor(actor)
                .evidence("reason", reason),
            )
            .await
            .map_err(Error::Seclog)?;
        Ok(device)
    }

    /// Ends a device's isolation: clears the notice and ends its session so
    /// it comes back with its full rights.
    pub async fn release(&self, id: &DeviceId, actor: &str) -> Result<DeviceRecord, Error> {
        let registry = self.shared.registry.clone();
        let target = id.clone();
        let device = tokio::task::spawn_blocking(move || registry.release(&target))
            .await?
            .map_err(Error::Registry)?;
        self.refresh_isolated().await?;
        // An empty retained message clears the notice.
        self.publish(
            &format!("$hub/isolation/{id}"),
            Bytes::new(),
            Qos::AtLeastOnce,
            true,
        )
        .await?;
        self.disconnect(id).await;
        self.shared
            .seclog
            .record_durable(
                seclog::Event::new(
                    seclog::Kind::DeviceReleased,
                    Severity::Info,
                    "released from isolation",
                )
                .device(id)
                .actor(actor),
            )
            .await
            .map_err(Error::Seclog)?;
        Ok(device)
    }

    /// Tells the ACL which devices are isolated now, from the store.
    pub async fn refresh_isolated(&self) -> Result<(), Error> {
        let registry = self.shared.registry.clone();
        let isolated = tokio::task::spawn_blocking(move || registry.isolated())
            .await?
            .map_err(Error::Registry)?;
        self.set_isolated(isolated);
        Ok(())
    }

    /// The security log the edge records into.
    pub fn seclog(&self) -> &SecLog {
        &self.shared.seclog
    }

    /// Asks a device to reset: publishes `{"reason": reason}` to
    /// `d/<id>/cmd/reset` at QoS 1, having first watched
    /// `d/<id>/ack/reset` so the acknowledgement cannot be missed; the
    /// returned stream yields it. An isolated device is refused like any
    /// command ([`Error::Isolated`]).
    pub async fn send_reset(
        &self,
        id: &DeviceId,
        reason: &str,
    ) -> Result<mpsc::Receiver<Message>, Error> {
        let acks = self.watch(&format!("d/{id}/ack/reset")).await?;
        let payload = Bytes::from(serde_json::json!({ "reason": reason }).to_string());
        self.publish(
            &format!("d/{id}/cmd/reset"),
            payload,
            Qos::AtLeastOnce,
            false,
        )
        .await?;
        Ok(acks)
    }

    /// Subscribes the hub itself to `filter` (no ACL: the hub may read
    /// anything) and streams what it receives. Returns once the router has
    /// acknowledged the subscription, so nothing published afterwards is
    /// missed. Messages that find the stream full (1024) are dropped and
    /// counted as `dropped_slow_subscriber`. The watch ends when the receiver
    /// is dropped or the hub shuts down.
    pub async fn watch(&self, filter: &str) -> Result<mpsc::Receiver<Message>, Error> {
        acl::validate_filter(filter, limits(&self.shared.cfg)).map_err(|source| Error::Topic {
            topic: filter.to_owned(),
            source,
        })?;
        let n = self.shared.next_watch.fetch_add(1, Ordering::Relaxed);
        let links = self.shared.links.clone();
        let (mut tx, mut rx, _) =
            tokio::task::spawn_blocking(move || links(&format!("{HUB_CLIENT_ID}-watch-{n}"), true))
                .await?
                .map_err(Error::Link)?;
        tx.subscribe(escape_dollar(filter))
            .map_err(|e| Error::Link(e.to_string()))?;
        // Wait for the SUBACK so the caller knows the subscription is live.
        let acked = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match rx.next().await? {
                    Some(n @ Notification::DeviceAck(_)) => {
                        if matches!(Option::<Packet>::from(n), Some(Packet::SubAck(..))) {
                            return Ok::<(), rumqttd::local::LinkError>(());
                        }
                    }
                    Some(Notification::Unschedule) => rx.wake().await?,
                    _ => {}
                }
            }
        })
        .await;
        match acked {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(Error::Link(e.to_string())),
            Err(_) => return Err(Error::Link("no SUBACK for the hub's watch".into())),
        }
        let (out, out_rx) = mpsc::channel(1024);
        let shared = self.shared.clone();
        let mut gaps = GapCounter::default();
        gaps.subscribed(&escape_dollar(filter));
        tokio::spawn(async move {
            loop {
                let n = tokio::select! {
                    _ = out.closed() => break,
                    _ = shared.shutdown.cancelled() => break,
                    n = rx.next() => n,
                };
                match n {
                    Ok(Some(Notification::Forward(f))) => {
                        let lost = gaps.seen(&f.publish.topic, f.cursor);
                        shared
                            .counters
                            .dropped_slow_subscriber
                            .fetch_add(lost, Ordering::Relaxed);
                        let message = Message {
                            topic: String::from_utf8_lossy(&unescape_dollar_bytes(
                                f.publish.topic.clone(),
                            ))
                            .into_owned(),
                            retain: f.publish.retain,
                            payload: f.publish.payload,
                        };
                        if let Err(mpsc::error::TrySendError::Full(_)) = out.try_send(message) {
                            bump(&shared.counters.dropped_slow_subscriber);
                        }
                    }
                    Ok(Some(Notification::Unschedule)) => {
                        if rx.wake().await.is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            let _ = tx
                .send(Packet::Disconnect(
                    Disconnect {
                        reason_code: DisconnectReasonCode::NormalDisconnection,
                    },
                    None,
                ))
                .await;
        });
        Ok(out_rx)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock leaves only a map of sessions behind,
    // which stays consistent: keep going rather than take the daemon down.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn limits(cfg: &EdgeSection) -> TopicLimits {
    TopicLimits {
        max_len: cfg.max_topic_length,
        max_depth: cfg.max_topic_depth,
    }
}

fn router_config(cfg: &EdgeSection) -> RouterConfig {
    // Every field is set: with RouterConfig::default() (max_connections 0) the
    // router thread dies and every link fails with Recv(Disconnected).
    RouterConfig {
        // Device sessions plus the hub's own link and some slack for takeovers.
        max_connections: cfg.max_connections + 16,
        // How much the router hands a connection per scheduling round: the
        // edge drains it at once into its own bounded queue, and small
        // rounds let a busy subscriber fall behind inside the router.
        max_outgoing_packet_count: cfg.outgoing_queue as u64,
        // Each topic filter's log holds at most 4 segments of 1 MiB (and at
        // least one max-size packet), so a slow QoS 1 subscriber's backlog is
        // bounded.
        max_segment_size: (1024 * 1024).max(cfg.max_packet_size * 2),
        max_segment_count: 4,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    }
}

/// What the edge is started with.
pub struct Setup {
    /// `[edge]` settings.
    pub cfg: EdgeSection,
    /// CA, server certificate and CRL for the TLS configuration.
    pub material: TlsMaterial,
    /// The bound MQTT listener.
    pub listener: TcpListener,
    /// Who may connect, enrolment and renewal.
    pub registry: RegistryHandle,
    /// Devices isolated at start.
    pub isolated: HashSet<DeviceId>,
    /// `[pairing]` settings.
    pub pairing_cfg: PairingSection,
    /// Where device states, events and comings and goings are announced.
    pub bus: Option<BusTx>,
    /// Whether device states and events are kept in the history.
    pub keep_history: bool,
    /// Where devices' meta and update messages go (the lifecycle service).
    pub reports: Option<mpsc::Sender<DeviceReport>>,
    /// The security log.
    pub seclog: SecLog,
    /// Baselines and anomalies.
    pub telemetry: Arc<Telemetry>,
}

/// Starts the rumqttd router and the edge's accept loop on `listener`. The
/// accept loop and every connection task run on `tracker` until `shutdown`.
pub async fn start(
    setup: Setup,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> Result<EdgeHandle, Error> {
    let Setup {
        cfg,
        material,
        listener,
        registry,
        isolated,
        pairing_cfg,
        bus,
        keep_history,
        reports,
        seclog,
        telemetry,
    } = setup;
    let local_addr = listener.local_addr().map_err(Error::Listener)?;
    let tls = material.build()?;
    let router_tx = Router::new(0, router_config(&cfg)).spawn();
    let links: LinkFactory = Arc::new(move |client_id: &str, clean: bool| {
        LinkBuilder::new(client_id, router_tx.clone())
            .clean_session(clean)
            .build()
            // LinkError is large (it carries the router's event); keep its message.
            .map_err(|e| e.to_string())
    });
    let factory = links.clone();
    let (mut hub_tx, mut hub_rx, _ack) =
        tokio::task::spawn_blocking(move || factory(HUB_CLIENT_ID, true))
            .await?
            .map_err(Error::Link)?;
    // The hub link only publishes at QoS 0, so the router sends it nothing;
    // drain it anyway so a future acknowledgement can never pile up.
    let drain_shutdown = shutdown.clone();
    tracker.spawn(async move {
        loop {
            tokio::select! {
                _ = drain_shutdown.cancelled() => break,
                n = hub_rx.next() => match n {
                    Ok(Some(Notification::Unschedule)) => { let _ = hub_rx.wake().await; }
                    Ok(_) => {}
                    Err(_) => break,
                },
            }
        }
    });

    // Devices' last known state and metadata go back into the router before
    // the first device is accepted, so anything that subscribes after a
    // restart sees them at once.
    let stored = {
        let registry = registry.clone();
        tokio::task::spawn_blocking(move || registry.store().retained())
            .await?
            .map_err(|e| Error::Restore(e.to_string()))?
    };
    let restored = stored.len();
    for (id, which, payload) in stored {
        let topic = Bytes::from(format!("d/{id}/{}", which.suffix()));
        hub_tx
            .send(Packet::Publish(
                Publish::new(topic, Bytes::from(payload), true),
                None,
            ))
            .await
            .map_err(|e| Error::Link(e.to_string()))?;
    }
    if restored > 0 {
        info!(restored, "retained device state restored from the store");
    }
    let (retained_tx, retained_rx) = mpsc::channel(RETAINED_QUEUE);
    tracker.spawn(write_retained(
        registry.clone(),
        retained_rx,
        shutdown.clone(),
    ));

    let history_tx = keep_history.then(|| {
        let (tx, rx) = mpsc::channel(RETAINED_QUEUE);
        tracker.spawn(write_history(registry.clone(), rx, shutdown.clone()));
        tx
    });
    let shared = Arc::new(Shared {
        cfg,
        tls: ArcSwap::new(tls),
        material: Mutex::new(material),
        sessions: Mutex::new(HashMap::new()),
        next_session: AtomicU64::new(1),
        counters: Counters::default(),
        links,
        registry,
        isolated: ArcSwap::from_pointee(isolated),
        pairing: tokio::sync::Mutex::new(pairing_listener::PairingState::new(&pairing_cfg)),
        pairing_changed: tokio::sync::Notify::new(),
        pairing_cfg,
        tracker: tracker.clone(),
        hub_tx: tokio::sync::Mutex::new(hub_tx),
        local_addr,
        next_watch: AtomicU64::new(1),
        next_hub_pkid: AtomicU64::new(0),
        retained_tx,
        bus,
        reports,
        seclog,
        telemetry,
        history_tx,
        shutdown: shutdown.clone(),
    });
    let handle = EdgeHandle {
        shared: shared.clone(),
    };
    let inner_tracker = tracker.clone();
    tracker.spawn(accept_loop(shared, listener, inner_tracker, shutdown));
    Ok(handle)
}

/// Writes retained device state to the store in batches: one transaction
/// for whatever has queued up, keeping only the latest payload per topic.
/// At shutdown it stops taking more, writes what is queued, and ends.
async fn write_retained(
    registry: RegistryHandle,
    mut rx: mpsc::Receiver<(DeviceId, RetainedKind, Vec<u8>)>,
    shutdown: CancellationToken,
) {
    loop {
        let mut latest: HashMap<(DeviceId, RetainedKind), Vec<u8>> = HashMap::new();
        let open = take_queued(&mut rx, &shutdown, |(id, which, payload)| {
            latest.insert((id, which), payload);
            latest.len() < 1024
        })
        .await;
        if !open {
            return;
        }
        let batch: Vec<_> = latest
            .into_iter()
            .map(|((id, which), payload)| (id, which, payload))
            .collect();
        store_batch(&registry, "retained device state", move |store| {
            store.put_retained(&batch)
        })
        .await;
    }
}

/// Writes device history in batches, keeping at most one record per device
/// topic a second (a device that floods does not flood the store; its
/// latest state is in `retained` anyway). Not durable per batch, like
/// retained state.
async fn write_history(
    registry: RegistryHandle,
    mut rx: mpsc::Receiver<HistoryRecord>,
    shutdown: CancellationToken,
) {
    let mut last: HashMap<(DeviceId, String), i64> = HashMap::new();
    loop {
        let mut batch = Vec::new();
        let open = take_queued(&mut rx, &shutdown, |record: HistoryRecord| {
            let slot = (record.device.clone(), record.topic.clone());
            if last.get(&slot).is_none_or(|t| record.at_ms - t >= 1000) {
                last.insert(slot, record.at_ms);
                batch.push(record);
            }
            batch.len() < 1024
        })
        .await;
        if !open {
            return;
        }
        // Bounded memory: devices that name many event topics reset it.
        if last.len() > 100_000 {
            last.clear();
        }
        if batch.is_empty() {
            continue;
        }
        store_batch(&registry, "device history", move |store| {
            store.append_history(&batch)
        })
        .await;
    }
}

/// Waits for the next item on a writer's queue and hands it, then every
/// item already queued, to `take` until `take` says the batch is full.
/// Queued items come first, so none is left behind at shutdown: the queue
/// is closed then and drained. Returns false once it is closed and empty.
async fn take_queued<T>(
    rx: &mut mpsc::Receiver<T>,
    shutdown: &CancellationToken,
    mut take: impl FnMut(T) -> bool,
) -> bool {
    let first = loop {
        tokio::select! {
            biased;
            next = rx.recv() => match next {
                Some(item) => break item,
                None => return false,
            },
            _ = shutdown.cancelled() => rx.close(),
        }
    };
    let mut more = take(first);
    while more {
        match rx.try_recv() {
            Ok(item) => more = take(item),
            Err(_) => break,
        }
    }
    true
}

/// Runs one batch write on the blocking pool; a failure is logged (the
/// writers keep going: the next batch may well succeed).
async fn store_batch(
    registry: &RegistryHandle,
    what: &'static str,
    write: impl FnOnce(&crate::store::Store) -> Result<(), crate::store::Error> + Send + 'static,
) {
    let registry = registry.clone();
    match tokio::task::spawn_blocking(move || write(registry.store())).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "cannot store {what}"),
        Err(_) => warn!("storing {what} panicked"),
    }
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Admission token bucket: `rate` tokens a second up to `burst`. A connection
/// that finds it empty may borrow ahead (the bucket goes negative) and waits
/// until its token would have arrived, up to [`MAX_ADMISSION_DELAY`].
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u32, burst: u32, now: Instant) -> Self {
        TokenBucket {
            rate: f64::from(rate),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: now,
        }
    }

    /// How long the caller must wait before its token is valid, or `None` to refuse.
    fn admit(&mut self, now: Instant) -> Option<Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        let wait = if self.tokens >= 1.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - self.tokens) / self.rate)
        };
        if wait > MAX_ADMISSION_DELAY {
            return None;
        }
        self.tokens -= 1.0;
        Some(wait)
    }
}

/// Handshakes in progress, oldest first, so the oldest can be evicted when a
/// new connection arrives at the cap.
#[derive(Default)]
struct Pending {
    next: u64,
    by_age: BTreeMap<u64, CancellationToken>,
}

/// Removes a handshake from [`Pending`] when it finishes, however it finishes.
struct PendingGuard {
    pending: Arc<Mutex<Pending>>,
    key: u64,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        lock(&self.pending).by_age.remove(&self.key);
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let mut bucket = TokenBucket::new(
        shared.cfg.admission_rate,
        shared.cfg.admission_burst,
        Instant::now(),
    );
    let pending = Arc::new(Mutex::new(Pending::default()));
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Usually EMFILE/ENFILE: back off briefly instead of spinning.
                    warn!(error = %e, "mqtt accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if shared.telemetry.throttled(peer.ip(), unix_ms()) {
            // Too many refused handshakes from there lately (see telemetry).
            bump(&shared.counters.connections_refused);
            debug!(%peer, "connection refused: address throttled");
            continue;
        }
        let Some(delay) = bucket.admit(Instant::now()) else {
            bump(&shared.counters.connections_refused);
            debug!(%peer, "admission refused: rate limit");
            continue;
        };
        bump(&shared.counters.connections_admitted);
        if !delay.is_zero() {
            bump(&shared.counters.connections_deferred);
        }
        if let Err(e) = tcp.set_nodelay(true) {
            debug!(%peer, error = %e, "set_nodelay failed");
        }
        tracker.spawn(connection(
            shared.clone(),
            tcp,
            peer,
            delay,
            pending.clone(),
            shutdown.clone(),
        ));
    }
    info!("mqtt listener closed");
}

impl Pending {
    /// Registers a handshake that is starting now, evicting the oldest ones
    /// if `cap` are already running.
    fn register(pending: &Arc<Mutex<Pending>>, cap: usize) -> (CancellationToken, PendingGuard) {
        let evict = CancellationToken::new();
        let mut p = lock(pending);
        while p.by_age.len() >= cap {
            if let Some((_, oldest)) = p.by_age.pop_first() {
                oldest.cancel();
            }
        }
        let key = p.next;
        p.next += 1;
        p.by_age.insert(key, evict.clone());
        let guard = PendingGuard {
            pending: pending.clone(),
            key,
        };
        (evict, guard)
    }
}

async fn connection(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    delay: Duration,
    pending: Arc<Mutex<Pending>>,
    shutdown: CancellationToken,
) {
    // A deferred connection waits for its admission token first. It holds no
    // handshake slot meanwhile: counting it as pending would let newer
    // arrivals evict exactly the connections whose turn has come, which
    // stalled every handshake in a reconnect storm.
    if !delay.is_zero() {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    let (evict, guard) = Pending::register(&pending, shared.cfg.max_concurrent_handshakes);
    let acceptor = TlsAcceptor::from(shared.tls.load_full());
    let handshake = tokio::time::timeout(shared.cfg.handshake_timeout, acceptor.accept(tcp));
    let tls = tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = evict.cancelled() => {
            bump(&shared.counters.handshakes_failed);
            debug!(%peer, "pending handshake evicted to admit a newer connection");
            return;
        }
        r = handshake => match r {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                bump(&shared.counters.handshakes_failed);
                handshake_refused(&shared, peer, &e.to_string());
                return;
            }
            Err(_) => {
                bump(&shared.counters.handshakes_failed);
                warn!(target: "security", %peer, "tls handshake timed out");
                return;
            }
        },
    };
    drop(guard);

    // The verifier has already checked the chain, validity and CRL; what is
    // left is to read the identity the certificate names.
    let identity = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .ok_or_else(|| "no client certificate".to_owned())
        .and_then(|cert| {
            let id = ca::device_id_from_cert(cert).map_err(|e| e.to_string())?;
            let (serial, _) = ca::cert_serial_and_expiry(cert).map_err(|e| e.to_string())?;
            Ok((id, serial))
        });
    let (id, serial) = match identity {
        Ok(pair) => pair,
        Err(reason) => {
            bump(&shared.counters.handshakes_failed);
            handshake_refused(
                &shared,
                peer,
                &format!("client certificate names no device: {reason}"),
            );
            return;
        }
    };
    bump(&shared.counters.handshakes_ok);
    debug!(%peer, device = %id, "tls handshake ok");
    session(shared, tls, id, serial, peer, shutdown).await;
}

/// The MQTT codec for the protocol level in the CONNECT.
enum Codec {
    V4(V4),
    V5(V5),
}

impl Codec {
    fn read(&mut self, buf: &mut BytesMut, max: usize) -> Result<Packet, protocol::Error> {
        match self {
            Codec::V4(c) => c.read_mut(buf, max),
            Codec::V5(c) => c.read_mut(buf, max),
        }
    }

    fn write(&self, packet: Packet, buf: &mut BytesMut) -> Result<usize, protocol::Error> {
        match self {
            Codec::V4(c) => c.write(packet, buf),
            Codec::V5(c) => c.write(packet, buf),
        }
    }

    fn is_v5(&self) -> bool {
        matches!(self, Codec::V5(_))
    }
}

/// The protocol level of a CONNECT at the start of `buf`, `Ok(None)` if more
/// bytes are needed, or an error if it is not a CONNECT at all.
fn connect_level(buf: &[u8]) -> Result<Option<u8>, &'static str> {
    let Some(&byte1) = buf.first() else {
        return Ok(None);
    };
    if byte1 != 0x10 {
        return Err("first packet is not CONNECT");
    }
    // Remaining length: 1 to 4 bytes, 7 bits each.
    let mut header_len = 1;
    loop {
        let Some(&b) = buf.get(header_len) else {
            return Ok(None);
        };
        header_len += 1;
        if b & 0x80 == 0 {
            break;
        }
        if header_len > 4 {
            return Err("malformed remaining length");
        }
    }
    let (Some(&hi), Some(&lo)) = (buf.get(header_len), buf.get(header_len + 1)) else {
        return Ok(None);
    };
    let name_len = usize::from(u16::from_be_bytes([hi, lo]));
    if name_len > 6 {
        return Err("unknown protocol name");
    }
    Ok(buf.get(header_len + 2 + name_len).copied())
}

/// Why a session ended, which decides the will and the router clean-up.
#[derive(Debug)]
enum End {
    /// The client sent DISCONNECT; `with_will` for v5 reason 0x04.
    Clean { with_will: bool },
    /// Revoked, disconnected by the admin, or taken over by a newer session.
    Kicked,
    /// The hub is shutting down.
    Shutdown,
    /// The socket closed or failed.
    Network(#[expect(dead_code, reason = "read through Debug in the disconnect log line")] String),
    /// No packet within 1.5 times the keep-alive.
    KeepAlive,
    /// A malformed or forbidden packet; the v5 reason to send, if any.
    Protocol(String, Option<DisconnectReasonCode>),
    /// The router dropped the link.
    RouterGone,
}

/// Reads one whole packet, returning it with its first header byte (which
/// carries a PUBLISH's QoS, hidden by rumqttd's `Publish`).
async fn read_packet<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    codec: &mut Codec,
    max: usize,
) -> Result<(Packet, u8), End> {
    loop {
        let byte1 = buf.first().copied().unwrap_or(0);
        match codec.read(buf, max) {
            Ok(packet) => return Ok((packet, byte1)),
            Err(protocol::Error::InsufficientBytes(_)) => {}
            Err(protocol::Error::PayloadSizeLimitExceeded(n)) => {
                return Err(End::Protocol(
                    format!("packet exceeds max_packet_size by {n} bytes"),
                    Some(DisconnectReasonCode::PacketTooLarge),
                ));
            }
            Err(e) => {
                return Err(End::Protocol(
                    format!("malformed packet: {e}"),
                    Some(DisconnectReasonCode::MalformedPacket),
                ));
            }
        }
        match rd.read_buf(buf).await {
            Ok(0) => return Err(End::Network("connection closed by peer".into())),
            Ok(_) => {}
            Err(e) => return Err(End::Network(e.to_string())),
        }
    }
}

/// Builds a PUBLISH with the given QoS and packet id. rumqttd keeps those
/// fields crate-private, so go through its own wire format.
fn publish_with_qos(topic: Bytes, payload: Bytes, qos: QoS, retain: bool, pkid: u16) -> Publish {
    let mut raw = BytesMut::from(&Publish::new(topic, payload, retain).serialize()[..]);
    raw[0] = (raw[0] & !0b0110) | ((qos as u8) << 1);
    raw[1..3].copy_from_slice(&pkid.to_be_bytes());
    Publish::deserialize(raw.freeze())
}

/// The packet id of a PUBLISH (0 for QoS 0).
fn publish_pkid(publish: &Publish) -> u16 {
    let raw = publish.serialize();
    u16::from_be_bytes([raw[1], raw[2]])
}

/// Counts messages the router evicted from a filter's log before a lagging
/// subscriber read them. Each filter's log numbers its messages with
/// consecutive absolute offsets (the second half of `Forward::cursor`), so a
/// forward that skips offsets means the skipped ones were lost to this
/// subscriber. A message matching several of the subscriber's filters cannot
/// be attributed to one log and is not checked.
#[derive(Default)]
struct GapCounter {
    /// Router-side filter -> the last absolute offset read from its log.
    last: HashMap<String, Option<u64>>,
}

impl GapCounter {
    fn subscribed(&mut self, filter: &str) {
        // A new subscription starts wherever the log is: no baseline yet.
        self.last.insert(filter.to_owned(), None);
    }

    fn unsubscribed(&mut self, filter: &str) {
        self.last.remove(filter);
    }

    /// Records a forwarded message; returns how many were skipped before it.
    fn seen(&mut self, topic: &[u8], cursor: Option<(u64, u64)>) -> u64 {
        // Retained messages come with no cursor; they are not in a log.
        let (Some((_, offset)), Ok(topic)) = (cursor, std::str::from_utf8(topic)) else {
            return 0;
        };
        let mut matching = self
            .last
            .iter_mut()
            .filter(|(filter, _)| acl::topic_matches(filter, topic));
        let (Some((_, last)), None) = (matching.next(), matching.next()) else {
            return 0;
        };
        let lost = match *last {
            Some(prev) if offset > prev + 1 => offset - prev - 1,
            _ => 0,
        };
        // Retransmissions can go backwards; the high-water mark stays.
        *last = Some(last.map_or(offset, |prev| prev.max(offset)));
        lost
    }
}

/// One session's mutable state, owned by its task.
struct Conn {
    shared: Arc<Shared>,
    id: DeviceId,
    principal: Principal,
    codec: Codec,
    /// Encoded packets for the writer task.
    out: mpsc::Sender<Bytes>,
    /// Scratch buffer for encoding.
    enc: BytesMut,
    /// The router link's sending side.
    link_tx: LinkTx,
    /// The router link's receiving side.
    link_rx: LinkRx,
    /// SUBSCRIBEs partly refused: pkid -> the reason code per filter, `None`
    /// where the router's answer goes.
    pending_subs: HashMap<u16, Vec<Option<SubscribeReasonCode>>>,
    /// Refused PUBLISHes so far.
    violations: u32,
    /// Where each subscribed filter's router log was last read, to count
    /// what the router evicted before this subscriber read it.
    gaps: GapCounter,
}

impl Conn {
    /// Queues a packet for the writer, waiting for room.
    async fn send(&mut self, packet: Packet) -> Result<(), End> {
        self.codec
            .write(packet, &mut self.enc)
            .map_err(|e| End::Protocol(format!("cannot encode packet: {e}"), None))?;
        let frame = self.enc.split().freeze();
        self.out
            .send(frame)
            .await
            .map_err(|_| End::Network("writer closed".into()))
    }

    /// Refuses a session-ending packet with the v5 reason, or just closes (v4).
    fn protocol_error(&self, what: String, reason: DisconnectReasonCode) -> End {
        bump(&self.shared.counters.protocol_errors);
        warn!(target: "security", device = %self.id, %what, "protocol error");
        End::Protocol(what, Some(reason))
    }

    /// Handles one packet from the device. Packets for the router are collected
    /// in `to_router` and sent in one batch.
    async fn incoming(
        &mut self,
        packet: Packet,
        byte1: u8,
        to_router: &mut Vec<Packet>,
    ) -> Result<(), End> {
        match packet {
            Packet::Publish(publish, props) => {
                self.incoming_publish(publish, props, byte1, to_router)
                    .await
            }
            Packet::Subscribe(subscribe, props) => {
                self.incoming_subscribe(subscribe, props, to_router).await
            }
            Packet::Unsubscribe(mut u, p) => {
                for filter in &mut u.filters {
                    *filter = escape_dollar(filter);
                    self.gaps.unsubscribed(filter);
                }
                to_router.push(Packet::Unsubscribe(u, p));
                Ok(())
            }
            Packet::PubAck(a, p) => {
                to_router.push(Packet::PubAck(a, p));
                Ok(())
            }
            Packet::PingReq(_) => self.send(Packet::PingResp(PingResp)).await,
            Packet::Disconnect(d, _) => Err(End::Clean {
                with_will: d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage,
            }),
            Packet::PubRec(..) | Packet::PubRel(..) | Packet::PubComp(..) => Err(self
                .protocol_error(
                    "QoS 2 is not supported".into(),
                    DisconnectReasonCode::QoSNotSupported,
                )),
            other => Err(self.protocol_error(
                format!("unexpected {} from a client", packet_name(&other)),
                DisconnectReasonCode::ProtocolError,
            )),
        }
    }

    async fn incoming_publish(
        &mut self,
        publish: Publish,
        props: Option<PublishProperties>,
        byte1: u8,
        to_router: &mut Vec<Packet>,
    ) -> Result<(), End> {
        let qos = (byte1 >> 1) & 0b11;
        if qos > 1 {
            return Err(self.protocol_error(
                "QoS 2 PUBLISH: the hub supports QoS 0 and 1".into(),
                DisconnectReasonCode::QoSNotSupported,
            ));
        }
        if props.as_ref().is_some_and(|p| p.topic_alias.is_some()) {
            // CONNACK advertised a topic alias maximum of 0; aliases would also
            // hide the real topic from the ACL.
            return Err(self.protocol_error(
                "topic alias used but not offered".into(),
                DisconnectReasonCode::TopicAliasInvalid,
            ));
        }
        let Ok(topic) = std::str::from_utf8(&publish.topic) else {
            return Err(self.protocol_error(
                "topic is not UTF-8".into(),
                DisconnectReasonCode::TopicNameInvalid,
            ));
        };
        if let Err(e) = acl::validate_topic(topic, limits(&self.shared.cfg)) {
            return Err(self.protocol_error(
                format!("publish topic {topic:?}: {e}"),
                DisconnectReasonCode::TopicNameInvalid,
            ));
        }
        let isolated = self.shared.isolated.load();
        if !acl::check_publish(&self.principal, topic, &|id| isolated.contains(id)) {
            return self.refused_publish(topic, qos, &publish).await;
        }
        bump(&self.shared.counters.publishes_received);
        // The device's half of an update asks for chunks as fast as the hub
        // answers: those requests are not traffic to judge.
        if let Principal::Device(id) | Principal::Isolated(id) = &self.principal
            && acl::own_suffix(id, topic) != Some("update/get")
        {
            for anomaly in self
                .shared
                .telemetry
                .published(id, publish.payload.len(), unix_ms())
            {
                on_anomaly(&self.shared, anomaly);
            }
        }
        if let Principal::Device(id) = &self.principal
            && acl::own_suffix(id, topic) == Some("cert/csr")
        {
            // A renewal request: answered by the hub, never routed.
            self.renew(&publish.payload);
            return self.ack_qos1(qos, &publish, PubAckReason::Success).await;
        }
        if let Principal::Device(id) = &self.principal
            && let Some(which) = acl::own_suffix(id, topic).and_then(|s| s.strip_prefix("update/"))
        {
            // The device's half of a firmware update: for the lifecycle
            // service, never routed.
            let report = match which {
                "get" => DeviceReport::UpdateGet {
                    device: id.clone(),
                    payload: publish.payload.clone(),
                },
                _ => DeviceReport::UpdateResult {
                    device: id.clone(),
                    payload: publish.payload.clone(),
                },
            };
            self.report(report);
            return self.ack_qos1(qos, &publish, PubAckReason::Success).await;
        }
        self.note_device_topics(topic, &publish);
        let mut publish = publish;
        publish.topic = escape_dollar_bytes(publish.topic);
        to_router.push(Packet::Publish(publish, props));
        Ok(())
    }

    /// Acknowledges a QoS 1 PUBLISH the hub answers itself.
    async fn ack_qos1(
        &mut self,
        qos: u8,
        publish: &Publish,
        reason: PubAckReason,
    ) -> Result<(), End> {
        if qos != 1 {
            return Ok(());
        }
        let ack = PubAck {
            pkid: publish_pkid(publish),
            reason,
        };
        self.send(Packet::PubAck(ack, None)).await
    }

    /// A PUBLISH the ACL refused: counted, logged, answered as each MQTT
    /// version allows, and the session ended after too many.
    async fn refused_publish(
        &mut self,
        topic: &str,
        qos: u8,
        publish: &Publish,
    ) -> Result<(), End> {
        bump(&self.shared.counters.acl_denied);
        self.violations += 1;
        self.denied("publish", topic);
        // v5 says why; v3.1.1 has no negative PUBACK, so the message is
        // acknowledged and discarded (as Mosquitto does) to stop retries.
        let reason = if self.codec.is_v5() {
            PubAckReason::NotAuthorized
        } else {
            PubAckReason::Success
        };
        self.ack_qos1(qos, publish, reason).await?;
        if self.violations >= self.shared.cfg.max_acl_violations {
            return Err(End::Protocol(
                format!("{} publishes denied by the acl", self.violations),
                Some(DisconnectReasonCode::NotAuthorized),
            ));
        }
        Ok(())
    }

    /// What the hub keeps of a device's own state and metadata: the kind it
    /// states, and the retained payloads for the store; and what it tells the
    /// bus (states and events of devices that are not isolated: an isolated
    /// device may be compromised, so it drives no automation).
    fn note_device_topics(&self, topic: &str, publish: &Publish) {
        let (Principal::Device(id) | Principal::Isolated(id)) = &self.principal else {
            return;
        };
        let Some(suffix) = acl::own_suffix(id, topic) else {
            return;
        };
        if let Some(history) = &self.shared.history_tx {
            let name = if suffix == "state" {
                Some("state")
            } else {
                suffix.strip_prefix("event/")
            };
            if let Some(name) = name {
                let record = HistoryRecord {
                    device: id.clone(),
                    at_ms: unix_ms(),
                    topic: name.to_owned(),
                    payload: String::from_utf8_lossy(&publish.payload).into_owned(),
                };
                // A full queue drops history, never the message.
                let _ = history.try_send(record);
            }
        }
        if let (Some(bus), Principal::Device(_)) = (&self.shared.bus, &self.principal) {
            if suffix == "state" {
                bus.send(HubEvent::State {
                    device: id.clone(),
                    payload: publish.payload.clone(),
                });
            } else if let Some(name) = suffix.strip_prefix("event/") {
                bus.send(HubEvent::Event {
                    device: id.clone(),
                    name: name.to_owned(),
                    payload: publish.payload.clone(),
                });
            }
        }
        let Some(which) = RetainedKind::from_suffix(suffix) else {
            return;
        };
        if which == RetainedKind::Meta {
            self.report(DeviceReport::Meta {
                device: id.clone(),
                payload: publish.payload.clone(),
            });
        }
        if publish.retain {
            let update = (id.clone(), which, publish.payload.to_vec());
            if self.shared.retained_tx.try_send(update).is_err() {
                warn!(device = %id, "state store queue full: this update is not persisted");
            }
        }
    }

    async fn incoming_subscribe(
        &mut self,
        mut subscribe: Subscribe,
        props: Option<rumqttd::protocol::SubscribeProperties>,
        to_router: &mut Vec<Packet>,
    ) -> Result<(), End> {
        let v5 = self.codec.is_v5();
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        let mut allowed = Vec::with_capacity(subscribe.filters.len());
        for mut filter in std::mem::take(&mut subscribe.filters) {
            let refusal = match acl::validate_filter(&filter.path, limits(&self.shared.cfg)) {
                Err(e) => {
                    warn!(device = %self.id, filter = %filter.path, error = %e, "invalid subscription");
                    Some(SubscribeReasonCode::TopicFilterInvalid)
                }
                Ok(()) if !acl::check_subscribe(&self.principal, &filter.path) => {
                    bump(&self.shared.counters.acl_denied);
                    self.denied("subscribe", &filter.path);
                    Some(SubscribeReasonCode::NotAuthorized)
                }
                Ok(()) => None,
            };
            match refusal {
                // MQTT 3.1.1 has one failure code, 0x80.
                Some(_) if !v5 => codes.push(Some(SubscribeReasonCode::Failure)),
                Some(code) => codes.push(Some(code)),
                None => {
                    // QoS 2 is granted as QoS 1, which MQTT allows.
                    if filter.qos == QoS::ExactlyOnce {
                        filter.qos = QoS::AtLeastOnce;
                    }
                    filter.path = escape_dollar(&filter.path);
                    self.gaps.subscribed(&filter.path);
                    codes.push(None);
                    allowed.push(filter);
                }
            }
        }
        if allowed.is_empty() {
            let return_codes = codes.into_iter().flatten().collect();
            let suback = SubAck {
                pkid: subscribe.pkid,
                return_codes,
            };
            return self.send(Packet::SubAck(suback, None)).await;
        }
        if codes.iter().any(Option::is_some) {
            self.pending_subs.insert(subscribe.pkid, codes);
        }
        subscribe.filters = allowed;
        to_router.push(Packet::Subscribe(subscribe, props));
        Ok(())
    }

    /// An ACL refusal: a security event, and telemetry's probing count.
    fn denied(&self, what: &str, topic: &str) {
        self.shared.seclog.record(
            seclog::Event::new(
                seclog::Kind::AclDenied,
                Severity::Warning,
                format!("{what} denied by the acl: {topic}"),
            )
            .device(&self.id)
            .actor("device")
            .evidence("topic", topic),
        );
        if let Some(anomaly) = self.shared.telemetry.denied(&self.id, topic, unix_ms()) {
            on_anomaly(&self.shared, anomaly);
        }
    }

    /// Hands a device's report to the lifecycle service; a full queue
    /// drops it with a warning (the device repeats its meta on reconnect,
    /// and its update times out and asks again).
    fn report(&self, report: DeviceReport) {
        if let Some(tx) = &self.shared.reports
            && tx.try_send(report).is_err()
        {
            warn!(device = %self.id, "lifecycle queue full: a device report was dropped");
        }
    }

    /// Issues a renewed certificate for this device from the CSR in `payload`
    /// and publishes the answer on `d/<id>/cert/new`, in the background.
    fn renew(&self, payload: &Bytes) {
        let handle = EdgeHandle {
            shared: self.shared.clone(),
        };
        let id = self.id.clone();
        let csr = String::from_utf8(payload.to_vec());
        tokio::spawn(async move {
            let registry = handle.shared.registry.clone();
            let answer = match csr {
                Err(_) => serde_json::json!({"error": "the CSR is not UTF-8 PEM"}),
                Ok(csr) => {
                    let target = id.clone();
                    match tokio::task::spawn_blocking(move || registry.renew(&target, &csr)).await {
                        Ok(Ok(renewed)) => serde_json::json!({
                            "cert": renewed.cert_pem,
                            "ca": renewed.ca_pem,
                        }),
                        Ok(Err(e)) => {
                            warn!(device = %id, error = %e, "certificate renewal refused");
                            serde_json::json!({"error": e.to_string()})
                        }
                        Err(_) => serde_json::json!({"error": "renewal failed inside the hub"}),
                    }
                }
            };
            let topic = format!("d/{id}/cert/new");
            let payload = Bytes::from(answer.to_string());
            if let Err(e) = handle
                .publish(&topic, payload, Qos::AtLeastOnce, false)
                .await
            {
                warn!(device = %id, error = %e, "cannot publish the renewal answer");
            }
        });
    }

    /// Fills the refused filters' codes into the router's SUBACK.
    fn merge_suback(&mut self, mut suback: SubAck) -> SubAck {
        if let Some(template) = self.pending_subs.remove(&suback.pkid) {
            let mut from_router = suback.return_codes.into_iter();
            suback.return_codes = template
                .into_iter()
                .map(|code| {
                    code.or_else(|| from_router.next())
                        .unwrap_or(SubscribeReasonCode::Failure)
                })
                .collect();
        }
        suback
    }

    /// Passes a batch of packets to the router with one wake-up.
    async fn flush_to_router(&mut self, batch: &mut Vec<Packet>) -> Result<(), End> {
        let Some(last) = batch.pop() else {
            return Ok(());
        };
        self.link_tx.buffer().extend(batch.drain(..));
        // `send` pushes the last packet and notifies the router once for all.
        // It blocks only if the router's 1000-event queue is full.
        self.link_tx
            .send(last)
            .await
            .map(|_| ())
            .map_err(|_| End::RouterGone)
    }

    /// Handles one notification from the router. Returns true when the router
    /// asked to be woken after this batch.
    async fn notification(&mut self, n: Notification) -> Result<bool, End> {
        match n {
            Notification::Forward(mut forward) => {
                let lost = self.gaps.seen(&forward.publish.topic, forward.cursor);
                if lost > 0 {
                    self.shared
                        .counters
                        .dropped_slow_subscriber
                        .fetch_add(lost, Ordering::Relaxed);
                }
                forward.publish.topic = unescape_dollar_bytes(forward.publish.topic);
                let qos0 = forward.publish.serialize()[0] & 0b0110 == 0;
                if qos0 && self.out.capacity() <= RESERVED_SLOTS {
                    bump(&self.shared.counters.dropped_slow_subscriber);
                    return Ok(false);
                }
                bump(&self.shared.counters.publishes_sent);
                self.send(Packet::Publish(forward.publish, forward.properties))
                    .await?;
                Ok(false)
            }
            Notification::Unschedule => Ok(true),
            Notification::Disconnect(d, p) => {
                if self.codec.is_v5() {
                    self.send(Packet::Disconnect(d, p)).await?;
                }
                Err(End::RouterGone)
            }
            other => {
                let packet: Option<Packet> = other.into();
                match packet {
                    Some(Packet::SubAck(s, p)) => {
                        let merged = self.merge_suback(s);
                        self.send(Packet::SubAck(merged, p)).await?;
                    }
                    // The session's CONNACK was written by the edge itself.
                    Some(Packet::ConnAck(..)) | None => {}
                    Some(packet) => self.send(packet).await?,
                }
                Ok(false)
            }
        }
    }
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(..) => "CONNECT",
        Packet::ConnAck(..) => "CONNACK",
        Packet::Publish(..) => "PUBLISH",
        Packet::PubAck(..) => "PUBACK",
        Packet::PingReq(..) => "PINGREQ",
        Packet::PingResp(..) => "PINGRESP",
        Packet::Subscribe(..) => "SUBSCRIBE",
        Packet::SubAck(..) => "SUBACK",
        Packet::PubRec(..) => "PUBREC",
        Packet::PubRel(..) => "PUBREL",
        Packet::PubComp(..) => "PUBCOMP",
        Packet::Unsubscribe(..) => "UNSUBSCRIBE",
        Packet::UnsubAck(..) => "UNSUBACK",
        Packet::Disconnect(..) => "DISCONNECT",
    }
}

/// Writes queued frames to the socket in batches, then closes TLS cleanly.
async fn writer<W: AsyncWrite + Unpin>(mut wr: W, mut rx: mpsc::Receiver<Bytes>) {
    let mut batch = BytesMut::with_capacity(16 * 1024);
    while let Some(first) = rx.recv().await {
        batch.extend_from_slice(&first);
        while batch.len() < 64 * 1024 {
            match rx.try_recv() {
                Ok(more) => batch.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        if wr.write_all(&batch).await.is_err() || wr.flush().await.is_err() {
            return;
        }
        batch.clear();
    }
    let _ = wr.shutdown().await;
}

/// A refused TLS handshake: recorded, counted against its address, and the
/// address throttled once it has failed too often.
fn handshake_refused(shared: &Shared, peer: SocketAddr, why: &str) {
    shared.seclog.record(
        seclog::Event::new(
            seclog::Kind::HandshakeRefused,
            Severity::Warning,
            format!("tls handshake refused: {why}"),
        )
        .actor(peer.to_string()),
    );
    if let Some(t) = shared.telemetry.handshake_failed(peer.ip(), unix_ms()) {
        shared.seclog.record(
            seclog::Event::new(
                seclog::Kind::Throttled,
                Severity::Alert,
                format!(
                    "{} refused handshakes from {}: its connections are refused for a while",
                    t.failures, t.addr
                ),
            )
            .actor(t.addr.to_string())
            .evidence("failures", t.failures)
            .evidence("until_ms", t.until_ms),
        );
    }
}

/// Acts on an anomaly as its policy says: a security event (a warning for
/// `log`, an alert otherwise), and for `isolate` the device's isolation.
fn on_anomaly(shared: &Arc<Shared>, anomaly: Anomaly) {
    let severity = match anomaly.policy {
        AnomalyPolicy::Log => Severity::Warning,
        AnomalyPolicy::Alert | AnomalyPolicy::Isolate => Severity::Alert,
    };
    let isolate = anomaly.policy == AnomalyPolicy::Isolate;
    let headline = anomaly.kind.headline();
    let message = if isolate {
        format!("{headline}: device isolated")
    } else {
        headline.to_owned()
    };
    shared.seclog.record(
        seclog::Event::new(seclog::Kind::Anomaly, severity, message)
            .device(&anomaly.device)
            .actor("telemetry policy")
            .evidence("anomaly", anomaly.kind.as_str())
            .evidence("expected", &anomaly.expected)
            .evidence("seen", &anomaly.seen),
    );
    if isolate && !shared.isolated.load().contains(&anomaly.device) {
        let handle = EdgeHandle {
            shared: shared.clone(),
        };
        tokio::spawn(async move {
            if let Err(e) = handle
                .isolate(&anomaly.device, headline, "telemetry policy")
                .await
            {
                warn!(device = %anomaly.device, error = %e, "cannot isolate after an anomaly");
            }
        });
    }
}

/// Writes a refusing CONNACK straight to the socket and closes it.
async fn refuse(
    shared: &Shared,
    mut tls: TlsStream<TcpStream>,
    codec: &Codec,
    code: ConnectReturnCode,
    peer: SocketAddr,
    id: &DeviceId,
    why: &str,
) {
    bump(&shared.counters.sessions_refused);
    shared.seclog.record(
        seclog::Event::new(
            seclog::Kind::SessionRefused,
            Severity::Warning,
            format!("mqtt session refused: {why}"),
        )
        .device(id)
        .actor(peer.to_string()),
    );
    let mut buf = BytesMut::new();
    let ack = ConnAck {
        session_present: false,
        code,
    };
    let props = codec.is_v5().then(|| ConnAckProperties {
        reason_string: Some(why.to_owned()),
        ..Default::default()
    });
    if codec.write(Packet::ConnAck(ack, props), &mut buf).is_ok() {
        let _ = tls.write_all(&buf).await;
    }
    let _ = tls.shutdown().await;
}

/// Decides whether a CONNECT may open a session and as whom, or which
/// CONNACK code refuses it and why.
fn admit_connect(
    shared: &Arc<Shared>,
    id: &DeviceId,
    serial: &str,
    client_id: &str,
    will: Option<&LastWill>,
    codec: &Codec,
) -> Result<Principal, (ConnectReturnCode, String)> {
    if !client_id.is_empty() && client_id != id.as_str() {
        return Err((
            ConnectReturnCode::ClientIdentifierNotValid,
            format!("client id {client_id:?} does not match certificate device id {id}"),
        ));
    }
    let admission = shared
        .registry
        .admit(id, serial)
        .map_err(|why| (ConnectReturnCode::NotAuthorized, why))?;
    if let Some(crl) = admission.new_crl {
        // The device connected with its renewed certificate: the old ones are
        // revoked now, and every handshake from here on must know it.
        if let Err(e) = (EdgeHandle {
            shared: shared.clone(),
        })
        .set_crl(crl)
        {
            warn!(device = %id, error = %e, "cannot install the CRL retiring old certificates");
        }
    }
    let principal = admission.principal;
    if let Some(w) = will {
        let allowed = std::str::from_utf8(&w.topic).is_ok_and(|t| {
            acl::validate_topic(t, limits(&shared.cfg)).is_ok()
                && acl::check_publish(&principal, t, &|_| false)
        });
        if !allowed {
            return Err((
                ConnectReturnCode::NotAuthorized,
                "last will topic is not one this device may publish to".into(),
            ));
        }
    }
    let sessions = lock(&shared.sessions);
    if sessions.len() >= shared.cfg.max_connections && !sessions.contains_key(id) {
        let code = if codec.is_v5() {
            ConnectReturnCode::ServerBusy
        } else {
            ConnectReturnCode::ServiceUnavailable
        };
        return Err((code, "too many connections".into()));
    }
    Ok(principal)
}

/// Reads the CONNECT, checks identity and rights, then runs the session.
async fn session(
    shared: Arc<Shared>,
    mut tls: TlsStream<TcpStream>,
    id: DeviceId,
    serial: String,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    let max = shared.cfg.max_packet_size;
    let mut buf = BytesMut::with_capacity(4096);

    // The CONNECT must arrive within connect_timeout, and says which codec to use.
    let first = tokio::time::timeout(shared.cfg.connect_timeout, async {
        loop {
            match connect_level(&buf) {
                Ok(Some(level)) => return Ok(level),
                Ok(None) => {}
                Err(e) => return Err(e.to_owned()),
            }
            match tls.read_buf(&mut buf).await {
                Ok(0) => return Err("connection closed before CONNECT".to_owned()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await;
    let level = match first {
        Ok(Ok(level)) => level,
        Ok(Err(why)) => {
            bump(&shared.counters.protocol_errors);
            warn!(target: "security", %peer, device = %id, reason = %why, "no valid CONNECT");
            return;
        }
        Err(_) => {
            bump(&shared.counters.protocol_errors);
            warn!(target: "security", %peer, device = %id, "no CONNECT within connect_timeout");
            return;
        }
    };
    let mut codec = match level {
        4 => Codec::V4(V4),
        5 => Codec::V5(V5),
        other => {
            let why = format!("mqtt protocol level {other} is not supported (use 3.1.1 or 5)");
            refuse(
                &shared,
                tls,
                &Codec::V4(V4),
                ConnectReturnCode::RefusedProtocolVersion,
                peer,
                &id,
                &why,
            )
            .await;
            return;
        }
    };
    let connect_read = tokio::time::timeout(
        shared.cfg.connect_timeout,
        read_packet(&mut tls, &mut buf, &mut codec, max),
    )
    .await;
    let (connect, will) = match connect_read {
        Ok(Ok((Packet::Connect(c, _props, will, _will_props, _login), _))) => (c, will),
        Ok(Ok(_)) | Ok(Err(_)) | Err(_) => {
            bump(&shared.counters.protocol_errors);
            warn!(target: "security", %peer, device = %id, "malformed CONNECT");
            return;
        }
    };
    let Connect {
        keep_alive,
        client_id,
        clean_session,
    } = connect;

    let principal = match admit_connect(&shared, &id, &serial, &client_id, will.as_ref(), &codec) {
        Ok(p) => p,
        Err((code, why)) => {
            refuse(&shared, tls, &codec, code, peer, &id, &why).await;
            return;
        }
    };

    // Register, taking over any older session of the same device. The old one
    // must be fully gone (its router link removed) before the new link is
    // made, or its clean-up could remove the new link.
    let number = shared.next_session.fetch_add(1, Ordering::Relaxed);
    let kick = CancellationToken::new();
    let ended = CancellationToken::new();
    let previous = lock(&shared.sessions).insert(
        id.clone(),
        SessionEntry {
            number,
            kick: kick.clone(),
            ended: ended.clone(),
        },
    );
    // From here on the entry must be removed and `ended` cancelled on every path.
    let _ended_guard = ended.clone().drop_guard();
    if let Some(old) = previous {
        info!(device = %id, "new session takes over the previous one");
        old.kick.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), old.ended.cancelled()).await;
    }

    let links = shared.links.clone();
    let link_id = id.to_string();
    let link = tokio::task::spawn_blocking(move || links(&link_id, clean_session)).await;
    let (link_tx, link_rx, ack) = match link {
        Ok(Ok(l)) => l,
        Ok(Err(e)) => {
            warn!(device = %id, error = %e, "router refused the link");
            forget_session(&shared, &id, number);
            refuse(
                &shared,
                tls,
                &codec,
                ConnectReturnCode::ServerUnavailable,
                peer,
                &id,
                "router unavailable",
            )
            .await;
            return;
        }
        Err(e) => {
            warn!(device = %id, error = %e, "router link task failed");
            forget_session(&shared, &id, number);
            return;
        }
    };
    let session_present = match Option::<Packet>::from(ack) {
        Some(Packet::ConnAck(ack, _)) => ack.session_present,
        _ => false,
    };

    let (rd, wr): (ReadHalf<_>, WriteHalf<_>) = tokio::io::split(tls);
    let (out_tx, out_rx) = mpsc::channel(shared.cfg.outgoing_queue + RESERVED_SLOTS);
    let writer_task = tokio::spawn(writer(wr, out_rx));
    let mut conn = Conn {
        shared: shared.clone(),
        id: id.clone(),
        principal,
        codec,
        out: out_tx,
        enc: BytesMut::with_capacity(4096),
        link_tx,
        link_rx,
        pending_subs: HashMap::new(),
        violations: 0,
        gaps: GapCounter::default(),
    };
    let props = conn.codec.is_v5().then(|| ConnAckProperties {
        assigned_client_identifier: client_id.is_empty().then(|| id.to_string()),
        max_qos: Some(1),
        retain_available: Some(1),
        max_packet_size: u32::try_from(max).ok(),
        topic_alias_max: Some(0),
        wildcard_subscription_available: Some(1),
        subscription_identifiers_available: Some(0),
        shared_subscription_available: Some(0),
        ..Default::default()
    });
    let connack = Packet::ConnAck(
        ConnAck {
            session_present,
            code: ConnectReturnCode::Success,
        },
        props,
    );
    let end = match conn.send(connack).await {
        Err(end) => end,
        Ok(()) => {
            shared.registry.touch(&id);
            info!(%peer, device = %id, v5 = conn.codec.is_v5(), "device connected");
            if let Some(anomaly) = shared.telemetry.connected(&id, unix_ms()) {
                on_anomaly(&shared, anomaly);
            }
            if let Some(bus) = &shared.bus {
                bus.send(HubEvent::Online(id.clone()));
            }
            run_session(&mut conn, rd, buf, keep_alive, &kick, &shutdown).await
        }
    };

    // Clean-up: v5 DISCONNECT with a reason, the will, the router link.
    let v5_reason = match &end {
        End::Kicked => Some(DisconnectReasonCode::AdministrativeAction),
        End::Shutdown => Some(DisconnectReasonCode::ServerShuttingDown),
        End::KeepAlive => Some(DisconnectReasonCode::KeepAliveTimeout),
        End::Protocol(_, reason) => *reason,
        End::Clean { .. } | End::Network(_) | End::RouterGone => None,
    };
    if let (Some(reason_code), true) = (v5_reason, conn.codec.is_v5()) {
        let _ = conn
            .send(Packet::Disconnect(Disconnect { reason_code }, None))
            .await;
    }
    let publish_will = !matches!(end, End::Clean { with_will: false });
    if let (
        true,
        Some(LastWill {
            topic,
            message,
            qos,
            retain,
        }),
    ) = (publish_will, will)
    {
        let publish = publish_with_qos(escape_dollar_bytes(topic), message, qos, retain, 1);
        let _ = conn
            .flush_to_router(&mut vec![Packet::Publish(publish, None)])
            .await;
    }
    if !matches!(end, End::RouterGone) {
        // The router forgets the link (and, for clean sessions, its subscriptions).
        let _ = conn
            .flush_to_router(&mut vec![Packet::Disconnect(
                Disconnect {
                    reason_code: DisconnectReasonCode::NormalDisconnection,
                },
                None,
            )])
            .await;
    }
    drop(conn);
    let _ = tokio::time::timeout(Duration::from_secs(1), writer_task).await;
    let last = forget_session(&shared, &id, number);
    shared.registry.touch(&id);
    info!(%peer, device = %id, reason = ?end, "device disconnected");
    // A session replaced by a newer one of the same device is not "offline".
    if let (true, Some(bus)) = (last, &shared.bus) {
        bus.send(HubEvent::Offline(id.clone()));
    }
}

/// Removes the session entry if it is still ours (a takeover may have
/// replaced it); returns whether it was.
fn forget_session(shared: &Shared, id: &DeviceId, number: u64) -> bool {
    let mut sessions = lock(&shared.sessions);
    if sessions.get(id).is_some_and(|e| e.number == number) {
        sessions.remove(id);
        return true;
    }
    false
}

/// The session's main loop: device packets in, router notifications out.
async fn run_session<R: AsyncRead + Unpin>(
    conn: &mut Conn,
    mut rd: R,
    mut buf: BytesMut,
    keep_alive: u16,
    kick: &CancellationToken,
    shutdown: &CancellationToken,
) -> End {
    // MQTT: the server may close after 1.5 times the keep-alive without a packet.
    let idle_limit = (keep_alive > 0).then(|| Duration::from_secs(u64::from(keep_alive)) * 3 / 2);
    let mut deadline = idle_limit.map(|d| tokio::time::Instant::now() + d);
    let max = conn.shared.cfg.max_packet_size;
    let mut to_router = Vec::new();
    loop {
        let keepalive_expired = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = kick.cancelled() => return End::Kicked,
            _ = shutdown.cancelled() => return End::Shutdown,
            _ = keepalive_expired => return End::KeepAlive,
            read = read_packet(&mut rd, &mut buf, &mut conn.codec, max) => {
                let (packet, byte1) = match read {
                    Ok(p) => p,
                    Err(End::Protocol(what, reason)) => {
                        bump(&conn.shared.counters.protocol_errors);
                        warn!(target: "security", device = %conn.id, %what, "protocol error");
                        return End::Protocol(what, reason);
                    }
                    Err(end) => return end,
                };
                deadline = idle_limit.map(|d| tokio::time::Instant::now() + d);
                if let Err(end) = conn.incoming(packet, byte1, &mut to_router).await {
                    let _ = conn.flush_to_router(&mut to_router).await;
                    return end;
                }
                // Take every other whole packet already buffered, so the router
                // is woken once per read rather than once per packet.
                loop {
                    let byte1 = buf.first().copied().unwrap_or(0);
                    match conn.codec.read(&mut buf, max) {
                        Ok(packet) => {
                            if let Err(end) = conn.incoming(packet, byte1, &mut to_router).await {
                                let _ = conn.flush_to_router(&mut to_router).await;
                                return end;
                            }
                        }
                        Err(protocol::Error::InsufficientBytes(_)) => break,
                        Err(e) => {
                            let _ = conn.flush_to_router(&mut to_router).await;
                            bump(&conn.shared.counters.protocol_errors);
                            return End::Protocol(format!("malformed packet: {e}"), Some(DisconnectReasonCode::MalformedPacket));
                        }
                    }
                }
                if let Err(end) = conn.flush_to_router(&mut to_router).await {
                    return end;
                }
            }
            n = conn.link_rx.next() => {
                let mut wake = false;
                match n {
                    Ok(Some(n)) => match conn.notification(n).await {
                        Ok(w) => wake |= w,
                        Err(end) => return end,
                    },
                    Ok(None) => {}
                    Err(_) => return End::RouterGone,
                }
                if wake && conn.link_rx.wake().await.is_err() {
                    return End::RouterGone;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::Ca;
    use time::OffsetDateTime;

    /// A device certificate valid from `from` for one day, and a verifier
    /// for the CA that issued it.
    fn cert_and_verifier(
        from: OffsetDateTime,
    ) -> (
        CertificateDer<'static>,
        Arc<dyn ClientCertVerifier>,
        tempfile::TempDir,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::open_or_create(&dir.path().join("ca"), &[], 30).unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let id = DeviceId::parse("dev").unwrap();
        let issued = ca
            .issue_from_csr_with_validity(&id, &csr, from, from + time::Duration::days(1))
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.ca_der()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .unwrap();
        (CertificateDer::from(issued.der), verifier, dir)
    }

    #[test]
    fn gaps_in_a_filter_log_are_counted_once_and_only_when_attributable() {
        let mut gaps = GapCounter::default();
        assert_eq!(gaps.seen(b"d/a/state", Some((0, 1))), 0, "not subscribed");
        gaps.subscribed("d/+/state");
        assert_eq!(
            gaps.seen(b"d/a/state", Some((0, 5))),
            0,
            "the first sets the baseline"
        );
        assert_eq!(gaps.seen(b"d/a/state", Some((0, 6))), 0);
        assert_eq!(
            gaps.seen(b"d/b/state", Some((1, 10))),
            3,
            "7, 8 and 9 were evicted"
        );
        assert_eq!(gaps.seen(b"d/a/state", Some((1, 8))), 0, "a retransmission");
        assert_eq!(gaps.seen(b"d/a/state", Some((1, 11))), 0);
        assert_eq!(gaps.seen(b"d/a/state", None), 0, "retained: no log");
        gaps.subscribed("d/a/#");
        assert_eq!(
            gaps.seen(b"d/a/state", Some((1, 40))),
            0,
            "two filters match: not attributable"
        );
        assert_eq!(gaps.seen(b"d/a/event", Some((0, 3))), 0, "first from d/a/#");
        assert_eq!(gaps.seen(b"d/a/event", Some((0, 5))), 1);
        gaps.unsubscribed("d/a/#");
        gaps.unsubscribed("d/+/state");
        assert_eq!(gaps.seen(b"d/a/state", Some((2, 90))), 0);
    }

    #[test]
    fn a_clock_behind_the_build_date_does_not_make_certificates_not_yet_valid() {
        let now = OffsetDateTime::now_utc();
        // Issued for a time ten days ahead of this machine's clock, as a hub
        // whose clock has not been set sees every certificate.
        let (cert, inner, _dir) = cert_and_verifier(now + time::Duration::days(10));
        let plain = inner.verify_client_cert(&cert, &[], unix_time(now));
        assert!(
            matches!(
                plain,
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidYet
                        | rustls::CertificateError::NotValidYetContext { .. }
                ))
            ),
            "{plain:?}"
        );
        let tolerant = ClockTolerantVerifier {
            inner: inner.clone(),
            floor: unix_time(now + time::Duration::days(10) + time::Duration::hours(1)),
        };
        tolerant
            .verify_client_cert(&cert, &[], unix_time(now))
            .expect("checked at the floor, where the certificate is valid");
        // The floor never revives an expired certificate.
        let late = ClockTolerantVerifier {
            inner,
            floor: unix_time(now + time::Duration::days(12)),
        };
        assert!(late.verify_client_cert(&cert, &[], unix_time(now)).is_err());
    }
}
