"""Subcommand ``explore SPACE.yaml``."""

from __future__ import annotations

import json


def _explore(args) -> int:
    from ..explore import budget_bytes, explore, load

    cfg = load(args.space, args.overrides)
    if args.backend:
        cfg.backend = args.backend
    if args.workers:
        cfg.workers = args.workers
    if args.address:
        cfg.ray_address = args.address
    if args.budget:
        cfg.memory_budget = args.budget
        budget_bytes(cfg)
    n = [0]

    def progress(rec):
        n[0] += 1
        msg = (f"score {rec['score']:.2f}" if "score" in rec else f"SKIPPED {rec['skipped']}" if "skipped" in rec
               else f"FAILED {rec['error'][:80]}")
        print(f"[{n[0]}] {rec['id']}: {msg}", flush=True)

    summary = explore(cfg, progress=progress)
    print(json.dumps(summary["chosen"], indent=2))
    print(f"report: {cfg.output_dir}/report.md")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("explore", help="explore the S4 design space (sample, train briefly, compare EDFs)")
    p.add_argument("space", help="exploration YAML (see docs/s4.md)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. samples=20 space.pattern=spindle")
    p.add_argument("--backend", choices=["local", "ray"], help="where trials run (default: the YAML's, local)")
    p.add_argument("--workers", type=int, help="parallel trials (process pool or Ray CPUs)")
    p.add_argument("--address", help="Ray cluster address (default: start Ray locally)")
    p.add_argument("--budget", help="memory budget such as 8GiB: designs whose predicted peak training memory "
                   "(peftlab plan) exceeds it are skipped and recorded (YAML: memory_budget)")
    p.set_defaults(func=_explore)
