//! Domain identifiers as newtypes: a device id is never a bare `String`.
//!
//! A `DeviceId` appears in MQTT topics (`d/<id>/...`), in certificate SANs
//! (`urn:hub:device:<id>`) and as a store key, so its alphabet is restricted
//! to characters that are safe in all three: lowercase ASCII letters, digits
//! and `-`.

use std::fmt;

use rand::TryRngCore;

/// Longest device id accepted anywhere.
pub const DEVICE_ID_MAX_LEN: usize = 64;

/// The prefix of the SAN URI that carries a device id in its certificate.
pub const DEVICE_URI_PREFIX: &str = "urn:hub:device:";

/// A device's identity: the CN and SAN URI of its certificate, its MQTT client
/// id and its topic namespace `d/<id>/`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId(String);

/// Why a string is not a valid [`DeviceId`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("device id is empty")]
    Empty,
    #[error("device id is longer than {DEVICE_ID_MAX_LEN} characters")]
    TooLong,
    #[error("device id {0:?} may contain only a-z, 0-9 and '-'")]
    BadChar(String),
}

impl DeviceId {
    /// Parses and validates a device id.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.len() > DEVICE_ID_MAX_LEN {
            return Err(IdError::TooLong);
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(IdError::BadChar(s.to_owned()));
        }
        Ok(DeviceId(s.to_owned()))
    }

    /// A fresh random id: 80 bits from the OS RNG, Crockford base32, lowercase.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 10];
        rand::rngs::OsRng
            .try_fill_bytes(&mut bytes)
            .expect("the OS random number generator is available on every supported platform");
        DeviceId(base32_lower(&bytes))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The SAN URI that names this device in its certificate.
    pub fn uri(&self) -> String {
        format!("{DEVICE_URI_PREFIX}{}", self.0)
    }
}

/// Lets sets of ids be searched by `&str` (a topic level, say): a `DeviceId`
/// hashes and compares exactly as its string.
impl std::borrow::Borrow<str> for DeviceId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Crockford base32 (no I, L, O, U), lowercase, no padding.
pub fn base32_lower(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";
    let mut out = String::with_capacity(bytes.len() * 8 / 5 + 1);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for &b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((acc << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// What kind of client a certificate belongs to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Role {
    /// A device: its own `d/<id>/` topics only.
    #[default]
    Device,
    /// Home Assistant, Node-RED and the like: the topic filters granted to it.
    Integration,
}

/// MQTT topic filters an integration may publish to and subscribe to.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Grants {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// MQTT quality of service as the hub offers it: QoS 2 is not supported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Qos {
    AtMostOnce,
    AtLeastOnce,
}

/// A device's name as the householder typed it: 1 to 64 characters, no control
/// characters, not only white space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceName(String);

/// Why a string is not a valid [`DeviceName`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("device name is empty")]
    Empty,
    #[error("device name is longer than 64 characters")]
    TooLong,
    #[error("device name contains a control character")]
    Control,
}

impl DeviceName {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        if s.trim().is_empty() {
            return Err(NameError::Empty);
        }
        if s.chars().count() > 64 {
            return Err(NameError::TooLong);
        }
        if s.chars().any(char::is_control) {
            return Err(NameError::Control);
        }
        Ok(DeviceName(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let a = DeviceId::generate();
        let b = DeviceId::generate();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 16);
        assert_eq!(DeviceId::parse(a.as_str()).unwrap(), a);
    }

    #[test]
    fn ids_that_would_break_topics_are_refused() {
        for bad in ["", "a/b", "a+", "#", "A", "a b", &"x".repeat(65)] {
            assert!(DeviceId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn names_are_checked() {
        assert!(DeviceName::parse("Kitchen sensor").is_ok());
        assert_eq!(DeviceName::parse("  "), Err(NameError::Empty));
        assert_eq!(DeviceName::parse("a\nb"), Err(NameError::Control));
        assert_eq!(DeviceName::parse(&"é".repeat(65)), Err(NameError::TooLong));
    }

    #[test]
    fn base32_is_crockford() {
        assert_eq!(base32_lower(&[0xff]), "zw");
        assert_eq!(base32_lower(&[0, 0, 0, 0, 0]), "00000000");
    }
}
