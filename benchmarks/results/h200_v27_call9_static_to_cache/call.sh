#!/usr/bin/env bash
# v27 call 9 (nvidia-h200): the static decoder's GPU tests after to_cache (generate's return_cache on the fast path)
set -u
O=$OUT/x; mkdir -p $O
git log -1 --format=%H > $O/gpu.txt; nvidia-smi --query-gpu=name --format=csv,noheader >> $O/gpu.txt
PYTHONPATH=$PWD/src:$PWD/tests:$PWD/tests/inference timeout 90 python3 -m pytest -q -n 4 -p no:cacheprovider -rA \
  tests/inference/test_static_decode.py > $O/pytest.log 2>&1
echo "rc=$?" >> $O/pytest.log; grep -E "FAILED|passed|failed|rc=|^E " $O/pytest.log | tail -12 | tee $O/pytest_summary.log
cd $OUT && tar czf all.tar.gz x && rm -rf x
