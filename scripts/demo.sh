#!/usr/bin/env bash
# The README's main command: fetch the real model and corpus if absent, then generate text with
# SmolLM2-135M-Instruct through protect(model, sensitivity) and a kvtier cache, printing tokens/s
# and bytes per tier. Extra arguments go to the example (e.g. --prompt "...").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-assets.sh
cargo run --release --features model --example protect_smollm2 -- "$@"
