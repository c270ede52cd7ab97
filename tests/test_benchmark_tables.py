"""The GLUE benchmark table: one column per (task, epochs), the last record of a cell wins."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import glue_minilm  # noqa: E402


def _row(method, task, epochs, value, t=10.0):
    metric = {"cola": "matthews", "mrpc": "f1"}.get(task, "accuracy")
    final = {metric: value, **({"accuracy": 0.5} if task == "mrpc" else {})}
    return {"bench_method": method, "task": task, "epochs": epochs, "final": final, "train_time_s": t,
            "trainable_params": 1234}


def test_columns_per_task_and_epochs_last_record_wins():
    rows = [_row("lora", "mrpc", 1.0, 0.81), _row("lora", "mrpc", 3.0, 0.85), _row("lora", "sst2", 1.0, 0.70),
            _row("lora", "sst2", 1.0, 0.79), _row("full", "cola", 1.0, 0.25)]
    md = glue_minilm.to_markdown(rows)
    head, _, lora, full = md.splitlines()[:4]
    assert head.split(" | ")[2:6] == ["sst2", "mrpc", "mrpc (3 ep)", "cola"]
    cells = [c.strip() for c in lora.split("|")[1:-1]]
    assert cells == ["lora", "1,234", "0.790", "0.810 / acc 0.500", "0.850 / acc 0.500", "—", "30"]  # time: last record per cell
    assert [c.strip() for c in full.split("|")[1:-1]][2:6] == ["—", "—", "—", "0.250"]
