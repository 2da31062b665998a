//! The hub's own certificate authority: one root CA per installation, the
//! edge's TLS server certificate, device certificates issued from CSRs, and
//! the certificate revocation list (CRL) the edge checks on every handshake.
//!
//! Everything lives in `<state_dir>/ca` (mode 0700):
//!
//! | file | what | mode |
//! |---|---|---|
//! | `ca.key` | root CA private key, PKCS#8 PEM, ECDSA P-256 | 0600 |
//! | `ca.pem` | root CA certificate (its SHA-256 is what devices pin) | 0644 |
//! | `server.key` | the edge's TLS private key | 0600 |
//! | `server.pem` | the edge's TLS certificate, signed by the root CA | 0644 |
//!
//! Why a per-install CA and not a shared one: a key shared by every hub is a
//! key that leaks once for everyone (UK Code of Practice principle 1 forbids
//! universal credentials). The CA key never leaves this directory; devices
//! keep their own keys and send only a CSR.
//!
//! Decisions worth knowing:
//!
//! - The hub, not the device, decides what a device certificate says: CN =
//!   device id, one SAN URI `urn:hub:device:<id>`, EKU clientAuth, not a CA.
//!   Whatever subject or extensions a CSR asks for are ignored, so a device
//!   cannot talk its way into another device's identity or into a CA cert.
//! - Only ECDSA P-256 keys are accepted, for devices and for the hub: one
//!   algorithm that every TLS stack and every microcontroller TLS library
//!   handles, and one that `ring` signs with.
//! - Serial numbers are 128 random bits from the OS RNG with the first byte in
//!   `0x01..=0x7f`, so the DER INTEGER is always exactly those 16 bytes and the
//!   hex form is the same everywhere ([`IssuedCert::serial_hex`],
//!   [`cert_serial_and_expiry`], the CRL).
//! - Revocation: the edge verifies clients with rustls'
//!   `WebPkiClientVerifier` using `.only_check_end_entity_revocation()` (the
//!   chain is only ever root -> device, and the root is trusted by
//!   configuration, not by CRL) and does *not* call
//!   `enforce_revocation_expiration()`. The CRL's `nextUpdate` is 7 days out,
//!   but this CA re-signs the CRL on every revocation, and the edge holds the
//!   newest one in memory; refusing every device because a CRL that nobody
//!   else could have refreshed has "expired" would turn a quiet week into an
//!   outage without making anything safer.
//! - Key files are created with their final mode (never chmod-ed after the
//!   fact, so there is no window in which they are readable) and written
//!   atomically, so a power cut leaves either the old or the new file.
//! - Loading refuses key files that group or others can read or write, and a
//!   CA directory that group or others can enter: the fix is one `chmod`, and
//!   the error message says which.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::TryRngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PublicKeyData, RevokedCertParams, SanType, SerialNumber,
    SignatureAlgorithm,
};
use ring::signature::{self, UnparsedPublicKey};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{
    CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName,
};
use time::{Duration, OffsetDateTime, UtcOffset};
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_NIST_EC_P521,
    OID_PKCS1_RSAENCRYPTION, OID_PKCS1_RSASSAPSS, OID_SIG_ECDSA_WITH_SHA256,
    OID_SIG_ECDSA_WITH_SHA384, OID_SIG_ED448, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::x509::AlgorithmIdentifier;

use crate::model::{DEVICE_URI_PREFIX, DeviceId, IdError};

/// Root CA private key file name inside the CA directory.
const CA_KEY_FILE: &str = "ca.key";
/// Root CA certificate file name inside the CA directory.
const CA_CERT_FILE: &str = "ca.pem";
/// The edge's TLS private key file name inside the CA directory.
const SERVER_KEY_FILE: &str = "server.key";
/// The edge's TLS certificate file name inside the CA directory.
const SERVER_CERT_FILE: &str = "server.pem";

/// Mode of the CA directory: only the hub's own user may enter it.
const DIR_MODE: u32 = 0o700;
/// Mode of private key files.
const KEY_MODE: u32 = 0o600;
/// Mode of certificate files: certificates are public, the directory is not.
const CERT_MODE: u32 = 0o644;

/// How long the root CA is valid. Devices pin it, so it must outlive the
/// hardware; renewing it means re-pairing every device.
const CA_VALIDITY_DAYS: i64 = 3650;
/// How far `not_before` is backdated, so a device whose clock runs a little
/// behind the hub's does not reject a certificate it has just been given.
const CLOCK_SKEW: Duration = Duration::minutes(5);
/// How far ahead of `thisUpdate` a CRL's `nextUpdate` is set.
const CRL_NEXT_UPDATE: Duration = Duration::days(7);
/// Length of random serial numbers in bytes (128 bits).
const SERIAL_LEN: usize = 16;
/// Length of an uncompressed P-256 point: 0x04 || X || Y.
const P256_POINT_LEN: usize = 65;

/// Everything that can go wrong in the CA. Messages name the file or the
/// input at fault so the operator (or the device log) knows what to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot {action} {path}: {source}", path = path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "key file {path} has mode {mode:04o}: it must not be readable by group or others (chmod 600)",
        path = path.display()
    )]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error(
        "CA directory {path} has mode {mode:04o}: it must not be accessible by group or others (chmod 700)",
        path = path.display()
    )]
    DirPermissions { path: PathBuf, mode: u32 },
    #[error("CA directory {path} exists but is not a directory", path = path.display())]
    NotADirectory { path: PathBuf },
    #[error(
        "{present} exists but {missing} is missing: restore it from a backup, or remove the CA directory to make a new CA (every device must then pair again)",
        present = present.display(),
        missing = missing.display()
    )]
    MissingCaFile { present: PathBuf, missing: PathBuf },
    #[error("key file {path} is not an ECDSA P-256 PKCS#8 PEM key: {reason}", path = path.display())]
    BadKey { path: PathBuf, reason: String },
    #[error("certificate file {path} cannot be used: {reason}", path = path.display())]
    BadCert { path: PathBuf, reason: String },
    #[error(
        "CA key {key} does not match CA certificate {cert}",
        key = key.display(),
        cert = cert.display()
    )]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("server name {name:?} is neither a valid DNS name nor an IP address")]
    ServerName { name: String },
    #[error("csr cannot be parsed: {reason}")]
    Csr { reason: String },
    #[error("csr key is {got}: only ECDSA P-256 is accepted")]
    UnsupportedKey { got: String },
    #[error("csr signature does not verify against its own public key")]
    CsrSignature,
    #[error("certificate validity is invalid: {reason}")]
    Validity { reason: String },
    #[error("revoked serial {serial:?} is not a hex serial number")]
    Serial { serial: String },
    #[error("cannot {action}: {source}")]
    Rcgen {
        action: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("the OS random number generator failed: {reason}")]
    Rng { reason: String },
    #[error("certificate cannot be parsed: {reason}")]
    Cert { reason: String },
    #[error("certificate has no SAN URI starting with {DEVICE_URI_PREFIX}")]
    NoDeviceUri,
    #[error("certificate names more than one device in its SAN URIs: {uris:?}")]
    MultipleDeviceUris { uris: Vec<String> },
    #[error("certificate SAN URI {uri:?} does not name a valid device: {source}")]
    BadDeviceId {
        uri: String,
        #[source]
        source: IdError,
    },
    #[error("certificate CN {cn:?} does not match its device id {id:?}")]
    CnMismatch { cn: String, id: String },
}

/// The root CA, the edge's server identity, and the files they live in.
pub struct Ca {
    root: Root,
    /// The current edge certificate; replaced by `renew_server_if_due`.
    server: ServerIdentity,
}

/// Everything about the CA except the current server certificate, so that
/// the server certificate can be made from it before a `Ca` exists.
struct Root {
    /// The CA directory (`<state_dir>/ca`).
    dir: PathBuf,
    /// Signs device certificates, server certificates and CRLs. Built from the
    /// CA certificate on disk, so a created and a loaded CA behave the same.
    issuer: Issuer<'static, KeyPair>,
    /// The CA's uncompressed P-256 public point, used to check that a loaded
    /// server certificate was really signed by this CA.
    ca_point: Vec<u8>,
    /// The CA's subject key identifier, repeated as the CRL's authority key
    /// identifier.
    ca_key_id: KeyIdMethod,
    ca_der: CertificateDer<'static>,
    ca_pem: String,
    /// The SANs the server certificate must carry, beyond the hostname and
    /// loopback names that are added at each issue.
    server_names: Vec<San>,
    server_validity_days: u32,
}

impl fmt::Debug for Ca {
    /// Shows where the CA lives and which one it is, never key material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("dir", &self.root.dir)
            .field("fingerprint", &self.fingerprint())
            .field("server_not_after", &self.server.not_after)
            .finish_non_exhaustive()
    }
}

/// What the edge's rustls `ServerConfig` is built from.
///
/// The key sits behind an `Arc` because `PrivateKeyDer` is not `Clone`
/// (deliberately, so key bytes are not copied around): clone the identity
/// freely and call `key.clone_key()` where rustls wants an owned key.
#[derive(Clone)]
pub struct ServerIdentity {
    /// `[server certificate, CA certificate]`.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The server certificate's private key (PKCS#8).
    pub key: Arc<PrivateKeyDer<'static>>,
    /// When the server certificate expires.
    pub not_after: OffsetDateTime,
}

/// A device certificate as issued.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub pem: String,
    pub der: Vec<u8>,
    /// Lowercase hex, no colons, no leading zero bytes.
    pub serial_hex: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

/// One entry of the CRL.
#[derive(Debug, Clone)]
pub struct RevokedSerial {
    /// As in [`IssuedCert::serial_hex`].
    pub serial_hex: String,
    pub revoked_at: OffsetDateTime,
}

/// A subject alternative name of the server certificate, normalised so that
/// the set wanted by the configuration can be compared with the set in a
/// certificate on disk.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum San {
    Dns(String),
    Ip(IpAddr),
}

impl San {
    /// Parses a configured server name: an IP literal is an IP SAN, anything
    /// else must be a valid DNS name (no wildcards).
    fn parse(name: &str) -> Option<San> {
        if let Ok(ip) = name.parse::<IpAddr>() {
            return Some(San::Ip(ip));
        }
        match ServerName::try_from(name) {
            Ok(ServerName::DnsName(dns)) => {
                let lower = dns.as_ref().to_ascii_lowercase();
                // A trailing dot is valid DNS but not a valid SAN dNSName.
                Some(San::Dns(lower.trim_end_matches('.').to_owned()))
            }
            Ok(ServerName::IpAddress(ip)) => Some(San::Ip(ip.into())),
            _ => None,
        }
    }

    fn to_rcgen(&self) -> Result<SanType, Error> {
        Ok(match self {
            San::Ip(ip) => SanType::IpAddress(*ip),
            San::Dns(name) => {
                SanType::DnsName(name.as_str().try_into().map_err(|source| Error::Rcgen {
                    action: "encode server name",
                    source,
                })?)
            }
        })
    }
}

/// A P-256 public key taken from a verified CSR, in the shape rcgen signs.
struct P256PublicKey {
    point: Vec<u8>,
}

impl PublicKeyData for P256PublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.point
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

impl Ca {
    /// Opens the CA in `dir` (= `<state_dir>/ca`), creating it on first start.
    ///
    /// First start: creates `dir` with mode 0700, a per-install root CA
    /// (ECDSA P-256, CN `hubd root CA <random suffix>`, 10 years, keyUsage
    /// keyCertSign + cRLSign, basicConstraints CA pathlen 0) and a server
    /// certificate for the edge. Later starts load both. The server
    /// certificate is made anew if it is missing, unreadable, not signed by
    /// this CA, not matching its key, expired, or if its SANs differ from
    /// what `server_names` and the hostname now ask for.
    ///
    /// Refuses key files that group or others can access, a CA directory that
    /// group or others can access, and a CA key or certificate that is
    /// missing, corrupt or mismatched, naming the file each time: a lost CA
    /// must never be silently replaced, because every paired device trusts it.
    pub fn open_or_create(
        dir: &Path,
        server_names: &[String],
        server_validity_days: u32,
    ) -> Result<Ca, Error> {
        let server_names = server_names
            .iter()
            .map(|name| San::parse(name).ok_or_else(|| Error::ServerName { name: name.clone() }))
            .collect::<Result<Vec<_>, _>>()?;
        if server_validity_days == 0 {
            return Err(Error::Validity {
                reason: "server certificate validity must be at least one day".to_owned(),
            });
        }

        ensure_private_dir(dir)?;
        check_key_files_in(dir)?;

        let (issuer, ca_der, ca_pem) = load_or_create_root(dir)?;
        let ca_cert = parse_cert(&ca_der)?;
        let ca_point = ca_cert.public_key().subject_public_key.data.to_vec();
        let ca_key_id =
            match ca_cert.tbs_certificate.extensions().iter().find_map(|ext| {
                match ext.parsed_extension() {
                    ParsedExtension::SubjectKeyIdentifier(ski) => Some(ski.0.to_vec()),
                    _ => None,
                }
            }) {
                Some(ski) => KeyIdMethod::PreSpecified(ski),
                None => KeyIdMethod::Sha256,
            };

        let root = Root {
            dir: dir.to_owned(),
            issuer,
            ca_point,
            ca_key_id,
            ca_der,
            ca_pem,
            server_names,
            server_validity_days,
        };
        let now = crate::clock::trusted_now();
        let server = match root.load_server(now)? {
            Some(server) => server,
            None => root.make_server(now)?,
        };
        Ok(Ca { root, server })
    }

    /// SHA-256 of the CA certificate's DER, lowercase hex (64 characters):
    /// what the pairing URI carries and what devices pin.
    pub fn fingerprint(&self) -> String {
        hex::encode(ring::digest::digest(
            &ring::digest::SHA256,
            &self.root.ca_der,
        ))
    }

    /// The CA certificate as PEM.
    /// The CA's private key as PKCS#8 DER. Only for signing a wipe
    /// receipt with a CA that has just been made; nothing else needs the key
    /// outside this module.
    pub fn key_pkcs8_der(&self) -> Vec<u8> {
        self.root.issuer.key().serialize_der()
    }

    pub fn ca_pem(&self) -> &str {
        &self.root.ca_pem
    }

    /// The CA certificate as DER.
    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.root.ca_der.clone()
    }

    /// The edge's current certificate chain and key.
    pub fn server_identity(&self) -> ServerIdentity {
        self.server.clone()
    }

    /// Issues a device certificate from a PEM PKCS#10 CSR, valid from five
    /// minutes ago (clock skew) for `validity_days` days.
    ///
    /// The CSR's self-signature is verified and its key must be ECDSA P-256;
    /// its subject and requested extensions are ignored (see the module doc).
    pub fn issue_from_csr(
        &self,
        id: &DeviceId,
        csr_pem: &str,
        validity_days: u32,
    ) -> Result<IssuedCert, Error> {
        if validity_days == 0 {
            return Err(Error::Validity {
                reason: "device certificate validity must be at least one day".to_owned(),
            });
        }
        let now = crate::clock::trusted_now();
        let not_after = add_days(now, validity_days)?;
        self.issue_from_csr_with_validity(id, csr_pem, now - CLOCK_SKEW, not_after)
    }

    /// As [`Ca::issue_from_csr`], with an explicit validity window: for tests
    /// and fixtures (an already-expired certificate, say).
    pub fn issue_from_csr_with_validity(
        &self,
        id: &DeviceId,
        csr_pem: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<IssuedCert, Error> {
        let csr = csr_from_pem(csr_pem)?;
        self.issue_from_csr_der(id, &csr, not_before, not_after)
    }

    /// Checks a CSR as `issue_from_csr` would (PEM, self-signature, P-256 key)
    /// without issuing anything: pairing checks the CSR before it spends the
    /// one-time code.
    pub fn check_csr(csr_pem: &str) -> Result<(), Error> {
        verified_csr_key(&csr_from_pem(csr_pem)?).map(|_| ())
    }

    /// The DER core of CSR issuing, separate so tests can tamper with bytes.
    fn issue_from_csr_der(
        &self,
        id: &DeviceId,
        csr_der: &[u8],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<IssuedCert, Error> {
        if not_after <= not_before {
            return Err(Error::Validity {
                reason: format!("not_after {not_after} is not after not_before {not_before}"),
            });
        }
        let public_key = verified_csr_key(csr_der)?;

        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(id.as_str());
        params.subject_alt_names = vec![SanType::URI(id.uri().try_into().map_err(|source| {
            Error::Rcgen {
                action: "encode device URI",
                source,
            }
        })?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        params.not_before = not_before.to_offset(UtcOffset::UTC);
        params.not_after = not_after.to_offset(UtcOffset::UTC);

        let cert = params
            .signed_by(&public_key, &self.root.issuer)
            .map_err(|source| Error::Rcgen {
                action: "sign device certificate",
                source,
            })?;
        // Read the dates and serial back from the certificate itself, so the
        // caller stores exactly what the device holds (seconds precision).
        let parsed = parse_cert(cert.der())?;
        Ok(IssuedCert {
            pem: cert.pem(),
            der: cert.der().to_vec(),
            serial_hex: serial_hex(parsed.raw_serial()),
            not_before: parsed.validity().not_before.to_datetime(),
            not_after: parsed.validity().not_after.to_datetime(),
        })
    }

    /// A CRL signed by the CA listing `revoked`: `thisUpdate` now,
    /// `nextUpdate` in 7 days (not enforced by the edge, see the module doc).
    pub fn crl_der(&self, revoked: &[RevokedSerial], crl_number: u64) -> Result<Vec<u8>, Error> {
        let revoked_certs = revoked
            .iter()
            .map(|r| {
                let bytes = hex::decode(&r.serial_hex)
                    .ok()
                    .filter(|b| !b.is_empty())
                    .ok_or_else(|| Error::Serial {
                        serial: r.serial_hex.clone(),
                    })?;
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&bytes),
                    revocation_time: r.revoked_at.to_offset(UtcOffset::UTC),
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let now = crate::clock::trusted_now();
        let params = CertificateRevocationListParams {
            this_update: now,
            next_update: now + CRL_NEXT_UPDATE,
            crl_number: SerialNumber::from_slice(&crl_number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: self.root.ca_key_id.clone(),
        };
        let crl = params
            .signed_by(&self.root.issuer)
            .map_err(|source| Error::Rcgen {
                action: "sign CRL",
                source,
            })?;
        Ok(crl.der().to_vec())
    }

    /// Makes, writes and switches to a new server certificate (and key) if
    /// the current one expires within `renew_before` of `now`. Returns whether
    /// it did. The new certificate's validity starts at `now` (less the clock
    /// skew allowance), so `now` is the caller's clock: pass
    /// `OffsetDateTime::now_utc()` outside tests.
    pub fn renew_server_if_due(
        &mut self,
        now: OffsetDateTime,
        renew_before: Duration,
    ) -> Result<bool, Error> {
        let due = match self.server.not_after.checked_sub(renew_before) {
            Some(threshold) => threshold <= now,
            // A renewal window reaching back past the calendar's start: due.
            None => true,
        };
        if !due {
            return Ok(false);
        }
        self.server = self.root.make_server(now)?;
        tracing::info!(
            not_after = %self.server.not_after,
            "renewed the edge's server certificate"
        );
        Ok(true)
    }
}

impl Root {
    /// The SANs a server certificate made now must carry.
    fn wanted_server_sans(&self) -> BTreeSet<San> {
        let mut sans: BTreeSet<San> = self.server_names.iter().cloned().collect();
        sans.insert(San::Dns("localhost".to_owned()));
        sans.insert(San::Ip(IpAddr::from([127, 0, 0, 1])));
        sans.insert(San::Ip(IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1])));
        if let Some(host) = hostname() {
            sans.insert(host);
        }
        sans
    }

    /// Loads the server certificate and key if they are present and still fit
    /// for use; `Ok(None)` means "make a new one". Only I/O failures other
    /// than a missing file are errors: a corrupt server certificate is
    /// replaceable, unlike the CA.
    fn load_server(&self, now: OffsetDateTime) -> Result<Option<ServerIdentity>, Error> {
        let key_path = self.dir.join(SERVER_KEY_FILE);
        let cert_path = self.dir.join(SERVER_CERT_FILE);
        let (Some(key_pem), Some(cert_pem)) =
            (read_optional(&key_path)?, read_optional(&cert_path)?)
        else {
            tracing::info!(dir = %self.dir.display(), "no server certificate yet: making one");
            return Ok(None);
        };
        match self.check_server(&key_pem, &cert_pem, now) {
            Ok(identity) => Ok(Some(identity)),
            Err(reason) => {
                tracing::warn!(
                    path = %cert_path.display(),
                    %reason,
                    "replacing the server certificate"
                );
                Ok(None)
            }
        }
    }

    /// Why a server key and certificate from disk cannot be used, if so.
    fn check_server(
        &self,
        key_pem: &[u8],
        cert_pem: &[u8],
        now: OffsetDateTime,
    ) -> Result<ServerIdentity, String> {
        let key_pem =
            std::str::from_utf8(key_pem).map_err(|_| "key is not UTF-8 PEM".to_owned())?;
        let key = KeyPair::from_pkcs8_pem_and_sign_algo(key_pem, &PKCS_ECDSA_P256_SHA256)
            .map_err(|e| format!("key is not an ECDSA P-256 PKCS#8 key: {e}"))?;
        let der = CertificateDer::from_pem_slice(cert_pem)
            .map_err(|e| format!("no PEM certificate found ({e})"))?;
        let cert = parse_cert(&der).map_err(|e| e.to_string())?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err("certificate does not match server.key".to_owned());
        }
        if !self.signed_by_ca(&cert) {
            return Err("certificate is not signed by this CA".to_owned());
        }
        let not_after = cert.validity().not_after.to_datetime();
        if not_after <= now {
            return Err(format!("certificate expired at {not_after}"));
        }
        let have = server_sans(&cert)?;
        let want = self.wanted_server_sans();
        if have != want {
            return Err(format!(
                "certificate names {have:?} but the configuration and hostname ask for {want:?}"
            ));
        }
        drop(cert);
        Ok(ServerIdentity {
            cert_chain: vec![der, self.ca_der.clone()],
            key: Arc::new(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                key.serialize_der(),
            ))),
            not_after,
        })
    }

    /// Whether `cert` carries a valid ECDSA P-256 signature by the CA key.
    fn signed_by_ca(&self, cert: &X509Certificate<'_>) -> bool {
        let alg: &dyn signature::VerificationAlgorithm =
            if cert.signature_algorithm.algorithm == OID_SIG_ECDSA_WITH_SHA256 {
                &signature::ECDSA_P256_SHA256_ASN1
            } else if cert.signature_algorithm.algorithm == OID_SIG_ECDSA_WITH_SHA384 {
                &signature::ECDSA_P256_SHA384_ASN1
            } else {
                return false;
            };
        UnparsedPublicKey::new(alg, &self.ca_point)
            .verify(
                cert.tbs_certificate.as_ref(),
                cert.signature_value.data.as_ref(),
            )
            .is_ok()
    }

    /// Makes a new server key and certificate valid from `now`, writes both
    /// atomically, and returns the identity.
    fn make_server(&self, now: OffsetDateTime) -> Result<ServerIdentity, Error> {
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| Error::Rcgen {
                action: "generate server key",
                source,
            })?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name("hubd edge");
        params.subject_alt_names = self
            .wanted_server_sans()
            .iter()
            .map(San::to_rcgen)
            .collect::<Result<_, _>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        // `now` comes from the caller of `renew_server_if_due`, so it is
        // checked like any other input rather than trusted not to overflow.
        params.not_before = now.checked_sub(CLOCK_SKEW).ok_or_else(|| Error::Validity {
            reason: format!("{now} is before the start of the calendar"),
        })?;
        params.not_after = add_days(now, self.server_validity_days)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| Error::Rcgen {
                action: "sign server certificate",
                source,
            })?;

        // The key first: a crash between the two writes leaves a key that
        // does not match the old certificate, which the next start detects
        // and repairs by making a new pair.
        let key_path = self.dir.join(SERVER_KEY_FILE);
        write_file_atomic(&key_path, key.serialize_pem().as_bytes(), KEY_MODE)
            .map_err(|source| io_error("write", &key_path, source))?;
        let cert_path = self.dir.join(SERVER_CERT_FILE);
        write_file_atomic(&cert_path, cert.pem().as_bytes(), CERT_MODE)
            .map_err(|source| io_error("write", &cert_path, source))?;

        let not_after = parse_cert(cert.der())?.validity().not_after.to_datetime();
        Ok(ServerIdentity {
            cert_chain: vec![cert.der().clone(), self.ca_der.clone()],
            key: Arc::new(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                key.serialize_der(),
            ))),
            not_after,
        })
    }
}

/// Creates `dir` (mode 0700) if it is missing; refuses it if it exists and
/// group or others may access it, or if it is not a directory.
fn ensure_private_dir(dir: &Path) -> Result<(), Error> {
    match fs::metadata(dir) {
        Ok(meta) => {
            if !meta.is_dir() {
                return Err(Error::NotADirectory {
                    path: dir.to_owned(),
                });
            }
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o077 != 0 {
                return Err(Error::DirPermissions {
                    path: dir.to_owned(),
                    mode,
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)
            .map_err(|source| io_error("create directory", dir, source)),
        Err(source) => Err(io_error("inspect", dir, source)),
    }
}

/// Applies [`check_key_file_mode`] to every `*.key` file in `dir`.
fn check_key_files_in(dir: &Path) -> Result<(), Error> {
    let entries = fs::read_dir(dir).map_err(|source| io_error("list", dir, source))?;
    for entry in entries {
        let entry = entry.map_err(|source| io_error("list", dir, source))?;
        let path = entry.path();
        if path.extension().is_some_and(|ext| ext == "key") {
            check_key_file_mode(&path)?;
        }
    }
    Ok(())
}

/// Loads the root CA from `dir`, or makes one if neither of its files exists.
fn load_or_create_root(
    dir: &Path,
) -> Result<(Issuer<'static, KeyPair>, CertificateDer<'static>, String), Error> {
    let key_path = dir.join(CA_KEY_FILE);
    let cert_path = dir.join(CA_CERT_FILE);
    let key_pem = read_optional(&key_path)?;
    let cert_pem = read_optional(&cert_path)?;
    let (key_pem, cert_pem) = match (key_pem, cert_pem) {
        (None, None) => return create_root(&key_path, &cert_path),
        (Some(_), None) => {
            return Err(Error::MissingCaFile {
                present: key_path,
                missing: cert_path,
            });
        }
        (None, Some(_)) => {
            return Err(Error::MissingCaFile {
                present: cert_path,
                missing: key_path,
            });
        }
        (Some(key), Some(cert)) => (key, cert),
    };

    let bad_key = |reason: String| Error::BadKey {
        path: key_path.clone(),
        reason,
    };
    let key_pem = String::from_utf8(key_pem).map_err(|_| bad_key("not UTF-8".to_owned()))?;
    let key = KeyPair::from_pkcs8_pem_and_sign_algo(&key_pem, &PKCS_ECDSA_P256_SHA256)
        .map_err(|e| bad_key(e.to_string()))?;

    let bad_cert = |reason: String| Error::BadCert {
        path: cert_path.clone(),
        reason,
    };
    let cert_pem = String::from_utf8(cert_pem).map_err(|_| bad_cert("not UTF-8".to_owned()))?;
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| bad_cert(format!("no PEM certificate found ({e})")))?;
    let cert = parse_cert(&der).map_err(|e| bad_cert(e.to_string()))?;
    let is_ca = cert
        .basic_constraints()
        .map_err(|e| bad_cert(format!("bad basicConstraints: {e}")))?
        .is_some_and(|bc| bc.value.ca);
    if !is_ca {
        return Err(bad_cert("not a CA certificate".to_owned()));
    }
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(Error::KeyMismatch {
            key: key_path,
            cert: cert_path,
        });
    }
    let not_after = cert.validity().not_after.to_datetime();
    if not_after <= crate::clock::trusted_now() {
        // Still usable to sign (and to wipe and start over), so say it loudly
        // instead of refusing to start: devices will reject the hub anyway.
        tracing::error!(path = %cert_path.display(), %not_after, "the hub CA certificate has expired");
    }
    drop(cert);
    let issuer = Issuer::from_ca_cert_der(&der, key).map_err(|e| bad_cert(e.to_string()))?;
    Ok((issuer, der, cert_pem))
}

/// Makes a new root CA and writes `ca.key` then `ca.pem`.
fn create_root(
    key_path: &Path,
    cert_path: &Path,
) -> Result<(Issuer<'static, KeyPair>, CertificateDer<'static>, String), Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| Error::Rcgen {
        action: "generate CA key",
        source,
    })?;
    // A random suffix tells two hubs' CAs apart in a device's or browser's
    // certificate list; 40 bits are plenty for that (it is not a secret).
    let mut suffix = [0u8; 5];
    fill_random(&mut suffix)?;
    let now = crate::clock::trusted_now();
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(&format!(
        "hubd root CA {}",
        crate::model::base32_lower(&suffix)
    ));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(random_serial()?);
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + Duration::days(CA_VALIDITY_DAYS);
    let cert = params.self_signed(&key).map_err(|source| Error::Rcgen {
        action: "self-sign CA certificate",
        source,
    })?;

    write_file_atomic(key_path, key.serialize_pem().as_bytes(), KEY_MODE)
        .map_err(|source| io_error("write", key_path, source))?;
    let pem = cert.pem();
    write_file_atomic(cert_path, pem.as_bytes(), CERT_MODE)
        .map_err(|source| io_error("write", cert_path, source))?;
    tracing::info!(path = %cert_path.display(), "created a new hub root CA");

    let der = cert.der().clone();
    let issuer = Issuer::from_ca_cert_der(&der, key).map_err(|source| Error::Rcgen {
        action: "read back the new CA certificate",
        source,
    })?;
    Ok((issuer, der, pem))
}

/// Parses a DER CSR, checks that its key is ECDSA P-256 and that it signed
/// the request, and returns that key.
/// The DER of the first PEM `CERTIFICATE REQUEST` in `pem`.
fn csr_from_pem(pem: &str) -> Result<CertificateSigningRequestDer<'static>, Error> {
    CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).map_err(|e| Error::Csr {
        reason: format!("no PEM CERTIFICATE REQUEST found ({e})"),
    })
}

fn verified_csr_key(der: &[u8]) -> Result<P256PublicKey, Error> {
    let (rest, csr) = X509CertificationRequest::from_der(der).map_err(|e| Error::Csr {
        reason: e.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(Error::Csr {
            reason: "trailing bytes after the request".to_owned(),
        });
    }
    let spki = &csr.certification_request_info.subject_pki;
    if !is_p256(&spki.algorithm) {
        return Err(Error::UnsupportedKey {
            got: describe_key(&spki.algorithm),
        });
    }
    let point = &spki.subject_public_key;
    // rustls and ring only take uncompressed points; say so rather than let
    // it surface later as a confusing signature failure.
    if point.unused_bits != 0
        || point.data.len() != P256_POINT_LEN
        || point.data.first() != Some(&0x04)
    {
        return Err(Error::UnsupportedKey {
            got: "an ECDSA P-256 key that is not an uncompressed point".to_owned(),
        });
    }
    let alg: &dyn signature::VerificationAlgorithm =
        if csr.signature_algorithm.algorithm == OID_SIG_ECDSA_WITH_SHA256 {
            &signature::ECDSA_P256_SHA256_ASN1
        } else if csr.signature_algorithm.algorithm == OID_SIG_ECDSA_WITH_SHA384 {
            &signature::ECDSA_P256_SHA384_ASN1
        } else {
            return Err(Error::Csr {
                reason: format!(
                    "signature algorithm {} is not ecdsa-with-SHA256",
                    csr.signature_algorithm.algorithm
                ),
            });
        };
    UnparsedPublicKey::new(alg, point.data.as_ref())
        .verify(
            csr.certification_request_info.raw,
            csr.signature_value.data.as_ref(),
        )
        .map_err(|_| Error::CsrSignature)?;
    Ok(P256PublicKey {
        point: point.data.to_vec(),
    })
}

fn is_p256(alg: &AlgorithmIdentifier<'_>) -> bool {
    alg.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY
        && alg
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .is_some_and(|curve| curve == OID_EC_P256)
}

/// A human name for a public key algorithm, for error messages.
fn describe_key(alg: &AlgorithmIdentifier<'_>) -> String {
    let oid = &alg.algorithm;
    if *oid == OID_PKCS1_RSAENCRYPTION || *oid == OID_PKCS1_RSASSAPSS {
        "RSA".to_owned()
    } else if *oid == OID_SIG_ED25519 {
        "Ed25519".to_owned()
    } else if *oid == OID_SIG_ED448 {
        "Ed448".to_owned()
    } else if *oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
        match alg.parameters.as_ref().and_then(|p| p.as_oid().ok()) {
            Some(curve) if curve == OID_EC_P256 => "ECDSA P-256".to_owned(),
            Some(curve) if curve == OID_NIST_EC_P384 => "ECDSA P-384".to_owned(),
            Some(curve) if curve == OID_NIST_EC_P521 => "ECDSA P-521".to_owned(),
            Some(curve) => format!("EC on curve {curve}"),
            None => "EC without a named curve".to_owned(),
        }
    } else {
        format!("of algorithm {oid}")
    }
}

/// The device id a verified client certificate names: its SAN URI
/// `urn:hub:device:<id>` must be present (once), parse as a [`DeviceId`],
/// and equal the CN if there is one.
///
/// This does not verify the certificate: call it on what rustls has already
/// verified against the CA and the CRL.
pub fn device_id_from_cert(der: &[u8]) -> Result<DeviceId, Error> {
    let cert = parse_cert(der)?;
    let san = cert.subject_alternative_name().map_err(|e| Error::Cert {
        reason: format!("bad subjectAltName: {e}"),
    })?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with(DEVICE_URI_PREFIX) => Some(*uri),
            _ => None,
        })
        .collect();
    let uri = match uris.as_slice() {
        [] => return Err(Error::NoDeviceUri),
        [one] => *one,
        _ => {
            return Err(Error::MultipleDeviceUris {
                uris: uris.iter().map(|u| (*u).to_owned()).collect(),
            });
        }
    };
    let id =
        DeviceId::parse(&uri[DEVICE_URI_PREFIX.len()..]).map_err(|source| Error::BadDeviceId {
            uri: uri.to_owned(),
            source,
        })?;
    for cn in cert.subject().iter_common_name() {
        let cn = cn.as_str().map_err(|e| Error::Cert {
            reason: format!("CN is not a string: {e}"),
        })?;
        if cn != id.as_str() {
            return Err(Error::CnMismatch {
                cn: cn.to_owned(),
                id: id.as_str().to_owned(),
            });
        }
    }
    Ok(id)
}

/// A certificate's serial number (as [`IssuedCert::serial_hex`]) and its
/// `notAfter`.
pub fn cert_serial_and_expiry(der: &[u8]) -> Result<(String, OffsetDateTime), Error> {
    let cert = parse_cert(der)?;
    Ok((
        serial_hex(cert.raw_serial()),
        cert.validity().not_after.to_datetime(),
    ))
}

/// Refuses a key file that group or others may read, write or execute.
pub fn check_key_file_mode(path: &Path) -> Result<(), Error> {
    let meta = fs::metadata(path).map_err(|source| io_error("inspect", path, source))?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(Error::KeyPermissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or
/// the new one, never a torn one: a temporary file in the same directory,
/// created with `mode` (never widened, so a key is not readable even for a
/// moment), fsynced, renamed over `path`, and the directory fsynced so the
/// rename itself survives a power cut. The umask can narrow `mode` further.
pub fn write_file_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), io::Error> {
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} has no file name", path.display()),
        )
    })?;
    // A random name, opened with O_EXCL, so a stale or planted file (or
    // symlink) at the temporary path is never written through.
    let mut suffix = [0u8; 8];
    rand::rngs::OsRng
        .try_fill_bytes(&mut suffix)
        .map_err(io::Error::other)?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        hex::encode(suffix)
    ));

    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        // Best effort: the write already failed, and that error is the one
        // worth reporting.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    File::open(dir)?.sync_all()
}

fn io_error(action: &'static str, path: &Path, source: io::Error) -> Error {
    Error::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// Reads a file, with a missing file as `None` (any other failure is an error).
fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, Error> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(io_error("read", path, source)),
    }
}

fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, Error> {
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| Error::Cert {
        reason: e.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(Error::Cert {
            reason: "trailing bytes after the certificate".to_owned(),
        });
    }
    Ok(cert)
}

/// The canonical hex form of a DER INTEGER's content bytes: lowercase, no
/// leading zero bytes (DER adds one when the top bit is set), at least one byte.
fn serial_hex(raw: &[u8]) -> String {
    match raw.iter().position(|&b| b != 0) {
        Some(start) => hex::encode(&raw[start..]),
        // Zero (or, from a malformed encoding, nothing): DER's one zero byte.
        None => "00".to_owned(),
    }
}

/// A random positive 128-bit serial whose first byte is in `0x01..=0x7f`,
/// so DER encodes it as exactly these 16 bytes (no sign or padding byte).
fn random_serial() -> Result<SerialNumber, Error> {
    let mut bytes = [0u8; SERIAL_LEN];
    fill_random(&mut bytes)?;
    bytes[0] &= 0x7f;
    if bytes[0] == 0 {
        bytes[0] = 0x01;
    }
    Ok(SerialNumber::from_slice(&bytes))
}

fn fill_random(buf: &mut [u8]) -> Result<(), Error> {
    rand::rngs::OsRng
        .try_fill_bytes(buf)
        .map_err(|e| Error::Rng {
            reason: e.to_string(),
        })
}

fn common_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn add_days(from: OffsetDateTime, days: u32) -> Result<OffsetDateTime, Error> {
    from.checked_add(Duration::days(i64::from(days)))
        .ok_or_else(|| Error::Validity {
            reason: format!("{days} days from {from} is past the year 9999"),
        })
}

/// This machine's host name, if it has one (also what pairing URIs name
/// when no `advertise_host` is set).
///
/// Asked of the kernel with gethostname(2), not read from
/// `/proc/sys/kernel/hostname`: the packaged unit's `ProcSubset=pid` hides
/// `/proc/sys`, and the hub would then name itself "localhost".
pub fn machine_hostname() -> Option<String> {
    let raw = nix::unistd::gethostname().ok()?;
    let raw = raw.to_str()?;
    let name = raw.trim();
    (!name.is_empty() && name != "(none)").then(|| name.to_owned())
}

/// The machine's hostname as a server SAN, if it has a usable one.
fn hostname() -> Option<San> {
    let name = machine_hostname()?;
    let name = name.as_str();
    match San::parse(name) {
        Some(san @ San::Dns(_)) => Some(san),
        _ => {
            tracing::warn!(
                hostname = name,
                "the hostname is not a valid DNS name: leaving it out of the server certificate"
            );
            None
        }
    }
}

/// The DNS and IP SANs of a server certificate.
fn server_sans(cert: &X509Certificate<'_>) -> Result<BTreeSet<San>, String> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?;
    let mut out = BTreeSet::new();
    for name in san.iter().flat_map(|ext| ext.value.general_names.iter()) {
        match name {
            GeneralName::DNSName(dns) => {
                out.insert(San::Dns(dns.to_ascii_lowercase()));
            }
            GeneralName::IPAddress(bytes) => {
                if let Ok(v4) = <[u8; 4]>::try_from(*bytes) {
                    out.insert(San::Ip(IpAddr::from(v4)));
                } else if let Ok(v6) = <[u8; 16]>::try_from(*bytes) {
                    out.insert(San::Ip(IpAddr::from(v6)));
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rcgen::{PKCS_ECDSA_P384_SHA384, PKCS_ED25519};
    use rustls::client::danger::ServerCertVerifier;
    use rustls::server::WebPkiClientVerifier;
    use rustls::server::danger::ClientCertVerifier;
    use rustls::{CertificateError, RootCertStore};
    use rustls_pki_types::{CertificateRevocationListDer, UnixTime};

    use super::*;

    #[test]
    fn the_host_name_comes_from_the_kernel_not_from_proc_sys() {
        // The same name the kernel shows in /proc/sys (readable here, hidden
        // under the unit's ProcSubset=pid).
        let proc_sys = fs::read_to_string("/proc/sys/kernel/hostname").expect("/proc/sys readable");
        let proc_sys = proc_sys.trim();
        let expected = (!proc_sys.is_empty() && proc_sys != "(none)").then(|| proc_sys.to_owned());
        assert_eq!(machine_hostname(), expected);
    }

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn open(dir: &Path) -> Ca {
        Ca::open_or_create(dir, &[], 90).unwrap()
    }

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    /// A P-256 CSR as a device would send it, asking for `cn` and a SAN URI.
    fn csr_with(alg: &'static SignatureAlgorithm, cn: &str, uri: &str) -> String {
        let key = KeyPair::generate_for(alg).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(cn);
        params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn p256_csr() -> String {
        csr_with(&PKCS_ECDSA_P256_SHA256, "whatever", "urn:x:y")
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn roots(ca: &Ca) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(ca.ca_der()).unwrap();
        Arc::new(roots)
    }

    fn client_verifier(ca: &Ca, crl: Vec<u8>) -> Arc<dyn ClientCertVerifier> {
        WebPkiClientVerifier::builder_with_provider(roots(ca), provider())
            .with_crls([CertificateRevocationListDer::from(crl)])
            .only_check_end_entity_revocation()
            .build()
            .unwrap()
    }

    fn verify_client(
        verifier: &Arc<dyn ClientCertVerifier>,
        cert: &IssuedCert,
    ) -> Result<(), rustls::Error> {
        let der = CertificateDer::from(cert.der.clone());
        ClientCertVerifier::verify_client_cert(verifier.as_ref(), &der, &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn fresh_dirs_make_distinct_private_cas() {
        let (t1, t2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (d1, d2) = (t1.path().join("ca"), t2.path().join("ca"));
        let (a, b) = (open(&d1), open(&d2));

        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint().len(), 64);
        assert!(
            a.fingerprint()
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(
            fs::read(d1.join("ca.key")).unwrap(),
            fs::read(d2.join("ca.key")).unwrap()
        );

        assert_eq!(mode_of(&d1), 0o700);
        for name in ["ca.key", "server.key"] {
            assert_eq!(mode_of(&d1.join(name)), 0o600, "{name}");
        }
        for name in ["ca.key", "ca.pem", "server.key", "server.pem"] {
            assert!(d1.join(name).is_file(), "{name}");
        }
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(&d1).unwrap().count(), 4);

        let ca = parse_cert(&a.root.ca_der).unwrap().tbs_certificate.clone();
        let cn = ca
            .subject
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_owned();
        assert!(cn.starts_with("hubd root CA "), "{cn}");
        let bc = ca.basic_constraints().unwrap().unwrap().value.clone();
        assert!(bc.ca);
        assert_eq!(bc.path_len_constraint, Some(0));
        let ku = *ca.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign() && !ku.digital_signature());
        assert!(a.ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    }

    #[test]
    fn reopening_keeps_the_ca_and_the_server_cert() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let first = open(&dir);
        let second = open(&dir);
        assert_eq!(first.fingerprint(), second.fingerprint());
        assert_eq!(
            first.server_identity().cert_chain,
            second.server_identity().cert_chain
        );
    }

    #[test]
    fn group_readable_key_is_refused_naming_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        open(&dir);
        for name in ["ca.key", "server.key"] {
            let key = dir.join(name);
            fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
            let err = Ca::open_or_create(&dir, &[], 90).unwrap_err();
            assert!(
                matches!(err, Error::KeyPermissions { mode: 0o644, .. }),
                "{err:?}"
            );
            let msg = err.to_string();
            assert!(msg.contains(&key.display().to_string()), "{msg}");
            assert!(msg.contains("0644") && msg.contains("chmod 600"), "{msg}");
            fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        }
        open(&dir);
    }

    #[test]
    fn open_ca_dir_is_refused_naming_the_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        fs::DirBuilder::new().mode(0o755).create(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let err = Ca::open_or_create(&dir, &[], 90).unwrap_err();
        assert!(
            matches!(err, Error::DirPermissions { mode: 0o755, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains(&dir.display().to_string()));

        let file = tmp.path().join("file");
        fs::write(&file, b"x").unwrap();
        let err = Ca::open_or_create(&file, &[], 90).unwrap_err();
        assert!(matches!(err, Error::NotADirectory { .. }), "{err:?}");
    }

    #[test]
    fn broken_ca_files_are_named_never_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let other = tmp.path().join("other");
        open(&dir);
        open(&other);
        let original = fs::read(dir.join("ca.pem")).unwrap();

        fs::write(dir.join("ca.pem"), b"not a certificate").unwrap();
        let err = Ca::open_or_create(&dir, &[], 90).unwrap_err();
        assert!(matches!(err, Error::BadCert { .. }), "{err:?}");
        assert!(err.to_string().contains("ca.pem"), "{err}");

        fs::copy(other.join("ca.pem"), dir.join("ca.pem")).unwrap();
        let err = Ca::open_or_create(&dir, &[], 90).unwrap_err();
        assert!(matches!(err, Error::KeyMismatch { .. }), "{err:?}");
        assert!(err.to_string().contains("ca.key") && err.to_string().contains("ca.pem"));

        fs::write(dir.join("ca.pem"), &original).unwrap();
        let key = fs::read(dir.join("ca.key")).unwrap();
        write_file_atomic(&dir.join("ca.key"), b"garbage", 0o600).unwrap();
        let err = Ca::open_or_create(&dir, &[], 90).unwrap_err();
        assert!(matches!(err, Error::BadKey { .. }), "{err:?}");
        assert!(err.to_string().contains("ca.key"), "{err}");

        fs::remove_file(dir.join("ca.key")).unwrap();
        let err = Ca::open_or_create(&dir, &[], 90).unwrap_err();
        assert!(matches!(err, Error::MissingCaFile { .. }), "{err:?}");
        assert!(err.to_string().contains("ca.key"), "{err}");
        write_file_atomic(&dir.join("ca.key"), &key, 0o600).unwrap();

        // A CA certificate that is not a CA is refused too.
        let server_pem = fs::read(dir.join("server.pem")).unwrap();
        fs::write(dir.join("ca.pem"), &server_pem).unwrap();
        let err = Ca::open_or_create(&dir, &[], 90).unwrap_err();
        assert!(err.to_string().contains("ca.pem"), "{err}");
        fs::write(dir.join("ca.pem"), &original).unwrap();
        open(&dir);
    }

    #[test]
    fn corrupt_or_foreign_server_cert_is_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let other = tmp.path().join("other");
        let ca = open(&dir);
        open(&other);

        fs::write(dir.join("server.pem"), b"corrupt").unwrap();
        let reopened = open(&dir);
        assert_eq!(reopened.fingerprint(), ca.fingerprint());
        assert_ne!(
            reopened.server_identity().cert_chain,
            ca.server_identity().cert_chain
        );
        server_verifies(&reopened, "localhost");

        // Another hub's server pair: well formed, but not signed by this CA.
        fs::copy(other.join("server.pem"), dir.join("server.pem")).unwrap();
        fs::copy(other.join("server.key"), dir.join("server.key")).unwrap();
        let reopened = open(&dir);
        server_verifies(&reopened, "localhost");

        fs::remove_file(dir.join("server.pem")).unwrap();
        server_verifies(&open(&dir), "localhost");
    }

    #[test]
    fn changed_server_names_reissue_the_server_cert() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let first = open(&dir);
        let names = vec!["hub.example.lan".to_owned()];
        let second = Ca::open_or_create(&dir, &names, 90).unwrap();
        assert_ne!(
            first.server_identity().cert_chain,
            second.server_identity().cert_chain
        );
        server_verifies(&second, "hub.example.lan");
        let third = Ca::open_or_create(&dir, &names, 90).unwrap();
        assert_eq!(
            second.server_identity().cert_chain,
            third.server_identity().cert_chain
        );
    }

    #[test]
    fn invalid_server_name_is_refused_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        for bad in ["bad name", "*.example.com", "", "[::1]"] {
            let err =
                Ca::open_or_create(&tmp.path().join("ca"), &[bad.to_owned()], 90).unwrap_err();
            assert!(matches!(err, Error::ServerName { .. }), "{bad}: {err:?}");
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    fn server_verifies(ca: &Ca, name: &str) {
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots(ca), provider())
                .build()
                .unwrap();
        let identity = ca.server_identity();
        let server_name = ServerName::try_from(name.to_owned()).unwrap();
        verifier
            .verify_server_cert(
                &identity.cert_chain[0],
                &identity.cert_chain[1..],
                &server_name,
                &[],
                UnixTime::now(),
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }

    #[test]
    fn server_cert_chains_to_the_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let names = vec![
            "hub.local".to_owned(),
            "192.168.1.20".to_owned(),
            "fd00::20".to_owned(),
        ];
        let ca = Ca::open_or_create(&tmp.path().join("ca"), &names, 90).unwrap();
        for name in [
            "localhost",
            "127.0.0.1",
            "::1",
            "hub.local",
            "192.168.1.20",
            "fd00::20",
        ] {
            server_verifies(&ca, name);
        }
        if let Some(San::Dns(host)) = hostname() {
            server_verifies(&ca, &host);
        }
        let identity = ca.server_identity();
        assert_eq!(identity.cert_chain.len(), 2);
        assert_eq!(identity.cert_chain[1], ca.ca_der());
        let cert = parse_cert(&identity.cert_chain[0]).unwrap();
        let eku = cert.extended_key_usage().unwrap().unwrap().value.clone();
        assert!(eku.server_auth && !eku.client_auth);
        let days = (identity.not_after - OffsetDateTime::now_utc()).whole_days();
        assert!((89..=90).contains(&days), "{days}");

        // The key is the one the certificate names.
        let PrivateKeyDer::Pkcs8(pkcs8) = identity.key.as_ref() else {
            panic!("server key is not PKCS#8");
        };
        let key = KeyPair::from_pkcs8_der_and_sign_algo(pkcs8, &PKCS_ECDSA_P256_SHA256).unwrap();
        assert_eq!(
            cert.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
    }

    #[test]
    fn issued_cert_names_the_device_the_hub_chose() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = open(&tmp.path().join("ca"));
        let device = id("kitchen-sensor-1");

        let issued = ca.issue_from_csr(&device, &p256_csr(), 30).unwrap();
        assert_eq!(device_id_from_cert(&issued.der).unwrap(), device);
        assert!(issued.pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let (serial, not_after) = cert_serial_and_expiry(&issued.der).unwrap();
        assert_eq!(serial, issued.serial_hex);
        assert_eq!(issued.serial_hex.len(), 32);
        assert!(
            issued
                .serial_hex
                .chars()
                .all(|c| matches!(c, '0'..='9' | 'a'..='f'))
        );
        assert_eq!(not_after, issued.not_after);
        let now = OffsetDateTime::now_utc();
        assert!(issued.not_before < now - Duration::minutes(4));
        assert!((issued.not_after - now - Duration::days(30)).abs() < Duration::minutes(1));

        // A CSR asking for someone else's identity, a server EKU and CA
        // powers gets exactly what the hub decides, nothing more.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name("other-device");
        params.subject_alt_names = vec![
            SanType::URI("urn:hub:device:other-device".try_into().unwrap()),
            SanType::DnsName("evil.example".try_into().unwrap()),
        ];
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let issued = ca.issue_from_csr(&device, &csr, 30).unwrap();
        assert_eq!(device_id_from_cert(&issued.der).unwrap(), device);
        let cert = parse_cert(&issued.der).unwrap();
        let cn: Vec<_> = cert
            .subject()
            .iter_common_name()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert_eq!(cn, ["kitchen-sensor-1"]);
        let san = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .clone();
        assert_eq!(
            san.general_names,
            [GeneralName::URI("urn:hub:device:kitchen-sensor-1")]
        );
        let eku = cert.extended_key_usage().unwrap().unwrap().value.clone();
        assert!(eku.client_auth && !eku.server_auth);
        assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
        assert!(cert.key_usage().unwrap().unwrap().value.digital_signature());
        assert_eq!(
            cert.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
    }

    #[test]
    fn wrong_keys_and_garbage_csrs_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = open(&tmp.path().join("ca"));
        let device = id("dev");

        let ed = csr_with(&PKCS_ED25519, "dev", "urn:hub:device:dev");
        let err = ca.issue_from_csr(&device, &ed, 30).unwrap_err();
        assert_eq!(
            err.to_string(),
            "csr key is Ed25519: only ECDSA P-256 is accepted"
        );

        let p384 = csr_with(&PKCS_ECDSA_P384_SHA384, "dev", "urn:hub:device:dev");
        let err = ca.issue_from_csr(&device, &p384, 30).unwrap_err();
        assert_eq!(
            err.to_string(),
            "csr key is ECDSA P-384: only ECDSA P-256 is accepted"
        );

        for garbage in [
            "",
            "hello",
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        ] {
            let err = ca.issue_from_csr(&device, garbage, 30).unwrap_err();
            assert!(matches!(err, Error::Csr { .. }), "{garbage:?}: {err:?}");
            assert!(
                err.to_string().starts_with("csr cannot be parsed: "),
                "{err}"
            );
        }

        // A request whose signature does not match its content.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name("aaaa");
        let mut der = params.serialize_request(&key).unwrap().der().to_vec();
        let at = der.windows(4).position(|w| w == b"aaaa").unwrap();
        der[at] = b'b';
        let now = OffsetDateTime::now_utc();
        let err = ca
            .issue_from_csr_der(&device, &der, now, now + Duration::days(1))
            .unwrap_err();
        assert!(matches!(err, Error::CsrSignature), "{err:?}");

        // Bad validity never panics.
        for days in [0, u32::MAX] {
            let err = ca.issue_from_csr(&device, &p256_csr(), days).unwrap_err();
            assert!(matches!(err, Error::Validity { .. }), "{days}: {err:?}");
        }
        let err = ca
            .issue_from_csr_with_validity(&device, &p256_csr(), now, now - Duration::days(1))
            .unwrap_err();
        assert!(matches!(err, Error::Validity { .. }), "{err:?}");
    }

    #[test]
    fn rsa_keys_are_named_in_the_refusal() {
        let rsa = AlgorithmIdentifier::new(OID_PKCS1_RSAENCRYPTION, None);
        assert_eq!(describe_key(&rsa), "RSA");
    }

    #[test]
    fn rustls_refuses_revoked_and_accepts_the_rest() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = open(&tmp.path().join("ca"));
        let revoked = ca.issue_from_csr(&id("revoked"), &p256_csr(), 30).unwrap();
        let good = ca.issue_from_csr(&id("good"), &p256_csr(), 30).unwrap();
        let now = OffsetDateTime::now_utc();
        let expired = ca
            .issue_from_csr_with_validity(
                &id("old"),
                &p256_csr(),
                now - Duration::days(10),
                now - Duration::days(1),
            )
            .unwrap();

        let list = [RevokedSerial {
            serial_hex: revoked.serial_hex.clone(),
            revoked_at: now,
        }];
        let verifier = client_verifier(&ca, ca.crl_der(&list, 1).unwrap());
        assert_eq!(
            verify_client(&verifier, &revoked),
            Err(rustls::Error::InvalidCertificate(CertificateError::Revoked))
        );
        verify_client(&verifier, &good).unwrap();
        assert!(matches!(
            verify_client(&verifier, &expired),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. }
            ))
        ));

        // An empty CRL revokes nothing.
        let verifier = client_verifier(&ca, ca.crl_der(&[], 2).unwrap());
        verify_client(&verifier, &revoked).unwrap();

        // Another hub's device is a stranger here.
        let other = open(&tmp.path().join("other"));
        let stranger = other.issue_from_csr(&id("good"), &p256_csr(), 30).unwrap();
        assert_eq!(
            verify_client(&verifier, &stranger),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            ))
        );
    }

    #[test]
    fn crl_lists_serials_exactly_as_issued() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = open(&tmp.path().join("ca"));
        let now = OffsetDateTime::now_utc();
        // Includes a serial whose top bit is set (DER pads it with a zero byte).
        let serials = ["0102030405060708090a0b0c0d0e0f10", "80ff", "01"];
        let list: Vec<_> = serials
            .iter()
            .map(|s| RevokedSerial {
                serial_hex: (*s).to_owned(),
                revoked_at: now,
            })
            .collect();
        let der = ca.crl_der(&list, 7).unwrap();
        let (_, crl) =
            x509_parser::revocation_list::CertificateRevocationList::from_der(&der).unwrap();
        let got: Vec<_> = crl
            .iter_revoked_certificates()
            .map(|r| serial_hex(r.raw_serial()))
            .collect();
        assert_eq!(got, serials);
        assert_eq!(
            crl.crl_number().map(|n| n.to_string()),
            Some("7".to_owned())
        );

        for bad in ["", "xyz", "abc"] {
            let list = [RevokedSerial {
                serial_hex: bad.to_owned(),
                revoked_at: now,
            }];
            assert!(
                matches!(ca.crl_der(&list, 1), Err(Error::Serial { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn serial_hex_is_canonical() {
        assert_eq!(serial_hex(&[0x00, 0x80, 0x01]), "8001");
        assert_eq!(serial_hex(&[0x7f, 0x00]), "7f00");
        assert_eq!(serial_hex(&[0x00]), "00");
        assert_eq!(serial_hex(&[]), "00");
        let serial = random_serial().unwrap().to_bytes();
        assert_eq!(serial.len(), 16);
        assert!((0x01..=0x7f).contains(&serial[0]));
    }

    #[test]
    fn renews_the_server_cert_only_when_due() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let mut ca = Ca::open_or_create(&dir, &[], 30).unwrap();
        let before = ca.server_identity();
        let now = OffsetDateTime::now_utc();

        assert!(!ca.renew_server_if_due(now, Duration::days(7)).unwrap());
        assert_eq!(ca.server_identity().cert_chain, before.cert_chain);

        let later = now + Duration::days(25);
        assert!(ca.renew_server_if_due(later, Duration::days(7)).unwrap());
        let after = ca.server_identity();
        assert!(after.not_after > before.not_after);
        assert_ne!(after.cert_chain[0], before.cert_chain[0]);
        assert_eq!(after.cert_chain[1], ca.ca_der());
        assert!(!ca.renew_server_if_due(later, Duration::days(7)).unwrap());

        // The renewed pair was written: the next start picks it up.
        let reopened = Ca::open_or_create(&dir, &[], 30).unwrap();
        assert_eq!(reopened.server_identity().cert_chain, after.cert_chain);
        assert_eq!(mode_of(&dir.join("server.key")), 0o600);

        // A renewal window that reaches past the calendar's start is due, not a panic.
        assert!(ca.renew_server_if_due(now, Duration::MAX).unwrap());
    }

    #[test]
    fn device_id_needs_a_uri_and_a_matching_cn() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = |cn: Option<&str>, uris: &[&str]| {
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            if let Some(cn) = cn {
                params.distinguished_name.push(DnType::CommonName, cn);
            }
            params.subject_alt_names = uris
                .iter()
                .map(|u| SanType::URI((*u).try_into().unwrap()))
                .collect();
            params.self_signed(&key).unwrap().der().to_vec()
        };

        let ok = cert(None, &["https://example.com", "urn:hub:device:abc"]);
        assert_eq!(device_id_from_cert(&ok).unwrap(), id("abc"));

        let err = device_id_from_cert(&cert(Some("abc"), &[])).unwrap_err();
        assert!(matches!(err, Error::NoDeviceUri), "{err:?}");
        let err = device_id_from_cert(&cert(Some("abc"), &["urn:hub:device:ABC"])).unwrap_err();
        assert!(matches!(err, Error::BadDeviceId { .. }), "{err:?}");
        assert!(err.to_string().contains("urn:hub:device:ABC"), "{err}");
        let err = device_id_from_cert(&cert(Some("xyz"), &["urn:hub:device:abc"])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "certificate CN \"xyz\" does not match its device id \"abc\""
        );
        let err = device_id_from_cert(&cert(None, &["urn:hub:device:a", "urn:hub:device:b"]))
            .unwrap_err();
        assert!(matches!(err, Error::MultipleDeviceUris { .. }), "{err:?}");
        let err = device_id_from_cert(b"garbage").unwrap_err();
        assert!(matches!(err, Error::Cert { .. }), "{err:?}");
        assert!(cert_serial_and_expiry(b"").is_err());
    }

    #[test]
    fn atomic_write_replaces_with_the_requested_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("secret.key");
        write_file_atomic(&path, b"one", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"one");
        assert_eq!(mode_of(&path), 0o600);
        check_key_file_mode(&path).unwrap();
        write_file_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);

        let missing = tmp.path().join("no/such/dir/file");
        assert!(write_file_atomic(&missing, b"x", 0o600).is_err());
        let err = check_key_file_mode(&missing).unwrap_err();
        assert!(err.to_string().contains("no/such/dir/file"), "{err}");
    }

    #[test]
    fn ca_is_shareable_across_tasks() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Ca>();
        assert_send_sync::<ServerIdentity>();
    }
}
