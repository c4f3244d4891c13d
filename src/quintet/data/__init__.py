"""Embedded datasets that need no download, and the one store of recorded episodes."""

from quintet.core.io import cache_dir
from quintet.data.episodes import Episode, EpisodeSpec, EpisodeStore, write_episodes
from quintet.data.images import ImageSet, image_folder, load_images, save_gif, save_image_grid, shapes_dataset
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
    "ImageSet",
    "cache_dir",
    "decode",
    "encode",
    "enwik8_corpus",
    "image_folder",
    "load_images",
    "make_env",
    "random_policy",
    "read_minari",
    "record",
    "resize_frames",
    "rollout",
    "save_gif",
    "save_image_grid",
    "shapes_dataset",
    "stdlib_corpus",
    "stdlib_files",
    "text_corpus",
    "write_episodes",
    "write_minari",
]
