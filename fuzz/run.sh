#!/usr/bin/env bash
# Builds every fuzz target and runs each for a bounded time; exits non-zero if any target
# finds a crash (a panic, a broken invariant, a timeout or running out of memory).
#
# Environment:
#   FUZZ_SECONDS    seconds per target (default 30)
#   FUZZ_TARGETS    targets to run (default: all seven)
#   FUZZ_SANITIZER  cargo-fuzz sanitizer (default none: the crates forbid unsafe code, and
#                   it keeps the build and the runs fast; use `address` for long runs)
#   FUZZ_WORK       directory for the corpus each run grows (default: a temporary one);
#                   the committed seeds in corpus/<target> are read, never written
#
# Runs on the stable toolchain: cargo-fuzz needs unstable rustc flags, which
# RUSTC_BOOTSTRAP=1 allows.
set -euo pipefail
cd "$(dirname "$0")"

FUZZ_SECONDS="${FUZZ_SECONDS:-30}"
FUZZ_TARGETS="${FUZZ_TARGETS:-frame_decode discovery_record seal_open keyfile_decode relay_frame path_probe write_log}"
FUZZ_SANITIZER="${FUZZ_SANITIZER:-none}"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

# Longest input per target: frames need room past the 16 KiB text limit, records and
# JSON bodies a few KiB, key files are 105 or 171 bytes.
max_len() {
  case "$1" in
    frame_decode) echo 20000 ;;
    discovery_record) echo 8192 ;;
    keyfile_decode) echo 512 ;;
    *) echo 4096 ;;
  esac
}

build_flags=(--sanitizer "$FUZZ_SANITIZER")
echo "== building fuzz targets (sanitizer: $FUZZ_SANITIZER)"
cargo fuzz build "${build_flags[@]}"

if [ -n "${FUZZ_WORK:-}" ]; then
  work="$FUZZ_WORK"
  mkdir -p "$work"
else
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
fi

failed=()
summary=()
for t in $FUZZ_TARGETS; do
  echo "== fuzzing $t for ${FUZZ_SECONDS}s"
  mkdir -p "$work/$t" "corpus/$t"
  log="$work/$t.log"
  status=0
  cargo fuzz run "${build_flags[@]}" "$t" "$work/$t" "corpus/$t" -- \
    -max_total_time="$FUZZ_SECONDS" -timeout=10 -rss_limit_mb=2048 \
    -max_len="$(max_len "$t")" -print_final_stats=1 >"$log" 2>&1 || status=$?
  # libFuzzer's last status line and final stats: execs, exec/s, coverage, corpus.
  grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1 || true
  execs="$(sed -n 's/^stat::number_of_executed_units:[[:space:]]*//p' "$log" | tail -n 1)"
  rate="$(sed -n 's/^stat::average_exec_per_sec:[[:space:]]*//p' "$log" | tail -n 1)"
  summary+=("$t: ${execs:-?} execs, ${rate:-?} exec/s, exit $status")
  if [ "$status" -ne 0 ]; then
    echo "!! $t failed (exit $status); what panicked:"
    grep -m 3 -A 4 "panicked at" "$log" || echo "   (no panic message in the log)"
    echo "!! the end of its log:"
    tail -n 60 "$log"
    ls -1 "artifacts/$t" 2>/dev/null | sed "s|^|   artifact: fuzz/artifacts/$t/|" || true
    failed+=("$t")
  fi
done

echo "== fuzz summary"
printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -ne 0 ]; then
  echo "fuzz targets with findings: ${failed[*]}"
  exit 1
fi
