"""Embedded datasets that need no download, and the one store of recorded episodes."""

from quintet.core.io import cache_dir
from quintet.data.episodes import Episode, EpisodeSpec, EpisodeStore, write_episodes
from quintet.data.minari_io import read_minari, write_minari
from quintet.data.rollouts import make_env, random_policy, record, resize_frames, rollout
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
    "Episode",
    "EpisodeSpec",
    "EpisodeStore",
    "cache_dir",
    "decode",
    "encode",
    "enwik8_corpus",
    "make_env",
    "random_policy",
    "read_minari",
    "record",
    "resize_frames",
    "rollout",
    "stdlib_corpus",
    "stdlib_files",
    "text_corpus",
    "write_episodes",
    "write_minari",
]
