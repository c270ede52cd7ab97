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


def test_repeated_runs_listed_with_seed_subset_and_mean():
    rows = [{**_row("lora", "sst2", 1.0, 0.78), "seed": 0}, {**_row("lora", "sst2", 1.0, 0.80), "seed": 42, "subset_seed": 1},
            _row("lora", "mrpc", 1.0, 0.81)]
    md = glue_minilm.to_markdown(rows)
    runs = [x for x in md.splitlines() if x.startswith("| lora | sst2")]
    assert runs == ["| lora | sst2 | 1 | (0, 0): 0.780, (42, 1): 0.800 | 0.790 |"]
    assert "| lora | mrpc |" not in md  # measured once: no repeated-runs row
    assert glue_minilm.runs_markdown([_row("lora", "sst2", 1.0, 0.7)]) == ""
    assert glue_minilm._run_dir("sst2", "lora", 42, None) == "sst2-lora-s42"
    assert glue_minilm._run_dir("sst2", "lora", 42, 2) == "sst2-lora-s42-ss2"


def test_pst_table_rows_per_sparsity_with_export_columns():
    import pst_table

    def row(m, task, acc, f1=None, trainable=100, adapter=50, total=1050):
        final = {"accuracy": acc, **({"f1": f1} if f1 is not None else {})}
        return {"bench_method": m, "task": task, "epochs": 1.0, "final": final, "trainable_params": trainable,
                "total_params": total, "adapter_params": adapter}

    rows = [row("pst-90", "sst2", 0.78), row("pst-90", "mrpc", 0.70, 0.81), row("mag-lora-90", "sst2", 0.73),
            row("pst-50", "sst2", 0.80)]
    refs = [row("lora", "sst2", 0.79, trainable=10, adapter=8), row("full", "sst2", 0.83, trainable=1000, adapter=None, total=1000)]
    exports = {"sst2/pst-90": {"sparsity": 0.9, "compact_ratio": 0.131, "compact_bytes": 2**20}}
    lines = pst_table.to_markdown(rows, refs, exports).splitlines()
    cells = [[c.strip() for c in x.split("|")[1:-1]] for x in lines[2:7]]
    assert cells[0][:5] == ["0%", "dense LoRA r=8 (q, v)", "10 (0.96%)", "0.790", "—"]
    assert cells[1][2] == "1,000 (100.00%)"
    assert [c[:2] for c in cells[2:]] == [["50%", "PST"], ["90%", "PST"], ["90%", "magnitude + LoRA update"]]
    assert cells[3][3:] == ["0.780", "0.810 / 0.700", "0.9000", "0.131 (1.0 MiB)"]
    assert cells[4][5:] == ["—", "—"]  # not exported: no size claimed
    assert "Other runs" not in "\n".join(lines)  # every row is on the grid


def test_pst_table_lists_runs_off_the_grid_once_each():
    import pst_table

    def row(m, task, acc, epochs=1.0):
        return {"bench_method": m, "task": task, "epochs": epochs, "final": {"accuracy": acc}, "trainable_params": 1,
                "total_params": 2, "adapter_params": 1}

    rows = [row("mov-50", "sst2", 0.509), row("mov-50-w1", "sst2", 0.5, 3.0), row("mov-50-w1", "sst2", 0.6, 3.0),
            row("mov-50@0.0002", "sst2", 0.7), row("mov-50", "sst2", 0.4, 3.0)]
    md = pst_table.to_markdown(rows, [], {})
    other = md.split("Other runs")[1]
    assert "mov-50-w1 sst2 3 ep: 0.600" in other and "0.500" not in other  # the last run of a setting wins
    assert "mov-50@0.0002 sst2 1 ep: 0.700" in other and "mov-50 sst2 3 ep: 0.400" in other
    assert "| 50% | movement (full update) | 1 (100.00%) | 0.509 |" in md  # the grid row stays in the table


def test_step_benchmark_floor_side_gives_each_librarys_own_cost():
    import bench_cases
    import step_benchmark

    assert bench_cases.CASES["lora"]["floor"] is bench_cases.head_and_first_query_bias
    from peftlab.testing import tiny_model

    m = bench_cases.head_and_first_query_bias(tiny_model("bert"))
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("classifier") or n.endswith("layer.0.attention.self.query.bias")
                             for n in trainable) and any("query.bias" in n for n in trainable)
    r = {"case": "lora", "seq": 64, "batch": 32, "ours_median_s": 0.90, "peft_median_s": 1.00, "floor_median_s": 0.80,
         "ours_saved_bytes": 2**20, "peft_saved_bytes": 2**20, "ours_trainable": 10, "peft_trainable": 10,
         "time_ratio_vs_peft": 0.9}
    r["own_cost_ratio_vs_peft"] = (0.90 - 0.80) / (1.00 - 0.80)
    r["floor_ratio_vs_peft"] = 0.8
    md = step_benchmark.to_markdown([r], {"steps": 5, "warmup": 1, "torch": "x", "threads": 2, "command": "c"})
    last = [c.strip() for c in md.strip().splitlines()[-1].split("|")[1:-1]]
    assert last == ["lora", "64", "800", "0.800", "100", "200", "0.500"]
    main_row = [c.strip() for c in md.splitlines()[4].split("|")[1:-1]]
    assert main_row[:6] == ["lora", "64", "900", "1000", "0.900", "—"]  # no per-round data: paired ratio absent


def test_step_benchmark_paired_ratio_uses_each_round():
    import bench_cases
    import step_benchmark
    import torch

    from peftlab.testing import tiny_model

    base = tiny_model("bert")
    batch = {"input_ids": torch.randint(0, 50, (2, 8)), "labels": torch.tensor([0, 1])}
    assert bench_cases.CASES["lora"]["floor"] is not None  # three sides: ours, peft, floor
    r = step_benchmark.run_case("lora", base, batch, warmup=1, steps=3)
    assert len(r["ours_steps_s"]) == len(r["peft_steps_s"]) == len(r["floor_steps_s"]) == 3
    want = sorted(o / p for o, p in zip(r["ours_steps_s"], r["peft_steps_s"]))[1]
    assert r["paired_ratio_vs_peft"] == want
    assert r["ours_trainable"] == r["peft_trainable"] > r["floor_trainable"]


def test_step_benchmark_compiled_sides_step_and_match_eager_counts():
    import step_benchmark
    import torch

    from peftlab.testing import tiny_model

    base = tiny_model("bert")
    batch = {"input_ids": torch.randint(0, 50, (2, 8)), "labels": torch.tensor([0, 1])}
    eager = step_benchmark.run_case("lora", base, batch, warmup=1, steps=1)
    comp = step_benchmark.run_case("lora", base, batch, warmup=1, steps=1, compiled=True)
    for side in ("ours", "peft", "floor"):
        assert comp[f"{side}_trainable"] == eager[f"{side}_trainable"]
        assert comp[f"{side}_saved_bytes"] == eager[f"{side}_saved_bytes"]  # measured on the eager model
        assert comp[f"{side}_warmup_s"] > 0 and len(comp[f"{side}_steps_s"]) == 1


def test_step_benchmark_pairs_a_method_without_incumbent_with_our_reference():
    """A case peft lacks (SSF) steps beside our LoRA in the same rotation, so its ratio survives machine load."""
    import step_benchmark
    import torch

    from peftlab.testing import tiny_model

    base = tiny_model("bert")
    batch = {"input_ids": torch.randint(0, 50, (2, 8)), "labels": torch.tensor([0, 1])}
    r = step_benchmark.run_case("ssf", base, batch, warmup=1, steps=3)
    assert "peft_steps_s" not in r and len(r["ref_steps_s"]) == 3 and r["paired_ref"] == "lora"
    assert r["paired_ratio_vs_ref"] == sorted(o / q for o, q in zip(r["ours_steps_s"], r["ref_steps_s"]))[1]
    assert r["ours_trainable"] != r["ref_trainable"]
    md = step_benchmark.to_markdown([r | {"seq": 8, "batch": 2}], {"steps": 3, "warmup": 1, "torch": "x",
                                                                   "threads": 2, "command": "c"})
    assert "(paired, lora)" in md.splitlines()[4]


def test_ln_tuning_does_the_same_operator_work_as_peft():
    """Why LN tuning's step-time gap to peft is noise: one step runs the same aten operators, count for count."""
    import bench_cases
    import op_counts
    import torch

    from peftlab.testing import tiny_inputs, tiny_model

    batch = {**tiny_inputs("bert", batch=2), "labels": torch.tensor([0, 1])}
    counts = []
    for side in ("ours", "peft"):
        m = bench_cases.CASES["ln_tuning"][side](tiny_model("bert"))
        counts.append(op_counts.count_ops(m, batch))
    assert counts[0]["aten::native_layer_norm"] > 0 and counts[0] == counts[1]
    m = bench_cases.CASES["lora"]["ours"](tiny_model("bert"))  # the counter tells methods apart
    assert op_counts.count_ops(m, batch) != counts[1]
