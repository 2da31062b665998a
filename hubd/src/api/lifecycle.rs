//! The lifecycle and security-log RPCs: proto ⇄ domain conversion and
//! their checks. The `Admin` impl in `api.rs` delegates here.

use std::pin::Pin;

use futures::StreamExt;
use hub_proto::v1 as pb;
use tonic::{Request, Status};

use super::{Caller, Service, parse_id};
use crate::lifecycle::{self, LifecycleHandle, parse_date};
use crate::model::DeviceId;
use crate::store::{DeviceRecord, FirmwareRecord, SeclogEntry, UpdateState, VendorKeyRecord};

pub(super) type EventStream =
    Pin<Box<dyn futures::Stream<Item = Result<pb::SecurityEvent, Status>> + Send>>;

/// Who made an admin call, as the security log names them.
pub(super) fn actor<T>(req: &Request<T>) -> String {
    match req.extensions().get::<Caller>() {
        Some(c) => format!("uid {}", c.uid),
        None => "unknown caller".to_owned(),
    }
}

impl From<lifecycle::Error> for Status {
    fn from(e: lifecycle::Error) -> Status {
        use lifecycle::Error as E;
        match e {
            E::Invalid(_) => Status::invalid_argument(e.to_string()),
            E::Refused(_) => Status::failed_precondition(e.to_string()),
            E::Exists(_) => Status::already_exists(e.to_string()),
            E::Registry(r) => r.into(),
            E::Store(_) | E::Internal(_) => Status::internal(e.to_string()),
        }
    }
}

/// Adds the lifecycle fields to a device's message.
pub(super) fn fill_device(p: &mut pb::Device, d: &DeviceRecord, lifecycle: &LifecycleHandle) {
    let l = &d.lifecycle;
    p.model = l.model.clone().unwrap_or_default();
    p.vendor = l.vendor.clone().unwrap_or_default();
    p.firmware = l.firmware.clone().unwrap_or_default();
    p.firmware_sha256 = l.firmware_sha256.clone().unwrap_or_default();
    let (status, end) = lifecycle.support_of(d);
    if let Some((date, source)) = end {
        p.support_end = date.to_string();
        p.support_source = source.to_owned();
    }
    p.support_status = status.as_str().to_owned();
    p.integrity = l.integrity.clone().unwrap_or_default();
    if let Some(u) = &l.update {
        p.update_version = u.version.clone();
        p.update_state = match u.state {
            UpdateState::Offered => "offered",
            UpdateState::Downloading => "downloading",
            UpdateState::Installed => "installed",
            UpdateState::Failed => "failed",
        }
        .to_owned();
        p.update_error = u.error.clone().unwrap_or_default();
    }
}

fn firmware_to_pb(f: &FirmwareRecord) -> pb::Firmware {
    pb::Firmware {
        model: f.model.clone(),
        version: f.version.clone(),
        sha256: f.sha256.clone(),
        size: f.size,
        key_id: f.key_id.clone(),
        added_at: f.added_at,
    }
}

fn key_to_pb(k: &VendorKeyRecord) -> pb::VendorKey {
    pb::VendorKey {
        model: k.model.clone(),
        key_id: k.key_id.clone(),
        added_at: k.added_at,
    }
}

pub(super) fn event_to_pb(e: SeclogEntry) -> pb::SecurityEvent {
    pb::SecurityEvent {
        seq: e.seq,
        at_ms: e.at_ms,
        kind: e.kind,
        severity: e.severity,
        device: e.device.unwrap_or_default(),
        actor: e.actor,
        message: e.message,
        evidence: e.evidence.into_iter().collect(),
        prev: e.prev,
        hash: e.hash,
    }
}

impl Service {
    pub(super) async fn set_support_rpc(
        &self,
        req: Request<pb::SetSupportRequest>,
    ) -> Result<pb::Device, Status> {
        let actor = actor(&req);
        let req = req.into_inner();
        let id = parse_id("id", &req.id)?;
        let date = match req.date.trim() {
            "" => None,
            text => Some(parse_date(text).map_err(|e| Status::invalid_argument(e.to_string()))?),
        };
        let device = self.state.lifecycle.set_support(id, date, actor).await?;
        Ok(self.device_pb(&device, self.state.edge.is_connected(&device.id)))
    }

    pub(super) async fn trust_key_rpc(
        &self,
        req: Request<pb::TrustVendorKeyRequest>,
    ) -> Result<pb::TrustVendorKeyResponse, Status> {
        let actor = actor(&req);
        let req = req.into_inner();
        let (record, added) = self
            .state
            .lifecycle
            .trust_key(req.model, req.key, actor)
            .await?;
        Ok(pb::TrustVendorKeyResponse {
            key_id: record.key_id,
            added,
        })
    }

    pub(super) async fn add_firmware_rpc(
        &self,
        req: Request<pb::AddFirmwareRequest>,
    ) -> Result<pb::Firmware, Status> {
        let actor = actor(&req);
        let req = req.into_inner();
        let record = self
            .state
            .lifecycle
            .add_firmware(
                req.model,
                req.version,
                req.image,
                req.signature,
                req.vendor_key,
                actor,
            )
            .await?;
        Ok(firmware_to_pb(&record))
    }

    pub(super) async fn list_firmware_rpc(&self) -> Result<pb::ListFirmwareResponse, Status> {
        let (mut firmware, mut keys) = self.state.lifecycle.catalogue().await?;
        firmware.sort_by(|a, b| {
            a.model
                .cmp(&b.model)
                .then_with(|| lifecycle::version_cmp(&a.version, &b.version))
        });
        keys.sort_by(|a, b| (&a.model, a.added_at).cmp(&(&b.model, b.added_at)));
        Ok(pb::ListFirmwareResponse {
            firmware: firmware.iter().map(firmware_to_pb).collect(),
            keys: keys.iter().map(key_to_pb).collect(),
        })
    }

    pub(super) async fn push_firmware_rpc(
        &self,
        req: Request<pb::PushFirmwareRequest>,
    ) -> Result<pb::PushFirmwareResponse, Status> {
        let actor = actor(&req);
        let req = req.into_inner();
        let id = parse_id("id", &req.id)?;
        let version = match req.version.trim() {
            "" => None,
            v => {
                lifecycle::validate_version(v)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                Some(v.to_owned())
            }
        };
        let offered = self
            .state
            .lifecycle
            .push(id, version, req.force, actor)
            .await?;
        Ok(pb::PushFirmwareResponse {
            offer: offered.offer,
            firmware: Some(firmware_to_pb(&offered.record)),
            from_version: offered.from_version.unwrap_or_default(),
        })
    }

    pub(super) async fn list_events_rpc(
        &self,
        req: Request<pb::ListEventsRequest>,
    ) -> Result<EventStream, Status> {
        let req = req.into_inner();
        let device = match req.device.trim() {
            "" => None,
            d => Some(parse_id("device", d)?),
        };
        let limit = match req.limit {
            0 => 100,
            n => n as usize,
        };
        // Subscribe first, so nothing committed between the read and the
        // follow is missed; entries seen in both are skipped by seq.
        let follow = req.follow.then(|| self.state.seclog.subscribe());
        let seclog = self.state.seclog.clone();
        let wanted = device.clone();
        let past = tokio::task::spawn_blocking(move || recent(&seclog, wanted.as_ref(), limit))
            .await
            .map_err(|e| Status::internal(format!("task failed: {e}")))?
            .map_err(|e| Status::internal(e.to_string()))?;
        let last_seq = past.last().map(|e| e.seq);
        let past = futures::stream::iter(past.into_iter().map(|e| Ok(event_to_pb(e))));
        let Some(follow) = follow else {
            return Ok(Box::pin(past));
        };
        let stop = self.stop.clone().cancelled_owned();
        let live = tokio_stream::wrappers::BroadcastStream::new(follow)
            .take_until(stop)
            .filter_map(move |e| {
                let keep = match e {
                    Ok(e) => (last_seq.is_none_or(|s| e.seq > s)
                        && device
                            .as_ref()
                            .is_none_or(|d| e.device.as_deref() == Some(d.as_str())))
                    .then(|| Ok(event_to_pb(e))),
                    Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                        Some(Err(Status::data_loss(format!(
                            "{n} events were skipped because this reader fell behind; run hubctl events again"
                        ))))
                    }
                };
                std::future::ready(keep)
            });
        Ok(Box::pin(past.chain(live)))
    }

    /// The security log's part of `Status`.
    pub(super) async fn seclog_status(&self) -> Result<pb::SeclogStatus, Status> {
        let seclog = self.state.seclog.clone();
        let (entries, tail) = tokio::task::spawn_blocking(move || {
            Ok::<_, crate::store::Error>((
                seclog.store().seclog_len()?,
                recent(&seclog, None, 1000)?,
            ))
        })
        .await
        .map_err(|e| Status::internal(format!("task failed: {e}")))?
        .map_err(|e| Status::internal(e.to_string()))?;
        let since = crate::clock::trusted_now().unix_timestamp() * 1000 - 86_400_000;
        let alerts: Vec<&SeclogEntry> = tail
            .iter()
            .filter(|e| e.severity == "alert" && e.at_ms >= since)
            .collect();
        Ok(pb::SeclogStatus {
            entries,
            dropped: self.state.seclog.dropped(),
            recent_alerts: alerts.len() as u64,
            last_alert: alerts
                .last()
                .map(|e| match &e.device {
                    Some(d) => format!("{d}: {}", e.message),
                    None => e.message.clone(),
                })
                .unwrap_or_default(),
        })
    }

    pub(super) async fn verify_events_rpc(&self) -> Result<pb::VerifyEventsResponse, Status> {
        let seclog = self.state.seclog.clone();
        let v = tokio::task::spawn_blocking(move || seclog.verify())
            .await
            .map_err(|e| Status::internal(format!("task failed: {e}")))?
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(pb::VerifyEventsResponse {
            ok: v.broken.is_none(),
            entries: v.entries,
            first_seq: v.first_seq,
            broken_seq: v.broken.as_ref().map_or(0, |b| b.seq),
            problem: v.broken.map(|b| b.problem).unwrap_or_default(),
            head: v.last_hash,
        })
    }
}

/// The most recent `limit` entries (of one device, if given), oldest first.
fn recent(
    seclog: &crate::seclog::SecLog,
    device: Option<&DeviceId>,
    limit: usize,
) -> Result<Vec<SeclogEntry>, crate::store::Error> {
    let store = seclog.store();
    let anchor = store.seclog_anchor()?;
    // Without a device filter only the tail is read.
    let from = match (device, store.seclog_last()?) {
        (None, Some(last)) => (last.seq + 1)
            .saturating_sub(limit as u64)
            .max(anchor.first_seq),
        _ => anchor.first_seq,
    };
    let all = store.seclog(from, usize::MAX)?;
    let mut picked: Vec<SeclogEntry> = all
        .into_iter()
        .rev()
        .filter(|e| device.is_none_or(|d| e.device.as_deref() == Some(d.as_str())))
        .take(limit)
        .collect();
    picked.reverse();
    Ok(picked)
}
