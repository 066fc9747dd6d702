/*
 * Core v2 through the C ABI: page moves and page information, the archive, cold pages, attention
 * over a page selection folded into page statistics, f16 / bf16 inputs, batched decode append,
 * and regressions for what an independent C client found at 6ff2382:
 *   - kvtier_config_set_hot_window(cfg, SIZE_MAX) demoted full pages at once (overflow);
 *   - a finite value above 65504 was stored as inf in f16 hot pages;
 *   - append with a key count far beyond max_seq_len read the buffer before checking the count;
 *   - attend with a huge n_seqs allocated before checking queries_len (abort).
 */
#include "common.h"

#include <math.h>
#include <time.h>

enum { QH = 4, KVH = 2, D = 32, ROW = KVH * D, PS = 32 };

static kvtier_cache *make(size_t hot_window, size_t sinks, bool archive) {
    kvtier_config *cfg = NULL;
    EXPECT_OK(kvtier_config_new(1, QH, KVH, D, &cfg));
    EXPECT_OK(kvtier_config_set_hot_window(cfg, hot_window));
    EXPECT_OK(kvtier_config_set_sink_tokens(cfg, sinks));
    EXPECT_OK(kvtier_config_set_archive(cfg, archive));
    EXPECT_OK(kvtier_config_set_max_seq_len(cfg, 4096));
    kvtier_cache *c = NULL;
    EXPECT_OK(kvtier_cache_new(cfg, &c));
    kvtier_config_free(cfg);
    return c;
}

/* f32 -> IEEE binary16 bits, round to nearest even (inputs here are small and normal). */
static uint16_t to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u, mant = x & 0x7FFFFFu;
    int exp = (int)((x >> 23) & 0xFF) - 127 + 15;
    if (exp <= 0) return (uint16_t)sign; /* tiny: flush (never hit by these inputs) */
    uint32_t h = sign | ((uint32_t)exp << 10) | (mant >> 13);
    uint32_t rest = mant & 0x1FFFu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++;
    return (uint16_t)h;
}

static float from_f16(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FFu;
    uint32_t x = exp == 0 ? sign : sign | ((exp - 15 + 127) << 23) | (mant << 13);
    float f;
    memcpy(&f, &x, 4);
    return f;
}

int main(void) {
    kvt_rng rng = {11};

    /* Regression: a huge hot window (or sink count) keeps everything hot. */
    {
        kvtier_cache *c = make(SIZE_MAX, 0, true);
        kvtier_cache *s = make(0, SIZE_MAX, true);
        uint64_t a, b;
        EXPECT_OK(kvtier_cache_sequence_add(c, &a));
        EXPECT_OK(kvtier_cache_sequence_add(s, &b));
        float *kv = kvt_vec(&rng, 300 * ROW, 1.0f);
        EXPECT_OK(kvtier_cache_append(c, a, 0, kv, 300 * ROW, kv, 300 * ROW));
        EXPECT_OK(kvtier_cache_append(s, b, 0, kv, 300 * ROW, kv, 300 * ROW));
        kvtier_memory_report r;
        EXPECT_OK(kvtier_cache_memory_report(c, &r));
        EXPECT(r.warm_pages == 0 && r.hot_pages == 10);
        EXPECT_OK(kvtier_cache_memory_report(s, &r));
        EXPECT(r.warm_pages == 0 && r.hot_pages == 10);
        free(kv);
        kvtier_cache_free(c);
        kvtier_cache_free(s);
    }

    kvtier_cache *c = make(32, 0, true);
    uint64_t seq;
    EXPECT_OK(kvtier_cache_sequence_add(c, &seq));

    /* Regression: values above 65504 are refused for f16 hot pages; nothing is stored. */
    {
        float k[ROW], v[ROW];
        for (int i = 0; i < ROW; i++) k[i] = v[i] = 0.25f;
        v[5] = 1e5f;
        EXPECT_STATUS(KVTIER_STATUS_OUT_OF_RANGE, kvtier_cache_append(c, seq, 0, k, ROW, v, ROW));
        EXPECT(kvt_last_error_has("f16"));
        size_t len = 99;
        EXPECT_OK(kvtier_cache_sequence_len(c, seq, 0, &len));
        EXPECT(len == 0);
    }

    /* Regression: a key count beyond max_seq_len is refused before the buffer is read (the
     * buffer holds one row; reading past it would be caught by ASan and valgrind). */
    {
        float one[ROW] = {0};
        size_t huge = (size_t)1 << 40;
        EXPECT_STATUS(KVTIER_STATUS_SEQUENCE_TOO_LONG,
                      kvtier_cache_append(c, seq, 0, one, huge * ROW, one, huge * ROW));
        EXPECT_STATUS(KVTIER_STATUS_SEQUENCE_TOO_LONG,
                      kvtier_cache_append(c, seq, 0, one, 5000 * ROW, one, 5000 * ROW));
    }

    /* 300 tokens as f16 through the typed call. */
    size_t n = 300;
    float *kf = kvt_vec(&rng, n * ROW, 1.5f), *vf = kvt_vec(&rng, n * ROW, 1.0f);
    uint16_t *kh = malloc(n * ROW * 2), *vh = malloc(n * ROW * 2);
    EXPECT(kh && vh);
    for (size_t i = 0; i < n * ROW; i++) {
        kh[i] = to_f16(kf[i]);
        vh[i] = to_f16(vf[i]);
        kf[i] = from_f16(kh[i]);
        vf[i] = from_f16(vh[i]);
    }
    EXPECT_STATUS(KVTIER_STATUS_INVALID_ARGUMENT,
                  kvtier_cache_append_typed(c, seq, 0, 7, kh, n * ROW, vh, n * ROW));
    EXPECT_OK(kvtier_cache_append_typed(c, seq, 0, KVTIER_DTYPE_F16, kh, n * ROW, vh, n * ROW));
    size_t pages = 0;
    EXPECT_OK(kvtier_cache_sequence_pages(c, seq, 0, &pages));
    EXPECT(pages == 10);

    /* A twin cache from the same values as f32, never demoted: the exact reference. */
    kvtier_cache *ref = make(SIZE_MAX, 0, true);
    uint64_t rs;
    EXPECT_OK(kvtier_cache_sequence_add(ref, &rs));
    EXPECT_OK(kvtier_cache_append(ref, rs, 0, kf, n * ROW, vf, n * ROW));

    /* Page info: pages 0..7 left the window and are warm, archived; page 9 is partial and hot. */
    kvtier_page_info info;
    EXPECT_OK(kvtier_cache_page_info(c, seq, 0, 0, &info));
    EXPECT(info.tier == KVTIER_TIER_WARM && info.archived && info.n_tokens == PS);
    EXPECT(info.k_bits == 4 && info.v_bits == 4 && info.last_attended == KVTIER_NEVER);
    EXPECT_OK(kvtier_cache_page_info(c, seq, 0, 9, &info));
    EXPECT(info.tier == KVTIER_TIER_HOT && info.n_tokens == 300 - 9 * PS);
    EXPECT_STATUS(KVTIER_STATUS_UNKNOWN_PAGE, kvtier_cache_page_info(c, seq, 0, 10, &info));

    /* Moves: validated first, typed errors, exact promotion from the archive. */
    bool exact = false;
    EXPECT_STATUS(KVTIER_STATUS_INVALID_MOVE,
                  kvtier_cache_move(c, seq, 0, 9, KVTIER_MOVE_OP_DEMOTE, 4, 4, NULL));
    EXPECT_STATUS(KVTIER_STATUS_INVALID_MOVE,
                  kvtier_cache_move(c, seq, 0, 0, KVTIER_MOVE_OP_DEMOTE, 8, 8, NULL));
    EXPECT_STATUS(KVTIER_STATUS_INVALID_ARGUMENT,
                  kvtier_cache_move(c, seq, 0, 0, KVTIER_MOVE_OP_DEMOTE, 5, 5, NULL));
    EXPECT_STATUS(KVTIER_STATUS_INVALID_ARGUMENT, kvtier_cache_move(c, seq, 0, 0, 99, 0, 0, NULL));
    EXPECT_OK(kvtier_cache_move(c, seq, 0, 1, KVTIER_MOVE_OP_DEMOTE, 2, 2, NULL));
    EXPECT_OK(kvtier_cache_page_info(c, seq, 0, 1, &info));
    EXPECT(info.tier == KVTIER_TIER_WARM && info.k_bits == 2 && info.v_bits == 2);
    EXPECT_OK(kvtier_cache_move(c, seq, 0, 1, KVTIER_MOVE_OP_PROMOTE, 0, 0, &exact));
    EXPECT(exact);
    EXPECT_OK(kvtier_cache_move(c, seq, 0, 2, KVTIER_MOVE_OP_TO_COLD, 0, 0, NULL));
    EXPECT_OK(kvtier_cache_move(c, seq, 0, 8, KVTIER_MOVE_OP_PIN, 0, 0, NULL));
    EXPECT_STATUS(KVTIER_STATUS_INVALID_MOVE,
                  kvtier_cache_move(c, seq, 0, 8, KVTIER_MOVE_OP_EVICT, 0, 0, NULL));
    EXPECT_OK(kvtier_cache_page_info(c, seq, 0, 8, &info));
    EXPECT(info.pinned);
    kvtier_memory_report r;
    EXPECT_OK(kvtier_cache_memory_report(c, &r));
    EXPECT(r.cold_pages == 1 && r.archived_pages >= 7 && r.archive_bytes > 0);
    kvtier_counters cnt;
    EXPECT_OK(kvtier_cache_counters(c, &cnt));
    EXPECT(cnt.promotions == 1 && cnt.to_cold == 1);

    /* Selection: kv head 0 attends pages {1, 9}, kv head 1 page {9}; the cold page is not
     * selected. Attention equals the exact twin's over the same selection (pages 1 and 9 are hot
     * and exact in both), and observe folds the masses into the page statistics. */
    float *q = kvt_vec(&rng, QH * D, 2.0f);
    uint32_t sel[] = {9, 1, 9};
    size_t offs[] = {0, 2, 3};
    float out[QH * D], want[QH * D];
    float mass[10];
    size_t moffs[2];
    kvtier_attention_stats st = {
        .page_mass = mass, .page_mass_len = 10, .page_offsets = moffs, .page_offsets_len = 2};
    EXPECT_STATUS(KVTIER_STATUS_INVALID_ARGUMENT,
                  kvtier_cache_attend_selected(c, 0, &seq, 1, KVTIER_DTYPE_F32, q, QH * D, sel, 3,
                                               offs, 2, out, QH * D, NULL, false));
    size_t bad_offs[] = {0, 3, 2};
    EXPECT_STATUS(KVTIER_STATUS_INVALID_ARGUMENT,
                  kvtier_cache_attend_selected(c, 0, &seq, 1, KVTIER_DTYPE_F32, q, QH * D, sel, 3,
                                               bad_offs, 3, out, QH * D, NULL, false));
    uint32_t oob[] = {10, 1, 9};
    EXPECT_STATUS(KVTIER_STATUS_SHAPE,
                  kvtier_cache_attend_selected(c, 0, &seq, 1, KVTIER_DTYPE_F32, q, QH * D, oob, 3,
                                               offs, 3, out, QH * D, NULL, false));
    EXPECT_OK(kvtier_cache_attend_selected(c, 0, &seq, 1, KVTIER_DTYPE_F32, q, QH * D, sel, 3,
                                           offs, 3, out, QH * D, &st, true));
    EXPECT_OK(kvtier_cache_attend_selected(ref, 0, &rs, 1, KVTIER_DTYPE_F32, q, QH * D, sel, 3,
                                           offs, 3, want, QH * D, NULL, false));
    for (int i = 0; i < QH * D; i++) EXPECT(out[i] == want[i]);
    EXPECT(moffs[0] == 0 && moffs[1] == 10);
    EXPECT(mass[0] == 0.0f && mass[2] == 0.0f && mass[1] > 0.0f && mass[9] > 0.0f);
    EXPECT(fabsf(mass[1] + mass[9] - 1.0f) < 1e-4f);
    EXPECT_OK(kvtier_cache_page_info(c, seq, 0, 9, &info));
    EXPECT(info.last_attended == 0 && info.mass > 0.0f);
    EXPECT_OK(kvtier_cache_page_info(c, seq, 0, 3, &info));
    EXPECT(info.last_attended == KVTIER_NEVER && info.mass == 0.0f);

    /* Without a selection, attention reads the cold page too (brought back for the step). */
    EXPECT_OK(kvtier_cache_attend_selected(c, 0, &seq, 1, KVTIER_DTYPE_F32, q, QH * D, NULL, 0,
                                           NULL, 0, out, QH * D, NULL, false));
    for (int i = 0; i < QH * D; i++) EXPECT(isfinite(out[i]));

    /* Regression: a huge n_seqs is refused before anything is read or allocated. */
    EXPECT_STATUS(KVTIER_STATUS_INVALID_ARGUMENT,
                  kvtier_cache_attend(c, 0, &seq, (size_t)1 << 60, q, QH * D, out, QH * D, NULL));
    EXPECT_STATUS(KVTIER_STATUS_SHAPE,
                  kvtier_cache_attend(c, 0, &seq, (size_t)1 << 40, q, QH * D, out, QH * D, NULL));
    EXPECT_STATUS(KVTIER_STATUS_SHAPE, kvtier_cache_attend_selected(
                                           c, 0, &seq, (size_t)1 << 40, KVTIER_DTYPE_F32, q,
                                           QH * D, NULL, 0, NULL, 0, out, QH * D, NULL, false));

    /* Batched decode append: one token for each of two sequences, validated as a batch. */
    uint64_t two[2];
    EXPECT_OK(kvtier_cache_sequence_add(c, &two[0]));
    EXPECT_OK(kvtier_cache_sequence_add(c, &two[1]));
    float *tok = kvt_vec(&rng, 2 * ROW, 1.0f);
    uint64_t dup[2] = {two[0], two[0]};
    EXPECT_STATUS(KVTIER_STATUS_DUPLICATE_SEQUENCE,
                  kvtier_cache_append_decode(c, 0, dup, 2, KVTIER_DTYPE_F32, tok, 2 * ROW, tok,
                                             2 * ROW));
    EXPECT_STATUS(KVTIER_STATUS_SHAPE, kvtier_cache_append_decode(c, 0, two, 2, KVTIER_DTYPE_F32,
                                                                  tok, ROW, tok, ROW));
    EXPECT_OK(kvtier_cache_append_decode(c, 0, two, 2, KVTIER_DTYPE_F32, tok, 2 * ROW, tok,
                                         2 * ROW));
    size_t l0 = 0, l1 = 0;
    EXPECT_OK(kvtier_cache_sequence_len(c, two[0], 0, &l0));
    EXPECT_OK(kvtier_cache_sequence_len(c, two[1], 0, &l1));
    EXPECT(l0 == 1 && l1 == 1);

    /* Retention policies by name: h2o under a token budget evicts, never a sink or pinned page. */
    kvtier_policy *pol = NULL;
    EXPECT_STATUS(KVTIER_STATUS_INVALID_CONFIG, kvtier_policy_new("lru", &pol));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_policy_new(NULL, &pol));
    EXPECT_OK(kvtier_policy_new("h2o", &pol));
    size_t n_moves = 0;
    EXPECT_OK(kvtier_cache_enforce(c, pol, seq, 0, 200, KVTIER_UNLIMITED, &n_moves));
    EXPECT(n_moves > 0);
    EXPECT_OK(kvtier_cache_memory_report(c, &r));
    EXPECT(r.evicted_pages == n_moves);
    EXPECT_OK(kvtier_cache_page_info(c, seq, 0, 8, &info));
    EXPECT(info.tier != KVTIER_TIER_EVICTED && info.pinned);
    kvtier_policy_free(pol);
    kvtier_policy_free(NULL);

    free(q);
    free(tok);
    free(kf);
    free(vf);
    free(kh);
    free(vh);
    kvtier_cache_free(ref);
    kvtier_cache_free(c);

    /* Spilling: cold and archive pages past a small RAM budget go to files in a directory; the
     * cache attends over them exactly as an all-RAM cache does, and removes its files when freed. */
    {
        char dir[128];
        snprintf(dir, sizeof dir, "%s/kvtier-c-spill-%ld", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp",
                 (long)clock());
        EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_config_set_spill(NULL, dir, 0, 0));
        enum { N = 400 };
        float *sk = malloc(sizeof(float) * N * ROW), *sv = malloc(sizeof(float) * N * ROW);
        EXPECT(sk && sv);
        for (size_t i = 0; i < (size_t)N * ROW; i++) {
            sk[i] = sinf(0.13f * (float)i);
            sv[i] = cosf(0.29f * (float)i);
        }
        float sq[QH * D], so[2][QH * D];
        for (size_t i = 0; i < QH * D; i++) sq[i] = cosf(0.5f * (float)i);
        for (int spill = 0; spill < 2; spill++) {
            kvtier_config *sc = NULL;
            EXPECT_OK(kvtier_config_new(1, QH, KVH, D, &sc));
            EXPECT_OK(kvtier_config_set_hot_window(sc, 32));
            EXPECT_OK(kvtier_config_set_spill(sc, spill ? dir : NULL, 4096, KVTIER_UNLIMITED));
            kvtier_cache *cs = NULL;
            EXPECT_OK(kvtier_cache_new(sc, &cs));
            uint64_t s;
            EXPECT_OK(kvtier_cache_sequence_add(cs, &s));
            EXPECT_OK(kvtier_cache_append(cs, s, 0, sk, (size_t)N * ROW, sv, (size_t)N * ROW));
            for (size_t page = 1; page < N / PS - 2; page++)
                EXPECT_OK(kvtier_cache_move(cs, s, 0, page, KVTIER_MOVE_OP_TO_COLD, 0, 0, NULL));
            EXPECT_OK(kvtier_cache_attend(cs, 0, &s, 1, sq, QH * D, so[spill], QH * D, NULL));
            /* The disk in the memory report and the read counters; compaction after promotions. */
            kvtier_memory_report mr;
            EXPECT_OK(kvtier_cache_memory_report(cs, &mr));
            kvtier_disk_stats ds;
            EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_cache_disk_stats(cs, NULL));
            EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_cache_disk_stats(NULL, &ds));
            EXPECT_OK(kvtier_cache_disk_stats(cs, &ds));
            if (spill) {
                EXPECT(mr.disk_pages > 0 && mr.disk_bytes > 0 && mr.disk_file_bytes >= mr.disk_bytes);
                EXPECT(ds.spills >= mr.disk_pages && ds.pages_read > 0 && ds.bytes_read > 0);
                for (size_t page = 1; page < N / PS - 2; page += 2)
                    EXPECT_OK(kvtier_cache_move(cs, s, 0, page, KVTIER_MOVE_OP_PROMOTE, 0, 0, NULL));
                kvtier_compaction cr;
                EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_cache_compact_spill(NULL, &cr));
                EXPECT_OK(kvtier_cache_compact_spill(cs, &cr));
                EXPECT_OK(kvtier_cache_compact_spill(cs, NULL));
                kvtier_memory_report after;
                EXPECT_OK(kvtier_cache_memory_report(cs, &after));
                EXPECT(after.disk_pages < mr.disk_pages && after.disk_file_bytes <= mr.disk_file_bytes);
                EXPECT(after.disk_file_bytes >= after.disk_bytes);
                EXPECT(cr.corrupt_left == 0);
            } else {
                EXPECT(mr.disk_pages == 0 && mr.disk_bytes == 0 && mr.disk_file_bytes == 0);
                EXPECT(ds.spills == 0 && ds.pages_read == 0);
                kvtier_compaction cr = {1, 1, 1, 1};
                EXPECT_OK(kvtier_cache_compact_spill(cs, &cr));
                EXPECT(cr.pages_moved == 0 && cr.bytes_reclaimed == 0);
            }
            kvtier_cache_free(cs);
            kvtier_config_free(sc);
        }
        EXPECT(memcmp(so[0], so[1], sizeof so[0]) == 0);

        /* Rollback: truncate to 250 tokens, then the same appends as a cache that never held the
         * dropped ones give the same attention. */
        float ro[2][QH * D];
        for (int r = 0; r < 2; r++) {
            kvtier_config *tc = NULL;
            EXPECT_OK(kvtier_config_new(1, QH, KVH, D, &tc));
            EXPECT_OK(kvtier_config_set_hot_window(tc, 32));
            kvtier_cache *ct = NULL;
            EXPECT_OK(kvtier_cache_new(tc, &ct));
            uint64_t s;
            EXPECT_OK(kvtier_cache_sequence_add(ct, &s));
            size_t first = r ? (size_t)N : 250;
            EXPECT_OK(kvtier_cache_append(ct, s, 0, sk, first * ROW, sv, first * ROW));
            if (r) {
                size_t dropped = 0, deq = 99;
                EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER,
                              kvtier_cache_sequence_truncate(NULL, s, 250, NULL, NULL));
                EXPECT_STATUS(KVTIER_STATUS_UNKNOWN_SEQUENCE,
                              kvtier_cache_sequence_truncate(ct, s + 1000, 250, NULL, NULL));
                EXPECT_OK(kvtier_cache_sequence_truncate(ct, s, 250, &dropped, &deq));
                EXPECT(dropped == N - 250 && deq == 0);
                size_t len = 0;
                EXPECT_OK(kvtier_cache_sequence_len(ct, s, 0, &len));
                EXPECT(len == 250);
            }
            EXPECT_OK(kvtier_cache_append(ct, s, 0, sk + 300 * ROW, 100 * ROW, sv + 300 * ROW,
                                          100 * ROW));
            EXPECT_OK(kvtier_cache_attend(ct, 0, &s, 1, sq, QH * D, ro[r], QH * D, NULL));
            kvtier_cache_free(ct);
            kvtier_config_free(tc);
        }
        EXPECT(memcmp(ro[0], ro[1], sizeof ro[0]) == 0);
        FILE *gone = fopen(dir, "r");
        EXPECT(gone == NULL); /* the directory the cache created is gone with it */
        free(sk);
        free(sv);
    }
    /* Query-time elimination: the skipped mass is bounded by epsilon; bad parameters are typed. */
    {
        kvtier_cache *ce = make(32, 0, true);
        uint64_t s;
        EXPECT_OK(kvtier_cache_sequence_add(ce, &s));
        enum { NE = 600 };
        float *ek = malloc(sizeof(float) * NE * ROW), *ev = malloc(sizeof(float) * NE * ROW);
        EXPECT(ek && ev);
        for (size_t i = 0; i < (size_t)NE * ROW; i++) {
            size_t page = i / (32 * ROW);
            ek[i] = (float)(page % 5) * 0.8f * cosf(0.01f * (float)(i % D)) + 0.01f * sinf((float)i);
            ev[i] = sinf(0.37f * (float)i);
        }
        EXPECT_OK(kvtier_cache_append(ce, s, 0, ek, (size_t)NE * ROW, ev, (size_t)NE * ROW));
        float eq[QH * D], full[QH * D], elim[QH * D];
        for (size_t i = 0; i < QH * D; i++) eq[i] = 2.0f * cosf(0.01f * (float)(i % D));
        EXPECT_OK(kvtier_cache_attend(ce, 0, &s, 1, eq, QH * D, full, QH * D, NULL));
        kvtier_elimination_report rep;
        EXPECT_STATUS(KVTIER_STATUS_INVALID_CONFIG,
                      kvtier_cache_attend_eliminated(ce, 0, &s, 1, eq, QH * D, 1.5f, 0, elim, QH * D,
                                                     NULL, &rep));
        EXPECT_STATUS(KVTIER_STATUS_INVALID_CONFIG,
                      kvtier_cache_attend_eliminated(ce, 0, &s, 1, eq, QH * D, 1e-3f, 1, elim, QH * D,
                                                     NULL, &rep));
        EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER,
                      kvtier_cache_attend_eliminated(NULL, 0, &s, 1, eq, QH * D, 1e-3f, 0, elim,
                                                     QH * D, NULL, &rep));
        EXPECT_STATUS(KVTIER_STATUS_SHAPE,
                      kvtier_cache_attend_eliminated(ce, 0, &s, 1, eq, QH * D - 1, 1e-3f, 0, elim,
                                                     QH * D, NULL, &rep));
        for (size_t group = 0; group <= 4; group += 4) {
            float eps = 1e-2f;
            EXPECT_OK(kvtier_cache_attend_eliminated(ce, 0, &s, 1, eq, QH * D, eps, group, elim,
                                                     QH * D, NULL, &rep));
            EXPECT(rep.skipped_pages <= rep.candidates && rep.max_mass_bound <= eps);
            EXPECT(rep.candidates > 0);
            for (size_t i = 0; i < QH * D; i++) EXPECT(fabsf(elim[i] - full[i]) <= 2.0f * eps * 8.0f);
            EXPECT_OK(kvtier_cache_attend_eliminated(ce, 0, &s, 1, eq, QH * D, eps, group, elim,
                                                     QH * D, NULL, NULL));
        }
        kvtier_cache_free(ce);
        free(ek);
        free(ev);
    }
    printf("pages: ok\n");
    return 0;
}
