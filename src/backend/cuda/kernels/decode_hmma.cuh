// Hot bf16 pages of the fused decode on tensor cores (mma.sync m16n8k16, bf16 operands, f32
// accumulate), in hot-only modules.
//
// Included before decode.cu; compiled only when HMMA == 1 (kernels.rs decides: bf16 hot pages, no
// warm tier, at most 4 q heads per CTA, head_dim 64 or 128, pages of a multiple of 16 tokens).
// The CUDA-core hot loop it replaces is latency-bound (f32 FMAs over 16-byte loads, few warps);
// here a warp reads a 16-token chunk of its page with 16-byte loads straight into MMA fragments.
//
// Exactness. Keys and values enter the MMAs as stored. The f32 side of each product (the scaled
// query, the softmax weight p) is split into three bf16 parts x = x0 + x1 + x2 (x0, x1 truncations,
// x2 the rest, which has at most 8 significant bits): exact for normal f32. bf16 x bf16 products
// are exact in f32, so every score and output is an f32 sum of exact products, as on the CUDA-core
// path, in another order.
//
// Rows of both MMAs: 0..3 part 0 of heads 0..3, 4..7 part 1, 8..11 part 2, 12..15 zero. Lane
// (r, j) = (lane >> 2, lane & 3) holds rows r and r + 8 of C, so head r & 3 is c[e] + c[2 + e]
// here plus the same sum in lane ^ 16.
//   scores: A = q parts, B = keys (k = channels in a permuted order: each lane reads 16 contiguous
//           bytes of its token's row per pair of k-tiles; n = 8 tokens, token r in lane (r, j)).
//   values: A = p parts, taken from the score C fragment as it stands (the C layout of two n-tiles
//           is the A layout of one k-tile, as in FlashAttention-2); B = values (k = 16 tokens, n =
//           8 channels). Lane r reads channels 8 (r + 8 a) .. + 7 of its four tokens, so column r
//           of n-tile 8 a + i is channel 8 (r + 8 a) + i; PRMT pairs two tokens' halves.

#if HMMA
#define HKT (D / 16)                // score k-tiles
#define HNV (D / 8)                 // value n-tiles
#define HKW (D / 32)                // 16-byte key loads per lane per token
#define HVW (D / 64)                // 16-byte value loads per lane per token
#define HQA_BYTES (HKT * 32 * 16)   // score A fragments, [HKT][32 lanes] uint4

__device__ __forceinline__ void kvt_mma_bf16(float (&c)[4], uint4 a, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
}

// Two floats to bf16x2 (lo in the low half), round to nearest even (exact for the parts below).
__device__ __forceinline__ u32 kvt_pack_bf2(float lo, float hi) {
    u32 d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}

// x = p[0] + p[1] + p[2], each part a bf16 value.
__device__ __forceinline__ void kvt_split3(float x, float (&p)[3]) {
    p[0] = __uint_as_float(__float_as_uint(x) & 0xffff0000u);
    const float r1 = x - p[0];
    p[1] = __uint_as_float(__float_as_uint(r1) & 0xffff0000u);
    p[2] = r1 - p[1];
}

// The A operand for lane (r, j) from four f32 values of head r & 3: a.x / a.z take part r >> 2
// of (x0, x1) / (x2, x3), a.y / a.w part 2 (rows r + 8; zero rows for r >= 4).
__device__ __forceinline__ uint4 kvt_hmma_a(float x0, float x1, float x2, float x3, int r) {
    float p0[3], p1[3], p2[3], p3[3];
    kvt_split3(x0, p0);
    kvt_split3(x1, p1);
    kvt_split3(x2, p2);
    kvt_split3(x3, p3);
    const int lo = r >> 2;
    uint4 a;
    a.x = kvt_pack_bf2(lo ? p0[1] : p0[0], lo ? p1[1] : p1[0]);
    a.z = kvt_pack_bf2(lo ? p2[1] : p2[0], lo ? p3[1] : p3[0]);
    a.y = lo ? 0u : kvt_pack_bf2(p0[2], p1[2]);
    a.w = lo ? 0u : kvt_pack_bf2(p2[2], p3[2]);
    return a;
}

// Score A fragments of the CTA's queries (qsm: [D][GP] scaled queries), by one warp. k-tile
// 2 i + u, slot 2 j + e holds channel 8 (j + 4 i) + 4 u + e and slot 2 j + 8 + e channel
// 8 (j + 4 i) + 4 u + 2 + e: the words of lane j's 16-byte key load at byte 16 (j + 4 i).
__device__ __forceinline__ void kvt_fill_hqa(uint4* hqa, const float* qsm, int lane) {
    const int r = lane >> 2, j = lane & 3, h = r & 3;
#pragma unroll
    for (int kt = 0; kt < HKT; ++kt) {
        const int c0 = 8 * (j + 4 * (kt >> 1)) + 4 * (kt & 1);
        float q[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) q[e] = h < GS ? qsm[(c0 + e) * GP + h] : 0.0f;
        hqa[kt * 32 + lane] = kvt_hmma_a(q[0], q[1], q[2], q[3], r);
    }
}

// Running state of one warp over its hot pages.
struct HmmaState {
    float m[GS];        // running max per head (warp-uniform)
    float l, s1, s2;    // this lane's partial sums for head r (lanes r < GS)
    float acc[HNV][4];  // output fragments: rows (part, head), columns channels
};

// One 16-token chunk's operands as loaded: keys of tokens t0 + 8 nt + r, values of tokens
// t0 + {2j, 2j+1, 2j+8, 2j+9} (zeros past n: p = 0 must not meet whatever the slot holds there).
struct HKeys {
    uint4 k[2][HKW];
};
struct HVals {
    uint4 v[4][HVW];
};

__device__ __forceinline__ void kvt_hmma_load_k(HKeys& c, const hot_t* hk, int t0, int lane) {
    const int r = lane >> 2, j = lane & 3;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int i = 0; i < HKW; ++i)
            c.k[nt][i] = *(const uint4*)(hk + (u64)(t0 + 8 * nt + r) * D + 8 * (j + 4 * i));
}
__device__ __forceinline__ void kvt_hmma_load_v(HVals& c, const hot_t* hk, int n, int t0, int lane) {
    const int r = lane >> 2, j = lane & 3;
    const hot_t* hvp = hk + HOT_HALF_ELEMS;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const int t = t0 + 2 * j + (q & 1) + 8 * (q >> 1);
#pragma unroll
        for (int a = 0; a < HVW; ++a)
            c.v[q][a] = t < n ? *(const uint4*)(hvp + (u64)t * D + 8 * (r + 8 * a))
                              : make_uint4(0u, 0u, 0u, 0u);
    }
}

// The warp's chunk stream: (page p, tokens t0 .. t0 + 15) for p = pb, pb + NWARPS, .. < pe and
// t0 = 0, 16, .. < n (one empty chunk for a page without tokens, so its lse is still written).
struct HWalk {
    u32 p;
    int t0, n;
    const hot_t* hk;
};
__device__ __forceinline__ bool kvt_hwalk_page(HWalk& w, const uint2* list, u32 pe,
                                               const u8* hot_pool, u32 kv) {
    if (w.p >= pe) return false;
    const uint2 e = list[w.p];
    w.t0 = 0;
    w.n = (int)(e.y & 0xffffu);
    w.hk = (const hot_t*)(hot_pool + (u64)e.x * HOT_PAGE_BYTES) + (u64)kv * PS * D;
    return true;
}
__device__ __forceinline__ bool kvt_hwalk_next(HWalk& w, const uint2* list, u32 pe,
                                               const u8* hot_pool, u32 kv) {
    w.t0 += 16;
    if (w.t0 < w.n) return true;
    w.p += NWARPS;
    return kvt_hwalk_page(w, list, pe, hot_pool, kv);
}

// Folds a loaded chunk (tokens t0 .. of a page of n tokens) into st; plse accumulates the page's
// log-sum-exp for head r & 3.
__device__ __forceinline__ void kvt_hmma_chunk(HmmaState& st, const HKeys& ck, const HVals& c,
                                               int n, int t0, const uint4* hqa, float& plse,
                                               int lane) {
    const int r = lane >> 2, j = lane & 3, hh = r & 3;
    const bool hv = hh < GS, hl = r < GS;
    const int hs = hv ? hh : 0;
    // ---- Scores: lane (r, j) gets tokens t0 + 8 nt + 2j + e of head r & 3.
    float sc[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) sc[nt][e] = 0.0f;
#pragma unroll
    for (int i = 0; i < HKW; ++i) {
        const uint4 qa0 = hqa[(2 * i) * 32 + lane], qa1 = hqa[(2 * i + 1) * 32 + lane];
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
            kvt_mma_bf16(sc[nt], qa0, ck.k[nt][i].x, ck.k[nt][i].y);
            kvt_mma_bf16(sc[nt], qa1, ck.k[nt][i].z, ck.k[nt][i].w);
        }
    }
    float s[2][2];
    float mloc = -KVT_INF;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            float x = sc[nt][e] + sc[nt][2 + e];
            x += __shfl_xor_sync(KVT_FULL, x, 16);
            const bool valid = hv && t0 + 8 * nt + 2 * j + e < n;
            s[nt][e] = valid ? x : -KVT_INF;
            mloc = fmaxf(mloc, s[nt][e]);
        }
    // ---- Online softmax (statistics counted once, by lanes r < GS).
    float alpha[GS], dl[GS];
    if (kvt_quad_newmax(st.m, mloc, alpha, dl)) {  // warp-uniform
        const float ar = kvt_pick(alpha, hs), dr = kvt_pick(dl, hs);
        if (hl) {
            st.s2 = ar * (st.s2 + 2.0f * dr * st.s1 + dr * dr * st.l);
            st.s1 = ar * (st.s1 + dr * st.l);
            st.l *= ar;
        }
#pragma unroll
        for (int nv = 0; nv < HNV; ++nv)
#pragma unroll
            for (int k = 0; k < 4; ++k) st.acc[nv][k] *= ar;
    }
    const float mr = kvt_pick(st.m, hs);
    float p[2][2];
    float lsum = 0.0f, s1 = 0.0f, s2 = 0.0f;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const bool valid = s[nt][e] != -KVT_INF;
            const float x = valid ? s[nt][e] - mr : 0.0f;
            p[nt][e] = valid ? __expf(x) : 0.0f;
            lsum += p[nt][e];
            s1 = fmaf(p[nt][e], x, s1);
            s2 = fmaf(p[nt][e] * x, x, s2);
        }
    if (hl) {
        st.l += lsum;
        st.s1 += s1;
        st.s2 += s2;
    }
    lsum = kvt_quad_sum(lsum);
    plse = kvt_logaddexp(plse, lsum > 0.0f ? mr + __logf(lsum) : -KVT_INF);
    // ---- Values.
    const uint4 pa = kvt_hmma_a(p[0][0], p[0][1], p[1][0], p[1][1], r);
#pragma unroll
    for (int a = 0; a < HVW; ++a) {
        const u32 w0[4] = {c.v[0][a].x, c.v[0][a].y, c.v[0][a].z, c.v[0][a].w};
        const u32 w1[4] = {c.v[1][a].x, c.v[1][a].y, c.v[1][a].z, c.v[1][a].w};
        const u32 w8[4] = {c.v[2][a].x, c.v[2][a].y, c.v[2][a].z, c.v[2][a].w};
        const u32 w9[4] = {c.v[3][a].x, c.v[3][a].y, c.v[3][a].z, c.v[3][a].w};
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const u32 sel = (i & 1) ? 0x7632u : 0x5410u;
            kvt_mma_bf16(st.acc[8 * a + i], pa, kvt_prmt(w0[i >> 1], w1[i >> 1], sel),
                         kvt_prmt(w8[i >> 1], w9[i >> 1], sel));
        }
    }
}

// One chunk of `cur` whose keys are in kx: its values are loaded, and the next chunk's keys into
// ky (AHEAD: before the scores are computed, so both loads wait behind work; else after, and ky
// may be kx). Returns false at the end.
template <bool AHEAD, typename LseOut>
__device__ __forceinline__ bool kvt_hmma_step(HmmaState& st, HWalk& cur, HKeys& kx, HKeys& ky,
                                              float& plse, const uint2* list, u32 pe,
                                              const u8* hot_pool, u32 kv, const uint4* hqa,
                                              int lane, LseOut& lse_out) {
    HVals v;
    kvt_hmma_load_v(v, cur.hk, cur.n, cur.t0, lane);
    HWalk nx = cur;
    const bool more = kvt_hwalk_next(nx, list, pe, hot_pool, kv);
    if (AHEAD && more) kvt_hmma_load_k(ky, nx.hk, nx.t0, lane);
    kvt_hmma_chunk(st, kx, v, cur.n, cur.t0, hqa, plse, lane);
    if (!AHEAD && more) kvt_hmma_load_k(ky, nx.hk, nx.t0, lane);
    if (cur.t0 + 16 >= cur.n) {
        const float x = __shfl_sync(KVT_FULL, plse, (lane & 7) * 4);
        if (lane < GS) lse_out(cur.p, x);
        plse = -KVT_INF;
    }
    cur = nx;
    return more;
}

// All of the warp's hot pages (list positions pb, pb + NWARPS, .. < pe), chunk by chunk. Writes
// each page's lse (lanes h < GS, head h) through lse_out(p, value). At head_dim 128 the next
// chunk's keys are in flight while the current one is computed (two key buffers in turn): 4-8%
// faster on the H200, 96% of the read probe at B8 S128K. At head_dim 64 the second key buffer
// (156 registers against 128) costs the second CTA per SM and ran 10-30% slower, so chunks are
// loaded one at a time. Measured and dropped: a second value buffer too (spills at head_dim 128)
// and an L2 prefetch of the next 1 to 3 chunks (cp.async.bulk.prefetch: 4-60% slower).
template <typename LseOut>
__device__ __forceinline__ void kvt_hmma_pages(HmmaState& st, const uint2* list, u32 pb, u32 pe,
                                               const u8* hot_pool, u32 kv, const uint4* hqa,
                                               int lane, LseOut lse_out) {
    HWalk cur;
    cur.p = pb;
    if (!kvt_hwalk_page(cur, list, pe, hot_pool, kv)) return;
    float plse = -KVT_INF;
    HKeys ka;
    kvt_hmma_load_k(ka, cur.hk, cur.t0, lane);
    if constexpr (D >= 128) {
        HKeys kb;
        while (kvt_hmma_step<true>(st, cur, ka, kb, plse, list, pe, hot_pool, kv, hqa, lane, lse_out) &&
               kvt_hmma_step<true>(st, cur, kb, ka, plse, list, pe, hot_pool, kv, hqa, lane, lse_out)) {
        }
    } else {
        while (kvt_hmma_step<false>(st, cur, ka, ka, plse, list, pe, hot_pool, kv, hqa, lane, lse_out)) {
        }
    }
}

// Warp totals of `st` merged into the warp's parked partial (wst [GS][4]; wacc [GS][D]).
__device__ __forceinline__ void kvt_hmma_merge(HmmaState& st, float* wst, float* wacc, int lane) {
    const int r = lane >> 2, j = lane & 3;
    float tot[HNV][2];
#pragma unroll
    for (int nv = 0; nv < HNV; ++nv)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const float x = st.acc[nv][e] + st.acc[nv][2 + e];
            tot[nv][e] = x + __shfl_xor_sync(KVT_FULL, x, 16);
        }
    float fa[GS], fb[GS];
    kvt_park_stats(st.m, st.l, st.s1, st.s2, wst, fa, fb, lane);
    if (r < GS) {
        const float a = kvt_pick(fa, r), b = kvt_pick(fb, r);
#pragma unroll
        for (int nv = 0; nv < HNV; ++nv)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                float* o = wacc + r * D + 8 * (2 * j + e + 8 * (nv >> 3)) + (nv & 7);
                *o = a * *o + b * tot[nv][e];
            }
    }
    __syncwarp();
}
#endif
