"""`peftlab serve` argument handling (the server itself is exercised in test_serving_http.py)."""

import pytest

from peftlab.cli import build_parser
from peftlab.errors import PeftlabError
from peftlab.serving.cli import adapter_dirs


def test_serve_arguments_and_adapter_folders(tmp_path):
    for name in ("x", "y"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "peftlab_config.json").write_text("{}")
    (tmp_path / "not-an-adapter").mkdir()
    args = build_parser().parse_args(["serve", "--model", "minilm", "--adapter", "a=/some/dir", "--adapters-dir",
                                      str(tmp_path), "--max-batch", "8", "--max-wait-ms", "2", "--max-loaded", "3"])
    assert (args.host, args.port, args.max_batch, args.max_wait_ms, args.max_loaded) == ("127.0.0.1", 8000, 8, 2.0, 3)
    assert [(n, p.name) for n, p in adapter_dirs(args)] == [("a", "dir"), ("x", "x"), ("y", "y")]
    args.adapter = ["no-equals-sign"]
    with pytest.raises(PeftlabError, match="NAME=DIR"):
        adapter_dirs(args)
    args.adapter, args.adapters_dir = [], str(tmp_path / "missing")
    with pytest.raises(PeftlabError, match="not a folder"):
        adapter_dirs(args)
