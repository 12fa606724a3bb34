#!/usr/bin/env bash
# The prepared GPU check (one short run on a CUDA machine that has torch and transformers), in three
# stages: tests (the gpu-marked tests), gap (tools/logprob_gap.py: old log-probs of KVCacheSampler in
# fp32 / bf16 weights and of a GPU fit's default, StaticCacheSampler(graphs="compile") under bf16
# autocast), bench (tools/bench_gpu.py: samplers and HF generate on random Qwen2.5-0.5B /
# -1.5B-shaped policies). Writes under ${OUT:-.}: gpu_tests.log, logprob_gap.txt, bench_gpu.json,
# bench_gpu.log (each stage its own files, written as it goes).
#   bash tools/gpu_check.sh [bench_gpu.py args, e.g. --runs 0.5B:static_graph, --profile]
#   GPU_CHECK_STAGES=bench bash tools/gpu_check.sh --runs ...   # some stages only (default tests,gap,bench)
# Packages the machine lacks are installed offline from ./wheels if it exists (git-ignored;
# fill it on a machine with internet: `make gpu-wheels`).
set -uo pipefail
for arg in "$@"; do  # help only: the check itself runs for minutes
  if [ "$arg" = -h ] || [ "$arg" = --help ]; then
    sed -n '2,11p' "$0" | cut -c3-; echo
    python3 tools/bench_gpu.py --help 2>/dev/null || echo "(bench_gpu.py's options: run it with --help where torch is installed)"
    exit 0
  fi
done
OUT=${OUT:-.}
STAGES=${GPU_CHECK_STAGES:-tests,gap,bench}
for stage in ${STAGES//,/ }; do
  case $stage in tests|gap|bench) ;;
    *) echo "GPU_CHECK_STAGES=$STAGES: unknown stage '$stage' (a comma-separated subset of tests,gap,bench)" >&2; exit 2;;
  esac
done
has_stage() { [[ ",$STAGES," == *",$1,"* ]]; }
# one device command may run 600 s: the whole check fits in GPU_CHECK_BUDGET (tests and gap, then
# the benchmark's runs in the time left; a run that cannot fit is listed as skipped, not cut off)
BUDGET=${GPU_CHECK_BUDGET:-540}
export PYTHONUNBUFFERED=1 PYTHONPATH=$(pwd)${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ -d wheels ]; then
  for pair in lightning_utilities:lightning_utilities torchmetrics:torchmetrics lightning:lightning \
              docstring_parser:docstring_parser typeshed_client:typeshed_client jsonargparse:jsonargparse \
              antlr4:antlr4_python3_runtime omegaconf:omegaconf pluggy:pluggy iniconfig:iniconfig \
              pygments:pygments pytest:pytest; do
    python3 -c "import ${pair%%:*}" 2>/dev/null || python3 -m pip install -q --no-deps --no-index wheels/${pair##*:}-*.whl
  done
fi
python3 -c "import torch, transformers, lightning; print('torch', torch.__version__, 'transformers', transformers.__version__, 'lightning', lightning.__version__)"
if has_stage tests; then
  timeout ${GPU_TESTS_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
if has_stage gap; then
  # how far the sampler's recorded log-probs are from the training forward's on the GPU's kernels
  # (README, old log-probs: measured on the CPU only), on the tiny model: KVCacheSampler with bf16
  # weights (seconds), then the sampler and precision a GPU fit uses (compiles its decoding step)
  DEV=$(python3 -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
  timeout 90 python3 tools/logprob_gap.py --device "$DEV" 2>&1 | grep -av "Loading weights" | tee "$OUT/logprob_gap.txt"
  timeout 120 python3 tools/logprob_gap.py --device "$DEV" --sampler static_compile --autocast 2>&1 \
    | grep -av "Loading weights" | tee -a "$OUT/logprob_gap.txt"
fi
if has_stage bench; then
  LEFT=$((BUDGET - SECONDS))
  echo "benchmark: $LEFT s left of GPU_CHECK_BUDGET=$BUDGET"
  timeout $((LEFT > 30 ? LEFT : 30)) python3 tools/bench_gpu.py --json --deadline-s $((LEFT - 30)) \
    --out "$OUT/bench_gpu.json" "$@" 2>"$OUT/bench_gpu.log" >/dev/null
  tail -c 6000 "$OUT/bench_gpu.log"
fi
