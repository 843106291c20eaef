"""Question tokenisation and word vocabulary (OpenVQA-style, for LSTM question encoders)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

import torch

PAD, UNK = "<pad>", "<unk>"
_PUNCT = re.compile(r"[.,'!?\"()*#:;]")


def tokenize(text: str) -> list[str]:
    """Lower-case, drop punctuation, split on spaces, hyphens and slashes."""
    return _PUNCT.sub("", text.lower()).replace("-", " ").replace("/", " ").split()


class WordVocab:
    """Word-to-id map with ``<pad>`` = 0 and ``<unk>`` = 1.

    Args:
        words: the vocabulary, in id order, starting with ``<pad>`` and ``<unk>``.
    """

    def __init__(self, words: Sequence[str]) -> None:
        if list(words[:2]) != [PAD, UNK]:
            raise ValueError(f"WordVocab must start with {PAD!r}, {UNK!r}; got {list(words[:2])}.")
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, texts: Iterable[str], min_count: int = 1) -> WordVocab:
        """Vocabulary of the words seen at least ``min_count`` times, most frequent first."""
        counts = Counter(w for t in texts for w in tokenize(t))
        kept = sorted(
            (w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w)
        )
        return cls([PAD, UNK, *kept])

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, texts: Sequence[str], max_len: int) -> torch.Tensor:
        """Token ids ``(len(texts), max_len)``, truncated and right-padded with 0."""
        out = torch.zeros(len(texts), max_len, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [self.index.get(w, 1) for w in tokenize(t)][:max_len]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out
