#!/usr/bin/env bash
# The project's test command (the README names it): unit, property and integration tests, plus
# the examples and benches compiled and run once in test mode. The example engine (`model`, which
# brings `candle`) is a feature: the core is also built on its own, as a C user's libkvtier is.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --lib
cargo test --all-targets --features model
cargo test --doc --features model
