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
