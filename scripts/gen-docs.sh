#!/usr/bin/env bash
# Writes the man pages and shell completions of haclt, ha-monitor, ha-agent and ha-provision
# (generated from their clap definitions by the ha-docgen crate) into OUT_DIR.
#
#   scripts/gen-docs.sh [--profile release|dev] [OUT_DIR]
#
# release (the default) runs ha-docgen with `cargo run --release`; OUT_DIR defaults to
# $CARGO_TARGET_DIR/release/deb-assets, where the Debian packages take them from.
# dev builds nothing: it runs the debug binary $CARGO_TARGET_DIR/debug/ha-docgen that
# `cargo build --workspace` left there (scripts/build-debs.sh --profile dev, the packages test);
# OUT_DIR defaults to $CARGO_TARGET_DIR/debug/deb-assets.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-$PWD/target}"

die() {
  echo "gen-docs: $*" >&2
  exit 1
}

profile=release
out=
while [ $# -gt 0 ]; do
  case "$1" in
  --profile)
    [ $# -ge 2 ] || die "--profile needs a value: release or dev"
    profile="$2"
    shift 2
    ;;
  --profile=*)
    profile="${1#--profile=}"
    shift
    ;;
  -*) die "unknown option $1 (usage: gen-docs.sh [--profile release|dev] [OUT_DIR])" ;;
  *)
    [ -z "$out" ] || die "one OUT_DIR only (usage: gen-docs.sh [--profile release|dev] [OUT_DIR])"
    out="$1"
    shift
    ;;
  esac
done

case "$profile" in
release)
  out="${out:-$target/release/deb-assets}"
  cargo run --quiet --release -p ha-docgen -- "$out" >/dev/null
  ;;
dev | debug)
  out="${out:-$target/debug/deb-assets}"
  docgen="$target/debug/ha-docgen"
  [ -x "$docgen" ] || die "$docgen is missing: build the workspace first: cargo build --workspace"
  "$docgen" "$out" >/dev/null
  ;;
*) die "unknown profile '$profile': release or dev" ;;
esac
# Debian installs man pages compressed.
gzip -9nf "$out"/man/*.1
echo "gen-docs: man pages and completions in $out"
