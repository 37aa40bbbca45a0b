"""Shared fixtures: tiny seeded models, nothing downloaded."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
BENCHMARKS = os.path.join(ROOT, "..", "shared", "benchmarks")

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def benchmarks_dir():
    if not os.path.isdir(BENCHMARKS):
        pytest.skip("../shared/benchmarks is absent (a fresh clone has no shared/)")
    return BENCHMARKS
