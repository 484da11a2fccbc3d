//! The ShengPay string to sign and the RSA signature over it.
//!
//! Kept apart because both directions depend on it byte for byte: our requests are signed here
//! and the platform's answers are verified against the same [`canonical_string`]. A signature
//! is only as good as the string under it, so this is also where a value that would make two
//! different field sets sign alike (`&` or `=` in a value) is refused, whichever path built the
//! fields.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use openssl::hash::MessageDigest;
use openssl::pkey::{PKeyRef, Private, Public};
use openssl::rsa::Padding;
use openssl::sign::{Signer, Verifier};
use serde_json::{Map, Value};

use crate::config::SignType;

/// The field that carries the signature; it is never part of the string to sign.
pub const SIGN_FIELD: &str = "sign";
/// What replaces the signature in the recorded request.
pub const REDACTED: &str = "***";

/// The string to sign (DESIGN §5): every field except `sign`, empty values dropped, keys sorted
/// by ASCII byte order, `k=v` joined with `&`, raw values (no URL-encoding).
///
/// Nulls have no `&str` form; callers holding JSON drop them before (as [`ResponseFields`] and
/// [`signed_json`] do).
///
/// [`ResponseFields`]: super::ResponseFields
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

fn digest(sign_type: SignType) -> MessageDigest {
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
///
/// [`signable`]: super::signable
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

#[cfg(test)]
mod tests {

    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::provider::shengpay::response::{ResponseFields, verify_body};
    use crate::provider::shengpay::test_support::*;

    const SEED_CANONICAL: &str = "appId=djgeiq978y933&mchId=93751497&nonceStr=ZmTruYz2Tld2hIRRg4Nf&notifyUrl=https://openapi2.lx-qa.com/pay/callback/v2/refund&outRefundNo=202105080000000488560&outTradeNo=202105080000000488560&refundFee=100&signType=RSA&totalFee=100";

    const SEED_REQUEST: &str = r#"{
    "appId":"djgeiq978y933",
    "mchId":"93751497",
    "nonceStr":"ZmTruYz2Tld2hIRRg4Nf",
    "notifyUrl":"https://openapi2.lx-qa.com/pay/callback/v2/refund",
    "outRefundNo":"202105080000000488560",
    "outTradeNo":"202105080000000488560",
    "refundFee":100,
    "sign":"LbSLSAj7i7YwqAOzTnVRatCyp/SWSqiNiIXUzpLN4fF7ypsCq9K3a2I+l2fTYgqDQPcTF4AOsmy5XveYnMzp5qlASasAkPH2W+KhTmStWfu6UKb05jzJR4/WyQr0BD3gzgvEP22T9BRJUiZIpx6W5dfYE1NBc6ES3SFiHXiGV2AgPZqh6w6E3rctLP1fZP/n752pk3/KP9mtaXmzm/UE2RrCMJj/1Ubg1vdWkNe0GKztl5gX5GEcWITXBnfA8Kj0ovJI1xtfGXHfHgSLnk4dmC33xGO7w3pMbA+ZlI+mOIuuVuv667vYt5bs+AwzWk+b9TyeG6Zs3gz1GZp7S4ySWw==",
    "signType":"RSA",
    "totalFee":100
}"#;

    // --- string to sign and signatures -------------------------------------------------------

    #[test]
    fn seed_request_example_gives_the_design_canonical_string() {
        let fields = ResponseFields::parse(SEED_REQUEST.as_bytes()).unwrap();
        assert_eq!(fields.canonical(), SEED_CANONICAL);
        assert_eq!(fixture("seed_request_canonical.txt"), SEED_CANONICAL);
        let pairs = [
            ("totalFee", "100"),
            ("signType", "RSA"),
            ("sign", "ignored"),
            ("refundFee", "100"),
            ("refundDesc", ""),
            ("outTradeNo", "202105080000000488560"),
            ("outRefundNo", "202105080000000488560"),
            (
                "notifyUrl",
                "https://openapi2.lx-qa.com/pay/callback/v2/refund",
            ),
            ("nonceStr", "ZmTruYz2Tld2hIRRg4Nf"),
            ("mchId", "93751497"),
            ("appId", "djgeiq978y933"),
        ];
        assert_eq!(canonical_string(&pairs), SEED_CANONICAL);
    }

    #[test]
    fn seed_request_fields_built_by_us_give_the_design_canonical_string() {
        let Value::Object(fields) = serde_json::from_str::<Value>(SEED_REQUEST).unwrap() else {
            unreachable!()
        };
        let signed = signed_json(fields, &merchant_private(), SignType::Rsa).unwrap();
        let back = ResponseFields::parse(signed.body.as_bytes()).unwrap();
        assert_eq!(back.canonical(), SEED_CANONICAL);
        assert!(back.verify(&merchant_public(), SignType::Rsa).is_ok());
    }

    #[test]
    fn canonical_string_sorts_by_ascii_bytes_and_does_not_url_encode() {
        let pairs = [
            ("b", "x y&z"),
            ("B", "1"),
            ("a_", "2"),
            ("aZ", "3"),
            ("empty", ""),
        ];
        assert_eq!(canonical_string(&pairs), "B=1&aZ=3&a_=2&b=x y&z");
    }

    fn cli_signature_case(sign_type: SignType, sig_file: &str) {
        let cli = fixture(sig_file);
        let canonical = fixture("seed_request_canonical.txt");
        assert!(verify(
            &merchant_public(),
            sign_type,
            &canonical,
            cli.trim()
        ));
        let ours = sign(&merchant_private(), sign_type, &canonical).unwrap();
        assert_eq!(ours, cli.trim(), "PKCS#1 v1.5 is deterministic");
        let other = match sign_type {
            SignType::Rsa => SignType::Rsa2,
            SignType::Rsa2 => SignType::Rsa,
        };
        assert!(!verify(&merchant_public(), other, &canonical, cli.trim()));
        assert!(!verify(
            &merchant_public(),
            sign_type,
            &format!("{canonical}&x=1"),
            cli.trim()
        ));
    }

    #[test]
    fn openssl_cli_sha1_signature_of_the_seed_string_verifies_and_equals_ours() {
        cli_signature_case(SignType::Rsa, "seed_request_canonical.sha1withrsa.sig");
    }

    #[test]
    fn openssl_cli_sha256_signature_of_the_seed_string_verifies_and_equals_ours() {
        cli_signature_case(SignType::Rsa2, "seed_request_canonical.sha256withrsa.sig");
    }

    #[test]
    fn rsa_crate_and_openssl_signatures_verify_each_other_for_rsa_and_rsa2() {
        use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey};
        use rsa::{Pkcs1v15Sign, RsaPrivateKey, RsaPublicKey};
        use sha1::Digest as _;

        let private =
            RsaPrivateKey::from_pkcs8_pem(&fixture("merchant_private_pkcs8.pem")).unwrap();
        let public =
            RsaPublicKey::from_public_key_pem(&fixture("merchant_public_spki.pem")).unwrap();
        let msg = SEED_CANONICAL.as_bytes();
        for sign_type in [SignType::Rsa, SignType::Rsa2] {
            let (scheme, hashed) = match sign_type {
                SignType::Rsa => (
                    Pkcs1v15Sign::new::<sha1::Sha1>(),
                    sha1::Sha1::digest(msg).to_vec(),
                ),
                SignType::Rsa2 => (
                    Pkcs1v15Sign::new::<sha2::Sha256>(),
                    sha2::Sha256::digest(msg).to_vec(),
                ),
            };
            let theirs = private.sign(scheme.clone(), &hashed).unwrap();
            let theirs_b64 = STANDARD.encode(&theirs);
            assert!(verify(
                &merchant_public(),
                sign_type,
                SEED_CANONICAL,
                &theirs_b64
            ));
            let ours = sign(&merchant_private(), sign_type, SEED_CANONICAL).unwrap();
            let ours_bytes = STANDARD.decode(&ours).unwrap();
            assert!(public.verify(scheme, &hashed, &ours_bytes).is_ok());
            assert_eq!(ours, theirs_b64);
        }
    }

    #[test]
    fn garbage_signatures_simply_do_not_verify() {
        let key = merchant_public();
        for s in ["", "!!!", "AAAA", "not base64 at all", &"A".repeat(344)] {
            assert!(!verify(&key, SignType::Rsa, SEED_CANONICAL, s), "{s}");
        }
    }

    #[test]
    fn the_signer_refuses_a_value_with_ampersand_or_equals_and_the_refund_is_not_sent() {
        let c = client("http://127.0.0.1:9", SignType::Rsa);
        let req = request(Some("a=1&refundFee=1"), None);
        let e = c
            .build_request(&req)
            .expect_err("the signer must refuse an ambiguous value");
        assert!(e.to_string().contains("refundDesc"), "{e}");
    }

    proptest! {
        #[test]
        fn anything_we_sign_verifies_through_the_raw_text_path(
            entries in proptest::collection::btree_map(
                "[a-zA-Z]{1,10}",
                prop_oneof![
                    any::<String>().prop_map(Value::String),
                    any::<i64>().prop_map(Value::from),
                    Just(Value::Null),
                    Just(json!({"n": [1, "two", null]})),
                ],
                0..10,
            )
        ) {
            let m: Map<String, Value> = entries.into_iter().collect();
            let ambiguous = m.values().filter_map(value_text).any(|t| is_ambiguous(&t));
            match signed_json(m, &platform_private(), SignType::Rsa2) {
                Ok(signed) => {
                    prop_assert!(!ambiguous);
                    prop_assert!(verify_body(signed.body.as_bytes(), &platform_public(), SignType::Rsa2).is_ok());
                }
                Err(e) => prop_assert!(ambiguous && matches!(e, SignError::Ambiguous { .. }), "{e}"),
            }
        }
    }
}
