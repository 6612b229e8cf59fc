import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The commands that tests start as subprocesses (train.py, collapse.py, reproduce.py's jobs) inherit
# this: one intra-op thread each, so two test workers do not oversubscribe two cores (measured:
# the suite 250 s -> 212 s on 2 cores; the collapse end-to-end test 93 s -> 44 s).
os.environ.setdefault('OMP_NUM_THREADS', '1')


@pytest.fixture(autouse=True, scope='session')
def _one_thread():
    """Tiny models run faster on one intra-op thread, and parallel jobs do not fight over cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
