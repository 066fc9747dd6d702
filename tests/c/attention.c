/*
 * Attention through the C ABI on a fixed scenario, printed bit-exactly so that tests/c_abi.rs can
 * replay the same scenario through the Rust API and compare (see `attention_matches_rust` there;
 * keep the two in step). Each output line is `<key> <hex bits of f32 / decimal size_t> ...`.
 */
#include "common.h"

enum { LAYERS = 2, QH = 4, KVH = 2, D = 32, ROWQ = QH * D, ROWKV = KVH * D };

static void print_floats(const char *key, const float *v, size_t n) {
    printf("%s", key);
    for (size_t i = 0; i < n; i++) printf(" %08" PRIx32, kvt_bits(v[i]));
    printf("\n");
}

static void append(kvtier_cache *cache, kvt_rng *rng, uint64_t seq, size_t layer, size_t n) {
    float *k = kvt_vec(rng, n * ROWKV, 1.0f);
    float *v = kvt_vec(rng, n * ROWKV, 1.0f);
    EXPECT_OK(kvtier_cache_append(cache, seq, layer, k, n * ROWKV, v, n * ROWKV));
    free(k), free(v);
}

int main(void) {
    kvtier_config *cfg = NULL;
    EXPECT_OK(kvtier_config_new(LAYERS, QH, KVH, D, &cfg));
    EXPECT_OK(kvtier_config_set_page_size(cfg, 16));
    EXPECT_OK(kvtier_config_set_hot_window(cfg, 16));
    EXPECT_OK(kvtier_config_set_sink_tokens(cfg, 0));
    EXPECT_OK(kvtier_config_set_bits(cfg, 4, 2));
    kvtier_cache *cache = NULL;
    EXPECT_OK(kvtier_cache_new(cfg, &cache));
    kvtier_config_free(cfg);

    uint64_t a, b, c, d;
    EXPECT_OK(kvtier_cache_sequence_add(cache, &a));
    EXPECT_OK(kvtier_cache_sequence_add(cache, &b));
    EXPECT_OK(kvtier_cache_sequence_add(cache, &c));
    EXPECT_OK(kvtier_cache_sequence_add(cache, &d)); /* stays empty */

    kvt_rng rng = {2024};
    /* a: prefill 40 tokens in each layer. */
    for (size_t layer = 0; layer < LAYERS; layer++) {
        const size_t n = 40;
        float *q = kvt_vec(&rng, n * ROWQ, 1.0f);
        float *k = kvt_vec(&rng, n * ROWKV, 1.0f);
        float *v = kvt_vec(&rng, n * ROWKV, 1.0f);
        float *out = (float *)malloc(n * ROWQ * sizeof *out);
        EXPECT_OK(kvtier_cache_prefill(cache, a, layer, q, n * ROWQ, k, n * ROWKV, v, n * ROWKV,
                                       out, n * ROWQ));
        print_floats(layer == 0 ? "prefill0" : "prefill1", out, n * ROWQ);
        free(q), free(k), free(v), free(out);
    }
    /* b: 70 tokens in layer 1, in 10 appends of 7; c: 3 tokens. */
    for (int i = 0; i < 10; i++) append(cache, &rng, b, 1, 7);
    append(cache, &rng, c, 1, 3);

    /* 5 decode steps over the batch {c, a, d, b}. */
    const uint64_t batch[4] = {c, a, d, b};
    for (int step = 0; step < 5; step++) {
        append(cache, &rng, a, 1, 1);
        append(cache, &rng, b, 1, 1);
        append(cache, &rng, c, 1, 1);
        float *q = kvt_vec(&rng, 4 * ROWQ, 2.0f);
        float out[4 * ROWQ];
        kvtier_head_stats heads[4 * QH];
        float masses[32];
        size_t offsets[5];
        kvtier_attention_stats stats = {heads, 4 * QH, masses, 32, offsets, 5};
        EXPECT_OK(kvtier_cache_attend(cache, 1, batch, 4, q, 4 * ROWQ, out, 4 * ROWQ, &stats));
        printf("step %d\n", step);
        print_floats("output", out, 4 * ROWQ);
        printf("heads");
        for (size_t h = 0; h < 4 * QH; h++)
            printf(" %08" PRIx32 " %08" PRIx32 " %08" PRIx32 " %08" PRIx32, kvt_bits(heads[h].entropy),
                   kvt_bits(heads[h].varentropy), kvt_bits(heads[h].max_score),
                   kvt_bits(heads[h].log_z));
        printf("\n");
        printf("offsets");
        for (size_t i = 0; i < 5; i++) printf(" %zu", offsets[i]);
        printf("\n");
        print_floats("mass", masses, offsets[4]);
        free(q);
    }
    kvtier_memory_report r;
    EXPECT_OK(kvtier_cache_memory_report(cache, &r));
    printf("report %zu %zu %zu %zu %zu\n", r.tokens, r.hot_pages, r.warm_pages, r.hot_bytes,
           r.warm_bytes);
    kvtier_cache_free(cache);
    return 0;
}
