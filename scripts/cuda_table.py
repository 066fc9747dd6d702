#!/usr/bin/env python3
"""Markdown decode table from one device run: kvtier-gpu-bench --json, torch_decode.py --json
(one file per shape) and flashinfer_decode.py --json (one file per shape), all from the same run.

usage: cuda_table.py KVTIER.json --torch T1.json [T2.json] --flashinfer F1.json [F2.json] [--variant default]

Ratios are peer time / kvtier time (> 1: kvtier faster). "FI bf16" is the faster of FlashInfer's
bf16 decode on CUDA cores and on tensor cores; "FI fp8" its fp8 e4m3 KV on tensor cores. % probe is
kvtier's bytes actually read (codes, scales, hot pages) over its time, against the read probe of
the same run.
"""
import argparse, json

p = argparse.ArgumentParser()
p.add_argument("kvtier")
p.add_argument("--torch", nargs="*", default=[])
p.add_argument("--flashinfer", nargs="*", default=[])
p.add_argument("--variant", default="default")
a = p.parse_args()

kv = json.load(open(a.kvtier))
probe = kv["read_probe_GBps"]
torch = {}
for f in a.torch:
    for r in json.load(open(f))["rows"]:
        torch[(r["q_heads"], r["kv_heads"], r["dim"], r["batch"], r["seq"])] = r["sdpa_flash_ms"]
fi = {}
for f in a.flashinfer:
    for r in json.load(open(f))["rows"]:
        if "ms" in r:
            fi[(r["mode"], r["q_heads"], r["kv_heads"], r["dim"], r["batch"], r["seq"])] = r["ms"]


def ratio(peer, ms):
    return f"{peer / ms:.2f}" if peer else "-"


print(f"read probe {probe:.0f} GB/s; device {kv['device']}\n")
print("| q/kv/d | B | S | mode | path | ms | GB/s read | % probe | x torch flash | x FI bf16 | x FI fp8 |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for r in kv["rows"]:
    if r.get("variant", "default") != a.variant:
        continue
    k = (r["q_heads"], r["kv_heads"], r["dim"], r["batch"], r["seq"])
    bf = [fi.get((m,) + k) for m in ("bf16", "bf16_tc")]
    bf = min([x for x in bf if x], default=None)
    fp8 = fi.get(("fp8_tc",) + k)
    s = r["seq"]
    sl = f"{s // 1024}K" if s >= 1024 else str(s)
    print(
        f"| {k[0]}/{k[1]}/{k[2]} | {k[3]} | {sl} | {r['mode']} | {r.get('path', '?')} | {r['ms']:.4f} | "
        f"{r['GBps']:.0f} | {r['pct_read_bw']:.1f} | {ratio(torch.get(k), r['ms'])} | "
        f"{ratio(bf, r['ms'])} | {ratio(fp8, r['ms'])} |"
    )
