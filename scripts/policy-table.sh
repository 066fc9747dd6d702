#!/usr/bin/env bash
# The retention-policy results table of docs/results.md: every policy at 25% and 12.5% of the f16
# device bytes on SmolLM2-135M-Instruct over State of the Union text, with KIVI-style int4 / int2
# (no eviction) and Quest-style query-aware selection as rows: perplexity at 4K (the docs/results.md
# protocol: exact prefill of 3072 tokens, 1024 tokens decoded and scored one by one, on the two most
# recent speeches long enough), passkey at 1K and 4K context, device and host bytes per token,
# decode tok/s.
#
#   scripts/policy-table.sh [OUT_DIR]      every task, then the table (default OUT_DIR target/policy-table)
#   PART=ppl0|ppl1|pk0|pk1 ...             one part only (PPL on speech 0 / 1, passkey at 1K / 4K)
#   JOBS=16 ...                            tasks in parallel, one thread each (a task is one eval
#                                          process: one speech x a few configs, or one passkey trial
#                                          at one depth x every config)
#   EVAL=path ASSETS=dir ...               a prebuilt kvtier binary and the assets (else built / fetched)
#   PK1K_TRIALS=8 PK4K_TRIALS=4            passkey trials per depth (5 depths: 0, 25, 50, 75, 100 %)
#   QUICK=1 ...                            the same pipeline at toy sizes (a smoke test of the script)
#   CHUNK=2                                configs per PPL task
#   CONFIGS="fp k4v4 ..." TABLE_ARGS=...   another set of eval configs and policy_table.py options
#                                          (scripts/quant-table.sh uses this)
#
# Each task writes one JSON report into OUT_DIR; `python3 scripts/policy_table.py OUT_DIR` merges them
# into the Markdown table (it runs at the end here). Every config of a passkey task sees the same
# trial, so splitting the work over processes changes nothing in what each config sees. A task whose
# report is already in OUT_DIR is kept, so an interrupted run resumes.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
out_dir="${1:-target/policy-table}"
mkdir -p "$out_dir"
jobs="${JOBS:-1}"
part="${PART:-all}"
pk1k="${PK1K_TRIALS:-8}"
pk4k="${PK4K_TRIALS:-4}"
ppl_size=(--lengths 4096 --tail 1024)
contexts=(1024 4096)
depths=(0 0.25 0.5 0.75 1)
if [ "${QUICK:-0}" != 0 ]; then
    ppl_size=(--lengths 1024 --tail 8)
    contexts=(256 512)
    depths=(0.5)
    pk1k=1 pk4k=1
fi

if [ -z "${EVAL:-}" ]; then
    scripts/fetch-assets.sh
    cargo build --release --features cli --bin kvtier
    EVAL=target/release/kvtier
fi
asset_args=()
if [ -n "${ASSETS:-}" ]; then asset_args=(--assets "$ASSETS"); fi

if [ -n "${CONFIGS:-}" ]; then
    read -r -a configs <<<"$CONFIGS"
else
    configs=(fp k4v4 k2v2 k4v4@anchor:25 "k4v4~quest:32" "k4v4~quest:16")
    for pct in 25 12.5; do
        for p in recent streaming_llm h2o tova scissorhands snapkv pyramidkv heavy_hitter hybrid tiered tiered_int2; do
            configs+=("k4v4@$p:$pct")
        done
    done
fi
all_configs=()
for c in "${configs[@]}"; do all_configs+=(--config "$c"); done
common=(--hot-dtype f16 --dense-decode "${asset_args[@]}")

tasks="$(mktemp)"
trap 'rm -f "$tasks"' EXIT
chunk="${CHUNK:-2}"
for s in 0 1; do
    [ "$part" = all ] || [ "$part" = "ppl$s" ] || continue
    for ((i = 0; i < ${#configs[@]}; i += chunk)); do
        args=()
        for c in "${configs[@]:i:chunk}"; do args+=(--config "$c"); done
        echo "ppl-s$s-c$i ${ppl_size[*]} --speeches 1 --speech-offset $s --passkey-trials 0 ${args[*]}"
    done >>"$tasks"
done
# Passkey seeds: 1021 + (depth index x trials + trial) at 1K, 1001 + ... at 4K (at most 20 4K trials
# keep the two sets apart), the same whatever other tasks run.
seed_base=(1021 1001)
# SEED_OFFSET=k: another set of trials (seeds moved by k, reports named -o<k>), to add to a run.
offset="${SEED_OFFSET:-0}"
suffix=""
if [ "$offset" != 0 ]; then suffix="-o$offset"; fi
# The long (4K) trials first, so the short ones fill the slots they leave.
for ci in 1 0; do
    ctx=${contexts[ci]}
    trials=$pk1k
    if [ "$ci" = 1 ]; then trials=$pk4k; fi
    for di in "${!depths[@]}"; do
        depth=${depths[di]}
        for ((t = 0; t < trials; t++)); do
            [ "$part" = all ] || [ "$part" = "pk$ci" ] || continue
            echo "pk$ctx-d$depth-t$t$suffix --lengths 0 --passkey-trials 1 --passkey-depths $depth --passkey-context $ctx --seed $((offset + seed_base[ci] + di * trials + t)) ${all_configs[*]}"
        done
    done >>"$tasks"
done

echo "policy table: $(wc -l <"$tasks") tasks, $jobs at a time, into $out_dir" >&2
export EVAL out_dir
export COMMON="${common[*]}"
threads=1
if [ "$jobs" = 1 ]; then threads="$(nproc)"; fi
export RAYON_NUM_THREADS="$threads"
# Config names hold no spaces or quotes, so xargs' word splitting is safe. A failed task stops xargs.
# shellcheck disable=SC2016
xargs -P "$jobs" -L 1 sh -c '
    name=$0
    if [ -s "$out_dir/$name.json" ]; then echo "kept $name" >&2; exit 0; fi
    "$EVAL" eval $COMMON "$@" --report "$out_dir/$name.json" >"$out_dir/$name.log" 2>&1 \
        && echo "done $name" >&2 || { echo "FAILED $name (see $out_dir/$name.log)" >&2; exit 255; }
' <"$tasks"
# shellcheck disable=SC2086
python3 scripts/policy_table.py "$out_dir" ${TABLE_ARGS:-}
