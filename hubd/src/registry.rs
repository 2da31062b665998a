//! The device registry: enrolment, renewal, revocation, removal, isolation,
//! integration grants, and who may hold a session.
//!
//! It owns the CA and the store together, because every change here touches
//! both: enrolling issues a certificate and records it in one durable
//! transaction; revoking marks the device and its certificates and re-signs
//! the CRL. The edge asks it whether a verified certificate's device may
//! connect, and as what.

use std::sync::{Arc, Mutex};

use time::OffsetDateTime;
use tracing::{info, warn};

use std::collections::HashSet;

use crate::acl::{self, Principal, TopicLimits};
use crate::ca::{self, Ca, RevokedSerial, ServerIdentity};
use crate::config::CaSection;
use crate::model::{DeviceId, DeviceName, Grants, Role};
use crate::store::{self, CertRecord, DeviceRecord, DeviceState, Store};

/// Errors from registry operations; `api` maps each to a gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no such device {0}")]
    NotFound(DeviceId),
    #[error("device {0} is revoked")]
    Revoked(DeviceId),
    #[error("device {0} is not an integration: only integrations have grants")]
    NotIntegration(DeviceId),
    #[error("grants: {0}")]
    BadGrant(String),
    #[error("key: {0}")]
    KeyGen(String),
    #[error("csr: {0}")]
    BadCsr(ca::Error),
    #[error("ca: {0}")]
    Ca(#[from] ca::Error),
    #[error(transparent)]
    Store(#[from] store::Error),
}

/// A freshly enrolled device and what it must be given.
#[derive(Debug, Clone)]
pub struct Enrolled {
    pub device: DeviceRecord,
    pub cert_pem: String,
    pub ca_pem: String,
}

/// What a verified certificate may do, and whether its use changed the CRL.
#[derive(Debug)]
pub struct Admission {
    pub principal: Principal,
    /// A new CRL when this connection was the first with a renewed
    /// certificate, which retires the device's older ones.
    pub new_crl: Option<Vec<u8>>,
}

/// Topic limits for grant filters (the edge's defaults would do; grants are
/// checked for syntax only).
const GRANT_LIMITS: TopicLimits = TopicLimits {
    max_len: 1024,
    max_depth: 64,
};

/// Checks grant filters' syntax, naming the bad one.
pub fn validate_grants(grants: &Grants) -> Result<(), Error> {
    for (kind, filters) in [
        ("publish", &grants.publish),
        ("subscribe", &grants.subscribe),
    ] {
        for f in filters {
            acl::validate_filter(f, GRANT_LIMITS)
                .map_err(|e| Error::BadGrant(format!("{kind} filter {f:?}: {e}")))?;
        }
    }
    Ok(())
}

/// Cloneable handle on the registry.
#[derive(Clone)]
pub struct RegistryHandle {
    inner: Arc<Inner>,
}

struct Inner {
    /// The durable record of devices and certificates.
    store: Store,
    /// The hub CA; a mutex because renewing the server certificate mutates it.
    ca: Mutex<Ca>,
    /// Certificate lifetimes from the config.
    ca_cfg: CaSection,
    /// The CA fingerprint, cached: it never changes while the daemon runs.
    fingerprint: String,
    /// The CA certificate, PEM, cached for enrolment answers.
    ca_pem: String,
}

impl std::fmt::Debug for RegistryHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryHandle")
            .field("fingerprint", &self.inner.fingerprint)
            .finish_non_exhaustive()
    }
}

fn now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

impl RegistryHandle {
    pub fn new(store: Store, ca: Ca, ca_cfg: CaSection) -> Self {
        let fingerprint = ca.fingerprint();
        let ca_pem = ca.ca_pem().to_owned();
        RegistryHandle {
            inner: Arc::new(Inner {
                store,
                ca: Mutex::new(ca),
                ca_cfg,
                fingerprint,
                ca_pem,
            }),
        }
    }

    fn ca(&self) -> std::sync::MutexGuard<'_, Ca> {
        // The CA holds no invariant a panic could half-update (renewal writes
        // files atomically before swapping fields), so a poisoned lock is usable.
        self.inner
            .ca
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn ca_fingerprint(&self) -> &str {
        &self.inner.fingerprint
    }

    pub fn ca_pem(&self) -> &str {
        &self.inner.ca_pem
    }

    pub fn ca_der(&self) -> rustls_pki_types::CertificateDer<'static> {
        self.ca().ca_der()
    }

    pub fn server_identity(&self) -> ServerIdentity {
        self.ca().server_identity()
    }

    /// Renews the edge's server certificate if it is within the configured
    /// window of expiry; returns the new identity if it did.
    pub fn renew_server_if_due(&self) -> Result<Option<ServerIdentity>, Error> {
        let before = time::Duration::days(i64::from(self.inner.ca_cfg.server_renew_before_days));
        let mut ca = self.ca();
        if ca.renew_server_if_due(crate::clock::trusted_now(), before)? {
            info!("server certificate renewed");
            Ok(Some(ca.server_identity()))
        } else {
            Ok(None)
        }
    }

    /// Issues a certificate for a new device from its CSR and records both in
    /// one durable transaction. Nothing is stored if anything fails.
    pub fn enroll(
        &self,
        name: &DeviceName,
        csr_pem: &str,
        role: Role,
        grants: Grants,
    ) -> Result<Enrolled, Error> {
        if role == Role::Device && grants != Grants::default() {
            return Err(Error::BadGrant("only integrations have grants".into()));
        }
        validate_grants(&grants)?;
        let id = DeviceId::generate();
        let issued = self
            .ca()
            .issue_from_csr(&id, csr_pem, self.inner.ca_cfg.device_validity_days)
            .map_err(Error::BadCsr)?;
        let at = now();
        let device = DeviceRecord {
            id: id.clone(),
            name: name.as_str().to_owned(),
            state: DeviceState::Active,
            created_at: at,
            last_seen: 0,
            cert_serial: issued.serial_hex.clone(),
            cert_not_after: issued.not_after.unix_timestamp(),
            role,
            isolation_reason: None,
            grants,
            kind: None,
            lifecycle: Default::default(),
        };
        let cert = CertRecord {
            serial_hex: issued.serial_hex.clone(),
            device: id.clone(),
            issued_at: at,
            not_after: issued.not_after.unix_timestamp(),
            revoked_at: None,
        };
        self.inner.store.enroll(&device, &cert)?;
        info!(device = %id, serial = %issued.serial_hex, ?role, "device enrolled");
        Ok(Enrolled {
            device,
            cert_pem: issued.pem,
            ca_pem: self.inner.ca_pem.clone(),
        })
    }

    /// Enrols a device that cannot make its own key: the hub makes a P-256
    /// key, enrols it like any CSR, and returns the key PEM with the rest.
    pub fn enroll_bundle(
        &self,
        name: &DeviceName,
        role: Role,
        grants: Grants,
    ) -> Result<(Enrolled, String), Error> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| Error::KeyGen(e.to_string()))?;
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())
            .and_then(|p| p.serialize_request(&key))
            .and_then(|r| r.pem())
            .map_err(|e| Error::KeyGen(e.to_string()))?;
        let enrolled = self.enroll(name, &csr, role, grants)?;
        warn!(target: "security", device = %enrolled.device.id, "offline bundle: the device's key was made by the hub");
        Ok((enrolled, key.serialize_pem()))
    }

    /// Checks a CSR without issuing anything.
    pub fn check_csr(&self, csr_pem: &str) -> Result<(), Error> {
        Ca::check_csr(csr_pem).map_err(Error::BadCsr)
    }

    pub fn device(&self, id: &DeviceId) -> Result<DeviceRecord, Error> {
        self.inner
            .store
            .device(id)?
            .ok_or_else(|| Error::NotFound(id.clone()))
    }

    pub fn devices(&self) -> Result<Vec<DeviceRecord>, Error> {
        let mut devices = self.inner.store.devices()?;
        devices.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.id.cmp(&b.id)));
        Ok(devices)
    }

    /// Marks the device and its certificates revoked (durably) and returns the
    /// device with the CRL that now lists them. Revoking twice is harmless.
    pub fn revoke(&self, id: &DeviceId) -> Result<(DeviceRecord, Vec<u8>), Error> {
        let device = self
            .inner
            .store
            .revoke_device(id, now())?
            .ok_or_else(|| Error::NotFound(id.clone()))?;
        let crl = self.crl()?;
        info!(target: "security", device = %id, "device revoked");
        Ok((device, crl))
    }

    /// The CRL listing every revoked certificate, freshly signed.
    pub fn crl(&self) -> Result<Vec<u8>, Error> {
        let revoked: Vec<RevokedSerial> = self
            .inner
            .store
            .revoked_certs()?
            .into_iter()
            .map(|c| RevokedSerial {
                serial_hex: c.serial_hex,
                revoked_at: OffsetDateTime::from_unix_timestamp(c.revoked_at.unwrap_or(0))
                    .unwrap_or(OffsetDateTime::UNIX_EPOCH),
            })
            .collect();
        let number = self.inner.store.next_crl_number()?;
        Ok(self.ca().crl_der(&revoked, number)?)
    }

    /// What a device whose certificate verified may do, or why it may not.
    /// The first connection with a renewed certificate retires the device's
    /// older certificates (the caller installs the new CRL).
    pub fn admit(&self, id: &DeviceId, cert_serial: &str) -> Result<Admission, String> {
        let device = match self.inner.store.device(id) {
            Ok(Some(d)) => d,
            Ok(None) => return Err(format!("device {id} is not registered")),
            Err(e) => return Err(format!("registry unavailable: {e}")),
        };
        match self.inner.store.cert(cert_serial) {
            Ok(Some(cert)) if cert.device == *id && cert.revoked_at.is_none() => {}
            Ok(Some(_)) => {
                return Err(format!(
                    "certificate {cert_serial} is revoked or not {id}'s"
                ));
            }
            Ok(None) => {
                return Err(format!(
                    "certificate {cert_serial} was not issued by this hub"
                ));
            }
            Err(e) => return Err(format!("registry unavailable: {e}")),
        }
        let principal = match device.state {
            DeviceState::Revoked => return Err(format!("device {id} is revoked")),
            DeviceState::Isolated => Principal::Isolated(id.clone()),
            DeviceState::Active => match device.role {
                Role::Device => Principal::Device(id.clone()),
                Role::Integration => Principal::Integration(id.clone(), device.grants.clone()),
            },
        };
        let mut new_crl = None;
        if cert_serial == device.cert_serial {
            match self.inner.store.revoke_certs_except(id, cert_serial, now()) {
                Ok(0) => {}
                Ok(n) => {
                    info!(device = %id, retired = n, "renewed certificate in use: older ones revoked");
                    new_crl = Some(
                        self.crl()
                            .map_err(|e| format!("cannot re-sign the CRL: {e}"))?,
                    );
                }
                Err(e) => return Err(format!("registry unavailable: {e}")),
            }
        }
        Ok(Admission { principal, new_crl })
    }

    /// Issues a renewed certificate for a connected device (same id, name,
    /// rules) and makes it current. The old one stays valid until the new one
    /// is used or [`RegistryHandle::retire_superseded`] runs.
    pub fn renew(&self, id: &DeviceId, csr_pem: &str) -> Result<Enrolled, Error> {
        let device = self.device(id)?;
        if device.state == DeviceState::Revoked {
            return Err(Error::Revoked(id.clone()));
        }
        let issued = self
            .ca()
            .issue_from_csr(id, csr_pem, self.inner.ca_cfg.device_validity_days)
            .map_err(Error::BadCsr)?;
        let cert = CertRecord {
            serial_hex: issued.serial_hex.clone(),
            device: id.clone(),
            issued_at: now(),
            not_after: issued.not_after.unix_timestamp(),
            revoked_at: None,
        };
        let device = self
            .inner
            .store
            .add_cert(&cert)?
            .ok_or_else(|| Error::NotFound(id.clone()))?;
        info!(device = %id, serial = %issued.serial_hex, "certificate renewed");
        Ok(Enrolled {
            device,
            cert_pem: issued.pem,
            ca_pem: self.inner.ca_pem.clone(),
        })
    }

    /// Revokes certificates superseded by a renewal more than `grace` seconds
    /// ago, for devices that never reconnected with the new one. Returns the
    /// new CRL if anything was revoked.
    pub fn retire_superseded(&self, grace: i64) -> Result<Option<Vec<u8>>, Error> {
        let cutoff = now() - grace;
        let mut changed = 0;
        for device in self.inner.store.devices()? {
            let certs = self.inner.store.certs_of(&device.id)?;
            let current_issued = certs
                .iter()
                .find(|c| c.serial_hex == device.cert_serial)
                .map(|c| c.issued_at);
            let stale = certs
                .iter()
                .any(|c| c.revoked_at.is_none() && c.serial_hex != device.cert_serial);
            if stale && current_issued.is_some_and(|at| at < cutoff) {
                changed +=
                    self.inner
                        .store
                        .revoke_certs_except(&device.id, &device.cert_serial, now())?;
            }
        }
        if changed == 0 {
            return Ok(None);
        }
        Ok(Some(self.crl()?))
    }

    pub fn rename(&self, id: &DeviceId, name: &DeviceName) -> Result<DeviceRecord, Error> {
        self.update(id, |d| d.name = name.as_str().to_owned())
    }

    /// Isolates the device (persisted); the caller applies it live.
    pub fn isolate(&self, id: &DeviceId, reason: &str) -> Result<DeviceRecord, Error> {
        self.refuse_revoked(id)?;
        let device = self.update(id, |d| {
            d.state = DeviceState::Isolated;
            d.isolation_reason = Some(reason.to_owned());
        })?;
        info!(target: "security", device = %id, %reason, "device isolated");
        Ok(device)
    }

    pub fn release(&self, id: &DeviceId) -> Result<DeviceRecord, Error> {
        self.refuse_revoked(id)?;
        let device = self.update(id, |d| {
            d.state = DeviceState::Active;
            d.isolation_reason = None;
        })?;
        info!(target: "security", device = %id, "device released from isolation");
        Ok(device)
    }

    /// Adds (or with `revoke`, removes) grant filters of an integration.
    pub fn update_grants(
        &self,
        id: &DeviceId,
        change: &Grants,
        revoke: bool,
    ) -> Result<DeviceRecord, Error> {
        validate_grants(change)?;
        if self.device(id)?.role != Role::Integration {
            return Err(Error::NotIntegration(id.clone()));
        }
        self.update(id, |d| {
            for (have, delta) in [
                (&mut d.grants.publish, &change.publish),
                (&mut d.grants.subscribe, &change.subscribe),
            ] {
                if revoke {
                    have.retain(|f| !delta.contains(f));
                } else {
                    for f in delta {
                        if !have.contains(f) {
                            have.push(f.clone());
                        }
                    }
                }
            }
        })
    }

    /// Revokes all the device's certificates and deletes its record; returns
    /// the removed record and the CRL that now lists its certificates.
    pub fn remove(&self, id: &DeviceId) -> Result<(DeviceRecord, Vec<u8>), Error> {
        let removed = self
            .inner
            .store
            .remove_device(id, now())?
            .ok_or_else(|| Error::NotFound(id.clone()))?;
        info!(target: "security", device = %id, "device removed");
        Ok((removed, self.crl()?))
    }

    /// Records what the device says it is (from its metadata), if that
    /// changed. A malformed kind is ignored with a warning: it is the
    /// device's own description, not something to refuse a session over.
    pub fn set_kind(&self, id: &DeviceId, kind: &str) -> Result<(), Error> {
        let valid = !kind.is_empty()
            && kind.len() <= 32
            && kind
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !valid {
            warn!(device = %id, kind, "ignoring a malformed device kind");
            return Ok(());
        }
        if self.device(id)?.kind.as_deref() == Some(kind) {
            return Ok(());
        }
        self.update(id, |d| d.kind = Some(kind.to_owned()))?;
        Ok(())
    }

    /// Changes a device's lifecycle record (firmware, support, updates) in
    /// one durable transaction.
    pub fn update_lifecycle(
        &self,
        id: &DeviceId,
        change: impl FnOnce(&mut store::Lifecycle),
    ) -> Result<DeviceRecord, Error> {
        self.update(id, |d| change(&mut d.lifecycle))
    }

    /// Changes a device's record as the lifecycle service decides (what
    /// the device says it is and runs). Durable on return.
    pub fn update_device_record(
        &self,
        id: &DeviceId,
        change: impl FnOnce(&mut DeviceRecord),
    ) -> Result<DeviceRecord, Error> {
        self.update(id, change)
    }

    /// Ids of the devices isolated now.
    pub fn isolated(&self) -> Result<HashSet<DeviceId>, Error> {
        Ok(self
            .inner
            .store
            .devices()?
            .into_iter()
            .filter(|d| d.state == DeviceState::Isolated)
            .map(|d| d.id)
            .collect())
    }

    fn refuse_revoked(&self, id: &DeviceId) -> Result<(), Error> {
        match self.device(id)?.state {
            DeviceState::Revoked => Err(Error::Revoked(id.clone())),
            DeviceState::Active | DeviceState::Isolated => Ok(()),
        }
    }

    fn update(
        &self,
        id: &DeviceId,
        change: impl FnOnce(&mut DeviceRecord),
    ) -> Result<DeviceRecord, Error> {
        self.inner
            .store
            .update_device(id, change)?
            .ok_or_else(|| Error::NotFound(id.clone()))
    }

    /// Records that the device was seen now. Failures are logged, not fatal:
    /// last-seen is informational.
    pub fn touch(&self, id: &DeviceId) {
        if let Err(e) = self.inner.store.touch_last_seen(id, now()) {
            warn!(device = %id, error = %e, "could not record last seen");
        }
    }
}
