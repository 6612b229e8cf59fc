import math

import pytest
import torch

from neighbours import quant
from neighbours import quanterr
from data import sample_toy
from diffusion import Diffusion
from mmd import mmd2
from model import build_model


def test_fake_quant_error_bound_and_properties():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 8, 3, 3, generator=g) * torch.linspace(0.01, 3, 16).view(-1, 1, 1, 1)
    for dim in (None, 0):
        mse = {}
        for bits in (8, 4):
            q = quant.fake_quant(w, bits, dim)
            amax = w.abs().amax(dim=(1, 2, 3), keepdim=True) if dim == 0 else w.abs().max()
            step = amax / (2 ** (bits - 1) - 1)
            assert ((q - w).abs() <= step / 2 + 1e-6).all()            # within half a step
            assert torch.allclose(quant.fake_quant(q, bits, dim), q, atol=1e-6)   # idempotent
            assert len(torch.unique(q[0] if dim == 0 else q)) <= 2 ** bits - 1
            mse[bits] = (q - w).pow(2).mean().item()
        assert 0 < mse[8] < mse[4]
    for dim in (None, 0):   # zero tensors (or zero channels) stay zero, no NaN
        z = torch.zeros(4, 5)
        assert torch.equal(quant.fake_quant(z, 4, dim), z)
    # a calibrated range clips what lies beyond it
    x = torch.tensor([-3.0, 0.5, 3.0])
    assert torch.allclose(quant.fake_quant(x, 8, amax=torch.tensor(1.0)), torch.tensor([-1.0, 0.5, 1.0]), atol=5e-3)
    with pytest.raises(ValueError):
        quant.parse_spec('int8')


@pytest.mark.parametrize('name,shape', [('mlp', (2,)), ('tiny', (3, 16, 16))])
def test_quantize_model_small_then_larger_change(name, shape):
    torch.manual_seed(0)
    m = build_model(name, shape).eval()
    xs = [torch.randn(8, *shape) for _ in range(3)]
    t = torch.tensor([0, 3, 10, 50, 100, 300, 600, 999])

    def calib_fn(q):
        for x in xs:
            q(x, t)
    with torch.no_grad():
        ref = m(xs[0], t)
        err = {s: (quant.quantize_model(m, s, calib_fn)(xs[0], t) - ref).pow(2).mean().sqrt().item()
               for s in ('w8a8', 'w4a8')}
        assert torch.equal(m(xs[0], t), ref)          # the original model is untouched
    rel = {s: e / ref.pow(2).mean().sqrt().item() for s, e in err.items()}
    print(name, rel)
    assert 0 < rel['w8a8'] < 0.1   # measured 0.8 % (MLP), 5.8 % (untrained tiny U-Net)
    assert rel['w8a8'] * 3 < rel['w4a8'] < 1.0


@pytest.fixture(scope='module')
def toy():
    """A small MLP DDPM (T = 100) on 8gaussians, a few hundred Adam steps: enough for structured chains."""
    torch.manual_seed(0)
    diff = Diffusion(T=100, beta_T=0.2)
    m = build_model('mlp', (2,), hidden=128, depth=3)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        x0 = sample_toy('8gaussians', 256, g)
        t = torch.randint(1, diff.T + 1, (256,), generator=g)
        loss = diff.loss_eps(m, x0, t, torch.randn(x0.shape, generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval().requires_grad_(False), diff


def test_compensation_lowers_trajectory_error(toy):
    m, diff = toy
    x0 = sample_toy('8gaussians', 256, torch.Generator().manual_seed(1))
    calib = quant.calibrate(m, diff, (2,), 'w4a8', n_traj=4, batch=64, seed=0)   # fit='affine'
    assert calib['correction'].shape == (diff.T, 2, 2) and calib['stats'].shape == (diff.T, 2, 5)
    end, whole = [], []
    for seed in (0, 1):   # chains are chaotic (a sample can switch modes): average two seeds
        r = quanterr.quanterr(m, diff, x0, 'w4a8', calib, n=256, seed=seed, comps=('affine', 'bias'))
        e = r['err']
        print(seed, {k: v[-1] for k, v in e.items()}, r['mmd0'])
        end.append(e['affine'][-1] / e['none'][-1])
        whole.append(sum(e['affine']) / sum(e['none']))
        assert sum(e['bias']) < sum(e['none'])   # the bias-only fit (same sums) helps too, less
    assert sum(end) / 2 < 0.85 and sum(whole) / 2 < 0.75   # measured about 0.63 and 0.47
    assert quant.fit_correction(calib['stats'], 'bias').shape == (diff.T, 2)


def test_calibration_round_trip_and_zero_correction(toy, tmp_path):
    m, diff = toy
    calib = quant.calibrate(m, diff, (2,), 'w8a8', n_traj=1, batch=32, seed=0)
    path = str(tmp_path / 'quant_w8a8.pt')
    quant.save_calibration(path, calib)
    loaded = quant.load_calibration(path)
    x, t = torch.randn(16, 2), torch.randint(0, diff.T, (16,))
    for comp in (False, True):
        a, b = quant.build_quantized(m, calib, comp)(x, t), quant.build_quantized(m, loaded, comp)(x, t)
        assert torch.equal(a, b)
    q = quant.build_quantized(m, loaded)
    assert torch.equal(quant.CompensatedModel(q, torch.zeros(diff.T, 2))(x, t), q(x, t))
    identity = torch.stack([torch.ones(diff.T, 2), torch.zeros(diff.T, 2)], -1)   # affine a = 1, b = 0
    assert torch.equal(quant.CompensatedModel(q, identity)(x, t), q(x, t))
    # per-sample t: the correction is gathered per sample
    c = torch.randn(diff.T, 2)
    assert torch.allclose(quant.CompensatedModel(q, c)(x, t), q(x, t) - c[t])
    with pytest.raises(FileNotFoundError):
        quant.load_calibration(str(tmp_path / 'missing.pt'))


def test_quanterr_shapes_and_reproducible(toy, tmp_path):
    m, diff = toy
    x0 = sample_toy('8gaussians', 64, torch.Generator().manual_seed(1))
    calib = quant.calibrate(m, diff, (2,), 'w8a8', n_traj=1, batch=32, seed=0)
    r1 = quanterr.quanterr(m, diff, x0, 'w8a8', calib, n=64, seed=3, kernels=('gaussian', 'imq'))
    r2 = quanterr.quanterr(m, diff, x0, 'w8a8', calib, n=64, seed=3, kernels=('gaussian', 'imq'))
    assert r1 == r2
    assert r1['t'] == list(range(diff.T, -1, -1)) and r1['comps'] == ['none', 'affine']
    assert len(r1['err']['none']) == len(r1['err']['affine']) == diff.T + 1 and r1['err']['none'][0] == 0
    vals = r1['err']['none'] + r1['err']['affine'] + list(r1['mmd0'].values())
    assert all(math.isfinite(v) for v in vals) and set(r1['mmd0_kernels']) == {'gaussian', 'imq'}
    # the FP chain of quanterr is the ordinary sampler's chain (same x_T, same noise)
    g = torch.Generator().manual_seed(3)
    fp = diff.sample(m, (64, 2), generator=g)
    r_fp = quanterr.quanterr(m, diff, x0, 'w8a8', calib, n=64, seed=3)['mmd0']['fp']
    v = mmd2(fp, x0, 'gaussian', 'u').item()
    assert r_fp == pytest.approx(math.copysign(math.sqrt(abs(v)), v), rel=1e-5)
    quanterr.plot_quanterr({'w8a8': r1}, str(tmp_path / 'q.png'))
    assert (tmp_path / 'q.png').stat().st_size > 0


def test_stored_calibration_reuse_and_cli(tmp_path, capsys):
    """End to end on a small untrained MLP checkpoint: `evaluate.py quanterr`, files, reuse of
    quant_<spec>.pt, and quant.for_sampling (what sample.py / evaluate.py --quant use)."""
    import json

    import evaluate
    import runtime as R
    torch.manual_seed(0)
    m = build_model('mlp', (2,))
    cfg = dict(R.CONFIG, **R.PRESETS['8gaussians'], T=20, beta_1=1e-4, beta_T=0.3, reg_rho=0.003)
    run = tmp_path / 'run'
    run.mkdir()
    R.save_checkpoint(str(run / 'ckpt.pt'), model=m.state_dict(), ema=m.state_dict(), config=cfg,
                      data_shape=[2], step=0)
    out = str(tmp_path / 'qe')
    argv = ['quanterr', '--ckpt', str(run), '--quant', 'w8a8', 'w4a8', '--n', '64', '--calib-traj', '1',
            '--out', out, '--device', 'cpu', '--overhead-reps', '0']
    evaluate.main(argv)
    log = capsys.readouterr().out
    assert 'calibrating w4a8' in log and 'w4a8            none: RMS(t=0)' in log
    assert (run / 'quant_w8a8.pt').is_file() and (tmp_path / 'qe.png').is_file()
    res = json.load(open(out + '.json'))['results']
    assert set(res) == {'w8a8', 'w4a8'} and len(res['w8a8']['t']) == 21
    assert res['w8a8']['comps'] == ['none', 'bias', 'affine', 'cumulative_m1']
    evaluate.main(argv + ['--comp', 'bias'])   # stored: refitted, not recalibrated
    assert 'calibrating' not in capsys.readouterr().out
    model, diff, _ = R.load_checkpoint(str(run))
    assert quant.for_sampling(model, diff, (2,), str(run)) is model
    qc = quant.for_sampling(model, diff, (2,), str(run), 'w4a8', compensate=True)
    assert isinstance(qc, quant.CompensatedModel) and 'calibrating' not in capsys.readouterr().out
    with pytest.raises(ValueError, match='--quant'):
        quant.for_sampling(model, diff, (2,), str(run), 'none', compensate=True)
    with torch.no_grad():   # other weights in the same folder: the stored calibration is not reused
        model.out.bias.add_(1.0)
    quant.for_sampling(model, diff, (2,), str(run), 'w4a8', n_traj=1)
    assert 'recalibrating' in capsys.readouterr().out


def test_image_model_per_channel_correction():
    torch.manual_seed(0)
    m = build_model('tiny', (3, 8, 8)).eval()
    diff = Diffusion(T=5, beta_T=0.3)
    calib = quant.calibrate(m, diff, (3, 8, 8), 'w4a8', n_traj=1, batch=2, seed=0)
    assert calib['correction'].shape == (5, 3, 2) and calib['n_traj'] == 1
    assert len(calib['act_scales']) == sum(isinstance(x, (torch.nn.Conv2d, torch.nn.Linear)) for x in m.modules())
    r = quanterr.quanterr(m, diff, torch.rand(4, 3, 8, 8) * 2 - 1, 'w4a8', calib, n=4, seed=0, batch_size=2,
                       comps=('affine', 'cumulative'), windows=(1, 'S'), sampler='ddim', steps=3,
                       overhead_reps=2)
    assert r['t'] == [5, 3, 2, 0] and r['comps'] == ['none', 'affine', 'cumulative_m1', 'cumulative_m3']
    assert all(math.isfinite(v) for e in r['err'].values() for v in e)
    assert set(r['psnr']) == set(r['comps']) and all(math.isfinite(v) and v > 0 for v in r['psnr'].values())
    assert set(r['overhead']) == set(r['comps'][1:]) and all(math.isfinite(v) for v in r['overhead'].values())
    assert all(v >= 0 for v in r['med0'].values())


# ---- w4a4: group-wise weights ----------------------------------------------------------------------
def test_group_quant_error_bounds():
    g = torch.Generator().manual_seed(0)
    # magnitudes that vary along the input dimension: groups see smaller ranges than whole rows
    w = torch.randn(6, 150, generator=g) * torch.linspace(0.01, 2, 150)
    q = quant.fake_quant_groups(w, 4, 64)
    for lo in range(0, 150, 64):   # groups 0-63, 64-127, 128-149 (the last one shorter)
        blk, qb = w[:, lo:lo + 64], q[:, lo:lo + 64]
        step = blk.abs().amax(1, keepdim=True) / 7
        assert ((qb - blk).abs() <= step / 2 + 1e-6).all()
        assert all(len(torch.unique(r)) <= 15 for r in qb)
    assert (q - w).pow(2).mean() < (quant.fake_quant(w, 4, dim=0) - w).pow(2).mean()
    assert torch.allclose(quant.fake_quant_groups(q, 4, 64), q, atol=1e-6)          # idempotent
    conv = torch.randn(8, 16, 3, 3, generator=g)   # input dimension 16 * 9 = 144: grouped over it
    flat = quant.fake_quant_groups(conv.reshape(8, -1), 4, 64).reshape(conv.shape)
    assert torch.equal(quant.fake_quant_groups(conv, 4, 64), flat)
    small = torch.randn(5, 40, generator=g)         # input dimension < 64: per output channel
    assert torch.equal(quant.fake_quant_groups(small, 4, 64), quant.fake_quant(small, 4, dim=0))
    assert torch.equal(quant.fake_quant_groups(torch.zeros(3, 128), 4, 64), torch.zeros(3, 128))
    assert quant.weight_group('w4a4') == 64 and quant.weight_group('w4a8') is None
    assert quant.weight_group('w8a8g32') == 32 and quant.parse_spec('w4a4') == (4, 4)


def test_w4a4_model_error_above_w4a8():
    torch.manual_seed(0)
    m = build_model('tiny', (3, 8, 8)).eval()
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([0, 10, 100, 900])
    with torch.no_grad():
        ref = m(x, t)
        err = {s: (quant.quantize_model(m, s, lambda q: q(x, t))(x, t) - ref).pow(2).mean().sqrt().item()
               for s in ('w4a8', 'w4a4')}
    assert err['w4a8'] < err['w4a4'] < ref.pow(2).mean().sqrt().item() * 2


# ---- the error model and the cumulative compensation on a network with known error -----------------
class LinearEps(torch.nn.Module):
    """eps(x, t) = W[t] (.) x + c[t] per channel: J = diag(W[t]); with scale, a 'quantised' copy
    eps / (1 - K[t]) whose output error at every input is exactly delta = K[t] (.) eps_q."""

    def __init__(self, W, c, K=None):
        super().__init__()
        self.W, self.c, self.K = W, c, K

    def forward(self, x, t):
        e = self.W[t] * x + self.c[t]
        return e if self.K is None else e / (1 - self.K[t])


def _chains(diff, nets, x, chain):
    """Each net's trajectory (states at every visited t) from the same x_T and noise."""
    out = []
    for net in nets:
        traj = []
        diff.sample_chain(net, x.clone(), noise=torch.Generator().manual_seed(1),
                          callback=lambda t, xt: traj.append(xt.clone()), **chain)
        out.append(torch.stack(traj))
    return out


def _known(jac, T=100, C=3):
    g = torch.Generator().manual_seed(0)
    W = (torch.rand(T, C, generator=g) - 0.5) * jac
    c = torch.randn(T, C, generator=g)
    K = (torch.rand(T, C, generator=g) - 0.5) * 0.4   # |K| <= 0.2
    return LinearEps(W, c), LinearEps(W, c, K), K


def test_scale_fit_recovers_K():
    fp, q, K = _known(0.6)
    x, t = torch.randn(50, 3), torch.full((50,), 7)
    sums = torch.zeros(100, 3, 5, dtype=torch.float64)
    sums[7] = quant._channel_sums(q(x, t), fp(x, t))
    k = quant.fit_correction(sums, 'scale')
    assert torch.allclose(k[7], K[7], atol=1e-5) and torch.equal(k[8], torch.zeros(3))
    a = quant.fit_correction(sums, 'affine')   # the affine fit holds the same model: a = 1 - K, b = 0
    assert torch.allclose(a[7, :, 0], 1 - K[7], atol=1e-4) and a[7, :, 1].abs().max() < 1e-4


@pytest.mark.parametrize('chain', [dict(sampler='ddim', steps=10), dict(sampler='ddpm', steps=10)])
def test_cumulative_window_removes_closed_form_terms(chain):
    """J = 0: the quantised chain's error is the closed form sum_s (prod a) b_s K_s eps_q,s; window m
    removes exactly its last m terms at every step (m = S: all of it, the FP chain)."""
    diff = Diffusion(T=100, beta_T=0.05)
    fp, q, K = _known(0.0)
    coef = quant.chain_coefficients(diff, **chain)
    S = len(coef)
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(2))
    d = [b * K[t - 1] * q(x, torch.full((16,), t - 1)) for t, _, _, b in coef]   # J = 0: eps_q fixed
    nets = [fp, q] + [quant.CumulativeCompensated(q, K, diff, m, **chain) for m in (1, 2, S)]
    trajs = _chains(diff, nets, x, chain)
    scale = trajs[0].abs().max()
    for i, m in enumerate((0, 1, 2, S)):   # m = 0: the uncompensated chain
        for k in range(S):   # state after step k: the terms j <= k - m remain
            left = sum((math.prod(c[2] for c in coef[j + 1:k + 1]) * d[j] for j in range(k - m + 1)),
                       torch.zeros(16, 3))
            assert (trajs[1 + i][k + 1] - trajs[0][k + 1] - left).abs().max() < 2e-5 * scale, (m, k)
    assert (trajs[-1] - trajs[0]).abs().max() < 2e-5 * scale   # m = S: the FP chain


def test_cumulative_with_jacobian():
    """J != 0 (known): m = S still gives the FP chain (the per-step error is removed before it can
    propagate); m = 1 leaves e_{k+1} = (a_k + b_k J_k) e_k + a_k d_{k-1}."""
    diff = Diffusion(T=100, beta_T=0.05)
    fp, q, K = _known(1.5)
    chain = dict(sampler='ddim', steps=8)
    coef = quant.chain_coefficients(diff, **chain)
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(2))
    f, full, one = _chains(diff, [fp, quant.CumulativeCompensated(q, K, diff, 8, **chain),
                                  quant.CumulativeCompensated(q, K, diff, 1, **chain)], x, chain)
    assert (full - f).abs().max() < 1e-5 * f.abs().max()
    e = torch.zeros(16, 3)
    for k, (t, _, a, b) in enumerate(coef):
        if k >= 1:   # d_{k-1} at the compensated chain's own state
            tp, bp = coef[k - 1][0], coef[k - 1][3]
            e = (a + b * fp.W[t - 1]) * e + a * bp * K[tp - 1] * q(one[k - 1], torch.full((16,), tp - 1))
        assert (one[k + 1] - f[k + 1] - e).abs().max() < 1e-4 * f.abs().max(), k


def test_cumulative_refuses_misuse():
    diff = Diffusion(T=20)
    _, q, K = _known(0.5, T=20)
    with pytest.raises(ValueError, match='window'):
        quant.CumulativeCompensated(q, K, diff, 0, sampler='ddim', steps=5)
    c = quant.CumulativeCompensated(q, K, diff, 1, sampler='ddim', steps=5)
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match='not a step'):
        c(x, torch.full((4,), 18))
    c(x, torch.full((4,), 19))
    with pytest.raises(ValueError, match='out of order'):
        c(x, torch.full((4,), 7))
    with pytest.raises(ValueError, match='unknown compensation'):
        quant.comp_keys(['cumulativ'])
    with pytest.raises(ValueError, match='window'):
        quant.comp_keys(['cumulative'], ['0'], 5)
    assert quant.comp_keys(['bias', 'cumulative'], ['1', 'S', '50'], 20) == \
        ['none', 'bias', 'cumulative_m1', 'cumulative_m20']


def test_quanterr_cli_bad_input_one_line(tmp_path):
    import evaluate
    base = ['quanterr', '--ckpt', str(tmp_path / 'none'), '--out', str(tmp_path / 'q')]
    for extra, msg in ((['--window', '0'], 'window'), (['--window', 'x'], 'window'),
                       (['--comp', 'cumulativ'], 'unknown compensation'), (['--quant', 'w4'], 'spec'),
                       (['--overhead-reps', '-1'], 'overhead')):
        with pytest.raises(SystemExit) as e:
            evaluate.main(base + extra)
        assert str(e.value).startswith('error:') and msg in str(e.value) and '\n' not in str(e.value)
