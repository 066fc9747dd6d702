// kvtier CUDA kernels: shared helpers.
//
// Compiled by NVRTC at run time, prefixed by a block of `#define`s that fixes the geometry of one
// cache configuration (see `kernels.rs`, `Defines`). No system or CUDA headers are included:
// conversions use inline PTX so that NVRTC needs no include path.
//
// Conversions here must round exactly like the `half` crate on the host (round to nearest even),
// because warm pages must be byte-identical to the CPU backend's.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef unsigned long long u64;

#define KVT_INF __int_as_float(0x7f800000)
#define KVT_FULL 0xffffffffu

// f16 bits -> f32 (exact).
__device__ __forceinline__ float kvt_h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// f32 -> f16 bits, round to nearest even; overflow gives infinity (as `half::f16::from_f32`).
__device__ __forceinline__ u16 kvt_f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// bf16 bits -> f32 (exact).
__device__ __forceinline__ float kvt_bf2f(u16 b) { return __uint_as_float(((u32)b) << 16); }

// f32 -> bf16 bits, round to nearest even (as `half::bf16::from_f32` for finite inputs).
__device__ __forceinline__ u16 kvt_f2bf(float f) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ bool kvt_isfinite(float x) {
    return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u;
}

// Hot page element type, selected by HOT (0 = f32, 1 = f16, 2 = bf16).
#if HOT == 0
typedef float hot_t;
__device__ __forceinline__ float kvt_hot_load(hot_t x) { return x; }
__device__ __forceinline__ hot_t kvt_hot_store(float x) { return x; }
#elif HOT == 1
typedef u16 hot_t;
__device__ __forceinline__ float kvt_hot_load(hot_t x) { return kvt_h2f(x); }
__device__ __forceinline__ hot_t kvt_hot_store(float x) { return kvt_f2h(x); }
#else
typedef u16 hot_t;
__device__ __forceinline__ float kvt_hot_load(hot_t x) { return kvt_bf2f(x); }
__device__ __forceinline__ hot_t kvt_hot_store(float x) { return kvt_f2bf(x); }
#endif

// Bytes of one hot page: K then V, each [KVH][PS][D] elements of hot_t.
#define HOT_HALF_ELEMS ((u64)KVH * PS * D)
#define HOT_PAGE_BYTES (2ull * HOT_HALF_ELEMS * sizeof(hot_t))
// Bytes of one warm page: KVH head blocks of HEAD_BYTES.
#define WARM_PAGE_BYTES ((u64)KVH * HEAD_BYTES)

// q heads of a decode CTA padded to a float4 (decode.cu, decode_mma.cuh).
#define GP (((GS) + 3) / 4 * 4)
#define NG (D / VG)
#define KROW (D * KB / 8)
#define VROW (D * VB / 8)

// Loads NW 32-bit words from 4-byte aligned memory with the widest aligned vector loads.
template <int NW>
__device__ __forceinline__ void kvt_load_words(const u8* p, u32 (&w)[NW]) {
    if constexpr (NW % 4 == 0) {
#pragma unroll
        for (int i = 0; i < NW; i += 4) {
            const uint4 v = *(const uint4*)(p + 4 * i);
            w[i] = v.x; w[i + 1] = v.y; w[i + 2] = v.z; w[i + 3] = v.w;
        }
    } else if constexpr (NW % 2 == 0) {
#pragma unroll
        for (int i = 0; i < NW; i += 2) {
            const uint2 v = *(const uint2*)(p + 4 * i);
            w[i] = v.x; w[i + 1] = v.y;
        }
    } else {
#pragma unroll
        for (int i = 0; i < NW; ++i) w[i] = *(const u32*)(p + 4 * i);
    }
}

// cp.async (16 bytes, L2 only) and its group fences.
__device__ __forceinline__ void kvt_cp_async16(void* smem, const void* gmem) {
    const u32 s = (u32)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void kvt_cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void kvt_cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Tensor-core helpers shared by decode_mma.cuh and decode_hmma.cuh.
__device__ __forceinline__ u32 kvt_prmt(u32 a, u32 b, u32 sel) {
    u32 d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
    return d;
}
// Sums / maxima over the 4 lanes of a quad (lane & 3).
__device__ __forceinline__ float kvt_quad_sum(float v) {
    v += __shfl_xor_sync(KVT_FULL, v, 1);
    return v + __shfl_xor_sync(KVT_FULL, v, 2);
}
__device__ __forceinline__ float kvt_quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(KVT_FULL, v, 1));
    return fmaxf(v, __shfl_xor_sync(KVT_FULL, v, 2));
}
// Element h (runtime, < GS) of a warp-uniform per-head array.
__device__ __forceinline__ float kvt_pick(const float (&a)[GS], int h) {
    float v = a[0];
#pragma unroll
    for (int i = 1; i < GS; ++i)
        if (h == i) v = a[i];
    return v;
}

// Merges a warp's softmax statistics into its parked ones (wst [GS][4] = m, l, s1, s2): m is
// warp-uniform; l, s1, s2 are partial sums that the quad of lanes 4h .. 4h + 3 holds for head h
// (quad-summed here). Returns the factors that rescale the parked output (fa) and the warp's
// own (fb) to the merged maximum.
__device__ __forceinline__ void kvt_park_stats(const float (&m)[GS], float l, float s1, float s2,
                                               float* wst, float (&fa)[GS], float (&fb)[GS],
                                               int lane) {
    l = kvt_quad_sum(l);
    s1 = kvt_quad_sum(s1);
    s2 = kvt_quad_sum(s2);
    float L[GS], S1[GS], S2[GS];
#pragma unroll
    for (int h = 0; h < GS; ++h) {
        L[h] = __shfl_sync(KVT_FULL, l, 4 * h);
        S1[h] = __shfl_sync(KVT_FULL, s1, 4 * h);
        S2[h] = __shfl_sync(KVT_FULL, s2, 4 * h);
    }
    __syncwarp();
#pragma unroll
    for (int h = 0; h < GS; ++h) {
        const float mh = wst[h * 4], lh = wst[h * 4 + 1], s1h = wst[h * 4 + 2], s2h = wst[h * 4 + 3];
        const float mm = m[h];
        const float M = fmaxf(mh, mm);
        float nl = 0.0f, n1 = 0.0f, n2 = 0.0f;
        fa[h] = 0.0f;
        fb[h] = 0.0f;
        if (lh > 0.0f) {
            const float d = mh - M;
            fa[h] = __expf(d);
            nl += fa[h] * lh;
            n1 += fa[h] * (s1h + d * lh);
            n2 += fa[h] * (s2h + 2.0f * d * s1h + d * d * lh);
        }
        if (L[h] > 0.0f) {
            const float d = mm - M;
            fb[h] = __expf(d);
            nl += fb[h] * L[h];
            n1 += fb[h] * (S1[h] + d * L[h]);
            n2 += fb[h] * (S2[h] + 2.0f * d * S1[h] + d * d * L[h]);
        }
        __syncwarp();
        if (lane == 0) {
            wst[h * 4] = M;
            wst[h * 4 + 1] = nl;
            wst[h * 4 + 2] = n1;
            wst[h * 4 + 3] = n2;
        }
    }
}

// Running-max step of a page in the quad layout (lane (r, j) holds tokens of head r & 3; mloc is
// this lane's maximum): the new maxima go to m (warp-uniform), with, per head, the factor alpha =
// exp(m_old - m_new) that rescales what was accumulated and dl = m_old - m_new (both neutral
// where the maximum did not move). Returns whether any head's maximum moved (warp-uniform).
__device__ __forceinline__ bool kvt_quad_newmax(float (&m)[GS], float mloc, float (&alpha)[GS],
                                                float (&dl)[GS]) {
    mloc = kvt_quad_max(mloc);
    bool moved = false;
#pragma unroll
    for (int h = 0; h < GS; ++h) {
        const float mn = fmaxf(m[h], __shfl_sync(KVT_FULL, mloc, 4 * h));
        alpha[h] = 1.0f;
        dl[h] = 0.0f;
        if (mn > m[h]) {
            alpha[h] = m[h] == -KVT_INF ? 0.0f : __expf(m[h] - mn);
            dl[h] = m[h] == -KVT_INF ? 0.0f : m[h] - mn;
            m[h] = mn;
            moved = true;
        }
    }
    return moved;
}

// log(exp(a) + exp(b)), exact at -inf.
__device__ __forceinline__ float kvt_logaddexp(float a, float b) {
    if (a == -KVT_INF) return b;
    if (b == -KVT_INF) return a;
    const float mx = fmaxf(a, b), mn = fminf(a, b);
    return mx + __logf(1.0f + __expf(mn - mx));
}
