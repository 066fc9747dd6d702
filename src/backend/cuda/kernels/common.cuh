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
