#!/usr/bin/env bash
# Interleaved A/B of the CPU decode bench (benches/decode.rs) between a base commit and the work
# tree: builds the base in a git worktree (its own target dir), then runs base and new alternately
# for ROUNDS rounds on the points matching FILTER, then the read-bandwidth benches once, and
# prints the table of scripts/cpu_ab.py (medians over rounds, speedup, GB/s and % of the read of
# the same bytes). Run it on a quiet machine (`uptime`). 128K points need KVTIER_BENCH_FULL=1.
#   usage: scripts/cpu-ab.sh BASE_COMMIT 'FILTER' [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
base="$1"; filter="$2"; rounds="${3:-3}"
wt="${TMPDIR:-/tmp}/kvtier-ab-base"
[ -d "$wt" ] || git worktree add -f "$wt" "$base" >/dev/null
git -C "$wt" checkout -q "$base"
(cd "$wt" && CARGO_TARGET_DIR="$wt-target" cargo bench --bench decode --no-run 2>&1 | tail -1)
cargo bench --bench decode --no-run 2>&1 | tail -1
bin() { ls -t "$1"/release/deps/decode-* | grep -v '\.d$' | head -1; }
BASE=$(bin "$wt-target"); NEW=$(bin target)
out=$(mktemp)
run() {
    "$1" --bench "$filter" --warm-up-time 0.5 --measurement-time 2 2>&1 | python3 -c '
import re, sys
name = None
for line in sys.stdin:
    m = re.match(r"^((decode|prefill)/\S+)\s*$", line.strip())
    if m:
        name = m.group(1)
        continue
    m = re.search(r"time:\s+\[(\S+) (\S+) (\S+) (\S+) (\S+) (\S+)\]", line)
    if m and name:
        v = float(m.group(3)) * {"ns": 1e-6, "µs": 1e-3, "ms": 1.0, "s": 1e3}[m.group(4)]
        print(name, v)
        name = None
' | sed "s/^/$2 /"
}
for _ in $(seq "$rounds"); do run "$BASE" base >> "$out"; run "$NEW" new >> "$out"; done
"$NEW" --bench '^decode/read/' --warm-up-time 0.5 --measurement-time 2 > /dev/null 2>&1
python3 scripts/cpu_ab.py "$out" target/criterion
