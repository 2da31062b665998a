//! The hub's persistent store: redb behind one module, with typed records.
//!
//! redb is the only database hubd uses, and no other module names it, so the
//! choice stays in one place (see DESIGN.md, "Storage"). Tables are keyed by
//! opaque ids (device ids, certificate serials, fixed meta keys), never by
//! names a householder typed, so a key never leaks personal data.
//!
//! Values are encrypted at rest (principle 8). Every value of every table
//! but `meta` is JSON sealed with ChaCha20-Poly1305 under the per-install
//! data key ([`DataKey`], `keys/data.key`, 0600): a random 96-bit nonce, then
//! the ciphertext and tag. The associated data names the table and the key,
//! so a sealed value copied to another slot does not open. ChaCha20 rather
//! than AES-GCM: a Raspberry Pi before the 5 has no AES instructions.
//! Destroying the data key makes every copy of the store unreadable, also
//! the stale blocks flash wear-levelling keeps (crypto-erase).
//!
//! Durability: every write whose success the caller reports to a user is
//! committed with redb's default `Durability::Immediate` (fsync) before the
//! method returns. The one exception, [`Store::touch_last_seen`], says so.
//!
//! All methods block on disk I/O; async callers run them in
//! `tokio::task::spawn_blocking`.

use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    TableHandle,
};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::model::{DeviceId, Grants, Role};

/// The layout version this hubd writes. A store with a greater version was
/// written by a newer hubd and is refused rather than misread.
pub const SCHEMA_VERSION: u32 = 2;

/// The tables whose values are sealed under the data key: all but `meta`.
pub const SEALED_TABLES: [&str; 10] = [
    "devices",
    "certs",
    "retained",
    "history",
    "rules",
    "automation",
    "seclog",
    "firmware",
    "firmware_images",
    "vendor_keys",
];

/// Device records, keyed by device id.
const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
/// Certificate records, keyed by lowercase hex serial.
const CERTS: TableDefinition<&str, &[u8]> = TableDefinition::new("certs");
/// The last retained `state` and `meta` payload of each device, keyed by
/// `<device id>/state` and `<device id>/meta`: bounded to two values per
/// device, never a history.
const RETAINED: TableDefinition<&str, &[u8]> = TableDefinition::new("retained");
/// What devices reported over time: states and events, keyed by
/// `<device id>/<unix ms, 16 hex><sequence, 8 hex>` so that one device's
/// records are one key range (removal) and each device's are in time order.
/// Pruned by age (`[privacy] history_days`).
const HISTORY: TableDefinition<&str, &[u8]> = TableDefinition::new("history");
/// Automation rules, keyed by an opaque random rule id (never the rule's
/// name, which a householder typed).
const RULES: TableDefinition<&str, &[u8]> = TableDefinition::new("rules");
/// The automation's hub variables, as one record under [`VARS_KEY`] (keyed
/// by a fixed name, not by variable names).
const AUTOMATION: TableDefinition<&str, &[u8]> = TableDefinition::new("automation");
const VARS_KEY: &str = "vars";
/// The security log, keyed by the entry's sequence number (16 hex digits),
/// so the table's order is the chain's order.
const SECLOG: TableDefinition<&str, &[u8]> = TableDefinition::new("seclog");
/// The firmware catalogue: one record per (model, version), keyed by an
/// opaque id derived from both.
const FIRMWARE: TableDefinition<&str, &[u8]> = TableDefinition::new("firmware");
/// Firmware images, keyed by their SHA-256 (hex).
const FIRMWARE_IMAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("firmware_images");
/// Vendor keys the owner trusts, one record per (model, key), keyed by an
/// opaque id derived from both.
const VENDOR_KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("vendor_keys");
/// Store-wide counters and the schema version, keyed by the names below.
/// Meta values are plain JSON and will stay unencrypted: the schema version
/// must be readable before the data key is, and none of it is personal.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const META_SCHEMA_VERSION: &str = "schema_version";
const META_CRL_NUMBER: &str = "crl_number";
/// A constant sealed under the data key: opening it proves the key is the
/// one the store was sealed with, before any record is read.
const META_KEY_CHECK: &str = "key_check";
const KEY_CHECK_PLAIN: &[u8] = b"hubd data key check";
/// Where the security log's chain starts after pruning (see
/// [`SeclogAnchor`]).
const META_SECLOG_ANCHOR: &str = "seclog_anchor";

/// redb's page cache limit. Its default is 1 GiB, as much as a small
/// Raspberry Pi has in all; the hub's working set is a few megabytes.
const CACHE_BYTES: usize = 16 * 1024 * 1024;

/// Whether a device may still connect, and with what rights.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    Active,
    /// Cut off from commands (the reason is in `isolation_reason`).
    Isolated,
    Revoked,
}

/// A paired device. Times are Unix seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    #[serde(with = "device_id_serde")]
    pub id: DeviceId,
    /// The name the householder gave it (personal data: encrypted once the
    /// encryption seam is filled).
    pub name: String,
    pub state: DeviceState,
    pub created_at: i64,
    pub last_seen: i64,
    /// Serial (lowercase hex) of the device's current certificate.
    pub cert_serial: String,
    pub cert_not_after: i64,
    /// Device or integration. Records from before roles existed are devices.
    #[serde(default)]
    pub role: Role,
    /// Why the device is isolated; `Some` exactly when `state` is `Isolated`.
    #[serde(default)]
    pub isolation_reason: Option<String>,
    /// Topic rights of an integration; empty for devices.
    #[serde(default)]
    pub grants: Grants,
    /// What the device says it is, from its `d/<id>/meta`.
    #[serde(default)]
    pub kind: Option<String>,
    /// Firmware, support period and updates (the `lifecycle` module).
    #[serde(default)]
    pub lifecycle: Lifecycle,
}

/// One automation rule as stored: its source, a single `[[rule]]` table in
/// canonical TOML (the `enabled` flag included), and when it last changed
/// (Unix seconds). The automation module owns the format of `source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleRecord {
    /// Opaque and stable while the rule keeps its name.
    pub id: String,
    /// Where the rule stands in the rule set (the order of the file that was
    /// applied): rules run in this order.
    pub position: u32,
    pub name: String,
    pub source: String,
    pub updated_at: i64,
}

/// One thing a device reported, as kept in the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryRecord {
    #[serde(with = "device_id_serde")]
    pub device: DeviceId,
    /// Unix milliseconds, when the hub received it.
    pub at_ms: i64,
    /// `"state"`, or the event's name for `d/<id>/event/<name>`.
    pub topic: String,
    /// The payload as text (JSON, as devices send it; other bytes lossily).
    pub payload: String,
}

impl HistoryRecord {
    fn key(&self, seq: u32) -> String {
        format!("{}/{:016x}{seq:08x}", self.device, self.at_ms.max(0))
    }
}

/// What the hub knows of a device's firmware, support period and updates.
/// The device reports most of it in its `d/<id>/meta`; the `lifecycle`
/// module owns the rules for it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lifecycle {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub vendor: Option<String>,
    /// The running firmware's version and SHA-256 (hex), as reported.
    #[serde(default)]
    pub firmware: Option<String>,
    #[serde(default)]
    pub firmware_sha256: Option<String>,
    /// The support end the device reports (`YYYY-MM-DD`).
    #[serde(default)]
    pub support_end_reported: Option<String>,
    /// The support end the owner set; it wins over the reported one.
    #[serde(default)]
    pub support_end_owner: Option<String>,
    /// The support end the end-of-life policy last acted on, so it acts
    /// once per date (an owner who releases the device is not overruled).
    #[serde(default)]
    pub eol_handled: Option<String>,
    /// The last integrity problem (unrecognised or unoffered firmware);
    /// cleared when the device reports recognised firmware.
    #[serde(default)]
    pub integrity: Option<String>,
    /// The latest update offered to the device and how it went.
    #[serde(default)]
    pub update: Option<UpdateRecord>,
}

/// An update the hub offered a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateRecord {
    /// The offer id on the wire.
    pub offer: String,
    pub version: String,
    pub sha256: String,
    pub state: UpdateState,
    /// Why it failed: the device's error code and message.
    #[serde(default)]
    pub error: Option<String>,
    /// When the state last changed (Unix seconds).
    pub at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpdateState {
    /// Offered; the device has not fetched anything yet.
    Offered,
    /// The device is fetching the image.
    Downloading,
    /// The device installed it and reported the new version.
    Installed,
    /// The device refused or failed; `error` says why.
    Failed,
}

/// A firmware image in the catalogue (its bytes are in `firmware_images`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirmwareRecord {
    pub model: String,
    pub version: String,
    /// SHA-256 of the image, hex.
    pub sha256: String,
    pub size: u64,
    /// The vendor's Ed25519 signature, 64 bytes.
    pub signature: Vec<u8>,
    /// The id of the vendor key that signed it.
    pub key_id: String,
    pub added_at: i64,
}

impl FirmwareRecord {
    fn key(&self) -> String {
        opaque_key(&[&self.model, &self.version])
    }
}

/// An Ed25519 vendor key the owner trusts for one model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VendorKeyRecord {
    pub model: String,
    /// The 32-byte public key.
    pub public_key: Vec<u8>,
    /// `sha256:` and the first 16 hex digits of the key's SHA-256.
    pub key_id: String,
    pub added_at: i64,
}

impl VendorKeyRecord {
    fn key(&self) -> String {
        opaque_key(&[&self.model, &self.key_id])
    }
}

/// A key that reveals nothing of the names it is made from.
fn opaque_key(parts: &[&str]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(p.as_bytes());
        ctx.update(b"\n");
    }
    hex::encode(&ctx.finish().as_ref()[..16])
}

/// One entry of the security log. The `seclog` module owns its meaning and
/// its hashing; the store keeps it sealed, keyed by `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeclogEntry {
    pub seq: u64,
    /// Unix milliseconds.
    pub at_ms: i64,
    /// What happened, such as `device.isolated` (see `seclog::Kind`).
    pub kind: String,
    /// `info`, `warning` or `alert`.
    pub severity: String,
    #[serde(default)]
    pub device: Option<String>,
    /// Who caused it: `uid 1000`, `hub`, a policy, or an address.
    pub actor: String,
    pub message: String,
    /// Evidence, such as expected and seen values.
    #[serde(default)]
    pub evidence: std::collections::BTreeMap<String, String>,
    /// Hex SHA-256 of the previous entry (of the anchor for the first).
    pub prev: String,
    /// Hex SHA-256 of this entry (everything above, `prev` included).
    pub hash: String,
}

/// The chain's starting point after old entries were pruned: the first
/// kept entry's `seq` and the hash its `prev` must equal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeclogAnchor {
    pub first_seq: u64,
    pub prev: String,
}

/// Which retained topic of a device a stored payload belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetainedKind {
    /// `d/<id>/state`
    State,
    /// `d/<id>/meta`
    Meta,
}

impl RetainedKind {
    pub const ALL: [RetainedKind; 2] = [RetainedKind::State, RetainedKind::Meta];

    /// The topic level after `d/<id>/`.
    pub fn suffix(self) -> &'static str {
        match self {
            RetainedKind::State => "state",
            RetainedKind::Meta => "meta",
        }
    }

    pub fn from_suffix(suffix: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.suffix() == suffix)
    }

    fn key(self, id: &DeviceId) -> String {
        format!("{id}/{}", self.suffix())
    }
}

/// A certificate the hub's CA issued to a device. Times are Unix seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRecord {
    pub serial_hex: String,
    #[serde(with = "device_id_serde")]
    pub device: DeviceId,
    pub issued_at: i64,
    pub not_after: i64,
    /// Set once, when the certificate is revoked; it then belongs on the CRL.
    pub revoked_at: Option<i64>,
}

/// The key range of one device's history: `<id>/` up to `<id>0` ('0' is
/// the character after '/').
fn device_range(id: &DeviceId) -> (String, String) {
    (format!("{id}/"), format!("{id}0"))
}

/// `DeviceId` is stored as its string and re-validated on the way in, so a
/// tampered record cannot smuggle a malformed id into topics or SANs.
mod device_id_serde {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::model::DeviceId;

    pub fn serialize<S: Serializer>(id: &DeviceId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(id.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DeviceId, D::Error> {
        let text = String::deserialize(d)?;
        DeviceId::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Why a store operation failed. Every message names the store file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be created or opened as a redb database (missing
    /// parent, permissions, another process holds it, corrupt file).
    #[error("store {}: cannot open: {source}", .path.display())]
    Open { path: PathBuf, source: redb::Error },
    /// redb failed during a transaction (I/O error, corruption).
    #[error("store {}: {source}", .path.display())]
    Db { path: PathBuf, source: redb::Error },
    /// The file was written by a newer hubd.
    #[error(
        "store {} has schema version {found} but this hubd supports up to {supported}: refusing to open (upgrade hubd)",
        .path.display()
    )]
    SchemaTooNew {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    /// The record to create is already there; nothing was written.
    #[error("store {}: table {table} already holds key {key:?}", .path.display())]
    Exists {
        path: PathBuf,
        table: &'static str,
        key: String,
    },
    /// A stored value cannot be decoded or contradicts its key.
    #[error("store {}: table {table}, key {key:?}: corrupt value: {detail}", .path.display())]
    Corrupt {
        path: PathBuf,
        table: &'static str,
        key: String,
        detail: String,
    },
    /// A value could not be encoded; nothing was written.
    #[error("store {}: table {table}, key {key:?}: cannot encode value: {detail}", .path.display())]
    Encode {
        path: PathBuf,
        table: &'static str,
        key: String,
        detail: String,
    },
    /// The data key file is missing where the store needs it, unreadable,
    /// malformed, or readable by others.
    #[error("data key {}: {detail}", .path.display())]
    DataKey { path: PathBuf, detail: String },
    /// The caller passed records that do not belong together; nothing was
    /// written. Refused because a certificate filed under the wrong device
    /// would escape that device's revocation.
    #[error("store {}: {detail}", .path.display())]
    Mismatch { path: PathBuf, detail: String },
}

mod catalogue;
mod seclog;
pub use seclog::RawEntries;

/// Attaches the store path to redb's errors, so `?` reads cleanly below.
trait DbContext<T> {
    fn ctx(self, path: &Path) -> Result<T, Error>;
}

impl<T, E: Into<redb::Error>> DbContext<T> for Result<T, E> {
    fn ctx(self, path: &Path) -> Result<T, Error> {
        self.map_err(|e| Error::Db {
            path: path.to_owned(),
            source: e.into(),
        })
    }
}

/// The per-install key that seals every stored value. It never leaves this
/// module in clear: not in logs (its `Debug` shows nothing), not in any API.
#[derive(Clone)]
pub struct DataKey {
    key: Arc<LessSafeKey>,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

/// Length of the data key file: 32 random bytes.
pub const DATA_KEY_LEN: usize = 32;

impl DataKey {
    /// Loads `path`, or creates it (32 bytes from the OS RNG, 0600, in a
    /// 0700 directory, fsynced) if it does not exist and `may_create`. A
    /// key file group or others can read is refused, naming the file.
    pub fn open_or_create(path: &Path, may_create: bool) -> Result<DataKey, Error> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
        let err = |detail: String| Error::DataKey {
            path: path.to_owned(),
            detail,
        };
        if !path.exists() {
            if !may_create {
                return Err(err(
                    "missing: the store was sealed with it and cannot be read without it".into(),
                ));
            }
            if let Some(dir) = path.parent() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(|e| err(format!("cannot create its directory: {e}")))?;
            }
            let mut bytes = [0u8; DATA_KEY_LEN];
            SystemRandom::new()
                .fill(&mut bytes)
                .map_err(|_| err("the OS random number generator failed".into()))?;
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| err(format!("cannot create: {e}")))?;
            io::Write::write_all(&mut file, &bytes)
                .and_then(|()| file.sync_all())
                .map_err(|e| err(format!("cannot write: {e}")))?;
            if let Some(dir) = path.parent() {
                std::fs::File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| err(format!("cannot sync its directory: {e}")))?;
            }
            return DataKey::from_bytes(&bytes).map_err(err);
        }
        let mode = std::fs::metadata(path)
            .map_err(|e| err(e.to_string()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(err(format!(
                "has mode {:04o}: it must be readable by hubd alone (chmod 600 {})",
                mode & 0o777,
                path.display()
            )));
        }
        let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
        DataKey::from_bytes(&bytes).map_err(err)
    }

    fn from_bytes(bytes: &[u8]) -> Result<DataKey, String> {
        if bytes.len() != DATA_KEY_LEN {
            return Err(format!(
                "is {} bytes long, not {DATA_KEY_LEN}: not a hubd data key",
                bytes.len()
            ));
        }
        let key = UnboundKey::new(&CHACHA20_POLY1305, bytes)
            .map_err(|_| "not a ChaCha20-Poly1305 key".to_owned())?;
        Ok(DataKey {
            key: Arc::new(LessSafeKey::new(key)),
        })
    }

    /// A key that exists only in memory, for tests.
    pub fn ephemeral() -> DataKey {
        let mut bytes = [0u8; DATA_KEY_LEN];
        SystemRandom::new()
            .fill(&mut bytes)
            .expect("the OS random number generator is available");
        DataKey::from_bytes(&bytes).expect("32 bytes make a key")
    }
}

/// The associated data that binds a sealed value to its slot.
fn slot(table: &str, key: &str) -> Vec<u8> {
    format!("hubd/2/{table}/{key}").into_bytes()
}

/// Where a kind of personal data lives, why, and for how long: the source
/// of `hubctl privacy`. A unit test holds it to the tables the store file
/// really has, so it cannot drift.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InventoryItem {
    /// The store table, or `None` for data outside the store file.
    pub table: Option<&'static str>,
    /// Where it is kept, for a reader.
    pub place: &'static str,
    pub holds: &'static str,
    pub why: &'static str,
    pub retention: Retention,
    /// The key of this data in `hubctl export`'s JSON; `None` if not exported.
    pub export: Option<&'static str>,
}

/// How long an inventory item is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Until the owner removes it (or the device it belongs to).
    UntilRemoved,
    /// Only the latest value; removed with its device.
    LatestOnly,
    /// `[privacy] history_days`, pruned hourly.
    HistoryDays,
    /// In memory, the last N entries; gone at restart.
    MemoryOnly,
    /// Kept while the hub's CA lives: revoked certificates stay on the CRL.
    WithTheCa,
    /// By the system journal's own settings.
    Journal,
    /// `[seclog] retention_days` and `max_entries`, pruned hourly.
    SeclogDays,
}

pub const INVENTORY: &[InventoryItem] = &[
    InventoryItem {
        table: Some("devices"),
        place: "hub.redb, table devices (encrypted)",
        holds: "each device's name, kind, role, state, isolation reason, grants, when it was paired and last seen",
        why: "to know which devices may connect and to show them to you",
        retention: Retention::UntilRemoved,
        export: Some("devices"),
    },
    InventoryItem {
        table: Some("certs"),
        place: "hub.redb, table certs (encrypted)",
        holds: "certificate serials, device ids and validity times",
        why: "to check certificates and publish the revocation list",
        retention: Retention::WithTheCa,
        export: Some("certificates"),
    },
    InventoryItem {
        table: Some("retained"),
        place: "hub.redb, table retained (encrypted)",
        holds: "each device's latest state and metadata as it reported them",
        why: "to give a restarted hub and its automations the current state",
        retention: Retention::LatestOnly,
        export: Some("states"),
    },
    InventoryItem {
        table: Some("history"),
        place: "hub.redb, table history (encrypted)",
        holds: "device states and events over time (at most one a second per device topic)",
        why: "device history for you and for automations' context",
        retention: Retention::HistoryDays,
        export: Some("history"),
    },
    InventoryItem {
        table: Some("rules"),
        place: "hub.redb, table rules (encrypted)",
        holds: "your automation rules",
        why: "to run your automations",
        retention: Retention::UntilRemoved,
        export: Some("rules"),
    },
    InventoryItem {
        table: Some("automation"),
        place: "hub.redb, table automation (encrypted)",
        holds: "hub variables your rules set (such as \"away\")",
        why: "to run your automations",
        retention: Retention::UntilRemoved,
        export: Some("variables"),
    },
    InventoryItem {
        table: Some("seclog"),
        place: "hub.redb, table seclog (encrypted)",
        holds: "security events: pairing, refused connections, isolation, firmware, admin changes with the admin's uid, anomalies",
        why: "to show you what happened to your hub's security, and to prove it was not edited (a hash chain)",
        retention: Retention::SeclogDays,
        export: Some("security_events"),
    },
    InventoryItem {
        table: Some("firmware"),
        place: "hub.redb, table firmware (encrypted)",
        holds: "the firmware catalogue: model, version, image hash and the vendor's signature: no personal data",
        why: "to offer signed updates and recognise the firmware devices run",
        retention: Retention::UntilRemoved,
        export: None,
    },
    InventoryItem {
        table: Some("firmware_images"),
        place: "hub.redb, table firmware_images (encrypted)",
        holds: "firmware images you added: no personal data",
        why: "to send updates to devices",
        retention: Retention::UntilRemoved,
        export: None,
    },
    InventoryItem {
        table: Some("vendor_keys"),
        place: "hub.redb, table vendor_keys (encrypted)",
        holds: "the vendor keys you trust, per model: no personal data",
        why: "to check firmware signatures",
        retention: Retention::UntilRemoved,
        export: None,
    },
    InventoryItem {
        table: Some("meta"),
        place: "hub.redb, table meta",
        holds: "the store's schema version, the CRL number and the data key check: no personal data",
        why: "to open the store safely",
        retention: Retention::WithTheCa,
        export: None,
    },
    InventoryItem {
        table: None,
        place: "memory",
        holds: "recent automation runs: which rule, when, what it did",
        why: "hubctl rules history",
        retention: Retention::MemoryOnly,
        export: Some("rule_runs"),
    },
    InventoryItem {
        table: None,
        place: "system journal",
        holds: "device ids, connection and security events, rule log lines",
        why: "to diagnose problems and spot attacks",
        retention: Retention::Journal,
        export: None,
    },
];

/// A handle on the open store. Cloning is cheap and shares one database;
/// the file is closed (and any non-durable commits made durable) when the
/// last clone is dropped.
#[derive(Clone)]
pub struct Store {
    /// The database; redb serialises write transactions internally.
    db: Arc<Database>,
    /// The file, for error messages.
    path: Arc<Path>,
    /// Seals and opens every value but `meta`'s.
    key: DataKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens or creates the redb file at `path` (its parent must exist) and
    /// makes sure the tables `devices`, `certs` and `meta` exist.
    ///
    /// `meta["schema_version"]` absent (a new file) is set to
    /// [`SCHEMA_VERSION`]; a greater version is refused with
    /// [`Error::SchemaTooNew`] and the file is left untouched by hubd.
    pub fn open(path: &Path, key: DataKey) -> Result<Store, Error> {
        let open_err = |source: redb::Error| Error::Open {
            path: path.to_owned(),
            source,
        };
        create_private(path).map_err(|e| open_err(e.into()))?;
        // The integrity check makes a file damaged outside redb (disk error,
        // tampering) fail to open with an error; without it redb may panic
        // on such a file. It reads the whole file, which for a hub's store
        // is a few megabytes, once per start.
        // After a crash or power cut redb rolls back to the last committed
        // transaction (checksums tell a torn write from a whole one). That
        // is expected, not silent: say so once.
        let told = std::sync::atomic::AtomicBool::new(false);
        let shown = path.display().to_string();
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .set_check_integrity_on_open(true)
            .set_repair_callback(move |_| {
                if !told.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!(
                        store = %shown,
                        "store was not closed cleanly: recovering the last committed state \
                         (writes that were never acknowledged are discarded)"
                    );
                }
            })
            .create(path)
            .map_err(|e| open_err(e.into()))?;
        let store = Store {
            db: Arc::new(db),
            path: Arc::from(path),
            key,
            rng: SystemRandom::new(),
        };
        store.init_schema()?;
        Ok(store)
    }

    /// The store file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn init_schema(&self) -> Result<(), Error> {
        let path = &*self.path;
        let txn = self.db.begin_write().ctx(path)?;
        let found = {
            let meta = txn.open_table(META).ctx(path)?;
            txn.open_table(DEVICES).ctx(path)?;
            txn.open_table(CERTS).ctx(path)?;
            txn.open_table(RETAINED).ctx(path)?;
            txn.open_table(RULES).ctx(path)?;
            txn.open_table(AUTOMATION).ctx(path)?;
            txn.open_table(HISTORY).ctx(path)?;
            txn.open_table(SECLOG).ctx(path)?;
            txn.open_table(FIRMWARE).ctx(path)?;
            txn.open_table(FIRMWARE_IMAGES).ctx(path)?;
            txn.open_table(VENDOR_KEYS).ctx(path)?;
            self.meta_get::<u32>(&meta, META_SCHEMA_VERSION)?
        };
        match found {
            None => {
                let mut meta = txn.open_table(META).ctx(path)?;
                self.meta_put(&mut meta, META_SCHEMA_VERSION, &SCHEMA_VERSION)?;
            }
            Some(found) if found > SCHEMA_VERSION => {
                // Abort so that not even the empty tables are added to a file
                // that a newer hubd owns.
                txn.abort().ctx(path)?;
                return Err(Error::SchemaTooNew {
                    path: path.to_owned(),
                    found,
                    supported: SCHEMA_VERSION,
                });
            }
            Some(1) => {
                // Version 1 stored values in clear: seal them all, in the
                // same transaction that records version 2.
                for (table, name) in Self::sealed_tables() {
                    let mut t = txn.open_table(table).ctx(path)?;
                    let mut clear = Vec::new();
                    for entry in t.iter().ctx(path)? {
                        let (k, v) = entry.ctx(path)?;
                        clear.push((k.value().to_owned(), v.value().to_vec()));
                    }
                    for (k, v) in clear {
                        let sealed = self.seal(name, &k, &v)?;
                        t.insert(k.as_str(), sealed.as_slice()).ctx(path)?;
                    }
                }
                let mut meta = txn.open_table(META).ctx(path)?;
                self.meta_put(&mut meta, META_SCHEMA_VERSION, &SCHEMA_VERSION)?;
                tracing::info!(store = %path.display(), "store upgraded to schema 2: every value is now encrypted at rest");
            }
            Some(found) if found < SCHEMA_VERSION => {
                // No hubd has ever written a version below 1.
                txn.abort().ctx(path)?;
                return Err(self.corrupt(
                    "meta",
                    META_SCHEMA_VERSION,
                    format!("schema version {found} predates every hubd release"),
                ));
            }
            Some(_) => {}
        }
        let key_ok = {
            let mut meta = txn.open_table(META).ctx(path)?;
            let check = meta
                .get(META_KEY_CHECK)
                .ctx(path)?
                .map(|v| v.value().to_vec());
            match check {
                Some(sealed) => {
                    self.open_sealed("meta", META_KEY_CHECK, &sealed)
                        .ok()
                        .as_deref()
                        == Some(KEY_CHECK_PLAIN)
                }
                None => {
                    let sealed = self.seal("meta", META_KEY_CHECK, KEY_CHECK_PLAIN)?;
                    meta.insert(META_KEY_CHECK, sealed.as_slice()).ctx(path)?;
                    true
                }
            }
        };
        if !key_ok {
            txn.abort().ctx(path)?;
            return Err(Error::DataKey {
                path: path.to_owned(),
                detail:
                    "the store was sealed with another data key: it cannot be read with this one"
                        .to_owned(),
            });
        }
        txn.commit().ctx(path)
    }

    /// The schema version of the store at `path` without opening it for
    /// use: `None` if there is no store there yet. Version 1 stores hold
    /// their values in clear and need no data key to open.
    pub fn peek_schema(path: &Path) -> Result<Option<u32>, Error> {
        if !path.exists() {
            return Ok(None);
        }
        let db = Database::builder()
            .set_cache_size(1024 * 1024)
            .open(path)
            .map_err(|e| Error::Open {
                path: path.to_owned(),
                source: e.into(),
            })?;
        let txn = db.begin_read().ctx(path)?;
        let meta = match txn.open_table(META) {
            Ok(meta) => meta,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e).ctx(path),
        };
        match meta.get(META_SCHEMA_VERSION).ctx(path)? {
            Some(v) => serde_json::from_slice(v.value())
                .map(Some)
                .map_err(|e| Error::Corrupt {
                    path: path.to_owned(),
                    table: "meta",
                    key: META_SCHEMA_VERSION.to_owned(),
                    detail: e.to_string(),
                }),
            None => Ok(None),
        }
    }

    /// Records a newly paired device and its first certificate in one
    /// durable transaction. If the device id or the certificate serial is
    /// already taken, returns [`Error::Exists`] and writes nothing.
    pub fn enroll(&self, device: &DeviceRecord, cert: &CertRecord) -> Result<(), Error> {
        let path = &*self.path;
        if cert.device != device.id || cert.serial_hex != device.cert_serial {
            return Err(Error::Mismatch {
                path: path.to_owned(),
                detail: format!(
                    "certificate {} of device {} does not match device {} with certificate {}",
                    cert.serial_hex, cert.device, device.id, device.cert_serial
                ),
            });
        }
        let id = device.id.as_str();
        let device_bytes = self.encode("devices", id, device)?;
        let cert_bytes = self.encode("certs", &cert.serial_hex, cert)?;

        let txn = self.db.begin_write().ctx(path)?;
        {
            let mut devices = txn.open_table(DEVICES).ctx(path)?;
            let mut certs = txn.open_table(CERTS).ctx(path)?;
            if devices.get(id).ctx(path)?.is_some() {
                return Err(self.exists("devices", id));
            }
            if certs.get(cert.serial_hex.as_str()).ctx(path)?.is_some() {
                return Err(self.exists("certs", &cert.serial_hex));
            }
            devices.insert(id, device_bytes.as_slice()).ctx(path)?;
            certs
                .insert(cert.serial_hex.as_str(), cert_bytes.as_slice())
                .ctx(path)?;
        }
        // Returning early above drops the transaction, which aborts it.
        txn.commit().ctx(path)
    }

    /// The device with this id, if any.
    pub fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, Error> {
        let path = &*self.path;
        let txn = self.db.begin_read().ctx(path)?;
        let devices = txn.open_table(DEVICES).ctx(path)?;
        let Some(bytes) = devices.get(id.as_str()).ctx(path)? else {
            return Ok(None);
        };
        self.decode_device(id.as_str(), bytes.value()).map(Some)
    }

    /// Every device, in id order.
    pub fn devices(&self) -> Result<Vec<DeviceRecord>, Error> {
        let path = &*self.path;
        let txn = self.db.begin_read().ctx(path)?;
        let devices = txn.open_table(DEVICES).ctx(path)?;
        let mut out = Vec::new();
        for entry in devices.iter().ctx(path)? {
            let (key, value) = entry.ctx(path)?;
            out.push(self.decode_device(key.value(), value.value())?);
        }
        Ok(out)
    }

    /// Marks the device `Revoked` and sets `revoked_at` on every one of its
    /// certificates not yet revoked, in one durable transaction, so the
    /// device and its certificates can never disagree after a crash.
    /// Returns the updated record, or `None` if the id is unknown. Revoking
    /// a revoked device changes nothing already revoked.
    pub fn revoke_device(&self, id: &DeviceId, at: i64) -> Result<Option<DeviceRecord>, Error> {
        let path = &*self.path;
        let txn = self.db.begin_write().ctx(path)?;
        let updated = {
            let mut devices = txn.open_table(DEVICES).ctx(path)?;
            let mut certs = txn.open_table(CERTS).ctx(path)?;
            let current = match devices.get(id.as_str()).ctx(path)? {
                Some(bytes) => self.decode_device(id.as_str(), bytes.value())?,
                None => return Ok(None),
            };
            let mut device = current;
            device.state = DeviceState::Revoked;
            let bytes = self.encode("devices", id.as_str(), &device)?;
            devices.insert(id.as_str(), bytes.as_slice()).ctx(path)?;

            self.revoke_certs_in(&mut certs, id, None, at)?;
            device
        };
        txn.commit().ctx(path)?;
        Ok(Some(updated))
    }

    /// Applies `change` to the device's record in one durable transaction.
    /// Returns the updated record, or `None` if the id is unknown.
    pub fn update_device(
        &self,
        id: &DeviceId,
        change: impl FnOnce(&mut DeviceRecord),
    ) -> Result<Option<DeviceRecord>, Error> {
        let path = &*self.path;
        let txn = self.db.begin_write().ctx(path)?;
        let updated = {
            let mut devices = txn.open_table(DEVICES).ctx(path)?;
            let mut device = match devices.get(id.as_str()).ctx(path)? {
                Some(bytes) => self.decode_device(id.as_str(), bytes.value())?,
                None => return Ok(None),
            };
            change(&mut device);
            let bytes = self.encode("devices", id.as_str(), &device)?;
            devices.insert(id.as_str(), bytes.as_slice()).ctx(path)?;
            device
        };
        txn.commit().ctx(path)?;
        Ok(Some(updated))
    }

    /// Records a renewed certificate for an existing device and makes it the
    /// device's current one, in one durable transaction. Older certificates
    /// stay valid until [`Store::revoke_certs_except`] retires them.
    pub fn add_cert(&self, cert: &CertRecord) -> Result<Option<DeviceRecord>, Error> {
        let path = &*self.path;
        let id = cert.device.as_str();
        let cert_bytes = self.encode("certs", &cert.serial_hex, cert)?;
        let txn = self.db.begin_write().ctx(path)?;
        let updated = {
            let mut devices = txn.open_table(DEVICES).ctx(path)?;
            let mut certs = txn.open_table(CERTS).ctx(path)?;
            let mut device = match devices.get(id).ctx(path)? {
                Some(bytes) => self.decode_device(id, bytes.value())?,
                None => return Ok(None),
            };
            if certs.get(cert.serial_hex.as_str()).ctx(path)?.is_some() {
                return Err(self.exists("certs", &cert.serial_hex));
            }
            device.cert_serial = cert.serial_hex.clone();
            device.cert_not_after = cert.not_after;
            let device_bytes = self.encode("devices", id, &device)?;
            devices.insert(id, device_bytes.as_slice()).ctx(path)?;
            certs
                .insert(cert.serial_hex.as_str(), cert_bytes.as_slice())
                .ctx(path)?;
            device
        };
        txn.commit().ctx(path)?;
        Ok(Some(updated))
    }

    /// Every certificate issued to the device, revoked or not.
    pub fn certs_of(&self, id: &DeviceId) -> Result<Vec<CertRecord>, Error> {
        self.certs_where(|c| c.device == *id)
    }

    /// Every certificate `keep` accepts, in serial order.
    fn certs_where(&self, keep: impl Fn(&CertRecord) -> bool) -> Result<Vec<CertRecord>, Error> {
        let path = &*self.path;
        let txn = self.db.begin_read().ctx(path)?;
        let certs = txn.open_table(CERTS).ctx(path)?;
        let mut out = Vec::new();
        for entry in certs.iter().ctx(path)? {
            let (key, value) = entry.ctx(path)?;
            let cert = self.decode_cert(key.value(), value.value())?;
            if keep(&cert) {
                out.push(cert);
            }
        }
        Ok(out)
    }

    /// Revokes every unrevoked certificate of the device except `keep`, in one
    /// durable transaction; returns how many it revoked.
    pub fn revoke_certs_except(&self, id: &DeviceId, keep: &str, at: i64) -> Result<usize, Error> {
        let path = &*self.path;
        let txn = self.db.begin_write().ctx(path)?;
        let count = {
            let mut certs = txn.open_table(CERTS).ctx(path)?;
            self.revoke_certs_in(&mut certs, id, Some(keep), at)?
        };
        txn.commit().ctx(path)?;
        Ok(count)
    }

    /// Deletes the device's record and revokes all its certificates (which
    /// stay in `certs`, revoked, so the CRL keeps listing them), in one
    /// durable transaction. Returns the removed record, or `None`.
    pub fn remove_device(&self, id: &DeviceId, at: i64) -> Result<Option<DeviceRecord>, Error> {
        let path = &*self.path;
        let txn = self.db.begin_write().ctx(path)?;
        let removed = {
            let mut devices = txn.open_table(DEVICES).ctx(path)?;
            let mut certs = txn.open_table(CERTS).ctx(path)?;
            let device = match devices.remove(id.as_str()).ctx(path)? {
                Some(bytes) => self.decode_device(id.as_str(), bytes.value())?,
                None => return Ok(None),
            };
            self.revoke_certs_in(&mut certs, id, None, at)?;
            let mut retained = txn.open_table(RETAINED).ctx(path)?;
            for which in RetainedKind::ALL {
                retained.remove(which.key(id).as_str()).ctx(path)?;
            }
            let mut history = txn.open_table(HISTORY).ctx(path)?;
            let (lo, hi) = device_range(id);
            history
                .retain_in(lo.as_str()..hi.as_str(), |_, _| false)
                .ctx(path)?;
            device
        };
        txn.commit().ctx(path)?;
        Ok(Some(removed))
    }

    /// Sets `revoked_at` on every unrevoked certificate of `id` but `keep`,
    /// inside the caller's transaction; returns how many. A full scan: a hub
    /// holds hundreds of certificates, not millions, and an index table
    /// would be one more thing to keep consistent.
    fn revoke_certs_in(
        &self,
        certs: &mut redb::Table<&str, &[u8]>,
        id: &DeviceId,
        keep: Option<&str>,
        at: i64,
    ) -> Result<usize, Error> {
        let path = &*self.path;
        let mut to_revoke = Vec::new();
        for entry in certs.iter().ctx(path)? {
            let (key, value) = entry.ctx(path)?;
            let cert = self.decode_cert(key.value(), value.value())?;
            if cert.device == *id
                && cert.revoked_at.is_none()
                && Some(cert.serial_hex.as_str()) != keep
            {
                to_revoke.push(cert);
            }
        }
        for cert in &mut to_revoke {
            cert.revoked_at = Some(at);
            let bytes = self.encode("certs", &cert.serial_hex, &*cert)?;
            certs
                .insert(cert.serial_hex.as_str(), bytes.as_slice())
                .ctx(path)?;
        }
        Ok(to_revoke.len())
    }

    /// Records the latest retained payloads (an empty payload clears, as in
    /// MQTT), in one transaction for the whole batch.
    ///
    /// Not durable on return, like [`Store::touch_last_seen`]: device state
    /// changes at message rate, so the edge batches it and this commits
    /// without fsync. The periodic flush (every minute) and the flush at
    /// shutdown make it durable; a power cut loses at most the state updates
    /// since the last flush, and the device republishes its state when it
    /// reconnects.
    pub fn put_retained(&self, batch: &[(DeviceId, RetainedKind, Vec<u8>)]) -> Result<(), Error> {
        let path = &*self.path;
        let mut txn = self.db.begin_write().ctx(path)?;
        txn.set_durability(Durability::None).ctx(path)?;
        {
            let mut retained = txn.open_table(RETAINED).ctx(path)?;
            for (id, which, payload) in batch {
                let key = which.key(id);
                if payload.is_empty() {
                    retained.remove(key.as_str()).ctx(path)?;
                } else {
                    let sealed = self.seal("retained", &key, payload)?;
                    retained.insert(key.as_str(), sealed.as_slice()).ctx(path)?;
                }
            }
        }
        txn.commit().ctx(path)
    }

    /// Every stored retained payload, for the hub to publish again at start.
    pub fn retained(&self) -> Result<Vec<(DeviceId, RetainedKind, Vec<u8>)>, Error> {
        let path = &*self.path;
        let txn = self.db.begin_read().ctx(path)?;
        let retained = txn.open_table(RETAINED).ctx(path)?;
        let mut out = Vec::new();
        for entry in retained.iter().ctx(path)? {
            let (key, value) = entry.ctx(path)?;
            let key = key.value();
            let parsed = key.split_once('/').and_then(|(id, which)| {
                Some((DeviceId::parse(id).ok()?, RetainedKind::from_suffix(which)?))
            });
            let Some((id, which)) = parsed else {
                return Err(self.corrupt("retained", key, "not <device id>/state or /meta".into()));
            };
            out.push((id, which, self.open_sealed("retained", key, value.value())?));
        }
        Ok(out)
    }

    /// Appends to the history, in one transaction. Not durable on return,
    /// like [`Store::put_retained`]: history comes at message rate and a
    /// power cut may lose the last minute of it.
    pub fn append_history(&self, records: &[HistoryRecord]) -> Result<(), Error> {
        let path = &*self.path;
        let mut txn = self.db.begin_write().ctx(path)?;
        txn.set_durability(Durability::None).ctx(path)?;
        {
            let mut table = txn.open_table(HISTORY).ctx(path)?;
            for record in records {
                // The sequence tells apart records of one device in one ms.
                let mut seq = 0u32;
                let key = loop {
                    let key = record.key(seq);
                    if table.get(key.as_str()).ctx(path)?.is_none() {
                        break key;
                    }
                    seq += 1;
                };
                let bytes = self.encode("history", &key, record)?;
                table.insert(key.as_str(), bytes.as_slice()).ctx(path)?;
            }
        }
        txn.commit().ctx(path)
    }

    /// One device's history (all devices' when `None`), oldest first per device.
    pub fn history(&self, device: Option<&DeviceId>) -> Result<Vec<HistoryRecord>, Error> {
        let path = &*self.path;
        let txn = self.db.begin_read().ctx(path)?;
        let table = txn.open_table(HISTORY).ctx(path)?;
        let mut out = Vec::new();
        let entries = match device {
            Some(id) => {
                let (lo, hi) = device_range(id);
                table.range(lo.as_str()..hi.as_str()).ctx(path)?
            }
            None => table.range::<&str>(..).ctx(path)?,
        };
        for entry in entries {
            let (k, v) = entry.ctx(path)?;
            out.push(self.decode::<HistoryRecord>("history", k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Deletes history older than `cutoff_ms` (Unix ms); returns how many
    /// records went. Durable on return. The age is in the key, so nothing
    /// is decrypted to decide.
    pub fn prune_history(&self, cutoff_ms: i64) -> Result<u64, Error> {
        let path = &*self.path;
        let txn = self.db.begin_write().ctx(path)?;
        let mut pruned = 0u64;
        {
            let mut table = txn.open_table(HISTORY).ctx(path)?;
            let cutoff = format!("{:016x}", cutoff_ms.max(0));
            table
                .retain(|key, _| {
                    let old = key
                        .rsplit_once('/')
                        .is_some_and(|(_, t)| t.get(..16).is_some_and(|t| t < cutoff.as_str()));
                    pruned += u64::from(old);
                    !old
                })
                .ctx(path)?;
        }
        txn.commit().ctx(path)?;
        Ok(pruned)
    }

    /// How many records each sealed table holds, by table name.
    pub fn counts(&self) -> Result<Vec<(&'static str, u64)>, Error> {
        let path = &*self.path;
        let txn = self.db.begin_read().ctx(path)?;
        let mut out = Vec::new();
        for (table, name) in Self::sealed_tables() {
            let t = txn.open_table(table).ctx(path)?;
            out.push((name, t.len().ctx(path)?));
        }
        Ok(out)
    }

    /// The names of the tables the file actually holds.
    pub fn table_names(&self) -> Result<Vec<String>, Error> {
        let path = &*self.path;
        let txn = self.db.begin_read().ctx(path)?;
        let names = txn
            .list_tables()
            .ctx(path)?
            .map(|t| t.name().to_owned())
            .collect();
        Ok(names)
    }

    /// Every stored rule, in id order.
    pub fn rules(&self) -> Result<Vec<RuleRecord>, Error> {
        let path = &*self.path;
        let txn = self.db.begin_read().ctx(path)?;
        let rules = txn.open_table(RULES).ctx(path)?;
        let mut out = Vec::new();
        for entry in rules.iter().ctx(path)? {
            let (key, value) = entry.ctx(path)?;
            let rule: RuleRecord = self.decode("rules", key.value(), value.value())?;
            if rule.id != key.value() {
                return Err(self.corrupt(
                    "rules",
                    key.value(),
                    format!("record is for rule id {}", rule.id),
                ));
            }
            out.push(rule);
        }
        Ok(out)
    }

    /// Replaces the whole rule set with `rules` in one durable transaction:
    /// afterwards the table holds exactly these, or (on error) exactly what
    /// it held before.
    pub fn replace_rules(&self, rules: &[RuleRecord]) -> Result<(), Error> {
        let path = &*self.path;
        let txn = self.db.begin_write().ctx(path)?;
        {
            let mut table = txn.open_table(RULES).ctx(path)?;
            table.retain(|_, _| false).ctx(path)?;
            for rule in rules {
                let bytes = self.encode("rules", &rule.id, rule)?;
                if table
                    .insert(rule.id.as_str(), bytes.as_slice())
                    .ctx(path)?
                    .is_some()
                {
                    return Err(self.exists("rules", &rule.id));
                }
            }
        }
        txn.commit().ctx(path)
    }

    /// The automation's hub variables.
    pub fn automation_vars(&self) -> Result<Vec<(String, serde_json::Value)>, Error> {
        let path = &*self.path;
        let txn = self.db.begin_read().ctx(path)?;
        let table = txn.open_table(AUTOMATION).ctx(path)?;
        match table.get(VARS_KEY).ctx(path)? {
            Some(bytes) => self.decode("automation", VARS_KEY, bytes.value()),
            None => Ok(Vec::new()),
        }
    }

    /// Replaces the hub variables. Durable on return: a variable such as
    /// "away" must not come back wrong after a power cut.
    pub fn put_automation_vars(&self, vars: &[(String, serde_json::Value)]) -> Result<(), Error> {
        let path = &*self.path;
        let txn = self.db.begin_write().ctx(path)?;
        {
            let mut table = txn.open_table(AUTOMATION).ctx(path)?;
            let bytes = self.encode("automation", VARS_KEY, &vars)?;
            table.insert(VARS_KEY, bytes.as_slice()).ctx(path)?;
        }
        txn.commit().ctx(path)
    }

    /// Every certificate ever issued, revoked or not.
    pub fn all_certs(&self) -> Result<Vec<CertRecord>, Error> {
        self.certs_where(|_| true)
    }

    /// Every revoked certificate: the content of the next CRL.
    pub fn revoked_certs(&self) -> Result<Vec<CertRecord>, Error> {
        self.certs_where(|c| c.revoked_at.is_some())
    }

    /// The certificate with this serial (lowercase hex), if any.
    pub fn cert(&self, serial_hex: &str) -> Result<Option<CertRecord>, Error> {
        let path = &*self.path;
        let txn = self.db.begin_read().ctx(path)?;
        let certs = txn.open_table(CERTS).ctx(path)?;
        let Some(bytes) = certs.get(serial_hex).ctx(path)? else {
            return Ok(None);
        };
        self.decode_cert(serial_hex, bytes.value()).map(Some)
    }

    /// Sets the device's `last_seen`. An unknown id is not an error: there is
    /// nothing to update, and whoever saw the device decides what that means.
    ///
    /// Not durable on return. `last_seen` changes at connection rate and is
    /// not something a user was told was saved, so this commits with redb's
    /// `Durability::None` and skips the fsync. redb keeps such a commit in
    /// memory (readers see it at once) and writes it to disk only with the
    /// next durable commit: any other write of this store, [`Store::flush`],
    /// or the clean close when the last `Store` clone is dropped. A crash or
    /// power cut loses the `last_seen` updates made since then, nothing else.
    /// The daemon calls `flush` now and then to bound that loss, and because
    /// redb cannot reuse freed pages until a durable commit.
    pub fn touch_last_seen(&self, id: &DeviceId, at: i64) -> Result<(), Error> {
        let path = &*self.path;
        let mut txn = self.db.begin_write().ctx(path)?;
        txn.set_durability(Durability::None).ctx(path)?;
        {
            let mut devices = txn.open_table(DEVICES).ctx(path)?;
            let mut device = match devices.get(id.as_str()).ctx(path)? {
                Some(bytes) => self.decode_device(id.as_str(), bytes.value())?,
                None => return Ok(()),
            };
            device.last_seen = at;
            let bytes = self.encode("devices", id.as_str(), &device)?;
            devices.insert(id.as_str(), bytes.as_slice()).ctx(path)?;
        }
        txn.commit().ctx(path)
    }

    /// Makes every earlier non-durable commit (see
    /// [`Store::touch_last_seen`]) durable, with an empty durable commit.
    pub fn flush(&self) -> Result<(), Error> {
        let path = &*self.path;
        let txn = self.db.begin_write().ctx(path)?;
        txn.commit().ctx(path)
    }

    /// The next CRL number: persisted in `meta`, durable before it is
    /// returned, so a number is never handed out twice, not even across a
    /// crash. The first is 1.
    pub fn next_crl_number(&self) -> Result<u64, Error> {
        let path = &*self.path;
        let txn = self.db.begin_write().ctx(path)?;
        let next = {
            let mut meta = txn.open_table(META).ctx(path)?;
            let current = self.meta_get::<u64>(&meta, META_CRL_NUMBER)?.unwrap_or(0);
            let next = current.checked_add(1).ok_or_else(|| {
                self.corrupt(
                    "meta",
                    META_CRL_NUMBER,
                    "CRL number at its maximum".to_owned(),
                )
            })?;
            self.meta_put(&mut meta, META_CRL_NUMBER, &next)?;
            next
        };
        txn.commit().ctx(path)?;
        Ok(next)
    }

    /// The schema version recorded in the file.
    pub fn schema_version(&self) -> Result<u32, Error> {
        let path = &*self.path;
        let txn = self.db.begin_read().ctx(path)?;
        let meta = txn.open_table(META).ctx(path)?;
        self.meta_get::<u32>(&meta, META_SCHEMA_VERSION)?
            .ok_or_else(|| self.corrupt("meta", META_SCHEMA_VERSION, "missing".to_owned()))
    }

    /// Every table whose values are sealed, with its name.
    fn sealed_tables() -> [(
        TableDefinition<'static, &'static str, &'static [u8]>,
        &'static str,
    ); 10] {
        [
            (DEVICES, "devices"),
            (CERTS, "certs"),
            (RETAINED, "retained"),
            (HISTORY, "history"),
            (RULES, "rules"),
            (AUTOMATION, "automation"),
            (SECLOG, "seclog"),
            (FIRMWARE, "firmware"),
            (FIRMWARE_IMAGES, "firmware_images"),
            (VENDOR_KEYS, "vendor_keys"),
        ]
    }

    // Every value but meta's goes through `seal`/`open_sealed` (records
    // through `encode`/`decode` first); nothing else reads or writes value
    // bytes.

    fn seal(&self, table: &'static str, key: &str, plain: &[u8]) -> Result<Vec<u8>, Error> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| Error::Encode {
            path: self.path.to_path_buf(),
            table,
            key: key.to_owned(),
            detail: "the OS random number generator failed".to_owned(),
        })?;
        let mut out = Vec::with_capacity(NONCE_LEN + plain.len() + CHACHA20_POLY1305.tag_len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let tag = self
            .key
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(slot(table, key)),
                &mut out[NONCE_LEN..],
            )
            .map_err(|_| Error::Encode {
                path: self.path.to_path_buf(),
                table,
                key: key.to_owned(),
                detail: "sealing failed".to_owned(),
            })?;
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    fn open_sealed(&self, table: &'static str, key: &str, bytes: &[u8]) -> Result<Vec<u8>, Error> {
        let bad = || {
            self.corrupt(
                table,
                key,
                "cannot be decrypted: not sealed with this hub's data key, or changed".to_owned(),
            )
        };
        if bytes.len() < NONCE_LEN + CHACHA20_POLY1305.tag_len() {
            return Err(bad());
        }
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| bad())?;
        let mut buf = sealed.to_vec();
        let plain = self
            .key
            .key
            .open_in_place(nonce, Aad::from(slot(table, key)), &mut buf)
            .map_err(|_| bad())?;
        Ok(plain.to_vec())
    }

    fn encode<T: Serialize>(
        &self,
        table: &'static str,
        key: &str,
        value: &T,
    ) -> Result<Vec<u8>, Error> {
        let json = serde_json::to_vec(value).map_err(|e| Error::Encode {
            path: self.path.to_path_buf(),
            table,
            key: key.to_owned(),
            detail: e.to_string(),
        })?;
        self.seal(table, key, &json)
    }

    fn decode<T: DeserializeOwned>(
        &self,
        table: &'static str,
        key: &str,
        bytes: &[u8],
    ) -> Result<T, Error> {
        let json = self.open_sealed(table, key, bytes)?;
        serde_json::from_slice(&json).map_err(|e| self.corrupt(table, key, e.to_string()))
    }

    /// Decodes a device and checks that it is filed under its own id, so a
    /// record copied to another key cannot impersonate another device.
    fn decode_device(&self, key: &str, bytes: &[u8]) -> Result<DeviceRecord, Error> {
        let device: DeviceRecord = self.decode("devices", key, bytes)?;
        if device.id.as_str() != key {
            return Err(self.corrupt(
                "devices",
                key,
                format!("record is for device {}", device.id),
            ));
        }
        Ok(device)
    }

    fn decode_cert(&self, key: &str, bytes: &[u8]) -> Result<CertRecord, Error> {
        let cert: CertRecord = self.decode("certs", key, bytes)?;
        if cert.serial_hex != key {
            return Err(self.corrupt(
                "certs",
                key,
                format!("record is for serial {}", cert.serial_hex),
            ));
        }
        Ok(cert)
    }

    fn meta_get<T: DeserializeOwned>(
        &self,
        meta: &impl ReadableTable<&'static str, &'static [u8]>,
        key: &'static str,
    ) -> Result<Option<T>, Error> {
        match meta.get(key).ctx(&self.path)? {
            Some(bytes) => serde_json::from_slice(bytes.value())
                .map(Some)
                .map_err(|e| self.corrupt("meta", key, e.to_string())),
            None => Ok(None),
        }
    }

    fn meta_put<T: Serialize>(
        &self,
        meta: &mut redb::Table<&'static str, &'static [u8]>,
        key: &'static str,
        value: &T,
    ) -> Result<(), Error> {
        let bytes = serde_json::to_vec(value).map_err(|e| Error::Encode {
            path: self.path.to_path_buf(),
            table: "meta",
            key: key.to_owned(),
            detail: e.to_string(),
        })?;
        meta.insert(key, bytes.as_slice()).ctx(&self.path)?;
        Ok(())
    }

    fn corrupt(&self, table: &'static str, key: &str, detail: String) -> Error {
        Error::Corrupt {
            path: self.path.to_path_buf(),
            table,
            key: key.to_owned(),
            detail,
        }
    }

    fn exists(&self, table: &'static str, key: &str) -> Error {
        Error::Exists {
            path: self.path.to_path_buf(),
            table,
            key: key.to_owned(),
        }
    }
}

/// Creates the store file readable by hubd alone (0600) if it does not exist
/// yet. redb would create it with the umask's mode; the state directory is
/// private already, and this keeps the file private even if it is not.
fn create_private(path: &Path) -> io::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One key for the whole test process, so stores reopen.
    fn test_key() -> DataKey {
        static KEY: std::sync::OnceLock<DataKey> = std::sync::OnceLock::new();
        KEY.get_or_init(DataKey::ephemeral).clone()
    }

    fn device(id: &str, serial: &str) -> (DeviceRecord, CertRecord) {
        let id = DeviceId::parse(id).unwrap();
        let device = DeviceRecord {
            id: id.clone(),
            name: "Kitchen sensor".to_owned(),
            state: DeviceState::Active,
            created_at: 1_700_000_000,
            last_seen: 1_700_000_000,
            cert_serial: serial.to_owned(),
            cert_not_after: 1_800_000_000,
            role: Role::Device,
            isolation_reason: None,
            grants: Grants::default(),
            kind: None,
            lifecycle: Default::default(),
        };
        let cert = CertRecord {
            serial_hex: serial.to_owned(),
            device: id,
            issued_at: 1_700_000_000,
            not_after: 1_800_000_000,
            revoked_at: None,
        };
        (device, cert)
    }

    fn temp_store() -> (tempfile::TempDir, PathBuf, Store) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.redb");
        let store = Store::open(&path, test_key()).unwrap();
        (dir, path, store)
    }

    #[test]
    fn open_creates_tables_and_schema() {
        let (_dir, path, store) = temp_store();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        assert!(store.devices().unwrap().is_empty());
        assert!(store.revoked_certs().unwrap().is_empty());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn missing_parent_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no/such/hub.redb");
        let msg = Store::open(&path, test_key()).unwrap_err().to_string();
        assert!(
            msg.starts_with(&format!("store {}: cannot open", path.display())),
            "{msg}"
        );
    }

    #[test]
    fn garbage_file_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.redb");
        std::fs::write(&path, vec![0x5a; 64 * 1024]).unwrap();
        let err = Store::open(&path, test_key()).unwrap_err();
        assert!(matches!(err, Error::Open { .. }), "{err}");
    }

    #[test]
    fn values_are_sealed_on_disk_and_need_the_right_key() {
        let (dir, path, store) = temp_store();
        let (mut d, c) = device("dev-1", "01");
        d.name = "canary-7f3e kitchen".to_owned();
        store.enroll(&d, &c).unwrap();
        store
            .put_retained(&[(d.id.clone(), RetainedKind::State, b"canary-7f3e".to_vec())])
            .unwrap();
        store.flush().unwrap();
        drop(store);
        let raw = std::fs::read(&path).unwrap();
        assert!(
            !raw.windows(11).any(|w| w == b"canary-7f3e"),
            "personal data in clear in the store file"
        );
        // Another key cannot open it, and says so before reading anything.
        let err = Store::open(&path, DataKey::ephemeral()).unwrap_err();
        assert!(matches!(err, Error::DataKey { .. }), "{err}");
        assert!(err.to_string().contains("another data key"), "{err}");
        let store = Store::open(&path, test_key()).unwrap();
        assert_eq!(store.device(&d.id).unwrap().unwrap().name, d.name);
        drop(dir);
    }

    #[test]
    fn a_schema_1_store_in_clear_is_sealed_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.redb");
        let (d, c) = device("dev-1", "01");
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut meta = txn.open_table(META).unwrap();
                meta.insert(META_SCHEMA_VERSION, b"1".as_slice()).unwrap();
                let mut devices = txn.open_table(DEVICES).unwrap();
                let json = serde_json::to_vec(&d).unwrap();
                devices.insert("dev-1", json.as_slice()).unwrap();
                let mut certs = txn.open_table(CERTS).unwrap();
                let json = serde_json::to_vec(&c).unwrap();
                certs.insert("01", json.as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        assert_eq!(Store::peek_schema(&path).unwrap(), Some(1));
        let store = Store::open(&path, test_key()).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(store.device(&d.id).unwrap(), Some(d.clone()));
        assert_eq!(store.cert("01").unwrap(), Some(c));
        drop(store);
        let raw = std::fs::read(&path).unwrap();
        assert!(!raw.windows(14).any(|w| w == b"Kitchen sensor"));
        assert_eq!(Store::peek_schema(&path).unwrap(), Some(SCHEMA_VERSION));
        assert_eq!(
            Store::peek_schema(&dir.path().join("none.redb")).unwrap(),
            None
        );
    }

    #[test]
    fn the_data_key_file_is_private_and_checked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys").join("data.key");
        let err = DataKey::open_or_create(&path, false).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        DataKey::open_or_create(&path, true).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        assert_eq!(std::fs::read(&path).unwrap().len(), DATA_KEY_LEN);
        DataKey::open_or_create(&path, false).unwrap();
        assert_eq!(format!("{:?}", DataKey::ephemeral()), "DataKey(..)");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = DataKey::open_or_create(&path, false).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, b"short").unwrap();
        let err = DataKey::open_or_create(&path, false).unwrap_err();
        assert!(err.to_string().contains("not a hubd data key"), "{err}");
    }

    #[test]
    fn the_privacy_inventory_names_exactly_the_tables_the_store_has() {
        let (_dir, _path, store) = temp_store();
        let mut actual = store.table_names().unwrap();
        actual.sort();
        let mut listed: Vec<String> = INVENTORY
            .iter()
            .filter_map(|i| i.table.map(str::to_owned))
            .collect();
        listed.sort();
        assert_eq!(actual, listed);
        // Every sealed table is in it, and said to be encrypted.
        for table in SEALED_TABLES {
            let item = INVENTORY.iter().find(|i| i.table == Some(table)).unwrap();
            assert!(item.place.contains("encrypted"), "{item:?}");
        }
    }

    fn rec(device: &str, at_ms: i64, payload: &str) -> HistoryRecord {
        HistoryRecord {
            device: DeviceId::parse(device).unwrap(),
            at_ms,
            topic: "state".to_owned(),
            payload: payload.to_owned(),
        }
    }

    #[test]
    fn history_is_per_device_in_time_order_pruned_by_age_and_removed_with_its_device() {
        let (_dir, _path, store) = temp_store();
        let (d, c) = device("dev-1", "01");
        store.enroll(&d, &c).unwrap();
        store
            .append_history(&[
                rec("dev-1", 3_000, "c"),
                rec("dev-1", 1_000, "a"),
                rec("dev-1", 1_000, "a2"),
                rec("dev-2", 2_000, "b"),
            ])
            .unwrap();
        let mine: Vec<String> = store
            .history(Some(&d.id))
            .unwrap()
            .into_iter()
            .map(|r| r.payload)
            .collect();
        assert_eq!(mine, ["a", "a2", "c"]);
        assert_eq!(store.history(None).unwrap().len(), 4);
        assert_eq!(store.prune_history(2_000).unwrap(), 2);
        assert_eq!(store.history(None).unwrap().len(), 2);
        store.remove_device(&d.id, 10).unwrap();
        let left = store.history(None).unwrap();
        assert_eq!(left, [rec("dev-2", 2_000, "b")]);
        let counts: std::collections::HashMap<_, _> = store.counts().unwrap().into_iter().collect();
        assert_eq!(counts["history"], 1);
        assert_eq!(counts["devices"], 0);
    }

    fn rule(id: &str, name: &str) -> RuleRecord {
        RuleRecord {
            id: id.to_owned(),
            position: 0,
            name: name.to_owned(),
            source: format!("[[rule]]\nname = {name:?}\n"),
            updated_at: 1_700_000_000,
        }
    }

    #[test]
    fn rules_are_replaced_as_a_whole_and_survive_reopen() {
        let (_dir, path, store) = temp_store();
        store
            .replace_rules(&[rule("01", "a"), rule("02", "b")])
            .unwrap();
        store
            .replace_rules(&[rule("02", "b"), rule("03", "c")])
            .unwrap();
        drop(store);
        let store = Store::open(&path, test_key()).unwrap();
        assert_eq!(
            store.rules().unwrap(),
            vec![rule("02", "b"), rule("03", "c")]
        );
    }

    #[test]
    fn a_refused_rule_set_leaves_the_stored_one_alone() {
        let (_dir, _path, store) = temp_store();
        store.replace_rules(&[rule("01", "a")]).unwrap();
        let err = store
            .replace_rules(&[rule("02", "b"), rule("02", "c")])
            .unwrap_err();
        assert!(matches!(err, Error::Exists { .. }), "{err}");
        assert_eq!(store.rules().unwrap(), vec![rule("01", "a")]);
    }

    #[test]
    fn automation_vars_round_trip() {
        let (_dir, path, store) = temp_store();
        assert!(store.automation_vars().unwrap().is_empty());
        let vars = vec![
            ("mode".to_owned(), serde_json::json!("away")),
            ("level".to_owned(), serde_json::json!(3)),
        ];
        store.put_automation_vars(&vars).unwrap();
        drop(store);
        let store = Store::open(&path, test_key()).unwrap();
        assert_eq!(store.automation_vars().unwrap(), vars);
    }

    #[test]
    fn enrolled_device_survives_reopen() {
        let (_dir, path, store) = temp_store();
        let (d, c) = device("dev-1", "0a1b");
        store.enroll(&d, &c).unwrap();
        drop(store);

        let store = Store::open(&path, test_key()).unwrap();
        assert_eq!(store.device(&d.id).unwrap(), Some(d.clone()));
        assert_eq!(store.devices().unwrap(), vec![d]);
        assert_eq!(store.cert("0a1b").unwrap(), Some(c));
        assert_eq!(store.cert("ffff").unwrap(), None);
        assert_eq!(
            store.device(&DeviceId::parse("other").unwrap()).unwrap(),
            None
        );
    }

    #[test]
    fn duplicate_enroll_is_refused_and_changes_nothing() {
        let (_dir, _path, store) = temp_store();
        let (d, c) = device("dev-1", "0a1b");
        store.enroll(&d, &c).unwrap();

        // Same id, new certificate: refused, and the new cert is not stored.
        let (mut d2, c2) = device("dev-1", "0c0d");
        d2.name = "Impostor".to_owned();
        let err = store.enroll(&d2, &c2).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Exists {
                    table: "devices",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("hub.redb"), "{err}");
        assert_eq!(store.device(&d.id).unwrap(), Some(d.clone()));
        assert_eq!(store.cert("0c0d").unwrap(), None);

        // New id, certificate serial already taken: refused, device not stored.
        let (d3, c3) = device("dev-3", "0a1b");
        let err = store.enroll(&d3, &c3).unwrap_err();
        assert!(matches!(err, Error::Exists { table: "certs", .. }), "{err}");
        assert_eq!(store.device(&d3.id).unwrap(), None);
        assert_eq!(store.cert("0a1b").unwrap(), Some(c));
        assert_eq!(store.devices().unwrap().len(), 1);
    }

    #[test]
    fn mismatched_cert_is_refused() {
        let (_dir, _path, store) = temp_store();
        let (d, _) = device("dev-1", "0a1b");
        let (_, c) = device("dev-2", "0a1b");
        assert!(matches!(store.enroll(&d, &c), Err(Error::Mismatch { .. })));
        assert!(store.devices().unwrap().is_empty());
    }

    #[test]
    fn revoke_marks_device_and_certs() {
        let (_dir, path, store) = temp_store();
        let (d1, c1) = device("dev-1", "01");
        let (d2, c2) = device("dev-2", "02");
        store.enroll(&d1, &c1).unwrap();
        store.enroll(&d2, &c2).unwrap();

        let revoked = store.revoke_device(&d1.id, 1_750_000_000).unwrap().unwrap();
        assert_eq!(revoked.state, DeviceState::Revoked);
        drop(store);

        let store = Store::open(&path, test_key()).unwrap();
        assert_eq!(
            store.device(&d1.id).unwrap().unwrap().state,
            DeviceState::Revoked
        );
        assert_eq!(
            store.device(&d2.id).unwrap().unwrap().state,
            DeviceState::Active
        );
        let crl = store.revoked_certs().unwrap();
        assert_eq!(crl.len(), 1);
        assert_eq!(crl[0].serial_hex, "01");
        assert_eq!(crl[0].revoked_at, Some(1_750_000_000));
        assert_eq!(store.cert("02").unwrap().unwrap().revoked_at, None);

        // Revoking again keeps the first revocation time.
        store.revoke_device(&d1.id, 1_760_000_000).unwrap().unwrap();
        assert_eq!(
            store.cert("01").unwrap().unwrap().revoked_at,
            Some(1_750_000_000)
        );

        let unknown = DeviceId::parse("nobody").unwrap();
        assert_eq!(store.revoke_device(&unknown, 1).unwrap(), None);
    }

    #[test]
    fn newer_schema_is_refused() {
        let (_dir, path, store) = temp_store();
        drop(store);
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut meta = txn.open_table(META).unwrap();
                let newer = serde_json::to_vec(&(SCHEMA_VERSION + 1)).unwrap();
                meta.insert(META_SCHEMA_VERSION, newer.as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        let err = Store::open(&path, test_key()).unwrap_err();
        assert!(
            matches!(err, Error::SchemaTooNew { found, supported, .. } if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "store {} has schema version {} but this hubd supports up to {}: refusing to open (upgrade hubd)",
                path.display(),
                SCHEMA_VERSION + 1,
                SCHEMA_VERSION
            )
        );
    }

    #[test]
    fn crl_number_increases_across_reopen() {
        let (_dir, path, store) = temp_store();
        assert_eq!(store.next_crl_number().unwrap(), 1);
        assert_eq!(store.next_crl_number().unwrap(), 2);
        drop(store);
        let store = Store::open(&path, test_key()).unwrap();
        assert_eq!(store.next_crl_number().unwrap(), 3);
    }

    #[test]
    fn last_seen_is_visible_at_once_and_kept_by_a_clean_close() {
        let (_dir, path, store) = temp_store();
        let (d, c) = device("dev-1", "01");
        store.enroll(&d, &c).unwrap();
        store.touch_last_seen(&d.id, 1_700_000_500).unwrap();
        assert_eq!(
            store.device(&d.id).unwrap().unwrap().last_seen,
            1_700_000_500
        );
        store
            .touch_last_seen(&DeviceId::parse("nobody").unwrap(), 1)
            .unwrap();

        // A durable commit after the non-durable one persists both.
        store.touch_last_seen(&d.id, 1_700_000_600).unwrap();
        store.flush().unwrap();
        store.touch_last_seen(&d.id, 1_700_000_700).unwrap();
        let clone = store.clone();
        drop(store);
        drop(clone);
        let store = Store::open(&path, test_key()).unwrap();
        assert_eq!(
            store.device(&d.id).unwrap().unwrap().last_seen,
            1_700_000_700
        );
    }

    #[test]
    fn corrupt_value_names_table_and_key() {
        let (_dir, path, store) = temp_store();
        let (d, _) = device("dev-1", "01");
        let json = serde_json::to_vec(&d).unwrap();
        // Sealed for dev-1's slot, and sealed for dev-8's slot with dev-1's record.
        let for_dev1 = store.seal("devices", "dev-1", &json).unwrap();
        let claims_dev1 = store.seal("devices", "dev-8", &json).unwrap();
        drop(store);
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut devices = txn.open_table(DEVICES).unwrap();
                devices.insert("dev-9", b"{not json".as_slice()).unwrap();
                devices.insert("dev-7", for_dev1.as_slice()).unwrap();
                devices.insert("dev-8", claims_dev1.as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        let store = Store::open(&path, test_key()).unwrap();
        // A value moved to another slot does not even open.
        let err = store
            .device(&DeviceId::parse("dev-7").unwrap())
            .unwrap_err();
        assert!(err.to_string().contains("cannot be decrypted"), "{err}");
        let err = store
            .device(&DeviceId::parse("dev-9").unwrap())
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("table devices, key \"dev-9\": corrupt value"),
            "{msg}"
        );
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        let err = store
            .device(&DeviceId::parse("dev-8").unwrap())
            .unwrap_err();
        assert!(
            err.to_string().contains("record is for device dev-1"),
            "{err}"
        );
        assert!(store.devices().is_err());
    }

    #[test]
    fn device_ids_are_revalidated_on_read() {
        let json = br#"{"id":"Bad/Id","name":"x","state":"Active","created_at":0,"last_seen":0,"cert_serial":"01","cert_not_after":0}"#;
        assert!(serde_json::from_slice::<DeviceRecord>(json).is_err());
    }

    #[test]
    fn renewal_removal_and_updates_are_durable_and_consistent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.redb");
        let store = Store::open(&path, test_key()).unwrap();
        let (dev, cert) = device("a", "01");
        store.enroll(&dev, &cert).unwrap();

        // A renewal adds a certificate and makes it current; the old stays valid.
        let renewed = CertRecord {
            serial_hex: "02".into(),
            issued_at: 1_700_000_100,
            ..cert.clone()
        };
        let updated = store.add_cert(&renewed).unwrap().unwrap();
        assert_eq!(updated.cert_serial, "02");
        assert!(store.cert("01").unwrap().unwrap().revoked_at.is_none());
        assert!(matches!(
            store.add_cert(&renewed),
            Err(Error::Exists { .. })
        ));
        assert_eq!(store.certs_of(&dev.id).unwrap().len(), 2);

        // Using the new one retires the old.
        assert_eq!(store.revoke_certs_except(&dev.id, "02", 5).unwrap(), 1);
        assert_eq!(store.cert("01").unwrap().unwrap().revoked_at, Some(5));
        assert_eq!(store.revoke_certs_except(&dev.id, "02", 6).unwrap(), 0);

        let isolated = store
            .update_device(&dev.id, |d| {
                d.state = DeviceState::Isolated;
                d.isolation_reason = Some("end of life".into());
            })
            .unwrap()
            .unwrap();
        assert_eq!(isolated.state, DeviceState::Isolated);
        drop(store);
        let store = Store::open(&path, test_key()).unwrap();
        assert_eq!(
            store
                .device(&dev.id)
                .unwrap()
                .unwrap()
                .isolation_reason
                .as_deref(),
            Some("end of life")
        );

        // Removal deletes the record and revokes what is left.
        let removed = store.remove_device(&dev.id, 9).unwrap().unwrap();
        assert_eq!(removed.id, dev.id);
        assert!(store.device(&dev.id).unwrap().is_none());
        assert_eq!(store.cert("02").unwrap().unwrap().revoked_at, Some(9));
        assert_eq!(store.revoked_certs().unwrap().len(), 2);
        assert!(store.remove_device(&dev.id, 10).unwrap().is_none());
        let unknown = DeviceId::parse("zz").unwrap();
        assert!(store.update_device(&unknown, |_| {}).unwrap().is_none());
    }

    #[test]
    fn records_from_before_roles_read_as_devices() {
        let old = r#"{"id":"a","name":"n","state":"Active","created_at":1,"last_seen":0,"cert_serial":"01","cert_not_after":2}"#;
        let record: DeviceRecord = serde_json::from_str(old).unwrap();
        assert_eq!(record.role, Role::Device);
        assert_eq!(record.grants, Grants::default());
        assert_eq!(record.isolation_reason, None);
    }

    #[test]
    fn retained_state_is_bounded_per_device_and_cleared_by_empty_payloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.redb");
        let store = Store::open(&path, test_key()).unwrap();
        let (dev, cert) = device("a", "01");
        store.enroll(&dev, &cert).unwrap();
        let a = dev.id.clone();
        store
            .put_retained(&[
                (a.clone(), RetainedKind::State, b"1".to_vec()),
                (a.clone(), RetainedKind::State, b"2".to_vec()),
                (a.clone(), RetainedKind::Meta, b"m".to_vec()),
            ])
            .unwrap();
        store.flush().unwrap();
        drop(store);
        let store = Store::open(&path, test_key()).unwrap();
        let mut got = store.retained().unwrap();
        got.sort_by_key(|(_, k, _)| k.suffix());
        assert_eq!(
            got,
            vec![
                (a.clone(), RetainedKind::Meta, b"m".to_vec()),
                (a.clone(), RetainedKind::State, b"2".to_vec()),
            ]
        );
        store
            .put_retained(&[(a.clone(), RetainedKind::Meta, Vec::new())])
            .unwrap();
        assert_eq!(store.retained().unwrap().len(), 1);
        store.remove_device(&a, 1).unwrap();
        assert!(store.retained().unwrap().is_empty());
    }
}
