#!/usr/bin/env bash
# v28 call 10 (nvidia-h200): the compiled fixed-shape steps as CUDA graphs for every kind, the local hybrid's ring
# cache among them (tests/inference/test_static_decode.py -k compiled).
set -u
O=$OUT/x; mkdir -p $O
export PYTHONPATH=$PWD/src
PYTHONPATH=$PWD/src:$PWD/tests:$PWD/tests/inference timeout 150 python3 -m pytest -q -n 4 -p no:cacheprovider \
  tests/inference/test_static_decode.py -k "compiled" > $O/pytest.log 2>&1
echo "rc=$?" >> $O/pytest.log; grep -E "FAILED|ERROR|passed|failed|rc=|^E " $O/pytest.log | tail -12
cd $OUT && tar czf all.tar.gz x && rm -rf x
