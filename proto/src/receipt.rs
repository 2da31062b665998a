//! Wipe receipts: what an ownership-transfer wipe destroyed, signed by the CA
//! the hub made afterwards, in a file a householder keeps and checks offline.
//!
//! The file is exactly one line of compact JSON and a newline:
//!
//! ```text
//! {"receipt":{"format":"hubd-wipe-receipt/1","hub":...,"new_ca_pem":...},"signature":"<hex>"}
//! ```
//!
//! `signature` is the lowercase hex of an ASN.1 DER ECDSA P-256 SHA-256
//! signature over [`DOMAIN`] followed by the compact JSON of the `receipt`
//! object, made with the new CA's private key. [`verify`] accepts only the
//! exact bytes [`sign`] writes: it re-serializes what it parsed and compares,
//! so any changed byte (whitespace and the final newline included) fails,
//! whether or not the signature would still match.
//!
//! A receipt that verifies was signed by the holder of the key of the CA
//! certificate inside it. That it came from *this* hub rests on the new CA
//! fingerprint matching the one the hub shows afterwards (e.g. `ca=sha256:`
//! in a pairing link). Nothing here does I/O.

use std::collections::BTreeMap;

use ring::digest;
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair,
    UnparsedPublicKey,
};
use serde::{Deserialize, Serialize};
use x509_parser::certificate::X509Certificate;
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::FromDer;

/// The value of [`Receipt::format`] for this version of the file.
pub const FORMAT: &str = "hubd-wipe-receipt/1";

/// Signed ahead of the receipt's JSON, so that a signature over a receipt can
/// never be taken for one over anything else the CA key signs.
pub const DOMAIN: &[u8] = b"hubd-wipe-receipt/1\n";

/// Length of an uncompressed P-256 point: 0x04, then x and y of 32 bytes each.
const P256_POINT_LEN: usize = 65;

/// What a wipe did. The field order is the order in the signed JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// Always [`FORMAT`].
    pub format: String,
    /// The hub's short name.
    pub hub: String,
    /// When the wipe began: RFC 3339 UTC, second precision.
    pub started_at: String,
    /// When the wipe ended: RFC 3339 UTC, second precision.
    pub finished_at: String,
    /// SHA-256 of the destroyed CA's certificate (DER), lowercase hex.
    pub old_ca_fingerprint: String,
    /// SHA-256 of [`Receipt::new_ca_pem`]'s DER, lowercase hex.
    pub new_ca_fingerprint: String,
    /// How many of each kind of record were destroyed, e.g. "devices" → 10.
    pub destroyed: BTreeMap<String, u64>,
    /// Devices that acknowledged the reset command.
    pub devices_acknowledged: Vec<String>,
    /// Devices that were sent the reset command but did not acknowledge it.
    pub devices_not_acknowledged: Vec<String>,
    /// The new CA certificate, PEM; its key signed the receipt.
    pub new_ca_pem: String,
}

/// Why a receipt could not be signed or does not verify.
#[derive(Debug, thiserror::Error)]
pub enum ReceiptError {
    /// The file is not JSON of the receipt's shape.
    #[error("not a hubd wipe receipt, or a damaged one: {0}")]
    Malformed(#[source] serde_json::Error),
    /// The receipt is of another format (or version) than this one.
    #[error("not a hubd wipe receipt: its format is {found:?}, expected {FORMAT:?}")]
    UnknownFormat { found: String },
    /// The signature field is not hexadecimal.
    #[error("the receipt's signature is damaged: it is not hexadecimal")]
    SignatureNotHex,
    /// The file's bytes are not exactly what the hub wrote for its contents.
    #[error(
        "the receipt was changed after it was signed: its text is not exactly what the hub wrote"
    )]
    NotCanonical,
    /// The new CA certificate cannot be read.
    #[error("the new CA certificate in the receipt cannot be read: {reason}")]
    BadCertificate { reason: String },
    /// `new_ca_fingerprint` is not the SHA-256 of `new_ca_pem`.
    #[error("the new CA fingerprint does not match the certificate in the receipt")]
    FingerprintMismatch,
    /// The new CA certificate is not marked as a CA.
    #[error("the new CA certificate in the receipt is not a CA certificate")]
    NotCa,
    /// The new CA's key is not one receipts are signed with.
    #[error("the new CA certificate in the receipt does not have an ECDSA P-256 key")]
    NotP256,
    /// The signature does not match the receipt and the new CA's key.
    #[error(
        "the receipt's signature does not match: it was changed after it was signed, \
         or not signed by the new CA it names"
    )]
    BadSignature,
    /// The private key given to [`sign`] is not a PKCS#8 ECDSA P-256 key.
    #[error("the CA private key cannot be used: {reason}")]
    BadKey { reason: String },
    /// The private key given to [`sign`] is not the new CA certificate's.
    #[error("the CA private key does not belong to the new CA certificate in the receipt")]
    KeyMismatch,
    /// The signature could not be made.
    #[error("signing the receipt failed")]
    SigningFailed,
}

/// The file as written: the receipt, then its signature.
#[derive(Serialize)]
struct SignedRef<'a> {
    receipt: &'a Receipt,
    signature: &'a str,
}

/// The file as read.
#[derive(Deserialize)]
struct Signed {
    receipt: Receipt,
    signature: String,
}

/// Signs `receipt` with the new CA's private key (PKCS#8 DER) and returns the
/// complete file text, final newline included.
///
/// The receipt is checked as [`verify`] will check it first (format, new CA
/// fingerprint, a P-256 CA certificate whose key `ca_key_pkcs8_der` is), so
/// that the hub never hands out a receipt that cannot verify.
pub fn sign(receipt: &Receipt, ca_key_pkcs8_der: &[u8]) -> Result<String, ReceiptError> {
    check_format(receipt)?;
    let ca_point = new_ca_point(receipt)?;
    let rng = SystemRandom::new();
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, ca_key_pkcs8_der, &rng)
        .map_err(|e| ReceiptError::BadKey {
            reason: e.to_string(),
        })?;
    if key.public_key().as_ref() != ca_point.as_slice() {
        return Err(ReceiptError::KeyMismatch);
    }
    let signature = key
        .sign(&rng, &signed_message(receipt))
        .map_err(|_| ReceiptError::SigningFailed)?;
    Ok(file_text(receipt, &hex::encode(signature.as_ref())))
}

/// Checks a receipt file and returns the receipt in it.
///
/// The file must be exactly what [`sign`] wrote, its format this one, its new
/// CA fingerprint that of the P-256 CA certificate inside it, and its
/// signature made by that certificate's key.
pub fn verify(file: &[u8]) -> Result<Receipt, ReceiptError> {
    let signed: Signed = serde_json::from_slice(file).map_err(ReceiptError::Malformed)?;
    let receipt = signed.receipt;
    check_format(&receipt)?;
    let signature = hex::decode(&signed.signature).map_err(|_| ReceiptError::SignatureNotHex)?;
    // Re-encoding the signature too refuses upper-case hex, which would
    // decode to the same signature from different bytes.
    if file_text(&receipt, &hex::encode(&signature)).as_bytes() != file {
        return Err(ReceiptError::NotCanonical);
    }
    let ca_point = new_ca_point(&receipt)?;
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &ca_point)
        .verify(&signed_message(&receipt), &signature)
        .map_err(|_| ReceiptError::BadSignature)?;
    Ok(receipt)
}

/// SHA-256 of `der`, lowercase hex: how receipts name a CA certificate.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, der))
}

fn check_format(receipt: &Receipt) -> Result<(), ReceiptError> {
    if receipt.format == FORMAT {
        Ok(())
    } else {
        Err(ReceiptError::UnknownFormat {
            found: receipt.format.clone(),
        })
    }
}

/// The compact JSON of `receipt`.
fn canonical(receipt: &Receipt) -> String {
    // Strings, integers, a map with string keys and lists of strings: nothing
    // in a receipt can fail to serialize.
    serde_json::to_string(receipt).expect("a receipt always serializes")
}

/// What the signature is over: [`DOMAIN`], then the receipt's compact JSON.
fn signed_message(receipt: &Receipt) -> Vec<u8> {
    let json = canonical(receipt);
    let mut message = Vec::with_capacity(DOMAIN.len() + json.len());
    message.extend_from_slice(DOMAIN);
    message.extend_from_slice(json.as_bytes());
    message
}

/// The whole file for `receipt` and its hex `signature`.
fn file_text(receipt: &Receipt, signature: &str) -> String {
    let mut text = serde_json::to_string(&SignedRef { receipt, signature })
        .expect("a receipt and a string always serialize");
    text.push('\n');
    text
}

/// Checks the new CA certificate against the receipt's fingerprint and
/// returns its public key as an uncompressed P-256 point.
fn new_ca_point(receipt: &Receipt) -> Result<Vec<u8>, ReceiptError> {
    let bad = |reason: &str| ReceiptError::BadCertificate {
        reason: reason.to_owned(),
    };
    let (rest, pem) = x509_parser::pem::parse_x509_pem(receipt.new_ca_pem.as_bytes())
        .map_err(|_| bad("it is not a PEM certificate"))?;
    if pem.label != "CERTIFICATE" {
        return Err(bad("it is not a PEM certificate"));
    }
    if !rest.iter().all(u8::is_ascii_whitespace) {
        return Err(bad("there is more than one PEM block"));
    }
    if fingerprint(&pem.contents) != receipt.new_ca_fingerprint {
        return Err(ReceiptError::FingerprintMismatch);
    }
    let (rest, cert) = X509Certificate::from_der(&pem.contents)
        .map_err(|e| bad(&format!("it is not an X.509 certificate ({e})")))?;
    if !rest.is_empty() {
        return Err(bad("there are bytes after the certificate"));
    }
    let is_ca = cert
        .basic_constraints()
        .map_err(|e| bad(&format!("its basicConstraints cannot be read ({e})")))?
        .is_some_and(|bc| bc.value.ca);
    if !is_ca {
        return Err(ReceiptError::NotCa);
    }
    let spki = cert.public_key();
    let is_p256 = spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY
        && spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .is_some_and(|curve| curve == OID_EC_P256);
    let point = &spki.subject_public_key;
    if !is_p256
        || point.unused_bits != 0
        || point.data.len() != P256_POINT_LEN
        || point.data.first() != Some(&0x04)
    {
        return Err(ReceiptError::NotP256);
    }
    Ok(point.data.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, PKCS_ECDSA_P256_SHA256};

    /// A self-signed P-256 certificate (a CA if `ca`) and its PKCS#8 key.
    fn cert(ca: bool) -> (String, Vec<u8>, Vec<u8>) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = if ca {
            IsCa::Ca(BasicConstraints::Constrained(0))
        } else {
            IsCa::ExplicitNoCa
        };
        let cert = params.self_signed(&key).expect("self-signed");
        (cert.pem(), cert.der().to_vec(), key.serialize_der())
    }

    fn receipt(ca_pem: &str, ca_der: &[u8]) -> Receipt {
        Receipt {
            format: FORMAT.to_owned(),
            hub: "home".to_owned(),
            started_at: "2026-11-22T10:00:00Z".to_owned(),
            finished_at: "2026-11-22T10:00:03Z".to_owned(),
            old_ca_fingerprint: fingerprint(b"the old ca"),
            new_ca_fingerprint: fingerprint(ca_der),
            destroyed: [("devices", 2), ("events", 5300), ("rules", 1)]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            devices_acknowledged: vec!["a1".to_owned()],
            devices_not_acknowledged: vec!["b2".to_owned()],
            new_ca_pem: ca_pem.to_owned(),
        }
    }

    fn signed() -> (Receipt, String) {
        let (pem, der, key) = cert(true);
        let receipt = receipt(&pem, &der);
        let text = sign(&receipt, &key).expect("signs");
        (receipt, text)
    }

    #[test]
    fn a_signed_receipt_verifies_and_round_trips() {
        let (receipt, text) = signed();
        assert_eq!(verify(text.as_bytes()).expect("verifies"), receipt);
        // The file is one line: the canonical JSON and a newline.
        assert_eq!(text.matches('\n').count(), 1);
        assert!(text.ends_with("}\n"));
        let prefix = format!(
            "{{\"receipt\":{{\"format\":\"{FORMAT}\",\"hub\":\"home\",\
             \"started_at\":\"2026-11-22T10:00:00Z\",\"finished_at\":\"2026-11-22T10:00:03Z\",\
             \"old_ca_fingerprint\":\"{}\",\"new_ca_fingerprint\":\"{}\",\
             \"destroyed\":{{\"devices\":2,\"events\":5300,\"rules\":1}},\
             \"devices_acknowledged\":[\"a1\"],\"devices_not_acknowledged\":[\"b2\"],\
             \"new_ca_pem\":",
            receipt.old_ca_fingerprint, receipt.new_ca_fingerprint
        );
        assert!(text.starts_with(&prefix), "{text}");
    }

    #[test]
    fn the_signature_is_over_the_domain_and_the_receipt_json() {
        let (receipt, text) = signed();
        let value: serde_json::Value = serde_json::from_str(&text).expect("json");
        let signature = hex::decode(value["signature"].as_str().expect("a string")).expect("hex");
        let mut message = b"hubd-wipe-receipt/1\n".to_vec();
        message.extend_from_slice(serde_json::to_string(&receipt).expect("json").as_bytes());
        let (_, der) =
            x509_parser::pem::parse_x509_pem(receipt.new_ca_pem.as_bytes()).expect("pem");
        let (_, cert) = X509Certificate::from_der(&der.contents).expect("cert");
        UnparsedPublicKey::new(
            &ECDSA_P256_SHA256_ASN1,
            cert.public_key().subject_public_key.data.as_ref(),
        )
        .verify(&message, &signature)
        .expect("the signature is over DOMAIN and the receipt's compact json");
    }

    #[test]
    fn every_changed_byte_fails() {
        let (_, text) = signed();
        let bytes = text.as_bytes();
        for i in 0..bytes.len() {
            // A low bit, the case bit (hex digits, JSON keywords) and the high
            // bit (invalid UTF-8) in turn.
            for mask in [0x01, 0x20, 0x80] {
                let mut changed = bytes.to_vec();
                changed[i] ^= mask;
                assert!(
                    verify(&changed).is_err(),
                    "byte {i} ({:?}) ^ {mask:#04x} still verifies",
                    char::from(bytes[i])
                );
            }
            let mut removed = bytes.to_vec();
            removed.remove(i);
            assert!(verify(&removed).is_err(), "without byte {i}");
            let mut inserted = bytes.to_vec();
            inserted.insert(i, b' ');
            assert!(verify(&inserted).is_err(), "a space before byte {i}");
        }
        for suffix in ["\n", " ", "\r\n"] {
            let longer = format!("{text}{suffix}");
            assert!(verify(longer.as_bytes()).is_err(), "{suffix:?} appended");
        }
        let crlf = text.replace('\n', "\r\n");
        assert!(verify(crlf.as_bytes()).is_err(), "crlf");
    }

    #[test]
    fn a_changed_field_is_caught_by_the_signature() {
        let (receipt, text) = signed();
        let mut changed = receipt.clone();
        changed.destroyed.insert("devices".to_owned(), 3);
        // Written exactly as the hub would, so that only the signature can tell.
        let forged = text.replace(&canonical(&receipt), &canonical(&changed));
        assert_ne!(forged, text);
        assert!(matches!(
            verify(forged.as_bytes()),
            Err(ReceiptError::BadSignature)
        ));
    }

    #[test]
    fn whitespace_and_upper_case_signatures_are_not_canonical() {
        let (_, text) = signed();
        let spaced = text.replacen("\"hub\":", "\"hub\": ", 1);
        assert!(matches!(
            verify(spaced.as_bytes()),
            Err(ReceiptError::NotCanonical)
        ));
        let value: serde_json::Value = serde_json::from_str(&text).expect("json");
        let signature = value["signature"].as_str().expect("a string");
        let upper = text.replace(signature, &signature.to_uppercase());
        assert!(matches!(
            verify(upper.as_bytes()),
            Err(ReceiptError::NotCanonical)
        ));
        let no_newline = text.trim_end();
        assert!(matches!(
            verify(no_newline.as_bytes()),
            Err(ReceiptError::NotCanonical)
        ));
    }

    #[test]
    fn a_receipt_signed_by_another_key_fails() {
        let (pem, der, _) = cert(true);
        let (other_pem, other_der, other_key) = cert(true);
        // Signed by the other CA, then given this CA's certificate and
        // fingerprint, as a forger without this CA's key would have to.
        let text = sign(&receipt(&other_pem, &other_der), &other_key).expect("signs");
        let swapped = text
            .replace(&fingerprint(&other_der), &fingerprint(&der))
            .replace(
                &serde_json::to_string(&other_pem).expect("json"),
                &serde_json::to_string(&pem).expect("json"),
            );
        assert!(matches!(
            verify(swapped.as_bytes()),
            Err(ReceiptError::BadSignature)
        ));
        // The hub itself refuses to sign with a key that is not the new CA's.
        assert!(matches!(
            sign(&receipt(&pem, &der), &other_key),
            Err(ReceiptError::KeyMismatch)
        ));
    }

    #[test]
    fn a_fingerprint_mismatch_fails() {
        let (pem, der, key) = cert(true);
        let mut wrong = receipt(&pem, &der);
        wrong.new_ca_fingerprint = fingerprint(b"another certificate");
        assert!(matches!(
            sign(&wrong, &key),
            Err(ReceiptError::FingerprintMismatch)
        ));
        // Signed correctly, then the fingerprint replaced: caught before the
        // signature is even looked at.
        let text = sign(&receipt(&pem, &der), &key).expect("signs");
        let changed = text.replace(&fingerprint(&der), &wrong.new_ca_fingerprint);
        assert!(matches!(
            verify(changed.as_bytes()),
            Err(ReceiptError::FingerprintMismatch)
        ));
        let e = verify(changed.as_bytes()).expect_err("mismatch");
        assert_eq!(
            e.to_string(),
            "the new CA fingerprint does not match the certificate in the receipt"
        );
    }

    #[test]
    fn the_new_ca_must_be_a_p256_ca() {
        let (pem, der, key) = cert(false);
        assert!(matches!(
            sign(&receipt(&pem, &der), &key),
            Err(ReceiptError::NotCa)
        ));
        let (pem, der, _) = cert(true);
        let mut r = receipt(&pem, &der);
        r.new_ca_pem = "not a certificate".to_owned();
        assert!(matches!(
            sign(&r, &[]),
            Err(ReceiptError::BadCertificate { .. })
        ));
    }

    #[test]
    fn other_formats_and_bad_keys_are_refused() {
        let (pem, der, key) = cert(true);
        let mut r = receipt(&pem, &der);
        r.format = "hubd-wipe-receipt/2".to_owned();
        let e = sign(&r, &key).expect_err("format");
        assert_eq!(
            e.to_string(),
            "not a hubd wipe receipt: its format is \"hubd-wipe-receipt/2\", \
             expected \"hubd-wipe-receipt/1\""
        );
        assert!(matches!(
            sign(&receipt(&pem, &der), b"not a key"),
            Err(ReceiptError::BadKey { .. })
        ));
    }

    #[test]
    fn garbage_fails_without_panicking() {
        let (_, text) = signed();
        let bytes = text.as_bytes();
        let inputs: Vec<Vec<u8>> = vec![
            Vec::new(),
            b"\n".to_vec(),
            b"null\n".to_vec(),
            b"{}\n".to_vec(),
            b"{\"receipt\":1,\"signature\":\"\"}\n".to_vec(),
            vec![0xff; 64],
            b"-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n".to_vec(),
            bytes[..bytes.len() / 2].to_vec(),
            bytes.iter().rev().copied().collect(),
        ];
        for input in inputs {
            assert!(
                verify(&input).is_err(),
                "{:?}",
                String::from_utf8_lossy(&input)
            );
        }
        // Every prefix of a real receipt, the empty one included.
        for end in 0..bytes.len() {
            assert!(verify(&bytes[..end]).is_err(), "prefix of {end} bytes");
        }
    }
}
