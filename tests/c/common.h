/*
 * Helpers shared by the C tests of kvtier's C ABI (compiled and run by tests/c_abi.rs).
 *
 * EXPECT_OK / EXPECT_STATUS print the failing line, the status name and the last error text, then
 * exit(1). The data generator is splitmix64 mapped to [-1, 1) exactly as tests/c_abi.rs does it, so
 * the Rust side can rebuild the same inputs bit for bit.
 */
#ifndef KVTIER_TEST_COMMON_H
#define KVTIER_TEST_COMMON_H

#include "kvtier.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static inline void kvt_report(const char *file, int line, const char *expr, kvtier_status want,
                       kvtier_status got) {
    char msg[512];
    size_t len = 0;
    kvtier_last_error(msg, sizeof msg, &len);
    fprintf(stderr, "%s:%d: %s\n  expected %s, got %s\n  last error: %s\n", file, line, expr,
            kvtier_status_name(want), kvtier_status_name(got), msg);
    exit(1);
}

#define EXPECT_STATUS(want, call)                                                                  \
    do {                                                                                           \
        kvtier_status got_ = (call);                                                               \
        if (got_ != (kvtier_status)(want)) kvt_report(__FILE__, __LINE__, #call, (want), got_);    \
    } while (0)

#define EXPECT_OK(call) EXPECT_STATUS(KVTIER_STATUS_OK, call)

#define EXPECT(cond)                                                                               \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d: expectation failed: %s\n", __FILE__, __LINE__, #cond);       \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

/* The last error contains `needle`. */
static inline int kvt_last_error_has(const char *needle) {
    char msg[512];
    size_t len = 0;
    if (kvtier_last_error(msg, sizeof msg, &len) != KVTIER_STATUS_OK) return 0;
    return strstr(msg, needle) != NULL;
}

typedef struct kvt_rng {
    uint64_t state;
} kvt_rng;

static inline uint64_t kvt_next(kvt_rng *r) {
    r->state += 0x9E3779B97F4A7C15ull;
    uint64_t z = r->state;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Uniform in [-amp, amp): exact in binary32, the same on the Rust side. */
static inline float kvt_f32(kvt_rng *r, float amp) {
    return ((float)(kvt_next(r) >> 40) / (float)(1u << 23) - 1.0f) * amp;
}

static inline float *kvt_vec(kvt_rng *r, size_t n, float amp) {
    float *v = (float *)malloc((n ? n : 1) * sizeof *v);
    EXPECT(v != NULL);
    for (size_t i = 0; i < n; i++) v[i] = kvt_f32(r, amp);
    return v;
}

/* The bits of a float, for exact printing. */
static inline uint32_t kvt_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

#endif /* KVTIER_TEST_COMMON_H */
