"""Step benchmark: training-step time and saved activations, ours vs Hugging Face peft, same run.

MiniLM sequence classification (packaged, offline), random tokens, batch 32, sequence 64 and 128.
For every case, our model and peft's are stepped *alternately* (forward, backward, AdamW step) after
warm-up; we report the median step time of each and their ratio, plus the bytes of activations saved
for backward (``saved_tensors_hooks``; each storage counted once; parameters excluded).

    python benchmarks/step_benchmark.py                        # all cases, seq 64 and 128
    python benchmarks/step_benchmark.py --cases lora dora --steps 20 --seq 128

Writes benchmarks/results/step_benchmark.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_cases import CASES, minilm_batch  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def saved_activation_bytes(model, batch) -> int:
    """Bytes of non-parameter tensors autograd saves for backward in one forward (each storage once)."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr not in param_ptrs and ptr not in seen:
            seen[ptr] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def make_step(model):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(batch):
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return step, sum(p.numel() for p in params)


def run_case(name, base, batch, warmup, steps, compiled: bool = False):
    """``compiled``: step ``torch.compile``d models (ours and the floor with ``fullgraph=True``; peft's without,
    as its forward has graph breaks); warm-up then includes compilation (its seconds are in ``*_warmup_s``)."""
    case = CASES[name]
    sides = {"ours": case["ours"](copy.deepcopy(base)).train()}
    if case["peft"] is not None:
        sides["peft"] = case["peft"](copy.deepcopy(base)).train()
    elif case.get("ref") in CASES:  # no incumbent: step our reference method (LoRA) in the same rotation instead
        sides["ref"] = CASES[case["ref"]]["ours"](copy.deepcopy(base)).train()
    if case.get("floor") is not None:
        sides["floor"] = case["floor"](copy.deepcopy(base)).train()
    out = {"case": name}
    for side, m in sides.items():
        out[f"{side}_saved_bytes"] = saved_activation_bytes(m, batch)
    if compiled:
        sides = {side: torch.compile(m, fullgraph=side != "peft") for side, m in sides.items()}
    steppers = {side: make_step(m) for side, m in sides.items()}
    for side, (_, n) in steppers.items():
        out[f"{side}_trainable"] = n
    times = {side: [] for side in sides}
    warm = {side: 0.0 for side in sides}
    for i in range(warmup + steps):
        order = list(steppers) if i % 2 == 0 else list(reversed(steppers))
        for side in order:
            dt = steppers[side][0](batch)
            if i >= warmup:
                times[side].append(dt)
            else:
                warm[side] += dt
    for side, ts in times.items():
        out[f"{side}_median_s"] = statistics.median(ts)
        out[f"{side}_steps_s"] = ts
        out[f"{side}_warmup_s"] = warm[side]
    if "peft" in sides:
        out["time_ratio_vs_peft"] = out["ours_median_s"] / out["peft_median_s"]
        # each round steps both sides back to back, so the per-round ratio cancels slow drift of the machine
        out["paired_ratio_vs_peft"] = statistics.median(o / p for o, p in zip(times["ours"], times["peft"]))
        out["saved_ratio_vs_peft"] = out["ours_saved_bytes"] / max(out["peft_saved_bytes"], 1)
    if "ref" in sides:
        out["paired_ratio_vs_ref"] = statistics.median(o / r for o, r in zip(times["ours"], times["ref"]))
        out["paired_ref"] = case["ref"]
    if "floor" in sides and "peft" in sides:  # each library's own cost above the shared floor
        f = out["floor_median_s"]
        out["floor_ratio_vs_peft"] = f / out["peft_median_s"]
        out["own_cost_ratio_vs_peft"] = (out["ours_median_s"] - f) / max(out["peft_median_s"] - f, 1e-9)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    ap.add_argument("--seq", nargs="*", type=int, default=[64, 128])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="step torch.compile'd models (fullgraph for ours)")
    ap.add_argument("--out", default=str(RESULTS / "step_benchmark"))
    args = ap.parse_args(argv)
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {list(CASES)}")
    torch.set_num_threads(args.threads)
    from peftlab.train.backbones import load_model

    base = load_model("minilm").train()
    rows = []
    for seq in args.seq:
        batch = minilm_batch(args.batch, seq, seed=seq)
        for name in args.cases:
            torch.manual_seed(0)
            r = run_case(name, base, batch, args.warmup, args.steps, compiled=args.compile)
            r.update(seq=seq, batch=args.batch)
            rows.append(r)
            print(json.dumps(r), flush=True)
    # ratios to a reference case of ours (e.g. DoRA vs our LoRA), same sequence length
    for r in rows:
        ref = CASES[r["case"]].get("ref")
        match = [x for x in rows if x["case"] == ref and x["seq"] == r["seq"]]
        if match:
            r[f"time_ratio_vs_our_{ref}"] = r["ours_median_s"] / match[0]["ours_median_s"]
    meta = {"torch": torch.__version__, "threads": args.threads, "machine": platform.machine(), "compile": args.compile,
            "steps": args.steps, "warmup": args.warmup, "command": " ".join(["python", *sys.argv])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    out.with_suffix(".md").write_text(to_markdown(rows, meta))
    print(to_markdown(rows, meta))
    return 0


def _fmt(v, spec):
    return "—" if v is None else format(v, spec)


def to_markdown(rows, meta) -> str:
    lines = [
        f"Step benchmark — MiniLM seq-cls, batch {rows[0]['batch'] if rows else '?'}, median of {meta['steps']} "
        f"alternating steps after {meta['warmup']} warm-up{', torch.compile' if meta.get('compile') else ''} (paired: median over rounds of the per-round ratio), torch {meta['torch']}, {meta['threads']} threads. "
        f"Command: `{meta['command']}`",
        "",
        "| case | seq | ours ms | peft ms | ours/peft time | paired ours/peft | ours/ref time | ours saved MB | peft saved MB | trainable (ours / peft) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ref = [k for k in r if k.startswith("time_ratio_vs_our_")]
        if "paired_ratio_vs_ref" in r:
            ref_cell = f"{r['paired_ratio_vs_ref']:.3f} (paired, {r['paired_ref']})"
        else:
            ref_cell = (_fmt(r[ref[0]], '.3f') + ' (' + ref[0][18:] + ')') if ref else '—'
        lines.append(
            f"| {r['case']} | {r['seq']} | {r['ours_median_s'] * 1e3:.0f} | {_fmt(r.get('peft_median_s') and r['peft_median_s'] * 1e3, '.0f')} "
            f"| {_fmt(r.get('time_ratio_vs_peft'), '.3f')} | {_fmt(r.get('paired_ratio_vs_peft'), '.3f')} | {ref_cell} "
            f"| {r['ours_saved_bytes'] / 2**20:.1f} | {_fmt(r.get('peft_saved_bytes') and r['peft_saved_bytes'] / 2**20, '.1f')} "
            f"| {r['ours_trainable']:,} / {_fmt(r.get('peft_trainable'), ',')} |"
        )
    floors = [r for r in rows if "own_cost_ratio_vs_peft" in r]
    if floors:
        lines += [
            "",
            "Floor: the same model with the base frozen and no adapter arithmetic, yet the gradient still flowing "
            "through the whole encoder (only layer 0's query bias and the head train), stepped in the same rotation. "
            "Own cost = step − floor.",
            "",
            "| case | seq | floor ms | floor/peft time | ours − floor ms | peft − floor ms | own cost ours/peft |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in floors:
            f = r["floor_median_s"]
            lines.append(
                f"| {r['case']} | {r['seq']} | {f * 1e3:.0f} | {r['floor_ratio_vs_peft']:.3f} "
                f"| {(r['ours_median_s'] - f) * 1e3:.0f} | {(r['peft_median_s'] - f) * 1e3:.0f} "
                f"| {r['own_cost_ratio_vs_peft']:.3f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
