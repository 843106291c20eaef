"""Data types and pieces shared by every benchmark: batch, vocabularies, the data contract,
the epoch sampler, the changing-priors re-split and the question-type prior."""

from vlcompress.data.answers import AnswerVocab
from vlcompress.data.batch import VLBatch
from vlcompress.data.contract import (
    DataInfo,
    VQADataModule,
    VQADataOptions,
    check_data_contract,
)
from vlcompress.data.priors import question_type_prior
from vlcompress.data.resplit import (
    answer_distribution_report,
    changing_priors_split,
    total_variation,
)
from vlcompress.data.sampler import EpochShuffleSampler
from vlcompress.data.text import WordVocab, tokenize

__all__ = [
    "AnswerVocab",
    "DataInfo",
    "EpochShuffleSampler",
    "VLBatch",
    "VQADataModule",
    "VQADataOptions",
    "WordVocab",
    "answer_distribution_report",
    "changing_priors_split",
    "check_data_contract",
    "question_type_prior",
    "tokenize",
    "total_variation",
]
