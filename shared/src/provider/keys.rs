//! Loading the RSA keys that provider signatures are made and checked with.
//!
//! This module owns turning key text from a secret file into an OpenSSL key, and nothing else.
//! It exists because providers hand keys out in whatever shape their console produces: PEM in
//! PKCS#8 (`BEGIN PRIVATE KEY`) or PKCS#1 (`BEGIN RSA PRIVATE KEY`), public keys as SPKI
//! (`BEGIN PUBLIC KEY`), PKCS#1 (`BEGIN RSA PUBLIC KEY`) or inside a certificate, and very often
//! the bare base64 body of the DER with the armour lines stripped, wrapped at any width. Accepting
//! all of these here keeps operators from hand-converting keys, which is where keys leak.
//!
//! Errors name the configuration key (for example `shengpay.merchants[0].private_key_file`), the
//! file when there is one, and the shape that was expected, and never any part of the key text: a
//! log line about a bad key must not become the leak.

use std::path::Path;

use base64::Engine;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use openssl::pkey::{Id, PKey, Private, Public};
use openssl::rsa::Rsa;
use openssl::x509::X509;

use crate::config::{ConfigError, Secret};

/// Smaller RSA keys are refused at start: 1024-bit moduli are within reach of a well-funded
/// attacker, so signatures made with them would not prove who sent a refund or its answer
/// (NIST SP 800-131A has disallowed them for signatures since 2013).
pub const MIN_RSA_BITS: u32 = 2048;

/// Key bodies copied out of web consoles lose their padding as often as not.
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Reads and parses an RSA private key from the file named by config key `key`.
pub fn private_key_from_file(key: &str, path: &Path) -> Result<PKey<Private>, ConfigError> {
    // Read through `Secret` so the text is never in a value whose Debug would print it.
    let text = Secret::read_file(key, path)?;
    private_key_from_text(key, text.expose()).map_err(|e| naming_file(e, path))
}

/// Reads and parses an RSA public key from the file named by config key `key`.
pub fn public_key_from_file(key: &str, path: &Path) -> Result<PKey<Public>, ConfigError> {
    let text = Secret::read_file(key, path)?;
    public_key_from_text(key, text.expose()).map_err(|e| naming_file(e, path))
}

/// Adds the file to a key error, so that the message says which file to replace.
fn naming_file(e: ConfigError, path: &Path) -> ConfigError {
    match e {
        ConfigError::Invalid { key, reason } => ConfigError::Invalid {
            key,
            reason: format!("{}: {reason}", path.display()),
        },
        other => other,
    }
}

/// Parses an RSA private key: PKCS#8 or PKCS#1 PEM, or bare base64 DER (PKCS#8, then PKCS#1).
pub fn private_key_from_text(key: &str, text: &str) -> Result<PKey<Private>, ConfigError> {
    let text = text.trim();
    let pkey = match pem_label(text) {
        Some("PRIVATE KEY") => PKey::private_key_from_pem(text.as_bytes()).ok(),
        Some("RSA PRIVATE KEY") => Rsa::private_key_from_pem(text.as_bytes())
            .ok()
            .and_then(|r| PKey::from_rsa(r).ok()),
        Some("ENCRYPTED PRIVATE KEY") => {
            return Err(ConfigError::invalid(
                key,
                "the private key is encrypted; store it unencrypted in the secret file",
            ));
        }
        Some(label) if is_public_label(label) => {
            return Err(ConfigError::invalid(
                key,
                format!("expected a private key, found a PEM `{label}`"),
            ));
        }
        Some(label) => {
            return Err(ConfigError::invalid(
                key,
                format!(
                    "unsupported PEM block `{label}` (expected PRIVATE KEY or RSA PRIVATE KEY)"
                ),
            ));
        }
        None => {
            let der = bare_der(key, text)?;
            PKey::private_key_from_pkcs8(&der).ok().or_else(|| {
                Rsa::private_key_from_der(&der)
                    .ok()
                    .and_then(|r| PKey::from_rsa(r).ok())
            })
        }
    };
    let pkey = pkey.ok_or_else(|| {
        // OpenSSL's own error text is left out on purpose: it is not needed to fix the file and
        // keeps the message provably free of key bytes.
        ConfigError::invalid(
            key,
            "not a readable RSA private key (expected PKCS#8 or PKCS#1, PEM or bare base64 DER)",
        )
    })?;
    check_rsa(key, pkey.id(), pkey.bits())?;
    Ok(pkey)
}

/// Parses an RSA public key: SPKI or PKCS#1 PEM, an X.509 certificate PEM, or bare base64 DER
/// (SPKI, then PKCS#1).
pub fn public_key_from_text(key: &str, text: &str) -> Result<PKey<Public>, ConfigError> {
    let text = text.trim();
    let pkey = match pem_label(text) {
        Some("PUBLIC KEY") => PKey::public_key_from_pem(text.as_bytes()).ok(),
        Some("RSA PUBLIC KEY") => Rsa::public_key_from_pem_pkcs1(text.as_bytes())
            .ok()
            .and_then(|r| PKey::from_rsa(r).ok()),
        // Platforms often publish their key as a certificate; only its key is used (the
        // certificate's validity is not ours to judge: the key was pinned by configuration).
        Some("CERTIFICATE") => X509::from_pem(text.as_bytes())
            .ok()
            .and_then(|c| c.public_key().ok()),
        Some(label) if label.contains("PRIVATE KEY") => {
            return Err(ConfigError::invalid(
                key,
                format!("expected a public key, found a PEM `{label}`"),
            ));
        }
        Some(label) => {
            return Err(ConfigError::invalid(
                key,
                format!(
                    "unsupported PEM block `{label}` (expected PUBLIC KEY, RSA PUBLIC KEY or \
                     CERTIFICATE)"
                ),
            ));
        }
        None => {
            let der = bare_der(key, text)?;
            PKey::public_key_from_der(&der).ok().or_else(|| {
                Rsa::public_key_from_der_pkcs1(&der)
                    .ok()
                    .and_then(|r| PKey::from_rsa(r).ok())
            })
        }
    };
    let pkey = pkey.ok_or_else(|| {
        ConfigError::invalid(
            key,
            "not a readable RSA public key (expected SPKI or PKCS#1, PEM or bare base64 DER, or \
             an X.509 certificate PEM)",
        )
    })?;
    check_rsa(key, pkey.id(), pkey.bits())?;
    Ok(pkey)
}

/// The label of the first PEM block (`PRIVATE KEY` for `-----BEGIN PRIVATE KEY-----`), if the
/// text is PEM at all.
fn pem_label(text: &str) -> Option<&str> {
    let start = text.find("-----BEGIN ")? + "-----BEGIN ".len();
    let rest = text.get(start..)?;
    let end = rest.find("-----")?;
    rest.get(..end).map(str::trim)
}

fn is_public_label(label: &str) -> bool {
    matches!(label, "PUBLIC KEY" | "RSA PUBLIC KEY" | "CERTIFICATE")
}

/// Decodes a bare base64 DER body, ignoring any whitespace and line breaks inside it.
fn bare_der(key: &str, text: &str) -> Result<Vec<u8>, ConfigError> {
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    if compact.is_empty() {
        return Err(ConfigError::invalid(key, "the key file is empty"));
    }
    LENIENT_BASE64.decode(compact.as_bytes()).map_err(|_| {
        ConfigError::invalid(
            key,
            "neither PEM (-----BEGIN ...-----) nor a base64 DER key body",
        )
    })
}

fn check_rsa(key: &str, id: Id, bits: u32) -> Result<(), ConfigError> {
    if id != Id::RSA {
        return Err(ConfigError::invalid(key, "not an RSA key"));
    }
    if bits < MIN_RSA_BITS {
        return Err(ConfigError::invalid(
            key,
            format!("RSA key of {bits} bits is below the {MIN_RSA_BITS}-bit minimum"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::path::PathBuf;

    const KEY: &str = "shengpay.merchants[0].private_key_file";

    fn fixture_path(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/shengpay")
            .join(name)
    }

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(fixture_path(name)).unwrap()
    }

    fn modulus_of_private(k: &PKey<Private>) -> Vec<u8> {
        k.rsa().unwrap().n().to_vec()
    }

    fn modulus_of_public(k: &PKey<Public>) -> Vec<u8> {
        k.rsa().unwrap().n().to_vec()
    }

    #[test]
    fn every_private_key_format_loads_the_same_key() {
        let reference =
            private_key_from_file(KEY, &fixture_path("merchant_private_pkcs8.pem")).unwrap();
        for name in [
            "merchant_private_pkcs1.pem",
            "merchant_private_pkcs8.b64",
            "merchant_private_pkcs1.b64",
        ] {
            let k = private_key_from_file(KEY, &fixture_path(name)).unwrap();
            assert_eq!(
                modulus_of_private(&k),
                modulus_of_private(&reference),
                "{name}"
            );
            assert!(
                k.private_key_to_der().is_ok(),
                "{name} keeps its private half"
            );
        }
    }

    #[test]
    fn every_public_key_format_loads_the_same_key() {
        let reference =
            public_key_from_file(KEY, &fixture_path("merchant_public_spki.pem")).unwrap();
        let from_private =
            private_key_from_file(KEY, &fixture_path("merchant_private_pkcs8.pem")).unwrap();
        assert_eq!(
            modulus_of_public(&reference),
            modulus_of_private(&from_private)
        );
        for name in [
            "merchant_public_pkcs1.pem",
            "merchant_public_spki.b64",
            "merchant_public_pkcs1.b64",
        ] {
            let k = public_key_from_file(KEY, &fixture_path(name)).unwrap();
            assert_eq!(
                modulus_of_public(&k),
                modulus_of_public(&reference),
                "{name}"
            );
        }
    }

    #[test]
    fn bare_base64_may_be_wrapped_indented_and_unpadded() {
        let body = fixture("merchant_public_spki.b64").replace('\n', "");
        let wrapped: String = body
            .as_bytes()
            .chunks(40)
            .map(|c| format!("   {}\r\n", String::from_utf8_lossy(c)))
            .collect();
        assert!(public_key_from_text(KEY, &wrapped).is_ok());
        let unpadded = body.trim_end_matches('=');
        assert!(public_key_from_text(KEY, unpadded).is_ok());
    }

    #[test]
    fn keys_generated_at_test_time_round_trip_through_every_format() {
        let rsa = Rsa::generate(2048).unwrap();
        let pkey = PKey::from_rsa(rsa.clone()).unwrap();
        let b64 = |der: Vec<u8>| base64::engine::general_purpose::STANDARD.encode(der);
        let privates = [
            String::from_utf8(pkey.private_key_to_pem_pkcs8().unwrap()).unwrap(),
            String::from_utf8(rsa.private_key_to_pem().unwrap()).unwrap(),
            b64(pkey.private_key_to_pkcs8().unwrap()),
            b64(rsa.private_key_to_der().unwrap()),
        ];
        for text in &privates {
            let k = private_key_from_text(KEY, text).unwrap();
            assert_eq!(k.rsa().unwrap().n(), rsa.n());
        }
        let publics = [
            String::from_utf8(pkey.public_key_to_pem().unwrap()).unwrap(),
            String::from_utf8(rsa.public_key_to_pem_pkcs1().unwrap()).unwrap(),
            b64(pkey.public_key_to_der().unwrap()),
            b64(rsa.public_key_to_der_pkcs1().unwrap()),
        ];
        for text in &publics {
            let k = public_key_from_text(KEY, text).unwrap();
            assert_eq!(k.rsa().unwrap().n(), rsa.n());
        }
    }

    #[test]
    fn a_certificate_yields_its_public_key() {
        let rsa = Rsa::generate(2048).unwrap();
        let pkey = PKey::from_rsa(rsa.clone()).unwrap();
        let mut name = openssl::x509::X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", "platform").unwrap();
        let name = name.build();
        let mut b = X509::builder().unwrap();
        b.set_subject_name(&name).unwrap();
        b.set_issuer_name(&name).unwrap();
        b.set_pubkey(&pkey).unwrap();
        b.set_not_before(&openssl::asn1::Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        b.set_not_after(&openssl::asn1::Asn1Time::days_from_now(1).unwrap())
            .unwrap();
        b.sign(&pkey, openssl::hash::MessageDigest::sha256())
            .unwrap();
        let pem = String::from_utf8(b.build().to_pem().unwrap()).unwrap();
        let k = public_key_from_text(KEY, &pem).unwrap();
        assert_eq!(k.rsa().unwrap().n(), rsa.n());
    }

    #[test]
    fn errors_name_the_config_key_and_never_the_key_text() {
        let private_pem = fixture("merchant_private_pkcs8.pem");
        let public_pem = fixture("merchant_public_spki.pem");
        let body_line = private_pem.lines().nth(1).unwrap().to_owned();
        // A damaged file: one body line lost, as happens when a key is pasted by hand.
        let corrupt: String = private_pem
            .lines()
            .enumerate()
            .filter(|(i, _)| *i != 5)
            .map(|(_, l)| format!("{l}\n"))
            .collect();
        let cases = [
            corrupt.clone(),
            public_pem.clone(),
            body_line.clone(),
            "not a key at all!".to_owned(),
            String::new(),
            private_pem.replace("PRIVATE KEY", "ENCRYPTED PRIVATE KEY"),
        ];
        let leaked = |e: &str| {
            private_pem
                .lines()
                .chain(corrupt.lines())
                .filter(|l| l.len() > 16 && !l.starts_with("-----"))
                .any(|l| e.contains(&l[..16]))
        };
        for text in &cases {
            let e = private_key_from_text(KEY, text).unwrap_err().to_string();
            assert!(e.contains(KEY), "{e}");
            assert!(!leaked(&e), "key text leaked into: {e}");
        }
        for text in cases
            .iter()
            .filter(|t| **t != public_pem)
            .chain([&private_pem])
        {
            let e = public_key_from_text(KEY, text).unwrap_err().to_string();
            assert!(e.contains(KEY), "{e}");
            assert!(!leaked(&e), "key text leaked into: {e}");
        }
    }

    #[test]
    fn a_missing_file_is_a_secret_file_error_naming_the_key() {
        let e = private_key_from_file(KEY, Path::new("/nonexistent/key.pem")).unwrap_err();
        assert!(
            matches!(e, ConfigError::SecretFile { ref key, .. } if key == KEY),
            "{e}"
        );
        let e = public_key_from_file(KEY, Path::new("/nonexistent/key.pem")).unwrap_err();
        assert!(matches!(e, ConfigError::SecretFile { .. }), "{e}");
    }

    #[test]
    fn keys_under_2048_bits_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let small = Rsa::generate(1024).unwrap();
        let private = dir.path().join("merchant-1024.pem");
        std::fs::write(&private, small.private_key_to_pem().unwrap()).unwrap();
        let public = dir.path().join("platform-1024.pem");
        std::fs::write(&public, small.public_key_to_pem().unwrap()).unwrap();

        let e = private_key_from_file(KEY, &private)
            .unwrap_err()
            .to_string();
        assert!(e.contains(KEY), "{e}");
        assert!(e.contains(&private.display().to_string()), "{e}");
        assert!(
            e.contains("1024 bits") && e.contains("2048-bit minimum"),
            "{e}"
        );
        let e = public_key_from_file(KEY, &public).unwrap_err().to_string();
        assert!(e.contains(&public.display().to_string()), "{e}");
        assert!(
            e.contains("1024 bits") && e.contains("2048-bit minimum"),
            "{e}"
        );

        // The boundary itself is accepted.
        let ok = Rsa::generate(2048).unwrap();
        std::fs::write(&private, ok.private_key_to_pem().unwrap()).unwrap();
        assert!(private_key_from_file(KEY, &private).is_ok());
    }

    #[test]
    fn small_and_non_rsa_keys_are_refused() {
        let small = Rsa::generate(512).unwrap();
        let pem = String::from_utf8(small.private_key_to_pem().unwrap()).unwrap();
        let e = private_key_from_text(KEY, &pem).unwrap_err().to_string();
        assert!(e.contains("512 bits"), "{e}");
        let ec = openssl::ec::EcKey::generate(
            &openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap(),
        )
        .unwrap();
        let ec = PKey::from_ec_key(ec).unwrap();
        let pem = String::from_utf8(ec.private_key_to_pem_pkcs8().unwrap()).unwrap();
        let e = private_key_from_text(KEY, &pem).unwrap_err().to_string();
        assert!(e.contains("not an RSA key"), "{e}");
    }
}
