"""Inference time of the base MiniLM vs GOFT merged and unloaded (a plain HF model): alternating, median.

    python benchmarks/merged_inference.py
"""
import copy
import statistics
import time

import torch

import peftlab
from peftlab.train.backbones import load_model

torch.manual_seed(0)
base = load_model("minilm").eval()
m = copy.deepcopy(base)
peftlab.attach(m, peftlab.get_config("goft"))
with torch.no_grad():
    for p in peftlab.trainable_parameters(m).values():
        p.add_(0.01 * torch.randn_like(p))
peftlab.unload(m, merge=True)
x = {"input_ids": torch.randint(1000, 20000, (32, 128)), "attention_mask": torch.ones(32, 128, dtype=torch.long)}
ts = {"base": [], "merged": []}
with torch.no_grad():
    for i in range(8):
        for name, mod in (("base", base), ("merged", m)) if i % 2 == 0 else (("merged", m), ("base", base)):
            t = time.perf_counter()
            mod(**x)
            ts[name].append(time.perf_counter() - t)
b, g = statistics.median(ts["base"][2:]), statistics.median(ts["merged"][2:])
print(f"base {b*1e3:.0f} ms, GOFT merged {g*1e3:.0f} ms, ratio {g/b:.3f}")
