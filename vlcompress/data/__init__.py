"""Data types and pieces shared by every benchmark: batch, vocabularies, the data contract,
the epoch sampler, the changing-priors re-split, the question-type prior, the region-feature
store and the VQA v2 / VQA-CP v2 file readers."""

from vlcompress.data.answers import AnswerVocab
from vlcompress.data.batch import VLBatch
from vlcompress.data.contract import (
    DataInfo,
    VQADataModule,
    VQADataOptions,
    check_data_contract,
)
from vlcompress.data.priors import question_type_prior
from vlcompress.data.regions import RegionFileError, RegionStore, convert_obj36, read_obj36_tsv
from vlcompress.data.resplit import (
    answer_distribution_report,
    changing_priors_split,
    total_variation,
)
from vlcompress.data.sampler import EpochShuffleSampler
from vlcompress.data.text import WordVocab, tokenize
from vlcompress.data.vqa_files import VQAPart, coco_image_name, load_vqa_part

__all__ = [
    "AnswerVocab",
    "DataInfo",
    "EpochShuffleSampler",
    "RegionFileError",
    "RegionStore",
    "VLBatch",
    "VQADataModule",
    "VQADataOptions",
    "VQAPart",
    "WordVocab",
    "answer_distribution_report",
    "changing_priors_split",
    "check_data_contract",
    "coco_image_name",
    "convert_obj36",
    "load_vqa_part",
    "question_type_prior",
    "read_obj36_tsv",
    "tokenize",
    "total_variation",
]
