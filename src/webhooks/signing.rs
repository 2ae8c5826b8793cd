//! The webhook signature schemes (README, "Webhooks").
//!
//! Every delivery attempt is signed the Standard Webhooks way
//! (<https://www.standardwebhooks.com/>), which receivers have libraries for:
//!
//! - `webhook-id: <the delivery's idempotency key>` (see [`webhook_id`])
//! - `webhook-timestamp: <unix seconds when this attempt was sent>`
//! - `webhook-signature: v1,<base64(HMAC-SHA256(key, "<id>.<timestamp>.<body>"))>`
//!
//! The key is what the libraries make of the secret: a `whsec_<base64>`
//! secret (or any base64 text) is decoded; a secret that is not base64 is
//! used as its raw bytes, as the libraries' raw-key option does
//! ([`signing_key`]). Secrets generated before this scheme
//! (`whsec_<64 hex digits>`) are base64 text, so they keep working as given.
//!
//! The earlier stockd scheme is still sent beside it, for receivers written
//! against it, until they move over: see [`legacy`].

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The prefix that marks a Standard Webhooks symmetric secret.
pub const SECRET_PREFIX: &str = "whsec_";
/// The signature scheme's version (Standard Webhooks' symmetric scheme).
pub const VERSION: &str = "v1";

pub const ID_HEADER: &str = "webhook-id";
pub const TIMESTAMP_HEADER: &str = "webhook-timestamp";
pub const SIGNATURE_HEADER: &str = "webhook-signature";
/// The same value as `webhook-id`, under the name receivers used before.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";
pub const EVENT_HEADER: &str = "stockd-event";
pub const DELIVERY_HEADER: &str = "stockd-delivery";
pub const ATTEMPT_HEADER: &str = "stockd-attempt";

/// The HMAC key of `secret`, as the Standard Webhooks libraries derive it:
/// without its `whsec_` prefix, base64-decoded; a secret that does not
/// decode (one chosen before this scheme, such as `own-secret-0123`) is
/// the key as it is, bytes for bytes (the libraries' raw-key option).
pub fn signing_key(secret: &str) -> Vec<u8> {
    let encoded = secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret);
    match BASE64.decode(encoded) {
        Ok(key) if !key.is_empty() => key,
        _ => secret.as_bytes().to_vec(),
    }
}

/// The `webhook-id` of a delivery: its idempotency key, percent-encoded
/// where it has `%`, `.` (the signed content is dot-separated, so an id
/// must not contain one) or a byte that is not visible ASCII (a header
/// value must be). Keys of SKUs and locations without those are unchanged.
pub fn webhook_id(idempotency_key: &str) -> String {
    let mut id = String::with_capacity(idempotency_key.len());
    for byte in idempotency_key.bytes() {
        match byte {
            b'%' | b'.' => id.push_str(&format!("%{byte:02X}")),
            0x21..=0x7e => id.push(char::from(byte)),
            _ => id.push_str(&format!("%{byte:02X}")),
        }
    }
    id
}

fn mac(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The `webhook-signature` header value for `body` with `id`, sent at
/// `timestamp`, signed with `secret`.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> String {
    let digest = mac(&signing_key(secret), id, timestamp, body)
        .finalize()
        .into_bytes();
    format!("{VERSION},{}", BASE64.encode(digest))
}

/// Why a delivery's signature was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the timestamp is not an integer")]
    BadTimestamp,
    #[error("the timestamp is {0} s away from now, more than the tolerance")]
    Stale(i64),
    #[error("no v1 signature")]
    NoSignature,
    #[error("the signature does not match")]
    Mismatch,
}

fn parse_timestamp(header: &str, now_secs: i64, tolerance_secs: i64) -> Result<i64, VerifyError> {
    let timestamp: i64 = header
        .trim()
        .parse()
        .map_err(|_| VerifyError::BadTimestamp)?;
    let skew = (now_secs - timestamp).abs();
    if skew > tolerance_secs {
        return Err(VerifyError::Stale(skew));
    }
    Ok(timestamp)
}

/// Checks a delivery as a receiver's Standard Webhooks library does: the
/// timestamp within `tolerance_secs` of `now_secs`, and one of the
/// space-separated `v1,<base64>` signatures matching (several may be sent
/// while a secret is rotated), compared in constant time.
pub fn verify(
    secret: &str,
    id_header: &str,
    timestamp_header: &str,
    signature_header: &str,
    body: &[u8],
    now_secs: i64,
    tolerance_secs: i64,
) -> Result<(), VerifyError> {
    let timestamp = parse_timestamp(timestamp_header, now_secs, tolerance_secs)?;
    let candidates = signature_header
        .split(' ')
        .filter_map(|part| part.split_once(','))
        .filter(|(version, _)| *version == VERSION)
        .map(|(_, encoded)| BASE64.decode(encoded).ok());
    match_any(
        candidates,
        mac(&signing_key(secret), id_header, timestamp, body),
    )
}

/// Ok when one of the `candidates` (None: one that did not decode) is
/// `expected`'s signature, compared in constant time.
fn match_any(
    candidates: impl Iterator<Item = Option<Vec<u8>>>,
    expected: HmacSha256,
) -> Result<(), VerifyError> {
    let mut any = false;
    for candidate in candidates {
        any = true;
        if let Some(signature) = candidate
            && expected.clone().verify_slice(&signature).is_ok()
        {
            return Ok(());
        }
    }
    Err(if any {
        VerifyError::Mismatch
    } else {
        VerifyError::NoSignature
    })
}

/// The scheme stockd signed with before it adopted Standard Webhooks, still
/// sent beside it so that receivers written against it go on working:
///
/// - `stockd-timestamp: <unix seconds when this attempt was sent>`
/// - `stockd-signature: v1=<hex(HMAC-SHA256(secret, "<timestamp>.<body>"))>`
///
/// keyed with the secret's bytes as they are (`whsec_` prefix included).
/// Deprecated: it does not sign the delivery's id; verify `webhook-signature`.
pub mod legacy {
    use super::{HmacSha256, KeyInit, Mac, VerifyError, match_any, parse_timestamp};

    pub const TIMESTAMP_HEADER: &str = "stockd-timestamp";
    pub const SIGNATURE_HEADER: &str = "stockd-signature";

    fn mac(secret: &[u8], timestamp: i64, body: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// The `stockd-signature` header value for `body` sent at `timestamp`.
    pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
        let digest = mac(secret, timestamp, body).finalize().into_bytes();
        format!("v1={}", hex::encode(digest))
    }

    /// Checks a delivery as a receiver of the old scheme would: the
    /// timestamp within `tolerance_secs` of `now_secs`, and one of the
    /// comma-separated `v1=` signatures matching.
    pub fn verify(
        secret: &[u8],
        timestamp_header: &str,
        signature_header: &str,
        body: &[u8],
        now_secs: i64,
        tolerance_secs: i64,
    ) -> Result<(), VerifyError> {
        let timestamp = parse_timestamp(timestamp_header, now_secs, tolerance_secs)?;
        let candidates = signature_header
            .split(',')
            .filter_map(|part| part.trim().strip_prefix("v1="))
            .map(|encoded| hex::decode(encoded).ok());
        match_any(candidates, mac(secret, timestamp, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vector of the Standard Webhooks reference libraries
    /// (standard-webhooks/standard-webhooks, libraries/rust/src/lib.rs,
    /// `test_sign`; the same in the other languages).
    #[test]
    fn standard_webhooks_test_vector() {
        let secret = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
        let id = "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk";
        let body = br#"{"email":"test@example.com","username":"test_user"}"#;
        let signature = "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=";
        assert_eq!(sign(secret, id, 1_649_367_553, body), signature);
        assert_eq!(
            verify(
                secret,
                id,
                "1649367553",
                signature,
                body,
                1_649_367_553,
                300
            ),
            Ok(())
        );
        // The same key given without the prefix, as the libraries accept.
        assert_eq!(
            sign("C2FVsBQIhrscChlQIMV+b5sSYspob7oD", id, 1_649_367_553, body),
            signature
        );
    }

    #[test]
    fn keys_are_derived_as_the_libraries_do() {
        assert_eq!(signing_key("whsec_AAEC"), [0, 1, 2]);
        assert_eq!(signing_key("AAEC"), [0, 1, 2]);
        // Secrets that are no base64 sign with their raw bytes.
        assert_eq!(
            signing_key("own-secret-0123456789"),
            b"own-secret-0123456789"
        );
        assert_eq!(signing_key("whsec_not base64!"), b"whsec_not base64!");
        assert_eq!(signing_key("whsec_"), b"whsec_");
        // A secret generated before this scheme (whsec_ + 64 hex digits) is
        // base64 text: 48 bytes of key, as a receiver's library reads it.
        let old = format!("whsec_{}", "0123456789abcdef".repeat(4));
        assert_eq!(signing_key(&old).len(), 48);
        assert_eq!(signing_key(&old), BASE64.decode(&old[6..]).unwrap());
    }

    #[test]
    fn verify_accepts_its_own_and_refuses_tampering() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = br#"{"type":"out_of_stock"}"#;
        let sig = sign(secret, "mug/default/3/out_of_stock/1", 100, body);
        let check = |id: &str, ts: &str, sig: &str, body: &[u8], now: i64| {
            verify(secret, id, ts, sig, body, now, 300)
        };
        let id = "mug/default/3/out_of_stock/1";
        assert_eq!(check(id, "100", &sig, body, 130), Ok(()));
        assert_eq!(
            check(id, "100", &format!("v1,AAAA {sig}"), body, 100),
            Ok(())
        );
        assert_eq!(
            verify(
                "whsec_AAAAAAAAAAAAAAAAAAAAAAAA",
                id,
                "100",
                &sig,
                body,
                100,
                300
            ),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            check("mug/default/4/out_of_stock/1", "100", &sig, body, 100),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            check(id, "101", &sig, body, 100),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            check(id, "100", &sig, b"{}", 100),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            check(id, "100", &sig, body, 1000),
            Err(VerifyError::Stale(900))
        );
        assert_eq!(
            check(id, "x", &sig, body, 100),
            Err(VerifyError::BadTimestamp)
        );
        assert_eq!(
            check(id, "100", "v1a,AAAA v2,AAAA", body, 100),
            Err(VerifyError::NoSignature)
        );
    }

    #[test]
    fn webhook_ids_have_no_dots_and_are_header_safe() {
        assert_eq!(
            webhook_id("mug/default/3/out_of_stock/1"),
            "mug/default/3/out_of_stock/1"
        );
        assert_eq!(
            webhook_id("tasse.é/lager 1/2/low_stock/7"),
            "tasse%2E%C3%A9/lager%201/2/low_stock/7"
        );
        // Distinct keys stay distinct: `%` itself is encoded.
        assert_ne!(webhook_id("a%2Eb"), webhook_id("a.b"));
        assert_eq!(webhook_id("a%2Eb"), "a%252Eb");
    }

    #[test]
    fn legacy_known_vector() {
        // printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac secret
        assert_eq!(
            legacy::sign(b"secret", 1_700_000_000, br#"{"a":1}"#),
            "v1=49f24e537407743fa4a0242bb63b94b9a47ee99cbbe071ccd8a22550ae411686"
        );
    }

    #[test]
    fn legacy_verify_accepts_its_own_and_refuses_tampering() {
        let body = br#"{"type":"out_of_stock"}"#;
        let sig = legacy::sign(b"k", 100, body);
        assert_eq!(legacy::verify(b"k", "100", &sig, body, 130, 300), Ok(()));
        assert_eq!(
            legacy::verify(b"k", "100", &format!("v1=00, {sig}"), body, 100, 300),
            Ok(())
        );
        assert_eq!(
            legacy::verify(b"other", "100", &sig, body, 100, 300),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            legacy::verify(b"k", "100", &sig, body, 1000, 300),
            Err(VerifyError::Stale(900))
        );
        assert_eq!(
            legacy::verify(b"k", "100", "sha256=ab", body, 100, 300),
            Err(VerifyError::NoSignature)
        );
    }
}
