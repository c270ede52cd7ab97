import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


def _load_real(name):
    pytest.importorskip("transformers")
    from peftlab.train.backbones import load_model

    try:
        return load_model(name).eval()
    except ImportError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def minilm():
    return _load_real("minilm")


@pytest.fixture(scope="session")
def smollm():
    return _load_real("smollm2-135m")
