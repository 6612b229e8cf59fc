import json
import os

import numpy as np
import pytest
import torch

from neighbours import collapse
from neighbours import kde
import data as D
import runtime as R
import trainstep

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
    x = trainstep.training_set(cfg)
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


# ----------------------------------------------------------------------------- --score kde (paper's)

KDE = ['--score', 'kde', '--n-train', '200', '--generations', '3', '--steps', '20', '--runs', '2',
       '--n-eval', '200']


def test_kde_score_is_the_gradient_of_the_diffused_kde():
    g = torch.Generator().manual_seed(0)
    X = D.sample_toy('gmm5x10', 50, g).double()
    sched = kde.VPSchedule(4.0, 0.1, 20.0)
    for t in (0.02, 0.5, 2.0):
        m, s2 = sched.m_s2(t)
        x = (m * D.sample_toy('gmm5x10', 6, g).double() + 0.7 * torch.randn(6, 10, generator=g,
                                                                             dtype=torch.float64))
        x.requires_grad_(True)
        grad, = torch.autograd.grad(kde.kde_log_density(x, X, m, s2, 0.6).sum(), x)
        score = kde.kde_score(x.detach(), X, m, s2, 0.6, chunk=100)   # chunks of 2 rows
        assert score.dtype == torch.float64
        torch.testing.assert_close(score, grad, rtol=1e-10, atol=1e-10)
    # m(t), s(t)^2 of the linear schedule: B(4) = 0.1 * 4 + 19.9 * 16 / 8
    m, s2 = sched.m_s2(4.0)
    assert abs(m - np.exp(-(0.4 + 19.9 * 2) / 2)) < 1e-12 and abs(s2 + m * m - 1) < 1e-12


def test_kde_protocol_over_disperses_and_fresh_data_holds_it(tmp_path, capsys):
    out = str(tmp_path / 'kde')
    res = collapse.main(KDE + ['--alphas', '0.1', '1', '--out-dir', out])
    js = json.load(open(os.path.join(out, 'collapse.json')))
    assert js['results'] == json.loads(json.dumps(res['results'])) and js['score'] == 'kde'
    assert js['dataset'] == 'gmm5x10' and js['runs'] == 2
    small, one = js['results']['0.1'], js['results']['1']
    assert [r['gen'] for r in small] == [0, 1, 2, 3] and all(r['n_runs'] == 2 for r in small)
    assert len(small[3]['drift_pct']['runs']) == 2
    # generation 1 (KDE of real data, q_0 = p_data) is shared by all alphas
    assert small[1]['drift_pct'] == one[1]['drift_pct']
    wv = [r['within_var']['mean'] for r in small]
    assert abs(wv[0] - 0.36) < 0.05                              # row 0: true data
    assert wv[1] > wv[0] + 0.15 and wv[3] > wv[2] > wv[1] + 0.1  # the KDE adds h^2 every generation
    # alpha = 1: every generation is a KDE of fresh data; nothing accumulates
    w1 = [r['within_var']['mean'] for r in one]
    assert abs(w1[3] - w1[1]) < 0.1 and wv[3] - w1[3] > 0.25
    assert abs(np.mean([r['drift_pct']['mean'] for r in one[1:]]) - one[1]['closure_drift_pct']) < 15
    # the closure: v_g = s^2 + h^2 (1 - (1 - alpha)^g) / alpha, and the same for E||x||^2 / D
    assert abs(small[3]['closure_within_var'] - (0.36 + 0.36 * (1 - 0.9 ** 3) / 0.1)) < 1e-12
    assert abs(one[2]['closure_within_var'] - 0.72) < 1e-12 and small[0]['closure_drift_pct'] == 0
    assert abs(kde.closure_drift_pct(0.1, 20, 0.6, 'gmm5x10') - 108.3) < 0.1
    assert abs(kde.closure_drift_pct(0.5, 20, 0.6, 'gmm5x10') - 24.7) < 0.1
    assert abs(kde.closure_drift_pct(0.9, 20, 0.6, 'gmm5x10') - 13.7) < 0.1
    assert os.path.isfile(os.path.join(out, 'collapse.png'))
    assert '| gen | alpha 0.1 | closure | alpha 1 | closure |' in capsys.readouterr().out
    # resumable: stored generations are not redone, more generations extend them
    files = [os.path.join(dp, f) for dp, _, fs in os.walk(out) for f in fs if f.endswith('.npz')]
    mtimes = {p: os.stat(p).st_mtime_ns for p in files}
    res2 = collapse.main([v if v != '3' else '4' for v in KDE] + ['--alphas', '0.1', '--out-dir', out])
    assert {p: os.stat(p).st_mtime_ns for p in files} == mtimes
    assert res2['results']['0.1'][:4] == res['results']['0.1'] and len(res2['results']['0.1']) == 5
    with pytest.raises(SystemExit, match='bandwidth'):             # a run-defining flag changed
        collapse.main(KDE + ['--bandwidth', '0.5', '--out-dir', out])


@pytest.mark.parametrize('argv, msg', [
    (['--bandwidth', '0'], 'bandwidth must be a positive'),
    (['--bandwidth', '-1'], 'bandwidth must be a positive'),
    (['--dataset', 'cifar10'], 'needs a toy data set'),
    (['--n-samples', '100'], 'n-samples'),
    (['--t0', '5'], 't0'),
])
def test_kde_bad_input_one_line_errors(argv, msg, tmp_path):
    with pytest.raises(SystemExit) as e:
        collapse.parse_args(KDE + argv + ['--out-dir', str(tmp_path)])
    assert str(e.value).startswith('error: ') and msg in str(e.value) and '\n' not in str(e.value)
