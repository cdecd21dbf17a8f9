#!/usr/bin/env bash
# Measures, on a 3-node raftkv cluster on loopback, with a given amount of live data: how long
# a follower that was down through all the writes takes to catch up, and how long the whole
# cluster takes to serve again after every node is killed and restarted. Not run in CI.
set -uo pipefail

usage() {
    cat <<'USAGE'
usage: scripts/bench-restart.sh [--mib N]... [--no-build] [--bin PATH] [--keep DIR]

  --mib N      live data in MiB, written as N values of 1 MiB (repeatable; default: 100 1024)
  --no-build   use target/release/raftkv as it is
  --bin PATH   benchmark this raftkv binary instead (implies --no-build)
  --keep DIR   copy the nodes' logs there before the temp dir is removed

For each size: start 3 `raftkv serve` processes, kill -9 a follower, SET N keys of 1 MiB through
the leader, then
  catch-up: start that follower; time until its status shows every key and the leader's applied count;
  restart:  kill -9 every node, start all three; time until a GET of the last key answers,
            and until every node's state machine holds every key.
Prints each node's peak resident memory (VmHWM) and the ratio to the live data. Every process
started is stopped and the temp dir removed on every exit path. Needs redis-cli and python3.
Run it under `nice -n 19` on a shared machine; children inherit the niceness.
USAGE
}

sizes=() build=1 bin="" keep=""
while (($#)); do
    case $1 in
    --mib) sizes+=("${2:?}"); shift 2 ;;
    --no-build) build=0; shift ;;
    --bin) bin=${2:?}; build=0; shift 2 ;;
    --keep) keep=${2:?}; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) printf 'bench-restart.sh: unknown argument %s\n\n' "$1" >&2; usage >&2; exit 2 ;;
    esac
done
((${#sizes[@]})) || sizes=(100 1024)
for n in "${sizes[@]}"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "bench-restart.sh: '$n' is not a positive number" >&2; exit 2; }
done
command -v redis-cli >/dev/null || { echo "bench-restart.sh: redis-cli not found (apt-get install redis-tools)" >&2; exit 2; }
command -v python3 >/dev/null || { echo "bench-restart.sh: python3 not found" >&2; exit 2; }

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z $bin ]]; then
    bin="$root/target/release/raftkv"
    if ((build)); then
        (cd "$root" && cargo build --release --bin raftkv) || exit 1
    fi
fi
[[ -x $bin ]] || { echo "bench-restart.sh: no executable at $bin" >&2; exit 2; }

tmp=$(mktemp -d "${TMPDIR:-/tmp}/raftkv-bench-restart.XXXXXX")
pids=(0 0 0)
cleanup() {
    for p in "${pids[@]}"; do
        ((p > 0)) && kill -9 "$p" 2>/dev/null && wait "$p" 2>/dev/null
    done
    if [[ -n $keep ]]; then
        mkdir -p "$keep" && cp "$tmp"/*.log "$keep"/ 2>/dev/null
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }

ports=() cports=()
for i in 0 1 2; do ports+=("$(free_port)"); cports+=("$(free_port)"); done
peers="1=127.0.0.1:${ports[0]},2=127.0.0.1:${ports[1]},3=127.0.0.1:${ports[2]}"

start() { # start I (0-based)
    local i=$1
    rm -f "$tmp/node-$((i + 1))/status"
    "$bin" serve --id $((i + 1)) --peers "$peers" --client "127.0.0.1:${cports[$i]}" \
        --data "$tmp/node-$((i + 1))" >>"$tmp/node-$((i + 1)).log" 2>&1 </dev/null &
    pids[i]=$!
}
kill9() {
    local i=$1
    ((pids[i] > 0)) || return 0
    kill -9 "${pids[$i]}" 2>/dev/null
    wait "${pids[$i]}" 2>/dev/null
    pids[i]=0
}
field() { # field I NAME: a value from node I's status file (JSON; empty if none)
    local f="$tmp/node-$(($1 + 1))/status" v
    [[ -f $f ]] || return 0
    v=$(grep -o "\"$2\":[^,}]*" "$f" 2>/dev/null) || return 0
    printf '%s' "${v#*:}"
}
leader() { # waits up to 120 s; prints the leader's index
    local deadline=$((SECONDS + 120)) i
    while ((SECONDS < deadline)); do
        for i in 0 1 2; do
            ((pids[i] > 0)) && [[ $(field "$i" leader) == true ]] && { echo "$i"; return 0; }
        done
        sleep 0.05
    done
    return 1
}
peak() { # peak RSS of node I in MiB
    awk '/^VmHWM:/ {printf "%.0f", $2 / 1024}' "/proc/${pids[$1]}/status" 2>/dev/null
}

for mib in "${sizes[@]}"; do
    rm -rf "$tmp"/node-*
    for i in 0 1 2; do start "$i"; done
    l=$(leader) || { echo "no leader" >&2; exit 1; }
    lag=$(((l + 1) % 3))
    kill9 "$lag"
    t=$(now)
    # SET big0..big<N-1>, 1 MiB each, one after another on one connection (a TRYAGAIN is
    # retried; anything else fails the run).
    python3 - "$mib" "${cports[$l]}" <<'PY' || { echo "loading failed" >&2; exit 1; }
import socket, sys, time
n, port = int(sys.argv[1]), int(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port))
f = s.makefile("rb")
for k in range(n):
    key = f"big{k}".encode()
    val = bytes((97 + (i * 7 + k * 3) % 26) for i in range(26)) * ((1 << 20) // 26) + b"x" * ((1 << 20) % 26)
    for attempt in range(100):
        s.sendall(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(key), key, len(val), val))
        reply = f.readline()
        if reply == b"+OK\r\n":
            break
        if not reply.startswith(b"-TRYAGAIN"):
            sys.exit(f"SET {key.decode()}: {reply!r}")
        time.sleep(0.2)
    else:
        sys.exit(f"SET {key.decode()}: no leader")
PY
    load_s=$(since "$t")
    keys_l=$(field "$l" keys)

    # Catch-up of the follower that missed everything.
    start "$lag"
    t=$(now)
    deadline=$((SECONDS + 1800))
    until [[ $(field "$lag" keys) == "$mib" && $(field "$lag" applied) -ge $(field "$l" applied) ]]; do
        ((SECONDS < deadline)) || { echo "node $((lag + 1)) did not catch up" >&2; exit 1; }
        sleep 0.1
    done
    catch_s=$(since "$t")
    peaks_before="$(peak 0)/$(peak 1)/$(peak 2)"

    # Full restart.
    for i in 0 1 2; do kill9 "$i"; done
    t=$(now)
    for i in 0 1 2; do start "$i"; done
    nl=$(leader) || { echo "no leader after the restart" >&2; exit 1; }
    deadline=$((SECONDS + 1800))
    until [[ $(redis-cli -h 127.0.0.1 -p "${cports[$nl]}" GET "big$((mib - 1))" 2>/dev/null | wc -c) -eq 1048577 ]]; do
        ((SECONDS < deadline)) || { echo "the restarted cluster does not serve" >&2; exit 1; }
        sleep 0.1
    done
    serve_s=$(since "$t")
    until [[ $(field 0 keys) == "$mib" && $(field 1 keys) == "$mib" && $(field 2 keys) == "$mib" ]]; do
        ((SECONDS < deadline)) || { echo "a restarted node did not restore every key" >&2; exit 1; }
        sleep 0.1
    done
    all_s=$(since "$t")
    peaks_after="$(peak 0)/$(peak 1)/$(peak 2)"
    for i in 0 1 2; do kill9 "$i"; done

    printf '%5d MiB live (%s keys on the leader): load %ss; follower catch-up %ss; full restart: serving after %ss, every node restored after %ss\n' \
        "$mib" "$keys_l" "$load_s" "$catch_s" "$serve_s" "$all_s"
    printf '          peak RSS MiB (nodes 1/2/3) before the restart %s, after %s; load average %s\n' \
        "$peaks_before" "$peaks_after" "$(cut -d' ' -f1 /proc/loadavg)"
done
