use super::*;

fn faults(json: &str) -> Vec<String> {
    ServiceConfig::parse(json).unwrap_err().lines()
}

/// The retry example of gRFC A6 (gRPC retry design), and the features/retry example of
/// grpc-go with its field names as the proto spells them.
#[test]
fn reads_the_documented_examples() {
    let config = ServiceConfig::parse(
        r#"{
          "loadBalancingConfig": [{"round_robin": {}}],
          "methodConfig": [{
            "name": [{"service": "grpc.examples.echo.Echo"}],
            "waitForReady": true,
            "timeout": "1.5s",
            "retryPolicy": {
              "maxAttempts": 4,
              "initialBackoff": "0.1s",
              "maxBackoff": "1s",
              "backoffMultiplier": 2,
              "retryableStatusCodes": ["UNAVAILABLE"]
            }
          }],
          "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1}
        }"#,
    )
    .unwrap();
    assert_eq!(config.balancer, Some(Balancer::RoundRobin));
    let method = &config.methods[0];
    assert_eq!(method.wait_for_ready, Some(true));
    assert_eq!(method.timeout, Some(Duration::from_millis(1500)));
    assert_eq!(
        method.retry,
        Some(RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            backoff_multiplier: 2.0,
            retryable_status_codes: vec![14],
            per_attempt_recv_timeout: None,
        })
    );
    assert_eq!(
        config.retry_throttling,
        Some(RetryThrottling {
            max_tokens: 10,
            token_ratio: 0.1
        })
    );
}

#[test]
fn reads_snake_case_names_numbers_as_strings_and_codes_as_numbers() {
    let config = ServiceConfig::parse(
        r#"{"method_config": [{"name": [{}], "wait_for_ready": false,
            "max_request_message_bytes": "4194304",
            "retry_policy": {"max_attempts": "9", "initial_backoff": "0.000000001s",
              "max_backoff": "30s", "backoff_multiplier": 1.5,
              "retryable_status_codes": [14, "CANCELLED", 14],
              "per_attempt_recv_timeout": "2s"}}],
            "health_check_config": {"service_name": "shop.Cart"},
            "load_balancing_policy": "ROUND_ROBIN"}"#,
    )
    .unwrap();
    let method = &config.methods[0];
    assert_eq!(method.max_request_bytes, Some(4 << 20));
    let retry = method.retry.as_ref().unwrap();
    // gRPC takes more than 5 attempts as 5.
    assert_eq!(retry.max_attempts, MAX_ATTEMPTS_CAP);
    assert_eq!(retry.initial_backoff, Duration::from_nanos(1));
    assert_eq!(retry.retryable_status_codes, [1, 14]);
    assert_eq!(retry.per_attempt_recv_timeout, Some(Duration::from_secs(2)));
    // One attempt: the owner's way to switch retries off.
    let off = ServiceConfig::parse(
        r#"{"methodConfig": [{"name": [{}], "retryPolicy": {"maxAttempts": 1,
            "initialBackoff": "1s", "maxBackoff": "1s", "backoffMultiplier": 1,
            "retryableStatusCodes": ["UNAVAILABLE"]}}]}"#,
    )
    .unwrap();
    assert_eq!(off.methods[0].retry.as_ref().unwrap().max_attempts, 1);
    assert_eq!(config.health_check_service.as_deref(), Some("shop.Cart"));
    assert_eq!(config.balancer, Some(Balancer::RoundRobin));
}

#[test]
fn a_call_gets_its_method_then_its_service_then_the_default() {
    let config = ServiceConfig::parse(
        r#"{"methodConfig": [
            {"name": [{}], "timeout": "10s"},
            {"name": [{"service": "shop.Cart"}], "timeout": "2s"},
            {"name": [{"service": "shop.Cart", "method": "Checkout"},
                      {"service": "shop.Orders", "method": "Get"}], "timeout": "0.2s"}
        ]}"#,
    )
    .unwrap();
    let timeout = |path: &str| config.method(path).and_then(|m| m.timeout);
    assert_eq!(
        timeout("/shop.Cart/Checkout"),
        Some(Duration::from_millis(200))
    );
    assert_eq!(
        timeout("/shop.Orders/Get"),
        Some(Duration::from_millis(200))
    );
    assert_eq!(timeout("/shop.Cart/Add"), Some(Duration::from_secs(2)));
    assert_eq!(timeout("/shop.Orders/List"), Some(Duration::from_secs(10)));
    assert_eq!(timeout("not a path"), Some(Duration::from_secs(10)));

    let no_default =
        ServiceConfig::parse(r#"{"methodConfig": [{"name": [{"service": "a.B"}]}]}"#).unwrap();
    assert!(no_default.method("/a.B/C").is_some());
    assert!(no_default.method("/x.Y/C").is_none());
}

#[test]
fn every_fault_is_named_by_its_path() {
    assert_eq!(
        faults(
            r#"{"methodConfig": [{"name": [{"method": "Get"}], "timeout": "2",
                "retryPolicy": {"maxAttempts": 0, "initialBackoff": "0s",
                  "backoffMultiplier": 0, "retryableStatusCodes": ["UNAVAILBLE", "OK"],
                  "MaxBackoff": "1s"},
                "hedgingPolicy": {}}],
              "retryThrottling": {"maxTokens": 1001, "tokenRatio": 0.0001},
              "loadBalancingConfig": [{"pick_first": {}}],
              "extra": 1}"#
        ),
        [
            "methodConfig[0].name[0].method: needs a service: a method name alone matches nothing",
            "methodConfig[0].timeout: \"2\" is not a duration such as \"1.5s\" (seconds, then s)",
            "methodConfig[0].retryPolicy.maxAttempts: must be at least 1, got 0",
            "methodConfig[0].retryPolicy.initialBackoff: must be greater than 0s",
            "methodConfig[0].retryPolicy.maxBackoff: is required",
            "methodConfig[0].retryPolicy.backoffMultiplier: must be a number greater than 0, got 0",
            "methodConfig[0].retryPolicy.retryableStatusCodes[0]: \"UNAVAILBLE\" is not a gRPC status code (e.g. \"UNAVAILABLE\" or 14)",
            "methodConfig[0].retryPolicy.retryableStatusCodes[1]: OK is not a failure to retry",
            "methodConfig[0].retryPolicy.MaxBackoff: unknown field; it is spelled maxBackoff",
            "methodConfig[0].hedgingPolicy: fanout does not hedge calls (send copies before an answer); use retryPolicy",
            "retryThrottling.maxTokens: must be 1..=1000, got 1001",
            "retryThrottling.tokenRatio: must be a number of at least 0.001, got 0.0001",
            "loadBalancingConfig: fanout applies none of [\"pick_first\"]; it knows round_robin, least_request_experimental",
            "extra: unknown field",
        ]
    );
}

#[test]
fn a_name_given_twice_is_refused() {
    assert_eq!(
        faults(
            r#"{"methodConfig": [{"name": [{"service": "a.B"}]},
                {"name": [{}, {"service": "a.B", "method": ""}]}, {"name": [{}]}]}"#
        ),
        [
            "methodConfig[1].name[1]: service \"a.B\" is already named by methodConfig[0]",
            "methodConfig[2].name[0]: the default (no service) is already named by methodConfig[1]",
        ]
    );
}

#[test]
fn malformed_documents_are_refused_whole() {
    assert_eq!(
        faults("{"),
        ["not JSON: EOF while parsing an object at line 1 column 1"]
    );
    assert_eq!(faults("[]"), ["must be an object, got a list"]);
    assert_eq!(
        faults(r#"{"methodConfig": {}, "method_config": []}"#),
        ["method_config: given twice, also as methodConfig"]
    );
    assert_eq!(
        faults(r#"{"methodConfig": [{"retryPolicy": {}}]}"#),
        [
            "methodConfig[0].retryPolicy.maxAttempts: is required",
            "methodConfig[0].retryPolicy.initialBackoff: is required",
            "methodConfig[0].retryPolicy.maxBackoff: is required",
            "methodConfig[0].retryPolicy.backoffMultiplier: is required",
            "methodConfig[0].retryPolicy.retryableStatusCodes: is required",
        ]
    );
    assert_eq!(
        ServiceConfig::parse("{}").unwrap(),
        ServiceConfig::default()
    );
}

#[test]
fn proto_durations() {
    assert_eq!(proto_duration("1s"), Ok(Duration::from_secs(1)));
    assert_eq!(proto_duration("0.5s"), Ok(Duration::from_millis(500)));
    assert_eq!(proto_duration("3.000000001s"), Ok(Duration::new(3, 1)));
    for bad in [
        "1",
        "1.s",
        ".5s",
        "1.0000000001s",
        "1ms",
        "s",
        "-1s",
        "1e3s",
    ] {
        assert!(proto_duration(bad).is_err(), "{bad}");
    }
}
