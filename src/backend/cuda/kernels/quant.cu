// Quantise hot pages into warm pages (demotion), byte-identical to `quant::quantize_keys` and
// `quant::quantize_values` on the host (3-bit rows and key outlier channels included). One launch
// demotes a batch: grid (kv heads, jobs), one CTA per kv head and page writes that head's whole
// block, padding included (zeros), so a reused warm slot never leaks old bytes. A page whose
// range does not fit f16 sets its own failure word and writes nothing.
//
// Every float operation below uses an explicit `__f*_rn` intrinsic: the host code is plain f32
// arithmetic without fused multiply-add, so contraction here would change codes.

#define KMAX ((1u << KB) - 1u)
#define VMAX ((1u << VB) - 1u)

// `quant::min_and_step`: f16 minimum and f16 step (rounded up until min + max_code * step >= hi).
// Returns false when the range does not fit f16.
__device__ __forceinline__ bool kvt_min_and_step(float lo, float hi, u32 max_code, u16* mn, u16* st) {
    const u16 m16 = kvt_f2h(lo);
    const float m = kvt_h2f(m16);
    if (!kvt_isfinite(m)) return false;
    float span = __fsub_rn(hi, m);
    span = span > 0.0f ? span : 0.0f;
    const float mc = (float)max_code;
    u16 s16 = kvt_f2h(__fdiv_rn(span, mc));
    while (__fadd_rn(__fmul_rn(kvt_h2f(s16), mc), m) < hi) {
        s16 = (u16)(s16 + 1);
        if (!kvt_isfinite(kvt_h2f(s16))) return false;
    }
    if (!kvt_isfinite(kvt_h2f(s16))) return false;
    *mn = m16;
    *st = s16;
    return true;
}

// `quant::code_of` with `quant::inv`: round half away from zero, clamp to [0, max].
__device__ __forceinline__ u32 kvt_code(float x, u16 mn, u16 st, u32 max_code) {
    const float s = kvt_h2f(st);
    const float inv = s > 0.0f ? __fdiv_rn(1.0f, s) : 0.0f;
    float c = roundf(__fmul_rn(__fsub_rn(x, kvt_h2f(mn)), inv));
    c = fminf(fmaxf(c, 0.0f), (float)max_code);
    return (u32)c;
}

__device__ __forceinline__ u8 kvt_u16_byte(const u16* a, u32 rel) {
    const u16 v = a[rel >> 1];
    return (rel & 1) ? (u8)(v >> 8) : (u8)(v & 0xff);
}

// Packed byte `j` of a code row of BITS-bit codes, `code(c)` giving channel c's code. 3-bit rows
// are two planes (quant::pack): D / 4 bytes of low 2-bit fields, then D / 8 bytes of high bits.
template <int BITS, typename F>
__device__ __forceinline__ u8 kvt_pack_byte(u32 j, F code) {
    u32 v = 0;
    if constexpr (BITS == 3) {
        if (j < D / 4) {
#pragma unroll
            for (u32 f = 0; f < 4; ++f) v |= (code(j * 4 + f) & 3u) << (2 * f);
        } else {
#pragma unroll
            for (u32 f = 0; f < 8; ++f) v |= ((code((j - D / 4) * 8 + f) >> 2) & 1u) << f;
        }
    } else {
#pragma unroll
        for (u32 f = 0; f < 8 / BITS; ++f) v |= code(j * (8 / BITS) + f) << (f * BITS);
    }
    return (u8)v;
}

extern "C" __global__ void __launch_bounds__(256)
kvt_quantize(const u8* __restrict__ hot_pool, u8* __restrict__ warm_pool,
             const u32* __restrict__ jobs, u32* __restrict__ fails) {
    __shared__ u16 kmin[D], kstep[D], vmin[PS * NG], vstep[PS * NG];
    __shared__ float klo[D], khi[D];
    // Outlier channels, ascending (quant::keys::quantize_keys: the widest, ties to the lower index).
    __shared__ u32 oidx[NOUT > 0 ? NOUT : 1];
    __shared__ int bad;
    const u32 h = blockIdx.x;
    const u32 tid = threadIdx.x;
    // Job blockIdx.y of the batch: (hot slot, warm slot, tokens); its own failure word.
    const u32 hot_slot = jobs[3 * blockIdx.y], warm_slot = jobs[3 * blockIdx.y + 1];
    const u32 n = jobs[3 * blockIdx.y + 2];
    u32* fail = fails + blockIdx.y;
    if (tid == 0) bad = 0;
    __syncthreads();
    const hot_t* K = (const hot_t*)(hot_pool + (u64)hot_slot * HOT_PAGE_BYTES) + (u64)h * PS * D;
    const hot_t* V = K + HOT_HALF_ELEMS;

    for (u32 c = tid; c < D; c += blockDim.x) {
        float lo = KVT_INF, hi = -KVT_INF;
        for (u32 t = 0; t < n; ++t) {
            const float x = kvt_hot_load(K[t * D + c]);
            lo = fminf(lo, x);
            hi = fmaxf(hi, x);
        }
        klo[c] = lo;
        khi[c] = hi;
    }
    __syncthreads();
    if (NOUT > 0 && tid == 0) {
        u32 picked = 0;
        for (u32 i = 0; i < NOUT; ++i) {
            // The widest channel not taken yet; strict > keeps the lowest index among ties.
            u32 best = D;
            float bw = 0.0f;
            for (u32 c = 0; c < D; ++c) {
                bool taken = false;
                for (u32 k = 0; k < picked; ++k) taken |= oidx[k] == c;
                if (taken) continue;
                const float w = __fsub_rn(khi[c], klo[c]);
                if (best == D || w > bw) {
                    best = c;
                    bw = w;
                }
            }
            oidx[picked++] = best;
        }
        for (u32 i = 1; i < NOUT; ++i)  // insertion sort, ascending
            for (u32 k = i; k > 0 && oidx[k - 1] > oidx[k]; --k) {
                const u32 x = oidx[k];
                oidx[k] = oidx[k - 1];
                oidx[k - 1] = x;
            }
    }
    __syncthreads();
    for (u32 c = tid; c < D; c += blockDim.x) {
        bool out = false;
        for (u32 k = 0; k < NOUT; ++k) out |= oidx[k] == c;
        if (out) {
            kmin[c] = 0;
            kstep[c] = 0;
            for (u32 t = 0; t < n; ++t)
                if (!kvt_isfinite(kvt_h2f(kvt_f2h(kvt_hot_load(K[t * D + c]))))) bad = 1;
        } else if (!kvt_min_and_step(klo[c], khi[c], KMAX, &kmin[c], &kstep[c])) {
            bad = 1;
        }
    }
    for (u32 i = tid; i < PS * NG; i += blockDim.x) {
        const u32 t = i / NG, g = i % NG;
        if (t < n) {
            float lo = KVT_INF, hi = -KVT_INF;
            for (u32 j = 0; j < VG; ++j) {
                const float x = kvt_hot_load(V[t * D + g * VG + j]);
                lo = fminf(lo, x);
                hi = fmaxf(hi, x);
            }
            if (!kvt_min_and_step(lo, hi, VMAX, &vmin[i], &vstep[i])) bad = 1;
        } else {
            vmin[i] = 0;
            vstep[i] = 0;
        }
    }
    __syncthreads();
    if (bad) {
        if (tid == 0) atomicOr(fail, 1u);
        return;
    }
    u8* blk = warm_pool + (u64)warm_slot * WARM_PAGE_BYTES + (u64)h * HEAD_BYTES;
    for (u32 b = tid; b < HEAD_BYTES; b += blockDim.x) {
        u8 out = 0;
        if (b >= K_MIN && b < K_MIN + 2 * D) {
            out = kvt_u16_byte(kmin, b - K_MIN);
        } else if (b >= K_STEP && b < K_STEP + 2 * D) {
            out = kvt_u16_byte(kstep, b - K_STEP);
        } else if (b >= V_MIN && b < V_MIN + 2 * PS * NG) {
            out = kvt_u16_byte(vmin, b - V_MIN);
        } else if (b >= V_STEP && b < V_STEP + 2 * PS * NG) {
            out = kvt_u16_byte(vstep, b - V_STEP);
        } else if (b >= K_CODES && b < K_CODES + PS * KROW) {
            const u32 rel = b - K_CODES, t = rel / KROW, j = rel % KROW;
            if (t < n)
                out = kvt_pack_byte<KB>(j, [&](u32 c) {
                    return kvt_code(kvt_hot_load(K[t * D + c]), kmin[c], kstep[c], KMAX);
                });
        } else if (b >= V_CODES && b < V_CODES + PS * VROW) {
            const u32 rel = b - V_CODES, t = rel / VROW, j = rel % VROW;
            if (t < n)
                out = kvt_pack_byte<VB>(j, [&](u32 c) {
                    const u32 i = t * NG + c / VG;
                    return kvt_code(kvt_hot_load(V[t * D + c]), vmin[i], vstep[i], VMAX);
                });
        } else if (NOUT > 0 && b >= OUT_IDX && b < OUT_IDX + 2 * NOUT) {
            const u32 rel = b - OUT_IDX;
            const u32 c = oidx[rel / 2];
            out = (rel & 1) ? (u8)(c >> 8) : (u8)(c & 0xff);
        } else if (NOUT > 0 && b >= OUT_VAL && b < OUT_VAL + 2 * PS * NOUT) {
            // Rows past n repeat token 0 (the page bounds stay exact), as on the host.
            const u32 rel = b - OUT_VAL, i = rel / 2, t = i / NOUT, o = i % NOUT;
            const u16 x = kvt_f2h(kvt_hot_load(K[(t < n ? t : 0) * D + oidx[o]]));
            out = (rel & 1) ? (u8)(x >> 8) : (u8)(x & 0xff);
        }
        blk[b] = out;
    }
}
