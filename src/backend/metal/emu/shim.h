// The subset of the Metal Shading Language that kvtier's kernels use, as C++17, so that the same
// `.metal` sources run on the host (feature `metal-emu`). What it emulates: the address-space
// qualifiers (no-ops), `half` (`_Float16`: IEEE binary16, round to nearest even, as Metal's
// float -> half conversion), `as_type`, the math functions the kernels call (f32 libm, as Rust's
// f32 methods), and `threadgroup_barrier` (a fiber switch: every thread of a threadgroup is a
// fiber, run in turn between barriers). What it cannot show: the Metal compiler's own diagnostics,
// GPU memory ordering beyond barriers, and speed.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;
typedef _Float16 half;

static_assert(sizeof(ulong) == 8, "ulong is 64-bit in MSL");
static_assert(sizeof(half) == 2, "half is binary16");

template <typename T, typename F>
inline T as_type(F x) {
    static_assert(sizeof(T) == sizeof(F), "as_type needs equal sizes");
    T t;
    std::memcpy(&t, &x, sizeof(T));
    return t;
}

namespace kvt_emu {
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline uint min(uint a, uint b) { return a < b ? a : b; }
inline uint max(uint a, uint b) { return a > b ? a : b; }
inline float exp(float x) { return std::exp(x); }
inline float log(float x) { return std::log(x); }
inline float round(float x) { return std::round(x); }
inline bool isfinite(float x) { return std::isfinite(x); }
}  // namespace kvt_emu
using namespace kvt_emu;

enum class mem_flags { mem_none, mem_threadgroup, mem_device };

// Switches to the next fiber of the threadgroup (runtime.cpp).
void kvt_emu_barrier();
inline void threadgroup_barrier(mem_flags) { kvt_emu_barrier(); }

// Address spaces and function qualifiers: no-ops on the host. Defined after every standard
// header (`thread` would otherwise break <thread>).
#define device
#define threadgroup
#define thread
#define constant const
#define kernel
