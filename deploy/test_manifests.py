#!/usr/bin/env python3
"""Checks deploy/kubernetes: every manifest validates against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict), the PodMonitor has the fields the operator needs, the
kustomization lists the files, the DaemonSets' args are flags the real binary accepts
(`tanzhen <args> --dry-run`), and the systemd unit passes `systemd-analyze verify` with flags
the binary accepts; deploy/grafana's dashboard ConfigMaps validate, carry the sidecar label and
hold exactly dashboards/*.json, and the Grafana provisioning file points at a file provider. Usage: test_manifests.py PATH_TO_TANZHEN. Ends with the line
`N passed, M failed`; exits 1 on any failure."""

import json
import pathlib
import subprocess
import sys

import kubernetes_validate
import yaml

K8S_VERSION = "1.37.0"
HERE = pathlib.Path(__file__).resolve().parent / "kubernetes"
results = []


def check(name, fn):
    try:
        fn()
        results.append((name, None))
        print(f"ok    {name}")
    except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the run
        results.append((name, e))
        print(f"FAIL  {name}: {e}")


def docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def validate_schema(doc):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def validate_podmonitor(doc):
    spec = doc["spec"]
    assert spec["selector"]["matchLabels"], "selector.matchLabels is empty"
    for ep in spec["podMetricsEndpoints"]:
        assert ep.get("port") == "metrics", f"endpoint port {ep.get('port')!r} is not the named port"
        assert ep.get("path", "/metrics") == "/metrics"


def daemonset_args_accepted(doc, binary):
    c = doc["spec"]["template"]["spec"]["containers"][0]
    out = subprocess.run([binary, *c["args"], "--dry-run"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"tanzhen rejected {c['args']}: {out.stderr.strip()}"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    listen = next(a.split("=", 1)[1] for a in c["args"] if a.startswith("--listen="))
    assert listen.endswith(f":{ports['metrics']}"), f"--listen {listen} is not the metrics port"
    vols = {v["name"] for v in doc["spec"]["template"]["spec"]["volumes"]}
    for m in c["volumeMounts"]:
        assert m["name"] in vols, f"volumeMount {m['name']} has no volume"
    assert doc["spec"]["template"]["spec"]["hostPID"] is True, "hostPID is needed for /proc"


def systemd_unit(binary):
    import shlex
    import tempfile

    unit = (HERE.parent / "systemd" / "tanzhen.service").read_text()
    exec_line = next(l for l in unit.splitlines() if l.startswith("ExecStart="))
    argv = shlex.split(exec_line.split("=", 1)[1])
    out = subprocess.run([binary, *argv[1:], "--dry-run"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"tanzhen rejected {argv[1:]}: {out.stderr.strip()}"
    with tempfile.TemporaryDirectory() as d:
        path = pathlib.Path(d) / "tanzhen.service"
        path.write_text(unit.replace(argv[0], str(pathlib.Path(binary).resolve())))
        v = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
        assert v.returncode == 0, f"systemd-analyze verify: {v.stdout}{v.stderr}"


GRAFANA = HERE.parent / "grafana"
DASHBOARDS = HERE.parent.parent / "dashboards"


def dashboard_configmap(doc):
    validate_schema(doc)
    assert doc["metadata"]["labels"].get("grafana_dashboard") == "1", "no grafana_dashboard: \"1\" label"
    assert "namespace" not in doc["metadata"], "leave the namespace to `kubectl -n` (the sidecar's)"
    for key, text in doc["data"].items():
        src = DASHBOARDS / key.removeprefix("tanzhen-")
        assert src.exists(), f"{key} has no dashboards/{src.name}"
        assert text == src.read_text(), f"{key} differs from dashboards/{src.name}: run `cargo xtask dashboards`"
        json.loads(text)


def grafana_checks():
    cms = docs(GRAFANA / "dashboards-configmap.yaml")
    for d in cms:
        check(f"grafana ConfigMap/{d['metadata']['name']} schema and contents", lambda d=d: dashboard_configmap(d))

    def every_dashboard_shipped():
        keys = {k.removeprefix("tanzhen-") for d in cms for k in d["data"]}
        files = {p.name for p in DASHBOARDS.glob("*.json")}
        assert keys == files, f"ConfigMaps hold {sorted(keys)}, dashboards/ has {sorted(files)}"
        sizes = [len(yaml.safe_dump(d)) for d in cms]
        # kubectl apply keeps a copy in an annotation limited to 256 KiB.
        assert max(sizes) < 256 * 1024, f"a ConfigMap is {max(sizes)} bytes: too big for kubectl apply"

    def provisioning():
        (p,) = docs(GRAFANA / "provisioning-dashboards.yaml")
        assert p["apiVersion"] == 1, "provisioning apiVersion must be 1"
        (prov,) = p["providers"]
        assert prov["type"] == "file" and prov["options"]["path"].startswith("/"), prov
        assert set(prov) <= {"name", "orgId", "folder", "folderUid", "type", "disableDeletion",
                             "allowUiUpdates", "updateIntervalSeconds", "options"}, f"unknown keys in {prov}"

    check("grafana ConfigMaps ship every dashboard", every_dashboard_shipped)
    check("grafana provisioning file", provisioning)


def main():
    binary = sys.argv[1]
    files = sorted(HERE.glob("*.yaml"))
    kustomization = yaml.safe_load((HERE / "kustomization.yaml").read_text())
    for f in files:
        if f.name == "kustomization.yaml":
            continue
        for i, d in enumerate(docs(f)):
            name = f"{f.name}[{i}] {d['kind']}/{d['metadata']['name']}"
            if d["kind"] == "PodMonitor":
                check(name + " fields", lambda d=d: validate_podmonitor(d))
            else:
                check(name + " schema", lambda d=d: validate_schema(d))
            if d["kind"] == "DaemonSet":
                check(name + " args", lambda d=d: daemonset_args_accepted(d, binary))

    def listed():
        missing = {f.name for f in files} - set(kustomization["resources"]) - {
            "kustomization.yaml",
            "daemonset-privileged.yaml",
        }
        assert not missing, f"not in kustomization.yaml: {missing}"
        for r in kustomization["resources"]:
            assert (HERE / r).exists(), f"kustomization lists missing {r}"

    check("kustomization lists every manifest", listed)
    grafana_checks()
    check("systemd unit verifies and its flags are accepted", lambda: systemd_unit(binary))
    failed = sum(1 for _, e in results if e)
    print(f"manifests: {len(results) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
