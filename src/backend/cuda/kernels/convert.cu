// Query conversion and rotation for `attend_device`. Conversion: the caller's f16 or bf16
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

// Rotation of head vectors for `attend_device` of a rotated cache (`quant::rotate`): one CTA of D
// threads per vector. Forward: x <- H (s . x) * norm, inverse: x <- s * norm * (H x), H the
// Walsh-Hadamard transform in blocks of RB channels. The same f32 operations in the same order as
// the host's `Rotator`, so both give the same bits. `src` and `dst` may be the same buffer: each
// CTA reads its vector into shared memory before it writes.
extern "C" __global__ void kvt_rotate(const float* src, float* dst, const float* __restrict__ signs,
                                      float norm, u32 inverse) {
    __shared__ float x[D];
    const u32 v = blockIdx.x, c = threadIdx.x;
    float a = src[(u64)v * D + c];
    if (!inverse) a = __fmul_rn(a, signs[c]);
    x[c] = a;
    __syncthreads();
    for (u32 h = 1; h < RB; h <<= 1) {
        const float mine = x[c], other = x[c ^ h];
        __syncthreads();
        // Pair (i, i + h), i with bit h clear: i <- x_i + x_{i+h}, i + h <- x_i - x_{i+h}.
        x[c] = (c & h) ? __fsub_rn(other, mine) : __fadd_rn(mine, other);
        __syncthreads();
    }
    const float r = x[c];
    dst[(u64)v * D + c] = inverse ? __fmul_rn(r, __fmul_rn(signs[c], norm)) : __fmul_rn(r, norm);
}
