"""bench.py --what compare: the working tree's training step against a git ref's, in one process."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def in_git_checkout():
    if shutil.which('git') is None:
        return False
    r = subprocess.run(['git', '-C', ROOT, 'rev-parse', '--verify', '-q', 'HEAD'], capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(not in_git_checkout(), reason='needs git and a git checkout of the project')
def test_compare_head_with_working_tree(tmp_path):
    out = tmp_path / 'cmp.json'
    cmd = [sys.executable, '-m', 'experiments.bench', '--what', 'compare', '--compare', 'HEAD', '--model', 'tiny',
           '--batch-size', '4', '--dtype', 'fp32', '--iters', '1', '--reps', '1', '--warmup', '0', '--threads', '1',
           '--json', str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    row, = json.loads(out.read_text())['compare']
    assert row['model'] == 'tiny' and row['batch'] == 4
    assert math.isfinite(row['ratio']) and row['ratio'] > 0
    assert row['ratio_min'] <= row['ratio'] <= row['ratio_max']
    assert math.isfinite(row['loss_max_rel_diff'])

