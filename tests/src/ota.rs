//! The device half of signed firmware updates (protocol `hubd-ota/1`, as
//! hubd/OTA.md documents it for device makers).
//!
//! [`VendorKey`] is a maker's Ed25519 signing key, with the PEM encodings
//! openssl uses (PKCS#8 for the private key, SPKI for the public one);
//! [`signed_message`], [`sign`](VendorKey::sign) and [`verify`] are the
//! signature OTA.md defines, and [`version_cmp`] its version order.
//!
//! [`OtaDevice`] is what a device does with an offer, as a pure state
//! machine: it is fed the messages the device receives on `d/<id>/ota/...`
//! (and a timer's expiry) and answers with [`Step`]s, the messages to publish
//! and the image to install. It does no I/O, so every path is unit-tested;
//! [`crate::sim`] wires it into the simulated fleet.

use std::cmp::Ordering;
use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

use crate::sim::SimRng;

/// The first line of every signed message (without its `\n`).
pub const SIGNED_PREFIX: &str = "hubd-firmware-v1";

/// The largest image an offer may announce: 64 MiB.
pub const MAX_IMAGE_SIZE: u64 = 64 * 1024 * 1024;

/// The largest `chunk_size` an offer may ask for: 1 MiB.
pub const MAX_CHUNK_SIZE: u64 = 1024 * 1024;

/// How long a device waits for the answer to a chunk request before it
/// asks again.
pub const RETRY_AFTER: Duration = Duration::from_secs(10);

/// How many times a device asks for one chunk before it gives up.
pub const MAX_TRIES: u32 = 3;

/// How many answered offer ids a device remembers (to ignore an offer it
/// has already answered, such as the retained copy delivered again on every
/// reconnect). The oldest is forgotten first.
pub const ANSWERED_MEMORY: usize = 32;

/// The message a maker signs for an image: four lines, each ending in `\n`:
/// [`SIGNED_PREFIX`], the model, the version and the image's SHA-256 in
/// lowercase hex.
pub fn signed_message(model: &str, version: &str, sha256_hex: &str) -> Vec<u8> {
    format!("{SIGNED_PREFIX}\n{model}\n{version}\n{sha256_hex}\n").into_bytes()
}

/// Does `sig` sign [`signed_message`]`(model, version, sha256_hex)` with the
/// Ed25519 key `public`?
pub fn verify(public: &[u8; 32], model: &str, version: &str, sha256_hex: &str, sig: &[u8]) -> bool {
    UnparsedPublicKey::new(&ED25519, public)
        .verify(&signed_message(model, version, sha256_hex), sig)
        .is_ok()
}

/// OTA.md's version order: segment by segment, split at `.`, `-` and `+`;
/// two numeric segments compare as numbers (of any length), otherwise as
/// strings (bytewise); a version that is a prefix of another is older
/// (`1.1` < `1.1.1`). So `1.10.0` > `1.9.3`, and, taken literally,
/// `2.0-rc1` > `2.0` (a prefix) and `2.0-rc10` < `2.0-rc9` (strings).
pub fn version_cmp(a: &str, b: &str) -> Ordering {
    let split = |v: &str| {
        v.split(['.', '-', '+'])
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let (a, b) = (split(a), split(b));
    for (x, y) in a.iter().zip(&b) {
        let order = match (numeric(x), numeric(y)) {
            (Some(x), Some(y)) => x.len().cmp(&y.len()).then_with(|| x.cmp(y)),
            _ => x.cmp(y),
        };
        if order != Ordering::Equal {
            return order;
        }
    }
    a.len().cmp(&b.len())
}

/// A segment of ASCII digits without its leading zeros (so length, then
/// bytes, is numeric order); `None` if it is not numeric.
fn numeric(segment: &str) -> Option<&str> {
    if segment.is_empty() || !segment.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(segment.trim_start_matches('0'))
}

/// A `firmware` version as OTA.md allows it: 1-32 of `A-Z a-z 0-9 . - + _`.
pub fn valid_version(v: &str) -> bool {
    (1..=32).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+' | b'_'))
}

/// A `model` as OTA.md allows it: 1-64 printable ASCII characters, no `/`.
pub fn valid_model(m: &str) -> bool {
    (1..=64).contains(&m.len()) && m.bytes().all(|b| (b' '..=b'~').contains(&b) && b != b'/')
}

/// An offer id as OTA.md allows it: 16 to 64 characters of `0-9 a-f`.
pub fn valid_offer_id(id: &str) -> bool {
    (16..=64).contains(&id.len()) && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A SHA-256 as OTA.md writes it: 64 lowercase hex digits.
pub fn valid_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// SHA-256 of `data` as 64 lowercase hex digits.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&sha256(data))
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 (RFC 4648 section 4), with `=` padding.
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let byte = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let n = (byte(0) << 16) | (byte(1) << 8) | byte(2);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(BASE64[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard, padded base64 strictly: no whitespace, padding only at
/// the end, and the bits past the data zero (one encoding per byte string).
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    let quads = bytes.len() / 4;
    let mut out = Vec::with_capacity(quads * 3);
    for (i, quad) in bytes.chunks(4).enumerate() {
        let pad = quad.iter().rev().take_while(|c| **c == b'=').count();
        if pad > 2 || (pad > 0 && i + 1 != quads) {
            return None;
        }
        let mut n = 0u32;
        for c in &quad[..4 - pad] {
            n = (n << 6) | value(*c)?;
        }
        n <<= 6 * pad;
        if n & ((1u32 << (8 * pad)) - 1) != 0 {
            return None;
        }
        out.extend_from_slice(&n.to_be_bytes()[1..4 - pad]);
    }
    Some(out)
}

/// SPKI DER of an Ed25519 public key, up to the 32 key bytes.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// PKCS#8 v1 DER of an Ed25519 private key, up to the 32 seed bytes (what
/// `openssl genpkey -algorithm ed25519` writes).
const PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// The Ed25519 algorithm OID's DER (1.3.101.112), to tell "another key
/// type" from "a damaged key".
const ED25519_OID: [u8; 5] = [0x06, 0x03, 0x2b, 0x65, 0x70];

/// Why a key could not be made or read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError(pub String);

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KeyError {}

/// Wraps `der` as PEM with `label`, base64 in lines of 64 characters.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    let body = base64_encode(der);
    let mut pem = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        // Base64 is ASCII, so every 64-byte cut is on a character boundary.
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    pem
}

/// The first PEM block in `text`: its label and DER. Text around the block
/// (openssl's "explanatory text") is skipped.
pub fn pem_decode(text: &str) -> Result<(String, Vec<u8>), KeyError> {
    let mut lines = text.lines().map(str::trim);
    let label = lines
        .by_ref()
        .find_map(|l| l.strip_prefix("-----BEGIN ")?.strip_suffix("-----"))
        .ok_or_else(|| KeyError("not a PEM file (no -----BEGIN ...----- line)".to_owned()))?
        .to_owned();
    let end = format!("-----END {label}-----");
    let mut body = String::new();
    let mut ended = false;
    for line in lines {
        if line == end {
            ended = true;
            break;
        }
        body.push_str(line);
    }
    if !ended {
        return Err(KeyError(format!("a PEM {label} without its {end} line")));
    }
    let der = base64_decode(&body)
        .ok_or_else(|| KeyError(format!("the PEM {label} is not valid base64")))?;
    Ok((label, der))
}

/// The Ed25519 public key in an SPKI PEM (`-----BEGIN PUBLIC KEY-----`, as
/// [`VendorKey::public_pem`] and `openssl pkey -pubout` write it).
pub fn public_from_pem(pem: &str) -> Result<[u8; 32], KeyError> {
    let (label, der) = pem_decode(pem)?;
    if label != "PUBLIC KEY" {
        return Err(KeyError(format!(
            "wrong key type: a PEM {label}, expected a PUBLIC KEY (Ed25519 SPKI)"
        )));
    }
    match der.strip_prefix(&SPKI_PREFIX[..]) {
        Some(key) => key
            .try_into()
            .map_err(|_| KeyError("an Ed25519 public key that is not 32 bytes".to_owned())),
        None if der.windows(ED25519_OID.len()).any(|w| w == ED25519_OID) => Err(KeyError(
            "a damaged Ed25519 public key (unexpected SPKI encoding)".to_owned(),
        )),
        None => Err(KeyError(
            "wrong key type: the public key is not Ed25519".to_owned(),
        )),
    }
}

/// The seed a maker for the simulated devices signs with: a fixed, public
/// TEST key (the ASCII bytes `hubsim-simulated-maker-TEST-KEY!`), so runs and
/// machines agree on it. It protects nothing: never trust it for a real
/// device.
pub const HUBSIM_SEED: [u8; 32] = *b"hubsim-simulated-maker-TEST-KEY!";

/// A device maker's Ed25519 firmware signing key.
pub struct VendorKey {
    seed: [u8; 32],
    pair: Ed25519KeyPair,
}

/// Shows the public key only: the seed is the secret.
impl fmt::Debug for VendorKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VendorKey")
            .field("public", &hex(&self.public_key()))
            .finish_non_exhaustive()
    }
}

impl VendorKey {
    /// The key whose private seed is `seed`.
    pub fn from_seed(seed: [u8; 32]) -> VendorKey {
        // ring rejects a seed only if it is not 32 bytes long.
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed)
            .unwrap_or_else(|_| unreachable!("a 32-byte Ed25519 seed is always valid"));
        VendorKey { seed, pair }
    }

    /// A new key from the operating system's random generator.
    pub fn generate() -> Result<VendorKey, KeyError> {
        let seed: [u8; 32] = ring::rand::generate(&ring::rand::SystemRandom::new())
            .map_err(|_| KeyError("the system random generator failed".to_owned()))?
            .expose();
        Ok(VendorKey::from_seed(seed))
    }

    /// The simulated maker's key ([`HUBSIM_SEED`]): what every simulated
    /// device trusts by default. A published test key.
    pub fn hubsim() -> VendorKey {
        VendorKey::from_seed(HUBSIM_SEED)
    }

    /// The 32-byte Ed25519 public key.
    pub fn public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.pair.public_key().as_ref());
        out
    }

    /// The public key as an SPKI PEM (`-----BEGIN PUBLIC KEY-----`), as
    /// `openssl pkey -pubout` writes it.
    pub fn public_pem(&self) -> String {
        let mut der = SPKI_PREFIX.to_vec();
        der.extend_from_slice(&self.public_key());
        pem_encode("PUBLIC KEY", &der)
    }

    /// The private key as a PKCS#8 v1 PEM (`-----BEGIN PRIVATE KEY-----`), as
    /// `openssl genpkey -algorithm ed25519` writes it. A secret.
    pub fn seed_pem(&self) -> String {
        let mut der = PKCS8_PREFIX.to_vec();
        der.extend_from_slice(&self.seed);
        pem_encode("PRIVATE KEY", &der)
    }

    /// Reads what [`seed_pem`](Self::seed_pem) or `openssl genpkey
    /// -algorithm ed25519` wrote.
    pub fn from_seed_pem(pem: &str) -> Result<VendorKey, KeyError> {
        let (label, der) = pem_decode(pem)?;
        if label != "PRIVATE KEY" {
            return Err(KeyError(format!(
                "wrong key type: a PEM {label}, expected a PRIVATE KEY (Ed25519 PKCS#8)"
            )));
        }
        match der.strip_prefix(&PKCS8_PREFIX[..]) {
            Some(seed) => seed
                .try_into()
                .map(VendorKey::from_seed)
                .map_err(|_| KeyError("an Ed25519 private key that is not 32 bytes".to_owned())),
            None if der.windows(ED25519_OID.len()).any(|w| w == ED25519_OID) => Err(KeyError(
                "an Ed25519 private key in an unsupported encoding (expected PKCS#8 v1, \
                 as openssl genpkey -algorithm ed25519 writes)"
                    .to_owned(),
            )),
            None => Err(KeyError(
                "wrong key type: the private key is not Ed25519".to_owned(),
            )),
        }
    }

    /// Signs `image` for `model` at `version`: the signature over
    /// [`signed_message`] with the image's SHA-256.
    pub fn sign(&self, model: &str, version: &str, image: &[u8]) -> [u8; 64] {
        let message = signed_message(model, version, &sha256_hex(image));
        let mut out = [0u8; 64];
        out.copy_from_slice(self.pair.sign(&message).as_ref());
        out
    }
}

/// How long a simulated image is ([`simulated_image`]): several 16 KiB
/// chunks, the last one short.
pub const SIMULATED_IMAGE_SIZE: usize = 40_000;

/// A simulated firmware image for `model` at `version`: a text header
/// (`hubsim simulated firmware image`, the vendor, model and version, each on
/// its own line, then an empty line) followed by pseudo-random filler
/// seeded from the header's SHA-256, [`SIMULATED_IMAGE_SIZE`] bytes in all.
/// The same model and version always give the same bytes.
pub fn simulated_image(model: &str, version: &str) -> Vec<u8> {
    let mut image = format!(
        "hubsim simulated firmware image\nvendor: hubsim\nmodel: {model}\nversion: {version}\n\n"
    )
    .into_bytes();
    let digest = sha256(&image);
    let mut seed = [0u8; 8];
    seed.copy_from_slice(&digest[..8]);
    let mut rng = SimRng::seeded(u64::from_le_bytes(seed));
    while image.len() < SIMULATED_IMAGE_SIZE {
        let word = rng.next_u64().to_le_bytes();
        let room = SIMULATED_IMAGE_SIZE - image.len();
        image.extend_from_slice(&word[..room.min(8)]);
    }
    image
}

/// An offer as the hub publishes it on `d/<id>/ota/offer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// The opaque offer id (16 to 64 of `0-9 a-f`).
    pub id: String,
    pub model: String,
    pub version: String,
    /// The image's length in bytes, 1 to [`MAX_IMAGE_SIZE`].
    pub size: u64,
    /// The image's SHA-256, 64 lowercase hex digits.
    pub sha256: String,
    /// The maker's Ed25519 signature over [`signed_message`].
    pub signature: [u8; 64],
    /// The most bytes one chunk carries, 1 to [`MAX_CHUNK_SIZE`].
    pub chunk_size: u64,
}

/// Why an offer could not be read, and its id if that much could be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MalformedOffer {
    /// The offer id, if the payload holds a valid one.
    pub offer: Option<String>,
    /// What is wrong, for people.
    pub why: String,
}

impl fmt::Display for MalformedOffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed offer: {}", self.why)
    }
}

impl std::error::Error for MalformedOffer {}

impl Offer {
    /// An offer of `image` for `model` at `version`, signed with `key`: what
    /// a hub would publish (for tests that play the hub).
    pub fn signed(
        id: &str,
        key: &VendorKey,
        model: &str,
        version: &str,
        image: &[u8],
        chunk_size: u64,
    ) -> Offer {
        Offer {
            id: id.to_owned(),
            model: model.to_owned(),
            version: version.to_owned(),
            size: image.len() as u64,
            sha256: sha256_hex(image),
            signature: key.sign(model, version, image),
            chunk_size,
        }
    }

    /// The JSON the hub publishes.
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "offer": self.id,
            "model": self.model,
            "version": self.version,
            "size": self.size,
            "sha256": self.sha256,
            "signature": base64_encode(&self.signature),
            "chunk_size": self.chunk_size,
        })
        .to_string()
    }

    /// Reads an offer strictly: a JSON object whose `offer`, `model`,
    /// `version`, `sha256` and `signature` are strings and `size` and
    /// `chunk_size` whole numbers, each within OTA.md's syntax and this
    /// module's limits. Other fields are ignored (as in the meta, so a later
    /// protocol may add some).
    pub fn parse(payload: &[u8]) -> Result<Offer, MalformedOffer> {
        let bad = |offer: Option<&str>, why: String| MalformedOffer {
            offer: offer.map(str::to_owned),
            why,
        };
        let value: serde_json::Value =
            serde_json::from_slice(payload).map_err(|e| bad(None, format!("not JSON: {e}")))?;
        let Some(object) = value.as_object() else {
            return Err(bad(None, "not a JSON object".to_owned()));
        };
        let id = match object.get("offer").and_then(|v| v.as_str()) {
            Some(id) if valid_offer_id(id) => id,
            Some(_) => {
                return Err(bad(
                    None,
                    "\"offer\" is not 16 to 64 characters of 0-9 a-f".to_owned(),
                ));
            }
            None => return Err(bad(None, "no \"offer\" string".to_owned())),
        };
        let bad = |why: String| bad(Some(id), why);
        let string = |name: &str| {
            object
                .get(name)
                .and_then(|v| v.as_str())
                .ok_or_else(|| bad(format!("no {name:?} string")))
        };
        let number = |name: &str| {
            object
                .get(name)
                .and_then(|v| v.as_u64())
                .ok_or_else(|| bad(format!("no {name:?} whole number")))
        };
        let model = string("model")?;
        if !valid_model(model) {
            return Err(bad(
                "\"model\" is not 1-64 printable ASCII characters without /".to_owned(),
            ));
        }
        let version = string("version")?;
        if !valid_version(version) {
            return Err(bad(
                "\"version\" is not 1-32 of A-Z a-z 0-9 . - + _".to_owned()
            ));
        }
        let size = number("size")?;
        if size == 0 || size > MAX_IMAGE_SIZE {
            return Err(bad(format!(
                "\"size\" {size} is not 1 to {MAX_IMAGE_SIZE} bytes"
            )));
        }
        let sha256 = string("sha256")?;
        if !valid_sha256_hex(sha256) {
            return Err(bad("\"sha256\" is not 64 lowercase hex digits".to_owned()));
        }
        let signature = base64_decode(string("signature")?)
            .and_then(|sig| <[u8; 64]>::try_from(sig).ok())
            .ok_or_else(|| bad("\"signature\" is not the base64 of 64 bytes".to_owned()))?;
        let chunk_size = number("chunk_size")?;
        if chunk_size == 0 || chunk_size > MAX_CHUNK_SIZE {
            return Err(bad(format!(
                "\"chunk_size\" {chunk_size} is not 1 to {MAX_CHUNK_SIZE} bytes"
            )));
        }
        Ok(Offer {
            id: id.to_owned(),
            model: model.to_owned(),
            version: version.to_owned(),
            size,
            sha256: sha256.to_owned(),
            signature,
            chunk_size,
        })
    }
}

/// Why a device did not install an offer: OTA.md's `error` codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OtaError {
    /// Not this device's model.
    Model,
    /// Not newer than the running firmware.
    Rollback,
    /// The image is not `size` bytes.
    Size,
    /// The image does not match `sha256`.
    Hash,
    /// The signature does not verify with the maker's key.
    Signature,
    /// The hub stopped answering (or refused a chunk request).
    Download,
    /// The device could not apply it.
    Install,
}

impl OtaError {
    /// The code in the report's `error` field.
    pub fn as_str(self) -> &'static str {
        match self {
            OtaError::Model => "model",
            OtaError::Rollback => "rollback",
            OtaError::Size => "size",
            OtaError::Hash => "hash",
            OtaError::Signature => "signature",
            OtaError::Download => "download",
            OtaError::Install => "install",
        }
    }
}

impl fmt::Display for OtaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an offer ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Verified and installed: the device now runs `version`.
    Installed { version: String, sha256: String },
    /// Refused or failed, with OTA.md's code and a message for people.
    Refused { error: OtaError, message: String },
}

/// What the device does next. Every publish is at QoS 1, not retained, on a
/// topic under the device's own `d/<id>/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Ask for the chunk at `offset`: `{"offer","offset"}` on
    /// `d/<id>/update/get`.
    Request { offer: String, offset: u64 },
    /// Report how `offer` ended on `d/<id>/update/result` (once per offer).
    Report { offer: String, outcome: Outcome },
    /// The image verified and is now the running firmware. It comes just
    /// before its successful [`Step::Report`]; after both, the device
    /// publishes its new meta.
    Installed {
        version: String,
        sha256: String,
        image: Vec<u8>,
    },
}

/// Where [`Step::Request`] is published, under `d/<id>/`.
pub const GET_TOPIC: &str = "update/get";
/// Where [`Step::Report`] is published, under `d/<id>/`.
pub const RESULT_TOPIC: &str = "update/result";

impl Step {
    /// The topic under `d/<id>/` and the payload, for the steps that publish
    /// (at QoS 1, not retained); `None` for [`Step::Installed`].
    pub fn publish(&self) -> Option<(&'static str, String)> {
        match self {
            Step::Request { offer, offset } => Some((
                GET_TOPIC,
                serde_json::json!({"offer": offer, "offset": offset}).to_string(),
            )),
            Step::Report { offer, outcome } => {
                let payload = match outcome {
                    Outcome::Installed { version, sha256 } => serde_json::json!({
                        "offer": offer, "ok": true, "version": version, "sha256": sha256,
                    }),
                    Outcome::Refused { error, message } => serde_json::json!({
                        "offer": offer, "ok": false, "error": error.as_str(), "message": message,
                    }),
                };
                Some((RESULT_TOPIC, payload.to_string()))
            }
            Step::Installed { .. } => None,
        }
    }
}

/// An offer being fetched.
struct Download {
    offer: Offer,
    /// The bytes received so far; the next offset is its length.
    image: Vec<u8>,
    /// How many times the current chunk has been asked for.
    tries: u32,
}

impl Download {
    fn next_offset(&self) -> u64 {
        self.image.len() as u64
    }

    fn request(&self) -> Step {
        Step::Request {
            offer: self.offer.id.clone(),
            offset: self.next_offset(),
        }
    }
}

/// A device's side of `hubd-ota/1`, without I/O: feed it what arrives on
/// `d/<id>/ota/...` (and [`on_timeout`](Self::on_timeout) when a request
/// went [`RETRY_AFTER`] without an answer), carry out the [`Step`]s it
/// returns in order.
///
/// It fetches one offer at a time; a new offer replaces the one being
/// fetched (the hub replaced it), and an empty payload on the offer topic
/// (the hub withdrew it) abandons it, both without a report. Every offer it
/// answers gets exactly one report, and an offer it has answered is ignored
/// when it arrives again (the retained copy, on every reconnect).
pub struct OtaDevice {
    model: String,
    version: String,
    sha256: String,
    maker_key: [u8; 32],
    /// A fault for tests: flip one byte of every assembled image before it
    /// is verified, as tampering in transit or storage would.
    pub corrupt_download: bool,
    download: Option<Download>,
    /// The latest [`ANSWERED_MEMORY`] offers reported on, oldest first.
    answered: VecDeque<String>,
}

impl fmt::Debug for OtaDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OtaDevice")
            .field("model", &self.model)
            .field("version", &self.version)
            .field("sha256", &self.sha256)
            .field(
                "download",
                &self
                    .download
                    .as_ref()
                    .map(|d| (&d.offer.id, d.next_offset(), d.offer.size)),
            )
            .finish_non_exhaustive()
    }
}

impl OtaDevice {
    /// A device of `model` running `version` (an image whose SHA-256 is
    /// `sha256`, lowercase hex), trusting images its maker signed with
    /// `maker_key`.
    pub fn new(model: &str, version: &str, sha256: &str, maker_key: [u8; 32]) -> OtaDevice {
        OtaDevice {
            model: model.to_owned(),
            version: version.to_owned(),
            sha256: sha256.to_owned(),
            maker_key,
            corrupt_download: false,
            download: None,
            answered: VecDeque::new(),
        }
    }

    /// The device's model.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The running firmware version.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The running image's SHA-256, lowercase hex.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Whether a chunk request is outstanding: the caller should call
    /// [`on_timeout`](Self::on_timeout) if [`RETRY_AFTER`] passes after the
    /// latest [`Step::Request`] without another step.
    pub fn waiting(&self) -> bool {
        self.download.is_some()
    }

    /// The offer being fetched, and how many of its bytes have arrived.
    pub fn downloading(&self) -> Option<(&Offer, u64)> {
        self.download.as_ref().map(|d| (&d.offer, d.next_offset()))
    }

    fn answered(&self, id: &str) -> bool {
        self.answered.iter().any(|a| a == id)
    }

    /// Reports on `offer` (and forgets its download, if it was the current
    /// one): the one report it gets.
    fn report(&mut self, offer: &str, outcome: Outcome) -> Step {
        if self.download.as_ref().is_some_and(|d| d.offer.id == offer) {
            self.download = None;
        }
        if self.answered.len() >= ANSWERED_MEMORY {
            self.answered.pop_front();
        }
        self.answered.push_back(offer.to_owned());
        Step::Report {
            offer: offer.to_owned(),
            outcome,
        }
    }

    fn refuse(&mut self, offer: &str, error: OtaError, message: String) -> Step {
        tracing::debug!(offer, %error, message, "refusing the firmware offer");
        self.report(offer, Outcome::Refused { error, message })
    }

    /// A message on `d/<id>/ota/offer`.
    pub fn on_offer(&mut self, payload: &[u8]) -> Vec<Step> {
        if payload.is_empty() {
            if let Some(d) = self.download.take() {
                tracing::debug!(offer = d.offer.id, "offer withdrawn: download abandoned");
            }
            return Vec::new();
        }
        let offer = match Offer::parse(payload) {
            Ok(offer) => offer,
            Err(MalformedOffer { offer: None, why }) => {
                tracing::debug!(why, "ignoring an offer without a valid offer id");
                return Vec::new();
            }
            Err(MalformedOffer {
                offer: Some(id),
                why,
            }) => {
                if self.answered(&id) {
                    return Vec::new();
                }
                return vec![self.refuse(
                    &id,
                    OtaError::Download,
                    format!("malformed offer: {why}"),
                )];
            }
        };
        if self.answered(&offer.id) {
            return Vec::new();
        }
        if let Some(d) = &self.download {
            if d.offer.id == offer.id {
                // The same offer again while fetching it: carry on.
                return Vec::new();
            }
            tracing::debug!(
                old = d.offer.id,
                new = offer.id,
                "a new offer replaces the one being fetched"
            );
            self.download = None;
        }
        if offer.model != self.model {
            let message = format!(
                "the image is for model {:?}; this device is a {:?}",
                offer.model, self.model
            );
            return vec![self.refuse(&offer.id, OtaError::Model, message)];
        }
        if version_cmp(&offer.version, &self.version) != Ordering::Greater {
            let message = format!(
                "version {} is not newer than the running {}",
                offer.version, self.version
            );
            return vec![self.refuse(&offer.id, OtaError::Rollback, message)];
        }
        let download = Download {
            offer,
            image: Vec::new(),
            tries: 1,
        };
        let step = download.request();
        self.download = Some(download);
        vec![step]
    }

    /// A message on `d/<id>/ota/chunk/<offset>`. A chunk for another offset
    /// than the one asked for (a late answer to an earlier request) is
    /// ignored.
    pub fn on_chunk(&mut self, offset: u64, bytes: &[u8]) -> Vec<Step> {
        let Some(d) = &mut self.download else {
            return Vec::new();
        };
        if offset != d.next_offset() {
            tracing::debug!(
                offer = d.offer.id,
                offset,
                expected = d.next_offset(),
                "ignoring a chunk that was not asked for"
            );
            return Vec::new();
        }
        let (id, size, chunk_size) = (d.offer.id.clone(), d.offer.size, d.offer.chunk_size);
        let len = bytes.len() as u64;
        if len == 0 {
            let message = format!("the image ended after {offset} bytes; the offer says {size}");
            return vec![self.refuse(&id, OtaError::Size, message)];
        }
        if len > chunk_size {
            let message =
                format!("the chunk at {offset} is {len} bytes, more than chunk_size {chunk_size}");
            return vec![self.refuse(&id, OtaError::Download, message)];
        }
        if offset + len > size {
            let message = format!(
                "the image is longer than the offer's {size} bytes ({len} bytes at {offset})"
            );
            return vec![self.refuse(&id, OtaError::Size, message)];
        }
        d.image.extend_from_slice(bytes);
        d.tries = 1;
        if d.next_offset() < size {
            return vec![d.request()];
        }
        self.finish()
    }

    /// Verifies the complete image and installs it.
    fn finish(&mut self) -> Vec<Step> {
        let Some(Download {
            offer, mut image, ..
        }) = self.download.take()
        else {
            return Vec::new();
        };
        if self.corrupt_download {
            let middle = image.len() / 2;
            if let Some(byte) = image.get_mut(middle) {
                *byte ^= 0x01;
            }
        }
        if image.len() as u64 != offer.size {
            let message = format!(
                "the image is {} bytes; the offer says {}",
                image.len(),
                offer.size
            );
            return vec![self.refuse(&offer.id, OtaError::Size, message)];
        }
        let sha256 = sha256_hex(&image);
        if sha256 != offer.sha256 {
            let message = format!(
                "the image's SHA-256 is {sha256}; the offer says {}",
                offer.sha256
            );
            return vec![self.refuse(&offer.id, OtaError::Hash, message)];
        }
        if !verify(
            &self.maker_key,
            &self.model,
            &offer.version,
            &sha256,
            &offer.signature,
        ) {
            let message = format!(
                "the signature of {} {} does not verify with the maker's key",
                self.model, offer.version
            );
            return vec![self.refuse(&offer.id, OtaError::Signature, message)];
        }
        tracing::debug!(
            offer = offer.id,
            from = self.version,
            to = offer.version,
            "firmware installed"
        );
        self.version = offer.version.clone();
        self.sha256 = sha256.clone();
        let report = self.report(
            &offer.id,
            Outcome::Installed {
                version: offer.version.clone(),
                sha256: sha256.clone(),
            },
        );
        vec![
            Step::Installed {
                version: offer.version,
                sha256,
                image,
            },
            report,
        ]
    }

    /// A message on `d/<id>/ota/error`: the hub will not answer the current
    /// request (an offset past the size, or an offer that is no longer
    /// current), so the download fails. An error about another offer is
    /// ignored.
    pub fn on_error(&mut self, payload: &[u8]) -> Vec<Step> {
        let value: serde_json::Value = match serde_json::from_slice(payload) {
            Ok(value) => value,
            Err(e) => {
                tracing::debug!(error = %e, "ignoring an OTA error that is not JSON");
                return Vec::new();
            }
        };
        let Some(d) = &self.download else {
            return Vec::new();
        };
        if value.get("offer").and_then(|v| v.as_str()) != Some(d.offer.id.as_str()) {
            return Vec::new();
        }
        let why = value
            .get("error")
            .and_then(|v| v.as_str())
            .unwrap_or("(no reason given)");
        let (id, offset) = (d.offer.id.clone(), d.next_offset());
        let message = format!("the hub refused the chunk at {offset}: {why}");
        vec![self.refuse(&id, OtaError::Download, message)]
    }

    /// [`RETRY_AFTER`] passed since the latest request without an answer:
    /// asks again, or after [`MAX_TRIES`] gives up with `download`.
    pub fn on_timeout(&mut self) -> Vec<Step> {
        let Some(d) = &mut self.download else {
            return Vec::new();
        };
        if d.tries < MAX_TRIES {
            d.tries += 1;
            return vec![d.request()];
        }
        let (id, offset) = (d.offer.id.clone(), d.next_offset());
        let message = format!("no answer for the chunk at {offset} after {MAX_TRIES} tries");
        vec![self.refuse(&id, OtaError::Download, message)]
    }

    /// A new session began: an unanswered request may have been lost with
    /// the old one, so the current chunk is asked for again at once (a fresh
    /// start of its tries).
    pub fn on_reconnect(&mut self) -> Vec<Step> {
        match &mut self.download {
            Some(d) => {
                d.tries = 1;
                vec![d.request()]
            }
            None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODEL: &str = "HS-SW10";
    const ID: &str = "0123456789abcdef";
    const CHUNK: u64 = 16384;

    fn device(version: &str) -> OtaDevice {
        let image = simulated_image(MODEL, version);
        OtaDevice::new(
            MODEL,
            version,
            &sha256_hex(&image),
            VendorKey::hubsim().public_key(),
        )
    }

    fn offer(id: &str, key: &VendorKey, model: &str, version: &str) -> (Offer, Vec<u8>) {
        let image = simulated_image(model, version);
        (Offer::signed(id, key, model, version, &image, CHUNK), image)
    }

    /// Plays the hub: answers every request with its chunk until the device
    /// reports; returns the offsets asked for and the final steps.
    fn fetch(device: &mut OtaDevice, offer: &Offer, image: &[u8]) -> (Vec<u64>, Vec<Step>) {
        let mut steps = device.on_offer(offer.to_json().as_bytes());
        let mut asked = Vec::new();
        while let [Step::Request { offer: id, offset }] = steps.as_slice() {
            assert_eq!(id, &offer.id);
            asked.push(*offset);
            let start = usize::try_from(*offset).unwrap();
            let end = (start + usize::try_from(offer.chunk_size).unwrap()).min(image.len());
            steps = device.on_chunk(*offset, &image[start..end]);
        }
        (asked, steps)
    }

    fn refusal(steps: &[Step]) -> (OtaError, String) {
        match steps {
            [
                Step::Report {
                    outcome: Outcome::Refused { error, message },
                    ..
                },
            ] => (*error, message.clone()),
            other => panic!("expected one refusal, got {other:?}"),
        }
    }

    fn payload(step: &Step) -> serde_json::Value {
        serde_json::from_str(&step.publish().unwrap().1).unwrap()
    }

    #[test]
    fn versions_compare_segment_by_segment() {
        use Ordering::{Equal, Greater, Less};
        let table = [
            ("1.10.0", "1.9.3", Greater),
            ("1.9.3", "1.10.0", Less),
            ("1.1", "1.1.1", Less),
            ("1.1.1", "1.1", Greater),
            ("1.0", "1.0", Equal),
            ("1.1.0", "1.0.0", Greater),
            ("2.0", "1.99.99", Greater),
            ("1.01", "1.1", Equal),
            ("1.2-3", "1.2.3", Equal),
            // Literally OTA.md's rule, not semver: a prefix is older, and
            // non-numeric segments compare as strings.
            ("2.0-rc1", "2.0", Greater),
            ("2.0-rc1", "2.0-rc2", Less),
            ("2.0-rc10", "2.0-rc9", Less),
            ("2.0-rc1", "2.0.1", Greater),
            ("1.0+build5", "1.0", Greater),
            ("1.a", "1.B", Greater),
            // Numbers of any length, without overflow.
            ("1.123456789012345678901234567890", "1.99", Greater),
            ("0.0", "0", Greater),
        ];
        for (a, b, expected) in table {
            assert_eq!(version_cmp(a, b), expected, "{a} vs {b}");
            assert_eq!(version_cmp(b, a), expected.reverse(), "{b} vs {a}");
        }
    }

    #[test]
    fn base64_matches_the_rfc_vectors_and_decodes_strictly() {
        let vectors = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in vectors {
            assert_eq!(base64_encode(plain.as_bytes()), encoded);
            assert_eq!(base64_decode(encoded).unwrap(), plain.as_bytes());
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(base64_decode(&base64_encode(&all)).unwrap(), all);
        for bad in [
            "Zg", "Zg=", "Zg===", "Z===", "Zh==", "Zm9=", "Zg==Zg==", "Zm 9v", "Zm9v\n", "Zm-v",
        ] {
            assert_eq!(base64_decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_signed_message_is_four_lines() {
        let sha = "ab".repeat(32);
        assert_eq!(
            signed_message("HS-SW10", "1.1.0", &sha),
            format!("hubd-firmware-v1\nHS-SW10\n1.1.0\n{sha}\n").into_bytes()
        );
    }

    #[test]
    fn signatures_verify_only_for_the_signed_model_version_image_and_key() {
        let key = VendorKey::hubsim();
        let image = simulated_image(MODEL, "1.1.0");
        let sha = sha256_hex(&image);
        let sig = key.sign(MODEL, "1.1.0", &image);
        let public = key.public_key();
        assert!(verify(&public, MODEL, "1.1.0", &sha, &sig));
        assert!(!verify(&public, MODEL, "1.1.1", &sha, &sig));
        assert!(!verify(&public, "HS-TH20", "1.1.0", &sha, &sig));
        assert!(!verify(
            &public,
            MODEL,
            "1.1.0",
            &sha256_hex(b"other"),
            &sig
        ));
        assert!(!verify(&public, MODEL, "1.1.0", &sha, &sig[..63]));
        let other = VendorKey::generate().unwrap();
        assert_ne!(other.public_key(), public);
        assert!(!verify(&other.public_key(), MODEL, "1.1.0", &sha, &sig));
    }

    #[test]
    fn keys_round_trip_through_pem() {
        let hubsim = VendorKey::hubsim();
        assert_eq!(hubsim.public_key(), VendorKey::hubsim().public_key());
        let public_der = pem_decode(&hubsim.public_pem()).unwrap().1;
        assert_eq!(
            hex(&public_der),
            format!("302a300506032b6570032100{}", hex(&hubsim.public_key()))
        );
        let (label, private_der) = pem_decode(&hubsim.seed_pem()).unwrap();
        assert_eq!(label, "PRIVATE KEY");
        assert_eq!(
            hex(&private_der),
            format!("302e020100300506032b657004220420{}", hex(&HUBSIM_SEED))
        );

        let key = VendorKey::generate().unwrap();
        let again = VendorKey::from_seed_pem(&key.seed_pem()).unwrap();
        assert_eq!(again.public_key(), key.public_key());
        assert_eq!(
            public_from_pem(&key.public_pem()).unwrap(),
            key.public_key()
        );
        // Text around the block, and CRLF line ends, are fine.
        let wrapped = format!(
            "a key:\r\n{}trailer\n",
            key.seed_pem().replace('\n', "\r\n")
        );
        assert_eq!(
            VendorKey::from_seed_pem(&wrapped).unwrap().public_key(),
            key.public_key()
        );
        assert!(
            !format!("{key:?}").contains(&hex(&key.seed)),
            "Debug hides the seed"
        );
    }

    #[test]
    fn unusable_key_files_are_named_for_what_is_wrong() {
        let key = VendorKey::hubsim();
        let err = |r: Result<VendorKey, KeyError>| r.unwrap_err().to_string();
        assert!(err(VendorKey::from_seed_pem("hello")).contains("not a PEM"));
        assert!(err(VendorKey::from_seed_pem(&key.public_pem())).contains("wrong key type"));
        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        assert!(
            err(VendorKey::from_seed_pem(&ec.serialize_pem())).contains("not Ed25519"),
            "{}",
            err(VendorKey::from_seed_pem(&ec.serialize_pem()))
        );
        let truncated: String = key
            .seed_pem()
            .lines()
            .take(2)
            .collect::<Vec<_>>()
            .join("\n");
        assert!(err(VendorKey::from_seed_pem(&truncated)).contains("without its"));
        let garbled = key.seed_pem().replace('M', "*");
        assert!(err(VendorKey::from_seed_pem(&garbled)).contains("base64"));
        assert!(
            public_from_pem(&key.seed_pem())
                .unwrap_err()
                .to_string()
                .contains("wrong key type")
        );
        let mut der = PKCS8_PREFIX.to_vec();
        der.extend_from_slice(&[0; 31]);
        assert!(
            err(VendorKey::from_seed_pem(&pem_encode("PRIVATE KEY", &der))).contains("32 bytes")
        );
    }

    #[test]
    fn simulated_images_are_deterministic_and_span_several_chunks() {
        let image = simulated_image(MODEL, "1.1.0");
        assert_eq!(image.len(), SIMULATED_IMAGE_SIZE);
        assert_eq!(image, simulated_image(MODEL, "1.1.0"));
        assert_ne!(image, simulated_image(MODEL, "1.1.1"));
        let text = String::from_utf8_lossy(&image[..100]);
        assert!(text.contains("model: HS-SW10\nversion: 1.1.0\n"), "{text}");
        assert!(image.len() as u64 > 2 * CHUNK && !(image.len() as u64).is_multiple_of(CHUNK));
    }

    #[test]
    fn an_update_is_fetched_in_order_verified_installed_and_reported() {
        let mut dev = device("1.0.0");
        let (offer, image) = offer(ID, &VendorKey::hubsim(), MODEL, "1.1.0");
        let (asked, steps) = fetch(&mut dev, &offer, &image);
        assert_eq!(asked, [0, 16384, 32768], "the last chunk is short");
        let sha = sha256_hex(&image);
        assert_eq!(
            steps[0],
            Step::Installed {
                version: "1.1.0".into(),
                sha256: sha.clone(),
                image: image.clone(),
            }
        );
        assert_eq!(steps.len(), 2);
        assert_eq!(steps[0].publish(), None);
        assert_eq!(steps[1].publish().unwrap().0, "update/result");
        assert_eq!(
            payload(&steps[1]),
            serde_json::json!({"offer": ID, "ok": true, "version": "1.1.0", "sha256": sha})
        );
        assert_eq!((dev.version(), dev.sha256()), ("1.1.0", sha.as_str()));
        assert!(!dev.waiting());

        // The request itself is the documented JSON.
        let request = Step::Request {
            offer: ID.into(),
            offset: 16384,
        };
        assert_eq!(request.publish().unwrap().0, "update/get");
        assert_eq!(
            payload(&request),
            serde_json::json!({"offer": ID, "offset": 16384})
        );
    }

    #[test]
    fn a_tampered_download_is_refused_as_hash() {
        let mut dev = device("1.0.0");
        dev.corrupt_download = true;
        let (offer, image) = offer(ID, &VendorKey::hubsim(), MODEL, "1.1.0");
        let (asked, steps) = fetch(&mut dev, &offer, &image);
        assert_eq!(asked.len(), 3);
        let (error, message) = refusal(&steps);
        assert_eq!(error, OtaError::Hash, "{message}");
        assert_eq!(
            payload(&steps[0]),
            serde_json::json!({"offer": ID, "ok": false, "error": "hash", "message": message})
        );
        assert_eq!(dev.version(), "1.0.0");
    }

    #[test]
    fn an_image_signed_by_another_key_is_refused_as_signature() {
        let mut dev = device("1.0.0");
        let (offer, image) = offer(ID, &VendorKey::generate().unwrap(), MODEL, "1.1.0");
        let (asked, steps) = fetch(&mut dev, &offer, &image);
        assert_eq!(
            asked.len(),
            3,
            "the signature is checked after the download"
        );
        assert_eq!(refusal(&steps).0, OtaError::Signature);
        assert_eq!(dev.version(), "1.0.0");
    }

    #[test]
    fn older_and_equal_versions_are_refused_as_rollback_before_any_chunk() {
        for version in ["0.9.9", "1.0.0", "1.0", "0.10"] {
            let mut dev = device("1.0.0");
            let (offer, _) = offer(ID, &VendorKey::hubsim(), MODEL, version);
            let steps = dev.on_offer(offer.to_json().as_bytes());
            let (error, message) = refusal(&steps);
            assert_eq!(error, OtaError::Rollback, "{version}: {message}");
            assert!(!dev.waiting());
        }
        // 1.10.0 is newer than 1.9.3: fetched.
        let mut dev = device("1.9.3");
        let (offer, _) = offer(ID, &VendorKey::hubsim(), MODEL, "1.10.0");
        let steps = dev.on_offer(offer.to_json().as_bytes());
        assert!(matches!(
            steps.as_slice(),
            [Step::Request { offset: 0, .. }]
        ));
    }

    #[test]
    fn another_models_image_is_refused_as_model() {
        let mut dev = device("1.0.0");
        let (offer, _) = offer(ID, &VendorKey::hubsim(), "HS-TH20", "9.0.0");
        let (error, message) = refusal(&dev.on_offer(offer.to_json().as_bytes()));
        assert_eq!(error, OtaError::Model);
        assert!(message.contains("HS-TH20"), "{message}");
        assert!(!dev.waiting());
    }

    #[test]
    fn an_offer_already_answered_is_ignored_when_it_comes_again() {
        // After a success...
        let mut dev = device("1.0.0");
        let (good, image) = offer(ID, &VendorKey::hubsim(), MODEL, "1.1.0");
        let (_, steps) = fetch(&mut dev, &good, &image);
        assert_eq!(steps.len(), 2);
        assert_eq!(dev.on_offer(good.to_json().as_bytes()), []);
        // ...and after a refusal.
        let (old, _) = offer("fedcba9876543210", &VendorKey::hubsim(), MODEL, "0.1");
        assert_eq!(
            refusal(&dev.on_offer(old.to_json().as_bytes())).0,
            OtaError::Rollback
        );
        assert_eq!(dev.on_offer(old.to_json().as_bytes()), []);
        // A new id is a new offer.
        let (again, _) = offer("fedcba9876543211", &VendorKey::hubsim(), MODEL, "0.1");
        assert_eq!(
            refusal(&dev.on_offer(again.to_json().as_bytes())).0,
            OtaError::Rollback
        );
    }

    #[test]
    fn an_unanswered_request_is_retried_then_reported_as_download() {
        let mut dev = device("1.0.0");
        let (offer, image) = offer(ID, &VendorKey::hubsim(), MODEL, "1.1.0");
        let first = dev.on_offer(offer.to_json().as_bytes());
        let ask = |offset| Step::Request {
            offer: ID.into(),
            offset,
        };
        assert_eq!(first, [ask(0)]);
        // An answer resets the count for the next chunk.
        assert_eq!(dev.on_timeout(), [ask(0)]);
        assert_eq!(dev.on_chunk(0, &image[..16384]), [ask(16384)]);
        assert_eq!(dev.on_timeout(), [ask(16384)], "try 2");
        assert_eq!(dev.on_timeout(), [ask(16384)], "try 3");
        let (error, message) = refusal(&dev.on_timeout());
        assert_eq!(error, OtaError::Download);
        assert!(message.contains("after 3 tries"), "{message}");
        assert!(!dev.waiting());
        assert_eq!(dev.on_timeout(), []);
        // A late chunk changes nothing.
        assert_eq!(dev.on_chunk(16384, &image[16384..32768]), []);
    }

    #[test]
    fn a_reconnect_asks_again_at_once_with_fresh_tries() {
        let mut dev = device("1.0.0");
        let (offer, _) = offer(ID, &VendorKey::hubsim(), MODEL, "1.1.0");
        assert_eq!(dev.on_reconnect(), []);
        dev.on_offer(offer.to_json().as_bytes());
        dev.on_timeout();
        dev.on_timeout();
        let again = dev.on_reconnect();
        assert!(matches!(
            again.as_slice(),
            [Step::Request { offset: 0, .. }]
        ));
        // The retained offer delivered again on the new session is the one
        // being fetched: nothing more to ask.
        assert_eq!(dev.on_offer(offer.to_json().as_bytes()), []);
        assert_eq!(dev.on_timeout().len(), 1);
        assert_eq!(dev.on_timeout().len(), 1);
        assert_eq!(refusal(&dev.on_timeout()).0, OtaError::Download);
    }

    #[test]
    fn a_hub_error_for_the_current_offer_ends_the_download() {
        let mut dev = device("1.0.0");
        let (offer, _) = offer(ID, &VendorKey::hubsim(), MODEL, "1.1.0");
        dev.on_offer(offer.to_json().as_bytes());
        assert_eq!(dev.on_error(b"not json"), []);
        assert_eq!(
            dev.on_error(br#"{"offer":"ffffffffffffffff","error":"not current"}"#),
            []
        );
        assert!(dev.waiting());
        let (error, message) =
            refusal(&dev.on_error(br#"{"offer":"0123456789abcdef","error":"not current"}"#));
        assert_eq!(error, OtaError::Download);
        assert!(message.contains("not current"), "{message}");
    }

    #[test]
    fn chunks_that_do_not_fit_the_offer_fail_it() {
        let (offer, image) = offer(ID, &VendorKey::hubsim(), MODEL, "1.1.0");
        let start = |dev: &mut OtaDevice| {
            dev.on_offer(offer.to_json().as_bytes());
        };
        // Unexpected offsets are ignored (late answers).
        let mut dev = device("1.0.0");
        start(&mut dev);
        assert_eq!(dev.on_chunk(16384, &image[16384..32768]), []);
        assert!(dev.waiting());
        // An empty chunk before the end: the image is shorter than `size`.
        assert_eq!(refusal(&dev.on_chunk(0, &[])).0, OtaError::Size);
        // More than chunk_size at once.
        let mut dev = device("1.0.0");
        start(&mut dev);
        assert_eq!(
            refusal(&dev.on_chunk(0, &image[..16385])).0,
            OtaError::Download
        );
        // Past the size.
        let mut dev = device("1.0.0");
        start(&mut dev);
        dev.on_chunk(0, &image[..16384]);
        dev.on_chunk(16384, &image[16384..32768]);
        let too_long = vec![0u8; 16384];
        assert_eq!(refusal(&dev.on_chunk(32768, &too_long)).0, OtaError::Size);
    }

    #[test]
    fn a_new_offer_replaces_the_download_and_an_empty_one_withdraws_it() {
        let mut dev = device("1.0.0");
        let (first, _) = offer(ID, &VendorKey::hubsim(), MODEL, "1.1.0");
        let (second, image) = offer("0123456789abcdee", &VendorKey::hubsim(), MODEL, "1.2.0");
        dev.on_offer(first.to_json().as_bytes());
        dev.on_chunk(0, &simulated_image(MODEL, "1.1.0")[..16384]);
        let (asked, steps) = fetch(&mut dev, &second, &image);
        assert_eq!(asked, [0, 16384, 32768], "from the start");
        assert_eq!(dev.version(), "1.2.0");
        assert!(matches!(&steps[1], Step::Report { offer, .. } if offer == &second.id));

        let mut dev = device("1.0.0");
        dev.on_offer(first.to_json().as_bytes());
        assert_eq!(dev.on_offer(b""), []);
        assert!(!dev.waiting());
        assert_eq!(dev.on_timeout(), [], "withdrawn: no report");
    }

    #[test]
    fn malformed_offers_are_reported_when_they_have_an_id_and_ignored_otherwise() {
        let (offer, _) = offer(ID, &VendorKey::hubsim(), MODEL, "1.1.0");
        let good: serde_json::Value = serde_json::from_str(&offer.to_json()).unwrap();
        let with = |field: &str, value: serde_json::Value| {
            let mut v = good.clone();
            v[field] = value;
            v.to_string()
        };
        let without = |field: &str| {
            let mut v = good.clone();
            v.as_object_mut().unwrap().remove(field);
            v.to_string()
        };
        let sig63 = base64_encode(&[7; 63]);
        let reported = [
            (with("size", 0.into()), "size"),
            (with("size", (MAX_IMAGE_SIZE + 1).into()), "size"),
            (with("size", serde_json::json!(-1)), "size"),
            (with("size", serde_json::json!(1.5)), "size"),
            (with("size", "40000".into()), "size"),
            (with("chunk_size", 0.into()), "chunk_size"),
            (
                with("chunk_size", (MAX_CHUNK_SIZE + 1).into()),
                "chunk_size",
            ),
            (with("sha256", "AB".repeat(32).into()), "sha256"),
            (with("sha256", "ab".repeat(31).into()), "sha256"),
            (with("signature", sig63.into()), "signature"),
            (with("signature", "not base64!".into()), "signature"),
            (with("version", "1.1.0 beta".into()), "version"),
            (with("version", "".into()), "version"),
            (with("model", "HS/SW10".into()), "model"),
            (without("model"), "model"),
            (without("chunk_size"), "chunk_size"),
        ];
        for (payload, field) in reported {
            let mut dev = device("1.0.0");
            let steps = dev.on_offer(payload.as_bytes());
            let (error, message) = refusal(&steps);
            assert_eq!(error, OtaError::Download, "{payload}");
            assert!(
                message.starts_with("malformed offer: ") && message.contains(field),
                "{payload}: {message}"
            );
            assert!(!dev.waiting());
            assert_eq!(dev.on_offer(payload.as_bytes()), [], "answered once");
        }
        let ignored = [
            "not json".to_owned(),
            "[1,2]".to_owned(),
            without("offer"),
            with("offer", "0123456789ABCDEF".into()),
            with("offer", "0123456789abcde".into()),
            with("offer", "a".repeat(65).into()),
            with("offer", 12.into()),
        ];
        for payload in ignored {
            let mut dev = device("1.0.0");
            assert_eq!(dev.on_offer(payload.as_bytes()), [], "{payload}");
        }
        // Unknown fields are not an error.
        let mut dev = device("1.0.0");
        let extra = with("note", "for later".into());
        assert!(matches!(
            dev.on_offer(extra.as_bytes()).as_slice(),
            [Step::Request { offset: 0, .. }]
        ));
        assert_eq!(Offer::parse(offer.to_json().as_bytes()), Ok(offer));
    }

    /// Runs openssl with `args`, failing the test with its stderr.
    fn openssl(args: &[&std::ffi::OsStr]) -> Vec<u8> {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl is required (apt-get install openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    #[test]
    fn openssl_ed25519_keys_load_and_both_sides_verify_each_other() {
        let found = std::process::Command::new("openssl")
            .arg("version")
            .output();
        assert!(
            found.as_ref().is_ok_and(|o| o.status.success()),
            "openssl is required (apt-get install openssl): {found:?}"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name).into_os_string();
        let (key, public, msg, sig, ours) = (
            path("vendor.key"),
            path("vendor.pub"),
            path("msg"),
            path("sig"),
            path("ours"),
        );
        let os = |s: &str| std::ffi::OsString::from(s);
        openssl(&[
            &os("genpkey"),
            &os("-algorithm"),
            &os("ed25519"),
            &os("-out"),
            &key,
        ]);
        let key_pem = std::fs::read_to_string(&key).unwrap();
        let vendor = VendorKey::from_seed_pem(&key_pem).unwrap();
        assert_eq!(vendor.seed_pem(), key_pem, "the same PKCS#8 text");
        let public_pem =
            String::from_utf8(openssl(&[&os("pkey"), &os("-in"), &key, &os("-pubout")])).unwrap();
        assert_eq!(vendor.public_pem(), public_pem, "the same SPKI text");
        assert_eq!(public_from_pem(&public_pem).unwrap(), vendor.public_key());
        std::fs::write(&public, &public_pem).unwrap();

        let image = simulated_image(MODEL, "1.1.0");
        let sha = sha256_hex(&image);
        std::fs::write(&msg, signed_message(MODEL, "1.1.0", &sha)).unwrap();
        openssl(&[
            &os("pkeyutl"),
            &os("-sign"),
            &os("-inkey"),
            &key,
            &os("-rawin"),
            &os("-in"),
            &msg,
            &os("-out"),
            &sig,
        ]);
        let theirs = std::fs::read(&sig).unwrap();
        assert!(verify(&vendor.public_key(), MODEL, "1.1.0", &sha, &theirs));
        // Ed25519 is deterministic: the same key signs the same bytes.
        assert_eq!(vendor.sign(MODEL, "1.1.0", &image).as_slice(), theirs);
        std::fs::write(&ours, VendorKey::hubsim().sign(MODEL, "1.1.0", &image)).unwrap();
        std::fs::write(&public, VendorKey::hubsim().public_pem()).unwrap();
        let verified = openssl(&[
            &os("pkeyutl"),
            &os("-verify"),
            &os("-pubin"),
            &os("-inkey"),
            &public,
            &os("-rawin"),
            &os("-in"),
            &msg,
            &os("-sigfile"),
            &ours,
        ]);
        assert!(String::from_utf8_lossy(&verified).contains("Signature Verified Successfully"));
    }
}
