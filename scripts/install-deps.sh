#!/usr/bin/env bash
# Installs every system package the workspace, its tests and the demo need on Debian 12.
# Idempotent: safe to run when everything (or nothing) is installed. Must run as root.
# Package services are not started by the install: our tests start their own processes.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: must run as root (it calls apt-get)" >&2
  exit 1
fi

packages=(
  # PostgreSQL 15 server and client (the agent drives initdb, pg_ctl, pg_basebackup, pg_rewind)
  postgresql-15 postgresql-client-15
  # ejabberd frontends and their PostgreSQL driver
  ejabberd erlang-p1-pgsql
  # the stand's load balancer on the gateway (checks the agents' /primary endpoint)
  haproxy
  # libvirt backend of ha-provision (virt crate links libvirt; test:///default needs no daemon)
  libvirt-dev pkg-config
  # sshd the ha-provision SSH client tests start on loopback (host-key pinning, exec, upload)
  openssh-server
  # network namespaces, bridges, veth, firewalls for the netns backend and partition drills
  iproute2 nftables procps
  # regenerating the checked-in gRPC code in the proto freshness test
  protobuf-compiler
  # systemd-analyze: haclt's test verifies every unit `haclt systemd` prints
  systemd
  # building crates that compile C
  build-essential ca-certificates curl
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  # Keep package maintainer scripts from starting services (ejabberd, postgresql clusters):
  # our tests and the demo start exactly the processes they own.
  created_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 0755 /usr/sbin/policy-rc.d
    created_policy=1
  fi
  trap '[ "$created_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d' EXIT
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "install-deps: all system packages present"
fi

# Rust toolchain pieces: the machine's rustup toolchain is expected; nextest and cargo-deb are
# installed if absent.
if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "install-deps: cargo not found; install a Rust toolchain (rustup) first" >&2
    exit 1
  fi
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "install-deps: installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
# cargo-deb: scripts/build-debs.sh and the packages test (tests/tests/packages.rs) build the
# Debian packages with it. Compiling it takes about 2 minutes on two cores.
if ! cargo deb --version >/dev/null 2>&1; then
  echo "install-deps: installing cargo-deb"
  cargo install --locked cargo-deb
fi
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt 2>/dev/null || true
echo "install-deps: done"
