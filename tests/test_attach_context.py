"""Configs are plain data: one config object attaches to several models, in any order, unchanged.

For every case of the matrix (tests/cases.py): one config object attached to two different tiny models
(different families and widths), in both orders, gives the same outputs, schedules and formula counts
as fresh configs, and its to_dict() is unchanged by attaching.
"""

from __future__ import annotations

import pytest
import torch
from cases import CASES

import peftlab
from peftlab.testing import FAMILIES, output_tensor, tiny_inputs, tiny_model

WIDTH = {0: 32, 1: 48}


def _two_families(case) -> tuple[str, str]:
    fams = [f for f in FAMILIES if case.families is None or f in case.families]
    return fams[0], fams[-1] if fams[-1] != fams[0] else fams[1]


def _attach(family, config, i):
    model = tiny_model(family, hidden=WIDTH[i])
    torch.manual_seed(i)  # adapter initialisation draws from the global generator
    return peftlab.attach(model, config)


def _probe(model, family, i):
    """Outputs after a deterministic move away from the start and one schedule step, and the report."""
    g = torch.Generator().manual_seed(i)
    with torch.no_grad():
        for _, p in sorted(peftlab.trainable_parameters(model).items()):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        peftlab.on_train_step(model, 5, 10)
        y = output_tensor(model(**tiny_inputs(family)))
    rows = [(r.params, r.formula, r.parts) for r in peftlab.report(model).adapters]
    return y, rows


@pytest.mark.parametrize("method", sorted(CASES))
def test_one_config_attaches_to_two_models_in_any_order(method):
    case = CASES[method]
    fams = _two_families(case)
    fresh = {f: _probe(_attach(f, case.config(), i), f, i) for i, f in enumerate(fams)}
    for order in (fams, fams[::-1]):
        cfg = case.config()
        before = cfg.to_dict()
        models = {f: _attach(f, cfg, fams.index(f)) for f in order}  # both attached before either is used
        assert cfg.to_dict() == before, f"{method}: attach changed the config"
        for f in order:
            y, rows = _probe(models[f], f, fams.index(f))
            torch.testing.assert_close(y, fresh[f][0], atol=1e-6, rtol=0, msg=f"{method} on {f} after {order}")
            assert rows == fresh[f][1]
