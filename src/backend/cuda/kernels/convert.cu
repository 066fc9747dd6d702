// Query conversion for `attend_device`: the caller's f16 or bf16
// queries, widened exactly to f32 into the decode plan's own query buffer on the caller's stream
// (the decode kernel then reads that buffer); grid-stride over elements, one launch per call.

extern "C" __global__ void kvt_queries_f16(const u16* __restrict__ src, float* __restrict__ dst,
                                           u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x)
        dst[i] = kvt_h2f(src[i]);
}

extern "C" __global__ void kvt_queries_bf16(const u16* __restrict__ src, float* __restrict__ dst,
                                            u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x)
        dst[i] = kvt_bf2f(src[i]);
}
