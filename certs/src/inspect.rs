//! Reading certificates back: what a Secret holds, whether it still serves, and for how long.

use std::time::{Duration, SystemTime};

use x509_parser::extensions::GeneralName;
use x509_parser::pem::Pem;

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("no PEM certificate found")]
    NoCertificate,
    #[error("PEM block {index} is not a readable certificate")]
    Pem {
        index: usize,
        #[source]
        source: x509_parser::error::PEMError,
    },
    #[error("PEM block {index} is not a valid X.509 certificate")]
    X509 {
        index: usize,
        #[source]
        source: x509_parser::nom::Err<x509_parser::error::X509Error>,
    },
}

/// What fanout needs to know about one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub is_ca: bool,
    /// DNS subject alternative names.
    pub dns_names: Vec<String>,
    /// DER, to check signatures against.
    der: Vec<u8>,
}

impl CertInfo {
    /// Time left before it expires; zero once expired.
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or_default()
    }

    /// Whether `issuer` (a CA) signed this certificate.
    pub fn is_signed_by(&self, issuer: &CertInfo) -> bool {
        let (Ok((_, leaf)), Ok((_, ca))) = (
            x509_parser::parse_x509_certificate(&self.der),
            x509_parser::parse_x509_certificate(&issuer.der),
        ) else {
            return false;
        };
        leaf.issuer() == ca.subject() && leaf.verify_signature(Some(ca.public_key())).is_ok()
    }

    /// Whether `spki_der` (a SubjectPublicKeyInfo) is this certificate's public key.
    pub fn has_public_key(&self, spki_der: &[u8]) -> bool {
        x509_parser::parse_x509_certificate(&self.der)
            .is_ok_and(|(_, cert)| cert.public_key().raw == spki_der)
    }

    /// Whether it names every one of `names`.
    pub fn covers(&self, names: &[String]) -> bool {
        names.iter().all(|n| self.dns_names.contains(n))
    }
}

fn system_time(time: x509_parser::time::ASN1Time) -> SystemTime {
    let seconds = time.timestamp();
    if seconds >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(seconds as u64)
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(seconds.unsigned_abs())
    }
}

/// Every certificate in a PEM text, in order (a CA bundle holds several).
pub fn inspect_all(pem_text: &str) -> Result<Vec<CertInfo>, InspectError> {
    let mut certs = Vec::new();
    for (index, pem) in Pem::iter_from_buffer(pem_text.as_bytes()).enumerate() {
        let pem = pem.map_err(|source| InspectError::Pem { index, source })?;
        if pem.label != "CERTIFICATE" {
            continue;
        }
        let (_, cert) = x509_parser::parse_x509_certificate(&pem.contents)
            .map_err(|source| InspectError::X509 { index, source })?;
        let dns_names = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        GeneralName::DNSName(name) => Some(name.to_string()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        certs.push(CertInfo {
            not_before: system_time(cert.validity().not_before),
            not_after: system_time(cert.validity().not_after),
            is_ca: cert.is_ca(),
            dns_names,
            der: pem.contents.clone(),
        });
    }
    if certs.is_empty() {
        return Err(InspectError::NoCertificate);
    }
    Ok(certs)
}

/// The first certificate of a PEM text (the leaf of a chain, the signer of a bundle).
pub fn inspect(pem_text: &str) -> Result<CertInfo, InspectError> {
    Ok(inspect_all(pem_text)?.swap_remove(0))
}

/// The PEM blocks of a text, each as its own PEM string, in order.
pub fn pem_blocks(pem_text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current = String::new();
    for line in pem_text.lines() {
        if line.starts_with("-----BEGIN ") {
            current.clear();
        }
        current.push_str(line);
        current.push('\n');
        if line.starts_with("-----END ") {
            blocks.push(std::mem::take(&mut current));
        }
    }
    blocks
}
