#!/usr/bin/env bash
# Sum the "... ErrMaybe" lines that `stress.sh --keep ErrMaybe` kept (OUTDIR/kept.txt):
# per test, runs, failed runs, runs with ErrMaybe, ErrMaybe and Puts in all, and the rsm's
# give-ups. See docs/errmaybe.md.
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
        if ($i == "term" && $(i + 1) == "change,") tc = $(i - 2)
        if ($i == "timed") to = $(i - 1)
        if ($i == "lost" && $(i + 1) == "their") li = $(i - 1)
    }
    if (!(t in runs)) order[++n] = t
    runs[t]++; if (rc != 0) fails[t]++
    if (m > 0) mruns[t]++
    maybes[t] += m; puts[t] += p; term[t] += tc; tmo[t] += to; lost[t] += li
    tc = 0; to = 0; li = 0
}
END {
    printf "%-28s %6s %6s %11s %8s %9s %8s %8s %6s\n", "test", "runs", "fails", "runs w/ EM", "ErrMaybe", "Puts", "term chg", "timeout", "lost"
    for (k = 1; k <= n; k++) {
        t = order[k]
        printf "%-28s %6d %6d %11d %8d %9d %8d %8d %6d\n", t, runs[t], fails[t], mruns[t], maybes[t], puts[t], term[t], tmo[t], lost[t]
    }
}' "$f"
