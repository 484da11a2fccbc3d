//! ShengPay's refund API (DESIGN §5, seed `001_9bfea206f3bcf372.txt`): signing, sending,
//! verifying and classifying.
//!
//! This module owns everything ShengPay-specific: the string to sign, RSA signatures
//! (`RSA` = SHA1withRSA, `RSA2` = SHA256withRSA, PKCS#1 v1.5, base64), the request body, the
//! response parser and the mapping of a response to an [`Outcome`]. The worker only sees the
//! [`Provider`] trait.
//!
//! Two rules drive the design. First, a response is verified over each value *as it appears in
//! the JSON text* (`"refundFee":"10"` and `"settlementRefundFee":10` both sign as `…=10`, and
//! `10.0` would sign as `10.0`), so the parser keeps raw text instead of going through
//! `serde_json::Value`, which would re-render numbers. Second, money is never guessed: amounts
//! are whole fen from digits only (never through a float), and an answer that does not verify,
//! does not parse, or does not match what we asked for is "maybe delivered", never a success
//! or a decline (a wrong booking is worse than an operator looking at a job).

mod classify;
mod client;
mod request;
mod response;
mod sign;

pub use classify::*;
pub use client::*;
pub use request::*;
pub use response::*;
pub use sign::*;

/// The refund endpoint, relative to a merchant's `base_url`.
pub const REFUND_PATH: &str = "/api/v1/payment/refund";

/// Length of `nonceStr` (the seed's maximum, `String(32)`).
pub const NONCE_LEN: usize = 32;

/// The field that carries the signature; it is never part of the string to sign.
pub const SIGN_FIELD: &str = "sign";

/// What replaces the signature in the recorded request.
pub const REDACTED: &str = "***";

const SUCCESS: &str = "SUCCESS";

const FAIL: &str = "FAIL";

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;

    use openssl::pkey::{PKey, Private, Public};

    use crate::config::{HttpConfig, ShengpayMerchant, SignType};
    use crate::job::{ProviderKind, RefundRequest};
    use crate::provider::codes::CodeTable;
    use crate::provider::http::{self};
    use crate::provider::keys;
    use crate::provider::{CodeClass, Outcome, Provider, RefundCall};
    use serde_json::{Map, Value};

    use std::path::PathBuf;

    use proptest::prelude::*;
    use serde_json::json;

    use crate::job::{RefundAccount, ShengpayOptions};

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

    fn fixture_path(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/shengpay")
            .join(name)
    }

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(fixture_path(name)).unwrap()
    }

    fn merchant_private() -> PKey<Private> {
        keys::private_key_from_file("test", &fixture_path("merchant_private_pkcs8.pem")).unwrap()
    }

    fn merchant_public() -> PKey<Public> {
        keys::public_key_from_file("test", &fixture_path("merchant_public_spki.pem")).unwrap()
    }

    fn platform_private() -> PKey<Private> {
        keys::private_key_from_file("test", &fixture_path("platform_private_pkcs8.pem")).unwrap()
    }

    fn platform_public() -> PKey<Public> {
        keys::public_key_from_file("test", &fixture_path("platform_public_spki.pem")).unwrap()
    }

    /// The seed's refund, as our side asked for it.
    fn seed_expected() -> Expected<'static> {
        Expected {
            refund_no: "202105080000000488560",
            order_no: "202105080000000488560",
            refund_fee: 10,
            total_fee: 1000,
            mch_id: "93751497",
            app_id: "djgeiq978y933",
        }
    }

    fn judge<'a>(key: &'a PKey<Public>, codes: &'a CodeTable) -> Judge<'a> {
        Judge {
            platform_key: key,
            sign_type: SignType::Rsa,
            codes,
        }
    }

    /// A successful response to the seed refund, as a JSON object to be signed.
    fn success_fields() -> Map<String, Value> {
        let Value::Object(m) = json!({
            "returnCode": "SUCCESS",
            "returnMsg": "OK",
            "resultCode": "SUCCESS",
            "mchId": "93751497",
            "appId": "djgeiq978y933",
            "transactionId": "C2110160000000091671",
            "outTradeNo": "202105080000000488560",
            "outRefundNo": "202105080000000488560",
            "refundId": "RO2110160000000014290",
            "refundFee": "10",
            "settlementRefundFee": 10,
            "totalFee": 1000,
            "settlementTotalFee": 1000,
            "nonceStr": "GLEhZmpGicVlbEeCRYOEagLPhkwgBgRH",
            "signType": "RSA",
        }) else {
            unreachable!()
        };
        m
    }

    fn fail_fields(code: &str) -> Map<String, Value> {
        let mut m = success_fields();
        for k in [
            "refundId",
            "refundFee",
            "settlementRefundFee",
            "totalFee",
            "settlementTotalFee",
        ] {
            m.remove(k);
        }
        m.insert("resultCode".into(), "FAIL".into());
        m.insert("errorCode".into(), code.into());
        m.insert(
            "errorCodeDes".into(),
            format!("description of {code}").into(),
        );
        m
    }

    fn platform_signed(fields: Map<String, Value>) -> String {
        signed_json(fields, &platform_private(), SignType::Rsa)
            .unwrap()
            .body
    }

    fn classify_seed(status: u16, body: &str) -> Outcome {
        let key = platform_public();
        let codes = CodeTable::shengpay_default();
        classify_response(
            status,
            body.as_bytes(),
            &seed_expected(),
            &judge(&key, &codes),
        )
    }

    fn is_booked(o: &Outcome) -> bool {
        matches!(o, Outcome::Accepted { .. } | Outcome::Declined { .. })
    }

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

    // --- requests ----------------------------------------------------------------------------

    fn request(reason: Option<&str>, account: Option<RefundAccount>) -> RefundRequest {
        RefundRequest {
            version: 1,
            refund_no: "R2026112100000001".into(),
            order_no: "O2026112100000001".into(),
            provider: ProviderKind::Shengpay,
            merchant: "m1".into(),
            total_fee: 1000,
            refund_fee: 100,
            reason: reason.map(str::to_owned),
            requested_at: None,
            shengpay: account.map(|a| ShengpayOptions {
                refund_account: Some(a),
            }),
            wupay: None,
        }
    }

    fn merchant_config(base_url: &str, sign_type: SignType) -> ShengpayMerchant {
        ShengpayMerchant {
            merchant: "m1".into(),
            base_url: base_url.into(),
            app_id: "djgeiq978y933".into(),
            mch_id: "93751497".into(),
            sign_type,
            private_key_file: fixture_path("merchant_private_pkcs1.pem"),
            platform_public_key_file: fixture_path("platform_public_spki.pem"),
            notify_url: "https://notify.example/refund".into(),
            idempotent: true,
        }
    }

    fn client(base_url: &str, sign_type: SignType) -> ShengpayClient {
        let m = merchant_config(base_url, sign_type);
        let http_cfg = HttpConfig {
            connect_timeout_ms: 1_000,
            timeout_ms: 5_000,
            ..HttpConfig::default()
        };
        ShengpayClient::new(
            &m,
            "shengpay.merchants[0]",
            http::build_client(&http_cfg).unwrap(),
            &http_cfg,
            CodeTable::shengpay_default(),
        )
        .unwrap()
    }

    fn is_nonce(s: &str) -> bool {
        s.len() == NONCE_LEN && s.bytes().all(|b| b.is_ascii_alphanumeric())
    }

    #[test]
    fn request_body_has_every_field_integer_fees_a_fresh_nonce_and_a_valid_signature() {
        for sign_type in [SignType::Rsa, SignType::Rsa2] {
            let c = client("http://127.0.0.1:9", sign_type);
            let req = request(
                Some("customer returned goods"),
                Some(RefundAccount::Unsettled),
            );
            let a = c.build_request(&req).unwrap();
            let b = c.build_request(&req).unwrap();
            let v: Value = serde_json::from_str(&a.body).unwrap();
            assert_eq!(v["appId"], "djgeiq978y933");
            assert_eq!(v["mchId"], "93751497");
            assert_eq!(v["outTradeNo"], "O2026112100000001");
            assert_eq!(v["outRefundNo"], "R2026112100000001");
            assert_eq!(v["totalFee"], json!(1000));
            assert_eq!(v["refundFee"], json!(100));
            assert!(v["refundFee"].is_i64());
            assert_eq!(v["refundDesc"], "customer returned goods");
            assert_eq!(v["refundAccount"], "UNSETTLED");
            assert_eq!(v["notifyUrl"], "https://notify.example/refund");
            assert_eq!(v["signType"], sign_type.as_str());
            let nonce_a = v["nonceStr"].as_str().unwrap().to_owned();
            let vb: Value = serde_json::from_str(&b.body).unwrap();
            assert!(is_nonce(&nonce_a), "{nonce_a}");
            assert_ne!(
                nonce_a,
                vb["nonceStr"].as_str().unwrap(),
                "nonce is fresh per call"
            );
            let fields = ResponseFields::parse(a.body.as_bytes()).unwrap();
            assert!(fields.verify(&merchant_public(), sign_type).is_ok());
            // The recorded copy is the same request without the signature.
            let r: Value = serde_json::from_str(&a.redacted).unwrap();
            assert_eq!(r["sign"], REDACTED);
            let sig = v["sign"].as_str().unwrap();
            assert!(!a.redacted.contains(sig));
            assert!(!format!("{a:?}").contains(sig));
            let mut without = v.clone();
            without["sign"] = REDACTED.into();
            assert_eq!(without, r);
        }
    }

    #[test]
    fn optional_request_fields_are_left_out_when_absent() {
        let c = client("http://127.0.0.1:9", SignType::Rsa);
        let a = c.build_request(&request(None, None)).unwrap();
        let v: Value = serde_json::from_str(&a.body).unwrap();
        assert!(v.get("refundDesc").is_none());
        assert!(v.get("refundAccount").is_none());
        assert_eq!(v.as_object().unwrap().len(), 10, "nine fields and sign");
        assert!(!format!("{c:?}").contains("PRIVATE"));
    }

    #[test]
    fn constructor_errors_name_the_key_file_setting() {
        let mut m = merchant_config("http://127.0.0.1:9", SignType::Rsa);
        m.private_key_file = fixture_path("missing.pem");
        let http_cfg = HttpConfig::default();
        let e = ShengpayClient::new(
            &m,
            "shengpay.merchants[3]",
            http::build_client(&http_cfg).unwrap(),
            &http_cfg,
            CodeTable::shengpay_default(),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("shengpay.merchants[3].private_key_file"),
            "{e}"
        );
        let mut m = merchant_config("http://127.0.0.1:9", SignType::Rsa);
        m.platform_public_key_file = fixture_path("merchant_private_pkcs8.pem");
        let e = ShengpayClient::new(
            &m,
            "shengpay.merchants[3]",
            http::build_client(&http_cfg).unwrap(),
            &http_cfg,
            CodeTable::shengpay_default(),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("shengpay.merchants[3].platform_public_key_file"),
            "{e}"
        );
    }

    // --- response parsing --------------------------------------------------------------------

    #[test]
    fn seed_response_amounts_parse_into_fen_from_strings_and_numbers() {
        let body = fixture("seed_response.json");
        let fields = ResponseFields::parse(body.as_bytes()).unwrap();
        let r = RefundResponse::from_fields(&fields).unwrap();
        assert_eq!(r.refund_fee, Some(10));
        assert_eq!(r.settlement_refund_fee, Some(10));
        assert_eq!(r.total_fee, Some(1000));
        assert_eq!(r.settlement_total_fee, Some(1000));
        assert_eq!(r.refund_id.as_deref(), Some("RO2110160000000014290"));
        assert!(r.coupons.is_empty());
        assert_eq!(r.coupon_total().unwrap(), 0);
        // The string to verify keeps the value as written: "10" signs as refundFee=10.
        let canonical = fields.canonical();
        assert!(canonical.contains("&refundFee=10&"), "{canonical}");
        assert_eq!(canonical, fixture("seed_response_canonical.txt"));
    }

    #[test]
    fn seed_response_signed_by_the_openssl_cli_is_accepted_for_the_seed_refund() {
        let o = classify_seed(200, &fixture("seed_response_platform_signed.json"));
        assert_eq!(
            o,
            Outcome::Accepted {
                provider_refund_id: "RO2110160000000014290".into(),
                refund_fee: 10,
                settlement_refund_fee: 10,
                coupon_refund_fee: 0,
                raw: fixture("seed_response_platform_signed.json"),
            }
        );
    }

    #[test]
    fn seed_response_with_shengpays_own_signature_is_maybe_delivered_under_our_test_key() {
        let o = classify_seed(200, &fixture("seed_response.json"));
        assert!(
            matches!(o, Outcome::MaybeDelivered { raw: Some(_), .. }),
            "{o:?}"
        );
    }

    #[test]
    fn values_sign_as_written_in_the_json_text() {
        let body = br#"{"a":10,"b":"10","c":1.50,"d":{"y":1, "x":[true,null]},"e":null,"f":"","g":"x\"y\u00e9\/","h":false,"sign":"s"}"#;
        let f = ResponseFields::parse(body).unwrap();
        assert_eq!(
            f.canonical(),
            "a=10&b=10&c=1.50&d={\"y\":1, \"x\":[true,null]}&g=x\"yé/&h=false"
        );
    }

    #[test]
    fn amounts_accept_only_digits_into_i64() {
        for (json, want) in [
            (r#""10""#, Some(10)),
            ("10", Some(10)),
            ("0", Some(0)),
            (r#""0010""#, Some(10)),
            ("9223372036854775807", Some(i64::MAX)),
            ("null", None),
            (r#""""#, None),
        ] {
            let body = format!(r#"{{"refundFee":{json}}}"#);
            let f = ResponseFields::parse(body.as_bytes()).unwrap();
            assert_eq!(f.amount("refundFee"), Ok(want), "{json}");
        }
        for json in [
            "10.0",
            "1e3",
            "1E3",
            "-1",
            r#""-1""#,
            r#""+1""#,
            r#""10.0""#,
            r#"" 10""#,
            r#""10 ""#,
            r#""1e3""#,
            r#""0x10""#,
            "9223372036854775808",
            r#""99999999999999999999999""#,
            "true",
            "[10]",
            r#"{"v":10}"#,
            r#""१०""#,
        ] {
            let body = format!(r#"{{"refundFee":{json}}}"#);
            let f = ResponseFields::parse(body.as_bytes()).unwrap();
            assert!(f.amount("refundFee").is_err(), "{json} must be refused");
        }
    }

    #[test]
    fn coupon_fields_parse_into_coupons_by_index() {
        let mut m = success_fields();
        m.insert("couponRefundCount".into(), 2.into());
        m.insert("couponRefundFee".into(), "3".into());
        m.insert("couponRefundId0".into(), "CP0".into());
        m.insert("couponType0".into(), "CASH".into());
        m.insert("couponRefundFee0".into(), 1.into());
        m.insert("couponRefundId1".into(), "CP1".into());
        m.insert("couponType1".into(), "NO_CASH".into());
        m.insert("couponRefundFee1".into(), "2".into());
        m.insert("settlementRefundFee".into(), 8.into());
        let body = platform_signed(m.clone());
        let f = ResponseFields::parse(body.as_bytes()).unwrap();
        let r = RefundResponse::from_fields(&f).unwrap();
        assert_eq!(r.coupon_refund_count, Some(2));
        assert_eq!(
            r.coupons,
            vec![
                Coupon {
                    index: 0,
                    id: Some("CP0".into()),
                    coupon_type: Some("CASH".into()),
                    fee: Some(1),
                },
                Coupon {
                    index: 1,
                    id: Some("CP1".into()),
                    coupon_type: Some("NO_CASH".into()),
                    fee: Some(2),
                },
            ]
        );
        match classify_seed(200, &body) {
            Outcome::Accepted {
                refund_fee,
                settlement_refund_fee,
                coupon_refund_fee,
                ..
            } => assert_eq!(
                (refund_fee, settlement_refund_fee, coupon_refund_fee),
                (10, 8, 3)
            ),
            o => panic!("{o:?}"),
        }
        // Without the total, the per-coupon fees are summed.
        m.remove("couponRefundFee");
        let body = platform_signed(m);
        assert!(matches!(
            classify_seed(200, &body),
            Outcome::Accepted {
                coupon_refund_fee: 3,
                ..
            }
        ));
    }

    #[test]
    fn a_malformed_coupon_fee_makes_the_response_unreadable() {
        let mut m = success_fields();
        m.insert("couponRefundFee0".into(), "1.5".into());
        let o = classify_seed(200, &platform_signed(m));
        assert!(matches!(o, Outcome::MaybeDelivered { .. }), "{o:?}");
    }

    // --- classification ----------------------------------------------------------------------

    #[test]
    fn every_default_code_table_row_gives_its_class_through_the_classifier() {
        let table = CodeTable::shengpay_default();
        let rows: Vec<(String, CodeClass)> = table.rows().map(|(c, k)| (c.to_owned(), k)).collect();
        assert_eq!(rows.len(), 13);
        for (code, class) in rows {
            let body = platform_signed(fail_fields(&code));
            let o = classify_seed(200, &body);
            let want = match class {
                CodeClass::RetryLater => "retry_later",
                CodeClass::Declined => "declined",
                CodeClass::RequestRejected => "request_rejected",
            };
            assert_eq!(o.class(), want, "{code}: {o:?}");
            assert_eq!(o.code(), Some(code.as_str()));
            assert_eq!(o.message(), Some(format!("description of {code}").as_str()));
            assert_eq!(o.raw(), Some(body.as_str()));
        }
    }

    #[test]
    fn each_design_code_gives_its_design_class_and_unknown_codes_decline() {
        let cases = [
            ("BIZERR_NEED_RETRY", "retry_later"),
            ("SYSTEMERROR", "retry_later"),
            ("FREQUENCY_LIMITED", "retry_later"),
            ("REFUND_AMOUNT_ERROR", "declined"),
            ("ORDER_NOT_REFUNDABLE", "declined"),
            ("ORDER_NOT_EXIST", "declined"),
            ("NOTENOUGH", "declined"),
            ("TRADE_OVERDUE", "declined"),
            ("SIGN_ERROR", "request_rejected"),
            ("LACK_PARAMS", "request_rejected"),
            ("PARAMS_ERROR", "request_rejected"),
            ("MCH_NOT_FOUND", "request_rejected"),
            ("SERVICE_PROVIDER_NO_AUTH", "request_rejected"),
            ("SOMETHING_NEW", "declined"),
        ];
        for (code, class) in cases {
            let o = classify_seed(200, &platform_signed(fail_fields(code)));
            assert_eq!(o.class(), class, "{code}");
        }
        // A FAIL without errorCode is an unknown code: declined by the default table.
        let mut m = fail_fields("X");
        m.remove("errorCode");
        let o = classify_seed(200, &platform_signed(m));
        assert_eq!((o.class(), o.code()), ("declined", Some("RESULT_FAIL")));
    }

    #[test]
    fn config_overrides_reach_the_classifier() {
        let mut o = BTreeMap::new();
        o.insert("SYSTEMERROR".to_owned(), CodeClass::Declined);
        let codes = CodeTable::shengpay_default().with_overrides(&o);
        let key = platform_public();
        let body = platform_signed(fail_fields("SYSTEMERROR"));
        let out = classify_response(200, body.as_bytes(), &seed_expected(), &judge(&key, &codes));
        assert_eq!(out.class(), "declined");
    }

    #[test]
    fn return_code_fail_is_request_rejected_signed_or_unsigned() {
        let Value::Object(m) = json!({
            "returnCode": "FAIL",
            "returnMsg": "签名错误",
            "errorCode": "SIGN_ERROR",
        }) else {
            unreachable!()
        };
        let signed = platform_signed(m.clone());
        let unsigned = Value::Object(m).to_string();
        for body in [&signed, &unsigned] {
            let o = classify_seed(200, body);
            assert_eq!(o.class(), "request_rejected", "{body}");
            assert_eq!(o.code(), Some("SIGN_ERROR"));
            assert_eq!(o.message(), Some("签名错误"));
        }
        let o = classify_seed(200, r#"{"returnCode":"FAIL","returnMsg":"bad"}"#);
        assert_eq!(o.code(), Some("RETURN_FAIL"));
    }

    #[test]
    fn a_fail_with_a_sign_that_does_not_verify_is_not_trusted() {
        let Value::Object(m) = json!({"returnCode": "FAIL", "returnMsg": "x"}) else {
            unreachable!()
        };
        let body = signed_json(m, &merchant_private(), SignType::Rsa)
            .unwrap()
            .body;
        let o = classify_seed(200, &body);
        assert!(matches!(o, Outcome::MaybeDelivered { .. }), "{o:?}");
    }

    #[test]
    fn unverifiable_responses_never_succeed_or_fail() {
        let good = platform_signed(success_fields());
        assert!(matches!(
            classify_seed(200, &good),
            Outcome::Accepted { .. }
        ));
        let declined = platform_signed(fail_fields("NOTENOUGH"));
        assert!(matches!(
            classify_seed(200, &declined),
            Outcome::Declined { .. }
        ));
        let mut bodies: Vec<(&str, String)> = Vec::new();
        for base in [&good, &declined] {
            let v: Value = serde_json::from_str(base).unwrap();
            let mut tampered = v.clone();
            tampered["transactionId"] = "C0000000000000000000".into();
            bodies.push(("tampered field", tampered.to_string()));
            let mut added = v.clone();
            added["extra"] = "1".into();
            bodies.push(("added field", added.to_string()));
            let mut removed = v.clone();
            removed.as_object_mut().unwrap().remove("nonceStr");
            bodies.push(("removed field", removed.to_string()));
            let mut unsigned = v.clone();
            unsigned.as_object_mut().unwrap().remove("sign");
            bodies.push(("missing sign", unsigned.to_string()));
            let mut empty = v.clone();
            empty["sign"] = "".into();
            bodies.push(("empty sign", empty.to_string()));
            let mut null = v.clone();
            null["sign"] = Value::Null;
            bodies.push(("null sign", null.to_string()));
            let mut numeric = v.clone();
            numeric["sign"] = 12.into();
            bodies.push(("numeric sign", numeric.to_string()));
            let mut rsa2 = v.clone();
            rsa2["signType"] = "RSA2".into();
            bodies.push(("other signType", rsa2.to_string()));
            let mut m = v.as_object().unwrap().clone();
            m.remove("sign");
            bodies.push((
                "wrong key",
                signed_json(m, &merchant_private(), SignType::Rsa)
                    .unwrap()
                    .body,
            ));
            // A duplicate key: the signed value and the read value could differ.
            let dup = base.replacen('{', r#"{"resultCode":"FAIL","#, 1);
            bodies.push(("duplicate key", dup));
            // A number re-rendered differently no longer matches what was signed.
            if base.contains(":1000") {
                bodies.push(("re-rendered number", base.replace(":1000", ":1000.0")));
            }
        }
        for (what, body) in &bodies {
            let o = classify_seed(200, body);
            assert!(!is_booked(&o), "{what}: {o:?}");
            assert!(matches!(o, Outcome::MaybeDelivered { .. }), "{what}: {o:?}");
        }
    }

    #[test]
    fn an_accepted_response_for_another_refund_or_amount_is_not_booked() {
        type Edit = fn(&mut Map<String, Value>);
        let cases: Vec<(&str, Edit)> = vec![
            ("outRefundNo", |m| {
                m.insert("outRefundNo".into(), "OTHER".into());
            }),
            ("no outRefundNo", |m| {
                m.remove("outRefundNo");
            }),
            ("refundFee", |m| {
                m.insert("refundFee".into(), 11.into());
            }),
            ("no refundFee", |m| {
                m.remove("refundFee");
            }),
            ("outTradeNo", |m| {
                m.insert("outTradeNo".into(), "OTHER".into());
            }),
            ("mchId", |m| {
                m.insert("mchId".into(), "1".into());
            }),
            ("totalFee", |m| {
                m.insert("totalFee".into(), 999.into());
            }),
            ("no refundId", |m| {
                m.remove("refundId");
            }),
            ("no settlementRefundFee", |m| {
                m.remove("settlementRefundFee");
            }),
            ("settlement above refund", |m| {
                m.insert("settlementRefundFee".into(), 11.into());
            }),
            ("coupon above refund", |m| {
                m.insert("couponRefundFee".into(), 11.into());
            }),
            ("float amount", |m| {
                m.insert("refundFee".into(), json!(10.0));
            }),
            ("resultCode unknown", |m| {
                m.insert("resultCode".into(), "PROCESSING".into());
            }),
            ("returnCode missing", |m| {
                m.remove("returnCode");
            }),
        ];
        for (what, change) in cases {
            let mut m = success_fields();
            change(&mut m);
            let o = classify_seed(200, &platform_signed(m));
            assert!(
                matches!(o, Outcome::MaybeDelivered { raw: Some(_), .. }),
                "{what}: {o:?}"
            );
        }
    }

    #[test]
    fn non_2xx_and_unreadable_bodies_are_maybe_delivered_with_the_body_kept() {
        let good = platform_signed(success_fields());
        for status in [500, 502, 503, 404, 400, 302, 100] {
            let o = classify_seed(status, &good);
            assert!(
                matches!(o, Outcome::MaybeDelivered { raw: Some(ref r), .. } if *r == good),
                "{status}"
            );
        }
        for body in [
            "",
            "<html>Bad Gateway</html>",
            "[]",
            "null",
            "{",
            r#"{"a":1} x"#,
        ] {
            let o = classify_seed(200, body);
            assert!(
                matches!(o, Outcome::MaybeDelivered { raw: Some(_), .. }),
                "{body}"
            );
        }
    }

    #[test]
    fn deeply_nested_bodies_are_refused_without_overflowing_the_stack() {
        let body = format!(r#"{{"a":{}{}}}"#, "[".repeat(100_000), "]".repeat(100_000));
        let o = classify_seed(200, &body);
        assert!(matches!(o, Outcome::MaybeDelivered { .. }));
    }

    #[test]
    fn verify_body_checks_notify_callbacks_the_same_way() {
        let c = client("http://127.0.0.1:9", SignType::Rsa);
        let body = platform_signed(success_fields());
        let f = c.verify_notify(body.as_bytes()).unwrap();
        assert_eq!(f.amount("refundFee"), Ok(Some(10)));
        let tampered = body.replace("RO2110160000000014290", "RO2110160000000014291");
        assert_eq!(
            c.verify_notify(tampered.as_bytes()),
            Err(VerifyError::BadSignature)
        );
    }

    proptest! {
        #[test]
        fn the_classifier_never_panics_on_arbitrary_bytes(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let o = classify_seed(200, &String::from_utf8_lossy(&body));
            prop_assert!(!is_booked(&o));
            let key = platform_public();
            let codes = CodeTable::shengpay_default();
            let o = classify_response(200, &body, &seed_expected(), &judge(&key, &codes));
            prop_assert!(!is_booked(&o));
        }

        #[test]
        fn the_classifier_never_panics_on_arbitrary_flat_json(
            entries in proptest::collection::vec(
                (
                    prop_oneof![
                        Just("refundFee".to_owned()), Just("settlementRefundFee".to_owned()),
                        Just("couponRefundFee".to_owned()), Just("couponRefundFee0".to_owned()),
                        Just("couponRefundFee99999999999".to_owned()), Just("couponType01".to_owned()),
                        Just("returnCode".to_owned()), Just("resultCode".to_owned()),
                        Just("errorCode".to_owned()), Just("sign".to_owned()), "[a-zA-Z$0-9]{0,12}",
                    ],
                    prop_oneof![
                        Just("\"SUCCESS\"".to_owned()), Just("\"FAIL\"".to_owned()), Just("null".to_owned()),
                        "-?[0-9]{0,25}(\\.[0-9]{0,3})?([eE][0-9]{1,3})?",
                        "\"[ -~]{0,20}\"".prop_filter("valid JSON string", |s| !s[1..s.len() - 1].contains(['"', '\\'])),
                        Just("{\"a\":[1,{}]}".to_owned()), Just("true".to_owned()),
                    ],
                ),
                0..12,
            )
        ) {
            let body = format!(
                "{{{}}}",
                entries.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect::<Vec<_>>().join(",")
            );
            let o = classify_seed(200, &body);
            // Unsigned or wrongly signed: at most a request rejection, never booked.
            prop_assert!(!is_booked(&o), "{body} -> {o:?}");
        }

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

    // --- a verified answer must be about this refund -----------------------------------------

    fn with(mut m: Map<String, Value>, key: &str, value: Option<&str>) -> Map<String, Value> {
        match value {
            Some(v) => m.insert(key.into(), v.into()),
            None => m.remove(key),
        };
        m
    }

    fn assert_maybe_delivered(o: &Outcome, what: &str) {
        assert!(
            matches!(o, Outcome::MaybeDelivered { raw: Some(_), .. }),
            "{what}: {o:?}"
        );
    }

    #[test]
    fn a_signed_decline_of_another_refund_is_maybe_delivered() {
        let body = platform_signed(with(
            fail_fields("NOTENOUGH"),
            "outRefundNo",
            Some("202105080000000000001"),
        ));
        assert_maybe_delivered(&classify_seed(200, &body), "other outRefundNo");
    }

    #[test]
    fn a_signed_decline_for_another_merchant_is_maybe_delivered() {
        let body = platform_signed(with(fail_fields("NOTENOUGH"), "mchId", Some("10000002")));
        assert_maybe_delivered(&classify_seed(200, &body), "other mchId");
    }

    #[test]
    fn a_signed_decline_for_another_app_is_maybe_delivered() {
        let body = platform_signed(with(
            fail_fields("NOTENOUGH"),
            "appId",
            Some("app-10000002"),
        ));
        assert_maybe_delivered(&classify_seed(200, &body), "other appId");
    }

    #[test]
    fn a_signed_decline_that_does_not_name_the_refund_merchant_and_app_is_maybe_delivered() {
        for key in ["outRefundNo", "mchId", "appId"] {
            let body = platform_signed(with(fail_fields("NOTENOUGH"), key, None));
            assert_maybe_delivered(&classify_seed(200, &body), &format!("no {key}"));
        }
    }

    #[test]
    fn a_signed_decline_for_another_order_is_maybe_delivered() {
        let body = platform_signed(with(fail_fields("NOTENOUGH"), "outTradeNo", Some("OTHER")));
        assert_maybe_delivered(&classify_seed(200, &body), "other outTradeNo");
    }

    #[test]
    fn a_signed_decline_naming_this_refund_merchant_and_app_is_declined() {
        let body = platform_signed(fail_fields("NOTENOUGH"));
        assert_eq!(
            classify_seed(200, &body),
            Outcome::Declined {
                code: "NOTENOUGH".into(),
                message: "description of NOTENOUGH".into(),
                raw: body.clone(),
            }
        );
        // outTradeNo is not required: the refund is named by outRefundNo within mchId/appId.
        let body = platform_signed(with(fail_fields("NOTENOUGH"), "outTradeNo", None));
        assert_eq!(classify_seed(200, &body).class(), "declined");
    }

    #[test]
    fn a_signed_retry_later_about_another_refund_is_maybe_delivered() {
        let ours = platform_signed(fail_fields("SYSTEMERROR"));
        assert_eq!(classify_seed(200, &ours).class(), "retry_later");
        let body = platform_signed(with(
            fail_fields("SYSTEMERROR"),
            "outRefundNo",
            Some("202105080000000000001"),
        ));
        assert_maybe_delivered(&classify_seed(200, &body), "retry later, other outRefundNo");
    }

    #[test]
    fn a_signed_business_rejection_about_another_refund_is_maybe_delivered() {
        let ours = platform_signed(fail_fields("PARAMS_ERROR"));
        assert_eq!(classify_seed(200, &ours).class(), "request_rejected");
        let body = platform_signed(with(fail_fields("PARAMS_ERROR"), "mchId", Some("10000002")));
        assert_maybe_delivered(&classify_seed(200, &body), "params error, other mchId");
    }

    #[test]
    fn a_return_code_fail_naming_another_refund_is_maybe_delivered() {
        let Value::Object(m) = json!({
            "returnCode": "FAIL",
            "returnMsg": "sign error",
            "errorCode": "SIGN_ERROR",
            "mchId": "93751497",
            "appId": "djgeiq978y933",
            "outRefundNo": "202105080000000488560",
        }) else {
            unreachable!()
        };
        assert_eq!(
            classify_seed(200, &platform_signed(m.clone())).class(),
            "request_rejected",
            "a protocol-level FAIL that names this refund"
        );
        for (key, other) in [
            ("outRefundNo", "202105080000000000001"),
            ("mchId", "10000002"),
            ("appId", "app-10000002"),
            ("outTradeNo", "OTHER"),
        ] {
            let changed = with(m.clone(), key, Some(other));
            assert_maybe_delivered(
                &classify_seed(200, &platform_signed(changed.clone())),
                &format!("signed, other {key}"),
            );
            assert_maybe_delivered(
                &classify_seed(200, &Value::Object(changed).to_string()),
                &format!("unsigned, other {key}"),
            );
        }
    }

    #[test]
    fn an_accepted_response_that_does_not_name_our_merchant_and_app_is_not_booked() {
        for (key, value) in [
            ("mchId", None),
            ("appId", None),
            ("appId", Some("app-10000002")),
        ] {
            let o = classify_seed(200, &platform_signed(with(success_fields(), key, value)));
            assert_maybe_delivered(&o, &format!("{key} {value:?}"));
        }
    }

    // --- values that would make two field sets sign alike ------------------------------------

    #[test]
    fn a_reason_with_ampersand_or_equals_is_refused_at_intake_naming_reason() {
        let c = client("http://127.0.0.1:9", SignType::Rsa);
        // Signs like refundDesc=a with refundFee=1, whatever the real refundFee.
        for reason in ["a=1&refundFee=1", "a&b", "x=y"] {
            let e = c
                .admit(&request(Some(reason), None))
                .expect_err("an ambiguous reason must be refused");
            assert_eq!(e.field, "reason", "{reason}: {}", e.reason);
            assert!(
                e.reason.contains('&') && e.reason.contains('='),
                "{}",
                e.reason
            );
        }
    }

    #[test]
    fn a_plain_reason_is_admitted() {
        let c = client("http://127.0.0.1:9", SignType::Rsa);
        for req in [
            request(Some("customer returned goods, 退货 (50%)"), None),
            request(None, Some(RefundAccount::Recharge)),
            request(Some(""), Some(RefundAccount::Unsettled)),
        ] {
            assert_eq!(c.admit(&req), Ok(()), "{req:?}");
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

    #[tokio::test]
    async fn a_refund_whose_values_cannot_be_signed_unambiguously_is_not_sent() {
        // Nothing listens on the port: had the request been sent, it would be NotSent for a
        // connection error instead, so the message is what shows the signer refused.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let c = client(&format!("http://{addr}"), SignType::Rsa);
        let req = request(Some("a=1&refundFee=1"), None);
        let rec = c
            .refund(RefundCall {
                request: &req,
                attempt: 1,
            })
            .await;
        match &rec.outcome {
            Outcome::NotSent { error } => assert!(error.contains("refundDesc"), "{error}"),
            o => panic!("{o:?}"),
        }
        assert_eq!(rec.http_status, None);
    }

    #[test]
    fn a_merchant_value_with_ampersand_or_equals_fails_client_construction_naming_the_key() {
        let http_cfg = HttpConfig::default();
        type Edit = fn(&mut ShengpayMerchant);
        let cases: [(&str, Edit); 4] = [
            ("notify_url", |m| {
                m.notify_url = "https://notify.example/refund?a=1&b=2".into()
            }),
            ("notify_url", |m| {
                m.notify_url = "https://notify.example/refund?token=x".into()
            }),
            ("app_id", |m| m.app_id = "app&x".into()),
            ("mch_id", |m| m.mch_id = "9=3".into()),
        ];
        for (key, edit) in cases {
            let mut m = merchant_config("http://127.0.0.1:9", SignType::Rsa);
            edit(&mut m);
            let e = ShengpayClient::new(
                &m,
                "shengpay.merchants[2]",
                http::build_client(&http_cfg).unwrap(),
                &http_cfg,
                CodeTable::shengpay_default(),
            )
            .expect_err("an ambiguous merchant value must be refused");
            assert!(
                e.to_string()
                    .contains(&format!("shengpay.merchants[2].{key}")),
                "{e}"
            );
        }
    }

    // --- end to end over HTTP ----------------------------------------------------------------

    /// Answers one HTTP/1.1 request on `listener` with `reply_to(request_body)` and hands the
    /// request (head, body) back.
    async fn serve_once(
        listener: tokio::net::TcpListener,
        status: &'static str,
        reply_to: impl FnOnce(&str) -> String + Send + 'static,
    ) -> (String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            let n = sock.read(&mut chunk).await.unwrap();
            assert!(n > 0, "client closed early");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().unwrap())
            })
            .unwrap();
        while buf.len() < head_end + len {
            let n = sock.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            buf.extend_from_slice(&chunk[..n]);
        }
        let body = String::from_utf8(buf[head_end..head_end + len].to_vec()).unwrap();
        let reply = reply_to(&body);
        let resp = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json;charset=UTF-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
            reply.len()
        );
        sock.write_all(resp.as_bytes()).await.unwrap();
        sock.shutdown().await.unwrap();
        (head, body)
    }

    #[tokio::test]
    async fn refund_posts_a_signed_request_and_books_the_verified_answer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve_once(listener, "200 OK", |req_body| {
            // Answer like ShengPay: echo the refund, amounts half as strings, signed.
            let req: Value = serde_json::from_str(req_body).unwrap();
            let mut m = success_fields();
            m.insert("outRefundNo".into(), req["outRefundNo"].clone());
            m.insert("outTradeNo".into(), req["outTradeNo"].clone());
            m.insert("refundFee".into(), req["refundFee"].to_string().into());
            m.insert("settlementRefundFee".into(), req["refundFee"].clone());
            m.insert("totalFee".into(), req["totalFee"].clone());
            platform_signed(m)
        }));
        let c = client(&format!("http://{addr}/"), SignType::Rsa);
        assert_eq!(c.url(), format!("http://{addr}/api/v1/payment/refund"));
        let req = request(Some("退货"), Some(RefundAccount::Recharge));
        let rec = c
            .refund(RefundCall {
                request: &req,
                attempt: 1,
            })
            .await;
        let (head, body) = server.await.unwrap();

        assert!(
            head.starts_with("POST /api/v1/payment/refund HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/json; charset=utf-8\r\n"),
            "{head}"
        );
        let sent = ResponseFields::parse(body.as_bytes()).unwrap();
        assert!(sent.verify(&merchant_public(), SignType::Rsa).is_ok());
        assert!(is_nonce(sent.string("nonceStr").unwrap().unwrap()));
        assert_eq!(sent.string("refundDesc").unwrap(), Some("退货"));
        assert_eq!(sent.string("refundAccount").unwrap(), Some("RECHARGE"));

        match &rec.outcome {
            Outcome::Accepted {
                provider_refund_id,
                refund_fee,
                settlement_refund_fee,
                coupon_refund_fee,
                ..
            } => {
                assert_eq!(provider_refund_id, "RO2110160000000014290");
                assert_eq!(
                    (*refund_fee, *settlement_refund_fee, *coupon_refund_fee),
                    (100, 100, 0)
                );
            }
            o => panic!("{o:?}"),
        }
        assert_eq!(rec.http_status, Some(200));
        let recorded: Value = serde_json::from_str(&rec.request_redacted).unwrap();
        assert_eq!(recorded["sign"], REDACTED);
        assert_eq!(recorded["outRefundNo"], "R2026112100000001");
        let sig = sent.string("sign").unwrap().unwrap();
        assert!(!rec.request_redacted.contains(sig));
        assert!(rec.latency > std::time::Duration::ZERO);
    }

    #[tokio::test]
    async fn refund_against_a_5xx_is_maybe_delivered_with_the_status_recorded() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve_once(listener, "503 Service Unavailable", |_| {
            "busy".to_owned()
        }));
        let c = client(&format!("http://{addr}"), SignType::Rsa2);
        let req = request(None, None);
        let rec = c
            .refund(RefundCall {
                request: &req,
                attempt: 2,
            })
            .await;
        server.await.unwrap();
        assert_eq!(rec.http_status, Some(503));
        assert_eq!(
            rec.outcome,
            Outcome::MaybeDelivered {
                error: "HTTP 503 from provider".into(),
                raw: Some("busy".into()),
            }
        );
    }

    #[tokio::test]
    async fn refund_to_a_refused_connection_is_not_sent() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let c = client(&format!("http://{addr}"), SignType::Rsa);
        let req = request(None, None);
        let rec = c
            .refund(RefundCall {
                request: &req,
                attempt: 1,
            })
            .await;
        assert!(
            matches!(rec.outcome, Outcome::NotSent { .. }),
            "{:?}",
            rec.outcome
        );
        assert_eq!(rec.http_status, None);
        assert!(rec.request_redacted.contains(r#""sign":"***""#));
    }
}
