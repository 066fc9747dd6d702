#!/usr/bin/env bash
# The quantisation-quality table of docs/results.md (issue 13): k4v4, k4v2, k3v3 and k2v2, each
# plain, with the Hadamard rotation of keys and values (-rkv), with 4 key outlier channels per page
# (-o4) and with both, plus keys-only rotation, int4 edge layers and a smaller hot window, on
# SmolLM2-135M-Instruct over State of the Union text: PPL ratio at 4K (exact prefill of 3072 tokens,
# 1024 decoded and scored, two speeches), passkey at 1K, device bytes per token.
#
#   scripts/quant-table.sh [OUT_DIR]       (default target/quant-table); JOBS, PART, EVAL, ASSETS,
#                                          PK1K_TRIALS, QUICK as for scripts/policy-table.sh, whose
#                                          pipeline this runs (4K passkey is off: PK4K_TRIALS=0)
#   then: python3 scripts/policy_table.py OUT_DIR --docs docs/results.md --markers quant
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
configs=(fp)
for b in k4v4 k4v2 k3v3 k2v2; do
    configs+=("$b" "$b-rkv" "$b-o4" "$b-rkv-o4")
done
configs+=(k4v2-rk k2v2-rk k2v2-rkv-e1 k4v2-rkv-w64 k3v2-rkv)
export CONFIGS="${configs[*]}"
export PK4K_TRIALS="${PK4K_TRIALS:-0}"
exec scripts/policy-table.sh "${1:-target/quant-table}"
