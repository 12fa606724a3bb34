#!/usr/bin/env bash
# The prepared GPU check (one short run on a CUDA machine): the gpu-marked tests, then
# tools/bench_gpu.py on the random Qwen2.5-0.5B-shaped policy. Writes under ${OUT:-.}:
# gpu_tests.log, bench_gpu.json, bench_gpu.log.
#   bash tools/gpu_check.sh [extra bench_gpu.py args]
set -uo pipefail
OUT=${OUT:-.}
export PYTHONUNBUFFERED=1 PYTHONPATH=$(pwd)${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, lightning; print('torch', torch.__version__, 'transformers', transformers.__version__, 'lightning', lightning.__version__)"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
timeout 420 python3 tools/bench_gpu.py --out "$OUT/bench_gpu.json" "$@" 2>&1 | tee "$OUT/bench_gpu.log" | grep -v '^ '
