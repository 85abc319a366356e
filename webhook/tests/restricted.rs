//! The pod stored in the `secure` namespace (Pod Security "restricted", enforced) must pass every
//! check of the restricted profile, for every container — the API server would refuse it
//! otherwise. Checks follow the Pod Security Standards (baseline + restricted), v1.28.

mod common;

use common::{Answer, admitter, fixture};
use serde_json::{Value, json};

const RESTRICTED_VOLUME_TYPES: [&str; 8] = [
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
];

/// Every violation of the restricted profile, one line each.
fn restricted_violations(pod: &Value) -> Vec<String> {
    let spec = &pod["spec"];
    let pod_sc = &spec["securityContext"];
    let mut v = Vec::new();
    for field in ["hostNetwork", "hostPID", "hostIPC"] {
        if spec[field] == true {
            v.push(format!("spec.{field} is true"));
        }
    }
    for volume in spec["volumes"].as_array().into_iter().flatten() {
        let name = volume["name"].as_str().unwrap_or("?");
        let kinds: Vec<&String> = volume
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| *k != "name")
            .collect();
        for kind in kinds {
            if !RESTRICTED_VOLUME_TYPES.contains(&kind.as_str()) {
                v.push(format!("volume {name} has restricted type {kind}"));
            }
        }
    }
    if pod_sc["runAsUser"] == 0 {
        v.push("pod runAsUser is 0".into());
    }
    let pod_seccomp = pod_sc["seccompProfile"]["type"].as_str();
    if pod_seccomp == Some("Unconfined") {
        v.push("pod seccompProfile is Unconfined".into());
    }
    for (list, c) in ["initContainers", "containers", "ephemeralContainers"]
        .iter()
        .flat_map(|l| {
            spec[*l]
                .as_array()
                .into_iter()
                .flatten()
                .map(move |c| (*l, c))
        })
    {
        let name = format!("{list}/{}", c["name"].as_str().unwrap_or("?"));
        let sc = &c["securityContext"];
        if sc["privileged"] == true {
            v.push(format!("{name}: privileged"));
        }
        if sc["allowPrivilegeEscalation"] != false {
            v.push(format!("{name}: allowPrivilegeEscalation is not false"));
        }
        let drops = sc["capabilities"]["drop"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if !drops.contains(&json!("ALL")) {
            v.push(format!("{name}: capabilities do not drop ALL"));
        }
        for added in sc["capabilities"]["add"].as_array().into_iter().flatten() {
            if added != "NET_BIND_SERVICE" {
                v.push(format!("{name}: adds capability {added}"));
            }
        }
        let non_root = sc["runAsNonRoot"] == true
            || (pod_sc["runAsNonRoot"] == true && sc["runAsNonRoot"] != false);
        if !non_root {
            v.push(format!("{name}: runAsNonRoot not set to true"));
        }
        if sc["runAsUser"] == 0 {
            v.push(format!("{name}: runAsUser is 0"));
        }
        let seccomp = sc["seccompProfile"]["type"].as_str().or(pod_seccomp);
        if !matches!(seccomp, Some("RuntimeDefault" | "Localhost")) {
            v.push(format!("{name}: seccompProfile is {seccomp:?}"));
        }
        for port in c["ports"].as_array().into_iter().flatten() {
            if port.get("hostPort").is_some_and(|p| p != 0) {
                v.push(format!("{name}: hostPort {}", port["hostPort"]));
            }
        }
        if sc.get("procMount").is_some_and(|p| p != "Default") {
            v.push(format!("{name}: procMount"));
        }
        if sc["windowsOptions"]["hostProcess"] == true {
            v.push(format!("{name}: hostProcess"));
        }
    }
    v
}

#[tokio::test]
async fn injected_pod_in_the_restricted_namespace_meets_the_restricted_profile() {
    let review = fixture("pod-restricted-namespace");
    let before = &review["request"]["object"];
    assert!(
        restricted_violations(before).is_empty(),
        "the fixture itself is restricted"
    );

    let body = serde_json::to_vec(&review).unwrap();
    let answer = Answer::parse(&admitter().review(&body).await.unwrap());
    let pod = answer.patched(&review);
    let containers: Vec<&str> = pod["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert!(containers.contains(&"fanout-proxy"), "{containers:?}");
    assert_eq!(restricted_violations(&pod), Vec::<String>::new());
}

#[tokio::test]
async fn the_proxy_is_restricted_on_its_own_in_any_pod() {
    // A pod with no pod-level security context: the proxy must not rely on one.
    let review = fixture("pod-generatename-no-volumes");
    let body = serde_json::to_vec(&review).unwrap();
    let pod = Answer::parse(&admitter().review(&body).await.unwrap()).patched(&review);
    let violations = restricted_violations(&pod);
    assert!(
        violations
            .iter()
            .all(|v| v.starts_with("containers/gateway")),
        "the proxy violates: {violations:?}"
    );
    let proxy = &pod["spec"]["containers"][0]["securityContext"];
    assert_eq!(proxy["runAsUser"], 65532);
    assert_eq!(proxy["readOnlyRootFilesystem"], true);
}

#[test]
fn the_checker_catches_violations() {
    let pod = json!({"spec": {
        "hostNetwork": true,
        "volumes": [{"name": "h", "hostPath": {"path": "/"}}],
        "containers": [{"name": "c", "ports": [{"containerPort": 1, "hostPort": 80}],
            "securityContext": {"privileged": true, "capabilities": {"add": ["NET_ADMIN"]}}}]
    }});
    let v = restricted_violations(&pod);
    for expected in [
        "spec.hostNetwork is true",
        "volume h has restricted type hostPath",
        "containers/c: privileged",
        "containers/c: allowPrivilegeEscalation is not false",
        "containers/c: capabilities do not drop ALL",
        "containers/c: adds capability \"NET_ADMIN\"",
        "containers/c: runAsNonRoot not set to true",
        "containers/c: seccompProfile is None",
        "containers/c: hostPort 80",
    ] {
        assert!(
            v.contains(&expected.to_string()),
            "{expected} not caught: {v:?}"
        );
    }
}
