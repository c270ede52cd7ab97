"""GLUE on MiniLM: full fine-tuning vs LoRA (ours and Hugging Face peft's, same loop) vs each method.

    python benchmarks/glue_minilm.py                                  # all methods x sst2 mrpc rte cola
    python benchmarks/glue_minilm.py --methods lora peft-lora --tasks sst2
    python benchmarks/glue_minilm.py --tasks mrpc --methods s4 s4-lora --lr 3e-3   # rows named s4@0.003 ...
    python benchmarks/glue_minilm.py --data-dir .gpu/glue --results /tmp/x   # GLUE root (or task folder)

SST-2 uses a fixed 8k training subset (task.subset_seed 0); other tasks their full training sets;
1 epoch, batch 32, max length 128, linear schedule with 6% warm-up, seed 42; dev-set metrics.
``peft-lora`` runs peft's LoRA inside the *same* training loop (same data order, seed, head) for a
like-for-like reference. Results append to benchmarks/results/glue_minilm.jsonl (one line per run,
so an interrupted sweep keeps what finished) and are tabulated in glue_minilm.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from peftlab.train import loop, run

RESULTS = Path(__file__).parent / "results"

# method name -> (peftlab method or "full", method_args, learning rate)
METHODS: dict[str, tuple[str, dict, float]] = {
    "full": ("full", {}, 5e-5),
    "lora": ("lora", {"r": 8, "alpha": 8, "targets": ["query", "value"]}, 5e-4),
    "peft-lora": ("lora", {"r": 8, "alpha": 8, "targets": ["query", "value"]}, 5e-4),
    "dora": ("dora", {"r": 8, "alpha": 8, "targets": ["query", "value"]}, 5e-4),
    "ia3": ("ia3", {}, 3e-3),
    "bitfit": ("bitfit", {}, 1e-3),
    # prefix: 20 virtual tokens per layer through the paper's MLP reparameterisation (its trainable count
    # includes that MLP; the saved prefix is 20 x 2 x 384 per layer); prompt tuning: 20 input tokens.
    # Learning rates are the usual ones for these methods (higher than LoRA's), not tuned here.
    "prefix": ("prefix", {"num_virtual_tokens": 20}, 5e-3),
    "prompt": ("prompt", {"num_virtual_tokens": 20}, 3e-2),
    # GOFT paper Table 5 learning rates and qGOFT lambda per task (METHODS.md §3.3)
    "goft": ("goft", {}, {"sst2": 8e-4, "cola": 1.6e-3, "rte": 2e-3, "mrpc": 8e-4}),
    "qgoft": ("qgoft", {"reg_lambda": {"sst2": 0.01, "cola": 0.05, "rte": 0.05, "mrpc": 0.01}},
              {"sst2": 8e-4, "cola": 8e-4, "rte": 2e-3, "mrpc": 1.2e-3}),
}
# S4 (paper's default preset "s4-model": [A,L] [A,P] [A,P,B] [P,B,L] over 4 spindle groups) at 0.5% of the
# backbone, against single strategies at the same budget (every group the same one strategy); lr 5e-4 for
# all (our choice, not tuned). Plain lora / bitfit above are the usual single-strategy baselines.
METHODS["s4"] = ("s4", {"preset": "s4-model", "budget": 0.005}, 5e-4)
for _n, _s in (("adapter", "A"), ("prefix", "P"), ("bitfit", "B"), ("lora", "L")):
    METHODS[f"s4-{_n}"] = ("s4", {"budget": 0.005, "strategies": [[_s]] * 4}, 5e-4)
# MEFT (METHODS.md §2.6: r = 8, lr grid 5e-4..8e-4; we take 8e-4 for the 1-epoch budget). MEFT3 runs its
# bottom 2 of 6 blocks reversibly: fully reversible MEFT3 (÷0.01 per block) loses the gradient (docs/meft.md).
for _v in (1, 2, 3):
    METHODS[f"meft{_v}"] = ("meft", {"variant": _v, **({"reversible_layers": 2} if _v == 3 else {})}, 8e-4)
# The survey's reparameterised family (issue 18): LoRA's targets, rank and learning rate unless the method's paper
# says otherwise. VeRA trains only scaling vectors (r = 256 shared projections) and its paper uses a much higher
# learning rate; AdaLoRA starts at rank 12 per layer and prunes to an average of 8 (LoRA's rank), with its
# schedule in steps: warm-up ~10% of training, final ~20% at the target budget, allocation every 10 steps.
_QV = {"targets": ["query", "value"]}
METHODS.update({
    "loha": ("loha", {"r": 8, "alpha": 8, **_QV}, 5e-4),
    "lokr": ("lokr", {"r": 8, "alpha": 8, **_QV}, 5e-4),
    "lora-fa": ("lora_fa", {"r": 8, "alpha": 8, **_QV}, 5e-4),
    "lora-plus": ("lora_plus", {"r": 8, "alpha": 8, "lr_ratio": 16.0, **_QV}, 5e-4),
    "pissa": ("lora", {"r": 8, "alpha": 8, "init": "pissa", **_QV}, 5e-4),
    "olora": ("lora", {"r": 8, "alpha": 8, "init": "olora", **_QV}, 5e-4),
    "vera": ("vera", {"r": 256, **_QV}, 4e-3),
    "dylora": ("dylora", {"r": 8, "alpha": 8, **_QV}, 5e-4),
    "adalora": ("adalora", {"r": 12, "target_r": 8, "alpha": 8, "delta_t": 10, **_QV,
                            "tinit": {"sst2": 25, "mrpc": 35}, "tfinal": {"sst2": 50, "mrpc": 70}}, 5e-4),
})
# Issue 19 (settings proposed with each method; learning rates untuned): the orthogonal family on every block
# linear like the GOFT rows, at GOFT's learning rate; hybrids at their papers' / AdapterHub's defaults;
# selective methods at 0.5% of the targeted entries.
_ALL = {"targets": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]}
METHODS.update({
    "oft": ("oft", {"block_size": 16, **_ALL}, 8e-4),
    "boft": ("boft", {"block_size": 8, "n_butterfly_factor": 2, **_ALL}, 8e-4),
    "mam": ("mam", {}, 1e-3),
    "unipelt": ("unipelt", {}, 5e-4),
    "compacter": ("compacter", {"placement": "pfeiffer"}, 3e-3),
    "ssf": ("ssf", {}, 3e-3),
    "p-tuning": ("p_tuning", {"num_virtual_tokens": 20}, 1e-3),
    "ln-tuning": ("ln_tuning", {}, 1e-3),
    "fishmask": ("fishmask", {"keep_fraction": 0.005, "num_samples": 1024}, 5e-4),
    "diff-pruning": ("diff_pruning", {"keep_fraction": 0.005, "finetune_fraction": 0.3}, 5e-5),
})
# QLoRA-style (issue 20): LoRA on an NF4 base (bitsandbytes, block 64, double-quantized scales); the
# classification head and LayerNorms stay fp32. Rows with a base quantization are named METHOD-nf4 / -int8.
METHODS["lora-nf4"] = METHODS["lora"]
QUANTIZED = {"lora-nf4": "nf4"}
# PST vs magnitude and movement pruning (same cubic schedule: warm-up 10%, cool-down 30%, same epochs),
# METHODS.md §4; the full-size-update baselines use the full fine-tuning learning rate
for _s in (50, 70, 90):
    METHODS[f"pst-{_s}"] = ("pst", {"final_sparsity": _s / 100}, 5e-4)
    METHODS[f"mag-lora-{_s}"] = ("magnitude_prune", {"final_sparsity": _s / 100, "update": "lora"}, 5e-4)
    METHODS[f"mag-full-{_s}"] = ("magnitude_prune", {"final_sparsity": _s / 100, "update": "full"}, 5e-5)
    METHODS[f"mov-{_s}"] = ("movement_prune", {"final_sparsity": _s / 100}, 5e-5)
# Sanh et al.'s proportions for a multi-epoch run (--epochs 3): one epoch of score accumulation at density 1
# (their initial_warmup = 1 epoch), the last epoch at the final sparsity. Same rows for PST / magnitude.
for _name in ("pst-50", "mag-full-50", "mov-50"):
    _m, _kw, _lr = METHODS[_name]
    METHODS[f"{_name}-w1"] = (_m, {**_kw, "warmup": 1 / 3, "cooldown": 1 / 3}, _lr)


def _bench_name(method: str, lr: float | None) -> str:
    """The row name: the method, or METHOD@LR when the learning rate is overridden."""
    return f"{method}@{lr:g}" if lr is not None else method


def _run_dir(task: str, bench_name: str, seed: int, subset_seed: int | None) -> str:
    return f"{task}-{bench_name}-s{seed}" + (f"-ss{subset_seed}" if subset_seed else "")


def _metric(task: str) -> str:
    """The GLUE metric a table cell shows for a task."""
    return {"cola": "matthews", "mrpc": "f1"}.get(task, "accuracy")


def _per_task(v, task):
    """A value, or a dict task -> value."""
    return v[task] if isinstance(v, dict) and task in v else v
TASKS = {"sst2": {"train_limit": 8000}, "mrpc": {}, "rte": {}, "cola": {}}
_BUILD_MODEL = loop.build_model  # the original, before run_one patches it for peft-* methods


def _peft_build_model(cfg, data):
    """Like loop.build_model, but attaches Hugging Face peft's LoRA instead of ours."""
    import peft

    method, cfg.method = cfg.method, "full"
    model, tok = _BUILD_MODEL(cfg, data)
    cfg.method = method
    a = cfg.method_args
    pcfg = peft.LoraConfig(r=a["r"], lora_alpha=a["alpha"], target_modules=a["targets"], task_type="SEQ_CLS")
    return peft.get_peft_model(model, pcfg), tok


def run_one(method: str, task: str, epochs: float, out_root: Path, seed: int, data_dir: str | None = None,
            lr: float | None = None, subset_seed: int | None = None) -> dict:
    """One training run; ``lr`` overrides the method's learning rate (the row is then named METHOD@LR);
    ``subset_seed`` picks another fixed training subset where the task uses one (SST-2's 8k)."""
    name, args, default_lr = METHODS[method]
    bench_name = _bench_name(method, lr)
    lr = _per_task(default_lr, task) if lr is None else lr
    args = {k: _per_task(v, task) for k, v in args.items()}
    cfg = {
        "model": "minilm", "method": name, "method_args": args,
        **({"model_args": {"quantize": QUANTIZED[method]}} if method in QUANTIZED else {}),
        "task": {"name": task, **TASKS[task], **({"data_dir": data_dir} if data_dir else {}),
                 **({"subset_seed": subset_seed} if subset_seed is not None else {})},
        "train": {"epochs": epochs, "batch_size": 32, "lr": lr, "max_length": 128, "warmup_ratio": 0.06,
                  "schedule": "linear", "seed": seed, "progress": False},
        "output_dir": str(out_root / _run_dir(task, bench_name, seed, subset_seed)),
    }
    original, original_save = loop.build_model, loop._save_best
    if method.startswith("peft-"):
        loop.build_model = _peft_build_model
        loop._save_best = lambda model, path, cfg: model.save_pretrained(path)
    try:
        t0 = time.perf_counter()
        res = run(cfg)
        res["wall_s"] = time.perf_counter() - t0
    finally:
        loop.build_model, loop._save_best = original, original_save
    import torch

    res.update(bench_method=bench_name, lr=lr, epochs=epochs, seed=seed, subset_seed=subset_seed or 0, torch=torch.__version__,
               device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    return res


def to_markdown(rows: list[dict]) -> str:
    """One column per (task, epochs) pair measured; the last run of each (method, task, epochs) wins."""
    cols = sorted({(r["task"], r["epochs"]) for r in rows}, key=lambda c: (list(TASKS).index(c[0]), c[1]))
    methods = list(dict.fromkeys(r["bench_method"] for r in rows))
    names = [t if e == 1 else f"{t} ({e:g} ep)" for t, e in cols]
    head = "| method | trainable params | " + " | ".join(names) + " | train time (s, sum) |"
    lines = [head, "|" + "---|" * (len(cols) + 3)]
    for m in methods:
        cells, t_sum, params = [], 0.0, None
        for t, e in cols:
            r = [x for x in rows if x["bench_method"] == m and x["task"] == t and x["epochs"] == e]
            if not r:
                cells.append("—")
                continue
            r = r[-1]
            f = r["final"]
            metric = _metric(t)
            extra = f" / acc {f['accuracy']:.3f}" if t == "mrpc" else ""
            cells.append(f"{f[metric]:.3f}{extra}")
            t_sum += r["train_time_s"]
            params = r["trainable_params"]
        lines.append(f"| {m} | {params:,} | " + " | ".join(cells) + f" | {t_sum:.0f} |")
    note = ("\nMetrics: SST-2 / RTE accuracy, MRPC F1 (and accuracy), CoLA Matthews correlation; final dev score "
            "after training. Trainable parameters include the classification head. Columns are 1 epoch unless "
            "marked. Majority-class reference on the dev sets: SST-2 0.509, MRPC F1 0.812 / acc 0.684, RTE 0.527, "
            "CoLA 0.000; a cell at that value means the run never left the constant prediction.\n\n"
            "A cell comes from `python benchmarks/glue_minilm.py --methods METHOD --tasks TASK`, with `--epochs 3` "
            "for a (3 ep) column and `--lr LR` for a row named METHOD@LR; each method's settings (rank, targets, "
            "learning rate) are its entry in `METHODS` of that script. Train time is wall time on a 2-core machine "
            "often shared with other runs: not a speed comparison (benchmarks/step_benchmark.py is).\n")
    return "\n".join(lines) + "\n" + note + runs_markdown(rows)


def runs_markdown(rows: list[dict]) -> str:
    """Every run of a (method, task, epochs) measured more than once (seeds, training subsets), with the mean."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["bench_method"], r["task"], r["epochs"]), []).append(r)
    multi = {k: v for k, v in groups.items() if len(v) > 1}
    if not multi:
        return ""
    lines = ["", "Repeated runs (each run's final dev score; the table above shows the last):", "",
             "| method | task | epochs | (seed, subset seed): score | mean |", "|---|---|---:|---|---:|"]
    for (m, t, e), rs in multi.items():
        metric = _metric(t)
        vals = [r["final"][metric] for r in rs]
        runs = ", ".join(f"({r.get('seed', '?')}, {r.get('subset_seed', 0)}): {v:.3f}" for r, v in zip(rs, vals))
        lines.append(f"| {m} | {t} | {e:g} | {runs} | {sum(vals) / len(vals):.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--tasks", nargs="*", default=list(TASKS))
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--lr", type=float, default=None, help="override every method's learning rate; rows are named METHOD@LR")
    ap.add_argument("--subset-seed", type=int, default=None,
                    help="seed of the fixed training subset (SST-2's 8k); default 0")
    ap.add_argument("--out", default="runs/glue_minilm")
    ap.add_argument("--results", default=str(RESULTS / "glue_minilm"))
    ap.add_argument("--data-dir", default=None,
                    help="GLUE root (holding SST-2/, MRPC/ ...) or a task folder; default ../shared/data beside the checkout")
    args = ap.parse_args(argv)
    res_path = Path(args.results)
    res_path.parent.mkdir(parents=True, exist_ok=True)
    jl = res_path.with_suffix(".jsonl")
    done = set()
    if jl.is_file():  # resume an interrupted sweep: skip (method, task, seed, epochs) already measured
        for x in jl.read_text().splitlines():
            if x.strip():
                r = json.loads(x)
                done.add((r["bench_method"], r["task"], r["seed"], r["epochs"], r.get("subset_seed", 0)))
    for task in args.tasks:
        for m in args.methods:
            if m not in METHODS:
                ap.error(f"unknown method {m}; known {list(METHODS)}")
            bench_name = _bench_name(m, args.lr)
            if (bench_name, task, args.seed, args.epochs, args.subset_seed or 0) in done:
                continue
            import shutil

            shutil.rmtree(Path(args.out) / _run_dir(task, bench_name, args.seed, args.subset_seed), ignore_errors=True)
            r = run_one(m, task, args.epochs, Path(args.out), args.seed, args.data_dir, lr=args.lr,
                        subset_seed=args.subset_seed)
            with open(jl, "a") as f:
                f.write(json.dumps(r) + "\n")
            print(json.dumps({k: r[k] for k in ("bench_method", "task", "final", "train_time_s", "trainable_params")}), flush=True)
    rows = [json.loads(x) for x in jl.read_text().splitlines() if x.strip()]
    res_path.with_suffix(".md").write_text(to_markdown(rows))
    print(to_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
