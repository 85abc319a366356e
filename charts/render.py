#!/usr/bin/env python3
"""Renders charts/fanout by installing it with the real Helm engine (PyPI helm-sdkpy) into a
stand-in Kubernetes API on 127.0.0.1 that stores what it is sent. helm-sdkpy has no `template`
action; an install is the same rendering, plus Helm's own checks of the objects it creates.

    render(values) -> list of the objects Helm created (dicts), in the order it created them
    python3 charts/render.py [values.json]   # prints them as YAML
"""

import asyncio
import json
import re
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

CHART = Path(__file__).resolve().parent / "fanout"

# Kinds the chart may create: (group, version, plural, kind, namespaced)
RESOURCES = [
    ("", "v1", "secrets", "Secret", True),
    ("", "v1", "services", "Service", True),
    ("", "v1", "serviceaccounts", "ServiceAccount", True),
    ("", "v1", "namespaces", "Namespace", False),
    ("", "v1", "configmaps", "ConfigMap", True),
    ("apps", "v1", "deployments", "Deployment", True),
    ("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", True),
    ("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False),
    ("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", False),
    ("rbac.authorization.k8s.io", "v1", "roles", "Role", True),
    ("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True),
    ("admissionregistration.k8s.io", "v1", "mutatingwebhookconfigurations",
     "MutatingWebhookConfiguration", False),
    ("cert-manager.io", "v1", "certificates", "Certificate", True),
    ("cert-manager.io", "v1", "issuers", "Issuer", True),
]


class FakeApi(BaseHTTPRequestHandler):
    objects: dict = {}
    created: list = []
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def not_found(self):
        self.reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                         "reason": "NotFound", "code": 404, "message": "not found"})

    def discovery(self, path):
        if path == "/version":
            return {"major": "1", "minor": "30", "gitVersion": "v1.30.0", "platform": "linux/amd64"}
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"]}
        if path == "/apis":
            groups = sorted({g for g, *_ in RESOURCES if g})
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": g, "versions": [{"groupVersion": f"{g}/v1", "version": "v1"}],
                 "preferredVersion": {"groupVersion": f"{g}/v1", "version": "v1"}}
                for g in groups]}
        match = re.fullmatch(r"/api/v1|/apis/([^/]+)/v1", path)
        if match:
            group = match.group(1) or ""
            return {"kind": "APIResourceList", "groupVersion": f"{group}/v1".lstrip("/"),
                    "resources": [{"name": plural, "singularName": kind.lower(), "kind": kind,
                                   "namespaced": ns,
                                   "verbs": ["create", "delete", "get", "list", "patch", "update",
                                             "watch"]}
                                  for g, _, plural, kind, ns in RESOURCES if g == group]}
        return None

    @staticmethod
    def is_collection(path):
        """Whether `path` names a collection (…/<plural>) rather than one object."""
        rest = re.sub(r"^/api/v1|^/apis/[^/]+/v1", "", path).strip("/").split("/")
        if rest[0] == "namespaces" and len(rest) >= 3:
            rest = rest[2:]
        return len(rest) == 1

    def do_GET(self):
        url = urlparse(self.path)
        found = self.discovery(url.path)
        if found is not None:
            return self.reply(200, found)
        with self.lock:
            if url.path in self.objects:
                return self.reply(200, self.objects[url.path])
            items = [o for p, o in self.objects.items() if p.rsplit("/", 1)[0] == url.path]
        if self.is_collection(url.path):
            # Helm's release history is never listed back, so every install is a first one.
            items = [o for o in items if o.get("type") != "helm.sh/release.v1"]
            return self.reply(200, {"kind": "List", "apiVersion": "v1", "metadata": {},
                                    "items": items})
        self.not_found()

    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length) or b"{}"
        path = urlparse(self.path).path
        if not body.startswith(b"{"):
            # Helm's release record, sent as protobuf: not part of what the chart renders.
            return self.reply(201, {"kind": "Secret", "apiVersion": "v1",
                                    "metadata": {"name": "release", "namespace": "x"}})
        obj = json.loads(body)
        name = obj.get("metadata", {}).get("name", "")
        obj.setdefault("metadata", {})["uid"] = f"uid-{len(self.created)}"
        with self.lock:
            self.objects[f"{path}/{name}"] = obj
            if obj.get("type") != "helm.sh/release.v1":
                self.created.append(obj)
        self.reply(201, obj)

    def do_PUT(self):
        self.do_POST()

    def do_PATCH(self):
        self.reply(200, {})

    def do_DELETE(self):
        self.reply(200, {"kind": "Status", "status": "Success"})


def render(values: dict, namespace: str = "fanout-system", release: str = "fanout",
           existing: dict | None = None) -> list:
    """The objects `helm install <release> charts/fanout -n <namespace>` creates with `values`,
    in a cluster that already holds `existing` ({API path: object}, for the chart's lookups)."""
    import helm_sdkpy

    FakeApi.objects, FakeApi.created = dict(existing or {}), []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as kubeconfig:
            kubeconfig.write(json.dumps({
                "apiVersion": "v1", "kind": "Config", "current-context": "fake",
                "clusters": [{"name": "fake", "cluster": {
                    "server": f"http://127.0.0.1:{server.server_address[1]}"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
                "users": [{"name": "fake", "user": {"token": "fake"}}],
            }))
        config = helm_sdkpy.Configuration(namespace=namespace, kubeconfig=kubeconfig.name)
        asyncio.run(helm_sdkpy.Install(config).run(
            release, str(CHART), values=values, wait=False, timeout=30))
        return list(FakeApi.created)
    finally:
        server.shutdown()
        server.server_close()
        Path(kubeconfig.name).unlink(missing_ok=True)


if __name__ == "__main__":
    import yaml

    values = json.loads(Path(sys.argv[1]).read_text()) if len(sys.argv) > 1 else {}
    print(yaml.safe_dump_all(render(values), sort_keys=False))
