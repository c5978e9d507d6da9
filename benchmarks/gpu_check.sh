#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the test suite's GPU-marked tests, then the throughput and memory of the demo and
# of a ~0.5B randomly initialised model in bf16 (benchmarks/gpu_benchmark.py). One JSON line per figure on stdout.
# Where there is no usable GPU it prints one line saying why and exits 0.
#
#   bash benchmarks/gpu_check.sh            # PYTHON=... to use another interpreter than .venv/bin/python
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}

reason=""
if ! command -v nvidia-smi >/dev/null 2>&1; then
  reason="no nvidia-smi on PATH"
elif ! nvidia-smi -L >/dev/null 2>&1; then
  reason="nvidia-smi finds no GPU"
fi
torch_says=$("$PY" -c 'import torch
if torch.cuda.is_available():
    print("")
else:
    print("torch " + torch.__version__ + (" is a CPU build" if torch.version.cuda is None else " (CUDA " + torch.version.cuda + ") sees no GPU"))' 2>&1)
if [ -n "$torch_says" ]; then
  reason="${reason:+$reason; }$torch_says"
fi
if [ -n "$reason" ]; then
  "$PY" -c 'import json, sys; print(json.dumps({"figure": "gpu_check", "skipped": True, "reason": "no usable NVIDIA GPU: " + sys.argv[1]}))' "$reason"
  exit 0
fi

log=$(mktemp -t alignflow-gpu-tests.XXXXXX)
"$PY" -m pytest -m gpu -q -p no:cacheprovider >"$log" 2>&1
status=$?
"$PY" -c 'import json, sys
summary = [l for l in open(sys.argv[1]).read().splitlines() if " passed" in l or " failed" in l or " error" in l]
print(json.dumps({"figure": "gpu_tests", "exit_code": int(sys.argv[2]), "summary": summary[-1] if summary else "", "log": sys.argv[1]}))' "$log" "$status"
"$PY" -m benchmarks.gpu_benchmark --device cuda
bench=$?
exit $(( status != 0 || bench != 0 ))
