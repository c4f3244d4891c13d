import numpy as np
import pytest
import torch

from quintet.data import decode, encode, enwik8_corpus, stdlib_corpus, stdlib_files, text_corpus
from quintet.data.text import VAL_EVERY, stdlib_root


def test_stdlib_corpus_is_the_sorted_standard_library_split_by_file():
    files = stdlib_files()
    root = stdlib_root()
    relative = [p.relative_to(root).as_posix() for p in files]
    assert relative == sorted(relative)
    assert not any(part in {"test", "tests", "site-packages"} for r in relative for part in r.split("/")[:-1])
    assert "os.py" in relative
    corpus = stdlib_corpus()
    assert corpus.train.dtype == np.uint8 and isinstance(corpus.train, np.memmap)
    sizes = [p.stat().st_size + 2 for p in files]  # each file is followed by a blank-line separator
    val_size = sum(size for index, size in enumerate(sizes) if index % VAL_EVERY == VAL_EVERY - 1)
    assert (len(corpus.train), len(corpus.val)) == (sum(sizes) - val_size, val_size)
    first_train = files[0].read_bytes()
    assert bytes(corpus.train[: len(first_train)]) == first_train


def test_folder_corpus_puts_every_twentieth_file_in_validation_and_is_cached(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for index in range(25):
        (folder / f"{index:02d}.txt").write_text(f"file {index}\n")
    (folder / "image.bin").write_bytes(b"\0\1\2")  # binary files are skipped
    cache = tmp_path / "cache"
    corpus = text_corpus(folder, cache=cache)
    assert bytes(corpus.val) == b"file 19\n\n\n"
    assert bytes(corpus.train).count(b"file") == 24 and b"\0" not in bytes(corpus.train)
    written = sorted(p.name for p in cache.iterdir())
    assert len(written) == 2 and all(name.endswith(".u8") for name in written)
    text_corpus(folder, cache=cache)
    assert sorted(p.name for p in cache.iterdir()) == written  # reused, nothing rewritten or left behind


def test_file_corpus_keeps_the_last_five_percent_for_validation(tmp_path):
    path = tmp_path / "book.txt"
    path.write_bytes(bytes(range(256)) * 4)
    corpus = text_corpus(path)
    assert len(corpus.val) == int(1024 * 0.05) and len(corpus.train) + len(corpus.val) == 1024
    assert bytes(corpus.val) == (bytes(range(256)) * 4)[-len(corpus.val) :]


@pytest.mark.parametrize("make", ["missing", "empty_file", "small_folder"])
def test_bad_data_paths_raise_value_error_naming_data(tmp_path, make):
    if make == "empty_file":
        (tmp_path / "empty.txt").write_bytes(b"")
        path = tmp_path / "empty.txt"
    elif make == "small_folder":
        (tmp_path / "a.txt").write_text("a")
        path = tmp_path
    else:
        path = tmp_path / "nope"
    with pytest.raises(ValueError, match="data"):
        text_corpus(path)


def test_enwik8_split_is_90_5_5_million(tmp_path):
    path = tmp_path / "enwik8"
    with open(path, "wb") as handle:  # a sparse file of enwik8's size
        handle.truncate(100_000_000)
    corpus = enwik8_corpus(tmp_path)
    assert (len(corpus.train), len(corpus.val), len(corpus.test)) == (90_000_000, 5_000_000, 5_000_000)
    with open(path, "r+b") as handle:
        handle.truncate(1000)
    with pytest.raises(ValueError, match="data"):
        enwik8_corpus(path)


def test_windows_are_deterministic_and_in_range():
    corpus = stdlib_corpus()
    first = corpus.random_windows("train", batch_size=3, length=33, generator=torch.Generator().manual_seed(5))
    again = corpus.random_windows("train", batch_size=3, length=33, generator=torch.Generator().manual_seed(5))
    assert first.shape == (3, 33) and first.dtype == torch.long and torch.equal(first, again)
    assert 0 <= int(first.min()) and int(first.max()) < 256
    evaluation = corpus.eval_windows("val", length=100, max_windows=5)
    assert evaluation.shape == (5, 100)
    assert bytes(evaluation[0].tolist()) == bytes(corpus.val[:100])
    with pytest.raises(ValueError, match="split"):
        corpus.split("test")


def test_encode_decode_round_trip():
    text = "def f(x):\n    return x  # ünïcode"
    assert decode(encode(text)) == text
