"""gpu_check.py end to end on a CPU at toy size (--tiny), so that the GPU session's one command
cannot break unnoticed between GPU runs."""
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_ROOT = os.environ.get('DATA_ROOT', os.path.join(REPO, '..', 'shared', 'data'))
BATCH_1 = os.path.join(DATA_ROOT, 'cifar-10-batches-py', 'data_batch_1')
SECTIONS = ('env', 'throughput', 'reg', 'train_run', 'torchrun', 'errprop', 'targets', 'steps')


def numbers(obj):
    """Every int / float in a JSON tree (bools excluded)."""
    if isinstance(obj, dict):
        return [v for x in obj.values() for v in numbers(x)]
    if isinstance(obj, list):
        return [v for x in obj for v in numbers(x)]
    return [obj] if isinstance(obj, (int, float)) and not isinstance(obj, bool) else []


@pytest.mark.skipif(not os.path.isfile(BATCH_1), reason=f'CIFAR-10 data_batch_1 not found at {BATCH_1} '
                                                         f'(set DATA_ROOT to the folder holding cifar-10-batches-py)')
def test_gpu_check_tiny(tmp_path):
    cmd = [sys.executable, '-m', 'experiments.gpu_check', '--device', 'cpu', '--tiny', '--out-dir', str(tmp_path / 'out'),
           '--results', str(tmp_path / 'results'), '--data-dir', str(tmp_path / 'data-gpu'),
           '--source-data', DATA_ROOT, '--peak-tflops', '1']
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rep = json.load(open(tmp_path / 'results' / 'gpu.json'))
    assert rep['ok'] and all(rep[k] for k in SECTIONS), [k for k in SECTIONS if not rep[k]]
    assert [s['name'] for s in rep['steps']] == ['bench_train', 'bench_reg', 'data', 'train', 'sample',
                                                 'torchrun', 'errprop']
    assert all(s['rc'] == 0 and s['wall_s'] >= 0 and s['argv'] for s in rep['steps'])
    for k in SECTIONS[1:]:
        assert all(math.isfinite(v) for v in numbers(rep[k])), k
    rows = rep['throughput']['rows']
    assert {r['dtype'] for r in rows} == {'fp32', 'bf16'}
    assert all(r['mfu'] > 0 and r['gflop_fwdbwd_img'] > r['gflop_fwd_img'] > 0 and r['img_per_s'] > 0 for r in rows)
    assert [r['variant'].split()[:2] for r in rep['reg']['rows']] == [['vanilla'], ['L=5', 'full'], ['L=5', 'last']]
    assert rep['train_run']['steps'] == 2 and len(rep['train_run']['loss_curve']) == 2
    assert os.path.isfile(rep['train_run']['samples'])
    assert rep['torchrun']['rc'] == 0 and rep['torchrun']['steps'] == 2
    ep = rep['errprop']
    assert ep['N'] == 8 and 0 < ep['fid50k_100_min'] < ep['fid50k_1000_min'] and ep['fig1_min'] > 0
    assert len(rep['targets']) == 4 and all(t['measured'] is not None for t in rep['targets'])
    md = open(tmp_path / 'results' / 'gpu.md').read()
    assert md.count('| PASS |') + md.count('| MISS |') == 4 and 'torchrun' in md
    # the data step copied the subset, and the loader read it as such
    assert os.path.isfile(tmp_path / 'data-gpu' / 'cifar-10-batches-py' / 'data_batch_1')
    assert 'read 10000 images from 1 of 5' in open(os.path.join(rep['work_dir'], 'logs', 'train.out')).read()
