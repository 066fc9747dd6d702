// Warm pages of the fused decode on tensor cores (mma.sync m16n8k16, f16 operands, f32 accumulate).
//
// Included before decode.cu; everything here is compiled only when MMA == 1 (kernels.rs decides:
// GS <= 4, head_dim 64 or 128, pages of 16..64 tokens in 16-token steps, 32-channel value groups).
// One warp handles one (page, kv head) for all GS heads, as on the CUDA-core path, and nothing
// dequantised is written to memory: a code field masked in place inside a 16-bit half *is* an f16
// subnormal, (code << s) * 2^-24, exactly, so one LOP3 turns two codes into an MMA operand. The
// field's power of two (16^k for int4, 4^k for int2) is folded into the other operand or into the
// final scale, and the 2^-24 into the final scale; tensor cores multiply f16 subnormals exactly.
//
// Exactness. Both products take f16 operands, so the f32 side of each product is split into a
// high part (f32 truncated to 11 significant bits, exact in f16) and the low remainder, which go to
// different MMA rows / columns and are added in f32: ~22 significant bits, close to the f32 path.
//   scores: s = q.min + sum_c (q_c step_c) code_c. A = q*step per page (rows 0..7: high parts of
//           heads 0..GS-1, rows 8..15: low parts), B = key codes (k = channels, n = 8 tokens).
//           Each page's A is scaled by a power of two S (from max|q| and the page's largest
//           step) so that it fills f16's range and its low halves stay normal; C * 2^24 / S undoes
//           it exactly. No bound on the steps a page may hold is assumed.
//   values: o = sum_t p_t vmin_t + sum_t (p_t vstep_t) code_t. A = value codes (m = 16 channels of
//           one value group, k = 16 tokens), B = p*vstep*VSCALE (columns 0..3: high parts of heads
//           0..3, columns 4..7: low parts), VSCALE a power of two that keeps p*vstep in f16.
// The channel order inside each MMA is a permutation chosen so that every lane's operands come
// from whole code words (reductions are order-free; outputs are mapped back when they are parked).
//
// Lane roles (lane = 4 r + j): in the score MMA r is the head row (A) and the token (B), j the
// quad position that owns a fixed set of D/4 channels; in the value MMA r owns a 4-channel chunk of
// every value group (A rows) and the B column r = (part, head).

#if MMA
#define NTS (PS / 8)          // score n-tiles of 8 tokens
#define KTS (D / 16)          // score k-tiles of 16 channels
#define KTV (PS / 16)         // value k-tiles of 16 tokens
#define MTV (D / 16)          // value m-tiles of 16 channels (2 per value group)
#define WPT (D * KB / 128)    // key code words per lane per token
#define RWK (16 / KB)         // f16x2 registers per key word
#define CWK (32 / KB)         // key codes per word
#define NREG (D / 8)          // key code registers per lane per token (= WPT * RWK)
#define NGV (D / 32)          // value groups per token
#define VSCALE (VB == 2 ? 1.0f : (VB == 4 ? 4.0f : 64.0f))
#define V_CODES_M (K_CODES + PS * KSTRIDE)
// Per-lane scaled query channels, shared by the CTA's warps: [NREG / 2][32 lanes] float4
// (lane-contiguous, so the per-page LDS.128 are conflict-free), then 32 floats 1 / scale.
#define QE_BYTES (NREG * 2 * 32 * 4 + 2 * 32 * 4)

// Lane-parallel walk over a warp's pages p = pb + k * NWARPS (k = 0, 1, ...): 32 list entries are
// loaded at once, one per lane, and those of the wanted tier are visited in order. Everything but
// the per-lane entry is warp-uniform.
struct PageWalk {
    u32 k0, mask, ex, ey;
};
__device__ __forceinline__ void kvt_walk_load(PageWalk& w, const uint2* list, u32 pb, u32 pe,
                                              bool want_warm, int lane) {
    const u32 p = pb + (w.k0 + lane) * NWARPS;
    uint2 e = make_uint2(0u, 0u);
    const bool in = p < pe;
    if (in) e = list[p];
    w.ex = e.x;
    w.ey = e.y;
    w.mask = __ballot_sync(KVT_FULL, in && (((e.y >> 31) != 0) == want_warm));
}
__device__ __forceinline__ void kvt_walk_init(PageWalk& w, const uint2* list, u32 pb, u32 pe,
                                              bool want_warm, int lane) {
    w.k0 = 0;
    kvt_walk_load(w, list, pb, pe, want_warm, lane);
}
// The next wanted page (its list position and entry); false at the end.
__device__ __forceinline__ bool kvt_walk_next(PageWalk& w, const uint2* list, u32 pb, u32 pe,
                                              bool want_warm, int lane, u32& p, uint2& e) {
    while (w.mask == 0) {
        w.k0 += 32;
        if (pb + w.k0 * NWARPS >= pe) return false;
        kvt_walk_load(w, list, pb, pe, want_warm, lane);
    }
    const int b = __ffs(w.mask) - 1;
    w.mask &= w.mask - 1;
    p = pb + (w.k0 + b) * NWARPS;
    e.x = __shfl_sync(KVT_FULL, w.ex, b);
    e.y = __shfl_sync(KVT_FULL, w.ey, b);
    return true;
}

__device__ __forceinline__ void kvt_mma16816(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0,
                                             u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// (a & mask) | magic
__device__ __forceinline__ u32 kvt_lop_or(u32 a, u32 mask, u32 magic) {
    u32 d;
    asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(d) : "r"(a), "r"(mask), "r"(magic));
    return d;
}
__device__ __forceinline__ u32 kvt_hsub2(u32 a, u32 b) {
    u32 d;
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}
__device__ __forceinline__ u32 kvt_hfma2(u32 a, u32 b, u32 c) {
    u32 d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
#define F16_MAGIC 0x64006400u
// Two floats that are f16 values to f16x2 (lo in the low half; exact).
__device__ __forceinline__ u32 kvt_pack2(float lo, float hi) {
    u32 d;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}
// x truncated to 11 significant bits (exact in f16 when |x| is in f16's normal range).
__device__ __forceinline__ float kvt_hi11(float x) { return __uint_as_float(__float_as_uint(x) & 0xffffe000u); }
// Half `f` of a packed array of f16 as f32.
template <int N>
__device__ __forceinline__ float kvt_half(const u32 (&w)[N], int f) {
    return kvt_h2f((u16)((f & 1) ? (w[f >> 1] >> 16) : (w[f >> 1] & 0xffffu)));
}
__device__ __forceinline__ u32 kvt_hmax2(u32 a, u32 b) {
    u32 d;
    asm("max.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}

// Field-position factor of register i of a code word (see kvt_codes_h2): the register holds
// (code * KF) * 2^-24 per half.
template <int BITS>
__host__ __device__ constexpr float kvt_field_factor(int i) {
    return BITS == 4 ? ((i & 1) ? 16.0f : 1.0f) : (BITS == 2 ? (float)(1 << (2 * (i & 3))) : 1.0f);
}

// One code word to f16x2 subnormals: r[i] = (field i, field i + 16/BITS) * factor(i) * 2^-24.
template <int BITS>
__device__ __forceinline__ void kvt_codes_h2(u32 w, u32 (&r)[16 / BITS]) {
    if constexpr (BITS == 4) {
        r[0] = w & 0x000f000fu;
        r[1] = w & 0x00f000f0u;
        const u32 w8 = w >> 8;
        r[2] = w8 & 0x000f000fu;
        r[3] = w8 & 0x00f000f0u;
    } else if constexpr (BITS == 2) {
#pragma unroll
        for (int s = 0; s < 2; ++s) {
            const u32 x = w >> (8 * s);
            r[4 * s + 0] = x & 0x00030003u;
            r[4 * s + 1] = x & 0x000c000cu;
            r[4 * s + 2] = x & 0x00300030u;
            r[4 * s + 3] = x & 0x00c000c0u;
        }
    } else {
        r[0] = kvt_prmt(w, 0u, 0x4240u);
        r[1] = kvt_prmt(w, 0u, 0x4341u);
    }
}


// Value codes of chunk `rr` (channels 4 rr .. 4 rr + 3 of a 32-channel group) for two tokens whose
// code words are w0 and w1: r[k] = (channel k of token 0, channel k of token 1) as normal f16
// integers (1024 + code, minus 1024 exactly). Unlike the keys, values stay out of the subnormal
// range: with 2-bit values the subnormal form missed the output tolerance (2.05e-5 > 2e-5).
template <int BITS>
__device__ __forceinline__ void kvt_vpair(u32 w0, u32 w1, int rr, u32 (&r)[4]) {
    if constexpr (BITS == 4) {
        const u32 x = kvt_prmt(w0, w1, (rr & 1) ? 0x7632u : 0x5410u);
        r[0] = kvt_hsub2(kvt_lop_or(x, 0x000f000fu, F16_MAGIC), F16_MAGIC);
        r[1] = kvt_hfma2(kvt_lop_or(x, 0x00f000f0u, F16_MAGIC), 0x2c002c00u, 0xd400d400u);
        const u32 x8 = x >> 8;
        r[2] = kvt_hsub2(kvt_lop_or(x8, 0x000f000fu, F16_MAGIC), F16_MAGIC);
        r[3] = kvt_hfma2(kvt_lop_or(x8, 0x00f000f0u, F16_MAGIC), 0x2c002c00u, 0xd400d400u);
    } else if constexpr (BITS == 2) {
        const u32 b = (u32)(rr & 3);
        const u32 x = kvt_prmt(w0, w1, b | (b << 4) | ((4u + b) << 8) | ((4u + b) << 12));
        r[0] = kvt_hsub2(kvt_lop_or(x, 0x00030003u, F16_MAGIC), F16_MAGIC);
        r[1] = kvt_hfma2(kvt_lop_or(x, 0x000c000cu, F16_MAGIC), 0x34003400u, 0xdc00dc00u);
        r[2] = kvt_hfma2(kvt_lop_or(x, 0x00300030u, F16_MAGIC), 0x2c002c00u, 0xd400d400u);
        r[3] = kvt_hfma2(kvt_lop_or(x, 0x00c000c0u, F16_MAGIC), 0x24002400u, 0xcc00cc00u);
    } else {
        const u32 u = kvt_prmt(w0, w1, 0x5140u), v = kvt_prmt(w0, w1, 0x7362u);
        r[0] = kvt_hsub2(kvt_prmt(u, 0x64646464u, 0x4140u), F16_MAGIC);
        r[1] = kvt_hsub2(kvt_prmt(u, 0x64646464u, 0x4342u), F16_MAGIC);
        r[2] = kvt_hsub2(kvt_prmt(v, 0x64646464u, 0x4140u), F16_MAGIC);
        r[3] = kvt_hsub2(kvt_prmt(v, 0x64646464u, 0x4342u), F16_MAGIC);
    }
}
#define TWO24 16777216.0f

// Issues the copy of one warm head block into a stage: parameters as they are, key rows at
// KSTRIDE, value rows at VSTRIDE. Trip counts are compile-time, so the loops unroll into
// predicated cp.async with immediate offsets.
__device__ __forceinline__ void kvt_stage_issue_mma(u8* stage, const u8* src, int lane) {
    constexpr int NP = K_CODES / 16, KPR = KROW / 16, NK = PS * KPR, VPR = VROW / 16, NV = PS * VPR;
#pragma unroll
    for (int k = 0; k < (NP + 31) / 32; ++k) {
        const int c = lane + 32 * k;
        if (c < NP) kvt_cp_async16(stage + 16 * c, src + 16 * c);
    }
#pragma unroll
    for (int k = 0; k < (NK + 31) / 32; ++k) {
        const int c = lane + 32 * k;
        if (c < NK) kvt_cp_async16(stage + K_CODES + (c / KPR) * KSTRIDE + 16 * (c % KPR), src + K_CODES + 16 * c);
    }
#pragma unroll
    for (int k = 0; k < (NV + 31) / 32; ++k) {
        const int c = lane + 32 * k;
        if (c < NV) kvt_cp_async16(stage + V_CODES_M + (c / VPR) * VSTRIDE + 16 * (c % VPR), src + V_CODES + 16 * c);
    }
}

// Byte offset, inside a key row, of this lane's key word `wi` (quad position j).
__device__ __forceinline__ int kvt_kword_off(int j, int wi) {
    return WPT >= 4 ? 16 * (j + 4 * (wi / 4)) + 4 * (wi % 4) : 4 * (j * WPT + wi);
}

// Running state of one warp over its warm pages.
struct MmaState {
    float m[GS];         // running max per head (warp-uniform)
    float l, s1, s2;     // this lane's partial sums for head r (lanes r < GS)
    float acc[MTV][4];   // value accumulator fragments (scaled by VSCALE)
    float accb[NGV];     // sum_t p_t vmin_t for head r & 3, this lane's tokens
};


// One warm (page, kv head) staged at `sg`, holding `n` tokens: folds it into `st` and returns, in
// lanes h < GS, the page's log-sum-exp for head h (other lanes: unspecified).
// qes: the CTA's scaled query table (QE_BYTES layout); qabs: max |q| of this lane's head (scaled). FULL: the page holds PS tokens (the usual
// case for warm pages), so no token needs masking and no parameter past n needs guarding.
template <bool FULL>
__device__ __forceinline__ float kvt_mma_page(MmaState& st, const u8* sg, int n, const float4* qes,
                                              float qinv, float qabs, int lane) {
    const int r = lane >> 2, j = lane & 3;
    // ---- A operands of the score MMA: q * step split in high / low halves; q . min.
    // Lanes r and r + 4 hold the same head (kvt_fill_qes). With two or more key words per lane,
    // the lower half-warp supplies the first half of the channels (rows 0..3 high, 8..11 low) and
    // zeros for the second, the upper half-warp the reverse (rows 4..7, 12..15): each lane's C is
    // half of the score, and one shuffle adds the halves.
    u32 ahi[NREG], alo[NREG];
    constexpr int WH = WPT >= 2 ? WPT / 2 : WPT;  // words computed per lane
    const int half = WPT >= 2 ? (lane >> 4) : 0;
    u32 hx[WH * RWK], lx[WH * RWK];
    float qm[RWK];  // q . min per field position (the table holds q / factor)
#pragma unroll
    for (int i = 0; i < RWK; ++i) qm[i] = 0.0f;
    // Per-page power of two S: max|q| * max step * S <= 2^15, so q * step / factor * S uses f16's
    // range whatever the page's steps are, and its low half stays clear of f16 subnormals.
    // (The steps are loaded again below rather than held: registers are the scarcer resource.)
    u32 smax = 0u;
#pragma unroll
    for (int wk = 0; wk < WH; ++wk) {
        const int cb = kvt_kword_off(j, half * WH + wk) * 8 / KB;
        u32 sw[CWK / 2];
        kvt_load_words<CWK / 2>(sg + K_STEP + 2 * cb, sw);
#pragma unroll
        for (int k = 0; k < CWK / 2; ++k) smax = kvt_hmax2(smax, sw[k]);
    }
    float mstep = fmaxf(kvt_h2f((u16)(smax & 0xffffu)), kvt_h2f((u16)(smax >> 16)));
    mstep = kvt_quad_max(mstep);
    if constexpr (WPT >= 2) mstep = fmaxf(mstep, __shfl_xor_sync(KVT_FULL, mstep, 16));
    const float pscale = __uint_as_float(
        __float_as_uint(32768.0f / fmaxf(qabs * mstep, 1e-30f)) & 0x7f800000u);
#pragma unroll
    for (int wk = 0; wk < WH; ++wk) {
        const int wi = half * WH + wk;
        const int cb = kvt_kword_off(j, wi) * 8 / KB;
        u32 sw[CWK / 2], mw[CWK / 2];
        kvt_load_words<CWK / 2>(sg + K_STEP + 2 * cb, sw);
        kvt_load_words<CWK / 2>(sg + K_MIN + 2 * cb, mw);
        float qw[2 * RWK];
#pragma unroll
        for (int i = 0; i < RWK; i += 2) {
            const float4 v = qes[((wi * RWK + i) / 2) * 32 + lane];
            qw[2 * i] = v.x; qw[2 * i + 1] = v.y; qw[2 * i + 2] = v.z; qw[2 * i + 3] = v.w;
        }
#pragma unroll
        for (int i = 0; i < RWK; ++i) {
            const float q0 = qw[2 * i], q1 = qw[2 * i + 1];
            const float x0 = (q0 * pscale) * kvt_half(sw, i), x1 = (q1 * pscale) * kvt_half(sw, i + RWK);
            const float h0 = kvt_hi11(x0), h1 = kvt_hi11(x1);
            hx[wk * RWK + i] = kvt_pack2(h0, h1);
            lx[wk * RWK + i] = kvt_pack2(x0 - h0, x1 - h1);
            qm[i] = fmaf(q0, kvt_half(mw, i), qm[i]);
            qm[i] = fmaf(q1, kvt_half(mw, i + RWK), qm[i]);
        }
    }
    float qmin = 0.0f;
#pragma unroll
    for (int i = 0; i < RWK; ++i) qmin = fmaf(qm[i], kvt_field_factor<KB>(i), qmin);
    if constexpr (WPT >= 2) {
        const u32 own0 = half ? 0u : ~0u;
#pragma unroll
        for (int k = 0; k < WH * RWK; ++k) {
            ahi[k] = hx[k] & own0;
            alo[k] = lx[k] & own0;
            ahi[WH * RWK + k] = hx[k] & ~own0;
            alo[WH * RWK + k] = lx[k] & ~own0;
        }
        qmin += __shfl_xor_sync(KVT_FULL, qmin, 16);
    } else {
#pragma unroll
        for (int k = 0; k < NREG; ++k) {
            ahi[k] = hx[k];
            alo[k] = lx[k];
        }
    }
    qmin = kvt_quad_sum(qmin);
    // ---- Scores: token nt * 8 + r of each n-tile in B; this lane gets tokens nt * 8 + 2j + {0,1}.
    float sc[NTS][2];
#pragma unroll
    for (int nt = 0; nt < NTS; ++nt) {
        const u8* row = sg + K_CODES + (nt * 8 + r) * KSTRIDE;
        u32 kw[WPT];
        if constexpr (WPT >= 4) {
#pragma unroll
            for (int c = 0; c < WPT / 4; ++c) {
                const uint4 v = *(const uint4*)(row + 16 * (j + 4 * c));
                kw[4 * c] = v.x; kw[4 * c + 1] = v.y; kw[4 * c + 2] = v.z; kw[4 * c + 3] = v.w;
            }
        } else {
            kvt_load_words<WPT>(row + 4 * j * WPT, kw);
        }
        u32 bk[NREG];
#pragma unroll
        for (int wi = 0; wi < WPT; ++wi) {
            u32 rg[RWK];
            kvt_codes_h2<KB>(kw[wi], rg);
#pragma unroll
            for (int i = 0; i < RWK; ++i) bk[wi * RWK + i] = rg[i];
        }
        float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int kt = 0; kt < KTS; ++kt)
            kvt_mma16816(c, ahi[2 * kt], alo[2 * kt], ahi[2 * kt + 1], alo[2 * kt + 1], bk[2 * kt], bk[2 * kt + 1]);
        sc[nt][0] = c[0] + c[2];
        sc[nt][1] = c[1] + c[3];
    }
    if constexpr (WPT >= 2) {
#pragma unroll
        for (int nt = 0; nt < NTS; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) sc[nt][e] += __shfl_xor_sync(KVT_FULL, sc[nt][e], 16);
    }
    // ---- Online softmax. Every lane holds the full scores of head r & 3; the statistics are
    // counted once, by lanes r < GS.
    const int hh = r & 3;
    const bool hv = hh < GS, hl = r < GS;
    const float cscale = TWO24 / pscale;  // exact: both powers of two
    float mloc = -KVT_INF;
#pragma unroll
    for (int nt = 0; nt < NTS; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const bool valid = hv && (FULL || nt * 8 + 2 * j + e < n);
            sc[nt][e] = valid ? fmaf(sc[nt][e], cscale, qmin) * qinv : -KVT_INF;
            mloc = fmaxf(mloc, sc[nt][e]);
        }
    float alpha[GS], dl[GS];
    const bool moved = kvt_quad_newmax(st.m, mloc, alpha, dl);
    const int hs = hv ? hh : 0;
    if (moved) {  // warp-uniform
        const float ar = kvt_pick(alpha, hs), dr = kvt_pick(dl, hs);
        if (hl) {
            st.s2 = ar * (st.s2 + 2.0f * dr * st.s1 + dr * dr * st.l);
            st.s1 = ar * (st.s1 + dr * st.l);
            st.l *= ar;
        }
#pragma unroll
        for (int g = 0; g < NGV; ++g) st.accb[g] *= ar;
        const int ha = 2 * (j & 1);
        const float aa = ha < GS ? kvt_pick(alpha, ha) : 1.0f;
        const float ab = ha + 1 < GS ? kvt_pick(alpha, ha + 1) : 1.0f;
#pragma unroll
        for (int mt = 0; mt < MTV; ++mt) {
            st.acc[mt][0] *= aa;
            st.acc[mt][1] *= ab;
            st.acc[mt][2] *= aa;
            st.acc[mt][3] *= ab;
        }
    }
    const float mr = kvt_pick(st.m, hs);
    float ps[NTS][2];
    float lsum = 0.0f, s1 = 0.0f, s2 = 0.0f;
#pragma unroll
    for (int nt = 0; nt < NTS; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const bool valid = FULL ? hv : sc[nt][e] != -KVT_INF;
            const float x = valid ? sc[nt][e] - mr : 0.0f;
            const float p = valid ? __expf(x) : 0.0f;
            ps[nt][e] = p;
            lsum += p;
            s1 = fmaf(p, x, s1);
            s2 = fmaf(p * x, x, s2);
        }
    if (hl) {
        st.l += lsum;
        st.s1 += s1;
        st.s2 += s2;
    }
    lsum = kvt_quad_sum(lsum);
    const float lse_r = lsum > 0.0f ? mr + __logf(lsum) : -KVT_INF;
    const int part = r >> 2;
    // ---- B operands of the value MMA: p * vstep for column (part, head) = (r >> 2, r & 3).
    // Lanes of part 0 compute tokens 16 kt + 2j + {0,1} (b0), lanes of part 1 tokens
    // 16 kt + 8 + 2j + {0,1} (b1), both halves of each product; one swap across lane ^ 16 gives
    // part 0 its high b1 and part 1 its low b0. The same tokens feed this lane's p * vmin sums.
    u32 bv[KTV][NGV][2];
#pragma unroll
    for (int kt = 0; kt < KTV; ++kt) {
        const int t0 = 16 * kt + 8 * part + 2 * j;
        u32 vs0[(NGV + 1) / 2], vs1[(NGV + 1) / 2], vm0[(NGV + 1) / 2], vm1[(NGV + 1) / 2];
        kvt_load_words<(NGV + 1) / 2>(sg + V_STEP + 2 * t0 * NGV, vs0);
        kvt_load_words<(NGV + 1) / 2>(sg + V_STEP + 2 * (t0 + 1) * NGV, vs1);
        kvt_load_words<(NGV + 1) / 2>(sg + V_MIN + 2 * t0 * NGV, vm0);
        kvt_load_words<(NGV + 1) / 2>(sg + V_MIN + 2 * (t0 + 1) * NGV, vm1);
        const float pa = part ? ps[2 * kt + 1][0] : ps[2 * kt][0];
        const float pb = part ? ps[2 * kt + 1][1] : ps[2 * kt][1];
        const float p0 = pa * VSCALE, p1 = pb * VSCALE;
#pragma unroll
        for (int g = 0; g < NGV; ++g) {
            // Past n the staged parameters are whatever the slot held: p = 0 must not meet NaN.
            const float x0 = FULL ? p0 * kvt_half(vs0, g) : (p0 > 0.0f ? p0 * kvt_half(vs0, g) : 0.0f);
            const float x1 = FULL ? p1 * kvt_half(vs1, g) : (p1 > 0.0f ? p1 * kvt_half(vs1, g) : 0.0f);
            const float h0 = kvt_hi11(x0), h1 = kvt_hi11(x1);
            const u32 hi = kvt_pack2(h0, h1), lo = kvt_pack2(x0 - h0, x1 - h1);
            const u32 got = __shfl_xor_sync(KVT_FULL, part ? hi : lo, 16);
            bv[kt][g][0] = part ? got : hi;  // tokens of part 0: high parts in part 0 lanes
            bv[kt][g][1] = part ? lo : got;
            if (FULL) {
                st.accb[g] = fmaf(pa, kvt_half(vm0, g), st.accb[g]);
                st.accb[g] = fmaf(pb, kvt_half(vm1, g), st.accb[g]);
            } else {
                st.accb[g] = pa > 0.0f ? fmaf(pa, kvt_half(vm0, g), st.accb[g]) : st.accb[g];
                st.accb[g] = pb > 0.0f ? fmaf(pb, kvt_half(vm1, g), st.accb[g]) : st.accb[g];
            }
        }
    }
    // ---- Values: chunk r of every group, tokens (t, t + 1) paired into f16x2.
#pragma unroll
    for (int kt = 0; kt < KTV; ++kt) {
        const int t0 = 16 * kt + 2 * j;
        const u8* vr = sg + V_CODES_M + t0 * VSTRIDE;
#pragma unroll
        for (int g = 0; g < NGV; ++g) {
            const int wo = 4 * (g * VB + (r * VB) / 8);
            const u32 w0 = *(const u32*)(vr + wo), w1 = *(const u32*)(vr + VSTRIDE + wo);
            const u32 w2 = *(const u32*)(vr + 8 * VSTRIDE + wo), w3 = *(const u32*)(vr + 9 * VSTRIDE + wo);
            u32 a01[4], a23[4];
            kvt_vpair<VB>(w0, w1, r, a01);
            kvt_vpair<VB>(w2, w3, r, a23);
#pragma unroll
            for (int u = 0; u < 2; ++u)
                kvt_mma16816(st.acc[2 * g + u], a01[2 * u], a01[2 * u + 1], a23[2 * u], a23[2 * u + 1],
                             bv[kt][g][0], bv[kt][g][1]);
        }
    }
    return __shfl_sync(KVT_FULL, lse_r, (lane & 7) * 4);
}

// Warp totals of `st` merged into the warp's parked partial (wst [GS][4] = m, l, s1, s2;
// wacc [GS][D]), which holds the hot pages' partial (or an empty one).
__device__ __forceinline__ void kvt_mma_merge(MmaState& st, float* wst, float* wacc, int lane) {
    const int r = lane >> 2, j = lane & 3;
#pragma unroll
    for (int mt = 0; mt < MTV; ++mt)
#pragma unroll
        for (int k = 0; k < 4; ++k) st.acc[mt][k] += __shfl_xor_sync(KVT_FULL, st.acc[mt][k], 2);
#pragma unroll
    for (int g = 0; g < NGV; ++g) {
        st.accb[g] += __shfl_xor_sync(KVT_FULL, st.accb[g], 1);
        st.accb[g] += __shfl_xor_sync(KVT_FULL, st.accb[g], 2);
        st.accb[g] += __shfl_xor_sync(KVT_FULL, st.accb[g], 16);
    }
    float fa[GS], fb[GS];
    kvt_park_stats(st.m, st.l, st.s1, st.s2, wst, fa, fb, lane);
    const int ha = 2 * (j & 1);
#pragma unroll
    for (int g = 0; g < NGV; ++g) {
        const float ba = __shfl_sync(KVT_FULL, st.accb[g], 4 * ha);
        const float bb = __shfl_sync(KVT_FULL, st.accb[g], 4 * (ha + 1));
        if (j < 2) {
#pragma unroll
            for (int u = 0; u < 2; ++u) {
                const int ch = 32 * g + 4 * r + 2 * u;
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    const int h = ha + (k & 1), c = ch + (k >> 1);
                    if (h < GS) {
                        float* o = wacc + h * D + c;
                        const float v = st.acc[2 * g + u][k] * (1.0f / VSCALE) + ((k & 1) ? bb : ba);
                        *o = kvt_pick(fa, h) * *o + kvt_pick(fb, h) * v;
                    }
                }
            }
        }
    }
    __syncwarp();
}

// Fills the CTA's scaled query table from qsm ([D][GP] scaled queries): lane (r, j) gets, for
// head r & 3 (zeros past GS), the channels of its key words in register order divided by their
// field factor, times a power of two per head that brings max|q| near 1 (kept in the table with
// its inverse and max|q| itself, for the per-page scale). Called by one warp.
__device__ __forceinline__ void kvt_fill_qes(float4* qes, const float* qsm, int lane) {
    const int r = (lane >> 2) & 3, j = lane & 3;  // lanes 16..31 repeat heads 0..3 (GS <= 4)
    float qe[NREG * 2];
    float qmax = 0.0f;
#pragma unroll
    for (int wi = 0; wi < WPT; ++wi) {
        const int cbw = kvt_kword_off(j, wi) * 8 / KB;
#pragma unroll
        for (int i = 0; i < RWK; ++i) {
            const int gi = wi * RWK + i;
            qe[2 * gi] = r < GS ? qsm[(cbw + i) * GP + r] : 0.0f;
            qe[2 * gi + 1] = r < GS ? qsm[(cbw + i + RWK) * GP + r] : 0.0f;
            qmax = fmaxf(qmax, fmaxf(fabsf(qe[2 * gi]), fabsf(qe[2 * gi + 1])));
            // Register i's codes arrive times its field factor (kvt_codes_h2).
            qe[2 * gi] *= 1.0f / kvt_field_factor<KB>(i);
            qe[2 * gi + 1] *= 1.0f / kvt_field_factor<KB>(i);
        }
    }
    qmax = kvt_quad_max(qmax);
    const float qs = __uint_as_float(__float_as_uint(1.0f / fmaxf(qmax, 1e-30f)) & 0x7f800000u);
#pragma unroll
    for (int k = 0; k < NREG / 2; ++k)
        qes[k * 32 + lane] = make_float4(qe[4 * k] * qs, qe[4 * k + 1] * qs, qe[4 * k + 2] * qs, qe[4 * k + 3] * qs);
    ((float*)(qes + NREG / 2 * 32))[lane] = 1.0f / qs;
    ((float*)(qes + NREG / 2 * 32))[32 + lane] = qmax * qs;
}
#endif
