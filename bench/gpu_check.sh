#!/bin/bash
# One run on a GPU machine: the tests there, both benchmark models and the evaluation cost.
#
#   bash bench/gpu_check.sh OUT               # on the GPU machine (under 9 minutes on one H200)
#   bash bench/gpu_check.sh OUT --model tiny  # the same steps at toy size, on any machine (its logic)
#
# Writes OUT/results.jsonl (every benchmark's JSON lines plus one {"step", "rc", "s"} line per
# step) and OUT/<step>.log. Each step has its own time limit, so one that hangs or fails leaves
# the others' figures; the exit status is the number of steps that failed.
#
# On the GPU machine, with the wheels the image lacks carried in .whl (../shared/tools/gpu-wheels.sh,
# plus pytest-xdist, execnet and schedulefree), the script installs them into /tmp/site first.
set -u
out=${1:?usage: bench/gpu_check.sh OUT [--model tiny]}
mode=${3:-gpu}
[ "${2:-}" = "--model" ] || mode=gpu
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY=${PY:-python3}
[ -x .venv/bin/python ] && [ "$mode" = tiny ] && PY=.venv/bin/python
failed=0
start_all=$(date +%s)

step() {  # step NAME LIMIT_S COMMAND...: the command's stdout JSON lines go to results.jsonl
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  grep '^{' "$out/$name.log" | sed "s/^{/{\"step\": \"$name\", /" >> "$out/results.jsonl"
  echo "{\"step\": \"$name\", \"rc\": $rc, \"s\": $(( $(date +%s) - t0 ))}" >> "$out/results.jsonl"
  [ $rc -eq 0 ] || failed=$((failed + 1))
  tail -n 3 "$out/$name.log" | sed "s/^/[$name] /"
}

if [ "$mode" = gpu ]; then
  step install 120 bash -c "$PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*"
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1
  $PY -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)" \
    >> "$out/gpu.txt" 2>&1
  # The paper's size first: attack + Deep Ignorance recipe + one evaluation point each
  step pythia-6.9b 200 $PY bench/attack_speed.py --model pythia-6.9b --recipes attack,baseline --steps 3 --warmup 1
  step llama-3.2-1b 170 $PY bench/attack_speed.py --model llama-3.2-1b --recipes attack,baseline,qlora,full \
    --steps 4 --warmup 2
  step tests 150 $PY -m pytest -p no:cacheprovider -q -n 8 -m "not slow" tests -o addopts=""
  step eval-1b 60 $PY bench/eval_speed.py --model llama-3.2-1b --points 1
  # flex_attention on packed rows (its first call compiles the kernel), then the cloze form of
  # evaluation: last, as they matter least
  step llama-flex 90 $PY bench/attack_speed.py --model llama-3.2-1b --recipes attack --attn flex_attention \
    --steps 4 --warmup 2
  step eval-1b-cloze 60 $PY bench/eval_speed.py --model llama-3.2-1b --points 1 --format cloze
else
  step tiny-attack 300 $PY bench/attack_speed.py --model tiny --recipes attack,baseline,full --steps 1 --warmup 1 \
    --seq-len 64 --batch-size 4 --eval-questions 16
  step eval-tiny 120 $PY bench/eval_speed.py --model tiny --points 1 --questions 32 --batch-size 8
  step tests 300 $PY -m pytest -p no:cacheprovider -q tests/test_speed.py -m "not slow" -o addopts=""
fi
echo "{\"step\": \"all\", \"failed\": $failed, \"s\": $(( $(date +%s) - start_all ))}" | tee -a "$out/results.jsonl"
exit $failed
