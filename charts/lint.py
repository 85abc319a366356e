#!/usr/bin/env python3
"""Lints charts/fanout with the real Helm engine (PyPI helm-sdkpy) for the default values and for
every certificate mode, and checks that values the chart must refuse are refused.

Helm's lint action reads the chart's own values.yaml, so each case lints a copy of the chart whose
values.yaml has the case's values merged in. Exit status 1 when any case is not as expected.

    python3 charts/lint.py            # every case
"""

import asyncio
import copy
import json
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parent / "fanout"
SEVERITIES = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}
CA_BUNDLE = "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg=="

# (name, values merged over values.yaml, whether lint must pass)
CASES = [
    ("default values (certs.mode auto)", {}, True),
    ("certs.mode certManager, chart's own CA", {"certs": {"mode": "certManager"}}, True),
    (
        "certs.mode certManager with a ClusterIssuer",
        {"certs": {"mode": "certManager",
                   "certManager": {"issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer"}}}},
        True,
    ),
    (
        "certs.mode secret",
        {"certs": {"mode": "secret", "secret": {"name": "my-tls", "caBundle": CA_BUNDLE}}},
        True,
    ),
    (
        "one replica, failurePolicy Ignore, native sidecars, proxy limits and log level",
        {"replicaCount": 1, "webhook": {"failurePolicy": "Ignore", "timeoutSeconds": 10,
                                        "excludeNamespaces": ["legacy"]},
         "proxy": {"nativeSidecar": True, "logLevel": "debug",
                   "resources": {"limits": {"cpu": "500m", "memory": "128Mi"}}}},
        True,
    ),
    # What the chart must refuse.
    ("unknown certs.mode", {"certs": {"mode": "selfSigned"}}, False),
    ("certs.mode secret without a Secret", {"certs": {"mode": "secret"}}, False),
    ("timeoutSeconds above the API server's 30 s", {"webhook": {"timeoutSeconds": 60}}, False),
    ("failurePolicy misspelt", {"webhook": {"failurePolicy": "fail"}}, False),
    ("a proxy memory limit that is not a quantity",
     {"proxy": {"resources": {"limits": {"memory": "64 megs"}}}}, False),
    ("a value the chart does not know", {"replicas": 3}, False),
    ("a readiness the proxy does not have", {"proxy": {"readiness": "always"}}, False),
]


def merge(base, override):
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


async def lint(chart_dir: Path) -> list:
    import helm_sdkpy

    config = helm_sdkpy.Configuration(namespace="fanout-system")
    result = await helm_sdkpy.Lint(config).run(str(chart_dir))
    return result.get("Messages") or []


def main() -> int:
    base = yaml.safe_load((CHART / "values.yaml").read_text())
    failures = 0
    for name, override, should_pass in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            chart = Path(tmp) / "fanout"
            shutil.copytree(CHART, chart)
            (chart / "values.yaml").write_text(json.dumps(merge(base, override), indent=1))
            messages = asyncio.run(lint(chart))
        problems = [m for m in messages if m.get("Severity", 0) >= 2]
        passed = not problems
        verdict = "ok" if passed == should_pass else "UNEXPECTED"
        expectation = "lint clean" if should_pass else "lint refuses"
        print(f"{verdict:>10}  {expectation:<12}  {name}")
        if passed != should_pass:
            failures += 1
            for m in problems or messages:
                # helm-sdkpy passes Helm's messages without their text; the path and severity
                # say where to look (`helm lint` with these values prints the text).
                print(f"            {SEVERITIES.get(m.get('Severity'), m.get('Severity'))}: "
                      f"{m.get('Path')}  values: {json.dumps(override)}")
    print(f"{len(CASES) - failures}/{len(CASES)} chart lint cases as expected")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
