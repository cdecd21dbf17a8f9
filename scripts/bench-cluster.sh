#!/usr/bin/env bash
# Benchmarks the 3-node raftkv cluster side by side with a durable single Redis and a 3-node
# etcd, all on loopback, in one run, and prints one table. See scripts/README.md.
set -uo pipefail

usage() {
    cat <<'USAGE'
usage: scripts/bench-cluster.sh [-n REQUESTS] [-c CLIENTS] [-P PIPELINE] [--only LIST]
                                [--target leader|follower] [--etcd-load s|m|l|xl]
                                [--no-build] [--keep DIR]

  -n REQUESTS     requests per redis-benchmark run (default 200000)
  -c CLIENTS      redis-benchmark connections (default 50)
  -P PIPELINE     the pipelined runs' depth (default 16; 1: no pipelined runs)
  --only LIST     comma-separated subset of raftkv,redis,etcd (default: all three)
  --target T      which raftkv node redis-benchmark talks to: the leader (default) or a
                  follower (every command then forwarded to the leader)
  --etcd-load L   etcdctl check perf's workload (default l: 500 clients, up to 8000 writes/s
                  for 60 s)
  --no-build      use target/release/raftkv as it is
  --bin PATH      benchmark this raftkv binary instead (implies --no-build; for A/B runs)
  --tests LIST    redis-benchmark's -t (default set,get)
  --auth          benchmark raftkv twice: without a password, then with one
                  (--requirepass-file; redis-benchmark -a)
  --keep DIR      copy the servers' logs there before the temp dir is removed

Each system: redis-benchmark -t set -c CLIENTS -n REQUESTS, then -t get, then the same with
-P PIPELINE (raftkv and redis), each with the CPU time (user + system) its server processes
used divided by the requests (raftkv: its three nodes together; unlike ops/s, not changed
by other work on the machine); or etcdctl check perf (etcd, writes only; it reports
throughput, the slowest request and the standard deviation, not percentiles). raftkv: 3
`raftkv serve` processes, data on disk, fsync before acknowledging; redis: one redis-server
with appendonly yes, appendfsync always; etcd: 3 members, default durability. Missing tools
are installed with apt-get (redis-tools, redis-server, etcd-server, etcd-client). Beside each
figure: the 1-minute load average when the run ended (other work on the machine shows there).
First, the disk the data goes to (TMPDIR's): the mean time of one durable 1,200-byte append
(dd oflag=dsync, 1,000 of them), by one writer alone and by three at once, printed above the
table: Redis waits for one of these per turn of its loop, a raftkv or etcd commit for the
second of three at once, so it bounds how close a cluster on one disk can come to Redis.
Redis runs once more (SET -c CLIENTS only) beside two other writers that each make one durable
1,200-byte append after another (dd oflag=dsync): the disk shared as the three raftkv
nodes share it.
Every process started is stopped and the temp dir removed on every exit path.
Run it under `nice -n 19` on a shared machine; children inherit the niceness.
USAGE
}

requests=200000 clients=50 pipeline=16 only="raftkv,redis,etcd" target=leader
etcd_load=l build=1 keep="" bin="" tests=set,get auth=0
while (($#)); do
    case $1 in
    -n) requests=${2:?}; shift 2 ;;
    -c) clients=${2:?}; shift 2 ;;
    -P) pipeline=${2:?}; shift 2 ;;
    --only) only=${2:?}; shift 2 ;;
    --target) target=${2:?}; shift 2 ;;
    --etcd-load) etcd_load=${2:?}; shift 2 ;;
    --no-build) build=0; shift ;;
    --bin) bin=${2:?}; build=0; shift 2 ;;
    --tests) tests=${2:?}; shift 2 ;;
    --auth) auth=1; shift ;;
    --keep) keep=${2:?}; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) printf 'bench-cluster.sh: unknown argument %s\n\n' "$1" >&2; usage >&2; exit 2 ;;
    esac
done
[[ $target == leader || $target == follower ]] || { echo "bench-cluster.sh: --target leader|follower" >&2; exit 2; }
for n in "$requests" "$clients" "$pipeline"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "bench-cluster.sh: '$n' is not a positive number" >&2; exit 2; }
done
wants() { [[ ",$only," == *",$1,"* ]]; }

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { printf 'bench-cluster: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---- every exit path stops what was started and removes the temp dir ----
tmp=$(mktemp -d "${TMPDIR:-/tmp}/bench-cluster.XXXXXX") || die "cannot make a temp dir"
pids=()
cleanup() {
    local pid i
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for i in $(seq 50); do
        local alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null; done
    pids=()
    if [[ -n $keep ]]; then
        mkdir -p "$keep" && find "$tmp" -name '*.log' -exec cp --parents {} "$keep" \; 2>/dev/null
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

# ---- tools ----
need_pkgs=()
wants raftkv || wants redis && { command -v redis-benchmark >/dev/null || need_pkgs+=(redis-tools); }
wants redis && { command -v redis-server >/dev/null || need_pkgs+=(redis-server); }
wants etcd && { command -v etcd >/dev/null || need_pkgs+=(etcd-server); }
wants etcd && { command -v etcdctl >/dev/null || need_pkgs+=(etcd-client); }
if ((${#need_pkgs[@]})); then
    log "installing ${need_pkgs[*]} with apt-get"
    # Packages start their services on install unless told not to: the benchmark starts its
    # own on loopback ports.
    policy=/usr/sbin/policy-rc.d
    made_policy=0
    if [[ ! -e $policy ]]; then printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1; fi
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}"; } >"$tmp/apt.log" 2>&1
    rc=$?
    ((made_policy)) && rm -f "$policy"
    ((rc == 0)) || { cat "$tmp/apt.log" >&2; die "apt-get install ${need_pkgs[*]} failed"; }
fi

raftkv_bin=${bin:-$repo/target/release/raftkv}
if wants raftkv && ((build)); then
    log "building raftkv (release)"
    (cd "$repo" && CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1} cargo build --release --quiet --bin raftkv) ||
        die "cargo build failed"
fi
if wants raftkv && [[ ! -x $raftkv_bin ]]; then die "no $raftkv_bin (drop --no-build)"; fi

# ---- helpers ----
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
used_ports=" "
# Below Linux's default ephemeral range (32768-60999), where outgoing connections take
# their local ports; still checked for a listener.
free_port() {
    local p
    while :; do
        p=$((20000 + RANDOM % 12000))
        [[ $used_ports == *" $p "* ]] && continue
        port_open "$p" && continue
        used_ports+="$p "
        echo "$p"
        return
    done
}
wait_port() { # PORT WHAT PID LOG
    local i
    for i in $(seq 200); do
        port_open "$1" && return 0
        if ! kill -0 "$3" 2>/dev/null; then
            tail -5 "$4" >&2
            die "$2 exited before listening on $1"
        fi
        sleep 0.05
    done
    tail -5 "$4" >&2
    die "$2 did not listen on $1 within 10 s"
}
load1() { cut -d' ' -f1 /proc/loadavg; }
# CPU time (user + system, in clock ticks) the processes PID... have used so far.
cpu_ticks() {
    local pid total=0 stat rest
    for pid in "$@"; do
        stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
        rest=${stat##*) }     # the fields after "(comm) ", starting at field 3
        read -r -a f <<<"$rest"
        total=$((total + f[11] + f[12]))  # fields 14 and 15: utime, stime
    done
    echo "$total"
}

# Rows of the final table: system|test|ops/s|p50|p99|cpu µs/op|load.
rows=()
# redis-benchmark against PORT, rows labelled SYSTEM, one test at a time so that the CPU time
# the server processes PIDS (a space-separated list) used can be divided by its requests.
run_redis_benchmark() { # SYSTEM PORT PIDS [PASSWORD]
    local system=$1 port=$2 server_pids=$3 password=${4:-} p out line t
    local auth=()
    [[ -n $password ]] && auth=(-a "$password")
    local hz
    hz=$(getconf CLK_TCK)
    for p in $(printf "%s\n" 1 "$pipeline" | uniq); do
        local label="-c $clients" extra=()
        ((p > 1)) && { label+=" -P $p"; extra=(-P "$p"); }
        for t in ${tests//,/ }; do
            log "$system: redis-benchmark -t $t -c $clients -n $requests ${extra[*]}"
            local before after
            # shellcheck disable=SC2086 # a list of pids
            before=$(cpu_ticks $server_pids)
            out=$(redis-benchmark -h 127.0.0.1 -p "$port" "${auth[@]}" -t "$t" -c "$clients" -n "$requests" \
                "${extra[@]}" --csv 2>"$tmp/rb.err") || { cat "$tmp/rb.err" >&2; die "redis-benchmark failed against $system"; }
            # shellcheck disable=SC2086
            after=$(cpu_ticks $server_pids)
            local load cpu
            load=$(load1)
            cpu=$(awk -v d=$((after - before)) -v hz="$hz" -v n="$requests" 'BEGIN { printf "%.1f", d / hz * 1e6 / n }')
            # "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
            while IFS= read -r line; do
                line=${line//\"/}
                IFS=, read -r test rps _avg _min p50 _p95 p99 _max <<<"$line"
                [[ $test == SET || $test == GET ]] || continue
                rows+=("$system|$test $label|${rps%.*}|$p50|$p99|$cpu|$load")
                log "$system: $test $label: ${rps%.*} ops/s, p50 $p50 ms, p99 $p99 ms, $cpu µs of server CPU per op (load $load)"
            done <<<"$out"
        done
    done
}

# ---- raftkv: 3 nodes, data on disk ----
bench_raftkv() { # [PASSWORD]
    local password=${1:-} i peers=() cports=() dir="$tmp/raftkv" pass_flag=() label=""
    rm -rf "$dir"
    if [[ -n $password ]]; then
        (umask 077 && printf '%s\n' "$password" >"$tmp/requirepass")
        pass_flag=(--requirepass-file "$tmp/requirepass")
        label=", auth"
    fi
    for i in 1 2 3; do peers+=("$i=127.0.0.1:$(free_port)"); cports+=("$(free_port)"); done
    local peer_list
    peer_list=$(IFS=,; echo "${peers[*]}")
    mkdir -p "$dir"
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/peer-secret"
    chmod 600 "$dir/peer-secret"
    for i in 1 2 3; do
        mkdir -p "$dir/node-$i"
        "$raftkv_bin" serve --id "$i" --peers "$peer_list" --client "127.0.0.1:${cports[i - 1]}" \
            --data "$dir/node-$i" --peer-secret-file "$dir/peer-secret" --bootstrap bench-cluster \
            "${pass_flag[@]}" </dev/null >"$dir/node-$i.log" 2>&1 &
        pids+=($!)
    done
    for i in 1 2 3; do wait_port "${cports[i - 1]}" "raftkv node $i" "${pids[${#pids[@]} - 4 + i]}" "$dir/node-$i.log"; done
    local leader="" t
    for t in $(seq 200); do
        for i in 1 2 3; do
            grep -q '"leader":true' "$dir/node-$i/status" 2>/dev/null && leader=$i
        done
        [[ -n $leader ]] && break
        sleep 0.05
    done
    [[ -n $leader ]] || die "no raftkv leader within 10 s"
    local node=$leader
    [[ $target == follower ]] && node=$((leader % 3 + 1))
    log "raftkv: leader is node $leader; benchmarking node $node ($target)"
    run_redis_benchmark "raftkv ($target$label)" "${cports[node - 1]}" "${pids[*]: -3}" "$password"
    for i in 1 2 3; do
        [[ -s $dir/node-$i.log ]] && { log "raftkv node $i said:"; tail -5 "$dir/node-$i.log" >&2; }
    done
    stop_all
}

# ---- redis: one server, appendfsync always ----
bench_redis() {
    local port dir="$tmp/redis"
    port=$(free_port)
    mkdir -p "$dir"
    redis-server --bind 127.0.0.1 --port "$port" --dir "$dir" --appendonly yes \
        --appendfsync always --save '' --daemonize no --protected-mode yes \
        --logfile "$dir/redis.log" </dev/null >/dev/null 2>&1 &
    pids+=($!)
    wait_port "$port" redis-server "$!" "$dir/redis.log"
    run_redis_benchmark "redis (appendfsync always)" "$port" "${pids[*]: -1}"
    # Redis with the disk shared as the cluster's three nodes share it: two other writers
    # each waiting for one durable append after another (bounded; stopped after the run).
    local redis_pid=${pids[*]: -1} i
    for i in 1 2; do
        dd if=/dev/zero of="$tmp/share-$i" bs=1200 count=200000 oflag=dsync 2>/dev/null &
        pids+=($!)
    done
    local pipeline=1 tests=set
    run_redis_benchmark "redis, 2 durable writers" "$port" "$redis_pid"
    stop_all
    rm -f "$tmp"/share-*
}

# ---- etcd: 3 members ----
bench_etcd() {
    local i dir="$tmp/etcd" cluster=() cports=() pports=()
    for i in 1 2 3; do
        cports+=("$(free_port)")
        pports+=("$(free_port)")
        cluster+=("e$i=http://127.0.0.1:${pports[i - 1]}")
    done
    local initial
    initial=$(IFS=,; echo "${cluster[*]}")
    mkdir -p "$dir"
    for i in 1 2 3; do
        etcd --name "e$i" --data-dir "$dir/e$i" \
            --listen-client-urls "http://127.0.0.1:${cports[i - 1]}" \
            --advertise-client-urls "http://127.0.0.1:${cports[i - 1]}" \
            --listen-peer-urls "http://127.0.0.1:${pports[i - 1]}" \
            --initial-advertise-peer-urls "http://127.0.0.1:${pports[i - 1]}" \
            --initial-cluster "$initial" --initial-cluster-state new \
            --initial-cluster-token "bench-$$" </dev/null >"$dir/e$i.log" 2>&1 &
        pids+=($!)
    done
    local endpoints
    endpoints=$(printf '127.0.0.1:%s,' "${cports[@]}")
    endpoints=${endpoints%,}
    for i in 1 2 3; do wait_port "${cports[i - 1]}" "etcd member $i" "${pids[${#pids[@]} - 4 + i]}" "$dir/e$i.log"; done
    local t
    for t in $(seq 100); do
        etcdctl --endpoints="$endpoints" endpoint health >/dev/null 2>&1 && break
        sleep 0.1
    done
    log "etcd: etcdctl check perf --load=$etcd_load (60 s)"
    local out load
    out=$(etcdctl --endpoints="$endpoints" check perf --load="$etcd_load" 2>&1 | tr '\r' '\n')
    load=$(load1)
    # PASS/FAIL lines: "PASS: Throughput is 150 writes/s", "FAIL: Throughput too low: 2867
    # writes/s" (below 90% of the load's target), "Slowest request took [too long: ]0.8s".
    grep -E '^(PASS|FAIL)' <<<"$out" >&2
    local tput slowest
    tput=$(sed -n 's/.*Throughput[^0-9]*\([0-9][0-9]*\) writes\/s.*/\1/p' <<<"$out" | head -1)
    slowest=$(sed -n 's/.*Slowest request took[^0-9]*\([0-9.][0-9.]*\)s.*/\1/p' <<<"$out" | head -1)
    if [[ -z $tput ]]; then
        grep -v '^ *[0-9]* / [0-9]*' <<<"$out" | tail -20 >&2
        log "etcd: etcdctl check perf gave no throughput"
        tput=n/a
    fi
    slowest=${slowest:+max $(awk -v s="$slowest" 'BEGIN { printf "%.1f", s * 1000 }')}
    rows+=("etcd (3 members)|PUT check perf --load=$etcd_load|$tput|n/a|${slowest:-n/a}|n/a|$load")
    stop_all
}

stop_all() {
    local pid
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null; done
    pids=()
}

# ---- the disk: how long one durable append takes, alone and with two others at once ----
# Every system here waits for such appends: Redis for one per turn of its loop, a raftkv or
# etcd commit for the second of three (leader and followers share this disk). dd with
# oflag=dsync: each 1,200-byte write returns once durable (about one batch of 25 SETs).
disk_probe() { # WRITERS -> mean µs per durable append, the slowest writer's
    local n=$1 i worst=0 secs us
    for i in $(seq "$n"); do
        dd if=/dev/zero of="$tmp/disk-$i" bs=1200 count=1000 oflag=dsync 2>"$tmp/dd-$i.err" &
    done
    wait
    for i in $(seq "$n"); do
        secs=$(sed -n 's/.* copied, \([0-9.]*\) s.*/\1/p' "$tmp/dd-$i.err")
        [[ -n $secs ]] || { cat "$tmp/dd-$i.err" >&2; die "dd on $tmp failed"; }
        us=$(awk -v s="$secs" 'BEGIN { printf "%d", s * 1e6 / 1000 }')
        ((us > worst)) && worst=$us
        rm -f "$tmp/disk-$i"
    done
    echo "$worst"
}

log "temp dir $tmp; load average at start: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) CPUs"
disk_one=$(disk_probe 1)
disk_three=$(disk_probe 3)
log "disk: a durable 1,200-byte append takes $disk_one µs alone, $disk_three µs with two others at once"
wants raftkv && bench_raftkv
wants raftkv && ((auth)) && bench_raftkv "bench-$RANDOM$RANDOM"
wants redis && bench_redis
wants etcd && bench_etcd

printf '\ndisk (%s under %s): a durable 1,200-byte append, mean: %s µs alone, %s µs each with two others at once\n' \
    "$(df --output=fstype "${TMPDIR:-/tmp}" | tail -1 | tr -d ' ')" "${TMPDIR:-/tmp}" "$disk_one" "$disk_three"
printf '\n%-28s %-22s %10s %9s %9s %9s %6s\n' system test ops/s "p50 ms" "p99 ms" "cpu µs/op" load1
for r in "${rows[@]}"; do
    IFS='|' read -r system test ops p50 p99 cpu load <<<"$r"
    printf '%-28s %-22s %10s %9s %9s %9s %6s\n' "$system" "$test" "$ops" "$p50" "$p99" "$cpu" "$load"
done
