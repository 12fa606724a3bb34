# CPU machines: install the pinned CPU build of torch first, so that the project's `torch>=2.4`
# requirement is already met and pip never pulls a multi-GB CUDA build.
# GPU users: install your CUDA torch first, then `make install TORCH_SPEC=` (empty = keep yours).
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/quickstart.yaml

.PHONY: install quickstart test

install:
	@if [ -n "$(TORCH_SPEC)" ]; then $(PYTHON) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PYTHON) -m pip install -q -e ".[dev]"

quickstart: install
	lit-covrl fit --config $(CONFIG)

test:
	$(PYTHON) -m pytest -q -p no:cacheprovider
