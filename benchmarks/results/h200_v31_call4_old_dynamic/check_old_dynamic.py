"""v31 call 4: the GPU test of two lengths in one process, run with the trainer's torch.compile call as it was before
v31 (dynamo's default dynamic=None, automatic dynamic shapes), to see the test fail without the fix.
    PYTHONPATH=src:tests:tests/ops:tests/train python3 benchmarks/results/h200_v31_call4_old_dynamic/check_old_dynamic.py
"""
import sys

import pytest
import torch

_compile = torch.compile


def before_v31(model, mode=None, dynamic=None):  # the trainer's call before v31: no dynamic=False
    return _compile(model, mode=mode)


torch.compile = before_v31
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-rf",
                      "tests/train/test_train_cuda.py::test_compiled_runs_of_two_lengths_in_one_process[routing]"]))
