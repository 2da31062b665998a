//! The security log: every security-relevant event, appended to a hash
//! chain in the store (sealed like all personal data), echoed to the
//! journal, and streamed to `hubctl events --follow`.
//!
//! Each entry carries the hash of the one before it, and its own hash
//! covers everything in it, so an edited, removed or reordered entry breaks
//! the chain at that entry ([`verify`]). Pruning old entries moves an
//! anchor (the last pruned entry's hash) in the same transaction, so the
//! kept chain still verifies.
//!
//! Recording never blocks its caller: events go through a bounded queue to
//! one writer task, which numbers and chains them and commits each batch
//! durably. A full queue drops the event and counts it; the writer records
//! the count as an event of its own once it can.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::model::DeviceId;
use crate::store::{self, SeclogAnchor, SeclogEntry, Store};

/// Events waiting for the writer. Beyond it they are dropped and counted.
const QUEUE: usize = 4096;
/// Entries committed in one transaction at most.
const BATCH: usize = 256;

/// What happened. The name is what `hubctl events` shows and filters on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    PairingOpened,
    PairingUsed,
    PairingFailed,
    PairingCancelled,
    HandshakeRefused,
    SessionRefused,
    AclDenied,
    DeviceEnrolled,
    DeviceRenamed,
    DeviceRevoked,
    DeviceRemoved,
    DeviceIsolated,
    DeviceReleased,
    GrantsChanged,
    SupportChanged,
    SupportEnding,
    SupportEnded,
    SupportUnknown,
    FirmwareAdded,
    VendorKeyTrusted,
    FirmwareOffered,
    FirmwareInstalled,
    FirmwareRefused,
    FirmwareUnknown,
    FirmwareChanged,
    RulesChanged,
    Anomaly,
    Throttled,
    Wipe,
    EventsDropped,
}

impl Kind {
    pub const ALL: [Kind; 30] = [
        Kind::PairingOpened,
        Kind::PairingUsed,
        Kind::PairingFailed,
        Kind::PairingCancelled,
        Kind::HandshakeRefused,
        Kind::SessionRefused,
        Kind::AclDenied,
        Kind::DeviceEnrolled,
        Kind::DeviceRenamed,
        Kind::DeviceRevoked,
        Kind::DeviceRemoved,
        Kind::DeviceIsolated,
        Kind::DeviceReleased,
        Kind::GrantsChanged,
        Kind::SupportChanged,
        Kind::SupportEnding,
        Kind::SupportEnded,
        Kind::SupportUnknown,
        Kind::FirmwareAdded,
        Kind::VendorKeyTrusted,
        Kind::FirmwareOffered,
        Kind::FirmwareInstalled,
        Kind::FirmwareRefused,
        Kind::FirmwareUnknown,
        Kind::FirmwareChanged,
        Kind::RulesChanged,
        Kind::Anomaly,
        Kind::Throttled,
        Kind::Wipe,
        Kind::EventsDropped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::PairingOpened => "pairing.opened",
            Kind::PairingUsed => "pairing.used",
            Kind::PairingFailed => "pairing.failed",
            Kind::PairingCancelled => "pairing.cancelled",
            Kind::HandshakeRefused => "handshake.refused",
            Kind::SessionRefused => "session.refused",
            Kind::AclDenied => "acl.denied",
            Kind::DeviceEnrolled => "device.enrolled",
            Kind::DeviceRenamed => "device.renamed",
            Kind::DeviceRevoked => "device.revoked",
            Kind::DeviceRemoved => "device.removed",
            Kind::DeviceIsolated => "device.isolated",
            Kind::DeviceReleased => "device.released",
            Kind::GrantsChanged => "device.grants",
            Kind::SupportChanged => "support.changed",
            Kind::SupportEnding => "support.ending",
            Kind::SupportEnded => "support.ended",
            Kind::SupportUnknown => "support.unknown",
            Kind::FirmwareAdded => "firmware.added",
            Kind::VendorKeyTrusted => "firmware.key_trusted",
            Kind::FirmwareOffered => "firmware.offered",
            Kind::FirmwareInstalled => "firmware.installed",
            Kind::FirmwareRefused => "firmware.refused",
            Kind::FirmwareUnknown => "firmware.unknown",
            Kind::FirmwareChanged => "firmware.changed",
            Kind::RulesChanged => "rules.changed",
            Kind::Anomaly => "anomaly",
            Kind::Throttled => "throttled",
            Kind::Wipe => "wipe",
            Kind::EventsDropped => "seclog.dropped",
        }
    }

    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

/// How much it matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// A change the owner made or expects.
    Info,
    /// Refused or unusual, not yet a threat (a bad handshake, a denial).
    Warning,
    /// Needs the owner's attention: an anomaly, an integrity failure, an
    /// automatic isolation.
    Alert,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Alert => "alert",
        }
    }
}

/// An event before the log numbers and chains it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: Kind,
    pub severity: Severity,
    pub device: Option<DeviceId>,
    /// Who caused it: `uid 1000`, `hub`, `lifecycle policy`, an address.
    pub actor: String,
    pub message: String,
    pub evidence: BTreeMap<String, String>,
}

impl Event {
    pub fn new(kind: Kind, severity: Severity, message: impl Into<String>) -> Event {
        Event {
            kind,
            severity,
            device: None,
            actor: "hub".to_owned(),
            message: message.into(),
            evidence: BTreeMap::new(),
        }
    }

    pub fn device(mut self, id: &DeviceId) -> Event {
        self.device = Some(id.clone());
        self
    }

    pub fn actor(mut self, actor: impl Into<String>) -> Event {
        self.actor = actor.into();
        self
    }

    pub fn evidence(mut self, key: &str, value: impl ToString) -> Event {
        self.evidence.insert(key.to_owned(), value.to_string());
        self
    }
}

/// The hash of an entry: SHA-256 over its canonical JSON with `hash`
/// empty (so `prev` and every other field are covered).
pub fn entry_hash(entry: &SeclogEntry) -> String {
    let mut body = entry.clone();
    body.hash = String::new();
    // Serialising a struct of strings, numbers and a BTreeMap cannot fail
    // and is deterministic: fields in declaration order, map keys sorted.
    let json = serde_json::to_vec(&body).unwrap_or_default();
    hex::encode(ring::digest::digest(&ring::digest::SHA256, &json).as_ref())
}

/// The first place a stored chain does not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    /// The entry's sequence number (from its key when it cannot be read).
    pub seq: u64,
    pub problem: String,
}

/// What verification found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub entries: u64,
    pub first_seq: u64,
    pub last_hash: String,
    pub broken: Option<Broken>,
}

/// Walks stored entries (key, decoded or the error) from the anchor and
/// reports the first broken link.
pub fn verify(anchor: &SeclogAnchor, stored: store::RawEntries) -> Verified {
    let mut expected_seq = anchor.first_seq;
    let mut prev = anchor.prev.clone();
    let mut entries = 0u64;
    let broken = |seq, problem: String| Some(Broken { seq, problem });
    for (key, decoded) in stored {
        let key_seq = u64::from_str_radix(&key, 16).unwrap_or(u64::MAX);
        let finding = match decoded {
            Err(e) => broken(key_seq, format!("cannot be read: {e}")),
            Ok(entry) if entry.seq != key_seq => broken(
                key_seq,
                format!("is filed under {key_seq} but says it is {}", entry.seq),
            ),
            Ok(entry) if entry.seq != expected_seq => broken(
                key_seq,
                format!(
                    "entry {expected_seq} is missing (the next one is {})",
                    entry.seq
                ),
            ),
            Ok(entry) if entry.prev != prev => broken(
                key_seq,
                "does not link to the entry before it (its previous hash differs)".to_owned(),
            ),
            Ok(entry) if entry_hash(&entry) != entry.hash => broken(
                key_seq,
                "was changed after it was written (its hash does not match its contents)"
                    .to_owned(),
            ),
            Ok(entry) => {
                prev = entry.hash;
                expected_seq += 1;
                entries += 1;
                None
            }
        };
        if finding.is_some() {
            return Verified {
                entries,
                first_seq: anchor.first_seq,
                last_hash: prev,
                broken: finding,
            };
        }
    }
    Verified {
        entries,
        first_seq: anchor.first_seq,
        last_hash: prev,
        broken: None,
    }
}

enum Cmd {
    Record(Event),
    Durable(Event, oneshot::Sender<Result<SeclogEntry, String>>),
}

/// A cloneable handle on the security log.
#[derive(Clone)]
pub struct SecLog {
    inner: Arc<Inner>,
}

struct Inner {
    tx: mpsc::Sender<Cmd>,
    dropped: AtomicU64,
    follow: broadcast::Sender<SeclogEntry>,
    store: Store,
}

impl std::fmt::Debug for SecLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecLog").finish_non_exhaustive()
    }
}

impl SecLog {
    /// Starts the writer on `tasks`; it drains what is queued and ends at
    /// `stop`.
    pub fn start(
        store: Store,
        tasks: &TaskTracker,
        stop: CancellationToken,
    ) -> Result<SecLog, store::Error> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (follow, _) = broadcast::channel(1024);
        let last = store.seclog_last()?;
        let anchor = store.seclog_anchor()?;
        let (next_seq, prev) = match last {
            Some(last) => (last.seq + 1, last.hash),
            None => (anchor.first_seq, anchor.prev),
        };
        let log = SecLog {
            inner: Arc::new(Inner {
                tx,
                dropped: AtomicU64::new(0),
                follow,
                store,
            }),
        };
        tasks.spawn(writer(log.clone(), rx, next_seq, prev, stop));
        Ok(log)
    }

    /// Records an event without waiting. A full queue drops it and counts
    /// the drop.
    pub fn record(&self, event: Event) {
        if self.inner.tx.try_send(Cmd::Record(event)).is_err() {
            self.inner.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records an event and waits until it is durable: for changes an
    /// admin is told succeeded.
    pub async fn record_durable(&self, event: Event) -> Result<SeclogEntry, String> {
        let (reply, answer) = oneshot::channel();
        self.inner
            .tx
            .send(Cmd::Durable(event, reply))
            .await
            .map_err(|_| "the security log is stopped".to_owned())?;
        answer
            .await
            .map_err(|_| "the security log stopped".to_owned())?
    }

    /// Events dropped because the queue was full, since start.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// New entries as they are committed.
    pub fn subscribe(&self) -> broadcast::Receiver<SeclogEntry> {
        self.inner.follow.subscribe()
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Walks the stored chain (blocking: call it on the blocking pool).
    pub fn verify(&self) -> Result<Verified, store::Error> {
        let store = &self.inner.store;
        let anchor = store.seclog_anchor()?;
        Ok(verify(&anchor, store.seclog_raw()?))
    }
}

fn now_ms() -> i64 {
    // Never before the build time (see `clock`); entries chain by sequence
    // number whatever the clock says.
    let now = crate::clock::trusted_now();
    i64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

async fn writer(
    log: SecLog,
    mut rx: mpsc::Receiver<Cmd>,
    mut next_seq: u64,
    mut prev: String,
    stop: CancellationToken,
) {
    let mut reported_drops = 0u64;
    loop {
        let mut batch = Vec::new();
        tokio::select! {
            biased;
            n = rx.recv_many(&mut batch, BATCH) => {
                if n == 0 {
                    return;
                }
            }
            () = stop.cancelled() => {
                rx.close();
                rx.recv_many(&mut batch, usize::MAX).await;
                if batch.is_empty() {
                    return;
                }
            }
        }
        let dropped = log.dropped();
        if dropped > reported_drops {
            let lost = dropped - reported_drops;
            reported_drops = dropped;
            batch.push(Cmd::Record(
                Event::new(
                    Kind::EventsDropped,
                    Severity::Warning,
                    format!("{lost} security events were dropped: they came faster than they could be stored"),
                )
                .evidence("dropped", lost),
            ));
        }
        let mut entries = Vec::with_capacity(batch.len());
        let mut replies = Vec::new();
        for cmd in batch {
            let (event, reply) = match cmd {
                Cmd::Record(e) => (e, None),
                Cmd::Durable(e, r) => (e, Some(r)),
            };
            let mut entry = SeclogEntry {
                seq: next_seq,
                at_ms: now_ms(),
                kind: event.kind.as_str().to_owned(),
                severity: event.severity.as_str().to_owned(),
                device: event.device.as_ref().map(|d| d.as_str().to_owned()),
                actor: event.actor,
                message: event.message,
                evidence: event.evidence,
                prev: prev.clone(),
                hash: String::new(),
            };
            entry.hash = entry_hash(&entry);
            prev = entry.hash.clone();
            next_seq += 1;
            journal(&entry, event.severity);
            if let Some(r) = reply {
                replies.push((r, entry.clone()));
            }
            entries.push(entry);
        }
        let store = log.inner.store.clone();
        let to_write = entries.clone();
        let written = tokio::task::spawn_blocking(move || store.append_seclog(&to_write))
            .await
            .map_err(|_| "the store write panicked".to_owned())
            .and_then(|r| r.map_err(|e| e.to_string()));
        match written {
            Ok(()) => {
                for entry in entries {
                    let _ = log.inner.follow.send(entry);
                }
                for (reply, entry) in replies {
                    let _ = reply.send(Ok(entry));
                }
            }
            Err(e) => {
                warn!(target: "security", error = %e, "security events could not be stored");
                // Keep the chain consistent with what is stored.
                match log.inner.store.seclog_last() {
                    Ok(last) => {
                        (next_seq, prev) = match last {
                            Some(l) => (l.seq + 1, l.hash),
                            None => {
                                let a = log.inner.store.seclog_anchor().unwrap_or_default();
                                (a.first_seq, a.prev)
                            }
                        };
                    }
                    Err(e2) => warn!(error = %e2, "cannot re-read the security log"),
                }
                for (reply, _) in replies {
                    let _ = reply.send(Err(format!("cannot store the security event: {e}")));
                }
            }
        }
    }
}

/// Every entry also goes to the journal, with target `security`.
fn journal(entry: &SeclogEntry, severity: Severity) {
    let device = entry.device.as_deref().unwrap_or("-");
    match severity {
        Severity::Info => info!(
            target: "security", seq = entry.seq, kind = %entry.kind, device,
            actor = %entry.actor, "{}", entry.message
        ),
        Severity::Warning | Severity::Alert => warn!(
            target: "security", seq = entry.seq, kind = %entry.kind, device,
            actor = %entry.actor, severity = severity.as_str(), "{}", entry.message
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<SeclogEntry> {
        let mut prev = String::new();
        (0..n)
            .map(|seq| {
                let mut e = SeclogEntry {
                    seq,
                    at_ms: 1_700_000_000_000 + seq as i64,
                    kind: "device.isolated".into(),
                    severity: "info".into(),
                    device: Some("d1".into()),
                    actor: "uid 1000".into(),
                    message: format!("event {seq}"),
                    evidence: BTreeMap::from([("k".to_owned(), "v".to_owned())]),
                    prev: prev.clone(),
                    hash: String::new(),
                };
                e.hash = entry_hash(&e);
                prev = e.hash.clone();
                e
            })
            .collect()
    }

    fn stored(entries: &[SeclogEntry]) -> Vec<(String, Result<SeclogEntry, store::Error>)> {
        entries
            .iter()
            .map(|e| (format!("{:016x}", e.seq), Ok(e.clone())))
            .collect()
    }

    #[test]
    fn an_intact_chain_verifies() {
        let v = verify(&SeclogAnchor::default(), stored(&chain(5)));
        assert_eq!(v.broken, None);
        assert_eq!(v.entries, 5);
    }

    #[test]
    fn an_edited_entry_is_named() {
        let mut c = chain(5);
        c[2].message = "nothing happened".into();
        let v = verify(&SeclogAnchor::default(), stored(&c));
        let broken = v.broken.unwrap();
        assert_eq!(broken.seq, 2);
        assert!(broken.problem.contains("changed"), "{}", broken.problem);
        assert_eq!(v.entries, 2);
    }

    #[test]
    fn an_edited_entry_with_a_recomputed_hash_breaks_the_next_link() {
        let mut c = chain(5);
        c[2].message = "nothing happened".into();
        c[2].hash = entry_hash(&c[2]);
        let broken = verify(&SeclogAnchor::default(), stored(&c)).broken.unwrap();
        assert_eq!(broken.seq, 3);
        assert!(
            broken.problem.contains("does not link"),
            "{}",
            broken.problem
        );
    }

    #[test]
    fn a_removed_entry_is_found() {
        let mut c = chain(5);
        c.remove(1);
        let broken = verify(&SeclogAnchor::default(), stored(&c)).broken.unwrap();
        assert_eq!(broken.seq, 2);
        assert!(
            broken.problem.contains("entry 1 is missing"),
            "{}",
            broken.problem
        );
    }

    #[test]
    fn a_pruned_chain_verifies_from_its_anchor_and_not_without_it() {
        let c = chain(6);
        let anchor = SeclogAnchor {
            first_seq: 3,
            prev: c[2].hash.clone(),
        };
        assert_eq!(verify(&anchor, stored(&c[3..])).broken, None);
        assert!(
            verify(&SeclogAnchor::default(), stored(&c[3..]))
                .broken
                .is_some()
        );
    }

    #[test]
    fn kinds_round_trip_by_name() {
        for k in Kind::ALL {
            assert_eq!(Kind::from_name(k.as_str()), Some(k));
        }
    }

    #[tokio::test]
    async fn the_writer_chains_stores_and_resumes_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.redb");
        let store = Store::open(&path, store::DataKey::ephemeral()).unwrap();
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();
        let log = SecLog::start(store.clone(), &tasks, stop.clone()).unwrap();
        let mut follow = log.subscribe();
        for i in 0..3 {
            log.record(Event::new(
                Kind::PairingOpened,
                Severity::Info,
                format!("e{i}"),
            ));
        }
        let last = log
            .record_durable(Event::new(Kind::Wipe, Severity::Alert, "durable"))
            .await
            .unwrap();
        assert_eq!(last.seq, 3);
        assert_eq!(follow.recv().await.unwrap().message, "e0");
        stop.cancel();
        tasks.close();
        tasks.wait().await;

        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();
        let log = SecLog::start(store.clone(), &tasks, stop.clone()).unwrap();
        let next = log
            .record_durable(Event::new(Kind::Wipe, Severity::Info, "after"))
            .await
            .unwrap();
        assert_eq!(next.seq, 4);
        assert_eq!(next.prev, last.hash);
        let v = log.verify().unwrap();
        assert_eq!((v.entries, v.broken), (5, None));

        // Pruning keeps the rest verifiable.
        assert_eq!(store.prune_seclog(0, 1000).unwrap(), 0);
        assert_eq!(store.prune_seclog(i64::MAX, 1000).unwrap(), 5);
        let after = log
            .record_durable(Event::new(Kind::Wipe, Severity::Info, "after prune"))
            .await
            .unwrap();
        assert_eq!(after.seq, 5);
        let v = log.verify().unwrap();
        assert_eq!((v.entries, v.broken), (1, None));
        stop.cancel();
        tasks.close();
        tasks.wait().await;
    }
}
