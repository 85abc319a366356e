//! CA and serving certificates for the fanout webhook.
//!
//! The API server dials the webhook over TLS and trusts exactly the CA in the webhook
//! configuration's `caBundle`, so fanout carries its own small CA: [`Ca::generate`] makes one,
//! [`Ca::issue_serving`] signs a serving certificate for the Service DNS names the API server
//! dials. [`Ca::from_pem`] loads an existing CA, so a CA kept in a Secret keeps signing.
//!
//! Keys are ECDSA P-256 (rcgen on ring): small, fast to handshake, accepted by every API server.
#![forbid(unsafe_code)]

mod inspect;

pub use inspect::{CertInfo, InspectError, inspect, inspect_all, pem_blocks};

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType,
};
use time::OffsetDateTime;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{0:?} is not a valid DNS name for a certificate")]
    InvalidDnsName(String),
    #[error("{0:?} was refused as a certificate name")]
    DnsName(String, #[source] rcgen::Error),
    #[error("a serving certificate needs at least one DNS name or IP address")]
    NoNames,
    #[error("could not generate a key")]
    KeyGeneration(#[source] rcgen::Error),
    #[error("could not sign the certificate")]
    Signing(#[source] rcgen::Error),
    #[error("the CA certificate or key PEM is not usable")]
    LoadCa(#[source] rcgen::Error),
    #[error("the CA certificate is not readable")]
    ReadCa(#[source] InspectError),
    #[error("the CA private key does not belong to the CA certificate")]
    CaKeyMismatch,
    #[error("could not write {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Validity of a generated CA.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Validity of a generated serving certificate.
pub const SERVING_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// A CA that can sign serving certificates.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

/// A serving certificate and its private key, PEM encoded.
#[derive(Clone)]
pub struct ServingCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("ServingCert").finish_non_exhaustive()
    }
}

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    // Back-date a little: clocks across a cluster are not in step.
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + lifetime;
}

impl Ca {
    /// A new self-signed CA named `common_name`, valid for `lifetime`.
    pub fn generate(common_name: &str, lifetime: Duration) -> Result<Self, CertError> {
        let key = KeyPair::generate().map_err(CertError::KeyGeneration)?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "fanout");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, lifetime);
        let cert = params.self_signed(&key).map_err(CertError::Signing)?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its certificate and private key.
    /// Loads a CA from its certificate and private key. Of a bundle, the first certificate is
    /// the CA's own (the others are older CAs kept trusted during a rotation).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let cert_pem = inspect::pem_blocks(cert_pem)
            .into_iter()
            .next()
            .unwrap_or_default();
        let key = KeyPair::from_pem(key_pem).map_err(CertError::LoadCa)?;
        let info = inspect::inspect(&cert_pem).map_err(CertError::ReadCa)?;
        if !info.has_public_key(&key.subject_public_key_info()) {
            return Err(CertError::CaKeyMismatch);
        }
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(CertError::LoadCa)?;
        Ok(Self { issuer, cert_pem })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A serving certificate for `dns_names` and `ips`, signed by this CA.
    pub fn issue_serving(
        &self,
        dns_names: &[String],
        ips: &[IpAddr],
        lifetime: Duration,
    ) -> Result<ServingCert, CertError> {
        if dns_names.is_empty() && ips.is_empty() {
            return Err(CertError::NoNames);
        }
        let key = KeyPair::generate().map_err(CertError::KeyGeneration)?;
        let mut params = CertificateParams::default();
        let common_name = dns_names
            .first()
            .cloned()
            .unwrap_or_else(|| ips[0].to_string());
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        for name in dns_names {
            if !is_dns_name(name) {
                return Err(CertError::InvalidDnsName(name.clone()));
            }
            let san = name
                .clone()
                .try_into()
                .map_err(|e| CertError::DnsName(name.clone(), e))?;
            params.subject_alt_names.push(SanType::DnsName(san));
        }
        params
            .subject_alt_names
            .extend(ips.iter().copied().map(SanType::IpAddress));
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, lifetime);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(CertError::Signing)?;
        Ok(ServingCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Letters, digits and `-` in dot-separated labels, with an optional leading `*.` wildcard.
fn is_dns_name(name: &str) -> bool {
    let name = name.strip_prefix("*.").unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// The DNS names the API server may use for a webhook Service: it dials
/// `<service>.<namespace>.svc`; the longer forms serve in-cluster clients.
pub fn service_dns_names(service: &str, namespace: &str, cluster_domain: &str) -> Vec<String> {
    vec![
        service.to_string(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.{cluster_domain}"),
    ]
}

/// Writes `ca.crt`, `tls.crt` and `tls.key` (mode 0600 for the key) into `dir`.
pub fn write_bundle(dir: &Path, ca: &Ca, serving: &ServingCert) -> Result<(), CertError> {
    let write = |name: &str, contents: &str, private: bool| {
        let path = dir.join(name);
        let io = || -> std::io::Result<()> {
            std::fs::create_dir_all(dir)?;
            // Write aside and rename, so a reader polling the files never sees half a PEM.
            let tmp = dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, contents)?;
            #[cfg(unix)]
            if private {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
            }
            std::fs::rename(&tmp, &path)
        };
        io().map_err(|source| CertError::Write {
            path: path.display().to_string(),
            source,
        })
    };
    write("ca.crt", ca.cert_pem(), false)?;
    write("tls.key", &serving.key_pem, true)?;
    write("tls.crt", &serving.cert_pem, false)
}
