// Page masses on the device, after a decode launch and on the same stream: per (page, kv head), the
// page's attention mass averaged over the q heads of the kv head's GQA group,
//   kv_mass[dest][kv] = (1 / GFULL) * sum_{h in group kv} exp(page_lse[h] - log Z[h]),
// the same sum in the same order as `Attention::finish_masses` on the host, so the host copies
// `KVH` floats per page back instead of `QH` and takes no exponentials.
//
// `emap[2e]` is the entry's list group (its sequence without a selection, sequence * KVH + kv head
// with one) and `emap[2e + 1]` its page's index over the whole batch. Rows of page_lse are as the
// decode kernel writes them (decode.cu): [entry][QH] without a selection (one thread per entry and
// kv head), [entry][GFULL] with one (one thread per entry; the unselected pages' masses were zeroed
// before this launch). Statistics are [seq][QH][4] with log Z at index 3.

extern "C" __global__ void kvt_page_mass(const float* __restrict__ page_lse,
                                         const float* __restrict__ stats,
                                         const u32* __restrict__ emap, float* __restrict__ kv_mass,
                                         u32 entries, u32 lse_stride, u32 per_head) {
    const float neg_inf = __int_as_float(0xff800000);
    const u32 cols = per_head ? 1u : (u32)KVH;
    const u64 n = (u64)entries * cols;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x) {
        const u32 e = (u32)(i / cols), c = (u32)(i % cols);
        const u32 group = emap[2 * (u64)e], dest = emap[2 * (u64)e + 1];
        const u32 seq = per_head ? group / KVH : group;
        const u32 kv = per_head ? group % KVH : c;
        const float* row = page_lse + (u64)e * lse_stride + (per_head ? 0u : kv * GFULL);
        const float* lz = stats + ((u64)seq * QH + (u64)kv * GFULL) * 4 + 3;
        float sum = 0.0f;
        for (u32 j = 0; j < GFULL; j++) {
            const float x = row[j], z = lz[4 * j];
            if (x > neg_inf && z > neg_inf) sum += expf(x - z);
        }
        kv_mass[(u64)dest * KVH + kv] = sum / (float)GFULL;
    }
}
