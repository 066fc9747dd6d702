// Append from the host: scatter `n` new tokens (f32, [n][KVH][D], keys and values) into hot page `slot` at token
// offset `first`, converting to the hot dtype. Grid-stride over elements; one launch per page write.

extern "C" __global__ void kvt_append(const float* __restrict__ keys,
                                      const float* __restrict__ values,
                                      u8* __restrict__ hot_pool,
                                      u32 slot, u32 first, u32 n) {
    hot_t* kd = (hot_t*)(hot_pool + (u64)slot * HOT_PAGE_BYTES);
    hot_t* vd = kd + HOT_HALF_ELEMS;
    const u64 total = (u64)n * KVH * D;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (u64)gridDim.x * blockDim.x) {
        const u32 c = (u32)(i % D);
        const u32 h = (u32)((i / D) % KVH);
        const u32 t = (u32)(i / ((u64)D * KVH));
        const u64 dst = ((u64)h * PS + first + t) * D + c;
        kd[dst] = kvt_hot_store(keys[i]);
        vd[dst] = kvt_hot_store(values[i]);
    }
}

// Device append (`CudaStorage::write_hot_device`): row `r` of `keys` / `values` ([n][KVH][D] in
// `in_dtype`: 0 f32, 1 f16, 2 bf16) goes to token `map[r].y` of hot page `map[r].x`. One CTA per
// (row, kv head, keys or values), D threads rounded up to a warp (head_dim <= 1024). With `rot` bit 0 (keys) / bit 1
// (values) the row is rotated first exactly as `quant::rotate::forward_with` does on the host
// (sign, the same butterflies, then `norm`), so the stored bits equal a host append's.
//
// Checks, as the host's `check_values` (stored): `bad[0]` / `bad[1]` get the smallest element
// index of a key / value that is not finite or beyond `hot_max`, `bad[2]` / `bad[3]` the smallest
// index whose rotated value is beyond `hot_max`; `bad[4]` the largest |x| stored (f32 bits, for
// the demotion's range check). The host reads them after the launch and, when any index is set,
// zeroes the rows again (`mode` 1 writes zeros, no checks) and reports the error.
extern "C" __global__ void kvt_append_rows(const void* __restrict__ keys,
                                           const void* __restrict__ values, u32 in_dtype,
                                           const uint2* __restrict__ map, u8* __restrict__ hot_pool,
                                           const float* __restrict__ signs, u32 rot, float norm,
                                           float hot_max, u32 mode, u32* __restrict__ bad) {
    __shared__ float x[D];
    const u32 r = blockIdx.x, h = blockIdx.y, is_v = blockIdx.z, c = threadIdx.x;
    const uint2 dst = map[r];
    hot_t* base = (hot_t*)(hot_pool + (u64)dst.x * HOT_PAGE_BYTES) + (is_v ? HOT_HALF_ELEMS : 0);
    hot_t* out = base + ((u64)h * PS + dst.y) * D;
    if (mode == 1) {
        if (c < D) out[c] = kvt_hot_store(0.0f);
        return;
    }
    const void* src = is_v ? values : keys;
    const u64 idx = ((u64)r * KVH + h) * D + c;
    float v = 0.0f;
    if (c < D) {
        if (in_dtype == 0) v = ((const float*)src)[idx];
        else if (in_dtype == 1) v = kvt_h2f(((const u16*)src)[idx]);
        else v = kvt_bf2f(((const u16*)src)[idx]);
        if (!kvt_isfinite(v) || fabsf(v) > hot_max) atomicMin(&bad[is_v], (u32)min(idx, (u64)0xfffffffeull));
    }
    if (rot & (1u << is_v)) {
        if (c < D) x[c] = __fmul_rn(v, signs[c]);
        __syncthreads();
        for (u32 hb = 1; hb < RB; hb <<= 1) {
            float nv = 0.0f;
            // Pair (i, i + hb), i with bit hb clear: i <- x_i + x_{i+hb}, i + hb <- x_i - x_{i+hb}.
            if (c < D) nv = (c & hb) ? __fsub_rn(x[c ^ hb], x[c]) : __fadd_rn(x[c], x[c ^ hb]);
            __syncthreads();
            if (c < D) x[c] = nv;
            __syncthreads();
        }
        if (c < D) {
            v = __fmul_rn(x[c], norm);
            if (!(fabsf(v) <= hot_max)) atomicMin(&bad[2 + is_v], (u32)min(idx, (u64)0xfffffffeull));
        }
    }
    u32 am = 0;
    if (c < D) {
        out[c] = kvt_hot_store(v);
        if (kvt_isfinite(v)) am = __float_as_uint(fabsf(v));
    }
    // One atomic per warp (a prefill launches a CTA per row and head): |x| bits order as floats.
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) am = max(am, __shfl_xor_sync(KVT_FULL, am, o));
    if ((c & 31) == 0 && am != 0) atomicMax(&bad[4], am);
}

// Read-bandwidth probe for benchmarks: streams `n16` 16-byte words, keeps a checksum so the loads
// cannot be removed.
extern "C" __global__ void kvt_read_probe(const uint4* __restrict__ src, u64 n16, u32* __restrict__ sink) {
    u32 acc = 0;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n16; i += 4 * stride) {
        const uint4 a = src[i], b = src[i + stride], c = src[i + 2 * stride], d = src[i + 3 * stride];
        acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
    }
    for (; i < n16; i += stride) {
        const uint4 a = src[i];
        acc ^= a.x ^ a.y ^ a.z ^ a.w;
    }
    sink[(u64)blockIdx.x * blockDim.x + threadIdx.x] = acc;
}
