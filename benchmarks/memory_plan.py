"""Memory planner vs measured peak: one training step per (model, method, seq), each in its own process.

    python benchmarks/memory_plan.py --models minilm smollm2-135m --seq 128 512 --batch 8 \
        --out benchmarks/results/memory_plan

Measured peak = parameter and buffer bytes + optimizer-state bytes (both as held) + the rise of the resident
set during the third step over its level before it (Linux VmHWM, reset through /proc/self/clear_refs;
glibc is told to mmap every allocation above 64 KiB so freed tensors leave the resident set). Predicted =
``peftlab.plan(...)`` made before any step, in the same process. Writes JSON and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

METHODS = {
    "full": None,
    "lora": ("lora", {"r": 8, "targets": ["q", "v"]}),
    "dora": ("dora", {"r": 8, "targets": ["q", "v"]}),
    "adapter": ("adapter", {"bottleneck": 64}),
    "prefix": ("prefix", {"num_virtual_tokens": 16}),
    "goft": ("goft", {}),
    "pst": ("pst", {"r1": 8, "r2": 8}),
    "meft": ("meft", {"variant": 1, "r": 8}),
    "s4": ("s4", {"budget": 0.01}),
    "qlora-nf4": ("lora", {"r": 8, "targets": ["q", "v"]}),
    # causal LMs, multiple-choice QA: 2 answer tokens scored; LM head on every position vs on the answers only
    "lora-mcqa-fullhead": ("lora", {"r": 8, "targets": ["q", "v"]}),
    "lora-mcqa": ("lora", {"r": 8, "targets": ["q", "v"]}),
}
ANSWER_TOKENS = 2


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def one(model_name: str, method: str, seq: int, batch: int) -> dict:
    import torch

    import peftlab
    from peftlab import quant
    from peftlab.planner import plan, probe_inputs

    torch.manual_seed(0)
    from peftlab.train.backbones import load_model

    model = load_model(model_name)
    if method.startswith("qlora"):
        quant.quantize(model, "nf4")
    if METHODS[method] is not None:
        name, params = METHODS[method]
        peftlab.attach(model, peftlab.get_config(name, **params))
    mcqa = method.startswith("lora-mcqa")
    if mcqa and not hasattr(model, "get_output_embeddings"):
        raise SystemExit(f"{method} needs a causal LM")
    scored = ANSWER_TOKENS if method == "lora-mcqa" else None
    t0 = time.perf_counter()
    p = plan(model, batch_size=batch, seq_len=seq, scored_tokens=scored)
    plan_s = time.perf_counter() - t0
    trainable = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5)
    inputs = probe_inputs(model, batch, seq, ANSWER_TOKENS if mcqa else None)
    model.train()

    def step():
        from peftlab.lm_head import answer_loss

        loss = answer_loss(model, inputs) if scored else model(**inputs).loss
        extra = peftlab.training_loss(model) if peftlab.core.has_adapters(model) else None
        (loss + extra if extra is not None else loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    step()
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss("VmRSS")
    t0 = time.perf_counter()
    step()
    step_s = time.perf_counter() - t0
    rise = _rss("VmHWM") - before
    held = {id(t): t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())}
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    measured = sum(held.values()) + state + rise
    return {"model": model_name, "method": method, "seq": seq, "batch": batch, "predicted": p.peak(),
            "measured": measured, "ratio": p.peak() / measured, "plan": p.to_dict(), "rss_rise": rise,
            "optimizer_state_measured": state, "plan_seconds": plan_s, "step_seconds": step_s}


def to_markdown(rows: list[dict], cmd: str) -> str:
    md = ["| model | method | seq | batch | predicted | measured | predicted / measured |",
          "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            md.append(f"| {r['model']} | {r['method']} | {r['seq']} | {r['batch']} | – | – | error: {r['error']} |")
        else:
            md.append(f"| {r['model']} | {r['method']} | {r['seq']} | {r['batch']} | {r['predicted'] / 2**20:.0f} MiB"
                      f" | {r['measured'] / 2**20:.0f} MiB | {r['ratio']:.3f} |")
    return f"# Memory planner: predicted vs measured peak\n\n`{cmd}`\n\n" + "\n".join(md) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=["minilm", "smollm2-135m"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--seq", nargs="+", type=int, default=[128, 512])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results/memory_plan")
    ap.add_argument("--one", nargs=3, metavar=("MODEL", "METHOD", "SEQ"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print("RESULT " + json.dumps(one(a.one[0], a.one[1], int(a.one[2]), a.batch)))
        return 0
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", HF_HUB_OFFLINE="1")
    rows, out = [], Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for m in a.models:
        for meth in a.methods:
            if (meth == "meft" and m not in ("minilm", "smollm2-135m")) or (meth.startswith("lora-mcqa") and m == "minilm"):
                continue
            for s in a.seq:
                r = subprocess.run([sys.executable, __file__, "--batch", str(a.batch), "--one", m, meth, str(s)],
                                   capture_output=True, text=True, env=env)
                line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
                if r.returncode or not line:
                    rows.append({"model": m, "method": meth, "seq": s, "batch": a.batch,
                                 "error": (r.stderr.strip().splitlines() or ["?"])[-1]})
                else:
                    rows.append(json.loads(line[0][7:]))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "plan"}), flush=True)
                out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    cmd = "python benchmarks/memory_plan.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out.with_suffix(".md").write_text(to_markdown(rows, cmd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
