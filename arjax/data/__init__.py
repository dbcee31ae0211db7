"""Byte-level text data: vocabulary, corpora and the Grain batch pipeline."""

# ruff: noqa: F401  (this module only re-exports)
from .boundaries import WordScanOut, WordScanState, word_scan_init, word_scan_step, word_starts
from .corpus import list_plays, load_corpus
from .pipeline import (
    DataConfig,
    make_eval_batches,
    make_train_iterator,
    pack_documents,
    text_to_batch,
)
from .splitter import split_word_bytes, split_words
from .vocab import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, decode, encode
