#!/usr/bin/env python3
"""Offline validation of the Kubernetes manifests in k8s/ (run through k8s/validate.sh).

For each kustomization (k8s/base and every k8s/overlays/*):

1. Render it. The built-in renderer below implements the part of kustomize these manifests
   use (resources, namespace, images, configMapGenerator with create/replace/merge, patches:
   strategic merge on workloads, JSON merge on custom resources, JSON 6902) and refuses
   anything else by name. Where a real kustomize is available (`kustomize`, or `kubectl
   kustomize` with kustomize v4+), its output is rendered too and must be identical: that is
   how the built-in renderer is itself kept honest, and on machines without kustomize (CI) the
   result is the same.
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
import copy
import hashlib
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


class Unsupported(Exception):
    """A kustomize feature the built-in renderer does not implement."""


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
# Rendering (the subset of kustomize these manifests use)
# --------------------------------------------------------------------------------------------

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {
    "apiVersion", "kind", "resources", "namespace", "images", "configMapGenerator", "patches",
}
GENERATED = "__generated__"


def load_yaml_docs(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    for d in docs:
        if not isinstance(d, dict) or "kind" not in d or "apiVersion" not in d:
            raise ValueError(f"{path}: every document must be an object with apiVersion and kind")
    return docs


def kustomization_file(directory: Path) -> Path:
    for name in KUSTOMIZATION_FILES:
        if (directory / name).is_file():
            return directory / name
    raise ValueError(f"{directory}: no kustomization.yaml")


def render_builtin(directory: Path) -> list[dict]:
    objs = _build(directory.resolve())
    return _finish(objs)


def _build(directory: Path) -> list[dict]:
    kpath = kustomization_file(directory)
    k = yaml.safe_load(kpath.read_text(encoding="utf-8")) or {}
    unknown = set(k) - SUPPORTED_FIELDS
    if unknown:
        raise Unsupported(
            f"{kpath}: fields {sorted(unknown)} are not implemented by the built-in renderer "
            "(extend k8s/validate.py, or run where kustomize is installed)")
    objs: list[dict] = []
    for entry in k.get("resources", []) or []:
        p = directory / entry
        if p.is_dir():
            objs.extend(_build(p.resolve()))
        elif p.is_file():
            objs.extend(load_yaml_docs(p))
        else:
            raise ValueError(f"{kpath}: resource {entry!r} does not exist")
    for gen in k.get("configMapGenerator", []) or []:
        _generate_configmap(directory, kpath, gen, objs)
    for patch in k.get("patches", []) or []:
        _apply_patch(directory, kpath, patch, objs)
    ns = k.get("namespace")
    if ns:
        for o in objs:
            if o["kind"] in ("RoleBinding", "ClusterRoleBinding"):
                raise Unsupported(f"{kpath}: namespace on {o['kind']} (subjects) is not implemented")
            if o["kind"] == "Namespace":
                raise Unsupported(f"{kpath}: namespace with a Namespace object is not implemented")
            if o["kind"] not in CLUSTER_SCOPED:
                o.setdefault("metadata", {})["namespace"] = ns
    for image in k.get("images", []) or []:
        _set_image(kpath, image, objs)
    return objs


def _generate_configmap(directory: Path, kpath: Path, gen: dict, objs: list[dict]) -> None:
    unknown = set(gen) - {"name", "behavior", "files", "literals"}
    if unknown:
        raise Unsupported(f"{kpath}: configMapGenerator fields {sorted(unknown)}")
    data: dict[str, str] = {}
    for f in gen.get("files", []) or []:
        key, _, rel = f.partition("=") if "=" in f else (Path(f).name, "", f)
        path = directory / rel
        if not path.is_file():
            raise ValueError(f"{kpath}: configMapGenerator file {rel!r} does not exist")
        data[key] = path.read_text(encoding="utf-8")
    for lit in gen.get("literals", []) or []:
        key, _, value = lit.partition("=")
        data[key] = value
    name = gen["name"]
    behavior = gen.get("behavior", "create")
    existing = [o for o in objs if o["kind"] == "ConfigMap" and o.get(GENERATED) == name]
    if behavior == "create":
        if existing:
            raise ValueError(f"{kpath}: ConfigMap {name} generated twice (use behavior: replace)")
        objs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name},
                     "data": data, GENERATED: name})
    elif behavior in ("replace", "merge"):
        if len(existing) != 1:
            raise ValueError(f"{kpath}: behavior {behavior}: no generated ConfigMap {name} to act on")
        if behavior == "replace":
            existing[0]["data"] = data
        else:
            existing[0].setdefault("data", {}).update(data)
    else:
        raise Unsupported(f"{kpath}: configMapGenerator behavior {behavior!r}")


def _group_version(api_version: str) -> tuple[str, str]:
    return tuple(api_version.split("/", 1)) if "/" in api_version else ("", api_version)  # type: ignore


def _matches(target: dict, o: dict) -> bool:
    unknown = set(target) - {"group", "version", "kind", "name", "namespace"}
    if unknown:
        raise Unsupported(f"patch target fields {sorted(unknown)}")
    group, version = _group_version(o["apiVersion"])
    name = o["metadata"].get("name", "")
    if "group" in target and target["group"] != group:
        return False
    if "version" in target and target["version"] != version:
        return False
    if "kind" in target and target["kind"] != o["kind"]:
        return False
    if "name" in target and target["name"] != name and not re.fullmatch(target["name"], name):
        return False
    if "namespace" in target and target["namespace"] != o["metadata"].get("namespace"):
        return False
    return True


def _apply_patch(directory: Path, kpath: Path, spec: dict, objs: list[dict]) -> None:
    unknown = set(spec) - {"path", "patch", "target"}
    if unknown:
        raise Unsupported(f"{kpath}: patch fields {sorted(unknown)}")
    if "path" in spec:
        text = (directory / spec["path"]).read_text(encoding="utf-8")
    else:
        text = spec["patch"]
    content = yaml.safe_load(text)
    target = spec.get("target")
    if isinstance(content, list):
        if not target:
            raise ValueError(f"{kpath}: a JSON 6902 patch needs a target")
        hits = [o for o in objs if _matches(target, o)]
        if not hits:
            raise ValueError(f"{kpath}: patch target {target} matches nothing")
        for o in hits:
            _json6902(o, content)
        return
    if not isinstance(content, dict):
        raise ValueError(f"{kpath}: patch is neither a list of operations nor an object")
    if not target:
        target = {"kind": content["kind"], "name": content["metadata"]["name"]}
    hits = [o for o in objs if _matches(target, o)]
    if not hits:
        raise ValueError(f"{kpath}: patch target {target} matches nothing")
    body = {k: v for k, v in content.items() if k not in ("apiVersion", "kind")}
    if "metadata" in body:
        body["metadata"] = {k: v for k, v in body["metadata"].items() if k not in ("name", "namespace")}
        if not body["metadata"]:
            del body["metadata"]
    for o in hits:
        if o["kind"] in WORKLOAD_KINDS:
            _strategic_merge(o, body, o["kind"])
        elif _group_version(o["apiVersion"])[0].endswith(".k8s.io") or "." not in _group_version(o["apiVersion"])[0]:
            raise Unsupported(
                f"{kpath}: strategic merge patch on {o['kind']} (only workloads and custom "
                "resources are implemented; use a JSON 6902 patch)")
        else:
            _json_merge(o, body)


# Merge keys of the lists a strategic merge patch may touch inside a pod template.
MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name",
    "env": "name", "volumes": "name", "volumeMounts": "mountPath", "ports": "containerPort",
    "imagePullSecrets": "name", "volumeDevices": "devicePath", "resourceClaims": "name",
}
# Lists that a strategic merge patch replaces whole.
ATOMIC_LISTS = {"args", "command", "envFrom", "tolerations", "values", "drop", "add", "rules"}


def _strategic_merge(base: dict, patch: dict, where: str) -> None:
    for key, value in patch.items():
        if key.startswith("$"):
            raise Unsupported(f"{where}: strategic merge directive {key}")
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict):
            if not isinstance(base.get(key), dict):
                base[key] = {}
            _strategic_merge(base[key], value, f"{where}.{key}")
        elif isinstance(value, list):
            if key in MERGE_KEYS and isinstance(base.get(key), list):
                # As kustomize orders the result: the patch's items first (merged into their
                # originals), then the originals the patch did not name.
                mk = MERGE_KEYS[key]
                merged = []
                for item in value:
                    if not isinstance(item, dict) or mk not in item:
                        raise Unsupported(f"{where}.{key}: item without merge key {mk}")
                    match = next((b for b in base[key] if b.get(mk) == item[mk]), None)
                    if match is None:
                        merged.append(copy.deepcopy(item))
                    else:
                        _strategic_merge(match, item, f"{where}.{key}[{item[mk]}]")
                        merged.append(match)
                named = {item[mk] for item in value}
                base[key] = merged + [b for b in base[key] if b.get(mk) not in named]
            elif key in ATOMIC_LISTS or key not in base:
                base[key] = copy.deepcopy(value)
            else:
                raise Unsupported(f"{where}.{key}: strategic merge of this list")
        else:
            base[key] = copy.deepcopy(value)


def _json_merge(base: dict, patch: dict) -> None:
    for key, value in patch.items():
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            _json_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ValueError(f"JSON pointer {path!r} must start with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _json6902(obj: dict, ops: list[dict]) -> None:
    for op in ops:
        kind = op.get("op")
        parts = _pointer(op["path"])
        parent: Any = obj
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        last = parts[-1]
        if kind in ("add", "replace"):
            value = copy.deepcopy(op["value"])
            if isinstance(parent, list):
                if last == "-":
                    parent.append(value)
                elif kind == "add":
                    parent.insert(int(last), value)
                else:
                    parent[int(last)] = value
            else:
                if kind == "replace" and last not in parent:
                    raise ValueError(f"JSON patch replace: {op['path']} does not exist")
                parent[last] = value
        elif kind == "remove":
            if isinstance(parent, list):
                del parent[int(last)]
            else:
                del parent[last]
        elif kind == "test":
            current = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if current != op["value"]:
                raise ValueError(f"JSON patch test failed at {op['path']}")
        else:
            raise Unsupported(f"JSON patch op {kind!r}")


def _walk_containers(node: Any, fn: Callable[[dict], None]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for c in value:
                    if isinstance(c, dict):
                        fn(c)
            else:
                _walk_containers(value, fn)
    elif isinstance(node, list):
        for item in node:
            _walk_containers(item, fn)


def _set_image(kpath: Path, image: dict, objs: list[dict]) -> None:
    unknown = set(image) - {"name", "newName", "newTag", "digest"}
    if unknown:
        raise Unsupported(f"{kpath}: images fields {sorted(unknown)}")

    def fix(c: dict) -> None:
        ref = c.get("image", "")
        m = re.fullmatch(r"(?P<name>[^@:]+(?::\d+/[^@:]+)?)(?::(?P<tag>[^@]+))?(?:@(?P<digest>.+))?", ref)
        if not m or m.group("name") != image["name"]:
            return
        name = image.get("newName", m.group("name"))
        if "digest" in image:
            c["image"] = f"{name}@{image['digest']}"
        elif "newTag" in image:
            c["image"] = f"{name}:{image['newTag']}"
        else:
            tail = f":{m.group('tag')}" if m.group("tag") else ""
            tail += f"@{m.group('digest')}" if m.group("digest") else ""
            c["image"] = name + tail

    for o in objs:
        _walk_containers(o, fix)


def _go_json(value: Any) -> str:
    """json.Marshal as Go writes it: sorted keys, no spaces, HTML characters escaped."""
    s = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        s = s.replace(ch, esc)
    return s


def configmap_hash(cm: dict) -> str:
    # kustomize (api/hasher) hashes kind, data and binaryData; its lookup of "metadata/name"
    # finds nothing, so the name it hashes is always "".
    m: dict[str, Any] = {"kind": "ConfigMap", "name": "", "data": cm.get("data") or ""}
    if isinstance(cm.get("binaryData"), dict):
        m["binaryData"] = cm["binaryData"]
    digest = hashlib.sha256(_go_json(m).encode("utf-8")).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def _finish(objs: list[dict]) -> list[dict]:
    renames: dict[str, str] = {}
    for o in objs:
        name = o.pop(GENERATED, None)
        if name is not None:
            new = f"{name}-{configmap_hash(o)}"
            o["metadata"]["name"] = new
            renames[name] = new

    def fix_refs(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("configMap", "configMapRef", "configMapKeyRef") and isinstance(value, dict):
                    if value.get("name") in renames:
                        value["name"] = renames[value["name"]]
                fix_refs(value)
        elif isinstance(node, list):
            for item in node:
                fix_refs(item)

    for o in objs:
        if o["kind"] != "ConfigMap":
            fix_refs(o)
    return objs


def find_kustomize() -> tuple[list[str], str] | None:
    """A real kustomize: $KUSTOMIZE, `kustomize`, or `kubectl kustomize` with kustomize v4+."""
    env = os.environ.get("KUSTOMIZE")
    if env:
        return ([env, "build"], env)
    if shutil.which("kustomize"):
        return (["kustomize", "build"], "kustomize")
    if shutil.which("kubectl"):
        try:
            out = subprocess.run(["kubectl", "version", "--client", "-o", "json"], capture_output=True,
                                 text=True, timeout=30, check=True).stdout
            kv = json.loads(out).get("kustomizeVersion", "")
            m = re.match(r"v(\d+)", kv)
            if m and int(m.group(1)) >= 4:
                return (["kubectl", "kustomize"], f"kubectl kustomize ({kv})")
        except (subprocess.SubprocessError, ValueError, OSError):
            return None
    return None


def render_real(cmd: list[str], directory: Path) -> list[dict]:
    out = subprocess.run([*cmd, str(directory)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise ValueError(f"{' '.join(cmd)} {directory} failed: {out.stderr.strip()}")
    return [d for d in yaml.safe_load_all(out.stdout) if d is not None]


def _key(o: dict) -> tuple:
    return (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"], o["apiVersion"])


def differences(a: list[dict], b: list[dict]) -> list[str]:
    da = {_key(o): o for o in a}
    db = {_key(o): o for o in b}
    diffs = [f"only in kustomize: {k[0]}/{k[2]}" for k in sorted(set(db) - set(da))]
    diffs += [f"only in the built-in renderer: {k[0]}/{k[2]}" for k in sorted(set(da) - set(db))]
    for k in sorted(set(da) & set(db)):
        if json.dumps(da[k], sort_keys=True) != json.dumps(db[k], sort_keys=True):
            diffs.append(f"{k[0]}/{k[2]} differs")
    return diffs


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


# Custom resources allowed in the manifests: not in kubernetes-validate's schemas, so each has
# its own structural check. Anything else that has no schema is an error.
CUSTOM_KINDS: dict[tuple[str, str], Callable[[dict], list[str]]] = {
    ("keda.sh/v1alpha1", "ScaledObject"): check_scaledobject,
    ("keda.sh/v1alpha1", "TriggerAuthentication"): check_triggerauthentication,
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
        for p in problems:
            report.error(f"{label}: {where}: {p}")
        if not problems:
            report.ok(f"{label}: {where}: Forbid, timeZone {spec['timeZone']} = config, "
                      f"startingDeadlineSeconds {spec['startingDeadlineSeconds']}, "
                      f"backoffLimit {spec['jobTemplate']['spec']['backoffLimit']}")

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
    ap.add_argument("--renderer", choices=["auto", "builtin"], default="auto",
                    help="auto: also render with kustomize where available and compare")
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

    real = find_kustomize() if args.renderer == "auto" else None
    report = Report()
    total = 0
    for d in dirs:
        label = str(d.resolve().relative_to(HERE)) if d.resolve().is_relative_to(HERE) else str(d)
        print(f"k8s-validate: {label}")
        try:
            objs = render_builtin(d)
        except (Unsupported, ValueError, KeyError, yaml.YAMLError) as e:
            report.error(f"{label}: cannot render: {e}")
            continue
        if real is not None:
            try:
                diffs = differences(objs, render_real(real[0], d))
            except (ValueError, subprocess.SubprocessError) as e:
                report.error(f"{label}: {e}")
                diffs = []
            for diff in diffs:
                report.error(f"{label}: built-in renderer and {real[1]} disagree: {diff}")
            if not diffs:
                report.ok(f"{label}: rendered {len(objs)} objects; {real[1]} renders the same")
        else:
            report.ok(f"{label}: rendered {len(objs)} objects (built-in renderer only)")
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
