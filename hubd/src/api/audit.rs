//! The `Audit` RPC: a self-audit of the running hub and its files against
//! the UK Code of Practice for consumer IoT security (13 principles) and
//! ETSI EN 303 645 provisions.
//!
//! The RPC gathers [`Facts`] once (sockets from `/proc/self`, file modes,
//! certificates, devices, pairing windows, retention, the security log's
//! chain, the clock), then every check is a pure function of those facts,
//! so each pass and fail case is a unit test.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use hub_proto::v1 as pb;
use jiff::civil::Date;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use time::OffsetDateTime;
use tonic::Status;

use super::Service;
use crate::lifecycle::SupportStatus;
use crate::store::{DeviceState, Store};

/// The product's support end (YYYY-MM-DD): the one file `hubctl about`,
/// the package and the docs take it from.
const SUPPORT_END: &str = include_str!("../../../packaging/support-end");

/// The security contact and its expiry (RFC 9116): the file the package
/// ships and the project serves. hubctl's `about` says the same contact (a
/// test compares them).
const SECURITY_TXT: &str = include_str!("../../../packaging/security.txt");

/// Certificates expiring within this many days are a warning.
const CERT_WARN_DAYS: i64 = 30;

/// Pruning runs hourly: records may be this much older than the limit.
const RETENTION_GRACE_MS: i64 = 3_600_000;

/// Mode bits a key file or the state dir must not have: any for group or others.
const GROUP_OTHER: u32 = 0o077;

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Warn,
    Fail,
}

impl Outcome {
    /// The wire form: `pass`, `warn` or `fail`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Warn => "warn",
            Outcome::Fail => "fail",
        }
    }
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub id: &'static str,
    pub principle: &'static str,
    pub provision: &'static str,
    pub outcome: Outcome,
    pub detail: String,
    /// Empty on pass.
    pub fix: String,
}

impl Check {
    fn new(id: &'static str, principle: &'static str, provision: &'static str) -> Check {
        Check {
            id,
            principle,
            provision,
            outcome: Outcome::Pass,
            detail: String::new(),
            fix: String::new(),
        }
    }

    fn pass(mut self, detail: impl Into<String>) -> Check {
        self.outcome = Outcome::Pass;
        self.detail = detail.into();
        self.fix.clear();
        self
    }

    fn warn(mut self, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        self.outcome = Outcome::Warn;
        self.detail = detail.into();
        self.fix = fix.into();
        self
    }

    fn fail(mut self, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        self.outcome = Outcome::Fail;
        self.detail = detail.into();
        self.fix = fix.into();
        self
    }
}

/// A device as the audit sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFact {
    pub id: String,
    pub state: DeviceState,
    /// Unix seconds.
    pub cert_not_after: i64,
    pub support: SupportStatus,
    pub support_end: Option<Date>,
    /// The firmware integrity problem, if one is recorded.
    pub integrity: Option<String>,
}

/// An open pairing window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowFact {
    pub claim: String,
    /// Unix seconds.
    pub expires_at: i64,
}

/// Everything the checks look at, gathered once.
#[derive(Debug, Clone)]
pub struct Facts {
    /// Unix seconds.
    pub now: i64,
    /// The process's listening TCP sockets, or why they could not be read.
    pub listening: Result<Vec<SocketAddr>, String>,
    /// The listeners the hub means to have, and what each is.
    pub declared: Vec<(SocketAddr, &'static str)>,
    pub allow_tls12: bool,
    pub state_dir: PathBuf,
    /// The state dir and the key files with their modes (`None`: missing).
    pub modes: Vec<(PathBuf, Option<u32>)>,
    /// The server certificate's `notAfter` (Unix seconds), or the problem.
    pub server_cert: Result<i64, String>,
    pub devices: Vec<DeviceFact>,
    pub windows: Vec<WindowFact>,
    /// The product's support end and security contact.
    pub support_end: Option<Date>,
    pub contact: Option<String>,
    /// security.txt's `Expires` (Unix seconds).
    pub contact_expires: Option<i64>,
    pub history_days: u32,
    /// Unix milliseconds of the oldest history record.
    pub oldest_history_ms: Option<i64>,
    pub seclog_days: u32,
    /// Unix milliseconds of the oldest security event.
    pub oldest_seclog_ms: Option<i64>,
    /// The first broken link of the security log: seq and problem.
    pub seclog_broken: Option<(u64, String)>,
    pub seclog_entries: u64,
    pub clock_warning: Option<String>,
}

/// Every check, in the order `hubctl audit` prints them.
pub fn run_checks(f: &Facts) -> Vec<Check> {
    vec![
        listeners(f),
        tls(f),
        key_files(f),
        certificates(f),
        support_end_isolation(f),
        firmware_integrity(f),
        pairing(f),
        disclosure(f),
        retention(f),
        seclog_chain(f),
        clock(f),
    ]
}

/// Principle 6 (EN 303 645 5.6-1): no listener but the declared ones.
pub fn listeners(f: &Facts) -> Check {
    let c = Check::new("listeners", "6 Minimise attack surface", "5.6-1");
    let listening = match &f.listening {
        Ok(l) => l,
        Err(e) => {
            return c.warn(
                format!("cannot read this process's sockets: {e}"),
                "run hubd on Linux with /proc mounted",
            );
        }
    };
    let declared: Vec<String> = f
        .declared
        .iter()
        .map(|(a, what)| format!("{what} {a}"))
        .collect();
    let extra: Vec<String> = listening
        .iter()
        .filter(|a| !f.declared.iter().any(|(d, _)| d == *a))
        .map(|a| a.to_string())
        .collect();
    if extra.is_empty() {
        c.pass(format!(
            "{} listening TCP socket(s), all declared: {}; the admin API is a Unix socket",
            listening.len(),
            declared.join(", ")
        ))
    } else {
        c.fail(
            format!(
                "undeclared listening TCP socket(s) in the hubd process: {} (declared: {})",
                extra.join(", "),
                declared.join(", ")
            ),
            "find what opened the socket (ss -ltnp) and stop it; hubd should listen only on [edge] listen",
        )
    }
}

/// Principle 5 (EN 303 645 5.5-1): TLS 1.3 only, client certificates mandatory.
pub fn tls(f: &Facts) -> Check {
    let c = Check::new("tls", "5 Communicate securely", "5.5-1");
    if f.allow_tls12 {
        c.warn(
            "TLS 1.2 (ECDHE-ECDSA AEAD suites) is allowed besides TLS 1.3 ([edge] allow_tls12 = true); client certificates are mandatory",
            "set [edge] allow_tls12 = false once every device speaks TLS 1.3",
        )
    } else {
        c.pass("TLS 1.3 only; client certificates from the hub's CA are mandatory")
    }
}

/// Principle 4 (EN 303 645 5.4-1): the state dir is 0700, key files
/// have no group or other bits.
pub fn key_files(f: &Facts) -> Check {
    let c = Check::new("key_files", "4 Store credentials securely", "5.4-1");
    let mut bad = Vec::new();
    let mut fixes = Vec::new();
    let mut missing = Vec::new();
    for (path, mode) in &f.modes {
        let is_dir = path == &f.state_dir;
        match mode {
            None => missing.push(path.display().to_string()),
            Some(m) if m & GROUP_OTHER != 0 => {
                bad.push(format!("{} is {:04o}", path.display(), m));
                fixes.push(format!(
                    "chmod {} {}",
                    if is_dir { "700" } else { "600" },
                    path.display()
                ));
            }
            Some(_) => {}
        }
    }
    if !bad.is_empty() {
        return c.fail(
            format!(
                "readable or writable by group or others: {}",
                bad.join(", ")
            ),
            fixes.join("; "),
        );
    }
    if !missing.is_empty() {
        return c.fail(
            format!("missing: {}", missing.join(", ")),
            "restore the files from a backup, or wipe the hub (hubctl wipe)",
        );
    }
    c.pass(format!(
        "{} is 0700 and {} key file(s) are private: {}",
        f.state_dir.display(),
        f.modes.len().saturating_sub(1),
        f.modes
            .iter()
            .filter(|(p, _)| p != &f.state_dir)
            .map(|(p, m)| format!("{} {:04o}", p.display(), m.unwrap_or(0)))
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// Principle 5 (EN 303 645 5.5-8): no certificate expired or near expiry.
pub fn certificates(f: &Facts) -> Check {
    let c = Check::new("certificates", "5 Communicate securely", "5.5-8");
    let soon = f.now + CERT_WARN_DAYS * 86_400;
    let day = |t: i64| {
        OffsetDateTime::from_unix_timestamp(t)
            .map(|t| t.date().to_string())
            .unwrap_or_else(|_| t.to_string())
    };
    let mut expired = Vec::new();
    let mut expiring = Vec::new();
    match &f.server_cert {
        Ok(t) if *t <= f.now => expired.push(format!("server certificate (expired {})", day(*t))),
        Ok(t) if *t <= soon => expiring.push(format!("server certificate (expires {})", day(*t))),
        Ok(_) => {}
        Err(e) => expired.push(format!("server certificate: {e}")),
    }
    let live = f.devices.iter().filter(|d| d.state != DeviceState::Revoked);
    let mut count = 0;
    for d in live {
        count += 1;
        if d.cert_not_after <= f.now {
            expired.push(format!("{} (expired {})", d.id, day(d.cert_not_after)));
        } else if d.cert_not_after <= soon {
            expiring.push(format!("{} (expires {})", d.id, day(d.cert_not_after)));
        }
    }
    if !expired.is_empty() {
        let mut detail = format!("expired or unreadable: {}", expired.join(", "));
        if !expiring.is_empty() {
            detail.push_str(&format!(
                "; expiring within {CERT_WARN_DAYS} days: {}",
                expiring.join(", ")
            ));
        }
        return c.fail(
            detail,
            "restart hubd to renew the server certificate; re-pair devices whose certificate expired (hubctl pair --name NAME)",
        );
    }
    if !expiring.is_empty() {
        return c.warn(
            format!("expiring within {CERT_WARN_DAYS} days: {}", expiring.join(", ")),
            "devices renew their certificate over MQTT when they next connect; make sure they do, or re-pair them",
        );
    }
    c.pass(format!(
        "the server certificate and {count} device certificate(s) are valid for more than {CERT_WARN_DAYS} days"
    ))
}

/// Principle 3 (EN 303 645 5.3-15): a device past its support end is isolated.
pub fn support_end_isolation(f: &Facts) -> Check {
    let c = Check::new("support_end_isolation", "3 Keep software updated", "5.3-15");
    let live: Vec<&DeviceFact> = f
        .devices
        .iter()
        .filter(|d| d.state != DeviceState::Revoked && d.support == SupportStatus::Ended)
        .collect();
    let open: Vec<String> = live
        .iter()
        .filter(|d| d.state != DeviceState::Isolated)
        .map(|d| match d.support_end {
            Some(end) => format!("{} (support ended {end})", d.id),
            None => d.id.clone(),
        })
        .collect();
    if open.is_empty() {
        c.pass(format!(
            "{} device(s) past their support end, all isolated",
            live.len()
        ))
    } else {
        c.fail(
            format!(
                "past their support end and not isolated: {}",
                open.join(", ")
            ),
            "hubctl isolate ID --reason 'support ended', or set [lifecycle] isolate_after_support_end = true",
        )
    }
}

/// Principle 7 (EN 303 645 5.7-2): no device runs unrecognised firmware.
pub fn firmware_integrity(f: &Facts) -> Check {
    let c = Check::new("firmware_integrity", "7 Software integrity", "5.7-2");
    let bad: Vec<String> = f
        .devices
        .iter()
        .filter(|d| d.state != DeviceState::Revoked)
        .filter_map(|d| d.integrity.as_ref().map(|p| format!("{}: {p}", d.id)))
        .collect();
    if bad.is_empty() {
        c.pass("no device reports unrecognised firmware")
    } else {
        c.fail(
            format!("firmware integrity problems: {}", bad.join("; ")),
            "reflash the device with firmware from the catalogue (hubctl firmware push ID), or remove it (hubctl devices remove ID)",
        )
    }
}

/// Principle 6 (EN 303 645 5.6-2): no pairing window is open.
pub fn pairing(f: &Facts) -> Check {
    let c = Check::new("pairing", "6 Minimise attack surface", "5.6-2");
    if f.windows.is_empty() {
        return c.pass("no pairing window open: the pairing listener is closed");
    }
    let open: Vec<String> = f
        .windows
        .iter()
        .map(|w| {
            let at = OffsetDateTime::from_unix_timestamp(w.expires_at)
                .map(|t| format!("{} UTC", t.replace_nanosecond(0).unwrap_or(t)))
                .unwrap_or_else(|_| w.expires_at.to_string());
            format!(
                "{} (expires {at}, in {} s)",
                w.claim,
                (w.expires_at - f.now).max(0)
            )
        })
        .collect();
    let fix = f
        .windows
        .iter()
        .map(|w| format!("hubctl pair --cancel {}", w.claim))
        .collect::<Vec<_>>()
        .join("; ");
    c.fail(
        format!(
            "{} pairing window(s) open, so the pairing listener accepts unauthenticated connections: {}",
            f.windows.len(),
            open.join(", ")
        ),
        fix,
    )
}

/// Principles 2 and 3 (EN 303 645 5.2-1, 5.3-13): a security contact and a
/// support end date in the future are published.
pub fn disclosure(f: &Facts) -> Check {
    let c = Check::new("disclosure", "2 Vulnerability disclosure", "5.2-1, 5.3-13");
    let today = utc_date(f.now).unwrap_or(Date::MIN);
    let mut problems = Vec::new();
    match &f.contact {
        Some(_) => {}
        None => problems.push("no security contact in security.txt".to_owned()),
    }
    match f.support_end {
        None => problems.push("no support end date in packaging/support-end".to_owned()),
        Some(end) if end < today => problems.push(format!(
            "the support end {end} has passed: this release gets no more security updates"
        )),
        Some(_) => {}
    }
    let contact = f.contact.clone().unwrap_or_default();
    let end = f.support_end.map(|d| d.to_string()).unwrap_or_default();
    if !problems.is_empty() {
        return c.fail(
            problems.join("; "),
            "upgrade hubd to a supported release (see hubctl about)",
        );
    }
    if let Some(expires) = f.contact_expires.filter(|e| *e <= f.now) {
        let day = OffsetDateTime::from_unix_timestamp(expires)
            .map(|t| t.date().to_string())
            .unwrap_or_default();
        return c.warn(
            format!(
                "security contact {contact}, support until {end}; but security.txt expired on {day}"
            ),
            "upgrade hubd: each release refreshes security.txt",
        );
    }
    c.pass(format!(
        "security contact {contact}; security updates until {end}"
    ))
}

/// Principle 8 (EN 303 645 6-4): retention limits are applied.
pub fn retention(f: &Facts) -> Check {
    let c = Check::new("retention", "8 Protect personal data", "6-4");
    let now_ms = f.now * 1000;
    let age = |at: i64| (now_ms - at).max(0);
    let describe = |ms: i64| {
        let h = ms / 3_600_000;
        if h >= 48 {
            format!("{} days", h / 24)
        } else {
            format!("{h} hours")
        }
    };
    let mut detail = Vec::new();
    let mut over = Vec::new();
    let limits = [
        (
            "device history",
            f.oldest_history_ms,
            f.history_days,
            "[privacy] history_days",
        ),
        (
            "security log",
            f.oldest_seclog_ms,
            f.seclog_days,
            "[seclog] retention_days",
        ),
    ];
    for (what, oldest, days, key) in limits {
        let limit = i64::from(days) * 86_400_000;
        match oldest {
            None => detail.push(format!("{what}: empty ({key} = {days})")),
            Some(at) => {
                let a = age(at);
                detail.push(format!(
                    "{what}: oldest {} old ({key} = {days})",
                    describe(a)
                ));
                if a > limit + RETENTION_GRACE_MS {
                    over.push(format!(
                        "{what} holds a record {} old, beyond {key} = {days}",
                        describe(a)
                    ));
                }
            }
        }
    }
    if over.is_empty() {
        c.pass(detail.join("; "))
    } else {
        c.fail(
            over.join("; "),
            "check the hub's clock and restart hubd so pruning runs; see the journal for pruning errors",
        )
    }
}

/// Principle 10 (EN 303 645 5.10-1): the security log's hash chain holds.
pub fn seclog_chain(f: &Facts) -> Check {
    let c = Check::new("seclog_chain", "10 Monitor telemetry", "5.10-1");
    match &f.seclog_broken {
        None => c.pass(format!(
            "the hash chain of {} security log entries verifies",
            f.seclog_entries
        )),
        Some((seq, problem)) => c.fail(
            format!(
                "entry #{seq} breaks the hash chain: {problem} ({} entries before it verified)",
                f.seclog_entries
            ),
            "the log was changed outside hubd: keep a copy (hubctl export) and investigate; hubctl events verify shows the same",
        ),
    }
}

/// Principle 9 (EN 303 645 5.9-2): the system clock is set.
pub fn clock(f: &Facts) -> Check {
    let c = Check::new("clock", "9 Resilient to outages", "5.9-2");
    match &f.clock_warning {
        None => c.pass("the system clock is not behind the build time"),
        Some(w) => c.fail(
            w.clone(),
            "enable network time (timedatectl set-ntp true) or fake-hwclock",
        ),
    }
}

/// The UTC date of a Unix time.
fn utc_date(secs: i64) -> Option<Date> {
    jiff::Timestamp::from_second(secs)
        .ok()
        .map(|t| t.to_zoned(jiff::tz::TimeZone::UTC).date())
}

/// Parses one `/proc/net/tcp` or `tcp6` table: the local address and
/// inode of every socket in state `0A` (LISTEN).
pub fn parse_proc_net_tcp(text: &str) -> Vec<(u64, SocketAddr)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 10 || fields[3] != "0A" {
                return None;
            }
            let addr = parse_hex_addr(fields[1])?;
            let inode = fields[9].parse().ok()?;
            Some((inode, addr))
        })
        .collect()
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6). The kernel
/// prints each 32-bit word of the address as a host-order integer, so the
/// word's native-endian bytes are the address bytes.
fn parse_hex_addr(field: &str) -> Option<SocketAddr> {
    let (ip, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    if ip.len() != 8 && ip.len() != 32 {
        return None;
    }
    let bytes: Vec<u8> = (0..ip.len() / 8)
        .map(|i| u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok())
        .collect::<Option<Vec<u32>>>()?
        .into_iter()
        .flat_map(u32::to_ne_bytes)
        .collect();
    let ip = match <[u8; 4]>::try_from(bytes.as_slice()) {
        Ok(v4) => IpAddr::V4(Ipv4Addr::from(v4)),
        Err(_) => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?)),
    };
    Some(SocketAddr::new(ip, port))
}

/// The listening TCP sockets this process holds: socket inodes from
/// `/proc/self/fd` matched against `/proc/self/net/tcp` and `tcp6`.
fn own_listeners() -> Result<Vec<SocketAddr>, String> {
    let mut inodes = std::collections::HashSet::new();
    let fds = std::fs::read_dir("/proc/self/fd").map_err(|e| format!("/proc/self/fd: {e}"))?;
    for fd in fds.flatten() {
        if let Ok(target) = std::fs::read_link(fd.path())
            && let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok())
        {
            inodes.insert(inode);
        }
    }
    let mut out = Vec::new();
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        match std::fs::read_to_string(table) {
            Ok(text) => out.extend(
                parse_proc_net_tcp(&text)
                    .into_iter()
                    .filter(|(inode, _)| inodes.contains(inode))
                    .map(|(_, a)| a),
            ),
            // No IPv6 in this kernel: nothing can listen there.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{table}: {e}")),
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn mode_of(path: &Path) -> Option<u32> {
    std::fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o7777)
}

/// The server certificate's `notAfter`, read from `ca/server.pem`.
fn server_cert_expiry(state_dir: &Path) -> Result<i64, String> {
    let path = state_dir.join("ca").join("server.pem");
    let der =
        CertificateDer::from_pem_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    crate::ca::cert_serial_and_expiry(&der)
        .map(|(_, t)| t.unix_timestamp())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// security.txt's `Contact` (without `mailto:`) and `Expires`.
fn security_txt() -> (Option<String>, Option<i64>) {
    let field = |name: &str| {
        SECURITY_TXT.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim().to_owned())
        })
    };
    let contact = field("Contact")
        .map(|c| c.strip_prefix("mailto:").map(str::to_owned).unwrap_or(c))
        .filter(|c| !c.is_empty());
    let expires = field("Expires").and_then(|e| {
        OffsetDateTime::parse(&e, &time::format_description::well_known::Rfc3339)
            .ok()
            .map(|t| t.unix_timestamp())
    });
    (contact, expires)
}

/// What the store holds that the checks need: the oldest history record,
/// the oldest security event, and the chain verification.
type StoreFacts = (Option<i64>, Option<i64>, Option<(u64, String)>, u64);

fn store_facts(seclog: &crate::seclog::SecLog, store: &Store) -> Result<StoreFacts, String> {
    let e = |e: crate::store::Error| e.to_string();
    let oldest_history = store
        .history(None)
        .map_err(e)?
        .iter()
        .map(|h| h.at_ms)
        .min();
    let anchor = store.seclog_anchor().map_err(e)?;
    let oldest_seclog = store
        .seclog(anchor.first_seq, 1)
        .map_err(e)?
        .first()
        .map(|s| s.at_ms);
    let v = seclog.verify().map_err(e)?;
    Ok((
        oldest_history,
        oldest_seclog,
        v.broken.map(|b| (b.seq, b.problem)),
        v.entries,
    ))
}

fn to_pb(c: Check) -> pb::AuditCheck {
    pb::AuditCheck {
        id: c.id.to_owned(),
        principle: c.principle.to_owned(),
        provision: c.provision.to_owned(),
        status: c.outcome.as_str().to_owned(),
        detail: c.detail,
        fix: c.fix,
    }
}

impl Service {
    /// Gathers the facts and runs every check.
    pub(super) async fn audit_rpc(&self) -> Result<pb::AuditResponse, Status> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let mut declared = vec![(self.state.edge.local_addr(), "MQTT")];
        let pairing_addr = self.state.edge.pairing_addr().await;
        let windows: Vec<WindowFact> = self
            .state
            .edge
            .list_pairing()
            .await?
            .into_iter()
            .map(|(w, _)| WindowFact {
                claim: w.claim,
                expires_at: now
                    + w.expires_at
                        .saturating_duration_since(Instant::now())
                        .as_secs() as i64,
            })
            .collect();
        if let Some(addr) = pairing_addr {
            declared.push((addr, "pairing"));
        }
        let registry = self.state.registry.clone();
        let records = super::blocking(move || registry.devices()).await?;
        let devices = records
            .iter()
            .map(|d| {
                let (support, end) = self.state.lifecycle.support_of(d);
                DeviceFact {
                    id: d.id.as_str().to_owned(),
                    state: d.state.clone(),
                    cert_not_after: d.cert_not_after,
                    support,
                    support_end: end.map(|(date, _)| date),
                    integrity: d.lifecycle.integrity.clone(),
                }
            })
            .collect();
        let state_dir = self.state.state_dir.clone();
        let seclog = self.state.seclog.clone();
        let dir = state_dir.clone();
        let (listening, modes, server_cert, stored) = tokio::task::spawn_blocking(move || {
            let files = [
                dir.clone(),
                dir.join("keys").join("data.key"),
                dir.join("ca").join("ca.key"),
                dir.join("ca").join("server.key"),
            ];
            let modes = files.into_iter().map(|p| {
                let m = mode_of(&p);
                (p, m)
            });
            let stored = store_facts(&seclog, seclog.store());
            (
                own_listeners(),
                modes.collect::<Vec<_>>(),
                server_cert_expiry(&dir),
                stored,
            )
        })
        .await
        .map_err(|e| Status::internal(format!("task failed: {e}")))?;
        let (oldest_history_ms, oldest_seclog_ms, seclog_broken, seclog_entries) =
            stored.map_err(Status::internal)?;
        let (contact, contact_expires) = security_txt();
        let facts = Facts {
            now,
            listening,
            declared,
            allow_tls12: self.state.allow_tls12,
            state_dir,
            modes,
            server_cert,
            devices,
            windows,
            support_end: crate::lifecycle::parse_date(SUPPORT_END.trim()).ok(),
            contact,
            contact_expires,
            history_days: self.state.history_days,
            oldest_history_ms,
            seclog_days: self.state.seclog_days,
            oldest_seclog_ms,
            seclog_broken,
            seclog_entries,
            clock_warning: crate::clock::warning(),
        };
        Ok(pb::AuditResponse {
            checks: run_checks(&facts).into_iter().map(to_pb).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;
    const DAY: i64 = 86_400;

    fn mqtt() -> SocketAddr {
        "127.0.0.1:8883".parse().unwrap()
    }

    fn device(id: &str) -> DeviceFact {
        DeviceFact {
            id: id.to_owned(),
            state: DeviceState::Active,
            cert_not_after: NOW + 365 * DAY,
            support: SupportStatus::Ok,
            support_end: None,
            integrity: None,
        }
    }

    /// A healthy hub: every check passes.
    fn healthy() -> Facts {
        let dir = PathBuf::from("/var/lib/hubd");
        Facts {
            now: NOW,
            listening: Ok(vec![mqtt()]),
            declared: vec![(mqtt(), "MQTT")],
            allow_tls12: false,
            state_dir: dir.clone(),
            modes: vec![
                (dir.clone(), Some(0o700)),
                (dir.join("keys/data.key"), Some(0o600)),
                (dir.join("ca/ca.key"), Some(0o600)),
            ],
            server_cert: Ok(NOW + 300 * DAY),
            devices: vec![device("lamp-1")],
            windows: vec![],
            support_end: utc_date(NOW + 400 * DAY),
            contact: Some("security@hubd.example".to_owned()),
            contact_expires: Some(NOW + 100 * DAY),
            history_days: 7,
            oldest_history_ms: Some((NOW - 6 * DAY) * 1000),
            seclog_days: 365,
            oldest_seclog_ms: Some((NOW - 300 * DAY) * 1000),
            seclog_broken: None,
            seclog_entries: 12,
            clock_warning: None,
        }
    }

    fn outcome(check: fn(&Facts) -> Check, f: &Facts) -> (Outcome, String, String) {
        let c = check(f);
        (c.outcome, c.detail, c.fix)
    }

    #[test]
    fn a_healthy_hub_passes_every_check_with_no_fix() {
        let checks = run_checks(&healthy());
        assert_eq!(checks.len(), 11);
        for c in checks {
            assert_eq!(c.outcome, Outcome::Pass, "{c:?}");
            assert!(c.fix.is_empty(), "{c:?}");
            assert!(!c.detail.is_empty(), "{c:?}");
        }
    }

    #[test]
    fn an_undeclared_listener_fails_naming_it() {
        let mut f = healthy();
        let extra: SocketAddr = "127.0.0.1:4444".parse().unwrap();
        f.listening = Ok(vec![mqtt(), extra]);
        let (o, detail, _) = outcome(listeners, &f);
        assert_eq!(o, Outcome::Fail);
        assert!(detail.contains("127.0.0.1:4444"), "{detail}");
        // The pairing listener is declared while a window is open.
        f.declared.push((extra, "pairing"));
        assert_eq!(listeners(&f).outcome, Outcome::Pass);
        f.listening = Err("no /proc".to_owned());
        assert_eq!(listeners(&f).outcome, Outcome::Warn);
    }

    #[test]
    fn tls12_is_a_warning() {
        let mut f = healthy();
        f.allow_tls12 = true;
        let (o, detail, fix) = outcome(tls, &f);
        assert_eq!(o, Outcome::Warn);
        assert!(
            detail.contains("client certificates are mandatory"),
            "{detail}"
        );
        assert!(fix.contains("allow_tls12 = false"), "{fix}");
    }

    #[test]
    fn a_readable_key_or_open_state_dir_fails_with_chmod() {
        let mut f = healthy();
        f.modes[1].1 = Some(0o644);
        let (o, detail, fix) = outcome(key_files, &f);
        assert_eq!(o, Outcome::Fail);
        assert!(detail.contains("data.key is 0644"), "{detail}");
        assert_eq!(fix, "chmod 600 /var/lib/hubd/keys/data.key");
        let mut f = healthy();
        f.modes[0].1 = Some(0o755);
        let (o, _, fix) = outcome(key_files, &f);
        assert_eq!(o, Outcome::Fail);
        assert_eq!(fix, "chmod 700 /var/lib/hubd");
        let mut f = healthy();
        f.modes[2].1 = None;
        let (o, detail, _) = outcome(key_files, &f);
        assert_eq!(o, Outcome::Fail);
        assert!(
            detail.contains("missing: /var/lib/hubd/ca/ca.key"),
            "{detail}"
        );
    }

    #[test]
    fn certificates_near_expiry_warn_and_expired_ones_fail() {
        let mut f = healthy();
        f.devices[0].cert_not_after = NOW + 10 * DAY;
        let (o, detail, _) = outcome(certificates, &f);
        assert_eq!(o, Outcome::Warn);
        assert!(detail.contains("lamp-1"), "{detail}");
        f.server_cert = Ok(NOW - DAY);
        let (o, detail, _) = outcome(certificates, &f);
        assert_eq!(o, Outcome::Fail);
        assert!(detail.contains("server certificate (expired"), "{detail}");
        // A revoked device's certificate does not count.
        let mut f = healthy();
        f.devices[0].cert_not_after = NOW - DAY;
        assert_eq!(certificates(&f).outcome, Outcome::Fail);
        f.devices[0].state = DeviceState::Revoked;
        assert_eq!(certificates(&f).outcome, Outcome::Pass);
    }

    #[test]
    fn an_unsupported_device_must_be_isolated() {
        let mut f = healthy();
        f.devices[0].support = SupportStatus::Ended;
        f.devices[0].support_end = Some(jiff::civil::date(2020, 1, 1));
        let (o, detail, fix) = outcome(support_end_isolation, &f);
        assert_eq!(o, Outcome::Fail);
        assert!(
            detail.contains("lamp-1 (support ended 2020-01-01)"),
            "{detail}"
        );
        assert!(fix.contains("hubctl isolate"), "{fix}");
        f.devices[0].state = DeviceState::Isolated;
        assert_eq!(support_end_isolation(&f).outcome, Outcome::Pass);
    }

    #[test]
    fn unrecognised_firmware_fails_naming_the_device() {
        let mut f = healthy();
        f.devices[0].integrity = Some("unknown firmware hash".to_owned());
        let (o, detail, _) = outcome(firmware_integrity, &f);
        assert_eq!(o, Outcome::Fail);
        assert!(detail.contains("lamp-1: unknown firmware hash"), "{detail}");
    }

    #[test]
    fn an_open_pairing_window_fails_with_its_cancel_command() {
        let mut f = healthy();
        f.windows.push(WindowFact {
            claim: "c1".to_owned(),
            expires_at: NOW + 300,
        });
        let (o, detail, fix) = outcome(pairing, &f);
        assert_eq!(o, Outcome::Fail);
        assert!(
            detail.contains("c1 (expires") && detail.contains("in 300 s"),
            "{detail}"
        );
        assert_eq!(fix, "hubctl pair --cancel c1");
    }

    #[test]
    fn disclosure_needs_a_contact_and_a_future_support_end() {
        let mut f = healthy();
        f.contact = None;
        assert_eq!(disclosure(&f).outcome, Outcome::Fail);
        let mut f = healthy();
        f.support_end = Some(jiff::civil::date(2020, 1, 1));
        let (o, detail, _) = outcome(disclosure, &f);
        assert_eq!(o, Outcome::Fail);
        assert!(detail.contains("2020-01-01 has passed"), "{detail}");
        let mut f = healthy();
        f.contact_expires = Some(NOW - DAY);
        assert_eq!(disclosure(&f).outcome, Outcome::Warn);
    }

    #[test]
    fn the_embedded_disclosure_facts_parse() {
        let (contact, expires) = security_txt();
        assert_eq!(contact.as_deref(), Some("security@hubd.example"));
        assert!(expires.is_some());
        assert!(crate::lifecycle::parse_date(SUPPORT_END.trim()).is_ok());
    }

    #[test]
    fn records_beyond_retention_fail_with_their_age() {
        let mut f = healthy();
        f.oldest_history_ms = Some((NOW - 7 * DAY) * 1000 - 1_800_000);
        assert_eq!(
            retention(&f).outcome,
            Outcome::Pass,
            "within the grace hour"
        );
        f.oldest_history_ms = Some((NOW - 9 * DAY) * 1000);
        let (o, detail, _) = outcome(retention, &f);
        assert_eq!(o, Outcome::Fail);
        assert!(
            detail.contains("device history holds a record 9 days old"),
            "{detail}"
        );
        let mut f = healthy();
        f.oldest_seclog_ms = Some((NOW - 400 * DAY) * 1000);
        let (o, detail, _) = outcome(retention, &f);
        assert_eq!(o, Outcome::Fail);
        assert!(detail.contains("security log"), "{detail}");
    }

    #[test]
    fn a_broken_chain_fails_naming_the_entry() {
        let mut f = healthy();
        f.seclog_broken = Some((7, "hash mismatch".to_owned()));
        let (o, detail, _) = outcome(seclog_chain, &f);
        assert_eq!(o, Outcome::Fail);
        assert!(
            detail.contains("entry #7") && detail.contains("hash mismatch"),
            "{detail}"
        );
    }

    #[test]
    fn a_clock_warning_fails() {
        let mut f = healthy();
        f.clock_warning = Some("the system clock reads 1970-01-01".to_owned());
        let (o, detail, _) = outcome(clock, &f);
        assert_eq!(o, Outcome::Fail);
        assert!(detail.contains("1970-01-01"), "{detail}");
    }

    #[test]
    fn proc_net_tcp_rows_in_listen_state_are_parsed() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
                  0: 0100007F:22B3 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 12345 1 0000000000000000 100 0 0 10 0\n\
                  1: 0100007F:22B3 0100007F:D431 01 00000000:00000000 00:00000000 00000000  1000        0 12346 1 0000000000000000 100 0 0 10 0\n";
        assert_eq!(
            parse_proc_net_tcp(v4),
            vec![(12345, "127.0.0.1:8883".parse().unwrap())]
        );
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
                  0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 999 1 0000000000000000 100 0 0 10 0\n";
        if cfg!(target_endian = "little") {
            assert_eq!(
                parse_proc_net_tcp(v6),
                vec![(999, "[::1]:8080".parse().unwrap())]
            );
        }
    }

    #[test]
    fn this_process_sees_its_own_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let found = own_listeners().unwrap();
        assert!(found.contains(&addr), "{addr} not in {found:?}");
        drop(l);
        assert!(!own_listeners().unwrap().contains(&addr));
    }
}
