# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv if it is missing and install the project with the tested pins.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.protomask-installed
WORKDIR ?= workdirs/demo
CONFIG ?= configs/demo.py

SEEDS ?= 0 1 2

.PHONY: demo seeds test install lint bench bench-gpu aot wheelhouse wheelhouse-check clean screenshot

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	SAM2_BUILD_CUDA=0 $(PY) -m pip install -q -c constraints.txt --build-constraint constraints.txt \
		-e '.[segmentation,dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m segmentation.export --config $(CONFIG)
	$(PY) -m protomask_jax.train --config $(CONFIG) --workdir $(WORKDIR)
	$(PY) -m protomask_jax.evaluate --config $(CONFIG) --workdir $(WORKDIR) \
		--techniques classification,compactness,contrastivity,complexity,faithfulness,continuity,completeness,topk
	$(PY) -m protomask_jax.explain --config $(CONFIG) --workdir $(WORKDIR)

# The demo with each of SEEDS (one export) into workdirs/demo_seed<s>, evaluated, then mean ±
# std per metric over the seeds: workdirs/demo_seeds/tables.{md,tex,json}.
seeds: $(STAMP)
	$(PY) -m segmentation.export --config $(CONFIG)
	for seed in $(SEEDS); do \
	  $(PY) -m protomask_jax.train --config $(CONFIG) --workdir workdirs/demo_seed$$seed \
	    --config.seed=$$seed && \
	  $(PY) -m protomask_jax.evaluate --workdir workdirs/demo_seed$$seed || exit 1; \
	done
	$(PY) -m protomask_jax.tables $(SEEDS:%=workdirs/demo_seed%) --out workdirs/demo_seeds

test: $(STAMP)
	$(PY) -m pytest -q

# Renders the demo's HTML report in headless Chromium (Debian: apt-get install chromium).
screenshot: $(STAMP)
	$(PY) -m protomask_jax.report.screenshot $(WORKDIR)/report/index.html docs/report_screenshot.png

bench: $(STAMP)
	PYTHONUNBUFFERED=1 $(PY) -m benchmarks.train_step --shape cpu
	PYTHONUNBUFFERED=1 $(PY) -m benchmarks.push --shape cpu
	PYTHONUNBUFFERED=1 $(PY) -m benchmarks.end_to_end --shape cpu
	PYTHONUNBUFFERED=1 $(PY) -m benchmarks.input_pipeline
	PYTHONUNBUFFERED=1 $(PY) -m benchmarks.export
	PYTHONUNBUFFERED=1 $(PY) -m benchmarks.scaling
	$(PY) -m benchmarks.report --update

# Every jitted program compiled for TPU slices on this CPU host (libtpu, deviceless): the
# committed benchmarks/results/aot_*.json and benchmarks/README.md's TPU tables; ~50 min
# on 2 cores (the tables are pasted from `python -m benchmarks.aot --table FILE`).
aot: $(STAMP)
	PYTHONUNBUFFERED=1 $(PY) -m benchmarks.aot --topology v5e:2x4 --per_chip_batch 64 --fit_search
	for n in 12 16 24 32 48; do PYTHONUNBUFFERED=1 $(PY) -m benchmarks.aot --topology v5e:2x4 \
		--per_chip_batch $$n --programs train/joint \
		--out benchmarks/results/aot_v5e_2x4_batch$$n.json || exit 1; done
	PYTHONUNBUFFERED=1 $(PY) -m benchmarks.aot --topology v5e:2x4 --per_chip_batch 64 \
		--programs train/joint --set model.remat=blocks --fit_search \
		--out benchmarks/results/aot_v5e_2x4_remat.json
	PYTHONUNBUFFERED=1 $(PY) -m benchmarks.aot --topology v5e:2x4 --per_chip_batch 128 \
		--programs train/joint --set train.micro_batches=2 \
		--out benchmarks/results/aot_v5e_2x4_micro2_128.json
	PYTHONUNBUFFERED=1 $(PY) -m benchmarks.aot --topology v5e:2x4 --per_chip_batch 64 \
		--programs train/joint --set mesh.fsdp=true \
		--out benchmarks/results/aot_v5e_2x4_fsdp.json
	PYTHONUNBUFFERED=1 $(PY) -m benchmarks.aot --topology v4:2x2x1 --per_chip_batch 64 \
		--programs train/joint --out benchmarks/results/aot_v4_2x2x1.json
	PYTHONUNBUFFERED=1 $(PY) -m benchmarks.aot --topology v5p:2x2x1 --per_chip_batch 128 \
		--programs train/joint --out benchmarks/results/aot_v5p_2x2x1.json
	PYTHONUNBUFFERED=1 $(PY) -m benchmarks.aot --topology v5e:2x4 --per_chip_batch 64 \
		--programs none --scaling v5e:2x4,v5e:8x8,v5e:16x16 \
		--out benchmarks/results/aot_v5e_scaling.json
	PYTHONUNBUFFERED=1 $(PY) -m benchmarks.aot_micro

# On a GPU machine with jax[cuda] and torch already installed (no venv, no network needed);
# carry .whl/ along (make wheelhouse) for what the host lacks.
bench-gpu:
	benchmarks/gpu.sh

# Python 3.12 wheels of what benchmarks/gpu.sh needs beyond the GPU host's packages
# (benchmarks/wheelhouse.txt), into .whl/ (under the 64 MiB the device tool carries).
wheelhouse: $(STAMP)
	$(PY) -m benchmarks.wheelhouse build

# Proves the wheelhouse complete: a fresh Python 3.12 venv with only jax, flax, optax,
# orbax-checkpoint and chex from the registry, then .whl/ offline, then end_to_end runs.
wheelhouse-check: wheelhouse
	$(PY) -m benchmarks.wheelhouse check $(if $(PYTHON312),--python $(PYTHON312))

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(WORKDIR) data/parts_world workdirs/demo_seed*
