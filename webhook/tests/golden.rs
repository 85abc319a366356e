//! Golden tests over every recorded AdmissionReview: the exact patch and the stored pod.
//! `UPDATE_GOLDEN=1 cargo test -p fanout-webhook --test golden` rewrites the golden files.

mod common;

use std::path::PathBuf;

use common::{Answer, admitter, fixture, fixtures};
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/golden/{name}.json"))
}

fn check_golden(name: &str, actual: &Value) {
    let path = golden_path(name);
    let text = serde_json::to_string_pretty(actual).unwrap() + "\n";
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &text).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("{} missing; run with UPDATE_GOLDEN=1", path.display()));
    assert_eq!(
        text, expected,
        "{name} differs from its golden file (UPDATE_GOLDEN=1 rewrites)"
    );
}

async fn answer(review: &Value) -> Answer {
    let body = serde_json::to_vec(review).unwrap();
    Answer::parse(
        &admitter()
            .review(&body)
            .await
            .expect("fixture is a valid review"),
    )
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .map(|a| a.iter().map(|c| c["name"].as_str().unwrap()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn every_fixture_matches_its_golden_patch_and_pod() {
    for (name, review) in fixtures() {
        let answer = answer(&review).await;
        assert_eq!(
            answer.response["uid"], review["request"]["uid"],
            "{name}: uid echoed"
        );
        assert!(answer.allowed(), "{name}: {}", answer.response);
        let injected = matches!(
            name.as_str(),
            "pod-dry-run"
                | "pod-generatename-no-volumes"
                | "pod-native-sidecar-two-upstreams"
                | "pod-restricted-namespace"
        );
        if !injected {
            assert!(answer.patch.is_none(), "{name} must not be patched");
            continue;
        }
        let patch = answer
            .patch
            .as_ref()
            .unwrap_or_else(|| panic!("{name} not patched"));
        let pod = answer.patched(&review);
        // What the API server would store must still be a well-formed Pod.
        let typed: Pod = serde_json::from_value(pod.clone()).unwrap();
        assert!(typed.spec.is_some());
        check_golden(
            &format!("{name}.patch"),
            &json!({"warnings": answer.warnings(), "patch": patch}),
        );
        check_golden(&format!("{name}.pod"), &pod);
    }
}

#[tokio::test]
async fn dry_run_gets_the_same_patch_as_its_twin() {
    let dry = answer(&fixture("pod-dry-run")).await;
    let real = answer(&fixture("pod-generatename-no-volumes")).await;
    assert_eq!(fixture("pod-dry-run")["request"]["dryRun"], true);
    assert!(dry.patch.is_some());
    assert_eq!(
        serde_json::to_value(&dry.patch).unwrap(),
        serde_json::to_value(&real.patch).unwrap()
    );
}

#[tokio::test]
async fn generate_name_pod_without_volumes_or_init_containers() {
    let review = fixture("pod-generatename-no-volumes");
    let pod = answer(&review).await.patched(&review);
    let spec = &pod["spec"];
    // No native sidecars on the recording server for a plain pod: first container + postStart.
    assert_eq!(names(&spec["containers"]), ["fanout-proxy", "gateway"]);
    let proxy = &spec["containers"][0];
    assert_eq!(
        proxy["lifecycle"]["postStart"]["exec"]["command"],
        json!(["fanout-proxy", "wait", "--timeout", "60s"])
    );
    assert!(spec.get("initContainers").is_none());
    assert_eq!(names(&spec["volumes"]), ["fanout-config"]);
    assert_eq!(
        spec["volumes"][0]["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"],
        "metadata.annotations['fanout.dev/proxy-config']"
    );
    assert_eq!(
        proxy["volumeMounts"],
        json!([{"mountPath": "/etc/fanout", "name": "fanout-config", "readOnly": true}])
    );
    assert_eq!(
        proxy["args"],
        json!(["run", "--config", "/etc/fanout/config.json"])
    );
    assert_eq!(proxy["ports"][0]["containerPort"], 15020);
    assert_eq!(proxy["ports"][0]["name"], "fanout-admin");
    assert_eq!(proxy["livenessProbe"]["httpGet"]["path"], "/live");
    assert_eq!(proxy["readinessProbe"]["httpGet"]["path"], "/ready/proxy");
    assert_eq!(
        proxy["resources"],
        json!({"limits": {"memory": "64Mi"}, "requests": {"cpu": "10m", "memory": "16Mi"}})
    );
    let gateway = &spec["containers"][1];
    assert_eq!(
        gateway["env"],
        json!([
            {"name": "APP_ADDR", "value": "127.0.0.1:15001"},
            {"name": "FANOUT_UPSTREAM_APP", "value": "127.0.0.1:15001"}
        ])
    );
    // The rendered config reads back with the proxy's own parser.
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["fanout.dev/injected"], "test");
    let config = fanout_proxy_config::ProxyConfig::from_json(
        annotations["fanout.dev/proxy-config"].as_str().unwrap(),
    )
    .unwrap();
    assert_eq!(config.upstreams.len(), 1);
    assert_eq!(config.upstreams[0].name, "app.shop");
    assert_eq!(config.upstreams[0].listen.to_string(), "127.0.0.1:15001");
    match &config.upstreams[0].discovery {
        fanout_proxy_config::Discovery::Dns(dns) => {
            assert_eq!(dns.name, "app.shop.svc.cluster.local");
            assert_eq!(dns.port, 50051);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn pod_with_a_native_sidecar_gets_the_proxy_as_first_native_sidecar() {
    let review = fixture("pod-native-sidecar-two-upstreams");
    let answer = answer(&review).await;
    let pod = answer.patched(&review);
    let spec = &pod["spec"];
    assert_eq!(
        names(&spec["initContainers"]),
        ["fanout-proxy", "log-shipper"]
    );
    assert_eq!(names(&spec["containers"]), ["main"]);
    let proxy = &spec["initContainers"][0];
    assert_eq!(proxy["restartPolicy"], "Always");
    assert_eq!(proxy["startupProbe"]["httpGet"]["path"], "/live");
    assert!(proxy.get("lifecycle").is_none());
    assert_eq!(names(&spec["volumes"]), ["cfg", "fanout-config"]);
    let env = json!([
        {"name": "A", "value": "1"},
        {"name": "FANOUT_UPSTREAM_APP", "value": "127.0.0.1:15001"},
        {"name": "FANOUT_UPSTREAM_BILLING_PAYMENTS", "value": "127.0.0.1:15002"}
    ]);
    assert_eq!(spec["containers"][0]["env"], env);
    // payments/billing does not exist yet: injected anyway, with a warning kubectl prints.
    let warnings = answer.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("Service payments/billing not found"),
        "{warnings:?}"
    );
}

#[tokio::test]
async fn restricted_pod_resolves_its_named_port() {
    let review = fixture("pod-restricted-namespace");
    let answer = answer(&review).await;
    assert!(answer.warnings().is_empty(), "{:?}", answer.warnings());
    let pod = answer.patched(&review);
    let config = pod["metadata"]["annotations"]["fanout.dev/proxy-config"]
        .as_str()
        .unwrap();
    let config = fanout_proxy_config::ProxyConfig::from_json(config).unwrap();
    let fanout_proxy_config::Discovery::Dns(dns) = &config.upstreams[0].discovery else {
        panic!()
    };
    assert_eq!(
        (dns.name.as_str(), dns.port),
        ("app.shop.svc.cluster.local", 50051)
    );
    assert_eq!(
        pod["spec"]["containers"][1]["env"],
        json!([{"name": "FANOUT_UPSTREAM_APP_SHOP", "value": "127.0.0.1:15001"}])
    );
}

#[tokio::test]
async fn skipped_pods_are_allowed_unchanged_and_counted_with_their_reason() {
    let admitter = admitter();
    for name in [
        "pod-opted-out",
        "pod-host-network",
        "pod-init-container-and-volumes",
    ] {
        let body = serde_json::to_vec(&fixture(name)).unwrap();
        let answer = Answer::parse(&admitter.review(&body).await.unwrap());
        assert!(answer.allowed() && answer.patch.is_none(), "{name}");
    }
    let metrics = admitter.metrics.encode();
    for reason in ["opted-out", "host-network", "no-upstreams"] {
        let line =
            format!("fanout_webhook_admissions_total{{result=\"skipped\",reason=\"{reason}\"}} 1");
        assert!(metrics.contains(&line), "{line} missing from\n{metrics}");
    }
}

#[tokio::test]
async fn already_injected_pods_are_left_alone() {
    // Reinvocation (reinvocationPolicy: IfNeeded) hands the webhook its own output.
    for name in [
        "pod-generatename-no-volumes",
        "pod-native-sidecar-two-upstreams",
    ] {
        let review = fixture(name);
        let pod = answer(&review).await.patched(&review);
        let mut again = review.clone();
        again["request"]["object"] = pod;
        let answer = answer(&again).await;
        assert!(
            answer.allowed() && answer.patch.is_none(),
            "{name} injected twice"
        );
    }
    // A container named fanout-proxy, without the annotation, also counts.
    let mut review = fixture("pod-generatename-no-volumes");
    review["request"]["object"]["spec"]["containers"][0]["name"] = json!("fanout-proxy");
    assert!(answer(&review).await.patch.is_none());
}
