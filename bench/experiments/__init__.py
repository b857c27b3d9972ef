"""Training campaigns and studies behind docs/results.md, docs/training.md and docs/analysis.md
(see README.md here); run as ``python -m bench.experiments.NAME`` from the repository root."""
