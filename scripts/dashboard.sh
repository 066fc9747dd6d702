#!/usr/bin/env bash
# The example dashboard in docs/dashboard/: every `kvtier` subcommand at small but real sizes, each
# saving its report and plots with --out, then `kvtier dashboard` gathers them into one
# self-contained page (docs/dashboard/dashboard.html), and, where Chromium is installed, a
# screenshot of it (docs/dashboard/dashboard.png).
#
#   scripts/dashboard.sh [OUT_DIR]     (default docs/dashboard; about 10 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:-docs/dashboard}"
scripts/fetch-assets.sh
cargo build --release --features cli --bin kvtier
k=target/release/kvtier
rm -rf "$out"
mkdir -p "$out"
$k doctor --out "$out"
$k bench --tokens 4096,32768 --out "$out"
$k simulate --out "$out"
$k replay --prefill 1024 --decode 128 --out "$out"
$k frontier --lengths 2048 --steps 16 --out "$out"
$k eval --config fp --config k8v8 --config k4v4 --config k4v2-rkv --config k2v2 --config k2v2-rkv \
    --lengths 1024,2048 --tail 128 --speeches 1 --passkey-trials 2 --passkey-depths 0,0.5,1 \
    --passkey-context 512 --hot-dtype f16 --dense-decode --out "$out"
# The README's main command; its console output (answer, healing events, memory) is kept too.
$k protect --document sotu:2002 --question "Summarise this speech in three sentences." \
    --max-tokens 120 --out "$out" 2>&1 | tee "$out/protect.txt"
$k dashboard "$out"
browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
if [ -n "$browser" ]; then
    profile="$(mktemp -d)"
    "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --no-first-run \
        --user-data-dir="$profile" --screenshot="$out/dashboard.png" --window-size=1100,2200 \
        "file://$(realpath "$out/dashboard.html")" 2>/dev/null
    rm -rf "$profile"
fi
echo "dashboard: $out/dashboard.html"
