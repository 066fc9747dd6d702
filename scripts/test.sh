#!/usr/bin/env bash
# The project's test command (the README names it): unit, property and integration tests, plus
# the examples and benches compiled and run once in test mode. The example engine (`model`, which
# brings `candle`) and the mistral.rs adapter (`mistralrs`) are features: the core is also built on
# its own, as a C user's libkvtier is. `redis` adds the remote page store (tests/redis.rs needs a
# `redis-server` binary: it starts its own servers).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --lib
cargo test --all-targets --features model,mistralrs,cli,redis
cargo test --doc --features model,mistralrs,cli,redis
# The default run takes the fastest CPU kernel path this machine has (AVX-512 on CI's); the
# attention suites run again on the other two, which CI's CPUs also have (tests/cpu_paths.rs
# compares all three on the same inputs in the default run). Same features as the run above, so
# the test binaries are reused rather than rebuilt.
for path in avx2 portable; do
    KVTIER_CPU_KERNEL=$path cargo test --features model,mistralrs,cli,redis --test attention --test core_v2 --test certify --test truncate
done
# Backend conformance (tests/conformance.rs: one body per check, run on every compiled backend)
# with the Metal backend through its host emulator: the Metal storage code and the `.metal`
# kernels, compiled as C++, on the CPU (no Apple GPU here).
cargo test --features metal-emu --lib backend::metal
cargo test --features metal-emu --test conformance
