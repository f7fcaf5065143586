#!/usr/bin/env bash
# Checks the Prometheus rules in config/prometheus/: syntax and naming
# (promtool check rules), the unit tests (promtool test rules), and that every
# recording rule is queried by a test and every alert has a firing test and a
# quiet one. Exits non-zero on any failure. Needs promtool on PATH
# (Debian/Ubuntu: apt-get install prometheus).
set -euo pipefail
cd "$(dirname "$0")/.."

dir=config/prometheus
rules=("$dir/recording_rules.yml" "$dir/alert_rules.yml")
tests=("$dir"/tests/*.yml)

if ! command -v promtool >/dev/null 2>&1; then
    echo "check-rules: promtool not found (apt-get install prometheus)" >&2
    exit 1
fi

echo "-- promtool check rules"
promtool check rules "${rules[@]}"

echo "-- promtool test rules"
promtool test rules "${tests[@]}"

echo "-- coverage"
fail=0
# Every recorded series is the subject of a promql_expr_test expression.
while read -r name; do
    if ! grep -Eq -- "- expr: .*${name//./\\.}" "${tests[@]}"; then
        echo "recording rule $name: no promql_expr_test queries it" >&2
        fail=1
    fi
done < <(sed -n 's/^ *- record: *//p' "$dir/recording_rules.yml")
# Every alert is expected to fire somewhere and to stay quiet somewhere.
while read -r name; do
    fires=$(grep -A2 -- "alertname: $name\$" "${tests[@]}" | grep -c 'exp_alerts:$' || true)
    quiet=$(grep -A2 -- "alertname: $name\$" "${tests[@]}" | grep -c 'exp_alerts: \[\]' || true)
    if [ "$fires" -eq 0 ] || [ "$quiet" -eq 0 ]; then
        echo "alert $name: $fires firing and $quiet quiet test cases, want at least one of each" >&2
        fail=1
    fi
done < <(sed -n 's/^ *- alert: *//p' "$dir/alert_rules.yml")
if [ "$fail" -ne 0 ]; then
    exit 1
fi
echo "every recording rule and alert is tested"
