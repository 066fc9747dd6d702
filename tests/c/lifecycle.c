/*
 * The whole life of a cache through the C ABI: versions, config presets and setters, a cache,
 * sequences, prefill, append, attention with statistics, reports, reset, remove, free.
 */
#include "common.h"

#include <math.h>

enum { LAYERS = 2, QH = 4, KVH = 2, D = 32 };

int main(void) {
    /* Versions: the header and the library agree. */
    EXPECT(kvtier_abi_version() == KVTIER_ABI_VERSION);
    EXPECT(strcmp(kvtier_version(), KVTIER_VERSION_STRING) == 0);
    char want_version[64];
    snprintf(want_version, sizeof want_version, "%d.%d.%d", KVTIER_VERSION_MAJOR,
             KVTIER_VERSION_MINOR, KVTIER_VERSION_PATCH);
    EXPECT(strncmp(kvtier_version(), want_version, strlen(want_version)) == 0);

    /* No failure yet on this thread: the last error is empty. */
    char msg[64];
    size_t msg_len = 99;
    EXPECT_OK(kvtier_last_error(msg, sizeof msg, &msg_len));
    EXPECT(msg_len == 0 && msg[0] == '\0');

    /* Configs: defaults, every preset, setters. */
    kvtier_config *cfg = NULL;
    EXPECT_OK(kvtier_config_new(LAYERS, QH, KVH, D, &cfg));
    EXPECT(cfg != NULL);
    kvtier_shape shape;
    EXPECT_OK(kvtier_config_shape(cfg, &shape));
    EXPECT(shape.num_layers == LAYERS && shape.num_q_heads == QH && shape.num_kv_heads == KVH);
    EXPECT(shape.head_dim == D && shape.page_size == 32);
    const uint32_t presets[] = {KVTIER_PRESET_BALANCED, KVTIER_PRESET_QUALITY,
                                KVTIER_PRESET_COMPACT};
    for (size_t i = 0; i < sizeof presets / sizeof presets[0]; i++) {
        kvtier_config *p = NULL;
        EXPECT_OK(kvtier_config_new_preset(presets[i], 30, 9, 3, 64, &p));
        kvtier_config_free(p);
    }
    EXPECT_OK(kvtier_config_set_page_size(cfg, 16));
    EXPECT_OK(kvtier_config_set_hot_window(cfg, 16));
    EXPECT_OK(kvtier_config_set_sink_tokens(cfg, 4));
    EXPECT_OK(kvtier_config_set_hot_dtype(cfg, KVTIER_HOT_DTYPE_F32));
    EXPECT_OK(kvtier_config_set_hot_dtype(cfg, KVTIER_HOT_DTYPE_BF16));
    EXPECT_OK(kvtier_config_set_hot_dtype(cfg, KVTIER_HOT_DTYPE_F16));
    EXPECT_OK(kvtier_config_set_bits(cfg, 8, 4));
    EXPECT_OK(kvtier_config_set_bits(cfg, 4, 2));
    EXPECT_OK(kvtier_config_set_value_group(cfg, 32));
    const size_t protected_layers[] = {0};
    EXPECT_OK(kvtier_config_set_protected_layers(cfg, protected_layers, 1));
    EXPECT_OK(kvtier_config_set_protected_layers(cfg, NULL, 0));
    EXPECT_OK(kvtier_config_set_warm_enabled(cfg, false));
    EXPECT_OK(kvtier_config_set_warm_enabled(cfg, true));
    EXPECT_OK(kvtier_config_set_budgets(cfg, KVTIER_UNLIMITED, KVTIER_UNLIMITED, KVTIER_UNLIMITED));
    EXPECT_OK(kvtier_config_set_max_seq_len(cfg, 4096));
    EXPECT_OK(kvtier_config_set_softmax_scale(cfg, 0.125f));
    EXPECT_OK(kvtier_config_set_softmax_scale(cfg, 0.0f));
    EXPECT_OK(kvtier_config_shape(cfg, &shape));
    EXPECT(shape.page_size == 16 && shape.max_seq_len == 4096);

    /* A cache copies the config: freeing the config right away is fine. */
    kvtier_cache *cache = NULL;
    EXPECT_OK(kvtier_cache_new(cfg, &cache));
    kvtier_config_free(cfg);
    EXPECT_OK(kvtier_cache_shape(cache, &shape));
    EXPECT(shape.page_size == 16 && shape.num_q_heads == QH);

    uint64_t a = 0, b = 0;
    EXPECT_OK(kvtier_cache_sequence_add(cache, &a));
    EXPECT_OK(kvtier_cache_sequence_add(cache, &b));
    EXPECT(a != b);

    kvt_rng rng = {42};
    const size_t row_kv = KVH * D, row_q = QH * D;

    /* Prefill 40 tokens of `a` in every layer; the output may alias the queries. */
    const size_t n = 40;
    for (size_t layer = 0; layer < LAYERS; layer++) {
        float *q = kvt_vec(&rng, n * row_q, 1.0f);
        float *k = kvt_vec(&rng, n * row_kv, 1.0f);
        float *v = kvt_vec(&rng, n * row_kv, 1.0f);
        float *out = (float *)malloc(n * row_q * sizeof *out);
        EXPECT_OK(kvtier_cache_prefill(cache, a, layer, q, n * row_q, k, n * row_kv, v,
                                       n * row_kv, out, n * row_q));
        /* The first token attends to itself only: its output is its own value row. */
        for (size_t h = 0; h < QH; h++)
            for (size_t c = 0; c < D; c++)
                EXPECT(fabsf(out[h * D + c] - v[(h / (QH / KVH)) * D + c]) < 1e-6f);
        free(q), free(k), free(v), free(out);
    }
    size_t len = 0, pages = 0;
    EXPECT_OK(kvtier_cache_sequence_len(cache, a, 1, &len));
    EXPECT(len == n);
    EXPECT_OK(kvtier_cache_sequence_pages(cache, a, 1, &pages));
    EXPECT(pages == 3);

    /* Zero-length appends accept NULL and change nothing. */
    EXPECT_OK(kvtier_cache_append(cache, b, 0, NULL, 0, NULL, 0));
    EXPECT_OK(kvtier_cache_sequence_len(cache, b, 0, &len));
    EXPECT(len == 0);

    /* Decode 30 steps for both sequences in layer 1, attending as a batch. */
    uint64_t batch[2] = {b, a};
    float *q = kvt_vec(&rng, 2 * row_q, 1.0f);
    float out[2 * QH * D];
    kvtier_head_stats heads[2 * QH];
    float masses[16];
    size_t offsets[3];
    for (int step = 0; step < 30; step++) {
        for (size_t s = 0; s < 2; s++) {
            float *k = kvt_vec(&rng, row_kv, 1.0f);
            float *v = kvt_vec(&rng, row_kv, 1.0f);
            EXPECT_OK(kvtier_cache_append(cache, batch[s], 1, k, row_kv, v, row_kv));
            free(k), free(v);
        }
        kvtier_attention_stats stats = {heads, 2 * QH, masses, 16, offsets, 3};
        EXPECT_OK(kvtier_cache_attend(cache, 1, batch, 2, q, 2 * row_q, out, 2 * row_q, &stats));
    }
    /* b holds 30 tokens (2 pages of 16), a holds 70 (5 pages). */
    EXPECT(offsets[0] == 0 && offsets[1] == 2 && offsets[2] == 7);
    for (size_t s = 0; s < 2; s++) {
        float sum = 0.0f;
        for (size_t p = offsets[s]; p < offsets[s + 1]; p++) {
            EXPECT(masses[p] >= 0.0f);
            sum += masses[p];
        }
        EXPECT(fabsf(sum - 1.0f) < 1e-4f);
    }
    for (size_t h = 0; h < 2 * QH; h++) {
        EXPECT(heads[h].entropy > 0.0f && heads[h].varentropy >= 0.0f);
        EXPECT(isfinite(heads[h].max_score) && heads[h].log_z >= heads[h].max_score);
    }
    /* Statistics are optional: NULL stats, or a struct asking for heads only. */
    EXPECT_OK(kvtier_cache_attend(cache, 1, batch, 2, q, 2 * row_q, out, 2 * row_q, NULL));
    kvtier_attention_stats heads_only = {heads, 2 * QH, NULL, 0, NULL, 0};
    EXPECT_OK(kvtier_cache_attend(cache, 1, batch, 2, q, 2 * row_q, out, 2 * row_q, &heads_only));
    /* In place: the output overwrites the queries. */
    float inplace[2 * QH * D];
    memcpy(inplace, q, sizeof inplace);
    EXPECT_OK(kvtier_cache_attend(cache, 1, batch, 2, inplace, 2 * row_q, inplace, 2 * row_q,
                                  NULL));
    EXPECT(memcmp(inplace, out, sizeof out) == 0);
    /* An empty batch is a no-op. */
    EXPECT_OK(kvtier_cache_attend(cache, 1, NULL, 0, NULL, 0, NULL, 0, NULL));
    free(q);

    /* Reports: pages were demoted to the warm tier. */
    kvtier_memory_report report;
    EXPECT_OK(kvtier_cache_memory_report(cache, &report));
    EXPECT(report.tokens == 40 + 70 + 30);
    EXPECT(report.warm_pages > 0 && report.hot_pages > 0 && report.warm_bytes > 0);
    EXPECT(report.device_bytes ==
           report.hot_bytes + report.warm_bytes + report.metadata_bytes);
    EXPECT(report.total_bytes == report.device_bytes + report.cold_bytes + report.archive_bytes);
    /* The archive (on by default) keeps an exact copy of every demoted page. */
    EXPECT(report.archived_pages == report.warm_pages && report.archive_bytes > 0);
    EXPECT(report.compression > 0.0);
    kvtier_counters counters;
    EXPECT_OK(kvtier_cache_counters(cache, &counters));
    EXPECT(counters.demotions == report.warm_pages);

    /* Reset keeps the id, remove forgets it. */
    EXPECT_OK(kvtier_cache_sequence_reset(cache, a));
    EXPECT_OK(kvtier_cache_sequence_len(cache, a, 1, &len));
    EXPECT(len == 0);
    EXPECT_OK(kvtier_cache_sequence_remove(cache, a));
    EXPECT_STATUS(KVTIER_STATUS_UNKNOWN_SEQUENCE, kvtier_cache_sequence_len(cache, a, 1, &len));
    EXPECT_OK(kvtier_cache_sequence_remove(cache, b));
    EXPECT_OK(kvtier_cache_memory_report(cache, &report));
    EXPECT(report.tokens == 0 && report.hot_pages == 0 && report.warm_pages == 0);
    uint64_t c = 0;
    EXPECT_OK(kvtier_cache_sequence_add(cache, &c));
    EXPECT(c != a && c != b);

    kvtier_cache_free(cache);

    /* Quantisation options: a rotated cache attends like an unrotated one on exact pages, and a
     * rotated int3 / int2 cache with outlier channels stores, demotes and attends. */
    float rq[QH * D], rout[2][QH * D];
    float *rk = malloc(sizeof(float) * 200 * KVH * D), *rv = malloc(sizeof(float) * 200 * KVH * D);
    EXPECT(rk && rv);
    for (size_t i = 0; i < 200 * KVH * D; i++) {
        rk[i] = sinf(0.37f * (float)i) * ((i % D) == 5 ? 6.0f : 1.0f);
        rv[i] = cosf(0.11f * (float)i);
    }
    for (size_t i = 0; i < QH * D; i++) rq[i] = cosf(0.7f * (float)i);
    for (int r = 0; r < 2; r++) {
        kvtier_config *qc = NULL;
        EXPECT_OK(kvtier_config_new(LAYERS, QH, KVH, D, &qc));
        EXPECT_OK(kvtier_config_set_hot_dtype(qc, KVTIER_HOT_DTYPE_F32));
        EXPECT_OK(kvtier_config_set_warm_enabled(qc, false));
        if (r) EXPECT_OK(kvtier_config_set_rotation(qc, KVTIER_ROTATION_KEYS_VALUES, 42));
        kvtier_cache *qcache = NULL;
        EXPECT_OK(kvtier_cache_new(qc, &qcache));
        uint64_t s;
        EXPECT_OK(kvtier_cache_sequence_add(qcache, &s));
        EXPECT_OK(kvtier_cache_append(qcache, s, 0, rk, 200 * KVH * D, rv, 200 * KVH * D));
        EXPECT_OK(kvtier_cache_attend(qcache, 0, &s, 1, rq, QH * D, rout[r], QH * D, NULL));
        kvtier_cache_free(qcache);
        kvtier_config_free(qc);
    }
    for (size_t i = 0; i < QH * D; i++) EXPECT(fabsf(rout[0][i] - rout[1][i]) < 1e-4f);
    kvtier_config *qc = NULL;
    EXPECT_OK(kvtier_config_new(LAYERS, QH, KVH, D, &qc));
    EXPECT_OK(kvtier_config_set_hot_window(qc, 32));
    EXPECT_OK(kvtier_config_set_bits(qc, 3, 2));
    EXPECT_OK(kvtier_config_set_layer_bits(qc, 1, 4, 3));
    EXPECT_OK(kvtier_config_set_layer_bits(qc, 1, 8, 3));
    EXPECT_OK(kvtier_config_set_key_outliers(qc, 2));
    EXPECT_OK(kvtier_config_set_threads(qc, 2));
    EXPECT_STATUS(KVTIER_STATUS_INVALID_CONFIG, kvtier_config_set_threads(qc, 100000));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_config_set_threads(NULL, 1));
    EXPECT_OK(kvtier_config_set_cpu_kernel(qc, KVTIER_CPU_KERNEL_PORTABLE));
    EXPECT_OK(kvtier_config_set_cpu_kernel(qc, KVTIER_CPU_KERNEL_AUTO));
    EXPECT_STATUS(KVTIER_STATUS_INVALID_ARGUMENT, kvtier_config_set_cpu_kernel(qc, 99));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_config_set_cpu_kernel(NULL, 0));
    EXPECT_OK(kvtier_config_set_rotation(qc, KVTIER_ROTATION_KEYS, 7));
    kvtier_cache *qcache = NULL;
    EXPECT_OK(kvtier_cache_new(qc, &qcache));
    uint64_t s;
    EXPECT_OK(kvtier_cache_sequence_add(qcache, &s));
    for (size_t layer = 0; layer < LAYERS; layer++) {
        EXPECT_OK(kvtier_cache_append(qcache, s, layer, rk, 200 * KVH * D, rv, 200 * KVH * D));
        EXPECT_OK(kvtier_cache_attend(qcache, layer, &s, 1, rq, QH * D, rout[0], QH * D, NULL));
        for (size_t i = 0; i < QH * D; i++) EXPECT(isfinite(rout[0][i]));
    }
    kvtier_memory_report qr;
    EXPECT_OK(kvtier_cache_memory_report(qcache, &qr));
    EXPECT(qr.warm_pages > 0);
    EXPECT_OK(kvtier_config_clear_layer_bits(qc));
    kvtier_cache_free(qcache);
    kvtier_config_free(qc);
    free(rk);
    free(rv);

    kvtier_cache_free(NULL);
    kvtier_config_free(NULL);
    printf("lifecycle: ok\n");
    return 0;
}
