# The two commands a new user needs (both install what they need into .venv first):
#   make quickstart   train a small Performer on data/ -> checkpoint, metrics, similarity heatmap
#   make test         the whole test suite (CPU; GPU tests are skipped without CUDA)
# VENV / PROTEIN_LM_NO_VENV=1 / PYTHON as in scripts/setup_env.sh (e.g. a conda env: PROTEIN_LM_NO_VENV=1).
VENV ?= .venv
PYTHON ?= python3
export VENV PYTHON PROTEIN_LM_NO_VENV
ifeq ($(PROTEIN_LM_NO_VENV),1)
PY := $(PYTHON)
else
PY := $(VENV)/bin/python
endif
RUN := runs/quickstart

.PHONY: env quickstart test gpu-test lint clean

env:
	@bash scripts/setup_env.sh

quickstart: env
	$(PY) -m protein_lm fit --config configs/quickstart.yaml --ckpt_path last   # a second run resumes (or is done)
	$(PY) -m protein_lm analyze --checkpoint $(RUN)/checkpoints/last.ckpt \
	    --fasta data/swissprot_sample.fasta.gz --max-sequences 300 --out $(RUN)/analysis
	@echo
	@echo "checkpoints: $(RUN)/checkpoints/   metrics: $(RUN)/csv/version_*/metrics.csv"
	@echo "heatmap    : $(RUN)/analysis/similarity_vs_blosum62.png   summary: $(RUN)/analysis/summary.json"

test: env
	$(PY) -m pytest -q

gpu-test: env
	$(PY) -m pytest -q -m gpu

lint: env
	$(PY) -m ruff check protein_lm tests bench

clean:
	rm -rf runs .pytest_cache
