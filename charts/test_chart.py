"""What `helm install` of charts/fanout puts into a cluster, per certificate mode and values: the
objects the real Helm engine creates (see render.py), checked as the API server and kubelet
would use them.

    python3 -m unittest discover -s charts -p 'test_*.py'
"""

import base64
import os
import subprocess
import unittest
from pathlib import Path

from render import render

ROOT = Path(__file__).resolve().parent.parent
CA_BUNDLE = base64.b64encode(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n").decode()
STANDARD_LABELS = ["app.kubernetes.io/name", "app.kubernetes.io/instance",
                   "app.kubernetes.io/version", "app.kubernetes.io/component",
                   "app.kubernetes.io/part-of", "app.kubernetes.io/managed-by", "helm.sh/chart"]


def by_kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def one(objects, kind):
    found = by_kind(objects, kind)
    assert len(found) == 1, f"{len(found)} {kind}"
    return found[0]


def container(objects):
    return one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def env(objects):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(objects)["env"]}


def rules(objects, kind):
    return [r for o in by_kind(objects, kind) for r in o["rules"]]


class DefaultInstall(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.objects = render({})

    def test_what_is_installed(self):
        self.assertEqual(
            sorted(o["kind"] for o in self.objects),
            sorted(["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
                    "Service", "Deployment", "PodDisruptionBudget",
                    "MutatingWebhookConfiguration"]))
        for o in self.objects:
            labels = o["metadata"].get("labels", {})
            for label in STANDARD_LABELS:
                self.assertIn(label, labels, f"{o['kind']} lacks {label}")

    def test_the_webhook_registration(self):
        configuration = one(self.objects, "MutatingWebhookConfiguration")
        self.assertEqual(configuration["metadata"]["name"], "fanout")
        [webhook] = configuration["webhooks"]
        self.assertEqual(webhook["admissionReviewVersions"], ["v1"])
        self.assertEqual(webhook["sideEffects"], "None")
        self.assertEqual(webhook["failurePolicy"], "Fail")
        self.assertLessEqual(webhook["timeoutSeconds"], 10)
        self.assertEqual(webhook["reinvocationPolicy"], "IfNeeded")
        self.assertEqual(webhook["rules"], [{
            "operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
            "resources": ["pods"], "scope": "Namespaced"}])
        self.assertEqual(webhook["namespaceSelector"]["matchExpressions"], [
            {"key": "fanout.dev/inject", "operator": "In", "values": ["enabled"]},
            {"key": "kubernetes.io/metadata.name", "operator": "NotIn",
             "values": ["kube-system", "fanout-system"]}])
        self.assertEqual(webhook["objectSelector"]["matchExpressions"], [
            {"key": "fanout.dev/inject", "operator": "NotIn", "values": ["disabled"]}])
        # At first install there is no CA yet: the webhook sets it.
        self.assertNotIn("caBundle", webhook["clientConfig"])

    def test_the_api_server_reaches_the_webhook_through_its_service(self):
        service = one(self.objects, "Service")
        client = one(self.objects, "MutatingWebhookConfiguration")["webhooks"][0]["clientConfig"]
        self.assertEqual(client["service"], {"name": service["metadata"]["name"],
                                             "namespace": "fanout-system",
                                             "path": "/mutate", "port": 443})
        [port] = [p for p in service["spec"]["ports"] if p["name"] == "https"]
        self.assertEqual(port["port"], 443)
        pod = one(self.objects, "Deployment")["spec"]["template"]
        self.assertLessEqual(service["spec"]["selector"].items(), pod["metadata"]["labels"].items())
        self.assertIn(port["targetPort"], [p["name"] for p in container(self.objects)["ports"]])
        self.assertEqual(env(self.objects)["FANOUT_SERVICE"], service["metadata"]["name"])

    def test_the_deployment_is_highly_available(self):
        deployment = one(self.objects, "Deployment")
        self.assertEqual(deployment["spec"]["replicas"], 2)
        self.assertEqual(deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0)
        pdb = one(self.objects, "PodDisruptionBudget")
        self.assertEqual(pdb["spec"]["minAvailable"], 1)
        self.assertEqual(pdb["spec"]["selector"]["matchLabels"],
                         deployment["spec"]["selector"]["matchLabels"])
        anti = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        term = anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
        self.assertEqual(term["topologyKey"], "kubernetes.io/hostname")
        self.assertEqual(term["labelSelector"]["matchLabels"],
                         deployment["spec"]["selector"]["matchLabels"])
        c = container(self.objects)
        for probe in ["startupProbe", "livenessProbe", "readinessProbe"]:
            self.assertEqual(c[probe]["httpGet"]["scheme"], "HTTPS", probe)
        self.assertIn("requests", c["resources"])

    def test_pod_security_restricted(self):
        pod = one(self.objects, "Deployment")["spec"]["template"]["spec"]
        self.assertTrue(pod["securityContext"]["runAsNonRoot"])
        self.assertNotEqual(pod["securityContext"]["runAsUser"], 0)
        self.assertEqual(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault")
        for c in pod["containers"]:
            sc = c["securityContext"]
            self.assertIs(sc["allowPrivilegeEscalation"], False)
            self.assertEqual(sc["capabilities"]["drop"], ["ALL"])
            self.assertNotIn("add", sc["capabilities"])
            self.assertTrue(sc["readOnlyRootFilesystem"])
        self.assertFalse(pod.get("hostNetwork", False))

    def test_least_rbac(self):
        names = env(self.objects)
        self.assertEqual(rules(self.objects, "ClusterRole"), [
            {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
             "verbs": ["list", "watch"]},
            {"apiGroups": ["events.k8s.io"], "resources": ["events"],
             "verbs": ["create", "patch"]},
            {"apiGroups": ["admissionregistration.k8s.io"],
             "resources": ["mutatingwebhookconfigurations"],
             "resourceNames": [names["FANOUT_WEBHOOK_CONFIGURATION"]], "verbs": ["get", "patch"]}])
        self.assertEqual(rules(self.objects, "Role"), [
            {"apiGroups": [""], "resources": ["secrets"],
             "resourceNames": [names["FANOUT_CERT_SECRET"]], "verbs": ["get", "update"]},
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]}])
        account = one(self.objects, "ServiceAccount")["metadata"]["name"]
        self.assertEqual(one(self.objects, "Deployment")["spec"]["template"]["spec"]
                         ["serviceAccountName"], account)
        for binding in by_kind(self.objects, "ClusterRoleBinding") + by_kind(self.objects,
                                                                              "RoleBinding"):
            self.assertEqual(binding["subjects"], [
                {"kind": "ServiceAccount", "name": account, "namespace": "fanout-system"}])

    def test_auto_certificates_name_the_objects_rbac_allows(self):
        names = env(self.objects)
        self.assertEqual(names["FANOUT_CERT_MODE"], "auto")
        self.assertEqual(names["FANOUT_WEBHOOK_CONFIGURATION"],
                         one(self.objects, "MutatingWebhookConfiguration")["metadata"]["name"])
        self.assertEqual(names["FANOUT_NAMESPACE"],
                         {"fieldRef": {"fieldPath": "metadata.namespace"}})
        self.assertNotIn("volumes", one(self.objects, "Deployment")["spec"]["template"]["spec"])

    def test_proxy_settings_reach_the_webhook(self):
        e = env(self.objects)
        self.assertEqual(e["FANOUT_PROXY_IMAGE"], "ghcr.io/fanout-dev/fanout-proxy:0.1.0")
        self.assertEqual(e["FANOUT_PROXY_CPU_REQUEST"], "10m")
        self.assertEqual(e["FANOUT_PROXY_MEMORY_REQUEST"], "16Mi")
        self.assertEqual(e["FANOUT_PROXY_MEMORY_LIMIT"], "64Mi")
        self.assertEqual(e["FANOUT_NATIVE_SIDECAR"], "auto")
        self.assertEqual(e["FANOUT_PROXY_READINESS"], "proxy")

    def test_the_webhook_binary_accepts_the_rendered_settings(self):
        """The rendered env, given to the real binary: it gets past every setting and stops
        only where it needs a Kubernetes API."""
        binary = ROOT / "target" / "debug" / "fanout-webhook"
        if not binary.exists():
            self.skipTest(f"{binary} not built (make test builds it)")
        run_env = {k: v for k, v in env(self.objects).items() if isinstance(v, str)}
        run_env.update(PATH=os.environ.get("PATH", ""), KUBECONFIG="/nonexistent/kubeconfig",
                       FANOUT_NAMESPACE="fanout-system", FANOUT_LOG_FORMAT="text")
        result = subprocess.run([str(binary), *container(self.objects)["args"]], env=run_env,
                                capture_output=True, text=True, timeout=30)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("Kubernetes API", result.stderr, result.stderr)
        bad = dict(run_env, FANOUT_PROXY_MEMORY_LIMIT="64 megs")
        result = subprocess.run([str(binary), "serve"], env=bad, capture_output=True,
                                text=True, timeout=30)
        self.assertIn("--proxy-memory-limit", result.stderr, result.stderr)


class Discovery(unittest.TestCase):
    def test_the_discovery_server_is_on_its_own_port_of_the_webhook_service(self):
        objects = render({})
        e = env(objects)
        self.assertEqual(e["FANOUT_DISCOVERY_LISTEN"], "0.0.0.0:15012")
        self.assertEqual(e["FANOUT_DISCOVERY_ADDRESS"], "fanout-webhook.fanout-system.svc:15012")
        self.assertEqual(e["FANOUT_DISCOVERY_EXCLUDE_NAMESPACES"], "kube-system,fanout-system")
        ports = {p["name"]: p for p in container(objects)["ports"]}
        self.assertEqual(ports["discovery"]["containerPort"], 15012)
        service = one(objects, "Service")
        discovery = [p for p in service["spec"]["ports"] if p["name"] == "discovery"][0]
        self.assertEqual((discovery["port"], discovery["targetPort"]), (15012, "discovery"))
        # The address the proxies dial is a name the serving certificate carries.
        self.assertEqual(e["FANOUT_DISCOVERY_ADDRESS"].split(":")[0],
                         f'{service["metadata"]["name"]}.{service["metadata"]["namespace"]}.svc')
        self.assertEqual(one(objects, "PodDisruptionBudget")["spec"]["minAvailable"], 1)

    def test_discovery_off_leaves_dns_and_the_narrow_rbac(self):
        objects = render({"discovery": {"enabled": False}})
        self.assertNotIn("FANOUT_DISCOVERY_ADDRESS", env(objects))
        self.assertEqual([p["name"] for p in one(objects, "Service")["spec"]["ports"]], ["https"])
        self.assertEqual(rules(objects, "ClusterRole")[0],
                         {"apiGroups": [""], "resources": ["services"], "verbs": ["get"]})
        self.assertEqual(len(rules(objects, "ClusterRole")), 2)

    def test_a_secret_brought_along_gives_the_proxies_its_ca(self):
        objects = render({"certs": {"mode": "secret",
                                    "secret": {"name": "my-tls", "caBundle": CA_BUNDLE}},
                          "webhook": {"excludeNamespaces": ["legacy"]}})
        e = env(objects)
        self.assertEqual(e["FANOUT_DISCOVERY_CA"], base64.b64decode(CA_BUNDLE).decode())
        self.assertEqual(e["FANOUT_DISCOVERY_EXCLUDE_NAMESPACES"],
                         "kube-system,fanout-system,legacy")


class Upgrade(unittest.TestCase):
    def test_an_upgrade_keeps_the_ca_the_webhook_set(self):
        secret = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                  "metadata": {"name": "fanout-webhook-certs", "namespace": "fanout-system"},
                  "data": {"ca.crt": CA_BUNDLE, "ca.key": "eA==", "tls.crt": "eA==",
                           "tls.key": "eA=="}}
        objects = render({}, existing={
            "/api/v1/namespaces/fanout-system/secrets/fanout-webhook-certs": secret})
        webhook = one(objects, "MutatingWebhookConfiguration")["webhooks"][0]
        self.assertEqual(webhook["clientConfig"]["caBundle"], CA_BUNDLE)


class CertManager(unittest.TestCase):
    def test_the_chart_makes_its_own_ca_with_cert_manager(self):
        objects = render({"certs": {"mode": "certManager"}})
        certificates = {c["metadata"]["name"]: c for c in by_kind(objects, "Certificate")}
        self.assertEqual(set(certificates), {"fanout-webhook", "fanout-webhook-ca"})
        serving = certificates["fanout-webhook"]
        self.assertIn("fanout-webhook.fanout-system.svc", serving["spec"]["dnsNames"])
        self.assertEqual(serving["spec"]["issuerRef"], {"name": "fanout-webhook-ca",
                                                        "kind": "Issuer"})
        self.assertTrue(certificates["fanout-webhook-ca"]["spec"]["isCA"])
        issuers = {i["metadata"]["name"]: i["spec"] for i in by_kind(objects, "Issuer")}
        self.assertEqual(issuers["fanout-webhook-ca"]["ca"]["secretName"],
                         certificates["fanout-webhook-ca"]["spec"]["secretName"])
        configuration = one(objects, "MutatingWebhookConfiguration")
        self.assertEqual(configuration["metadata"]["annotations"]
                         ["cert-manager.io/inject-ca-from"], "fanout-system/fanout-webhook")
        # The webhook serves the files of the Secret cert-manager writes.
        pod = one(objects, "Deployment")["spec"]["template"]["spec"]
        self.assertEqual(pod["volumes"][0]["secret"]["secretName"], serving["spec"]["secretName"])
        self.assertEqual(env(objects)["FANOUT_CERT_MODE"], "files")
        self.assertEqual(container(objects)["volumeMounts"][0]["mountPath"], "/etc/fanout/tls")
        self.assertTrue(env(objects)["FANOUT_TLS_CERT"].startswith("/etc/fanout/tls/"))
        # No Secret or webhook configuration writes in this mode: reads only.
        self.assertEqual(by_kind(objects, "Role"), [])
        self.assertEqual(rules(objects, "ClusterRole"), [
            {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
             "verbs": ["list", "watch"]},
            {"apiGroups": ["events.k8s.io"], "resources": ["events"],
             "verbs": ["create", "patch"]}])

    def test_a_given_issuer_signs_and_no_issuer_is_created(self):
        ref = {"name": "corp-ca", "kind": "ClusterIssuer"}
        objects = render({"certs": {"mode": "certManager", "certManager": {"issuerRef": ref}}})
        self.assertEqual(by_kind(objects, "Issuer"), [])
        self.assertEqual(one(objects, "Certificate")["spec"]["issuerRef"], ref)


class OwnSecret(unittest.TestCase):
    def test_a_secret_brought_along_is_served_and_trusted(self):
        objects = render({"certs": {"mode": "secret",
                                    "secret": {"name": "my-tls", "caBundle": CA_BUNDLE}}})
        pod = one(objects, "Deployment")["spec"]["template"]["spec"]
        self.assertEqual(pod["volumes"][0]["secret"]["secretName"], "my-tls")
        webhook = one(objects, "MutatingWebhookConfiguration")["webhooks"][0]
        self.assertEqual(webhook["clientConfig"]["caBundle"], CA_BUNDLE)
        self.assertEqual(by_kind(objects, "Certificate"), [])
        self.assertEqual(by_kind(objects, "Role"), [])


class Values(unittest.TestCase):
    def test_another_release_and_namespace(self):
        objects = render({"webhook": {"excludeNamespaces": ["legacy", "kube-system"]}},
                         namespace="platform", release="edge")
        configuration = one(objects, "MutatingWebhookConfiguration")
        self.assertEqual(configuration["metadata"]["name"], "edge-fanout")
        webhook = configuration["webhooks"][0]
        self.assertEqual(webhook["clientConfig"]["service"]["name"], "edge-fanout-webhook")
        self.assertEqual(webhook["clientConfig"]["service"]["namespace"], "platform")
        self.assertEqual(webhook["namespaceSelector"]["matchExpressions"][1]["values"],
                         ["kube-system", "platform", "legacy"])
        self.assertEqual(env(objects)["FANOUT_WEBHOOK_CONFIGURATION"], "edge-fanout")

    def test_one_replica_has_no_disruption_budget_to_block_drains(self):
        objects = render({"replicaCount": 1})
        self.assertEqual(by_kind(objects, "PodDisruptionBudget"), [])

    def test_proxy_values(self):
        objects = render({"webhook": {"failurePolicy": "Ignore", "timeoutSeconds": 3},
                          "proxy": {"nativeSidecar": True, "logLevel": "debug",
                                    "readiness": "upstreams",
                                    "image": {"repository": "registry.local/proxy", "tag": "dev"},
                                    "resources": {"limits": {"cpu": "1", "memory": ""}}}})
        webhook = one(objects, "MutatingWebhookConfiguration")["webhooks"][0]
        self.assertEqual((webhook["failurePolicy"], webhook["timeoutSeconds"]), ("Ignore", 3))
        e = env(objects)
        self.assertEqual(e["FANOUT_NATIVE_SIDECAR"], "true")
        self.assertEqual(e["FANOUT_PROXY_LOG_LEVEL"], "debug")
        self.assertEqual(e["FANOUT_PROXY_READINESS"], "upstreams")
        self.assertEqual(e["FANOUT_PROXY_IMAGE"], "registry.local/proxy:dev")
        self.assertEqual(e["FANOUT_PROXY_CPU_LIMIT"], "1")
        self.assertEqual(e["FANOUT_PROXY_MEMORY_LIMIT"], "")


if __name__ == "__main__":
    unittest.main()
