/*
 * Prefix sharing through the C ABI: a cache publishes a prompt's pages to a store (host memory,
 * then a directory shared by a second store handle, as a second process would), another cache
 * looks them up and imports them, prefills the rest, and attends exactly as the first; bad
 * input (NULL, a bad namespace, a non-empty sequence, unknown ids) is a typed status with the
 * caches unchanged; a Redis store without the `redis` feature is BACKEND_NOT_COMPILED (with it,
 * a closed port is REMOTE).
 */
#define _POSIX_C_SOURCE 200809L
#include "common.h"

#include <unistd.h>

enum { L = 2, QH = 4, KVH = 2, D = 32, N = 200 };

static kvtier_cache *new_cache(void) {
    kvtier_config *cfg = NULL;
    kvtier_cache *c = NULL;
    EXPECT_OK(kvtier_config_new_preset(KVTIER_PRESET_BALANCED, L, QH, KVH, D, &cfg));
    EXPECT_OK(kvtier_config_set_page_size(cfg, 16));
    EXPECT_OK(kvtier_cache_new(cfg, &c));
    kvtier_config_free(cfg);
    return c;
}

/* Keys and values of tokens [from, to) in `layer`: depend on the token's position only. */
static void append_range(kvtier_cache *c, uint64_t seq, size_t layer, size_t from, size_t to) {
    size_t n = to - from, len = n * KVH * D;
    float *k = malloc((len ? len : 1) * sizeof *k), *v = malloc((len ? len : 1) * sizeof *v);
    EXPECT(k && v);
    for (size_t t = 0; t < n; t++)
        for (size_t i = 0; i < KVH * D; i++) {
            float x = (float)((from + t) * 131 + i * 7 + layer * 3 % 1000) / 1000.0f - 0.5f;
            k[t * KVH * D + i] = x;
            v[t * KVH * D + i] = 0.25f - x * 0.5f;
        }
    EXPECT_OK(kvtier_cache_append(c, seq, layer, k, len, v, len));
    free(k);
    free(v);
}

static void attend(const kvtier_cache *c, uint64_t seq, size_t layer, float *out) {
    float q[QH * D];
    for (size_t i = 0; i < QH * D; i++) q[i] = (float)(i % 17) / 17.0f - 0.5f;
    EXPECT_OK(kvtier_cache_attend(c, layer, &seq, 1, q, QH * D, out, QH * D, NULL));
}

/* Imports from `store` into a new cache, appends the rest, compares with `ref`. */
static void import_and_compare(kvtier_prefix_store *store, const kvtier_cache *ref, uint64_t rseq,
                               const uint32_t *tokens, uint64_t want) {
    kvtier_cache *b = new_cache();
    uint64_t s;
    EXPECT_OK(kvtier_cache_sequence_add(b, &s));
    kvtier_prefix_report r;
    EXPECT_OK(kvtier_prefix_lookup(store, b, tokens, N, &r));
    EXPECT(r.tokens == want);
    EXPECT_OK(kvtier_prefix_import(store, b, s, tokens, N, &r));
    EXPECT(r.tokens == want && r.corrupt == 0 && r.pages * 16 == want);
    for (size_t l = 0; l < L; l++) append_range(b, s, l, (size_t)r.tokens, N);
    /* A second import into the now non-empty sequence: SHAPE, nothing changed. */
    EXPECT_STATUS(KVTIER_STATUS_SHAPE, kvtier_prefix_import(store, b, s, tokens, N, &r));
    size_t len = 0;
    EXPECT_OK(kvtier_cache_sequence_len(b, s, 0, &len));
    EXPECT(len == N);
    for (size_t l = 0; l < L; l++) {
        float x[QH * D], y[QH * D];
        attend(ref, rseq, l, x);
        attend(b, s, l, y);
        EXPECT(memcmp(x, y, sizeof x) == 0);
    }
    kvtier_cache_free(b);
}

int main(void) {
    uint8_t fp[32];
    for (int i = 0; i < 32; i++) fp[i] = (uint8_t)(i * 7 + 1);
    uint32_t tokens[N];
    for (int i = 0; i < N; i++) tokens[i] = (uint32_t)((i * 13 + 5) % 700);

    kvtier_cache *a = new_cache();
    uint64_t sa;
    EXPECT_OK(kvtier_cache_sequence_add(a, &sa));
    for (size_t l = 0; l < L; l++) append_range(a, sa, l, 0, N);

    /* Host memory. */
    kvtier_prefix_store *mem = NULL;
    EXPECT_OK(kvtier_prefix_store_new_memory(64u << 20, "c-test", fp, &mem));
    kvtier_prefix_report r;
    EXPECT_OK(kvtier_prefix_publish(mem, a, sa, tokens, N, 0, &r));
    EXPECT(r.written == 12 * L && r.present == 0 && r.not_exact == 0 && r.bytes > 0);
    EXPECT_OK(kvtier_prefix_publish(mem, a, sa, tokens, N, 0, &r));
    EXPECT(r.written == 0 && r.present == 12 * L);
    import_and_compare(mem, a, sa, tokens, 192);

    /* A directory, published in the background, read through a second handle. */
    char dir[] = "/tmp/kvtier-c-prefix-XXXXXX";
    EXPECT(mkdtemp(dir) != NULL);
    kvtier_prefix_store *d1 = NULL, *d2 = NULL;
    EXPECT_OK(kvtier_prefix_store_new_dir(dir, "c-test", fp, &d1));
    EXPECT_OK(kvtier_prefix_publish(d1, a, sa, tokens, N, 1, &r));
    EXPECT(r.queued == 12 * L);
    EXPECT_OK(kvtier_prefix_flush(d1, &r));
    EXPECT(r.written == 12 * L);
    kvtier_prefix_store_free(d1);
    EXPECT_OK(kvtier_prefix_store_new_dir(dir, "c-test", fp, &d2));
    import_and_compare(d2, a, sa, tokens, 192);
    /* Another model's fingerprint sees nothing. */
    uint8_t other[32] = {0};
    kvtier_prefix_store *d3 = NULL;
    EXPECT_OK(kvtier_prefix_store_new_dir(dir, "c-test", other, &d3));
    EXPECT_OK(kvtier_prefix_lookup(d3, a, tokens, N, &r));
    EXPECT(r.tokens == 0);
    kvtier_prefix_store_free(d3);
    kvtier_prefix_store_free(d2);

    /* Bad input. */
    kvtier_prefix_store *bad = NULL;
    EXPECT_STATUS(KVTIER_STATUS_INVALID_CONFIG, kvtier_prefix_store_new_memory(1024, "a:b", fp, &bad));
    EXPECT(bad == NULL && kvt_last_error_has("namespace"));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_prefix_store_new_memory(1024, NULL, fp, &bad));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_prefix_store_new_memory(1024, "x", NULL, &bad));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_prefix_store_new_memory(1024, "x", fp, NULL));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_prefix_lookup(NULL, a, tokens, N, &r));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_prefix_lookup(mem, NULL, tokens, N, &r));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_prefix_lookup(mem, a, NULL, N, &r));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_prefix_lookup(mem, a, tokens, N, NULL));
    EXPECT_STATUS(KVTIER_STATUS_UNKNOWN_SEQUENCE, kvtier_prefix_import(mem, a, 999, tokens, N, &r));
    EXPECT_STATUS(KVTIER_STATUS_UNKNOWN_SEQUENCE, kvtier_prefix_publish(mem, a, 999, tokens, N, 0, &r));
    EXPECT_OK(kvtier_prefix_lookup(mem, a, tokens, 0, &r));
    EXPECT(r.tokens == 0);
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_fingerprint_file(NULL, fp));
    EXPECT_STATUS(KVTIER_STATUS_REMOTE, kvtier_fingerprint_file("/nonexistent/weights.gguf", fp));
    /* The fingerprint of a file: 32 bytes, the same twice. */
    char path[300];
    snprintf(path, sizeof path, "%s/weights.bin", dir);
    FILE *f = fopen(path, "wb");
    EXPECT(f != NULL);
    fputs("weights", f);
    fclose(f);
    uint8_t f1[32], f2[32];
    EXPECT_OK(kvtier_fingerprint_file(path, f1));
    EXPECT_OK(kvtier_fingerprint_file(path, f2));
    EXPECT(memcmp(f1, f2, 32) == 0);

    /* Redis: not compiled in, or (with the feature) nothing listening on port 1. */
    kvtier_status st = kvtier_prefix_store_new_redis("redis://:pw-secret@127.0.0.1:1/", 200, 200, 0, "c-test", fp, &bad);
    EXPECT(st == KVTIER_STATUS_BACKEND_NOT_COMPILED || st == KVTIER_STATUS_REMOTE);
    EXPECT(bad == NULL && !kvt_last_error_has("pw-secret"));

    kvtier_prefix_store_free(NULL);
    kvtier_prefix_store_free(mem);
    kvtier_cache_free(a);
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    EXPECT(system(cmd) == 0);
    printf("prefix: ok\n");
    return 0;
}
