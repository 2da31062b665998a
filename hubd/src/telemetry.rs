//! Security telemetry (principle 10): per-device rolling baselines of what
//! each device normally does, and anomalies when it does something else.
//!
//! For each device the edge reports every accepted PUBLISH (its size and
//! topic), every ACL refusal and every session start. Time is cut into
//! windows (`[telemetry] window`); at the end of a window its counts feed
//! exponentially weighted baselines of messages per window and payload
//! size. Once a device has `warmup_windows` windows of history, a window
//! that goes beyond the thresholds raises an [`Anomaly`] carrying the
//! evidence (what the baseline expected, what was seen), once per kind per
//! window. Windows that raised an anomaly do not teach the baseline, so an
//! attack is not learnt as normal. ACL refusals (a device probing other
//! devices' topics) and reconnects are judged against fixed limits per
//! window: a healthy device has none of the first and few of the second.
//!
//! Refused TLS handshakes are counted per source address; too many in a
//! window throttle that address (its connections are closed before any
//! handshake) for `throttle`. This only concerns the MQTT listener: the
//! admin API is a Unix socket checked by uid and is never throttled.
//!
//! Pure and synchronous: callers pass the time, and act on what is
//! returned (the edge records, alerts and isolates).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use crate::config::{AnomalyPolicy, TelemetrySection};
use crate::model::DeviceId;

/// Weight of the newest window in the baselines.
const ALPHA: f64 = 0.2;
/// Empty windows folded in at most when a device was quiet for long.
const MAX_CATCH_UP: u64 = 64;

/// What looked wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AnomalyKind {
    /// Far more messages than the device's baseline.
    MessageRate,
    /// A payload far larger than the device's usual ones.
    PayloadSize,
    /// Refused publishes or subscriptions: reaching for others' topics.
    Probing,
    /// Sessions started again and again.
    Reconnects,
}

impl AnomalyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AnomalyKind::MessageRate => "message_rate",
            AnomalyKind::PayloadSize => "payload_size",
            AnomalyKind::Probing => "probing",
            AnomalyKind::Reconnects => "reconnects",
        }
    }

    /// Why, for the event and the isolation reason.
    pub fn headline(self) -> &'static str {
        match self {
            AnomalyKind::MessageRate => "anomaly: message flood",
            AnomalyKind::PayloadSize => "anomaly: oversized payloads",
            AnomalyKind::Probing => "anomaly: probing other devices' topics",
            AnomalyKind::Reconnects => "anomaly: reconnecting in a tight loop",
        }
    }

    fn bit(self) -> u8 {
        match self {
            AnomalyKind::MessageRate => 1,
            AnomalyKind::PayloadSize => 2,
            AnomalyKind::Probing => 4,
            AnomalyKind::Reconnects => 8,
        }
    }
}

/// An anomaly, its evidence and what the policy says to do.
#[derive(Debug, Clone, PartialEq)]
pub struct Anomaly {
    pub device: DeviceId,
    pub kind: AnomalyKind,
    /// What the baseline or limit allowed, for people.
    pub expected: String,
    /// What was seen.
    pub seen: String,
    pub policy: AnomalyPolicy,
}

/// A source address throttled after too many refused handshakes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Throttle {
    pub addr: IpAddr,
    pub failures: u32,
    pub until_ms: i64,
}

/// One device's current window and baselines.
#[derive(Debug, Clone, Default)]
struct DeviceStats {
    window: i64,
    messages: u64,
    bytes: u64,
    denials: u32,
    connects: u32,
    fired: u8,
    /// Windows that fed the baselines.
    learnt: u64,
    rate: f64,
    size: f64,
}

#[derive(Debug, Clone, Default)]
struct AddrStats {
    window: i64,
    failures: u32,
    until_ms: i64,
}

/// A device's baselines, for status and tests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Baseline {
    pub windows: u64,
    pub messages_per_window: f64,
    pub payload_bytes: f64,
}

/// The telemetry state of the whole hub. Shared by every session.
#[derive(Debug)]
pub struct Telemetry {
    cfg: TelemetrySection,
    window_ms: i64,
    devices: Mutex<HashMap<DeviceId, DeviceStats>>,
    addrs: Mutex<HashMap<IpAddr, AddrStats>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Telemetry {
    pub fn new(cfg: TelemetrySection) -> Telemetry {
        let window_ms = i64::try_from(cfg.window.as_millis())
            .unwrap_or(i64::MAX)
            .max(1);
        Telemetry {
            cfg,
            window_ms,
            devices: Mutex::new(HashMap::new()),
            addrs: Mutex::new(HashMap::new()),
        }
    }

    fn policy(&self, kind: AnomalyKind) -> AnomalyPolicy {
        match kind {
            AnomalyKind::MessageRate => self.cfg.on_message_rate,
            AnomalyKind::PayloadSize => self.cfg.on_payload_size,
            AnomalyKind::Probing => self.cfg.on_probing,
            AnomalyKind::Reconnects => self.cfg.on_reconnects,
        }
    }

    /// Runs `f` on the device's stats after rolling its window to `now_ms`.
    fn with_device<T>(
        &self,
        id: &DeviceId,
        now_ms: i64,
        f: impl FnOnce(&mut DeviceStats, bool) -> T,
    ) -> T {
        let window = now_ms.div_euclid(self.window_ms);
        let mut devices = lock(&self.devices);
        let stats = devices.entry(id.clone()).or_insert_with(|| DeviceStats {
            window,
            ..Default::default()
        });
        if window > stats.window {
            // The finished window teaches the baselines, unless it was
            // anomalous; then the quiet windows since, if any.
            if stats.fired == 0 {
                let avg = if stats.messages == 0 {
                    stats.size
                } else {
                    stats.bytes as f64 / stats.messages as f64
                };
                learn(stats, stats.messages as f64, avg);
            }
            let quiet = u64::try_from(window - stats.window - 1).unwrap_or(0);
            for _ in 0..quiet.min(MAX_CATCH_UP) {
                let size = stats.size;
                learn(stats, 0.0, size);
            }
            *stats = DeviceStats {
                window,
                learnt: stats.learnt,
                rate: stats.rate,
                size: stats.size,
                ..Default::default()
            };
        }
        let warm = stats.learnt >= u64::from(self.cfg.warmup_windows);
        f(stats, warm)
    }

    fn fire(
        &self,
        stats: &mut DeviceStats,
        id: &DeviceId,
        kind: AnomalyKind,
        expected: String,
        seen: String,
    ) -> Option<Anomaly> {
        if stats.fired & kind.bit() != 0 {
            return None;
        }
        stats.fired |= kind.bit();
        Some(Anomaly {
            device: id.clone(),
            kind,
            expected,
            seen,
            policy: self.policy(kind),
        })
    }

    /// A PUBLISH the device made (accepted by the ACL), `size` payload bytes.
    pub fn published(&self, id: &DeviceId, size: usize, now_ms: i64) -> Vec<Anomaly> {
        let cfg = &self.cfg;
        self.with_device(id, now_ms, |s, warm| {
            s.messages += 1;
            s.bytes += size as u64;
            let mut out = Vec::new();
            if !warm {
                return out;
            }
            let limit = (s.rate * f64::from(cfg.rate_factor)).max(cfg.min_messages as f64);
            if s.messages as f64 > limit {
                let expected = format!(
                    "at most {limit:.0} messages per {}s window (baseline {:.1})",
                    cfg.window.as_secs(),
                    s.rate
                );
                let seen = format!("{} messages in this window", s.messages);
                out.extend(self.fire(s, id, AnomalyKind::MessageRate, expected, seen));
            }
            let size_limit =
                (s.size * f64::from(cfg.size_factor)).max(cfg.min_payload_bytes as f64);
            if size as f64 > size_limit {
                let expected = format!(
                    "payloads up to {size_limit:.0} bytes (baseline {:.0})",
                    s.size
                );
                let seen = format!("a {size}-byte payload");
                out.extend(self.fire(s, id, AnomalyKind::PayloadSize, expected, seen));
            }
            out
        })
    }

    /// A PUBLISH or SUBSCRIBE of the device that the ACL refused.
    pub fn denied(&self, id: &DeviceId, topic: &str, now_ms: i64) -> Option<Anomaly> {
        let limit = self.cfg.max_acl_denials;
        self.with_device(id, now_ms, |s, _| {
            s.denials += 1;
            (s.denials >= limit).then(|| {
                let expected =
                    format!("fewer than {limit} refused topics per window (normally none)");
                let seen = format!("{} refused, the last on {topic:?}", s.denials);
                self.fire(s, id, AnomalyKind::Probing, expected, seen)
            })?
        })
    }

    /// A session of the device started.
    pub fn connected(&self, id: &DeviceId, now_ms: i64) -> Option<Anomaly> {
        let limit = self.cfg.max_reconnects;
        self.with_device(id, now_ms, |s, _| {
            s.connects += 1;
            (s.connects >= limit).then(|| {
                let expected = format!(
                    "fewer than {limit} sessions per {}s window",
                    self.cfg.window.as_secs()
                );
                let seen = format!("{} sessions in this window", s.connects);
                self.fire(s, id, AnomalyKind::Reconnects, expected, seen)
            })?
        })
    }

    /// A TLS handshake from `addr` was refused (a bad certificate, not a
    /// timeout or an eviction). Returns a throttle when this one crossed
    /// the limit.
    pub fn handshake_failed(&self, addr: IpAddr, now_ms: i64) -> Option<Throttle> {
        let window = now_ms.div_euclid(self.window_ms);
        let mut addrs = lock(&self.addrs);
        // Forget quiet addresses, so a scan of many addresses stays bounded.
        if addrs.len() > 4096 {
            addrs.retain(|_, a| a.window >= window - 1 || a.until_ms > now_ms);
        }
        let a = addrs.entry(addr).or_default();
        if a.window != window {
            a.window = window;
            a.failures = 0;
        }
        a.failures += 1;
        if a.failures >= self.cfg.max_handshake_failures && a.until_ms <= now_ms {
            let throttle_ms = i64::try_from(self.cfg.throttle.as_millis()).unwrap_or(i64::MAX);
            a.until_ms = now_ms.saturating_add(throttle_ms);
            return Some(Throttle {
                addr,
                failures: a.failures,
                until_ms: a.until_ms,
            });
        }
        None
    }

    /// Whether connections from `addr` are refused now.
    pub fn throttled(&self, addr: IpAddr, now_ms: i64) -> bool {
        lock(&self.addrs)
            .get(&addr)
            .is_some_and(|a| a.until_ms > now_ms)
    }

    /// The device's baselines, once it has any.
    pub fn baseline(&self, id: &DeviceId) -> Option<Baseline> {
        lock(&self.devices).get(id).map(|s| Baseline {
            windows: s.learnt,
            messages_per_window: s.rate,
            payload_bytes: s.size,
        })
    }

    /// Forgets a removed device.
    pub fn forget(&self, id: &DeviceId) {
        lock(&self.devices).remove(id);
    }
}

fn learn(s: &mut DeviceStats, messages: f64, avg_size: f64) {
    if s.learnt == 0 {
        s.rate = messages;
        s.size = avg_size;
    } else {
        s.rate += ALPHA * (messages - s.rate);
        s.size += ALPHA * (avg_size - s.size);
    }
    s.learnt += 1;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cfg() -> TelemetrySection {
        TelemetrySection {
            on_message_rate: AnomalyPolicy::Isolate,
            ..TelemetrySection::default()
        }
    }

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    /// A tiny deterministic generator for jittered traffic.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
    }

    /// Normal traffic: a reading every ~`period_ms` (±30%), ~`size` bytes
    /// (±20%), for `minutes` of simulated time; returns the anomalies.
    fn normal(
        t: &Telemetry,
        dev: &DeviceId,
        start: i64,
        minutes: i64,
        period_ms: i64,
        size: usize,
    ) -> (Vec<Anomaly>, i64) {
        let mut rng = Lcg(7);
        let mut now = start;
        let mut found = Vec::new();
        while now < start + minutes * 60_000 {
            let jitter = (rng.next() % (period_ms as u64 * 6 / 10 + 1)) as i64 - period_ms * 3 / 10;
            now += period_ms + jitter;
            let sz = size * (80 + (rng.next() % 41) as usize) / 100;
            found.extend(t.published(dev, sz, now));
        }
        (found, now)
    }

    #[test]
    fn minutes_of_normal_traffic_raise_nothing_and_build_a_baseline() {
        let t = Telemetry::new(cfg());
        let sensor = id("sensor-1");
        // A sensor every 10 s, a chatty switch every 500 ms, both with a
        // reconnect every few minutes.
        let (a, _) = normal(&t, &sensor, 0, 30, 10_000, 120);
        assert!(a.is_empty(), "{a:?}");
        let switch = id("switch-1");
        let mut found = Vec::new();
        for minute in 0..30 {
            if minute % 7 == 0 {
                found.extend(t.connected(&switch, minute * 60_000));
            }
            let (a, _) = normal(&t, &switch, minute * 60_000, 1, 500, 40);
            found.extend(a);
        }
        assert!(found.is_empty(), "{found:?}");
        let b = t.baseline(&switch).unwrap();
        assert!(b.windows >= 25, "{b:?}");
        assert!((100.0..140.0).contains(&b.messages_per_window), "{b:?}");
        assert!((30.0..50.0).contains(&b.payload_bytes), "{b:?}");
    }

    #[test]
    fn a_flood_of_fifty_times_the_rate_is_an_anomaly_with_its_evidence() {
        let t = Telemetry::new(cfg());
        let dev = id("sensor-1");
        let (a, now) = normal(&t, &dev, 0, 10, 1_000, 100);
        assert!(a.is_empty(), "{a:?}");
        // 50 messages a second for a minute.
        let mut found = Vec::new();
        for i in 0..3000 {
            found.extend(t.published(&dev, 100, now + i * 20));
        }
        assert_eq!(found.len(), 1, "once per window: {found:?}");
        let a = &found[0];
        assert_eq!(a.kind, AnomalyKind::MessageRate);
        assert_eq!(a.policy, AnomalyPolicy::Isolate);
        // About one message a second: a baseline near 60 per window.
        assert!(
            a.expected.contains("(baseline 59.") || a.expected.contains("(baseline 60."),
            "{a:?}"
        );
        assert!(a.seen.contains("messages in this window"), "{a:?}");
        // The flood does not become the baseline.
        assert!(t.baseline(&dev).unwrap().messages_per_window < 61.0);
    }

    #[test]
    fn oversized_payloads_probing_and_reconnect_loops_are_anomalies() {
        let t = Telemetry::new(cfg());
        let dev = id("sensor-1");
        let (_, now) = normal(&t, &dev, 0, 10, 1_000, 100);
        let big = t.published(&dev, 200_000, now + 1);
        assert_eq!(big.len(), 1);
        assert_eq!(big[0].kind, AnomalyKind::PayloadSize);

        let prober = id("prober-1");
        let mut found = Vec::new();
        for i in 0..10 {
            found.extend(t.denied(&prober, &format!("d/other-{i}/cmd/x"), 1_000 + i));
        }
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].kind, AnomalyKind::Probing);
        assert_eq!(
            found[0].policy,
            AnomalyPolicy::Isolate,
            "probing isolates by default"
        );
        assert!(found[0].seen.contains("d/other-"), "{:?}", found[0]);

        let looper = id("looper-1");
        let found: Vec<_> = (0..20)
            .filter_map(|i| t.connected(&looper, 5_000 + i * 100))
            .collect();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].kind, AnomalyKind::Reconnects);
        // A new window can fire again.
        assert!(t.connected(&looper, 5_000 + 61_000).is_none());
    }

    #[test]
    fn no_rate_anomaly_before_the_warm_up() {
        let t = Telemetry::new(cfg());
        let dev = id("new-1");
        let found: Vec<_> = (0..1000).flat_map(|i| t.published(&dev, 10, i)).collect();
        assert!(found.is_empty(), "{found:?}");
    }

    #[test]
    fn refused_handshakes_throttle_their_address_for_a_while() {
        let t = Telemetry::new(TelemetrySection {
            throttle: Duration::from_secs(30),
            ..cfg()
        });
        let bad: IpAddr = "192.0.2.7".parse().unwrap();
        let good: IpAddr = "192.0.2.8".parse().unwrap();
        let limit = TelemetrySection::default().max_handshake_failures;
        let mut throttles = Vec::new();
        for i in 0..(limit + 5) {
            throttles.extend(t.handshake_failed(bad, 1_000 + i64::from(i)));
        }
        assert_eq!(throttles.len(), 1, "{throttles:?}");
        assert!(t.throttled(bad, 2_000));
        assert!(!t.throttled(good, 2_000), "only that address");
        assert!(!t.throttled(bad, 1_000 + 30_000 + 100), "it ends");
    }
}
