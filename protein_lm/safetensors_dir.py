"""Exported models as a directory the wider ecosystem reads: ``model.safetensors`` + ``config.json``.

Layout (``protein-lm export --format safetensors --out DIR``)::

    DIR/model.safetensors   the ProteinLM state dict (float32; random-feature projections included)
    DIR/config.json         {"format": "protein_lm.safetensors", "version": 1, "config": {ModelConfig},
                             "objective", "metrics", "global_step", "epoch",
                             "alphabet": {"version", "tokens": [33 tokens in id order]}}
    DIR/vocab.txt           the same tokens, one per line (line i = id i), as ESM / HF tokenizers list them

Nothing in it is a pickle: any safetensors reader gets the tensors, any JSON reader the config.
:func:`protein_lm.checkpoint.load_model` accepts the directory wherever it accepts a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from protein_lm.data.tokenizer import ALPHABET_VERSION, TOKENS
from protein_lm.errors import UserError
from protein_lm.outputs import write_dir_atomically

DIR_FORMAT = "protein_lm.safetensors"
DIR_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def save_directory(payload: dict[str, Any], out: str | os.PathLike) -> Path:
    """Write an exported-weights payload (:func:`protein_lm.checkpoint.weights_payload`) as a directory."""
    from safetensors.torch import save_file

    meta = {k: v for k, v in payload.items() if k not in ("state_dict", "format", "version")}
    config = {"format": DIR_FORMAT, "version": DIR_VERSION, **meta,
              "alphabet": {"version": ALPHABET_VERSION, "tokens": list(TOKENS)}}

    def write(tmp: Path) -> None:
        save_file(payload["state_dict"], str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "vocab.txt").write_text("\n".join(TOKENS) + "\n")

    return write_dir_atomically(out, write, "--out")


def read_directory(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """What :func:`protein_lm.checkpoint.read_checkpoint` returns, from an exported directory."""
    from safetensors.torch import load_file

    path = Path(path)
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_file.is_file() or not weights_file.is_file():
        raise UserError(f"{path}: a directory, but not an exported model ({CONFIG_FILE} and {WEIGHTS_FILE} expected)")
    try:
        meta = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{config_file}: not valid JSON ({err})") from None
    if meta.get("format") != DIR_FORMAT:
        raise UserError(f"{config_file}: not a protein_lm export (format {meta.get('format')!r})")
    if int(meta.get("version", 0)) > DIR_VERSION:
        raise UserError(f"{config_file}: format version {meta['version']} is newer than this protein_lm")
    tokens = (meta.get("alphabet") or {}).get("tokens")
    if tokens is not None and list(tokens) != list(TOKENS):
        raise UserError(f"{config_file}: its alphabet differs from this protein_lm's {ALPHABET_VERSION} tokens")
    device = map_location if isinstance(map_location, str) else "cpu"
    return {
        "format": "safetensors",
        "config": dict(meta["config"]),
        "objective": meta.get("objective", "causal" if meta["config"].get("causal") else "mlm"),
        "state_dict": load_file(str(weights_file), device=device),
        "metrics": dict(meta.get("metrics") or {}),
        "global_step": meta.get("global_step"),
        "epoch": meta.get("epoch"),
        "path": str(path),
    }
