#!/usr/bin/env bash
# Run scripts/stress.sh on one CPU shared with busy loops: a test process then gets about
# 1/FACTOR of a core whenever it wants one, as if the machine were FACTOR times slower,
# while its timers (election timeouts, heartbeats, the rsm's polls) keep real time.
# See scripts/README.md and docs/errmaybe.md.
set -uo pipefail

usage() {
    cat <<'USAGE'
usage: scripts/slowdown.sh [-f FACTOR] [--cpu N] [stress.sh options] TEST_BINARY [FILTER]

  -f FACTOR   slowdown factor, an integer >= 2 (default 5): FACTOR-1 busy loops share CPU N
              with the test runs, at the caller's niceness, so a runnable test thread gets
              about 1/FACTOR of that CPU
  --cpu N     the CPU to pin to (default: the last one this process may use)

Everything else goes to scripts/stress.sh (-n, -p, --time-limit, -o, --keep, --release,
--debug). The binary is built first, unpinned; then the busy loops start, and stress.sh
runs under `taskset -c N` (so its default -p is 1). The busy loops are killed on exit,
Ctrl-C included. Run it under `nice` on a shared machine: the loops then compete with the
test runs, not with other people's work.
USAGE
}

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

factor=5 cpu="" mode=release pass=()
while (($#)); do
    case $1 in
        -f) [[ $# -ge 2 ]] || rk_die "-f needs a value"; factor=$2; shift 2 ;;
        --cpu) [[ $# -ge 2 ]] || rk_die "--cpu needs a value"; cpu=$2; shift 2 ;;
        --tsan) rk_die "--tsan: TSan is its own slowdown (scripts/tsan.sh); not combined here" ;;
        --debug) mode=debug; pass+=("$1"); shift ;;
        --release) mode=release; pass+=("$1"); shift ;;
        -h|--help) usage; exit 0 ;;
        -n|-p|-o|--time-limit|--keep)
            [[ $# -ge 2 ]] || rk_die "$1 needs a value"; pass+=("$1" "$2"); shift 2 ;;
        *) pass+=("$1"); shift ;;
    esac
done
[[ $factor =~ ^[0-9]+$ ]] && ((factor >= 2)) || rk_die "-f must be an integer >= 2"
command -v taskset >/dev/null || rk_die "taskset not found (util-linux)"
if [[ -z $cpu ]]; then
    # The last CPU of our affinity list, e.g. "0-1" or "0,2-3" -> 1 or 3.
    cpu=$(taskset -cp $$ | sed 's/.*: //; s/.*[,-]//')
fi
[[ $cpu =~ ^[0-9]+$ ]] || rk_die "--cpu must be a CPU number"

# The test binary is the last-but-one or last positional argument; stress.sh parses it
# again. Build now, unpinned, so the pinned run only finds it up to date.
bin=""
for a in "${pass[@]}"; do
    case $a in -*) ;; *) [[ -z $bin && $a =~ ^[A-Za-z0-9_-]+$ && -f $RK_REPO_ROOT/tests/$a.rs ]] && bin=$a ;; esac
done
[[ -n $bin ]] || { usage >&2; rk_die "no test binary (tests/<name>.rs) among the arguments"; }
rk_build_normal "$bin" "$mode" >/dev/null || rk_die "build failed"

busy=()
stop_busy() {
    local p
    for p in "${busy[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${busy[@]}"; do wait "$p" 2>/dev/null; done
    busy=()
}
trap stop_busy EXIT
trap 'stop_busy; exit 130' INT TERM
for ((i = 1; i < factor; i++)); do
    taskset -c "$cpu" bash -c 'while :; do :; done' &
    busy+=($!)
done
rk_log "slowdown x$factor: CPU $cpu shared with $((factor - 1)) busy loop(s) (pids ${busy[*]})"
taskset -c "$cpu" "$(dirname "${BASH_SOURCE[0]}")/stress.sh" "${pass[@]}"
rc=$?
stop_busy
exit $rc
