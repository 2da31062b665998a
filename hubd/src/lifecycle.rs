//! Device lifecycle: what firmware each device runs and until when its
//! maker supports it, the signed firmware catalogue, updates offered over
//! the device's own mTLS session, integrity alerts and the end-of-life
//! policy (principles 3 and 7).
//!
//! This file is the pure part: the formats (meta fields, versions, vendor
//! keys, signatures, dates), the support status, and the integrity
//! decision. `service` is the task that applies them: it reads devices'
//! reports from the edge, serves update downloads, and isolates through a
//! closure the daemon builds from the edge (`lifecycle` never imports
//! `edge`). The device's side of updates is specified in `hubd/OTA.md`.

mod service;

use std::cmp::Ordering;

use base64::Engine as _;
use jiff::civil::Date;
use rustls_pki_types::pem::PemObject;

use crate::store::{FirmwareRecord, Lifecycle, UpdateState};

pub use service::{
    Clock, Error, Isolator, LifecycleHandle, Offered, Publisher, Setup, Summary, start,
};

/// The first line of every signed message (see `hubd/OTA.md`).
pub const SIGNED_PREFIX: &str = "hubd-firmware-v1";

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo; the key follows.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Why an input was refused; the message names what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

fn invalid(msg: impl Into<String>) -> Invalid {
    Invalid(msg.into())
}

/// What the vendor signs for one image.
pub fn signed_message(model: &str, version: &str, sha256_hex: &str) -> Vec<u8> {
    format!("{SIGNED_PREFIX}\n{model}\n{version}\n{sha256_hex}\n").into_bytes()
}

/// SHA-256, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// Checks an Ed25519 signature over (model, version, image hash).
pub fn verify_signature(
    public_key: &[u8; 32],
    model: &str,
    version: &str,
    sha256_hex: &str,
    signature: &[u8],
) -> bool {
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public_key)
        .verify(&signed_message(model, version, sha256_hex), signature)
        .is_ok()
}

/// The id a vendor key is shown by: `sha256:` and 16 hex digits.
pub fn key_id(public_key: &[u8; 32]) -> String {
    format!("sha256:{}", &sha256_hex(public_key)[..16])
}

/// A vendor's public key from a file: PEM `PUBLIC KEY` (what
/// `openssl pkey -pubout` writes), the 32 raw bytes, or them in hex or
/// base64 on one line.
pub fn parse_vendor_key(bytes: &[u8]) -> Result<[u8; 32], Invalid> {
    if bytes.len() == 32 {
        return Ok(bytes.try_into().unwrap_or([0; 32]));
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|_| invalid("is neither 32 raw bytes nor text (PEM, hex or base64)"))?
        .trim();
    if text.starts_with("-----BEGIN") {
        if text.contains("PRIVATE KEY") {
            return Err(invalid(
                "is a private key: give the vendor's public key (openssl pkey -pubout)",
            ));
        }
        let spki = rustls_pki_types::SubjectPublicKeyInfoDer::from_pem_slice(text.as_bytes())
            .map_err(|e| invalid(format!("is not a PEM PUBLIC KEY: {e}")))?;
        let der: &[u8] = spki.as_ref();
        return der
            .strip_prefix(&ED25519_SPKI_PREFIX[..])
            .and_then(|k| <[u8; 32]>::try_from(k).ok())
            .ok_or_else(|| invalid("is a public key but not an Ed25519 one"));
    }
    let raw = decode_text(text)
        .ok_or_else(|| invalid("is not PEM, and not 32 bytes in hex or base64"))?;
    <[u8; 32]>::try_from(raw.as_slice()).map_err(|_| {
        invalid(format!(
            "holds {} bytes; an Ed25519 public key is 32",
            raw.len()
        ))
    })
}

/// A signature from a file: 64 raw bytes, or them in base64 or hex.
pub fn parse_signature(bytes: &[u8]) -> Result<[u8; 64], Invalid> {
    if bytes.len() == 64 {
        return Ok(bytes.try_into().unwrap_or([0; 64]));
    }
    let raw = std::str::from_utf8(bytes)
        .ok()
        .and_then(|t| decode_text(t.trim()))
        .ok_or_else(|| invalid("is not 64 raw bytes, nor base64 or hex of them"))?;
    <[u8; 64]>::try_from(raw.as_slice()).map_err(|_| {
        invalid(format!(
            "holds {} bytes; an Ed25519 signature is 64",
            raw.len()
        ))
    })
}

fn decode_text(text: &str) -> Option<Vec<u8>> {
    if !text.is_empty()
        && text.len().is_multiple_of(2)
        && text.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return hex::decode(text).ok();
    }
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

/// Base64 (standard, padded), as signatures travel in offers.
pub fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A model name: 1-64 printable ASCII characters, no `/`.
pub fn validate_model(model: &str) -> Result<(), Invalid> {
    let ok = !model.is_empty()
        && model.len() <= 64
        && model
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b) && b != b'/')
        && model.trim() == model;
    ok.then_some(()).ok_or_else(|| {
        invalid(format!(
            "model {model:?}: 1 to 64 printable ASCII characters without '/' or surrounding spaces"
        ))
    })
}

/// A firmware version: 1-32 of `A-Z a-z 0-9 . - + _`.
pub fn validate_version(version: &str) -> Result<(), Invalid> {
    let ok = !version.is_empty()
        && version.len() <= 32
        && version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b));
    ok.then_some(()).ok_or_else(|| {
        invalid(format!(
            "version {version:?}: 1 to 32 of A-Z, a-z, 0-9, '.', '-', '+', '_'"
        ))
    })
}

/// Version order (see `hubd/OTA.md`): segments split at `.`, `-`, `+`;
/// numbers compare as numbers, other segments as strings; a prefix is older.
pub fn version_cmp(a: &str, b: &str) -> Ordering {
    let split = |s: &str| -> Vec<String> {
        s.split(['.', '-', '+'])
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let (a, b) = (split(a), split(b));
    for (x, y) in a.iter().zip(b.iter()) {
        let ord = match (x.parse::<u64>(), y.parse::<u64>()) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            _ => x.cmp(y),
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    a.len().cmp(&b.len())
}

/// A support end date, `YYYY-MM-DD`, between 2000 and 2199.
pub fn parse_date(text: &str) -> Result<Date, Invalid> {
    let bad = || {
        invalid(format!(
            "date {text:?}: expected YYYY-MM-DD, such as 2030-12-31"
        ))
    };
    if text.len() != 10 {
        return Err(bad());
    }
    let date: Date = text.parse().map_err(|_| bad())?;
    if !(2000..2200).contains(&date.year()) {
        return Err(invalid(format!(
            "date {text:?}: the year must be between 2000 and 2199"
        )));
    }
    Ok(date)
}

/// Where a device stands with its maker's support.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SupportStatus {
    /// Supported for longer than the warning period.
    Ok,
    /// Ends within `[lifecycle] support_warning_days`.
    EndsSoon,
    /// The end date has passed: no more security updates.
    Ended,
    /// Neither the device nor the owner has said.
    Unknown,
}

impl SupportStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SupportStatus::Ok => "ok",
            SupportStatus::EndsSoon => "ends soon",
            SupportStatus::Ended => "ended",
            SupportStatus::Unknown => "unknown",
        }
    }
}

/// The support end that counts: the owner's over the device's.
pub fn support_end(l: &Lifecycle) -> Option<(Date, &'static str)> {
    let owner = l
        .support_end_owner
        .as_deref()
        .and_then(|d| parse_date(d).ok());
    let device = l
        .support_end_reported
        .as_deref()
        .and_then(|d| parse_date(d).ok());
    owner
        .map(|d| (d, "owner"))
        .or_else(|| device.map(|d| (d, "device")))
}

/// Support covers its end date; it has ended the day after.
pub fn support_status(end: Option<Date>, today: Date, warning_days: u32) -> SupportStatus {
    let Some(end) = end else {
        return SupportStatus::Unknown;
    };
    if today > end {
        return SupportStatus::Ended;
    }
    let days_left = (end - today).get_days();
    if i64::from(days_left) <= i64::from(warning_days) {
        SupportStatus::EndsSoon
    } else {
        SupportStatus::Ok
    }
}

/// The lifecycle fields of a device's `d/<id>/meta`, each kept only if it
/// is well formed (`problems` says what was not).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetaReport {
    pub kind: Option<String>,
    pub model: Option<String>,
    pub vendor: Option<String>,
    pub firmware: Option<String>,
    pub firmware_sha256: Option<String>,
    pub support_end: Option<String>,
    pub problems: Vec<String>,
}

/// Reads a meta payload. Not JSON, or not an object, is `None`.
pub fn parse_meta(payload: &[u8]) -> Option<MetaReport> {
    let value: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let obj = value.as_object()?;
    let mut report = MetaReport::default();
    let mut field = |name: &str, check: &dyn Fn(&str) -> Result<(), Invalid>| -> Option<String> {
        let v = obj.get(name)?;
        let Some(s) = v.as_str() else {
            report.problems.push(format!("{name} is not a string"));
            return None;
        };
        match check(s) {
            Ok(()) => Some(s.to_owned()),
            Err(e) => {
                report.problems.push(format!("{name}: {e}"));
                None
            }
        }
    };
    let kind = field("kind", &|k| {
        let ok = !k.is_empty()
            && k.len() <= 32
            && k.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        ok.then_some(())
            .ok_or_else(|| invalid("1 to 32 of a-z, 0-9, '-', '_'"))
    });
    let model = field("model", &validate_model);
    let vendor = field("vendor", &|v| {
        let ok = !v.is_empty() && v.chars().count() <= 64 && !v.chars().any(char::is_control);
        ok.then_some(())
            .ok_or_else(|| invalid("1 to 64 printable characters"))
    });
    let firmware = field("firmware", &validate_version);
    let sha = field("firmware_sha256", &|h| {
        let ok = h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        ok.then_some(())
            .ok_or_else(|| invalid("64 lowercase hex digits"))
    });
    let support = field("support_end", &|d| parse_date(d).map(|_| ()));
    report.kind = kind;
    report.model = model;
    report.vendor = vendor;
    report.firmware = firmware;
    report.firmware_sha256 = sha;
    report.support_end = support;
    Some(report)
}

/// A firmware integrity failure (principle 7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Integrity {
    /// The catalogue knows the model, but not this version with this hash.
    NotRecognised {
        version: String,
        seen: String,
        /// The catalogue's hash for this version, if it has the version.
        expected: Option<String>,
    },
    /// The hash changed, and no update the hub offered has this hash.
    ChangedWithoutUpdate { before: String, seen: String },
}

impl Integrity {
    /// The isolation reason and the event's headline.
    pub fn reason(&self) -> &'static str {
        match self {
            Integrity::NotRecognised { .. } => "firmware not recognised",
            Integrity::ChangedWithoutUpdate { .. } => {
                "firmware changed without an update the hub offered"
            }
        }
    }
}

/// Judges a report against what the hub knew of the device before and the
/// catalogue. `None` when the firmware is recognised, or cannot be judged
/// (no hash reported; a model the catalogue does not know, and no change).
pub fn check_integrity(
    report: &MetaReport,
    before: &Lifecycle,
    catalogue: &[FirmwareRecord],
) -> Option<Integrity> {
    let seen = report.firmware_sha256.as_ref()?;
    let model = report.model.as_ref().or(before.model.as_ref());
    let version = report.firmware.as_ref().or(before.firmware.as_ref());
    if let Some(model) = model {
        let known: Vec<&FirmwareRecord> = catalogue.iter().filter(|f| &f.model == model).collect();
        if !known.is_empty() {
            let entry = version.and_then(|v| known.iter().find(|f| &f.version == v));
            if entry.is_none_or(|e| &e.sha256 != seen) {
                return Some(Integrity::NotRecognised {
                    version: version.cloned().unwrap_or_default(),
                    seen: seen.clone(),
                    expected: entry.map(|e| e.sha256.clone()),
                });
            }
        }
    }
    let before_sha = before.firmware_sha256.as_ref()?;
    if before_sha == seen {
        return None;
    }
    let offered = before
        .update
        .as_ref()
        .is_some_and(|u| &u.sha256 == seen && u.state != UpdateState::Failed);
    (!offered).then(|| Integrity::ChangedWithoutUpdate {
        before: before_sha.clone(),
        seen: seen.clone(),
    })
}

#[cfg(test)]
mod tests;
