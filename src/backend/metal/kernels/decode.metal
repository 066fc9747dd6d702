// Fused decode attention, split at page granularity (flash-decoding): `kvt_decode` runs one
// threadgroup per work item (one page of one kv head of one sequence) for the kv head's whole GQA
// group, dequantising warm codes in registers (no dequantised copy anywhere), and writes the
// page's partial per q head: its softmax state (max m, l = Σe, s1 = Σe·x, s2 = Σe·x² with
// x = s - m) and its unnormalised Σe·v. `kvt_combine` then merges a (sequence, q head)'s
// partials in page order with `attention::OnlineSoftmax`'s rules into the output, the head's
// statistics and (optionally) each page's log-sum-exp. Unselected pages have no work item.

// Key `c` of token `t` of an item, as attention reads it (hot: the stored element; warm:
// min + step * code, f16 parameters per channel).
inline float kvt_key(device const uchar* hot, device const uchar* warm, constant DecodeParams& p,
                     constant DecodeItem* items, uint it, uint t, uint c) {
    const DecodeItem w = items[it];
    if (w.tier == 0u) {
        device const uchar* page = hot + ulong(w.slot) * ulong(p.hot_page_bytes);
        return kvt_load_fast(page, (ulong(w.kv) * p.ps + t) * p.d + c, p.hot_dtype);
    }
    device const uchar* blk = warm + ulong(w.slot) * ulong(p.warm_page_bytes) + ulong(w.kv) * ulong(w.head_bytes);
    const float mn = kvt_h2f_fast(((device const ushort*)(blk + w.k_min))[c]);
    const float st = kvt_h2f_fast(((device const ushort*)(blk + w.k_step))[c]);
    const uint code = kvt_code_at(blk + w.k_codes + t * kvt_row_bytes(w.k_bits, p.d), c, w.k_bits, p.d);
    const float q = st * float(code);
    return mn + q;
}

// Value `c` of token `t` of an item (warm: per-token groups of `value_group` channels).
inline float kvt_value(device const uchar* hot, device const uchar* warm, constant DecodeParams& p,
                       constant DecodeItem* items, uint it, uint t, uint c) {
    const DecodeItem w = items[it];
    if (w.tier == 0u) {
        device const uchar* page = hot + ulong(w.slot) * ulong(p.hot_page_bytes);
        const ulong half_elems = ulong(p.kvh) * p.ps * p.d;
        return kvt_load_fast(page, half_elems + (ulong(w.kv) * p.ps + t) * p.d + c, p.hot_dtype);
    }
    device const uchar* blk = warm + ulong(w.slot) * ulong(p.warm_page_bytes) + ulong(w.kv) * ulong(w.head_bytes);
    const uint i = t * (p.d / p.value_group) + c / p.value_group;
    const float mn = kvt_h2f_fast(((device const ushort*)(blk + w.v_min))[i]);
    const float st = kvt_h2f_fast(((device const ushort*)(blk + w.v_step))[i]);
    const uint code = kvt_code_at(blk + w.v_codes + t * kvt_row_bytes(w.v_bits, p.d), c, w.v_bits, p.d);
    const float q = st * float(code);
    return mn + q;
}

// Threadgroup memory (bytes, see `params::decode_tg_bytes`): q [g * d] | s [g * ps] | st [g * 4].
// Partials: `parts[(item * g + gi) * (4 + d)]` = m, l, s1, s2, then Σe·v over d.
kernel void kvt_decode(device const uchar* hot [[buffer(0)]],
                       device const uchar* warm [[buffer(1)]],
                       device const uchar* queries [[buffer(2)]],
                       constant DecodeItem* items [[buffer(3)]],
                       device float* parts [[buffer(4)]],
                       constant DecodeParams& p [[buffer(5)]],
                       uint it [[threadgroup_position_in_grid]],
                       uint tid [[thread_position_in_threadgroup]],
                       uint nthreads [[threads_per_threadgroup]],
                       threadgroup uchar* smem KVT_TG0) {
    const uint g = p.g, d = p.d, ps = p.ps;
    const DecodeItem w = items[it];
    const uint n = w.n;
    threadgroup float* q = (threadgroup float*)smem;
    threadgroup float* s = q + g * d;
    threadgroup float* st = s + g * ps;
    // Queries of the group, scaled.
    for (uint i = tid; i < g * d; i += nthreads) {
        const ulong at = (ulong(w.seq) * p.qh + ulong(w.kv) * g + i / d) * d + i % d;
        q[i] = kvt_load_fast(queries, at, p.q_dtype) * p.scale;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    // Scores: one (head, token) pair per thread.
    for (uint i = tid; i < g * n; i += nthreads) {
        const uint gi = i / n, t = i % n;
        float acc = 0.0f;
        for (uint c = 0u; c < d; ++c) acc += q[gi * d + c] * kvt_key(hot, warm, p, items, it, t, c);
        s[gi * ps + t] = acc;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    // Softmax state per head; the scores become weights e = exp(s - m) in place.
    for (uint gi = tid; gi < g; gi += nthreads) {
        float m = -INFINITY;
        for (uint t = 0u; t < n; ++t) m = max(m, s[gi * ps + t]);
        float l = 0.0f, s1 = 0.0f, s2 = 0.0f;
        for (uint t = 0u; t < n; ++t) {
            const float x = s[gi * ps + t] - m;
            const float e = exp(x);
            s[gi * ps + t] = e;
            l += e;
            s1 += e * x;
            s2 += e * x * x;
        }
        st[gi * 4u + 0u] = m;
        st[gi * 4u + 1u] = l;
        st[gi * 4u + 2u] = s1;
        st[gi * 4u + 3u] = s2;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint i = tid; i < g * 4u; i += nthreads) {
        parts[(ulong(it) * g + i / 4u) * (4u + d) + i % 4u] = st[i];
    }
    // Σ e·v, one (head, channel) pair per thread.
    for (uint i = tid; i < g * d; i += nthreads) {
        const uint gi = i / d, c = i % d;
        float acc = 0.0f;
        for (uint t = 0u; t < n; ++t) acc += s[gi * ps + t] * kvt_value(hot, warm, p, items, it, t, c);
        parts[(ulong(it) * g + gi) * (4u + d) + 4u + c] = acc;
    }
}

// `OnlineSoftmax::rescale_to`: moves the state to max `mn >= m`; returns the accumulator factor.
inline float kvt_rescale(thread float& m, thread float& l, thread float& s1, thread float& s2, float mn) {
    if (l == 0.0f) {
        m = mn;
        s1 = 0.0f;
        s2 = 0.0f;
        return 0.0f;
    }
    const float delta = m - mn;
    const float alpha = exp(delta);
    s2 = alpha * (s2 + 2.0f * delta * s1 + delta * delta * l);
    s1 = alpha * (s1 + delta * l);
    l *= alpha;
    m = mn;
    return alpha;
}

// One threadgroup per (sequence, q head); every thread runs the same scalar merge (so no
// broadcast is needed) and keeps the output channels `tid, tid + nthreads, ...` (at most 4 each:
// d <= 4 * nthreads). `ranges[seq * kvh + kv]` = (first item, item count) of that kv head, items in
// page order. `heads[(seq * qh + h) * 4]` = entropy, varentropy, max, log Z.
kernel void kvt_combine(device const float* parts [[buffer(0)]],
                        device const uint* ranges [[buffer(1)]],
                        constant DecodeItem* items [[buffer(2)]],
                        device float* out [[buffer(3)]],
                        device float* heads [[buffer(4)]],
                        device float* page_lse [[buffer(5)]],
                        device const uint* lse_base [[buffer(6)]],
                        constant CombineParams& p [[buffer(7)]],
                        uint gid [[threadgroup_position_in_grid]],
                        uint tid [[thread_position_in_threadgroup]],
                        uint nthreads [[threads_per_threadgroup]]) {
    const uint seq = gid / p.qh, h = gid % p.qh, d = p.d, g = p.g;
    const uint kv = h / g, gi = h % g;
    const uint first = ranges[(seq * p.kvh + kv) * 2u], count = ranges[(seq * p.kvh + kv) * 2u + 1u];
    float m = -INFINITY, l = 0.0f, s1 = 0.0f, s2 = 0.0f;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (uint k = 0u; k < count; ++k) {
        const uint it = first + k;
        device const float* part = parts + (ulong(it) * g + gi) * (4u + d);
        float om = part[0], ol = part[1], os1 = part[2], os2 = part[3];
        if (p.want_lse != 0u && tid == 0u && ol > 0.0f) {
            page_lse[(ulong(lse_base[seq]) + items[it].page) * p.qh + h] = om + log(ol);
        }
        if (ol == 0.0f) continue;
        // `OnlineSoftmax::merge`.
        const float mm = max(m, om);
        const float ao = kvt_rescale(om, ol, os1, os2, mm);
        const float a = kvt_rescale(m, l, s1, s2, mm);
        l += ol;
        s1 += os1;
        s2 += os2;
        for (uint j = 0u; j < 4u; ++j) {
            const uint c = tid + j * nthreads;
            if (c < d) acc[j] = a * acc[j] + ao * part[4u + c];
        }
    }
    const float inv = l > 0.0f ? 1.0f / l : 1.0f;
    for (uint j = 0u; j < 4u; ++j) {
        const uint c = tid + j * nthreads;
        if (c < d) out[(ulong(seq) * p.qh + h) * d + c] = l > 0.0f ? acc[j] * inv : 0.0f;
    }
    if (tid == 0u) {
        device float* hs = heads + (ulong(seq) * p.qh + h) * 4u;
        if (l <= 0.0f) {
            hs[0] = 0.0f;
            hs[1] = 0.0f;
            hs[2] = -INFINITY;
            hs[3] = -INFINITY;
        } else {
            const float ex = s1 / l, ex2 = s2 / l;
            hs[0] = max(log(l) - ex, 0.0f);
            hs[1] = max(ex2 - ex * ex, 0.0f);
            hs[2] = m;
            hs[3] = m + log(l);
        }
    }
}
