//! Names fanout reads and writes on pods (and the two it reads on Services).

/// Namespace label that opts a namespace in; pod label or annotation `disabled` opts a pod out.
pub const INJECT: &str = "fanout.dev/inject";
/// The upstreams the proxy balances: `<service>[.<namespace>]:<port>[=<local port>]`, ...
pub const UPSTREAMS: &str = "fanout.dev/upstreams";
/// The rendered proxy config, projected into the proxy by the downward API.
pub const PROXY_CONFIG: &str = "fanout.dev/proxy-config";
/// Set on injection to the webhook's version; its presence means "already injected".
pub const INJECTED: &str = "fanout.dev/injected";
/// `true` or `false`: run the proxy as a native sidecar (init container, restartPolicy Always).
pub const NATIVE_SIDECAR: &str = "fanout.dev/native-sidecar";
/// `grpc` or `grpc:<service>`: active `grpc.health.v1` checks of every upstream's endpoints.
pub const HEALTH_CHECK: &str = "fanout.dev/health-check";
/// `proxy` or `upstreams`: what the proxy's readiness probe asks (the chart sets the default).
pub const READINESS: &str = "fanout.dev/readiness";
/// `<port>[/<service>]`: the proxy answers `GET /grpc-health` on its admin port from the app's
/// `grpc.health.v1` on `127.0.0.1:<port>`, for HTTP health checkers (cloud load balancers).
pub const GRPC_HEALTH: &str = "fanout.dev/grpc-health";
pub const PROXY_CPU_REQUEST: &str = "fanout.dev/proxy-cpu-request";
pub const PROXY_CPU_LIMIT: &str = "fanout.dev/proxy-cpu-limit";
pub const PROXY_MEMORY_REQUEST: &str = "fanout.dev/proxy-memory-request";
pub const PROXY_MEMORY_LIMIT: &str = "fanout.dev/proxy-memory-limit";

/// On a Service: its gRPC service config (JSON), applied by every caller's proxy.
pub const SERVICE_CONFIG: &str = "fanout.dev/service-config";
/// On a Service: fanout's own settings the service config lacks (JSON).
pub const POLICY: &str = "fanout.dev/policy";

/// The injected container.
pub const PROXY_CONTAINER: &str = "fanout-proxy";
/// The injected downwardAPI volume holding `config.json`.
pub const CONFIG_VOLUME: &str = "fanout-config";
pub const CONFIG_DIR: &str = "/etc/fanout";
pub const CONFIG_FILE: &str = "/etc/fanout/config.json";
pub const ADMIN_PORT_NAME: &str = "fanout-admin";
/// The first default local port; the n-th upstream gets `FIRST_LOCAL_PORT + n`.
pub const FIRST_LOCAL_PORT: u16 = 15001;
/// Env prefix for the address of each upstream, given to app containers.
pub const ENV_PREFIX: &str = "FANOUT_UPSTREAM_";
/// The proxy's user and group: the distroless `nonroot` user.
pub const PROXY_UID: i64 = 65532;
