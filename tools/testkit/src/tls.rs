//! Throwaway certificate authorities for TLS tests: a CA made at test time signs server
//! certificates for the names a test chooses, so a test can show both that the right CA and
//! name connect and that a wrong CA or a wrong name is refused. Nothing here is fit to protect
//! anything: keys live in memory and in the test's temporary folders only.

use anyhow::Result;
use openssl::asn1::{Asn1Integer, Asn1Time};
use openssl::bn::{BigNum, MsbOption};
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::rsa::Rsa;
use openssl::x509::extension::{
    BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
};
use openssl::x509::{X509, X509Builder, X509NameBuilder};

/// A self-signed CA that issues server certificates.
pub struct TestCa {
    key: PKey<Private>,
    cert: X509,
}

/// A server certificate and its private key, both PEM.
pub struct ServerCert {
    pub cert_pem: String,
    pub key_pem: String,
}

fn builder(cn: &str, key: &PKey<Private>) -> Result<X509Builder> {
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_text("CN", cn)?;
    let name = name.build();
    let mut b = X509::builder()?;
    b.set_version(2)?;
    let mut serial = BigNum::new()?;
    serial.rand(127, MsbOption::MAYBE_ZERO, false)?;
    let serial = Asn1Integer::from_bn(&serial)?;
    b.set_serial_number(&serial)?;
    b.set_subject_name(&name)?;
    b.set_pubkey(key)?;
    b.set_not_before(&*Asn1Time::days_from_now(0)?)?;
    b.set_not_after(&*Asn1Time::days_from_now(2)?)?;
    Ok(b)
}

fn rsa_key() -> Result<PKey<Private>> {
    Ok(PKey::from_rsa(Rsa::generate(2048)?)?)
}

impl TestCa {
    /// A new CA named `cn`, with a fresh 2048-bit key.
    pub fn new(cn: &str) -> Result<TestCa> {
        let key = rsa_key()?;
        let mut b = builder(cn, &key)?;
        let mut name = X509NameBuilder::new()?;
        name.append_entry_by_text("CN", cn)?;
        b.set_issuer_name(&name.build())?;
        b.append_extension(BasicConstraints::new().critical().ca().build()?)?;
        b.append_extension(
            KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build()?,
        )?;
        b.sign(&key, MessageDigest::sha256())?;
        Ok(TestCa {
            key,
            cert: b.build(),
        })
    }

    /// The CA certificate, PEM: what a client trusts.
    pub fn cert_pem(&self) -> Result<String> {
        Ok(String::from_utf8(self.cert.to_pem()?)?)
    }

    /// A server certificate for `dns_names` (its subject alternative names; the first is also
    /// its common name), signed by this CA.
    pub fn issue(&self, dns_names: &[&str]) -> Result<ServerCert> {
        let key = rsa_key()?;
        let cn = dns_names.first().copied().unwrap_or("server");
        let mut b = builder(cn, &key)?;
        b.set_issuer_name(self.cert.subject_name())?;
        b.append_extension(BasicConstraints::new().build()?)?;
        b.append_extension(
            KeyUsage::new()
                .critical()
                .digital_signature()
                .key_encipherment()
                .build()?,
        )?;
        b.append_extension(ExtendedKeyUsage::new().server_auth().build()?)?;
        let mut san = SubjectAlternativeName::new();
        for n in dns_names {
            san.dns(n);
        }
        let san = san.build(&b.x509v3_context(Some(&self.cert), None))?;
        b.append_extension(san)?;
        b.sign(&self.key, MessageDigest::sha256())?;
        Ok(ServerCert {
            cert_pem: String::from_utf8(b.build().to_pem()?)?,
            key_pem: String::from_utf8(key.private_key_to_pem_pkcs8()?)?,
        })
    }
}
