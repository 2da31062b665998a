//! The lifecycle service: one task reads devices' reports (metadata, and
//! their half of updates) from the edge, another sweeps support periods;
//! [`LifecycleHandle`] serves the admin API (catalogue, keys, pushes,
//! support dates) and the status summary.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use jiff::civil::Date;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::{
    Integrity, Invalid, MetaReport, SupportStatus, check_integrity, key_id, parse_meta,
    parse_signature, parse_vendor_key, sha256_hex, support_end, support_status, validate_model,
    validate_version, verify_signature, version_cmp,
};
use crate::bus::DeviceReport;
use crate::config::{IntegrityPolicy, LifecycleSection};
use crate::model::{DeviceId, Role};
use crate::registry::{self, RegistryHandle};
use crate::seclog::{Event, Kind, SecLog, Severity};
use crate::store::{
    self, DeviceRecord, DeviceState, FirmwareRecord, UpdateRecord, UpdateState, VendorKeyRecord,
};

/// The longest the support sweep sleeps: a date passes at most this late.
const SWEEP_EVERY: Duration = Duration::from_secs(3600);

pub type BoxFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// Publishes as the hub: (topic, payload, retain), QoS 1.
pub type Publisher = Arc<dyn Fn(String, Bytes, bool) -> BoxFuture + Send + Sync>;

/// Isolates a device live (record, ACL, notice, session), with a reason.
pub type Isolator = Arc<dyn Fn(DeviceId, String) -> BoxFuture + Send + Sync>;

/// Today's date, injectable for tests.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> Date + Send + Sync>);

impl Clock {
    /// Today in UTC, never before the build date (see `clock`).
    pub fn system() -> Clock {
        Clock::new(|| {
            let now = crate::clock::trusted_now();
            Date::new(now.year() as i16, now.month() as i8, now.day() as i8)
                .unwrap_or(Date::constant(2026, 1, 1))
        })
    }

    pub fn new(today: impl Fn() -> Date + Send + Sync + 'static) -> Clock {
        Clock(Arc::new(today))
    }

    pub fn today(&self) -> Date {
        (self.0)()
    }
}

/// What the service needs.
pub struct Setup {
    pub registry: RegistryHandle,
    pub seclog: SecLog,
    pub cfg: LifecycleSection,
    pub reports: mpsc::Receiver<DeviceReport>,
    pub publish: Publisher,
    pub isolate: Isolator,
    pub clock: Clock,
}

/// Why a lifecycle request failed; `api` maps each to a gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(#[from] Invalid),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Exists(String),
    #[error(transparent)]
    Registry(#[from] registry::Error),
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("{0}")]
    Internal(String),
}

/// An offer made to a device.
#[derive(Debug, Clone)]
pub struct Offered {
    pub offer: String,
    pub record: FirmwareRecord,
    pub from_version: Option<String>,
}

/// Counts for `Status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub support_ended: u64,
    pub support_ending: u64,
    pub support_unknown: u64,
    /// Ended and still not isolated (the policy is off, or the owner
    /// released it).
    pub ended_not_isolated: u64,
    pub integrity_problems: u64,
    pub updates_in_progress: u64,
    pub updates_failed: u64,
}

/// An offer being downloaded.
struct Active {
    offer: String,
    image: Arc<Vec<u8>>,
    downloading: bool,
}

struct Inner {
    registry: RegistryHandle,
    seclog: SecLog,
    cfg: LifecycleSection,
    publish: Publisher,
    isolate: Isolator,
    clock: Clock,
    offers: Mutex<HashMap<DeviceId, Active>>,
    /// Wakes the support sweep (a date was set or reported).
    sweep: Notify,
    /// Serialises catalogue and offer changes.
    changes: tokio::sync::Mutex<()>,
    /// One support sweep at a time (the hourly one, and those after a
    /// support date changed), so a policy acts once per date.
    sweeping: tokio::sync::Mutex<()>,
}

/// A cloneable handle on the lifecycle service.
#[derive(Clone)]
pub struct LifecycleHandle {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LifecycleHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LifecycleHandle").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now() -> i64 {
    crate::clock::trusted_now().unix_timestamp()
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|_| Error::Internal("a lifecycle task panicked".to_owned()))?
}

/// Starts the report reader and the support sweep on `tasks`; offers that
/// were in progress when the hub stopped are offered again.
pub async fn start(
    setup: Setup,
    tasks: &TaskTracker,
    stop: CancellationToken,
) -> Result<LifecycleHandle, Error> {
    let handle = LifecycleHandle {
        inner: Arc::new(Inner {
            registry: setup.registry,
            seclog: setup.seclog,
            cfg: setup.cfg,
            publish: setup.publish,
            isolate: setup.isolate,
            clock: setup.clock,
            offers: Mutex::new(HashMap::new()),
            sweep: Notify::new(),
            changes: tokio::sync::Mutex::new(()),
            sweeping: tokio::sync::Mutex::new(()),
        }),
    };
    handle.resume_offers().await?;
    tasks.spawn(read_reports(handle.clone(), setup.reports, stop.clone()));
    tasks.spawn(sweep_support(handle.clone(), stop));
    Ok(handle)
}

async fn read_reports(
    handle: LifecycleHandle,
    mut reports: mpsc::Receiver<DeviceReport>,
    stop: CancellationToken,
) {
    loop {
        let report = tokio::select! {
            _ = stop.cancelled() => return,
            r = reports.recv() => match r { Some(r) => r, None => return },
        };
        let result = match report {
            DeviceReport::Meta { device, payload } => handle.on_meta(device, payload).await,
            DeviceReport::UpdateGet { device, payload } => handle.on_get(device, payload).await,
            DeviceReport::UpdateResult { device, payload } => {
                handle.on_result(device, payload).await
            }
        };
        if let Err(e) = result {
            warn!(error = %e, "lifecycle: a device report could not be handled");
        }
    }
}

async fn sweep_support(handle: LifecycleHandle, stop: CancellationToken) {
    loop {
        if let Err(e) = handle.sweep().await {
            warn!(error = %e, "lifecycle: the support sweep failed");
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            () = tokio::time::sleep(SWEEP_EVERY) => {}
            () = handle.inner.sweep.notified() => {}
        }
    }
}

impl LifecycleHandle {
    pub fn today(&self) -> Date {
        self.inner.clock.today()
    }

    /// Where the device stands with its support, and the date that counts
    /// with its source (`owner` or `device`).
    pub fn support_of(
        &self,
        device: &DeviceRecord,
    ) -> (SupportStatus, Option<(Date, &'static str)>) {
        let end = support_end(&device.lifecycle);
        let status = support_status(
            end.map(|(d, _)| d),
            self.today(),
            self.inner.cfg.support_warning_days,
        );
        (status, end)
    }

    /// Counts for `Status`, over `devices`.
    pub fn summary(&self, devices: &[DeviceRecord]) -> Summary {
        let mut s = Summary::default();
        for d in devices.iter().filter(|d| d.role == Role::Device) {
            if d.state == DeviceState::Revoked {
                continue;
            }
            match self.support_of(d).0 {
                SupportStatus::Ended => {
                    s.support_ended += 1;
                    if d.state != DeviceState::Isolated {
                        s.ended_not_isolated += 1;
                    }
                }
                SupportStatus::EndsSoon => s.support_ending += 1,
                SupportStatus::Unknown => s.support_unknown += 1,
                SupportStatus::Ok => {}
            }
            if d.lifecycle.integrity.is_some() {
                s.integrity_problems += 1;
            }
            match d.lifecycle.update.as_ref().map(|u| u.state) {
                Some(UpdateState::Offered | UpdateState::Downloading) => {
                    s.updates_in_progress += 1;
                }
                Some(UpdateState::Failed) => s.updates_failed += 1,
                _ => {}
            }
        }
        s
    }

    /// Trusts a vendor key for a model. Returns the record and whether it
    /// is new.
    pub async fn trust_key(
        &self,
        model: String,
        key_file: Vec<u8>,
        actor: String,
    ) -> Result<(VendorKeyRecord, bool), Error> {
        validate_model(&model)?;
        let public = parse_vendor_key(&key_file).map_err(|e| Invalid(format!("vendor key {e}")))?;
        let record = VendorKeyRecord {
            model: model.clone(),
            public_key: public.to_vec(),
            key_id: key_id(&public),
            added_at: now(),
        };
        let _guard = self.inner.changes.lock().await;
        let store = self.inner.registry.store().clone();
        let r = record.clone();
        let added = blocking(move || Ok(store.trust_vendor_key(&r)?)).await?;
        if added {
            self.event(
                Event::new(
                    Kind::VendorKeyTrusted,
                    Severity::Info,
                    format!("vendor key {} trusted for model {model}", record.key_id),
                )
                .actor(actor)
                .evidence("model", &model)
                .evidence("key", &record.key_id),
                true,
            )
            .await?;
        }
        Ok((record, added))
    }

    /// The catalogue and the trusted keys.
    pub async fn catalogue(&self) -> Result<(Vec<FirmwareRecord>, Vec<VendorKeyRecord>), Error> {
        let store = self.inner.registry.store().clone();
        blocking(move || Ok((store.firmware()?, store.vendor_keys()?))).await
    }

    /// Adds an image to the catalogue once its signature verifies with a
    /// key trusted for the model. Nothing is stored otherwise.
    pub async fn add_firmware(
        &self,
        model: String,
        version: String,
        image: Vec<u8>,
        signature_file: Vec<u8>,
        key_file: Vec<u8>,
        actor: String,
    ) -> Result<FirmwareRecord, Error> {
        validate_model(&model)?;
        validate_version(&version)?;
        let max = self.inner.cfg.max_image_size;
        if image.is_empty() {
            return Err(Invalid("image: the file is empty".to_owned()).into());
        }
        if image.len() > max {
            return Err(Invalid(format!(
                "image: {} bytes is more than [lifecycle] max_image_size ({max})",
                image.len()
            ))
            .into());
        }
        let public = parse_vendor_key(&key_file).map_err(|e| Invalid(format!("vendor key {e}")))?;
        let signature =
            parse_signature(&signature_file).map_err(|e| Invalid(format!("signature {e}")))?;
        let id = key_id(&public);
        let _guard = self.inner.changes.lock().await;
        let (catalogue, keys) = self.catalogue().await?;
        if !keys
            .iter()
            .any(|k| k.model == model && k.public_key == public)
        {
            return Err(Error::Refused(format!(
                "vendor key {id} is not trusted for model {model}: nothing was stored (trust it first with hubctl firmware trust-key --model '{model}' KEYFILE)"
            )));
        }
        let sha = sha256_hex(&image);
        if !verify_signature(&public, &model, &version, &sha, &signature) {
            return Err(Invalid(format!(
                "signature: does not verify with vendor key {id} over model {model}, version {version}, image sha256 {sha}: nothing was stored"
            ))
            .into());
        }
        if let Some(existing) = catalogue
            .iter()
            .find(|f| f.model == model && f.version == version)
        {
            return Err(Error::Exists(format!(
                "the catalogue already has {model} {version} (sha256 {}): nothing was stored",
                existing.sha256
            )));
        }
        let record = FirmwareRecord {
            model: model.clone(),
            version: version.clone(),
            sha256: sha.clone(),
            size: image.len() as u64,
            signature: signature.to_vec(),
            key_id: id.clone(),
            added_at: now(),
        };
        let store = self.inner.registry.store().clone();
        let r = record.clone();
        blocking(move || Ok(store.add_firmware(&r, &image)?)).await?;
        self.event(
            Event::new(
                Kind::FirmwareAdded,
                Severity::Info,
                format!("firmware {model} {version} added to the catalogue"),
            )
            .actor(actor)
            .evidence("sha256", &sha)
            .evidence("key", &id),
            true,
        )
        .await?;
        Ok(record)
    }

    /// Offers an update to a device: the given version, or the newest the
    /// catalogue has for its model. Refuses one that is not newer than
    /// what the device runs unless `force` (the device's own anti-rollback
    /// still decides).
    pub async fn push(
        &self,
        id: DeviceId,
        version: Option<String>,
        force: bool,
        actor: String,
    ) -> Result<Offered, Error> {
        let _guard = self.inner.changes.lock().await;
        let registry = self.inner.registry.clone();
        let target = id.clone();
        let device = blocking(move || Ok(registry.device(&target)?)).await?;
        if device.role != Role::Device {
            return Err(Error::Refused(format!(
                "{id} is an integration, not a device: it has no firmware"
            )));
        }
        match device.state {
            DeviceState::Revoked => {
                return Err(Error::Refused(format!("{id} is revoked")));
            }
            DeviceState::Isolated => {
                return Err(Error::Refused(format!(
                    "{id} is isolated and cannot receive updates: release it first (hubctl release {id})"
                )));
            }
            DeviceState::Active => {}
        }
        let l = &device.lifecycle;
        let Some(model) = l.model.clone() else {
            return Err(Error::Refused(format!(
                "{id} has not reported its model (the \"model\" field of d/{id}/meta), so no firmware can be chosen"
            )));
        };
        let (catalogue, _) = self.catalogue().await?;
        let mut for_model: Vec<FirmwareRecord> =
            catalogue.into_iter().filter(|f| f.model == model).collect();
        for_model.sort_by(|a, b| version_cmp(&a.version, &b.version));
        let record = match &version {
            Some(v) => for_model
                .iter()
                .find(|f| &f.version == v)
                .cloned()
                .ok_or_else(|| {
                    let have: Vec<&str> = for_model.iter().map(|f| f.version.as_str()).collect();
                    Error::Refused(format!(
                        "the catalogue has no {model} {v} (it has: {})",
                        if have.is_empty() {
                            "nothing for this model".to_owned()
                        } else {
                            have.join(", ")
                        }
                    ))
                })?,
            None => for_model.last().cloned().ok_or_else(|| {
                Error::Refused(format!("the catalogue has no firmware for model {model}"))
            })?,
        };
        if let Some(current) = &l.firmware
            && version_cmp(&record.version, current) != std::cmp::Ordering::Greater
            && !force
        {
            return Err(Error::Refused(format!(
                "{id} runs {current}; {} is not newer, and devices refuse older firmware (--force offers it anyway)",
                record.version
            )));
        }
        let store = self.inner.registry.store().clone();
        let sha = record.sha256.clone();
        let image = blocking(move || Ok(store.firmware_image(&sha)?)).await?;
        let image = image.ok_or_else(|| {
            Error::Internal(format!(
                "the image of {model} {} is missing from the store",
                record.version
            ))
        })?;
        if sha256_hex(&image) != record.sha256 {
            return Err(Error::Internal(format!(
                "the stored image of {model} {} does not match its hash: add it again",
                record.version
            )));
        }
        let offer = hex::encode(rand::random::<[u8; 16]>());
        let update = UpdateRecord {
            offer: offer.clone(),
            version: record.version.clone(),
            sha256: record.sha256.clone(),
            state: UpdateState::Offered,
            error: None,
            at: now(),
        };
        let registry = self.inner.registry.clone();
        let target = id.clone();
        blocking(move || Ok(registry.update_lifecycle(&target, |l| l.update = Some(update))?))
            .await?;
        self.activate(&id, &offer, &record, image).await?;
        self.event(
            Event::new(
                Kind::FirmwareOffered,
                Severity::Info,
                format!("firmware {model} {} offered", record.version),
            )
            .device(&id)
            .actor(actor)
            .evidence("from", l.firmware.as_deref().unwrap_or("unknown"))
            .evidence("to", &record.version)
            .evidence("sha256", &record.sha256),
            true,
        )
        .await?;
        Ok(Offered {
            offer,
            record,
            from_version: l.firmware.clone(),
        })
    }

    /// Sets (or with `None` clears) the owner's support end for a device.
    pub async fn set_support(
        &self,
        id: DeviceId,
        date: Option<Date>,
        actor: String,
    ) -> Result<DeviceRecord, Error> {
        let registry = self.inner.registry.clone();
        let target = id.clone();
        let text = date.map(|d| d.to_string());
        let value = text.clone();
        let device = blocking(move || {
            Ok(registry.update_lifecycle(&target, |l| {
                if l.support_end_owner != value {
                    l.support_end_owner = value;
                    l.eol_handled = None;
                }
            })?)
        })
        .await?;
        let msg = match &text {
            Some(d) => format!("support end set to {d} by the owner"),
            None => "the owner's support end cleared".to_owned(),
        };
        self.event(
            Event::new(Kind::SupportChanged, Severity::Info, msg)
                .device(&id)
                .actor(actor),
            true,
        )
        .await?;
        self.sweep().await?;
        self.inner.sweep.notify_one();
        let registry = self.inner.registry.clone();
        let _ = device;
        blocking(move || Ok(registry.device(&id)?)).await
    }

    /// Applies the end-of-life policy to every device whose support has
    /// ended and was not yet acted on for that date.
    pub async fn sweep(&self) -> Result<(), Error> {
        let _one = self.inner.sweeping.lock().await;
        let registry = self.inner.registry.clone();
        let devices = blocking(move || Ok(registry.devices()?)).await?;
        for d in devices {
            if d.role != Role::Device || d.state == DeviceState::Revoked {
                continue;
            }
            let (status, end) = self.support_of(&d);
            let Some((end, source)) = end else { continue };
            let end_text = end.to_string();
            if status != SupportStatus::Ended
                || d.lifecycle.eol_handled.as_deref() == Some(end_text.as_str())
            {
                continue;
            }
            let isolate =
                self.inner.cfg.isolate_after_support_end && d.state == DeviceState::Active;
            let reason = format!("support ended on {end_text}");
            let message = if isolate {
                format!("{reason}: isolated by the end-of-life policy")
            } else if d.state == DeviceState::Isolated {
                format!("{reason} (already isolated)")
            } else {
                format!("{reason}: not isolated ([lifecycle] isolate_after_support_end = false)")
            };
            // Recorded as handled first, so a failure below is not retried
            // every hour with a new alert.
            let registry = self.inner.registry.clone();
            let id = d.id.clone();
            let handled = end_text.clone();
            blocking(
                move || Ok(registry.update_lifecycle(&id, |l| l.eol_handled = Some(handled))?),
            )
            .await?;
            self.event(
                Event::new(Kind::SupportEnded, Severity::Alert, message)
                    .device(&d.id)
                    .actor("lifecycle policy")
                    .evidence("support_end", &end_text)
                    .evidence("source", source),
                false,
            )
            .await?;
            if isolate {
                (self.inner.isolate)(d.id.clone(), reason)
                    .await
                    .map_err(Error::Internal)?;
            }
        }
        Ok(())
    }

    async fn on_meta(&self, id: DeviceId, payload: Bytes) -> Result<(), Error> {
        let Some(report) = parse_meta(&payload) else {
            debug!(device = %id, "meta is not a JSON object; nothing to record");
            return Ok(());
        };
        for p in &report.problems {
            warn!(device = %id, problem = %p, "ignoring a malformed field of the device's meta");
        }
        let registry = self.inner.registry.clone();
        let store = registry.store().clone();
        let target = id.clone();
        let r = report.clone();
        let (before, problem, changed) = blocking(move || {
            let before = registry.device(&target)?;
            let catalogue = store.firmware()?;
            let problem = check_integrity(&r, &before.lifecycle, &catalogue);
            let mut after = before.lifecycle.clone();
            apply_report(&mut after, &r, problem.as_ref());
            let kind_changed = r.kind.is_some() && r.kind != before.kind;
            let changed = after != before.lifecycle || kind_changed;
            if changed {
                registry.update_device_record(&target, |d| {
                    d.lifecycle = after;
                    if r.kind.is_some() {
                        d.kind.clone_from(&r.kind);
                    }
                })?;
            }
            Ok((before, problem, changed))
        })
        .await?;
        if let (Some(update), Some(seen)) = (&before.lifecycle.update, &report.firmware_sha256)
            && &update.sha256 == seen
        {
            // The offered firmware runs: its download is no longer needed.
            self.finish_offer(&id, &update.offer).await;
        }
        if let Some(problem) = problem {
            self.integrity_failure(&before, &report, problem).await?;
        }
        if changed && report.support_end != before.lifecycle.support_end_reported {
            self.inner.sweep.notify_one();
        }
        Ok(())
    }

    async fn integrity_failure(
        &self,
        device: &DeviceRecord,
        report: &MetaReport,
        problem: Integrity,
    ) -> Result<(), Error> {
        let reason = problem.reason();
        let isolate = self.inner.cfg.on_integrity_failure == IntegrityPolicy::Isolate
            && device.state == DeviceState::Active;
        let model = report
            .model
            .clone()
            .or_else(|| device.lifecycle.model.clone())
            .unwrap_or_default();
        let mut event = Event::new(
            match problem {
                Integrity::NotRecognised { .. } => Kind::FirmwareUnknown,
                Integrity::ChangedWithoutUpdate { .. } => Kind::FirmwareChanged,
            },
            Severity::Alert,
            if isolate {
                format!("{reason}: device isolated")
            } else {
                format!("{reason} (policy: alert only)")
            },
        )
        .device(&device.id)
        .actor("lifecycle policy")
        .evidence("model", &model);
        event = match &problem {
            Integrity::NotRecognised {
                version,
                seen,
                expected,
            } => event
                .evidence("version", version)
                .evidence("seen_sha256", seen)
                .evidence(
                    "expected_sha256",
                    expected
                        .as_deref()
                        .unwrap_or("(version not in the catalogue)"),
                ),
            Integrity::ChangedWithoutUpdate { before, seen } => event
                .evidence("before_sha256", before)
                .evidence("seen_sha256", seen),
        };
        self.event(event, false).await?;
        if isolate {
            (self.inner.isolate)(device.id.clone(), reason.to_owned())
                .await
                .map_err(Error::Internal)?;
        }
        Ok(())
    }

    async fn on_get(&self, id: DeviceId, payload: Bytes) -> Result<(), Error> {
        #[derive(serde::Deserialize)]
        struct Get {
            offer: String,
            offset: u64,
        }
        let get: Get = match serde_json::from_slice(&payload) {
            Ok(g) => g,
            Err(e) => {
                return self
                    .ota_error(&id, "", &format!("malformed request: {e}"))
                    .await;
            }
        };
        let chunk_size = self.inner.cfg.ota_chunk_size;
        let answer = {
            let mut offers = lock(&self.inner.offers);
            match offers.get_mut(&id) {
                Some(active) if active.offer == get.offer => {
                    let size = active.image.len() as u64;
                    if get.offset >= size {
                        Err(format!(
                            "offset {} is past the image's {size} bytes",
                            get.offset
                        ))
                    } else {
                        let start = get.offset as usize;
                        let end = (start + chunk_size).min(active.image.len());
                        let first = !active.downloading;
                        active.downloading = true;
                        Ok((Bytes::copy_from_slice(&active.image[start..end]), first))
                    }
                }
                _ => Err("this offer is not current".to_owned()),
            }
        };
        match answer {
            Ok((chunk, first)) => {
                if first {
                    let registry = self.inner.registry.clone();
                    let target = id.clone();
                    let offer = get.offer.clone();
                    blocking(move || {
                        Ok(registry.update_lifecycle(&target, |l| {
                            if let Some(u) = l.update.as_mut().filter(|u| u.offer == offer) {
                                u.state = UpdateState::Downloading;
                                u.at = now();
                            }
                        })?)
                    })
                    .await?;
                }
                let topic = format!("d/{id}/ota/chunk/{}", get.offset);
                (self.inner.publish)(topic, chunk, false)
                    .await
                    .map_err(Error::Internal)
            }
            Err(why) => self.ota_error(&id, &get.offer, &why).await,
        }
    }

    async fn ota_error(&self, id: &DeviceId, offer: &str, why: &str) -> Result<(), Error> {
        let payload = serde_json::json!({"offer": offer, "error": why}).to_string();
        (self.inner.publish)(format!("d/{id}/ota/error"), Bytes::from(payload), false)
            .await
            .map_err(Error::Internal)
    }

    async fn on_result(&self, id: DeviceId, payload: Bytes) -> Result<(), Error> {
        #[derive(serde::Deserialize)]
        struct Outcome {
            offer: String,
            ok: bool,
            #[serde(default)]
            version: Option<String>,
            #[serde(default)]
            sha256: Option<String>,
            #[serde(default)]
            error: Option<String>,
            #[serde(default)]
            message: Option<String>,
        }
        let outcome: Outcome = match serde_json::from_slice(&payload) {
            Ok(o) => o,
            Err(e) => {
                warn!(device = %id, error = %e, "malformed update result");
                return Ok(());
            }
        };
        let clip = |s: Option<String>| -> String {
            s.unwrap_or_default()
                .chars()
                .filter(|c| !c.is_control())
                .take(200)
                .collect()
        };
        let code = clip(outcome.error);
        let message = clip(outcome.message);
        let registry = self.inner.registry.clone();
        let target = id.clone();
        let offer = outcome.offer.clone();
        let ok = outcome.ok;
        let detail = if message.is_empty() {
            code.clone()
        } else {
            format!("{code}: {message}")
        };
        let stored_detail = detail.clone();
        let current = blocking(move || {
            let mut matched = None;
            registry.update_lifecycle(&target, |l| {
                if let Some(u) = l.update.as_mut().filter(|u| u.offer == offer) {
                    u.state = if ok {
                        UpdateState::Installed
                    } else {
                        UpdateState::Failed
                    };
                    u.error = (!ok).then_some(stored_detail);
                    u.at = now();
                    matched = Some(u.clone());
                }
            })?;
            Ok(matched)
        })
        .await?;
        let Some(update) = current else {
            self.event(
                Event::new(
                    Kind::FirmwareRefused,
                    Severity::Warning,
                    "the device reported on an update the hub did not offer",
                )
                .device(&id)
                .actor("device")
                .evidence("offer", &outcome.offer)
                .evidence("ok", ok),
                false,
            )
            .await?;
            return Ok(());
        };
        self.finish_offer(&id, &update.offer).await;
        let event = if ok {
            Event::new(
                Kind::FirmwareInstalled,
                Severity::Info,
                format!("firmware {} installed", update.version),
            )
            .evidence("reported_version", outcome.version.unwrap_or_default())
            .evidence("reported_sha256", outcome.sha256.unwrap_or_default())
        } else {
            Event::new(
                Kind::FirmwareRefused,
                Severity::Warning,
                format!("the device refused firmware {}: {detail}", update.version),
            )
            .evidence("error", &code)
        };
        self.event(
            event
                .device(&id)
                .actor("device")
                .evidence("offer", &update.offer)
                .evidence("sha256", &update.sha256),
            false,
        )
        .await
    }

    /// Forgets an offer (its image leaves memory) and withdraws the
    /// retained offer message.
    async fn finish_offer(&self, id: &DeviceId, offer: &str) {
        let removed = {
            let mut offers = lock(&self.inner.offers);
            match offers.get(id) {
                Some(a) if a.offer == offer => offers.remove(id),
                _ => None,
            }
        };
        if removed.is_some()
            && let Err(e) =
                (self.inner.publish)(format!("d/{id}/ota/offer"), Bytes::new(), true).await
        {
            warn!(device = %id, error = %e, "cannot withdraw the firmware offer");
        }
    }

    async fn publish_offer(
        &self,
        id: &DeviceId,
        offer: &str,
        record: &FirmwareRecord,
    ) -> Result<(), Error> {
        let payload = serde_json::json!({
            "offer": offer,
            "model": record.model,
            "version": record.version,
            "size": record.size,
            "sha256": record.sha256,
            "signature": super::base64(&record.signature),
            "chunk_size": self.inner.cfg.ota_chunk_size,
        })
        .to_string();
        (self.inner.publish)(format!("d/{id}/ota/offer"), Bytes::from(payload), true)
            .await
            .map_err(Error::Internal)
    }

    /// Offers in progress when the hub stopped are made again (the router
    /// does not keep retained offers across restarts).
    async fn resume_offers(&self) -> Result<(), Error> {
        let registry = self.inner.registry.clone();
        let pending = blocking(move || {
            let store = registry.store();
            let catalogue = store.firmware()?;
            let mut out = Vec::new();
            for d in registry.devices()? {
                let Some(u) = d.lifecycle.update.clone() else {
                    continue;
                };
                if !matches!(u.state, UpdateState::Offered | UpdateState::Downloading)
                    || d.state != DeviceState::Active
                {
                    continue;
                }
                let Some(record) = catalogue.iter().find(|f| f.sha256 == u.sha256).cloned() else {
                    continue;
                };
                if let Some(image) = store.firmware_image(&u.sha256)? {
                    out.push((d.id, u.offer, record, image));
                }
            }
            Ok(out)
        })
        .await?;
        for (id, offer, record, image) in pending {
            self.activate(&id, &offer, &record, image).await?;
        }
        Ok(())
    }

    /// Makes an offer current (its image in memory for the downloads) and
    /// publishes it, retained.
    async fn activate(
        &self,
        id: &DeviceId,
        offer: &str,
        record: &FirmwareRecord,
        image: Vec<u8>,
    ) -> Result<(), Error> {
        lock(&self.inner.offers).insert(
            id.clone(),
            Active {
                offer: offer.to_owned(),
                image: Arc::new(image),
                downloading: false,
            },
        );
        self.publish_offer(id, offer, record).await
    }

    async fn event(&self, event: Event, durable: bool) -> Result<(), Error> {
        if durable {
            self.inner
                .seclog
                .record_durable(event)
                .await
                .map(|_| ())
                .map_err(Error::Internal)
        } else {
            self.inner.seclog.record(event);
            Ok(())
        }
    }
}

/// Folds a meta report into what the hub records. Fields the report does
/// not carry keep their values.
fn apply_report(l: &mut store::Lifecycle, r: &MetaReport, problem: Option<&Integrity>) {
    for (have, new) in [
        (&mut l.model, &r.model),
        (&mut l.vendor, &r.vendor),
        (&mut l.firmware, &r.firmware),
        (&mut l.firmware_sha256, &r.firmware_sha256),
        (&mut l.support_end_reported, &r.support_end),
    ] {
        if new.is_some() {
            have.clone_from(new);
        }
    }
    if r.firmware_sha256.is_some() {
        l.integrity = problem.map(|p| p.reason().to_owned());
    }
    if let (Some(u), Some(seen)) = (l.update.as_mut(), &r.firmware_sha256)
        && &u.sha256 == seen
        && matches!(u.state, UpdateState::Offered | UpdateState::Downloading)
    {
        u.state = UpdateState::Installed;
        u.at = now();
    }
}

#[cfg(test)]
#[path = "service_tests.rs"]
mod tests;
