#!/usr/bin/env bash
# Stress-run every test of one cargo integration-test binary, each test as its
# own process, many times, in parallel. See scripts/README.md.
set -uo pipefail

usage() {
    cat <<'USAGE'
usage: scripts/stress.sh [-n RUNS] [-p PARALLEL] [--release|--debug|--tsan]
                         [--time-limit SECS] [-o OUTDIR] [--keep REGEX] TEST_BINARY [FILTER]

  TEST_BINARY        integration test name: tests/<TEST_BINARY>.rs (kvsrv, raft, mr, ...)
  FILTER             only tests whose name contains FILTER (substring, like cargo)
  -n RUNS            runs per test (default 10; 20 with --tsan)
  -p PARALLEL        processes at once (default: number of cores)
  --release          build with `cargo test --release` (the default)
  --debug            build without --release
  --tsan             build with ThreadSanitizer (nightly, -Zbuild-std; see tsan.sh);
                     a run printing "WARNING: ThreadSanitizer" fails even if it exits 0
  --time-limit SECS  kill a run after SECS seconds and count it failed (default 300)
  -o OUTDIR          where failed runs' logs go
                     (default stress-out/<binary>-<timestamp>/, one <test>-runN.log per failure)
  --keep REGEX       keep the output lines matching REGEX (grep -E) of every run, passed or
                     failed, in OUTDIR/kept.txt as "<test> run<N> <exit>: <line>"

Each run is `<exe> --exact NAME --test-threads=1 --nocapture`. Ignored tests are skipped.
Exit status: 0 all passed, 1 some run failed, 2 usage/build error, 130 interrupted.
USAGE
}

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

runs="" parallel="" mode=release time_limit=300 outdir="" bin="" filter="" keep=""
positional=()
while (($#)); do
    case $1 in
        -n) [[ $# -ge 2 ]] || rk_die "-n needs a value"; runs=$2; shift 2 ;;
        -p) [[ $# -ge 2 ]] || rk_die "-p needs a value"; parallel=$2; shift 2 ;;
        -o) [[ $# -ge 2 ]] || rk_die "-o needs a value"; outdir=$2; shift 2 ;;
        --keep) [[ $# -ge 2 ]] || rk_die "--keep needs a value"; keep=$2; shift 2 ;;
        --time-limit) [[ $# -ge 2 ]] || rk_die "--time-limit needs a value"; time_limit=$2; shift 2 ;;
        --release) mode=release; shift ;;
        --debug) mode=debug; shift ;;
        --tsan) mode=tsan; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; positional+=("$@"); break ;;
        -*) usage >&2; rk_die "unknown option: $1" ;;
        *) positional+=("$1"); shift ;;
    esac
done
((${#positional[@]} >= 1 && ${#positional[@]} <= 2)) || { usage >&2; exit 2; }
bin=${positional[0]}
filter=${positional[1]:-}
[[ -n $runs ]] || { [[ $mode == tsan ]] && runs=20 || runs=10; }
[[ -n $parallel ]] || parallel=$(nproc 2>/dev/null || echo 2)
[[ $runs =~ ^[1-9][0-9]*$ ]] || rk_die "-n must be a positive integer"
[[ $parallel =~ ^[1-9][0-9]*$ ]] || rk_die "-p must be a positive integer"
[[ $time_limit =~ ^[1-9][0-9]*$ ]] || rk_die "--time-limit must be a positive integer (seconds)"
[[ $bin =~ ^[A-Za-z0-9_-]+$ ]] || rk_die "bad test binary name: $bin"
# -o is relative to the caller's cwd (we cd to the repo root below).
[[ -z $outdir || $outdir == /* ]] || outdir="$PWD/$outdir"

# ---------------------------------------------------------------- build, list
case $mode in
    tsan) exe=$(rk_build_tsan "$bin") || rk_die "build failed" ;;
    *) exe=$(rk_build_normal "$bin" "$mode") || rk_die "build failed" ;;
esac
[[ -x $exe ]] || rk_die "not an executable: $exe"

if [[ $mode == tsan ]]; then
    TSAN_OPTIONS=$(rk_tsan_options)
    export TSAN_OPTIONS
fi
# Tests see the same cwd as under `cargo test`.
cd "$RK_REPO_ROOT" || exit 2

list_tests() { # prints test names, one per line; $1 = extra libtest args
    local line
    # shellcheck disable=SC2086
    "$exe" --list --format terse $1 | while IFS= read -r line; do
        [[ $line == *': test' ]] && printf '%s\n' "${line%: test}"
    done
}
declare -A ignored=()
while IFS= read -r t; do ignored[$t]=1; done < <(list_tests --ignored)
tests=()
nskipped=0
while IFS= read -r t; do
    [[ -z $filter || $t == *"$filter"* ]] || continue
    if [[ -n ${ignored[$t]:-} ]]; then ((nskipped++)); continue; fi
    tests+=("$t")
done < <(list_tests "")
((${#tests[@]})) || rk_die "no tests in \"$bin\"${filter:+ matching \"$filter\"}"

if [[ -z $outdir ]]; then
    mkdir -p stress-out || rk_die "cannot create stress-out/"
    # Two stress runs started in the same second get distinct folders.
    base="stress-out/$bin-$(date +%Y%m%d-%H%M%S)" outdir=$base i=1
    until mkdir "$outdir" 2>/dev/null; do
        ((++i < 100)) || rk_die "cannot create $base"
        outdir="$base-$i"
    done
else
    mkdir -p "$outdir" || rk_die "cannot create $outdir"
fi
outdir=$(cd "$outdir" && pwd)
# Run a private copy, so that rebuilding while the runs go on cannot change what is tested.
cp "$exe" "$outdir/${exe##*/}" || rk_die "cannot copy $exe to $outdir"
exe="$outdir/${exe##*/}"
work=$(mktemp -d) || rk_die "mktemp failed"

ntests=${#tests[@]}
total=$((ntests * runs))
printf 'stress: %s (%s): %d test(s) x %d run(s) = %d runs, %d at once, time limit %ds%s\n' \
    "$bin" "$mode" "$ntests" "$runs" "$total" "$parallel" "$time_limit" \
    "$( ((nskipped)) && printf ', %d ignored test(s) skipped' "$nskipped")"

# ---------------------------------------------------------------- one run
safe_name() { local s=${1//::/__}; printf '%s' "${s//[^A-Za-z0-9_.-]/_}"; }
now_us() { local t=${EPOCHREALTIME//[!0-9]/}; printf '%s' "$((10#$t))"; }

# run_one IDX TEST RUN: runs in a background subshell; writes $work/IDX.res
# ("rc<TAB>microseconds") when done, and keeps the log only on failure.
run_one() {
    local idx=$1 test=$2 run=$3 log="$work/$1.log" start end rc tpid
    start=$(now_us)
    {
        printf '# %s --exact %s --test-threads=1 --nocapture   (run %d, started %s)\n' \
            "$exe" "$test" "$run" "$(date '+%F %T')"
        [[ $mode == tsan ]] && printf '# TSAN_OPTIONS=%s\n' "$TSAN_OPTIONS"
    } >"$log"
    # timeout runs in its own process group and on expiry signals the whole
    # group (test + any children); -k escalates to SIGKILL.
    timeout -k 10 "$time_limit" "$exe" --exact "$test" --test-threads=1 --nocapture >>"$log" 2>&1 &
    tpid=$!
    echo "$tpid" >"$work/$idx.pid"
    wait "$tpid"
    rc=$?
    end=$(now_us)
    if ((rc == 124 || rc == 137)); then
        printf '\n# KILLED: exceeded --time-limit %ss (exit %d)\n' "$time_limit" "$rc" >>"$log"
    elif ((rc != 0)); then
        printf '\n# FAILED: exit status %d\n' "$rc" >>"$log"
    fi
    if [[ $mode == tsan ]] && ((rc == 0)) && grep -q 'WARNING: ThreadSanitizer' "$log"; then
        rc=66
        printf '\n# FAILED: ThreadSanitizer report (exit status was 0)\n' >>"$log"
    fi
    if [[ -n $keep ]]; then
        # One append per run (lines are short), so parallel runs do not interleave mid-line.
        grep -E -- "$keep" "$log" | sed "s|^|$test run$run $rc: |" >>"$outdir/kept.txt"
    fi
    if ((rc == 0)); then
        rm -f "$log"
    else
        mv -f "$log" "$outdir/$(safe_name "$test")-run$run.log"
    fi
    printf '%d\t%d\n' "$rc" "$((end - start))" >"$work/$idx.tmp"
    mv -f "$work/$idx.tmp" "$work/$idx.res"
}

# ---------------------------------------------------------------- pool
declare -A t_runs=() t_fails=() t_sum=() t_max=()
for t in "${tests[@]}"; do t_runs[$t]=0 t_fails[$t]=0 t_sum[$t]=0 t_max[$t]=0; done
declare -A running=() # idx -> 1
next=0 done_n=0 failed=0 passed=0 interrupted=0
t0=$(now_us)
tty=0; [[ -t 1 ]] && tty=1
last_plain=0

fmt_secs() { local us=$1; printf '%d.%02d' "$((us / 1000000))" "$((us % 1000000 / 10000))"; }
fmt_clock() { local s=$1; printf '%d:%02d' "$((s / 60))" "$((s % 60))"; }

progress() { # $1 = force a plain line
    local el=$((($(now_us) - t0) / 1000000)) eta="?"
    ((done_n > 0)) && eta=$(fmt_clock "$((el * (total - done_n) / done_n))")
    local msg
    msg=$(printf '[%d/%d] %d failed, %d running, elapsed %s, ETA %s' \
        "$done_n" "$total" "$failed" "${#running[@]}" "$(fmt_clock "$el")" "$eta")
    if ((tty)); then
        printf '\r\033[K%s' "$msg"
    elif [[ ${1:-} == force ]] || ((el - last_plain >= 10)); then
        last_plain=$el
        printf '%s\n' "$msg"
    fi
}

harvest() {
    local idx rc us t run
    for idx in "${!running[@]}"; do
        [[ -n ${running[$idx]:-} && -f $work/$idx.res ]] || continue
        IFS=$'\t' read -r rc us <"$work/$idx.res"
        unset 'running[$idx]'
        t=${tests[idx % ntests]} run=$((idx / ntests + 1))
        ((done_n++))
        t_runs[$t]=$((t_runs[$t] + 1))
        t_sum[$t]=$((t_sum[$t] + us))
        ((us > t_max[$t])) && t_max[$t]=$us
        if ((rc == 0)); then
            ((passed++))
        else
            ((failed++))
            t_fails[$t]=$((t_fails[$t] + 1))
            ((tty)) && printf '\r\033[K'
            printf 'FAIL %s run %d (exit %d, %ss) -> %s\n' "$t" "$run" "$rc" "$(fmt_secs "$us")" \
                "$outdir/$(safe_name "$t")-run$run.log"
        fi
    done
}

# shellcheck disable=SC2317  # invoked via trap
on_interrupt() {
    trap '' INT TERM
    interrupted=1
    harvest # keep what finished before the signal
    local idx pid
    for idx in "${!running[@]}"; do
        pid=$(cat "$work/$idx.pid" 2>/dev/null) && kill -TERM "$pid" 2>/dev/null
    done
    wait 2>/dev/null
    # Runs killed here are not counted (neither passed nor failed); drop their logs.
    for idx in "${!running[@]}"; do
        t=${tests[idx % ntests]}
        rm -f "$outdir/$(safe_name "$t")-run$((idx / ntests + 1)).log"
    done
    ((tty)) && printf '\r\033[K'
    printf 'interrupted: %d run(s) in flight killed and not counted\n' "${#running[@]}"
    running=()
}
trap on_interrupt INT TERM

# Runs are interleaved (run 1 of every test, then run 2, ...) so every test
# gets coverage early even if the stress run is cut short.
while ((!interrupted)) && ((done_n < total)); do
    while ((!interrupted)) && ((next < total)) && ((${#running[@]} < parallel)); do
        running[$next]=1
        run_one "$next" "${tests[next % ntests]}" "$((next / ntests + 1))" &
        ((next++))
    done
    ((interrupted)) && break
    harvest
    progress
    ((done_n < total)) && sleep 0.1
done
trap - INT TERM
((interrupted)) || { ((tty)) && printf '\r\033[K'; progress force; ((tty)) && echo; }
rm -rf "$work"

# ---------------------------------------------------------------- table
elapsed=$((($(now_us) - t0) / 1000000))
w=4
for t in "${tests[@]}"; do ((${#t} > w)) && w=${#t}; done
{
    printf '\n%-*s  %6s  %6s  %9s  %9s\n' "$w" "test" "runs" "fails" "mean s" "max s"
    for t in "${tests[@]}"; do
        n=${t_runs[$t]} mean=0
        ((n > 0)) && mean=$((t_sum[$t] / n))
        printf '%-*s  %6d  %6d  %9s  %9s%s\n' "$w" "$t" "$n" "${t_fails[$t]}" \
            "$(fmt_secs "$mean")" "$(fmt_secs "${t_max[$t]}")" "$( ((t_fails[$t])) && printf '  FAIL')"
    done
    printf '\n%s%s (%s): %d/%d runs in %s%s\n' "$bin" "${filter:+ [$filter]}" "$mode" \
        "$done_n" "$total" "$(fmt_clock "$elapsed")" "$( ((interrupted)) && printf ', INTERRUPTED')"
} | tee "$outdir/summary.txt"
if ((failed)); then
    printf 'failed runs'"'"' logs: %s\n' "$outdir"
else
    printf 'no failures; summary in %s\n' "$outdir/summary.txt"
    rm -f "$exe"
fi
if [[ -n $keep ]]; then printf 'kept lines: %s\n' "$outdir/kept.txt"; fi
printf '%d passed, %d failed\n' "$passed" "$failed"

((interrupted)) && exit 130
((failed)) && exit 1
exit 0
