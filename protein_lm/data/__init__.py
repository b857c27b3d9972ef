"""The data pipeline: FASTA -> token cache -> content-hash splits -> examples -> batches.

::

    data_dir (cache dir or FASTA) --cache.ensure_cache--> readers.TokenCache (uint8 memmap + offsets)
      --splits--> train / val / test sequence indices (BLAKE2b of the residues; duplicates never
                  straddle splits; ``val_fasta`` / ``test_fasta`` replace the hashed val / test part)
      --datasets--> examples in one of three modes (single / concat / packed, see datasets.py)
      --sampler--> which examples form which batch, per epoch and DDP rank
      --collate / packing--> ``{"input_ids", "labels", "padding_mask"}`` (+ ``segment_ids``,
                  ``positions`` when packed)

Modules: ``fasta`` (FASTA reading, errors that name file / record / line), ``tokenizer`` (the
ESM-2 alphabet), ``record_checks`` (suspicious records counted per file), ``cache`` (writing a
token cache: ``prepare``), ``progress`` (its bytes-read progress), ``readers`` (reading a cache;
FASTA records by id for the commands), ``splits``, ``collate``, ``packing``, ``datasets``,
``sampler``, ``options`` (argument checks), ``plans`` (which batch plan a dataset gets), ``loader``
(the DataLoader and DDP rank), ``resume`` (exact resume) and ``datamodule`` (the
LightningDataModule). Nothing is imported here: ``prepare`` reads FASTA without importing torch.
"""
