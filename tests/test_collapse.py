import json
import os

import numpy as np
import pytest
import torch

import collapse
import data as D
import runtime as R
import train

TINY = ['--dataset', 'gmm10d', '--alphas', '0.3', '0.9', '--T', '100', '--steps-per-gen', '100',
        '--n-train', '1000', '--n-eval', '200', '--device', 'cpu']


def test_end_to_end_and_resume(tmp_path, capsys):
    out = str(tmp_path / 'collapse')
    res = collapse.main(TINY + ['--generations', '1', '--out-dir', out])
    with open(os.path.join(out, 'collapse.json')) as f:
        js = json.load(f)
    assert js['results'] == json.loads(json.dumps(res['results']))
    assert set(js['results']) == {'0.3', '0.9'} and js['n_train'] == 1000
    for rows in js['results'].values():
        assert [r['gen'] for r in rows] == [0, 1]
        for r in rows:
            assert set(r) >= {'drift_pct', 'mmd', 'run_dir'}
            assert np.isfinite(r['drift_pct']) and np.isfinite(r['mmd'])
    assert os.path.isfile(os.path.join(out, 'collapse.png'))
    # gen 0 is shared; each generation's samples cover the next training set and the measurement
    r3 = js['results']['0.3']
    assert r3[0]['run_dir'] == js['results']['0.9'][0]['run_dir'] == os.path.join(out, 'gen00')
    assert r3[0]['n_samples'] == 700 and r3[1]['n_samples'] == 700
    assert js['results']['0.9'][1]['n_samples'] == 200
    text = capsys.readouterr().out
    assert '| gen | alpha 0.3 | alpha 0.9 |' in text and 'summary:' in text

    files = [os.path.join(r['run_dir'], n) for rows in js['results'].values() for r in rows
             for n in ('ckpt.pt', 'samples.npz')]
    mtimes = {p: os.stat(p).st_mtime_ns for p in files}
    # an extended (or interrupted and restarted) protocol redoes nothing already finished
    tiny = [v for v in TINY if v != '0.9']
    res2 = collapse.main(tiny + ['--generations', '2', '--out-dir', out])
    assert {p: os.stat(p).st_mtime_ns for p in files} == mtimes
    rows = res2['results']['0.3']
    assert [r['gen'] for r in rows] == [0, 1, 2]
    assert rows[:2] == res['results']['0.3']              # the same samples -> the same numbers
    assert not os.path.exists(os.path.join(out, 'alpha0.9', 'gen02'))
    # gen 2 of alpha 0.3 trained on gen 1's samples
    cfg = json.load(open(os.path.join(out, 'alpha0.3', 'gen02', 'config.json')))
    assert cfg['synthetic'] == os.path.join(out, 'alpha0.3', 'gen01', 'samples.npz')
    assert cfg['fresh_frac'] == 0.3 and cfg['seed'] == 2 and cfg['max_steps'] == 100


def test_flags_give_requested_mix(tmp_path):
    a = collapse.parse_args(TINY + ['--seed', '5', '--out-dir', str(tmp_path), '--', '--lr', '3e-4'])
    marker = np.full((1000, 10), 1e3, dtype=np.float32)     # a synthetic set easy to spot
    npz = str(tmp_path / 'prev.npz')
    np.savez(npz, samples=marker)
    cfg, _ = R.parse_config(collapse.train_argv(a, 0.3, 2, npz))
    assert (cfg['seed'], cfg['toy_n'], cfg['T'], cfg['max_steps']) == (7, 1000, 100, 100)
    assert cfg['lr'] == 3e-4 and cfg['out_dir'] == os.path.join(str(tmp_path), 'alpha0.3', 'gen02')
    x = train.training_set(cfg)
    is_syn = (x == 1e3).all(1)
    assert len(x) == 1000 and int(is_syn.sum()) == 700      # fraction 0.3 fresh
    fresh = x[~is_syn]
    real = D.load_data('gmm10d', toy_n=1000, seed=7)        # fresh real data: this generation's seed
    assert (fresh[:, None] == real[None]).all(-1).any(1).all()
    cfg0, _ = R.parse_config(collapse.train_argv(a, 0.3, 0))
    assert cfg0['synthetic'] is None and cfg0['seed'] == 5
    with pytest.raises(SystemExit):
        collapse.parse_args(['--alphas', '0'])


def test_drift_and_mmd_of_true_samples():
    g = torch.Generator().manual_seed(0)
    x = D.sample_toy('gmm10d', 20000, g)
    assert abs(collapse.drift_pct(x, 'gmm10d')) < 3.0
    d = collapse.drift_pct(x * 1.1 ** 0.5, 'gmm10d')          # 10 % more second moment
    assert abs(d - 10.0) < 3.5
    y = D.sample_toy('gmm10d', 1000, g)
    assert abs(collapse.signed_mmd(x[:1000], y)) < 0.05
    assert collapse.signed_mmd(x[:1000] + 1.0, y) > 0.2
