"""Suite-wide fixtures.

Every test starts from the same random state, whatever ran before it on the same xdist worker:
an unseeded test that draws weights or inputs would otherwise see a different draw in every
run (the order of tests on a worker changes with ``--dist loadgroup``), and a rare draw — a
randomly initialised ReLU network whose units are all dead, say — would fail it now and then.
"""

from __future__ import annotations

import random
import zlib

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_every_test(request: pytest.FixtureRequest) -> None:
    """Seed Python, NumPy and torch from the test's id (stable across runs and workers)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
