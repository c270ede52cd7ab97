"""``peftlab serve``: the HTTP server (FastAPI + uvicorn) over one base model and many adapters."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve many adapters on one base model over HTTP (mixed batches)")
    p.add_argument("--model", required=True, help="HF name or folder, or a short name: minilm, smollm2-135m")
    p.add_argument("--task", default=None, choices=["classification", "regression", "causal-lm"],
                   help="head to load (default: from the model)")
    p.add_argument("--num-labels", type=int, default=None, help="classification heads: number of labels")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="an adapter folder (repeatable)")
    p.add_argument("--adapters-dir", default=None, help="serve every adapter folder inside this folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=32, help="most rows in one model call")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a request waits for others to batch with")
    p.add_argument("--max-loaded", type=int, default=16, help="adapters attached at a time (LRU; others reload from disk)")
    p.add_argument("--truncate", action="store_true", help="cut /v1/predict inputs to the model length instead of 413")
    p.add_argument("--token", default=None, help="require 'Authorization: Bearer TOKEN' (or $PEFTLAB_SERVE_TOKEN)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=run)


def adapter_dirs(args) -> list[tuple[str | None, Path]]:
    from ..errors import PeftlabError
    from ..state import CONFIG_NAME

    out = []
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise PeftlabError(f"--adapter {spec!r}: expected NAME=DIR")
        out.append((name, Path(path)))
    if args.adapters_dir:
        root = Path(args.adapters_dir)
        if not root.is_dir():
            raise PeftlabError(f"--adapters-dir {root}: not a folder")
        out += [(d.name, d) for d in sorted(root.iterdir()) if (d / CONFIG_NAME).is_file()]
    return out


def build(args):
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    from .app import create_app
    from .store import AdapterStore, load_base

    model, tok, task = load_base(args.model, args.task, args.num_labels)
    store = AdapterStore(model, tok, task, max_loaded=args.max_loaded, truncate=args.truncate)
    for name, path in adapter_dirs(args):
        store.add(name, path)
    token = args.token or os.environ.get("PEFTLAB_SERVE_TOKEN") or None
    return create_app(store, args.max_batch, args.max_wait_ms, token), store


def run(args) -> int:
    import uvicorn

    from ..errors import PeftlabError

    try:
        app, store = build(args)
    except (PeftlabError, OSError, ImportError) as e:  # bad adapter folder, unknown model, missing package
        print(f"peftlab serve: {e}", file=sys.stderr)
        return 2
    print(f"peftlab serve: {store.task} model {args.model}, adapters {sorted(store.paths)}, "
          f"http://{args.host}:{args.port}", flush=True)
    # uvicorn drains in-flight requests on SIGINT/SIGTERM, then restores the previous handlers and raises the
    # signal again; handlers that ignore it there make a drained shutdown exit with status 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    # keep-alive 30 s (uvicorn's default is 5 s, the same as httpx's pool expiry: a client reusing a connection the
    # server is closing at that moment gets a ReadError; the load-test soak measured 1 in 22,341 requests)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=30,
                timeout_keep_alive=30)
    print("peftlab serve: stopped", flush=True)
    return 0
