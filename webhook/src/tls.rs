//! The serving certificate, reloaded from disk when its files change (cert-manager and the
//! kubelet rewrite Secret volumes in place), without a restart and without dropping connections.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::settings::SharedPem;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("could not read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: String },
    #[error("{path} holds no usable PEM private key")]
    BadKey {
        path: String,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the private key in {path} is not supported")]
    UnsupportedKey {
        path: String,
        #[source]
        source: rustls::Error,
    },
    #[error("the private key does not match the certificate")]
    Mismatch(#[source] rustls::Error),
    #[error("TLS configuration")]
    Config(#[source] rustls::Error),
}

/// The ring provider; fanout uses no other.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process-wide provider (for the Kubernetes client); safe to call twice.
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Parses a PEM certificate chain and key into a key rustls can serve.
pub fn certified_key(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_path: &Path,
    key_path: &Path,
) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_path.display().to_string(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|source| TlsError::BadKey {
        path: key_path.display().to_string(),
        source,
    })?;
    let signing_key = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|source| TlsError::UnsupportedKey {
            path: key_path.display().to_string(),
            source,
        })?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(TlsError::Mismatch)?;
    Ok(certified)
}

/// `ca.crt` in the certificate file's directory, or nothing.
fn read_ca_beside(cert_path: &Path) -> String {
    cert_path
        .parent()
        .map(|dir| dir.join("ca.crt"))
        .and_then(|path| std::fs::read_to_string(path).ok())
        .filter(|pem| fanout_proxy_config::discovery::holds_certificate(pem))
        .unwrap_or_default()
}

/// Serves the current certificate: from files that [`ReloadingCert::watch`] re-reads, or from
/// memory where [`ReloadingCert::replace`] swaps in a new one (self-managed certificates).
#[derive(Debug)]
pub struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<(Arc<CertifiedKey>, Vec<u8>)>,
    /// The CAs that sign it, which the proxies must trust to reach the discovery server: the
    /// Secret's `ca.crt` (self-managed), or the `ca.crt` file beside the certificate file
    /// (cert-manager and most Secrets have one), re-read with it.
    pub ca: SharedPem,
}

impl ReloadingCert {
    /// Loads the files now; a server must not start without a certificate.
    pub fn load(cert_path: PathBuf, key_path: PathBuf) -> Result<Self, TlsError> {
        let (cert_pem, key_pem) = (read(&cert_path)?, read(&key_path)?);
        let key = certified_key(&cert_pem, &key_pem, &cert_path, &key_path)?;
        let ca = SharedPem::new(read_ca_beside(&cert_path));
        Ok(Self {
            current: RwLock::new((Arc::new(key), [cert_pem, key_pem].concat())),
            cert_path,
            key_path,
            ca,
        })
    }

    /// A certificate held in memory; `names` label it in errors (e.g. the Secret's keys).
    pub fn from_pem(
        cert_pem: &[u8],
        key_pem: &[u8],
        names: (&str, &str),
    ) -> Result<Self, TlsError> {
        let (cert_path, key_path) = (PathBuf::from(names.0), PathBuf::from(names.1));
        let key = certified_key(cert_pem, key_pem, &cert_path, &key_path)?;
        Ok(Self {
            current: RwLock::new((Arc::new(key), [cert_pem, key_pem].concat())),
            cert_path,
            key_path,
            ca: SharedPem::default(),
        })
    }

    /// Re-reads the files; `Ok(true)` when a new certificate is now served. A broken or
    /// half-written pair is an error and the current certificate stays.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let (cert_pem, key_pem) = (read(&self.cert_path)?, read(&self.key_path)?);
        self.ca.set(&read_ca_beside(&self.cert_path));
        self.replace(&cert_pem, &key_pem)
    }

    /// Serves `cert_pem` and `key_pem` from now on; `Ok(false)` when they are the ones served.
    /// A broken pair is an error and the current certificate stays.
    pub fn replace(&self, cert_pem: &[u8], key_pem: &[u8]) -> Result<bool, TlsError> {
        let contents = [cert_pem, key_pem].concat();
        if self.current.read().expect("cert lock poisoned").1 == contents {
            return Ok(false);
        }
        let key = certified_key(cert_pem, key_pem, &self.cert_path, &self.key_path)?;
        *self.current.write().expect("cert lock poisoned") = (Arc::new(key), contents);
        Ok(true)
    }

    /// Polls the files every `interval`. Polling (rather than inotify) also sees the atomic
    /// symlink swap the kubelet does for Secret volumes.
    pub async fn watch(self: Arc<Self>, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            match self.reload() {
                Ok(true) => {
                    tracing::info!(cert = %self.cert_path.display(), "serving certificate reloaded")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %error_chain(&e), "serving certificate not reloaded; keeping the current one")
                }
            }
        }
    }

    /// A rustls server config that serves this certificate, offering h2 and http/1.1.
    pub fn server_config(self: &Arc<Self>) -> Result<rustls::ServerConfig, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().ok()?.0.clone())
    }
}

/// `error: cause: cause` on one line, for logs.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
