"""Load test of ``peftlab serve``: 16 adapters with Zipf popularity at concurrency 1 / 8 / 32.

Starts the server itself (a subprocess on a free 127.0.0.1 port; the load test never talks to any other
host), makes ``--adapters`` random LoRA adapters for the model in a temporary folder, and sends a bounded
number of /v1/predict requests per concurrency level (``--requests``, and at most ``--level-seconds``
each), then an optional soak at the highest concurrency (``--soak-seconds``). Reports throughput, p50 / p95 /
p99 latency, error count (must be 0) and the server's RSS before and after; writes JSON + Markdown to
``benchmarks/results/load_test.*`` and stops the server with SIGTERM (its exit status is reported too).

    python benchmarks/load_test.py                                     # MiniLM, 200 requests per level
    python benchmarks/load_test.py --requests 60 --level-seconds 15    # the short verification run
    python benchmarks/load_test.py --soak-seconds 600                  # plus a 10-minute soak
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = "a the film plot was wonderful dull charming acting story scenes loved boring great slow".split()


def make_adapters(model_name: str, n: int, out: Path, seed: int = 0) -> None:
    import torch

    import peftlab
    from peftlab.train.backbones import load_model

    base = load_model(model_name).eval()
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        peftlab.attach(base, peftlab.LoRAConfig(r=[4, 8, 16][i % 3], targets=["q", "v"]), f"z{i:02d}")
        with torch.no_grad():
            for p in peftlab.trainable_parameters(base).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        peftlab.save(base, out / f"z{i:02d}", f"z{i:02d}")
        peftlab.delete(base, f"z{i:02d}")


def zipf_weights(n: int, s: float = 1.1) -> list[float]:
    w = [1 / (k + 1) ** s for k in range(n)]
    return [x / sum(w) for x in w]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


async def level(client, names, weights, concurrency: int, n_requests: int, seconds: float, rng) -> dict:
    """``concurrency`` workers send requests back to back until ``n_requests`` are sent or ``seconds`` pass
    (a worker pool, so a soak bounded only by time holds ``concurrency`` requests in flight, never more)."""
    lat, errors, done = [], [], 0
    t_end = time.perf_counter() + seconds
    sent = 0

    async def worker():
        nonlocal done, sent
        while sent < n_requests and time.perf_counter() < t_end:
            sent += 1
            body = {"adapter": rng.choices(names, weights)[0], "inputs": [" ".join(rng.choices(WORDS, k=12))]}
            t = time.perf_counter()
            try:
                r = await client.post("/v1/predict", json=body)
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(f"{type(e).__name__}: {e}")
            lat.append(time.perf_counter() - t)
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": done, "seconds": round(wall, 3),
            "throughput_rps": round(done / wall, 2) if wall else None,
            "p50_ms": round(pct(lat, 50) * 1e3, 1), "p95_ms": round(pct(lat, 95) * 1e3, 1),
            "p99_ms": round(pct(lat, 99) * 1e3, 1), "errors": len(errors), "error_samples": errors[:3]}


def rss_mb(pid: int) -> float:
    import psutil

    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


def rss_trend(samples: list[tuple[float, float]]) -> dict:
    """Memory growth over a soak: RSS at its start, after its first minute (warm: batch shapes and allocator
    pools seen), at its end, and the least-squares slope (MB/min) after the first minute."""
    warm = [s for s in samples if s[0] >= 60] or samples
    n = len(warm)
    mt = sum(t for t, _ in warm) / n
    mr = sum(r for _, r in warm) / n
    var = sum((t - mt) ** 2 for t, _ in warm)
    slope = sum((t - mt) * (r - mr) for t, r in warm) / var * 60 if var else 0.0
    return {"rss_mb_soak_start": samples[0][1], "rss_mb_soak_warm": warm[0][1], "rss_mb_soak_end": samples[-1][1],
            "rss_mb_min_warm": min(r for _, r in warm), "rss_mb_max_warm": max(r for _, r in warm),
            "rss_slope_mb_per_min": round(slope, 2)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def drive(args, url: str, names: list[str], pid: int) -> dict:
    import httpx

    rng = random.Random(args.seed)
    weights = zipf_weights(len(names))
    out = {"rss_mb_before": rss_mb(pid), "levels": []}
    # idle connections expire on the client (10 s) before the server closes them (30 s): no keep-alive race
    limits = httpx.Limits(max_connections=max(args.concurrency) + 4, keepalive_expiry=10)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        await level(c, names, weights, 1, 5, 30, rng)  # warm-up (loads the first adapters), not reported
        for conc in args.concurrency:
            out["levels"].append(await level(c, names, weights, conc, args.requests, args.level_seconds, rng))
            print(json.dumps(out["levels"][-1]), flush=True)
        if args.soak_seconds > 0:
            big = 10**9  # bounded by time
            samples = []  # (seconds into the soak, server RSS MB), every --rss-every seconds

            async def sample():
                t0 = time.perf_counter()
                while True:
                    samples.append((round(time.perf_counter() - t0, 1), rss_mb(pid)))
                    await asyncio.sleep(args.rss_every)

            sampler = asyncio.create_task(sample())
            out["soak"] = await level(c, names, weights, max(args.concurrency), big, args.soak_seconds, rng)
            sampler.cancel()
            samples.append((round(args.soak_seconds, 1), rss_mb(pid)))
            out["soak"]["rss_samples"] = samples
            out["soak"].update(rss_trend(samples))
            print(json.dumps(out["soak"]), flush=True)
        out["server_health"] = (await c.get("/health")).json()
    out["rss_mb_after"] = rss_mb(pid)
    return out


def markdown(res: dict) -> str:
    lines = [f"# peftlab serve load test ({res['model']}, {res['adapters']} adapters, Zipf s=1.1)", "",
             f"Command: `{res['command']}`", "",
             f"max-batch {res['max_batch']}, max-wait {res['max_wait_ms']} ms, max-loaded {res['max_loaded']}, "
             f"server threads {res['threads'] or 'default'}; "
             f"{res['cpu']} (1-min load average {res.get('load_average_1min', '?')} at the end: other work shares them); server RSS {res['rss_mb_before']} MB before, {res['rss_mb_after']} MB after; "
             f"server exit status {res['server_exit']}.", "",
             "| concurrency | requests | req/s | p50 ms | p95 ms | p99 ms | errors |", "|---|---|---|---|---|---|---|"]
    for r in res["levels"] + ([res["soak"]] if "soak" in res else []):
        soak = " (soak)" if r is res.get("soak") else ""
        lines.append(f"| {r['concurrency']}{soak} | {r['requests']} | {r['throughput_rps']} | {r['p50_ms']} | "
                     f"{r['p95_ms']} | {r['p99_ms']} | {r['errors']} |")
    if "soak" in res:
        k = res["soak"]
        lines += ["", f"Soak memory (server RSS, sampled every {res.get('rss_every', '?')} s): {k['rss_mb_soak_start']} MB "
                  f"at its start, {k['rss_mb_soak_warm']} MB after its first minute, {k['rss_mb_soak_end']} MB at its "
                  f"end; after the first minute between {k['rss_mb_min_warm']} and {k['rss_mb_max_warm']} MB, "
                  f"least-squares slope {k['rss_slope_mb_per_min']} MB/min."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=200, help="requests per concurrency level (upper bound)")
    ap.add_argument("--level-seconds", type=float, default=60, help="time limit per level")
    ap.add_argument("--soak-seconds", type=float, default=0)
    ap.add_argument("--rss-every", type=float, default=15, help="soak: seconds between server RSS samples")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5)
    ap.add_argument("--max-loaded", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="the server's torch threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "load_test"))
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="peftlab-load-"))
    make_adapters(args.model, args.adapters, tmp / "adapters", args.seed)
    names = sorted(p.name for p in (tmp / "adapters").iterdir())
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PEFTLAB_SERVE_TOKEN", None)
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "peftlab", "serve", "--model", args.model, "--adapters-dir",
                             str(tmp / "adapters"), "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
                             "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
                             "--max-loaded", str(args.max_loaded),
                             *(["--threads", str(args.threads)] if args.threads else [])], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        t0 = time.time()
        while True:
            if proc.poll() is not None or time.time() - t0 > 180:
                raise SystemExit("server did not start:\n" + (tmp / "server.log").read_text()[-3000:])
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        res = asyncio.run(drive(args, url, names, proc.pid))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "killed after 60 s"
    res.update(model=args.model, adapters=len(names), max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
               threads=args.threads, rss_every=args.rss_every, load_average_1min=round(os.getloadavg()[0], 1),
               max_loaded=args.max_loaded, server_exit=code, cpu=f"{os.cpu_count()} CPU cores",
               command="python benchmarks/load_test.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    total_errors = sum(r["errors"] for r in res["levels"]) + res.get("soak", {}).get("errors", 0)
    return 0 if total_errors == 0 and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
