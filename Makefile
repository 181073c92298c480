# Two entry points for a fresh machine: `make demo` and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch that lies on this machine's disk; installed first so that the
# `torch>=2.4` requirement is already met and pip never fetches a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
DEMO_DATA ?= demo_data
DEMO_RUN ?= runs/demo
# The two training budgets: on a 2-core AMD EPYC Zen 4, which trains in bfloat16, 3.75 and 3.5
# minutes reach what 5 and 4 minutes of float32 did there (test SSIM, the samples' two-sample
# figure), and keep make demo under 10 minutes from a fresh clone (docs/journal.md,
# 2026-12-08). A slower CPU gets fewer epochs: DEMO_MINUTES=10 DEMO_PRIOR_MINUTES=8 for more.
DEMO_MINUTES ?= 3.75
DEMO_PRIOR_MINUTES ?= 3.5
DEMO_SAMPLES ?= 64

.PHONY: demo test test-fast gpu-check browser lint format clean bench-quality bench-generation bench-sampling bench-throughput bench-epoch

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed-dev
	$(BIN)/pip install --quiet -e ".[bench]"
	touch $@

# The run's page is written once, at the end (train.report=false): the validation it would
# score is superseded by the test evaluation, and every later command would redraw the page.
demo: $(VENV)/.installed
	@test -d $(DEMO_DATA)/keras_slices_train || $(BIN)/mri-vqvae demo-data $(DEMO_DATA)
	rm -rf $(DEMO_RUN)
	$(BIN)/mri-vqvae train --data $(DEMO_DATA) --out $(DEMO_RUN) --config configs/demo.yaml \
		--max-minutes $(DEMO_MINUTES) train.report=false
	$(BIN)/mri-vqvae evaluate --data $(DEMO_DATA) --checkpoint $(DEMO_RUN)/best.pt \
		--out $(DEMO_RUN)/evaluation
	$(BIN)/mri-vqvae train-prior --vqvae $(DEMO_RUN)/best.pt --data $(DEMO_DATA) \
		--out $(DEMO_RUN)/prior --config configs/demo_prior.yaml --max-minutes $(DEMO_PRIOR_MINUTES)
	$(BIN)/mri-vqvae sample --vqvae $(DEMO_RUN)/best.pt --prior $(DEMO_RUN)/prior/best.pt \
		--n $(DEMO_SAMPLES) --out $(DEMO_RUN)/samples
	$(BIN)/mri-vqvae evaluate-samples --samples $(DEMO_RUN)/samples --data $(DEMO_DATA)
	$(BIN)/mri-vqvae report $(DEMO_RUN)
	@echo "The whole run on one page: $(DEMO_RUN)/report.html (open it in a browser)."
	@echo "Pictures: $(DEMO_RUN)/reconstructions/, $(DEMO_RUN)/ssim_scores.png,"
	@echo "          $(DEMO_RUN)/batch_losses.png and $(DEMO_RUN)/evaluation/*.png;"
	@echo "          new slices: $(DEMO_RUN)/samples/samples.png, $(DEMO_RUN)/samples/evaluation/*.png"

test: $(VENV)/.installed-dev browser
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/python -m pytest -q

# On a machine with a CUDA GPU, in under 8 minutes: the CUDA tests, the throughput rows, a
# HipMRI-sized 20-epoch run and the demo at GPU speed, then one table
# (benchmarks/gpu_check.py; its figures go in docs/benchmarks.md). Any Python whose torch sees
# the GPU can run the script itself: `python benchmarks/gpu_check.py`. No .venv is built: this
# Makefile's torch is the CPU build; the check takes .venv's Python if there is one (with a
# CUDA torch in it), else GPU_PYTHON.
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py

# The quick check while working, under a minute on 2 cores: the same linting, and every test
# but those marked slow (subprocesses, the browser, hypothesis fuzzing, runs of several
# seconds), which `make test` still runs. No browser: its test is among the slow ones.
test-fast: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/python -m pytest -q -m "not slow"

# The report's browser test renders it in Debian's headless Chromium, driven through
# chromedriver. Installed from Debian's packages when missing and this is root (as in CI) or
# may sudo; otherwise the test says it was skipped and why.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=; \
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo=sudo; \
	else echo "chromium and chromium-driver are missing and cannot be installed without root:" \
		"the report's browser test will be skipped"; exit 0; fi; \
	if ! command -v apt-get >/dev/null; then echo "no apt-get: install chromium and" \
		"chromedriver yourself for the report's browser test"; exit 0; fi; \
	echo "installing Debian's chromium and chromium-driver for the report's browser test"; \
	$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq \
		--no-install-recommends chromium chromium-driver >/dev/null

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(VENV)/.installed-dev
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

# Reconstruction quality at equal time: seed preset vs default vs the adversarial preset vs
# MONAI (minutes per recipe).
QUALITY_MINUTES ?= 20
bench-quality: $(VENV)/.installed-bench
	$(BIN)/python benchmarks/quality.py --minutes $(QUALITY_MINUTES)

# Generated slices: prior, 256 samples and their measures on the phantom and MNI slices.
PRIOR_MINUTES ?= 12
bench-generation: $(VENV)/.installed-bench
	$(BIN)/python benchmarks/generation.py --prior-minutes $(PRIOR_MINUTES)

# Sampling speed with and without the key/value cache.
bench-sampling: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/sampling.py

# Training images per second: seed preset, default, MONAI and a plain float32 seed model.
BENCH_DEVICE ?= cpu
bench-throughput: $(VENV)/.installed-bench
	$(BIN)/python benchmarks/throughput.py --device $(BENCH_DEVICE)

# One HipMRI-sized epoch end to end (writes a 1.5 GB phantom once).
bench-epoch: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/epoch_time.py

clean:
	rm -rf $(VENV) runs $(DEMO_DATA) .pytest_cache .ruff_cache test-artifacts
