#!/usr/bin/env bash
# Runs quring's cargo-fuzz targets for a set time each and reports per target the runs
# executed, the coverage reached and the crashes found. Exits non-zero on any crash (panic,
# abort, timeout (60 s), out-of-memory or an allocation over the malloc limit).
#
#   scripts/fuzz.sh [-j] [--merge] [SECONDS_PER_TARGET] [TARGET...]
#
#   -j          run two targets at a time (the machine's two cores)
#   --merge     afterwards, merge inputs with new coverage into fuzz/corpus/<target>
#   SECONDS     time per target (default 1800)
#   TARGET      default: every target (header decode image cli)
#
# New corpus entries go to fuzz/corpus-run/<target> (not committed); the committed corpus
# fuzz/corpus/<target> is only read (unless --merge). Crash reproducers land in
# fuzz/artifacts/<target>/; copy real ones to fuzz/artifacts-regressions/<target>/ so the
# regression test (cargo test --test fuzz_regressions) replays them.
#
# Needs cargo-fuzz (cargo install cargo-fuzz). On a stable toolchain RUSTC_BOOTSTRAP=1 is
# set for the build (cargo-fuzz uses -Z flags). Fuzzing runs at nice 19.
set -u -o pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
fz="$here/fuzz"
parallel=1
merge=0
secs=1800
targets=()
for a in "$@"; do
    case "$a" in
        -j) parallel=2 ;;
        --merge) merge=1 ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        ''|*[!0-9]*) targets+=("$a") ;;
        *) secs=$a ;;
    esac
done
[ ${#targets[@]} -eq 0 ] && targets=(header decode image cli)

# Per-target input size limits: a header cluster, a decoder input, a small image file.
max_len() {
    case "$1" in
        header) echo 65536 ;;
        decode) echo 70000 ;;
        image) echo 530000 ;;
        cli) echo 4096 ;;
        *) echo 65536 ;;
    esac
}

# Per-target single-allocation limits (MiB): `cli` runs commands on a 1 MiB image, so any
# allocation near 32 MiB is one beyond what the image needs.
malloc_limit() {
    case "$1" in
        cli) echo 32 ;;
        *) echo 256 ;;
    esac
}

export RUSTC_BOOTSTRAP=1
# A smaller ASan quarantine (default 256 MiB) keeps the process RSS, which -rss_limit_mb
# checks, about the fuzzed code rather than about freed memory held for use-after-free checks.
export ASAN_OPTIONS=${ASAN_OPTIONS:-quarantine_size_mb=32}
cd "$fz" || exit 2
echo "== building fuzz targets (cargo fuzz build)"
if ! nice -n 19 cargo fuzz build >/dev/null 2>"$fz/target-build.log"; then
    cat "$fz/target-build.log" >&2
    echo "fuzz.sh: cargo fuzz build failed (is cargo-fuzz installed? cargo install cargo-fuzz)" >&2
    exit 2
fi
rm -f "$fz/target-build.log"
triple=$(rustc -vV | sed -n 's/^host: //p')
bindir="$fz/target/$triple/release"

logdir="$fz/logs"
mkdir -p "$logdir"

# run_target NAME: fuzzes NAME for $secs seconds (restarting after each crash, at most 20
# times) and writes a summary line to $logdir/NAME.summary.
run_target() {
    local t=$1 bin="$bindir/$1"
    local run="$fz/corpus-run/$t" seeds="$fz/corpus/$t" art="$fz/artifacts/$t/"
    mkdir -p "$run" "$seeds" "$art"
    local start end now left execs=0 cov=0 ft=0 crashes=0 restarts=0 log="$logdir/$t.log"
    : >"$log"
    start=$(date +%s)
    end=$((start + secs))
    while :; do
        now=$(date +%s)
        left=$((end - now))
        [ "$left" -le 0 ] && break
        local part="$logdir/$t.part"
        nice -n 19 "$bin" "$run" "$seeds" \
            -max_total_time="$left" -rss_limit_mb=512 -malloc_limit_mb="$(malloc_limit "$t")" -timeout=60 \
            -report_slow_units=30 -max_len="$(max_len "$t")" -artifact_prefix="$art" -print_final_stats=1 \
            -close_fd_mask=1 >"$part" 2>&1
        local rc=$?
        cat "$part" >>"$log"
        local n
        n=$(sed -n 's/^stat::number_of_executed_units: *//p' "$part" | tail -1)
        if [ -z "$n" ]; then
            # Crashes skip the final stats: take the last progress line.
            n=$(grep -o '^#[0-9]*' "$part" | tail -1 | tr -d '#')
        fi
        execs=$((execs + ${n:-0}))
        local c f
        c=$(grep -o ' cov: [0-9]*' "$part" | tail -1 | tr -dc 0-9)
        f=$(grep -o ' ft: [0-9]*' "$part" | tail -1 | tr -dc 0-9)
        [ -n "$c" ] && [ "$c" -gt "$cov" ] && cov=$c
        [ -n "$f" ] && [ "$f" -gt "$ft" ] && ft=$f
        local found
        # Slow units (over 30 s, not a timeout) are listed but are not crashes.
        found=$(grep 'Test unit written to' "$part" | grep -vc 'slow-unit-')
        crashes=$((crashes + found))
        grep 'Test unit written to' "$part" | sed "s/^/[$t] /"
        if [ "$rc" -ne 0 ] && [ "$found" -eq 0 ]; then
            if [ "$rc" -eq 137 ] || [ "$rc" -eq 143 ]; then
                # SIGKILL/SIGTERM from outside (e.g. the system OOM killer: libFuzzer's own
                # RSS limit writes an oom- artifact instead). Resumed, not a crash.
                echo "[$t] fuzzer killed from outside (exit $rc); resuming" >&2
            else
                echo "[$t] libFuzzer exited with $rc without an artifact; see $log" >&2
                crashes=$((crashes + 1))
            fi
        fi
        [ "$rc" -eq 0 ] && break
        restarts=$((restarts + 1))
        [ "$restarts" -ge 20 ] && break
    done
    rm -f "$logdir/$t.part" /dev/shm/quring-fuzz-*.qcow2 2>/dev/null
    local took=$(($(date +%s) - start))
    printf '%-8s %6ss  execs %-11s cov %-6s ft %-7s corpus %-6s crashes %s\n' \
        "$t" "$took" "$execs" "$cov" "$ft" "$(find "$run" "$seeds" -type f | wc -l)" "$crashes" \
        | tee "$logdir/$t.summary"
}

echo "== fuzzing ${targets[*]} for ${secs}s each (parallel $parallel), logs in $logdir"
pids=()
for t in "${targets[@]}"; do
    [ -x "$bindir/$t" ] || { echo "fuzz.sh: no target binary $bindir/$t" >&2; exit 2; }
    run_target "$t" &
    pids+=($!)
    if [ "${#pids[@]}" -ge "$parallel" ]; then
        wait "${pids[0]}"
        pids=("${pids[@]:1}")
    fi
done
wait

if [ "$merge" -eq 1 ]; then
    for t in "${targets[@]}"; do
        echo "== merging new coverage of $t into fuzz/corpus/$t"
        nice -n 19 "$bindir/$t" -merge=1 -rss_limit_mb=512 -malloc_limit_mb=256 -timeout=60 \
            -report_slow_units=30 -max_len="$(max_len "$t")" "$fz/corpus/$t" "$fz/corpus-run/$t" >/dev/null 2>&1
    done
fi

echo "== summary ($(date -u +%Y-%m-%d))"
total=0
for t in "${targets[@]}"; do
    cat "$logdir/$t.summary"
    c=$(sed -n 's/.*crashes \([0-9]*\).*/\1/p' "$logdir/$t.summary")
    total=$((total + ${c:-1}))
done
if [ "$total" -gt 0 ]; then
    echo "FAILED: $total crash(es); reproducers in fuzz/artifacts/<target>/" >&2
    exit 1
fi
echo "no crashes"
