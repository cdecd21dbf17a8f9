#!/usr/bin/env bash
# Sum the "... ErrMaybe" lines that `stress.sh --keep ErrMaybe` kept (OUTDIR/kept.txt):
# per test, runs, failed runs, runs with an ErrMaybe, ErrMaybe in all, those the test's next
# Get found had taken effect, Puts in all, and the rsm's give-ups on logged ops (term change,
# timeout, lost index). See docs/errmaybe.md.
set -uo pipefail
[[ $# -eq 1 ]] || { echo "usage: scripts/maybe-tally.sh OUTDIR|KEPT_FILE" >&2; exit 2; }
f=$1
[[ -d $f ]] && f=$f/kept.txt
[[ -r $f ]] || { echo "maybe-tally.sh: cannot read $f" >&2; exit 2; }
# Line: "<test> run<N> <exit>:   ... ErrMaybe M of P Puts[; rsm gave up on logged ops:
#        A on a term change, B timed out, C lost their index (...)]"
awk '
/ ErrMaybe [0-9]+ of [0-9]+ Puts/ {
    t = $1; rc = $3; sub(/:$/, "", rc)
    for (i = 1; i <= NF; i++) {
        if ($i == "ErrMaybe") { m = $(i + 1); p = $(i + 3) }
        if ($i == "taken" && $(i + 1) == "effect,") took = $(i - 2)
        if ($i == "term" && $(i + 1) == "change,") tc = $(i - 2)
        if ($i == "timed") to = $(i - 1)
        if ($i == "lost" && $(i + 1) == "their") li = $(i - 1)
    }
    if (!(t in runs)) order[++n] = t
    runs[t]++; if (rc != 0) fails[t]++
    if (m > 0) mruns[t]++
    maybes[t] += m; puts[t] += p; term[t] += tc; tmo[t] += to; lost[t] += li; tk[t] += took
    tc = 0; to = 0; li = 0; took = 0
}
END {
    printf "%-20s %5s %5s %7s %8s %8s %9s %8s %8s %5s\n", "test", "runs", "fails", "EM runs", "ErrMaybe", "took eff", "Puts", "term chg", "timeout", "lost"
    for (k = 1; k <= n; k++) {
        t = order[k]
        printf "%-20s %5d %5d %7d %8d %8d %9d %8d %8d %5d\n", t, runs[t], fails[t], mruns[t], maybes[t], tk[t], puts[t], term[t], tmo[t], lost[t]
    }
}' "$f"
