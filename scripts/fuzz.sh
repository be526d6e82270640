#!/usr/bin/env bash
# The nightly-length fuzzing of every parser of outside bytes (fuzz/fuzz_targets/): each target
# runs SECONDS (default 60) under libFuzzer on the nightly toolchain (cargo fuzz needs it), from
# and into its corpus in fuzz/corpus/<target> (commit what it adds). A crash leaves the input in
# fuzz/artifacts/<target>/ and fails the run. Not part of scripts/test.sh (CI's budget): run it
# nightly, or after changing a parser.   Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
if ! command -v cargo-fuzz > /dev/null; then
    echo "installing cargo-fuzz (cargo install, a few minutes)"
    cargo install cargo-fuzz --locked
fi
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cd fuzz && cargo +nightly fuzz list)
fi
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    echo "fuzzing $t for ${secs}s"
    (cd fuzz && cargo +nightly fuzz run "$t" "corpus/$t" -- \
        -max_total_time="$secs" -max_len=16384 -rss_limit_mb=2048 -print_final_stats=1)
done
echo "fuzzing done: ${#targets[@]} targets, ${secs}s each, no crash"
