#!/usr/bin/env bash
# The project's test command (the README names it): unit, property and integration tests, plus
# the examples and benches compiled and run once in test mode.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --all-targets
cargo test --doc
