#!/usr/bin/env bash
# Real Redis clients against a real raftkv cluster: redis-cli, redis-benchmark, redis-py (the
# latest from PyPI), node-redis and ioredis (the latest from npm). Each runs against a
# cluster without a password and one with (`raftkv local --auth`); a client passes when it
# gets the right answers and prints no warning. See scripts/README.md.
#
# Installs what is missing: redis-tools with apt-get, redis into a venv with pip, redis and
# ioredis into a temp dir with npm. A client is skipped, with the reason printed, only when
# its package cannot be installed. Exit status: 0 when nothing failed, 1 otherwise.
set -uo pipefail

usage() {
    cat <<'USAGE'
usage: scripts/client-matrix.sh [--no-build] [--bin PATH] [--keep DIR]

  --no-build   use target/release/raftkv as it is
  --bin PATH   run this raftkv binary instead (implies --no-build)
  --keep DIR   copy the nodes' logs and each client's output there
USAGE
}

build=1 keep="" bin=""
while (($#)); do
    case $1 in
        --no-build) build=0 ;;
        --bin) bin=${2:?--bin needs a path}; build=0; shift ;;
        --keep) keep=${2:?--keep needs a directory}; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
    shift
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work=$(mktemp -d "${TMPDIR:-/tmp}/raftkv-clients.XXXXXX")
pids=()
failed=0
skipped=0
passed=0

cleanup() {
    local pid
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null
    done
    for pid in "${pids[@]}"; do
        # `local` stops its nodes on SIGTERM within 5 s; then it is killed.
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    if [[ -n $keep ]]; then
        mkdir -p "$keep" && cp -r "$work"/*.log "$keep"/ 2>/dev/null
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say() { printf 'client-matrix: %s\n' "$*"; }
pass() { say "PASS $1"; passed=$((passed + 1)); }
fail() { say "FAIL $1: $2"; failed=$((failed + 1)); }
skip() { say "SKIP $1: $2"; skipped=$((skipped + 1)); }

# ---- the raftkv binary ----
if ((build)); then
    (cd "$repo" && cargo build --release --bin raftkv) >"$work/build.log" 2>&1 ||
        { cat "$work/build.log" >&2; say "cannot build raftkv"; exit 1; }
fi
raftkv=${bin:-$repo/target/release/raftkv}
[[ -x $raftkv ]] || { say "no $raftkv (build it, or drop --no-build)"; exit 1; }

# ---- the clients ----
have_tools=1
if ! command -v redis-cli >/dev/null || ! command -v redis-benchmark >/dev/null; then
    say "installing redis-tools with apt-get"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-tools; } \
        >"$work/apt.log" 2>&1; then
        have_tools=0
        tools_reason="apt-get install redis-tools failed: $(tail -1 "$work/apt.log")"
    fi
fi

have_py=1
say "installing redis (PyPI, latest) into a venv"
if ! { python3 -m venv "$work/venv" && "$work/venv/bin/pip" install -q --upgrade redis; } \
    >"$work/pip.log" 2>&1; then
    have_py=0
    py_reason="pip install redis failed: $(tail -1 "$work/pip.log")"
fi

have_node=1
say "installing redis and ioredis (npm, latest) into a temp dir"
mkdir -p "$work/node"
if ! (cd "$work/node" && npm init -y && npm install --no-audit --no-fund redis ioredis) \
    >"$work/npm.log" 2>&1; then
    have_node=0
    node_reason="npm install redis ioredis failed: $(tail -1 "$work/npm.log")"
fi

# ---- two clusters: without and with a password ----

# resp PORT COMMAND...: one inline command over bash's /dev/tcp, its first reply line.
resp() {
    local port=$1 line
    shift
    exec 3<>"/dev/tcp/127.0.0.1/$port" || return 1
    printf '%s\r\n' "$*" >&3
    IFS= read -r -t 5 line <&3
    exec 3>&-
    printf '%s\n' "${line%$'\r'}"
}

# start_cluster NAME [--auth]: a 3-node `raftkv local` on a free base port; sets port_NAME
# (node 1's client port) and pass_NAME (the password, or empty).
start_cluster() {
    local name=$1 flag=${2:-} base dir attempt ok
    for attempt in 1 2 3 4 5; do
        base=$((20000 + RANDOM % 20000))
        dir="$work/$name-data"
        rm -rf "$dir"
        "$raftkv" local --nodes 3 --port "$base" --dir "$dir" $flag \
            >"$work/$name-local.log" 2>&1 &
        local pid=$!
        local password=""
        ok=0
        for _ in $(seq 150); do
            kill -0 "$pid" 2>/dev/null || break
            if [[ -n $flag && -z $password && -s $dir/requirepass ]]; then
                password=$(<"$dir/requirepass")
            fi
            if [[ -n $flag && -n $password ]]; then
                if [[ $( (exec 3<>"/dev/tcp/127.0.0.1/$base" &&
                    printf 'AUTH %s\r\nSET matrix-ready 1\r\n' "$password" >&3 &&
                    IFS= read -r -t 5 a <&3 && IFS= read -r -t 5 b <&3 && printf '%s' "${b%$'\r'}") 2>/dev/null) == "+OK" ]]; then
                    ok=1
                    break
                fi
            elif [[ -z $flag && $(resp "$base" SET matrix-ready 1 2>/dev/null) == "+OK" ]]; then
                ok=1
                break
            fi
            sleep 0.2
        done
        if ((ok)); then
            pids+=("$pid")
            printf -v "port_$name" '%s' "$base"
            printf -v "pass_$name" '%s' "$password"
            return 0
        fi
        kill -TERM "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    say "cannot start the $name cluster; its log:"
    cat "$work/$name-local.log" >&2
    exit 1
}

start_cluster open
start_cluster auth --auth
say "clusters: without a password on port $port_open, with one on port $port_auth"

# clean NAME FILE: passes when the output has no warning.
clean() {
    if grep -qiE 'warn|deprecat|could not|traceback' "$2"; then
        fail "$1" "printed a warning: $(grep -iE 'warn|deprecat|could not|traceback' "$2" | head -3)"
        return 1
    fi
}

# ---- redis-cli ----
if ((have_tools)); then
    for cluster in open auth; do
        port_var="port_$cluster" pass_var="pass_$cluster"
        out="$work/redis-cli-$cluster.log"
        # The password through the environment: -a would print a warning of its own.
        cli=(env)
        [[ -n ${!pass_var} ]] && cli+=("REDISCLI_AUTH=${!pass_var}")
        cli+=(redis-cli -p "${!port_var}")
        {
            "${cli[@]}" SET cli-key "hello world"
            "${cli[@]}" GET cli-key
            "${cli[@]}" DBSIZE
            "${cli[@]}" INFO raft
        } >"$out" 2>&1
        if [[ $(sed -n 1,2p "$out") == $'OK\nhello world' ]] && grep -q '^role:' "$out"; then
            clean "redis-cli ($cluster)" "$out" && pass "redis-cli ($cluster)"
        else
            fail "redis-cli ($cluster)" "unexpected output: $(head -5 "$out")"
        fi
        if [[ $cluster == auth ]]; then
            answer=$(redis-cli -p "${!port_var}" GET cli-key 2>&1)
            [[ $answer == *NOAUTH* ]] && pass "redis-cli without the password is refused" ||
                fail "redis-cli without the password" "answered: $answer"
        fi
    done
else
    skip redis-cli "$tools_reason"
fi

# ---- redis-benchmark ----
if ((have_tools)); then
    for cluster in open auth; do
        port_var="port_$cluster" pass_var="pass_$cluster"
        out="$work/redis-benchmark-$cluster.log"
        auth=()
        [[ -n ${!pass_var} ]] && auth=(-a "${!pass_var}")
        timeout 120 redis-benchmark -p "${!port_var}" "${auth[@]}" -t set,get -n 2000 -c 10 -q \
            >"$out" 2>&1
        if grep -q '^SET: ' <(tr '\r' '\n' <"$out") && grep -q '^GET: ' <(tr '\r' '\n' <"$out"); then
            clean "redis-benchmark ($cluster)" "$out" && pass "redis-benchmark ($cluster)"
        else
            fail "redis-benchmark ($cluster)" "no SET and GET figures: $(tr '\r' '\n' <"$out" | tail -3)"
        fi
    done
else
    skip redis-benchmark "$tools_reason"
fi

# ---- redis-py ----
cat >"$work/client.py" <<'PY'
import logging, sys, warnings
import redis
logging.basicConfig(level=logging.WARNING)   # the library's warnings reach stderr
warnings.simplefilter("error")               # and Python warnings are errors
port, password = int(sys.argv[1]), sys.argv[2] or None
r = redis.Redis(port=port, password=password)
assert r.set("py-key", "1") is True
assert r.get("py-key") == b"1"
assert r.exists("py-key") == 1
p = r.pipeline()                              # MULTI/EXEC
p.set("py-a", "x").get("py-a").delete("py-none")
res = p.execute()
assert res[:2] == [True, b"x"], res
p = r.pipeline(transaction=False)             # plain pipelining
p.set("py-b", "y").get("py-b")
assert p.execute() == [True, b"y"]
assert r.dbsize() >= 4
assert "role" in r.info("raft")
if password:
    try:
        redis.Redis(port=port, password="wrong").ping()
        sys.exit("a wrong password was accepted")
    except redis.AuthenticationError:
        pass
print("redis-py", redis.__version__, "ok")
PY
if ((have_py)); then
    for cluster in open auth; do
        port_var="port_$cluster" pass_var="pass_$cluster"
        out="$work/redis-py-$cluster.log"
        if timeout 60 "$work/venv/bin/python" "$work/client.py" "${!port_var}" "${!pass_var}" >"$out" 2>&1 &&
            grep -q ' ok$' "$out"; then
            clean "redis-py ($cluster)" "$out" && pass "redis-py $(cut -d' ' -f2 "$out") ($cluster)"
        else
            fail "redis-py ($cluster)" "$(tail -3 "$out")"
        fi
    done
else
    skip redis-py "$py_reason"
fi

# ---- node-redis and ioredis ----
cat >"$work/node/node-redis.js" <<'JS'
const { createClient } = require('redis');
const [port, password] = process.argv.slice(2);
(async () => {
  const c = createClient({ socket: { host: '127.0.0.1', port: +port }, password: password || undefined });
  c.on('error', (e) => { console.error('error', e); process.exit(1); });
  await c.connect();
  if (await c.set('node-key', 'v') !== 'OK') throw new Error('SET');
  if (await c.get('node-key') !== 'v') throw new Error('GET');
  const res = await c.multi().set('node-a', '1').get('node-a').exec();
  if (res[1] !== '1') throw new Error('MULTI ' + JSON.stringify(res));
  await c.quit();
  console.log('node-redis', require('redis/package.json').version, 'ok');
})().catch((e) => { console.error(e); process.exit(1); });
JS
cat >"$work/node/ioredis.js" <<'JS'
const Redis = require('ioredis');
const [port, password] = process.argv.slice(2);
(async () => {
  const c = new Redis({ host: '127.0.0.1', port: +port, password: password || undefined, lazyConnect: true });
  c.on('error', (e) => { console.error('error', e); process.exit(1); });
  await c.connect();
  if (await c.set('io-key', 'v') !== 'OK') throw new Error('SET');
  if (await c.get('io-key') !== 'v') throw new Error('GET');
  const res = await c.pipeline().set('io-a', '1').get('io-a').exec();
  if (res[1][1] !== '1') throw new Error('pipeline ' + JSON.stringify(res));
  await c.quit();
  console.log('ioredis', require('ioredis/package.json').version, 'ok');
})().catch((e) => { console.error(e); process.exit(1); });
JS
if ((have_node)); then
    for lib in node-redis ioredis; do
        for cluster in open auth; do
            port_var="port_$cluster" pass_var="pass_$cluster"
            out="$work/$lib-$cluster.log"
            if (cd "$work/node" && timeout 60 node "$lib.js" "${!port_var}" "${!pass_var}") >"$out" 2>&1 &&
                grep -q ' ok$' "$out"; then
                clean "$lib ($cluster)" "$out" && pass "$lib $(cut -d' ' -f2 "$out") ($cluster)"
            else
                fail "$lib ($cluster)" "$(tail -3 "$out")"
            fi
        done
    done
else
    skip node-redis "$node_reason"
    skip ioredis "$node_reason"
fi

say "$passed passed, $failed failed, $skipped skipped (the redis crate runs in cargo test: tests/cluster/client_port.rs)"
((failed == 0))
