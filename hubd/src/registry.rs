//! The device registry: enrolment, revocation and who may hold a session.
//!
//! It owns the CA and the store together, because every change here touches
//! both: enrolling issues a certificate and records it in one durable
//! transaction; revoking marks the device and its certificates and re-signs
//! the CRL. The edge asks it (through [`crate::edge::SessionGate`], wired in
//! `daemon`) whether a verified certificate's device may connect.

use std::sync::{Arc, Mutex};

use time::OffsetDateTime;
use tracing::{info, warn};

use crate::acl::Principal;
use crate::ca::{self, Ca, RevokedSerial, ServerIdentity};
use crate::config::CaSection;
use crate::model::{DeviceId, DeviceName};
use crate::store::{self, CertRecord, DeviceRecord, DeviceState, Store};

/// Errors from registry operations; `api` maps each to a gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no such device {0}")]
    NotFound(DeviceId),
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
        if ca.renew_server_if_due(OffsetDateTime::now_utc(), before)? {
            info!("server certificate renewed");
            Ok(Some(ca.server_identity()))
        } else {
            Ok(None)
        }
    }

    /// Issues a certificate for a new device from its CSR and records both in
    /// one durable transaction. Nothing is stored if anything fails.
    pub fn enroll(&self, name: &DeviceName, csr_pem: &str) -> Result<Enrolled, Error> {
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
        };
        let cert = CertRecord {
            serial_hex: issued.serial_hex.clone(),
            device: id.clone(),
            issued_at: at,
            not_after: issued.not_after.unix_timestamp(),
            revoked_at: None,
        };
        self.inner.store.enroll(&device, &cert)?;
        info!(device = %id, serial = %issued.serial_hex, "device enrolled");
        Ok(Enrolled {
            device,
            cert_pem: issued.pem,
            ca_pem: self.inner.ca_pem.clone(),
        })
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

    /// The principal for a device whose certificate verified, or why not.
    pub fn admit(&self, id: &DeviceId, cert_serial: &str) -> Result<Principal, String> {
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
        match device.state {
            DeviceState::Active => Ok(Principal::Device(id.clone())),
            DeviceState::Revoked => Err(format!("device {id} is revoked")),
        }
    }

    /// Records that the device was seen now. Failures are logged, not fatal:
    /// last-seen is informational.
    pub fn touch(&self, id: &DeviceId) {
        if let Err(e) = self.inner.store.touch_last_seen(id, now()) {
            warn!(device = %id, error = %e, "could not record last seen");
        }
    }
}
