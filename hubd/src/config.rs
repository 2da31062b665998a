//! The daemon's configuration: typed sections, their defaults, parsing from
//! TOML and validation.
//!
//! The shipped `config/hubd.toml` is embedded in the binary and is the single
//! source of the defaults a user sees: the `Default` impls below must equal it,
//! and a unit test (plus the workspace tidy test) keeps the two in step. A user
//! file overrides the defaults key by key, because every section and key is
//! optional. Unknown keys are errors so that a typo (`lisen`) is reported
//! instead of silently leaving the default in place.
//!
//! Every error names the file, the key and the offending value, so the user
//! can fix the file from the message alone.

use std::ffi::OsString;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The whole configuration of `hubd`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub hub: HubSection,
    pub edge: EdgeSection,
    pub admin: AdminSection,
    pub ca: CaSection,
    pub pairing: PairingSection,
    pub automation: AutomationSection,
    pub privacy: PrivacySection,
    pub lifecycle: LifecycleSection,
    pub seclog: SeclogSection,
    pub telemetry: TelemetrySection,
}

/// `[hub]`: identity, state and logging.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HubSection {
    /// Short hub name, 1..=32 characters of `[a-z0-9-]`, not starting or
    /// ending with `-` (it ends up in DNS-like names).
    pub name: String,
    /// Where the store, CA and keys live; `None` means "resolve from the
    /// environment" (see [`Config::resolve_state_dir`]).
    pub state_dir: Option<PathBuf>,
    /// A tracing `EnvFilter` directive such as `"info"`.
    pub log: String,
}

/// `[edge]`: the device-facing MQTT-over-mutual-TLS listener.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EdgeSection {
    /// Address the edge listener binds.
    pub listen: SocketAddr,
    /// Extra DNS names or IP addresses for the server certificate.
    pub server_names: Vec<String>,
    /// A TLS handshake that takes longer is dropped.
    #[serde(deserialize_with = "deserialize_duration")]
    pub handshake_timeout: Duration,
    /// The MQTT CONNECT must arrive within this after the TLS handshake.
    #[serde(deserialize_with = "deserialize_duration")]
    pub connect_timeout: Duration,
    /// Cap on TLS handshakes running at once.
    pub max_concurrent_handshakes: usize,
    /// New connections per second (token bucket refill).
    pub admission_rate: u32,
    /// New connections in a burst (token bucket size).
    pub admission_burst: u32,
    /// Whether TLS 1.2 is offered besides TLS 1.3.
    pub allow_tls12: bool,
    /// Largest MQTT packet accepted, in bytes.
    pub max_packet_size: usize,
    /// Longest topic name accepted, in bytes.
    pub max_topic_length: usize,
    /// Most levels a topic name may have.
    pub max_topic_depth: usize,
    /// Most device connections open at once.
    pub max_connections: usize,
    /// Bound of each connection's outgoing message queue.
    pub outgoing_queue: usize,
    /// Denied PUBLISHes after which an MQTT 3.1.1 client is disconnected.
    pub max_acl_violations: u32,
}

/// `[admin]`: the gRPC admin API on a Unix socket.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSection {
    /// Socket path; `None` means "resolve from the environment" (see
    /// [`Config::resolve_socket`]).
    pub socket: Option<PathBuf>,
    /// Unix group allowed to use the socket.
    pub group: String,
}

/// `[ca]`: lifetimes of the certificates the hub's CA issues.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CaSection {
    pub device_validity_days: u32,
    pub server_validity_days: u32,
    /// Renew the server certificate this many days before it expires.
    pub server_renew_before_days: u32,
    /// A device certificate superseded by a renewal is revoked when the
    /// device first connects with the new one, or after this many days.
    pub renewal_grace_days: u32,
}

/// `[pairing]`: one-time setup codes and the pairing listener.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PairingSection {
    /// Address the pairing listener binds while a window is open.
    pub listen: SocketAddr,
    /// Host name or address put in pairing URIs; empty means this machine's
    /// host name.
    pub advertise_host: String,
    /// How long a pairing window stays open unless `hubctl pair --window` says.
    #[serde(deserialize_with = "deserialize_duration")]
    pub window: Duration,
    /// The longest window `hubctl pair --window` may ask for.
    #[serde(deserialize_with = "deserialize_duration")]
    pub max_window: Duration,
    /// Wrong codes that close a window.
    pub max_failures: u32,
    /// Attempts from one address closer together than this are refused.
    #[serde(deserialize_with = "deserialize_duration")]
    pub attempt_interval: Duration,
}

/// `[automation]`: the rules engine.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AutomationSection {
    /// IANA time zone for `at`, `cron`, time windows and weekdays; empty
    /// means the system's (`TZ`, else `/etc/localtime`).
    pub timezone: String,
    /// Rule runs kept for `hubctl rules history`.
    pub history: usize,
}

/// `[privacy]`: how long personal data is kept.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrivacySection {
    /// Days of device history (states and events) kept; older records are
    /// deleted hourly. 0 keeps no history at all.
    pub history_days: u32,
}

/// What a firmware integrity failure does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IntegrityPolicy {
    /// Record a security event and alert.
    Alert,
    /// Alert, and isolate the device.
    Isolate,
}

/// `[lifecycle]`: firmware, support periods and updates.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LifecycleSection {
    /// Isolate a device once its support period has ended.
    pub isolate_after_support_end: bool,
    /// A support end this many days away or closer reads "ends soon".
    pub support_warning_days: u32,
    /// Unrecognised firmware, or firmware that changed without an offered
    /// update: `alert` or `isolate`.
    pub on_integrity_failure: IntegrityPolicy,
    /// Bytes per firmware download chunk.
    pub ota_chunk_size: usize,
    /// The largest firmware image the catalogue takes, in bytes.
    pub max_image_size: usize,
}

/// What an anomaly does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnomalyPolicy {
    /// A security event (warning), nothing more.
    Log,
    /// A security event (alert): status, the journal and `$hub/alerts`.
    Alert,
    /// The alert, and the device is isolated.
    Isolate,
}

/// `[telemetry]`: per-device baselines and anomaly thresholds.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySection {
    /// The length of a counting window.
    #[serde(deserialize_with = "deserialize_duration")]
    pub window: Duration,
    /// Windows of history a device needs before rate and size anomalies.
    pub warmup_windows: u32,
    /// A window with more than this many times the baseline's messages...
    pub rate_factor: u32,
    /// ...and more than this many messages is a flood.
    pub min_messages: u64,
    /// A payload more than this many times the baseline's size...
    pub size_factor: u32,
    /// ...and larger than this many bytes is oversized.
    pub min_payload_bytes: usize,
    /// Refused topics in one window that count as probing.
    pub max_acl_denials: u32,
    /// Sessions in one window that count as a reconnect loop.
    pub max_reconnects: u32,
    /// Refused TLS handshakes from one address in one window that throttle it.
    pub max_handshake_failures: u32,
    /// How long a throttled address's connections are refused.
    #[serde(deserialize_with = "deserialize_duration")]
    pub throttle: Duration,
    pub on_message_rate: AnomalyPolicy,
    pub on_payload_size: AnomalyPolicy,
    pub on_probing: AnomalyPolicy,
    pub on_reconnects: AnomalyPolicy,
}

/// `[seclog]`: how long security events are kept.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SeclogSection {
    /// Days of security events kept; older entries are deleted hourly.
    pub retention_days: u32,
    /// At most this many entries are kept (the oldest go first).
    pub max_entries: u64,
}

// The defaults below must equal config/hubd.toml; the unit test
// `shipped_file_equals_default` fails when they drift apart.

impl Default for HubSection {
    fn default() -> Self {
        HubSection {
            name: "hub".to_owned(),
            state_dir: None,
            log: "info".to_owned(),
        }
    }
}

impl Default for EdgeSection {
    fn default() -> Self {
        EdgeSection {
            listen: SocketAddr::from(([0, 0, 0, 0], 8883)),
            server_names: Vec::new(),
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            max_concurrent_handshakes: 64,
            admission_rate: 50,
            admission_burst: 100,
            allow_tls12: false,
            max_packet_size: 256 * 1024,
            max_topic_length: 256,
            max_topic_depth: 16,
            max_connections: 1024,
            outgoing_queue: 1024,
            max_acl_violations: 10,
        }
    }
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            socket: None,
            group: "hubadmin".to_owned(),
        }
    }
}

impl Default for CaSection {
    fn default() -> Self {
        CaSection {
            device_validity_days: 365,
            server_validity_days: 90,
            server_renew_before_days: 30,
            renewal_grace_days: 7,
        }
    }
}

impl Default for PairingSection {
    fn default() -> Self {
        PairingSection {
            listen: SocketAddr::from(([0, 0, 0, 0], 8884)),
            advertise_host: String::new(),
            window: Duration::from_secs(5 * 60),
            max_window: Duration::from_secs(60 * 60),
            max_failures: 5,
            attempt_interval: Duration::from_secs(1),
        }
    }
}

impl Default for AutomationSection {
    fn default() -> Self {
        AutomationSection {
            timezone: String::new(),
            history: 1000,
        }
    }
}

impl Default for PrivacySection {
    fn default() -> Self {
        PrivacySection { history_days: 7 }
    }
}

impl Default for LifecycleSection {
    fn default() -> Self {
        LifecycleSection {
            isolate_after_support_end: true,
            support_warning_days: 90,
            on_integrity_failure: IntegrityPolicy::Isolate,
            ota_chunk_size: 16 * 1024,
            max_image_size: 32 * 1024 * 1024,
        }
    }
}

impl Default for TelemetrySection {
    fn default() -> Self {
        TelemetrySection {
            window: Duration::from_secs(60),
            warmup_windows: 5,
            rate_factor: 10,
            min_messages: 120,
            size_factor: 10,
            min_payload_bytes: 4096,
            max_acl_denials: 10,
            max_reconnects: 10,
            max_handshake_failures: 20,
            throttle: Duration::from_secs(60),
            on_message_rate: AnomalyPolicy::Alert,
            on_payload_size: AnomalyPolicy::Log,
            on_probing: AnomalyPolicy::Isolate,
            on_reconnects: AnomalyPolicy::Alert,
        }
    }
}

impl Default for SeclogSection {
    fn default() -> Self {
        SeclogSection {
            retention_days: 365,
            max_entries: 100_000,
        }
    }
}

impl AutomationSection {
    /// The time zone rules run in.
    pub fn time_zone(&self) -> Result<jiff::tz::TimeZone, Error> {
        if self.timezone.is_empty() {
            return Ok(jiff::tz::TimeZone::system());
        }
        jiff::tz::TimeZone::get(&self.timezone).map_err(|e| {
            invalid(
                "automation",
                "timezone",
                quoted(&self.timezone),
                &format!("not a known IANA time zone ({e})"),
            )
        })
    }
}

/// Why a configuration could not be loaded or is not acceptable.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("config: {}: cannot read: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The TOML is malformed, names an unknown key or has a value of the
    /// wrong type. `detail` already names the key and value where TOML
    /// tells us which.
    #[error("config: {origin}: {detail}")]
    Parse { origin: String, detail: String },
    /// A key has a well-typed value outside what hubd accepts. `value` is
    /// written as it would appear in TOML.
    #[error("config: {}[{section}] {key} = {value}: {reason}", origin_prefix(.origin))]
    Invalid {
        /// The file or `<built-in>`; `None` when a config built in code was
        /// validated.
        origin: Option<String>,
        section: &'static str,
        key: &'static str,
        value: String,
        reason: String,
    },
    /// None of the ways to find the state directory applies.
    #[error(
        "config: no state directory: set [hub] state_dir, or run under systemd with StateDirectory=, or set XDG_DATA_HOME or HOME"
    )]
    NoStateDir,
}

fn origin_prefix(origin: &Option<String>) -> String {
    match origin {
        Some(origin) => format!("{origin}: "),
        None => String::new(),
    }
}

impl Error {
    /// Attaches the file name to a validation error raised without one.
    fn with_origin(self, origin: &str) -> Error {
        match self {
            Error::Invalid {
                origin: None,
                section,
                key,
                value,
                reason,
            } => Error::Invalid {
                origin: Some(origin.to_owned()),
                section,
                key,
                value,
                reason,
            },
            other => other,
        }
    }
}

impl Config {
    /// The shipped default configuration, embedded so that the binary and the
    /// packaged file can never disagree about the defaults.
    pub const DEFAULT_TOML: &'static str = include_str!("../../config/hubd.toml");

    /// The configuration of the shipped file.
    pub fn default_config() -> Config {
        Config::from_toml(Self::DEFAULT_TOML, "<built-in>").expect(
            "config/hubd.toml is embedded at build time and a unit test checks that it parses and validates",
        )
    }

    /// Parses and validates a configuration. `origin` names the text in
    /// errors: the file's path, or `<built-in>`.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, Error> {
        let config: Config = toml::from_str(text).map_err(|e| Error::Parse {
            origin: origin.to_owned(),
            detail: describe_toml_error(text, &e),
        })?;
        config.validate().map_err(|e| e.with_origin(origin))?;
        Ok(config)
    }

    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text, &path.display().to_string())
    }

    /// Checks every value against the range hubd accepts. The ranges keep a
    /// typo (an extra zero, a missing unit) from turning into a hub that
    /// cannot accept devices or that a single client can exhaust.
    pub fn validate(&self) -> Result<(), Error> {
        let hub = &self.hub;
        if !valid_hub_name(&hub.name) {
            return Err(invalid(
                "hub",
                "name",
                quoted(&hub.name),
                "must be 1 to 32 characters of a-z, 0-9 and '-', not starting or ending with '-'",
            ));
        }
        if let Some(dir) = &hub.state_dir {
            check_absolute("hub", "state_dir", dir)?;
        }

        let edge = &self.edge;
        for name in &edge.server_names {
            if !valid_server_name(name) {
                return Err(invalid(
                    "edge",
                    "server_names",
                    quoted(name),
                    "each entry must be a DNS name or an IP address",
                ));
            }
        }
        let timeouts = Duration::from_millis(100)..=Duration::from_secs(5 * 60);
        for (key, value) in [
            ("handshake_timeout", edge.handshake_timeout),
            ("connect_timeout", edge.connect_timeout),
        ] {
            if !timeouts.contains(&value) {
                return Err(invalid(
                    "edge",
                    key,
                    quoted(&format_duration(value)),
                    "must be between 100ms and 5m",
                ));
            }
        }
        check_range(
            "edge",
            "max_concurrent_handshakes",
            edge.max_concurrent_handshakes,
            1,
            10_000,
        )?;
        check_at_least("edge", "admission_rate", edge.admission_rate, 1)?;
        check_at_least("edge", "admission_burst", edge.admission_burst, 1)?;
        check_range(
            "edge",
            "max_packet_size",
            edge.max_packet_size,
            1024,
            256 * 1024 * 1024,
        )?;
        check_range(
            "edge",
            "max_topic_length",
            edge.max_topic_length,
            16,
            65_535,
        )?;
        check_range("edge", "max_topic_depth", edge.max_topic_depth, 2, 64)?;
        check_range("edge", "max_connections", edge.max_connections, 1, 100_000)?;
        check_range("edge", "outgoing_queue", edge.outgoing_queue, 1, 1_000_000)?;

        let admin = &self.admin;
        if let Some(socket) = &admin.socket {
            check_absolute("admin", "socket", socket)?;
        }
        if admin.group.is_empty() {
            return Err(invalid(
                "admin",
                "group",
                quoted(&admin.group),
                "must not be empty",
            ));
        }

        let ca = &self.ca;
        check_range(
            "ca",
            "device_validity_days",
            ca.device_validity_days,
            1,
            3650,
        )?;
        // 825 days is the longest TLS server certificate lifetime that
        // mainstream TLS clients still accept.
        check_range(
            "ca",
            "server_validity_days",
            ca.server_validity_days,
            2,
            825,
        )?;
        if ca.server_renew_before_days >= ca.server_validity_days {
            return Err(invalid(
                "ca",
                "server_renew_before_days",
                ca.server_renew_before_days.to_string(),
                &format!(
                    "must be less than server_validity_days ({})",
                    ca.server_validity_days
                ),
            ));
        }
        check_range("ca", "renewal_grace_days", ca.renewal_grace_days, 0, 365)?;

        let pairing = &self.pairing;
        if !pairing.advertise_host.is_empty() && !valid_server_name(&pairing.advertise_host) {
            return Err(invalid(
                "pairing",
                "advertise_host",
                quoted(&pairing.advertise_host),
                "must be a DNS name or an IP address",
            ));
        }
        let windows = Duration::from_secs(10)..=Duration::from_secs(24 * 3600);
        for (key, value) in [
            ("window", pairing.window),
            ("max_window", pairing.max_window),
        ] {
            if !windows.contains(&value) {
                return Err(invalid(
                    "pairing",
                    key,
                    quoted(&format_duration(value)),
                    "must be between 10s and 24h",
                ));
            }
        }
        if pairing.window > pairing.max_window {
            return Err(invalid(
                "pairing",
                "window",
                quoted(&format_duration(pairing.window)),
                "must not be longer than max_window",
            ));
        }
        check_range("pairing", "max_failures", pairing.max_failures, 1, 100)?;
        if pairing.attempt_interval > Duration::from_secs(60) {
            return Err(invalid(
                "pairing",
                "attempt_interval",
                quoted(&format_duration(pairing.attempt_interval)),
                "must be at most 1m",
            ));
        }
        self.automation.time_zone()?;
        check_range(
            "automation",
            "history",
            self.automation.history,
            10,
            100_000,
        )?;
        check_range(
            "privacy",
            "history_days",
            self.privacy.history_days,
            0,
            3650,
        )?;
        let lifecycle = &self.lifecycle;
        check_range(
            "lifecycle",
            "support_warning_days",
            lifecycle.support_warning_days,
            0,
            3650,
        )?;
        // A chunk and its PUBLISH header must fit the edge's packet limit.
        let max_chunk = self.edge.max_packet_size.saturating_sub(1024).min(1 << 20);
        check_range(
            "lifecycle",
            "ota_chunk_size",
            lifecycle.ota_chunk_size,
            512,
            max_chunk,
        )?;
        check_range(
            "lifecycle",
            "max_image_size",
            lifecycle.max_image_size,
            1024,
            256 * 1024 * 1024,
        )?;
        check_range(
            "seclog",
            "retention_days",
            self.seclog.retention_days,
            1,
            3650,
        )?;
        check_range(
            "seclog",
            "max_entries",
            self.seclog.max_entries,
            1000,
            10_000_000,
        )?;
        Ok(())
    }

    /// The directory that holds the store, the CA and the keys.
    ///
    /// A CLI override is applied by the caller setting `hub.state_dir`, so the
    /// order is: `[hub] state_dir`; `$STATE_DIRECTORY` (set by systemd's
    /// `StateDirectory=`; when it lists several colon-separated paths the
    /// first is ours); `$XDG_DATA_HOME/hubd`; `$HOME/.local/share/hubd`.
    /// Empty and relative environment values are ignored, as the XDG base
    /// directory specification asks, so a stray `XDG_DATA_HOME=` cannot put
    /// the CA key in the current directory.
    pub fn resolve_state_dir(
        &self,
        env: &dyn Fn(&str) -> Option<OsString>,
    ) -> Result<PathBuf, Error> {
        if let Some(dir) = &self.hub.state_dir {
            return Ok(dir.clone());
        }
        if let Some(dir) = first_absolute_path(env("STATE_DIRECTORY")) {
            return Ok(dir);
        }
        if let Some(dir) = absolute_path(env("XDG_DATA_HOME")) {
            return Ok(dir.join("hubd"));
        }
        if let Some(home) = absolute_path(env("HOME")) {
            return Ok(home.join(".local/share/hubd"));
        }
        Err(Error::NoStateDir)
    }

    /// The admin API's socket path: `[admin] socket`; else
    /// `$RUNTIME_DIRECTORY/hubd.sock` (systemd's `RuntimeDirectory=`, first of
    /// several); else `$XDG_RUNTIME_DIR/hubd/hubd.sock`; else
    /// `<state_dir>/hubd.sock`, which always exists and is private to hubd.
    pub fn resolve_socket(
        &self,
        state_dir: &Path,
        env: &dyn Fn(&str) -> Option<OsString>,
    ) -> PathBuf {
        if let Some(socket) = &self.admin.socket {
            return socket.clone();
        }
        if let Some(dir) = first_absolute_path(env("RUNTIME_DIRECTORY")) {
            return dir.join("hubd.sock");
        }
        if let Some(dir) = absolute_path(env("XDG_RUNTIME_DIR")) {
            return dir.join("hubd").join("hubd.sock");
        }
        state_dir.join("hubd.sock")
    }
}

/// An environment value as an absolute path; `None` if unset, empty or
/// relative.
fn absolute_path(value: Option<OsString>) -> Option<PathBuf> {
    let path = PathBuf::from(value?);
    path.is_absolute().then_some(path)
}

/// The first of systemd's colon-separated directory list, if absolute.
fn first_absolute_path(value: Option<OsString>) -> Option<PathBuf> {
    let value = value?;
    let first = match value.to_str() {
        Some(text) => OsString::from(text.split(':').next().unwrap_or_default()),
        // systemd writes these paths itself and never splits inside a
        // non-UTF-8 name; without a colon to split at, the whole value is
        // the one path.
        None => value,
    };
    absolute_path(Some(first))
}

fn valid_hub_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// A server certificate SAN must be an IP address or a DNS name; anything
/// else would only fail later, deep inside certificate generation.
fn valid_server_name(name: &str) -> bool {
    if name.parse::<IpAddr>().is_ok() {
        return true;
    }
    let name = name.strip_suffix('.').unwrap_or(name);
    (1..=253).contains(&name.len())
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn check_absolute(section: &'static str, key: &'static str, path: &Path) -> Result<(), Error> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(invalid(
            section,
            key,
            quoted(&path.display().to_string()),
            "must be an absolute path",
        ))
    }
}

fn check_range<T>(
    section: &'static str,
    key: &'static str,
    value: T,
    min: T,
    max: T,
) -> Result<(), Error>
where
    T: PartialOrd + fmt::Display,
{
    if value < min || value > max {
        let reason = format!("must be between {min} and {max}");
        return Err(invalid(section, key, value.to_string(), &reason));
    }
    Ok(())
}

fn check_at_least(
    section: &'static str,
    key: &'static str,
    value: u32,
    min: u32,
) -> Result<(), Error> {
    if value < min {
        let reason = format!("must be at least {min}");
        return Err(invalid(section, key, value.to_string(), &reason));
    }
    Ok(())
}

fn invalid(section: &'static str, key: &'static str, value: String, reason: &str) -> Error {
    Error::Invalid {
        origin: None,
        section,
        key,
        value,
        reason: reason.to_owned(),
    }
}

/// A string as a TOML basic string, so messages show values as written.
fn quoted(value: &str) -> String {
    format!("{value:?}")
}

/// Turns toml's multi-line error into one line that names the section, the
/// key and the value as written, plus the line number.
fn describe_toml_error(text: &str, err: &toml::de::Error) -> String {
    // "unknown field" is serde's word; the user edits keys.
    let message = err
        .message()
        .trim()
        .replacen("unknown field", "unknown key", 1);
    let keys = error_keys(err);
    let span = err.span();
    let location = match keys.split_first() {
        None => String::new(),
        Some((section, [])) => format!("[{section}]: "),
        Some((section, rest)) => {
            let key = rest.join(".");
            // For a bad value toml's span covers the value exactly as the
            // user wrote it, quotes included.
            match span.clone().and_then(|s| text.get(s)) {
                Some(value) if !value.contains('\n') && value.len() <= 80 => {
                    format!("[{section}] {key} = {}: ", value.trim())
                }
                _ => format!("[{section}] {key}: "),
            }
        }
    };
    let line = span
        .and_then(|s| text.as_bytes().get(..s.start))
        .map(|before| before.iter().filter(|&&b| b == b'\n').count() + 1);
    match line {
        Some(line) => format!("{location}{message} (line {line})"),
        None => format!("{location}{message}"),
    }
}

/// The key path of a toml error, such as `["edge", "listen"]`.
///
/// toml 0.9 records the path but only shows it in its `Display` when it has
/// no input to quote, so we render a copy without the input and read the
/// final "in `a.b`" line back. If a later toml changes that format we lose
/// only the key prefix of the message, never the error; the unit tests
/// notice.
fn error_keys(err: &toml::de::Error) -> Vec<String> {
    let mut bare = err.clone();
    bare.set_input(None);
    let shown = bare.to_string();
    shown
        .strip_prefix(err.message())
        .map(str::trim)
        .and_then(|rest| rest.strip_prefix("in `"))
        .and_then(|rest| rest.strip_suffix('`'))
        .map(|path| path.split('.').map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Parses a duration such as `"500ms"`, `"10s"`, `"5m"` or `"1h"`: a whole
/// number and one unit, nothing else, so there is exactly one way to read it.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits_end);
    if number.is_empty() {
        return None;
    }
    let number: u64 = number.parse().ok()?;
    let millis_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60 * 1000,
        "h" => 60 * 60 * 1000,
        _ => return None,
    };
    number
        .checked_mul(millis_per_unit)
        .map(Duration::from_millis)
}

/// Writes a duration in the largest unit that represents it exactly, the
/// inverse of [`parse_duration`] for whole milliseconds.
pub fn format_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if !nanos.is_multiple_of(1_000_000) {
        return format!("{d:?}");
    }
    let millis = nanos / 1_000_000;
    if millis != 0 && millis.is_multiple_of(3_600_000) {
        format!("{}h", millis / 3_600_000)
    } else if millis != 0 && millis.is_multiple_of(60_000) {
        format!("{}m", millis / 60_000)
    } else if millis.is_multiple_of(1000) {
        format!("{}s", millis / 1000)
    } else {
        format!("{millis}ms")
    }
}

fn deserialize_duration<'de, D>(deserializer: D) -> Result<Duration, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Visitor;

    impl serde::de::Visitor<'_> for Visitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration string such as \"500ms\", \"10s\", \"5m\" or \"1h\"")
        }

        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Duration, E> {
            parse_duration(text).ok_or_else(|| {
                E::custom(
                    "invalid duration: expected a whole number followed by ms, s, m or h, such as \"10s\"",
                )
            })
        }
    }

    deserializer.deserialize_str(Visitor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(text: &str) -> Result<Config, Error> {
        Config::from_toml(text, "/etc/hubd/hubd.toml")
    }

    fn error(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn shipped_file_equals_default() {
        let shipped = Config::from_toml(Config::DEFAULT_TOML, "<built-in>").unwrap();
        assert_eq!(shipped, Config::default());
        assert_eq!(Config::default_config(), Config::default());
        Config::default().validate().unwrap();
    }

    #[test]
    fn shipped_file_names_every_key() {
        // A key missing from the shipped file would still parse (it is
        // optional) but the user would never learn that it exists.
        let table: toml::Table = toml::from_str(Config::DEFAULT_TOML).unwrap();
        let count = |section: &str| table[section].as_table().unwrap().len();
        assert_eq!(count("hub"), 2, "name, log (state_dir is commented out)");
        assert_eq!(count("edge"), 14);
        assert_eq!(count("admin"), 1, "group (socket is commented out)");
        assert_eq!(count("ca"), 4);
        assert_eq!(count("pairing"), 6);
        assert_eq!(count("automation"), 2);
        assert_eq!(count("privacy"), 1);
    }

    #[test]
    fn automation_settings_are_checked() {
        let msg = error("[automation]\ntimezone = \"Mars/Olympus\"\n");
        assert!(msg.contains("[automation] timezone"), "{msg}");
        let msg = error("[automation]\nhistory = 0\n");
        assert!(msg.contains("[automation] history"), "{msg}");
        let config = parse("[automation]\ntimezone = \"Europe/London\"\n").unwrap();
        assert_eq!(
            config.automation.time_zone().unwrap().iana_name(),
            Some("Europe/London")
        );
    }

    #[test]
    fn pairing_settings_are_checked() {
        let msg = error("[pairing]\nwindow = \"2h\"\n");
        assert!(
            msg.contains("[pairing] window") && msg.contains("max_window"),
            "{msg}"
        );
        let msg = error("[pairing]\nmax_failures = 0\n");
        assert!(msg.contains("max_failures"), "{msg}");
        let msg = error("[pairing]\nadvertise_host = \"not a host!\"\n");
        assert!(msg.contains("advertise_host"), "{msg}");
        let config = parse("[pairing]\nlisten = \"127.0.0.1:0\"\nwindow = \"30s\"\n").unwrap();
        assert_eq!(config.pairing.window, Duration::from_secs(30));
    }

    #[test]
    fn empty_file_is_the_default() {
        assert_eq!(parse("").unwrap(), Config::default());
    }

    #[test]
    fn partial_file_overrides_only_what_it_names() {
        let config =
            parse("[edge]\nmax_connections = 10\n\n[ca]\ndevice_validity_days = 30\n").unwrap();
        let mut expected = Config::default();
        expected.edge.max_connections = 10;
        expected.ca.device_validity_days = 30;
        assert_eq!(config, expected);
    }

    #[test]
    fn unknown_key_is_named() {
        let msg = error("[edge]\nlisen = \"127.0.0.1:1\"\n");
        assert!(
            msg.starts_with("config: /etc/hubd/hubd.toml: [edge]: unknown key `lisen`"),
            "{msg}"
        );
        assert!(msg.ends_with("(line 2)"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn unknown_section_is_named() {
        let msg = error("[egde]\nlisten = \"127.0.0.1:1\"\n");
        assert!(msg.contains("unknown key `egde`"), "{msg}");
    }

    #[test]
    fn bad_listen_names_key_and_value() {
        let msg = error("[edge]\nlisten = \"x\"\n");
        assert_eq!(
            msg,
            "config: /etc/hubd/hubd.toml: [edge] listen = \"x\": invalid socket address syntax (line 2)"
        );
    }

    #[test]
    fn wrong_type_names_key_and_value() {
        let msg = error("[ca]\ndevice_validity_days = \"many\"\n");
        assert!(
            msg.contains("[ca] device_validity_days = \"many\": invalid type"),
            "{msg}"
        );
    }

    #[test]
    fn syntax_error_has_a_line() {
        let msg = error("[edge]\nlisten = \n");
        assert!(msg.starts_with("config: /etc/hubd/hubd.toml: "), "{msg}");
        assert!(msg.contains("(line 2)"), "{msg}");
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        for bad in [
            "",
            "10",
            "s",
            "1.5s",
            "-1s",
            "10 s",
            " 10s",
            "10sec",
            "1d",
            "99999999999999999999h",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad:?} accepted");
        }
        for d in ["500ms", "10s", "5m", "1h", "0s", "90s", "1500ms"] {
            assert_eq!(format_duration(parse_duration(d).unwrap()), d);
        }
        let config =
            parse("[edge]\nhandshake_timeout = \"500ms\"\nconnect_timeout = \"5m\"\n").unwrap();
        assert_eq!(config.edge.handshake_timeout, Duration::from_millis(500));
        assert_eq!(config.edge.connect_timeout, Duration::from_secs(300));
    }

    #[test]
    fn bad_durations_name_the_key() {
        let msg = error("[edge]\nhandshake_timeout = \"10\"\n");
        assert!(
            msg.contains("[edge] handshake_timeout = \"10\": invalid duration"),
            "{msg}"
        );
        let msg = error("[edge]\nconnect_timeout = 10\n");
        assert!(
            msg.contains("[edge] connect_timeout = 10: invalid type"),
            "{msg}"
        );
        let msg = error("[edge]\nconnect_timeout = \"10m\"\n");
        assert_eq!(
            msg,
            "config: /etc/hubd/hubd.toml: [edge] connect_timeout = \"10m\": must be between 100ms and 5m"
        );
        let msg = error("[edge]\nhandshake_timeout = \"99ms\"\n");
        assert!(
            msg.contains("[edge] handshake_timeout = \"99ms\": must be between"),
            "{msg}"
        );
    }

    #[test]
    fn ranges_are_enforced() {
        let cases = [
            (
                "[edge]\nmax_concurrent_handshakes = 0",
                "[edge] max_concurrent_handshakes = 0: must be between 1 and 10000",
            ),
            (
                "[edge]\nadmission_rate = 0",
                "[edge] admission_rate = 0: must be at least 1",
            ),
            ("[edge]\nadmission_burst = 0", "[edge] admission_burst = 0"),
            (
                "[edge]\nmax_packet_size = 1023",
                "[edge] max_packet_size = 1023",
            ),
            (
                "[edge]\nmax_topic_length = 15",
                "[edge] max_topic_length = 15",
            ),
            (
                "[edge]\nmax_topic_depth = 65",
                "[edge] max_topic_depth = 65",
            ),
            (
                "[edge]\nmax_connections = 100001",
                "[edge] max_connections = 100001",
            ),
            ("[edge]\noutgoing_queue = 0", "[edge] outgoing_queue = 0"),
            (
                "[edge]\nserver_names = [\"bad name\"]",
                "[edge] server_names = \"bad name\"",
            ),
            (
                "[ca]\ndevice_validity_days = 3651",
                "[ca] device_validity_days = 3651",
            ),
            (
                "[ca]\nserver_validity_days = 826",
                "[ca] server_validity_days = 826",
            ),
            (
                "[ca]\nserver_validity_days = 30",
                "[ca] server_renew_before_days = 30: must be less than server_validity_days (30)",
            ),
            ("[hub]\nname = \"Hub\"", "[hub] name = \"Hub\""),
            ("[hub]\nname = \"-hub\"", "[hub] name = \"-hub\""),
            ("[hub]\nname = \"\"", "[hub] name = \"\""),
            (
                "[hub]\nstate_dir = \"var/lib\"",
                "[hub] state_dir = \"var/lib\": must be an absolute path",
            ),
            (
                "[admin]\ngroup = \"\"",
                "[admin] group = \"\": must not be empty",
            ),
        ];
        for (text, expected) in cases {
            let msg = error(text);
            assert!(msg.starts_with("config: /etc/hubd/hubd.toml: "), "{msg}");
            assert!(msg.contains(expected), "{text:?} gave {msg}");
        }
        let ok = "[hub]\nname = \"attic-2\"\n[edge]\nserver_names = [\"hub.local\", \"192.168.1.5\", \"::1\"]\n";
        parse(ok).unwrap();
    }

    #[test]
    fn validate_without_origin_still_names_the_key() {
        let mut config = Config::default();
        config.edge.max_topic_depth = 1;
        let msg = config.validate().unwrap_err().to_string();
        assert_eq!(
            msg,
            "config: [edge] max_topic_depth = 1: must be between 2 and 64"
        );
    }

    #[test]
    fn load_names_an_unreadable_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing.toml");
        let msg = Config::load(&path).unwrap_err().to_string();
        assert!(
            msg.starts_with(&format!("config: {}: cannot read", path.display())),
            "{msg}"
        );

        std::fs::write(&path, "[edge]\nmax_connections = 0\n").unwrap();
        let msg = Config::load(&path).unwrap_err().to_string();
        assert!(
            msg.starts_with(&format!(
                "config: {}: [edge] max_connections = 0",
                path.display()
            )),
            "{msg}"
        );
    }

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> + use<> {
        let vars: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), OsString::from(v)))
            .collect();
        move |key| vars.get(key).cloned()
    }

    #[test]
    fn state_dir_precedence() {
        let all = env(&[
            ("STATE_DIRECTORY", "/var/lib/hubd:/var/lib/other"),
            ("XDG_DATA_HOME", "/home/u/.data"),
            ("HOME", "/home/u"),
        ]);
        let mut config = Config::default();
        assert_eq!(
            config.resolve_state_dir(&all).unwrap(),
            PathBuf::from("/var/lib/hubd")
        );

        config.hub.state_dir = Some(PathBuf::from("/srv/hub"));
        assert_eq!(
            config.resolve_state_dir(&all).unwrap(),
            PathBuf::from("/srv/hub")
        );
        config.hub.state_dir = None;

        let xdg = env(&[("XDG_DATA_HOME", "/home/u/.data"), ("HOME", "/home/u")]);
        assert_eq!(
            config.resolve_state_dir(&xdg).unwrap(),
            PathBuf::from("/home/u/.data/hubd")
        );

        // Empty or relative XDG values are ignored, as the XDG spec says.
        let home = env(&[
            ("XDG_DATA_HOME", "rel"),
            ("STATE_DIRECTORY", ""),
            ("HOME", "/home/u"),
        ]);
        assert_eq!(
            config.resolve_state_dir(&home).unwrap(),
            PathBuf::from("/home/u/.local/share/hubd")
        );

        assert!(matches!(
            config.resolve_state_dir(&env(&[])),
            Err(Error::NoStateDir)
        ));
    }

    #[test]
    fn socket_precedence() {
        let state = Path::new("/var/lib/hubd");
        let all = env(&[
            ("RUNTIME_DIRECTORY", "/run/hubd:/run/x"),
            ("XDG_RUNTIME_DIR", "/run/user/1000"),
        ]);
        let mut config = Config::default();
        assert_eq!(
            config.resolve_socket(state, &all),
            PathBuf::from("/run/hubd/hubd.sock")
        );

        config.admin.socket = Some(PathBuf::from("/tmp/admin.sock"));
        assert_eq!(
            config.resolve_socket(state, &all),
            PathBuf::from("/tmp/admin.sock")
        );
        config.admin.socket = None;

        let xdg = env(&[("XDG_RUNTIME_DIR", "/run/user/1000")]);
        assert_eq!(
            config.resolve_socket(state, &xdg),
            PathBuf::from("/run/user/1000/hubd/hubd.sock")
        );
        assert_eq!(
            config.resolve_socket(state, &env(&[])),
            PathBuf::from("/var/lib/hubd/hubd.sock")
        );
    }
}
