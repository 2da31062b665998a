//! Simulated device fleets: many devices, each on its own MQTT 3.1.1 session
//! over mutual TLS, that reconnect by themselves with full-jitter exponential
//! backoff, as principle 9 asks of real devices ("come back in an orderly
//! fashion, rather than in a massive scale reconnect").
//!
//! [`Backoff`] is the reconnect policy: the n-th consecutive failure waits a
//! uniform random time in `[0, min(cap, base * 2^n)]`, and the failure count
//! resets only after a connection stayed up for the `stable` period, so a
//! hub that accepts and drops at once cannot pull a device into a fast loop.
//!
//! [`Fleet`] runs one tokio task per device (a sensor ticker adds a second
//! one). On every (re)connect a device publishes its `d/<id>/meta` (retained),
//! subscribes to `d/<id>/cmd/#` and publishes its last state retained on
//! `d/<id>/state`. Sensors then publish readings at a configurable rate;
//! switches obey `d/<id>/cmd/set` and acknowledge on `d/<id>/ack/set`. The
//! fleet keeps shared counters and a log of connection attempts, so tests and
//! benchmarks can ask "how many attempts reached the hub in each second".
//!
//! Every device also takes signed firmware updates (hubd/OTA.md): it
//! subscribes to `d/<id>/ota/#` on every (re)connect and hands what arrives
//! there to its [`OtaDevice`], which trusts [`FleetConfig::vendor_key`]. It
//! fetches, verifies and installs as OTA.md says, reports on
//! `d/<id>/update/result` and then publishes its new meta. The firmware a
//! device runs lives as long as the [`Fleet`] (a new fleet starts again from
//! the factory firmware of its [`Kind`]).
//!
//! [`enroll_devices`] enrols devices through the admin API (factory
//! provisioning, fast); [`provision`] pairs them through the real pairing
//! path and keeps their identities in a directory for the next run.

use std::collections::VecDeque;
use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use hub_proto::v1 as pb;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, NetworkOptions,
    Outgoing, Packet, QoS, TlsConfiguration, Transport,
};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::ota::{self, OtaDevice, Outcome, Step, VendorKey};
use crate::pair::{self, PairError, PairingUri};
use crate::{DeviceIdentity, TestHub};

/// Requests a device's `AsyncClient` may queue for its event loop. A device
/// sends at most five requests per (re)connect (meta, two subscriptions, a
/// resumed chunk request, state), one per reading, one per firmware chunk
/// and two when an update ends (result, meta), so sixteen is plenty, and it
/// keeps a thousand devices' queues small.
pub const REQUEST_CHANNEL: usize = 16;

/// The largest packet a device accepts: a firmware chunk of
/// [`ota::MAX_CHUNK_SIZE`] with room for its topic and header (rumqttc's
/// default, 10 KiB, is less than one 16 KiB chunk).
pub const MAX_INCOMING_PACKET: usize = ota::MAX_CHUNK_SIZE as usize + 4096;

/// The largest packet a device sends (rumqttc's default: meta, state and OTA
/// requests are small).
const MAX_OUTGOING_PACKET: usize = 10 * 1024;

/// Most connection-attempt times the fleet remembers; older ones are
/// forgotten first, so a long `hubsim run` holds at most 16 MiB of them.
pub const ATTEMPT_LOG_CAP: usize = 1 << 20;

/// A small, fast pseudo-random generator (SplitMix64) for jitter and
/// simulated readings. Jitter needs spread, not secrecy, and a seeded
/// generator lets tests reproduce a run exactly.
#[derive(Debug, Clone)]
pub struct SimRng(u64);

impl SimRng {
    /// A generator that always yields the same sequence for `seed`.
    pub fn seeded(seed: u64) -> SimRng {
        SimRng(seed)
    }

    /// A generator seeded from the OS-random keys of std's `RandomState`
    /// (distinct for every call), so devices started together do not share
    /// their jitter.
    pub fn from_entropy() -> SimRng {
        SimRng(RandomState::new().hash_one(0x5eed_u64))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, max]`, both ends included (a widening multiply, so no
    /// modulo bias worth the name).
    pub fn up_to(&mut self, max: u64) -> u64 {
        ((u128::from(self.next_u64()) * (u128::from(max) + 1)) >> 64) as u64
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A uniform duration in `[0, max]`.
    pub fn duration_up_to(&mut self, max: Duration) -> Duration {
        let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(self.up_to(nanos))
    }
}

/// Full-jitter exponential backoff with a "stable" reset.
///
/// Full jitter (AWS's name for it) spreads a crowd of devices that failed
/// together over the whole window instead of bunching them at its end, which
/// is what keeps a hub restart from turning into a synchronised storm.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    stable: Duration,
    /// Consecutive failures so far: `n` of the next delay.
    failures: u32,
    /// When the current connection came up, if it is up.
    connected_at: Option<Instant>,
    /// The last refusal was "server busy": the next delay is at least `base`.
    busy: bool,
    rng: SimRng,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(
            Backoff::DEFAULT_BASE,
            Backoff::DEFAULT_CAP,
            Backoff::DEFAULT_STABLE,
        )
    }
}

impl Backoff {
    pub const DEFAULT_BASE: Duration = Duration::from_secs(1);
    pub const DEFAULT_CAP: Duration = Duration::from_secs(60);
    pub const DEFAULT_STABLE: Duration = Duration::from_secs(30);

    /// A backoff with its own entropy-seeded generator.
    pub fn new(base: Duration, cap: Duration, stable: Duration) -> Backoff {
        Backoff {
            base,
            cap,
            stable,
            failures: 0,
            connected_at: None,
            busy: false,
            rng: SimRng::from_entropy(),
        }
    }

    /// The same backoff drawing from a generator seeded with `seed`.
    pub fn with_rng(mut self, seed: u64) -> Backoff {
        self.rng = SimRng::seeded(seed);
        self
    }

    /// Consecutive failures counted so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The largest delay the `n`-th consecutive failure may wait:
    /// `min(cap, base * 2^n)`, computed without overflow for any `n`.
    pub fn ceiling(&self, n: u32) -> Duration {
        if n >= 64 {
            return self.cap;
        }
        let upper = self.base.as_nanos().saturating_mul(1u128 << n);
        if upper >= self.cap.as_nanos() {
            self.cap
        } else {
            // Below `cap`, which is a Duration, so it fits one.
            Duration::from_nanos(upper as u64)
        }
    }

    /// The delay before the next attempt, and one more failure counted.
    pub fn next_delay(&mut self) -> Duration {
        let upper = self.ceiling(self.failures);
        let floor = if self.busy {
            self.base.min(upper)
        } else {
            Duration::ZERO
        };
        self.busy = false;
        self.failures = self.failures.saturating_add(1);
        floor + self.rng.duration_up_to(upper - floor)
    }

    /// A connection came up at `at`.
    pub fn on_connected(&mut self, at: Instant) {
        self.connected_at = Some(at);
    }

    /// The connection ended at `at`. Only a connection that stayed up for the
    /// stable period resets the failure count: a hub that accepts and then
    /// drops at once must not reset a device to the shortest delay.
    pub fn on_disconnected(&mut self, at: Instant) {
        if let Some(since) = self.connected_at.take()
            && at.saturating_duration_since(since) >= self.stable
        {
            self.failures = 0;
        }
    }

    /// The hub answered "server busy": a failure like any other (counted by
    /// the next [`next_delay`](Self::next_delay)), but that delay is at least
    /// `base`, so a busy hub is never asked again at once.
    pub fn on_busy(&mut self) {
        self.busy = true;
    }
}

/// What a simulated device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Publishes temperature, humidity and battery readings.
    Sensor,
    /// A relay: obeys `d/<id>/cmd/set {"on": bool}` and reports its state.
    Switch,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::Sensor, Kind::Switch];

    /// The `kind` the device states in its meta.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Sensor => "sensor",
            Kind::Switch => "switch",
        }
    }

    /// The simulated product: (model, factory firmware version).
    fn product(self) -> (&'static str, &'static str) {
        match self {
            Kind::Sensor => ("HS-TH20", "2.3.1"),
            Kind::Switch => ("HS-SW10", "1.8.0"),
        }
    }

    /// The simulated product's model name (`HS-TH20`, `HS-SW10`).
    pub fn model(self) -> &'static str {
        self.product().0
    }

    /// The firmware version a device of this kind leaves the factory with.
    pub fn factory_firmware(self) -> &'static str {
        self.product().1
    }

    /// The factory firmware image. The simulated image is its own
    /// description, `"hubsim <model> firmware <version>"`, so its hash is
    /// stable across runs, as a real device's would be.
    pub fn factory_image(self) -> Vec<u8> {
        self.image(self.factory_firmware())
    }

    /// The simulated image a device of this kind runs when it runs
    /// `version` without having been updated by the hub (a device updated
    /// over the air runs the image it fetched).
    pub fn image(self, version: &str) -> Vec<u8> {
        format!("{VENDOR} {} firmware {version}", self.model()).into_bytes()
    }

    /// The retained `d/<id>/meta` document of a device fresh from the
    /// factory; see [`meta_running`](Self::meta_running).
    pub fn meta(self) -> serde_json::Value {
        self.meta_running(
            self.factory_firmware(),
            &ota::sha256_hex(&self.factory_image()),
        )
    }

    /// The retained `d/<id>/meta` document: what the device says it is, what
    /// firmware it runs (version and SHA-256 of the image) and until when its
    /// maker supports it (principle 2's "defined support period").
    pub fn meta_running(self, firmware: &str, firmware_sha256: &str) -> serde_json::Value {
        serde_json::json!({
            "kind": self.as_str(),
            "model": self.model(),
            "vendor": VENDOR,
            "firmware": firmware,
            "firmware_sha256": firmware_sha256,
            "support_end": SUPPORT_END,
        })
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Kind {
    type Err = String;

    fn from_str(s: &str) -> Result<Kind, String> {
        match s.trim() {
            "sensor" => Ok(Kind::Sensor),
            "switch" => Ok(Kind::Switch),
            other => Err(format!(
                "unknown device kind {other:?} (expected sensor or switch)"
            )),
        }
    }
}

/// The maker every simulated device names.
const VENDOR: &str = "hubsim";
/// The end of the simulated devices' support period.
const SUPPORT_END: &str = "2031-12-31";

/// How every device of a fleet behaves.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// State messages per second per sensor (fractional is fine); 0 means
    /// a sensor publishes its state only on (re)connect.
    pub rate: f64,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// A connection up this long resets the backoff.
    pub backoff_stable: Duration,
    pub keep_alive: Duration,
    /// Longest a TCP + TLS + CONNECT/CONNACK attempt may take.
    pub connect_timeout: Duration,
    /// Each device waits a uniform random time up to this before its first
    /// attempt (power-on jitter); zero starts them all at once.
    pub start_spread: Duration,
    /// Seeds every device's generator from this and its index, for
    /// reproducible runs; `None` draws fresh entropy.
    pub seed: Option<u64>,
    /// The Ed25519 public key the devices' maker built in: they install only
    /// images it signed. By default the simulated maker's test key,
    /// [`VendorKey::hubsim`].
    pub vendor_key: [u8; 32],
    /// A fault: every device flips one byte of each downloaded image before
    /// verifying it (tampering in transit or storage), so every update is
    /// refused as `hash`.
    pub ota_fault_corrupt: bool,
    /// The firmware version every device runs at start (its image is
    /// [`Kind::image`] of that version); `None`: its kind's factory version.
    pub firmware: Option<String>,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            rate: 0.1,
            backoff_base: Backoff::DEFAULT_BASE,
            backoff_cap: Backoff::DEFAULT_CAP,
            backoff_stable: Backoff::DEFAULT_STABLE,
            keep_alive: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            start_spread: Duration::ZERO,
            seed: None,
            vendor_key: VendorKey::hubsim().public_key(),
            ota_fault_corrupt: false,
            firmware: None,
        }
    }
}

/// A snapshot of a fleet's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FleetStats {
    pub devices: usize,
    /// Devices with a session right now.
    pub connected: usize,
    /// Devices that have had a session at least once.
    pub ever_connected: usize,
    /// Successful CONNACKs.
    pub connects: u64,
    /// Successful CONNACKs of devices that had been connected before.
    pub reconnects: u64,
    /// Connection attempts that reached the network (TCP connect onwards).
    pub attempts: u64,
    /// Attempts that did not end in a successful CONNACK.
    pub failures: u64,
    /// Of those, "server busy" refusals (MQTT 3.1.1 CONNACK return code 3).
    pub busy: u64,
    /// Attempts a simulated outage swallowed before they left the device.
    pub blocked: u64,
    /// Sessions that ended (hub gone, kicked, outage).
    pub disconnects: u64,
    /// PUBLISH packets the devices wrote.
    pub published: u64,
    /// PUBLISH packets the devices received.
    pub received: u64,
    /// Commands the devices acted on.
    pub commands: u64,
    /// Device tasks that ended on their own (never by design: a device gives
    /// up only if it cannot even build its TLS configuration).
    pub gave_up: u64,
    /// Devices that obeyed a reset (`d/<id>/cmd/reset`, sent by a hub wipe
    /// or removal): acknowledged it and forgot their credentials; they do
    /// not reconnect.
    pub forgot: u64,
    /// Firmware updates the devices verified, installed and reported.
    pub updates_installed: u64,
    /// Offers the devices answered with `"ok":false`, whatever the error
    /// code (refused before the download, failed during it or after).
    pub updates_refused: u64,
}

/// The fleet's shared counters; each field is one of [`FleetStats`].
#[derive(Default)]
struct Counters {
    /// Devices with a session right now.
    connected: AtomicUsize,
    /// Devices that have had a session at least once.
    ever_connected: AtomicUsize,
    /// Successful CONNACKs.
    connects: AtomicU64,
    /// Successful CONNACKs after an earlier session.
    reconnects: AtomicU64,
    /// Attempts that reached the network.
    attempts: AtomicU64,
    /// Attempts without a successful CONNACK.
    failures: AtomicU64,
    /// "Server busy" refusals.
    busy: AtomicU64,
    /// Attempts swallowed by a simulated outage.
    blocked: AtomicU64,
    /// Sessions that ended.
    disconnects: AtomicU64,
    /// PUBLISH packets written.
    published: AtomicU64,
    /// PUBLISH packets received.
    received: AtomicU64,
    /// Commands acted on.
    commands: AtomicU64,
    /// Device tasks that ended.
    gave_up: AtomicU64,
    /// Devices that obeyed a reset.
    forgot: AtomicU64,
    /// Firmware updates installed.
    updates_installed: AtomicU64,
    /// Offers answered with a refusal or failure.
    updates_refused: AtomicU64,
}

/// One device's part of the shared state.
struct Slot {
    id: String,
    kind: Kind,
    /// Nanoseconds from the fleet's origin to this session's CONNACK; 0 while
    /// the device has no session.
    connected_at: AtomicU64,
    /// The device's readings or relay, and the state payload it last sent.
    state: Mutex<DeviceState>,
    /// Set by a reset command: the device has forgotten its credentials and
    /// does not connect again.
    forgot: AtomicBool,
    /// Firmware updates: the state machine (which also holds the running
    /// firmware) and its retry deadline.
    ota: Mutex<OtaState>,
    /// Wakes the device's [`ota_timer`] when `OtaState::retry_at` changes.
    ota_timer: Notify,
}

impl Slot {
    fn new(id: String, kind: Kind, cfg: &FleetConfig, rng: SimRng) -> Slot {
        let version = cfg
            .firmware
            .as_deref()
            .unwrap_or_else(|| kind.factory_firmware());
        let mut device = OtaDevice::new(
            kind.model(),
            version,
            &ota::sha256_hex(&kind.image(version)),
            cfg.vendor_key,
        );
        device.corrupt_download = cfg.ota_fault_corrupt;
        Slot {
            id,
            kind,
            connected_at: AtomicU64::new(0),
            state: Mutex::new(DeviceState::new(kind, rng)),
            forgot: AtomicBool::new(false),
            ota: Mutex::new(OtaState {
                device,
                retry_at: None,
            }),
            ota_timer: Notify::new(),
        }
    }

    /// The device's meta, naming the firmware it runs now.
    fn meta(&self) -> serde_json::Value {
        lock(&self.ota).meta(self.kind)
    }
}

/// A device's firmware updates.
struct OtaState {
    device: OtaDevice,
    /// When the outstanding chunk request counts as unanswered: set at each
    /// request, cleared when none is outstanding or the session ends.
    retry_at: Option<tokio::time::Instant>,
}

impl OtaState {
    fn meta(&self, kind: Kind) -> serde_json::Value {
        kind.meta_running(self.device.version(), self.device.sha256())
    }
}

/// What a device knows about itself.
struct DeviceState {
    temperature: f64,
    humidity: f64,
    battery: f64,
    on: bool,
    rng: SimRng,
    /// The last `d/<id>/state` payload, republished on every reconnect.
    last: String,
}

impl DeviceState {
    fn new(kind: Kind, mut rng: SimRng) -> DeviceState {
        let mut state = DeviceState {
            temperature: 18.0 + 6.0 * rng.unit(),
            humidity: 35.0 + 20.0 * rng.unit(),
            battery: 60.0 + 40.0 * rng.unit(),
            on: false,
            rng,
            last: String::new(),
        };
        state.last = match kind {
            Kind::Sensor => state.reading(),
            Kind::Switch => state.relay(),
        };
        state
    }

    /// A new sensor reading: a slow random walk, as a room drifts.
    fn step(&mut self) -> String {
        self.temperature = (self.temperature + (self.rng.unit() - 0.5) * 0.2).clamp(10.0, 35.0);
        self.humidity = (self.humidity + (self.rng.unit() - 0.5) * 0.6).clamp(15.0, 90.0);
        self.battery = (self.battery - 0.01).max(0.0);
        self.last = self.reading();
        self.last.clone()
    }

    fn reading(&self) -> String {
        let tenth = |x: f64| (x * 10.0).round() / 10.0;
        serde_json::json!({
            "temperature": tenth(self.temperature),
            "humidity": tenth(self.humidity),
            "battery": self.battery.round() as u8,
            "ts": unix_now(),
        })
        .to_string()
    }

    fn set_on(&mut self, on: bool) -> String {
        self.on = on;
        self.last = self.relay();
        self.last.clone()
    }

    fn relay(&self) -> String {
        serde_json::json!({"on": self.on}).to_string()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Locks, and carries on after a panic elsewhere: every value behind these
/// locks is valid after any single update.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// State shared by the fleet handle and every device task.
struct Shared {
    /// The zero of every `Slot::connected_at`.
    origin: Instant,
    slots: Vec<Arc<Slot>>,
    counters: Counters,
    /// When attempts reached the network, oldest first, at most
    /// [`ATTEMPT_LOG_CAP`].
    attempt_log: Mutex<VecDeque<Instant>>,
    /// Woken on every counter change, for [`Fleet::wait_until`].
    changed: Notify,
    /// Whether the simulated network is up; devices drop their sessions and
    /// cannot reach the hub while it is down.
    network_up: watch::Sender<bool>,
}

impl Shared {
    fn new(slots: Vec<Arc<Slot>>) -> Shared {
        Shared {
            origin: Instant::now(),
            slots,
            counters: Counters::default(),
            attempt_log: Mutex::new(VecDeque::new()),
            changed: Notify::new(),
            network_up: watch::Sender::new(true),
        }
    }

    fn bump(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_waiters();
    }

    fn record_attempt(&self, at: Instant) {
        {
            let mut log = lock(&self.attempt_log);
            if log.len() >= ATTEMPT_LOG_CAP {
                log.pop_front();
            }
            log.push_back(at);
        }
        self.bump(&self.counters.attempts);
    }

    fn nanos_since_origin(&self, at: Instant) -> u64 {
        // At least 1: 0 means "not connected".
        u64::try_from(at.saturating_duration_since(self.origin).as_nanos())
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

/// A running fleet of simulated devices.
pub struct Fleet {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Fleet {
    /// Starts one task per device, connecting to `addr` (an IP address: no
    /// name is ever resolved). Must be called inside a tokio runtime.
    pub fn start(
        devices: Vec<(DeviceIdentity, Kind)>,
        addr: SocketAddr,
        cfg: FleetConfig,
    ) -> Fleet {
        let mut seeds = match cfg.seed {
            Some(seed) => SimRng::seeded(seed),
            None => SimRng::from_entropy(),
        };
        let slots = devices
            .iter()
            .map(|(identity, kind)| {
                let rng = SimRng::seeded(seeds.next_u64());
                Arc::new(Slot::new(identity.id.clone(), *kind, &cfg, rng))
            })
            .collect();
        let shared = Arc::new(Shared::new(slots));
        let cfg = Arc::new(cfg);
        let tasks = devices
            .into_iter()
            .enumerate()
            .map(|(index, (identity, _))| {
                let seed = seeds.next_u64();
                tokio::spawn(device_task(
                    shared.clone(),
                    index,
                    identity,
                    addr,
                    cfg.clone(),
                    seed,
                ))
            })
            .collect();
        Fleet { shared, tasks }
    }

    pub fn len(&self) -> usize {
        self.shared.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shared.slots.is_empty()
    }

    /// Every device's id and kind, in start order.
    pub fn devices(&self) -> Vec<(String, Kind)> {
        self.shared
            .slots
            .iter()
            .map(|s| (s.id.clone(), s.kind))
            .collect()
    }

    pub fn stats(&self) -> FleetStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FleetStats {
            devices: self.shared.slots.len(),
            connected: c.connected.load(Ordering::Relaxed),
            ever_connected: c.ever_connected.load(Ordering::Relaxed),
            connects: get(&c.connects),
            reconnects: get(&c.reconnects),
            attempts: get(&c.attempts),
            failures: get(&c.failures),
            busy: get(&c.busy),
            blocked: get(&c.blocked),
            disconnects: get(&c.disconnects),
            published: get(&c.published),
            received: get(&c.received),
            commands: get(&c.commands),
            gave_up: get(&c.gave_up),
            forgot: get(&c.forgot),
            updates_installed: get(&c.updates_installed),
            updates_refused: get(&c.updates_refused),
        }
    }

    /// The firmware device `id` runs now: (version, SHA-256 of the image in
    /// lowercase hex); `None` for an id not in this fleet. An update is
    /// counted in [`FleetStats::updates_installed`] only after it shows
    /// here, so [`wait_until`](Self::wait_until) can wait for either.
    pub fn firmware(&self, id: &str) -> Option<(String, String)> {
        let slot = self.shared.slots.iter().find(|s| s.id == id)?;
        let ota = lock(&slot.ota);
        Some((
            ota.device.version().to_owned(),
            ota.device.sha256().to_owned(),
        ))
    }

    /// The ids of the devices that obeyed a reset and forgot their
    /// credentials (their owner should delete the identity files too).
    pub fn forgotten(&self) -> Vec<String> {
        self.shared
            .slots
            .iter()
            .filter(|s| s.forgot.load(Ordering::Relaxed))
            .map(|s| s.id.clone())
            .collect()
    }

    /// Devices whose current session began after `since`.
    pub fn connected_since(&self, since: Instant) -> usize {
        let mark = self.shared.nanos_since_origin(since);
        self.shared
            .slots
            .iter()
            .filter(|s| s.connected_at.load(Ordering::Relaxed) > mark)
            .count()
    }

    /// When the latest of the current sessions began, if any device is connected.
    pub fn last_connected_at(&self) -> Option<Instant> {
        let latest = self
            .shared
            .slots
            .iter()
            .map(|s| s.connected_at.load(Ordering::Relaxed))
            .max()
            .filter(|n| *n > 0)?;
        Some(self.shared.origin + Duration::from_nanos(latest))
    }

    /// Every device's id and the state payload it last published (or will
    /// publish on connecting).
    pub fn last_states(&self) -> Vec<(String, String)> {
        self.shared
            .slots
            .iter()
            .map(|s| (s.id.clone(), lock(&s.state).last.clone()))
            .collect()
    }

    /// When connection attempts reached the network at or after `since`.
    pub fn attempt_times(&self, since: Instant) -> Vec<Instant> {
        lock(&self.shared.attempt_log)
            .iter()
            .copied()
            .filter(|t| *t >= since)
            .collect()
    }

    /// Connection attempts per `bin` from `from` on: element `i` counts the
    /// attempts in `[from + i*bin, from + (i+1)*bin)`.
    pub fn attempt_histogram(&self, from: Instant, bin: Duration) -> Vec<u64> {
        histogram(&self.attempt_times(from), from, bin)
    }

    /// Takes the simulated network down (every session is dropped at once
    /// and attempts fail before they leave the device) or brings it back.
    pub fn set_network(&self, up: bool) {
        self.shared.network_up.send_replace(up);
        self.shared.changed.notify_waiters();
    }

    /// The firmware offer device `id` is fetching, if any: (offer id, bytes
    /// received so far).
    pub fn downloading(&self, id: &str) -> Option<(String, u64)> {
        let slot = self.shared.slots.iter().find(|s| s.id == id)?;
        let ota = lock(&slot.ota);
        let (offer, received) = ota.device.downloading()?;
        Some((offer.id.clone(), received))
    }

    /// Waits until `cond` holds, re-checking whenever a counter changes or a
    /// device's firmware download moves on (so [`firmware`](Self::firmware)
    /// and [`downloading`](Self::downloading) can be waited on too); fails
    /// after `timeout` naming `what` and the counters.
    pub async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut(&Fleet) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            // Registered before the check, so a change between the check and
            // the wait still wakes us.
            notified.as_mut().enable();
            if cond(self) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                bail!("{what}: not within {timeout:?} ({:?})", self.stats());
            }
        }
    }

    /// Waits until at least `n` devices have a session.
    pub async fn wait_connected(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        self.wait_until(&format!("{n} devices connected"), timeout, |f| {
            f.stats().connected >= n
        })
        .await
    }

    /// Stops every device (their sessions end without a DISCONNECT, as at a
    /// power cut) and returns once their sockets are closed.
    pub async fn stop(mut self) {
        for task in &self.tasks {
            task.abort();
        }
        for task in self.tasks.drain(..) {
            // A cancelled task is the expected outcome.
            let _ = task.await;
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Counts `times` per `bin` from `from` on (earlier times are left out).
pub fn histogram(times: &[Instant], from: Instant, bin: Duration) -> Vec<u64> {
    let bin = bin.as_nanos().max(1);
    let mut bins: Vec<u64> = Vec::new();
    for t in times {
        if *t < from {
            continue;
        }
        let i = usize::try_from((*t - from).as_nanos() / bin).unwrap_or(usize::MAX);
        if i >= bins.len() {
            bins.resize(i.saturating_add(1), 0);
        }
        bins[i] += 1;
    }
    bins
}

/// Aborts the sensor ticker when its device task ends or is aborted.
struct AbortOnDrop(Option<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

/// Why a session ended.
enum Ended {
    Lost(ConnectionError),
    Outage,
}

/// One device, for as long as the fleet runs: connect, serve, back off, again.
async fn device_task(
    shared: Arc<Shared>,
    index: usize,
    identity: DeviceIdentity,
    addr: SocketAddr,
    cfg: Arc<FleetConfig>,
    seed: u64,
) {
    let slot = shared.slots[index].clone();
    let tls = match identity.client_config() {
        Ok(tls) => tls,
        Err(e) => {
            tracing::warn!(device = %slot.id, error = %e, "cannot build the TLS configuration");
            shared.bump(&shared.counters.gave_up);
            return;
        }
    };
    // The key stays in the TLS configuration only.
    drop(identity);
    let mut options = MqttOptions::new(&slot.id, addr.ip().to_string(), addr.port());
    options
        .set_keep_alive(cfg.keep_alive)
        .set_clean_session(true)
        .set_max_packet_size(MAX_INCOMING_PACKET, MAX_OUTGOING_PACKET)
        .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    let (client, mut eventloop) = AsyncClient::new(options, REQUEST_CHANNEL);
    let mut network = NetworkOptions::new();
    network.set_connection_timeout(cfg.connect_timeout.as_secs().max(1));
    eventloop.set_network_options(network);

    let mut rng = SimRng::seeded(seed);
    let mut backoff = Backoff::new(cfg.backoff_base, cfg.backoff_cap, cfg.backoff_stable)
        .with_rng(rng.next_u64());
    let mut network_up = shared.network_up.subscribe();

    let period = (cfg.rate > 0.0)
        .then(|| Duration::try_from_secs_f64(1.0 / cfg.rate).ok())
        .flatten()
        .filter(|p| !p.is_zero());
    let _ticker = AbortOnDrop(match (slot.kind, period) {
        (Kind::Sensor, Some(period)) => Some(tokio::spawn(sensor_ticker(
            client.clone(),
            slot.clone(),
            shared.clone(),
            period,
            rng.duration_up_to(period),
        ))),
        _ => None,
    });
    let _ota_timer = AbortOnDrop(Some(tokio::spawn(ota_timer(
        client.clone(),
        slot.clone(),
        shared.clone(),
    ))));

    tokio::time::sleep(rng.duration_up_to(cfg.start_spread)).await;
    let mut ever_connected = false;
    loop {
        if !*network_up.borrow() {
            // The simulated outage: the attempt cannot leave the device.
            shared.bump(&shared.counters.blocked);
            tokio::time::sleep(backoff.next_delay()).await;
            continue;
        }
        shared.record_attempt(Instant::now());
        if let Err(e) = eventloop.poll().await {
            if matches!(
                e,
                ConnectionError::ConnectionRefused(ConnectReturnCode::ServiceUnavailable)
            ) {
                shared.bump(&shared.counters.busy);
                backoff.on_busy();
            }
            tracing::debug!(device = %slot.id, error = %e, "connection attempt failed");
            shared.bump(&shared.counters.failures);
            tokio::time::sleep(backoff.next_delay()).await;
            continue;
        }
        // The first poll without a session returns its CONNACK.
        let now = Instant::now();
        backoff.on_connected(now);
        slot.connected_at
            .store(shared.nanos_since_origin(now), Ordering::Relaxed);
        shared.counters.connects.fetch_add(1, Ordering::Relaxed);
        if ever_connected {
            shared.counters.reconnects.fetch_add(1, Ordering::Relaxed);
        } else {
            ever_connected = true;
            shared
                .counters
                .ever_connected
                .fetch_add(1, Ordering::Relaxed);
        }
        shared.counters.connected.fetch_add(1, Ordering::Relaxed);
        announce(&client, &slot, &shared);
        shared.changed.notify_waiters();

        let ended = serve(&client, &mut eventloop, &slot, &shared, &mut network_up).await;
        slot.connected_at.store(0, Ordering::Relaxed);
        // No retries while offline: the next session asks again at once.
        lock(&slot.ota).retry_at = None;
        slot.ota_timer.notify_one();
        shared.counters.connected.fetch_sub(1, Ordering::Relaxed);
        backoff.on_disconnected(Instant::now());
        match ended {
            Ended::Lost(e) => {
                tracing::debug!(device = %slot.id, error = %e, "session ended");
            }
            Ended::Outage => {
                // Drops the socket at once, as a pulled cable would end it.
                eventloop.clean();
            }
        }
        shared.bump(&shared.counters.disconnects);
        if slot.forgot.load(Ordering::Relaxed) {
            tracing::debug!(device = %slot.id, "reset: credentials forgotten, not reconnecting");
            return;
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Resolves when the simulated network goes down; never if the fleet is gone.
async fn network_lost(network_up: &mut watch::Receiver<bool>) {
    if network_up.wait_for(|up| !*up).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Drives one session until it ends. Only this task polls the event loop,
/// and nothing but the outage interrupts a poll: the sensor ticker, the
/// command handler, the OTA handler and the OTA retry timer (a task of its
/// own, [`ota_timer`], rather than a timer branch here) queue requests
/// through the client, so no poll is ever cancelled halfway through a write
/// (only the outage cancels one, and it drops the connection anyway).
async fn serve(
    client: &AsyncClient,
    eventloop: &mut EventLoop,
    slot: &Slot,
    shared: &Shared,
    network_up: &mut watch::Receiver<bool>,
) -> Ended {
    loop {
        let event = tokio::select! {
            biased;
            () = network_lost(network_up) => return Ended::Outage,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                shared.bump(&shared.counters.received);
                if !on_ota(client, slot, shared, &p.topic, &p.payload) {
                    on_command(client, slot, shared, &p.topic, &p.payload);
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(_))) => shared.bump(&shared.counters.published),
            Ok(_) => {}
            Err(e) => return Ended::Lost(e),
        }
    }
}

/// What a device sends on every (re)connect: its meta (retained, naming
/// the firmware it runs now), its command and OTA subscriptions (the
/// session is clean, so the hub forgot them), the chunk request of an
/// unfinished firmware download, and its last state (retained), so the
/// hub's view is whole again whatever it lost.
fn announce(client: &AsyncClient, slot: &Slot, shared: &Shared) {
    let id = &slot.id;
    let state = lock(&slot.state).last.clone();
    let requests = [
        client.try_publish(
            format!("d/{id}/meta"),
            QoS::AtMostOnce,
            true,
            slot.meta().to_string(),
        ),
        client.try_subscribe(format!("d/{id}/cmd/#"), QoS::AtLeastOnce),
        client.try_subscribe(format!("d/{id}/ota/#"), QoS::AtLeastOnce),
    ];
    {
        let mut ota = lock(&slot.ota);
        let steps = ota.device.on_reconnect();
        ota_steps(client, slot, shared, &mut ota, steps);
    }
    let state = client.try_publish(format!("d/{id}/state"), QoS::AtMostOnce, true, state);
    for result in requests.into_iter().chain([state]) {
        if let Err(e) = result {
            // The queue is empty at a fresh session; this means the event
            // loop is gone, and the next poll reports why.
            tracing::debug!(device = %id, error = %e, "cannot queue the announcement");
        }
    }
}

/// Where a device's OTA messages go: the session's client, or a recorder
/// in tests. Publishing never waits (a full queue loses the message, which
/// the retry timer or the next session makes up for).
trait Outbox: Send + Sync + 'static {
    fn send(&self, device: &str, topic: String, qos: QoS, retain: bool, payload: String);
}

impl Outbox for AsyncClient {
    fn send(&self, device: &str, topic: String, qos: QoS, retain: bool, payload: String) {
        if let Err(e) = self.try_publish(topic, qos, retain, payload) {
            tracing::debug!(device, error = %e, "cannot queue an OTA message");
        }
    }
}

/// Hands a message on `d/<id>/ota/offer`, `d/<id>/ota/chunk/<N>` or
/// `d/<id>/ota/error` to the device's [`OtaDevice`] and carries out its
/// steps. False if the topic is not under `d/<id>/ota/`.
fn on_ota(out: &impl Outbox, slot: &Slot, shared: &Shared, topic: &str, payload: &[u8]) -> bool {
    let Some(rest) = topic
        .strip_prefix("d/")
        .and_then(|t| t.strip_prefix(slot.id.as_str()))
        .and_then(|t| t.strip_prefix("/ota/"))
    else {
        return false;
    };
    let mut ota = lock(&slot.ota);
    let steps = match rest {
        "offer" => ota.device.on_offer(payload),
        "error" => ota.device.on_error(payload),
        _ => match rest.strip_prefix("chunk/").and_then(chunk_offset) {
            Some(offset) => ota.device.on_chunk(offset, payload),
            None => {
                tracing::debug!(device = %slot.id, topic, "ignoring an unknown OTA topic");
                return true;
            }
        },
    };
    ota_steps(out, slot, shared, &mut ota, steps);
    true
}

/// The `<N>` of `d/<id>/ota/chunk/<N>`: decimal digits only.
fn chunk_offset(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Carries out an [`OtaDevice`]'s steps, in order: publishes requests and
/// reports at QoS 1; after an install (the running firmware is the state
/// machine's own, so it is already current) publishes the new meta,
/// retained, once the report is queued. Then sets the retry deadline: a
/// fresh one after a request, none once nothing is outstanding.
fn ota_steps(
    out: &impl Outbox,
    slot: &Slot,
    shared: &Shared,
    ota: &mut OtaState,
    steps: Vec<Step>,
) {
    let id = &slot.id;
    let (mut requested, mut installed, mut refused) = (false, false, 0);
    for step in &steps {
        match step {
            Step::Request { .. } => requested = true,
            Step::Installed { .. } => installed = true,
            Step::Report {
                outcome: Outcome::Refused { .. },
                ..
            } => refused += 1,
            Step::Report { .. } => {}
        }
        if let Some((suffix, payload)) = step.publish() {
            out.send(
                id,
                format!("d/{id}/{suffix}"),
                QoS::AtLeastOnce,
                false,
                payload,
            );
        }
    }
    if installed {
        let meta = ota.meta(slot.kind).to_string();
        out.send(id, format!("d/{id}/meta"), QoS::AtLeastOnce, true, meta);
    }
    let before = ota.retry_at;
    if !ota.device.waiting() {
        ota.retry_at = None;
    } else if requested {
        ota.retry_at = Some(tokio::time::Instant::now() + ota::RETRY_AFTER);
    }
    if ota.retry_at != before {
        slot.ota_timer.notify_one();
    }
    if installed {
        shared.bump(&shared.counters.updates_installed);
    }
    for _ in 0..refused {
        shared.bump(&shared.counters.updates_refused);
    }
    // The download moved on (or did not): `Fleet::wait_until` looks again.
    shared.changed.notify_waiters();
}

/// A device's OTA retry timer: when a chunk request has gone
/// [`ota::RETRY_AFTER`] without an answer, tells the state machine
/// (which asks again or gives up). Its own task, so that `serve` alone
/// polls the event loop and never has a poll cancelled by a timer.
async fn ota_timer(out: impl Outbox, slot: Arc<Slot>, shared: Arc<Shared>) {
    loop {
        let retry_at = lock(&slot.ota).retry_at;
        match retry_at {
            None => slot.ota_timer.notified().await,
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    // Changed meanwhile (answered, or asked again): re-read.
                    () = slot.ota_timer.notified() => continue,
                }
            }
        }
        let mut ota = lock(&slot.ota);
        // Checked under the lock the handlers hold while they move the
        // deadline, so an answer that just arrived is never retried.
        if ota
            .retry_at
            .is_none_or(|at| at > tokio::time::Instant::now())
        {
            continue;
        }
        if slot.connected_at.load(Ordering::Relaxed) == 0 {
            // Offline: the next session asks again at once.
            ota.retry_at = None;
            continue;
        }
        let steps = ota.device.on_timeout();
        ota_steps(&out, &slot, &shared, &mut ota, steps);
    }
}

/// Acts on a message on `d/<id>/cmd/<name>` and acknowledges it on
/// `d/<id>/ack/<name>`.
fn on_command(client: &AsyncClient, slot: &Slot, shared: &Shared, topic: &str, payload: &[u8]) {
    let Some(name) = topic
        .strip_prefix("d/")
        .and_then(|t| t.strip_prefix(slot.id.as_str()))
        .and_then(|t| t.strip_prefix("/cmd/"))
    else {
        return;
    };
    shared.bump(&shared.counters.commands);
    let id = &slot.id;
    let ack = match (name, slot.kind) {
        ("set", Kind::Switch) => {
            let on = serde_json::from_slice::<serde_json::Value>(payload)
                .ok()
                .and_then(|v| v.get("on")?.as_bool());
            match on {
                Some(on) => {
                    let state = lock(&slot.state).set_on(on);
                    let _ =
                        client.try_publish(format!("d/{id}/state"), QoS::AtMostOnce, true, state);
                    serde_json::json!({"ok": true, "on": on})
                }
                None => serde_json::json!({"ok": false, "error": "expected {\"on\": true|false}"}),
            }
        }
        ("set", Kind::Sensor) => serde_json::json!({"ok": false, "error": "a sensor has no relay"}),
        // A reset (the hub's wipe or RemoveDevice) is acknowledged, and the
        // device forgets its credentials: it does not connect again.
        ("reset", _) => {
            if !slot.forgot.swap(true, Ordering::Relaxed) {
                shared.bump(&shared.counters.forgot);
            }
            serde_json::json!({"ok": true})
        }
        _ => serde_json::json!({"ok": false, "error": "unknown command"}),
    };
    if let Err(e) = client.try_publish(
        format!("d/{id}/ack/{name}"),
        QoS::AtLeastOnce,
        false,
        ack.to_string(),
    ) {
        tracing::debug!(device = %id, error = %e, "cannot queue the acknowledgement");
    }
}

/// Publishes a sensor's readings every `period` (first after `phase`, so the
/// fleet's readings do not arrive in lockstep) while it has a session.
async fn sensor_ticker(
    client: AsyncClient,
    slot: Arc<Slot>,
    shared: Arc<Shared>,
    period: Duration,
    phase: Duration,
) {
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + phase, period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let topic = format!("d/{}/state", slot.id);
    loop {
        ticker.tick().await;
        if slot.connected_at.load(Ordering::Relaxed) == 0 {
            // Offline: a real sensor would not queue stale readings either;
            // it republishes its latest state on reconnect.
            continue;
        }
        let reading = lock(&slot.state).step();
        if client
            .try_publish(topic.as_str(), QoS::AtMostOnce, true, reading)
            .is_err()
        {
            // The queue is full (the session is stuck) or gone: skip this one.
            shared.changed.notify_waiters();
        }
    }
}

/// The kind of the `i`-th device when a fleet mixes `kinds` in turn.
pub fn kind_for(kinds: &[Kind], i: usize) -> Kind {
    kinds
        .get(i % kinds.len().max(1))
        .copied()
        .unwrap_or(Kind::Sensor)
}

/// How many enrolments run at once: the hub commits each one durably, so a
/// few in flight hide the fsync latency without queueing hundreds.
const ENROLL_CONCURRENCY: usize = 8;

/// Enrols `n` devices on `hub` through the admin API (a device maker's
/// factory provisioning: key and CSR made here), kinds taken from `kinds` in
/// turn. Fast; tests and benchmarks use it.
pub async fn enroll_devices(
    hub: &TestHub,
    n: usize,
    kinds: &[Kind],
) -> anyhow::Result<Vec<(DeviceIdentity, Kind)>> {
    if kinds.is_empty() {
        bail!("no device kinds given");
    }
    let admin = hub.admin().await?;
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..ENROLL_CONCURRENCY.min(n) {
        let mut admin = admin.clone();
        let kinds = kinds.to_vec();
        workers.spawn(async move {
            let mut enrolled = Vec::new();
            for i in (worker..n).step_by(ENROLL_CONCURRENCY) {
                let kind = kind_for(&kinds, i);
                let identity = DeviceIdentity::enroll(&mut admin, &format!("sim {kind} {i}"))
                    .await
                    .with_context(|| format!("enrol device {i}"))?;
                enrolled.push((i, identity, kind));
            }
            anyhow::Ok(enrolled)
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(done) = workers.join_next().await {
        all.extend(done.context("enrolment task")??);
    }
    all.sort_by_key(|(i, _, _)| *i);
    Ok(all.into_iter().map(|(_, id, kind)| (id, kind)).collect())
}

/// How [`provision`] gets identities for devices it does not have yet.
#[derive(Debug, Clone)]
pub enum Provisioning {
    /// The real pairing path: a pairing window per device over the admin
    /// socket, then the device half of pairing. `host` replaces the host in
    /// the pairing URI (the hub may advertise a name the caller cannot or
    /// should not resolve).
    Pair { host: Option<String> },
    /// `EnrollDevice` over the admin socket (factory provisioning): no
    /// pairing listener, no per-address rate limit.
    Enroll,
}

/// How often [`provision`] retries a pairing attempt that the hub refused as
/// too soon after the previous one from the same address.
const PAIR_RETRIES: u32 = 30;

/// Deletes the identity directories (`DIR/<n>/`) of the devices in `ids`:
/// what a real device does with its credentials when it obeys a reset.
/// Returns how many were deleted.
pub fn forget_identities(dir: &Path, ids: &[String]) -> anyhow::Result<usize> {
    let mut forgotten = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        if !path.join("device.json").exists() {
            continue;
        }
        let identity = pair::read_identity(&path)
            .with_context(|| format!("read the device in {}", path.display()))?;
        if ids.contains(&identity.id) {
            std::fs::remove_dir_all(&path).with_context(|| format!("delete {}", path.display()))?;
            forgotten += 1;
        }
    }
    Ok(forgotten)
}

/// Makes sure `dir/<i>/` holds a device identity for each `i < n`: reuses
/// what an earlier run wrote ([`pair::read_identity`]) and provisions the
/// rest through the admin socket, writing each one as soon as it exists.
/// `progress(done, n)` is called after each device.
pub async fn provision(
    socket: &Path,
    dir: &Path,
    n: usize,
    kinds: &[Kind],
    how: &Provisioning,
    mut progress: impl FnMut(usize, usize),
) -> anyhow::Result<Vec<(DeviceIdentity, Kind)>> {
    if kinds.is_empty() {
        bail!("no device kinds given");
    }
    let mut admin = None;
    let mut devices = Vec::with_capacity(n);
    for i in 0..n {
        let kind = kind_for(kinds, i);
        let device_dir = dir.join(i.to_string());
        if device_dir.join("device.json").exists() {
            let identity = pair::read_identity(&device_dir)
                .with_context(|| format!("read the device in {}", device_dir.display()))?;
            devices.push((identity, kind));
            progress(i + 1, n);
            continue;
        }
        let admin =
            match &mut admin {
                Some(admin) => admin,
                None => admin.insert(hub_proto::admin_client(socket).await.with_context(|| {
                    format!("connect to the admin socket {}", socket.display())
                })?),
            };
        let name = format!("hubsim {kind} {i}");
        let identity = match how {
            Provisioning::Enroll => DeviceIdentity::enroll(admin, &name).await?,
            Provisioning::Pair { host } => pair_one(admin, &name, host.as_deref()).await?,
        };
        pair::write_identity(&identity, &device_dir)
            .with_context(|| format!("write the device into {}", device_dir.display()))?;
        devices.push((identity, kind));
        progress(i + 1, n);
    }
    Ok(devices)
}

/// Opens a pairing window named `name` and pairs one new device through it.
async fn pair_one(
    admin: &mut hub_proto::v1::admin_client::AdminClient<tonic::transport::Channel>,
    name: &str,
    host: Option<&str>,
) -> anyhow::Result<DeviceIdentity> {
    let window = admin
        .open_pairing(pb::OpenPairingRequest {
            name: name.to_owned(),
            role: pb::Role::Device as i32,
            window_seconds: 120,
            grants: None,
        })
        .await
        .context("open a pairing window")?
        .into_inner();
    let mut uri = PairingUri::parse(&window.uri).context("the hub's pairing URI")?;
    if let Some(host) = host {
        uri.host = host.to_owned();
    }
    let uri = uri.to_string();
    let mut retries = 0;
    loop {
        match pair::pair(&uri, &window.code).await {
            Ok(identity) => return Ok(identity),
            // The hub paces attempts per address and does not count this
            // one against the window: wait for the next slot and retry.
            Err(PairError::Refused { error, .. })
                if error == "rate_limited" && retries < PAIR_RETRIES =>
            {
                retries += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => bail!("pair {name:?}: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = Duration::from_millis(100);
    const CAP: Duration = Duration::from_secs(60);
    const STABLE: Duration = Duration::from_secs(30);

    fn backoff(seed: u64) -> Backoff {
        Backoff::new(BASE, CAP, STABLE).with_rng(seed)
    }

    fn min(a: Duration, b: Duration) -> Duration {
        a.min(b)
    }

    #[test]
    fn delays_stay_within_zero_and_the_ceiling_for_every_failure_count() {
        for seed in 0..500 {
            let mut b = backoff(seed);
            for n in 0..20u32 {
                let ceiling = min(CAP, BASE * 2u32.pow(n));
                assert_eq!(b.ceiling(n), ceiling);
                let d = b.next_delay();
                assert!(d <= ceiling, "n={n}: {d:?} > {ceiling:?}");
            }
        }
    }

    #[test]
    fn delays_cover_the_whole_window_uniformly() {
        // Distribution sanity: over many draws for one n, the smallest is
        // near 0, the largest near the ceiling, and the mean near half.
        let mut rng_seed = 7;
        for n in [0u32, 3, 9, 15] {
            let ceiling = min(CAP, BASE * 2u32.pow(n)).as_secs_f64();
            let samples: Vec<f64> = (0..20_000)
                .map(|_| {
                    rng_seed += 1;
                    let mut b = backoff(rng_seed);
                    for _ in 0..n {
                        b.next_delay();
                    }
                    b.next_delay().as_secs_f64() / ceiling
                })
                .collect();
            let max = samples.iter().copied().fold(0.0, f64::max);
            let lo = samples.iter().copied().fold(1.0, f64::min);
            let mean = samples.iter().sum::<f64>() / samples.len() as f64;
            assert!(max > 0.995 && max <= 1.0, "n={n}: max {max}");
            assert!(lo < 0.005, "n={n}: min {lo}");
            assert!((mean - 0.5).abs() < 0.01, "n={n}: mean {mean}");
            let top_decile = samples.iter().filter(|x| **x >= 0.9).count();
            assert!(
                (1_700..2_300).contains(&top_decile),
                "n={n}: {top_decile} of 20000 in the top decile"
            );
        }
    }

    #[test]
    fn the_cap_holds_and_huge_failure_counts_do_not_overflow() {
        let mut b = backoff(1);
        for _ in 0..200 {
            assert!(b.next_delay() <= CAP);
        }
        for n in [31, 32, 63, 64, 65, 1000, u32::MAX] {
            assert_eq!(b.ceiling(n), CAP, "n={n}");
        }
        // A huge base and cap: the product saturates instead of wrapping.
        let huge = Backoff::new(Duration::MAX / 2, Duration::MAX, STABLE).with_rng(3);
        assert_eq!(huge.ceiling(40), Duration::MAX);
        let mut counted = backoff(2);
        counted.failures = u32::MAX;
        assert!(counted.next_delay() <= CAP);
        assert_eq!(counted.failures(), u32::MAX, "the count saturates");
    }

    #[test]
    fn the_failure_count_resets_only_after_a_stable_connection() {
        let t0 = Instant::now();
        let mut b = backoff(4);
        for _ in 0..5 {
            b.next_delay();
        }
        assert_eq!(b.failures(), 5);

        // Up, then dropped just before the stable period: no reset.
        b.on_connected(t0);
        b.on_disconnected(t0 + STABLE - Duration::from_millis(1));
        assert_eq!(b.failures(), 5);
        b.next_delay();
        assert_eq!(b.failures(), 6);

        // A disconnect without a connection does not reset either.
        b.on_disconnected(t0 + STABLE * 10);
        assert_eq!(b.failures(), 6);

        // Up for exactly the stable period: reset, and the next delay is
        // drawn from the first window again.
        b.on_connected(t0);
        b.on_disconnected(t0 + STABLE);
        assert_eq!(b.failures(), 0);
        assert!(b.next_delay() <= BASE);
    }

    #[test]
    fn busy_counts_as_a_failure_and_waits_at_least_the_base() {
        let mut b = backoff(5);
        b.on_busy();
        assert_eq!(
            b.next_delay(),
            BASE,
            "n=0: the window is exactly [base, base]"
        );
        for _ in 0..100 {
            b.on_busy();
            let d = b.next_delay();
            assert!(d >= BASE, "{d:?}");
        }
        assert_eq!(b.failures(), 101);
    }

    #[test]
    fn seeded_backoffs_repeat_and_unseeded_ones_differ() {
        let draw = |mut b: Backoff| (0..10).map(|_| b.next_delay()).collect::<Vec<_>>();
        assert_eq!(draw(backoff(9)), draw(backoff(9)));
        let a = draw(Backoff::new(BASE, CAP, STABLE));
        let b = draw(Backoff::new(BASE, CAP, STABLE));
        assert_ne!(a, b);
    }

    #[test]
    fn histogram_bins_from_the_start_and_skips_earlier_times() {
        let t0 = Instant::now();
        let ms = |m| t0 + Duration::from_millis(m);
        let times = [t0, ms(10), ms(999), ms(1000), ms(2500)];
        assert_eq!(histogram(&times, t0, Duration::from_secs(1)), [3, 1, 1]);
        assert_eq!(histogram(&times, ms(11), Duration::from_secs(1)), [2, 0, 1]);
        assert!(histogram(&[], t0, Duration::from_secs(1)).is_empty());
    }

    #[test]
    fn meta_names_the_kind_firmware_hash_and_support_end() {
        let meta = Kind::Switch.meta();
        assert_eq!(meta["kind"], "switch");
        assert_eq!(meta["firmware_sha256"].as_str().map(str::len), Some(64));
        assert_eq!(meta["support_end"], SUPPORT_END);
        assert_eq!("sensor".parse::<Kind>(), Ok(Kind::Sensor));
        assert!("lamp".parse::<Kind>().is_err());
    }

    #[test]
    fn a_slots_meta_names_the_firmware_it_runs_now() {
        let slot = Slot::new(
            "d1".into(),
            Kind::Switch,
            &FleetConfig::default(),
            SimRng::seeded(1),
        );
        assert_eq!(slot.meta(), Kind::Switch.meta(), "the factory firmware");
        assert_eq!(
            Kind::Switch.meta()["firmware_sha256"],
            ota::sha256_hex(b"hubsim HS-SW10 firmware 1.8.0")
        );
        let sha = "ab".repeat(32);
        let meta = Kind::Switch.meta_running("1.9.0", &sha);
        assert_eq!(meta["firmware"], "1.9.0");
        assert_eq!(meta["firmware_sha256"], sha.as_str());
        assert_eq!(meta["model"], "HS-SW10");
        assert_eq!(meta["vendor"], VENDOR);
        assert_eq!(chunk_offset("16384"), Some(16384));
        for bad in ["", "+1", "-1", "1e3", " 1", "99999999999999999999"] {
            assert_eq!(chunk_offset(bad), None, "{bad:?}");
        }
    }

    /// What the OTA handlers published, in order: (topic, payload).
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<(String, serde_json::Value)>>>);

    impl Outbox for Recorder {
        fn send(&self, _: &str, topic: String, qos: QoS, _: bool, payload: String) {
            assert_eq!(qos, QoS::AtLeastOnce);
            let payload = serde_json::from_str(&payload).unwrap();
            lock(&self.0).push((topic, payload));
        }
    }

    impl Recorder {
        fn take(&self) -> Vec<(String, serde_json::Value)> {
            std::mem::take(&mut *lock(&self.0))
        }
    }

    /// Waits (in virtual time) until `cond` holds for the counters.
    async fn counted(shared: &Shared, cond: impl Fn(&Counters) -> bool) {
        let wait = async {
            loop {
                let notified = shared.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if cond(&shared.counters) {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(600), wait)
            .await
            .expect("the counters did not change as expected");
    }

    #[tokio::test(start_paused = true)]
    async fn the_retry_timer_asks_again_every_ten_seconds_and_gives_up_after_three_tries() {
        const OFFER: &str = "00112233445566778899aabbccddeeff";
        let slot = Arc::new(Slot::new(
            "d1".into(),
            Kind::Switch,
            &FleetConfig::default(),
            SimRng::seeded(1),
        ));
        let shared = Arc::new(Shared::new(vec![slot.clone()]));
        slot.connected_at.store(1, Ordering::Relaxed);
        let out = Recorder::default();
        let _timer = AbortOnDrop(Some(tokio::spawn(ota_timer(
            out.clone(),
            slot.clone(),
            shared.clone(),
        ))));
        let image = ota::simulated_image("HS-SW10", "1.9.0");
        let offer = ota::Offer::signed(
            OFFER,
            &VendorKey::hubsim(),
            "HS-SW10",
            "1.9.0",
            &image,
            16384,
        );
        let get = |offset: u64| {
            (
                "d/d1/update/get".to_owned(),
                serde_json::json!({"offer": OFFER, "offset": offset}),
            )
        };

        let start = tokio::time::Instant::now();
        assert!(on_ota(
            &out,
            &slot,
            &shared,
            "d/d1/ota/offer",
            offer.to_json().as_bytes()
        ));
        assert_eq!(out.take(), [get(0)]);
        // An answer after 5 s: the next request has 10 s of its own.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(on_ota(
            &out,
            &slot,
            &shared,
            "d/d1/ota/chunk/0",
            &image[..16384]
        ));
        assert_eq!(out.take(), [get(16384)]);
        counted(&shared, |c| c.updates_refused.load(Ordering::Relaxed) == 1).await;
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(35) && waited < Duration::from_secs(36),
            "{waited:?}"
        );
        let sent = out.take();
        assert_eq!(sent[..2], [get(16384), get(16384)], "tries 2 and 3");
        assert_eq!(sent.len(), 3);
        assert_eq!(sent[2].0, "d/d1/update/result");
        assert_eq!(sent[2].1["error"], "download");
        assert_eq!(lock(&slot.ota).retry_at, None);
        assert_eq!(lock(&slot.ota).device.version(), "1.8.0");
    }

    #[test]
    fn sensor_readings_are_the_documented_json() {
        let mut state = DeviceState::new(Kind::Sensor, SimRng::seeded(1));
        let v: serde_json::Value = serde_json::from_str(&state.step()).unwrap();
        for key in ["temperature", "humidity", "battery", "ts"] {
            assert!(v[key].is_number(), "{key} in {v}");
        }
        let mut switch = DeviceState::new(Kind::Switch, SimRng::seeded(1));
        assert_eq!(switch.set_on(true), r#"{"on":true}"#);
        assert_eq!(switch.last, r#"{"on":true}"#);
    }
}
