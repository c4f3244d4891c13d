import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from quintet.data import images as images_module
from quintet.data.images import (
    SHAPE_CLASSES,
    image_folder,
    load_images,
    save_gif,
    save_image_grid,
    shapes_dataset,
)

SMALL = dict(train_size=120, val_size=30)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    first = shapes_dataset(seed=3, cache=tmp_path / "a", **SMALL)
    again = shapes_dataset(seed=3, cache=tmp_path / "b", **SMALL)
    other = shapes_dataset(seed=4, cache=tmp_path / "a", **SMALL)
    for split in ("train", "val"):
        for mine, theirs in zip(first.split(split), again.split(split)):
            assert np.array_equal(mine, theirs)
        assert not np.array_equal(first.split(split)[0], other.split(split)[0])
    fewer = shapes_dataset(seed=3, cache=tmp_path / "a", train_size=60, val_size=30)
    assert np.array_equal(fewer.val_images, first.val_images)  # val does not move with train_size


def test_classes_are_balanced_and_arrays_have_the_documented_shapes(tmp_path):
    data = shapes_dataset(cache=tmp_path, **SMALL)
    assert data.classes == SHAPE_CLASSES and data.num_classes == 10 and data.image_size == 32
    assert data.count("train") == 120 and data.count("val") == 30
    assert np.bincount(data.train_labels, minlength=10).tolist() == [12] * 10
    assert np.bincount(data.val_labels, minlength=10).tolist() == [3] * 10
    assert data.train_images.shape == (120, 3, 32, 32) and data.train_images.dtype == np.uint8
    assert data.train_labels.dtype == np.int64 and isinstance(data.train_images, np.memmap)
    assert data.train_images.std() > 30  # not blank: shapes on backgrounds
    large = shapes_dataset(image_size=48, cache=tmp_path, train_size=10, val_size=10)
    assert large.train_images.shape == (10, 3, 48, 48)


def test_second_load_maps_the_cached_files_and_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    shapes_dataset(cache=tmp_path, **SMALL)
    files = sorted(tmp_path.iterdir())
    assert len(files) == 4 and all(p.suffix == ".npy" for p in files)
    stamps = [p.stat().st_mtime_ns for p in files]
    monkeypatch.setattr(images_module, "_draw_shapes", lambda *a: pytest.fail("regenerated a cached set"))
    shapes_dataset(cache=tmp_path, **SMALL)
    assert sorted(tmp_path.iterdir()) == files and [p.stat().st_mtime_ns for p in files] == stamps
    monkeypatch.undo()

    def broken_save(handle, array):
        handle.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(images_module.np, "save", broken_save)
    with pytest.raises(OSError):
        shapes_dataset(cache=tmp_path / "crash", **SMALL)
    assert list((tmp_path / "crash").iterdir()) == []  # no half-written file under any name


def test_batches_are_float_in_unit_range_and_a_function_of_the_generator(tmp_path):
    data = shapes_dataset(cache=tmp_path, **SMALL)
    x, y = data.random_batch("train", 8, torch.Generator().manual_seed(1))
    x2, y2 = data.random_batch("train", 8, torch.Generator().manual_seed(1))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    images, labels = data.batch("val", [0, 5])
    assert torch.equal(images, torch.from_numpy(data.val_images[[0, 5]] / 255).float())
    assert labels.tolist() == data.val_labels[[0, 5]].tolist()
    assert sum(len(y) for _, y in data.batches("val", 7)) == 30
    with pytest.raises(ValueError, match="^indices"):
        data.batch("val", [30])
    with pytest.raises(ValueError, match="^split"):
        data.batch("test", [0])
    with pytest.raises(ValueError, match="^batch_size"):
        data.random_batch("train", 0, torch.Generator())


def _write_class_folder(root, name, colour, count, start=0):
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(start, start + count):
        suffix = ".png" if index % 2 else ".jpg"
        Image.new("RGB", (40, 24), colour).save(folder / f"{index:03d}{suffix}")


def test_folder_round_trip_reads_pngs_and_jpegs_with_the_right_labels(tmp_path):
    root = tmp_path / "pets"
    _write_class_folder(root, "cat", (250, 10, 10), 12)
    _write_class_folder(root, "dog", (10, 10, 250), 12)
    (root / "dog" / "notes.txt").write_text("not an image")
    Image.new("LA", (8, 8), (0, 0)).save(root / "dog" / "zz-transparent.png")  # over white: a white image
    data = image_folder(root, image_size=16, cache=tmp_path / "cache")
    assert data.classes == ("cat", "dog") and data.name == "pets"
    assert data.count("train") + data.count("val") == 25 and data.count("val") == 1
    assert data.train_images.shape[1:] == (3, 16, 16)
    images, labels = data.split("train")
    for image, label in zip(images, labels):
        mean = image.reshape(3, -1).mean(1)
        if mean.min() > 240:
            continue  # the transparent one
        assert np.argmax(mean) == (0 if label == 0 else 2)  # red cats, blue dogs (JPEG is close enough)
    assert (images.reshape(len(images), -1).min(1) > 240).sum() == 1
    assert load_images(root, image_size=16, cache=tmp_path / "cache").classes == ("cat", "dog")
    assert load_images(None, cache=tmp_path / "cache", **SMALL).classes == SHAPE_CLASSES


def test_folder_with_train_and_val_folders_keeps_their_split(tmp_path):
    root = tmp_path / "split"
    for split, count in (("train", 3), ("val", 2)):
        _write_class_folder(root / split, "a", (200, 200, 0), count)
        _write_class_folder(root / split, "b", (0, 200, 200), count)
    data = image_folder(root, cache=tmp_path / "cache")
    assert (data.count("train"), data.count("val")) == (6, 4)
    assert data.val_labels.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("make", ["missing", "file", "no_classes", "unreadable", "too_few", "val_only_class"])
def test_bad_folders_raise_value_error_naming_data(tmp_path, make):
    root = tmp_path / "data"
    match = "^data"
    if make == "file":
        root.write_text("x")
    elif make == "no_classes":
        root.mkdir()
        Image.new("RGB", (4, 4)).save(root / "loose.png")
        (root / "empty").mkdir()
    elif make == "unreadable":
        _write_class_folder(root, "a", (1, 2, 3), 20)
        (root / "a" / "broken.png").write_bytes(b"not a png at all")
        match = "^data: cannot read image .*broken.png"
    elif make == "too_few":
        _write_class_folder(root, "a", (1, 2, 3), 5)
    elif make == "val_only_class":
        _write_class_folder(root / "train", "a", (1, 2, 3), 2)
        _write_class_folder(root / "val", "b", (1, 2, 3), 2)
    with pytest.raises(ValueError, match=match):
        image_folder(root, cache=tmp_path / "cache")


def test_grid_and_gif_are_written_at_the_documented_pixel_size(tmp_path):
    images = torch.rand(5, 3, 32, 32)
    path = save_image_grid(images, tmp_path / "grid.png", nrow=3, pad=2, scale=2)
    with Image.open(path) as grid:
        assert grid.size == ((3 * 34 + 2) * 2, (2 * 34 + 2) * 2)  # 3 columns, 2 rows
    auto = save_image_grid((images * 255).to(torch.uint8).numpy(), tmp_path / "auto.png", nrow=5, pad=0)
    with Image.open(auto) as grid:
        assert grid.size == (5 * 32 * 3, 32 * 3)  # 32 px images are scaled 3x by default
        first_tile = np.asarray(grid)[:96:3, :96:3].transpose(2, 0, 1)
    assert np.array_equal(first_tile, (images[0] * 255).to(torch.uint8).numpy())

    frames = torch.zeros(4, 3, 16, 16)
    frames[torch.arange(4), 0, :, torch.arange(4)] = 1.0  # a red line moving right: every frame differs
    gif = save_gif(frames, tmp_path / "clip.gif", fps=5, scale=2)
    with Image.open(gif) as clip:
        assert clip.size == (32, 32) and clip.n_frames == 4 and clip.info["duration"] == 200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auto.png", "clip.gif", "grid.png"]


@pytest.mark.parametrize(
    "call, error, name",
    [
        (lambda p: save_image_grid(torch.rand(3, 32, 32), p / "a.png"), ValueError, "images"),
        (lambda p: save_image_grid(torch.full((1, 3, 4, 4), float("nan")), p / "a.png"), ValueError, "images"),
        (lambda p: save_image_grid(torch.zeros(1, 3, 4, 4, dtype=torch.int32), p / "a.png"), TypeError, "images"),
        (lambda p: save_image_grid([[0.0]], p / "a.png"), TypeError, "images"),
        (lambda p: save_image_grid(torch.rand(1, 3, 4, 4), p / "a.unknown"), ValueError, "path"),
        (lambda p: save_image_grid(torch.rand(1, 3, 4, 4), p / "a.png", nrow=0), ValueError, "nrow"),
        (lambda p: save_gif(torch.rand(2, 3, 4, 4), p / "a.png"), ValueError, "path"),
        (lambda p: save_gif(torch.rand(2, 4, 4), p / "a.gif"), ValueError, "frames"),
        (lambda p: save_gif(torch.rand(2, 3, 4, 4), p / "a.gif", fps=0), ValueError, "fps"),
    ],
)
def test_figure_helpers_reject_bad_input_naming_the_argument(tmp_path, call, error, name):
    with pytest.raises(error, match=f"^{name}"):
        call(tmp_path)


def test_a_tiny_conv_net_learns_the_classes_in_a_few_seconds():
    """Shape, not colour or position, names the class: a 3-second conv net is far above chance (10 %)."""
    data = shapes_dataset()
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        x, y = data.random_batch("train", 64, generator)
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        correct = sum(int((net(x).argmax(-1) == y).sum()) for x, y in data.batches("val", 500))
    assert correct / data.count("val") > 0.4
