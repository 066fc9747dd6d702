// Shared definitions of kvtier's Metal kernels: the parameter structs (mirrored by `#[repr(C)]`
// structs in `src/backend/metal/params.rs`: only 32-bit fields, so both sides lay them out the
// same way), dtype codes and conversions, and the warm-page code reader.
//
// The library is compiled with fast math off: demotion must produce the CPU's bytes exactly, so
// every float operation there is a plain IEEE f32 operation (division through `KVT_DIV`,
// correctly rounded), products are kept in their own statements, contraction is off in
// quant.metal, and f16 conversions are integer code (`kvt_f2h`, `kvt_h2f`).
#ifndef KVT_EMU
#include <metal_stdlib>
using namespace metal;
// Threadgroup memory binding 0 (a macro: the emulator's `threadgroup` qualifier is a no-op and
// would empty the attribute).
#define KVT_TG0 [[threadgroup(0)]]
// Correctly rounded f32 division in every math mode.
#define KVT_DIV(a, b) metal::precise::divide((a), (b))
#else
#define KVT_TG0
#define KVT_DIV(a, b) ((a) / (b))
#endif

// Element types (`HotDtype` / `InputDtype` on the Rust side).
#define KVT_F32 0u
#define KVT_F16 1u
#define KVT_BF16 2u

struct AppendParams {
    uint slot, first, n, kvh;
    uint ps, d, hot_dtype, src_dtype;
    uint hot_page_bytes, pad0, pad1, pad2;
};

struct QuantParams {
    uint hot_slot, warm_slot, n, ps;
    uint d, hot_dtype, hot_page_bytes, warm_page_bytes;
    uint head_bytes, k_bits, v_bits, value_group;
    uint k_min, k_step, v_min, v_step;
    uint k_codes, v_codes, pad0, pad1;
};

// One work item of decode: one page of one kv head of one sequence.
struct DecodeItem {
    uint seq, kv, page, tier;
    uint slot, n, k_bits, v_bits;
    uint k_min, k_step, v_min, v_step;
    uint k_codes, v_codes, head_bytes, pad0;
};

struct DecodeParams {
    uint n_items, qh, kvh, d;
    uint ps, g, hot_dtype, q_dtype;
    uint hot_page_bytes, warm_page_bytes, value_group, pad0;
    float scale, pad1, pad2, pad3;
};

struct CombineParams {
    uint n_seqs, qh, kvh, g;
    uint d, want_lse, pad0, pad1;
};

// `half::bf16::from_f32`: round to nearest even, NaN kept quiet with its sign.
inline ushort kvt_f2bf(float x) {
    const uint u = as_type<uint>(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return ushort((u >> 16) | 0x40u);
    const uint r = 0x8000u;
    if ((u & r) != 0u && (u & (3u * r - 1u)) != 0u) return ushort((u >> 16) + 1u);
    return ushort(u >> 16);
}

inline float kvt_bf2f(ushort b) { return as_type<float>(uint(b) << 16); }

// f32 -> f16 bits, round to nearest even, in integer operations (`half::f16::from_f32`): exact
// whatever the GPU does with subnormals (hardware conversions may flush them), for every byte the
// CPU must reproduce (appends and demotion).
inline ushort kvt_f2h(float x) {
    const uint u = as_type<uint>(x);
    const uint sign = (u & 0x80000000u) >> 16;
    const uint ex = u & 0x7f800000u, man = u & 0x007fffffu;
    if (ex == 0x7f800000u) return ushort(sign | 0x7c00u | (man != 0u ? 0x200u : 0u) | (man >> 13));
    const int he = int(ex >> 23) - 127 + 15;
    if (he >= 0x1f) return ushort(sign | 0x7c00u);
    if (he <= 0) {
        if (14 - he > 24) return ushort(sign);
        const uint m = man | 0x00800000u;
        uint hm = m >> uint(14 - he);
        const uint rb = 1u << uint(13 - he);
        if ((m & rb) != 0u && (m & (3u * rb - 1u)) != 0u) hm += 1u;
        return ushort(sign | hm);
    }
    const uint h = sign | (uint(he) << 10) | (man >> 13);
    const uint rb = 0x1000u;
    return ushort((man & rb) != 0u && (man & (3u * rb - 1u)) != 0u ? h + 1u : h);
}

// f16 bits -> f32, exactly (subnormals included), in integer operations.
inline float kvt_h2f(ushort b) {
    const uint sign = (uint(b) & 0x8000u) << 16;
    uint e = (uint(b) >> 10) & 0x1fu, m = uint(b) & 0x3ffu;
    if (e == 0x1fu) return as_type<float>(sign | 0x7f800000u | (m << 13));
    if (e == 0u) {
        if (m == 0u) return as_type<float>(sign);
        e = 1u;
        while ((m & 0x400u) == 0u) {
            m <<= 1;
            e -= 1u;
        }
        m &= 0x3ffu;
        return as_type<float>(sign | ((e + 112u) << 23) | (m << 13));
    }
    return as_type<float>(sign | ((e + 112u) << 23) | (m << 13));
}

// f16 bits -> f32 by the hardware conversion: for attention reads, where a flushed subnormal
// changes nothing beyond the kernels' tolerance.
inline float kvt_h2f_fast(ushort b) { return float(as_type<half>(b)); }

// Element `i` of a buffer of `dtype` elements (exact: appends and demotion).
inline float kvt_load(device const uchar* base, ulong i, uint dtype) {
    if (dtype == KVT_F32) return ((device const float*)base)[i];
    const ushort b = ((device const ushort*)base)[i];
    return dtype == KVT_F16 ? kvt_h2f(b) : kvt_bf2f(b);
}

// Element `i` of a buffer of `dtype` elements (attention reads).
inline float kvt_load_fast(device const uchar* base, ulong i, uint dtype) {
    if (dtype == KVT_F32) return ((device const float*)base)[i];
    const ushort b = ((device const ushort*)base)[i];
    return dtype == KVT_F16 ? kvt_h2f_fast(b) : kvt_bf2f(b);
}

// Stores `x` as element `i` of a `dtype` buffer (rounded to nearest even).
inline void kvt_store(device uchar* base, ulong i, uint dtype, float x) {
    if (dtype == KVT_F32) {
        ((device float*)base)[i] = x;
    } else {
        ((device ushort*)base)[i] = dtype == KVT_F16 ? kvt_f2h(x) : kvt_f2bf(x);
    }
}

// Code of channel `c` in a packed row of `bits`-bit codes (`quant::pack`): 8/4/2-bit codes are
// packed low bits first; 3-bit rows are two planes, `d / 4` bytes of low 2-bit fields then `d / 8`
// bytes of high bits.
inline uint kvt_code_at(device const uchar* row, uint c, uint bits, uint d) {
    if (bits == 8u) return uint(row[c]);
    if (bits == 4u) return (uint(row[c >> 1]) >> ((c & 1u) * 4u)) & 15u;
    const uint lo = (uint(row[c >> 2]) >> ((c & 3u) * 2u)) & 3u;
    if (bits == 2u) return lo;
    const uint hi = (uint(row[d / 4u + (c >> 3)]) >> (c & 7u)) & 1u;
    return lo | (hi << 2);
}

// Bytes of one packed row of `d` codes of `bits` bits.
inline uint kvt_row_bytes(uint bits, uint d) { return d * bits / 8u; }
