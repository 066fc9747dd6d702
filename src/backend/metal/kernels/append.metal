// Append: `n` token rows `[n][kvh][d]` of keys and values (f32, f16 or bf16: the engine's dtype,
// from the host's staging buffer or straight from an engine's device tensor) into hot page
// `slot` at token `first`, converted to the hot dtype. The page is `[kvh][ps][d]` keys, then the
// same for values. One thread per (token, kv head, channel).

kernel void kvt_append(device uchar* hot [[buffer(0)]],
                       device const uchar* keys [[buffer(1)]],
                       device const uchar* values [[buffer(2)]],
                       constant AppendParams& p [[buffer(3)]],
                       uint gid [[threadgroup_position_in_grid]],
                       uint tid [[thread_position_in_threadgroup]],
                       uint nthreads [[threads_per_threadgroup]]) {
    const ulong i = ulong(gid) * ulong(nthreads) + ulong(tid);
    const ulong total = ulong(p.n) * ulong(p.kvh) * ulong(p.d);
    if (i >= total) return;
    const uint c = uint(i % ulong(p.d));
    const uint h = uint((i / ulong(p.d)) % ulong(p.kvh));
    const uint t = uint(i / (ulong(p.d) * ulong(p.kvh)));
    device uchar* page = hot + ulong(p.slot) * ulong(p.hot_page_bytes);
    const ulong half_elems = ulong(p.kvh) * ulong(p.ps) * ulong(p.d);
    const ulong at = (ulong(h) * ulong(p.ps) + ulong(p.first + t)) * ulong(p.d) + ulong(c);
    kvt_store(page, at, p.hot_dtype, kvt_load(keys, i, p.src_dtype));
    kvt_store(page, half_elems + at, p.hot_dtype, kvt_load(values, i, p.src_dtype));
}
