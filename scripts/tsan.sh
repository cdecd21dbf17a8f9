#!/usr/bin/env bash
# Stress-run a test binary built with ThreadSanitizer (nightly, -Zbuild-std).
# Thin wrapper: the build lives in scripts/lib.sh (rk_build_tsan), the runner in
# scripts/stress.sh. See scripts/README.md.
set -uo pipefail

usage() {
    cat <<'USAGE'
usage: scripts/tsan.sh [-n RUNS] [-p PARALLEL] [--time-limit SECS] [-o OUTDIR] TEST_BINARY [FILTER]

Builds tests/<TEST_BINARY>.rs with RUSTFLAGS=-Zsanitizer=thread on nightly with
-Zbuild-std into target/tsan/ (installing nightly + rust-src through rustup
when missing), then runs every test RUNS times (default 20) as separate
processes via scripts/stress.sh. Runs use
  TSAN_OPTIONS="suppressions=scripts/tsan.supp halt_on_error=1 second_deadlock_stack=1 $TSAN_OPTIONS"
so any TSan report fails the run; output containing "WARNING: ThreadSanitizer"
fails it even on exit 0. Failed runs' logs land in stress-out/<binary>-<timestamp>/.

Environment: RK_TSAN_TOOLCHAIN (default nightly), RK_TSAN_PROFILE (release|debug,
default release), RK_TSAN_TARGET_DIR (default target/tsan).
USAGE
}

for a in "$@"; do
    case $a in -h|--help) usage; exit 0 ;; --) break ;; esac
done
# -n 20 first: a user-given -n later on the command line overrides it.
exec "$(dirname "${BASH_SOURCE[0]}")/stress.sh" --tsan -n 20 "$@"
