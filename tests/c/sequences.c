/*
 * Engine operations on whole sequences through the C ABI: fork (prefix sharing, copy-on-write),
 * beam-search reorder, save / restore with their error paths, and a pthreads stress test: threads
 * prefilling, appending to and attending over their own sequences of one cache at once, checked
 * bit for bit against the same work done on one thread. Built natively, under ASan/UBSan, under valgrind and
 * (when the compiler has it) under ThreadSanitizer by tests/c_abi.rs.
 */
#define _POSIX_C_SOURCE 200809L
#include "common.h"

#include <math.h>
#include <pthread.h>
#include <time.h>

enum { QH = 4, KVH = 2, D = 32, ROW = KVH * D, N = 300, THREADS = 4, STEPS = 40 };

static kvtier_cache *make(size_t page_size) {
    kvtier_config *cfg = NULL;
    EXPECT_OK(kvtier_config_new(1, QH, KVH, D, &cfg));
    EXPECT_OK(kvtier_config_set_hot_window(cfg, 64));
    EXPECT_OK(kvtier_config_set_page_size(cfg, page_size));
    kvtier_cache *c = NULL;
    EXPECT_OK(kvtier_cache_new(cfg, &c));
    kvtier_config_free(cfg);
    return c;
}

static void fill(float *x, size_t n, float a) {
    for (size_t i = 0; i < n; i++) x[i] = sinf(a * (float)(i + 1));
}

static void attend(kvtier_cache *c, uint64_t s, const float *q, float *out) {
    EXPECT_OK(kvtier_cache_attend(c, 0, &s, 1, q, QH * D, out, QH * D, NULL));
}

/* One thread's work: STEPS decode steps of its own sequence (append one token, attend). */
enum { PRE = 48 };

typedef struct {
    kvtier_cache *cache;
    uint64_t seq;
    int id;
    float pre[PRE * QH * D];
    float out[STEPS][QH * D];
} job;

/* A prefill chunk (its attention runs under the shared lock, concurrently with the other threads'),
 * then decode steps. */
static void steps(job *j) {
    static const size_t PQ = PRE * QH * D, PK = PRE * ROW;
    float pk[PRE * ROW], pv[PRE * ROW], pq[PRE * QH * D];
    fill(pk, PK, 0.011f * (float)(j->id + 1));
    fill(pv, PK, 0.017f * (float)(j->id + 1));
    fill(pq, PQ, 0.023f * (float)(j->id + 1));
    EXPECT_OK(kvtier_cache_prefill(j->cache, j->seq, 0, pq, PQ, pk, PK, pv, PK, j->pre, PQ));
    float k[ROW], v[ROW], q[QH * D];
    for (int t = 0; t < STEPS; t++) {
        fill(k, ROW, 0.01f * (float)(j->id * STEPS + t + 1));
        fill(v, ROW, 0.02f * (float)(j->id * STEPS + t + 1));
        fill(q, QH * D, 0.03f * (float)(t + 1));
        EXPECT_OK(kvtier_cache_append(j->cache, j->seq, 0, k, ROW, v, ROW));
        attend(j->cache, j->seq, q, j->out[t]);
    }
}

static void *run_job(void *p) {
    steps((job *)p);
    return NULL;
}

int main(void) {
    float *k = malloc(sizeof(float) * N * ROW), *v = malloc(sizeof(float) * N * ROW);
    EXPECT(k && v);
    fill(k, (size_t)N * ROW, 0.13f);
    fill(v, (size_t)N * ROW, 0.29f);
    float q[QH * D], oa[QH * D], ob[QH * D];
    fill(q, QH * D, 0.5f);

    /* Fork: same attention, full pages shared (counted once), each side grows on its own. */
    kvtier_cache *c = make(32);
    uint64_t a, b;
    EXPECT_OK(kvtier_cache_sequence_add(c, &a));
    EXPECT_OK(kvtier_cache_append(c, a, 0, k, (size_t)N * ROW, v, (size_t)N * ROW));
    kvtier_memory_report r0, r1;
    EXPECT_OK(kvtier_cache_memory_report(c, &r0));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_cache_sequence_fork(NULL, a, &b));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_cache_sequence_fork(c, a, NULL));
    EXPECT_STATUS(KVTIER_STATUS_UNKNOWN_SEQUENCE, kvtier_cache_sequence_fork(c, a + 100, &b));
    EXPECT_OK(kvtier_cache_sequence_fork(c, a, &b));
    EXPECT(b != a);
    EXPECT_OK(kvtier_cache_memory_report(c, &r1));
    EXPECT(r1.shared_pages == N / 32);
    EXPECT(r1.warm_bytes == r0.warm_bytes && r1.warm_pages == r0.warm_pages);
    EXPECT(r1.hot_pages == r0.hot_pages + 1); /* the partial last page only */
    attend(c, a, q, oa);
    attend(c, b, q, ob);
    EXPECT(memcmp(oa, ob, sizeof oa) == 0);
    EXPECT_OK(kvtier_cache_append(c, b, 0, k, 40 * ROW, v, 40 * ROW));
    attend(c, a, q, ob);
    EXPECT(memcmp(oa, ob, sizeof oa) == 0); /* a did not see b's tokens */

    /* Reorder: both beams become a. */
    uint64_t beams[2] = {a, b};
    size_t from[2] = {0, 0}, bad[2] = {0, 2};
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_cache_reorder(c, NULL, from, 2));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_cache_reorder(c, beams, NULL, 2));
    EXPECT_STATUS(KVTIER_STATUS_SHAPE, kvtier_cache_reorder(c, beams, bad, 2));
    EXPECT_OK(kvtier_cache_reorder(c, NULL, NULL, 0));
    EXPECT_OK(kvtier_cache_reorder(c, beams, from, 2));
    attend(c, b, q, ob);
    EXPECT(memcmp(oa, ob, sizeof oa) == 0);
    size_t len = 0;
    EXPECT_OK(kvtier_cache_sequence_len(c, b, 0, &len));
    EXPECT(len == N);

    /* Save / restore. */
    char path[160], junk[160];
    const char *tmp = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    snprintf(path, sizeof path, "%s/kvtier-c-seq-%ld.kvts", tmp, (long)clock());
    snprintf(junk, sizeof junk, "%s/kvtier-c-junk-%ld.kvts", tmp, (long)clock());
    uint64_t bytes = 0, restored;
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_cache_sequence_save(c, a, NULL, true, NULL));
    EXPECT_STATUS(KVTIER_STATUS_UNKNOWN_SEQUENCE,
                  kvtier_cache_sequence_save(c, a + 100, path, true, NULL));
    EXPECT_OK(kvtier_cache_sequence_save(c, a, path, true, &bytes));
    EXPECT(bytes > 0);
    kvtier_cache *d = make(32);
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_cache_sequence_restore(d, NULL, &restored));
    EXPECT_STATUS(KVTIER_STATUS_NULL_PARAMETER, kvtier_cache_sequence_restore(d, path, NULL));
    EXPECT_STATUS(KVTIER_STATUS_DISK, kvtier_cache_sequence_restore(d, junk, &restored));
    FILE *f = fopen(junk, "wb");
    EXPECT(f != NULL);
    fputs("not a sequence", f);
    fclose(f);
    EXPECT_STATUS(KVTIER_STATUS_CORRUPT_FILE, kvtier_cache_sequence_restore(d, junk, &restored));
    kvtier_cache *other = make(64);
    EXPECT_STATUS(KVTIER_STATUS_CONFIG_MISMATCH,
                  kvtier_cache_sequence_restore(other, path, &restored));
    EXPECT(kvt_last_error_has("page_size"));
    kvtier_cache_free(other);
    EXPECT_OK(kvtier_cache_sequence_restore(d, path, &restored));
    attend(d, restored, q, ob);
    EXPECT(memcmp(oa, ob, sizeof oa) == 0);
    remove(path);
    remove(junk);
    kvtier_cache_free(d);
    kvtier_cache_free(c);

    /* Threads: each appends to and attends over its own sequence of one cache, at once. */
    static job jobs[THREADS], solo[THREADS];
    kvtier_cache *shared = make(32), *serial = make(32);
    for (int i = 0; i < THREADS; i++) {
        jobs[i].cache = shared;
        jobs[i].id = i;
        EXPECT_OK(kvtier_cache_sequence_add(shared, &jobs[i].seq));
        EXPECT_OK(kvtier_cache_append(shared, jobs[i].seq, 0, k, 100 * ROW, v, 100 * ROW));
        solo[i].cache = serial;
        solo[i].id = i;
        EXPECT_OK(kvtier_cache_sequence_add(serial, &solo[i].seq));
        EXPECT_OK(kvtier_cache_append(serial, solo[i].seq, 0, k, 100 * ROW, v, 100 * ROW));
    }
    pthread_t th[THREADS];
    for (int i = 0; i < THREADS; i++) EXPECT(pthread_create(&th[i], NULL, run_job, &jobs[i]) == 0);
    for (int i = 0; i < THREADS; i++) EXPECT(pthread_join(th[i], NULL) == 0);
    for (int i = 0; i < THREADS; i++) {
        steps(&solo[i]);
        EXPECT(memcmp(jobs[i].pre, solo[i].pre, sizeof jobs[i].pre) == 0);
        EXPECT(memcmp(jobs[i].out, solo[i].out, sizeof jobs[i].out) == 0);
    }
    kvtier_cache_free(shared);
    kvtier_cache_free(serial);
    free(k);
    free(v);
    printf("sequences: ok\n");
    return 0;
}
