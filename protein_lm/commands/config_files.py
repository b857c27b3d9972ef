"""The training commands' ``--config`` files: read, checked, based on other files, old keys translated.

A config file may start from others with ``extends: base/protein.yaml`` (a path relative to the
file, or a list of them, applied in order) and then give only what differs::

    extends: base/protein.yaml
    model:
      config:
        attention: performer-relu

Mappings merge key by key (the extending file wins); any other value, lists included, replaces.
Older files name the FAIR options flat (``model.config.span_max``); they are moved into their
groups (``model.config.span.max``, :data:`protein_lm.model_config.FLAT_KEYS`), and so are flat
``--model.config.*`` flags, each with one deprecation line on stderr.

:func:`resolve_argv` hands jsonargparse a file it can read as is: unchanged files stay paths (its
messages then name them); a file that extends others or needed translating goes in as its merged
YAML text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from protein_lm.errors import UserError
from protein_lm.model_config import FLAT_KEYS, deprecation_message, nest_flat_keys

EXTENDS = "extends"
_FLAG = "--model.config."
# Sections that hold options: given anything else (`trainer: 5`), jsonargparse goes on to crash or,
# for `model:`, silently trains the default model.
SECTIONS = ("trainer", "model", "data", "checkpoint", "model.config")


def read_yaml_mapping(path: Path, shown: str | None = None) -> dict[str, Any]:
    """The YAML mapping in ``path``, or a one-line error naming the file (as ``--config shown``)."""
    name = shown or str(path)
    if not path.is_file():
        raise UserError(f"--config {name}: " + ("is a directory" if path.is_dir() else "no such file"))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--config {name}: cannot read: {getattr(err, 'strerror', None) or err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"--config {name}: YAML syntax error{where}: {problem}") from None
    if data is None:
        raise UserError(f"--config {name}: the file is empty (expected YAML options such as `trainer:`)")
    if not isinstance(data, dict):
        raise UserError(f"--config {name}: expected YAML options (`key: value`), got a {type(data).__name__}")
    return data


def load_config(path: str | Path, shown: str | None = None) -> tuple[dict[str, Any], bool, dict[str, str]]:
    """The options of config file ``path`` with its ``extends`` applied and flat keys nested.

    Returns:
        ``(options, merged, renamed)``: ``merged`` is True when another file was read (the options
        differ from the file's own text); ``renamed`` maps each flat key found to its nested name.
    """
    return _load(Path(path), shown or str(path), ())


def _load(path: Path, shown: str, chain: tuple[Path, ...]) -> tuple[dict[str, Any], bool, dict[str, str]]:
    real = path.resolve()
    if real in chain:
        cycle = " -> ".join(str(p) for p in (*chain, real))
        raise UserError(f"--config {shown}: `{EXTENDS}` goes round in a circle: {cycle}")
    data = read_yaml_mapping(path, shown)
    _check_sections(data, shown)
    bases = data.pop(EXTENDS, None)
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    elif not (isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
        raise UserError(f"--config {shown}: `{EXTENDS}` must be a file path or a list of them, got {bases!r}")
    merged: dict[str, Any] = {}
    renamed: dict[str, str] = {}
    for base in bases:
        base_path = path.parent / Path(base).expanduser()  # relative to the extending file
        if not base_path.is_file():
            raise UserError(f"--config {shown}: {EXTENDS} {base}: no such file (looked for {base_path})")
        options, _, base_renamed = _load(base_path, f"{shown} ({EXTENDS} {base})", (*chain, real))
        merged = _merge(merged, options)
        renamed.update(base_renamed)
    own, own_renamed = _nest_model_config(data, shown)
    renamed.update(own_renamed)
    return _merge(merged, own), bool(bases) or bool(renamed), renamed


def _check_sections(data: dict[str, Any], shown: str) -> None:
    for name in SECTIONS:
        value: Any = data
        for part in name.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None and not isinstance(value, dict):
            raise UserError(f"--config {shown}: `{name}` must hold options (`key: value` lines under it), "
                            f"got {value!r}")


def _nest_model_config(data: dict[str, Any], shown: str) -> tuple[dict[str, Any], dict[str, str]]:
    model = data.get("model")
    config = model.get("config") if isinstance(model, dict) else None
    if not isinstance(config, dict):
        return data, {}
    try:
        nested, renamed = nest_flat_keys(config)
    except ValueError as err:  # a group that is not a mapping beside a flat key of it
        raise UserError(f"--config {shown}: model.config.{err}") from None
    if not renamed:
        return data, {}
    return {**data, "model": {**model, "config": nested}}, renamed


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def resolve_argv(argv: list[str]) -> tuple[list[str], list[str], list[str]]:
    """``argv`` as jsonargparse should see it, the ``--config`` names as given, and notes for stderr.

    Each ``--config`` file is checked (one-line errors); a file that extends others or has flat
    FAIR keys is replaced by its merged YAML text; flat ``--model.config.*`` flags are renamed.
    """
    out = list(argv)
    notes: list[str] = []
    names = []
    for index, value, inline in _config_args(argv):
        names.append(value)
        options, merged, renamed = load_config(value)
        if renamed:
            notes.append(f"--config {value}: {deprecation_message(renamed)}")
        if merged:
            text = yaml.safe_dump(options, sort_keys=False)
            if inline:
                out[index] = f"--config={text}"
            else:
                out[index + 1] = text
    flags: dict[str, str] = {}
    for i, arg in enumerate(out):
        if not arg.startswith(_FLAG):
            continue
        name, eq, value = arg[len(_FLAG):].partition("=")
        if name in FLAT_KEYS:
            flags[name] = FLAT_KEYS[name]
            out[i] = f"{_FLAG}{FLAT_KEYS[name]}{eq}{value}"
    if flags:
        notes.append(deprecation_message(flags).replace("model.config options", "--model.config flags", 1))
    return out, names, notes


def _config_args(argv: list[str]) -> list[tuple[int, str, bool]]:
    """``(index, file, inline)`` of each ``--config FILE`` / ``-c FILE`` / ``--config=FILE``."""
    found = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            found.append((i, argv[i + 1], False))
        elif arg.startswith("--config="):
            found.append((i, arg.split("=", 1)[1], True))
    return found
