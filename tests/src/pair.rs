//! The device half of pairing, as ARCHITECTURE.md documents the exchange.
//!
//! A device is given a pairing URI
//! `hubpair://HOST:PORT/?ca=sha256:HEX&claim=CLAIM` and a setup code. It opens
//! TLS to `HOST:PORT` (server authentication only) and pins the hub CA by the
//! SHA-256 of its certificate DER ([`PinnedCaVerifier`]): the hub presents
//! `[server cert, CA cert]`; the CA must hash to the pin and the server
//! certificate must verify against that CA alone. The server name is not
//! checked (the pin replaces it: a device may reach the hub by an address its
//! certificate does not name); everything else (signature, validity, key
//! usage) is.
//!
//! Over that TLS the device speaks MQTT 3.1.1 as client `pair` with a clean
//! session: after CONNACK it subscribes to `pair/response` (QoS 0), waits for
//! the SUBACK, then publishes at QoS 0 to `pair/request`
//! `{"claim":"CLAIM","code":"CODE","csr":"<PEM PKCS#10>"}`. The hub answers on
//! `pair/response` with `{"ok":true,"device_id","cert","ca"}` or
//! `{"ok":false,"error","message"}` and closes the connection.
//!
//! The device makes its own P-256 key and CSR; the key never leaves it. Before
//! accepting an answer it checks that the returned CA is exactly the pinned
//! certificate and that the issued certificate carries its own public key and
//! verifies against that CA as a client certificate.

use std::fmt;
use std::io::Write;
use std::net::Ipv6Addr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{KeyPair, PublicKeyData};
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet, QoS, SubscribeReasonCode,
    TlsConfiguration, Transport,
};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore,
    SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::DeviceIdentity;

/// The MQTT client id a device uses on the pairing listener.
pub const CLIENT_ID: &str = "pair";
/// The topic a device publishes its request to.
pub const REQUEST_TOPIC: &str = "pair/request";
/// The topic the hub answers on.
pub const RESPONSE_TOPIC: &str = "pair/response";
/// How long [`pair`] waits for the whole exchange.
pub const PAIR_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest packet accepted from the hub (certificate and CA PEM).
const MAX_PACKET: usize = 256 * 1024;

/// Why pairing failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PairError {
    /// The pairing URI is malformed.
    InvalidUri(String),
    /// The hub refused: its `error` code (`wrong_code`, `expired`, `used`,
    /// `cancelled`, `closed`, `unknown_claim`, `rate_limited`, `bad_request`,
    /// `bad_csr`, `internal`) and its human-readable `message`.
    Refused { error: String, message: String },
    /// The hub is not the one the URI pins, or what it issued does not fit
    /// (wrong CA, someone else's key, a certificate the CA did not sign).
    Pin(String),
    /// The hub could not be reached, closed early, timed out or answered
    /// something that is not the documented protocol.
    Transport(String),
    /// The device could not make its key or CSR.
    Local(String),
}

impl fmt::Display for PairError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PairError::InvalidUri(why) => write!(f, "invalid pairing URI: {why}"),
            PairError::Refused { error, message } => {
                write!(f, "pairing refused: {message} ({error})")
            }
            PairError::Pin(why) => f.write_str(why),
            PairError::Transport(why) => write!(f, "pairing failed: {why}"),
            PairError::Local(why) => write!(f, "cannot prepare the device: {why}"),
        }
    }
}

impl std::error::Error for PairError {}

/// A parsed pairing URI. `host` is bare (an IPv6 address without brackets);
/// [`Display`](fmt::Display) writes the canonical URI back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairingUri {
    pub host: String,
    pub port: u16,
    /// SHA-256 of the hub CA certificate DER.
    pub ca_sha256: [u8; 32],
    pub claim: String,
}

impl PairingUri {
    /// Parses strictly: scheme `hubpair` (any case), `HOST:PORT` with a
    /// port from 1 to 65535 and IPv6 in brackets, an empty or `/` path, and a
    /// query of exactly `ca=sha256:<64 hex>` and `claim=<unreserved chars>`,
    /// in either order. No user info, fragment, percent escapes, unknown or
    /// repeated parameters.
    pub fn parse(s: &str) -> Result<PairingUri, PairError> {
        let bad = |why: &str| Err(PairError::InvalidUri(why.to_owned()));
        if s.len() > 2048 {
            return bad("longer than 2048 characters");
        }
        if s.chars().any(|c| c.is_ascii_whitespace() || c.is_control()) {
            return bad("contains whitespace or control characters");
        }
        let Some((scheme, rest)) = s.split_once("://") else {
            return bad("expected hubpair://HOST:PORT/?ca=sha256:HEX&claim=CLAIM");
        };
        if !scheme.eq_ignore_ascii_case("hubpair") {
            return bad(&format!("scheme is {scheme:?}, expected \"hubpair\""));
        }
        if rest.contains('#') {
            return bad("has a fragment");
        }
        let (authority, path, query) = match rest.find(['/', '?']) {
            Some(i) => {
                let (authority, tail) = rest.split_at(i);
                let (path, query) = match tail.split_once('?') {
                    Some((path, query)) => (path, Some(query)),
                    None => (tail, None),
                };
                (authority, path, query)
            }
            None => (rest, "", None),
        };
        if !path.is_empty() && path != "/" {
            return bad(&format!("unexpected path {path:?}"));
        }
        let (host, port) = parse_authority(authority)?;
        let Some(query) = query else {
            return bad("has no query (ca and claim are required)");
        };
        let (mut ca, mut claim) = (None, None);
        for pair in query.split('&') {
            let Some((key, value)) = pair.split_once('=') else {
                return bad(&format!("query item {pair:?} is not key=value"));
            };
            let slot = match key {
                "ca" => &mut ca,
                "claim" => &mut claim,
                _ => return bad(&format!("unknown parameter {key:?}")),
            };
            if slot.replace(value).is_some() {
                return bad(&format!("parameter {key:?} appears twice"));
            }
        }
        let Some(ca) = ca else {
            return bad("missing ca=sha256:HEX");
        };
        let Some(hex) = ca.strip_prefix("sha256:") else {
            return bad("ca must be sha256:<64 hex digits>");
        };
        let Some(ca_sha256) = parse_hex32(hex) else {
            return bad("ca must be sha256:<64 hex digits>");
        };
        let Some(claim) = claim else {
            return bad("missing claim");
        };
        if claim.is_empty() || claim.len() > 128 {
            return bad("claim must be 1 to 128 characters");
        }
        if !claim
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
        {
            return bad("claim may contain only letters, digits and -._~");
        }
        Ok(PairingUri {
            host,
            port,
            ca_sha256,
            claim: claim.to_owned(),
        })
    }

    /// The pinned fingerprint as 64 lowercase hex digits.
    pub fn ca_hex(&self) -> String {
        to_hex(&self.ca_sha256)
    }
}

fn parse_authority(authority: &str) -> Result<(String, u16), PairError> {
    let bad = |why: String| Err(PairError::InvalidUri(why));
    if authority.contains('@') {
        return bad("user info is not allowed".into());
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let Some((v6, port)) = rest.split_once(']') else {
            return bad("unclosed [ in host".into());
        };
        if v6.parse::<Ipv6Addr>().is_err() {
            return bad(format!("{v6:?} is not an IPv6 address"));
        }
        let Some(port) = port.strip_prefix(':') else {
            return bad("missing :PORT".into());
        };
        (v6.to_owned(), port)
    } else {
        let Some((host, port)) = authority.split_once(':') else {
            return bad("missing :PORT".into());
        };
        if port.contains(':') {
            return bad("IPv6 addresses must be in brackets".into());
        }
        // A DNS name or an IPv4 address; rustls decides which.
        if host.is_empty() || ServerName::try_from(host).is_err() {
            return bad(format!("{host:?} is not a host name or address"));
        }
        (host.to_owned(), port)
    };
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return bad(format!("port {port:?} is not a number"));
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => bad(format!("port {port} is out of range")),
        Ok(port) => Ok((host, port)),
    }
}

impl FromStr for PairingUri {
    type Err = PairError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PairingUri::parse(s)
    }
}

impl fmt::Display for PairingUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "hubpair://[{}]:{}/", self.host, self.port)?;
        } else {
            write!(f, "hubpair://{}:{}/", self.host, self.port)?;
        }
        write!(f, "?ca=sha256:{}&claim={}", self.ca_hex(), self.claim)
    }
}

fn parse_hex32(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let digit = |b: u8| (b as char).to_digit(16);
        out[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some(out)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of `data`, from the ring provider rustls already carries.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let rustls::SupportedCipherSuite::Tls13(suite) =
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
    else {
        unreachable!("a TLS 1.3 suite")
    };
    let digest = suite.common.hash_provider.hash(data);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// SHA-256 of a certificate's DER as 64 lowercase hex digits.
pub fn fingerprint(cert: &[u8]) -> String {
    to_hex(&sha256(cert))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn only_root(ca: &CertificateDer<'_>) -> Result<Arc<RootCertStore>, String> {
    let mut roots = RootCertStore::empty();
    roots
        .add(ca.clone().into_owned())
        .map_err(|e| format!("the pinned CA certificate cannot be a trust anchor: {e}"))?;
    Ok(Arc::new(roots))
}

/// The error a pin failure carries through rustls.
#[derive(Debug)]
struct PinFailure(String);

impl fmt::Display for PinFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PinFailure {}

/// Verifies a hub's server certificate by the CA fingerprint of a pairing URI.
///
/// The chain must contain, after the server certificate, a certificate whose
/// SHA-256 is the pin; the server certificate must verify against that
/// certificate alone (webpki: signature, validity, key usage), except that a
/// name mismatch is accepted. A server certificate that is itself the pinned
/// certificate is refused: the pin names a CA, and the hub's server key must
/// not be its CA key.
#[derive(Debug)]
pub struct PinnedCaVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
    /// Why the last handshake was refused, for [`PairError::Pin`].
    failure: Mutex<Option<String>>,
}

impl PinnedCaVerifier {
    pub fn new(pin: [u8; 32]) -> PinnedCaVerifier {
        PinnedCaVerifier {
            pin,
            provider: provider(),
            failure: Mutex::new(None),
        }
    }

    /// Why the last handshake was refused by the pin, if it was.
    pub fn last_failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A client configuration (no client certificate) using this verifier.
    pub fn client_config(self: &Arc<Self>) -> Result<Arc<ClientConfig>, rustls::Error> {
        let config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(self.clone())
            .with_no_client_auth();
        Ok(Arc::new(config))
    }

    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        now: UnixTime,
    ) -> Result<(), String> {
        let expected = to_hex(&self.pin);
        if sha256(end_entity) == self.pin {
            return Err(format!(
                "the hub presented its CA certificate (sha256:{expected}) as its server certificate; \
                 expected a server certificate issued by that CA"
            ));
        }
        let Some(ca) = intermediates.iter().find(|c| sha256(c) == self.pin) else {
            let got = if intermediates.is_empty() {
                "no CA certificate".to_owned()
            } else {
                intermediates
                    .iter()
                    .map(|c| fingerprint(c))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(format!(
                "hub CA fingerprint does not match the pairing URI: got {got}, expected {expected}"
            ));
        };
        let webpki =
            WebPkiServerVerifier::builder_with_provider(only_root(ca)?, self.provider.clone())
                .build()
                .map_err(|e| format!("cannot build a verifier for the pinned CA: {e}"))?;
        let others: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .filter(|c| sha256(c) != self.pin)
            .cloned()
            .collect();
        // webpki checks the name only after the chain, validity and usage
        // verified, so a name error means everything else passed.
        match webpki.verify_server_cert(end_entity, &others, server_name, &[], now) {
            Ok(_)
            | Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(()),
            Err(e) => Err(format!(
                "the hub's server certificate does not verify against the pinned CA: {e}"
            )),
        }
    }
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let result = self.check(end_entity, intermediates, server_name, now);
        let mut failure = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(()) => {
                *failure = None;
                Ok(ServerCertVerified::assertion())
            }
            Err(why) => {
                *failure = Some(why.clone());
                Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                    OtherError(Arc::new(PinFailure(why))),
                )))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// What the hub answered on `pair/response`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Issued {
        device_id: String,
        cert: String,
        ca: String,
    },
    Refused {
        error: String,
        message: String,
    },
}

fn parse_answer(payload: &[u8]) -> Result<Answer, PairError> {
    let malformed =
        |why: &str| PairError::Transport(format!("the hub's answer is malformed: {why}"));
    let value: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| malformed(&e.to_string()))?;
    let text = |key: &str| value.get(key).and_then(|v| v.as_str()).map(str::to_owned);
    match value.get("ok").and_then(|v| v.as_bool()) {
        Some(true) => Ok(Answer::Issued {
            device_id: text("device_id").ok_or_else(|| malformed("no device_id"))?,
            cert: text("cert").ok_or_else(|| malformed("no cert"))?,
            ca: text("ca").ok_or_else(|| malformed("no ca"))?,
        }),
        Some(false) => {
            let error = text("error").ok_or_else(|| malformed("no error code"))?;
            let message = text("message").unwrap_or_else(|| error.clone());
            Ok(Answer::Refused { error, message })
        }
        None => Err(malformed("no boolean \"ok\"")),
    }
}

/// Checks an issued certificate and CA against the pin and the device key.
fn accept_issued(
    pin: &[u8; 32],
    key: &KeyPair,
    device_id: String,
    cert_pem: String,
    ca_pem: String,
) -> Result<DeviceIdentity, PairError> {
    let pin_err = |why: String| PairError::Pin(why);
    let expected = to_hex(pin);
    let cas = CertificateDer::pem_slice_iter(ca_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pin_err(format!("the CA the hub returned is not PEM: {e}")))?;
    let ca = match cas.as_slice() {
        [ca] if sha256(ca) == *pin => ca,
        [] => return Err(pin_err("the hub returned no CA certificate".into())),
        _ => {
            let got: Vec<String> = cas.iter().map(|c| fingerprint(c)).collect();
            return Err(pin_err(format!(
                "the CA the hub returned does not match the pairing URI: got {}, expected {expected}",
                got.join(", ")
            )));
        }
    };
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pin_err(format!("the certificate the hub issued is not PEM: {e}")))?;
    let Some((leaf, rest)) = certs.split_first() else {
        return Err(pin_err("the hub issued no certificate".into()));
    };
    // A chain after the leaf may only repeat the pinned CA.
    if rest.iter().any(|c| c != ca) {
        return Err(pin_err(
            "the certificate the hub issued comes with a chain other than the pinned CA".into(),
        ));
    }
    let parsed = ParsedCertificate::try_from(leaf).map_err(|e| {
        pin_err(format!(
            "the certificate the hub issued cannot be read: {e}"
        ))
    })?;
    if parsed.subject_public_key_info().as_ref() != key.subject_public_key_info().as_slice() {
        return Err(pin_err(
            "the certificate the hub issued is not for this device's key".into(),
        ));
    }
    let verifier =
        WebPkiClientVerifier::builder_with_provider(only_root(ca).map_err(pin_err)?, provider())
            .build()
            .map_err(|e| pin_err(format!("cannot build a verifier for the pinned CA: {e}")))?;
    verifier
        .verify_client_cert(leaf, &[], UnixTime::now())
        .map_err(|e| {
            pin_err(format!(
                "the certificate the hub issued does not verify against the pinned CA: {e}"
            ))
        })?;
    if device_id.is_empty()
        || device_id.len() > 128
        || device_id
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || "/+#".contains(c))
    {
        return Err(PairError::Transport(format!(
            "the hub's answer is malformed: device id {device_id:?} cannot be a topic level"
        )));
    }
    Ok(DeviceIdentity {
        id: device_id,
        key_pem: key.serialize_pem(),
        cert_pem,
        ca_pem,
    })
}

/// Pairs with the hub `uri` names using setup `code` (sent as typed), within
/// [`PAIR_TIMEOUT`].
pub async fn pair(uri: &str, code: &str) -> Result<DeviceIdentity, PairError> {
    pair_with_timeout(uri, code, PAIR_TIMEOUT).await
}

/// [`pair`] with a time limit for the whole exchange.
pub async fn pair_with_timeout(
    uri: &str,
    code: &str,
    limit: Duration,
) -> Result<DeviceIdentity, PairError> {
    let uri = PairingUri::parse(uri)?;
    let (key, csr) = crate::key_and_csr().map_err(|e| PairError::Local(e.to_string()))?;
    let request = serde_json::json!({"claim": uri.claim, "code": code, "csr": csr}).to_string();
    let verifier = Arc::new(PinnedCaVerifier::new(uri.ca_sha256));
    let config = verifier
        .client_config()
        .map_err(|e| PairError::Local(format!("TLS configuration: {e}")))?;
    let answer = match tokio::time::timeout(limit, exchange(&uri, config, request)).await {
        Ok(answer) => answer,
        Err(_) => Err(PairError::Transport(format!(
            "no answer from {}:{} within {limit:?}",
            uri.host, uri.port
        ))),
    };
    // A handshake the pin refused surfaces as some TLS error; say why.
    if let Some(why) = verifier.last_failure() {
        return Err(PairError::Pin(why));
    }
    match parse_answer(&answer?)? {
        Answer::Refused { error, message } => Err(PairError::Refused { error, message }),
        Answer::Issued {
            device_id,
            cert,
            ca,
        } => accept_issued(&uri.ca_sha256, &key, device_id, cert, ca),
    }
}

/// Runs the MQTT exchange and returns the payload of the hub's answer.
async fn exchange(
    uri: &PairingUri,
    config: Arc<ClientConfig>,
    request: String,
) -> Result<Vec<u8>, PairError> {
    let mut options = MqttOptions::new(CLIENT_ID, uri.host.clone(), uri.port);
    options.set_clean_session(true);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(MAX_PACKET, MAX_PACKET);
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(config)));
    let (client, mut eventloop) = AsyncClient::new(options, 8);
    let transport = |e: rumqttc::ClientError| PairError::Transport(e.to_string());
    let mut stage = "connecting";
    loop {
        let event = match eventloop.poll().await {
            Ok(event) => event,
            Err(e) => {
                // The hub closes right after answering. rumqttc reads the
                // answer and the end of the stream in one go, queues the
                // answer and reports the close: look in its queue first.
                let answer = eventloop
                    .state
                    .events
                    .drain(..)
                    .find_map(|event| match event {
                        Event::Incoming(Packet::Publish(p)) if p.topic == RESPONSE_TOPIC => {
                            Some(p.payload.to_vec())
                        }
                        _ => None,
                    });
                if let Some(answer) = answer {
                    return Ok(answer);
                }
                return Err(PairError::Transport(match stage {
                    "awaiting the answer" => {
                        format!("the hub closed the connection without answering: {e}")
                    }
                    _ => format!("{stage} to {}:{}: {e}", uri.host, uri.port),
                }));
            }
        };
        match event {
            Event::Incoming(Packet::ConnAck(ack)) => {
                if ack.code != ConnectReturnCode::Success {
                    return Err(PairError::Transport(format!(
                        "the hub refused the MQTT connection: {:?}",
                        ack.code
                    )));
                }
                client
                    .try_subscribe(RESPONSE_TOPIC, QoS::AtMostOnce)
                    .map_err(transport)?;
                stage = "subscribing";
            }
            Event::Incoming(Packet::SubAck(ack)) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, SubscribeReasonCode::Failure))
                {
                    return Err(PairError::Transport(format!(
                        "the hub refused the subscription to {RESPONSE_TOPIC}"
                    )));
                }
                client
                    .try_publish(REQUEST_TOPIC, QoS::AtMostOnce, false, request.clone())
                    .map_err(transport)?;
                stage = "awaiting the answer";
            }
            Event::Incoming(Packet::Publish(p)) if p.topic == RESPONSE_TOPIC => {
                // The hub closes the connection; a DISCONNECT is a courtesy.
                let _ = client.try_disconnect();
                return Ok(p.payload.to_vec());
            }
            _ => {}
        }
    }
}

/// Writes `identity` into `dir` (created 0700 if missing): key.pem (created
/// 0600, never wider), cert.pem, ca.pem and device.json (`{"id": ...}`).
/// Each file is written to a temporary name and renamed into place.
pub fn write_identity(identity: &DeviceIdentity, dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    write_file(dir, "key.pem", identity.key_pem.as_bytes(), 0o600)?;
    write_file(dir, "cert.pem", identity.cert_pem.as_bytes(), 0o644)?;
    write_file(dir, "ca.pem", identity.ca_pem.as_bytes(), 0o644)?;
    let mut json = serde_json::to_string_pretty(&serde_json::json!({"id": identity.id}))?;
    json.push('\n');
    write_file(dir, "device.json", json.as_bytes(), 0o644)
}

/// Reads what [`write_identity`] wrote.
pub fn read_identity(dir: &Path) -> std::io::Result<DeviceIdentity> {
    let read = |name: &str| std::fs::read_to_string(dir.join(name));
    let device: serde_json::Value = serde_json::from_str(&read("device.json")?)?;
    let id = device
        .get("id")
        .and_then(|v| v.as_str())
        .ok_or_else(|| std::io::Error::other("device.json has no \"id\" string"))?;
    Ok(DeviceIdentity {
        id: id.to_owned(),
        key_pem: read("key.pem")?,
        cert_pem: read("cert.pem")?,
        ca_pem: read("ca.pem")?,
    })
}

fn write_file(dir: &Path, name: &str, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let open = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
    };
    let mut file = match open() {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            // Left over from an interrupted run of this same process id.
            std::fs::remove_file(&tmp)?;
            open()?
        }
        other => other?,
    };
    let written = file
        .write_all(contents)
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&tmp, dir.join(name)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::SocketAddr;
    use std::os::unix::fs::PermissionsExt;

    use rcgen::{
        BasicConstraints, CertificateParams, CertificateSigningRequestParams, CertifiedIssuer,
        DnType, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    };
    use rustls::ServerConfig;
    use rustls_pki_types::PrivateKeyDer;
    use serde_json::{Value, json};
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::JoinHandle;
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    /// Upper bound for any wait; each ends as soon as its condition holds.
    const LIMIT: Duration = Duration::from_secs(10);

    type Ca = CertifiedIssuer<'static, KeyPair>;

    fn p256() -> KeyPair {
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap()
    }

    fn make_ca(cn: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        CertifiedIssuer::self_signed(params, p256()).unwrap()
    }

    fn key_der(key: &KeyPair) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(key.serialize_der().into())
    }

    fn server_params(names: &[&str]) -> CertificateParams {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, "hub");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params
    }

    /// A server certificate for `names` issued by `ca`, and its key.
    fn server_leaf(
        ca: &Ca,
        names: &[&str],
        tweak: impl FnOnce(&mut CertificateParams),
    ) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let key = p256();
        let mut params = server_params(names);
        tweak(&mut params);
        let cert = params.signed_by(&key, ca).unwrap();
        (cert.der().clone(), key_der(&key))
    }

    fn pin_of(ca: &Ca) -> [u8; 32] {
        sha256(ca.der())
    }

    /// A TLS server on 127.0.0.1:0 presenting `chain`; accepts one connection
    /// and hands back the stream once the handshake is done.
    async fn tls_server(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        bind: &str,
    ) -> (
        SocketAddr,
        JoinHandle<std::io::Result<tokio_rustls::server::TlsStream<TcpStream>>>,
    ) {
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await?;
            acceptor.accept(tcp).await
        });
        (addr, task)
    }

    /// Connects with the pinning verifier as `name`; Err carries the pin
    /// failure the verifier recorded.
    async fn handshake(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        pin: [u8; 32],
        name: &str,
    ) -> Result<(), String> {
        let (addr, _server) = tls_server(chain, key, "127.0.0.1:0").await;
        let verifier = Arc::new(PinnedCaVerifier::new(pin));
        let connector = TlsConnector::from(verifier.client_config().unwrap());
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from(name.to_owned()).unwrap();
        let result = tokio::time::timeout(LIMIT, connector.connect(name, tcp))
            .await
            .expect("handshake finished in time");
        match result {
            Ok(_) => {
                assert_eq!(verifier.last_failure(), None);
                Ok(())
            }
            Err(e) => Err(verifier
                .last_failure()
                .unwrap_or_else(|| panic!("TLS failed without a pin failure: {e}"))),
        }
    }

    #[tokio::test]
    async fn pinned_ca_accepts_its_server_reached_by_any_name() {
        let ca = make_ca("hub CA");
        let (leaf, key) = server_leaf(&ca, &["hub.local"], |_| {});
        let chain = vec![leaf, ca.der().clone()];
        // By an address the certificate does not name: the pin replaces it.
        handshake(chain.clone(), key.clone_key(), pin_of(&ca), "127.0.0.1")
            .await
            .unwrap();
        handshake(chain.clone(), key.clone_key(), pin_of(&ca), "other.example")
            .await
            .unwrap();
        // And by its own name.
        handshake(chain, key, pin_of(&ca), "hub.local")
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_different_ca_is_refused_with_both_fingerprints() {
        let (ca, other) = (make_ca("hub CA"), make_ca("another hub"));
        let (leaf, key) = server_leaf(&ca, &["hub.local"], |_| {});
        let why = handshake(
            vec![leaf, ca.der().clone()],
            key,
            pin_of(&other),
            "127.0.0.1",
        )
        .await
        .unwrap_err();
        assert_eq!(
            why,
            format!(
                "hub CA fingerprint does not match the pairing URI: got {}, expected {}",
                fingerprint(ca.der()),
                fingerprint(other.der())
            )
        );
    }

    #[tokio::test]
    async fn a_chain_without_the_ca_is_refused() {
        let ca = make_ca("hub CA");
        let (leaf, key) = server_leaf(&ca, &["hub.local"], |_| {});
        let why = handshake(vec![leaf], key, pin_of(&ca), "hub.local")
            .await
            .unwrap_err();
        assert!(
            why.starts_with(
                "hub CA fingerprint does not match the pairing URI: got no CA certificate, expected "
            ),
            "{why}"
        );
    }

    #[tokio::test]
    async fn a_pinned_ca_that_did_not_sign_the_server_cert_is_refused() {
        // A MITM that appends the real CA to its own chain.
        let (ca, mitm) = (make_ca("hub CA"), make_ca("mitm"));
        let (leaf, key) = server_leaf(&mitm, &["hub.local"], |_| {});
        let why = handshake(
            vec![leaf, mitm.der().clone(), ca.der().clone()],
            key,
            pin_of(&ca),
            "hub.local",
        )
        .await
        .unwrap_err();
        assert!(
            why.starts_with("the hub's server certificate does not verify against the pinned CA"),
            "{why}"
        );
    }

    #[tokio::test]
    async fn only_a_name_mismatch_is_forgiven() {
        let ca = make_ca("hub CA");
        let (leaf, key) = server_leaf(&ca, &["hub.local"], |p| {
            p.not_before = rcgen::date_time_ymd(2000, 1, 1);
            p.not_after = rcgen::date_time_ymd(2001, 1, 1);
        });
        let why = handshake(vec![leaf, ca.der().clone()], key, pin_of(&ca), "127.0.0.1")
            .await
            .unwrap_err();
        assert!(why.contains("expired"), "{why}");

        // A client-only certificate is no server certificate.
        let (leaf, key) = server_leaf(&ca, &["hub.local"], |p| {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        });
        let why = handshake(vec![leaf, ca.der().clone()], key, pin_of(&ca), "hub.local")
            .await
            .unwrap_err();
        assert!(
            why.starts_with("the hub's server certificate does not verify against the pinned CA"),
            "{why}"
        );
    }

    #[tokio::test]
    async fn a_pinned_self_signed_server_cert_is_refused() {
        // The pin names a CA that issued the server certificate; a
        // certificate pinned and presented as the server's own is refused,
        // whether it is a plain self-signed leaf or a CA, alone or repeated.
        let key = p256();
        let leaf = server_params(&["hub.local"]).self_signed(&key).unwrap();
        let leaf = leaf.der().clone();
        let pin = sha256(&leaf);
        for chain in [vec![leaf.clone()], vec![leaf.clone(), leaf.clone()]] {
            let why = handshake(chain, key_der(&key), pin, "hub.local")
                .await
                .unwrap_err();
            assert!(
                why.starts_with("the hub presented its CA certificate"),
                "{why}"
            );
        }
        let mut params = server_params(&["hub.local"]);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_as_server = params.self_signed(&key).unwrap().der().clone();
        let pin = sha256(&ca_as_server);
        let why = handshake(
            vec![ca_as_server.clone(), ca_as_server],
            key_der(&key),
            pin,
            "hub.local",
        )
        .await
        .unwrap_err();
        assert!(
            why.starts_with("the hub presented its CA certificate"),
            "{why}"
        );
    }

    const HEX: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn uris_round_trip() {
        for (uri, host, port) in [
            (
                format!("hubpair://hub.local:8884/?ca=sha256:{HEX}&claim=c1"),
                "hub.local",
                8884,
            ),
            (
                format!("hubpair://192.168.1.10:1/?ca=sha256:{HEX}&claim=a-b.c_d~e"),
                "192.168.1.10",
                1,
            ),
            (
                format!("hubpair://[fe80::1]:65535/?ca=sha256:{HEX}&claim=X"),
                "fe80::1",
                65535,
            ),
            (
                format!("hubpair://[::1]:8884/?ca=sha256:{HEX}&claim=0123"),
                "::1",
                8884,
            ),
        ] {
            let parsed: PairingUri = uri.parse().unwrap();
            assert_eq!((parsed.host.as_str(), parsed.port), (host, port), "{uri}");
            assert_eq!(parsed.ca_hex(), HEX);
            assert_eq!(parsed.to_string(), uri);
            assert_eq!(PairingUri::parse(&parsed.to_string()).unwrap(), parsed);
        }
        // Accepted non-canonical spellings, written back canonically.
        let canonical = format!("hubpair://hub:9/?ca=sha256:{HEX}&claim=c");
        for variant in [
            format!("HubPair://hub:9/?claim=c&ca=sha256:{HEX}"),
            format!("hubpair://hub:9?ca=sha256:{HEX}&claim=c"),
            format!("hubpair://hub:9/?ca=sha256:{}&claim=c", HEX.to_uppercase()),
        ] {
            assert_eq!(PairingUri::parse(&variant).unwrap().to_string(), canonical);
        }
    }

    #[test]
    fn bad_uris_are_refused() {
        let ok = format!("ca=sha256:{HEX}&claim=c");
        for bad in [
            format!("http://hub:1/?{ok}"),
            format!("hubpair:hub:1/?{ok}"),
            format!("hubpair://hub/?{ok}"),
            format!("hubpair://hub:/?{ok}"),
            format!("hubpair://hub:0/?{ok}"),
            format!("hubpair://hub:65536/?{ok}"),
            format!("hubpair://hub:+1/?{ok}"),
            format!("hubpair://hub:1x/?{ok}"),
            format!("hubpair://:1/?{ok}"),
            format!("hubpair://::1:1/?{ok}"),
            format!("hubpair://[::1/?{ok}"),
            format!("hubpair://[::1]/?{ok}"),
            format!("hubpair://[hub]:1/?{ok}"),
            format!("hubpair://[fe80::1%25eth0]:1/?{ok}"),
            format!("hubpair://user@hub:1/?{ok}"),
            format!("hubpair://hub:1/pair?{ok}"),
            format!("hubpair://hub:1/?{ok}#frag"),
            format!("hubpair://hub:1/?{ok}&x=1"),
            format!("hubpair://hub:1/?{ok}&claim=d"),
            format!("hubpair://hub:1/?{ok}&"),
            format!("hubpair://hub 1/?{ok}"),
            format!("hubpair://hub:1/?{ok} "),
            "hubpair://hub:1/".to_owned(),
            "hubpair://hub:1/?claim=c".to_owned(),
            format!("hubpair://hub:1/?ca=sha256:{HEX}"),
            format!("hubpair://hub:1/?ca=sha256:{HEX}&claim="),
            format!("hubpair://hub:1/?ca=sha256:{HEX}&claim=a%20b"),
            format!("hubpair://hub:1/?ca=sha256:{HEX}&claim=a/b"),
            format!("hubpair://hub:1/?ca=sha256:{HEX}&claim={}", "c".repeat(129)),
            format!("hubpair://hub:1/?ca={HEX}&claim=c"),
            format!("hubpair://hub:1/?ca=sha1:{HEX}&claim=c"),
            format!("hubpair://hub:1/?ca=sha256:{}&claim=c", &HEX[1..]),
            format!("hubpair://hub:1/?ca=sha256:{HEX}0&claim=c"),
            format!("hubpair://hub:1/?ca=sha256:{}g&claim=c", &HEX[1..]),
            format!("hubpair://hub:1/?ca=sha256:{}é&claim=c", &HEX[2..]),
        ] {
            match PairingUri::parse(&bad) {
                Err(PairError::InvalidUri(_)) => {}
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }

    // --- The whole exchange against a fake pairing listener. ---

    /// How the fake hub answers a request (None: it hangs up instead).
    type Answerer = Box<dyn FnOnce(&Value) -> Option<Value> + Send>;

    async fn read_packet<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<(u8, Vec<u8>)> {
        let header = s.read_u8().await?;
        let (mut len, mut shift) = (0usize, 0);
        loop {
            let b = s.read_u8().await?;
            len |= usize::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        let mut body = vec![0; len];
        s.read_exact(&mut body).await?;
        Ok((header, body))
    }

    fn packet(header: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![header];
        let mut len = body.len();
        loop {
            let b = (len % 128) as u8;
            len /= 128;
            out.push(if len > 0 { b | 0x80 } else { b });
            if len == 0 {
                break;
            }
        }
        out.extend_from_slice(body);
        out
    }

    fn mqtt_str(body: &[u8], at: usize) -> (String, usize) {
        let len = usize::from(u16::from_be_bytes([body[at], body[at + 1]]));
        let s = String::from_utf8(body[at + 2..at + 2 + len].to_vec()).unwrap();
        (s, at + 2 + len)
    }

    /// A pairing listener speaking just enough MQTT 3.1.1; it checks the
    /// device's side of the exchange and returns the request it got.
    async fn fake_hub(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        bind: &str,
        answer: Answerer,
    ) -> (SocketAddr, JoinHandle<Result<Value, String>>) {
        let (addr, server) = tls_server(chain, key, bind).await;
        let task = tokio::spawn(async move {
            let mut s = server.await.unwrap().map_err(|e| e.to_string())?;
            let (header, body) = read_packet(&mut s).await.map_err(|e| e.to_string())?;
            assert_eq!(header, 0x10, "CONNECT");
            let (protocol, at) = mqtt_str(&body, 0);
            assert_eq!((protocol.as_str(), body[at]), ("MQTT", 4), "MQTT 3.1.1");
            assert_eq!(body[at + 1] & 0x02, 0x02, "clean session");
            assert_eq!(mqtt_str(&body, at + 4).0, CLIENT_ID);
            s.write_all(&[0x20, 2, 0, 0]).await.unwrap();

            let (header, body) = read_packet(&mut s).await.unwrap();
            assert_eq!(header, 0x82, "SUBSCRIBE");
            let (filter, at) = mqtt_str(&body, 2);
            assert_eq!((filter.as_str(), body[at]), (RESPONSE_TOPIC, 0));
            s.write_all(&[0x90, 3, body[0], body[1], 0]).await.unwrap();

            let (header, body) = read_packet(&mut s).await.unwrap();
            assert_eq!(header, 0x30, "PUBLISH at QoS 0");
            let (topic, at) = mqtt_str(&body, 0);
            assert_eq!(topic, REQUEST_TOPIC);
            let request: Value = serde_json::from_slice(&body[at..]).unwrap();
            if let Some(reply) = answer(&request) {
                let mut body = (RESPONSE_TOPIC.len() as u16).to_be_bytes().to_vec();
                body.extend_from_slice(RESPONSE_TOPIC.as_bytes());
                body.extend_from_slice(reply.to_string().as_bytes());
                s.write_all(&packet(0x30, &body)).await.unwrap();
            }
            let _ = s.shutdown().await;
            Ok(request)
        });
        (addr, task)
    }

    /// Issues a client certificate for the request's CSR, as the hub does.
    fn issue(ca: &Ca, request: &Value) -> String {
        let mut csr =
            CertificateSigningRequestParams::from_pem(request["csr"].as_str().unwrap()).unwrap();
        csr.params.is_ca = IsCa::ExplicitNoCa;
        csr.params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        csr.params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        csr.signed_by(ca).unwrap().pem()
    }

    struct Hub {
        ca: Arc<Ca>,
        addr: SocketAddr,
        task: JoinHandle<Result<Value, String>>,
    }

    impl Hub {
        async fn start(answer: impl FnOnce(&Ca, &Value) -> Option<Value> + Send + 'static) -> Hub {
            Hub::start_on("127.0.0.1:0", answer).await
        }

        async fn start_on(
            bind: &str,
            answer: impl FnOnce(&Ca, &Value) -> Option<Value> + Send + 'static,
        ) -> Hub {
            let ca = Arc::new(make_ca("hub CA"));
            let (leaf, key) = server_leaf(&ca, &["hub.local"], |_| {});
            let signer = ca.clone();
            let (addr, task) = fake_hub(
                vec![leaf, ca.der().clone()],
                key,
                bind,
                Box::new(move |request| answer(&signer, request)),
            )
            .await;
            Hub { ca, addr, task }
        }

        fn uri(&self) -> String {
            PairingUri {
                host: self.addr.ip().to_string(),
                port: self.addr.port(),
                ca_sha256: pin_of(&self.ca),
                claim: "claim-1".into(),
            }
            .to_string()
        }

        async fn request(self) -> Result<Value, String> {
            tokio::time::timeout(LIMIT, self.task)
                .await
                .unwrap()
                .unwrap()
        }
    }

    /// The error of a pairing that must fail (`DeviceIdentity` has no Debug).
    fn failure(result: Result<DeviceIdentity, PairError>) -> PairError {
        match result {
            Ok(identity) => panic!("paired as {}", identity.id),
            Err(e) => e,
        }
    }

    fn issued(ca: &Ca, request: &Value) -> Option<Value> {
        Some(json!({"ok": true, "device_id": "dev-1", "cert": issue(ca, request), "ca": ca.pem()}))
    }

    #[tokio::test]
    async fn pairs_and_writes_the_identity() {
        let hub = Hub::start(issued).await;
        let identity = pair_with_timeout(&hub.uri(), "7k3m-q2zp x", LIMIT)
            .await
            .unwrap();
        let ca_pem = hub.ca.pem();
        let request = hub.request().await.unwrap();
        assert_eq!(request["claim"], "claim-1");
        assert_eq!(request["code"], "7k3m-q2zp x", "the code goes as typed");
        assert_eq!(request.as_object().unwrap().len(), 3, "{request}");
        assert!(!request.to_string().contains("PRIVATE KEY"));
        assert_eq!(identity.id, "dev-1");
        assert_eq!(identity.ca_pem, ca_pem);
        let key = KeyPair::from_pem(&identity.key_pem).unwrap();
        let csr =
            CertificateSigningRequestParams::from_pem(request["csr"].as_str().unwrap()).unwrap();
        assert_eq!(
            csr.public_key.der_bytes(),
            key.der_bytes(),
            "CSR is for the kept key"
        );

        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("device");
        write_identity(&identity, &out).unwrap();
        let mode = |name: &str| {
            std::fs::metadata(out.join(name))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("key.pem"), 0o600);
        assert_eq!(
            std::fs::metadata(&out).unwrap().permissions().mode() & 0o077,
            0
        );
        let back = read_identity(&out).unwrap();
        assert_eq!(
            (back.id, back.key_pem, back.cert_pem, back.ca_pem),
            (
                identity.id.clone(),
                identity.key_pem.clone(),
                identity.cert_pem.clone(),
                ca_pem
            )
        );
        // Writing again replaces the files, key still 0600, no leftovers.
        write_identity(&identity, &out).unwrap();
        assert_eq!(mode("key.pem"), 0o600);
        let mut names: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["ca.pem", "cert.pem", "device.json", "key.pem"]);
    }

    #[tokio::test]
    async fn pairs_over_ipv6_loopback() {
        if std::net::TcpListener::bind("[::1]:0").is_err() {
            eprintln!("no IPv6 loopback here; skipped");
            return;
        }
        let hub = Hub::start_on("[::1]:0", issued).await;
        assert!(hub.uri().starts_with("hubpair://[::1]:"), "{}", hub.uri());
        let identity = pair_with_timeout(&hub.uri(), "code", LIMIT).await.unwrap();
        assert_eq!(identity.id, "dev-1");
    }

    #[tokio::test]
    async fn a_refusal_carries_the_hubs_reason() {
        let hub = Hub::start(|_, _| {
            Some(json!({"ok": false, "error": "wrong_code", "message": "the setup code is wrong"}))
        })
        .await;
        let err = failure(pair_with_timeout(&hub.uri(), "nope", LIMIT).await);
        hub.request().await.unwrap();
        assert_eq!(
            err,
            PairError::Refused {
                error: "wrong_code".into(),
                message: "the setup code is wrong".into()
            }
        );
        assert_eq!(
            err.to_string(),
            "pairing refused: the setup code is wrong (wrong_code)"
        );
    }

    #[tokio::test]
    async fn a_second_hub_is_refused_before_any_request() {
        let (real, mitm) = (Hub::start(issued).await, Hub::start(issued).await);
        let mut uri = PairingUri::parse(&mitm.uri()).unwrap();
        uri.ca_sha256 = pin_of(&real.ca);
        let err = failure(pair_with_timeout(&uri.to_string(), "code", LIMIT).await);
        let PairError::Pin(why) = &err else {
            panic!("{err:?}")
        };
        assert!(
            why.starts_with("hub CA fingerprint does not match the pairing URI: got "),
            "{why}"
        );
        assert!(mitm.request().await.is_err(), "no request reached the MITM");
    }

    #[tokio::test]
    async fn what_the_hub_issues_must_fit_the_pin_and_the_key() {
        type Cheat = fn(&Ca, &Value) -> Option<Value>;
        let cheats: [(Cheat, &str); 5] = [
            (
                |ca, req| {
                    Some(json!({"ok": true, "device_id": "d", "cert": issue(ca, req),
                        "ca": make_ca("other").pem()}))
                },
                "the CA the hub returned does not match the pairing URI",
            ),
            (
                |ca, req| {
                    let ca_pem = format!("{}{}", ca.pem(), make_ca("extra").pem());
                    Some(
                        json!({"ok": true, "device_id": "d", "cert": issue(ca, req), "ca": ca_pem}),
                    )
                },
                "the CA the hub returned does not match the pairing URI",
            ),
            (
                |ca, _| {
                    let (_, csr) = crate::key_and_csr().unwrap();
                    let cert = issue(ca, &json!({ "csr": csr }));
                    Some(json!({"ok": true, "device_id": "d", "cert": cert, "ca": ca.pem()}))
                },
                "the certificate the hub issued is not for this device's key",
            ),
            (
                |ca, req| {
                    let cert = issue(&make_ca("other"), req);
                    Some(json!({"ok": true, "device_id": "d", "cert": cert, "ca": ca.pem()}))
                },
                "the certificate the hub issued does not verify against the pinned CA",
            ),
            (
                |ca, req| {
                    let cert = format!("{}{}", issue(ca, req), make_ca("other").pem());
                    Some(json!({"ok": true, "device_id": "d", "cert": cert, "ca": ca.pem()}))
                },
                "the certificate the hub issued comes with a chain other than the pinned CA",
            ),
        ];
        for (cheat, expected) in cheats {
            let hub = Hub::start(cheat).await;
            match failure(pair_with_timeout(&hub.uri(), "code", LIMIT).await) {
                PairError::Pin(why) => assert!(why.starts_with(expected), "{why}"),
                other => panic!("expected {expected:?}, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn transport_failures_are_reported_as_such() {
        let hub = Hub::start(|_, _| None).await;
        match failure(pair_with_timeout(&hub.uri(), "code", LIMIT).await) {
            PairError::Transport(why) => {
                assert!(
                    why.contains("closed the connection without answering"),
                    "{why}"
                )
            }
            other => panic!("{other:?}"),
        }

        for reply in [
            json!({"ok": "yes"}),
            json!({"ok": false}),
            json!({"ok": true, "cert": ""}),
        ] {
            let hub = Hub::start(move |_, _| Some(reply)).await;
            match failure(pair_with_timeout(&hub.uri(), "code", LIMIT).await) {
                PairError::Transport(why) => {
                    assert!(why.starts_with("the hub's answer is malformed"), "{why}")
                }
                other => panic!("{other:?}"),
            }
        }

        let hub = Hub::start(|ca, req| {
            Some(json!({"ok": true, "device_id": "a/#", "cert": issue(ca, req), "ca": ca.pem()}))
        })
        .await;
        assert!(matches!(
            failure(pair_with_timeout(&hub.uri(), "code", LIMIT).await),
            PairError::Transport(_)
        ));

        // Nobody listening.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let uri = format!("hubpair://{closed}/?ca=sha256:{HEX}&claim=c");
        assert!(matches!(
            failure(pair_with_timeout(&uri, "code", LIMIT).await),
            PairError::Transport(_)
        ));
        assert!(matches!(
            failure(pair("hubpair://x", "code").await),
            PairError::InvalidUri(_)
        ));
    }
}
