#!/usr/bin/env bash
# Shows that every rule test catches the broken variant it exists for.
#
#   scripts/rule-variants.sh [-n RUNS] [--skip REGEX] [--apply-only] [FILTER]
#
# For each patch scripts/rule-variants/<binary>--<test>[--<variant>].patch (whose name matches the
# extended regex FILTER, and not --skip's):
# copies the working tree (tracked and untracked files, not target/) to
# target/rule-variants/tree, applies the patch there, builds tests/<binary>.rs (release, in
# its own target dir target/rule-variants/target) and runs that one test RUNS times (default 1).
# The variant is caught if every run FAILS; the first line saying why is printed (each run's
# output is kept in target/rule-variants/logs/<binary>--<test>-run<N>.log). The
# working tree is never touched. Exit status: 0 every variant caught every run, 1 otherwise,
# 2 usage or build error. --apply-only: only checks that every chosen patch applies to the
# current tree (nothing built or run; exit 1 if one does not).
set -euo pipefail

runs=1
filter=""
skip=""
apply_only=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        -n) runs="$2"; shift 2 ;;
        --skip) skip="$2"; shift 2 ;;
        --apply-only) apply_only=1; shift ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        -*) echo "unknown option $1" >&2; exit 2 ;;
        *) filter="$1"; shift ;;
    esac
done

[[ $runs =~ ^[1-9][0-9]*$ ]] || { echo "-n wants a positive number, not '$runs'" >&2; exit 2; }
root=$(git rev-parse --show-toplevel)
cd "$root"
if [[ $apply_only -eq 1 ]]; then
    bad=0
    for patch in scripts/rule-variants/*.patch; do
        name=$(basename "$patch" .patch)
        [[ -n "$filter" && ! "$name" =~ $filter ]] && continue
        [[ -n "$skip" && "$name" =~ $skip ]] && continue
        if git apply --check "$patch" 2>/dev/null || patch -s -p1 --dry-run -f < "$patch" >/dev/null 2>&1; then
            echo "applies: $name"
        else
            echo "DOES NOT APPLY: $name"
            bad=$((bad + 1))
        fi
    done
    [[ $bad -eq 0 ]]
    exit
fi
# shellcheck source=scripts/lib.sh
source "$root/scripts/lib.sh"
base="$root/target/rule-variants"
tree="$base/tree"
# Its own target dir: cargo gives a workspace's own package the same artifact names wherever
# it is built, so a patched build must never share the worktree's target dir. It is seeded
# once from the worktree's release build, so dependencies are not built again.
export CARGO_TARGET_DIR="${RULE_VARIANTS_TARGET_DIR:-$base/target}"
if [[ ! -d "$CARGO_TARGET_DIR/release" && -d "$root/target/release" ]]; then
    mkdir -p "$CARGO_TARGET_DIR"
    cp -a "$root/target/release" "$CARGO_TARGET_DIR/release"
fi
mkdir -p "$base/logs"
# Incremental: each variant changes a few lines, so most of the crate's code is reused.
export CARGO_PROFILE_RELEASE_INCREMENTAL=true

copy_tree() {
    rm -rf "$tree"
    mkdir -p "$tree"
    git ls-files -z --cached --others --exclude-standard \
        | tar --null -T - -cf - 2>/dev/null | tar -xf - -C "$tree" || true
    [[ -f "$tree/Cargo.toml" ]] || { echo "cannot copy the tree to $tree" >&2; exit 2; }
}

caught=0
missed=0
table=()
for patch in scripts/rule-variants/*.patch; do
    name=$(basename "$patch" .patch)
    [[ -n "$filter" && ! "$name" =~ $filter ]] && continue
    [[ -n "$skip" && "$name" =~ $skip ]] && continue
    bin=${name%%--*}
    test=${name#*--}
    test=${test%%--*} # a second variant of one test: <binary>--<test>--<variant>.patch
    what=$(head -1 "$patch")
    echo "== $bin::$test"
    echo "   $what"
    copy_tree
    if ! (cd "$tree" && patch -s -p1 --no-backup-if-mismatch < "$root/$patch"); then
        echo "   cannot apply $patch" >&2
        exit 2
    fi
    json="$base/build.json"
    (cd "$tree" && cargo test --release --test "$bin" --no-run --message-format=json >"$json" 2>/dev/null) || true
    exe=$(rk_exe_from_json "$bin" "$json" || true)
    if [[ -z "$exe" ]]; then
        echo "   build failed with $patch applied" >&2
        (cd "$tree" && cargo test --release --test "$bin" --no-run 2>&1 | tail -20) >&2
        exit 2
    fi
    fails=0
    hung=0
    why=""
    for ((r = 1; r <= runs; r++)); do
        # Beyond the tester's own 120 s limit, so a test that overruns it fails with its own
        # message; a run killed here (exit 124) counts as not caught.
        out=$(cd "$tree" && timeout 180 "$exe" --exact "$test" --test-threads=1 2>&1) && rc=0 || rc=$?
        printf '%s\n\nexit %s\n' "$out" "$rc" > "$base/logs/$name-run$r.log"
        # Caught: the test itself failed (a failed check, or the harness ending the process
        # on one), not a build or usage error.
        [[ $rc -eq 124 ]] && hung=$((hung + 1))
        if [[ $rc -ne 0 ]] && grep -qE "^test $test \.\.\. FAILED|Fatal:" <<<"$out"; then
            fails=$((fails + 1))
            if [[ -z "$why" ]]; then
                why=$(grep -m1 -E 'Fatal:|panicked at' -A1 <<<"$out" | tr '\n' ' ' | cut -c1-400 || true)
            fi
        fi
    done
    if [[ $fails -eq $runs ]]; then
        caught=$((caught + 1))
        echo "   FAILS as it should ($fails/$runs runs): $why"
        table+=("$bin::$test | caught $fails/$runs | $why")
    else
        missed=$((missed + 1))
        echo "   NOT CAUGHT: passed $((runs - fails - hung)), killed after 180 s $hung, of $runs runs"
        table+=("$bin::$test | MISSED: $((runs - fails - hung)) passed, $hung hung, of $runs | $why")
    fi
done
rm -rf "$tree"
echo
printf '%s\n' "${table[@]}"
echo "$caught caught, $missed missed"
[[ $missed -eq 0 ]]
