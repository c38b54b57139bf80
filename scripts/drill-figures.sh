#!/usr/bin/env bash
# Write unavailability on the reference stand (netns), per way to the primary: N `crash-primary`
# and N `switchover` drills, each with three writers at once (directly to the primary as the
# status names it, through the gateway's HAProxy, and through the multi-host libpq URI of
# `haclt show uri`), then the median and the maximum of each. Every drill must lose no
# acknowledged write; between two drills the cluster is waited back to healthy.
#
#   scripts/drill-figures.sh [N]        (as root; N defaults to 10; takes about 1 min per 2 drills)
#
# Brings the stand up first when it is not running (like scripts/demo.sh, debug build unless
# HA_BIN names another directory), and leaves it running.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${1:-10}
STAND=xmpp-lab
TOPOLOGY=examples/xmpp-lab.toml
STATE=/run/ha-provision/$STAND
BIN=${HA_BIN:-$PWD/target/debug}
PROXY=192.168.1.1:5000

if [ "$(id -u)" != 0 ]; then
    echo "drill-figures: run as root (network namespaces, nftables)" >&2
    exit 64
fi
case $RUNS in
    '' | *[!0-9]* | 0)
        echo "drill-figures: N must be a positive number, got '$RUNS'" >&2
        exit 64
        ;;
esac

haclt() {
    # On the XMPP frontend e1server, as the demo: the writers reach PostgreSQL, the gateway's
    # HAProxy and the monitors from there.
    "$BIN/ha-provision" exec --stand "$STAND" e1server -- "$BIN/haclt" --config "$STATE/haclt.toml" "$@"
}

wait_healthy() {
    local deadline=$((SECONDS + 180))
    until haclt status >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then
            echo "drill-figures: the cluster is not healthy after 180 s:" >&2
            haclt status >&2 || true
            exit 75
        fi
        sleep 1
    done
}

if [ -z "${HA_BIN:-}" ]; then
    cargo build --locked --bins
fi
if ! "$BIN/ha-provision" status --stand "$STAND" >/dev/null 2>&1; then
    "$BIN/ha-provision" up "$TOPOLOGY" --bin-dir "$BIN"
fi

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
for scenario in crash-primary switchover; do
    for i in $(seq 1 "$RUNS"); do
        wait_healthy
        echo "drill-figures: $scenario $i of $RUNS" >&2
        haclt drill "$scenario" --wait 60s --json --via-proxy "$PROXY" --via-uri \
            >"$OUT/$scenario-$i.json"
    done
done
wait_healthy

python3 - "$OUT" "$RUNS" <<'EOF'
import json, pathlib, statistics, sys

out, runs = pathlib.Path(sys.argv[1]), int(sys.argv[2])
print(f"write unavailability (ms), {runs} drills each: median (max); no acknowledged write lost")
print(f"{'scenario':<15}{'direct':>16}{'HAProxy':>16}{'libpq URI':>16}")
for scenario in ("crash-primary", "switchover"):
    reports = [json.loads((out / f"{scenario}-{i}.json").read_text()) for i in range(1, runs + 1)]
    for r in reports:
        lost = r["lost_writes"] + sum(v["lost_writes"] for v in r["via"])
        assert lost == 0 and r["converged"], r
    ways = [[r["write_unavailable_ms"] for r in reports]]
    for k in range(2):
        ways.append([r["via"][k]["write_unavailable_ms"] for r in reports])
    cells = "".join(f"{statistics.median(w):>9.0f} ({max(w):>4})" for w in ways)
    print(f"{scenario:<15}{cells}")
EOF
