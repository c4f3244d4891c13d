"""Embedded datasets that need no download."""

from quintet.data.text import (
    ByteCorpus,
    cache_dir,
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
