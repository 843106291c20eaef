"""Data types shared by every data module and model: batch, vocabularies, targets."""

from vlcompress.data.answers import AnswerVocab
from vlcompress.data.batch import VLBatch
from vlcompress.data.text import WordVocab, tokenize

__all__ = ["AnswerVocab", "VLBatch", "WordVocab", "tokenize"]
