// Append: scatter `n` new tokens (f32, [n][KVH][D], keys and values) into hot page `slot` at token
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
