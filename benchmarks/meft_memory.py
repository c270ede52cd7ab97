"""MEFT memory table: saved activations, peak process memory and step time vs our LoRA and full fine-tuning.

Every (model, method, sequence length) runs in its own process: one forward whose saved-for-backward
tensors are counted (``saved_tensors_hooks``, parameters excluded, each storage once), then warm-up and
timed training steps (forward, backward, AdamW). Peak memory = the process's peak RSS (CPU) or
``torch.cuda.max_memory_allocated`` (GPU) minus the level after loading the model. Step time is the
median; its ratio to LoRA is taken within this run. MEFT's reconstruction error (relative, of the
rebuilt embedding output) in the last step is reported: large values mean the reversible gradient is
inaccurate at that depth (docs/meft.md).

    python benchmarks/meft_memory.py                                   # MiniLM + SmolLM2, seq 128/512/1024
    python benchmarks/meft_memory.py --models minilm --seqs 128 512 --steps 3

Writes benchmarks/results/meft_memory.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from step_benchmark import saved_activation_bytes  # noqa: E402

RESULTS = Path(__file__).parent / "results"
METHODS = {
    "full": None,
    "lora": {"method": "lora", "r": 8, "targets": ["q", "v"]},
    "meft1": {"method": "meft", "variant": 1},
    "meft2": {"method": "meft", "variant": 2},
    "meft3": {"method": "meft", "variant": 3},
    # hybrid depths that stay accurate (benchmarks/results/meft_stability.md); skipped where k > blocks
    "meft3-k2": {"method": "meft", "variant": 3, "reversible_layers": 2},
    "meft1-k12": {"method": "meft", "variant": 1, "reversible_layers": 12},
}
BATCH = {"minilm": 8, "smollm2-135m": 1}
SMOLLM_CACHE = Path("runs/smollm2-135m-fp32")  # the dequantized GGUF, saved once (loading GGUF takes ~25 s)


def _load(name: str):
    from peftlab.train.backbones import load_model

    if name == "smollm2-135m":
        import transformers as tf

        if not (SMOLLM_CACHE / "config.json").is_file():  # GGUF-loaded models refuse save_pretrained
            from safetensors.torch import save_model

            m = load_model(name)
            m.config.__dict__.pop("quantization_config", None)
            SMOLLM_CACHE.mkdir(parents=True, exist_ok=True)
            m.config.save_pretrained(SMOLLM_CACHE)
            save_model(m, str(SMOLLM_CACHE / "model.safetensors"))
        return tf.AutoModelForCausalLM.from_pretrained(SMOLLM_CACHE, dtype=torch.float32)
    return load_model(name)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def one(model_name: str, method: str, seq: int, steps: int) -> dict:
    import peftlab

    torch.manual_seed(0)
    model = _load(model_name)
    cuda = torch.cuda.is_available()
    if cuda:
        model = model.cuda()
    if METHODS[method] is not None:
        args = dict(METHODS[method])
        if args.get("reversible_layers", 0) > model.config.num_hidden_layers:
            return {}
        peftlab.attach(model, peftlab.get_config(args.pop("method"), **args))
    model.train()
    dev = next(model.parameters()).device
    b = BATCH[model_name]
    ids = torch.randint(100, 20000, (b, seq), generator=torch.Generator().manual_seed(0)).to(dev)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if model_name == "smollm2-135m":
        batch.update(labels=ids, use_cache=False)
    else:
        batch.update(labels=torch.zeros(b, dtype=torch.long, device=dev))
    base_mem = torch.cuda.memory_allocated() / 2**20 if cuda else _rss_mb()
    saved = saved_activation_bytes(model, batch)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    times = []
    for i in range(steps + 1):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i:  # the first step is warm-up
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    sh = model._modules.get("peftlab_shared")
    rec = next((getattr(m, "last_reconstruction_error", None) for m in (sh.values() if sh else [])), None)
    return {"model": model_name, "method": method, "seq": seq, "batch": b, "saved_mb": saved / 2**20,
            "peak_mb": peak, "peak_over_loaded_mb": peak - base_mem, "step_s": statistics.median(times),
            "trainable": sum(p.numel() for p in params), "reconstruction_error": rec,
            "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def to_markdown(rows: list[dict]) -> str:
    out = ["| model | seq | method | trainable | saved activations (MiB) | vs full | peak − loaded (MiB) | "
           "step (s) | time vs LoRA | reconstruction error |", "|" + "---|" * 10]
    for r in rows:
        ref = {x["method"]: x for x in rows if x["model"] == r["model"] and x["seq"] == r["seq"]}
        full, lora = ref.get("full"), ref.get("lora")
        red = f"−{100 * (1 - r['saved_mb'] / full['saved_mb']):.0f}%" if full and r["method"] != "full" else "—"
        tl = f"{r['step_s'] / lora['step_s']:.2f}×" if lora else "—"
        rec = f"{r['reconstruction_error']:.1e}" if r["reconstruction_error"] is not None else "—"
        out.append(f"| {r['model']} | {r['seq']} | {r['method']} | {r['trainable']:,} | {r['saved_mb']:.1f} | {red} | "
                   f"{r['peak_over_loaded_mb']:.0f} | {r['step_s']:.2f} | {tl} | {rec} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=["minilm", "smollm2-135m"])
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--seqs", nargs="*", type=int, default=[128, 512, 1024])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--results", default=str(RESULTS / "meft_memory"))
    ap.add_argument("--one", nargs=3, metavar=("MODEL", "METHOD", "SEQ"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print("RESULT " + json.dumps(one(a.one[0], a.one[1], int(a.one[2]), a.steps)), flush=True)
        return 0
    rows = []
    for m in a.models:
        for seq in a.seqs:
            if m == "minilm" and seq > 512:
                continue  # MiniLM's position embeddings stop at 512
            for meth in a.methods:
                r = subprocess.run([sys.executable, __file__, "--one", m, meth, str(seq), "--steps", str(a.steps)],
                                   capture_output=True, text=True)
                line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
                if r.returncode or not line:
                    print(f"{m} {meth} {seq}: failed\n{r.stderr[-2000:]}", file=sys.stderr)
                    continue
                if line[0] == "RESULT {}":
                    continue  # not applicable to this model
                rows.append(json.loads(line[0][7:]))
                print(json.dumps(rows[-1]), flush=True)
    res = Path(a.results)
    res.parent.mkdir(parents=True, exist_ok=True)
    res.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    res.with_suffix(".md").write_text(to_markdown(rows))
    print(to_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
