"""train.py / sample.py end to end on toy data with a short chain (T = 100): learning, exact
resume, DDP equivalence through torchrun, the one-line errors, checkpoint contents, the
recursive-retraining data mix and the alternative losses."""
import collections
import json
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

import data as D
import sample
import train
import trainstep
import runtime as R
from mmd import mmd2
from model import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ['--dataset', '8gaussians', '--T', '100', '--toy-n', '2000', '--n-preview', '50']


def run(out, *args):
    train.main(FAST + ['--out-dir', str(out)] + [str(a) for a in args])


def read_log(out):
    with open(os.path.join(out, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def load_ck(out):
    return torch.load(os.path.join(out, 'ckpt.pt'), map_location='cpu', weights_only=True)


def one_line_error(excinfo):
    msg = str(excinfo.value)
    assert msg.startswith('error:'), msg
    assert '\n' not in msg, msg
    return msg


def equal_state(a, b):
    """Recursive bitwise equality of state dicts (tensors, numbers, lists, dicts)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal_state(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp('run')
    run(out, '--max-steps', 20, '--log-every', 5, '--save-every', 10)
    return out


# ---- learning ----------------------------------------------------------------------------------

def test_training_learns_toy_data(tmp_path):
    # short warm-up and a fast EMA so that 200 steps suffice
    run(tmp_path, '--max-steps', 200, '--log-every', 10, '--warmup', 20, '--ema-decay', 0.98)
    log = read_log(tmp_path)
    assert [r['step'] for r in log] == list(range(10, 201, 10))
    first = np.mean([r['loss'] for r in log[:2]])
    last = np.mean([r['loss'] for r in log[-5:]])
    assert last < 0.75 * first, (first, last)
    assert all(math.isfinite(r['loss']) and r['lr'] > 0 for r in log)

    model, diff, cfg = R.load_checkpoint(str(tmp_path))
    torch.manual_seed(0)
    untrained = build_model(cfg['model'], tuple(cfg['data_shape'])).eval()
    real = D.sample_toy('8gaussians', 500, torch.Generator().manual_seed(1))
    centres = 2.0 * torch.tensor([[math.cos(k * math.pi / 4), math.sin(k * math.pi / 4)] for k in range(8)])

    def judge(m):
        with torch.no_grad():
            x = diff.sample(m, (500, 2), generator=torch.Generator().manual_seed(2))
        return torch.cdist(x, centres).min(1).values.mean().item(), mmd2(x, real, 'gaussian', 'u').item()
    d_trained, m_trained = judge(model)
    d_untrained, m_untrained = judge(untrained)
    assert d_trained < 0.5 * d_untrained, (d_trained, d_untrained)
    assert m_trained < 0.5 * m_untrained, (m_trained, m_untrained)


def test_batch_indices():
    n, b, seed = 103, 10, 7
    bpe = n // b
    a = [trainstep.batch_indices(n, b, s, seed) for s in range(2 * bpe)]
    assert all(t.shape == (b,) and t.dtype == torch.long for t in a)
    assert all(torch.equal(t, trainstep.batch_indices(n, b, s, seed)) for s, t in enumerate(a))
    e0, e1 = torch.cat(a[:bpe]), torch.cat(a[bpe:])
    assert len(set(e0.tolist())) == bpe * b and len(set(e1.tolist())) == bpe * b  # no repeats
    assert e0.min() >= 0 and e0.max() < n and not torch.equal(e0, e1)
    full = torch.cat([trainstep.batch_indices(100, 10, s, 0) for s in range(10)])
    assert torch.equal(full.sort().values, torch.arange(100))                       # each index once
    assert not torch.equal(trainstep.batch_indices(n, b, 0, seed), trainstep.batch_indices(n, b, 0, seed + 1))
    with pytest.raises(ValueError, match='batch'):
        trainstep.batch_indices(5, 10, 0, 0)



# ---- reproducibility and exact resume ------------------------------------------------------------

def test_same_seed_same_weights(tmp_path):
    """--seed fixes the whole run, the initial weights included, whatever ran before in the process."""
    run(tmp_path / 'a', '--max-steps', 2, '--seed', 5)
    torch.randn(10)      # other use of the global RNG in between
    run(tmp_path / 'b', '--max-steps', 2, '--seed', 5)
    a, b = load_ck(tmp_path / 'a'), load_ck(tmp_path / 'b')
    assert equal_state(a['model'], b['model'])
    assert equal_state(a['ema'], b['ema'])


@pytest.mark.parametrize('extra', [[], ['--reg', '--reg-L', '3', '--batch-size', '32']],
                         ids=['plain', 'reg'])
def test_exact_resume(tmp_path, extra):
    N = 15
    common = ['--log-every', 5, '--save-every', N] + extra
    run(tmp_path / 'a', '--max-steps', 2 * N, *common)
    torch.randn(3)       # the global RNG's history must not matter
    run(tmp_path / 'b', '--max-steps', N, *common)
    assert load_ck(tmp_path / 'b')['step'] == N
    train.main(['--out-dir', str(tmp_path / 'b'), '--resume', '--max-steps', str(2 * N)])
    a, b = load_ck(tmp_path / 'a'), load_ck(tmp_path / 'b')
    assert a['step'] == b['step'] == 2 * N
    for key in ('model', 'ema', 'opt'):
        assert equal_state(a[key], b[key]), key
    # the resumed run kept the original settings and logged the same losses
    own = ('out_dir', 'resume')
    assert {k: v for k, v in a['config'].items() if k not in own} == \
        {k: v for k, v in b['config'].items() if k not in own}
    la, lb = read_log(tmp_path / 'a'), read_log(tmp_path / 'b')
    assert [r['step'] for r in lb] == [r['step'] for r in la]
    assert [r['loss'] for r in lb] == [r['loss'] for r in la]
    if extra:
        assert [(r['r'], r['k']) for r in lb] == [(r['r'], r['k']) for r in la]


# ---- DDP through torchrun ------------------------------------------------------------------------

def torchrun(out, *args, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    env.pop('WORLD_SIZE', None)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
           'train.py'] + FAST + ['--out-dir', str(out), '--device', 'cpu'] + [str(a) for a in args]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


needs_dist = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason='torch.distributed with the gloo backend is not available')


@needs_dist
def test_torchrun_matches_single_process(tmp_path):
    # exact fp32: bf16 kernels round differently on half the batch (rank shards)
    args = ['--batch-size', 64, '--max-steps', 30, '--log-every', 10, '--dtype', 'fp32']
    torchrun(tmp_path / 'ddp', *args)
    run(tmp_path / 'one', *args, '--device', 'cpu')
    a, b = load_ck(tmp_path / 'ddp'), load_ck(tmp_path / 'one')
    assert a['step'] == b['step'] == 30
    for key in ('model', 'ema'):
        for name in a[key]:
            assert torch.allclose(a[key][name], b[key][name], rtol=1e-4, atol=1e-5), (key, name)
    # and the run really moved the weights (allclose is not vacuous)
    torch.manual_seed(0)
    init = build_model('mlp', (2,)).state_dict()
    assert any(not torch.allclose(init[n], b['model'][n], atol=1e-3) for n in init)
    la, lb = read_log(tmp_path / 'ddp'), read_log(tmp_path / 'one')
    assert [r['step'] for r in la] == [r['step'] for r in lb] == [10, 20, 30]
    # clipping and the learning rate saw the same (all-reduced) gradient as one process
    for ra, rb in zip(la, lb):
        assert ra['grad_norm'] == pytest.approx(rb['grad_norm'], rel=1e-4)


@needs_dist
def test_torchrun_reg_runs(tmp_path):
    torchrun(tmp_path, '--reg', '--reg-L', 3, '--batch-size', 32, '--max-steps', 3, '--log-every', 1)
    log = read_log(tmp_path)
    assert [r['step'] for r in log] == [1, 2, 3]
    for r in log:
        assert {'loss_reg', 'r', 'k', 'w', 'loss_nll'} <= r.keys()
        assert 0 <= r['r'] < 100 and 1 <= r['k'] <= 3 and math.isfinite(r['loss_reg'])
    assert load_ck(tmp_path)['step'] == 3


# ---- one-line errors -----------------------------------------------------------------------------

def test_unknown_dataset_is_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(['--dataset', 'cifar11', '--out-dir', str(tmp_path)])
    assert e.value.code == 2
    assert 'invalid choice' in capsys.readouterr().err
    assert not os.path.exists(tmp_path / 'config.json')


def test_missing_cifar10_cli_error(tmp_path):
    empty = tmp_path / 'empty'
    empty.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS='1')
    p = subprocess.run([sys.executable, 'train.py', '--dataset', 'cifar10', '--data-dir', str(empty),
                        '--out-dir', str(tmp_path / 'out'), '--max-steps', '1'],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert 'Traceback' not in p.stderr, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith('error:') and 'CIFAR-10' in last and '--data-dir' in last, last


def test_config_errors(tmp_path):
    cases = [(['--fresh-frac', '0.5'], 'synthetic'),
             (['--fresh-frac', '0'], 'fresh-frac'),
             (['--reg', '--reg-halves', '--batch-size', '3'], 'batch-size'),
             (['--reg', '--reg-batch', '1'], 'reg-batch'),
             (['--reg-batch', '8'], 'reg-batch'),
             (['--reg', '--reg-halves', '--reg-batch', '8'], 'reg-batch'),
             (['--reg', '--reg-batch', '100000'], 'reg-batch'),
             (['--reg', '--reg-L', '0'], 'reg-L'),
             (['--batch-size', '0'], 'batch-size'),
             (['--resume', '--init-from', 'x'], 'init-from')]
    for args, word in cases:
        with pytest.raises(SystemExit) as e:
            train.main(FAST + ['--out-dir', str(tmp_path / 'x')] + args)
        assert word in one_line_error(e), args
    assert not os.path.exists(tmp_path / 'x')


def test_resume_without_checkpoint(tmp_path):
    with pytest.raises(SystemExit) as e:
        run(tmp_path, '--resume')
    assert 'resume' in one_line_error(e)
    assert not os.path.exists(tmp_path / 'ckpt.pt')


def test_existing_run_is_not_overwritten(trained):
    before = {f: open(os.path.join(trained, f), 'rb').read() for f in ('ckpt.pt', 'config.json', 'log.jsonl')}
    with pytest.raises(SystemExit) as e:
        run(trained, '--max-steps', 5, '--seed', 3)
    assert '--resume' in one_line_error(e)
    for f, content in before.items():
        assert open(os.path.join(trained, f), 'rb').read() == content, f


def test_batch_not_divisible_by_ranks(tmp_path, monkeypatch):
    # pretend to be rank 0 of 2 without a process group: the check comes right after the init
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setattr(R.dist, 'init_process_group', lambda *a, **k: None)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, '--batch-size', 63, '--device', 'cpu')
    assert '63' in one_line_error(e)


def test_load_checkpoint_missing(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        R.load_checkpoint(str(tmp_path / 'nope.pt'))
    assert '\n' not in str(e.value) and 'nope.pt' in str(e.value)
    with pytest.raises(FileNotFoundError):
        R.load_checkpoint(str(tmp_path))        # a folder without ckpt.pt


def _garbage(kind, path):
    if kind == 'bytes':
        path.write_bytes(b'garbage bytes, not a checkpoint')
    elif kind == 'text':
        path.write_bytes(b'this is not a checkpoint\x00\x01\x02' * 10)
    elif kind == 'empty':
        path.write_bytes(b'')
    elif kind == 'pickle':      # a pickle that the weights-only loader refuses
        path.write_bytes(pickle.dumps(collections.Counter(a=1)))
    elif kind == 'other_pt':    # a torch file of something else
        torch.save({'a': 1}, path)
    else:                       # right layout, wrong weights
        torch.save(dict(config=dict(R.CONFIG, model='mlp'), data_shape=[2], ema={'x': torch.zeros(1)},
                        model={}), path)


@pytest.mark.parametrize('kind', ['bytes', 'text', 'empty', 'pickle', 'other_pt', 'wrong_weights'])
def test_load_checkpoint_unreadable_one_line(tmp_path, kind):
    bad = tmp_path / 'ckpt.pt'
    _garbage(kind, bad)
    with pytest.raises(ValueError) as e:
        R.load_checkpoint(str(bad))
    msg = str(e.value)
    assert 'ckpt.pt' in msg
    assert '\n' not in msg, f'multi-line error message: {msg!r}'


# ---- checkpoint contents ------------------------------------------------------------------------

def test_checkpoint_contents(trained):
    ck = load_ck(trained)
    assert set(ck) == {'model', 'ema', 'opt', 'step', 'config', 'data_shape'}
    assert ck['step'] == 20 and list(ck['data_shape']) == [2]
    with open(os.path.join(trained, 'config.json')) as f:
        assert ck['config'] == json.load(f)
    assert ck['config']['T'] == 100 and ck['config']['out_dir'] == str(trained)
    assert ck['model'].keys() == ck['ema'].keys()
    assert any(not torch.equal(ck['model'][k], ck['ema'][k]) for k in ck['model'])
    assert not any(f.endswith('.tmp') for f in os.listdir(trained))
    assert os.path.isfile(os.path.join(trained, 'samples_0000020.png'))
    assert [r['step'] for r in read_log(trained)] == [5, 10, 15, 20]
    model, diff, cfg = R.load_checkpoint(str(trained))
    assert diff.T == 100 and not model.training
    assert all(torch.equal(v, ck['ema'][k]) for k, v in model.state_dict().items())
    raw = R.load_checkpoint(str(trained / 'ckpt.pt'), ema=False)[0]
    assert all(torch.equal(v, ck['model'][k]) for k, v in raw.state_dict().items())


# ---- recursive retraining data mix ---------------------------------------------------------------

def test_synthetic_mix_fraction(tmp_path):
    npz = str(tmp_path / 'syn.npz')
    syn = np.stack([100.0 + np.arange(600), np.full(600, 7.0)], 1).astype(np.float32)
    np.savez(npz, samples=syn)
    real = D.load_data('8gaussians', toy_n=1000, seed=0)
    for frac, n_fresh in ((0.5, 500), (0.9, 900)):
        cfg, _ = R.parse_config(['--toy-n', '1000', '--synthetic', npz, '--fresh-frac', str(frac)])
        x = trainstep.training_set(cfg)
        assert x.shape == (1000, 2) and x.dtype == torch.float32
        is_syn = x[:, 0] >= 100
        assert int(is_syn.sum()) == 1000 - n_fresh
        assert torch.equal(x[is_syn], torch.from_numpy(syn[:1000 - n_fresh]))
        fresh = x[~is_syn]
        # fresh rows are distinct rows of the real set
        match = (fresh[:, None] == real[None]).all(-1)
        assert (match.sum(1) == 1).all() and (match.sum(0) <= 1).all()
    cfg, _ = R.parse_config(['--toy-n', '1000'])
    assert torch.equal(trainstep.training_set(cfg), real)
    np.savez(npz, samples=np.zeros((5, 3), np.float32))   # alpha = 1: the file is not even read
    cfg, _ = R.parse_config(['--toy-n', '1000', '--synthetic', npz, '--fresh-frac', '1'])
    x = trainstep.training_set(cfg)
    assert x.shape == (1000, 2) and torch.equal(x.sort(0).values, real.sort(0).values)
    np.savez(npz, samples=syn[:100])
    cfg, _ = R.parse_config(['--toy-n', '1000', '--synthetic', npz, '--fresh-frac', '0.5'])
    with pytest.raises(SystemExit) as e:
        trainstep.training_set(cfg)
    one_line_error(e)


def test_synthetic_from_checkpoint(trained):
    cfg, _ = R.parse_config(['--toy-n', '200', '--synthetic', str(trained / 'ckpt.pt'),
                                 '--fresh-frac', '0.75'])
    x = trainstep.training_set(cfg)
    real = D.load_data('8gaussians', toy_n=200, seed=0)
    in_real = (x[:, None] == real[None]).all(-1).any(1)
    assert x.shape == (200, 2) and int(in_real.sum()) == 150 and not in_real[150:].any()


# ---- sample.py ----------------------------------------------------------------------------------

def test_sample_py_toy(trained, tmp_path):
    f, png = str(tmp_path / 's.npz'), str(tmp_path / 's.png')
    sample.main(['--ckpt', str(trained), '--n', '10', '--npz', f, '--grid', png, '--device', 'cpu'])
    s = np.load(f)['samples']
    assert s.shape == (10, 2) and s.dtype == np.float32 and np.isfinite(s).all()
    with open(png, 'rb') as fh:
        assert fh.read(8) == b'\x89PNG\r\n\x1a\n'
    assert not any('.tmp' in n for n in os.listdir(tmp_path))
    f2 = str(tmp_path / 's2.npz')
    sample.main(['--ckpt', str(trained), '--n', '10', '--npz', f2, '--device', 'cpu'])
    assert np.array_equal(np.load(f2)['samples'], s)     # same seed, same samples
    with pytest.raises(SystemExit):
        sample.main(['--ckpt', str(trained), '--n', '10'])


# ---- alternative losses and the regulariser -----------------------------------------------------

@pytest.mark.parametrize('args', [['--loss', 'ip'], ['--loss', 'sa'], ['--loss', 'sa', '--sa-k', '3'],
                                  ['--reg', '--reg-L', '3'],
                                  ['--reg', '--reg-grad', 'last', '--reg-stat', 'mmd2', '--no-warm-start',
                                   '--reg-weight', 'uniform']],
                         ids=['ip', 'sa', 'sa3', 'reg', 'reg-variant'])
def test_loss_variants_run(tmp_path, args):
    run(tmp_path, '--max-steps', 4, '--log-every', 1, '--batch-size', 32, *args)
    log = read_log(tmp_path)
    assert [r['step'] for r in log] == [1, 2, 3, 4]
    cfg = load_ck(tmp_path)['config']
    for r in log:
        assert {'loss', 'loss_nll', 'grad_norm', 'lr'} <= r.keys()
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float))
        if cfg['reg']:
            assert {'loss_reg', 'r', 'k', 'w'} <= r.keys()
            assert 0 <= r['r'] < 100 and 1 <= r['k'] <= cfg['reg_L']
            rho = 3 / 100   # the default 3 / T keeps w_0 / w_{T-1} = e^3 at T = 100
            assert cfg['reg_rho'] == rho
            want_w = 1.0 if cfg['reg_weight'] == 'uniform' else \
                math.exp(rho * (100 - r['r'])) / np.mean(np.exp(rho * (100 - np.arange(100))))
            assert r['w'] == pytest.approx(want_w, rel=1e-9)
            # Eq. (14): loss = lambda_nll * L_nll + lambda_reg * w_r * L_reg (0.8 / 0.2)
            assert r['loss'] == pytest.approx(0.8 * r['loss_nll'] + 0.2 * r['w'] * r['loss_reg'], rel=1e-5)
        else:
            assert 'loss_reg' not in r
            assert r['loss'] == pytest.approx(r['loss_nll'], rel=1e-6)
    assert cfg['loss'] == ('eps' if cfg['reg'] else args[1])


# ---- fine-tuning from trained weights (--init-from) ----------------------------------------------
def test_init_from_starts_model_and_ema_from_the_source_ema(trained, tmp_path):
    """With lr 0 one step changes nothing: model and EMA must both equal the source's EMA weights."""
    run(tmp_path, '--init-from', trained, '--reg', '--max-steps', 1, '--lr', 0, '--warmup', 1)
    src, ck = load_ck(trained), load_ck(tmp_path)
    assert equal_state(ck['model'], src['ema']) and equal_state(ck['ema'], src['ema'])
    assert not equal_state(src['model'], src['ema'])   # so the check above can tell them apart
    assert ck['step'] == 1 and ck['config']['init_from'] == str(trained)


def test_init_from_mismatched_network_is_one_line_error(trained, tmp_path):
    with pytest.raises(SystemExit) as e:
        run(tmp_path, '--init-from', trained, '--dataset', 'gmm10d', '--max-steps', 1)
    assert 'matching --model' in one_line_error(e)


# ---- Algorithm 1's second batch ------------------------------------------------------------------
def test_reg_second_batch_is_independent_and_sliced_per_rank():
    cfg, _ = R.parse_config(FAST + ['--reg', '--batch-size', '8', '--reg-batch', '12'])
    data = trainstep.training_set(cfg)
    x0 = trainstep.local_batch(data, cfg, 5, 0, 1, 'cpu')
    xr = trainstep.local_batch(data, cfg, 5, 0, 1, 'cpu', 'reg')
    assert x0.shape[0] == 8 and xr.shape[0] == trainstep.reg_batch_size(cfg) == 12
    # drawn from its own stream: not the training batch, not its first rows, and another per step
    rows = {tuple(r.tolist()) for r in x0}
    assert sum(tuple(r.tolist()) in rows for r in xr) < 4
    assert not torch.equal(xr, trainstep.local_batch(data, cfg, 6, 0, 1, 'cpu', 'reg'))
    assert torch.equal(xr, trainstep.local_batch(data, cfg, 5, 0, 1, 'cpu', 'reg'))
    # two ranks hold the two halves of the one-process second batch
    parts = [trainstep.local_batch(data, cfg, 5, r, 2, 'cpu', 'reg') for r in (0, 1)]
    assert torch.equal(torch.cat(parts), xr)
    # the default size is --batch-size; --reg-halves has no second batch
    assert trainstep.reg_batch_size({**cfg, 'reg_batch': None}) == 8
    assert trainstep.reg_batch_size({**cfg, 'reg_halves': True}) == 0


def test_reg_uses_the_second_batch_unless_halves():
    cfg, _ = R.parse_config(FAST + ['--reg', '--batch-size', '8', '--reg-L', '2'])
    data = trainstep.training_set(cfg)
    diff = R.make_diffusion(cfg, 'cpu')
    torch.manual_seed(0)
    model = build_model('mlp', (2,))
    x0 = trainstep.local_batch(data, cfg, 3, 0, 1, 'cpu')
    xr = trainstep.local_batch(data, cfg, 3, 0, 1, 'cpu', 'reg')
    with pytest.raises(ValueError, match='second batch'):
        trainstep.compute_loss(model, diff, x0, cfg, 3)
    a = trainstep.compute_loss(model, diff, x0, cfg, 3, x_reg=xr)[1]['loss_reg']
    b = trainstep.compute_loss(model, diff, x0, cfg, 3, x_reg=xr.flip(0) * 0 + xr[:1])[1]['loss_reg']
    assert a != b   # the comparison set is x_reg: changing it changes the regulariser
    h = trainstep.compute_loss(model, diff, x0, {**cfg, 'reg_halves': True}, 3)[1]['loss_reg']
    assert math.isfinite(h) and h != a


def test_checkpoint_without_reg_halves_resumes_as_halves(tmp_path):
    run(tmp_path, '--reg', '--reg-L', '2', '--batch-size', '8', '--max-steps', '2')
    path = tmp_path / 'ckpt.pt'
    ck = torch.load(path, weights_only=True)
    for key in ('reg_halves', 'reg_batch'):   # as written before the second batch existed
        ck['config'].pop(key)
    torch.save(ck, path)
    assert R.load_checkpoint(str(tmp_path))[2]['reg_halves'] is True
    run(tmp_path, '--resume', '--max-steps', '3')
    assert load_ck(tmp_path)['config']['reg_halves'] is True


def test_dtype_auto_is_resolved_saved_and_kept_on_resume(tmp_path):
    """--dtype auto (the default) is saved as what ran; a resumed run keeps it, --dtype changes it."""
    from model import resolve_dtype
    run(tmp_path, '--max-steps', 2, '--log-every', 1, '--dtype', 'auto')
    ck = load_ck(tmp_path)
    assert ck['config']['dtype'] == resolve_dtype('auto', 'cpu') != 'auto'
    run(tmp_path, '--max-steps', 3, '--log-every', 1, '--resume', '--dtype', 'fp32')
    assert load_ck(tmp_path)['config']['dtype'] == 'fp32'
    run(tmp_path, '--max-steps', 4, '--log-every', 1, '--resume')
    assert load_ck(tmp_path)['config']['dtype'] == 'fp32'


def test_bf16_sampling_refuses_quantised_networks(tmp_path):
    run(tmp_path / 'r', '--max-steps', 2)
    with pytest.raises(SystemExit) as e:
        sample.main(['--ckpt', str(tmp_path / 'r'), '--npz', str(tmp_path / 's.npz'), '--quant', 'w8a8',
                     '--dtype', 'bf16'])
    one_line_error(e)
    assert not (tmp_path / 's.npz').exists()


def test_make_adam_agrees_with_torch_s_foreach_adam():
    """The fused Adam of the training step (where torch has it) takes the steps foreach Adam takes,
    to float rounding, and its state loads into either."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(16, 8), torch.nn.Linear(16, 8)
    b.load_state_dict(a.state_dict())
    w0 = a.weight.detach().clone()
    oa, ob = trainstep.make_adam(a.parameters(), 1e-2), torch.optim.Adam(b.parameters(), lr=1e-2, foreach=True)
    for _ in range(5):
        x = torch.randn(32, 16)
        for net, opt in ((a, oa), (b, ob)):
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()
    assert (a.weight - w0).abs().max() > 1e-2   # five steps of lr 1e-2 moved the weights
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)
    fused = oa.param_groups[0]['fused']
    ob.load_state_dict(oa.state_dict())   # a checkpoint of either restores into the other ...
    oa.load_state_dict(torch.optim.Adam(b.parameters(), lr=1e-2).state_dict())
    assert ob.param_groups[0]['fused'] == fused and not oa.param_groups[0]['fused']   # ... with its own kernel
