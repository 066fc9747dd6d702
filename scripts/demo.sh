#!/usr/bin/env bash
# The README's main command: fetch the real model and corpus if absent, then generate text with
# SmolLM2-135M-Instruct through protect(model, sensitivity) and a kvtier cache, printing tokens/s
# and bytes per tier. Arguments go to `kvtier protect` (default: a whole speech summarised; e.g. --question "...").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-assets.sh
cargo build --release --features cli --bin kvtier
if [ $# -eq 0 ]; then
    # A whole State of the Union speech (4.5K tokens) summarised through the default cache.
    set -- --document sotu:2002 --question "Summarise this speech in three sentences." --max-tokens 120
fi
exec target/release/kvtier protect "$@"
