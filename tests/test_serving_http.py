"""`peftlab serve` end to end: a real uvicorn server in a subprocess on a free 127.0.0.1 port."""

import asyncio
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import peftlab

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

TOKEN = "s3cret"
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _tokenizer():
    from peftlab.train.backbones import load_tokenizer

    try:
        return load_tokenizer("minilm")  # a real WordPiece tokenizer, offline
    except ImportError as e:
        pytest.skip(str(e))


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peftlab.trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _bert(vocab, hidden=32):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=48, num_labels=3)
    return tf.BertForSequenceClassification(cfg).eval()


def _llama(vocab):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, eos_token_id=None)
    return tf.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    tok = _tokenizer()
    base = _bert(len(tok))
    base.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    for i, (name, cfg) in enumerate([("a", peftlab.LoRAConfig(r=4)), ("b", peftlab.IA3Config()),
                                     ("c", peftlab.DoRAConfig(r=2, targets=["q", "k"]))]):
        m = peftlab.attach(_bert(len(tok)), cfg, name)
        _perturb(m, i)
        peftlab.save(m, root / "adapters" / name, name)
    other = peftlab.attach(_bert(len(tok), hidden=48), peftlab.LoRAConfig(r=2), "other")
    peftlab.save(other, root / "other", "other")
    lm = _llama(len(tok))
    lm.save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    for i, (name, cfg) in enumerate([("g1", peftlab.LoRAConfig(r=4, targets=["q", "v", "o"])),
                                     ("g2", peftlab.DoRAConfig(r=2))]):
        m = peftlab.attach(_llama(len(tok)), cfg, name)
        _perturb(m, 10 + i)
        peftlab.save(m, root / "lm_adapters" / name, name)
    procs = {
        "cls": _start(root, ["--model", str(root / "model"), "--adapters-dir", str(root / "adapters"),
                             "--max-loaded", "2", "--max-wait-ms", "40", "--token", TOKEN]),
        "lm": _start(root, ["--model", str(root / "lm"), "--adapter", f"g1={root / 'lm_adapters' / 'g1'}",
                            "--adapter", f"g2={root / 'lm_adapters' / 'g2'}", "--max-wait-ms", "40"]),
    }
    try:
        for p in procs.values():
            _wait_ready(p)
        yield root, tok, procs
    finally:
        for p in procs.values():
            if p.proc.poll() is None:
                p.proc.kill()


class _Server:
    def __init__(self, proc, port, log):
        self.proc, self.url, self.log = proc, f"http://127.0.0.1:{port}", log


def _start(root, args):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(root / f"server-{port}.log", "w")
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PEFTLAB_SERVE_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "peftlab", "serve", "--port", str(port), "--log-level", "warning",
                             *args], stdout=log, stderr=subprocess.STDOUT, env=env)
    return _Server(proc, port, root / f"server-{port}.log")


def _wait_ready(server, timeout=45):
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert server.proc.poll() is None, server.log.read_text()
        try:
            if httpx.get(server.url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError("server did not start: " + server.log.read_text())


@functools.cache
def _reference_model(root, adapter, kind="model"):
    import transformers as tf

    auto = tf.AutoModelForSequenceClassification if kind == "model" else tf.AutoModelForCausalLM
    m = auto.from_pretrained(root / kind).eval()
    if adapter:
        peftlab.load(m, root / ("adapters" if kind == "model" else "lm_adapters") / adapter)
    return m


def _reference_probs(root, tok, adapter, texts):
    m = _reference_model(root, adapter)
    with torch.no_grad():
        return m(**tok(texts, return_tensors="pt", padding=True)).logits.softmax(-1)


def test_mixed_predictions_equal_single_adapter_runs(served):
    root, tok, procs = served
    url, auth = procs["cls"].url, {"Authorization": f"Bearer {TOKEN}"}
    reqs = [("a", ["a fine film", "dull"]), ("b", ["what a plot twist"]), (None, ["ok then"]), ("a", ["meh"]),
            ("b", ["great", "awful acting here"])]

    async def go():
        async with httpx.AsyncClient(base_url=url, headers=auth, timeout=30) as c:
            before = (await c.get("/health")).json()
            rs = await asyncio.gather(*(c.post("/v1/predict", json={"adapter": a, "inputs": t}) for a, t in reqs))
            after = (await c.get("/health")).json()
            return before, rs, after

    before, rs, after = asyncio.run(go())
    for (a, texts), r in zip(reqs, rs):
        assert r.status_code == 200, r.text
        got = torch.tensor([p["probabilities"] for p in r.json()["predictions"]])
        for i, t in enumerate(texts):
            torch.testing.assert_close(got[i], _reference_probs(root, tok, a, [t])[0], atol=1e-4, rtol=1e-4)
    assert after["batches"] - before["batches"] < len(reqs)  # requests for different adapters shared batches
    # LRU: with --max-loaded 2, asking for c evicts one of a/b, which is then reloaded from disk
    c = httpx.Client(base_url=url, headers=auth, timeout=30)
    loads = after["loads"]
    for name in ("c", "a", "b"):
        r = c.post("/v1/predict", json={"adapter": name, "inputs": ["once more"]})
        torch.testing.assert_close(torch.tensor(r.json()["predictions"][0]["probabilities"]),
                                   _reference_probs(root, tok, name, ["once more"])[0], atol=1e-4, rtol=1e-4)
    health = c.get("/health").json()
    assert health["loaded"] == 2 and health["loads"] > loads
    listing = c.get("/v1/adapters").json()
    assert sorted(x["name"] for x in listing["adapters"]) == ["a", "b", "c"] and listing["max_loaded"] == 2


def test_bad_requests_get_clear_codes_and_server_keeps_serving(served):
    root, _, procs = served
    c = httpx.Client(base_url=procs["cls"].url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert httpx.post(procs["cls"].url + "/v1/predict", json={"inputs": ["x"]}).status_code == 401
    assert httpx.get(procs["cls"].url + "/v1/adapters", headers={"Authorization": "Bearer nope"}).status_code == 401
    cases = [
        (c.post("/v1/predict", json={"adapter": "zzz", "inputs": ["x"]}), 404, "zzz"),
        (c.post("/v1/predict", content=b"{not json", headers={"content-type": "application/json"}), 422, "invalid"),
        (c.post("/v1/predict", json={"adapter": "a", "text": ["x"]}), 422, "inputs"),
        (c.post("/v1/predict", json={"adapter": "a", "inputs": "not a list"}), 422, "inputs"),
        (c.post("/v1/predict", json={"adapter": "a", "inputs": ["word " * 200]}), 413, "longer"),
        (c.post("/v1/adapters", json={"path": str(root / "other"), "name": "other"}), 409, "does not fit"),
        (c.post("/v1/adapters", json={"path": str(root / "nowhere")}), 400, "nowhere"),
        (c.post("/v1/generate", json={"prompt": "hi"}), 400, "classification"),
        (c.delete("/v1/adapters/zzz"), 404, "zzz"),
    ]
    for r, code, word in cases:
        assert r.status_code == code, (code, r.text)
        assert word in r.json()["error"]
    r = c.post("/v1/adapters", json={"path": str(root / "adapters" / "a"), "name": "a2"})
    assert r.status_code == 201
    assert c.post("/v1/predict", json={"adapter": "a2", "inputs": ["fine"]}).status_code == 200
    assert c.delete("/v1/adapters/a2").status_code == 200
    assert c.post("/v1/predict", json={"adapter": "a2", "inputs": ["fine"]}).status_code == 404
    assert c.get("/health").json()["status"] == "ok"


def test_mixed_generation_equals_single_adapter_runs(served):
    root, tok, procs = served
    prompts = [("g1", "the cat sat on"), (None, "the dog ran to"), ("g2", "a bird flew by"), ("g1", "one two three four")]
    lens = {len(tok(p)["input_ids"]) for _, p in prompts}
    assert len(lens) == 1  # equal lengths: no padding, so batched and single runs see the same positions

    async def go():
        async with httpx.AsyncClient(base_url=procs["lm"].url, timeout=60) as c:
            return await asyncio.gather(*(c.post("/v1/generate", json={"adapter": a, "prompt": p, "max_new_tokens": 6})
                                          for a, p in prompts))

    rs = asyncio.run(go())
    outs = []
    for (a, p), r in zip(prompts, rs):
        assert r.status_code == 200, r.text
        m = _reference_model(root, a, "lm")
        ids = tok(p, return_tensors="pt")["input_ids"]
        ref = m.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        assert r.json()["tokens"] == ref.tolist()
        outs.append(tuple(ref.tolist()))
    assert len(set(outs)) > 1
    assert httpx.post(procs["lm"].url + "/v1/predict", json={"inputs": ["x"]}).status_code == 400
    r = httpx.post(procs["lm"].url + "/v1/generate", json={"adapter": "g2", "prompt": "hi", "max_new_tokens": 4,
                                                         "temperature": 0.9}, timeout=30)
    assert r.status_code == 200 and 1 <= len(r.json()["tokens"]) <= 4
    r = httpx.post(procs["lm"].url + "/v1/generate", json={"prompt": "hi " * 40, "max_new_tokens": 30}, timeout=30)
    assert r.status_code == 413


def test_sigterm_drains_and_exits_cleanly(served):
    _, _, procs = served
    for name, body, path in (("lm", {"prompt": "the cat sat on", "max_new_tokens": 20}, "/v1/generate"),
                             ("cls", {"adapter": "a", "inputs": ["fine"] * 8}, "/v1/predict")):
        srv = procs[name]
        headers = {"Authorization": f"Bearer {TOKEN}"}

        async def go(srv=srv, body=body, path=path, headers=headers):
            async with httpx.AsyncClient(base_url=srv.url, timeout=30, headers=headers) as c:
                task = asyncio.create_task(c.post(path, json=body))
                await asyncio.sleep(0.02)
                srv.proc.send_signal(signal.SIGTERM)
                return await task

        r = asyncio.run(go())
        assert r.status_code == 200, r.text  # the in-flight request was answered
        assert srv.proc.wait(timeout=30) == 0, srv.log.read_text()
