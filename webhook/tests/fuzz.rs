//! The handler never panics: random bytes, truncated reviews, and random pods. Where a random
//! pod is injected, the patch applies and the stored pod is well formed.

mod common;

use common::{Answer, admitter, fixtures};
use k8s_openapi::api::core::v1::Pod;
use proptest::prelude::*;
use serde_json::{Map, Value, json};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

fn upstreams_value() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => "[a-z0-9.:=, -]{0,40}",
        3 => prop::collection::vec(
            ("[a-z][a-z0-9]{0,8}", prop::option::of("[a-z]{1,6}"), 1u32..66000, prop::option::weighted(0.2, 1000u32..66000)),
            1..4
        )
        .prop_map(|entries: Vec<(String, Option<String>, u32, Option<u32>)>| entries
            .into_iter()
            .map(|(svc, ns, port, local)| {
                let mut s = svc;
                if let Some(ns) = ns {
                    s = format!("{s}.{ns}");
                }
                s = format!("{s}:{port}");
                if let Some(local) = local {
                    s = format!("{s}={local}");
                }
                s
            })
            .collect::<Vec<_>>()
            .join(",")),
    ]
}

fn container(index: usize) -> impl Strategy<Value = Value> {
    (
        prop::option::of(prop::collection::vec(
            prop_oneof![
                Just("A".to_string()),
                Just("FANOUT_UPSTREAM_APP".to_string()),
                "[A-Z]{1,5}"
            ],
            0..3,
        )),
        prop::option::of(prop::collection::vec(1i64..70000, 0..2)),
        prop::option::of(Just("Always")),
    )
        .prop_map(move |(env, ports, restart)| {
            let mut c = json!({"name": format!("c{index}"), "image": "example.com/x:1"});
            if let Some(env) = env {
                c["env"] = env
                    .into_iter()
                    .map(|n| json!({"name": n, "value": "v"}))
                    .collect();
            }
            if let Some(ports) = ports {
                c["ports"] = ports
                    .into_iter()
                    .map(|p| json!({"containerPort": p}))
                    .collect();
            }
            if let Some(r) = restart {
                c["restartPolicy"] = json!(r);
            }
            c
        })
}

fn pod() -> impl Strategy<Value = Value> {
    (
        prop::option::of((
            prop::option::of(upstreams_value()),
            prop::option::weighted(
                0.2,
                prop_oneof![Just("disabled"), Just("enabled"), Just("maybe")],
            ),
            prop::option::weighted(
                0.3,
                prop_oneof![Just("true"), Just("false"), Just("perhaps")],
            ),
            prop::option::weighted(0.2, "[0-9]{1,2}(Mi|x)?"),
        )),
        prop::collection::vec(container(0), 0..3),
        prop::option::of(prop::collection::vec(container(10), 0..2)),
        prop::option::of(Just(json!([{"name": "data", "emptyDir": {}}]))),
        prop::bool::weighted(0.1),
    )
        .prop_map(|(annotations, containers, init, volumes, host_network)| {
            let containers: Vec<Value> = containers
                .into_iter()
                .enumerate()
                .map(|(i, mut c)| {
                    c["name"] = json!(format!("app{i}"));
                    c
                })
                .collect();
            let mut spec = json!({"containers": containers});
            if let Some(init) = init {
                let init: Vec<Value> = init
                    .into_iter()
                    .enumerate()
                    .map(|(i, mut c)| {
                        c["name"] = json!(format!("init{i}"));
                        c
                    })
                    .collect();
                spec["initContainers"] = json!(init);
            }
            if let Some(v) = volumes {
                spec["volumes"] = v;
            }
            if host_network {
                spec["hostNetwork"] = json!(true);
            }
            let mut metadata = json!({"name": "p", "namespace": "shop"});
            if let Some((upstreams, inject, native, memory)) = annotations {
                let mut map = Map::new();
                if let Some(u) = upstreams {
                    map.insert("fanout.dev/upstreams".into(), json!(u));
                }
                if let Some(i) = inject {
                    map.insert("fanout.dev/inject".into(), json!(i));
                }
                if let Some(n) = native {
                    map.insert("fanout.dev/native-sidecar".into(), json!(n));
                }
                if let Some(m) = memory {
                    map.insert("fanout.dev/proxy-memory-request".into(), json!(m));
                }
                metadata["annotations"] = Value::Object(map);
            }
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec})
        })
}

fn review_of(pod: Value) -> Value {
    let mut review = fixtures().remove(0).1;
    review["request"]["object"] = pod;
    review
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = runtime().block_on(admitter().review(&body));
    }

    #[test]
    fn truncated_fixtures_never_panic(index in 0usize..7, cut in 0usize..7000) {
        let text = serde_json::to_vec(&fixtures()[index].1).unwrap();
        let cut = cut.min(text.len());
        let _ = runtime().block_on(admitter().review(&text[..cut]));
    }

    #[test]
    fn random_pods_are_answered_and_patches_apply(pod in pod()) {
        let review = review_of(pod.clone());
        let body = serde_json::to_vec(&review).unwrap();
        let response = runtime().block_on(admitter().review(&body)).expect("a pod review is always answered");
        let answer = Answer::parse(&response);
        if answer.patch.is_some() {
            let stored = answer.patched(&review);
            let typed: Pod = serde_json::from_value(stored.clone()).expect("stored pod is a Pod");
            let spec = typed.spec.unwrap();
            let proxies = spec.containers.iter().chain(spec.init_containers.iter().flatten())
                .filter(|c| c.name == "fanout-proxy").count();
            prop_assert_eq!(proxies, 1);
            let config = stored["metadata"]["annotations"]["fanout.dev/proxy-config"].as_str().unwrap();
            prop_assert!(fanout_proxy_config::ProxyConfig::from_json(config).is_ok());
            // The original containers are all still there, in order.
            let before: Vec<&str> = pod["spec"]["containers"].as_array().unwrap().iter()
                .map(|c| c["name"].as_str().unwrap()).collect();
            let after: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str())
                .filter(|n| *n != "fanout-proxy").collect();
            prop_assert_eq!(before, after);
        } else if !answer.allowed() {
            let message = answer.response["status"]["message"].as_str().unwrap();
            prop_assert!(message.contains("annotation fanout.dev/"), "{}", message);
        }
    }
}
