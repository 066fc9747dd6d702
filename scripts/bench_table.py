#!/usr/bin/env python3
"""Prints the decode benchmark table from criterion's saved estimates (target/criterion):
median time, GB/s of cache bytes read, and the fraction of this machine's measured read bandwidth
(both the DRAM-sized and the L3-sized buffer). Run after `cargo bench --bench bandwidth` and
`cargo bench --bench decode` in the same session."""
import json, os, sys

root = os.path.join(os.path.dirname(__file__), "..", "target", "criterion")


def load(group, name, param):
    d = os.path.join(root, group, name, param, "new")
    try:
        est = json.load(open(os.path.join(d, "estimates.json")))
        bench = json.load(open(os.path.join(d, "benchmark.json")))
    except FileNotFoundError:
        return None
    t_ns = est["median"]["point_estimate"]
    tp = bench.get("throughput") or {}
    nbytes = tp.get("Bytes") or tp.get("BytesDecimal")
    return t_ns, nbytes


bw = {}
for size in ("dram_1GiB", "l3_32MiB"):
    r = load("bandwidth", "read", size)
    if r:
        bw[size] = r[1] / r[0]  # bytes per ns == GB/s
if not bw:
    sys.exit("no bandwidth results: run `cargo bench --bench bandwidth` first")
print("read bandwidth: " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in bw.items()))
print()
print(f"| shape | cache | tokens | ms/step | MiB read | GB/s | % DRAM bw | % L3 bw |")
print(f"|---|---|---|---|---|---|---|---|")
for shape in ("llama3-8b", "smollm2"):
    for mode in ("f16", "int4", "int2"):
        for tokens in ("4096", "32768"):
            r = load("decode", f"{shape}_{mode}", tokens)
            if not r:
                continue
            t_ns, nbytes = r
            gbs = nbytes / t_ns
            print(f"| {shape} | {mode} | {tokens} | {t_ns / 1e6:.3f} | {nbytes / 2**20:.1f} | {gbs:.2f} | "
                  f"{100 * gbs / bw.get('dram_1GiB', float('nan')):.0f}% | {100 * gbs / bw.get('l3_32MiB', float('nan')):.0f}% |")
