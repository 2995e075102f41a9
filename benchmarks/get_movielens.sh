#!/bin/sh
# Writes benchmarks/data/movielens.csv: the MovieLens ratings that R's dslabs package ships
# (dslabs::movielens, a copy of the 2016 "ml-latest-small" ratings: 100,004 ratings of 9,066
# movies by 671 users), for dselectk.movielens.read_ratings and the paper experiment
# (dselectk/experiments/movielens.py, tests/test_experiment_movielens.py --paper).
#
# A documented helper, not a dependency: dselectk itself reads any MovieLens ratings file
# (ratings.csv, ratings.dat, u.data). It needs R with the dslabs package, e.g. on Debian/Ubuntu
#
#     apt-get install -y r-base-core r-cran-dslabs
#
# The CSV has the columns movieId, title, year, genres, userId, rating, timestamp (quoted
# fields, titles with commas); read_ratings picks its columns from the header.
# benchmarks/data/ is ignored by git: the data is not part of the repository.
set -eu
cd "$(dirname "$0")"
if ! command -v Rscript >/dev/null 2>&1; then
    echo "get_movielens.sh: Rscript not found; install R and dslabs (apt-get install -y r-base-core r-cran-dslabs)" >&2
    exit 1
fi
mkdir -p data
Rscript -e 'write.csv(dslabs::movielens, "data/movielens.csv", row.names=FALSE)'
echo "wrote $(pwd)/data/movielens.csv"
