"""One-line errors for the training commands' option parser (``fit``, ``validate``, ``test``, ``predict``).

jsonargparse prints ~120 lines of usage before the one line that matters, and words it for
Python programmers (``Expected a <class 'int'>``). :class:`ProteinLMArgumentParser` raises a
:class:`UserError` instead, reworded and ending with where to look (``--help``), and offers the
nearest option name for a misspelt one. The ``--config`` files are read before the parser sees
them (:mod:`protein_lm.commands.config_files`), so a missing, empty or malformed YAML file is named
with the line of the problem (the parser only says "Problems parsing config").
"""

from __future__ import annotations

import difflib
import re

from jsonargparse import ArgumentParser
from pytorch_lightning.cli import LightningArgumentParser

from protein_lm.errors import UserError

_TYPE_NAME = re.compile(r"<class '(?:[\w.]+\.)?(\w+)'>")
_LITERAL = re.compile(r"typing\.Literal\[([^\]]*)\]")


class ProteinLMArgumentParser(LightningArgumentParser):
    """A LightningArgumentParser whose user-facing errors are one :class:`UserError` line.

    ``known_options`` (set by the CLI) are the option names that "did you mean" chooses from.
    While jsonargparse parses with ``exit_on_error`` off it is probing (e.g. trying the types of a
    union) and catches its own errors, so those pass through unchanged.
    """

    known_options: tuple[str, ...] = ()
    help_hint: str = "protein-lm COMMAND --help"

    def error(self, message: str, ex: Exception | None = None):  # noqa: D102 - argparse hook
        if not self.exit_on_error:
            return super().error(message, ex)
        raise UserError(f"{explain(message, self.known_options)}; see `{self.help_hint}`")


def explain(message: str, known_options: tuple[str, ...] = ()) -> str:
    """The one line that matters of a jsonargparse error ``message``, in a user's words."""
    text = message.strip()
    unknown = re.match(r"unrecognized arguments: (\S+)", text)
    if unknown:
        option = unknown.group(1).split("=", 1)[0]
        return f"unknown option {option}{_did_you_mean(option, known_options)}"
    keyed = re.match(r'Parser key "([^"]+)":\s*(.*)', text, re.S)
    if keyed:
        key, detail = keyed.groups()
        return f"--{key}: {_explain_value_error(detail)}"
    not_expected = re.search(r'Key "([^"]+)" is not expected', text)
    if not_expected:
        option = "--" + not_expected.group(1)
        return f"unknown option {option} in a config file{_did_you_mean(option, known_options)}"
    return " ".join(text.split())


def _explain_value_error(detail: str) -> str:
    """``expected int, got 'sixteen'`` from jsonargparse's (possibly multi-line, union) detail."""
    given = re.search(r"(?:Got value|Given value): (.*)", detail)
    value = given.group(1).strip() if given else None
    expected = [m.group(1) for m in re.finditer(r"Expected a (.+?)(?:\. Got value|$)", detail, re.M)]
    if not expected:
        return " ".join(detail.split())
    names: list[str] = []
    for item in expected:
        literal = _LITERAL.fullmatch(item.strip())
        names += [s.strip() for s in literal.group(1).split(",")] if literal else [_TYPE_NAME.sub(r"\1", item)]
    names = ["null" if n == "NoneType" else n for n in dict.fromkeys(names)]
    wanted = names[0] if len(names) == 1 else "one of " + ", ".join(names)
    return f"expected {wanted}, got {value!r}" if value is not None else f"expected {wanted}"


def _did_you_mean(option: str, known_options: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(option, known_options, n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def option_names(parser: ArgumentParser) -> tuple[str, ...]:
    """Every ``--option`` of ``parser`` (nested dataclass fields included)."""
    return tuple(o for action in parser._actions for o in action.option_strings if o.startswith("--"))
