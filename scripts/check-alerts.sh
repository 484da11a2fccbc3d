#!/usr/bin/env bash
# The Prometheus alert rules (monitoring/alerts.yml): valid (promtool check rules), each with a
# unit test that passes (promtool test rules monitoring/alerts_test.yml), and each with the
# runbook its runbook_url names. `just lint` runs it; promtool comes with Debian's `prometheus`
# package (.ci/run installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v promtool >/dev/null 2>&1; then
  echo "check-alerts: promtool not found: apt-get install prometheus (Debian), or put promtool on PATH" >&2
  exit 2
fi
promtool check rules monitoring/alerts.yml
(cd monitoring && promtool test rules alerts_test.yml)
status=0
for alert in $(grep -E '^\s+- alert: ' monitoring/alerts.yml | awk '{print $3}'); do
  if ! grep -Eq "alertname: ${alert}\$" monitoring/alerts_test.yml; then
    echo "check-alerts: ${alert} has no test in monitoring/alerts_test.yml" >&2
    status=1
  fi
done
for runbook in $(grep -E '^\s+runbook_url: ' monitoring/alerts.yml | awk '{print $2}'); do
  if [ ! -f "$runbook" ]; then
    echo "check-alerts: runbook $runbook does not exist" >&2
    status=1
  fi
done
[ "$status" = 0 ] && echo "check-alerts: $(grep -cE '^\s+- alert: ' monitoring/alerts.yml) alerts, each tested, each with its runbook"
exit "$status"
