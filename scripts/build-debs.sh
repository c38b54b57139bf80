#!/usr/bin/env bash
# Builds the Debian packages ha-monitor, ha-agent, haclt and ha-provision: binaries, man pages
# and shell completions (scripts/gen-docs.sh), and the systemd units printed by `haclt systemd`
# for the packaged paths (binaries in /usr/bin, configuration in /etc/ha). See docs/deploy.md.
#
#   scripts/build-debs.sh [--profile release|dev] [--output DIR]
#
# --profile release (the default): builds the release binaries (installing cargo-deb when it is
#   missing) and packages $CARGO_TARGET_DIR/release.
# --profile dev: builds and installs nothing; packages the debug binaries that
#   `cargo build --workspace` (or the test suite) left in $CARGO_TARGET_DIR/debug, with fast
#   compression. For the packages test (tests/tests/packages.rs), never for shipping.
# --output DIR: where the .deb files go (default $CARGO_TARGET_DIR/debian); a relative DIR is
#   relative to the current directory.
#
# The package metadata names its assets target/release/...: cargo-deb replaces that prefix with
# the directory of the selected profile ($CARGO_TARGET_DIR/debug for dev), so the generated
# assets go to $CARGO_TARGET_DIR/<release|debug>/deb-assets.
set -euo pipefail
caller_dir="$PWD"
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
packages=(ha-monitor ha-agent haclt ha-provision)
usage="usage: build-debs.sh [--profile release|dev] [--output DIR]"

die() {
  echo "build-debs: $*" >&2
  exit 1
}

profile=release
out="$CARGO_TARGET_DIR/debian"
while [ $# -gt 0 ]; do
  case "$1" in
  --profile | --output)
    [ $# -ge 2 ] || die "$1 needs a value ($usage)"
    if [ "$1" = --profile ]; then profile="$2"; else out="$2"; fi
    shift 2
    ;;
  --profile=*)
    profile="${1#--profile=}"
    shift
    ;;
  --output=*)
    out="${1#--output=}"
    shift
    ;;
  -h | --help)
    echo "$usage"
    exit 0
    ;;
  *) die "unknown argument $1 ($usage)" ;;
  esac
done
case "$out" in
/*) ;;
*) out="$caller_dir/$out" ;;
esac

case "$profile" in
release)
  profile_dir="$CARGO_TARGET_DIR/release"
  # Default cargo-deb options: its own profile is release.
  deb_args=()
  if ! cargo deb --version >/dev/null 2>&1; then
    echo "build-debs: installing cargo-deb"
    cargo install --locked cargo-deb
  fi
  cargo build --release $(printf -- '-p %s ' "${packages[@]}")
  ;;
dev | debug)
  profile_dir="$CARGO_TARGET_DIR/debug"
  # cargo-deb warns that it does not support the dev profile (it still maps target/release/ to
  # target/debug/); --fast: xz level 1 instead of 6 for these large unoptimized binaries.
  deb_args=(--profile dev --fast)
  cargo deb --version >/dev/null 2>&1 ||
    die "cargo-deb is missing: run scripts/install-deps.sh (or cargo install --locked cargo-deb)"
  for b in "${packages[@]}" ha-docgen; do
    [ -x "$profile_dir/$b" ] ||
      die "$profile_dir/$b is missing: build the workspace first: cargo build --workspace"
  done
  ;;
*) die "unknown profile '$profile': release or dev ($usage)" ;;
esac

assets="$profile_dir/deb-assets"
rm -rf "$assets"
mkdir -p "$assets/units"
scripts/gen-docs.sh --profile "$profile" "$assets"
haclt="$profile_dir/haclt"
# The units name their configuration in /etc/ha and start nothing until it exists.
"$haclt" systemd monitor --bin-dir /usr/bin >"$assets/units/ha-monitor.service"
"$haclt" systemd agent --role postgres --bin-dir /usr/bin >"$assets/units/ha-agent.service"
"$haclt" systemd agent --role ejabberd --bin-dir /usr/bin >"$assets/units/ha-agent-ejabberd.service"

mkdir -p "$out"
for p in "${packages[@]}"; do
  cargo deb --no-build --strip "${deb_args[@]}" -p "$p" --output "$out/"
done
ls -l "$out"/*.deb
