//! RSA keys and PKCS#1 v1.5 signatures for the simulated ShengPay, with the `rsa` crate.
//!
//! Deliberately not openssl and not the `shared` crate: the simulator is the second, independent
//! implementation of the signature rule, so tests that sign with openssl and verify here (and
//! the other way round) check both.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rsa::pkcs1::{DecodeRsaPrivateKey, DecodeRsaPublicKey};
use rsa::pkcs1v15::{Signature, SigningKey, VerifyingKey};
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey};
use rsa::signature::{SignatureEncoding, Signer, Verifier};
use rsa::traits::PublicKeyParts;
use rsa::{RsaPrivateKey, RsaPublicKey};
use sha1::Sha1;
use sha2::Sha256;

use super::SimError;

/// ShengPay's `signType`: `RSA` = SHA1withRSA, `RSA2` = SHA256withRSA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SignType {
    Rsa,
    Rsa2,
}

impl SignType {
    pub(crate) fn parse(s: &str) -> Option<SignType> {
        match s {
            "RSA" => Some(SignType::Rsa),
            "RSA2" => Some(SignType::Rsa2),
            _ => None,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            SignType::Rsa => "RSA",
            SignType::Rsa2 => "RSA2",
        }
    }
}

/// The platform's signing key, with both digests prepared.
pub(crate) struct PlatformKey {
    sha1: SigningKey<Sha1>,
    sha256: SigningKey<Sha256>,
}

impl PlatformKey {
    pub(crate) fn new(key: RsaPrivateKey) -> Self {
        PlatformKey {
            sha1: SigningKey::<Sha1>::new(key.clone()),
            sha256: SigningKey::<Sha256>::new(key),
        }
    }

    /// Signs `message` and returns the raw signature bytes.
    pub(crate) fn sign(&self, sign_type: SignType, message: &[u8]) -> Vec<u8> {
        // PKCS#1 v1.5 signing is deterministic; blinding would only guard a private key that
        // is a throwaway test key anyway.
        match sign_type {
            SignType::Rsa => self.sha1.sign(message).to_vec(),
            SignType::Rsa2 => self.sha256.sign(message).to_vec(),
        }
    }
}

/// A merchant's verifying key, with both digests prepared.
pub(crate) struct MerchantKey {
    sha1: VerifyingKey<Sha1>,
    sha256: VerifyingKey<Sha256>,
}

impl MerchantKey {
    pub(crate) fn new(key: RsaPublicKey) -> Self {
        MerchantKey {
            sha1: VerifyingKey::<Sha1>::new(key.clone()),
            sha256: VerifyingKey::<Sha256>::new(key),
        }
    }

    /// True when `signature_b64` is a valid signature of `message`.
    pub(crate) fn verify(&self, sign_type: SignType, message: &[u8], signature_b64: &str) -> bool {
        let Ok(bytes) = BASE64.decode(signature_b64.trim()) else {
            return false;
        };
        let Ok(signature) = Signature::try_from(bytes.as_slice()) else {
            return false;
        };
        match sign_type {
            SignType::Rsa => self.sha1.verify(message, &signature).is_ok(),
            SignType::Rsa2 => self.sha256.verify(message, &signature).is_ok(),
        }
    }
}

pub(crate) fn base64(bytes: &[u8]) -> String {
    BASE64.encode(bytes)
}

fn key_error(path: &Path, reason: impl Into<String>) -> SimError {
    SimError::Key {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn read_text(path: &Path) -> Result<String, SimError> {
    std::fs::read_to_string(path).map_err(|e| key_error(path, e.to_string()))
}

/// Decodes the bare base64 DER body providers often hand out instead of PEM.
fn bare_der(path: &Path, text: &str) -> Result<Vec<u8>, SimError> {
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    BASE64
        .decode(compact)
        .map_err(|_| key_error(path, "neither PEM nor base64 DER"))
}

/// The same floor as the worker's (`shared::provider::keys::MIN_RSA_BITS`): a simulator that
/// took a key the worker refuses would let a test pass on a setup production cannot have.
pub(crate) const MIN_RSA_BITS: usize = 2048;

fn check_size(path: &Path, key: &impl PublicKeyParts) -> Result<(), SimError> {
    let bits = key.n().bits();
    if bits < MIN_RSA_BITS {
        return Err(key_error(
            path,
            format!("RSA key of {bits} bits is below the {MIN_RSA_BITS}-bit minimum"),
        ));
    }
    Ok(())
}

/// Loads a private key (PEM PKCS#8, PEM PKCS#1, or bare base64 DER of either) of at least
/// [`MIN_RSA_BITS`].
pub(crate) fn load_private_key(path: &Path) -> Result<RsaPrivateKey, SimError> {
    let key = parse_private_key(path)?;
    check_size(path, &key)?;
    Ok(key)
}

fn parse_private_key(path: &Path) -> Result<RsaPrivateKey, SimError> {
    let text = read_text(path)?;
    let text = text.trim();
    if text.starts_with("-----BEGIN PRIVATE KEY-----") {
        return RsaPrivateKey::from_pkcs8_pem(text).map_err(|e| key_error(path, e.to_string()));
    }
    if text.starts_with("-----BEGIN RSA PRIVATE KEY-----") {
        return RsaPrivateKey::from_pkcs1_pem(text).map_err(|e| key_error(path, e.to_string()));
    }
    if text.starts_with("-----") {
        return Err(key_error(path, "unsupported PEM type for a private key"));
    }
    let der = bare_der(path, text)?;
    RsaPrivateKey::from_pkcs8_der(&der)
        .or_else(|_| RsaPrivateKey::from_pkcs1_der(&der))
        .map_err(|_| {
            key_error(
                path,
                "base64 DER is neither PKCS#8 nor PKCS#1 RSA private key",
            )
        })
}

/// Loads a public key (PEM SPKI, PEM PKCS#1, or bare base64 DER of either) of at least
/// [`MIN_RSA_BITS`].
pub(crate) fn load_public_key(path: &Path) -> Result<RsaPublicKey, SimError> {
    let key = parse_public_key(path)?;
    check_size(path, &key)?;
    Ok(key)
}

fn parse_public_key(path: &Path) -> Result<RsaPublicKey, SimError> {
    let text = read_text(path)?;
    let text = text.trim();
    if text.starts_with("-----BEGIN PUBLIC KEY-----") {
        return RsaPublicKey::from_public_key_pem(text).map_err(|e| key_error(path, e.to_string()));
    }
    if text.starts_with("-----BEGIN RSA PUBLIC KEY-----") {
        return RsaPublicKey::from_pkcs1_pem(text).map_err(|e| key_error(path, e.to_string()));
    }
    if text.starts_with("-----") {
        return Err(key_error(path, "unsupported PEM type for a public key"));
    }
    let der = bare_der(path, text)?;
    RsaPublicKey::from_public_key_der(&der)
        .or_else(|_| RsaPublicKey::from_pkcs1_der(&der))
        .map_err(|_| key_error(path, "base64 DER is neither SPKI nor PKCS#1 RSA public key"))
}

/// Reads a shared secret such as WuPay's `rfkey`; surrounding whitespace is not part of it.
pub(crate) fn load_secret(path: &Path) -> Result<String, SimError> {
    let text = read_text(path)?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(key_error(path, "secret file is empty"));
    }
    Ok(secret.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_under_2048_bits_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let small = openssl::rsa::Rsa::generate(1024).unwrap();
        let private = dir.path().join("platform-1024.pem");
        std::fs::write(&private, small.private_key_to_pem().unwrap()).unwrap();
        let public = dir.path().join("merchant-1024.pem");
        std::fs::write(&public, small.public_key_to_pem().unwrap()).unwrap();

        let e = load_private_key(&private).err().unwrap().to_string();
        assert!(e.contains(&private.display().to_string()), "{e}");
        assert!(e.contains("1024 bits is below the 2048-bit minimum"), "{e}");
        let e = load_public_key(&public).err().unwrap().to_string();
        assert!(e.contains(&public.display().to_string()), "{e}");
        assert!(e.contains("1024 bits is below the 2048-bit minimum"), "{e}");

        let dev = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../keys/dev");
        assert!(load_private_key(&dev.join("shengpay_platform_private.pem")).is_ok());
        assert!(load_public_key(&dev.join("shengpay_merchant_public.pem")).is_ok());
    }
}
