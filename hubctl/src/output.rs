//! What hubctl prints: the stable JSON views of hubd's answers and their human
//! renderings (aligned tables, `key: value` lines, UTC times, watched messages).
//!
//! The JSON views are hubctl's own types, not the protobuf messages, so the
//! JSON a script reads does not change when the wire format grows a field.

use hub_proto::v1;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;

/// A device as `devices list --json` and `devices show --json` print it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceView {
    pub id: String,
    pub name: String,
    pub state: DeviceStateView,
    pub connected: bool,
    /// Serial of the current certificate, lowercase hex.
    pub cert_serial: String,
    /// Certificate notAfter, Unix seconds.
    pub cert_not_after: i64,
    pub cert_not_after_rfc3339: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
    pub created_at_rfc3339: Option<String>,
    /// Unix seconds of the last session start or end; `null` if never seen.
    pub last_seen: Option<i64>,
    pub last_seen_rfc3339: Option<String>,
    pub role: RoleView,
    /// Why the device is isolated; `null` unless it is.
    pub isolation_reason: Option<String>,
    /// The topic filters an integration was granted (empty for a device).
    pub grants: GrantsView,
    /// What the device says it is; `null` until it has said.
    pub kind: Option<String>,
    /// Firmware, support period and updates.
    pub lifecycle: LifecycleView,
}

/// A device's firmware and support in `devices --json`; `null` where the
/// device has not said.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LifecycleView {
    pub model: Option<String>,
    pub vendor: Option<String>,
    pub firmware: Option<String>,
    pub firmware_sha256: Option<String>,
    /// YYYY-MM-DD.
    pub support_end: Option<String>,
    /// `owner` or `device`.
    pub support_source: Option<String>,
    /// `ok`, `ends soon`, `ended` or `unknown`.
    pub support_status: String,
    /// The last firmware integrity problem.
    pub integrity: Option<String>,
    /// The latest update offered: version, state, and why it failed.
    pub update_version: Option<String>,
    pub update_state: Option<String>,
    pub update_error: Option<String>,
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

impl From<&v1::Device> for LifecycleView {
    fn from(d: &v1::Device) -> Self {
        Self {
            model: non_empty(&d.model),
            vendor: non_empty(&d.vendor),
            firmware: non_empty(&d.firmware),
            firmware_sha256: non_empty(&d.firmware_sha256),
            support_end: non_empty(&d.support_end),
            support_source: non_empty(&d.support_source),
            support_status: if d.support_status.is_empty() {
                "unknown".to_owned()
            } else {
                d.support_status.clone()
            },
            integrity: non_empty(&d.integrity),
            update_version: non_empty(&d.update_version),
            update_state: non_empty(&d.update_state),
            update_error: non_empty(&d.update_error),
        }
    }
}

/// A device's state; `unknown` covers states this hubctl does not know yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceStateView {
    Active,
    Isolated,
    Revoked,
    Unknown,
}

impl DeviceStateView {
    fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Isolated => "isolated",
            Self::Revoked => "revoked",
            Self::Unknown => "unknown",
        }
    }
}

/// A device's or pairing window's role; `unknown` covers roles this hubctl
/// does not know yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoleView {
    Device,
    Integration,
    Unknown,
}

impl RoleView {
    fn as_str(self) -> &'static str {
        match self {
            Self::Device => "device",
            Self::Integration => "integration",
            Self::Unknown => "unknown",
        }
    }

    /// The view of a wire `Role`.
    pub fn from_wire(role: i32) -> Self {
        match v1::Role::try_from(role) {
            Ok(v1::Role::Device) => Self::Device,
            Ok(v1::Role::Integration) => Self::Integration,
            Ok(v1::Role::Unspecified) | Err(_) => Self::Unknown,
        }
    }
}

/// MQTT topic filters an integration may publish and subscribe to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantsView {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

impl From<Option<&v1::Grants>> for GrantsView {
    fn from(g: Option<&v1::Grants>) -> Self {
        g.map_or_else(Self::default, |g| Self {
            publish: g.publish.clone(),
            subscribe: g.subscribe.clone(),
        })
    }
}

impl From<&v1::Device> for DeviceView {
    fn from(d: &v1::Device) -> Self {
        let state = match v1::DeviceState::try_from(d.state) {
            Ok(v1::DeviceState::Active) => DeviceStateView::Active,
            Ok(v1::DeviceState::Isolated) => DeviceStateView::Isolated,
            Ok(v1::DeviceState::Revoked) => DeviceStateView::Revoked,
            Ok(v1::DeviceState::Unspecified) | Err(_) => DeviceStateView::Unknown,
        };
        // The protocol says 0 means "never seen".
        let last_seen = (d.last_seen != 0).then_some(d.last_seen);
        Self {
            id: d.id.clone(),
            name: d.name.clone(),
            state,
            connected: d.connected,
            cert_serial: d.cert_serial.clone(),
            cert_not_after: d.cert_not_after,
            cert_not_after_rfc3339: rfc3339(d.cert_not_after),
            created_at: d.created_at,
            created_at_rfc3339: rfc3339(d.created_at),
            last_seen,
            last_seen_rfc3339: last_seen.and_then(rfc3339),
            role: RoleView::from_wire(d.role),
            // The protocol says the reason is empty unless the device is isolated.
            isolation_reason: (!d.isolation_reason.is_empty()).then(|| d.isolation_reason.clone()),
            grants: GrantsView::from(d.grants.as_ref()),
            kind: (!d.kind.is_empty()).then(|| d.kind.clone()),
            lifecycle: LifecycleView::from(d),
        }
    }
}

/// `pair --json`: what a script needs to hand to the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairingOpenedView {
    pub claim_id: String,
    /// The one-time setup code, grouped for reading aloud.
    pub code: String,
    /// The pairing URI: hub address, pairing port, CA fingerprint, claim.
    pub uri: String,
    /// Unix seconds.
    pub expires_at: i64,
    pub expires_at_rfc3339: Option<String>,
}

impl From<&v1::PairingWindow> for PairingOpenedView {
    fn from(w: &v1::PairingWindow) -> Self {
        Self {
            claim_id: w.claim_id.clone(),
            code: w.code.clone(),
            uri: w.uri.clone(),
            expires_at: w.expires_at,
            expires_at_rfc3339: rfc3339(w.expires_at),
        }
    }
}

/// One open window in `pair --list --json`; its code is never shown again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairingWindowView {
    pub claim_id: String,
    pub name: String,
    pub role: RoleView,
    /// Unix seconds.
    pub expires_at: i64,
    pub expires_at_rfc3339: Option<String>,
    /// Wrong codes so far.
    pub failures: u32,
    pub grants: GrantsView,
}

impl From<&v1::PairingWindow> for PairingWindowView {
    fn from(w: &v1::PairingWindow) -> Self {
        Self {
            claim_id: w.claim_id.clone(),
            name: w.name.clone(),
            role: RoleView::from_wire(w.role),
            expires_at: w.expires_at,
            expires_at_rfc3339: rfc3339(w.expires_at),
            failures: w.failures,
            grants: GrantsView::from(w.grants.as_ref()),
        }
    }
}

/// `pair --list --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairingListView {
    pub windows: Vec<PairingWindowView>,
}

/// `devices list --json`: an object rather than a bare array, so fields can be added.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceListView {
    pub devices: Vec<DeviceView>,
}

/// `status --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusView {
    /// hubd's version.
    pub version: String,
    /// The admin API version hubd speaks.
    pub protocol_version: u32,
    pub uptime_seconds: u64,
    pub devices_known: u64,
    pub devices_connected: u64,
    pub counters: CountersView,
    /// SHA-256 of the hub CA certificate (DER), lowercase hex.
    pub ca_fingerprint: String,
    pub mqtt_listen: String,
    /// What is wrong with the hub's clock; `null` while it looks right.
    pub clock_warning: Option<String>,
    pub automation: AutomationView,
    pub lifecycle: LifecycleStatusView,
    pub seclog: SeclogStatusView,
}

/// Firmware and support across devices in `status --json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LifecycleStatusView {
    pub support_ended: u64,
    pub support_ending: u64,
    pub support_unknown: u64,
    /// Support ended and the device is not isolated.
    pub ended_not_isolated: u64,
    pub integrity_problems: u64,
    pub updates_in_progress: u64,
    pub updates_failed: u64,
    pub isolate_after_support_end: bool,
    pub support_warning_days: u32,
}

/// The security log in `status --json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeclogStatusView {
    pub entries: u64,
    pub dropped: u64,
    /// Alerts in the last 24 hours, and the newest one.
    pub recent_alerts: u64,
    pub last_alert: Option<String>,
}

/// The rules engine in `status --json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutomationView {
    pub rules: u64,
    pub rules_enabled: u64,
    /// Rule runs since hubd started.
    pub runs: u64,
    /// Runs refused by loop protection.
    pub refused: u64,
    /// Time-based rules wait until the system clock is set.
    pub waiting_for_clock: bool,
    /// Device events dropped before automation saw them.
    pub events_dropped: u64,
    /// Why the stored rules could not be loaded; `null` when they were.
    pub problem: Option<String>,
}

/// The message counters of `status --json`; the meanings are those of `admin.proto`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountersView {
    pub publishes_received: u64,
    pub publishes_sent: u64,
    pub acl_denied: u64,
    pub dropped_slow_subscriber: u64,
    pub handshakes_ok: u64,
    pub handshakes_failed: u64,
    pub connections_refused: u64,
    pub sessions_refused: u64,
    pub protocol_errors: u64,
    pub connections_admitted: u64,
    pub connections_deferred: u64,
}

impl From<&v1::StatusResponse> for StatusView {
    fn from(s: &v1::StatusResponse) -> Self {
        // hubd always sends the counters; all zeros is the honest reading of an absent message.
        let c = s.counters.unwrap_or_default();
        Self {
            version: s.version.clone(),
            protocol_version: s.protocol_version,
            uptime_seconds: s.uptime_seconds,
            devices_known: s.devices_known,
            devices_connected: s.devices_connected,
            counters: CountersView {
                publishes_received: c.publishes_received,
                publishes_sent: c.publishes_sent,
                acl_denied: c.acl_denied,
                dropped_slow_subscriber: c.dropped_slow_subscriber,
                handshakes_ok: c.handshakes_ok,
                handshakes_failed: c.handshakes_failed,
                connections_refused: c.connections_refused,
                sessions_refused: c.sessions_refused,
                protocol_errors: c.protocol_errors,
                connections_admitted: c.connections_admitted,
                connections_deferred: c.connections_deferred,
            },
            ca_fingerprint: s.ca_fingerprint.clone(),
            mqtt_listen: s.mqtt_listen.clone(),
            clock_warning: (!s.clock_warning.is_empty()).then(|| s.clock_warning.clone()),
            automation: {
                let a = s.automation.clone().unwrap_or_default();
                AutomationView {
                    rules: a.rules,
                    rules_enabled: a.rules_enabled,
                    runs: a.runs,
                    refused: a.refused,
                    waiting_for_clock: a.waiting_for_clock,
                    events_dropped: a.events_dropped,
                    problem: (!a.problem.is_empty()).then_some(a.problem),
                }
            },
            lifecycle: {
                let l = s.lifecycle.unwrap_or_default();
                LifecycleStatusView {
                    support_ended: l.support_ended,
                    support_ending: l.support_ending,
                    support_unknown: l.support_unknown,
                    ended_not_isolated: l.ended_not_isolated,
                    integrity_problems: l.integrity_problems,
                    updates_in_progress: l.updates_in_progress,
                    updates_failed: l.updates_failed,
                    isolate_after_support_end: l.isolate_after_support_end,
                    support_warning_days: l.support_warning_days,
                }
            },
            seclog: {
                let e = s.seclog.clone().unwrap_or_default();
                SeclogStatusView {
                    entries: e.entries,
                    dropped: e.dropped,
                    recent_alerts: e.recent_alerts,
                    last_alert: non_empty(&e.last_alert),
                }
            },
        }
    }
}

/// One message as `watch --json` prints it, one object per line.
///
/// A payload that is UTF-8 is given as a string; any other payload is `null`
/// with its bytes in `payload_base64`, a key present only then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchMessageView {
    pub topic: String,
    /// The payload if it is valid UTF-8, else `null`.
    pub payload: Option<String>,
    /// The payload in standard base64 (RFC 4648, padded); only when it is not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_base64: Option<String>,
    pub retain: bool,
}

impl From<&v1::WatchMessage> for WatchMessageView {
    fn from(m: &v1::WatchMessage) -> Self {
        let (payload, payload_base64) = match std::str::from_utf8(&m.payload) {
            Ok(text) => (Some(text.to_owned()), None),
            Err(_) => (None, Some(base64(&m.payload))),
        };
        Self {
            topic: m.topic.clone(),
            payload,
            payload_base64,
            retain: m.retain,
        }
    }
}

/// How many bytes of a binary payload the human `watch` line shows in hex.
const HEX_PREVIEW_BYTES: usize = 16;

/// The human `watch` line: `TOPIC PAYLOAD` and a newline.
///
/// A UTF-8 payload is printed [`sanitize`]d, so a newline in it cannot split
/// the line; an empty one as `<0 bytes>` (in MQTT it clears a retained
/// message, which a blank would hide) and a binary one as `<N bytes: HEX>`,
/// the hex cut after [`HEX_PREVIEW_BYTES`] bytes with `...`.
pub fn watch_line(m: &v1::WatchMessage) -> String {
    let payload = match std::str::from_utf8(&m.payload) {
        Ok("") => "<0 bytes>".to_owned(),
        Ok(text) => sanitize(text),
        Err(_) => bytes_summary(&m.payload),
    };
    format!("{} {payload}\n", sanitize(&m.topic))
}

/// `<N bytes: HEX>` for a non-empty binary payload, the hex cut with `...`.
fn bytes_summary(payload: &[u8]) -> String {
    let n = payload.len();
    let unit = if n == 1 { "byte" } else { "bytes" };
    let shown = payload.get(..HEX_PREVIEW_BYTES).unwrap_or(payload);
    let hex: String = shown.iter().map(|b| format!("{b:02x}")).collect();
    let more = if n > shown.len() { "..." } else { "" };
    format!("<{n} {unit}: {hex}{more}>")
}

/// Standard, padded base64 (RFC 4648 section 4); the workspace has no base64 crate.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let byte = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let group = (byte(0) << 16) | (byte(1) << 8) | byte(2);
        // A chunk of k bytes fills k + 1 sextets; the rest of the four is padding.
        for i in 0..4 {
            if i <= chunk.len() {
                let sextet = (group >> (18 - 6 * i)) & 0x3f;
                out.push(char::from(ALPHABET[sextet as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Unix seconds as RFC 3339 in UTC; `None` if the value is outside what RFC 3339 can say.
pub fn rfc3339(unix: i64) -> Option<String> {
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()?
        .format(&Rfc3339)
        .ok()
}

/// Unix seconds for people: `2026-11-22 14:03` (UTC); `@<seconds>` if out of range.
pub fn human_time(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(format_description!("[year]-[month]-[day] [hour]:[minute]"))
                .ok()
        })
        .unwrap_or_else(|| format!("@{unix}"))
}

/// Unix seconds to the second: `2026-11-22 14:03:00 UTC`; `@<seconds>` if out of range.
pub fn human_time_seconds(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second] UTC"
            ))
            .ok()
        })
        .unwrap_or_else(|| format!("@{unix}"))
}

/// Like [`human_time`], with `-` for "never".
fn human_time_or_never(unix: Option<i64>) -> String {
    unix.map_or_else(|| "-".to_owned(), human_time)
}

/// A duration in seconds as `3d 4h 5m 6s`, leaving out leading zero units.
pub fn human_duration(secs: u64) -> String {
    let units = [
        (secs / 86_400, "d"),
        (secs / 3_600 % 24, "h"),
        (secs / 60 % 60, "m"),
    ];
    let mut parts: Vec<String> = units
        .iter()
        .skip_while(|(n, _)| *n == 0)
        .map(|(n, u)| format!("{n}{u}"))
        .collect();
    parts.push(format!("{}s", secs % 60));
    parts.join(" ")
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// Makes text from hubd safe to print on a terminal: control characters (an
/// escape sequence in a device name could rewrite the screen) are shown escaped.
pub fn sanitize(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Terminal columns taken by `c`: 0 for combining marks and zero-width
/// characters, 2 for East Asian wide/fullwidth characters and emoji, else 1.
///
/// An approximation of Unicode's East Asian Width covering the scripts device
/// names are written in; the workspace has no unicode-width dependency.
fn char_width(c: char) -> usize {
    match u32::from(c) {
        0x0300..=0x036F
        | 0x0483..=0x0489
        | 0x0591..=0x05BD
        | 0x0610..=0x061A
        | 0x064B..=0x065F
        | 0x0E31
        | 0x0E34..=0x0E3A
        | 0x0E47..=0x0E4E
        | 0x1AB0..=0x1AFF
        | 0x1DC0..=0x1DFF
        | 0x200B..=0x200F
        | 0x20D0..=0x20FF
        | 0xFE00..=0xFE0F
        | 0xFE20..=0xFE2F
        | 0xE0100..=0xE01EF => 0,
        0x1100..=0x115F
        | 0x231A..=0x231B
        | 0x2329..=0x232A
        | 0x23E9..=0x23EC
        | 0x23F0
        | 0x23F3
        | 0x25FD..=0x25FE
        | 0x2614..=0x2615
        | 0x2648..=0x2653
        | 0x26A1
        | 0x26AA..=0x26AB
        | 0x26BD..=0x26BE
        | 0x26C4..=0x26C5
        | 0x26D4
        | 0x26EA
        | 0x26F2..=0x26F5
        | 0x26FA
        | 0x26FD
        | 0x2705
        | 0x270A..=0x270B
        | 0x2728
        | 0x274C
        | 0x2753..=0x2755
        | 0x2757
        | 0x2795..=0x2797
        | 0x27B0
        | 0x27BF
        | 0x2B1B..=0x2B1C
        | 0x2B50
        | 0x2B55
        | 0x2E80..=0x303E
        | 0x3041..=0x33FF
        | 0x3400..=0x4DBF
        | 0x4E00..=0x9FFF
        | 0xA000..=0xA4CF
        | 0xA960..=0xA97F
        | 0xAC00..=0xD7A3
        | 0xF900..=0xFAFF
        | 0xFE10..=0xFE19
        | 0xFE30..=0xFE6F
        | 0xFF00..=0xFF60
        | 0xFFE0..=0xFFE6
        | 0x1F004
        | 0x1F0CF
        | 0x1F18E
        | 0x1F191..=0x1F19A
        | 0x1F200..=0x1F251
        | 0x1F300..=0x1F64F
        | 0x1F680..=0x1F6FF
        | 0x1F7E0..=0x1F7EB
        | 0x1F90C..=0x1F9FF
        | 0x1FA70..=0x1FAFF
        | 0x20000..=0x2FFFD
        | 0x30000..=0x3FFFD => 2,
        _ => 1,
    }
}

/// Terminal columns taken by `s` (see [`char_width`]).
pub fn display_width(s: &str) -> usize {
    s.chars().map(char_width).sum()
}

/// An aligned table: columns two spaces apart, padded by display width, and
/// no trailing spaces. Cells must already be [`sanitize`]d.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| display_width(h)).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(display_width(cell));
        }
    }
    let mut out = String::new();
    let header_row: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header_row).chain(rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            line.extend(std::iter::repeat_n(
                ' ',
                w.saturating_sub(display_width(cell)),
            ));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `key: value` lines with the values aligned.
pub fn key_values(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in pairs {
        let pad = width - k.len();
        out.push_str(&format!("{k}: {:pad$}{v}\n", ""));
    }
    out
}

/// The isolation reason, [`sanitize`]d, or `-`.
fn reason_or_dash(d: &DeviceView) -> String {
    or_dash(d.isolation_reason.as_deref())
}

/// The device's kind, [`sanitize`]d; `-` until it has said.
fn kind_or_dash(d: &DeviceView) -> String {
    or_dash(d.kind.as_deref())
}

fn or_dash(text: Option<&str>) -> String {
    text.map_or_else(|| "-".to_owned(), sanitize)
}

/// Topic filters, [`sanitize`]d and joined with `, `; `-` for none.
fn filters(list: &[String]) -> String {
    if list.is_empty() {
        "-".to_owned()
    } else {
        list.iter()
            .map(|f| sanitize(f))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The human `devices list` table. REASON comes last: it is free text of any length.
pub fn device_table(devices: &[DeviceView]) -> String {
    let rows: Vec<Vec<String>> = devices
        .iter()
        .map(|d| {
            vec![
                sanitize(&d.id),
                sanitize(&d.name),
                d.role.as_str().to_owned(),
                kind_or_dash(d),
                d.state.as_str().to_owned(),
                yes_no(d.connected).to_owned(),
                firmware_cell(d),
                support_cell(d),
                human_time(d.cert_not_after),
                human_time_or_never(d.last_seen),
                reason_or_dash(d),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "NAME",
            "ROLE",
            "KIND",
            "STATE",
            "CONNECTED",
            "FIRMWARE",
            "SUPPORT",
            "CERT EXPIRES",
            "LAST SEEN",
            "REASON",
        ],
        &rows,
    )
}

/// Firmware version, with `!` when its integrity is in doubt; `-` unknown.
fn firmware_cell(d: &DeviceView) -> String {
    let l = &d.lifecycle;
    let mut cell = or_dash(l.firmware.as_deref());
    if l.integrity.is_some() {
        cell.push_str(" (!)");
    }
    cell
}

/// Support status and end date, such as `ok 2031-12-31` or `unknown`.
fn support_cell(d: &DeviceView) -> String {
    let l = &d.lifecycle;
    if d.role == RoleView::Integration {
        return "-".to_owned();
    }
    match &l.support_end {
        Some(end) => format!("{} {}", sanitize(&l.support_status), sanitize(end)),
        None => sanitize(&l.support_status),
    }
}

/// The human `devices show`.
pub fn device_details(d: &DeviceView) -> String {
    key_values(&[
        ("id", sanitize(&d.id)),
        ("name", sanitize(&d.name)),
        ("role", d.role.as_str().to_owned()),
        (
            "kind",
            d.kind
                .as_deref()
                .map(sanitize)
                .unwrap_or_else(|| "-".to_owned()),
        ),
        ("state", d.state.as_str().to_owned()),
        ("isolation reason", reason_or_dash(d)),
        ("connected", yes_no(d.connected).to_owned()),
        ("cert serial", sanitize(&d.cert_serial)),
        ("cert expires", human_time(d.cert_not_after)),
        ("created", human_time(d.created_at)),
        ("last seen", human_time_or_never(d.last_seen)),
        ("may publish", filters(&d.grants.publish)),
        ("may subscribe", filters(&d.grants.subscribe)),
        ("model", or_dash(d.lifecycle.model.as_deref())),
        ("vendor", or_dash(d.lifecycle.vendor.as_deref())),
        ("firmware", or_dash(d.lifecycle.firmware.as_deref())),
        (
            "firmware sha256",
            or_dash(d.lifecycle.firmware_sha256.as_deref()),
        ),
        ("integrity", or_dash(d.lifecycle.integrity.as_deref())),
        ("support", {
            let l = &d.lifecycle;
            match (&l.support_end, &l.support_source) {
                (Some(end), Some(src)) => format!(
                    "{} (until {}, from the {})",
                    sanitize(&l.support_status),
                    sanitize(end),
                    sanitize(src)
                ),
                _ => sanitize(&l.support_status),
            }
        }),
        ("update", {
            let l = &d.lifecycle;
            match (&l.update_version, &l.update_state) {
                (Some(v), Some(st)) => {
                    let mut t = format!("{} {}", sanitize(v), sanitize(st));
                    if let Some(e) = &l.update_error {
                        t.push_str(&format!(": {}", sanitize(e)));
                    }
                    t
                }
                _ => "-".to_owned(),
            }
        }),
    ])
}

/// A device in brief, after a command changed it: id, name, role, state, and
/// the isolation reason and grants where there are any.
pub fn device_brief(d: &DeviceView) -> String {
    let mut pairs = vec![
        ("id", sanitize(&d.id)),
        ("name", sanitize(&d.name)),
        ("role", d.role.as_str().to_owned()),
        ("state", d.state.as_str().to_owned()),
    ];
    if d.isolation_reason.is_some() {
        pairs.push(("isolation reason", reason_or_dash(d)));
    }
    if d.role == RoleView::Integration
        || !d.grants.publish.is_empty()
        || !d.grants.subscribe.is_empty()
    {
        pairs.push(("may publish", filters(&d.grants.publish)));
        pairs.push(("may subscribe", filters(&d.grants.subscribe)));
    }
    key_values(&pairs)
}

/// The human `pair --list` table.
pub fn pairing_table(windows: &[PairingWindowView]) -> String {
    let rows: Vec<Vec<String>> = windows
        .iter()
        .map(|w| {
            vec![
                sanitize(&w.claim_id),
                sanitize(&w.name),
                w.role.as_str().to_owned(),
                human_time_seconds(w.expires_at),
                w.failures.to_string(),
            ]
        })
        .collect();
    table(&["CLAIM", "NAME", "ROLE", "EXPIRES", "FAILURES"], &rows)
}

/// Quotes `s` for a POSIX shell when it holds anything but plainly safe characters.
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:@%+=,".contains(c));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The QR code of `data` for a terminal, two modules a character, light on
/// dark with its quiet zone; `None` if `data` does not fit in a QR code.
pub fn qr_text(data: &str) -> Option<String> {
    use qrcode::render::unicode::Dense1x2;
    let code = qrcode::QrCode::new(data.as_bytes()).ok()?;
    Some(
        code.render::<Dense1x2>()
            .dark_color(Dense1x2::Light)
            .light_color(Dense1x2::Dark)
            .quiet_zone(true)
            .build(),
    )
}

/// The human `pair`: the setup code set apart, the URI and expiry, the QR code
/// of the URI (`qr`, already rendered, or `None` if the URI does not fit in
/// one), and how to hand both to the device.
pub fn pairing_opened(
    name: &str,
    role: RoleView,
    w: &PairingOpenedView,
    qr: Option<&str>,
) -> String {
    let code = sanitize(&w.code);
    let uri = sanitize(&w.uri);
    let mut out = format!(
        "pairing window {} open for {} ({})\n\n    setup code:  {code}\n\n",
        sanitize(&w.claim_id),
        sanitize(name),
        role.as_str(),
    );
    out.push_str(&key_values(&[
        ("uri", uri.clone()),
        ("expires", human_time_seconds(w.expires_at)),
    ]));
    out.push('\n');
    match qr {
        Some(qr) => {
            out.push_str(qr);
            if !qr.ends_with('\n') {
                out.push('\n');
            }
        }
        None => out.push_str("(the URI is too long for a QR code)\n"),
    }
    out.push('\n');
    out.push_str(&format!(
        "Give the device the URI and the setup code, which works once \
         (a simulated device: hubsim pair --uri {} --code {} --out DIR)\n",
        shell_quote(&uri),
        shell_quote(&code),
    ));
    out
}

/// The human `status`.
pub fn status_details(s: &StatusView) -> String {
    let c = &s.counters;
    let mut rows = vec![
        ("version", sanitize(&s.version)),
        ("protocol", s.protocol_version.to_string()),
        ("uptime", human_duration(s.uptime_seconds)),
        (
            "devices",
            format!(
                "{} known, {} connected",
                s.devices_known, s.devices_connected
            ),
        ),
        ("mqtt listen", sanitize(&s.mqtt_listen)),
        ("ca fingerprint", sanitize(&s.ca_fingerprint)),
        ("publishes received", c.publishes_received.to_string()),
        ("publishes sent", c.publishes_sent.to_string()),
        ("acl denied", c.acl_denied.to_string()),
        (
            "dropped slow subscriber",
            c.dropped_slow_subscriber.to_string(),
        ),
        ("handshakes ok", c.handshakes_ok.to_string()),
        ("handshakes failed", c.handshakes_failed.to_string()),
        ("connections admitted", c.connections_admitted.to_string()),
        ("connections deferred", c.connections_deferred.to_string()),
        ("connections refused", c.connections_refused.to_string()),
        ("sessions refused", c.sessions_refused.to_string()),
        ("protocol errors", c.protocol_errors.to_string()),
    ];
    let a = &s.automation;
    let mut rules = format!(
        "{} ({} enabled), {} runs, {} refused by loop protection",
        a.rules, a.rules_enabled, a.runs, a.refused
    );
    if a.events_dropped > 0 {
        rules.push_str(&format!(", {} events missed", a.events_dropped));
    }
    rows.push(("rules", rules));
    if a.waiting_for_clock {
        rows.push((
            "schedules",
            "waiting: the system clock is not set".to_owned(),
        ));
    }
    if let Some(problem) = &a.problem {
        rows.push(("rules problem", sanitize(problem)));
    }
    let l = &s.lifecycle;
    let mut support = format!(
        "{} ended, {} ending within {} days, {} unknown",
        l.support_ended, l.support_ending, l.support_warning_days, l.support_unknown
    );
    if l.ended_not_isolated > 0 {
        support.push_str(&format!(
            "; {} past support and NOT isolated",
            l.ended_not_isolated
        ));
    }
    rows.push(("device support", support));
    if l.integrity_problems > 0 {
        rows.push((
            "firmware integrity",
            format!(
                "{} devices with unrecognised firmware",
                l.integrity_problems
            ),
        ));
    }
    if l.updates_in_progress > 0 || l.updates_failed > 0 {
        rows.push((
            "firmware updates",
            format!(
                "{} in progress, {} failed",
                l.updates_in_progress, l.updates_failed
            ),
        ));
    }
    let e = &s.seclog;
    let mut events = format!("{} entries", e.entries);
    if e.dropped > 0 {
        events.push_str(&format!(", {} dropped", e.dropped));
    }
    rows.push(("security events", events));
    if e.recent_alerts > 0 {
        let last = e.last_alert.as_deref().map(sanitize).unwrap_or_default();
        rows.push((
            "alerts (24h)",
            format!("{} (latest: {last}); see hubctl events", e.recent_alerts),
        ));
    }
    if let Some(warning) = &s.clock_warning {
        rows.push(("clock warning", sanitize(warning)));
    }
    key_values(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(name: &str, last_seen: i64) -> v1::Device {
        v1::Device {
            id: "d1".into(),
            name: name.into(),
            state: v1::DeviceState::Active.into(),
            connected: true,
            cert_serial: "0a1b".into(),
            cert_not_after: 1_795_356_180, // 2026-11-22 14:03 UTC
            created_at: 1_763_820_180,     // 2025-11-22 14:03 UTC
            last_seen,
            role: v1::Role::Device.into(),
            isolation_reason: String::new(),
            grants: None,
            kind: String::new(),
            ..Default::default()
        }
    }

    fn integration() -> v1::Device {
        v1::Device {
            id: "ha".into(),
            name: "Home Assistant".into(),
            role: v1::Role::Integration.into(),
            grants: Some(v1::Grants {
                publish: vec!["d/+/cmd/#".into()],
                subscribe: vec!["d/+/state".into(), "d/+/meta\n".into()],
            }),
            ..device("x", 0)
        }
    }

    fn isolated() -> v1::Device {
        v1::Device {
            id: "old".into(),
            name: "Old cam".into(),
            state: v1::DeviceState::Isolated.into(),
            isolation_reason: "no updates since 2021\u{1b}[2J".into(),
            connected: false,
            ..device("x", 0)
        }
    }

    #[test]
    fn times() {
        assert_eq!(human_time(1_795_356_180), "2026-11-22 14:03");
        assert_eq!(
            rfc3339(1_795_356_180).as_deref(),
            Some("2026-11-22T14:03:00Z")
        );
        assert_eq!(human_time(i64::MAX), format!("@{}", i64::MAX));
        assert_eq!(rfc3339(i64::MAX), None);
        assert_eq!(human_duration(0), "0s");
        assert_eq!(human_duration(3_661), "1h 1m 1s");
        assert_eq!(human_duration(86_400 + 5), "1d 0h 0m 5s");
    }

    #[test]
    fn table_aligns_by_display_width() {
        // Wide CJK (2 columns each), a precomposed é, a combining accent (0
        // columns) and an emoji with its presentation selector (2 + 0).
        let rows = vec![
            vec!["a".to_owned(), "台所".to_owned(), "x".to_owned()],
            vec!["bbb".to_owned(), "Caf\u{e9}".to_owned(), "y".to_owned()],
            vec![
                "c".to_owned(),
                "e\u{301}\u{1f321}\u{fe0f}".to_owned(),
                "z".to_owned(),
            ],
            vec!["dd".to_owned(), "キッチンの温度".to_owned(), String::new()],
        ];
        let t = table(&["ID", "NAME", "Z"], &rows);
        assert_eq!(
            t,
            "ID   NAME            Z\n\
             a    台所            x\n\
             bbb  Caf\u{e9}            y\n\
             c    e\u{301}\u{1f321}\u{fe0f}             z\n\
             dd   キッチンの温度\n"
        );
    }

    #[test]
    fn sanitize_escapes_control_characters() {
        assert_eq!(sanitize("a\u{1b}[2Jb\n"), "a\\u{1b}[2Jb\\n");
        assert_eq!(sanitize("Küche"), "Küche");
    }

    #[test]
    fn device_table_and_details() {
        let list = [
            DeviceView::from(&device("Kitchen sensor", 0)),
            DeviceView::from(&device("Wohnzimmer Thermostat", 1_795_356_180)),
            DeviceView::from(&isolated()),
            DeviceView::from(&integration()),
        ];
        assert_eq!(
            device_table(&list),
            "ID   NAME                   ROLE         KIND  STATE     CONNECTED  FIRMWARE  SUPPORT  CERT EXPIRES      LAST SEEN         REASON\n\
             d1   Kitchen sensor         device       -     active    yes        -         unknown  2026-11-22 14:03  -                 -\n\
             d1   Wohnzimmer Thermostat  device       -     active    yes        -         unknown  2026-11-22 14:03  2026-11-22 14:03  -\n\
             old  Old cam                device       -     isolated  no         -         unknown  2026-11-22 14:03  -                 no updates since 2021\\u{1b}[2J\n\
             ha   Home Assistant         integration  -     active    yes        -         -        2026-11-22 14:03  -                 -\n"
        );
        assert_eq!(
            device_details(&list[0]),
            "id:               d1\n\
             name:             Kitchen sensor\n\
             role:             device\n\
             kind:             -\n\
             state:            active\n\
             isolation reason: -\n\
             connected:        yes\n\
             cert serial:      0a1b\n\
             cert expires:     2026-11-22 14:03\n\
             created:          2025-11-22 14:03\n\
             last seen:        -\n\
             may publish:      -\n\
             may subscribe:    -\n\
             model:            -\n\
             vendor:           -\n\
             firmware:         -\n\
             firmware sha256:  -\n\
             integrity:        -\n\
             support:          unknown\n\
             update:           -\n"
        );
        assert_eq!(
            device_brief(&list[0]),
            "id:    d1\n\
             name:  Kitchen sensor\n\
             role:  device\n\
             state: active\n"
        );
        assert_eq!(
            device_brief(&list[2]),
            "id:               old\n\
             name:             Old cam\n\
             role:             device\n\
             state:            isolated\n\
             isolation reason: no updates since 2021\\u{1b}[2J\n"
        );
        assert_eq!(
            device_brief(&list[3]),
            "id:            ha\n\
             name:          Home Assistant\n\
             role:          integration\n\
             state:         active\n\
             may publish:   d/+/cmd/#\n\
             may subscribe: d/+/state, d/+/meta\\n\n"
        );
    }

    #[test]
    fn pairing_views() {
        let window = v1::PairingWindow {
            claim_id: "c1".into(),
            name: "Hall light".into(),
            role: v1::Role::Device.into(),
            code: "7K3M-Q8ZP".into(),
            uri: "hubpair://h:8884/?ca=sha256:ab&claim=c1".into(),
            expires_at: 1_795_356_185,
            failures: 2,
            grants: None,
        };
        let opened = PairingOpenedView::from(&window);
        assert_eq!(
            serde_json::to_value(&opened).expect("serializes"),
            serde_json::json!({
                "claim_id": "c1",
                "code": "7K3M-Q8ZP",
                "uri": "hubpair://h:8884/?ca=sha256:ab&claim=c1",
                "expires_at": 1_795_356_185,
                "expires_at_rfc3339": "2026-11-22T14:03:05Z",
            })
        );
        assert_eq!(
            pairing_opened("Hall light", RoleView::Device, &opened, Some("QR\nQR")),
            "pairing window c1 open for Hall light (device)\n\
             \n    setup code:  7K3M-Q8ZP\n\n\
             uri:     hubpair://h:8884/?ca=sha256:ab&claim=c1\n\
             expires: 2026-11-22 14:03:05 UTC\n\
             \nQR\nQR\n\n\
             Give the device the URI and the setup code, which works once (a simulated \
             device: hubsim pair --uri 'hubpair://h:8884/?ca=sha256:ab&claim=c1' \
             --code 7K3M-Q8ZP --out DIR)\n"
        );
        let list = [PairingWindowView::from(&window)];
        assert_eq!(
            pairing_table(&list),
            "CLAIM  NAME        ROLE    EXPIRES                  FAILURES\n\
             c1     Hall light  device  2026-11-22 14:03:05 UTC  2\n"
        );
    }

    #[test]
    fn qr_codes_render_and_shell_quoting() {
        let qr = qr_text("hubpair://h:8884/?ca=sha256:ab&claim=c1").expect("fits");
        // Version 3 (29 modules) plus a quiet zone of 4 on each side: 37
        // columns, two rows a line.
        let lines: Vec<&str> = qr.lines().collect();
        assert_eq!(lines.len(), 19);
        assert!(lines.iter().all(|l| l.chars().count() == 37), "{qr}");
        // Light on dark: the quiet zone is drawn full blocks.
        assert!(lines[0].chars().all(|c| c == '\u{2588}'), "{qr}");
        assert_eq!(qr_text(&"x".repeat(8000)), None);

        assert_eq!(shell_quote("7K3M-Q8ZP"), "7K3M-Q8ZP");
        assert_eq!(shell_quote("a&b"), "'a&b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn device_json_shape_and_round_trip() {
        let view = DeviceView::from(&device("Küche", 0));
        let json = serde_json::to_value(&view).expect("serializes");
        assert_eq!(
            json,
            serde_json::json!({
                "id": "d1",
                "name": "Küche",
                "state": "active",
                "connected": true,
                "cert_serial": "0a1b",
                "cert_not_after": 1_795_356_180,
                "cert_not_after_rfc3339": "2026-11-22T14:03:00Z",
                "created_at": 1_763_820_180,
                "created_at_rfc3339": "2025-11-22T14:03:00Z",
                "last_seen": null,
                "last_seen_rfc3339": null,
                "role": "device",
                "isolation_reason": null,
                "kind": null,
                "grants": { "publish": [], "subscribe": [] },
                "lifecycle": {
                    "model": null, "vendor": null, "firmware": null, "firmware_sha256": null,
                    "support_end": null, "support_source": null, "support_status": "unknown",
                    "integrity": null, "update_version": null, "update_state": null,
                    "update_error": null,
                },
            })
        );
        let back: DeviceView = serde_json::from_value(json).expect("deserializes");
        assert_eq!(back, view);

        let json = serde_json::to_value(DeviceView::from(&isolated())).expect("serializes");
        assert_eq!(json["state"], "isolated");
        assert_eq!(json["isolation_reason"], "no updates since 2021\u{1b}[2J");
        let json = serde_json::to_value(DeviceView::from(&integration())).expect("serializes");
        assert_eq!(json["role"], "integration");
        assert_eq!(
            json["grants"],
            serde_json::json!({ "publish": ["d/+/cmd/#"], "subscribe": ["d/+/state", "d/+/meta\n"] })
        );
    }

    #[test]
    fn unknown_state_is_unknown() {
        let mut d = device("x", 0);
        d.state = 42;
        assert_eq!(DeviceView::from(&d).state, DeviceStateView::Unknown);
        d.state = v1::DeviceState::Revoked.into();
        assert_eq!(DeviceView::from(&d).state, DeviceStateView::Revoked);
        d.role = 42;
        assert_eq!(DeviceView::from(&d).role, RoleView::Unknown);
    }

    #[test]
    fn base64_matches_rfc_4648() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), want, "{input:?}");
        }
        assert_eq!(base64(&[0x00, 0xff, 0x10, 0x80]), "AP8QgA==");
        assert_eq!(base64(&[0xfb, 0xff]), "+/8=");
    }

    fn message(topic: &str, payload: &[u8], retain: bool) -> v1::WatchMessage {
        v1::WatchMessage {
            topic: topic.into(),
            payload: payload.to_vec(),
            retain,
        }
    }

    #[test]
    fn watch_lines() {
        let line = |payload: &[u8]| watch_line(&message("d/x/state", payload, false));
        assert_eq!(line(b"on"), "d/x/state on\n");
        assert_eq!(
            line("21 °C\n\u{1b}[2J".as_bytes()),
            "d/x/state 21 °C\\n\\u{1b}[2J\n"
        );
        assert_eq!(line(b""), "d/x/state <0 bytes>\n");
        assert_eq!(line(&[0xff]), "d/x/state <1 byte: ff>\n");
        let long: Vec<u8> = (0xf0..=0xff).chain([0x00]).collect();
        assert_eq!(
            line(&long),
            "d/x/state <17 bytes: f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff...>\n"
        );
        assert_eq!(watch_line(&message("a\u{7}b", b"x", true)), "a\\u{7}b x\n");
    }

    #[test]
    fn watch_json_shape() {
        let text = WatchMessageView::from(&message("t", "é\n".as_bytes(), false));
        assert_eq!(
            serde_json::to_string(&text).expect("serializes"),
            r#"{"topic":"t","payload":"é\n","retain":false}"#
        );
        let binary = WatchMessageView::from(&message("t", &[0x00, 0xff], true));
        assert_eq!(
            serde_json::to_string(&binary).expect("serializes"),
            r#"{"topic":"t","payload":null,"payload_base64":"AP8=","retain":true}"#
        );
        let back: WatchMessageView =
            serde_json::from_str(&serde_json::to_string(&text).expect("serializes"))
                .expect("deserializes");
        assert_eq!(back, text);
    }

    #[test]
    fn status_json_shape() {
        let s = v1::StatusResponse {
            version: "0.1.0".into(),
            protocol_version: 1,
            uptime_seconds: 61,
            devices_known: 2,
            devices_connected: 1,
            counters: None,
            ca_fingerprint: "ab".into(),
            mqtt_listen: "0.0.0.0:8883".into(),
            clock_warning: String::new(),
            automation: None,
            hub_name: "home".into(),
            ..Default::default()
        };
        let view = StatusView::from(&s);
        let json = serde_json::to_value(&view).expect("serializes");
        let keys: Vec<&str> = json
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "automation",
                "ca_fingerprint",
                "clock_warning",
                "counters",
                "devices_connected",
                "devices_known",
                "lifecycle",
                "mqtt_listen",
                "protocol_version",
                "seclog",
                "uptime_seconds",
                "version"
            ]
        );
        assert_eq!(json["counters"]["acl_denied"], 0);
        let back: StatusView = serde_json::from_value(json).expect("deserializes");
        assert_eq!(back, view);
    }
}
