"""Speed benchmarks (time, throughput, memory); training campaigns and studies are in bench/experiments.

Run them as modules from the repository root, so that ``bench`` and this checkout's ``protein_lm``
import without any path setup::

    python -m bench.attention --out results/attention_h100.json

Results the docs cite are kept in results/.
"""
