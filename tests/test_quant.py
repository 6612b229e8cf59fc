import math

import pytest
import torch

import quant
from data import sample_toy
from diffusion import Diffusion
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
        r = quant.quanterr(m, diff, x0, 'w4a8', calib, n=256, seed=seed)
        print(seed, r['err_q'][-1], r['err_qc'][-1], r['mmd0'])
        end.append(r['err_qc'][-1] / r['err_q'][-1])
        whole.append(sum(r['err_qc']) / sum(r['err_q']))
    assert sum(end) / 2 < 0.85 and sum(whole) / 2 < 0.75   # measured about 0.63 and 0.47
    # the bias-only fit (same sums) helps too, less
    calib['correction'] = quant.fit_correction(calib['stats'], 'bias')
    assert calib['correction'].shape == (diff.T, 2)
    r = quant.quanterr(m, diff, x0, 'w4a8', calib, n=256, seed=0)
    assert sum(r['err_qc']) < sum(r['err_q'])


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
    r1 = quant.quanterr(m, diff, x0, 'w8a8', calib, n=64, seed=3, kernels=('gaussian', 'imq'))
    r2 = quant.quanterr(m, diff, x0, 'w8a8', calib, n=64, seed=3, kernels=('gaussian', 'imq'))
    assert r1 == r2
    assert r1['t'] == list(range(diff.T, -1, -1))
    assert len(r1['err_q']) == len(r1['err_qc']) == diff.T + 1 and r1['err_q'][0] == 0
    vals = r1['err_q'] + r1['err_qc'] + list(r1['mmd0'].values())
    assert all(math.isfinite(v) for v in vals) and set(r1['mmd0_kernels']) == {'gaussian', 'imq'}
    # the FP chain of quanterr is the ordinary sampler's chain (same x_T, same noise)
    g = torch.Generator().manual_seed(3)
    fp = diff.sample(m, (64, 2), generator=g)
    r_fp = quant.quanterr(m, diff, x0, 'w8a8', calib, n=64, seed=3)['mmd0']['fp']
    v = quant.mmd2(fp, x0, 'gaussian', 'u').item()
    assert r_fp == pytest.approx(math.copysign(math.sqrt(abs(v)), v), rel=1e-5)
    quant.plot_quanterr({'w8a8': r1}, str(tmp_path / 'q.png'))
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
            '--out', out, '--device', 'cpu']
    evaluate.main(argv)
    log = capsys.readouterr().out
    assert 'calibrating w4a8' in log and 'w4a8: traj RMS at t=0 Q=' in log
    assert (run / 'quant_w8a8.pt').is_file() and (tmp_path / 'qe.png').is_file()
    res = json.load(open(out + '.json'))['results']
    assert set(res) == {'w8a8', 'w4a8'} and len(res['w8a8']['t']) == 21
    evaluate.main(argv + ['--fit', 'bias'])   # stored: refitted, not recalibrated
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
    r = quant.quanterr(m, diff, torch.rand(4, 3, 8, 8) * 2 - 1, 'w4a8', calib, n=4, seed=0, batch_size=2)
    assert r['t'] == [5, 4, 3, 2, 1, 0] and all(math.isfinite(v) for v in r['err_q'] + r['err_qc'])
