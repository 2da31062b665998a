//! Pairing, the pure part: one-time setup codes, the pairing URI and the
//! state machine of open pairing windows. (`hubctl` draws the QR code.)
//!
//! Nothing here does I/O, reads a clock or takes a lock: the daemon passes the
//! current time in and owns the [`Windows`] value. The only source of
//! randomness is the operating system's RNG, because a setup code is the only
//! secret that stands between a stranger on the local network and a device
//! certificate.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::{Duration, Instant};

use rand::TryRngCore;

use crate::model::base32_lower;

/// The 32 data symbols of Crockford base32, in value order.
const DATA_SYMBOLS: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// The 37 symbols a Crockford check symbol may take: the data symbols, then
/// the five extra symbols for the values 32 to 36.
const CHECK_SYMBOLS: &[u8; 37] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ*~$=U";

/// Random bytes in a setup code: 80 bits, 16 base32 symbols exactly.
const CODE_RANDOM_BYTES: usize = 10;

/// Data symbols in a setup code.
const CODE_DATA_LEN: usize = 16;

/// Symbols in the canonical form of a setup code: the data and one check symbol.
pub const CODE_LEN: usize = CODE_DATA_LEN + 1;

/// Random bytes in a claim id.
const CLAIM_RANDOM_BYTES: usize = 10;

/// The longest claim id a pairing URI may carry.
const CLAIM_MAX_LEN: usize = 64;

/// The longest host name a pairing URI may carry (the DNS limit).
const HOST_MAX_LEN: usize = 253;

/// The URI scheme of a pairing URI.
pub const URI_SCHEME: &str = "hubpair";

/// How long a closed window is remembered, so that a late device hears why its
/// code no longer works instead of "unknown".
pub const REMEMBER_CLOSED_FOR: Duration = Duration::from_secs(60 * 60);

/// How many closed windows are remembered at most.
pub const REMEMBER_CLOSED_MAX: usize = 64;

/// How many sources the rate limiter tracks at once. Entries leave the table
/// after one rate-limit interval; while it is full, new sources are refused
/// too, so the memory stays bounded even under a flood from many addresses.
pub const RATE_LIMIT_MAX_SOURCES: usize = 4096;

/// The longest pairing window: longer lifetimes are shortened to this. Callers
/// should refuse longer windows up front; this only keeps bad input from
/// overflowing the clock.
pub const MAX_WINDOW_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);

// ---------------------------------------------------------------------------
// Setup codes
// ---------------------------------------------------------------------------

/// A one-time setup code: 80 random bits from the OS RNG as 16 Crockford
/// base32 symbols, followed by a Crockford mod-37 check symbol.
///
/// The inner string is the canonical form (17 uppercase symbols, no
/// separators); [`Display`](fmt::Display) groups it for reading aloud. The
/// code is a secret: `Debug` does not show it, and there is no `PartialEq`, so
/// that every comparison goes through the constant-time [`SetupCode::ct_eq`].
#[derive(Clone)]
pub struct SetupCode(String);

/// Why a string is not a valid [`SetupCode`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodeError {
    /// The code has the wrong number of symbols (separators not counted).
    #[error("setup code has {got} characters, expected {CODE_LEN} (dashes and spaces not counted)")]
    Length {
        /// How many symbols the input had.
        got: usize,
    },
    /// The input contains a character that is not part of a setup code.
    #[error("setup code contains {ch:?}, which is not a setup code character")]
    BadChar {
        /// The offending character, as typed.
        ch: char,
    },
    /// The check symbol does not match: the code was mistyped.
    #[error("setup code is mistyped: its last character does not match the others")]
    Check,
}

impl SetupCode {
    /// A fresh code from 80 bits of the operating system's RNG.
    ///
    /// This is the only way to make a new code: there is deliberately no
    /// constructor from a seed, a counter or the time.
    pub fn generate() -> Self {
        let mut bytes = [0u8; CODE_RANDOM_BYTES];
        rand::rngs::OsRng
            .try_fill_bytes(&mut bytes)
            .expect("the OS random number generator is available on every supported platform");
        Self::from_random(bytes)
    }

    /// Encodes 80 random bits; only [`SetupCode::generate`] calls it.
    fn from_random(bytes: [u8; CODE_RANDOM_BYTES]) -> Self {
        let value = bytes
            .iter()
            .fold(0u128, |acc, &b| (acc << 8) | u128::from(b));
        let mut out = String::with_capacity(CODE_LEN);
        for i in (0..CODE_DATA_LEN).rev() {
            out.push(char::from(DATA_SYMBOLS[((value >> (5 * i)) & 31) as usize]));
        }
        out.push(char::from(CHECK_SYMBOLS[(value % 37) as usize]));
        SetupCode(out)
    }

    /// Parses a code as a person typed it: any case, with or without dashes
    /// and spaces, with the Crockford aliases I and L for 1 and O for 0.
    pub fn parse(input: &str) -> Result<Self, CodeError> {
        // Normalise first, so that a stray character is reported as such
        // rather than as a wrong length.
        let mut symbols = Vec::with_capacity(CODE_LEN);
        for ch in input.chars() {
            if ch == '-' || ch == ' ' {
                continue;
            }
            let up = match ch.to_ascii_uppercase() {
                'I' | 'L' => '1',
                'O' => '0',
                other => other,
            };
            let Some(value) = check_value(up) else {
                return Err(CodeError::BadChar { ch });
            };
            symbols.push((ch, value));
        }
        if symbols.len() != CODE_LEN {
            return Err(CodeError::Length { got: symbols.len() });
        }
        let (data, check) = symbols.split_at(CODE_DATA_LEN);
        let mut value = 0u128;
        for &(ch, v) in data {
            // The five check-only symbols are not data symbols.
            if v >= 32 {
                return Err(CodeError::BadChar { ch });
            }
            value = (value << 5) | u128::from(v);
        }
        let check = check[0].1;
        if value % 37 != u128::from(check) {
            return Err(CodeError::Check);
        }
        let mut canonical = String::with_capacity(CODE_LEN);
        for &(_, v) in &symbols {
            canonical.push(char::from(CHECK_SYMBOLS[usize::from(v)]));
        }
        Ok(SetupCode(canonical))
    }

    /// The canonical form: 17 uppercase symbols without separators.
    pub fn canonical(&self) -> &str {
        &self.0
    }

    /// Compares two codes in time that does not depend on where they differ,
    /// so that timing reveals nothing about a correct prefix.
    pub fn ct_eq(&self, other: &SetupCode) -> bool {
        ct_eq_bytes(self.0.as_bytes(), other.0.as_bytes())
    }
}

/// The value of a check symbol (uppercase), if it is one.
fn check_value(ch: char) -> Option<u8> {
    let b = u8::try_from(ch).ok()?;
    CHECK_SYMBOLS
        .iter()
        .position(|&s| s == b)
        .and_then(|p| u8::try_from(p).ok())
}

/// Constant-time equality of two byte strings. The length is not secret: every
/// canonical code has the same length.
fn ct_eq_bytes(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keeps the optimiser from turning the fold into an early-exit loop.
    std::hint::black_box(diff) == 0
}

impl fmt::Display for SetupCode {
    /// The grouped form for reading aloud: `XXXX-XXXX-XXXX-XXXX-C`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, ch) in self.0.chars().enumerate() {
            if i > 0 && i % 4 == 0 {
                f.write_str("-")?;
            }
            write!(f, "{ch}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for SetupCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SetupCode(<redacted>)")
    }
}

impl FromStr for SetupCode {
    type Err = CodeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SetupCode::parse(s)
    }
}

// ---------------------------------------------------------------------------
// Pairing URI
// ---------------------------------------------------------------------------

/// What a device needs to find and trust the hub:
/// `hubpair://HOST:PORT/?ca=sha256:HEX&claim=CLAIM`.
///
/// The setup code is deliberately not part of it: the URI may be shown as a QR
/// code on a screen others can see, the code is read out separately.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairingUri {
    /// The hub's address: a DNS name, an IPv4 address or an IPv6 address
    /// (without brackets).
    pub host: String,
    /// The pairing listener's port.
    pub port: u16,
    /// The SHA-256 fingerprint of the hub CA certificate: 64 lowercase hex digits.
    pub ca_sha256: String,
    /// The claim id of the pairing window: lowercase letters and digits.
    pub claim: String,
}

/// Why a string is not a valid [`PairingUri`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    /// The URI does not start with `hubpair://`.
    #[error("pairing uri must start with \"{URI_SCHEME}://\"")]
    Scheme,
    /// The host is missing or not a valid name or address.
    #[error("pairing uri: host {0:?} is not a dns name, ipv4 address or bracketed ipv6 address")]
    Host(String),
    /// The port is missing or not a number from 1 to 65535.
    #[error("pairing uri: port {0:?} is not a number from 1 to 65535")]
    Port(String),
    /// Something other than `/` follows the port.
    #[error("pairing uri: unexpected path {0:?}, expected \"/\"")]
    Path(String),
    /// The URI has a `#fragment`.
    #[error("pairing uri: unexpected fragment {0:?}")]
    Fragment(String),
    /// A query parameter has no `=`.
    #[error("pairing uri: query parameter {0:?} has no value")]
    NoValue(String),
    /// A query key this version does not know.
    #[error("pairing uri: unknown query parameter {0:?}")]
    UnknownKey(String),
    /// A query key appears more than once.
    #[error("pairing uri: query parameter {0:?} appears more than once")]
    DuplicateKey(String),
    /// A required query key is missing.
    #[error("pairing uri: query parameter {0:?} is missing")]
    MissingKey(&'static str),
    /// The `ca` value is not `sha256:` and 64 lowercase hex digits.
    #[error("pairing uri: ca {0:?} is not \"sha256:\" followed by 64 lowercase hex digits")]
    Fingerprint(String),
    /// The claim id is empty, too long or has characters other than a-z, 0-9.
    #[error("pairing uri: claim {0:?} must be 1 to {CLAIM_MAX_LEN} characters of a-z and 0-9")]
    Claim(String),
}

impl PairingUri {
    /// A pairing URI, with every part checked as [`FromStr`] checks it, so that
    /// what is displayed always parses back.
    pub fn new(host: &str, port: u16, ca_sha256: &str, claim: &str) -> Result<Self, UriError> {
        // IPv6 addresses are accepted with or without brackets.
        let host = match host.parse::<std::net::Ipv6Addr>() {
            Ok(addr) => addr.to_string(),
            Err(_) => parse_host(host)?,
        };
        if port == 0 {
            return Err(UriError::Port(port.to_string()));
        }
        if !is_fingerprint(ca_sha256) {
            return Err(UriError::Fingerprint(ca_sha256.to_owned()));
        }
        check_claim(claim)?;
        Ok(PairingUri {
            host,
            port,
            ca_sha256: ca_sha256.to_owned(),
            claim: claim.to_owned(),
        })
    }
}

/// Whether `s` is 64 lowercase hex digits.
fn is_fingerprint(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn check_claim(claim: &str) -> Result<(), UriError> {
    if claim.is_empty()
        || claim.len() > CLAIM_MAX_LEN
        || !claim
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(UriError::Claim(claim.to_owned()));
    }
    Ok(())
}

/// Parses the host part of an authority: `[ipv6]`, an IPv4 address or a DNS
/// name. Returns the host without brackets.
fn parse_host(host: &str) -> Result<String, UriError> {
    let bad = || UriError::Host(host.to_owned());
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner.strip_suffix(']').ok_or_else(bad)?;
        // Zone ids (`%eth0`) are refused: they mean nothing to another host.
        let addr: std::net::Ipv6Addr = inner.parse().map_err(|_| bad())?;
        return Ok(addr.to_string());
    }
    if host.parse::<std::net::Ipv4Addr>().is_ok() {
        return Ok(host.to_owned());
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    // A name made of digits and dots only is a malformed IPv4 address.
    let looks_numeric = host.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    if host.is_empty()
        || host.len() > HOST_MAX_LEN
        || looks_numeric
        || !host.split('.').all(label_ok)
    {
        return Err(bad());
    }
    Ok(host.to_owned())
}

impl fmt::Display for PairingUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{URI_SCHEME}://")?;
        if self.host.contains(':') {
            write!(f, "[{}]", self.host)?;
        } else {
            f.write_str(&self.host)?;
        }
        write!(
            f,
            ":{}/?ca=sha256:{}&claim={}",
            self.port, self.ca_sha256, self.claim
        )
    }
}

impl FromStr for PairingUri {
    type Err = UriError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Schemes are case-insensitive (RFC 3986); nothing else here is.
        let prefix_len = URI_SCHEME.len() + 3;
        let rest = match s.get(..prefix_len) {
            Some(p) if p.eq_ignore_ascii_case(&format!("{URI_SCHEME}://")) => &s[prefix_len..],
            _ => return Err(UriError::Scheme),
        };
        let (rest, fragment) = match rest.split_once('#') {
            Some((r, frag)) => (r, Some(frag)),
            None => (rest, None),
        };
        if let Some(frag) = fragment {
            return Err(UriError::Fragment(frag.to_owned()));
        }
        let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = match before_query.find('/') {
            Some(i) => before_query.split_at(i),
            None => (before_query, ""),
        };
        if !(path.is_empty() || path == "/") {
            return Err(UriError::Path(path.to_owned()));
        }
        // The port follows the last colon after any bracketed IPv6 host.
        let host_end = if authority.starts_with('[') {
            authority.find(']').map_or(authority.len(), |i| i + 1)
        } else {
            authority.find(':').unwrap_or(authority.len())
        };
        let (host, port) = authority.split_at(host_end);
        let host = parse_host(host)?;
        let port_str = port
            .strip_prefix(':')
            .ok_or_else(|| UriError::Port(port.to_owned()))?;
        let port = match port_str.parse::<u16>() {
            Ok(p) if p != 0 && port_str.bytes().all(|b| b.is_ascii_digit()) => p,
            _ => return Err(UriError::Port(port_str.to_owned())),
        };

        let mut ca = None;
        let mut claim = None;
        for pair in query.split('&') {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| UriError::NoValue(pair.to_owned()))?;
            let slot = match key {
                "ca" => &mut ca,
                "claim" => &mut claim,
                other => return Err(UriError::UnknownKey(other.to_owned())),
            };
            if slot.replace(value).is_some() {
                return Err(UriError::DuplicateKey(key.to_owned()));
            }
        }
        let ca = ca.ok_or(UriError::MissingKey("ca"))?;
        let ca_sha256 = match ca.strip_prefix("sha256:") {
            Some(hex) if is_fingerprint(hex) => hex.to_owned(),
            _ => return Err(UriError::Fingerprint(ca.to_owned())),
        };
        let claim = claim.ok_or(UriError::MissingKey("claim"))?;
        check_claim(claim)?;
        Ok(PairingUri {
            host,
            port,
            ca_sha256,
            claim: claim.to_owned(),
        })
    }
}

// ---------------------------------------------------------------------------
// Pairing windows
// ---------------------------------------------------------------------------

// `Role` and `Grants` live in `model`, because the registry stores them too;
// they are re-exported here because every pairing window carries them.
pub use crate::model::{Grants, Role};

/// An open pairing window, as shown to the administrator and handed to the
/// enrolment code once a device has proved the code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowInfo {
    /// The window's public id, carried in the pairing URI.
    pub claim: String,
    /// The name the paired client will get.
    pub name: String,
    /// What the paired client will be.
    pub role: Role,
    /// The topic rights the paired client will get.
    pub grants: Grants,
    /// When the window closes by itself.
    pub expires_at: Instant,
    /// Wrong codes presented so far.
    pub failures: u32,
}

/// Why a pairing window closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Closed {
    /// A device proved the code: codes work once.
    #[error("this pairing code was already used")]
    Used,
    /// The window's lifetime ran out.
    #[error("this pairing code has expired")]
    Expired,
    /// The administrator cancelled the window.
    #[error("pairing was cancelled")]
    Cancelled,
    /// Too many wrong codes were presented.
    #[error("too many wrong codes: this pairing window is closed")]
    TooManyFailures,
}

/// Why a pairing attempt or cancellation was refused. The messages are meant
/// for the device's user and for `hubctl`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PairError {
    /// No window with this claim id is open or remembered.
    #[error("unknown pairing claim: no pairing window with this id")]
    UnknownClaim,
    /// The window is closed.
    #[error("{0}")]
    Closed(Closed),
    /// The code does not match; the window stays open.
    #[error("wrong code: {failures_left} {}", if *.failures_left == 1 { "attempt left" } else { "attempts left" })]
    WrongCode {
        /// Wrong codes still allowed before the window closes.
        failures_left: u32,
    },
    /// The source tried again too soon.
    #[error("too many attempts from this address: try again in {} s", whole_seconds_up(.retry_after))]
    RateLimited {
        /// How long the source must wait.
        retry_after: Duration,
    },
    /// The presented code is malformed (it cannot match any code).
    #[error(transparent)]
    BadCode(#[from] CodeError),
}

/// A duration in whole seconds, rounded up and at least 1, for messages.
fn whole_seconds_up(d: &Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

/// An open window and its secret.
struct Open {
    info: WindowInfo,
    code: SetupCode,
}

/// A closed window, remembered for a while.
struct Remembered {
    claim: String,
    why: Closed,
    closed_at: Instant,
}

/// All pairing windows: the open ones, recently closed ones, and the per-source
/// rate limiter for pairing attempts.
pub struct Windows {
    /// Open windows by claim id.
    open: HashMap<String, Open>,
    /// Recently closed windows, oldest first; at most [`REMEMBER_CLOSED_MAX`].
    closed: VecDeque<Remembered>,
    /// The time of the last admitted attempt per source (see [`source_key`]).
    last_attempt: HashMap<IpAddr, Instant>,
    /// Wrong codes that close a window.
    max_failures: u32,
    /// The least time between two attempts from one source.
    min_interval: Duration,
}

impl fmt::Debug for Windows {
    /// Lists the open windows without their codes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Windows")
            .field("open", &self.open.keys().collect::<Vec<_>>())
            .field("closed", &self.closed.len())
            .field("max_failures", &self.max_failures)
            .field("min_interval", &self.min_interval)
            .finish_non_exhaustive()
    }
}

/// The rate limiter's key for a source address. IPv6 sources are limited per
/// /64, because anyone with one IPv6 address has a whole /64 of them; an
/// IPv4-mapped IPv6 address counts as the IPv4 address.
fn source_key(source: IpAddr) -> IpAddr {
    match source {
        IpAddr::V4(_) => source,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
    }
}

impl Windows {
    /// No windows yet. `max_failures` wrong codes close a window (at least 1);
    /// attempts from one source closer together than `min_interval_per_source`
    /// are refused.
    pub fn new(max_failures: u32, min_interval_per_source: Duration) -> Self {
        Windows {
            open: HashMap::new(),
            closed: VecDeque::new(),
            last_attempt: HashMap::new(),
            max_failures: max_failures.max(1),
            min_interval: min_interval_per_source,
        }
    }

    /// Opens a window; returns its info and the one-time code. The claim id is
    /// 10 random bytes in lowercase base32, unique among open and remembered
    /// windows. A lifetime beyond [`MAX_WINDOW_LIFETIME`] is shortened to it.
    pub fn open(
        &mut self,
        name: String,
        role: Role,
        grants: Grants,
        lifetime: Duration,
        now: Instant,
    ) -> (WindowInfo, SetupCode) {
        self.forget_old(now);
        let claim = loop {
            let mut bytes = [0u8; CLAIM_RANDOM_BYTES];
            rand::rngs::OsRng
                .try_fill_bytes(&mut bytes)
                .expect("the OS random number generator is available on every supported platform");
            let claim = base32_lower(&bytes);
            if !self.open.contains_key(&claim) && self.remembered(&claim).is_none() {
                break claim;
            }
        };
        let lifetime = lifetime.min(MAX_WINDOW_LIFETIME);
        let info = WindowInfo {
            claim: claim.clone(),
            name,
            role,
            grants,
            // Saturates instead of panicking on a clock near its end.
            expires_at: now.checked_add(lifetime).unwrap_or(now),
            failures: 0,
        };
        let code = SetupCode::generate();
        self.open.insert(
            claim,
            Open {
                info: info.clone(),
                code: code.clone(),
            },
        );
        (info, code)
    }

    /// The open windows, soonest to expire first, after expiring those that are due.
    pub fn list(&mut self, now: Instant) -> Vec<WindowInfo> {
        self.expire(now);
        let mut infos: Vec<WindowInfo> = self.open.values().map(|o| o.info.clone()).collect();
        infos.sort_by(|a, b| {
            a.expires_at
                .cmp(&b.expires_at)
                .then_with(|| a.claim.cmp(&b.claim))
        });
        infos
    }

    /// Cancels an open window and returns it.
    pub fn cancel(&mut self, claim: &str, now: Instant) -> Result<WindowInfo, PairError> {
        self.forget_old(now);
        self.expire_one(claim, now);
        match self.open.remove(claim) {
            Some(open) => {
                self.remember(claim.to_owned(), Closed::Cancelled, now);
                Ok(open.info)
            }
            None => Err(self.not_open(claim)),
        }
    }

    /// A client presents `claim` and `code` from `source`.
    ///
    /// On success the window is consumed ([`Closed::Used`]) and its info
    /// returned, so the caller can enrol the client. Each wrong code counts
    /// against the window; the `max_failures`-th closes it
    /// ([`Closed::TooManyFailures`]) and no code opens it again. A malformed
    /// code ([`PairError::BadCode`]) is not counted: it cannot match, so it
    /// tells a guesser nothing, and it spares a user's typo. Attempts from one
    /// source closer together than the minimum interval are refused before
    /// anything else is looked at and are not counted against the window.
    pub fn attempt(
        &mut self,
        claim: &str,
        code: &str,
        source: IpAddr,
        now: Instant,
    ) -> Result<WindowInfo, PairError> {
        self.forget_old(now);
        self.admit(source, now)?;
        self.expire_one(claim, now);
        let Some(open) = self.open.get_mut(claim) else {
            return Err(self.not_open(claim));
        };
        let presented = SetupCode::parse(code)?;
        if open.code.ct_eq(&presented) {
            let info = open.info.clone();
            self.open.remove(claim);
            self.remember(claim.to_owned(), Closed::Used, now);
            return Ok(info);
        }
        open.info.failures = open.info.failures.saturating_add(1);
        let failures_left = self.max_failures.saturating_sub(open.info.failures);
        if failures_left == 0 {
            self.open.remove(claim);
            self.remember(claim.to_owned(), Closed::TooManyFailures, now);
            return Err(PairError::Closed(Closed::TooManyFailures));
        }
        Err(PairError::WrongCode { failures_left })
    }

    /// Closes the windows whose time has come and returns them.
    pub fn expire(&mut self, now: Instant) -> Vec<WindowInfo> {
        self.forget_old(now);
        let due: Vec<String> = self
            .open
            .iter()
            .filter(|(_, o)| o.info.expires_at <= now)
            .map(|(claim, _)| claim.clone())
            .collect();
        let mut closed = Vec::with_capacity(due.len());
        for claim in due {
            if let Some(open) = self.open.remove(&claim) {
                self.remember(claim, Closed::Expired, open.info.expires_at);
                closed.push(open.info);
            }
        }
        closed.sort_by_key(|info| info.expires_at);
        closed
    }

    /// Whether no window is open: the pairing listener should then be closed.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// When the next open window expires, if any.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.open.values().map(|o| o.info.expires_at).min()
    }

    /// Applies the per-source rate limit and records an admitted attempt.
    fn admit(&mut self, source: IpAddr, now: Instant) -> Result<(), PairError> {
        let key = source_key(source);
        if let Some(&last) = self.last_attempt.get(&key) {
            let since = now.saturating_duration_since(last);
            if since < self.min_interval {
                return Err(PairError::RateLimited {
                    retry_after: self.min_interval - since,
                });
            }
        } else if self.last_attempt.len() >= RATE_LIMIT_MAX_SOURCES {
            // Full of sources that tried within the last interval: make the
            // newcomer wait until the oldest entry would have been dropped.
            let oldest = self.last_attempt.values().min().copied().unwrap_or(now);
            let since = now.saturating_duration_since(oldest);
            return Err(PairError::RateLimited {
                retry_after: self.min_interval.saturating_sub(since),
            });
        }
        self.last_attempt.insert(key, now);
        Ok(())
    }

    /// Closes the window `claim` as expired if its time has come.
    fn expire_one(&mut self, claim: &str, now: Instant) {
        let due = self
            .open
            .get(claim)
            .is_some_and(|o| o.info.expires_at <= now);
        if due && let Some(open) = self.open.remove(claim) {
            self.remember(claim.to_owned(), Closed::Expired, open.info.expires_at);
        }
    }

    /// The error for a claim that is not open: why it closed, or unknown.
    fn not_open(&self, claim: &str) -> PairError {
        match self.remembered(claim) {
            Some(why) => PairError::Closed(why),
            None => PairError::UnknownClaim,
        }
    }

    /// Why the window `claim` closed, if it is remembered.
    fn remembered(&self, claim: &str) -> Option<Closed> {
        self.closed
            .iter()
            .rev()
            .find(|r| r.claim == claim)
            .map(|r| r.why)
    }

    /// Remembers a closed window, forgetting the oldest beyond the bound.
    fn remember(&mut self, claim: String, why: Closed, closed_at: Instant) {
        while self.closed.len() >= REMEMBER_CLOSED_MAX {
            self.closed.pop_front();
        }
        self.closed.push_back(Remembered {
            claim,
            why,
            closed_at,
        });
    }

    /// Drops closed windows older than [`REMEMBER_CLOSED_FOR`] and rate-limit
    /// entries that no longer limit anything.
    fn forget_old(&mut self, now: Instant) {
        self.closed
            .retain(|r| now.saturating_duration_since(r.closed_at) < REMEMBER_CLOSED_FOR);
        let interval = self.min_interval;
        self.last_attempt
            .retain(|_, &mut last| now.saturating_duration_since(last) < interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const FP: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn code_with(symbol_at: &[(usize, u8)], base: &SetupCode) -> String {
        let mut bytes = base.canonical().as_bytes().to_vec();
        for &(i, s) in symbol_at {
            bytes[i] = s;
        }
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn generated_codes_are_distinct_and_parse_back() {
        let mut seen = HashSet::new();
        for _ in 0..100_000 {
            let code = SetupCode::generate();
            assert_eq!(code.canonical().len(), CODE_LEN);
            assert_eq!(code.canonical().chars().count(), 17);
            let grouped = code.to_string();
            let parsed = SetupCode::parse(&grouped).unwrap();
            assert!(parsed.ct_eq(&code));
            assert_eq!(parsed.canonical(), code.canonical());
            assert!(
                seen.insert(code.canonical().to_owned()),
                "duplicate {grouped}"
            );
        }
    }

    #[test]
    fn check_symbol_catches_every_single_substitution() {
        for _ in 0..200 {
            let code = SetupCode::generate();
            let canonical = code.canonical().as_bytes();
            for (i, &original) in canonical.iter().enumerate() {
                let alphabet: &[u8] = if i < CODE_DATA_LEN {
                    DATA_SYMBOLS
                } else {
                    CHECK_SYMBOLS
                };
                for &s in alphabet.iter().filter(|&&s| s != original) {
                    let typo = code_with(&[(i, s)], &code);
                    assert_eq!(
                        SetupCode::parse(&typo).err(),
                        Some(CodeError::Check),
                        "{typo}"
                    );
                }
                // Check-only symbols are not data symbols at all.
                if i < CODE_DATA_LEN {
                    for &s in &CHECK_SYMBOLS[32..] {
                        let typo = code_with(&[(i, s)], &code);
                        assert_eq!(
                            SetupCode::parse(&typo).err(),
                            Some(CodeError::BadChar { ch: char::from(s) })
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn check_symbol_catches_every_adjacent_transposition() {
        let mut swaps = 0;
        for _ in 0..2_000 {
            let code = SetupCode::generate();
            let c = code.canonical().as_bytes();
            for i in 0..CODE_LEN - 1 {
                if c[i] == c[i + 1] {
                    continue;
                }
                let swapped = code_with(&[(i, c[i + 1]), (i + 1, c[i])], &code);
                let err = SetupCode::parse(&swapped).err();
                // Moving a check-only symbol into the data is a bad character;
                // every other swap must fail the check.
                if CHECK_SYMBOLS[32..].contains(&c[i + 1]) {
                    assert!(matches!(err, Some(CodeError::BadChar { .. })), "{swapped}");
                } else {
                    assert_eq!(err, Some(CodeError::Check), "{swapped}");
                    swaps += 1;
                }
            }
        }
        assert!(swaps > 20_000);
    }

    #[test]
    fn parse_is_lenient_about_case_separators_and_aliases() {
        // All zero bits: sixteen zeros and check symbol 0.
        let zeros = SetupCode::from_random([0; CODE_RANDOM_BYTES]);
        assert_eq!(zeros.canonical(), "00000000000000000");
        assert_eq!(zeros.to_string(), "0000-0000-0000-0000-0");
        for typed in [
            "0000-0000-0000-0000-0",
            "oooo oooo OOOO-0000 o",
            " 0000000000000000-0 ",
            "0000--0000  0000 0000 0",
        ] {
            assert!(SetupCode::parse(typed).unwrap().ct_eq(&zeros), "{typed}");
        }
        // 0x08421084210842108421 is 1 in every 5-bit group: sixteen ones.
        let ones =
            SetupCode::from_random([0x08, 0x42, 0x10, 0x84, 0x21, 0x08, 0x42, 0x10, 0x84, 0x21]);
        assert_eq!(&ones.canonical()[..16], "1111111111111111");
        let check = &ones.canonical()[16..];
        for typed in [
            format!("1111-1111-1111-1111-{check}"),
            format!("iIlL-1111-iiii-LLLL-{}", check.to_lowercase()),
        ] {
            let parsed = SetupCode::parse(&typed).unwrap();
            assert!(parsed.ct_eq(&ones), "{typed}");
            assert_eq!(parsed.canonical(), ones.canonical());
        }
        let code = SetupCode::generate();
        let lower = code.to_string().to_lowercase();
        assert!(SetupCode::parse(&lower).unwrap().ct_eq(&code));
        assert!(code.canonical().parse::<SetupCode>().unwrap().ct_eq(&code));
    }

    #[test]
    fn parse_rejects_bad_characters_and_lengths() {
        assert_eq!(
            SetupCode::parse("").err(),
            Some(CodeError::Length { got: 0 })
        );
        assert_eq!(
            SetupCode::parse("ABCD-EFGH").err(),
            Some(CodeError::Length { got: 8 })
        );
        assert_eq!(
            SetupCode::parse("0000-0000-0000-0000-00").err(),
            Some(CodeError::Length { got: 18 })
        );
        for (typed, ch) in [
            ("0000-0000-0000-000U-0", 'U'),
            ("0000-0000-0000-000u-0", 'u'),
            ("0000_0000-0000-0000-0", '_'),
            ("0000-0000-0000-0000\t0", '\t'),
            ("0000-0000-0000-000é-0", 'é'),
            ("0000-0000-0000-000*-0", '*'),
        ] {
            assert_eq!(
                SetupCode::parse(typed).err(),
                Some(CodeError::BadChar { ch }),
                "{typed}"
            );
        }
        // A check-only symbol is fine as the check symbol: value 36 is U.
        assert!(matches!(
            SetupCode::parse("0000-0000-0000-0000-U").err(),
            Some(CodeError::Check)
        ));
    }

    #[test]
    fn codes_compare_in_constant_time_and_do_not_leak_through_debug() {
        let a = SetupCode::generate();
        let b = SetupCode::generate();
        assert!(a.ct_eq(&a.clone()));
        assert!(!a.ct_eq(&b));
        assert!(!ct_eq_bytes(b"abc", b"abcd"));
        assert_eq!(format!("{a:?}"), "SetupCode(<redacted>)");
        let grouped = a.to_string();
        assert_eq!(grouped.len(), 21);
        let groups: Vec<&str> = grouped.split('-').collect();
        assert_eq!(
            groups.iter().map(|g| g.len()).collect::<Vec<_>>(),
            [4, 4, 4, 4, 1]
        );
    }

    /// The rule "a code is never derived from anything but the RNG", as a
    /// tidy check on this file's non-test code.
    #[test]
    fn codes_come_only_from_the_os_rng() {
        let source = include_str!("pairing.rs");
        let code = source.split("#[cfg(test)]").next().unwrap();
        for forbidden in [
            "thread_rng",
            "rand::rng(",
            "SeedableRng",
            "StdRng",
            "SmallRng",
            "from_seed",
            "seed_from_u64",
            "SystemTime",
            "Instant::now",
        ] {
            assert!(!code.contains(forbidden), "pairing.rs uses {forbidden}");
        }
        assert_eq!(code.matches("rand::rngs::OsRng").count(), 2);
        // The private encoder is called from `generate` only.
        assert_eq!(code.matches("Self::from_random(").count(), 1);
        assert_eq!(code.matches("from_random(").count(), 2);
    }

    #[test]
    fn uri_round_trips() {
        for host in ["hub.local", "192.168.1.10", "fd00::1", "kitchen-hub"] {
            let uri = PairingUri::new(host, 8884, FP, "abc123").unwrap();
            let text = uri.to_string();
            assert_eq!(text.parse::<PairingUri>().unwrap(), uri, "{text}");
        }
        let uri = PairingUri::new("fd00::1", 8884, FP, "q0").unwrap();
        assert_eq!(
            uri.to_string(),
            format!("hubpair://[fd00::1]:8884/?ca=sha256:{FP}&claim=q0")
        );
        assert_eq!(
            PairingUri::new("[fd00::1]", 1, FP, "q0").unwrap().host,
            "fd00::1"
        );
        let parsed: PairingUri = format!("HUBPAIR://hub:8884?claim=x1&ca=sha256:{FP}")
            .parse()
            .unwrap();
        assert_eq!(parsed, PairingUri::new("hub", 8884, FP, "x1").unwrap());
        // A claim made by `Windows::open` fits.
        let mut windows = Windows::new(5, Duration::ZERO);
        let (info, _) = windows.open(
            "x".into(),
            Role::Device,
            Grants::default(),
            Duration::from_secs(60),
            Instant::now(),
        );
        assert!(PairingUri::new("hub", 8884, FP, &info.claim).is_ok());
    }

    #[test]
    fn uri_parse_is_strict() {
        let ok = |rest: &str| format!("hubpair://hub:8884/?{rest}");
        let ca = format!("ca=sha256:{FP}");
        let cases: Vec<(String, UriError)> = vec![
            (format!("http://hub:8884/?{ca}&claim=a"), UriError::Scheme),
            (format!("hubpair:/hub:8884/?{ca}&claim=a"), UriError::Scheme),
            (
                format!("hubpair://hub/?{ca}&claim=a"),
                UriError::Port(String::new()),
            ),
            (
                format!("hubpair://hub:0/?{ca}&claim=a"),
                UriError::Port("0".into()),
            ),
            (
                format!("hubpair://hub:+1/?{ca}&claim=a"),
                UriError::Port("+1".into()),
            ),
            (
                format!("hubpair://hub:65536/?{ca}&claim=a"),
                UriError::Port("65536".into()),
            ),
            (
                format!("hubpair://:8884/?{ca}&claim=a"),
                UriError::Host(String::new()),
            ),
            (
                format!("hubpair://fd00::1:8884/?{ca}&claim=a"),
                UriError::Port(":1:8884".into()),
            ),
            (
                format!("hubpair://[fd00::zz]:8884/?{ca}&claim=a"),
                UriError::Host("[fd00::zz]".into()),
            ),
            (
                format!("hubpair://a_b:8884/?{ca}&claim=a"),
                UriError::Host("a_b".into()),
            ),
            (
                format!("hubpair://1.2.3:8884/?{ca}&claim=a"),
                UriError::Host("1.2.3".into()),
            ),
            (
                format!("hubpair://user@hub:8884/?{ca}&claim=a"),
                UriError::Host("user@hub".into()),
            ),
            (
                format!("hubpair://hub:8884/x?{ca}&claim=a"),
                UriError::Path("/x".into()),
            ),
            (
                format!("{}#frag", ok(&format!("{ca}&claim=a"))),
                UriError::Fragment("frag".into()),
            ),
            (
                ok(&format!("{ca}&claim=a&pin=1234")),
                UriError::UnknownKey("pin".into()),
            ),
            (
                ok(&format!("{ca}&claim=a&claim=b")),
                UriError::DuplicateKey("claim".into()),
            ),
            (
                ok(&format!("{ca}&claim")),
                UriError::NoValue("claim".into()),
            ),
            (
                ok(&format!("{ca}&claim=a&")),
                UriError::NoValue(String::new()),
            ),
            (ok(&ca), UriError::MissingKey("claim")),
            (ok("claim=a"), UriError::MissingKey("ca")),
            (ok(""), UriError::NoValue(String::new())),
            (
                ok(&format!("ca={FP}&claim=a")),
                UriError::Fingerprint(FP.into()),
            ),
            (
                ok(&format!("ca=sha256:{}&claim=a", &FP[1..])),
                UriError::Fingerprint(format!("sha256:{}", &FP[1..])),
            ),
            (
                ok(&format!("ca=sha256:{}&claim=a", FP.to_uppercase())),
                UriError::Fingerprint(format!("sha256:{}", FP.to_uppercase())),
            ),
            (ok(&format!("{ca}&claim=AB")), UriError::Claim("AB".into())),
            (
                ok(&format!("{ca}&claim=a%20b")),
                UriError::Claim("a%20b".into()),
            ),
            (ok(&format!("{ca}&claim=")), UriError::Claim(String::new())),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<PairingUri>().err(), Some(want), "{text}");
        }
        assert_eq!(
            UriError::UnknownKey("pin".into()).to_string(),
            "pairing uri: unknown query parameter \"pin\""
        );
        assert!(PairingUri::new("hub/x", 1, FP, "a").is_err());
        assert!(PairingUri::new("hub", 0, FP, "a").is_err());
        assert!(PairingUri::new("hub", 1, "ab", "a").is_err());
        assert!(PairingUri::new("hub", 1, FP, "A").is_err());
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 168, 1, last))
    }

    fn open(windows: &mut Windows, now: Instant, secs: u64) -> (WindowInfo, SetupCode) {
        windows.open(
            "Kitchen sensor".into(),
            Role::Device,
            Grants::default(),
            Duration::from_secs(secs),
            now,
        )
    }

    /// A valid code that is not `code`.
    fn other_code(code: &SetupCode) -> String {
        loop {
            let other = SetupCode::generate();
            if !other.ct_eq(code) {
                return other.to_string();
            }
        }
    }

    #[test]
    fn a_code_works_once() {
        let t0 = Instant::now();
        let mut windows = Windows::new(5, Duration::from_secs(1));
        assert!(windows.is_empty());
        let (info, code) = open(&mut windows, t0, 300);
        assert!(!windows.is_empty());
        assert_eq!(info.claim.len(), 16);
        assert_eq!(info.expires_at, t0 + Duration::from_secs(300));
        let got = windows
            .attempt(&info.claim, &code.to_string().to_lowercase(), ip(1), t0)
            .unwrap();
        assert_eq!(got, info);
        assert!(windows.is_empty());
        assert_eq!(windows.next_expiry(), None);
        let again = windows.attempt(
            &info.claim,
            &code.to_string(),
            ip(1),
            t0 + Duration::from_secs(2),
        );
        assert_eq!(again, Err(PairError::Closed(Closed::Used)));
        assert_eq!(
            again.unwrap_err().to_string(),
            "this pairing code was already used"
        );
        assert_eq!(
            windows.cancel(&info.claim, t0),
            Err(PairError::Closed(Closed::Used))
        );
    }

    #[test]
    fn expired_windows_refuse_with_their_reason() {
        let t0 = Instant::now();
        let mut windows = Windows::new(5, Duration::ZERO);
        let (short, short_code) = open(&mut windows, t0, 60);
        let (long, _) = open(&mut windows, t0, 120);
        assert_eq!(windows.next_expiry(), Some(short.expires_at));
        assert!(windows.expire(t0 + Duration::from_secs(59)).is_empty());
        // Due exactly at `expires_at`.
        let err = windows
            .attempt(
                &short.claim,
                &short_code.to_string(),
                ip(1),
                short.expires_at,
            )
            .unwrap_err();
        assert_eq!(err, PairError::Closed(Closed::Expired));
        assert_eq!(err.to_string(), "this pairing code has expired");
        assert_eq!(windows.next_expiry(), Some(long.expires_at));
        assert_eq!(
            windows.list(t0 + Duration::from_secs(61)),
            vec![long.clone()]
        );
        let closed = windows.expire(t0 + Duration::from_secs(500));
        assert_eq!(closed, vec![long.clone()]);
        assert!(windows.is_empty());
        assert!(windows.list(t0 + Duration::from_secs(500)).is_empty());
        assert_eq!(
            windows.cancel(&long.claim, t0 + Duration::from_secs(500)),
            Err(PairError::Closed(Closed::Expired))
        );
    }

    #[test]
    fn cancelled_windows_refuse_with_their_reason() {
        let t0 = Instant::now();
        let mut windows = Windows::new(5, Duration::ZERO);
        let (info, code) = open(&mut windows, t0, 60);
        assert_eq!(windows.cancel(&info.claim, t0), Ok(info.clone()));
        assert!(windows.is_empty());
        let err = windows
            .attempt(&info.claim, &code.to_string(), ip(1), t0)
            .unwrap_err();
        assert_eq!(err, PairError::Closed(Closed::Cancelled));
        assert_eq!(err.to_string(), "pairing was cancelled");
        assert_eq!(
            windows.cancel(&info.claim, t0),
            Err(PairError::Closed(Closed::Cancelled))
        );
    }

    #[test]
    fn too_many_wrong_codes_close_the_window() {
        let t0 = Instant::now();
        let mut windows = Windows::new(5, Duration::ZERO);
        let (info, code) = open(&mut windows, t0, 60);
        let wrong = other_code(&code);
        for left in (1..5).rev() {
            let err = windows.attempt(&info.claim, &wrong, ip(1), t0).unwrap_err();
            assert_eq!(
                err,
                PairError::WrongCode {
                    failures_left: left
                }
            );
        }
        assert_eq!(windows.list(t0)[0].failures, 4);
        assert_eq!(
            windows.attempt(&info.claim, &wrong, ip(1), t0),
            Err(PairError::Closed(Closed::TooManyFailures))
        );
        assert!(windows.is_empty());
        assert_eq!(
            windows.attempt(&info.claim, &code.to_string(), ip(1), t0),
            Err(PairError::Closed(Closed::TooManyFailures))
        );
    }

    #[test]
    fn malformed_codes_are_not_counted() {
        let t0 = Instant::now();
        let mut windows = Windows::new(2, Duration::ZERO);
        let (info, code) = open(&mut windows, t0, 60);
        let mut typo = code.canonical().to_owned();
        typo.pop();
        for _ in 0..10 {
            assert_eq!(
                windows.attempt(&info.claim, &typo, ip(1), t0),
                Err(PairError::BadCode(CodeError::Length { got: 16 }))
            );
        }
        assert_eq!(windows.list(t0)[0].failures, 0);
        assert!(
            windows
                .attempt(&info.claim, code.canonical(), ip(1), t0)
                .is_ok()
        );
    }

    #[test]
    fn rate_limit_is_per_source() {
        let t0 = Instant::now();
        let second = Duration::from_secs(1);
        let mut windows = Windows::new(5, second);
        let (info, code) = open(&mut windows, t0, 60);
        let wrong = other_code(&code);
        assert!(matches!(
            windows.attempt(&info.claim, &wrong, ip(1), t0),
            Err(PairError::WrongCode { failures_left: 4 })
        ));
        let soon = t0 + Duration::from_millis(300);
        assert_eq!(
            windows.attempt(&info.claim, &code.to_string(), ip(1), soon),
            Err(PairError::RateLimited {
                retry_after: Duration::from_millis(700)
            })
        );
        // Refused attempts do not count against the window, and unknown
        // claims are rate limited too.
        assert_eq!(windows.list(soon)[0].failures, 1);
        assert!(matches!(
            windows.attempt("nosuchclaim", &wrong, ip(1), soon),
            Err(PairError::RateLimited { .. })
        ));
        // Another source is not affected.
        assert!(matches!(
            windows.attempt(&info.claim, &wrong, ip(2), soon),
            Err(PairError::WrongCode { failures_left: 3 })
        ));
        // IPv6 sources are limited per /64; IPv4-mapped addresses as IPv4.
        let v6 = |last: u16, net: u16| IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, net, 0, 0, 0, last));
        assert!(matches!(
            windows.attempt("nosuchclaim", &wrong, v6(1, 1), soon),
            Err(PairError::UnknownClaim)
        ));
        assert!(matches!(
            windows.attempt("nosuchclaim", &wrong, v6(2, 1), soon),
            Err(PairError::RateLimited { .. })
        ));
        assert!(matches!(
            windows.attempt("nosuchclaim", &wrong, v6(1, 2), soon),
            Err(PairError::UnknownClaim)
        ));
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 168, 1, 2).to_ipv6_mapped());
        assert!(matches!(
            windows.attempt("nosuchclaim", &wrong, mapped, soon),
            Err(PairError::RateLimited { .. })
        ));
        // After the interval the first source may try again and succeed.
        assert_eq!(
            windows.attempt(&info.claim, &code.to_string(), ip(1), t0 + second),
            Ok(WindowInfo {
                failures: 2,
                ..info
            })
        );
    }

    #[test]
    fn rate_limit_table_is_bounded() {
        let t0 = Instant::now();
        let mut windows = Windows::new(5, Duration::from_secs(1));
        for i in 0..RATE_LIMIT_MAX_SOURCES {
            let source = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i as u32));
            assert_eq!(
                windows.attempt("nosuchclaim", "x", source, t0),
                Err(PairError::UnknownClaim)
            );
        }
        let newcomer = IpAddr::V4(Ipv4Addr::new(192, 168, 9, 9));
        assert_eq!(
            windows.attempt("nosuchclaim", "x", newcomer, t0),
            Err(PairError::RateLimited {
                retry_after: Duration::from_secs(1)
            })
        );
        // Once the interval has passed the old entries are dropped.
        assert_eq!(
            windows.attempt("nosuchclaim", "x", newcomer, t0 + Duration::from_secs(1)),
            Err(PairError::UnknownClaim)
        );
        assert_eq!(windows.last_attempt.len(), 1);
    }

    #[test]
    fn unknown_claims_and_bounded_memory_of_closed_windows() {
        let t0 = Instant::now();
        let mut windows = Windows::new(5, Duration::ZERO);
        assert_eq!(
            windows.attempt("nosuchclaim", "0000-0000-0000-0000-0", ip(1), t0),
            Err(PairError::UnknownClaim)
        );
        assert_eq!(
            windows.cancel("nosuchclaim", t0),
            Err(PairError::UnknownClaim)
        );
        let claims: Vec<String> = (0..REMEMBER_CLOSED_MAX + 6)
            .map(|_| {
                let (info, _) = open(&mut windows, t0, 60);
                windows.cancel(&info.claim, t0).unwrap();
                info.claim
            })
            .collect();
        assert_eq!(claims.iter().collect::<HashSet<_>>().len(), claims.len());
        assert_eq!(windows.closed.len(), REMEMBER_CLOSED_MAX);
        assert_eq!(windows.cancel(&claims[0], t0), Err(PairError::UnknownClaim));
        let last = claims.last().unwrap();
        assert_eq!(
            windows.cancel(last, t0),
            Err(PairError::Closed(Closed::Cancelled))
        );
        // Forgotten after an hour.
        assert_eq!(
            windows.cancel(last, t0 + REMEMBER_CLOSED_FOR),
            Err(PairError::UnknownClaim)
        );
        assert!(windows.closed.is_empty());
    }

    #[test]
    fn list_and_next_expiry_follow_the_open_windows() {
        let t0 = Instant::now();
        let mut windows = Windows::new(5, Duration::ZERO);
        assert_eq!(windows.next_expiry(), None);
        let (b, _) = open(&mut windows, t0, 200);
        let (a, _) = windows.open(
            "Home Assistant".into(),
            Role::Integration,
            Grants {
                publish: vec!["d/+/cmd/#".into()],
                subscribe: vec!["d/+/state".into()],
            },
            Duration::from_secs(100),
            t0,
        );
        assert_eq!(windows.list(t0), vec![a.clone(), b.clone()]);
        assert_eq!(windows.next_expiry(), Some(a.expires_at));
        // Absurd lifetimes are capped rather than overflowing the clock.
        let (c, _) = open(&mut windows, t0, u64::MAX);
        assert_eq!(c.expires_at, t0 + MAX_WINDOW_LIFETIME);
        windows.cancel(&c.claim, t0).unwrap();
        assert_eq!(windows.expire(t0 + Duration::from_secs(150)), vec![a]);
        assert_eq!(windows.list(t0 + Duration::from_secs(150)), vec![b.clone()]);
        assert_eq!(windows.next_expiry(), Some(b.expires_at));
        assert!(!windows.is_empty());
        windows.cancel(&b.claim, t0).unwrap();
        assert!(windows.is_empty());
        assert_eq!(windows.next_expiry(), None);
    }

    #[test]
    fn messages_are_clear() {
        assert_eq!(
            PairError::WrongCode { failures_left: 3 }.to_string(),
            "wrong code: 3 attempts left"
        );
        assert_eq!(
            PairError::WrongCode { failures_left: 1 }.to_string(),
            "wrong code: 1 attempt left"
        );
        assert_eq!(
            PairError::RateLimited {
                retry_after: Duration::from_millis(3_200)
            }
            .to_string(),
            "too many attempts from this address: try again in 4 s"
        );
        assert_eq!(
            PairError::RateLimited {
                retry_after: Duration::from_millis(1)
            }
            .to_string(),
            "too many attempts from this address: try again in 1 s"
        );
        let all: Vec<String> = vec![
            PairError::UnknownClaim.to_string(),
            PairError::Closed(Closed::TooManyFailures).to_string(),
            PairError::BadCode(CodeError::Check).to_string(),
            CodeError::Length { got: 3 }.to_string(),
            CodeError::BadChar { ch: '#' }.to_string(),
            UriError::Scheme.to_string(),
            UriError::MissingKey("ca").to_string(),
        ];
        for message in all {
            assert!(!message.ends_with('.'), "{message}");
            assert!(
                !message.starts_with(|c: char| c.is_uppercase()),
                "{message}"
            );
        }
    }
}
