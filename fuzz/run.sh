#!/usr/bin/env bash
# Builds every ringfault-proto fuzz target and runs each for FUZZ_SECONDS
# (default 30). Exits non-zero if a target fails to build or finds a crash;
# crash inputs are left in fuzz/artifacts/TARGET/.
#
# Usage: fuzz/run.sh [TARGET...]        (no argument: all targets)
#   FUZZ_SECONDS=N   seconds per target (default 30)
# Runs on stable Rust: cargo-fuzz needs nightly flags, which RUSTC_BOOTSTRAP=1 unlocks.
set -euo pipefail

cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1
seconds="${FUZZ_SECONDS:-30}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz/run.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

# Build everything first: a build failure is fatal before any fuzzing time is spent.
for t in "${targets[@]}"; do
    cargo fuzz build -O "$t"
done

failed=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    echo "=== fuzz $t for ${seconds}s ==="
    if ! cargo fuzz run -O "$t" "corpus/$t" -- \
        -max_total_time="$seconds" -print_final_stats=1; then
        failed+=("$t")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz/run.sh: crashes in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz/run.sh: ${#targets[@]} targets ran ${seconds}s each without a crash"
