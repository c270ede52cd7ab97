"""Mixed-adapter batch throughput: peftlab.batch_adapters vs peft's ``adapter_names`` vs the base model
vs running each adapter's rows separately; plus unmerged single-adapter inference vs the base model.

For each model (MiniLM classification, SmolLM2-135M causal LM: one forward over the batch), n distinct
LoRA adapters (r=8 on q, v) in a batch of ``--batch`` rows, n in 1, 4, 16, 64, rows assigned to adapters
with uniform or Zipf (s=1.1) popularity (every adapter appears at least once when n <= batch). Times are
medians over ``--repeats`` alternating runs after a warm-up; throughput = rows / s. Also checks that our
mixed batch equals the separate runs (max |Δ| of the outputs). Goals (issue 21): >= 2x peft's throughput at
16 adapters; unmerged single-adapter inference <= 1.10x the base model's time.

    python benchmarks/serving_benchmark.py                               # full run (the integrator's)
    python benchmarks/serving_benchmark.py --tiny --out /tmp/smoke       # seconds: tiny random models
    python benchmarks/serving_benchmark.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

import peftlab

ROOT = Path(__file__).resolve().parents[1]
PEFT_TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}


def load(name: str, tiny: bool):
    if tiny:
        from peftlab.testing import tiny_model

        return tiny_model("bert" if name == "minilm" else "llama")
    from peftlab.train.backbones import load_model

    return load_model(name).eval()


def assign(n: int, batch: int, popularity: str, rng: random.Random) -> list[str]:
    names = [f"a{i}" for i in range(n)]
    if popularity == "uniform":
        w = [1.0] * n
    else:
        w = [1 / (k + 1) ** 1.1 for k in range(n)]
    rows = names[:batch] + rng.choices(names, w, k=max(0, batch - n))
    rng.shuffle(rows)
    return rows


def build(base, n: int, r: int, seed: int):
    """(ours, peft model) with the same n random LoRA adapters."""
    from peft import LoraConfig, get_peft_model

    g = torch.Generator().manual_seed(seed)
    ours = copy.deepcopy(base)
    for i in range(n):
        peftlab.attach(ours, peftlab.LoRAConfig(r=r, targets=["q", "v"]), f"a{i}")
    peftlab.set_active(ours, [f"a{i}" for i in range(n)])
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=g)
    ours.eval()
    targets = PEFT_TARGETS[base.config.model_type]
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=r, target_modules=targets), adapter_name="a0")
    for i in range(1, n):
        pm.add_adapter(f"a{i}", LoraConfig(r=r, lora_alpha=r, target_modules=targets))
    with torch.no_grad():  # copy our weights into peft's, so both compute the same model
        from peftlab.core import slots

        for path, slot in slots(ours):
            mod = pm.base_model.model.get_submodule(path)
            for k, ad in slot.adapters.items():
                mod.lora_A[k].weight.copy_(ad.lora_A)
                mod.lora_B[k].weight.copy_(ad.lora_B)
    return ours, pm.eval()


def timed(fn, repeats: int) -> list[float]:
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return ts


def measure(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, alternating the order between repeats, after one warm-up each."""
    with torch.no_grad():
        for f in fns.values():
            f()
        ts = {k: [] for k in fns}
        for i in range(repeats):
            for k in (list(fns) if i % 2 == 0 else list(reversed(fns))):
                ts[k] += timed(fns[k], 1)
    return {k: statistics.median(v) for k, v in ts.items()}


def mixed_row(name, base, ours, pm, x, names, args) -> dict:
    dev = x["input_ids"].device
    groups = {}
    for i, a in enumerate(names):
        groups.setdefault(a, []).append(i)
    groups = {a: torch.tensor(rows, device=dev) for a, rows in groups.items()}

    def run_ours():
        with peftlab.batch_adapters(ours, names):
            return ours(**x).logits

    def run_separate():
        res = None
        for a, rows in groups.items():
            peftlab.set_active(ours, [a])
            y = ours(**{k: v.index_select(0, rows) for k, v in x.items()}).logits
            res = y.new_empty((len(names), *y.shape[1:])) if res is None else res
            res.index_copy_(0, rows, y)
        return res

    fns = {"ours": run_ours, "peft": lambda: pm(**x, adapter_names=names).logits,
           "base": lambda: base(**x).logits, "separate": run_separate}
    with torch.no_grad():
        diff = (run_ours() - run_separate()).abs().max().item()
        peft_diff = (run_ours() - fns["peft"]()).abs().max().item()
    med = measure(fns, args.repeats)
    return {"model": name, "adapters": len(groups), "batch": args.batch, "seq": args.seq,
            **{f"{k}_rows_per_s": round(args.batch / v, 1) for k, v in med.items()},
            "ours_vs_peft": round(med["peft"] / med["ours"], 2),
            "ours_vs_separate": round(med["separate"] / med["ours"], 2),
            "ours_time_vs_base": round(med["ours"] / med["base"], 3),
            "max_abs_diff_vs_separate": diff, "max_abs_diff_vs_peft": peft_diff}


def generate_row(name, base, ours, pm, x, names, args) -> dict:
    """Decode throughput (new tokens / s) of greedy ``generate`` with the KV cache: the serving workload of a
    causal LM, where each decode step is one token per row, so per-adapter overhead is not hidden behind a
    long sequence's matmuls as it is in one forward over ``--seq`` tokens."""
    p = {k: v[:, : args.gen_prompt] for k, v in x.items()}
    kw = {"max_new_tokens": args.gen_tokens, "min_new_tokens": args.gen_tokens, "do_sample": False,
          "pad_token_id": 0}
    groups = {}
    for i, a in enumerate(names):
        groups.setdefault(a, []).append(i)

    def run_ours():
        with peftlab.batch_adapters(ours, names):
            return ours.generate(**p, **kw)

    def run_separate():
        res = torch.empty(len(names), args.gen_prompt + args.gen_tokens, dtype=torch.long)
        for a, rows in groups.items():
            peftlab.set_active(ours, [a])
            idx = torch.tensor(rows)
            res[idx] = ours.generate(**{k: v[idx] for k, v in p.items()}, **kw).cpu()
        return res

    fns = {"ours": run_ours, "peft": lambda: pm.generate(**p, adapter_names=names, **kw),
           "base": lambda: base.generate(**p, **kw), "separate": run_separate}
    with torch.no_grad():
        mine = run_ours().cpu()
        same_sep = bool(torch.equal(mine, run_separate()))
        same_peft = bool(torch.equal(mine, fns["peft"]().cpu()))
    med = measure(fns, args.repeats)
    toks = len(names) * args.gen_tokens
    return {"model": name, "mode": "generate", "adapters": len(groups), "batch": len(names),
            "prompt": args.gen_prompt, "new_tokens": args.gen_tokens,
            **{f"{k}_tokens_per_s": round(toks / v, 1) for k, v in med.items()},
            "ours_vs_peft": round(med["peft"] / med["ours"], 2),
            "ours_vs_separate": round(med["separate"] / med["ours"], 2),
            "ours_time_vs_base": round(med["ours"] / med["base"], 3),
            "same_tokens_as_separate": same_sep, "same_tokens_as_peft": same_peft}


def bench_model(name: str, args, rng) -> list[dict]:
    dev = torch.device(args.device)
    base = load(name, args.tiny).to(dev, getattr(torch, args.dtype))
    vocab = base.config.vocab_size
    x = {"input_ids": torch.randint(5, vocab - 1, (args.batch, args.seq), device=dev),
         "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long, device=dev)}
    out = []
    for n in args.adapters:
        ours, pm = build(base, n, args.r, args.seed)
        ours, pm = ours.to(dev, base.dtype), pm.to(dev, base.dtype)  # adapters in the base dtype too
        for pop in ("uniform", "zipf") if n > 1 else ("uniform",):
            names = assign(n, args.batch, pop, rng)
            row = {**mixed_row(name, base, ours, pm, x, names, args), "popularity": pop}
            print(json.dumps(row), flush=True)
            out.append(row)
            if args.gen_tokens and base.config.model_type != "bert":
                row = {**generate_row(name, base, ours, pm, x, names, args), "popularity": pop}
                print(json.dumps(row), flush=True)
                out.append(row)
        if n == args.adapters[0]:  # unmerged single-adapter inference (the ordinary fused forward) vs base
            peftlab.set_active(ours, ["a0"])
            med = measure({"single": lambda m=ours: m(**x), "base": lambda: base(**x)}, args.repeats)
            out.append({"model": name, "single_adapter_time_vs_base": round(med["single"] / med["base"], 3)})
            print(json.dumps(out[-1]), flush=True)
    return out


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Mixed-adapter batch throughput ({meta['device']}, {meta['threads']} threads)", "",
             f"Command: `{meta['command']}`", "",
             f"Batch {meta['batch']} rows x {meta['seq']} tokens, LoRA r={meta['r']} on q, v; rows/s, median of "
             f"{meta['repeats']} alternating runs.", "",
             "| model | adapters | popularity | ours | peft adapter_names | separate | base | ours / peft | "
             "ours / separate | max abs diff |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "adapters" in r and r.get("mode") != "generate":
            lines.append(f"| {r['model']} | {r['adapters']} | {r['popularity']} | {r['ours_rows_per_s']} | "
                         f"{r['peft_rows_per_s']} | {r['separate_rows_per_s']} | {r['base_rows_per_s']} | "
                         f"{r['ours_vs_peft']}x | {r['ours_vs_separate']}x | {r['max_abs_diff_vs_separate']:.1e} |")
    gen = [r for r in rows if r.get("mode") == "generate"]
    if gen:
        lines += ["", f"Greedy generate, KV cache: prompt {gen[0]['prompt']} tokens, {gen[0]['new_tokens']} new tokens "
                  "per row; new tokens/s, median of the same alternating runs. 'same tokens' = our tokens equal "
                  "the separate runs' and peft's.", "",
                  "| model | adapters | popularity | ours | peft adapter_names | separate | base | ours / peft | "
                  "ours / separate | same tokens |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in gen:
            lines.append(f"| {r['model']} | {r['adapters']} | {r['popularity']} | {r['ours_tokens_per_s']} | "
                         f"{r['peft_tokens_per_s']} | {r['separate_tokens_per_s']} | {r['base_tokens_per_s']} | "
                         f"{r['ours_vs_peft']}x | {r['ours_vs_separate']}x | "
                         f"{r['same_tokens_as_separate'] and r['same_tokens_as_peft']} |")
    lines.append("")
    for r in rows:
        if "single_adapter_time_vs_base" in r:
            lines.append(f"- {r['model']}: unmerged single-adapter forward time / base = "
                         f"{r['single_adapter_time_vs_base']} (goal <= 1.10)")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=lambda s: s.split(","), default=["minilm", "smollm2-135m"])
    ap.add_argument("--adapters", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16, 64])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--gen-tokens", type=int, default=16, help="causal LMs: also time greedy generate of N new "
                    "tokens with the KV cache (0 = skip)")
    ap.add_argument("--gen-prompt", type=int, default=16, help="prompt length for --gen-tokens")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--tiny", action="store_true", help="tiny random models instead of the real ones (smoke test)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serving_benchmark"))
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    rows = []
    for name in args.models:
        rows += bench_model(name, args, rng)
    meta = {"device": args.device, "dtype": args.dtype,
            "threads": torch.get_num_threads(), "batch": args.batch, "seq": args.seq, "r": args.r,
            "repeats": args.repeats, "tiny": args.tiny, "torch": torch.__version__,
            "command": "python benchmarks/serving_benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    out.with_suffix(".md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
