//! The signature rule (DESIGN §5): the canonical string (every field but `sign`, empties
//! dropped, keys in ASCII order, raw `k=v` joined by `&`), RSA signing and verification with
//! OpenSSL, and the refusal of values that would make two field sets sign alike.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use openssl::hash::MessageDigest;
use openssl::pkey::{PKeyRef, Private, Public};
use openssl::rsa::Padding;
use openssl::sign::{Signer, Verifier};
use rand::Rng;
use rand::distr::Alphanumeric;
use serde_json::{Map, Value};

use crate::config::SignType;

use super::*;

/// The string to sign (DESIGN §5): every field except `sign`, empty values dropped, keys sorted
/// by ASCII byte order, `k=v` joined with `&`, raw values (no URL-encoding).
///
/// Nulls have no `&str` form; callers holding JSON drop them before (as [`ResponseFields`] and
/// [`signed_json`] do).
pub fn canonical_string<K: AsRef<str>, V: AsRef<str>>(fields: &[(K, V)]) -> String {
    let mut kept: Vec<(&str, &str)> = fields
        .iter()
        .map(|(k, v)| (k.as_ref(), v.as_ref()))
        .filter(|(k, v)| *k != SIGN_FIELD && !v.is_empty())
        .collect();
    // `str` orders by bytes, which for these keys is ASCII order; stable so that equal keys
    // (impossible in a verified response, see `ResponseFields::parse`) keep their order.
    kept.sort_by(|a, b| a.0.cmp(b.0));
    let mut out = String::new();
    for (i, (k, v)) in kept.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    out
}

/// Why a body was not signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// OpenSSL failed (a key that cannot sign, an allocation failure).
    #[error("signing failed: {0}")]
    Openssl(#[from] openssl::error::ErrorStack),
    /// A field would make the string to sign ambiguous (see [`is_ambiguous`]).
    #[error(
        "refusing to sign: field `{field}` contains `&` or `=`, so another set of fields could \
         sign alike"
    )]
    Ambiguous { field: String },
}

/// Whether a key or value would make the string to sign ambiguous. Values are joined raw as
/// `k=v&…`, so `refundDesc` = `a=1&refundFee=1` signs exactly like `refundDesc` = `a` plus a
/// second field `refundFee` = `1`: the platform could not tell which one we signed.
pub fn is_ambiguous(text: &str) -> bool {
    text.contains(['&', '='])
}

pub(super) fn digest(sign_type: SignType) -> MessageDigest {
    match sign_type {
        SignType::Rsa => MessageDigest::sha1(),
        SignType::Rsa2 => MessageDigest::sha256(),
    }
}

/// Signs `canonical` with PKCS#1 v1.5 (SHA1 for `RSA`, SHA256 for `RSA2`), base64 standard.
/// Deterministic: the same key and text always give the same signature.
pub fn sign(
    key: &PKeyRef<Private>,
    sign_type: SignType,
    canonical: &str,
) -> Result<String, SignError> {
    let mut signer = Signer::new(digest(sign_type), key)?;
    signer.set_rsa_padding(Padding::PKCS1)?;
    signer.update(canonical.as_bytes())?;
    Ok(STANDARD.encode(signer.sign_to_vec()?))
}

/// Whether `signature_b64` is a valid signature of `canonical` by `key`. Anything malformed
/// (bad base64, wrong length, OpenSSL error) is simply "does not verify".
pub fn verify(
    key: &PKeyRef<Public>,
    sign_type: SignType,
    canonical: &str,
    signature_b64: &str,
) -> bool {
    // Some gateways wrap long base64 values; whitespace is never part of a signature.
    let compact: String = signature_b64
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let Ok(signature) = STANDARD.decode(compact.as_bytes()) else {
        return false;
    };
    let check = || -> Result<bool, openssl::error::ErrorStack> {
        let mut verifier = Verifier::new(digest(sign_type), key)?;
        verifier.set_rsa_padding(Padding::PKCS1)?;
        verifier.update(canonical.as_bytes())?;
        verifier.verify(&signature)
    };
    check().unwrap_or(false)
}

/// A signed JSON body and the same body with the signature redacted (for the attempt record).
#[derive(Clone, PartialEq, Eq)]
pub struct SignedJson {
    pub body: String,
    pub redacted: String,
}

impl fmt::Debug for SignedJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The body holds the signature; Debug shows only the redacted form.
        f.debug_struct("SignedJson")
            .field("redacted", &self.redacted)
            .finish_non_exhaustive()
    }
}

/// The signing text of one JSON value: strings unquoted, null and "" dropped, anything else as
/// the compact JSON text `serde_json` writes for it (which is what the body will contain).
pub(super) fn value_text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) if s.is_empty() => None,
        Value::String(s) => Some(s.clone()),
        other => serde_json::to_string(other).ok(),
    }
}

/// Signs a flat JSON object the ShengPay way and returns the body with `sign` added (any `sign`
/// already present is replaced). Used for our requests (and by tests, for responses).
///
/// Refuses a key or value containing `&` or `=`. Intake already rejects such requests
/// ([`signable`]) and merchant values are checked when the client is built; this is the last
/// line, so that a path that skipped those checks still never sends an ambiguous signature.
pub fn signed_json(
    mut fields: Map<String, Value>,
    key: &PKeyRef<Private>,
    sign_type: SignType,
) -> Result<SignedJson, SignError> {
    fields.remove(SIGN_FIELD);
    let pairs: Vec<(String, String)> = fields
        .iter()
        .filter_map(|(k, v)| value_text(v).map(|t| (k.clone(), t)))
        .collect();
    if let Some((k, _)) = pairs
        .iter()
        .find(|(k, v)| is_ambiguous(k) || is_ambiguous(v))
    {
        return Err(SignError::Ambiguous { field: k.clone() });
    }
    let signature = sign(key, sign_type, &canonical_string(&pairs))?;
    fields.insert(SIGN_FIELD.to_owned(), Value::String(REDACTED.to_owned()));
    let redacted = Value::Object(fields.clone()).to_string();
    fields.insert(SIGN_FIELD.to_owned(), Value::String(signature));
    Ok(SignedJson {
        body: Value::Object(fields).to_string(),
        redacted,
    })
}

/// A fresh `nonceStr`: 32 random ASCII alphanumerics.
pub fn new_nonce() -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(NONCE_LEN)
        .map(char::from)
        .collect()
}
