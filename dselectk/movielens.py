"""MovieLens ratings and the two-task recommender problem of the DSelect-k paper.

Hazimeh et al., *DSelect-k* (NeurIPS 2021), Section 5 and Appendix D.1, use MovieLens with the
two tasks of Wang et al., "Small Towers Make Big Differences" (2020):

* task 1, binary classification: did the user rate (watch) the movie? Every rating is a positive
  example; negatives are (user, movie) pairs the user did not rate, sampled at random;
* task 2, regression: the rating, a loss that counts on the positives only (its sample weight
  is 0 on the sampled negatives, whose "rating" is a placeholder 0).

:func:`read_ratings` reads the files MovieLens ships -- ``ratings.csv`` (ml-latest, ml-20m,
ml-25m; also the CSV of R's ``dslabs::movielens``, see ``benchmarks/get_movielens.sh``),
``ratings.dat`` (ml-1m, ml-10m) and ``u.data`` (ml-100k) -- and re-indexes users and movies
densely. :func:`movielens_multitask` builds the two tasks, samples the negatives and splits the
examples into train / validation / test.

NumPy only; no file is downloaded. Randomness comes from ``numpy.random.SeedSequence(seed,
spawn_key=...)`` children (negatives and shuffle have their own streams), so every result is a
deterministic function of the ratings and the arguments.
"""
from __future__ import annotations

import csv
import math
import numbers
import os
from dataclasses import dataclass

import numpy as np

from ._repr import summary_repr

__all__ = ["Ratings", "MultitaskSplit", "MovieLensMultitask", "read_ratings", "ratings_from_arrays",
           "movielens_multitask"]

CSV_COLUMNS = ("userId", "movieId", "rating", "timestamp")
_KEY_NEGATIVES = 0  # spawn key of the negative-sampling stream
_KEY_SHUFFLE = 1    # spawn key of the shuffle before the split


@dataclass(frozen=True, eq=False)
class Ratings:
    """Ratings with users and movies re-indexed densely.

    users, movies : (N,) int64 in [0, n_users) and [0, n_movies): the dense indices.
    ratings : (N,) float32.  timestamps : (N,) int64 (seconds since the epoch, as in the files).
    user_ids, movie_ids : (n_users,) and (n_movies,) int64, the raw ids in ascending order:
        ``user_ids[users[i]]`` is the raw user id of rating i (and likewise for movies).
    path : the file read, or None.
    """

    users: np.ndarray
    movies: np.ndarray
    ratings: np.ndarray
    timestamps: np.ndarray
    user_ids: np.ndarray
    movie_ids: np.ndarray
    path: str | None = None

    @property
    def n_users(self):
        return int(self.user_ids.size)

    @property
    def n_movies(self):
        return int(self.movie_ids.size)

    def __len__(self):
        return int(self.ratings.size)

    def __repr__(self):
        return f"Ratings({len(self)} ratings, {self.n_users} users, {self.n_movies} movies, path={self.path!r})"


@dataclass(frozen=True, eq=False)
class MultitaskSplit:
    """One part (train, validation or test) of :func:`movielens_multitask`, in the format of
    ``dselectk.fit`` / ``evaluate`` for a model with ``embeddings=dict(vocab_sizes=[n_users,
    n_movies], ...)``:

    X : (n, 2) int64, columns (user, movie) (dense indices).
    Y : [rated (n,) float32 in {0, 1}, rating (n,) float32 (0 on the sampled negatives)].
    sample_weights : [None, (n,) float32]: the rating task's weight, 1 on positives, 0 on negatives.
    """

    __repr__ = summary_repr

    X: np.ndarray
    Y: list
    sample_weights: list

    def __len__(self):
        return int(self.X.shape[0])

    @property
    def positives(self):
        """Boolean mask (n,) of the rated (positive) examples."""
        return self.Y[0] > 0


@dataclass(frozen=True, eq=False)
class MovieLensMultitask:
    """What :func:`movielens_multitask` returns: the three parts, the vocabulary sizes
    (``vocab_sizes = [n_users, n_movies]``, for the model's ``embeddings=``) and the ratings they
    were built from (with the maps back to raw ids)."""

    __repr__ = summary_repr

    train: MultitaskSplit
    val: MultitaskSplit
    test: MultitaskSplit
    n_users: int
    n_movies: int
    ratings: Ratings
    neg_ratio: int
    seed: int

    @property
    def vocab_sizes(self):
        return [self.n_users, self.n_movies]


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------

def _format_of(path, first_line):
    """'csv' (header line, comma-separated), 'dat' (user::movie::rating::timestamp) or 'tab'
    (user <tab> movie <tab> rating <tab> timestamp): from the file name, else from the content."""
    name = os.path.basename(str(path)).lower()
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(".dat"):
        return "dat"
    if name == "u.data" or name.endswith(".data") or name.endswith(".tsv"):
        return "tab"
    if "::" in first_line:
        return "dat"
    if "\t" in first_line:
        return "tab"
    if "," in first_line:
        return "csv"
    raise ValueError(f"{path}: cannot tell the ratings format from the name or the first line {first_line!r}; "
                     "expected ratings.csv (with a header), ratings.dat ('::'-separated) or u.data (tab-separated)")


def _parse_fields(path, lineno, fields, names):
    """(user, movie, rating, timestamp) from the four text fields of one line."""
    values = []
    for text, name in zip(fields, names):
        text = text.strip()
        try:
            if name == "rating":
                v = float(text)
                if not math.isfinite(v):
                    raise ValueError
            else:
                v = int(text)
        except ValueError:
            expected = "a finite number" if name == "rating" else "an integer"
            raise ValueError(f"{path}:{lineno}: bad {name} {text!r} (expected {expected})") from None
        values.append(v)
    return values


def _read_rows(path, fmt):
    """(users, movies, ratings, timestamps) as four lists of the values of the file's lines."""
    rows = ([], [], [], [])

    def add(values):
        for column, v in zip(rows, values):
            column.append(v)

    if fmt == "csv":
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{path}: empty file")
            header = [h.strip() for h in header]
            missing = [c for c in CSV_COLUMNS if c not in header]
            if missing:
                raise ValueError(f"{path}:1: the header lacks the columns {missing}; expected the columns "
                                 f"{','.join(CSV_COLUMNS)} (in any order, other columns are ignored), got {header}")
            cols = [header.index(c) for c in CSV_COLUMNS]
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) != len(header):
                    raise ValueError(f"{path}:{reader.line_num}: expected {len(header)} fields (as the header), got "
                                     f"{len(row)}")
                add(_parse_fields(path, reader.line_num, [row[c] for c in cols], CSV_COLUMNS))
        return rows
    sep = "::" if fmt == "dat" else "\t"
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = line.rstrip("\r\n").split(sep)
            if len(fields) != 4:
                raise ValueError(f"{path}:{lineno}: expected 4 {sep!r}-separated fields "
                                 f"(user, movie, rating, timestamp), got {len(fields)}")
            add(_parse_fields(path, lineno, fields, CSV_COLUMNS))
    return rows


def read_ratings(path):
    """Read a MovieLens ratings file into :class:`Ratings` (users and movies re-indexed densely).

    Formats, told apart by the file name and, failing that, the first line:

    * ``*.csv`` -- a header line naming at least the columns ``userId``, ``movieId``, ``rating``,
      ``timestamp`` (any order; other columns, such as the title, year and genres of
      ``dslabs::movielens``, are ignored); fields may be quoted and hold commas (csv module).
    * ``*.dat`` -- ml-1m / ml-10m: ``user::movie::rating::timestamp``, no header.
    * ``u.data`` -- ml-100k: ``user<TAB>movie<TAB>rating<TAB>timestamp``, no header.

    Blank lines are skipped. A malformed line (wrong number of fields, a non-integer id or
    timestamp, a rating that is not a finite number, e.g. ``NA``) raises ValueError naming the file
    and the line number. Dense indices follow the ascending raw ids."""
    path = os.fspath(path)
    with open(path, encoding="utf-8", errors="replace") as f:
        first = ""
        for line in f:
            if line.strip():
                first = line
                break
    if not first:
        raise ValueError(f"{path}: no ratings (the file is empty)")
    users, movies, ratings, timestamps = _read_rows(path, _format_of(path, first))
    if not users:
        raise ValueError(f"{path}: no ratings (a header only)")
    return ratings_from_arrays(np.array(users, np.int64), np.array(movies, np.int64), np.array(ratings, np.float64),
                               np.array(timestamps, np.int64), path=path)


def ratings_from_arrays(user_ids, movie_ids, ratings, timestamps=None, path=None):
    """:class:`Ratings` from raw arrays (N,) of user ids, movie ids (integers), ratings (finite)
    and optional timestamps (default 0): users and movies are re-indexed densely in the order of
    their raw ids."""
    user_ids, movie_ids = np.asarray(user_ids), np.asarray(movie_ids)
    ratings = np.asarray(ratings, dtype=np.float64)
    for a, name in ((user_ids, "user_ids"), (movie_ids, "movie_ids")):
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{name} must be a 1-D integer array, got {a.dtype} {a.shape}")
    n = user_ids.size
    if n == 0:
        raise ValueError("no ratings")
    timestamps = np.zeros(n, np.int64) if timestamps is None else np.asarray(timestamps)
    if movie_ids.shape != (n,) or ratings.shape != (n,) or timestamps.shape != (n,):
        raise ValueError(f"user_ids, movie_ids, ratings and timestamps must have one length, got {user_ids.shape}, "
                         f"{movie_ids.shape}, {ratings.shape}, {timestamps.shape}")
    if not np.all(np.isfinite(ratings)):
        raise ValueError(f"ratings contains NaN or Inf (first at {int(np.flatnonzero(~np.isfinite(ratings))[0])})")
    uniq_u, users = np.unique(user_ids.astype(np.int64), return_inverse=True)
    uniq_m, movies = np.unique(movie_ids.astype(np.int64), return_inverse=True)
    return Ratings(users.astype(np.int64).reshape(-1), movies.astype(np.int64).reshape(-1),
                   ratings.astype(np.float32), timestamps.astype(np.int64), uniq_u, uniq_m,
                   None if path is None else str(path))


# --------------------------------------------------------------------------------------------
# the two tasks
# --------------------------------------------------------------------------------------------

def _in_sorted(keys, sorted_keys):
    """Boolean mask: keys present in the sorted array sorted_keys."""
    if sorted_keys.size == 0:
        return np.zeros(keys.shape, bool)
    i = np.searchsorted(sorted_keys, keys)
    return sorted_keys[np.minimum(i, sorted_keys.size - 1)] == keys


def _sample_negatives(users, movies, n_users, n_movies, neg_ratio, rng):
    """Keys user * n_movies + movie of the sampled negatives: for each user, min(neg_ratio * its
    number of ratings, the number of movies it did not rate) distinct movies it did not rate,
    uniformly at random without replacement."""
    M = n_movies
    rated = np.unique(users * M + movies)                      # sorted distinct (user, movie) keys
    n_rated = np.bincount(rated // M, minlength=n_users)       # distinct movies rated per user
    want = np.minimum(neg_ratio * np.bincount(users, minlength=n_users), M - n_rated)
    # users who want more than half of the movies they did not rate: draw from that list directly
    dense = want * 2 > M - n_rated
    parts = []
    for u in np.flatnonzero(dense & (want > 0)):
        lo, hi = np.searchsorted(rated, [u * M, (u + 1) * M])
        free = np.setdiff1d(np.arange(M), rated[lo:hi] - u * M, assume_unique=True)
        parts.append(u * M + np.sort(rng.choice(free, want[u], replace=False)))
    # the others: rejection sampling, each round one candidate per negative still missing (at least
    # half of the candidates are acceptable, so the number missing halves each round on average)
    need = np.where(dense, 0, want)
    taken = np.zeros(0, np.int64)
    while need.sum() > 0:
        owners = np.repeat(np.arange(n_users), need)
        keys = owners * M + rng.integers(0, M, owners.size)
        keys = keys[~_in_sorted(keys, rated) & ~_in_sorted(keys, taken)]
        _, first = np.unique(keys, return_index=True)
        keys = keys[np.sort(first)]  # distinct, in draw order
        taken = np.sort(np.concatenate([taken, keys]))
        need -= np.bincount(keys // M, minlength=n_users)
    parts.append(taken)
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def _count_arg(name, value, minimum):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _fractions_arg(split):
    if isinstance(split, (str, bytes)) or not isinstance(split, (tuple, list, np.ndarray)) or len(split) != 3:
        raise ValueError(f"split must be three fractions (train, val, test) summing to 1, got {split!r}")
    fr = []
    for i, s in enumerate(split):
        if isinstance(s, (bool, np.bool_)) or not isinstance(s, numbers.Real) or not (0 <= s <= 1):
            raise ValueError(f"split[{i}] must be a fraction in [0, 1], got {s!r}")
        fr.append(float(s))
    if abs(sum(fr) - 1) > 1e-9 or fr[0] == 0:
        raise ValueError(f"split must be three fractions (train, val, test) summing to 1 with train > 0, got {split!r}")
    return fr


def _part(X, y_rated, y_rating, w_rating, idx):
    return MultitaskSplit(np.ascontiguousarray(X[idx]), [y_rated[idx], y_rating[idx]], [None, w_rating[idx]])


def movielens_multitask(path_or_ratings, neg_ratio=1, seed=0, split=(0.8, 0.1, 0.1)):
    """The two tasks of the paper's MovieLens experiment (Wang et al., "Small Towers Make Big
    Differences"), split into train / validation / test.

    path_or_ratings : a ratings file (see :func:`read_ratings`) or a :class:`Ratings`.
    neg_ratio : negatives per positive (default 1, i.e. 1:1). For each user, neg_ratio times its
        number of ratings movies it did NOT rate are drawn uniformly without replacement (a user
        who rated more than 1 / (1 + neg_ratio) of the movies gets every movie it did not rate,
        so fewer). 0: no negatives.
    seed : the negatives and the shuffle before the split come from their own child streams of
        ``SeedSequence(seed)``: the same ratings and arguments give the same data.
    split : fractions (train, val, test) summing to 1, default 80 / 10 / 10; the examples are
        shuffled, then the first floor(N * train) are the training set, the next floor(N * val)
        the validation set and the rest the test set.

    Every example is a (user, movie) pair: task 1 ``rated`` is 1 for a rating and 0 for a sampled
    negative; task 2 ``rating`` is the rating, with sample weight 1 on positives and 0 on
    negatives (its loss and metrics ignore the negatives). Returns a :class:`MovieLensMultitask`;
    fit a model with ``embeddings=dict(vocab_sizes=data.vocab_sizes, dims=...)`` on
    ``data.train.X, data.train.Y, sample_weights=data.train.sample_weights``."""
    neg_ratio = _count_arg("neg_ratio", neg_ratio, 0)
    seed = _count_arg("seed", seed, 0)
    fractions = _fractions_arg(split)
    r = path_or_ratings if isinstance(path_or_ratings, Ratings) else read_ratings(path_or_ratings)
    neg_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_KEY_NEGATIVES,)))
    neg = _sample_negatives(r.users, r.movies, r.n_users, r.n_movies, neg_ratio, neg_rng) if neg_ratio else \
        np.zeros(0, np.int64)
    X = np.concatenate([np.stack([r.users, r.movies], axis=1),
                        np.stack([neg // r.n_movies, neg % r.n_movies], axis=1)]).astype(np.int64)
    P, Q = len(r), neg.size
    y_rated = np.concatenate([np.ones(P, np.float32), np.zeros(Q, np.float32)])
    y_rating = np.concatenate([r.ratings, np.zeros(Q, np.float32)])
    w_rating = y_rated.copy()
    N = P + Q
    order = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_KEY_SHUFFLE,))).permutation(N)
    n_train, n_val = int(N * fractions[0]), int(N * fractions[1])
    parts = [order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]]
    train, val, test = (_part(X, y_rated, y_rating, w_rating, p) for p in parts)
    return MovieLensMultitask(train, val, test, r.n_users, r.n_movies, r, neg_ratio, seed)
