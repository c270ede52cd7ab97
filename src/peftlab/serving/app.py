"""The HTTP app of ``peftlab serve`` (FastAPI): one base model, many adapters, mixed micro-batches.

Endpoints: ``GET /health``, ``GET /v1/adapters``, ``POST /v1/adapters`` ({"path", "name"?}),
``DELETE /v1/adapters/{name}``, ``POST /v1/predict`` ({"adapter", "inputs": [text, ...]}; classification
and regression heads) and ``POST /v1/generate`` ({"adapter", "prompt", "max_new_tokens", "temperature"};
causal LMs; temperature 0 = greedy). ``"adapter": null`` is the base model.
Errors are JSON ``{"error": message}``: 404 unknown adapter, 422 malformed JSON or wrong fields, 413 input
longer than the model (unless ``truncate``), 409 adapter for another base (or a taken name), 400 an
unreadable adapter folder or a request the model cannot batch, 401 missing/wrong bearer token (every
endpoint except /health), 500 anything else — the server keeps serving.
"""

from __future__ import annotations

import contextlib
import secrets

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    CorruptAdapterError,
    IncompatibleAdapterError,
    PeftlabError,
)
from .batcher import MicroBatcher, ServingFailure
from .store import AdapterStore, InputTooLongError, Row

STATUS = ((ServingFailure, 500), (AdapterNotFoundError, 404), (InputTooLongError, 413), (IncompatibleAdapterError, 409),
          (AdapterExistsError, 409), (CorruptAdapterError, 400), (PeftlabError, 400))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PredictRequest(_Strict):
    adapter: str | None = None
    inputs: list[str] = Field(min_length=1)


class GenerateRequest(_Strict):
    adapter: str | None = None
    prompt: str = Field(min_length=1)
    max_new_tokens: int = Field(default=32, ge=1, le=4096)
    temperature: float = Field(default=0.0, ge=0.0, le=10.0)


class AddAdapterRequest(_Strict):
    path: str
    name: str | None = None


def create_app(store: AdapterStore, max_batch: int = 32, max_wait_ms: float = 5.0, token: str | None = None) -> FastAPI:
    batcher = MicroBatcher(store, max_batch, max_wait_ms)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()  # uvicorn has already drained the in-flight requests

    app = FastAPI(title="peftlab serve", lifespan=lifespan)
    app.state.store, app.state.batcher = store, batcher

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if token and request.url.path != "/health":
            got = request.headers.get("authorization", "")
            if not secrets.compare_digest(got.encode(), f"Bearer {token}".encode()):
                return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401)
        return await call_next(request)

    @app.exception_handler(PeftlabError)
    async def peftlab_error(request, exc):
        code = next(c for cls, c in STATUS if isinstance(exc, cls))
        return JSONResponse({"error": str(exc)}, status_code=code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        errs = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()]
        return JSONResponse({"error": "invalid request: " + "; ".join(errs)}, status_code=422)

    @app.exception_handler(Exception)
    async def crashed(request, exc):
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    def known(name):
        if name is not None and name not in store.paths:
            raise AdapterNotFoundError(f"no adapter named {name!r}; registered: {sorted(store.paths)}")

    def needs(task_ok: bool, what: str):
        if not task_ok:
            raise PeftlabError(f"{what} is not available: the model is a {store.task} model")

    @app.get("/health")
    async def health():
        return {"status": "ok", "task": store.task, "adapters": len(store.paths), "loaded": len(store.loaded),
                "batches": batcher.batches, "loads": store.loads}

    @app.get("/v1/adapters")
    async def list_adapters():
        return {"adapters": await batcher.call(store.listing), "max_loaded": store.max_loaded}

    @app.post("/v1/adapters", status_code=201)
    async def add_adapter(req: AddAdapterRequest):
        name = await batcher.call(store.add, req.name, req.path)
        return {"name": name, "path": req.path}

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str):
        await batcher.call(store.remove, name)
        return {"deleted": name}

    @app.post("/v1/predict")
    async def predict(req: PredictRequest):
        needs(store.task in ("classification", "regression"), "/v1/predict")
        known(req.adapter)
        for t in req.inputs:
            store.check_length(t)
        out = await batcher.submit(("predict",), [Row(req.adapter, t) for t in req.inputs])
        return {"adapter": req.adapter, "predictions": out}

    @app.post("/v1/generate")
    async def generate(req: GenerateRequest):
        needs(store.task == "causal-lm", "/v1/generate")
        known(req.adapter)
        store.check_length(req.prompt, extra=req.max_new_tokens)
        out = await batcher.submit(("generate", req.max_new_tokens, req.temperature), [Row(req.adapter, req.prompt)])
        return {"adapter": req.adapter, **out[0]}

    return app
