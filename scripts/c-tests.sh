#!/usr/bin/env bash
# The C ABI checks for CI (call from .ci/run): run from anywhere, exits non-zero on any failure.
#
#  1. Header drift: regenerate include/kvtier.h from src/ffi with cbindgen into a temporary file
#     (build.rs under the `generate-header` feature, told where to write by KVTIER_HEADER_OUT) and
#     diff it against the committed header. Fix a failure with
#         cargo check --features generate-header && git add include/kvtier.h
#  2. The C tests (tests/c_abi.rs): C11 and C++17 builds with -Werror, lifecycle, every error path,
#     attention equal to the Rust API's bit for bit, the C example, AddressSanitizer + UBSan, and
#     valgrind (when installed; KVTIER_C_TESTS_VALGRIND=1 turns that part on).
set -euo pipefail
cd "$(dirname "$0")/.."

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "== C ABI: header drift (include/kvtier.h vs cbindgen over src/ffi)"
KVTIER_HEADER_OUT="$tmp/kvtier.h" cargo check --quiet --features generate-header
if [ ! -f "$tmp/kvtier.h" ]; then
    echo "error: build.rs did not write $tmp/kvtier.h" >&2
    exit 1
fi
if ! diff -u include/kvtier.h "$tmp/kvtier.h"; then
    echo "error: include/kvtier.h is stale: run 'cargo check --features generate-header' and commit it" >&2
    exit 1
fi
echo "header up to date"

echo "== C ABI: C/C++ tests, sanitizers, valgrind"
if ! command -v valgrind >/dev/null; then
    echo "note: valgrind not installed: the valgrind pass will be skipped"
fi
KVTIER_C_TESTS_VALGRIND=1 cargo test --test c_abi -- --nocapture
