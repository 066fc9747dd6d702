#!/usr/bin/env bash
# Reruns the CPU decode table of docs/cpu.md: benches/decode.rs's `decode` (4K, 32K and 128K
# tokens, both shapes, f16/int8/int4/int2, 1 and 2 threads, every CPU path) and `prefill` groups,
# then prints the markdown tables. About 15 minutes on 2 cores; run it on a quiet machine
# (`uptime`): every decode point is measured beside a read of the same bytes in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf target/criterion/decode target/criterion/prefill
KVTIER_BENCH_FULL=1 cargo bench --bench decode -- '^(decode|prefill)/' "$@"
python3 scripts/cpu_table.py target/criterion
