#!/usr/bin/env python3
"""Offline validation of the Kubernetes manifests in k8s/ (run through k8s/validate.sh).

For each kustomization (k8s/base and every k8s/overlays/*):

1. Render it with the real kustomize: $KUSTOMIZE, `kustomize`, or `kubectl kustomize`
   (kustomize v4+; these machines carry kubectl with kustomize v5.5). Without one the
   validator cannot run and exits 2 saying so: a hand-written renderer would be a second,
   diverging kustomize to maintain.
2. Validate every built-in kind strictly (unknown fields are errors) against the OpenAPI
   schemas that the `kubernetes-validate` package carries, for each Kubernetes version in
   --kubernetes-versions.
3. Custom resources are not in those schemas. Only the kinds listed in CUSTOM_KINDS are
   allowed (KEDA's ScaledObject and TriggerAuthentication); each gets a structural check here
   (known fields, required fields, string-typed trigger metadata). Any other unknown kind is an
   error.
4. Policy checks that tie the manifests to the program: probes on the metrics port (/healthz,
   /readyz), terminationGracePeriodSeconds longer than worker.shutdown_grace_ms, the
   CronJob's concurrency/time zone/deadline/backoff settings and its time zone equal to the
   config's, security contexts, read-only secret mounts, key files named in refunds.toml lying
   in mounted Secrets, references to Secrets/ConfigMaps/ServiceAccounts that exist, selectors
   that select, and Secret templates holding placeholders only.

A self-test first feeds known-bad objects through the same checks and fails if any passes, so
a validator that silently accepts everything cannot turn CI green.

Exit status: 0 valid, 1 invalid manifests, 2 the validator could not run.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

try:
    import tomllib  # Python 3.11+
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib  # type: ignore

import yaml

try:
    import kubernetes_validate
    from kubernetes_validate import utils as kv_utils
except ModuleNotFoundError:  # pragma: no cover
    print("validate.py: kubernetes-validate is not installed (run k8s/validate.sh)", file=sys.stderr)
    sys.exit(2)

HERE = Path(__file__).resolve().parent
DEFAULT_VERSIONS = ["1.30.0", "1.37.0"]

# Metrics/health port and the drain of refund-worker (shared/src/config.rs defaults).
METRICS_PORT = 9464
DEFAULT_SHUTDOWN_GRACE_MS = 20_000
# After the drain the worker gives the outbox relay up to 5 s (worker/src/app.rs).
RELAY_STOP_S = 5
DEFAULT_QUEUE = "refunds.requested"
PLACEHOLDER = "REPLACE_ME"

CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
    "PersistentVolume", "StorageClass", "PriorityClass", "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration", "APIService", "IngressClass", "RuntimeClass",
}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod"}


class KustomizeMissing(Exception):
    """No kustomize to render with: the validator cannot run (exit 2)."""


class Report:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.lines = 0

    def ok(self, msg: str) -> None:
        print(f"  ok    {msg}")
        self.lines += 1

    def info(self, msg: str) -> None:
        print(f"  note  {msg}")

    def error(self, msg: str) -> None:
        print(f"  FAIL  {msg}")
        self.errors.append(msg)


# --------------------------------------------------------------------------------------------
# Rendering: the real kustomize, never a copy of it
# --------------------------------------------------------------------------------------------

def find_kustomize() -> tuple[list[str], str]:
    """$KUSTOMIZE, `kustomize`, or `kubectl kustomize` (kustomize v4+); KustomizeMissing if none."""
    env = os.environ.get("KUSTOMIZE")
    if env:
        return ([env, "build"], env)
    if shutil.which("kustomize"):
        return (["kustomize", "build"], "kustomize")
    if shutil.which("kubectl"):
        try:
            out = subprocess.run(["kubectl", "version", "--client", "-o", "json"], capture_output=True,
                                 text=True, timeout=30, check=True).stdout
        except (subprocess.SubprocessError, OSError) as e:
            raise KustomizeMissing(f"`kubectl version --client` failed: {e}") from e
        try:
            kv = json.loads(out).get("kustomizeVersion", "")
        except ValueError as e:
            raise KustomizeMissing(f"`kubectl version --client -o json` printed no JSON: {e}") from e
        m = re.match(r"v(\d+)", kv)
        if m and int(m.group(1)) >= 4:
            return (["kubectl", "kustomize"], f"kubectl kustomize ({kv})")
        raise KustomizeMissing(f"kubectl carries kustomize {kv or 'of no known version'}; v4+ is needed")
    raise KustomizeMissing("neither kustomize nor kubectl is on PATH (set $KUSTOMIZE to a kustomize binary)")


def render(cmd: list[str], directory: Path) -> list[dict]:
    """The objects kustomize renders from `directory`, in its order."""
    try:
        out = subprocess.run([*cmd, str(directory)], capture_output=True, text=True, timeout=120)
    except OSError as e:
        raise KustomizeMissing(f"cannot run {cmd[0]}: {e}") from e
    if out.returncode != 0:
        raise ValueError(f"{' '.join(cmd)} {directory} failed: {out.stderr.strip()}")
    return [d for d in yaml.safe_load_all(out.stdout) if d is not None]


# --------------------------------------------------------------------------------------------
# Schema validation
# --------------------------------------------------------------------------------------------

def _check_fields(obj: Any, allowed: set[str], where: str, errors: list[str]) -> None:
    if not isinstance(obj, dict):
        errors.append(f"{where} must be an object")
        return
    for k in sorted(set(obj) - allowed):
        errors.append(f"{where}: unknown field {k!r}")


def _check_metadata(o: dict, errors: list[str]) -> None:
    md = o.get("metadata")
    if not isinstance(md, dict) or not isinstance(md.get("name"), str) or not md["name"]:
        errors.append("metadata.name is required")
        return
    _check_fields(md, {"name", "namespace", "labels", "annotations"}, "metadata", errors)
    for k in ("labels", "annotations"):
        if k in md and not all(isinstance(v, str) for v in (md[k] or {}).values()):
            errors.append(f"metadata.{k} values must be strings")


def check_scaledobject(o: dict) -> list[str]:
    errors: list[str] = []
    _check_fields(o, {"apiVersion", "kind", "metadata", "spec"}, "", errors)
    _check_metadata(o, errors)
    spec = o.get("spec") or {}
    _check_fields(spec, {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
                         "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback",
                         "advanced", "triggers"}, "spec", errors)
    ref = spec.get("scaleTargetRef")
    if not isinstance(ref, dict) or not isinstance(ref.get("name"), str):
        errors.append("spec.scaleTargetRef.name is required")
    else:
        _check_fields(ref, {"apiVersion", "kind", "name", "envSourceContainerName"},
                      "spec.scaleTargetRef", errors)
    for k in ("pollingInterval", "cooldownPeriod", "initialCooldownPeriod", "idleReplicaCount",
              "minReplicaCount", "maxReplicaCount"):
        if k in spec and (not isinstance(spec[k], int) or isinstance(spec[k], bool) or spec[k] < 0):
            errors.append(f"spec.{k} must be a non-negative integer")
    lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
    if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
        errors.append("spec.minReplicaCount exceeds spec.maxReplicaCount")
    adv = spec.get("advanced")
    if adv is not None:
        _check_fields(adv, {"restoreToOriginalReplicaCount", "horizontalPodAutoscalerConfig",
                            "scalingModifiers"}, "spec.advanced", errors)
        hpa = (adv or {}).get("horizontalPodAutoscalerConfig")
        if hpa is not None:
            _check_fields(hpa, {"name", "behavior"}, "spec.advanced.horizontalPodAutoscalerConfig", errors)
    triggers = spec.get("triggers")
    if not isinstance(triggers, list) or not triggers:
        errors.append("spec.triggers must list at least one trigger")
        triggers = []
    for i, t in enumerate(triggers):
        w = f"spec.triggers[{i}]"
        _check_fields(t, {"type", "name", "metadata", "authenticationRef", "metricType",
                          "useCachedMetrics"}, w, errors)
        if not isinstance(t, dict):
            continue
        if not isinstance(t.get("type"), str):
            errors.append(f"{w}.type is required")
        md = t.get("metadata")
        if not isinstance(md, dict):
            errors.append(f"{w}.metadata is required")
        else:
            for k, v in md.items():
                if not isinstance(v, str):
                    errors.append(f"{w}.metadata.{k} must be a string (KEDA rejects {type(v).__name__})")
        auth = t.get("authenticationRef")
        if auth is not None:
            _check_fields(auth, {"name", "kind"}, f"{w}.authenticationRef", errors)
            if not isinstance((auth or {}).get("name"), str):
                errors.append(f"{w}.authenticationRef.name is required")
    return errors


def check_triggerauthentication(o: dict) -> list[str]:
    errors: list[str] = []
    _check_fields(o, {"apiVersion", "kind", "metadata", "spec"}, "", errors)
    _check_metadata(o, errors)
    spec = o.get("spec") or {}
    _check_fields(spec, {"secretTargetRef", "env", "podIdentity", "hashiCorpVault",
                         "azureKeyVault", "awsSecretManager", "gcpSecretManager",
                         "configMapTargetRef", "boundServiceAccountToken"}, "spec", errors)
    refs = spec.get("secretTargetRef", [])
    if not isinstance(refs, list):
        errors.append("spec.secretTargetRef must be a list")
        refs = []
    for i, r in enumerate(refs):
        w = f"spec.secretTargetRef[{i}]"
        _check_fields(r, {"parameter", "name", "key"}, w, errors)
        for k in ("parameter", "name", "key"):
            if not isinstance((r or {}).get(k), str):
                errors.append(f"{w}.{k} is required (a string)")
    return errors


def check_servicemonitor(o: dict) -> list[str]:
    errors: list[str] = []
    _check_fields(o, {"apiVersion", "kind", "metadata", "spec"}, "", errors)
    _check_metadata(o, errors)
    spec = o.get("spec") or {}
    _check_fields(spec, {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels",
                         "podTargetLabels", "sampleLimit"}, "spec", errors)
    labels = ((spec.get("selector") or {}).get("matchLabels"))
    if not isinstance(labels, dict) or not labels:
        errors.append("spec.selector.matchLabels is required")
    eps = spec.get("endpoints")
    if not isinstance(eps, list) or not eps:
        errors.append("spec.endpoints needs at least one endpoint")
    for i, e in enumerate(eps if isinstance(eps, list) else []):
        _check_fields(e, {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels",
                          "relabelings", "metricRelabelings"}, f"spec.endpoints[{i}]", errors)
        if not isinstance((e or {}).get("port"), str):
            errors.append(f"spec.endpoints[{i}].port must name a port of the Service")
    return errors


# Custom resources allowed in the manifests: not in kubernetes-validate's schemas, so each has
# its own structural check. Anything else that has no schema is an error.
CUSTOM_KINDS: dict[tuple[str, str], Callable[[dict], list[str]]] = {
    ("keda.sh/v1alpha1", "ScaledObject"): check_scaledobject,
    ("keda.sh/v1alpha1", "TriggerAuthentication"): check_triggerauthentication,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): check_servicemonitor,
}


def validate_schema(o: dict, versions: list[str], report: Report, label: str) -> None:
    name = f"{o.get('kind')}/{(o.get('metadata') or {}).get('name')}"
    custom = CUSTOM_KINDS.get((o.get("apiVersion"), o.get("kind")))
    if custom is not None:
        errs = custom(o)
        if errs:
            for e in errs:
                report.error(f"{label}: {name}: {e}")
        else:
            report.ok(f"{label}: {name}: custom resource {o['apiVersion']}, structural check "
                      "(not in kubernetes-validate's schemas)")
        return
    passed = []
    for v in versions:
        try:
            kv_utils.validate(o, v, strict=True)
            passed.append(v)
        except kv_utils.SchemaNotFoundError:
            report.error(f"{label}: {name}: no schema for {o.get('apiVersion')} {o.get('kind')} in "
                         f"Kubernetes {v}, and not an allowed custom resource (CUSTOM_KINDS)")
            return
        except kv_utils.ValidationError as e:
            path = ".".join(str(p) for p in e.path) or "(root)"
            report.error(f"{label}: {name}: Kubernetes {v}: {path}: {e.message}")
            return
    report.ok(f"{label}: {name}: schema, strict, Kubernetes {', '.join(passed)}")


# --------------------------------------------------------------------------------------------
# Policy checks
# --------------------------------------------------------------------------------------------

def pod_specs(o: dict) -> list[tuple[dict, dict]]:
    """(pod template metadata, pod spec) of a workload."""
    spec = o.get("spec") or {}
    if o["kind"] == "Pod":
        return [(o.get("metadata") or {}, spec)]
    if o["kind"] == "CronJob":
        t = (((spec.get("jobTemplate") or {}).get("spec") or {}).get("template")) or {}
        return [(t.get("metadata") or {}, t.get("spec") or {})]
    if o["kind"] in WORKLOAD_KINDS:
        t = spec.get("template") or {}
        return [(t.get("metadata") or {}, t.get("spec") or {})]
    return []


def env_value(container: dict, name: str) -> str | None:
    for e in container.get("env") or []:
        if e.get("name") == name and "value" in e:
            return str(e["value"])
    return None


def selects(selector: dict | None, labels: dict) -> bool:
    if not selector:
        return True
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def config_of(objs: list[dict], pod: dict, container: dict) -> tuple[dict | None, str]:
    """The refunds.toml a container reads (via REFUNDS_CONFIG and its ConfigMap volume)."""
    path = env_value(container, "REFUNDS_CONFIG")
    if path is None:
        wd = container.get("workingDir")
        path = f"{wd}/refunds.toml" if wd else None
    if path is None:
        return None, "no REFUNDS_CONFIG and no workingDir"
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    for m in container.get("volumeMounts") or []:
        mp = m["mountPath"].rstrip("/")
        if path.startswith(mp + "/"):
            v = volumes.get(m["name"], {})
            cm_name = (v.get("configMap") or {}).get("name")
            if cm_name is None:
                return None, f"{path} is not on a ConfigMap volume"
            cm = next((o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == cm_name), None)
            if cm is None:
                return None, f"ConfigMap {cm_name} is not in the output"
            key = path[len(mp) + 1:]
            text = (cm.get("data") or {}).get(key)
            if text is None:
                return None, f"ConfigMap {cm_name} has no key {key}"
            try:
                return tomllib.loads(text), f"{cm_name}/{key}"
            except tomllib.TOMLDecodeError as e:
                return None, f"{cm_name}/{key} is not valid TOML: {e}"
    return None, f"{path} is on no mounted volume"


def secret_keys(s: dict) -> set[str]:
    return set((s.get("data") or {}).keys()) | set((s.get("stringData") or {}).keys())


def policy_checks(objs: list[dict], report: Report, label: str, secrets_required: bool) -> None:
    by_kind: dict[str, list[dict]] = {}
    for o in objs:
        by_kind.setdefault(o["kind"], []).append(o)
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    secrets = {o["metadata"]["name"]: o for o in by_kind.get("Secret", [])}
    pods = [(o, md, ps) for o in objs for md, ps in pod_specs(o)]

    def need_secret(name: str, key: str | None, where: str) -> None:
        if name not in secrets:
            if secrets_required:
                report.error(f"{label}: {where}: Secret {name} is not in the output")
            else:
                report.info(f"{label}: {where}: Secret {name}{'/' + key if key else ''} comes from the overlay")
            return
        if key is not None and key not in secret_keys(secrets[name]):
            report.error(f"{label}: {where}: Secret {name} has no key {key}")

    # Every pod: identity, security context, resources, references, read-only mounts.
    for o, md, ps in pods:
        where = f"{o['kind']}/{o['metadata']['name']}"
        problems: list[str] = []
        sa = ps.get("serviceAccountName")
        if not sa or ("ServiceAccount", sa) not in names:
            problems.append(f"serviceAccountName {sa!r} is not a ServiceAccount in the output")
        if ps.get("automountServiceAccountToken") is not False:
            problems.append("automountServiceAccountToken must be false (no API access needed)")
        psc = ps.get("securityContext") or {}
        if psc.get("runAsNonRoot") is not True:
            problems.append("securityContext.runAsNonRoot must be true")
        volumes = {v["name"]: v for v in ps.get("volumes") or []}
        for v in volumes.values():
            if "configMap" in v and ("ConfigMap", v["configMap"]["name"]) not in names:
                problems.append(f"volume {v['name']}: ConfigMap {v['configMap']['name']} is not in the output")
            if "secret" in v:
                need_secret(v["secret"]["secretName"], None, f"{where} volume {v['name']}")
        for c in ps.get("containers") or []:
            cw = f"container {c['name']}"
            sc = c.get("securityContext") or {}
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{cw}: allowPrivilegeEscalation must be false")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{cw}: readOnlyRootFilesystem must be true")
            if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                problems.append(f"{cw}: capabilities must drop ALL")
            res = c.get("resources") or {}
            for part, keys in (("requests", ("cpu", "memory")), ("limits", ("memory",))):
                for k in keys:
                    if k not in (res.get(part) or {}):
                        problems.append(f"{cw}: resources.{part}.{k} is required")
            for e in c.get("env") or []:
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    need_secret(ref["name"], ref["key"], f"{where} {cw} env {e['name']}")
                if e["name"] in ("REFUNDS__DATABASE_URL", "REFUNDS__AMQP_URL") and "value" in e:
                    problems.append(f"{cw}: {e['name']} holds a password: take it from a Secret")
            for m in c.get("volumeMounts") or []:
                v = volumes.get(m["name"])
                if v is None:
                    problems.append(f"{cw}: mount {m['name']} has no volume")
                elif ("secret" in v or "configMap" in v) and m.get("readOnly") is not True:
                    problems.append(f"{cw}: mount {m['name']} of a Secret/ConfigMap must be readOnly")
        for p in problems:
            report.error(f"{label}: {where}: {p}")
        if not problems:
            report.ok(f"{label}: {where}: non-root, read-only root, no token, resources, references")

    # The worker.
    for o in by_kind.get("Deployment", []):
        where = f"Deployment/{o['metadata']['name']}"
        spec = o.get("spec") or {}
        tmd, ps = pod_specs(o)[0]
        if not selects(spec.get("selector"), tmd.get("labels") or {}):
            report.error(f"{label}: {where}: spec.selector does not select its own pods")
        for c in ps.get("containers") or []:
            if "refund-worker" not in (c.get("args") or []) + (c.get("command") or []):
                continue
            problems = []
            cfg, cfg_name = config_of(objs, ps, c)
            if cfg is None:
                problems.append(f"configuration: {cfg_name}")
                cfg = {}
            worker_cfg = cfg.get("worker", {})
            addr = env_value(c, "REFUNDS__WORKER__METRICS_ADDR") or worker_cfg.get("metrics_addr", "127.0.0.1:9464")
            host, _, port_s = addr.rpartition(":")
            if host not in ("0.0.0.0", "[::]"):
                problems.append(f"metrics address {addr} is not reachable from outside the container "
                                "(set REFUNDS__WORKER__METRICS_ADDR=0.0.0.0:9464)")
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports") or []}

            def probe_port(probe: dict) -> int | None:
                p = (probe.get("httpGet") or {}).get("port")
                return ports.get(p) if isinstance(p, str) else p

            for kind, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                probe = c.get(kind)
                if not probe:
                    problems.append(f"{kind} is missing")
                    continue
                if (probe.get("httpGet") or {}).get("path") != path:
                    problems.append(f"{kind} must GET {path}")
                if str(probe_port(probe)) != port_s:
                    problems.append(f"{kind} port {probe_port(probe)} is not the metrics port {port_s}")
            grace_ms = int(env_value(c, "REFUNDS__WORKER__SHUTDOWN_GRACE_MS")
                           or worker_cfg.get("shutdown_grace_ms", DEFAULT_SHUTDOWN_GRACE_MS))
            tgps = ps.get("terminationGracePeriodSeconds", 30)
            if tgps <= grace_ms / 1000 + RELAY_STOP_S:
                problems.append(f"terminationGracePeriodSeconds {tgps} must exceed the drain: "
                                f"worker.shutdown_grace_ms {grace_ms} ms + {RELAY_STOP_S} s relay")
            if cfg.get("database", {}).get("migrate_on_start", True) and \
                    env_value(c, "REFUNDS__DATABASE__MIGRATE_ON_START") != "false":
                problems.append("migrate_on_start must be false: the worker's role cannot migrate")
            for section in ("shengpay", "wupay"):
                for i, m in enumerate(cfg.get(section, {}).get("merchants", [])):
                    for key in ("private_key_file", "platform_public_key_file", "rfkey_file"):
                        if key not in m:
                            continue
                        path = m[key]
                        mount = next((mt for mt in c.get("volumeMounts") or []
                                      if path.startswith(mt["mountPath"].rstrip("/") + "/")), None)
                        vol = next((v for v in ps.get("volumes") or [] if mount and v["name"] == mount["name"]), None)
                        if not mount or not vol or "secret" not in vol:
                            problems.append(f"{section}.merchants[{i}].{key} {path} is not in a mounted Secret")
                            continue
                        fname = path[len(mount["mountPath"].rstrip("/")) + 1:]
                        need_secret(vol["secret"]["secretName"], fname, f"{where} {section}.merchants[{i}].{key}")
            for k in ("database_url", "amqp_url"):
                if re.search(r"://[^/@]*:[^/@]*@", str(cfg.get(k, ""))):
                    problems.append(f"{cfg_name}: {k} holds a password: use REFUNDS__{k.upper()} from a Secret")
            scaled = [s for s in by_kind.get("ScaledObject", [])
                      if s["spec"]["scaleTargetRef"]["name"] == o["metadata"]["name"]]
            if not scaled:
                problems.append("no ScaledObject scales it")
            elif "replicas" in spec:
                problems.append("spec.replicas is set although a ScaledObject owns the replica count")
            queue = cfg.get("amqp", {}).get("queue", DEFAULT_QUEUE)
            for s in scaled:
                for t in s["spec"]["triggers"]:
                    if t["type"] == "rabbitmq" and t["metadata"].get("queueName") != queue:
                        problems.append(f"ScaledObject/{s['metadata']['name']} watches queue "
                                        f"{t['metadata'].get('queueName')}, the worker consumes {queue}")
                    if (s["spec"].get("minReplicaCount") or 0) < 1:
                        problems.append(f"ScaledObject/{s['metadata']['name']}: minReplicaCount must be "
                                        "at least 1 (the sweeper and outbox relay run in the workers)")
            pdbs = [p for p in by_kind.get("PodDisruptionBudget", [])
                    if selects(p["spec"].get("selector"), tmd.get("labels") or {})]
            if not pdbs:
                problems.append("no PodDisruptionBudget selects its pods")
            svcs = [s for s in by_kind.get("Service", [])
                    if selects({"matchLabels": s["spec"].get("selector") or {}}, tmd.get("labels") or {})
                    and any(str(p.get("targetPort")) in (port_s, *[n for n, v in ports.items() if str(v) == port_s])
                            for p in s["spec"].get("ports") or [])]
            if not svcs:
                problems.append(f"no Service exposes its metrics port {port_s}")
            for p in problems:
                report.error(f"{label}: {where}: {p}")
            if not problems:
                report.ok(f"{label}: {where}: probes /healthz and /readyz on {port_s}, grace "
                          f"{ps.get('terminationGracePeriodSeconds')} s > drain {grace_ms} ms + "
                          f"{RELAY_STOP_S} s, key files in mounted Secrets, PDB, metrics Service, "
                          f"KEDA on {queue}")

    # The reconciler CronJob.
    for o in by_kind.get("CronJob", []):
        if o["metadata"]["name"] != "refunds-reconciler":
            continue
        where = f"CronJob/{o['metadata']['name']}"
        spec = o["spec"]
        problems = []
        if spec.get("concurrencyPolicy") != "Forbid":
            problems.append("concurrencyPolicy must be Forbid")
        for k in ("timeZone", "startingDeadlineSeconds"):
            if k not in spec:
                problems.append(f"{k} is required")
        if "backoffLimit" not in spec["jobTemplate"]["spec"]:
            problems.append("jobTemplate.spec.backoffLimit is required")
        _, ps = pod_specs(o)[0]
        c = ps["containers"][0]
        cfg, cfg_name = config_of(objs, ps, c)
        if cfg is None:
            problems.append(f"configuration: {cfg_name}")
        else:
            tz = cfg.get("timezone", "Asia/Shanghai")
            if spec.get("timeZone") != tz:
                problems.append(f"timeZone {spec.get('timeZone')} differs from {cfg_name} timezone {tz}")
            btz = env_value(c, "BUSINESS_TIMEZONE")
            if btz is not None and btz != tz:
                problems.append(f"BUSINESS_TIMEZONE {btz} differs from {cfg_name} timezone {tz}")
        cmd = " ".join((c.get("command") or []) + (c.get("args") or []))
        if "refund-reconciler run" not in cmd or "--date" not in cmd:
            problems.append("the container must run `refund-reconciler run --date ...`")
        # Against the providers' statements by default (DESIGN §7): it waits for those its
        # configuration names, one per provider, and the whole wait fits in the Job's deadline.
        if "--wait" not in cmd or "--from-attempts" in cmd:
            problems.append("the container must run `refund-reconciler run ... --wait` (against "
                            "the statements of [reconciler.statements])")
        if cfg is not None:
            rec = cfg.get("reconciler") or {}
            statements = rec.get("statements") or {}
            for provider in ("shengpay", "wupay"):
                if not statements.get(provider):
                    problems.append(f"{cfg_name} has no reconciler.statements.{provider}: the "
                                    f"CronJob would not compare {provider} against its statement")
            attempts = int(rec.get("statement_wait_attempts", 7))
            interval = int(rec.get("statement_wait_interval_secs", 300))
            deadline = spec["jobTemplate"]["spec"].get("activeDeadlineSeconds")
            wait_s = max(attempts - 1, 0) * interval
            if deadline is not None and wait_s >= int(deadline):
                problems.append(f"waiting for statements ({attempts} looks {interval} s apart = "
                                f"{wait_s} s) does not fit in activeDeadlineSeconds {deadline}")
        for p in problems:
            report.error(f"{label}: {where}: {p}")
        if not problems:
            report.ok(f"{label}: {where}: Forbid, timeZone {spec['timeZone']} = config, "
                      f"startingDeadlineSeconds {spec['startingDeadlineSeconds']}, "
                      f"backoffLimit {spec['jobTemplate']['spec']['backoffLimit']}, "
                      f"waits for the statements of both providers")

    # KEDA authentication, network policies, secret templates.
    for t in by_kind.get("TriggerAuthentication", []):
        for r in t["spec"].get("secretTargetRef", []):
            need_secret(r["name"], r["key"], f"TriggerAuthentication/{t['metadata']['name']}")
    for s in by_kind.get("ScaledObject", []):
        for t in s["spec"]["triggers"]:
            a = (t.get("authenticationRef") or {}).get("name")
            if a and ("TriggerAuthentication", a) not in names:
                report.error(f"{label}: ScaledObject/{s['metadata']['name']}: TriggerAuthentication {a} missing")
        target = s["spec"]["scaleTargetRef"]
        if (target.get("kind", "Deployment"), target["name"]) not in names:
            report.error(f"{label}: ScaledObject/{s['metadata']['name']}: target {target['name']} missing")
    for m in by_kind.get("ServiceMonitor", []):
        want = m["spec"]["selector"]["matchLabels"]
        ports = {e["port"] for e in m["spec"]["endpoints"]}
        services = [s for s in by_kind.get("Service", [])
                    if all((s["metadata"].get("labels") or {}).get(k) == v for k, v in want.items())]
        where = f"ServiceMonitor/{m['metadata']['name']}"
        lacking = [s["metadata"]["name"] for s in services
                   if not ports <= {p.get("name") for p in s["spec"].get("ports", [])}]
        if not services:
            report.error(f"{label}: {where}: selects no Service")
        elif lacking:
            report.error(f"{label}: {where}: selects Service(s) {lacking} without port(s) {sorted(ports)}")
        else:
            report.ok(f"{label}: {where}: scrapes port(s) {sorted(ports)} of "
                      f"{', '.join(s['metadata']['name'] for s in services)}")
    for n in by_kind.get("NetworkPolicy", []):
        sel = n["spec"].get("podSelector")
        if not any(selects(sel, md.get("labels") or {}) for _, md, _ in pods):
            report.error(f"{label}: NetworkPolicy/{n['metadata']['name']}: podSelector selects no pod")
        else:
            report.ok(f"{label}: NetworkPolicy/{n['metadata']['name']}: selects pods")
    for s in secrets.values():
        bad = [k for k, v in (s.get("stringData") or {}).items() if PLACEHOLDER not in str(v)]
        for k, v in (s.get("data") or {}).items():
            try:
                if PLACEHOLDER not in base64.b64decode(v).decode("utf-8", "replace"):
                    bad.append(k)
            except ValueError:
                bad.append(k)
        if bad:
            report.error(f"{label}: Secret/{s['metadata']['name']}: keys {bad} hold something other than "
                         f"a {PLACEHOLDER} placeholder: real secrets never go into git")
        else:
            report.ok(f"{label}: Secret/{s['metadata']['name']}: placeholders only")


# --------------------------------------------------------------------------------------------
# Self-test and main
# --------------------------------------------------------------------------------------------

def self_test(versions: list[str]) -> list[str]:
    """Known-bad objects must fail; returns what did not."""
    quiet = Report()
    failures = []
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
        "spec": {"replica": 2, "selector": {"matchLabels": {"a": "b"}},
                 "template": {"metadata": {"labels": {"a": "b"}},
                              "spec": {"containers": [{"name": "c", "image": "i"}]}}},
    }
    cases = [
        ("a misspelt field (strict schema)", lambda: validate_schema(deployment, versions[:1], quiet, "t")),
        ("an unknown kind", lambda: validate_schema(
            {"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "g"}}, versions[:1], quiet, "t")),
        ("KEDA metadata that is not a string", lambda: validate_schema(
            {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "s"},
             "spec": {"scaleTargetRef": {"name": "x"},
                      "triggers": [{"type": "rabbitmq", "metadata": {"value": 5}}]}}, versions[:1], quiet, "t")),
        ("a Secret holding a real value", lambda: policy_checks(
            [{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
              "stringData": {"k": "hunter2"}}], quiet, "t", True)),
    ]
    for what, run in cases:
        before = len(quiet.errors)
        saved = sys.stdout
        sys.stdout = open(os.devnull, "w")
        try:
            run()
        finally:
            sys.stdout.close()
            sys.stdout = saved
        if len(quiet.errors) == before:
            failures.append(what)
    return failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kubernetes-versions", default=",".join(DEFAULT_VERSIONS),
                    help="comma-separated Kubernetes versions to validate against")
    ap.add_argument("dirs", nargs="*", help="kustomization folders (default: k8s/base, k8s/overlays/*)")
    args = ap.parse_args()
    versions = [v.strip() for v in args.kubernetes_versions.split(",") if v.strip()]
    dirs = [Path(d) for d in args.dirs] or [HERE / "base", *sorted(p for p in (HERE / "overlays").iterdir()
                                                                     if p.is_dir())]
    print(f"k8s-validate: kubernetes-validate {kubernetes_validate.__version__}, "
          f"Kubernetes {', '.join(versions)}")
    broken = self_test(versions)
    if broken:
        for b in broken:
            print(f"k8s-validate: self-test: the validator accepted {b}", file=sys.stderr)
        return 2
    print("k8s-validate: self-test: known-bad objects are rejected")

    try:
        kustomize, kustomize_name = find_kustomize()
    except KustomizeMissing as e:
        print(f"k8s-validate: cannot render: {e}", file=sys.stderr)
        return 2
    print(f"k8s-validate: rendering with {kustomize_name}")
    report = Report()
    total = 0
    for d in dirs:
        label = str(d.resolve().relative_to(HERE)) if d.resolve().is_relative_to(HERE) else str(d)
        print(f"k8s-validate: {label}")
        try:
            objs = render(kustomize, d)
        except KustomizeMissing as e:
            print(f"k8s-validate: cannot render: {e}", file=sys.stderr)
            return 2
        except (ValueError, subprocess.SubprocessError, yaml.YAMLError) as e:
            report.error(f"{label}: cannot render: {e}")
            continue
        report.ok(f"{label}: {kustomize_name} rendered {len(objs)} objects")
        total += len(objs)
        for o in objs:
            validate_schema(o, versions, report, label)
        policy_checks(objs, report, label, secrets_required=(d.resolve() != (HERE / "base").resolve()))
    if report.errors:
        print(f"k8s-validate: {len(report.errors)} problem(s) in {total} objects of {len(dirs)} builds",
              file=sys.stderr)
        return 1
    print(f"k8s-validate: {total} objects in {len(dirs)} builds valid ({report.lines} checks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
