# shellcheck shell=bash
# Shared helpers for scripts/stress.sh and scripts/tsan.sh. Source it; don't run it.
#
# Build functions print progress/diagnostics on stderr and the path of the
# built integration-test executable on stdout.

# Absolute path of the repository (worktree) root: the parent of scripts/.
RK_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Toolchain used for ThreadSanitizer builds; override to pin a dated nightly.
RK_TSAN_TOOLCHAIN="${RK_TSAN_TOOLCHAIN:-nightly}"
# Separate target dir so the instrumented std/deps never mix with normal builds.
RK_TSAN_TARGET_DIR="${RK_TSAN_TARGET_DIR:-$RK_REPO_ROOT/target/tsan}"

rk_die() {
    printf '%s: error: %s\n' "${0##*/}" "$*" >&2
    exit 2
}

rk_log() {
    printf '%s: %s\n' "${0##*/}" "$*" >&2
}

# rk_exe_from_json NAME JSONFILE: the executable of test target NAME from
# cargo's --message-format=json output (no jq/python: one artifact per line).
rk_exe_from_json() {
    local name=$1 json=$2 line exe=""
    while IFS= read -r line; do
        [[ $line == *'"reason":"compiler-artifact"'* ]] || continue
        [[ $line == *'"kind":["test"]'* ]] || continue
        [[ $line == *"\"name\":\"$name\""* ]] || continue
        [[ $line =~ \"executable\":\"([^\"]+)\" ]] || continue
        exe=${BASH_REMATCH[1]}
    done <"$json"
    [[ -n $exe ]] || return 1
    printf '%s\n' "$exe"
}

# rk_cargo_build_test NAME JSONFILE CARGO_ARGS...: run `cargo ... --no-run
# --test NAME --message-format=json` (stdout to JSONFILE), print the exe path.
# On a compile error cargo is re-run with human-readable output so the
# diagnostics are visible (the JSON stream only holds them escaped).
rk_cargo_build_test() {
    local name=$1 json=$2
    shift 2
    if ! (cd "$RK_REPO_ROOT" && "$@" --no-run --test "$name" --message-format=json >"$json"); then
        rk_log "build failed; re-running cargo for readable diagnostics:"
        (cd "$RK_REPO_ROOT" && "$@" --no-run --test "$name" >&2) || true
        return 1
    fi
    rk_exe_from_json "$name" "$json" || { rk_log "no test executable named '$name' in cargo output"; return 1; }
}

# rk_build_normal NAME PROFILE(release|debug): plain stable build.
rk_build_normal() {
    local name=$1 profile=$2 json args=(cargo test)
    [[ $profile == release ]] && args+=(--release)
    json=$(mktemp) || return 1
    rk_log "building test binary '$name' ($profile)..."
    rk_cargo_build_test "$name" "$json" "${args[@]}"
    local rc=$?
    rm -f "$json"
    return $rc
}

# rk_ensure_tsan_toolchain: nightly + rust-src (needed by -Zbuild-std).
# A fresh machine has only stable, so install them through rustup if missing.
rk_ensure_tsan_toolchain() {
    command -v rustup >/dev/null || rk_die "rustup not found; the TSan build needs a rustup-managed nightly"
    if ! rustup run "$RK_TSAN_TOOLCHAIN" rustc --version >/dev/null 2>&1; then
        rk_log "installing toolchain $RK_TSAN_TOOLCHAIN with rust-src..."
        rustup toolchain install "$RK_TSAN_TOOLCHAIN" --profile minimal --component rust-src >&2 ||
            rk_die "could not install toolchain $RK_TSAN_TOOLCHAIN"
    fi
    if ! rustup component list --toolchain "$RK_TSAN_TOOLCHAIN" --installed 2>/dev/null | grep -q '^rust-src'; then
        rk_log "adding component rust-src to $RK_TSAN_TOOLCHAIN..."
        rustup component add rust-src --toolchain "$RK_TSAN_TOOLCHAIN" >&2 ||
            rk_die "could not add rust-src to $RK_TSAN_TOOLCHAIN"
    fi
}

# rk_build_tsan NAME: build test NAME with ThreadSanitizer. -Zbuild-std rebuilds
# std instrumented too (so std's own synchronisation is visible to TSan and no
# suppressions are needed for it). --release keeps the slowdown bearable for
# timing-sensitive lab tests; the release profile has debug=1, so reports carry
# file:line. Set RK_TSAN_PROFILE=debug for an unoptimised build.
rk_build_tsan() {
    local name=$1 host json profile=${RK_TSAN_PROFILE:-release}
    rk_ensure_tsan_toolchain
    host=$(rustup run "$RK_TSAN_TOOLCHAIN" rustc -vV | sed -n 's/^host: //p')
    [[ -n $host ]] || rk_die "cannot determine host triple"
    local args=(cargo "+$RK_TSAN_TOOLCHAIN" test -Zbuild-std --target "$host" --target-dir "$RK_TSAN_TARGET_DIR")
    [[ $profile == release ]] && args+=(--release)
    json=$(mktemp) || return 1
    rk_log "building test binary '$name' with ThreadSanitizer ($RK_TSAN_TOOLCHAIN, $host, $profile, into ${RK_TSAN_TARGET_DIR#"$RK_REPO_ROOT"/})..."
    RUSTFLAGS="-Zsanitizer=thread ${RK_TSAN_EXTRA_RUSTFLAGS:-}" \
        RUSTDOCFLAGS="-Zsanitizer=thread ${RK_TSAN_EXTRA_RUSTFLAGS:-}" \
        rk_cargo_build_test "$name" "$json" "${args[@]}"
    local rc=$?
    rm -f "$json"
    return $rc
}

# TSAN_OPTIONS for running an instrumented binary: any report aborts the run
# (halt_on_error=1, exit code 66) so it counts as a failure. User-provided
# TSAN_OPTIONS are appended and therefore win.
rk_tsan_options() {
    printf 'suppressions=%s halt_on_error=1 second_deadlock_stack=1 %s' \
        "$RK_REPO_ROOT/scripts/tsan.supp" "${TSAN_OPTIONS:-}"
}
