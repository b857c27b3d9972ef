"""Attention analysis: attention maps -> amino-acid similarity -> BLOSUM62 comparison -> figures.

* :mod:`protein_lm.analysis.attention_maps` — per layer/head attention of single proteins, in blocks
  of query rows (implied attention for Performer, softmax probabilities for exact attention);
* :mod:`protein_lm.analysis.similarity` — attention mass between residue types and its log-odds
  similarity, per head and aggregated;
* :mod:`protein_lm.analysis.blosum` — BLOSUM62 for the 20 standard residues, correlations, pair ranks;
* :mod:`protein_lm.analysis.plots` — heatmaps, head grids, per-protein maps, benchmark and training plots.

The method and formulas are in docs/analysis.md; ``protein-lm analyze`` runs the whole chain.
Submodules are imported explicitly (this package imports nothing heavy by itself).
"""
