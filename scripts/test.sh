#!/usr/bin/env bash
# The whole test suite: formatting, lints, every test of every crate (real PostgreSQL, ejabberd
# and network namespaces included: run as root), and the doc tests.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"

step() { printf '\n== %s\n' "$*"; }
step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings
# The monitor's deliberately broken build (tests/tests/chaos.rs builds and runs it) too.
cargo clippy -p ha-monitor --all-targets --features deliberately-broken --locked -- -D warnings
step "cargo nextest (all crates)"
profile=default
[ -n "${CI:-}" ] && profile=ci
cargo nextest run --workspace --locked --profile "$profile"
step "doc tests"
cargo test --workspace --doc --locked
