#!/usr/bin/env bash
# The demo, in one command on a fresh Debian 12 machine (as root):
#   1. installs what is missing and builds the binaries;
#   2. brings up the reference stand (examples/xmpp-lab.toml) on network namespaces: three
#      monitors, two PostgreSQL nodes with their agents, two clustered ejabberd nodes, a gateway
#      and the firewall (a stand left by a previous run is taken down first);
#   3. waits until the primary has a synchronous standby and shows `haclt status`;
#   4. connects four XMPP users (two per ejabberd frontend) that keep writing through ejabberd
#      (private XML storage, committed in PostgreSQL), runs the `crash-primary` drill (kill -9
#      of the primary's postmaster and agent) from the XMPP frontend e1server while haclt's
#      writers commit rows (directly to the primary, through the gateway's HAProxy and through
#      the multi-host libpq URI of `haclt show uri`), and prints both sets of figures: write
#      unavailability, acknowledged and lost writes per writer, when each frontend served the
#      new primary, and for the XMPP users the
#      longest gap between acknowledged writes, lost writes and whether their sessions stayed up;
#   5. waits until the old primary is back as the synchronous standby (the cluster healthy
#      again), shows `haclt status` and leaves the stand running.
# Every step is announced; a failure names the step that failed and exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."

STAND=xmpp-lab
TOPOLOGY=examples/xmpp-lab.toml
STATE=/run/ha-provision/$STAND
BIN=$PWD/target/debug
CONVERGE_TIMEOUT=${HA_DEMO_CONVERGE_TIMEOUT:-120}

step_name="start"
step() {
    step_name=$1
    printf '\n==> [%s] %s\n' "$(date +%T)" "$1"
}
trap 'echo "demo: FAILED during step: ${step_name} (see the output above)" >&2' ERR

haclt() {
    # haclt runs inside node $1's namespace. The drills run it on the XMPP frontend e1server:
    # from there it reaches the monitors (management network) and, for the drill's writer,
    # PostgreSQL through the gateway, the way ejabberd does.
    "$BIN/ha-provision" exec --stand "$STAND" "$1" -- "$BIN/haclt" --config "$STATE/haclt.toml" "${@:2}"
}

if [ "$(id -u)" != 0 ]; then
    echo "demo: run as root (network namespaces, nftables and PostgreSQL's own user need it)" >&2
    exit 64
fi

step "install what is missing (scripts/install-deps.sh)"
scripts/install-deps.sh
# shellcheck disable=SC1091
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

step "build the binaries (cargo build --locked --bins)"
cargo build --locked --bins

if [ -d "$STATE" ]; then
    step "take down the stand left by a previous run"
    "$BIN/ha-provision" down --stand "$STAND"
fi

step "bring up the reference stand ($TOPOLOGY, netns backend)"
"$BIN/ha-provision" up "$TOPOLOGY" --bin-dir "$BIN"

# `haclt status` exits 0 only when the cluster is healthy: a primary with a synchronous
# standby, every node serving its role, both frontends on the primary (3: degraded, with the
# reasons on stderr).
wait_healthy() {
    local deadline=$((SECONDS + CONVERGE_TIMEOUT))
    until haclt e1server status >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then
            echo "demo: the cluster is not healthy after ${CONVERGE_TIMEOUT} s; status:" >&2
            haclt e1server status >&2 || true
            false
        fi
        sleep 1
    done
}

step "wait until the cluster is healthy: a synchronous standby, both frontends on the primary (at most ${CONVERGE_TIMEOUT} s)"
wait_healthy

step "haclt status, before the drill"
haclt e1server status

step "XMPP users: load1..load4 on e1server and e2server, writing through ejabberd"
LOAD_OUT=$(mktemp)
LOAD_ERR=$(mktemp)
# Through ha-provision exec, which execs in place: $! is ha-xmpp-load's PID.
"$BIN/ha-provision" exec --stand "$STAND" e1server -- "$BIN/ha-xmpp-load" \
    --server 192.168.1.2:5222 --server 192.168.1.3:5222 --domain domain.local \
    --password-file "$STATE/pki/xmpp-load.password" --duration 10m >"$LOAD_OUT" 2>"$LOAD_ERR" &
LOAD=$!
trap 'kill "$LOAD" 2>/dev/null || true; rm -f "$LOAD_OUT" "$LOAD_ERR"' EXIT
deadline=$((SECONDS + 30))
until grep -q 'ha-xmpp-load: writing' "$LOAD_ERR"; do
    if ! kill -0 "$LOAD" 2>/dev/null || [ $SECONDS -ge $deadline ]; then
        echo "demo: the XMPP users did not start writing:" >&2
        cat "$LOAD_ERR" "$LOAD_OUT" >&2
        false
    fi
    sleep 0.2
done
# A few seconds of steady XMPP traffic before the fault.
sleep 3

step "drill: crash-primary (kill -9 of the primary's postmaster and agent; writers direct, through the gateway's HAProxy and through the libpq URI)"
haclt e1server drill crash-primary --wait 60s --via-proxy 192.168.1.1:5000 --via-uri
# A few seconds of XMPP traffic on the new primary, then the users stop, write once more and
# read every acknowledged write back through ejabberd.
sleep 3

step "XMPP users: figures across the crash"
kill -TERM "$LOAD"
load_rc=0
wait "$LOAD" || load_rc=$?
cat "$LOAD_OUT"
if [ "$load_rc" != 0 ]; then
    echo "demo: the XMPP users lost writes or sessions (exit $load_rc):" >&2
    cat "$LOAD_ERR" >&2
    false
fi

step "wait until the old primary is back as the synchronous standby (at most ${CONVERGE_TIMEOUT} s)"
healed_from=$SECONDS
wait_healthy
echo "healed $((SECONDS - healed_from)) s after the XMPP figures"

step "haclt status, after the drill"
haclt e1server status

step "done"
cat <<EOF
The stand is still running. Look around with:
  $BIN/ha-provision status --stand $STAND
  $BIN/ha-provision exec --stand $STAND e1server -- $BIN/haclt --config $STATE/haclt.toml status --watch
  $BIN/ha-provision exec --stand $STAND e1server -- $BIN/haclt --config $STATE/haclt.toml events
Take it down with:
  $BIN/ha-provision down --stand $STAND
EOF
