//! The hub's internal event bus: what devices did, as the edge saw it, for
//! the subsystems that react (the automation runner now; telemetry and the
//! security log later).
//!
//! The edge must never wait for a slow consumer: [`BusTx::send`] never
//! blocks. An event that finds the queue full is dropped and counted
//! ([`BusTx::dropped`]), and the first drop of a burst is logged, so an
//! automation that missed an event is explained, not a mystery.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::model::DeviceId;

/// Something a device did.
#[derive(Debug, Clone, PartialEq)]
pub enum HubEvent {
    /// The device published `d/<id>/state`.
    State { device: DeviceId, payload: Bytes },
    /// The device published `d/<id>/event/<name>`.
    Event {
        device: DeviceId,
        name: String,
        payload: Bytes,
    },
    /// A session of the device started (also after a takeover).
    Online(DeviceId),
    /// The device's last session ended.
    Offline(DeviceId),
}

/// The sending side, held by the edge. Cheap to clone.
#[derive(Debug, Clone)]
pub struct BusTx {
    tx: mpsc::Sender<HubEvent>,
    dropped: Arc<AtomicU64>,
}

impl BusTx {
    /// Queues the event, or drops and counts it when the queue is full.
    pub fn send(&self, event: HubEvent) {
        match self.tx.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(event)) => {
                // Log the first drop after a quiet spell, not every one.
                if self
                    .dropped
                    .fetch_add(1, Ordering::Relaxed)
                    .is_multiple_of(1000)
                {
                    tracing::warn!(
                        ?event,
                        "event bus full: event dropped before automation saw it"
                    );
                }
            }
            // Nobody listens (the runner has stopped, or was never started).
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Events dropped because the queue was full, since start.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// A bus with room for `capacity` events in flight.
pub fn channel(capacity: usize) -> (BusTx, mpsc::Receiver<HubEvent>) {
    let (tx, rx) = mpsc::channel(capacity);
    (
        BusTx {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        },
        rx,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    #[test]
    fn a_full_bus_drops_and_counts_instead_of_blocking() {
        let (tx, mut rx) = channel(2);
        for _ in 0..5 {
            tx.send(HubEvent::Online(id("sensor-1")));
        }
        assert_eq!(tx.dropped(), 3);
        assert_eq!(rx.try_recv().unwrap(), HubEvent::Online(id("sensor-1")));
        assert_eq!(rx.try_recv().unwrap(), HubEvent::Online(id("sensor-1")));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_closed_bus_is_not_a_drop() {
        let (tx, rx) = channel(1);
        drop(rx);
        tx.send(HubEvent::Offline(id("sensor-1")));
        assert_eq!(tx.dropped(), 0);
    }
}

/// What a device tells the hub about itself, for the lifecycle service:
/// its metadata, and the device's half of a firmware update (see
/// `hubd/OTA.md`). The edge never routes `d/<id>/update/...`; it hands
/// those here.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceReport {
    /// The device published `d/<id>/meta`.
    Meta { device: DeviceId, payload: Bytes },
    /// `d/<id>/update/get`: the device asks for a chunk of the offered image.
    UpdateGet { device: DeviceId, payload: Bytes },
    /// `d/<id>/update/result`: the device installed or refused an offer.
    UpdateResult { device: DeviceId, payload: Bytes },
}
