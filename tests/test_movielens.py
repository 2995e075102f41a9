"""dselectk.movielens: the three MovieLens file formats, errors with line numbers, dense
re-indexing, and the two-task data set (negatives, ratio, masking weights, seeds, splits).
Every file is small and written by the test; the dslabs CSV is checked when it is present."""
import os

import numpy as np
import pytest

from dselectk import datasets
from dselectk.movielens import Ratings, movielens_multitask, ratings_from_arrays, read_ratings

# (raw user, raw movie, rating, timestamp)
RAW = [(10, 300, 4.0, 1000), (10, 5, 3.5, 1001), (7, 300, 5.0, 1002), (42, 17, 1.0, 1003), (7, 17, 2.5, 1004)]


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def _csv(rows=RAW):
    return "userId,movieId,rating,timestamp\n" + "".join(f"{u},{m},{r},{t}\n" for u, m, r, t in rows)


def _check_raw(r, rows=RAW):
    assert isinstance(r, Ratings) and len(r) == len(rows)
    np.testing.assert_array_equal(r.user_ids[r.users], [x[0] for x in rows])
    np.testing.assert_array_equal(r.movie_ids[r.movies], [x[1] for x in rows])
    np.testing.assert_array_equal(r.ratings, np.array([x[2] for x in rows], np.float32))
    np.testing.assert_array_equal(r.timestamps, [x[3] for x in rows])
    assert r.ratings.dtype == np.float32 and r.users.dtype == np.int64 and r.timestamps.dtype == np.int64


def test_reads_ratings_csv(tmp_path):
    _check_raw(read_ratings(_write(tmp_path, "ratings.csv", _csv())))


def test_reads_dslabs_style_csv_with_extra_quoted_columns(tmp_path):
    text = '"movieId","title","year","genres","userId","rating","timestamp"\n' + "".join(
        f'{m},"Title, with a comma {m}",NA,"Drama|Comedy",{u},{r},{t}\n' for u, m, r, t in RAW)
    _check_raw(read_ratings(_write(tmp_path, "movielens.csv", text)))


def test_reads_ratings_dat(tmp_path):
    _check_raw(read_ratings(_write(tmp_path, "ratings.dat", "".join(f"{u}::{m}::{int(r) if r == int(r) else r}::{t}\n"
                                                                     for u, m, r, t in RAW))))


def test_reads_u_data(tmp_path):
    text = "".join(f"{u}\t{m}\t{r}\t{t}\r\n" for u, m, r, t in RAW) + "\n"  # CRLF and a trailing blank line
    _check_raw(read_ratings(_write(tmp_path, "u.data", text)))


def test_format_from_content_when_the_name_does_not_tell(tmp_path):
    _check_raw(read_ratings(_write(tmp_path, "ml1m_ratings", "".join(f"{u}::{m}::{r}::{t}\n" for u, m, r, t in RAW))))
    _check_raw(read_ratings(_write(tmp_path, "ml100k", "".join(f"{u}\t{m}\t{r}\t{t}\n" for u, m, r, t in RAW))))
    _check_raw(read_ratings(_write(tmp_path, "export.txt", _csv())))


def test_dense_reindexing():
    r = read_ratings_from(RAW)
    assert r.n_users == 3 and r.n_movies == 3
    np.testing.assert_array_equal(r.user_ids, [7, 10, 42])  # ascending raw ids
    np.testing.assert_array_equal(r.movie_ids, [5, 17, 300])
    np.testing.assert_array_equal(r.users, [1, 1, 0, 2, 0])
    np.testing.assert_array_equal(r.movies, [2, 0, 2, 1, 1])


def read_ratings_from(rows):
    a = np.array(rows)
    return ratings_from_arrays(a[:, 0].astype(np.int64), a[:, 1].astype(np.int64), a[:, 2], a[:, 3].astype(np.int64))


@pytest.mark.parametrize("name,text,match", [
    ("ratings.csv", _csv() + "8,9,NA,1005\n", r"ratings\.csv:7: bad rating 'NA'"),
    ("ratings.csv", _csv() + "8,9,3\n", r"ratings\.csv:7: expected 4 fields"),
    ("ratings.csv", _csv()[:40] + "x" + _csv()[40:], r"ratings\.csv:2: bad (movieId|userId|rating|timestamp)"),
    ("ratings.csv", "user,movie,rating,timestamp\n1,2,3,4\n", r"ratings\.csv:1: the header lacks the columns"),
    ("ratings.dat", "1::2::3::4\n1::2::3\n", r"ratings\.dat:2: expected 4 '::'-separated fields"),
    ("ratings.dat", "1::2::3::4\n\n1::2.5::3::4\n", r"ratings\.dat:3: bad movieId '2\.5'"),
    ("u.data", "1\t2\t3\t4\n1\t2\tinf\t4\n", r"u\.data:2: bad rating 'inf'"),
    ("u.data", "1\t2\t3\t4\n1 2 3 4\n", r"u\.data:2: expected 4"),
    ("ratings.csv", "", r"ratings\.csv: no ratings"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n", r"ratings\.csv: no ratings"),
    ("mystery", "1;2;3;4\n", r"mystery: cannot tell the ratings format"),
])
def test_malformed_files_name_file_and_line(tmp_path, name, text, match):
    with pytest.raises(ValueError, match=match):
        read_ratings(_write(tmp_path, name, text))


# --------------------------------------------------------------------------------------------
# the two tasks
# --------------------------------------------------------------------------------------------

def _random_ratings(seed=0, n_users=40, n_movies=60, per_user=(1, 25)):
    rng = np.random.default_rng(seed)
    users, movies = [], []
    for u in range(n_users):
        k = rng.integers(*per_user)
        users += [1000 + 3 * u] * k
        movies += list(rng.choice(np.arange(n_movies) * 7 + 11, k, replace=False))
    n = len(users)
    return ratings_from_arrays(np.array(users), np.array(movies), rng.integers(1, 11, n) / 2, np.arange(n))


def _all(d):
    parts = (d.train, d.val, d.test)
    return (np.concatenate([p.X for p in parts]), [np.concatenate([p.Y[t] for p in parts]) for t in (0, 1)],
            np.concatenate([p.sample_weights[1] for p in parts]))


@pytest.mark.parametrize("neg_ratio", [1, 2, 3])
def test_negatives_are_unrated_distinct_and_in_ratio(neg_ratio):
    r = _random_ratings()
    d = movielens_multitask(r, neg_ratio=neg_ratio, seed=1)
    X, (rated, rating), w = _all(d)
    assert d.vocab_sizes == [r.n_users, r.n_movies] and X.dtype == np.int64
    pos, neg = X[rated == 1], X[rated == 0]
    assert len(pos) == len(r) and set(np.unique(rated)) <= {0.0, 1.0}
    rated_pairs = set(zip(r.users.tolist(), r.movies.tolist()))
    neg_pairs = list(zip(neg[:, 0].tolist(), neg[:, 1].tolist()))
    assert not rated_pairs & set(neg_pairs), "a negative the user rated"
    assert len(set(neg_pairs)) == len(neg_pairs), "a repeated negative"
    per_user_pos = np.bincount(pos[:, 0], minlength=r.n_users)
    per_user_neg = np.bincount(neg[:, 0], minlength=r.n_users)
    np.testing.assert_array_equal(per_user_neg, np.minimum(neg_ratio * per_user_pos, r.n_movies - per_user_pos))
    # the rating task: the ratings on positives (weight 1), 0 with weight 0 on negatives
    np.testing.assert_array_equal(w, rated)
    assert np.all(rating[rated == 0] == 0)
    order = np.lexsort((pos[:, 1], pos[:, 0]))
    expect = np.lexsort((r.movies, r.users))
    np.testing.assert_array_equal(rating[rated == 1][order], r.ratings[expect])


def test_users_who_rated_almost_everything_get_every_unrated_movie():
    users = np.array([0] * 9 + [1] * 2)
    movies = np.array(list(range(9)) + [0, 9])  # 10 movies
    d = movielens_multitask(ratings_from_arrays(users, movies, np.ones(11)), neg_ratio=1, seed=0)
    X, (rated, _), _ = _all(d)
    neg = X[rated == 0]
    assert sorted(neg[neg[:, 0] == 0, 1].tolist()) == [9]  # user 0 rated 9 of 10 movies
    assert len(neg[neg[:, 0] == 1]) == 2


def test_seeds_are_reproducible_and_matter():
    r = _random_ratings(seed=3)
    a, b, c = (movielens_multitask(r, seed=s) for s in (5, 5, 6))
    for pa, pb in zip((a.train, a.val, a.test), (b.train, b.val, b.test)):
        np.testing.assert_array_equal(pa.X, pb.X)
        np.testing.assert_array_equal(pa.Y[1], pb.Y[1])
    assert not np.array_equal(a.train.X, c.train.X)


def test_splits_are_disjoint_and_cover_everything():
    r = _random_ratings(seed=4)
    d = movielens_multitask(r, neg_ratio=2, seed=0, split=(0.7, 0.2, 0.1))
    N = len(_all(d)[0])
    assert N > 2.5 * len(r)  # a few users rated too many of the 60 movies for 2 negatives each
    assert len(d.train) == int(0.7 * N) and len(d.val) == int(0.2 * N) and len(d.train) + len(d.val) + len(d.test) == N
    keys = [set((p.X[:, 0] * r.n_movies + p.X[:, 1]).tolist()) for p in (d.train, d.val, d.test)]
    assert not keys[0] & keys[1] and not keys[0] & keys[2] and not keys[1] & keys[2]
    assert sum(map(len, keys)) == N  # all pairs distinct, none lost
    for p in (d.train, d.val, d.test):
        assert p.sample_weights[0] is None and p.sample_weights[1].dtype == np.float32
        np.testing.assert_array_equal(p.positives, p.sample_weights[1] > 0)


def test_reads_the_file_itself_and_checks_arguments(tmp_path):
    d = movielens_multitask(_write(tmp_path, "ratings.csv", _csv()), neg_ratio=0, split=(1, 0, 0))
    assert len(d.train) == 5 and len(d.val) == len(d.test) == 0 and d.ratings.n_users == 3
    r = _random_ratings()
    with pytest.raises(ValueError, match="neg_ratio"):
        movielens_multitask(r, neg_ratio=-1)
    with pytest.raises(TypeError, match="neg_ratio"):
        movielens_multitask(r, neg_ratio=0.5)
    with pytest.raises(ValueError, match="split"):
        movielens_multitask(r, split=(0.8, 0.1))
    with pytest.raises(ValueError, match="split"):
        movielens_multitask(r, split=(0.8, 0.3, 0.1))
    with pytest.raises(ValueError, match="seed"):
        movielens_multitask(r, seed=-1)


def test_reexported_from_datasets():
    assert datasets.read_ratings is read_ratings and datasets.movielens_multitask is movielens_multitask
    for name in ("read_ratings", "movielens_multitask", "Ratings", "MovieLensMultitask"):
        assert name in datasets.__all__


DSLABS_CSV = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "data", "movielens.csv")


@pytest.mark.skipif(not os.path.exists(DSLABS_CSV), reason="benchmarks/get_movielens.sh has not been run")
def test_dslabs_movielens_csv():
    r = read_ratings(DSLABS_CSV)
    assert (len(r), r.n_users, r.n_movies) == (100_004, 671, 9_066)
    assert r.ratings.min() == 0.5 and r.ratings.max() == 5.0
