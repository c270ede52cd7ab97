"""Quantized bases on the real backbones: bytes, step time and peak memory, fp32 LoRA vs NF4 / int8 LoRA.

    python benchmarks/quant_bases.py --models minilm smollm2-135m --out benchmarks/results/quant_bases

Per model and base: bytes of the linears that get quantized (as fp32 and as stored), bytes of the whole
model, the time of one LoRA training step (batch 8, seq 128; the three bases alternate within one run, the
median over --steps is reported as a ratio to fp32) and the measured peak of a step (the same measurement as
benchmarks/memory_plan.py, in a fresh process each).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
HERE = Path(__file__).resolve().parent


def _model_bytes(model) -> int:
    from peftlab import quant

    seen, n = set(), 0
    q = quant.linear_bytes(model)["quantized"]
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen or t.dtype in (__import__("torch").uint8, __import__("torch").int8):
            continue
        seen.add(t.data_ptr())
        n += t.numel() * t.element_size()
    return n + q


def run(model_name: str, steps: int, batch: int, seq: int) -> list[dict]:
    import torch

    import peftlab
    from peftlab import quant
    from peftlab.planner import probe_inputs
    from peftlab.train.backbones import load_model

    models, rows = {}, []
    for base in ("fp32", "nf4", "int8"):
        torch.manual_seed(0)
        m = load_model(model_name)
        names = None
        if base != "fp32":
            quant.quantize(m, base)
            names = quant.quantization_info(m)["modules"]
        peftlab.attach(m, peftlab.LoRAConfig(r=8, targets=["q", "v"]))
        models[base] = (m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5))
        rows.append({"model": model_name, "base": base, "model_bytes": _model_bytes(m), "quantized_modules": names})
    fp_lin = {n: mod for n, mod in models["fp32"][0].named_modules()}
    for r in rows:
        if r["quantized_modules"]:
            q = models[r["base"]][0]
            r["linear_bytes_fp32"] = sum(fp_lin[n.replace(".base", "")].weight.numel() * 4
                                         for n in r["quantized_modules"] if n.replace(".base", "") in fp_lin)
            r["linear_bytes_stored"] = quant.linear_bytes(q)["quantized"]
            r["linear_ratio"] = r["linear_bytes_stored"] / r["linear_bytes_fp32"]
        r.pop("quantized_modules")
    inputs = probe_inputs(models["fp32"][0], batch, seq)
    times = {b: [] for b in models}
    for _ in range(steps + 1):  # the first round warms up
        for b, (m, opt) in models.items():
            m.train()
            t0 = time.perf_counter()
            m(**inputs).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times[b].append(time.perf_counter() - t0)
    base_t = statistics.median(times["fp32"][1:])
    for r in rows:
        r["step_ratio"] = statistics.median(times[r["base"]][1:]) / base_t
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=["minilm", "smollm2-135m"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/results/quant_bases")
    a = ap.parse_args(argv)
    rows = []
    for m in a.models:
        rows += run(m, a.steps, a.batch, a.seq)
        peaks = {}
        for method, base in (("lora", "fp32"), ("qlora-nf4", "nf4")):
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
            r = subprocess.run([sys.executable, str(HERE / "memory_plan.py"), "--batch", str(a.batch), "--one", m,
                                method, str(a.seq)], capture_output=True, text=True, env=env)
            line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
            peaks[base] = json.loads(line[0][7:])["measured"] if line else None
        for r in rows:
            if r["model"] == m and r["base"] in peaks:
                r["peak_bytes"] = peaks[r["base"]]
        print(json.dumps([r for r in rows if r["model"] == m]), flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    md = ["| model | base | quantized linears: stored / fp32 | model bytes | LoRA step time / fp32 | measured peak |",
          "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lin = f"{r['linear_ratio']:.3f}" if "linear_ratio" in r else "–"
        peak = f"{r['peak_bytes'] / 2**20:.0f} MiB" if r.get("peak_bytes") else "–"
        md.append(f"| {r['model']} | {r['base']} | {lin} | {r['model_bytes'] / 2**20:.1f} MiB | {r['step_ratio']:.2f} | {peak} |")
    cmd = "python benchmarks/quant_bases.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out.with_suffix(".md").write_text(f"# Quantized bases: bytes, step time, peak (batch {a.batch}, seq {a.seq})\n\n"
                                      f"`{cmd}`\n\n" + "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
