//! Self-managed serving certificates (`certs.mode: auto`).
//!
//! At start the webhook reads its Secret; a missing, foreign, expiring (within 30 days) or
//! misnamed bundle is replaced, the configuration's `caBundle` is set to the Secret's CA, and
//! only then does it serve. While running it does the same every check interval and swaps in
//! the Secret's serving certificate without a restart.
//!
//! Several replicas are safe without a lock: every write is a create or a replace at the
//! `resourceVersion` read, so of two replicas writing at once one gets 409, reads again, and
//! serves what the other wrote. There is one CA in the end.
//!
//! - `bundle`: what the Secret holds and what it needs (pure).
//! - `api`: the Kubernetes calls.

pub mod api;
pub mod bundle;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fanout_certs::CertError;

use crate::tls::{ReloadingCert, TlsError, error_chain};
use api::{ApiError, CertApi, Write};
use bundle::{Bundle, Plan, TLS_CERT, TLS_KEY};

/// Writers racing for the Secret settle within a couple of rounds; more is a bug or a fight
/// with something else that writes it.
const MAX_ROUNDS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum AutoCertError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("generating certificates")]
    Generate(#[from] CertError),
    #[error("the certificate Secret changed under every one of {MAX_ROUNDS} writes")]
    Contended,
    #[error("the certificate in the Secret cannot be served")]
    Serve(#[from] TlsError),
}

/// What a round did, for logs and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ensured {
    pub bundle: Bundle,
    /// Why this replica wrote a new bundle, if it did.
    pub wrote: Option<String>,
    /// Whether the `caBundle` had to be patched.
    pub patched_ca_bundle: bool,
}

/// Makes the Secret hold a valid bundle for `dns_names` and the webhook configuration trust its
/// CA; returns the bundle to serve.
pub async fn ensure(
    api: &CertApi,
    dns_names: &[String],
    now: SystemTime,
) -> Result<Ensured, AutoCertError> {
    for _ in 0..MAX_ROUNDS {
        let stored = api.read_secret().await?;
        let current = stored.as_ref().and_then(|s| s.bundle.as_ref());
        let plan = match current {
            None if stored.is_some() => Plan::Renew {
                reason: "the Secret lacks some of ca.crt, ca.key, tls.crt, tls.key".into(),
            },
            None => Plan::Renew {
                reason: "no certificate Secret yet".into(),
            },
            Some(bundle) => bundle.assess(dns_names, now),
        };
        let (bundle, wrote) = match (plan, current) {
            (Plan::Keep, Some(bundle)) => (bundle.clone(), None),
            (Plan::Reissue { reason }, Some(bundle)) => (bundle.reissue(dns_names)?, Some(reason)),
            (Plan::Renew { reason }, current) | (Plan::Reissue { reason }, current @ None) => {
                (Bundle::generate(dns_names, current, now)?, Some(reason))
            }
            (Plan::Keep, None) => unreachable!("no bundle is never kept"),
        };
        if wrote.is_some() && api.write_secret(&bundle, stored.as_ref()).await? == Write::Lost {
            tracing::info!("another replica wrote the certificate Secret first; using theirs");
            continue;
        }
        let patched_ca_bundle = api.sync_ca_bundle(&bundle.ca_certs).await?;
        return Ok(Ensured {
            bundle,
            wrote,
            patched_ca_bundle,
        });
    }
    Err(AutoCertError::Contended)
}

fn log(ensured: &Ensured) {
    if let Some(reason) = &ensured.wrote {
        tracing::info!(%reason, "wrote a new certificate to the Secret");
    }
    if ensured.patched_ca_bundle {
        tracing::info!("set the caBundle of the webhook configuration");
    }
}

/// [`ensure`] until it succeeds (at install the webhook configuration may not exist yet), with
/// backoff from 1 s to 30 s; then the certificate to serve.
pub async fn start(api: &CertApi, dns_names: &[String]) -> Arc<ReloadingCert> {
    let mut backoff = Duration::from_secs(1);
    loop {
        match ensure(api, dns_names, SystemTime::now())
            .await
            .and_then(|ensured| {
                log(&ensured);
                let cert = ReloadingCert::from_pem(
                    ensured.bundle.tls_cert.as_bytes(),
                    ensured.bundle.tls_key.as_bytes(),
                    (TLS_CERT, TLS_KEY),
                )?;
                cert.ca.set(&ensured.bundle.ca_certs);
                Ok(cert)
            }) {
            Ok(cert) => return Arc::new(cert),
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), retry_in = ?backoff,
                    "self-managed certificate not ready");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Every `interval`, [`ensure`] again and serve what the Secret holds: renewals by this or
/// another replica, and a `caBundle` a `helm upgrade` reset, are picked up without a restart.
pub async fn keep_current(
    api: CertApi,
    dns_names: Vec<String>,
    cert: Arc<ReloadingCert>,
    interval: Duration,
) {
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let result = ensure(&api, &dns_names, SystemTime::now())
            .await
            .and_then(|ensured| {
                log(&ensured);
                cert.ca.set(&ensured.bundle.ca_certs);
                Ok(cert.replace(
                    ensured.bundle.tls_cert.as_bytes(),
                    ensured.bundle.tls_key.as_bytes(),
                )?)
            });
        match result {
            Ok(true) => tracing::info!("serving the renewed certificate"),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %error_chain(&e),
                "self-managed certificate not checked; serving the current one"),
        }
    }
}
