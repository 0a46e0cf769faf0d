# affpipe — the commands a newcomer and CI run. Every target installs what it needs itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
AFFPIPE := $(VENV)/bin/affpipe
# torch/torchvision pinned to the releases this project is tested with (CPU machines take them
# from the local wheel cache when one exists; elsewhere pip downloads them).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.install-stamp
DEMO ?= demo
# many short videos (7.2k frames, as 24 x 300 were): 70+ validation recordings a task for the intervals
DEMO_VIDEOS ?= 720
DEMO_FRAMES ?= 10
DEMO_EPOCHS ?= 4
# The suite runs in TEST_WORKERS processes (pytest-xdist; a test goes to whichever is free), each
# with one torch thread: most tests are tiny, so two one-thread workers keep 2 cores busy where one
# two-thread process left half of them idle (11.4 min serial, 6.5 min this way, measured on 2 cores).
TEST_WORKERS ?= 2
PARALLEL := -n $(TEST_WORKERS) --dist worksteal

# The GPU targets run from this checkout on a GPU host without installing anything: the project's
# environment when it exists, else the host's python3 (PyTorch with CUDA, numpy, pyarrow, OpenCV,
# tqdm; DALI installed or on PYTHONPATH). AFFPIPE_REQUIRE_GPU=1: no CUDA device, or a case that
# cannot run, is a failure there, never a skip.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
GPU_ENV = PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} AFFPIPE_REQUIRE_GPU=1
GPU_TESTS ?= $(shell grep -rl --include='*.py' 'pytest.mark.gpu' tests)

.PHONY: install install-bench demo test test-fast test-nodali test-gpu lint benchmark benchmark-full benchmark-gpu benchmark-gpu-full experiments clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	# affpipe crop's face detector (weights in its wheel); its metadata pins an old torch: no deps
	$(PY) -m pip install -q --no-deps 'facenet-pytorch>=2.5.3'
	touch $(STAMP)

demo: install
	$(AFFPIPE) synth $(DEMO)/affwild2 --videos $(DEMO_VIDEOS) --frames $(DEMO_FRAMES) --mtl --seed 0
	$(AFFPIPE) index $(DEMO)/affwild2 -o $(DEMO)/index
	$(AFFPIPE) stats $(DEMO)/index -o $(DEMO)/stats
	$(AFFPIPE) shard $(DEMO)/index -o $(DEMO)/shards --split all
	$(AFFPIPE) verify $(DEMO)/shards
	$(AFFPIPE) show $(DEMO)/shards -o $(DEMO)/shards/grid.png
	rm -rf $(DEMO)/runs/mtl  # a rerun of the demo trains afresh
	$(AFFPIPE) train --config pipelines/demo.toml --shards $(DEMO)/shards -o $(DEMO)/runs/mtl --epochs $(DEMO_EPOCHS)
	$(AFFPIPE) evaluate $(DEMO)/runs/mtl --shards $(DEMO)/shards
	@echo
	@echo "demo outputs: $(DEMO)/  (index: $(DEMO)/index, stats: $(DEMO)/stats, shards: $(DEMO)/shards,"
	@echo "              run: $(DEMO)/runs/mtl — eval.md, curves.png, best.pt)"

test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q $(PARALLEL)

test-fast: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m 'not slow' $(PARALLEL)

# The suite as it runs where DALI does not exist (macOS, ARM, Windows): DALI hidden from
# Python and every subprocess; the torch fallback must carry everything.
test-nodali: install
	PYTHONPATH=$(CURDIR)/tests/nodali $(PY) -m pytest -q -m 'not slow'

lint: install
	$(VENV)/bin/ruff check affpipe tests

benchmark: install
	$(AFFPIPE) bench --out bench

benchmark-full: install
	$(AFFPIPE) bench-full --out bench/full

# On a GPU host (see GPU_PY above and BENCHMARKS.md); exits non-zero when a case fails.
benchmark-gpu:
	$(GPU_ENV) $(GPU_PY) -m affpipe.bench.gpu --out bench/gpu --markdown BENCHMARKS.md

# On a GPU host, as benchmark-gpu (plus OpenCV and tqdm, and ~20 GB of disk): one whole epoch
# over the full-scale synthetic twin, from nothing, in ~8 minutes.
benchmark-gpu-full:
	$(GPU_ENV) $(GPU_PY) -m affpipe.bench.gpu_full --out bench/gpu-full --markdown BENCHMARKS.md

# On a GPU host: the `gpu` tests (and pytest) only; they fail, not skip, without CUDA or DALI.
test-gpu:
	$(GPU_ENV) $(GPU_PY) -m pytest -q -m gpu $(GPU_TESTS)

# The loaders make benchmark compares affpipe with (optional; FFCV builds against Debian's
# libturbojpeg0-dev, libopencv-dev and pkg-config). Rows say which are missing.
install-bench: install
	$(PY) -m pip install -q -e '.[bench]'

experiments: install
	$(AFFPIPE) experiments --out experiments

clean:
	rm -rf $(DEMO) bench runs experiments
