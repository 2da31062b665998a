//! The device half of certificate renewal, as a simulated device does it:
//! when less than [`RENEW_BEFORE`] of its certificate's life remains, it
//! makes a new key and CSR, publishes the CSR on `d/<id>/cert/csr`, takes the
//! answer from `d/<id>/cert/new`, and reconnects with the new certificate.

use std::net::SocketAddr;

use anyhow::{Context, bail};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use time::OffsetDateTime;

use crate::{DeviceIdentity, SimDevice, key_and_csr};

/// Simulated devices renew when less than this remains.
pub const RENEW_BEFORE: time::Duration = time::Duration::days(30);

/// When the identity's certificate expires.
pub fn not_after(identity: &DeviceIdentity) -> anyhow::Result<OffsetDateTime> {
    let der =
        CertificateDer::from_pem_slice(identity.cert_pem.as_bytes()).context("certificate PEM")?;
    let (_, not_after) = hubd::ca::cert_serial_and_expiry(&der)?;
    Ok(not_after)
}

/// Whether the certificate is within [`RENEW_BEFORE`] of expiry at `now`.
pub fn renewal_due(identity: &DeviceIdentity, now: OffsetDateTime) -> anyhow::Result<bool> {
    Ok(not_after(identity)? - now < RENEW_BEFORE)
}

/// Asks the hub for a new certificate over the device's own session and
/// returns the new identity (same id, new key). The session stays up.
pub async fn renew(
    device: &mut SimDevice,
    identity: &DeviceIdentity,
) -> anyhow::Result<DeviceIdentity> {
    let answer_topic = format!("d/{}/cert/new", identity.id);
    let codes = device
        .subscribe(&answer_topic, rumqttc::QoS::AtLeastOnce)
        .await?;
    if codes != [1] {
        bail!("the hub refused the subscription to {answer_topic}: {codes:?}");
    }
    let (key, csr) = key_and_csr()?;
    device
        .client
        .publish(
            format!("d/{}/cert/csr", identity.id),
            rumqttc::QoS::AtLeastOnce,
            false,
            csr,
        )
        .await?;
    let payload = loop {
        let (topic, payload) = device.next_message().await?;
        if topic == answer_topic {
            break payload;
        }
    };
    let answer: serde_json::Value =
        serde_json::from_slice(&payload).context("renewal answer is JSON")?;
    if let Some(error) = answer["error"].as_str() {
        bail!("the hub refused to renew: {error}");
    }
    let renewed = DeviceIdentity {
        id: identity.id.clone(),
        key_pem: key.serialize_pem(),
        cert_pem: answer["cert"]
            .as_str()
            .context("answer has a cert")?
            .to_owned(),
        ca_pem: answer["ca"]
            .as_str()
            .context("answer has the CA")?
            .to_owned(),
    };
    if renewed.ca_pem != identity.ca_pem {
        bail!("the renewal answer names another CA");
    }
    Ok(renewed)
}

/// Connects, and if the certificate is due for renewal renews it and
/// reconnects with the new one (which retires the old one at the hub).
/// Returns the session and the identity now in use.
pub async fn connect_renewing(
    identity: &DeviceIdentity,
    addr: SocketAddr,
) -> anyhow::Result<(SimDevice, DeviceIdentity)> {
    let mut device = SimDevice::connect(identity, addr).await?;
    if !renewal_due(identity, OffsetDateTime::now_utc())? {
        return Ok((device, identity.clone()));
    }
    let renewed = renew(&mut device, identity).await?;
    drop(device);
    let device = SimDevice::connect(&renewed, addr).await?;
    Ok((device, renewed))
}
