// Host emulator of kvtier's Metal kernels (feature `metal-emu`; see shim.h): runs a 1-D grid of
// threadgroups one after another, each thread of a threadgroup a fiber (ucontext) switched at
// every `threadgroup_barrier`, with the kernel's threadgroup memory freshly poisoned per group
// (so a kernel that reads it before writing shows up). Called from `src/backend/metal/emu.rs`.
#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

#define KVT_EMU 1
#include "shim.h"
#include "../kernels/common.metal"
#include "../kernels/append.metal"
#include "../kernels/quant.metal"
#include "../kernels/decode.metal"

namespace {

struct Launch {
    int kid;
    uint group;
    uint threads;
    uchar* smem;
    uchar* const* bufs;
    const uchar* params;
};

const size_t kStack = 256 * 1024;

struct Fiber {
    ucontext_t ctx;
    std::vector<char> stack;
    uint tid;
    bool done;
};

ucontext_t g_main;
std::vector<Fiber> g_fibers;
size_t g_current;
const Launch* g_launch;

void run_thread(uint tid) {
    const Launch& l = *g_launch;
    uchar* const* b = l.bufs;
    switch (l.kid) {
        case 0:
            kvt_append(b[0], b[1], b[2], *(const AppendParams*)l.params, l.group, tid, l.threads);
            break;
        case 1:
            kvt_quantize(b[0], b[1], (uint*)b[2], *(const QuantParams*)l.params, l.group, tid,
                         l.threads, l.smem);
            break;
        case 2:
            kvt_decode(b[0], b[1], b[2], (const DecodeItem*)b[3], (float*)b[4],
                       *(const DecodeParams*)l.params, l.group, tid, l.threads, l.smem);
            break;
        case 3:
            kvt_combine((const float*)b[0], (const uint*)b[1], (const DecodeItem*)b[2], (float*)b[3],
                        (float*)b[4], (float*)b[5], (const uint*)b[6],
                        *(const CombineParams*)l.params, l.group, tid, l.threads);
            break;
        default:
            break;
    }
}

void fiber_main() {
    Fiber& f = g_fibers[g_current];
    run_thread(f.tid);
    f.done = true;
    swapcontext(&f.ctx, &g_main);
}

}  // namespace

void kvt_emu_barrier() {
    Fiber& f = g_fibers[g_current];
    swapcontext(&f.ctx, &g_main);
}

// Runs `groups` threadgroups of `threads` threads of kernel `kernel` (0 append, 1 quantize,
// 2 decode, 3 combine; gpu.rs's `Kernel`). `bufs[i]` is buffer i with its offset applied.
// Returns 0, or -1 for an unknown kernel.
extern "C" int kvt_emu_run(int kid, uint groups, uint threads, size_t tg_bytes,
                           uchar* const* bufs, size_t n_bufs, const uchar* params) {
    if (kid < 0 || kid > 3 || threads == 0) return -1;
    (void)n_bufs;
    std::vector<uchar> smem(tg_bytes + 16);
    g_fibers.resize(threads);
    for (auto& f : g_fibers) f.stack.resize(kStack);
    for (uint gid = 0; gid < groups; ++gid) {
        // 0xff bytes read as NaN floats and all-ones integers.
        std::memset(smem.data(), 0xff, smem.size());
        Launch l{kid, gid, threads, smem.data(), bufs, params};
        g_launch = &l;
        for (uint t = 0; t < threads; ++t) {
            Fiber& f = g_fibers[t];
            f.tid = t;
            f.done = false;
            getcontext(&f.ctx);
            f.ctx.uc_stack.ss_sp = f.stack.data();
            f.ctx.uc_stack.ss_size = f.stack.size();
            f.ctx.uc_link = nullptr;
            makecontext(&f.ctx, fiber_main, 0);
        }
        // Phases: each fiber runs to its next barrier (or its end), then the next one; a phase
        // ends when every fiber has had its turn, so no fiber passes a barrier before all reach it.
        bool any = true;
        while (any) {
            any = false;
            for (uint t = 0; t < threads; ++t) {
                if (g_fibers[t].done) continue;
                g_current = t;
                swapcontext(&g_main, &g_fibers[t].ctx);
                any = true;
            }
        }
    }
    g_launch = nullptr;
    return 0;
}
