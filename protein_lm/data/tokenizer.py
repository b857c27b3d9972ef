"""ESM-2 compatible protein tokenizer.

The vocabulary is exactly ESM-2's 33 tokens, in ESM's order, so token ids (and
therefore embeddings and output heads) interoperate with ESM / HuggingFace
checkpoints::

    <cls>=0 <pad>=1 <eos>=2 <unk>=3  L A G V S E R T I D P K Q N F Y M H W C X B U Z O . -  (4..30)
    <null_1>=31 <mask>=32

Input policy (applied by :func:`clean_sequence`, documented in docs/data.md):

* input is upper-cased (FASTA files from some tools are lower case);
* whitespace and carriage returns are ignored (wrapped / CRLF files);
* one trailing ``*`` (translation stop) is stripped;
* ``J`` (Leu/Ile ambiguity, not in ESM's alphabet) maps to ``X``;
* any other character is invalid and raises :class:`InvalidSequenceError`.

This module is pure Python + numpy (no torch) so that data preparation starts fast.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

ALPHABET_VERSION = "esm2-33-v1"

SPECIAL_PREFIX = ("<cls>", "<pad>", "<eos>", "<unk>")
RESIDUES = "LAGVSERTIDPKQNFYMHWCXBUZO.-"
SPECIAL_SUFFIX = ("<null_1>", "<mask>")
TOKENS: tuple[str, ...] = SPECIAL_PREFIX + tuple(RESIDUES) + SPECIAL_SUFFIX

CLS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
NULL_ID, MASK_ID = 31, 32
VOCAB_SIZE = len(TOKENS)  # 33

TOKEN_TO_ID: dict[str, int] = {t: i for i, t in enumerate(TOKENS)}
# The 20 standard amino acids, in BLOSUM / textbook order (used by analysis and MLM replacement).
STANDARD_AA = "ARNDCQEGHILKMFPSTWYV"
STANDARD_AA_IDS: tuple[int, ...] = tuple(TOKEN_TO_ID[a] for a in STANDARD_AA)
# Ids that are never masked / scored as residues.
SPECIAL_IDS: tuple[int, ...] = (CLS_ID, PAD_ID, EOS_ID, UNK_ID, NULL_ID, MASK_ID)

# Byte -> token id lookup (public: the FASTA fast path tokenises whole blocks with it); 255 = invalid byte.
_INVALID = 255
BYTE_TO_ID = np.full(256, _INVALID, dtype=np.uint8)
for _letter in RESIDUES:
    BYTE_TO_ID[ord(_letter)] = TOKEN_TO_ID[_letter]
    if _letter.isalpha():
        BYTE_TO_ID[ord(_letter.lower())] = TOKEN_TO_ID[_letter]
BYTE_TO_ID[ord("J")] = TOKEN_TO_ID["X"]
BYTE_TO_ID[ord("j")] = TOKEN_TO_ID["X"]
_WHITESPACE = b" \t\r\n\v\f"


class InvalidSequenceError(ValueError):
    """A sequence holds a character outside the alphabet.

    Attributes:
        char: the offending character.
        position: 0-based index of that character in the raw (uncleaned) string.
    """

    def __init__(self, char: str, position: int):
        self.char = char
        self.position = position
        super().__init__(f"invalid character {char!r} at position {position + 1}")


def encode_residues(seq: str | bytes) -> np.ndarray:
    """Map a raw sequence to residue token ids (no special tokens) as ``uint8``.

    Applies the documented input policy. Vectorised with a byte lookup table so
    that preparing hundreds of millions of residues is fast.

    Raises:
        InvalidSequenceError: on any character outside the policy.
    """
    raw = seq.encode("latin-1", errors="replace") if isinstance(seq, str) else bytes(seq)
    if any(c in raw for c in _WHITESPACE):
        raw = raw.translate(None, _WHITESPACE)
    if raw.endswith(b"*"):
        raw = raw[:-1]
    arr = np.frombuffer(raw, dtype=np.uint8)
    ids = BYTE_TO_ID[arr]
    bad = np.flatnonzero(ids == _INVALID)
    if bad.size:
        i = int(bad[0])
        # Report the position in the *original* string the user can look at.
        original = seq if isinstance(seq, str) else seq.decode("latin-1")
        char = chr(raw[i])
        pos = _raw_position(original, i)
        raise InvalidSequenceError(char, pos)
    return ids


def _raw_position(original: str, cleaned_index: int) -> int:
    """Index in ``original`` of the ``cleaned_index``-th non-whitespace character."""
    seen = -1
    for pos, ch in enumerate(original):
        if ch not in " \t\r\n\v\f":
            seen += 1
            if seen == cleaned_index:
                return pos
    return cleaned_index


def clean_sequence(seq: str) -> str:
    """Return the sequence as the tokenizer sees it (upper case, policy applied)."""
    return "".join(TOKENS[i] for i in encode_residues(seq))


def encode(seq: str, add_special_tokens: bool = True) -> list[int]:
    """Encode a protein sequence to ESM-2 token ids.

    Args:
        seq: amino-acid letters (any case; whitespace ignored; trailing ``*`` stripped).
        add_special_tokens: frame as ``<cls> ... <eos>`` like ESM-2.

    Returns:
        A list of ints in ``[0, 33)``.
    """
    ids = encode_residues(seq).tolist()
    if add_special_tokens:
        return [CLS_ID, *ids, EOS_ID]
    return ids


def decode(ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    """Turn ids back into a string; special tokens are written as ``<name>``."""
    out: list[str] = []
    for i in ids:
        i = int(i)
        if not 0 <= i < VOCAB_SIZE:
            raise ValueError(f"token id {i} is outside the vocabulary [0, {VOCAB_SIZE})")
        if skip_special_tokens and i in SPECIAL_IDS:
            continue
        out.append(TOKENS[i])
    return "".join(out)
