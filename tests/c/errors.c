/*
 * Every error path of the C ABI that a CPU build can reach: each returns its documented status,
 * leaves outputs and the cache unchanged, and records a last error naming the function. (PANIC and
 * POISONED are covered by Rust unit tests in src/ffi, which can make a call panic on purpose; the
 * device codes need a CUDA build.)
 */
#include "common.h"

#include <math.h>

enum { QH = 4, KVH = 2, D = 32, ROWQ = QH * D, ROWKV = KVH * D };

/* A pointer one byte past `p`: misaligned for every type wider than char (made through an integer,
 * so that forming it is not itself undefined behaviour in C). */
#define MISALIGNED(type, p) ((type)(uintptr_t)((uintptr_t)(p) + 1))

static void config_errors(void) {
    kvtier_config *cfg = NULL;
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_config_new(2, QH, KVH, D, NULL));
    EXPECT(kvt_last_error_has("kvtier_config_new") && kvt_last_error_has("config_out"));
    EXPECT_STATUS(KVTIER_STATUS_INVALID_CONFIG, kvtier_config_new(2, 9, 2, D, &cfg));
    EXPECT(cfg == NULL && kvt_last_error_has("num_kv_heads"));
    EXPECT_STATUS(KVTIER_STATUS_INVALID_CONFIG, kvtier_config_new(0, QH, KVH, D, &cfg));
    EXPECT(kvt_last_error_has("num_layers"));
    EXPECT_STATUS(KVTIER_STATUS_INVALID_CONFIG, kvtier_config_new(2, QH, KVH, 60, &cfg));
    EXPECT(kvt_last_error_has("head_dim"));
    /* Absurd shapes are refused up front, not allocated. */
    EXPECT_STATUS(KVTIER_STATUS_INVALID_CONFIG, kvtier_config_new(SIZE_MAX / 2, QH, KVH, D, &cfg));
    EXPECT(kvt_last_error_has("num_layers"));
    EXPECT_STATUS(KVTIER_STATUS_INVALID_CONFIG, kvtier_config_new(2, SIZE_MAX / 2, 1, D, &cfg));
    EXPECT(kvt_last_error_has("num_q_heads"));
    EXPECT_STATUS(KVTIER_STATUS_INVALID_ARGUMENT, kvtier_config_new_preset(3, 2, QH, KVH, D, &cfg));
    EXPECT(kvt_last_error_has("preset 3"));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER,
                  kvtier_config_new_preset(KVTIER_PRESET_QUALITY, 2, QH, KVH, D, NULL));
    EXPECT_STATUS(KVTIER_STATUS_INVALID_CONFIG,
                  kvtier_config_new_preset(KVTIER_PRESET_COMPACT, 2, QH, 3, D, &cfg));
    EXPECT(cfg == NULL);

    /* Every setter refuses a NULL config. */
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_config_set_page_size(NULL, 16));
    EXPECT(kvt_last_error_has("kvtier_config_set_page_size") && kvt_last_error_has("config"));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_config_set_hot_dtype(NULL, 0));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_config_set_sink_tokens(NULL, 0));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_config_set_hot_window(NULL, 0));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_config_set_bits(NULL, 4, 4));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_config_set_value_group(NULL, 32));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_config_set_protected_layers(NULL, NULL, 0));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_config_set_warm_enabled(NULL, true));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_config_set_budgets(NULL, 1, 1, 1));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_config_set_max_seq_len(NULL, 8));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_config_set_softmax_scale(NULL, 1.0f));
    kvtier_shape shape;
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_config_shape(NULL, &shape));

    /* Bad values: refused, and the config is left as it was. */
    EXPECT_OK(kvtier_config_new(2, QH, KVH, D, &cfg));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_config_shape(cfg, NULL));
    EXPECT_STATUS(KVTIER_STATUS_INVALID_CONFIG, kvtier_config_set_page_size(cfg, 12));
    EXPECT(kvt_last_error_has("page_size"));
    EXPECT_STATUS(KVTIER_STATUS_INVALID_CONFIG, kvtier_config_set_page_size(cfg, 0));
    EXPECT_STATUS(KVTIER_STATUS_INVALID_CONFIG, kvtier_config_set_page_size(cfg, 512));
    EXPECT_OK(kvtier_config_shape(cfg, &shape));
    EXPECT(shape.page_size == 32);
    EXPECT_STATUS(KVTIER_STATUS_INVALID_ARGUMENT, kvtier_config_set_hot_dtype(cfg, 3));
    EXPECT(kvt_last_error_has("kvtier_hot_dtype"));
    EXPECT_STATUS(KVTIER_STATUS_INVALID_ARGUMENT, kvtier_config_set_hot_dtype(cfg, UINT32_MAX));
    EXPECT_STATUS(KVTIER_STATUS_INVALID_CONFIG, kvtier_config_set_bits(cfg, 5, 4));
    EXPECT(kvt_last_error_has("bits"));
    EXPECT_STATUS(KVTIER_STATUS_INVALID_ARGUMENT, kvtier_config_set_rotation(cfg, 3, 0));
    EXPECT(kvt_last_error_has("kvtier_rotation"));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_config_set_rotation(NULL, 0, 0));
    EXPECT_STATUS(KVTIER_STATUS_INVALID_CONFIG, kvtier_config_set_key_outliers(cfg, D));
    EXPECT(kvt_last_error_has("key_outliers"));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_config_set_key_outliers(NULL, 1));
    EXPECT_STATUS(KVTIER_STATUS_INVALID_CONFIG, kvtier_config_set_layer_bits(cfg, 2, 4, 4));
    EXPECT(kvt_last_error_has("layer_bits"));
    EXPECT_STATUS(KVTIER_STATUS_INVALID_CONFIG, kvtier_config_set_layer_bits(cfg, 0, 4, 1));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_config_set_layer_bits(NULL, 0, 4, 4));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_config_clear_layer_bits(NULL));
    EXPECT_STATUS(KVTIER_STATUS_INVALID_CONFIG, kvtier_config_set_bits(cfg, 4, 16));
    EXPECT_STATUS(KVTIER_STATUS_INVALID_CONFIG, kvtier_config_set_value_group(cfg, 48));
    EXPECT(kvt_last_error_has("value_group"));
    EXPECT_STATUS(KVTIER_STATUS_INVALID_CONFIG, kvtier_config_set_value_group(cfg, 0));
    const size_t layers[] = {0, 2};
    EXPECT_STATUS(KVTIER_STATUS_INVALID_CONFIG, kvtier_config_set_protected_layers(cfg, layers, 2));
    EXPECT(kvt_last_error_has("protected_layers"));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_config_set_protected_layers(cfg, NULL, 1));
    EXPECT(kvt_last_error_has("layers"));
    EXPECT_STATUS(KVTIER_STATUS_INVALID_ARGUMENT,
                  kvtier_config_set_protected_layers(cfg, MISALIGNED(const size_t *, layers), 1));
    EXPECT(kvt_last_error_has("aligned"));
    EXPECT_STATUS(KVTIER_STATUS_INVALID_CONFIG, kvtier_config_set_max_seq_len(cfg, 0));
    EXPECT(kvt_last_error_has("max_seq_len"));
    EXPECT_STATUS(KVTIER_STATUS_INVALID_CONFIG,
                  kvtier_config_set_max_seq_len(cfg, (size_t)UINT32_MAX + 1));
    EXPECT_STATUS(KVTIER_STATUS_INVALID_CONFIG, kvtier_config_set_softmax_scale(cfg, -1.0f));
    EXPECT(kvt_last_error_has("softmax_scale"));
    EXPECT_STATUS(KVTIER_STATUS_INVALID_CONFIG, kvtier_config_set_softmax_scale(cfg, NAN));
    EXPECT_STATUS(KVTIER_STATUS_INVALID_CONFIG, kvtier_config_set_softmax_scale(cfg, INFINITY));
    EXPECT_OK(kvtier_config_shape(cfg, &shape));
    EXPECT(shape.page_size == 32 && shape.max_seq_len == (size_t)1 << 20);

    /* Caches. */
    kvtier_cache *cache = NULL;
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_cache_new(NULL, &cache));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_cache_new(cfg, NULL));
    EXPECT_STATUS(KVTIER_STATUS_BACKEND_NOT_COMPILED, kvtier_cache_new_cuda(cfg, 0, &cache));
    EXPECT(cache == NULL && kvt_last_error_has("cuda"));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_cache_new_cuda(NULL, 0, &cache));
    EXPECT_STATUS(KVTIER_STATUS_BACKEND_NOT_COMPILED, kvtier_cache_new_metal(cfg, &cache));
    EXPECT(cache == NULL && kvt_last_error_has("metal"));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_cache_new_metal(NULL, &cache));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_cache_new_metal(cfg, NULL));
    kvtier_config_free(cfg);
}

/* A cache of 2 layers with 16-token pages, max_seq_len 64 and a small hot budget. */
static kvtier_cache *small_cache(size_t hot_budget) {
    kvtier_config *cfg = NULL;
    EXPECT_OK(kvtier_config_new(2, QH, KVH, D, &cfg));
    EXPECT_OK(kvtier_config_set_page_size(cfg, 16));
    EXPECT_OK(kvtier_config_set_max_seq_len(cfg, 64));
    EXPECT_OK(kvtier_config_set_budgets(cfg, hot_budget, KVTIER_UNLIMITED, KVTIER_UNLIMITED));
    kvtier_cache *cache = NULL;
    EXPECT_OK(kvtier_cache_new(cfg, &cache));
    kvtier_config_free(cfg);
    return cache;
}

static size_t seq_len(kvtier_cache *cache, uint64_t seq, size_t layer) {
    size_t len = 0;
    EXPECT_OK(kvtier_cache_sequence_len(cache, seq, layer, &len));
    return len;
}

static void sequence_and_append_errors(void) {
    kvtier_cache *cache = small_cache(KVTIER_UNLIMITED);
    uint64_t s = 0;
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_cache_sequence_add(NULL, &s));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_cache_sequence_add(cache, NULL));
    EXPECT(kvt_last_error_has("seq_out"));
    EXPECT_OK(kvtier_cache_sequence_add(cache, &s));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_cache_sequence_remove(NULL, s));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_cache_sequence_reset(NULL, s));
    EXPECT_STATUS(KVTIER_STATUS_UNKNOWN_SEQUENCE, kvtier_cache_sequence_remove(cache, s + 1));
    EXPECT(kvt_last_error_has("kvtier_cache_sequence_remove") && kvt_last_error_has("unknown"));
    EXPECT_STATUS(KVTIER_STATUS_UNKNOWN_SEQUENCE, kvtier_cache_sequence_reset(cache, UINT64_MAX));
    size_t len = 0;
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_cache_sequence_len(NULL, s, 0, &len));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_cache_sequence_len(cache, s, 0, NULL));
    EXPECT_STATUS(KVTIER_STATUS_LAYER_OUT_OF_RANGE, kvtier_cache_sequence_len(cache, s, 2, &len));
    EXPECT(kvt_last_error_has("layer 2"));
    EXPECT_STATUS(KVTIER_STATUS_UNKNOWN_SEQUENCE, kvtier_cache_sequence_len(cache, 77, 0, &len));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_cache_sequence_pages(cache, s, 0, NULL));
    EXPECT_STATUS(KVTIER_STATUS_LAYER_OUT_OF_RANGE,
                  kvtier_cache_sequence_pages(cache, s, SIZE_MAX, &len));
    kvtier_shape shape;
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_cache_shape(NULL, &shape));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_cache_shape(cache, NULL));

    kvt_rng rng = {7};
    float *k = kvt_vec(&rng, 65 * ROWKV, 1.0f);
    float *v = kvt_vec(&rng, 65 * ROWKV, 1.0f);
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER,
                  kvtier_cache_append(NULL, s, 0, k, ROWKV, v, ROWKV));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER,
                  kvtier_cache_append(cache, s, 0, NULL, ROWKV, v, ROWKV));
    EXPECT(kvt_last_error_has("keys"));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER,
                  kvtier_cache_append(cache, s, 0, k, ROWKV, NULL, ROWKV));
    EXPECT(kvt_last_error_has("values"));
    EXPECT_STATUS(KVTIER_STATUS_INVALID_ARGUMENT,
                  kvtier_cache_append(cache, s, 0, MISALIGNED(const float *, k), ROWKV, v, ROWKV));
    EXPECT_STATUS(KVTIER_STATUS_SHAPE, kvtier_cache_append(cache, s, 0, k, ROWKV - 1, v, ROWKV - 1));
    EXPECT(kvt_last_error_has("keys"));
    EXPECT_STATUS(KVTIER_STATUS_SHAPE, kvtier_cache_append(cache, s, 0, k, ROWKV, v, 2 * ROWKV));
    EXPECT_STATUS(KVTIER_STATUS_SHAPE, kvtier_cache_append(cache, s, 0, k, ROWKV, NULL, 0));
    EXPECT_STATUS(KVTIER_STATUS_UNKNOWN_SEQUENCE,
                  kvtier_cache_append(cache, s + 5, 0, k, ROWKV, v, ROWKV));
    EXPECT_STATUS(KVTIER_STATUS_LAYER_OUT_OF_RANGE,
                  kvtier_cache_append(cache, s, 2, k, ROWKV, v, ROWKV));
    EXPECT_STATUS(KVTIER_STATUS_SEQUENCE_TOO_LONG,
                  kvtier_cache_append(cache, s, 0, k, 65 * ROWKV, v, 65 * ROWKV));
    EXPECT(kvt_last_error_has("max_seq_len is 64"));
    float saved = k[3];
    k[3] = NAN;
    EXPECT_STATUS(KVTIER_STATUS_NON_FINITE, kvtier_cache_append(cache, s, 0, k, ROWKV, v, ROWKV));
    EXPECT(kvt_last_error_has("index 3"));
    k[3] = saved;
    v[ROWKV - 1] = -INFINITY;
    EXPECT_STATUS(KVTIER_STATUS_NON_FINITE, kvtier_cache_append(cache, s, 0, k, ROWKV, v, ROWKV));
    v[ROWKV - 1] = 0.5f;
    /* Nothing above changed the sequence. */
    EXPECT(seq_len(cache, s, 0) == 0);
    EXPECT_OK(kvtier_cache_append(cache, s, 0, k, 64 * ROWKV, v, 64 * ROWKV));
    EXPECT_STATUS(KVTIER_STATUS_SEQUENCE_TOO_LONG,
                  kvtier_cache_append(cache, s, 0, k, ROWKV, v, ROWKV));
    EXPECT(seq_len(cache, s, 0) == 64);
    kvtier_cache_free(cache);

    /* A hot budget of one page (2 * KVH * 16 * D * 2 bytes): the second page is refused. */
    cache = small_cache(2 * KVH * 16 * D * 2);
    EXPECT_OK(kvtier_cache_sequence_add(cache, &s));
    EXPECT_OK(kvtier_cache_append(cache, s, 0, k, 16 * ROWKV, v, 16 * ROWKV));
    EXPECT_STATUS(KVTIER_STATUS_BUDGET_EXCEEDED,
                  kvtier_cache_append(cache, s, 0, k, ROWKV, v, ROWKV));
    EXPECT(kvt_last_error_has("budget"));
    EXPECT(seq_len(cache, s, 0) == 16);
    kvtier_cache_free(cache);
    free(k), free(v);
}

static void prefill_errors(void) {
    kvtier_cache *cache = small_cache(KVTIER_UNLIMITED);
    uint64_t s = 0;
    EXPECT_OK(kvtier_cache_sequence_add(cache, &s));
    kvt_rng rng = {11};
    float *q = kvt_vec(&rng, 4 * ROWQ, 1.0f);
    float *k = kvt_vec(&rng, 4 * ROWKV, 1.0f);
    float *v = kvt_vec(&rng, 4 * ROWKV, 1.0f);
    float *out = (float *)malloc(4 * ROWQ * sizeof *out);
    for (size_t i = 0; i < 4 * ROWQ; i++) out[i] = 12345.0f;
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_cache_prefill(NULL, s, 0, q, 4 * ROWQ, k,
                                                                     4 * ROWKV, v, 4 * ROWKV, out,
                                                                     4 * ROWQ));
    EXPECT_STATUS(KVTIER_STATUS_BUFFER_TOO_SMALL,
                  kvtier_cache_prefill(cache, s, 0, q, 4 * ROWQ, k, 4 * ROWKV, v, 4 * ROWKV, out,
                                       4 * ROWQ - 1));
    EXPECT(kvt_last_error_has("output"));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER,
                  kvtier_cache_prefill(cache, s, 0, q, 4 * ROWQ, k, 4 * ROWKV, v, 4 * ROWKV, NULL,
                                       4 * ROWQ));
    EXPECT_STATUS(KVTIER_STATUS_SHAPE,
                  kvtier_cache_prefill(cache, s, 0, q, 3 * ROWQ, k, 4 * ROWKV, v, 4 * ROWKV, out,
                                       4 * ROWQ));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER,
                  kvtier_cache_prefill(cache, s, 0, NULL, 4 * ROWQ, k, 4 * ROWKV, v, 4 * ROWKV,
                                       out, 4 * ROWQ));
    EXPECT_STATUS(KVTIER_STATUS_UNKNOWN_SEQUENCE,
                  kvtier_cache_prefill(cache, s + 1, 0, q, 4 * ROWQ, k, 4 * ROWKV, v, 4 * ROWKV,
                                       out, 4 * ROWQ));
    EXPECT_STATUS(KVTIER_STATUS_LAYER_OUT_OF_RANGE,
                  kvtier_cache_prefill(cache, s, 9, q, 4 * ROWQ, k, 4 * ROWKV, v, 4 * ROWKV, out,
                                       4 * ROWQ));
    q[0] = NAN;
    EXPECT_STATUS(KVTIER_STATUS_NON_FINITE,
                  kvtier_cache_prefill(cache, s, 0, q, 4 * ROWQ, k, 4 * ROWKV, v, 4 * ROWKV, out,
                                       4 * ROWQ));
    q[0] = 0.25f;
    /* Nothing was appended, nothing was written. */
    EXPECT(seq_len(cache, s, 0) == 0);
    for (size_t i = 0; i < 4 * ROWQ; i++) EXPECT(out[i] == 12345.0f);
    /* An empty prefill is a no-op. */
    EXPECT_OK(kvtier_cache_prefill(cache, s, 0, NULL, 0, NULL, 0, NULL, 0, NULL, 0));
    EXPECT_OK(kvtier_cache_prefill(cache, s, 0, q, 4 * ROWQ, k, 4 * ROWKV, v, 4 * ROWKV, out,
                                   4 * ROWQ));
    EXPECT(seq_len(cache, s, 0) == 4);
    kvtier_cache_free(cache);
    free(q), free(k), free(v), free(out);
}

static void attend_errors(void) {
    kvtier_cache *cache = small_cache(KVTIER_UNLIMITED);
    uint64_t s[2];
    EXPECT_OK(kvtier_cache_sequence_add(cache, &s[0]));
    EXPECT_OK(kvtier_cache_sequence_add(cache, &s[1]));
    kvt_rng rng = {13};
    float *k = kvt_vec(&rng, 20 * ROWKV, 1.0f);
    float *v = kvt_vec(&rng, 20 * ROWKV, 1.0f);
    EXPECT_OK(kvtier_cache_append(cache, s[0], 0, k, 20 * ROWKV, v, 20 * ROWKV)); /* 2 pages */
    EXPECT_OK(kvtier_cache_append(cache, s[1], 0, k, 5 * ROWKV, v, 5 * ROWKV));   /* 1 page */
    float *q = kvt_vec(&rng, 2 * ROWQ, 1.0f);
    float out[2 * ROWQ];
    for (size_t i = 0; i < 2 * ROWQ; i++) out[i] = 12345.0f;
    kvtier_head_stats heads[2 * QH];
    float masses[3];
    size_t offsets[3];
    memset(heads, 0x7f, sizeof heads);

    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER,
                  kvtier_cache_attend(NULL, 0, s, 2, q, 2 * ROWQ, out, 2 * ROWQ, NULL));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER,
                  kvtier_cache_attend(cache, 0, NULL, 2, q, 2 * ROWQ, out, 2 * ROWQ, NULL));
    EXPECT(kvt_last_error_has("seqs"));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER,
                  kvtier_cache_attend(cache, 0, s, 2, NULL, 2 * ROWQ, out, 2 * ROWQ, NULL));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER,
                  kvtier_cache_attend(cache, 0, s, 2, q, 2 * ROWQ, NULL, 2 * ROWQ, NULL));
    EXPECT_STATUS(KVTIER_STATUS_BUFFER_TOO_SMALL,
                  kvtier_cache_attend(cache, 0, s, 2, q, 2 * ROWQ, out, 2 * ROWQ - 1, NULL));
    EXPECT_STATUS(KVTIER_STATUS_BUFFER_TOO_SMALL,
                  kvtier_cache_attend(cache, 0, s, 2, q, 2 * ROWQ, out, 0, NULL));
    EXPECT_STATUS(KVTIER_STATUS_INVALID_ARGUMENT,
                  kvtier_cache_attend(cache, 0, MISALIGNED(const uint64_t *, s), 1, q, ROWQ, out,
                                      ROWQ, NULL));
    EXPECT_STATUS(KVTIER_STATUS_INVALID_ARGUMENT,
                  kvtier_cache_attend(cache, 0, s, 2, q, 2 * ROWQ, MISALIGNED(float *, out),
                                      2 * ROWQ, NULL));
    EXPECT_STATUS(KVTIER_STATUS_SHAPE,
                  kvtier_cache_attend(cache, 0, s, 2, q, ROWQ, out, 2 * ROWQ, NULL));
    EXPECT(kvt_last_error_has("queries"));
    EXPECT_STATUS(KVTIER_STATUS_SHAPE,
                  kvtier_cache_attend(cache, 0, s, 2, q, 2 * ROWQ - 3, out, 2 * ROWQ, NULL));
    uint64_t dup[2] = {s[0], s[0]};
    EXPECT_STATUS(KVTIER_STATUS_DUPLICATE_SEQUENCE,
                  kvtier_cache_attend(cache, 0, dup, 2, q, 2 * ROWQ, out, 2 * ROWQ, NULL));
    EXPECT(kvt_last_error_has("more than once"));
    uint64_t unknown[2] = {s[0], 999};
    EXPECT_STATUS(KVTIER_STATUS_UNKNOWN_SEQUENCE,
                  kvtier_cache_attend(cache, 0, unknown, 2, q, 2 * ROWQ, out, 2 * ROWQ, NULL));
    EXPECT_STATUS(KVTIER_STATUS_LAYER_OUT_OF_RANGE,
                  kvtier_cache_attend(cache, 2, s, 2, q, 2 * ROWQ, out, 2 * ROWQ, NULL));
    q[ROWQ + 1] = INFINITY;
    EXPECT_STATUS(KVTIER_STATUS_NON_FINITE,
                  kvtier_cache_attend(cache, 0, s, 2, q, 2 * ROWQ, out, 2 * ROWQ, NULL));
    q[ROWQ + 1] = 0.5f;

    /* Statistics buffers: each too small, or NULL with a count. */
    kvtier_attention_stats st = {heads, 2 * QH - 1, NULL, 0, NULL, 0};
    EXPECT_STATUS(KVTIER_STATUS_BUFFER_TOO_SMALL,
                  kvtier_cache_attend(cache, 0, s, 2, q, 2 * ROWQ, out, 2 * ROWQ, &st));
    EXPECT(kvt_last_error_has("stats.heads"));
    kvtier_attention_stats st2 = {NULL, 0, masses, 2, NULL, 0};
    EXPECT_STATUS(KVTIER_STATUS_BUFFER_TOO_SMALL,
                  kvtier_cache_attend(cache, 0, s, 2, q, 2 * ROWQ, out, 2 * ROWQ, &st2));
    EXPECT(kvt_last_error_has("stats.page_mass"));
    kvtier_attention_stats st3 = {NULL, 0, NULL, 0, offsets, 2};
    EXPECT_STATUS(KVTIER_STATUS_BUFFER_TOO_SMALL,
                  kvtier_cache_attend(cache, 0, s, 2, q, 2 * ROWQ, out, 2 * ROWQ, &st3));
    kvtier_attention_stats st4 = {NULL, 2 * QH, NULL, 0, NULL, 0};
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER,
                  kvtier_cache_attend(cache, 0, s, 2, q, 2 * ROWQ, out, 2 * ROWQ, &st4));
    EXPECT_STATUS(KVTIER_STATUS_INVALID_ARGUMENT,
                  kvtier_cache_attend(cache, 0, s, 2, q, 2 * ROWQ, out, 2 * ROWQ,
                                      MISALIGNED(const kvtier_attention_stats *, &st)));
    /* None of the failures wrote anything. */
    for (size_t i = 0; i < 2 * ROWQ; i++) EXPECT(out[i] == 12345.0f);
    EXPECT(kvt_bits(heads[0].entropy) == 0x7f7f7f7fu);

    /* Device attention on a CPU cache: a clear UNSUPPORTED (after the usual checks). */
    EXPECT_STATUS(KVTIER_STATUS_UNSUPPORTED,
                  kvtier_cache_attend_device(cache, 0, s, 2, 0x1000, 0x2000, NULL, NULL));
    EXPECT(kvt_last_error_has("accelerator"));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER,
                  kvtier_cache_attend_device(cache, 0, s, 2, 0, 0x2000, NULL, NULL));
    EXPECT(kvt_last_error_has("queries_device"));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER,
                  kvtier_cache_attend_device(cache, 0, s, 2, 0x1000, 0, NULL, NULL));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER,
                  kvtier_cache_attend_device(NULL, 0, s, 2, 0x1000, 0x2000, NULL, NULL));
    EXPECT_STATUS(KVTIER_STATUS_LAYER_OUT_OF_RANGE,
                  kvtier_cache_attend_device(cache, 5, s, 2, 0x1000, 0x2000, NULL, NULL));
    EXPECT_STATUS(KVTIER_STATUS_UNKNOWN_SEQUENCE,
                  kvtier_cache_attend_device(cache, 0, unknown, 2, 0x1000, 0x2000, NULL, NULL));
    EXPECT_STATUS(KVTIER_STATUS_BUFFER_TOO_SMALL,
                  kvtier_cache_attend_device(cache, 0, s, 2, 0x1000, 0x2000, NULL, &st));

    /* Appends from device memory: a CPU cache refuses them after the checks; nothing changes. */
    size_t one[2] = {1, 1}, lens_before = 0, lens_after = 0;
    EXPECT_OK(kvtier_cache_sequence_len(cache, s[0], 0, &lens_before));
    EXPECT_STATUS(KVTIER_STATUS_UNSUPPORTED,
                  kvtier_cache_append_device(cache, 0, s, one, 2, KVTIER_DTYPE_F16, 0x1000,
                                             0x2000, NULL));
    EXPECT(kvt_last_error_has("CUDA"));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER,
                  kvtier_cache_append_device(NULL, 0, s, one, 2, KVTIER_DTYPE_F16, 0x1000, 0x2000,
                                             NULL));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER,
                  kvtier_cache_append_device(cache, 0, NULL, one, 2, KVTIER_DTYPE_F16, 0x1000,
                                             0x2000, NULL));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER,
                  kvtier_cache_append_device(cache, 0, s, NULL, 2, KVTIER_DTYPE_F16, 0x1000,
                                             0x2000, NULL));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER,
                  kvtier_cache_append_device(cache, 0, s, one, 2, KVTIER_DTYPE_F16, 0, 0x2000,
                                             NULL));
    EXPECT(kvt_last_error_has("keys_device"));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER,
                  kvtier_cache_append_device(cache, 0, s, one, 2, KVTIER_DTYPE_F16, 0x1000, 0,
                                             NULL));
    EXPECT_STATUS(KVTIER_STATUS_INVALID_ARGUMENT,
                  kvtier_cache_append_device(cache, 0, s, one, 2, 7, 0x1000, 0x2000, NULL));
    EXPECT_STATUS(KVTIER_STATUS_SHAPE,
                  kvtier_cache_append_device(cache, 0, s, one, (size_t)1 << 40, KVTIER_DTYPE_F16,
                                             0x1000, 0x2000, NULL));
    EXPECT_STATUS(KVTIER_STATUS_LAYER_OUT_OF_RANGE,
                  kvtier_cache_append_device(cache, 5, s, one, 2, KVTIER_DTYPE_F16, 0x1000,
                                             0x2000, NULL));
    EXPECT_OK(kvtier_cache_sequence_len(cache, s[0], 0, &lens_after));
    EXPECT(lens_before == lens_after);

    /* Queued steps: the same checks, and a CPU cache refuses them (nothing queued). */
    kvtier_step *step = NULL;
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_step_new(true, NULL));
    EXPECT_OK(kvtier_step_new(true, &step));
    EXPECT_STATUS(KVTIER_STATUS_UNSUPPORTED,
                  kvtier_cache_attend_device_async(cache, step, 0, s, 2, 0x1000, 0x2000, NULL));
    EXPECT(kvt_last_error_has("accelerator"));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER,
                  kvtier_cache_attend_device_async(cache, NULL, 0, s, 2, 0x1000, 0x2000, NULL));
    EXPECT(kvt_last_error_has("step"));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER,
                  kvtier_cache_attend_device_async(cache, step, 0, s, 2, 0, 0x2000, NULL));
    EXPECT_STATUS(KVTIER_STATUS_LAYER_OUT_OF_RANGE,
                  kvtier_cache_attend_device_async(cache, step, 5, s, 2, 0x1000, 0x2000, NULL));
    EXPECT_STATUS(KVTIER_STATUS_UNKNOWN_SEQUENCE,
                  kvtier_cache_attend_device_async(cache, step, 0, unknown, 2, 0x1000, 0x2000,
                                                   NULL));
    EXPECT_STATUS(KVTIER_STATUS_UNSUPPORTED, kvtier_cache_finish_device(cache, step, 0, NULL));
    EXPECT_STATUS(KVTIER_STATUS_LAYER_OUT_OF_RANGE,
                  kvtier_cache_finish_device(cache, step, 5, NULL));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_cache_finish_device(cache, NULL, 0, NULL));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_cache_finish_device(NULL, step, 0, NULL));
    kvtier_step_free(step);
    kvtier_step_free(NULL);

    /* And the good call still works. */
    kvtier_attention_stats all = {heads, 2 * QH, masses, 3, offsets, 3};
    EXPECT_OK(kvtier_cache_attend(cache, 0, s, 2, q, 2 * ROWQ, out, 2 * ROWQ, &all));
    EXPECT(offsets[0] == 0 && offsets[1] == 2 && offsets[2] == 3);

    kvtier_memory_report report;
    kvtier_counters counters;
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_cache_memory_report(NULL, &report));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_cache_memory_report(cache, NULL));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_cache_counters(NULL, &counters));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_cache_counters(cache, NULL));
    EXPECT_STATUS(KVTIER_STATUS_INVALID_ARGUMENT,
                  kvtier_cache_memory_report(cache, MISALIGNED(kvtier_memory_report *, &report)));
    kvtier_cache_free(cache);
    free(k), free(v), free(q);
}

static void last_error_and_names(void) {
    /* Make a known failure, then read its message in every way the ABI allows. */
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_config_new(1, 1, 1, 32, NULL));
    const char *want = "kvtier_config_new: `config_out` must not be NULL";
    size_t len = 0;
    EXPECT_STATUS(KVTIER_STATUS_BUFFER_TOO_SMALL, kvtier_last_error(NULL, 0, &len));
    EXPECT(len == strlen(want));
    char *buf = (char *)malloc(len + 1);
    EXPECT_OK(kvtier_last_error(buf, len + 1, NULL));
    EXPECT(strcmp(buf, want) == 0);
    char small[8];
    EXPECT_STATUS(KVTIER_STATUS_BUFFER_TOO_SMALL, kvtier_last_error(small, sizeof small, &len));
    EXPECT(strncmp(small, want, 7) == 0 && small[7] == '\0' && len == strlen(want));
    /* A failure of kvtier_last_error itself does not replace the message. */
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_last_error(NULL, 4, &len));
    EXPECT_STATUS(KVTIER_STATUS_INVALID_ARGUMENT,
                  kvtier_last_error(buf, len + 1, MISALIGNED(size_t *, &len)));
    EXPECT_OK(kvtier_last_error(buf, len + 1, NULL));
    EXPECT(strcmp(buf, want) == 0);
    /* A success does not clear it either. */
    kvtier_config *cfg = NULL;
    EXPECT_OK(kvtier_config_new(1, 1, 1, 32, &cfg));
    kvtier_config_free(cfg);
    EXPECT_OK(kvtier_last_error(buf, len + 1, NULL));
    EXPECT(strcmp(buf, want) == 0);
    free(buf);

    /* Every status has its name; unknown numbers get a fixed one. */
    const struct {
        kvtier_status status;
        const char *name;
    } names[] = {
        {KVTIER_STATUS_OK, "KVTIER_STATUS_OK"},
        {KVTIER_STATUS_NULL_PARAMETER, "KVTIER_STATUS_NULL_PARAMETER"},
        {KVTIER_STATUS_PANIC, "KVTIER_STATUS_PANIC"},
        {KVTIER_STATUS_INVALID_ARGUMENT, "KVTIER_STATUS_INVALID_ARGUMENT"},
        {KVTIER_STATUS_BUFFER_TOO_SMALL, "KVTIER_STATUS_BUFFER_TOO_SMALL"},
        {KVTIER_STATUS_POISONED, "KVTIER_STATUS_POISONED"},
        {KVTIER_STATUS_INVALID_CONFIG, "KVTIER_STATUS_INVALID_CONFIG"},
        {KVTIER_STATUS_SHAPE, "KVTIER_STATUS_SHAPE"},
        {KVTIER_STATUS_DTYPE, "KVTIER_STATUS_DTYPE"},
        {KVTIER_STATUS_UNKNOWN_SEQUENCE, "KVTIER_STATUS_UNKNOWN_SEQUENCE"},
        {KVTIER_STATUS_LAYER_OUT_OF_RANGE, "KVTIER_STATUS_LAYER_OUT_OF_RANGE"},
        {KVTIER_STATUS_DUPLICATE_SEQUENCE, "KVTIER_STATUS_DUPLICATE_SEQUENCE"},
        {KVTIER_STATUS_SEQUENCE_TOO_LONG, "KVTIER_STATUS_SEQUENCE_TOO_LONG"},
        {KVTIER_STATUS_BUDGET_EXCEEDED, "KVTIER_STATUS_BUDGET_EXCEEDED"},
        {KVTIER_STATUS_NON_FINITE, "KVTIER_STATUS_NON_FINITE"},
        {KVTIER_STATUS_OUT_OF_MEMORY, "KVTIER_STATUS_OUT_OF_MEMORY"},
        {KVTIER_STATUS_UNSUPPORTED, "KVTIER_STATUS_UNSUPPORTED"},
        {KVTIER_STATUS_CANDLE, "KVTIER_STATUS_CANDLE"},
        {KVTIER_STATUS_MODEL, "KVTIER_STATUS_MODEL"},
        {KVTIER_STATUS_BACKEND_NOT_COMPILED, "KVTIER_STATUS_BACKEND_NOT_COMPILED"},
        {KVTIER_STATUS_NO_DEVICE, "KVTIER_STATUS_NO_DEVICE"},
        {KVTIER_STATUS_DEVICE_ERROR, "KVTIER_STATUS_DEVICE_ERROR"},
        {KVTIER_STATUS_KERNEL_COMPILE, "KVTIER_STATUS_KERNEL_COMPILE"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        EXPECT(strcmp(kvtier_status_name(names[i].status), names[i].name) == 0);
    EXPECT(strcmp(kvtier_status_name(6), "KVTIER_STATUS_UNKNOWN") == 0);
    EXPECT(strcmp(kvtier_status_name(UINT32_MAX), "KVTIER_STATUS_UNKNOWN") == 0);
}

int main(void) {
    config_errors();
    sequence_and_append_errors();
    prefill_errors();
    attend_errors();
    last_error_and_names();
    /* Freeing NULL is a no-op. */
    kvtier_cache_free(NULL);
    kvtier_config_free(NULL);
    printf("errors: ok\n");
    return 0;
}
