/*
 * The protect session through the C ABI: a calm stream of logits, then a spike the monitor fires
 * on; the session heals the cache (pages promoted exactly, an event queued), releases after the
 * hold, and refuses bad input with typed errors.
 */
#include "common.h"

#include <math.h>

enum { QH = 4, KVH = 2, D = 32, ROW = KVH * D, N = 512, V = 64 };

int main(void) {
    kvtier_config *cfg = NULL;
    EXPECT_OK(kvtier_config_new(2, QH, KVH, D, &cfg));
    EXPECT_OK(kvtier_config_set_hot_window(cfg, 64));
    kvtier_cache *c = NULL;
    EXPECT_OK(kvtier_cache_new(cfg, &c));
    kvtier_config_free(cfg);
    uint64_t s = 0;
    EXPECT_OK(kvtier_cache_sequence_add(c, &s));
    kvt_rng rng = {9};
    float *k = kvt_vec(&rng, N * ROW, 1.0f), *v = kvt_vec(&rng, N * ROW, 1.0f);
    for (size_t l = 0; l < 2; l++) {
        EXPECT_OK(kvtier_cache_append(c, s, l, k, N * ROW, v, N * ROW));
    }
    free(k);
    free(v);

    kvtier_protect_options o = kvtier_protect_options_default();
    EXPECT(fabsf(o.sensitivity - 0.85f) < 1e-6f);
    o.sensitivity = 1.0f;
    o.pages_per_layer = 2;
    o.max_pages_per_layer = 2;
    o.hold = 3;
    kvtier_protect *p = NULL;
    EXPECT_OK(kvtier_protect_new(&o, s, &p));

    float calm[V], spike[V];
    for (int i = 0; i < V; i++) {
        calm[i] = 0.25f;
        spike[i] = -8.0f;
    }
    spike[0] = spike[1] = 4.0f;
    spike[2] = 1.0f;
    kvtier_head_stats heads[QH] = {{1.0f, 0.5f, 2.0f, 3.0f}};
    kvtier_verdict vd;
    for (int i = 0; i < 40; i++) {
        EXPECT_OK(kvtier_protect_step(p, c, calm, V, heads, QH, &vd));
        EXPECT(!vd.fired);
        EXPECT(fabsf(vd.health) < 1e-5f); /* uniform logits: no health */
        EXPECT(vd.regime == (i < 32 ? -1 : 0)); /* identical steps: confident */
    }
    EXPECT_OK(kvtier_protect_step(p, c, spike, V, NULL, 0, &vd));
    EXPECT(vd.fired && vd.promoted_pages == 4 && vd.threshold >= 0.0f);
    EXPECT(isnan(vd.attention_entropy));
    kvtier_heal_event ev;
    bool has = false;
    EXPECT_OK(kvtier_protect_next_event(p, &ev, &has));
    EXPECT(has && ev.step == 40 && ev.promoted_pages == 4 && ev.promoted_bytes > 0);
    EXPECT_OK(kvtier_protect_next_event(p, &ev, &has));
    EXPECT(!has);
    kvtier_memory_report r;
    EXPECT_OK(kvtier_cache_memory_report(c, &r));
    size_t hot_healed = r.hot_pages;
    for (int i = 0; i < 3; i++) {
        EXPECT_OK(kvtier_protect_step(p, c, calm, V, NULL, 0, NULL));
    }
    EXPECT_OK(kvtier_cache_memory_report(c, &r));
    EXPECT(r.hot_pages + 4 == hot_healed); /* released after the hold */

    /* Bad input: typed errors, nothing changed. */
    float nan_logits[V];
    memcpy(nan_logits, calm, sizeof calm);
    nan_logits[7] = NAN;
    EXPECT_STATUS(KVTIER_STATUS_NON_FINITE, kvtier_protect_step(p, c, nan_logits, V, NULL, 0, &vd));
    EXPECT_STATUS(KVTIER_STATUS_SHAPE, kvtier_protect_step(p, c, calm, 0, NULL, 0, &vd));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_protect_step(p, c, NULL, V, NULL, 0, &vd));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_protect_step(p, c, calm, V, NULL, 3, &vd));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_protect_step(NULL, c, calm, V, NULL, 0, &vd));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_protect_step(p, NULL, calm, V, NULL, 0, &vd));
    EXPECT_STATUS(KVTIER_STATUS_INVALID_ARGUMENT,
                  kvtier_protect_step(p, c, calm, SIZE_MAX, NULL, 0, &vd));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_protect_next_event(p, NULL, &has));
    kvtier_protect *q = NULL;
    EXPECT_OK(kvtier_protect_new(NULL, s + 99, &q));
    EXPECT_STATUS(KVTIER_STATUS_UNKNOWN_SEQUENCE, kvtier_protect_step(q, c, calm, V, NULL, 0, &vd));
    kvtier_protect_free(q);
    o.sensitivity = 1.5f;
    EXPECT_STATUS(KVTIER_STATUS_INVALID_CONFIG, kvtier_protect_new(&o, s, &q));
    o.sensitivity = NAN;
    EXPECT_STATUS(KVTIER_STATUS_INVALID_CONFIG, kvtier_protect_new(&o, s, &q));
    o.sensitivity = 0.5f;
    o.pages_per_layer = 5;
    EXPECT_STATUS(KVTIER_STATUS_INVALID_CONFIG, kvtier_protect_new(&o, s, &q));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_protect_new(&o, s, NULL));
    kvtier_protect_free(NULL);

    kvtier_protect_free(p);
    kvtier_cache_free(c);
    printf("protect: ok\n");
    return 0;
}
