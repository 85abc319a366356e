//! What the certificate Secret holds and what to do about it: pure, no I/O, so every case
//! (missing, valid, expiring, renamed Service, foreign key) is a plain unit test.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use fanout_certs::{
    CA_VALIDITY, Ca, CertError, SERVING_VALIDITY, inspect, inspect_all, pem_blocks,
};
use k8s_openapi::ByteString;

/// Keys of the Secret. `ca.crt` is also exactly the `caBundle`: the signing CA first, then any
/// older CA still trusted while replicas move over to certificates of the new one.
pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const TLS_CERT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";

/// Certificates are renewed this long before they expire.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Clone, PartialEq, Eq)]
pub struct Bundle {
    pub ca_certs: String,
    pub ca_key: String,
    pub tls_cert: String,
    pub tls_key: String,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Bundle").finish_non_exhaustive()
    }
}

/// What a Secret's bundle needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Valid, names the Service, far from expiry.
    Keep,
    /// The CA stays; a new serving certificate, for `reason`.
    Reissue { reason: String },
    /// A new CA and serving certificate, for `reason`.
    Renew { reason: String },
}

impl Bundle {
    /// The bundle in a Secret's data; `None` when a key is missing or not text.
    pub fn from_data(data: &BTreeMap<String, ByteString>) -> Option<Self> {
        let text = |key: &str| String::from_utf8(data.get(key)?.0.clone()).ok();
        Some(Self {
            ca_certs: text(CA_CERT)?,
            ca_key: text(CA_KEY)?,
            tls_cert: text(TLS_CERT)?,
            tls_key: text(TLS_KEY)?,
        })
    }

    pub fn to_data(&self) -> BTreeMap<String, ByteString> {
        [
            (CA_CERT, &self.ca_certs),
            (CA_KEY, &self.ca_key),
            (TLS_CERT, &self.tls_cert),
            (TLS_KEY, &self.tls_key),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.clone().into_bytes())))
        .collect()
    }

    /// A new CA and a serving certificate for `dns_names`. CAs of `previous` that are still
    /// valid stay in the bundle, so the API server keeps trusting replicas that serve a
    /// certificate of the old CA until they pick up the new one.
    pub fn generate(
        dns_names: &[String],
        previous: Option<&Bundle>,
        now: SystemTime,
    ) -> Result<Self, CertError> {
        let ca = Ca::generate("fanout webhook CA", CA_VALIDITY)?;
        let serving = ca.issue_serving(dns_names, &[], SERVING_VALIDITY)?;
        let mut ca_certs = ca.cert_pem().to_string();
        if let Some(previous) = previous {
            for block in pem_blocks(&previous.ca_certs) {
                if inspect(&block).is_ok_and(|c| c.is_ca && c.not_after > now) {
                    ca_certs.push_str(&block);
                }
            }
        }
        Ok(Self {
            ca_certs,
            ca_key: ca.key_pem(),
            tls_cert: serving.cert_pem,
            tls_key: serving.key_pem,
        })
    }

    /// The same CA, a new serving certificate for `dns_names`.
    pub fn reissue(&self, dns_names: &[String]) -> Result<Self, CertError> {
        let ca = Ca::from_pem(&self.ca_certs, &self.ca_key)?;
        let serving = ca.issue_serving(dns_names, &[], SERVING_VALIDITY)?;
        Ok(Self {
            tls_cert: serving.cert_pem,
            tls_key: serving.key_pem,
            ..self.clone()
        })
    }

    /// What this bundle needs to serve `dns_names` at `now`.
    pub fn assess(&self, dns_names: &[String], now: SystemTime) -> Plan {
        let renew = |reason: String| Plan::Renew { reason };
        let reissue = |reason: String| Plan::Reissue { reason };
        let cas = match inspect_all(&self.ca_certs) {
            Ok(cas) => cas,
            Err(e) => return renew(format!("{CA_CERT} is not readable: {e}")),
        };
        let ca = &cas[0];
        if !ca.is_ca {
            return renew(format!("{CA_CERT} is not a CA"));
        }
        if let Err(e) = Ca::from_pem(&self.ca_certs, &self.ca_key) {
            return renew(format!("{CA_KEY} is not usable: {e}"));
        }
        if ca.remaining(now) < RENEW_BEFORE {
            return renew(format!("the CA expires in {}", days(ca.remaining(now))));
        }
        let serving = match inspect(&self.tls_cert) {
            Ok(serving) => serving,
            Err(e) => return reissue(format!("{TLS_CERT} is not readable: {e}")),
        };
        if !serving.is_signed_by(ca) {
            return reissue(format!("{TLS_CERT} is not signed by the CA"));
        }
        if !serving.covers(dns_names) {
            return reissue(format!(
                "{TLS_CERT} names {:?}, not all of {dns_names:?}",
                serving.dns_names
            ));
        }
        if serving.remaining(now) < RENEW_BEFORE {
            return reissue(format!(
                "{TLS_CERT} expires in {}",
                days(serving.remaining(now))
            ));
        }
        if crate::tls::certified_key(
            self.tls_cert.as_bytes(),
            self.tls_key.as_bytes(),
            TLS_CERT.as_ref(),
            TLS_KEY.as_ref(),
        )
        .is_err()
        {
            return reissue(format!("{TLS_KEY} does not belong to {TLS_CERT}"));
        }
        Plan::Keep
    }
}

fn days(duration: Duration) -> String {
    format!("{} days", duration.as_secs() / (24 * 3600))
}
