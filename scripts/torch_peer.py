#!/usr/bin/env python3
"""The peer of `kvtier bench`: one decode step of attention in torch, at the shapes kvtier measured,
in the same run (so kvtier's numbers can be quoted as ratios against it).

torch.nn.functional.scaled_dot_product_attention over an uncompressed K/V cache, one query token per
sequence: on CUDA bf16 on the flash backend with GQA in the kernel (`enable_gqa=True`: the kv heads
are read as stored); on the CPU f32 with torch's own CPU kernels, GQA by expanding the kv heads (the
copy is made once, outside the timed call). Median of
the timed calls, each followed by a synchronisation ("ms"), and the mean per call of calls queued
back to back with one synchronisation at the end ("queued_ms"). Prints one JSON object on stdout.

usage: torch_peer.py --device cpu|cuda --q-heads 32 --kv-heads 8 --dim 128 --tokens 4096,32768
                     [--batch 1] [--iters 20]
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
p.add_argument("--q-heads", type=int, default=32)
p.add_argument("--kv-heads", type=int, default=8)
p.add_argument("--dim", type=int, default=128)
p.add_argument("--tokens", default="4096")
p.add_argument("--batch", type=int, default=1)
p.add_argument("--iters", type=int, default=20)
a = p.parse_args()
if a.q_heads % a.kv_heads:
    raise SystemExit("q heads must be a multiple of kv heads")
dev = a.device
dtype = torch.bfloat16 if dev == "cuda" else torch.float32
torch.manual_seed(0)


def sync():
    if dev == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, iters):
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def queued_ms(fn, iters):
    """Mean time per call of `iters` calls queued back to back, one synchronisation at the end
    (the peer of kvtier's `attend_device_async` steps)."""
    for _ in range(3):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t0) * 1e3 / iters


rows = []
for n in [int(x) for x in a.tokens.split(",") if x.strip()]:
    q = torch.randn(a.batch, a.q_heads, 1, a.dim, device=dev, dtype=dtype)
    k = torch.randn(a.batch, a.kv_heads, n, a.dim, device=dev, dtype=dtype)
    v = torch.randn(a.batch, a.kv_heads, n, a.dim, device=dev, dtype=dtype)
    if dev == "cuda":
        # The flash kernel reads the kv heads as stored (GQA in the kernel), as a PyTorch user
        # on a GPU gets it; expanding them first would read q_heads / kv_heads times the bytes.
        def call():
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    else:
        # torch's CPU kernels: GQA by expanding the kv heads once, outside the timed call.
        rep = a.q_heads // a.kv_heads
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)

        def call():
            return F.scaled_dot_product_attention(q, k, v)
    with torch.no_grad():
        ms = median_ms(call, a.iters)
        queued = queued_ms(call, a.iters)
    rows.append({"tokens": n, "batch": a.batch, "ms": ms, "queued_ms": queued,
                 "kv_bytes": 2 * a.batch * a.kv_heads * n * a.dim * (2 if dtype == torch.bfloat16 else 4)})
    del q, k, v

print(json.dumps({
    "peer": f"torch {torch.__version__} scaled_dot_product_attention ({str(dtype).replace('torch.', '')}, {dev}"
            + (", flash, enable_gqa)" if dev == "cuda" else ", kv heads expanded)"),
    "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu",
    "threads": torch.get_num_threads(),
    "rows": rows,
}))
