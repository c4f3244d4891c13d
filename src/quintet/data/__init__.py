"""Embedded datasets that need no download."""

from quintet.core.io import cache_dir
from quintet.data.text import (
    ByteCorpus,
    decode,
    encode,
    enwik8_corpus,
    stdlib_corpus,
    stdlib_files,
    text_corpus,
)

__all__ = [
    "ByteCorpus",
    "cache_dir",
    "decode",
    "encode",
    "enwik8_corpus",
    "stdlib_corpus",
    "stdlib_files",
    "text_corpus",
]
