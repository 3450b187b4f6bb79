#!/usr/bin/env bash
# Bounded libFuzzer run of every cargo-fuzz target in fuzz/, for CI (docs/fuzzing.md).
#
#   scripts/fuzz.sh [TARGET...]          default: frame_decode stream_reassembly auth_verify
#
#   FUZZ_SECONDS    fuzzing time per target (default 60)
#   FUZZ_TOOLCHAIN  toolchain for cargo-fuzz (default nightly: -Zsanitizer=address needs it)
#
# Installs cargo-fuzz (and the nightly toolchain) if missing, builds all targets once, then
# runs each one from the checked-in seeds in fuzz/corpus/<target>/. What a run discovers goes
# to a scratch corpus under fuzz/target/, so the seeds stay as reviewed. Prints executions per
# target and exits non-zero if any target crashed, hung or leaked; the input that did it is in
# fuzz/artifacts/<target>/ and `cargo +nightly fuzz run <target> <that file>` replays it.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
FUZZ_TOOLCHAIN="${FUZZ_TOOLCHAIN:-nightly}"
if [ $# -gt 0 ]; then
  targets=("$@")
else
  targets=(frame_decode stream_reassembly auth_verify)
fi

if ! rustup run "$FUZZ_TOOLCHAIN" rustc --version >/dev/null 2>&1; then
  echo "installing the $FUZZ_TOOLCHAIN toolchain" >&2
  rustup toolchain install "$FUZZ_TOOLCHAIN" --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi

# Longest input libFuzzer may try, per target: a stream must be able to fill the server's
# 16 KiB read buffer; a frame is at most 1080 bytes, two of them show trailing-byte handling.
max_len_for() {
  case "$1" in
    stream_reassembly) echo 20000 ;;
    *) echo 4096 ;;
  esac
}

build_start=$(date +%s)
# With no target named, `fuzz build` builds them all (release, debug assertions, ASan).
cargo "+$FUZZ_TOOLCHAIN" fuzz build
echo "build: $(($(date +%s) - build_start)) s"

scratch="target/corpus-run"
rm -rf "$scratch"
failed=()
summary=()
for target in "${targets[@]}"; do
  mkdir -p "$scratch/$target" "artifacts/$target"
  log="target/fuzz-$target.log"
  echo "fuzzing $target for $FUZZ_SECONDS s (log: fuzz/$log)"
  status=0
  cargo "+$FUZZ_TOOLCHAIN" fuzz run "$target" "$scratch/$target" "corpus/$target" -- \
    -max_total_time="$FUZZ_SECONDS" -max_len="$(max_len_for "$target")" -timeout=10 \
    -print_final_stats=1 >"$log" 2>&1 || status=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
  units=$(find "$scratch/$target" "corpus/$target" -type f | wc -l)
  if [ "$status" -ne 0 ]; then
    failed+=("$target")
    echo "FAILED: $target (exit $status); last lines of fuzz/$log:" >&2
    tail -n 40 "$log" >&2
    summary+=("$(printf '%-18s FAILED  executions %-10s exec/s %-7s' "$target" "${runs:-?}" "${rate:-?}")")
  else
    summary+=("$(printf '%-18s ok      executions %-10s exec/s %-7s corpus %s' \
      "$target" "${runs:-?}" "${rate:-?}" "$units")")
  fi
done

echo
echo "fuzzing summary (${FUZZ_SECONDS} s per target, toolchain $FUZZ_TOOLCHAIN):"
printf '  %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "crashed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
