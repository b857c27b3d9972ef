"""Importable helpers for tests that run `protein-lm` in subprocesses (put `tests/` on PYTHONPATH)."""
