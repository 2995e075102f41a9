"""IDX reading and the Multi-MNIST construction (dselectk.images), on tiny IDX files written here
(gzip-compressed and raw): round trips, every kind of broken file, the overlay geometry, the
labels of both tasks, the splits (test examples from the source test split, validation and
training from disjoint source images) and seeding."""
import gzip
import os
import re

import numpy as np
import pytest

from dselectk import datasets
from dselectk import images as I


def idx_bytes(array, magic_byte3=None, dtype_byte=0x08):
    array = np.asarray(array, np.uint8)
    ndim = array.ndim if magic_byte3 is None else magic_byte3
    header = bytes([0, 0, dtype_byte, ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_idx(path, array, gz=False, **kw):
    data = idx_bytes(array, **kw)
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(data)
    return path


def write_source(directory, train_images, train_labels, test_images, test_labels, gz=True):
    os.makedirs(directory, exist_ok=True)
    for (split, kind), array in zip(I.IDX_FILES, (train_images, train_labels, test_images, test_labels)):
        write_idx(os.path.join(directory, I.IDX_FILES[(split, kind)] + (".gz" if gz else "")), array, gz=gz)
    return directory


def constant_images(values, h, w):
    """Image i is the constant values[i] (so every pixel of a composite tells its source)."""
    return np.broadcast_to(np.asarray(values, np.uint8)[:, None, None], (len(values), h, w)).copy()


@pytest.fixture
def tiny_source(tmp_path):
    """30 train images (values 10..39, labels i % 10) and 12 test images (values 200..211, labels
    (i * 3) % 10), 6 x 6."""
    train = constant_images(np.arange(10, 40), 6, 6)
    test = constant_images(np.arange(200, 212), 6, 6)
    return write_source(tmp_path / "src", train, np.arange(30) % 10, test, (np.arange(12) * 3) % 10), train, test


# ---------------------------------------------------------------------------------------------
# read_idx
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("shape", [(5, 4, 3), (7,), (0, 28, 28), (0,)])
def test_read_idx_round_trip(tmp_path, gz, shape):
    array = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    path = write_idx(tmp_path / ("a.gz" if gz else "a"), array, gz=gz)
    got = I.read_idx(path, "images" if len(shape) == 3 else "labels")
    assert got.dtype == np.uint8 and got.shape == shape and got.flags.writeable
    np.testing.assert_array_equal(got, array)
    # compression is recognised by content, not by the name
    other = tmp_path / ("b" if gz else "b.gz")
    other.write_bytes(path.read_bytes())
    np.testing.assert_array_equal(I.read_idx(other), array)


def _bad(tmp_path, data, name="bad-idx"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


GOOD = idx_bytes(np.arange(2 * 3 * 4).reshape(2, 3, 4))
BAD_FILES = {
    "empty": (b"", "truncated"),
    "short_magic": (GOOD[:3], "truncated"),
    "short_dims": (GOOD[:9], "truncated.*dimension"),
    "truncated_data": (GOOD[:-1], "truncated.*needs exactly 40 bytes.*has 39"),
    "trailing": (GOOD + b"\x00\x00", "2 trailing bytes"),
    "magic_not_zero": (b"\x01" + GOOD[1:], "not an IDX file.*0x01000803"),
    "float_data": (GOOD[:2] + b"\x0d" + GOOD[3:], "data type 0x0d"),
    "int_data": (GOOD[:2] + b"\x0c" + GOOD[3:], "data type 0x0c"),
    "two_dims": (idx_bytes(np.zeros((3, 4))), "0x00000802.*expected 0x00000801.*0x00000803"),
    "four_dims": (idx_bytes(np.zeros((1, 2, 2, 2))), "0x00000804"),
    "zero_dims": (bytes([0, 0, 8, 0]), "0x00000800"),
}


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("case", list(BAD_FILES))
def test_read_idx_rejects_broken_files(tmp_path, case, gz):
    data, match = BAD_FILES[case]
    if gz:
        data = gzip.compress(data)
        match = match.replace("needs exactly 40 bytes.*has 39", "")  # a stream has no size to compare first
        match = match.replace("2 trailing bytes", "trailing bytes")
    path = _bad(tmp_path, data)
    with pytest.raises(ValueError, match="bad-idx") as info:
        I.read_idx(path)
    assert re.search(match, str(info.value)), str(info.value)


def test_read_idx_rejects_truncated_and_corrupt_gzip(tmp_path):
    packed = gzip.compress(GOOD)
    with pytest.raises(ValueError, match=r"bad-idx.*(truncated|corrupt)"):
        I.read_idx(_bad(tmp_path, packed[:-9]))  # the stream stops early (no end-of-stream marker)
    with pytest.raises(ValueError, match=r"bad-idx.*(truncated|corrupt)"):
        I.read_idx(_bad(tmp_path, packed[:len(packed) // 2], "bad-idx-2"))
    corrupt = bytearray(packed)
    corrupt[-6] ^= 0xFF  # the CRC
    with pytest.raises(ValueError, match=r"bad-idx-3.*corrupt"):
        I.read_idx(_bad(tmp_path, bytes(corrupt), "bad-idx-3"))


def test_read_idx_huge_header_is_refused_before_allocating(tmp_path):
    header = bytes([0, 0, 8, 3]) + b"".join((2**31 - 1).to_bytes(4, "big") for _ in range(3))
    with pytest.raises(ValueError, match="bad-idx.*needs exactly"):
        I.read_idx(_bad(tmp_path, header))
    with pytest.raises(ValueError, match="bad-idx-gz.*more than"):
        I.read_idx(_bad(tmp_path, gzip.compress(header), "bad-idx-gz"))


def test_read_idx_kind_and_missing(tmp_path):
    labels = write_idx(tmp_path / "labels", np.arange(5))
    with pytest.raises(ValueError, match="labels.*not that of images"):
        I.read_idx(labels, "images")
    with pytest.raises(ValueError, match="kind"):
        I.read_idx(labels, "pictures")
    with pytest.raises(FileNotFoundError):
        I.read_idx(tmp_path / "nothing-here")


# ---------------------------------------------------------------------------------------------
# Multi-MNIST
# ---------------------------------------------------------------------------------------------

def expected_composite(first_value, second_value, h, w, shift):
    canvas = np.zeros((h + 2 * shift, w + 2 * shift))
    canvas[:h, :w] = first_value
    region = canvas[2 * shift:, 2 * shift:]
    np.maximum(region, second_value, out=region)
    return canvas / 255


def test_overlay_geometry_and_labels(tiny_source):
    directory, train, test = tiny_source
    d = I.multi_mnist(directory, n_train=40, n_val=9, n_test=11, seed=3, shift=2)
    assert d.X_train.shape == (40, 1, 10, 10) and d.X_train.dtype == np.float32 and d.input_shape == (1, 10, 10)
    train_labels, test_labels = np.arange(30) % 10, (np.arange(12) * 3) % 10
    for X, Y, pairs, source, source_labels in ((d.X_train, d.Y_train, d.pairs_train, train, train_labels),
                                               (d.X_val, d.Y_val, d.pairs_val, train, train_labels),
                                               (d.X_test, d.Y_test, d.pairs_test, test, test_labels)):
        assert np.all(pairs[:, 0] != pairs[:, 1])  # two different images
        assert len(Y) == 2 and all(y.dtype == np.int64 and y.shape == (len(X),) for y in Y)
        np.testing.assert_array_equal(Y[0], source_labels[pairs[:, 0]])  # task 0: the top-left item
        np.testing.assert_array_equal(Y[1], source_labels[pairs[:, 1]])  # task 1: the bottom-right item
        for n, (a, b) in enumerate(pairs):
            want = expected_composite(source[a, 0, 0], source[b, 0, 0], 6, 6, 2)
            np.testing.assert_allclose(X[n, 0], want, rtol=1e-7, atol=0)


def test_overlay_of_a_known_pattern_at_the_paper_size(tmp_path):
    """28 x 28 sources, shift 4: a single lit pixel at (r, c) of the first image lands at (r, c) of
    the 36 x 36 canvas, the same pixel of the second image at (r + 8, c + 8); where the two overlap
    the brighter one shows (pixel-wise maximum)."""
    train = np.zeros((2, 28, 28), np.uint8)
    train[0, 3, 5] = 255  # image 0: one pixel
    train[0, 20, 20] = 40
    train[1, 3, 5] = 128  # image 1: the same pixel, dimmer, and a bright one under image 0's (20, 20)
    train[1, 12, 12] = 200
    directory = write_source(tmp_path / "src", train, [1, 2], train, [3, 4], gz=False)  # raw file names
    d = I.multi_mnist(directory, n_train=6, n_val=0, n_test=4, seed=0, val_source_fraction=0.01)
    assert d.X_train.shape == (6, 1, 36, 36) and d.X_val.shape == (0, 1, 36, 36)
    for X, pairs in ((d.X_train, d.pairs_train), (d.X_test, d.pairs_test)):
        for n, (a, b) in enumerate(pairs):
            want = np.zeros((36, 36), np.float32)
            want[:28, :28] = train[a] / np.float32(255)
            want[8:, 8:] = np.maximum(want[8:, 8:], train[b] / np.float32(255))
            np.testing.assert_array_equal(X[n, 0], want)
            lit = {tuple(p) for p in np.argwhere(X[n, 0] > 0)}
            first = {tuple(p) for p in np.argwhere(train[a] > 0)}
            second = {(r + 8, c + 8) for r, c in np.argwhere(train[b] > 0)}
            assert lit == first | second
    assert d.X_train.max() == 1.0 and d.X_train.min() == 0.0


def test_splits(tiny_source):
    directory, train, test = tiny_source
    d = I.multi_mnist(directory, n_train=200, n_val=50, n_test=60, seed=1, shift=1)
    assert d.val_sources.size == 5  # 1/6 of the 30 source train images
    assert not np.isin(d.pairs_train, d.val_sources).any()  # training never sees a validation image
    assert np.isin(d.pairs_val, d.val_sources).all()
    assert d.pairs_test.max() < 12
    # test composites are made of test-split pixels only (values 200..211), train/val of train ones
    test_values = set(np.round(d.X_test * 255).astype(int).ravel()) - {0}
    assert test_values <= set(range(200, 212))
    train_values = set(np.round(np.concatenate([d.X_train, d.X_val]) * 255).astype(int).ravel()) - {0}
    assert train_values <= set(range(10, 40))
    # every train pool image is used at least once in 200 draws from 25 (a uniform draw)
    assert np.unique(d.pairs_train).size == 25


def test_seeds(tiny_source):
    directory, _, _ = tiny_source
    a = I.multi_mnist(directory, n_train=30, n_val=10, n_test=10, seed=5)
    b = I.multi_mnist(directory, n_train=30, n_val=10, n_test=10, seed=5)
    c = I.multi_mnist(directory, n_train=30, n_val=10, n_test=10, seed=6)
    for name in ("X_train", "X_val", "X_test", "pairs_train", "pairs_val", "pairs_test", "val_sources"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.pairs_train, c.pairs_train)
    # each split has its own stream: more training examples leave validation and test alone
    more = I.multi_mnist(directory, n_train=31, n_val=10, n_test=10, seed=5)
    np.testing.assert_array_equal(more.pairs_train[:30], a.pairs_train)
    np.testing.assert_array_equal(more.X_val, a.X_val)
    np.testing.assert_array_equal(more.X_test, a.X_test)


def test_gz_and_raw_directories_agree(tmp_path):
    rng = np.random.default_rng(0)
    arrays = (rng.integers(0, 256, (20, 5, 4)), rng.integers(0, 10, 20), rng.integers(0, 256, (8, 5, 4)),
              rng.integers(0, 10, 8))
    a = I.multi_mnist(write_source(tmp_path / "gz", *arrays, gz=True), n_train=15, n_val=4, n_test=6, seed=2)
    b = I.multi_mnist(write_source(tmp_path / "raw", *arrays, gz=False), n_train=15, n_val=4, n_test=6, seed=2)
    np.testing.assert_array_equal(a.X_train, b.X_train)
    np.testing.assert_array_equal(a.Y_test[1], b.Y_test[1])


def test_reexported_from_datasets():
    assert datasets.multi_mnist is I.multi_mnist and datasets.read_idx is I.read_idx
    assert datasets.multi_fashion_mnist is I.multi_fashion_mnist and datasets.MultiMNIST is I.MultiMNIST
    assert {"multi_mnist", "multi_fashion_mnist", "read_idx", "MultiMNIST"} <= set(datasets.__all__)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(n_train=0), ValueError, "n_train"),
    (dict(n_val=-1), ValueError, "n_val"),
    (dict(n_test=2.5), TypeError, "n_test"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(shift=-1), ValueError, "shift"),
    (dict(shift=True), TypeError, "shift"),
    (dict(val_source_fraction=0), ValueError, "val_source_fraction"),
    (dict(val_source_fraction=1.0), ValueError, "val_source_fraction"),
])
def test_bad_arguments(tiny_source, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        I.multi_mnist(tiny_source[0], **kwargs)


def test_bad_source_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        I.multi_mnist(tmp_path / "nowhere")
    images, labels = np.zeros((4, 3, 3)), np.arange(4)
    d = write_source(tmp_path / "missing", images, labels, images, labels)
    os.remove(os.path.join(d, "t10k-labels-idx1-ubyte.gz"))
    with pytest.raises(FileNotFoundError, match=r"missing t10k-labels-idx1-ubyte\[\.gz\]"):
        I.multi_mnist(d)
    d = write_source(tmp_path / "counts", images, labels[:3], images, labels)
    with pytest.raises(ValueError, match="train-labels.*3 labels.*4 images"):
        I.multi_mnist(d, n_train=2, n_val=1, n_test=1)
    d = write_source(tmp_path / "classes", images, [0, 1, 12, 2], images, labels)
    with pytest.raises(ValueError, match="label 12 at index 2"):
        I.multi_mnist(d, n_train=2, n_val=1, n_test=1)
    d = write_source(tmp_path / "sizes", images, labels, np.zeros((4, 3, 4)), labels)
    with pytest.raises(ValueError, match=r"\(3, 3\).*\(3, 4\)"):
        I.multi_mnist(d, n_train=2, n_val=1, n_test=1)
    d = write_source(tmp_path / "swapped", labels, labels, images, labels)
    with pytest.raises(ValueError, match="train-images.*not that of images"):
        I.multi_mnist(d, n_train=2, n_val=1, n_test=1)
    d = write_source(tmp_path / "one", images[:1], labels[:1], images, labels)
    with pytest.raises(ValueError, match="at least 2 source images"):
        I.multi_mnist(d, n_train=2, n_val=1, n_test=1, val_source_fraction=0.5)


def test_multi_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist.*path="):
        I.multi_fashion_mnist(tmp_path / "none")
    (tmp_path / "partial").mkdir()
    write_idx(tmp_path / "partial" / "train-images-idx3-ubyte.gz", np.zeros((2, 3, 3)), gz=True)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        I.multi_fashion_mnist(tmp_path / "partial")


def test_multi_fashion_mnist_from_a_given_path(tiny_source):
    d = I.multi_fashion_mnist(tiny_source[0], n_train=5, n_val=2, n_test=3, seed=0, shift=2)
    np.testing.assert_array_equal(d.X_test, I.multi_mnist(tiny_source[0], n_train=5, n_val=2, n_test=3,
                                                          seed=0, shift=2).X_test)


@pytest.mark.skipif(not all(I._find(I.FASHION_MNIST_DIR, s, k) for s, k in I.IDX_FILES),
                    reason=f"Fashion-MNIST is not installed in {I.FASHION_MNIST_DIR} (apt-get install "
                           "dataset-fashion-mnist)")
def test_real_fashion_mnist_files():
    d = I.multi_fashion_mnist(n_train=300, n_val=50, n_test=100, seed=0)
    assert d.X_train.shape == (300, 1, 36, 36) and d.X_test.shape == (100, 1, 36, 36)
    assert d.val_sources.size == 10_000 and d.pairs_test.max() < 10_000
    assert 0.0 <= d.X_train.min() and d.X_train.max() <= 1.0 and d.X_train.mean() > 0.05
    for Y in (d.Y_train, d.Y_val, d.Y_test):
        assert all(y.min() >= 0 and y.max() <= 9 for y in Y)


def test_multi_mnist_repr_shows_shapes(tiny_source):
    d = I.multi_mnist(tiny_source[0], n_train=40, n_val=9, n_test=11, seed=3, shift=2)
    text = repr(d)
    assert text.startswith("MultiMNIST(X_train=ndarray(shape=(40, 1, 10, 10), dtype=float32)"), text
    assert "Y_train=[ndarray(shape=(40,), dtype=int64), ndarray(shape=(40,), dtype=int64)]" in text, text
    assert "array([" not in text and len(text) < 2000
