// Demotion: one hot page into one warm page, byte-identical to `quant::quantize_keys` and
// `quant::quantize_values` on the host (8/4/3/2-bit codes, K and V widths independent; key
// outlier channels are not supported by this backend). One threadgroup per kv head writes that
// head's whole block, padding included (zeros), so a reused warm slot never leaks old bytes.
// A range that does not fit f16 sets `fail[0]` and the block is not written.
// No multiply-add contraction here (the host computes every product and sum rounded).
#ifndef KVT_EMU
#pragma clang fp contract(off)
#endif

// `quant::min_and_step`: f16 minimum and f16 step, rounded up until min + max_code * step >= hi.
inline bool kvt_min_and_step(float lo, float hi, uint max_code, thread ushort& mn, thread ushort& st) {
    const ushort m16 = kvt_f2h(lo);
    const float m = kvt_h2f(m16);
    if (!isfinite(m)) return false;
    float span = hi - m;
    span = span > 0.0f ? span : 0.0f;
    const float mc = float(max_code);
    ushort s16 = kvt_f2h(KVT_DIV(span, mc));
    while (true) {
        const float top = kvt_h2f(s16) * mc;  // its own statement: no contraction with the add
        const float reach = top + m;
        if (!(reach < hi)) break;
        s16 = ushort(s16 + 1u);
        if (!isfinite(kvt_h2f(s16))) return false;
    }
    if (!isfinite(kvt_h2f(s16))) return false;
    mn = m16;
    st = s16;
    return true;
}

// `quant::code_of` with `quant::inv`: round half away from zero, clamp to [0, max].
inline uint kvt_code(float x, ushort mn, ushort st, uint max_code) {
    const float s = kvt_h2f(st);
    const float inv = s > 0.0f ? KVT_DIV(1.0f, s) : 0.0f;
    const float rel = x - kvt_h2f(mn);
    const float scaled = rel * inv;
    float c = round(scaled);
    c = min(max(c, 0.0f), float(max_code));
    return uint(c);
}

inline uchar kvt_u16_byte(threadgroup const ushort* a, uint rel) {
    const ushort v = a[rel >> 1];
    return (rel & 1u) ? uchar(v >> 8) : uchar(v & 0xffu);
}

// Packed byte `j` of the key row of token `t`.
inline uchar kvt_key_byte(uint j, uint t, device const uchar* hot_k, constant QuantParams& p,
                          threadgroup const ushort* kmin, threadgroup const ushort* kstep) {
    const uint bits = p.k_bits, d = p.d, kmax = (1u << bits) - 1u;
    uint v = 0u;
    if (bits == 3u) {
        if (j < d / 4u) {
            for (uint f = 0u; f < 4u; ++f) {
                const uint c = j * 4u + f;
                const uint code = kvt_code(kvt_load(hot_k, ulong(t) * d + c, p.hot_dtype), kmin[c], kstep[c], kmax);
                v |= (code & 3u) << (2u * f);
            }
        } else {
            for (uint f = 0u; f < 8u; ++f) {
                const uint c = (j - d / 4u) * 8u + f;
                const uint code = kvt_code(kvt_load(hot_k, ulong(t) * d + c, p.hot_dtype), kmin[c], kstep[c], kmax);
                v |= ((code >> 2) & 1u) << f;
            }
        }
    } else {
        const uint per = 8u / bits;
        for (uint f = 0u; f < per; ++f) {
            const uint c = j * per + f;
            const uint code = kvt_code(kvt_load(hot_k, ulong(t) * d + c, p.hot_dtype), kmin[c], kstep[c], kmax);
            v |= code << (f * bits);
        }
    }
    return uchar(v);
}

// Packed byte `j` of the value row of token `t` (per-token groups of `value_group` channels).
inline uchar kvt_value_byte(uint j, uint t, device const uchar* hot_v, constant QuantParams& p,
                            threadgroup const ushort* vmin, threadgroup const ushort* vstep) {
    const uint bits = p.v_bits, d = p.d, vmax = (1u << bits) - 1u;
    const uint ng = d / p.value_group;
    uint v = 0u;
    if (bits == 3u) {
        if (j < d / 4u) {
            for (uint f = 0u; f < 4u; ++f) {
                const uint c = j * 4u + f, i = t * ng + c / p.value_group;
                const uint code = kvt_code(kvt_load(hot_v, ulong(t) * d + c, p.hot_dtype), vmin[i], vstep[i], vmax);
                v |= (code & 3u) << (2u * f);
            }
        } else {
            for (uint f = 0u; f < 8u; ++f) {
                const uint c = (j - d / 4u) * 8u + f, i = t * ng + c / p.value_group;
                const uint code = kvt_code(kvt_load(hot_v, ulong(t) * d + c, p.hot_dtype), vmin[i], vstep[i], vmax);
                v |= ((code >> 2) & 1u) << f;
            }
        }
    } else {
        const uint per = 8u / bits;
        for (uint f = 0u; f < per; ++f) {
            const uint c = j * per + f, i = t * ng + c / p.value_group;
            const uint code = kvt_code(kvt_load(hot_v, ulong(t) * d + c, p.hot_dtype), vmin[i], vstep[i], vmax);
            v |= code << (f * bits);
        }
    }
    return uchar(v);
}

// Threadgroup memory (bytes, the host computes the same in `params::quant_tg_bytes`):
// kmin, kstep [d] u16 | vmin, vstep [ps * ng] u16 | klo, khi [d] f32 | bad u32.
kernel void kvt_quantize(device const uchar* hot [[buffer(0)]],
                         device uchar* warm [[buffer(1)]],
                         device uint* fail [[buffer(2)]],
                         constant QuantParams& p [[buffer(3)]],
                         uint h [[threadgroup_position_in_grid]],
                         uint tid [[thread_position_in_threadgroup]],
                         uint nthreads [[threads_per_threadgroup]],
                         threadgroup uchar* smem KVT_TG0) {
    const uint d = p.d, ps = p.ps, n = p.n;
    const uint ng = d / p.value_group;
    const uint kmax = (1u << p.k_bits) - 1u, vmax = (1u << p.v_bits) - 1u;
    threadgroup ushort* kmin = (threadgroup ushort*)smem;
    threadgroup ushort* kstep = kmin + d;
    threadgroup ushort* vmin = kstep + d;
    threadgroup ushort* vstep = vmin + ps * ng;
    const uint fl = ((4u * d + 4u * ps * ng) + 3u) & ~3u;
    threadgroup float* klo = (threadgroup float*)(smem + fl);
    threadgroup float* khi = klo + d;
    threadgroup uint* bad = (threadgroup uint*)(khi + d);
    if (tid == 0u) bad[0] = 0u;
    threadgroup_barrier(mem_flags::mem_threadgroup);

    device const uchar* page = hot + ulong(p.hot_slot) * ulong(p.hot_page_bytes);
    const uint esz = p.hot_dtype == KVT_F32 ? 4u : 2u;
    device const uchar* K = page + ulong(h) * ps * d * esz;
    device const uchar* V = page + ulong(p.hot_page_bytes) / 2u + ulong(h) * ps * d * esz;

    for (uint c = tid; c < d; c += nthreads) {
        float lo = INFINITY, hi = -INFINITY;
        for (uint t = 0u; t < n; ++t) {
            const float x = kvt_load(K, ulong(t) * d + c, p.hot_dtype);
            lo = min(lo, x);
            hi = max(hi, x);
        }
        klo[c] = lo;
        khi[c] = hi;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint c = tid; c < d; c += nthreads) {
        ushort a = 0, b = 0;
        if (!kvt_min_and_step(klo[c], khi[c], kmax, a, b)) bad[0] = 1u;
        kmin[c] = a;
        kstep[c] = b;
    }
    for (uint i = tid; i < ps * ng; i += nthreads) {
        const uint t = i / ng, gi = i % ng;
        ushort a = 0, b = 0;
        if (t < n) {
            float lo = INFINITY, hi = -INFINITY;
            for (uint j = 0u; j < p.value_group; ++j) {
                const float x = kvt_load(V, ulong(t) * d + gi * p.value_group + j, p.hot_dtype);
                lo = min(lo, x);
                hi = max(hi, x);
            }
            if (!kvt_min_and_step(lo, hi, vmax, a, b)) bad[0] = 1u;
        }
        vmin[i] = a;
        vstep[i] = b;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (bad[0] != 0u) {
        if (tid == 0u) fail[0] = 1u;
        return;
    }
    const uint krow = kvt_row_bytes(p.k_bits, d), vrow = kvt_row_bytes(p.v_bits, d);
    device uchar* blk = warm + ulong(p.warm_slot) * ulong(p.warm_page_bytes) + ulong(h) * ulong(p.head_bytes);
    for (uint b = tid; b < p.head_bytes; b += nthreads) {
        uchar out = 0;
        if (b >= p.k_min && b < p.k_min + 2u * d) {
            out = kvt_u16_byte(kmin, b - p.k_min);
        } else if (b >= p.k_step && b < p.k_step + 2u * d) {
            out = kvt_u16_byte(kstep, b - p.k_step);
        } else if (b >= p.v_min && b < p.v_min + 2u * ps * ng) {
            out = kvt_u16_byte(vmin, b - p.v_min);
        } else if (b >= p.v_step && b < p.v_step + 2u * ps * ng) {
            out = kvt_u16_byte(vstep, b - p.v_step);
        } else if (b >= p.k_codes && b < p.k_codes + ps * krow) {
            const uint rel = b - p.k_codes, t = rel / krow;
            if (t < n) out = kvt_key_byte(rel % krow, t, K, p, kmin, kstep);
        } else if (b >= p.v_codes && b < p.v_codes + ps * vrow) {
            const uint rel = b - p.v_codes, t = rel / vrow;
            if (t < n) out = kvt_value_byte(rel % vrow, t, V, p, vmin, vstep);
        }
        blk[b] = out;
    }
}
#ifndef KVT_EMU
#pragma clang fp contract(on)
#endif
