"""8-bit image data for the image models: loaders, the Grain batch pipeline and a PNG writer.

Datasets (uint8 ``[num, height, width, channels]``, values 0..255):

- ``"digits"``: the UCI optdigits 8x8 digits (Alpaydin & Kaynak 1998, CC BY 4.0, as bundled by
  scikit-learn; shipped in ``assets/digits.npz``, see ``LICENSES/optdigits.txt``): 1797 images,
  17 grey levels 0..16 scaled to 0..255; no download. Held-out split: every 6th image (299
  images), the rest train.
- ``"fashion_mnist"``: Fashion-MNIST 28x28 (Xiao et al. 2017, MIT licence) read from the IDX
  files of the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``,
  or ``$ARJAX_FASHION_MNIST_DIR``). ``train``: the 60k training images; ``val``: the 10k test
  images.

Image batch format: a dict of int32 arrays ``[batch, height, width, channels]``: ``inputs`` (the
image), ``targets`` (the same image: models shift internally so that the logits at a subpixel
only see earlier subpixels) and ``loss_mask`` (all ones). Bits/dim = mean nats / ln 2.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from importlib import resources
from pathlib import Path

import grain
import numpy as np

from arjax.config import ConfigError

from .pipeline import shuffled_batches

IMAGE_DATASETS = ("digits", "fashion_mnist")


class DatasetNotFoundError(ConfigError, FileNotFoundError):
    """An image dataset's files are not installed (a config error: the message says how)."""


SPLITS = ("train", "val")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_FILES = {"train": "train-images-idx3-ubyte.gz", "val": "t10k-images-idx3-ubyte.gz"}


def _load_digits(split: str) -> np.ndarray:
    with resources.as_file(resources.files("arjax.data") / "assets" / "digits.npz") as path:
        images = np.load(path)["images"]  # [1797, 8, 8] uint8, values 0..16
    held_out = np.arange(len(images)) % 6 == 5
    images = images[held_out] if split == "val" else images[~held_out]
    return np.round(images * (255.0 / 16.0)).astype(np.uint8)[..., None]


def read_idx_images(path: str | os.PathLike) -> np.ndarray:
    """uint8 ``[num, rows, cols]`` from an (optionally gzipped) IDX3 file (LeCun et al. 1998)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    magic, num, rows, cols = struct.unpack(">IIII", data[:16])
    if magic != 2051:
        raise ValueError(f"{path}: not an IDX3 image file (magic {magic}, expected 2051)")
    pixels = np.frombuffer(data, np.uint8, offset=16)
    if pixels.size != num * rows * cols:
        raise ValueError(f"{path}: {pixels.size} pixels, header says {num}x{rows}x{cols}")
    return pixels.reshape(num, rows, cols)


def _load_fashion_mnist(split: str) -> np.ndarray:
    root = Path(os.environ.get("ARJAX_FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    path = root / _FASHION_FILES[split]
    if not path.is_file():
        raise DatasetNotFoundError(
            f"model.dataset: Fashion-MNIST not found at {path}. Install the Debian package "
            "(`apt-get install dataset-fashion-mnist`) or set ARJAX_FASHION_MNIST_DIR to a "
            f"folder holding {_FASHION_FILES['train']} and {_FASHION_FILES['val']}."
        )
    return read_idx_images(path)[..., None]


def load_images(name: str, split: str) -> np.ndarray:
    """uint8 images ``[num, height, width, channels]`` of dataset ``name``, split ``split``."""
    if name not in IMAGE_DATASETS:
        raise ValueError(f"dataset must be one of {IMAGE_DATASETS}, got {name!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return _load_digits(split) if name == "digits" else _load_fashion_mnist(split)


def image_batch(images: np.ndarray) -> dict[str, np.ndarray]:
    """uint8 ``[batch, *spatial, channels]`` -> the image batch dict (int32, same shape)."""
    x = np.ascontiguousarray(images, np.int32)
    return {"inputs": x, "targets": x, "loss_mask": np.ones_like(x)}


def make_image_train_iterator(
    images: np.ndarray,
    batch_size: int,
    *,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """Endless shuffled batches of ``batch_size // process_count`` images (fresh permutation each
    epoch); process ``p`` reads records ``p::process_count``. ``get_state``/``set_state`` resume.
    """
    if len(images) < batch_size:
        raise ValueError(f"batch_size {batch_size} exceeds the {len(images)} training images")
    return shuffled_batches(
        images, image_batch, batch_size=batch_size, seed=seed,
        process_index=process_index, process_count=process_count,
    )  # fmt: skip


def make_image_eval_batches(
    images: np.ndarray, batch_size: int, max_batches: int = 0
) -> list[dict[str, np.ndarray]]:
    """In-order eval batches (``max_batches`` 0 = all); a short last batch is padded with
    zero images whose ``loss_mask`` is 0."""
    n = len(images) if not max_batches else min(len(images), max_batches * batch_size)
    batches = []
    for start in range(0, n, batch_size):
        chunk = images[start : min(start + batch_size, n)]
        pad = np.zeros_like(images[: batch_size - len(chunk)])
        batch = image_batch(np.concatenate([chunk, pad]))
        batch["loss_mask"][len(chunk) :] = 0
        batches.append(batch)
    return batches


def image_grid(images: np.ndarray, cols: int = 8, pad: int = 1) -> np.ndarray:
    """uint8 ``[num, height, width, channels]`` -> one ``[rows*(h+pad)+pad, cols*(w+pad)+pad, c]``
    image with the tiles in raster order on a black background."""
    num, h, w, c = images.shape
    cols = min(cols, num)
    rows = -(-num // cols)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
    for i, img in enumerate(images):
        top, left = pad + (i // cols) * (h + pad), pad + (i % cols) * (w + pad)
        grid[top : top + h, left : left + w] = img
    return grid


def write_png(path: str | os.PathLike, image: np.ndarray, scale: int = 1) -> Path:
    """Write uint8 ``[height, width, 1 or 3]`` as an 8-bit greyscale/RGB PNG (stdlib zlib only).

    ``scale`` enlarges each pixel to a ``scale x scale`` block (nearest neighbour).
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(
            f"write_png: image must be uint8 [height, width, 1|3], got {image.dtype} {image.shape}"
        )
    image = image.repeat(scale, axis=0).repeat(scale, axis=1)
    h, w, c = image.shape
    rows = np.concatenate([np.zeros((h, 1), np.uint8), image.reshape(h, w * c)], axis=1)

    def chunk(tag: bytes, data: bytes) -> bytes:
        body = tag + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    color_type = 0 if c == 1 else 2
    header = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
    png += chunk(b"IDAT", zlib.compress(rows.tobytes(), 9)) + chunk(b"IEND", b"")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path
