/*
 * decode_loop.c: an inference engine's decode loop on kvtier's C ABI.
 *
 * Two requests share one cache. Each prompt is prefilled layer by layer (chunked causal attention,
 * then the keys and values are cached), then both requests decode together: per step and layer the
 * engine appends the new token's keys and values and asks for batched attention, getting per-head
 * entropy and varentropy back for free. A stand-in "model" makes the vectors (random, with a few
 * strong directions so that attention is not uniform); a real engine would take them from its QKV
 * projections after RoPE. At the end: what the cache holds, per tier.
 *
 * Build and run (from the repository root, after `cargo build --release`):
 *
 *   cc -std=c11 -O2 -Iinclude examples/c/decode_loop.c -Ltarget/release -lkvtier \
 *      -Wl,-rpath,"$PWD/target/release" -lm -o decode_loop && ./decode_loop
 *
 * or, with the library installed by cargo-c (`cargo cinstall --prefix=/usr/local`):
 *
 *   cc -std=c11 -O2 examples/c/decode_loop.c $(pkg-config --cflags --libs kvtier) -lm
 *
 * tests/c_abi.rs builds and runs it in `cargo test`.
 */
#include "kvtier.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

/* A small Llama-like shape (SmolLM2-135M has 30 layers, 9 query and 3 kv heads of 64). */
enum { LAYERS = 4, Q_HEADS = 9, KV_HEADS = 3, HEAD_DIM = 64, PROMPT = 96, STEPS = 32, BATCH = 2 };

static int check(kvtier_status st, const char *what) {
    if (st == KVTIER_STATUS_OK) return 0;
    char msg[256];
    kvtier_last_error(msg, sizeof msg, NULL);
    fprintf(stderr, "%s failed: %s: %s\n", what, kvtier_status_name(st), msg);
    return 1;
}
#define TRY(call)                                                                                  \
    do {                                                                                           \
        if (check((call), #call)) goto fail;                                                       \
    } while (0)

/* The stand-in model: deterministic pseudo-random rows. A bias >= 0 is added to every 8th channel;
 * a negative one gives about one row in five a bias of 2 there (the "important" keys that the
 * biased queries then attend to), and the others none. */
static uint64_t rng_state = 0x2545F4914F6CDD1Dull;
static float uniform(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (float)(rng_state >> 40) / (float)(1u << 24) * 2.0f - 1.0f;
}
static void fill(float *v, size_t rows, size_t heads, float bias) {
    for (size_t r = 0; r < rows; r++) {
        const float row_bias = bias < 0.0f ? (uniform() > 0.8f ? 2.0f : 0.0f) : bias;
        for (size_t h = 0; h < heads; h++)
            for (size_t c = 0; c < HEAD_DIM; c++)
                v[(r * heads + h) * HEAD_DIM + c] = uniform() + (c % 8 == 0 ? row_bias : 0.0f);
    }
}

int main(void) {
    int rc = 1;
    kvtier_config *cfg = NULL;
    kvtier_cache *cache = NULL;
    const size_t row_q = Q_HEADS * HEAD_DIM, row_kv = KV_HEADS * HEAD_DIM;
    float *q = malloc(PROMPT * row_q * sizeof *q), *out = malloc(PROMPT * row_q * sizeof *out);
    float *k = malloc(PROMPT * row_kv * sizeof *k), *v = malloc(PROMPT * row_kv * sizeof *v);
    if (!q || !out || !k || !v) goto fail;

    if (kvtier_abi_version() != KVTIER_ABI_VERSION) {
        fprintf(stderr, "kvtier.h is for ABI %#x, the library is %#x\n", KVTIER_ABI_VERSION,
                kvtier_abi_version());
        goto fail;
    }
    printf("kvtier %s\n", kvtier_version());

    /* The balanced preset (int4 K and V), with a shorter hot window so that this short demo
     * reaches the warm tier. */
    TRY(kvtier_config_new_preset(KVTIER_PRESET_BALANCED, LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM, &cfg));
    TRY(kvtier_config_set_hot_window(cfg, 32));
    TRY(kvtier_cache_new(cfg, &cache));
    kvtier_config_free(cfg);
    cfg = NULL;

    uint64_t seqs[BATCH];
    for (int s = 0; s < BATCH; s++) {
        TRY(kvtier_cache_sequence_add(cache, &seqs[s]));
        const size_t n = PROMPT - 40 * (size_t)s; /* prompts of different lengths */
        for (size_t layer = 0; layer < LAYERS; layer++) {
            fill(q, n, Q_HEADS, 1.0f), fill(k, n, KV_HEADS, -1.0f), fill(v, n, KV_HEADS, 0.0f);
            TRY(kvtier_cache_prefill(cache, seqs[s], layer, q, n * row_q, k, n * row_kv, v,
                                     n * row_kv, out, n * row_q));
        }
    }

    kvtier_head_stats heads[BATCH * Q_HEADS];
    kvtier_attention_stats stats = {heads, BATCH * Q_HEADS, NULL, 0, NULL, 0};
    for (int step = 0; step < STEPS; step++) {
        double entropy = 0.0, varentropy = 0.0;
        for (size_t layer = 0; layer < LAYERS; layer++) {
            for (int s = 0; s < BATCH; s++) {
                fill(k, 1, KV_HEADS, -1.0f), fill(v, 1, KV_HEADS, 0.0f);
                TRY(kvtier_cache_append(cache, seqs[s], layer, k, row_kv, v, row_kv));
            }
            fill(q, BATCH, Q_HEADS, 1.0f);
            TRY(kvtier_cache_attend(cache, layer, seqs, BATCH, q, BATCH * row_q, out,
                                    BATCH * row_q, &stats));
            /* out now holds each head's attention output; the engine would continue the layer. */
            if (layer == LAYERS - 1)
                for (int h = 0; h < BATCH * Q_HEADS; h++)
                    entropy += heads[h].entropy, varentropy += heads[h].varentropy;
        }
        if (step % 8 == 0 || step == STEPS - 1)
            printf("step %2d: last layer mean attention entropy %.3f nats, varentropy %.3f\n", step,
                   entropy / (BATCH * Q_HEADS), varentropy / (BATCH * Q_HEADS));
    }

    kvtier_memory_report r;
    TRY(kvtier_cache_memory_report(cache, &r));
    printf("cache: %zu tokens, %zu hot pages (%zu B), %zu warm pages (%zu B), metadata %zu B: "
           "%zu B vs %zu B as f16 (%.2fx)\n",
           r.tokens, r.hot_pages, r.hot_bytes, r.warm_pages, r.warm_bytes, r.metadata_bytes,
           r.device_bytes, r.f16_equivalent_bytes, r.compression);
    for (int s = 0; s < BATCH; s++) TRY(kvtier_cache_sequence_remove(cache, seqs[s]));
    printf("done\n");
    rc = 0;
fail:
    kvtier_cache_free(cache);
    kvtier_config_free(cfg);
    free(q), free(out), free(k), free(v);
    return rc;
}
