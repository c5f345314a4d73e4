#!/usr/bin/env bash
# The one-at-a-time removal report: deletes each __syncthreads(), __syncwarp() and
# cp_async_wait<N>() of kernels/*.cu in turn (the emulator skips that source line's calls, as if
# it were deleted), runs the kernels of its file under racecheck, and prints what caught the
# deletion (racecheck, synccheck or a wrong result) as a markdown table. Exits non-zero when a
# deletion goes unnoticed. This is tests/racecheck_emu.rs::every_synchronisation_is_necessary,
# which CI runs too (.ci/run); about a minute here after the racecheck build.
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --features emu-racecheck --test racecheck_emu every_synchronisation_is_necessary \
    -- --exact --nocapture >"$log" 2>&1 || status=$?
grep '^|' "$log" || true
if [ "$status" -ne 0 ]; then
    grep -v '^|' "$log" | tail -n 30 >&2
fi
exit "$status"
