import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The commands that tests start as subprocesses (train.py, collapse.py, reproduce.py's jobs) inherit
# this: one intra-op thread each, so two test workers do not oversubscribe two cores (measured:
# the suite 250 s -> 212 s on 2 cores; the collapse end-to-end test 93 s -> 44 s).
os.environ.setdefault('OMP_NUM_THREADS', '1')


def pytest_addoption(parser):
    parser.addoption('--auto-dtype', choices=('fp32', 'bf16'), default=None,
                     help="what --dtype auto resolves to in this run, subprocesses included (model.AUTO_DTYPE_ENV): "
                          "fp32 runs the suite with bf16 off, bf16 with it on; default: this machine's detection")


def pytest_configure(config):
    import model
    forced = config.getoption('--auto-dtype')
    if forced:   # before any test or worker starts, so that subprocesses inherit it too
        os.environ[model.AUTO_DTYPE_ENV] = forced


def pytest_report_header(config):
    import model
    return f"--dtype auto resolves to {model.resolve_dtype('auto', 'cpu')} on this machine's CPU"


@pytest.fixture(autouse=True, scope='session')
def _one_thread():
    """Tiny models run faster on one intra-op thread, and parallel jobs do not fight over cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
