"""A real English text corpus that installs offline: the Debian package ``fortunes``.

``apt-get install fortunes`` puts about 15,000 fortune cookies (quotations, jokes, poems,
definitions; 2.5 MB of text in ~45 files) under ``/usr/share/games/fortunes`` as plain
files, one fortune per block, blocks separated by a line holding only ``%``.

- :func:`read_fortunes`: the fortunes as strings (every plain file of the folder, in name
  order; ``ascii-art`` left out: pictures, not text).
- :class:`CharVocab`: a character vocabulary (newline, printable ASCII, and one id for
  everything else) with :meth:`CharVocab.encode` / :meth:`CharVocab.decode`.
- :func:`split_fortunes`: a seeded split of the fortunes into train and test (whole fortunes
  go to one side); :func:`take_chars`: a seeded subset of about n characters;
  :func:`join_text`: fortunes as one stream, joined by ``"\\n%\\n"``.
- :func:`random_windows` / :func:`eval_windows`: (input ids, next-character targets) windows
  of a stream for a language model, (B, L) int64 each.
"""
from __future__ import annotations

import os
import re
from typing import Optional

import numpy as np
import torch
from torch import Tensor

FORTUNES_DIR = "/usr/share/games/fortunes"
_SKIP = {"ascii-art"}
SEPARATOR = "\n%\n"
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def fortunes_dir(root: Optional[str] = None) -> str:
    """The folder of fortune files: ``root``, else $JACFAST_FORTUNES_DIR, else the Debian path."""
    root = root or os.environ.get("JACFAST_FORTUNES_DIR") or FORTUNES_DIR
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"no fortune files at {root!r}: install the Debian package 'fortunes' (apt-get install fortunes -> "
            f"{FORTUNES_DIR}), or pass a folder of text files in the same format ('%' lines between entries) "
            "as root= / --text-dir / $JACFAST_FORTUNES_DIR")
    return root


def read_fortunes(root: Optional[str] = None) -> list[str]:
    """Every fortune of the plain files in ``root`` (see :func:`fortunes_dir`), stripped, in file order.

    Index files (``*.dat``) and the ``*.u8`` links to the same files are skipped. Overstrike
    sequences (``_\\b``) and other control characters are removed, tabs become spaces.
    """
    root = fortunes_dir(root)
    docs = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if "." in name or name in _SKIP or os.path.islink(path) or not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        text = _CONTROL.sub("", re.sub(r".\x08", "", text.replace("\t", "    ")))
        docs += [d.strip("\n") for d in re.split(r"^%$", text, flags=re.M) if d.strip()]
    if not docs:
        raise ValueError(f"no fortunes found in {root!r} (plain files with '%' lines between entries)")
    return docs


class CharVocab:
    """Characters: id 0 = any character outside the set, 1 = newline, 2.. = printable ASCII (' '..'~')."""

    chars = "\n" + "".join(chr(c) for c in range(32, 127))

    def __init__(self):
        self._ids = {c: i + 1 for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> Tensor:
        """text -> (len(text),) int64 ids."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        lut = np.zeros(128, dtype=np.int64)
        for c, i in self._ids.items():
            lut[ord(c)] = i
        return torch.from_numpy(np.where(codes < 128, lut[np.minimum(codes, 127)], 0))

    def decode(self, ids) -> str:
        """ids (any int sequence) -> text; unknown characters as U+FFFD."""
        return "".join("\ufffd" if i == 0 else self.chars[i - 1] for i in map(int, ids))


def split_fortunes(docs: list[str], test_fraction: float = 0.1, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, test) fortunes: a seeded ``test_fraction`` of them for test, in their original order."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = max(1, round(test_fraction * len(docs)))
    return [docs[i] for i in sorted(order[n_test:])], [docs[i] for i in sorted(order[:n_test])]


def take_chars(docs: list[str], chars: int, seed: int = 0) -> list[str]:
    """Seeded random whole fortunes of ``docs`` until they hold at least ``chars`` characters."""
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    out, n = [], 0
    for i in order:
        if n >= chars:
            break
        out.append(docs[i])
        n += len(docs[i]) + len(SEPARATOR)
    return out


def join_text(docs: list[str]) -> str:
    """The fortunes as one stream, separated as in the files (a line holding '%')."""
    return SEPARATOR.join(docs)


def random_windows(stream: Tensor, batch: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``batch`` random windows of a (N,) id stream: ids (batch, length) and targets (the next ids)."""
    if stream.numel() < length + 1:
        raise ValueError(f"the stream has {stream.numel()} ids, fewer than length + 1 = {length + 1}")
    start = torch.randint(0, stream.numel() - length, (batch,), generator=generator)
    idx = start[:, None] + torch.arange(length + 1)
    w = stream[idx]
    return w[:, :-1], w[:, 1:]


def eval_windows(stream: Tensor, length: int, max_windows: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Consecutive non-overlapping windows covering the stream (at most ``max_windows``): (n, length) each."""
    n = (stream.numel() - 1) // length
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ValueError(f"the stream has {stream.numel()} ids, fewer than length + 1 = {length + 1}")
    ids = stream[: n * length].view(n, length)
    targets = stream[1: n * length + 1].view(n, length)
    return ids, targets
