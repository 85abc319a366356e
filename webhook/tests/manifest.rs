//! `fanout-webhook inject`: manifests in, injected manifests out, the same code path as the
//! admission server.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use fanout_webhook::lookup::NoLookup;
use fanout_webhook::manifest::inject_yaml;
use serde_json::Value;

const WORKLOADS: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {a: "1"}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: gateway, namespace: shop}
spec:
  replicas: 4
  selector: {matchLabels: {app: gateway}}
  template:
    metadata:
      labels: {app: gateway}
      annotations: {fanout.dev/upstreams: "app:50051"}
    spec:
      containers:
      - name: gateway
        image: example.com/gateway:1
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: report}
spec:
  schedule: "0 * * * *"
  jobTemplate:
    spec:
      template:
        metadata:
          annotations: {fanout.dev/upstreams: "billing.payments:9000", fanout.dev/native-sidecar: "true"}
        spec:
          restartPolicy: OnFailure
          containers: [{name: report, image: example.com/report:1}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: plain}
spec:
  selector: {matchLabels: {app: plain}}
  serviceName: plain
  template:
    metadata: {labels: {app: plain}}
    spec:
      containers: [{name: plain, image: example.com/plain:1}]
"#;

fn docs(yaml: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

#[tokio::test]
async fn workload_templates_are_injected_and_other_kinds_pass_through() {
    let (output, reports) = inject_yaml(WORKLOADS, "default", &common::settings(), &NoLookup)
        .await
        .unwrap();
    let out = docs(&output);
    let input = docs(WORKLOADS);
    assert_eq!(out.len(), 4);
    assert_eq!(out[0], input[0], "ConfigMap unchanged");
    assert_eq!(out[3], input[3], "StatefulSet without upstreams unchanged");

    let template = &out[1]["spec"]["template"];
    assert_eq!(template["spec"]["containers"][0]["name"], "fanout-proxy");
    assert_eq!(
        template["spec"]["containers"][1]["env"][0]["name"],
        "FANOUT_UPSTREAM_APP"
    );
    let config = template["metadata"]["annotations"]["fanout.dev/proxy-config"]
        .as_str()
        .unwrap();
    let config = fanout_proxy_config::ProxyConfig::from_json(config).unwrap();
    assert_eq!(
        config.upstreams[0].name, "app.shop",
        "the Deployment's namespace is used"
    );
    assert_eq!(
        out[1]["spec"]["replicas"], 4,
        "the rest of the object is kept"
    );

    let job = &out[2]["spec"]["jobTemplate"]["spec"]["template"];
    assert_eq!(job["spec"]["initContainers"][0]["name"], "fanout-proxy");
    assert_eq!(
        job["spec"]["initContainers"][0]["restartPolicy"], "Always",
        "so the Job completes"
    );
    let config = job["metadata"]["annotations"]["fanout.dev/proxy-config"]
        .as_str()
        .unwrap();
    assert!(config.contains("billing.payments.svc.cluster.local"));

    let objects: Vec<&str> = reports.iter().map(|r| r.object.as_str()).collect();
    assert_eq!(
        objects,
        ["deployment/gateway", "cronjob/report", "statefulset/plain"]
    );
    assert!(
        reports[2].result.contains("neither a fanout.dev/upstreams"),
        "{}",
        reports[2].result
    );

    // Injecting the output again changes nothing.
    let (again, _) = inject_yaml(&output, "default", &common::settings(), &NoLookup)
        .await
        .unwrap();
    assert_eq!(docs(&again), out);
}

#[tokio::test]
async fn a_list_is_injected_item_by_item() {
    let list = r#"{"apiVersion":"v1","kind":"List","items":[
        {"apiVersion":"v1","kind":"Pod","metadata":{"name":"a","annotations":{"fanout.dev/upstreams":"x:1"}},
         "spec":{"containers":[{"name":"c","image":"i"}]}}]}"#;
    let (output, _) = inject_yaml(list, "default", &common::settings(), &NoLookup)
        .await
        .unwrap();
    assert_eq!(
        docs(&output)[0]["items"][0]["spec"]["containers"][0]["name"],
        "fanout-proxy"
    );
}

#[tokio::test]
async fn a_malformed_annotation_fails_naming_the_object() {
    let bad = WORKLOADS.replace("app:50051", "app:http-port-name-too-long");
    let err = inject_yaml(&bad, "default", &common::settings(), &NoLookup)
        .await
        .unwrap_err();
    let err = err.to_string();
    assert!(
        err.starts_with("deployment/gateway: fanout: annotation fanout.dev/upstreams"),
        "{err}"
    );
}

#[test]
fn the_command_reads_stdin_and_writes_yaml() {
    let output = inject(
        &["--no-lookup", "--proxy-image", "fanout/fanout-proxy:cli"],
        WORKLOADS,
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let out = docs(&String::from_utf8(output.stdout).unwrap());
    assert_eq!(
        out[1]["spec"]["template"]["spec"]["containers"][0]["image"],
        "fanout/fanout-proxy:cli"
    );
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("deployment/gateway: injected, upstreams app.shop"),
        "{stderr}"
    );

    let output = Command::new(env!("CARGO_BIN_EXE_fanout-webhook"))
        .args(["inject", "--no-lookup", "-f", "/nonexistent.yaml"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("reading /nonexistent.yaml"));

    let output = Command::new(env!("CARGO_BIN_EXE_fanout-webhook"))
        .args(["inject", "--no-lookup", "--proxy-memory-limit", "lots"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--proxy-memory-limit: \"lots\""));
}

/// `fanout-webhook inject <args>` with `yaml` on standard input.
fn inject(args: &[&str], yaml: &str) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fanout-webhook"))
        .arg("inject")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// The rendered proxy config of the first pod template in `yaml`'s output.
fn rendered_config(args: &[&str], yaml: &str) -> fanout_proxy_config::ProxyConfig {
    let output = inject(args, yaml);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let out = docs(&String::from_utf8(output.stdout).unwrap());
    let annotation =
        out[0]["spec"]["template"]["metadata"]["annotations"]["fanout.dev/proxy-config"]
            .as_str()
            .unwrap()
            .to_string();
    fanout_proxy_config::ProxyConfig::from_json(&annotation).unwrap()
}

const NAMED_PORT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: gateway, namespace: shop}
spec:
  selector: {matchLabels: {app: gateway}}
  template:
    metadata:
      labels: {app: gateway}
      annotations: {fanout.dev/upstreams: "app:grpc"}
    spec:
      containers: [{name: gateway, image: example.com/gateway:1}]
"#;

#[test]
fn a_port_name_is_injected_without_a_lookup_as_srv_discovery() {
    use fanout_proxy_config::{Discovery, ServicePort};
    let config = rendered_config(&["--no-lookup"], NAMED_PORT);
    match &config.upstreams[0].discovery {
        Discovery::Srv(srv) => assert_eq!(srv.name, "_grpc._tcp.app.shop.svc.cluster.local"),
        other => panic!("expected SRV discovery, got {other:?}"),
    }
    assert_eq!(config.discovery_server, None);

    // With a discovery server: subscribe to the Service's port by name, SRV as the fallback.
    let dir = tempfile::tempdir().unwrap();
    let ca = fanout_certs::Ca::generate("test CA", std::time::Duration::from_secs(3600)).unwrap();
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    let config = rendered_config(
        &[
            "--no-lookup",
            "--discovery-address",
            "fanout-webhook.fanout-system.svc:15012",
            "--discovery-ca-file",
            ca_file.to_str().unwrap(),
        ],
        NAMED_PORT,
    );
    match &config.upstreams[0].discovery {
        Discovery::Endpoints(endpoints) => {
            assert_eq!(
                (endpoints.namespace.as_str(), endpoints.service.as_str()),
                ("shop", "app")
            );
            assert_eq!(endpoints.port, ServicePort::Name("grpc".into()));
            assert!(
                matches!(&*endpoints.fallback, Discovery::Srv(_)),
                "{endpoints:?}"
            );
        }
        other => panic!("expected endpoints discovery, got {other:?}"),
    }
    let server = config.discovery_server.unwrap();
    assert_eq!(server.address, "fanout-webhook.fanout-system.svc:15012");
    assert_eq!(server.ca, ca.cert_pem());
}
