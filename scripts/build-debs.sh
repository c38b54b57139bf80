#!/usr/bin/env bash
# Builds the Debian packages ha-monitor, ha-agent, haclt and ha-provision into
# $CARGO_TARGET_DIR/debian/ (default target/debian/): release binaries, man pages and shell
# completions (scripts/gen-docs.sh), and the systemd units printed by `haclt systemd` for the
# packaged paths (binaries in /usr/bin, configuration in /etc/ha). Installs cargo-deb when it
# is missing. See docs/deploy.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
packages=(ha-monitor ha-agent haclt ha-provision)

if ! cargo deb --version >/dev/null 2>&1; then
  echo "build-debs: installing cargo-deb"
  cargo install --locked cargo-deb
fi

cargo build --release $(printf -- '-p %s ' "${packages[@]}")
assets="$CARGO_TARGET_DIR/release/deb-assets"
rm -rf "$assets"
mkdir -p "$assets/units"
scripts/gen-docs.sh "$assets"
haclt="$CARGO_TARGET_DIR/release/haclt"
# The units name their configuration in /etc/ha and start nothing until it exists.
"$haclt" systemd monitor --bin-dir /usr/bin >"$assets/units/ha-monitor.service"
"$haclt" systemd agent --role postgres --bin-dir /usr/bin >"$assets/units/ha-agent.service"
"$haclt" systemd agent --role ejabberd --bin-dir /usr/bin >"$assets/units/ha-agent-ejabberd.service"

mkdir -p "$CARGO_TARGET_DIR/debian"
for p in "${packages[@]}"; do
  cargo deb --no-build --strip -p "$p" --output "$CARGO_TARGET_DIR/debian/"
done
ls -l "$CARGO_TARGET_DIR"/debian/*.deb
