"""Image data of the DSelect-k paper's Multi-MNIST and Multi-Fashion-MNIST experiments.

Hazimeh et al., *DSelect-k* (NeurIPS 2021), Section 4.2 and Appendix D.2, which build the data as
Sabour et al. (2017) do: two images overlaid on one canvas, one shifted up-left and one shifted
down-right, and one classification task per image.

* :func:`read_idx` -- the IDX files of MNIST / Fashion-MNIST (gzip-compressed or raw), validated.
* :func:`multi_mnist` -- the two-task data set from a directory of MNIST-format IDX files.
* :func:`multi_fashion_mnist` -- the same from Fashion-MNIST (by default the files of the Debian
  package ``dataset-fashion-mnist``).

NumPy only. Images stay uint8 until the final conversion to float32 in [0, 1], which is done a
chunk at a time, so the peak memory is the float32 result plus a few MB.
"""
from __future__ import annotations

import gzip
import numbers
import os
import zlib
from dataclasses import dataclass

import numpy as np

from ._repr import summary_repr

__all__ = ["MultiMNIST", "read_idx", "multi_mnist", "multi_fashion_mnist", "FASHION_MNIST_DIR", "IDX_FILES"]

#: Where the Debian package ``dataset-fashion-mnist`` installs Fashion-MNIST.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

#: The four files of an MNIST-format directory, by (split, kind); each may also end in ``.gz``.
IDX_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}

_MAGIC = {"labels": 0x00000801, "images": 0x00000803}  # data type 0x08 (unsigned byte), 1 or 3 dimensions
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 8192  # examples composed per step: bounds the uint8 scratch canvas (~10 MB at 36 x 36)

# SeedSequence spawn keys: each stream independent of the sizes asked for the others
_KEY_SPLIT, _KEY_TRAIN, _KEY_VAL, _KEY_TEST = 0, 1, 2, 3


# --------------------------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------------------------

def _read_exactly(f, buf, path, what):
    """Fill the writable buffer buf from f; ValueError naming the file if it ends first."""
    view, got = memoryview(buf).cast("B"), 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise ValueError(f"{path}: truncated: the {what} needs {len(view)} bytes, the file has only {got}")
        got += n


def read_idx(path, kind=None):
    """Read an IDX file (the MNIST format) into a uint8 array.

    The file may be gzip-compressed (recognized by its content, whatever its name) or raw. Checked:
    the magic number (0x00000801 for a label vector (N,), 0x00000803 for images (N, H, W); two zero
    bytes, the data type 0x08 = unsigned byte, the number of dimensions), the header, and the exact
    byte size -- neither truncated nor with trailing bytes. ``kind`` = "images" or "labels"
    additionally requires that magic number. A file that fails a check raises ValueError naming
    the file and what was wrong; a missing file raises FileNotFoundError."""
    if kind not in (None, "images", "labels"):
        raise ValueError(f"kind must be None, 'images' or 'labels', got {kind!r}")
    path = os.fspath(path)
    with open(path, "rb") as raw:
        file_size = os.fstat(raw.fileno()).st_size
        compressed = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        if not compressed:
            return _read_idx_stream(raw, path, kind, file_size, None)
        try:
            with gzip.GzipFile(fileobj=raw, mode="rb") as f:
                return _read_idx_stream(f, path, kind, None, file_size)
        except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
            raise ValueError(f"{path}: truncated or corrupt gzip data ({type(exc).__name__}: {exc})") from exc


def _read_idx_stream(f, path, kind, raw_size, compressed_size):
    """The array of an IDX stream f. raw_size: the byte size of an uncompressed file (checked
    before allocating); compressed_size: that of a gzip file (deflate expands at most ~1032x, which
    bounds what a header may claim before anything is allocated)."""
    header = bytearray(4)
    _read_exactly(f, header, path, "IDX header")
    magic = int.from_bytes(header, "big")
    if header[0] != 0 or header[1] != 0:
        raise ValueError(f"{path}: not an IDX file: magic number 0x{magic:08x} does not start with two zero bytes")
    if header[2] != 0x08:
        raise ValueError(f"{path}: IDX data type 0x{header[2]:02x} is not supported; expected 0x08 (unsigned byte) "
                         f"in magic number 0x{magic:08x}")
    if magic not in _MAGIC.values():
        raise ValueError(f"{path}: magic number 0x{magic:08x} has {header[3]} dimensions; expected 0x00000801 "
                         "(labels, 1 dimension) or 0x00000803 (images, 3 dimensions)")
    if kind is not None and magic != _MAGIC[kind]:
        raise ValueError(f"{path}: magic number 0x{magic:08x} is not that of {kind} (0x{_MAGIC[kind]:08x})")
    ndim = header[3]
    dims_raw = bytearray(4 * ndim)
    _read_exactly(f, dims_raw, path, f"header's {ndim} dimension sizes")
    dims = tuple(int.from_bytes(dims_raw[4 * i:4 * i + 4], "big") for i in range(ndim))
    size = int(np.prod([int(d) for d in dims]))
    expected = 4 + 4 * ndim + size
    if raw_size is not None and raw_size != expected:
        problem = "truncated" if raw_size < expected else f"{raw_size - expected} trailing bytes"
        raise ValueError(f"{path}: {problem}: the header's shape {dims} needs exactly {expected} bytes, the file "
                         f"has {raw_size}")
    if compressed_size is not None and size > 1100 * compressed_size + 4096:
        raise ValueError(f"{path}: the header's shape {dims} ({size} bytes) is more than {compressed_size} bytes "
                         "of gzip data can hold: corrupt or truncated")
    data = np.empty(dims, np.uint8)
    _read_exactly(f, data.reshape(-1), path, f"data of shape {dims} ({size} bytes after the {4 + 4 * ndim}-byte "
                  "header)")
    extra = f.read(1)
    if extra:
        rest = 1 + len(f.read())
        raise ValueError(f"{path}: {rest} trailing bytes after the data of shape {dims}; expected exactly "
                         f"{4 + 4 * ndim + size} bytes")
    return data


def _find(directory, split, kind):
    stem = IDX_FILES[(split, kind)]
    for name in (stem + ".gz", stem):
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
            return candidate
    return None


def _load_split(directory, split):
    """(images (N, H, W) uint8, labels (N,) uint8) of a source split, checked against each other."""
    paths = {kind: _find(directory, split, kind) for kind in ("images", "labels")}
    missing = [IDX_FILES[(split, kind)] for kind, p in paths.items() if p is None]
    if missing:
        raise FileNotFoundError(f"{directory}: missing {' and '.join(m + '[.gz]' for m in missing)} "
                                "(an MNIST-format directory holds train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                                "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte, each raw or .gz)")
    images = read_idx(paths["images"], "images")
    labels = read_idx(paths["labels"], "labels")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{paths['labels']} has {labels.shape[0]} labels but {paths['images']} has "
                         f"{images.shape[0]} images")
    if labels.size and labels.max() > 9:
        i = int(np.argmax(labels > 9))
        raise ValueError(f"{paths['labels']}: label {labels[i]} at index {i}; expected classes 0..9")
    return images, labels


# --------------------------------------------------------------------------------------------
# Multi-MNIST
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class MultiMNIST:
    """The data of :func:`multi_mnist` / :func:`multi_fashion_mnist`.

    * ``X_train``, ``X_val``, ``X_test``: float32 (N, 1, H + 2 shift, W + 2 shift) in [0, 1] (NCHW,
      (N, 1, 36, 36) for 28 x 28 sources and shift 4): the dselectk CNN models' input.
    * ``Y_train``, ``Y_val``, ``Y_test``: lists of two int64 (N,) label arrays, the format of
      ``dselectk.fit``: task 0 is the class of the top-left item, task 1 that of the bottom-right one.
    * ``pairs_train``, ``pairs_val`` (N, 2) int64: indices into the source TRAIN split of the
      (top-left, bottom-right) images of each example; ``pairs_test`` into the source TEST split.
    * ``val_sources``: the sorted indices of the source train images reserved for validation (no
      training example uses them).
    """

    __repr__ = summary_repr

    X_train: np.ndarray
    Y_train: list
    X_val: np.ndarray
    Y_val: list
    X_test: np.ndarray
    Y_test: list
    pairs_train: np.ndarray
    pairs_val: np.ndarray
    pairs_test: np.ndarray
    val_sources: np.ndarray

    @property
    def input_shape(self):
        """(C, H, W) of one example, for the models' ``input_shape``."""
        return tuple(self.X_train.shape[1:])


def _count(name, value, minimum):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _draw_pairs(rng, pool, n):
    """n pairs of distinct images of ``pool`` (an index array), each pair uniform among the ordered
    pairs of distinct pool members. Example i uses the i-th two draws of rng only, so asking for
    more examples keeps the first ones."""
    if n and pool.size < 2:
        raise ValueError(f"need at least 2 source images to draw pairs from, got {pool.size}")
    u = rng.random((n, 2))  # floor(u * size) is uniform on 0..size-1 up to a bias below size / 2**53
    first = np.minimum((u[:, 0] * pool.size).astype(np.int64), pool.size - 1)
    offset = np.minimum((u[:, 1] * (pool.size - 1)).astype(np.int64), max(pool.size - 2, 0))
    second = (first + 1 + offset) % pool.size
    return np.stack([pool[first], pool[second]], axis=1).astype(np.int64)


def _compose(images, pairs, shift):
    """float32 (n, 1, H + 2 shift, W + 2 shift): the first image of each pair at offset (0, 0), the
    second at (2 shift, 2 shift), pixel-wise maximum where they overlap, divided by 255."""
    n, (h, w) = len(pairs), images.shape[1:]
    out = np.empty((n, 1, h + 2 * shift, w + 2 * shift), np.float32)
    for start in range(0, n, _CHUNK):
        p = pairs[start:start + _CHUNK]
        canvas = np.zeros((len(p), h + 2 * shift, w + 2 * shift), np.uint8)
        canvas[:, :h, :w] = images[p[:, 0]]
        lower = canvas[:, 2 * shift:, 2 * shift:]
        np.maximum(lower, images[p[:, 1]], out=lower)
        np.divide(canvas, np.float32(255), out=out[start:start + len(p), 0], dtype=np.float32)
    return out


def multi_mnist(path, n_train=100_000, n_val=20_000, n_test=20_000, seed=0, shift=4, val_source_fraction=1 / 6):
    """Multi-MNIST (Sabour et al. 2017) as the DSelect-k paper builds it (Section 4.2, Appendix D.2),
    from ``path``, a directory with the four MNIST-format IDX files (``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each raw or
    ``.gz``).

    Each example overlays two different source images drawn uniformly at random (with replacement
    across examples) from one source split, on a (H + 2 shift) x (W + 2 shift) canvas -- 36 x 36 for
    28 x 28 images and shift 4: the first is shifted ``shift`` pixels up and left (placed at offset
    (0, 0)), the second ``shift`` pixels down and right (offset (2 shift, 2 shift)) relative to a
    centred placement. Overlay rule: the pixel-wise MAXIMUM of the two images (so strokes stay
    within [0, 255] and neither image hides the other), then divided by 255 to float32 in [0, 1].

    Tasks: task 0 = the class of the top-left image, task 1 = the class of the bottom-right one.

    Splits: the test examples come from the source TEST split. Training and validation examples
    both come from the source TRAIN split, but from disjoint source images: a random
    ``val_source_fraction`` (1/6: 10,000 of MNIST's 60,000) of them is reserved for validation, the
    rest for training, so no source image appears in both.

    ``seed`` seeds everything; the reserved validation images and each split's pairs come from
    their own streams (``SeedSequence(seed)`` children), so e.g. changing ``n_train`` leaves the
    validation and test sets unchanged, and more training examples keep the first ones. Returns a
    :class:`MultiMNIST`."""
    n_train, n_val, n_test = (_count(name, v, minimum) for name, v, minimum in
                              (("n_train", n_train, 1), ("n_val", n_val, 0), ("n_test", n_test, 0)))
    seed, shift = _count("seed", seed, 0), _count("shift", shift, 0)
    if isinstance(val_source_fraction, bool) or not isinstance(val_source_fraction, numbers.Real) \
            or not 0 < val_source_fraction < 1:
        raise ValueError(f"val_source_fraction must be a number in (0, 1), got {val_source_fraction!r}")
    directory = os.fspath(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: not a directory (expected one with the MNIST-format IDX files)")
    train_images, train_labels = _load_split(directory, "train")
    test_images, test_labels = _load_split(directory, "test")
    if test_images.shape[1:] != train_images.shape[1:]:
        raise ValueError(f"{directory}: the train images are {train_images.shape[1:]} but the test images are "
                         f"{test_images.shape[1:]}")
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)]
    n_source = train_images.shape[0]
    order = streams[_KEY_SPLIT].permutation(n_source)
    n_reserved = int(round(n_source * float(val_source_fraction)))
    val_sources = np.sort(order[:n_reserved]).astype(np.int64)
    train_pool = np.sort(order[n_reserved:])
    pairs_train = _draw_pairs(streams[_KEY_TRAIN], train_pool, n_train)
    pairs_val = _draw_pairs(streams[_KEY_VAL], val_sources, n_val)
    pairs_test = _draw_pairs(streams[_KEY_TEST], np.arange(test_images.shape[0]), n_test)

    def labels(source, pairs):
        return [source[pairs[:, 0]].astype(np.int64), source[pairs[:, 1]].astype(np.int64)]

    return MultiMNIST(
        X_train=_compose(train_images, pairs_train, shift), Y_train=labels(train_labels, pairs_train),
        X_val=_compose(train_images, pairs_val, shift), Y_val=labels(train_labels, pairs_val),
        X_test=_compose(test_images, pairs_test, shift), Y_test=labels(test_labels, pairs_test),
        pairs_train=pairs_train, pairs_val=pairs_val, pairs_test=pairs_test, val_sources=val_sources)


def multi_fashion_mnist(path=None, n_train=100_000, n_val=20_000, n_test=20_000, seed=0, shift=4,
                        val_source_fraction=1 / 6):
    """Multi-Fashion-MNIST: :func:`multi_mnist` on Fashion-MNIST (Xiao et al. 2017), same format.

    ``path`` defaults to :data:`FASHION_MNIST_DIR` (``/usr/share/datasets/fashion-mnist``, where the
    Debian package ``dataset-fashion-mnist`` puts the ``.gz`` IDX files). If the files are not
    there, raises FileNotFoundError saying how to get them."""
    directory = FASHION_MNIST_DIR if path is None else os.fspath(path)
    present = os.path.isdir(directory) and all(_find(directory, split, kind) for split, kind in IDX_FILES)
    if not present:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {directory}: install it with `apt-get install dataset-fashion-mnist` "
            f"(Debian / Ubuntu, into {FASHION_MNIST_DIR}), or pass path= a directory with "
            + ", ".join(IDX_FILES.values()) + " (raw or .gz)")
    return multi_mnist(directory, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed, shift=shift,
                       val_source_fraction=val_source_fraction)
