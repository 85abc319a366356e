//! The cluster suite: the whole product on a real cluster. Ignored unless asked for (`make
//! e2e-kind` on kind, `make e2e-cluster` against `KUBECONFIG`); it needs `KUBECONFIG`, `helm` on
//! the PATH, and the images in the cluster (`make e2e-kind` builds and loads them), named by
//! `FANOUT_IMAGE_REPO` / `FANOUT_IMAGE_TAG` (default `ghcr.io/fanout-dev` / `dev`).
//!
//! It installs the chart and opts a fresh namespace in, then runs its cases there in turn:
//! - `spread`: 5 backend pods behind a ClusterIP Service (port targeting the container port by
//!   name); gateway pods whose proxies have just
//!   started make calls one at a time and 4 connections × 8 in flight, and every backend pod
//!   answers at least half of its fair share in every window of 1,000 calls; what the API
//!   server stored: the gateways injected, opted-out pods not.
//! - `discovery`: the same behind a headless Service; `rollout restart` of the backends under
//!   continuous load fails no call; a scale-up's new pods take calls within 1 s of turning
//!   Ready; EndpointSlice change → proxy endpoint set latency, printed.
//! - `readiness`: with the backends scaled to 0, a caller with the default (`proxy`) readiness
//!   stays Ready and one with `fanout.dev/readiness: upstreams` turns NotReady, then Ready
//!   again when a backend is back.
//! - `grpc_health`: a gRPC server pod with only `fanout.dev/grpc-health` is injected, and
//!   another pod's HTTP GETs of its `:15020/grpc-health` follow its NOT_SERVING → SERVING.
//! - `policy`: a Service's `fanout.dev/service-config` decides retries (`maxAttempts` 5: no
//!   failures over backends failing 10 %; 1: about 10 %), an edit reaches a running proxy
//!   within 1 s, a 200 ms method timeout ends 1 s calls at about 200 ms, and a 90/10 canary
//!   split in `fanout.dev/policy` holds within ±2 points over 10,000 calls.
//!
//! The namespace is deleted however the cases end; the test waits until it is gone.
//! `FANOUT_E2E_CASES` (comma-separated) runs only some of the cases after `spread`, e.g. to
//! measure an older proxy's spread alone (`FANOUT_E2E_CASES=spread`); `FANOUT_E2E_HELM_SET`
//! passes chart values (`discovery.enabled=false` compares DNS discovery).

mod discovery;
mod grpc_health;
mod policy;
mod readiness;
mod spread;
mod support;

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::{Api, Client};

use support::{RELEASE, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster: make e2e-kind"]
async fn the_product_on_a_real_cluster() {
    assert!(
        std::env::var_os("KUBECONFIG").is_some(),
        "the cluster suite needs KUBECONFIG"
    );
    let _ = rustls::crypto::ring::default_provider().install_default();
    support::helm_install();
    let client = Client::try_default()
        .await
        .expect("a cluster from KUBECONFIG");

    // The webhook set its caBundle (auto certificates).
    let configurations: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    eventually("caBundle set", Duration::from_secs(120), || async {
        let configuration = configurations
            .get(RELEASE)
            .await
            .map_err(|e| e.to_string())?;
        let webhooks = configuration.webhooks.unwrap_or_default();
        match webhooks
            .first()
            .and_then(|w| w.client_config.ca_bundle.clone())
        {
            Some(bundle) if !bundle.0.is_empty() => Ok(()),
            _ => Err("no caBundle yet".to_string()),
        }
    })
    .await;

    let namespace = support::create_namespace(&client).await;
    eprintln!("namespace {namespace}");
    // The cases run inside catch_unwind rather than with a guard whose Drop blocks on the
    // API: the namespace is deleted, and waited for, on this runtime however they end.
    let wanted = std::env::var("FANOUT_E2E_CASES").unwrap_or_default();
    let runs = |case: &str| wanted.is_empty() || wanted.split(',').any(|c| c.trim() == case);
    let outcome = AssertUnwindSafe(async {
        let gateway = spread::run(&client, &namespace).await;
        if runs("discovery") {
            discovery::run(&client, &namespace).await;
        }
        if runs("readiness") {
            readiness::run(&client, &namespace).await;
        }
        if runs("grpc_health") {
            grpc_health::run(&client, &namespace).await;
        }
        if runs("policy") {
            policy::run(&client, &namespace).await;
        }
        gateway
    })
    .catch_unwind()
    .await;
    if outcome.is_err() {
        support::dump(&client, &namespace).await;
    }
    support::delete_namespace(&client, &namespace).await;
    match outcome {
        // Last, for the reader of the log: the cold gateway's calls per backend pod.
        Ok(gateway) => eprintln!("gateway: {gateway}"),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}
