#!/usr/bin/env bash
# Runs every check and test of pgkeep: installs what the tests need (PostgreSQL 15, the S3 test server, Azurite, the chart tools), then
# formatting, lints, and the whole test suite (unit tests, and end-to-end tests against real
# Postgres clusters, a real S3-compatible server and the Azure Blob emulator on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

scripts/install-deps.sh postgres s3s-fs majors azurite helm promtool
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --no-fail-fast
else
  cargo test --no-fail-fast
fi
