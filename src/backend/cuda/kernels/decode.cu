// Fused split-K decode attention over hot and warm pages, with the fused statistics and the
// combine step done by the last CTA of each (sequence, kv head, head subgroup).
//
// Work item (one CTA): (sequence, kv head, subgroup of GS q heads, page range). The CTA's NWARPS
// warps take the range's pages round-robin; a warp loads each page once for all GS heads.
// Warm pages are staged into warp-private shared memory with cp.async (double-buffered, the next
// page is in flight while the current one is computed); hot pages are read straight from global
// memory. Nothing dequantised is ever written to memory: codes become floats in registers.
//
// Scores (lane = token of a 32-token block):
//   warm: s = qm' + sum_c qsF[c] * F(code), F = 1 + code * 2^-KB in [1, 2) built from the code's
//         bits (two integer ops, no int->float conversion), qsF = 2^KB * q*step and
//         qm' = sum_c q*min - qsF, so that s = q.min + (q*step).code exactly as on the CPU.
//   hot:  s = sum_c q[c] * k[c].
// Values (lane = (token phase tq, channel block cb of CPL channels)):
//   warm: acc += e * vsF * F(code) and accb += e * (vmin - vsF), vsF = 2^VB * vstep, which sums to
//         e * (vmin + vstep * code).
//   hot:  acc += e * v.
// Online softmax per head with m (running max), l = sum e, s1 = sum e x, s2 = sum e x^2 (x = s - m),
// exactly the algebra of `attention::OnlineSoftmax`. Per page: lse_p = log sum_page exp(s), written
// to page_lse; the host derives the page's attention mass exp(lse_p - log Z) from it
// (`Attention::finish_masses`).
//
// Page lists: item `it` reads entries page_off + [page_begin, page_end) of `pages`. Without a page
// selection every kv head of a sequence shares one list (the sequence's pages in order) and
// page_lse rows are [entry][QH] (lse_stride = QH, lse_kvcol = GFULL); with a selection each
// (sequence, kv head) has its own list of selected pages and rows are [entry][GFULL]
// (lse_stride = GFULL, lse_kvcol = 0). Either way head h0 + j of the item writes column
// kv * lse_kvcol + sub * GS + j.

#define LT (D / CPL)
#define TQ (32 / LT)
// KSTRIDE / VSTRIDE (staged code row strides) come from kernels.rs.
#define V_CODES_S (K_CODES + PS * KSTRIDE)
// Key outlier channels (NOUT > 0): the head block's [indices | values] part, staged after the codes.
#define OUT_S ((V_CODES_S + PS * VSTRIDE + 15) / 16 * 16)
#define OUT_BYTES ((NOUT) > 0 ? HEAD_BYTES - OUT_IDX : 0)
#define STAGE_BYTES ((WARM) ? (OUT_S + OUT_BYTES) : 0)
#define QSM_BYTES (D * GP * 4)
// Per warp: [head | softmax weights ew | 2 stages]. The head is the park area (statistics and
// output of the warp, GS * (4 + D) floats) on the tensor-core path, and q * step ([D][GP] floats,
// overlapped by the park area once the pages are done) on the CUDA-core path.
#define PARK_BYTES (GS * 4 * 4 + GS * D * 4)
#define WHEAD_BYTES ((MMA) ? PARK_BYTES : D * GP * 4)
#define WARP_BYTES (WHEAD_BYTES + 32 * GP * 4 + NSTAGE * STAGE_BYTES)
// The warps' areas follow the scaled queries (and, with MMA, the lane query table).
#if MMA
#define WARPS_OFF (QSM_BYTES + QE_BYTES)
#elif HMMA
#define WARPS_OFF (QSM_BYTES + HQA_BYTES)
#else
#define WARPS_OFF QSM_BYTES
#endif
#define NT (NWARPS * 32)
#define MAXSPLIT 256

// Mirrors `plan::Item`. n_pages: entries in the item's list (informational).
struct Item {
    u32 seq, kv, sub, page_begin, page_end, page_off, n_pages, group, first_item, n_items;
};

__device__ __forceinline__ float kvt_warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(KVT_FULL, v, o));
    return v;
}
__device__ __forceinline__ float kvt_warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(KVT_FULL, v, o);
    return v;
}

// 1 + code * 2^-BITS, where code is field `i` (BITS wide) of `w`.
template <int BITS, int I>
__device__ __forceinline__ float kvt_code_f(u32 w) {
    constexpr int sh = 23 - BITS - I * BITS;
    const u32 x = sh >= 0 ? (w << (sh >= 0 ? sh : 0)) : (w >> (sh < 0 ? -sh : 0));
    return __uint_as_float((x & (((1u << BITS) - 1u) << (23 - BITS))) | 0x3f800000u);
}

// Issues the copy of one warm head block into a stage, padding K code rows to KSTRIDE.
__device__ __forceinline__ void kvt_stage_issue(u8* stage, const u8* src, int lane) {
#if WARM
    for (u32 o = lane * 16; o < HEAD_BYTES; o += 32 * 16) {
        u32 dst;
        if (NOUT > 0 && o >= OUT_IDX) {
            dst = OUT_S + (o - OUT_IDX);
        } else if (o < K_CODES) {
            dst = o;
        } else if (o < K_CODES + PS * KROW) {
            const u32 rel = o - K_CODES;
            dst = K_CODES + (rel / KROW) * KSTRIDE + rel % KROW;
        } else if (o < V_CODES || o - V_CODES >= PS * VROW) {
            continue;
        } else {
            const u32 rel = o - V_CODES;
            dst = V_CODES_S + (VSTRIDE == VROW ? rel : (rel / VROW) * VSTRIDE + rel % VROW);
        }
        kvt_cp_async16(stage + dst, src + o);
    }
#endif
}

// Fields of 32-bit words to floats in [1, 2): CW codes of BITS bits per word.
template <int BITS, int NW>
__device__ __forceinline__ void kvt_unpack_f(const u32 (&w)[NW], float (&f)[NW * (32 / BITS)]) {
#pragma unroll
    for (int j = 0; j < NW; ++j) {
        if constexpr (BITS == 8) {
            f[j * 4 + 0] = kvt_code_f<8, 0>(w[j]);
            f[j * 4 + 1] = kvt_code_f<8, 1>(w[j]);
            f[j * 4 + 2] = kvt_code_f<8, 2>(w[j]);
            f[j * 4 + 3] = kvt_code_f<8, 3>(w[j]);
        } else if constexpr (BITS == 4) {
            f[j * 8 + 0] = kvt_code_f<4, 0>(w[j]);
            f[j * 8 + 1] = kvt_code_f<4, 1>(w[j]);
            f[j * 8 + 2] = kvt_code_f<4, 2>(w[j]);
            f[j * 8 + 3] = kvt_code_f<4, 3>(w[j]);
            f[j * 8 + 4] = kvt_code_f<4, 4>(w[j]);
            f[j * 8 + 5] = kvt_code_f<4, 5>(w[j]);
            f[j * 8 + 6] = kvt_code_f<4, 6>(w[j]);
            f[j * 8 + 7] = kvt_code_f<4, 7>(w[j]);
        } else {
            f[j * 16 + 0] = kvt_code_f<2, 0>(w[j]);
            f[j * 16 + 1] = kvt_code_f<2, 1>(w[j]);
            f[j * 16 + 2] = kvt_code_f<2, 2>(w[j]);
            f[j * 16 + 3] = kvt_code_f<2, 3>(w[j]);
            f[j * 16 + 4] = kvt_code_f<2, 4>(w[j]);
            f[j * 16 + 5] = kvt_code_f<2, 5>(w[j]);
            f[j * 16 + 6] = kvt_code_f<2, 6>(w[j]);
            f[j * 16 + 7] = kvt_code_f<2, 7>(w[j]);
            f[j * 16 + 8] = kvt_code_f<2, 8>(w[j]);
            f[j * 16 + 9] = kvt_code_f<2, 9>(w[j]);
            f[j * 16 + 10] = kvt_code_f<2, 10>(w[j]);
            f[j * 16 + 11] = kvt_code_f<2, 11>(w[j]);
            f[j * 16 + 12] = kvt_code_f<2, 12>(w[j]);
            f[j * 16 + 13] = kvt_code_f<2, 13>(w[j]);
            f[j * 16 + 14] = kvt_code_f<2, 14>(w[j]);
            f[j * 16 + 15] = kvt_code_f<2, 15>(w[j]);
        }
    }
}

// EV hot elements (16 bytes worth) at p to floats.
#if HOT == 0
#define EV 4
__device__ __forceinline__ void kvt_hot_vec(const hot_t* p, float (&f)[EV]) {
    const float4 v = *(const float4*)p;
    f[0] = v.x; f[1] = v.y; f[2] = v.z; f[3] = v.w;
}
#else
#define EV 8
__device__ __forceinline__ void kvt_hot_vec(const hot_t* p, float (&f)[EV]) {
    const uint4 v = *(const uint4*)p;
    const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = kvt_hot_load((u16)(w[i] & 0xffffu));
        f[2 * i + 1] = kvt_hot_load((u16)(w[i] >> 16));
    }
}
#endif

// Tokens per lane per 32-token block, and 16-byte chunks per lane row, in the hot value phase.
#define HTPL ((32 + TQ - 1) / TQ)
#define HVCH (CPL / EV)

#if HOT == 0
__device__ __forceinline__ void kvt_hot_unpack(uint4 v, float (&f)[EV]) {
    f[0] = __uint_as_float(v.x); f[1] = __uint_as_float(v.y);
    f[2] = __uint_as_float(v.z); f[3] = __uint_as_float(v.w);
}
#else
__device__ __forceinline__ void kvt_hot_unpack(uint4 v, float (&f)[EV]) {
    const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = kvt_hot_load((u16)(w[i] & 0xffffu));
        f[2 * i + 1] = kvt_hot_load((u16)(w[i] >> 16));
    }
}
#endif

// Per-warp running state.
struct WarpState {
    float m[GS], l[GS], s1[GS], s2[GS];
    float acc[GS][CPL];
    float accb[GS];
};

// Softmax update for one 32-token block: `s` holds this lane's token scores (or -inf), writes
// e to `ew[lane]`, rescales the accumulators when the running max moves, accumulates the block's
// log-sum-exp into `lse`.
__device__ __forceinline__ void kvt_softmax_block(WarpState& st, float (&s)[GS], bool valid,
                                                  float* ew, int lane, float (&lse)[GS]) {
#pragma unroll
    for (int h = 0; h < GS; ++h) {
        const float mb = kvt_warp_max(s[h]);
        const float mn = fmaxf(st.m[h], mb);
        if (mn > st.m[h]) {
            float alpha = 0.0f;
            if (st.m[h] != -KVT_INF) {
                const float d = st.m[h] - mn;
                alpha = __expf(d);
                st.s2[h] = alpha * (st.s2[h] + 2.0f * d * st.s1[h] + d * d * st.l[h]);
                st.s1[h] = alpha * (st.s1[h] + d * st.l[h]);
                st.l[h] *= alpha;
            }
#pragma unroll
            for (int c = 0; c < CPL; ++c) st.acc[h][c] *= alpha;
            st.accb[h] *= alpha;
            st.m[h] = mn;
        }
        const float x = valid ? s[h] - mn : 0.0f;
        const float e = valid ? __expf(x) : 0.0f;
        st.l[h] += e;
        st.s1[h] = fmaf(e, x, st.s1[h]);
        st.s2[h] = fmaf(e * x, x, st.s2[h]);
        const float lb = kvt_warp_sum(e);
        lse[h] = kvt_logaddexp(lse[h], mn + __logf(lb));
        ew[lane * GP + h] = e;
    }
}

// In-place Walsh-Hadamard butterflies, by the whole CTA, over the channel index c of H vectors
// whose element (c, h) sits at x[c * CS + h * HS], in blocks of RB channels: the same f32
// operations in the same order as the host's `Rotator` (and so the same bits). Starts and ends
// with a barrier.
template <int H, int CS, int HS>
__device__ __forceinline__ void kvt_fwht(float* x, int tid) {
    constexpr int N = D * H, PER = (N + NT - 1) / NT;
    __syncthreads();
    for (u32 hb = 1; hb < RB; hb <<= 1) {
        float nv[PER];
#pragma unroll
        for (int j = 0; j < PER; ++j) {
            const int i = tid + j * NT;
            if (i < N) {
                const int c = i / H, h = i % H;
                const float mine = x[c * CS + h * HS], other = x[(c ^ hb) * CS + h * HS];
                // Pair (i, i + hb), i with bit hb clear: i <- x_i + x_{i+hb}, i + hb <- x_i - x_{i+hb}.
                nv[j] = (c & hb) ? __fsub_rn(other, mine) : __fadd_rn(mine, other);
            }
        }
        __syncthreads();
#pragma unroll
        for (int j = 0; j < PER; ++j) {
            const int i = tid + j * NT;
            if (i < N) x[(i / H) * CS + (i % H) * HS] = nv[j];
        }
        __syncthreads();
    }
}

// `rot_flags` bit 0: the queries are in model space; rotate them into the cache's key basis on
// load (x <- H (s . x) * norm, `rot_signs` = s). Bit 1: the values are rotated; rotate the output
// back before it is stored (x <- s * norm * (H x)). Fused here so a rotated cache's decode is one
// launch, as an unrotated one's.
extern "C" __global__ void __launch_bounds__(NT, MINB)
kvt_decode(const Item* __restrict__ items, const uint2* __restrict__ pages,
           const float* __restrict__ queries, const u8* __restrict__ hot_pool,
           const u8* __restrict__ warm_pool, float* __restrict__ part_state,
           float* __restrict__ part_acc, float* __restrict__ page_lse,
           u32* __restrict__ counters, float* __restrict__ out, float* __restrict__ stats,
           float scale, u32 lse_stride, u32 lse_kvcol, const float* __restrict__ rot_signs,
           float rot_norm, u32 rot_flags) {
    extern __shared__ __align__(16) u8 smem[];
    __shared__ int is_last;
    __shared__ float cstat[GS][4];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const Item it = items[blockIdx.x];
    const u32 h0 = it.kv * GFULL + it.sub * GS;  // first q head of this CTA
    const float* qg = queries + ((u64)it.seq * QH + h0) * D;

    float* qsm = (float*)smem;  // [D][GP] scaled queries (hot pages)
    u8* wb = smem + WARPS_OFF + warp * WARP_BYTES;
    float* qsf = (float*)wb;          // [D][GP] 2^KB * q * kstep of the current warm page
    float* ew = (float*)(wb + WHEAD_BYTES);  // [32][GP] softmax weights of the current block
    u8* stages = (u8*)(ew + 32 * GP); // 2 x STAGE_BYTES

    float qr[D / 32][GS];
    if (rot_flags & 1u) {
        for (int i = tid; i < D * GP; i += NT) {
            const int c = i / GP, h = i % GP;
            qsm[i] = h < GS ? __fmul_rn(qg[h * D + c], rot_signs[c]) : 0.0f;
        }
        kvt_fwht<GS, GP, 1>(qsm, tid);
        for (int i = tid; i < D * GP; i += NT) qsm[i] = __fmul_rn(__fmul_rn(qsm[i], rot_norm), scale);
        __syncthreads();
#pragma unroll
        for (int k = 0; k < D / 32; ++k)
#pragma unroll
            for (int h = 0; h < GS; ++h) qr[k][h] = qsm[(lane + 32 * k) * GP + h];
    } else {
        for (int i = tid; i < D * GP; i += NT) {
            const int c = i / GP, h = i % GP;
            qsm[i] = h < GS ? qg[h * D + c] * scale : 0.0f;
        }
#pragma unroll
        for (int k = 0; k < D / 32; ++k)
#pragma unroll
            for (int h = 0; h < GS; ++h) qr[k][h] = qg[h * D + lane + 32 * k] * scale;
    }
    __syncthreads();
#if MMA
    float4* qes = (float4*)(smem + QSM_BYTES);
    if (warp == 0) kvt_fill_qes(qes, qsm, lane);
    __syncthreads();
#endif
#if HMMA
    uint4* hqa = (uint4*)(smem + QSM_BYTES);
    if (warp == 0) kvt_fill_hqa(hqa, qsm, lane);
    __syncthreads();
#endif

    WarpState st;
#pragma unroll
    for (int h = 0; h < GS; ++h) {
        st.m[h] = -KVT_INF;
        st.l[h] = 0.0f;
        st.s1[h] = 0.0f;
        st.s2[h] = 0.0f;
        st.accb[h] = 0.0f;
#pragma unroll
        for (int c = 0; c < CPL; ++c) st.acc[h][c] = 0.0f;
    }
    const int tq = lane / LT, cb = lane % LT;
    const bool vlane = tq < TQ;
    const int c0 = cb * CPL;
    const int grp = c0 / VG;

    const u32 pb = it.page_begin + warp, pe = it.page_end;
    int sidx = 0;
    // With MMA this loop takes the hot pages only; warm pages follow on tensor cores.
    if (WARM && !MMA && pb < pe) {
        const uint2 e = pages[it.page_off + pb];
        if (e.y >> 31)
            kvt_stage_issue(stages, warm_pool + (u64)e.x * WARM_PAGE_BYTES + (u64)it.kv * HEAD_BYTES, lane);
    }
    kvt_cp_commit();
#if MMA
    PageWalk hw;
    kvt_walk_init(hw, pages + it.page_off, pb, pe, false, lane);
    u32 p;
    uint2 e;
    while (kvt_walk_next(hw, pages + it.page_off, pb, pe, false, lane, p, e)) {
#else
    // With HMMA hot pages run on tensor cores below instead.
    for (u32 p = pb; !HMMA && p < pe; p += NWARPS) {
        const uint2 e = pages[it.page_off + p];
#endif
        const u32 pn = p + NWARPS;
        if (WARM && !MMA && pn < pe) {
            const uint2 en = pages[it.page_off + pn];
            if (en.y >> 31)
                kvt_stage_issue(stages + (sidx ^ 1) * STAGE_BYTES,
                                warm_pool + (u64)en.x * WARM_PAGE_BYTES + (u64)it.kv * HEAD_BYTES, lane);
        }
        kvt_cp_commit();
        kvt_cp_wait<1>();
        __syncwarp();
        const bool warm = (e.y >> 31) != 0;
        const int n = (int)(e.y & 0xffffu);
        if (MMA && warm) continue;
        float lse[GS];
#pragma unroll
        for (int h = 0; h < GS; ++h) lse[h] = -KVT_INF;

        if (WARM && !MMA && warm) {
#if WARM && !MMA
            const u8* sg = stages + sidx * STAGE_BYTES;
            // Per page: qsF and qm'.
            const u16* kmin = (const u16*)(sg + K_MIN);
            const u16* kstep = (const u16*)(sg + K_STEP);
            float qm[GS];
#pragma unroll
            for (int h = 0; h < GS; ++h) qm[h] = 0.0f;
#pragma unroll
            for (int k = 0; k < D / 32; ++k) {
                const int c = lane + 32 * k;
                const float mn = kvt_h2f(kmin[c]);
                const float sf = kvt_h2f(kstep[c]) * (float)(1u << KB);
#pragma unroll
                for (int h = 0; h < GS; ++h) {
                    const float qs = qr[k][h] * sf;
                    qsf[c * GP + h] = qs;
                    qm[h] += qr[k][h] * mn - qs;
                }
            }
#pragma unroll
            for (int h = 0; h < GS; ++h) qm[h] = kvt_warp_sum(qm[h]);
            __syncwarp();
            const u16* vminp = (const u16*)(sg + V_MIN);
            const u16* vstepp = (const u16*)(sg + V_STEP);
            for (int b0 = 0; b0 < n; b0 += 32) {
                const int t = b0 + lane;
                const bool valid = t < n;
                float s[GS];
#pragma unroll
                for (int h = 0; h < GS; ++h) s[h] = qm[h];
                if (valid) {
                    const u8* kr = sg + K_CODES + t * KSTRIDE;
#if KB == 3
                    // Two planes (quant::pack): word wi of the 2-bit plane holds the low bits of
                    // channels 16 wi .. 16 wi + 15, 16 bits of the 1-bit plane their high bits.
#pragma unroll
                    for (int wi = 0; wi < D / 16; ++wi) {
                        const u32 lo = *(const u32*)(kr + 4 * wi);
                        const u32 hb = *(const u16*)(kr + D / 4 + 2 * wi);
#pragma unroll
                        for (int j = 0; j < 16; ++j) {
                            const u32 code = ((lo >> (2 * j)) & 3u) | (((hb >> j) & 1u) << 2);
                            const float fj = __uint_as_float(0x3f800000u | (code << 20));
                            const float* qp = qsf + (wi * 16 + j) * GP;
#pragma unroll
                            for (int hq = 0; hq < GP; hq += 4) {
                                const float4 qv = *(const float4*)(qp + hq);
                                if (hq + 0 < GS) s[hq + 0] = fmaf(qv.x, fj, s[hq + 0]);
                                if (hq + 1 < GS) s[hq + 1] = fmaf(qv.y, fj, s[hq + 1]);
                                if (hq + 2 < GS) s[hq + 2] = fmaf(qv.z, fj, s[hq + 2]);
                                if (hq + 3 < GS) s[hq + 3] = fmaf(qv.w, fj, s[hq + 3]);
                            }
                        }
                    }
#else
                    constexpr int CHW = (KROW / 4) % 4 == 0 ? 4 : ((KROW / 4) % 2 == 0 ? 2 : 1);
#pragma unroll
                    for (int wi = 0; wi < KROW / 4; wi += CHW) {
                        u32 w[CHW];
                        kvt_load_words<CHW>(kr + 4 * wi, w);
                        float f[CHW * (32 / KB)];
                        kvt_unpack_f<KB, CHW>(w, f);
#pragma unroll
                        for (int j = 0; j < CHW * (32 / KB); ++j) {
                            const float* qp = qsf + (wi * (32 / KB) + j) * GP;
#pragma unroll
                            for (int hq = 0; hq < GP; hq += 4) {
                                const float4 qv = *(const float4*)(qp + hq);
                                if (hq + 0 < GS) s[hq + 0] = fmaf(qv.x, f[j], s[hq + 0]);
                                if (hq + 1 < GS) s[hq + 1] = fmaf(qv.y, f[j], s[hq + 1]);
                                if (hq + 2 < GS) s[hq + 2] = fmaf(qv.z, f[j], s[hq + 2]);
                                if (hq + 3 < GS) s[hq + 3] = fmaf(qv.w, f[j], s[hq + 3]);
                            }
                        }
                    }
#endif
#if NOUT > 0
                    // Outlier channels: their codes are 0 with step 0; add q . k exactly.
                    const u16* oidx = (const u16*)(sg + OUT_S);
                    const u16* oval = (const u16*)(sg + OUT_S + (OUT_VAL - OUT_IDX));
#pragma unroll
                    for (int o = 0; o < NOUT; ++o) {
                        const u32 c = oidx[o];
                        if (c >= D) continue;  // import refuses such pages; never read past qsm
                        const float kx = kvt_h2f(oval[t * NOUT + o]);
#pragma unroll
                        for (int h = 0; h < GS; ++h) s[h] = fmaf(qsm[c * GP + h], kx, s[h]);
                    }
#endif
                } else {
#pragma unroll
                    for (int h = 0; h < GS; ++h) s[h] = -KVT_INF;
                }
                kvt_softmax_block(st, s, valid, ew, lane, lse);
                __syncwarp();
                if (vlane) {
                    const int tend = min(n, b0 + 32);
                    for (int tt = b0 + tq; tt < tend; tt += TQ) {
                        const float* ep = ew + (tt - b0) * GP;
                        float ev[GS];
#pragma unroll
                        for (int h = 0; h < GS; ++h) ev[h] = ep[h];
                        const float vmn = kvt_h2f(vminp[tt * NG + grp]);
                        const float vsf = kvt_h2f(vstepp[tt * NG + grp]) * (float)(1u << VB);
                        const float u = vmn - vsf;
#if VB == 3
                        // CPL == 16: one word of the 2-bit plane, 16 bits of the 1-bit plane.
                        const u8* vr = sg + V_CODES_S + tt * VSTRIDE;
                        const u32 vlo = *(const u32*)(vr + c0 / 4);
                        const u32 vhb = *(const u16*)(vr + D / 4 + c0 / 8);
                        float f[16];
#pragma unroll
                        for (int c = 0; c < 16; ++c) {
                            const u32 code = ((vlo >> (2 * c)) & 3u) | (((vhb >> c) & 1u) << 2);
                            f[c] = __uint_as_float(0x3f800000u | (code << 20));
                        }
#else
                        constexpr int VW = CPL * VB / 32;  // words per lane row chunk
                        u32 w[VW];
                        kvt_load_words<VW>(sg + V_CODES_S + tt * VSTRIDE + c0 * VB / 8, w);
                        float f[VW * (32 / VB)];
                        kvt_unpack_f<VB, VW>(w, f);
#endif
#pragma unroll
                        for (int h = 0; h < GS; ++h) {
                            const float wgt = ev[h] * vsf;
                            st.accb[h] = fmaf(ev[h], u, st.accb[h]);
#pragma unroll
                            for (int c = 0; c < CPL; ++c) st.acc[h][c] = fmaf(wgt, f[c], st.acc[h][c]);
                        }
                    }
                }
                __syncwarp();
            }
#endif
        } else {
            const hot_t* hk = (const hot_t*)(hot_pool + (u64)e.x * HOT_PAGE_BYTES) + (u64)it.kv * PS * D;
            const hot_t* hv = hk + HOT_HALF_ELEMS;
            for (int b0 = 0; b0 < n; b0 += 32) {
                const int t = b0 + lane;
                const bool valid = t < n;
                const int tend = min(n, b0 + 32);
                // Issue this block's value loads first: their latency hides behind the scores.
                // (Hot-only modules; with a warm tier hot pages are few and registers scarce.)
                uint4 vraw[HTPL][HVCH];
#pragma unroll
                for (int k = 0; k < (WARM ? 0 : HTPL); ++k) {
                    const int tt = b0 + tq + k * TQ;
#pragma unroll
                    for (int j = 0; j < HVCH; ++j)
                        vraw[k][j] = (vlane && tt < tend)
                                         ? *(const uint4*)(hv + (u64)tt * D + c0 + j * EV)
                                         : make_uint4(0u, 0u, 0u, 0u);
                }
                float s[GS];
#pragma unroll
                for (int h = 0; h < GS; ++h) s[h] = valid ? 0.0f : -KVT_INF;
                if (valid) {
                    const hot_t* kr = hk + (u64)t * D;
#pragma unroll
                    for (int c = 0; c < D; c += EV) {
                        float kf[EV];
                        kvt_hot_vec(kr + c, kf);
#pragma unroll
                        for (int j = 0; j < EV; ++j) {
                            const float* qp = qsm + (c + j) * GP;
#pragma unroll
                            for (int hq = 0; hq < GP; hq += 4) {
                                const float4 qv = *(const float4*)(qp + hq);
                                if (hq + 0 < GS) s[hq + 0] = fmaf(qv.x, kf[j], s[hq + 0]);
                                if (hq + 1 < GS) s[hq + 1] = fmaf(qv.y, kf[j], s[hq + 1]);
                                if (hq + 2 < GS) s[hq + 2] = fmaf(qv.z, kf[j], s[hq + 2]);
                                if (hq + 3 < GS) s[hq + 3] = fmaf(qv.w, kf[j], s[hq + 3]);
                            }
                        }
                    }
                }
                kvt_softmax_block(st, s, valid, ew, lane, lse);
                __syncwarp();
                if (vlane && !WARM) {
#pragma unroll
                    for (int k = 0; k < HTPL; ++k) {
                        const int tt = b0 + tq + k * TQ;
                        if (tt < tend) {
                            const float* ep = ew + (tt - b0) * GP;
                            float ev[GS];
#pragma unroll
                            for (int h = 0; h < GS; ++h) ev[h] = ep[h];
#pragma unroll
                            for (int jc = 0; jc < HVCH; ++jc) {
                                float vf[EV];
                                kvt_hot_unpack(vraw[k][jc], vf);
#pragma unroll
                                for (int h = 0; h < GS; ++h)
#pragma unroll
                                    for (int j = 0; j < EV; ++j)
                                        st.acc[h][jc * EV + j] =
                                            fmaf(ev[h], vf[j], st.acc[h][jc * EV + j]);
                            }
                        }
                    }
                } else if (vlane) {
                    for (int tt = b0 + tq; tt < tend; tt += TQ) {
                        const float* ep = ew + (tt - b0) * GP;
                        float ev[GS];
#pragma unroll
                        for (int h = 0; h < GS; ++h) ev[h] = ep[h];
                        const hot_t* vr = hv + (u64)tt * D + c0;
#pragma unroll
                        for (int c = 0; c < CPL; c += EV) {
                            float vf[EV];
                            kvt_hot_vec(vr + c, vf);
#pragma unroll
                            for (int h = 0; h < GS; ++h)
#pragma unroll
                                for (int j = 0; j < EV; ++j)
                                    st.acc[h][c + j] = fmaf(ev[h], vf[j], st.acc[h][c + j]);
                        }
                    }
                }
                __syncwarp();
            }
        }
        if (lane < GS) {
            float v = lse[0];
#pragma unroll
            for (int h = 1; h < GS; ++h)
                if (lane == h) v = lse[h];
            page_lse[((u64)it.page_off + p) * lse_stride + it.kv * lse_kvcol + it.sub * GS + lane] = v;
        }
        sidx ^= 1;
        __syncwarp();
    }
    kvt_cp_wait<0>();

    // Warp totals: l, s1, s2 over lanes; acc over token phases (lanes with equal cb).
#pragma unroll
    for (int h = 0; h < GS; ++h) {
        st.l[h] = kvt_warp_sum(st.l[h]);
        st.s1[h] = kvt_warp_sum(st.s1[h]);
        st.s2[h] = kvt_warp_sum(st.s2[h]);
#pragma unroll
        for (int c = 0; c < CPL; ++c) {
            float v = vlane ? st.acc[h][c] + st.accb[h] : 0.0f;
            float tot = v;
            for (int k = 1; k < TQ; ++k) tot += __shfl_sync(KVT_FULL, v, cb + k * LT);
            st.acc[h][c] = tot;
        }
    }
    // Each warp parks its state in its own area (done with qsf / ew / stages).
    float* wst = (float*)wb;     // [GS][4]
    float* wacc = wst + GS * 4;  // [GS][D]
    __syncwarp();
    if (lane == 0) {
#pragma unroll
        for (int h = 0; h < GS; ++h) {
            wst[h * 4 + 0] = st.m[h];
            wst[h * 4 + 1] = st.l[h];
            wst[h * 4 + 2] = st.s1[h];
            wst[h * 4 + 3] = st.s2[h];
        }
    }
    if (tq == 0) {
#pragma unroll
        for (int h = 0; h < GS; ++h)
#pragma unroll
            for (int c = 0; c < CPL; ++c) wacc[h * D + c0 + c] = st.acc[h][c];
    }
#if MMA
    {
        // Warm pages on tensor cores, merged into the parked hot partial. NSTAGE-deep cp.async
        // ring: pages k + 1 .. k + NSTAGE - 1 are in flight while page k is computed; the ring's
        // (list position, tokens) live in the warp's ew area (free after the hot pages).
        const float qinv = ((const float*)(qes + NREG / 2 * 32))[lane];
        const float qabs = ((const float*)(qes + NREG / 2 * 32))[32 + lane];
        MmaState ms;
#pragma unroll
        for (int h = 0; h < GS; ++h) ms.m[h] = -KVT_INF;
        ms.l = 0.0f;
        ms.s1 = 0.0f;
        ms.s2 = 0.0f;
#pragma unroll
        for (int mt = 0; mt < MTV; ++mt)
#pragma unroll
            for (int k = 0; k < 4; ++k) ms.acc[mt][k] = 0.0f;
#pragma unroll
        for (int g = 0; g < NGV; ++g) ms.accb[g] = 0.0f;
        u32* ring = (u32*)ew;  // [NSTAGE][2]: list position (or ~0 when empty), tokens
        const uint2* list = pages + it.page_off;
        const u8* wsrc = warm_pool + (u64)it.kv * HEAD_BYTES;
        PageWalk ww;
        kvt_walk_init(ww, list, pb, pe, true, lane);
        __syncwarp();
#pragma unroll
        for (int s = 0; s < NSTAGE - 1; ++s) {
            u32 pp;
            uint2 ee;
            const bool got = kvt_walk_next(ww, list, pb, pe, true, lane, pp, ee);
            if (got) kvt_stage_issue_mma(stages + s * STAGE_BYTES, wsrc + (u64)ee.x * WARM_PAGE_BYTES, lane);
            if (lane == 0) {
                ring[2 * s] = got ? pp : ~0u;
                ring[2 * s + 1] = ee.y & 0xffffu;
            }
            kvt_cp_commit();
        }
        __syncwarp();
        int head = 0;
        while (ring[2 * head] != ~0u) {
            const u32 pcur = ring[2 * head];
            const int ncur = (int)ring[2 * head + 1];
            const int ns = head == 0 ? NSTAGE - 1 : head - 1;  // (head + NSTAGE - 1) % NSTAGE
            u32 pp;
            uint2 ee;
            const bool got = kvt_walk_next(ww, list, pb, pe, true, lane, pp, ee);
            if (got) kvt_stage_issue_mma(stages + ns * STAGE_BYTES, wsrc + (u64)ee.x * WARM_PAGE_BYTES, lane);
            kvt_cp_commit();
            kvt_cp_wait<NSTAGE - 1>();
            __syncwarp();
            const float lse = ncur == PS
                                  ? kvt_mma_page<true>(ms, stages + head * STAGE_BYTES, ncur, qes, qinv, qabs, lane)
                                  : kvt_mma_page<false>(ms, stages + head * STAGE_BYTES, ncur, qes, qinv, qabs, lane);
            if (lane < GS)
                page_lse[((u64)it.page_off + pcur) * lse_stride + it.kv * lse_kvcol + it.sub * GS + lane] = lse;
            __syncwarp();
            if (lane == 0) {
                ring[2 * ns] = got ? pp : ~0u;
                ring[2 * ns + 1] = ee.y & 0xffffu;
            }
            __syncwarp();
            head = head + 1 == NSTAGE ? 0 : head + 1;
        }
        kvt_cp_wait<0>();
        kvt_mma_merge(ms, wst, wacc, lane);
    }
#endif
#if HMMA
    {
        // Hot pages on tensor cores, merged into the (empty) parked partial.
        HmmaState hs;
#pragma unroll
        for (int h = 0; h < GS; ++h) hs.m[h] = -KVT_INF;
        hs.l = 0.0f;
        hs.s1 = 0.0f;
        hs.s2 = 0.0f;
#pragma unroll
        for (int nv = 0; nv < HNV; ++nv)
#pragma unroll
            for (int k = 0; k < 4; ++k) hs.acc[nv][k] = 0.0f;
        kvt_hmma_pages(hs, pages + it.page_off, pb, pe, hot_pool, it.kv, hqa, lane, [&](u32 p, float lse) {
            page_lse[((u64)it.page_off + p) * lse_stride + it.kv * lse_kvcol + it.sub * GS + lane] = lse;
        });
        kvt_hmma_merge(hs, wst, wacc, lane);
    }
#endif
    __syncthreads();

    // CTA merge of the warps -> this item's partial.
    for (int i = tid; i < GS * D; i += NT) {
        const int h = i / D, c = i % D;
        float M = -KVT_INF;
        for (int w = 0; w < NWARPS; ++w)
            M = fmaxf(M, ((const float*)(smem + WARPS_OFF + w * WARP_BYTES))[h * 4]);
        float sum = 0.0f;
        for (int w = 0; w < NWARPS; ++w) {
            const float* ws = (const float*)(smem + WARPS_OFF + w * WARP_BYTES);
            if (ws[h * 4 + 1] > 0.0f) sum += __expf(ws[h * 4] - M) * ws[GS * 4 + h * D + c];
        }
        part_acc[((u64)blockIdx.x * GS + h) * D + c] = sum;
    }
    if (tid < GS) {
        const int h = tid;
        float M = -KVT_INF;
        for (int w = 0; w < NWARPS; ++w)
            M = fmaxf(M, ((const float*)(smem + WARPS_OFF + w * WARP_BYTES))[h * 4]);
        float L = 0.0f, S1 = 0.0f, S2 = 0.0f;
        for (int w = 0; w < NWARPS; ++w) {
            const float* ws = (const float*)(smem + WARPS_OFF + w * WARP_BYTES) + h * 4;
            if (ws[1] > 0.0f) {
                const float d = ws[0] - M, a = __expf(d);
                L += a * ws[1];
                S1 += a * (ws[2] + d * ws[1]);
                S2 += a * (ws[3] + 2.0f * d * ws[2] + d * d * ws[1]);
            }
        }
        float* ps = part_state + ((u64)blockIdx.x * GS + h) * 4;
        ps[0] = M;
        ps[1] = L;
        ps[2] = S1;
        ps[3] = S2;
    }

    // The last CTA of the group combines.
    __threadfence();
    __syncthreads();
    if (tid == 0) {
        const u32 prev = atomicAdd(&counters[it.group], 1u);
        is_last = prev == it.n_items - 1;
    }
    __syncthreads();
    if (!is_last) return;
    __threadfence();

    float* fac = (float*)smem;  // [n_items][GS]
    const u32 ni = it.n_items;
    for (u32 i = tid; i < ni * GS; i += NT)
        fac[i] = __ldcg(part_state + ((u64)(it.first_item + i / GS) * GS + i % GS) * 4);
    __syncthreads();
    // One warp per head, its lanes over the partials: a loop over ni partials in one thread is a
    // chain of ni dependent L2 round trips, which dominated small batches with many splits.
    for (int h = warp; h < GS; h += NWARPS) {
        float M = -KVT_INF;
        for (u32 i = lane; i < ni; i += 32) M = fmaxf(M, fac[i * GS + h]);
        M = kvt_warp_max(M);
        float L = 0.0f, S1 = 0.0f, S2 = 0.0f;
        for (u32 i = lane; i < ni; i += 32) {
            const float4 ps = __ldcg((const float4*)(part_state + ((u64)(it.first_item + i) * GS + h) * 4));
            if (ps.y > 0.0f) {
                const float d = ps.x - M, a = __expf(d);
                L += a * ps.y;
                S1 += a * (ps.z + d * ps.y);
                S2 += a * (ps.w + 2.0f * d * ps.z + d * d * ps.y);
            }
        }
        L = kvt_warp_sum(L);
        S1 = kvt_warp_sum(S1);
        S2 = kvt_warp_sum(S2);
        if (lane == 0) {
            cstat[h][0] = M;
            cstat[h][1] = L;
            cstat[h][2] = S1;
            cstat[h][3] = S2;
        }
    }
    __syncthreads();
    for (u32 i = tid; i < ni * GS; i += NT) {
        const u32 h = i % GS;
        const float l = __ldcg(part_state + ((u64)(it.first_item + i / GS) * GS + h) * 4 + 1);
        fac[i] = l > 0.0f ? __expf(fac[i] - cstat[h][0]) : 0.0f;
    }
    __syncthreads();
    // With rotated values the output is rotated back in shared memory (after the factors, which
    // take at most KVT_MAXSPLIT_HOST x GS floats; decode_smem reserves the GS x D more).
    const bool rot_out = (rot_flags & 2u) != 0;
    float* ob = fac + KVT_MAXSPLIT_HOST * GS;  // [GS][D]
    for (int x = tid; x < GS * D; x += NT) {
        const int h = x / D, c = x % D;
        float sum = 0.0f;
        // Unrolled so that several partials' loads are in flight at once.
#pragma unroll 8
        for (u32 i = 0; i < ni; ++i)
            sum += fac[i * GS + h] * __ldcg(part_acc + ((u64)(it.first_item + i) * GS + h) * D + c);
        const float L = cstat[h][1];
        const float o = L > 0.0f ? sum / L : 0.0f;
        if (rot_out)
            ob[x] = o;
        else
            out[((u64)it.seq * QH + h0 + h) * D + c] = o;
    }
    if (rot_out) {
        kvt_fwht<GS, 1, D>(ob, tid);
        for (int x = tid; x < GS * D; x += NT) {
            const int h = x / D, c = x % D;
            out[((u64)it.seq * QH + h0 + h) * D + c] =
                __fmul_rn(ob[x], __fmul_rn(rot_signs[c], rot_norm));
        }
    }
    if (tid < GS) {
        const int h = tid;
        const float M = cstat[h][0], L = cstat[h][1];
        float* so = stats + ((u64)it.seq * QH + h0 + h) * 4;
        if (L > 0.0f) {
            const float ex = cstat[h][2] / L, ex2 = cstat[h][3] / L;
            so[0] = fmaxf(logf(L) - ex, 0.0f);
            so[1] = fmaxf(ex2 - ex * ex, 0.0f);
            so[2] = M;
            so[3] = M + logf(L);
        } else {
            so[0] = 0.0f;
            so[1] = 0.0f;
            so[2] = -KVT_INF;
            so[3] = -KVT_INF;
        }
    }
    if (tid == 0) counters[it.group] = 0;
}
