#!/usr/bin/env bash
# Writes the man pages and shell completions of haclt, ha-monitor, ha-agent and ha-provision
# (generated from their clap definitions by the ha-docgen crate) into OUT_DIR (default:
# $CARGO_TARGET_DIR/release/deb-assets, where the Debian packages take them from).
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-$PWD/target}"
out="${1:-$target/release/deb-assets}"
cargo run --quiet --release -p ha-docgen -- "$out" >/dev/null
# Debian installs man pages compressed.
gzip -9nf "$out"/man/*.1
echo "gen-docs: man pages and completions in $out"
