"""Class-labelled image sets that need no download, an image-folder reader, and figure helpers.

- :func:`shapes_dataset`: procedural shapes (10 kinds: circle, square, triangle, plus, ring, diamond,
  x, frame, bars, half-disk), each with a random colour, size, position and slight rotation on a
  tinted gradient background, 32 x 32 RGB by default; 10k train / 1k val images, classes balanced,
  generated deterministically from a seed with vectorised numpy drawing (signed distances + 1 px
  anti-aliasing). Colour, size and position carry no class information: only the shape does.
- :func:`image_folder`: a user's folder with one sub-folder per class (PNG / JPEG / ...), or
  ``train/`` and ``val/`` folders holding those; resized on the short side and centre-cropped.
- :func:`load_images`: ``--data PATH`` or ``None`` (the embedded shapes).
- :func:`save_image_grid` / :func:`save_gif`: figures for the demos (Pillow only).

Both sets are written once to ``$QUINTET_CACHE`` as ``.npy`` files (atomically, under a name that
hashes what went into them and a format version) and opened memory-mapped: images ``(N, 3, H, W)``
uint8, labels ``(N,)`` int64.

Shape glossary: ``b`` batch, ``n`` images, ``t`` frames, ``h``/``w`` height/width.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from quintet.core.io import atomic_write, cache_dir
from quintet.core.validation import check_int, check_number

SPLITS = ("train", "val")
SHAPES_VERSION = 1
"""bump when the drawing changes: cached sets of another version are not reused"""
FOLDER_VERSION = 1
SHAPE_CLASSES = ("circle", "square", "triangle", "plus", "ring", "diamond", "x", "frame", "bars", "half_disk")
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
VAL_EVERY = 20
"""in a class-folder layout, every 20th image (sorted by class and path) goes to the validation split"""
_CHUNK = 2048  # images drawn at once: bounds the float32 working memory to ~50 MB at 32 x 32
_MIN_TILE = 96  # automatic figure scale: each image at least this many pixels high


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Train / val images ``(n, 3, h, w)`` uint8 (memory-mapped when cached) and labels ``(n,)`` int64."""

    name: str
    classes: tuple[str, ...]
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray

    def __post_init__(self):
        for split in SPLITS:
            images, labels = self.split(split)
            if images.ndim != 4 or images.shape[1] != 3 or images.dtype != np.uint8:
                raise ValueError(f"{split}_images: expected uint8 (n, 3, h, w), got {images.dtype} {images.shape}")
            if images.shape[2:] != self.train_images.shape[2:]:
                raise ValueError(f"{split}_images: size {images.shape[2:]} differs from train's")
            if labels.shape != (len(images),) or labels.dtype != np.int64:
                raise ValueError(f"{split}_labels: expected int64 ({len(images)},), got {labels.dtype} {labels.shape}")

    @property
    def image_size(self) -> int:
        return self.train_images.shape[-1]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """``(images, labels)`` of ``split`` ("train" or "val")."""
        if split == "train":
            return self.train_images, self.train_labels
        if split == "val":
            return self.val_images, self.val_labels
        raise ValueError(f"split: expected 'train' or 'val', got {split!r}")

    def count(self, split: str) -> int:
        return len(self.split(split)[1])

    def batch(
        self, split: str, indices: torch.Tensor | Sequence[int] | np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``(b, 3, h, w)`` float32 in [0, 1] and labels ``(b,)`` int64 at ``indices``."""
        images, labels = self.split(split)
        index = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices)
        if index.ndim != 1 or not (np.issubdtype(index.dtype, np.integer) or index.size == 0):
            raise ValueError(f"indices: expected a 1-D sequence of integers, got {index.dtype} {index.shape}")
        if index.size and (index.min() < 0 or index.max() >= len(labels)):
            raise ValueError(f"indices: must lie in [0, {len(labels)}) for {split}, got [{index.min()}, {index.max()}]")
        pixels = torch.from_numpy(np.ascontiguousarray(images[index]))
        return pixels.float().div_(255), torch.from_numpy(np.asarray(labels[index], dtype=np.int64))

    def random_batch(
        self, split: str, batch_size: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` images drawn uniformly (with replacement): a deterministic function of ``generator``."""
        check_int(batch_size, "batch_size")
        return self.batch(split, torch.randint(0, self.count(split), (batch_size,), generator=generator))

    def batches(self, split: str, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The whole split in order, ``batch_size`` images at a time (the last batch may be smaller)."""
        check_int(batch_size, "batch_size")
        total = self.count(split)
        for start in range(0, total, batch_size):
            yield self.batch(split, np.arange(start, min(start + batch_size, total)))


# --------------------------------------------------------------------------- caching


def _cache_paths(directory: Path, name: str) -> dict[tuple[str, str], Path]:
    kinds = ("images", "labels")
    return {(split, kind): directory / f"{name}.{split}.{kind}.npy" for split in SPLITS for kind in kinds}


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a handle: np.save would append ".npy" to a temporary name
            np.save(handle, array)

    atomic_write(path, write)


def _open(name: str, classes: tuple[str, ...], paths: dict[tuple[str, str], Path]) -> ImageSet:
    arrays = {f"{split}_{kind}": np.load(path, mmap_mode="r") for (split, kind), path in paths.items()}
    return ImageSet(name=name, classes=classes, **arrays)


def _digest(parts: Sequence[object]) -> str:
    return hashlib.sha256("\n".join(map(str, parts)).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- procedural shapes


def _shape_distance(kind: str, u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Signed distance in pixels (< 0 inside) of a shape of radius ``r`` at the origin; ``v`` points down."""
    au, av = np.abs(u), np.abs(v)
    if kind == "circle":
        return np.hypot(u, v) - r
    if kind == "square":
        return np.maximum(au, av) - 0.8 * r
    if kind == "triangle":  # pointing up, corners on the circle of radius 1.15 r: edges at distance 0.575 r
        s = 0.5 * math.sqrt(3.0)
        return np.maximum(np.maximum(v, s * u - 0.5 * v), -s * u - 0.5 * v) - 0.575 * r
    if kind == "diamond":
        return (au + av - 1.05 * r) / math.sqrt(2.0)
    if kind in ("plus", "x"):
        if kind == "x":  # a plus turned by 45 degrees
            u, v = (u + v) / math.sqrt(2.0), (v - u) / math.sqrt(2.0)
            au, av = np.abs(u), np.abs(v)
        arm, half_width = r, 0.28 * r
        return np.minimum(np.maximum(au - arm, av - half_width), np.maximum(au - half_width, av - arm))
    if kind == "ring":
        return np.abs(np.hypot(u, v) - 0.78 * r) - 0.22 * r
    if kind == "frame":
        return np.abs(np.maximum(au, av) - 0.65 * r) - 0.18 * r
    if kind == "bars":  # three horizontal bars of height 2/5 of the box, gaps as high
        half, bar = 0.85 * r, 0.34 * r
        nearest_bar = np.minimum(np.minimum(np.abs(v + 2 * bar), np.abs(v)), np.abs(v - 2 * bar)) - 0.5 * bar
        return np.maximum(np.maximum(au - half, av - half), nearest_bar)
    if kind == "half_disk":  # flat side down, the disk's centre 0.4 r below the shape's
        centre = 0.4 * r
        return np.maximum(np.hypot(u, v - centre) - 1.1 * r, v - centre)
    raise ValueError(f"kind: unknown shape {kind!r}")


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB: ``(n,)`` arrays in [0, 1] -> ``(n, 3)``."""
    k = (np.array([5.0, 3.0, 1.0]) + 6.0 * h[:, None]) % 6.0
    return v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _draw_shapes(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Images ``(n, 3, size, size)`` uint8 of the shapes ``labels`` names, drawn with ``rng``."""
    n = len(labels)
    # every random draw happens here, in a fixed order, so the bytes depend only on (seed, n, size)
    radius = rng.uniform(0.2, 0.36, n) * size
    margin = 1.05 * radius
    cx = margin + rng.uniform(0, 1, n) * (size - 2 * margin)
    cy = margin + rng.uniform(0, 1, n) * (size - 2 * margin)
    angle = rng.uniform(-12, 12, n) * math.pi / 180
    dark_on_light = rng.uniform(0, 1, n) < 0.35
    shape_value = np.where(dark_on_light, rng.uniform(0.05, 0.35, n), rng.uniform(0.7, 1.0, n))
    background_value = np.where(dark_on_light, rng.uniform(0.65, 0.95, n), rng.uniform(0.08, 0.4, n))
    shape_rgb = _hsv_to_rgb(rng.uniform(0, 1, n), rng.uniform(0.55, 1.0, n), shape_value)
    background_rgb = _hsv_to_rgb(rng.uniform(0, 1, n), rng.uniform(0.15, 0.6, n), background_value)
    gradient_angle = rng.uniform(0, 2 * math.pi, n)
    gradient = rng.uniform(-0.35, 0.35, n)
    noise = rng.normal(0, 0.02, (n, 3, size, size)).astype(np.float32)
    per_image = (radius, cx, cy, angle, gradient_angle, gradient)

    grid = np.arange(size, dtype=np.float32) + 0.5  # pixel centres
    gy, gx = grid[None, :, None], grid[None, None, :]
    images = np.empty((n, 3, size, size), dtype=np.uint8)
    for start in range(0, n, _CHUNK):
        part = slice(start, min(start + _CHUNK, n))
        # per-image parameters of this chunk as (n, 1, 1) columns against the (1, size, size) pixel grid
        r, x0, y0, turn, tilt, slope = (a[part, None, None].astype(np.float32) for a in per_image)
        dx, dy = gx - x0, gy - y0
        u, v = np.cos(turn) * dx + np.sin(turn) * dy, np.cos(turn) * dy - np.sin(turn) * dx
        distance = np.empty((len(r), size, size), dtype=np.float32)
        for label, kind in enumerate(SHAPE_CLASSES):  # a loop over the 10 kinds, each vectorised over images
            rows = labels[part] == label
            if rows.any():
                distance[rows] = _shape_distance(kind, u[rows], v[rows], r[rows])
        alpha = np.clip(0.5 - distance, 0.0, 1.0)[:, None]  # 1 px anti-aliased edge
        ramp = (dx * np.cos(tilt) + dy * np.sin(tilt)) / size
        background = background_rgb[part, :, None, None] * (1.0 + slope * ramp)[:, None]
        pixels = background * (1.0 - alpha) + shape_rgb[part, :, None, None] * alpha + noise[part]
        images[part] = np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)
    return images


def _shape_split(count: int, size: int, seed: int, split_index: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, split_index])  # own stream per split: val does not move with train_size
    labels = rng.permutation(np.arange(count) % len(SHAPE_CLASSES)).astype(np.int64)  # balanced classes
    return _draw_shapes(labels, size, rng), labels


def shapes_dataset(
    *,
    image_size: int = 32,
    train_size: int = 10_000,
    val_size: int = 1_000,
    seed: int = 0,
    cache: Path | None = None,
) -> ImageSet:
    """The embedded shapes set (10 balanced classes), generated once per parameters and cached."""
    check_int(image_size, "image_size", minimum=8)
    check_int(train_size, "train_size")
    check_int(val_size, "val_size")
    check_int(seed, "seed", minimum=0)
    parts = [f"shapes v{SHAPES_VERSION}", image_size, train_size, val_size, seed, f"numpy {np.__version__}"]
    name = f"shapes{image_size}-{_digest(parts)}"
    paths = _cache_paths(cache or cache_dir(), name)
    if not all(path.is_file() for path in paths.values()):
        for index, (split, count) in enumerate(zip(SPLITS, (train_size, val_size))):
            images, labels = _shape_split(count, image_size, seed, index)
            _save_npy(paths[split, "images"], images)
            _save_npy(paths[split, "labels"], labels)
    return _open("shapes", SHAPE_CLASSES, paths)


# --------------------------------------------------------------------------- image folders


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _class_folders(folder: Path) -> dict[str, list[Path]]:
    """Class name -> its image files (any depth, sorted by path); folders without images are skipped."""
    classes = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted((p for p in sub.rglob("*") if _is_image(p)), key=lambda p: p.relative_to(sub).as_posix())
        if files:
            classes[sub.name] = files
    return classes


def _folder_layout(folder: Path) -> tuple[tuple[str, ...], dict[str, list[tuple[Path, int]]]]:
    """Class names and, per split, the (file, label) pairs."""
    if (folder / "train").is_dir() and (folder / "val").is_dir():
        per_split = {split: _class_folders(folder / split) for split in SPLITS}
        classes = tuple(per_split["train"])
        unknown = sorted(set(per_split["val"]) - set(classes))
        if unknown:
            raise ValueError(f"data: {folder / 'val'} has class folders {unknown} that {folder / 'train'} lacks")
        if not classes or not per_split["val"]:
            raise ValueError(f"data: {folder} has train/ and val/ but one of them holds no class folders with images")
        entries = {
            split: [(path, classes.index(name)) for name, files in found.items() for path in files]
            for split, found in per_split.items()
        }
        return classes, entries
    found = _class_folders(folder)
    if not found:
        raise ValueError(
            f"data: {folder} has no class folders with images (expected one sub-folder per class holding "
            f"{'/'.join(sorted(IMAGE_EXTENSIONS))} files, or train/ and val/ folders of those)"
        )
    classes = tuple(found)
    every = [(path, label) for label, files in enumerate(found.values()) for path in files]
    entries = {
        "train": [e for i, e in enumerate(every) if i % VAL_EVERY != VAL_EVERY - 1],
        "val": [e for i, e in enumerate(every) if i % VAL_EVERY == VAL_EVERY - 1],
    }
    if not entries["val"]:
        raise ValueError(
            f"data: {folder} holds {len(every)} images; the validation split takes every {VAL_EVERY}th, so at "
            f"least {VAL_EVERY} are needed (or use train/ and val/ folders)"
        )
    return classes, entries


def _read_image(path: Path, size: int) -> np.ndarray:
    """One file -> ``(3, size, size)`` uint8: RGB (transparency over white), short side resized, centre crop."""
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                rgba = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            fitted = ImageOps.fit(image.convert("RGB"), (size, size), method=Image.Resampling.BICUBIC)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"data: cannot read image {path} ({error})") from error
    return np.asarray(fitted, dtype=np.uint8).transpose(2, 0, 1)


def _write_folder_split(entries: list[tuple[Path, int]], size: int, images_path: Path, labels_path: Path) -> None:
    def write(tmp: Path) -> None:
        # written straight into a memory-mapped file: a folder larger than memory still works
        images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(entries), 3, size, size))
        workers = min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(workers) as pool:  # Pillow decodes with the GIL released
            for index, pixels in enumerate(pool.map(lambda entry: _read_image(entry[0], size), entries)):
                images[index] = pixels
        images.flush()
        del images

    atomic_write(images_path, write)
    _save_npy(labels_path, np.array([label for _, label in entries], dtype=np.int64))


def image_folder(path: str | os.PathLike, *, image_size: int = 32, cache: Path | None = None) -> ImageSet:
    """Images of a folder with one sub-folder per class (or ``train/`` + ``val/`` folders of those).

    Without ``train/`` + ``val/``, every 20th image (sorted by class, then path) is for validation.
    Each image is converted to RGB, resized on its short side to ``image_size`` and centre-cropped.
    """
    check_int(image_size, "image_size", minimum=8)
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(f"data: {folder} is not a folder (expected one sub-folder of images per class)")
    classes, entries = _folder_layout(folder)
    parts = [f"folder v{FOLDER_VERSION}", folder.resolve(), image_size, classes]
    for split in SPLITS:
        for file, label in entries[split]:
            stat = file.stat()
            parts.append(f"{split}:{label}:{file.relative_to(folder).as_posix()}:{stat.st_size}:{stat.st_mtime_ns}")
    name = f"folder-{folder.resolve().name or 'data'}{image_size}-{_digest(parts)}"
    paths = _cache_paths(cache or cache_dir(), name)
    if not all(p.is_file() for p in paths.values()):
        for split in SPLITS:
            _write_folder_split(entries[split], image_size, paths[split, "images"], paths[split, "labels"])
    return _open(folder.resolve().name or str(folder), classes, paths)


def load_images(data: str | os.PathLike | None = None, **kwargs) -> ImageSet:
    """``None`` -> the embedded :func:`shapes_dataset`; a path -> :func:`image_folder` (``--data PATH``)."""
    if data is None:
        return shapes_dataset(**kwargs)
    return image_folder(data, **kwargs)


# --------------------------------------------------------------------------- figures


def _to_uint8(images: object, name: str) -> np.ndarray:
    """``(n, c, h, w)`` float in [0, 1] or uint8, c in {1, 3}, tensor or array -> ``(n, h, w, 3)`` uint8."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu()
        array = images.float().numpy() if images.is_floating_point() else images.numpy()
    elif isinstance(images, np.ndarray):
        array = images
    else:
        raise TypeError(f"{name}: expected a torch.Tensor or numpy array, got {type(images).__name__}")
    if array.ndim != 4 or array.shape[1] not in (1, 3) or 0 in array.shape:
        raise ValueError(f"{name}: expected (n, 3 or 1, h, w) with n, h, w >= 1, got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"{name}: holds NaN or infinite values")
        array = np.rint(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise TypeError(f"{name}: expected float values in [0, 1] or uint8, got dtype {array.dtype}")
    array = array.transpose(0, 2, 3, 1)
    return np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array


def _scale(scale: int | None, height: int) -> int:
    if scale is None:
        return max(1, math.ceil(_MIN_TILE / height))
    check_int(scale, "scale")
    return scale


def _image_format(path: Path, allowed: Sequence[str] | None = None) -> str:
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None or (allowed is not None and image_format not in allowed):
        expected = "/".join(allowed) if allowed else "an image suffix Pillow can write (.png, .jpg, ...)"
        raise ValueError(f"path: {path} needs {expected}")
    return image_format


def save_image_grid(
    images: torch.Tensor | np.ndarray,
    path: str | os.PathLike,
    *,
    nrow: int = 8,
    pad: int = 2,
    scale: int | None = None,
    pad_value: float = 1.0,
) -> Path:
    """Write ``images (n, 3, h, w)`` as a grid of ``nrow`` images per row, ``pad`` pixels apart; returns the path.

    ``scale`` upsamples the whole grid by an integer factor (nearest neighbour, pixels stay sharp);
    by default the smallest that makes each image at least 96 pixels high. The file is
    ``(rows * (h + pad) + pad) * scale`` pixels high and ``(cols * (w + pad) + pad) * scale`` wide.
    """
    path = Path(path)
    image_format = _image_format(path)
    pixels = _to_uint8(images, "images")
    check_int(nrow, "nrow")
    check_int(pad, "pad", minimum=0)
    check_number(pad_value, "pad_value", low=0.0, high=1.0)
    n, h, w, _ = pixels.shape
    cols, rows = min(nrow, n), math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), round(pad_value * 255), dtype=np.uint8)
    for index in range(n):  # a loop over the images of a figure, not over pixels
        top, left = pad + (index // cols) * (h + pad), pad + (index % cols) * (w + pad)
        grid[top : top + h, left : left + w] = pixels[index]
    factor = _scale(scale, h)
    grid = grid.repeat(factor, axis=0).repeat(factor, axis=1)
    atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format=image_format))
    return path


def save_gif(
    frames: torch.Tensor | np.ndarray,
    path: str | os.PathLike,
    *,
    fps: float = 8.0,
    scale: int | None = None,
    loop: int = 0,
) -> Path:
    """Write ``frames (t, 3, h, w)`` as an animated GIF at ``fps`` frames per second (``loop=0``: forever).

    ``scale`` as in :func:`save_image_grid`. Pillow merges identical consecutive frames (their
    durations add up), so a still stretch plays as long but stores one frame.
    """
    path = Path(path)
    _image_format(path, allowed=("GIF",))
    pixels = _to_uint8(frames, "frames")
    check_number(fps, "fps", low=0.0, high=100.0, low_open=True)
    check_int(loop, "loop", minimum=0)
    factor = _scale(scale, pixels.shape[1])
    images = [Image.fromarray(frame.repeat(factor, axis=0).repeat(factor, axis=1)) for frame in pixels]
    duration = max(10, round(1000 / fps))  # GIF delays are stored in 10 ms steps

    def write(tmp: Path) -> None:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=loop)

    atomic_write(path, write)
    return path

