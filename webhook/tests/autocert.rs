//! Self-managed certificates (`certs.mode: auto`) through kube's real `Client` over an in-memory
//! Kubernetes API: what ends up in the Secret and the webhook configuration, and the certificate
//! the webhook presents to a client that trusts exactly the `caBundle`, as the API server does.

#[path = "common/fake_api.rs"]
mod fake_api;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use fake_api::{FakeApi, NAMESPACE, SECRET, WEBHOOK};
use fanout_certs::{Ca, inspect, inspect_all, service_dns_names};
use fanout_webhook::autocert::api::CertApi;
use fanout_webhook::autocert::bundle::Bundle;
use fanout_webhook::autocert::{self, Ensured, ensure};
use fanout_webhook::tls::{ReloadingCert, provider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

const DAY: Duration = Duration::from_secs(24 * 3600);
/// The name the API server dials for the chart's Service.
const DIALED: &str = "fanout-webhook.fanout-system.svc";

fn names() -> Vec<String> {
    service_dns_names("fanout-webhook", NAMESPACE, "cluster.local")
}

fn cert_api(api: &FakeApi) -> CertApi {
    CertApi::new(api.client(), NAMESPACE, SECRET, WEBHOOK)
}

/// The decoded `caBundle` of every webhook in the configuration.
fn ca_bundles(api: &FakeApi) -> Vec<Option<String>> {
    api.webhook_configuration()["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            w["clientConfig"]["caBundle"].as_str().map(|b| {
                String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b).unwrap())
                    .unwrap()
            })
        })
        .collect()
}

fn as_data(bundle: &Bundle) -> BTreeMap<String, String> {
    bundle
        .to_data()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8(v.0).unwrap()))
        .collect()
}

/// A bundle whose CA and serving certificate live `ca_days` and `serving_days`.
fn bundle_lasting(ca_days: u32, serving_days: u32, dns_names: &[String]) -> Bundle {
    let ca = Ca::generate("earlier CA", DAY * ca_days).unwrap();
    let serving = ca
        .issue_serving(dns_names, &[], DAY * serving_days)
        .unwrap();
    Bundle {
        ca_certs: ca.cert_pem().to_string(),
        ca_key: ca.key_pem(),
        tls_cert: serving.cert_pem,
        tls_key: serving.key_pem,
    }
}

/// Does a TLS handshake with `cert` the way the API server dials a webhook: SNI `DIALED`,
/// trusting exactly the certificates in `ca_bundle`. The certificate presented, or the error.
async fn handshake(cert: Arc<ReloadingCert>, ca_bundle: &str) -> Result<Vec<u8>, String> {
    let server_config = Arc::new(cert.server_config().unwrap());
    let mut roots = rustls::RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(ca_bundle.as_bytes()) {
        roots.add(der.unwrap()).unwrap();
    }
    let client_config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let server = tokio::spawn(async move {
        tokio_rustls::TlsAcceptor::from(server_config)
            .accept(server_io)
            .await
    });
    let client = tokio_rustls::TlsConnector::from(Arc::new(client_config))
        .connect(ServerName::try_from(DIALED).unwrap(), client_io)
        .await
        .map_err(|e| e.to_string())?;
    let presented = client.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let _ = server.await;
    Ok(presented)
}

/// One round of [`ensure`], as a replica does at start and then every minute.
async fn round(api: &FakeApi) -> Ensured {
    ensure(&cert_api(api), &names(), SystemTime::now())
        .await
        .unwrap()
}

/// Two replicas' rounds on their own tasks, both reading the Secret before either writes.
async fn race(api: &FakeApi) -> (Ensured, Ensured) {
    api.race_next_reads(2);
    let replica = |api: &FakeApi| {
        let api = api.clone();
        tokio::spawn(async move { round(&api).await })
    };
    let (a, b) = (replica(api), replica(api));
    (a.await.unwrap(), b.await.unwrap())
}

fn assert_wrote(ensured: &Ensured, why: &str) {
    let wrote = ensured.wrote.as_deref().unwrap_or_default();
    assert!(wrote.contains(why), "wrote because {wrote:?}, not {why:?}");
}

fn der_of(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[tokio::test]
async fn a_fresh_install_creates_a_ca_and_serving_cert_and_sets_the_ca_bundle() {
    let api = FakeApi::with_webhook_configuration();
    let ensured = round(&api).await;
    assert_eq!(ensured.wrote.as_deref(), Some("no certificate Secret yet"));
    assert!(ensured.patched_ca_bundle);

    let data = api.secret_data();
    assert_eq!(
        data.keys().collect::<Vec<_>>(),
        ["ca.crt", "ca.key", "tls.crt", "tls.key"]
    );
    assert_eq!(data, as_data(&ensured.bundle));
    let secret = api.secret().unwrap();
    assert_eq!(secret["type"], "kubernetes.io/tls");
    // Owned by the webhook configuration: uninstalling the chart removes it.
    assert_eq!(
        secret["metadata"]["ownerReferences"][0]["uid"],
        api.webhook_configuration()["metadata"]["uid"]
    );
    assert_eq!(
        secret["metadata"]["ownerReferences"][0]["kind"],
        "MutatingWebhookConfiguration"
    );

    // The serving certificate names what the API server dials, is signed by the CA, and lasts.
    let ca = inspect(&data["ca.crt"]).unwrap();
    let serving = inspect(&data["tls.crt"]).unwrap();
    assert!(ca.is_ca);
    assert!(serving.dns_names.contains(&DIALED.to_string()));
    assert_eq!(serving.dns_names, names());
    assert!(serving.is_signed_by(&ca));
    assert!(serving.remaining(SystemTime::now()) > DAY * 360);

    // Every webhook trusts exactly that CA; the rest of the configuration is as it was.
    assert_eq!(
        ca_bundles(&api),
        vec![Some(data["ca.crt"].clone()), Some(data["ca.crt"].clone())]
    );
    let configuration = api.webhook_configuration();
    assert_eq!(
        configuration["webhooks"][1]["clientConfig"]["service"]["path"],
        "/mutate"
    );
    assert_eq!(configuration["webhooks"][0]["name"], "pods.fanout.dev");

    // A client trusting the caBundle accepts the certificate the webhook serves.
    let cert = Arc::new(
        ReloadingCert::from_pem(
            data["tls.crt"].as_bytes(),
            data["tls.key"].as_bytes(),
            ("tls.crt", "tls.key"),
        )
        .unwrap(),
    );
    let presented = handshake(cert, ca_bundles(&api)[0].as_ref().unwrap())
        .await
        .unwrap();
    assert_eq!(presented, der_of(&data["tls.crt"]));
}

#[tokio::test]
async fn a_valid_secret_is_used_as_it_is_and_nothing_is_written() {
    let api = FakeApi::with_webhook_configuration();
    let existing = bundle_lasting(3650, 365, &names());
    api.put_secret(&as_data(&existing));
    round(&api).await;
    let writes_after_first = api.writes();
    // The first round only sets the caBundle (a fresh chart's configuration has none).
    assert_eq!(writes_after_first.len(), 1, "{writes_after_first:?}");
    assert!(writes_after_first[0].starts_with("PATCH "));

    let ensured = round(&api).await;
    assert_eq!(
        ensured,
        Ensured {
            bundle: existing.clone(),
            wrote: None,
            patched_ca_bundle: false
        }
    );
    assert_eq!(api.writes(), writes_after_first, "a second round wrote");
    assert_eq!(api.secret_data(), as_data(&existing));
}

#[tokio::test]
async fn a_ca_bundle_reset_by_an_upgrade_is_set_again() {
    let api = FakeApi::with_webhook_configuration();
    round(&api).await;
    // `helm upgrade` re-applies the configuration without a caBundle.
    let mut configuration = api.webhook_configuration();
    for webhook in configuration["webhooks"].as_array_mut().unwrap() {
        webhook["clientConfig"]
            .as_object_mut()
            .unwrap()
            .remove("caBundle");
    }
    api.put_object(
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/fanout",
        configuration,
    );
    let ensured = round(&api).await;
    assert!(ensured.patched_ca_bundle);
    assert_eq!(ensured.wrote, None, "the Secret was fine");
    let ca = api.secret_data()["ca.crt"].clone();
    assert_eq!(ca_bundles(&api), vec![Some(ca.clone()), Some(ca)]);
}

#[tokio::test]
async fn a_serving_cert_near_expiry_is_reissued_by_the_same_ca() {
    let api = FakeApi::with_webhook_configuration();
    let expiring = bundle_lasting(3650, 10, &names());
    api.put_secret(&as_data(&expiring));
    let ensured = round(&api).await;
    assert_wrote(&ensured, "expires in 9 days");
    let data = api.secret_data();
    assert_eq!(data["ca.crt"], expiring.ca_certs, "the CA was kept");
    assert_eq!(data["ca.key"], expiring.ca_key);
    assert_ne!(data["tls.crt"], expiring.tls_cert);
    let serving = inspect(&data["tls.crt"]).unwrap();
    assert!(serving.remaining(SystemTime::now()) > DAY * 360);
    assert!(serving.is_signed_by(&inspect(&data["ca.crt"]).unwrap()));
    // Replaced at the version read, not created anew.
    assert!(
        api.writes()
            .iter()
            .any(|w| w.starts_with("PUT ") && w.ends_with(" 200")),
        "{:?}",
        api.writes()
    );
}

#[tokio::test]
async fn a_ca_near_expiry_is_replaced_and_the_old_ca_stays_trusted_meanwhile() {
    let api = FakeApi::with_webhook_configuration();
    let old = bundle_lasting(20, 10, &names());
    api.put_secret(&as_data(&old));
    let ensured = round(&api).await;
    assert_wrote(&ensured, "the CA expires in 19 days");
    let data = api.secret_data();
    let cas = inspect_all(&data["ca.crt"]).unwrap();
    assert_eq!(cas.len(), 2, "new CA, then the old one");
    assert!(cas[0].remaining(SystemTime::now()) > DAY * 3000);
    assert_eq!(inspect(&old.ca_certs).unwrap(), cas[1]);
    assert!(inspect(&data["tls.crt"]).unwrap().is_signed_by(&cas[0]));
    let bundle = ca_bundles(&api)[0].clone().unwrap();
    assert_eq!(bundle, data["ca.crt"]);

    // A replica still serving the old certificate is trusted until it picks up the new one.
    let old_cert = Arc::new(
        ReloadingCert::from_pem(
            old.tls_cert.as_bytes(),
            old.tls_key.as_bytes(),
            ("tls.crt", "tls.key"),
        )
        .unwrap(),
    );
    handshake(old_cert, &bundle).await.unwrap();
}

#[tokio::test]
async fn a_secret_for_another_service_name_or_incomplete_is_replaced() {
    let api = FakeApi::with_webhook_configuration();
    let other_names = service_dns_names("old-name", NAMESPACE, "cluster.local");
    api.put_secret(&as_data(&bundle_lasting(3650, 365, &other_names)));
    let ensured = round(&api).await;
    assert_wrote(&ensured, "not all of");
    assert!(
        inspect(&api.secret_data()["tls.crt"])
            .unwrap()
            .covers(&names())
    );

    let api = FakeApi::with_webhook_configuration();
    api.put_secret(&BTreeMap::from([(
        "tls.crt".to_string(),
        "not a certificate".to_string(),
    )]));
    let ensured = round(&api).await;
    assert_wrote(&ensured, "lacks some of");
    assert_eq!(api.secret_data().len(), 4);
}

/// Two replicas start at once with no Secret: both read "missing", both generate, both create;
/// the API server lets one create win. The other must end up serving the winner's certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_starting_together_end_with_one_ca() {
    let api = FakeApi::with_webhook_configuration();
    let (a, b) = race(&api).await;
    assert_eq!(
        a.bundle, b.bundle,
        "the replicas serve different certificates"
    );
    let data = api.secret_data();
    assert_eq!(as_data(&a.bundle), data);
    let creates: Vec<_> = api
        .writes()
        .into_iter()
        .filter(|w| w.starts_with("POST "))
        .collect();
    assert_eq!(creates.len(), 2, "both tried: {creates:?}");
    assert_eq!(
        creates.iter().filter(|w| w.ends_with(" 201")).count(),
        1,
        "{creates:?}"
    );
    assert_eq!(
        creates.iter().filter(|w| w.ends_with(" 409")).count(),
        1,
        "{creates:?}"
    );
    assert_eq!(
        ca_bundles(&api)[0].as_deref(),
        Some(data["ca.crt"].as_str())
    );
}

/// Two replicas find the serving certificate expiring at once: one replace wins, the other is
/// refused at the stale version and takes the winner's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_renewing_together_end_with_one_certificate() {
    let api = FakeApi::with_webhook_configuration();
    let expiring = bundle_lasting(3650, 5, &names());
    api.put_secret(&as_data(&expiring));
    let (a, b) = race(&api).await;
    assert_eq!(a.bundle, b.bundle);
    assert_eq!(as_data(&a.bundle), api.secret_data());
    let replaces: Vec<_> = api
        .writes()
        .into_iter()
        .filter(|w| w.starts_with("PUT "))
        .collect();
    assert_eq!(
        replaces.iter().filter(|w| w.ends_with(" 409")).count(),
        1,
        "{replaces:?}"
    );
    assert_eq!(
        [a.wrote.is_some(), b.wrote.is_some()]
            .iter()
            .filter(|w| **w)
            .count(),
        1,
        "exactly one replica wrote"
    );
}

#[tokio::test]
async fn without_its_webhook_configuration_nothing_is_written() {
    let api = FakeApi::default();
    let error = ensure(&cert_api(&api), &names(), SystemTime::now())
        .await
        .unwrap_err();
    let text = fanout_webhook::tls::error_chain(&error);
    assert!(
        text.contains("reading MutatingWebhookConfiguration fanout"),
        "{text}"
    );
    assert!(api.secret().is_none());
}

/// While running, a certificate another replica renewed in the Secret is served without a
/// restart.
#[tokio::test]
async fn a_running_webhook_serves_the_renewed_certificate_without_restarting() {
    let api = FakeApi::with_webhook_configuration();
    let cert = autocert::start(&cert_api(&api), &names()).await;
    let first = api.secret_data();
    let bundle = first["ca.crt"].clone();
    assert_eq!(
        handshake(cert.clone(), &bundle).await.unwrap(),
        der_of(&first["tls.crt"])
    );

    // Another replica reissues the serving certificate under the same CA.
    let current = Bundle::from_data(
        &first
            .iter()
            .map(|(k, v)| (k.clone(), k8s_openapi::ByteString(v.clone().into_bytes())))
            .collect(),
    )
    .unwrap();
    let renewed = current.reissue(&names()).unwrap();
    api.put_secret(&as_data(&renewed));

    tokio::spawn(autocert::keep_current(
        cert_api(&api),
        names(),
        cert.clone(),
        Duration::from_millis(20),
    ));
    let want = der_of(&renewed.tls_cert);
    for _ in 0..250 {
        if handshake(cert.clone(), &bundle).await.unwrap() == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the renewed certificate was not served within 5 s");
}

#[test]
fn the_secret_value_of_a_bundle_round_trips() {
    let bundle = bundle_lasting(3650, 365, &names());
    assert_eq!(Bundle::from_data(&bundle.to_data()), Some(bundle));
}
