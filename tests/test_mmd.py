"""mmd.py: kernels and estimators against a brute-force float64 double loop, the estimators'
statistics, the detached bandwidth, the weights w_r of Eq. (14), the bootstrapped consistency
regulariser (Eq. 14-16, Algorithm 1) and the D_MMD(t) curve (Eq. 8-10)."""
import math

import numpy as np
import pytest
import torch

from diffusion import Diffusion
from mmd import (KERNELS, chunked, consistency_reg, errprop_curve, kernel_matrices,
                 kernel_matrices_many, kth_smallest, mmd, mmd2, reg_weight)
from model import build_model


# ---- brute force reference ---------------------------------------------------------------------

def brute_kernel(kernel, z):
    """Bandwidth and kernel function from the pooled set z (list of float64 vectors), as documented:
    h = median (lower middle, as torch.median) / mean of the off-diagonal squared distances."""
    d2 = [float(np.sum((a - b) ** 2)) for i, a in enumerate(z) for j, b in enumerate(z) if i != j]
    if kernel == 'multigauss':
        h = sum(d2) / len(d2)
    else:
        h = sorted(d2)[(len(d2) - 1) // 2]

    def k(a, b):
        s = float(np.sum((a - b) ** 2))
        if kernel == 'gaussian':
            return math.exp(-s / (2 * h))
        if kernel == 'laplace':
            return math.exp(-math.sqrt(s) / math.sqrt(h))
        if kernel == 'imq':
            return 1 / math.sqrt(1 + s / h)
        return sum(math.exp(-s / (h * 2.0 ** i)) for i in range(-2, 3))
    return k


def brute_mmd2(x, y, kernel, unbiased):
    x, y = [r for r in x.double().flatten(1).numpy()], [r for r in y.double().flatten(1).numpy()]
    k = brute_kernel(kernel, x + y)
    n, m = len(x), len(y)
    sxx = sum(k(a, b) for i, a in enumerate(x) for j, b in enumerate(x) if not (unbiased and i == j))
    syy = sum(k(a, b) for i, a in enumerate(y) for j, b in enumerate(y) if not (unbiased and i == j))
    sxy = sum(k(a, b) for a in x for b in y)
    if unbiased:
        return sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2 * sxy / (n * m)
    return sxx / n ** 2 + syy / m ** 2 - 2 * sxy / (n * m)


@pytest.mark.parametrize('kernel', KERNELS)
def test_estimators_against_brute_force(kernel):
    g = torch.Generator().manual_seed(0)
    for trial in range(3):
        x = torch.randn(7, 3, generator=g)
        y = 0.8 * torch.randn(9, 3, generator=g) + 0.5 * trial
        v, u = brute_mmd2(x, y, kernel, False), brute_mmd2(x, y, kernel, True)
        assert mmd2(x, y, kernel, 'v').item() == pytest.approx(v, rel=1e-4, abs=1e-6)
        assert mmd2(x, y, kernel, 'u').item() == pytest.approx(u, rel=1e-4, abs=1e-6)
        assert mmd(x, y, kernel).item() == pytest.approx(math.sqrt(v), rel=1e-4)
        assert mmd(x, y, kernel, 'u').item() == pytest.approx(math.sqrt(max(u, 1e-12)), rel=1e-4, abs=1e-6)


def test_kernel_matrices_images_flattened_and_errors():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 1, 2, 2, generator=g), torch.randn(5, 1, 2, 2, generator=g)
    kxx, kyy, kxy = kernel_matrices(x, y, 'gaussian')
    assert kxx.shape == (4, 4) and kyy.shape == (5, 5) and kxy.shape == (4, 5)
    assert torch.equal(kxx.diagonal(), torch.ones(4))     # exact zero distance on the diagonal
    assert mmd2(x, y).item() == pytest.approx(brute_mmd2(x, y, 'gaussian', False), rel=1e-4)
    with pytest.raises(ValueError, match='kernel'):
        kernel_matrices(x, y, 'rbf')
    with pytest.raises(ValueError, match='estimator'):
        mmd2(x, y, 'gaussian', 'w')


@pytest.mark.parametrize('kernel', ['gaussian', 'multigauss'])
def test_unbiased_centred_vstat_floor(kernel):
    g = torch.Generator().manual_seed(2)
    u_same, v_same, u_shift = [], [], []
    for _ in range(200):
        x, y = torch.randn(50, 2, generator=g), torch.randn(50, 2, generator=g)
        u_same.append(mmd2(x, y, kernel, 'u').item())
        v_same.append(mmd2(x, y, kernel, 'v').item())
        u_shift.append(mmd2(x, y + 1.0, kernel, 'u').item())
    u_same, v_same, u_shift = map(np.array, (u_same, v_same, u_shift))
    se = u_same.std() / math.sqrt(len(u_same))
    assert abs(u_same.mean()) < 3 * se
    assert (u_same < 0).sum() > 40                  # negative estimates occur: it is not clipped
    assert u_shift.mean() > 10 * u_same.std() and (u_shift > 0).all()
    # the V-statistic keeps the diagonal: a positive floor of order 1/N
    assert (v_same > 0).all()
    assert v_same.mean() > 20 * se
    assert (v_same > u_same).all()


@pytest.mark.parametrize('kernel', KERNELS)
def test_bandwidth_is_detached(kernel):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 2, generator=g).requires_grad_(True)
    y = torch.randn(8, 2, generator=g) + 0.3
    mmd2(x, y, kernel, 'v').backward()
    # the same V-statistic with the bandwidth frozen as a constant
    with torch.no_grad():
        z = torch.cat([x, y]).double()
        off = ~torch.eye(len(z), dtype=torch.bool)
        d2z = ((z[:, None] - z[None]) ** 2).sum(-1)[off]
        h = d2z.mean() if kernel == 'multigauss' else d2z.sort().values[(len(d2z) - 1) // 2]
    x2 = x.detach().double().requires_grad_(True)
    z = torch.cat([x2, y.double()])
    d2 = ((z[:, None] - z[None]) ** 2).sum(-1)
    if kernel == 'gaussian':
        k = torch.exp(-d2 / (2 * h))
    elif kernel == 'laplace':
        d = torch.where(off, d2, torch.ones_like(d2)).sqrt() * off
        k = torch.exp(-d / h.sqrt())
    elif kernel == 'imq':
        k = (1 + d2 / h).rsqrt()
    else:
        k = sum(torch.exp(-d2 / (h * 2.0 ** i)) for i in range(-2, 3))
    n = len(x2)
    (k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()).backward()
    assert x.grad.abs().max() > 1e-4
    assert torch.allclose(x.grad.double(), x2.grad, rtol=1e-3, atol=1e-6)


# ---- the optimised kernel matrices against the plain implementation they replaced ---------------

def plain_kernel_matrices_many(x, y, kernels):
    """mmd.kernel_matrices_many as of commit 2539746: full median, one exp per term, no in-place."""
    x, y = x.flatten(1).float(), y.flatten(1).float()
    z = torch.cat([x, y])
    n, off = len(x), ~torch.eye(len(z), dtype=torch.bool)
    d2 = (z.pow(2).sum(1, keepdim=True) + z.pow(2).sum(1)[None] - 2.0 * z @ z.T).clamp(min=0) * off
    with torch.no_grad():
        h_med = d2[off].median().clamp(min=1e-12)
        h_mean = d2[off].mean().clamp(min=1e-12)
    out = {}
    for kernel in kernels:
        if kernel == 'gaussian':
            k = torch.exp(-d2 / (2 * h_med))
        elif kernel == 'laplace':
            k = torch.exp(-(d2.clamp(min=1e-12).sqrt() * off) / h_med.sqrt())
        elif kernel == 'imq':
            k = (1 + d2 / h_med).rsqrt()
        else:
            k = sum(torch.exp(-d2 / (h_mean * 2.0 ** i)) for i in range(-2, 3))
        out[kernel] = (k[:n, :n], k[n:, n:], k[:n, n:])
    return out


@pytest.mark.parametrize('ties', [False, True])
def test_kernel_matrices_equal_plain_implementation(ties):
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(9, 2, 2, generator=g), torch.randn(11, 2, 2, generator=g) + 0.2
    if ties:   # duplicate points (zero off-diagonal distances), tied distances, repeated rows
        x[3], y[5], y[6] = x[0], x[0], y[2]
        x[4], y[7] = x[1] + 1.0, x[1] - 1.0
    for grad in (False, True):
        xs = [x.clone().requires_grad_(grad) for _ in range(2)]
        new = kernel_matrices_many(xs[0], y, KERNELS)
        ref = plain_kernel_matrices_many(xs[1], y, KERNELS)
        total_new = total_ref = 0
        for kern in KERNELS:
            for a, b in zip(new[kern], ref[kern]):
                assert a.requires_grad == grad
                assert torch.allclose(a, b, rtol=1e-6, atol=1e-6), (kern, grad, (a - b).abs().max())
                if kern != 'multigauss':   # the same ops on the same distances: bit for bit
                    assert torch.equal(a, b), (kern, grad)
            w = torch.linspace(0.5, 1.5, 3)   # any smooth function of all three blocks
            total_new = total_new + sum(wi * blk.sin().sum() for wi, blk in zip(w, new[kern]))
            total_ref = total_ref + sum(wi * blk.sin().sum() for wi, blk in zip(w, ref[kern]))
        if grad:
            total_new.backward()
            total_ref.backward()
            assert torch.isfinite(xs[0].grad).all()
            assert torch.allclose(xs[0].grad, xs[1].grad, rtol=1e-5, atol=1e-6)


def test_kth_smallest_selection_path_equals_kthvalue():
    g = torch.Generator().manual_seed(5)
    v = torch.randn(300_000, generator=g).abs()
    v[::7] = 0.5                       # many ties, some of them at the answer
    for k in (1, 1000, 150_000, 150_001, 299_999, 300_000):
        assert kth_smallest(v, k).item() == v.kthvalue(k).values.item()
    v[::v.numel() // 16384] = 1e3      # the strided subsample sees only these: its bracket misses,
    assert kth_smallest(v, 123_456).item() == v.kthvalue(123_456).values.item()   # the fallback


# ---- w_r of Eq. (14) ----------------------------------------------------------------------------

def test_reg_weight():
    T, rho = 1000, 0.003
    w = np.array([reg_weight(r, T, rho) for r in range(T)])
    assert w.mean() == pytest.approx(1.0, rel=1e-9)
    assert np.all(np.diff(w) < 0)                       # heavier near t = 0
    assert w[0] / w[T - 1] == pytest.approx(math.exp(rho * (T - 1)), rel=1e-9)
    ws = np.array([reg_weight(r, T, rho, norm='sum1') for r in range(T)])
    assert ws.sum() == pytest.approx(1.0, rel=1e-9)
    assert np.allclose(ws * T, w, rtol=1e-9)
    assert reg_weight(17, T, rho, 'uniform', 'mean1') == 1.0
    assert reg_weight(17, T, rho, 'uniform', 'sum1') == pytest.approx(1 / T)
    w10 = [reg_weight(r, 10, 0.5) for r in range(10)]
    assert w10[3] / w10[4] == pytest.approx(math.exp(0.5))


# ---- the consistency regulariser ---------------------------------------------------------------

def tiny_mlp(seed=0):
    torch.manual_seed(seed)
    return build_model('mlp', (2,), hidden=32, depth=2, temb_dim=16)


def seeded_noise(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda shape: torch.randn(shape, generator=g)


def data_pair(seed=0, n=16, m=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g) * 0.5 + 1.0, torch.randn(m, 2, generator=g) * 0.5 + 1.0


def grads(model, **kw):
    model.zero_grad(set_to_none=True)
    diff = Diffusion(1000)
    xa, xb = data_pair()
    loss = consistency_reg(model, diff, xa, xb, noise=seeded_noise(5), **kw)
    loss.backward()
    return loss.detach(), [p.grad.clone() if p.grad is not None else None for p in model.parameters()]


def test_reg_gradients_reach_parameters():
    model = tiny_mlp()
    loss, gs = grads(model, r=10, k=4)
    assert torch.isfinite(loss) and loss.item() > 0
    assert all(g is not None and torch.isfinite(g).all() for g in gs)
    assert sum(g.abs().sum().item() for g in gs) > 0
    assert all(g.abs().sum() > 0 for g in gs)


def test_reg_full_vs_last_gradient():
    model = tiny_mlp()
    l_full, g_full = grads(model, r=10, k=4, grad='full')
    l_last, g_last = grads(model, r=10, k=4, grad='last')
    assert l_full.item() == pytest.approx(l_last.item(), rel=1e-6)   # same forward value
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-7) for a, b in zip(g_full, g_last))
    for r in (0, 10):
        l1, g1 = grads(model, r=r, k=1, grad='full')
        l2, g2 = grads(model, r=r, k=1, grad='last')
        assert torch.equal(l1, l2)
        assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-9) for a, b in zip(g1, g2))
    with pytest.raises(ValueError, match='grad'):
        grads(model, r=10, k=2, grad='none')


def counting(model):
    calls = []

    def net(x, t):
        calls.append((torch.is_grad_enabled(), t[0].item()))
        return model(x, t)
    return net, calls


def test_reg_model_calls_with_grad():
    model, diff = tiny_mlp(), Diffusion(1000)
    xa, xb = data_pair()
    net, calls = counting(model)
    consistency_reg(net, diff, xa, xb, 10, 4, seeded_noise(0), grad='full')
    assert calls == [(True, 13), (True, 12), (True, 11), (True, 10)]   # t = 14..11, index t - 1
    calls.clear()
    consistency_reg(net, diff, xa, xb, 10, 4, seeded_noise(0), grad='last')
    assert calls == [(False, 13), (False, 12), (False, 11), (True, 10)]
    # s = min(r + k, T): at the top end only s - r steps are run
    for r, k, n in ((999, 5, 1), (997, 5, 3), (0, 3, 3), (500, 1, 1)):
        calls.clear()
        consistency_reg(net, diff, xa, xb, r, k, seeded_noise(0))
        assert len(calls) == n, (r, k)
        assert calls[0][1] == min(r + k, 1000) - 1 and calls[-1][1] == r


def reference_reg(model, diff, xa, xb, r, k, noise, warm_start=True, kernel='multigauss'):
    """Eq. (15), (16) and the forward samples of step r, written out independently."""
    s = min(r + k, diff.T)
    x = (diff.sqrt_abar[s] * xa + diff.sqrt_1m_abar[s] * noise(xa.shape)) if warm_start \
        else noise(xa.shape)
    for t in range(s, r, -1):
        eps = model(x, torch.full((len(x),), t - 1, dtype=torch.long))
        x = (x - diff.beta[t] / diff.sqrt_1m_abar[t] * eps) / diff.alpha[t].sqrt()
        if t > 1:
            x = x + diff.sigma[t] * noise(x.shape)
    y = diff.sqrt_abar[r] * xb + diff.sqrt_1m_abar[r] * noise(xb.shape) if r > 0 else xb
    return mmd(x, y, kernel)


def test_reg_value_matches_algorithm():
    model, diff = tiny_mlp(), Diffusion(1000)
    xa, xb = data_pair(1, 10, 14)    # different sizes: noise shapes tell which batch they are for
    with torch.no_grad():
        for r, k, ws in ((7, 3, True), (0, 2, True), (1, 2, True), (998, 5, True), (7, 3, False)):
            got = consistency_reg(model, diff, xa, xb, r, k, seeded_noise(2), warm_start=ws)
            want = reference_reg(model, diff, xa, xb, r, k, seeded_noise(2), warm_start=ws)
            assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7), (r, k, ws)


def test_reg_r0_uses_data_itself():
    model, diff = tiny_mlp(), Diffusion(1000)
    xa, xb = data_pair(1, 10, 14)
    shapes = []

    def noise(shape):
        shapes.append(tuple(shape))
        return torch.randn(shape, generator=g)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        consistency_reg(model, diff, xa, xb, 0, 2, noise)
    assert (14, 2) not in shapes            # no forward noise for x_0: y is x0_b
    # warm start + one z at t = 2 (none at t = 1)
    assert shapes == [(10, 2), (10, 2)]
    shapes.clear()
    with torch.no_grad():
        consistency_reg(model, diff, xa, xb, 3, 2, noise)
    assert shapes == [(10, 2), (10, 2), (10, 2), (14, 2)]


def test_reg_warm_start_and_stat():
    model, diff = tiny_mlp(), Diffusion(1000)
    xa, xb = data_pair()
    with torch.no_grad():
        ws = consistency_reg(model, diff, xa, xb, 300, 3, seeded_noise(4), warm_start=True)
        cold = consistency_reg(model, diff, xa, xb, 300, 3, seeded_noise(4), warm_start=False)
        m = consistency_reg(model, diff, xa, xb, 300, 3, seeded_noise(4), stat='mmd')
        m2 = consistency_reg(model, diff, xa, xb, 300, 3, seeded_noise(4), stat='mmd2')
        mu = consistency_reg(model, diff, xa, xb, 300, 3, seeded_noise(4), estimator='u',
                             kernel='gaussian', stat='mmd2')
    assert not math.isclose(ws.item(), cold.item(), rel_tol=1e-3)
    assert ws.item() == m.item()
    assert m2.item() == pytest.approx(m.item() ** 2, rel=1e-5)
    assert math.isfinite(mu.item())
    with pytest.raises(ValueError, match='stat'):
        consistency_reg(model, diff, xa, xb, 300, 3, seeded_noise(4), stat='kl')


def test_reg_training_lowers_it():
    """Adam steps on the regulariser alone bring the chain's output to the data: the gradient
    through the whole chain points the right way (short, coarse chain from pure noise)."""
    model, diff = tiny_mlp(1), Diffusion(5, beta_1=0.2, beta_T=0.6)
    xa, xb = data_pair(3, 64, 64)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def reg(seed):
        return consistency_reg(model, diff, xa, xb, 0, 5, seeded_noise(seed), warm_start=False)

    def value():
        with torch.no_grad():
            return np.mean([reg(s).item() for s in range(8)])
    before = value()
    for i in range(60):
        opt.zero_grad()
        reg(100 + i).backward()
        opt.step()
    assert value() < 0.5 * before


# ---- D_MMD(t) ----------------------------------------------------------------------------------

def test_errprop_curve_times_keys_and_chunking():
    model, diff = tiny_mlp(), Diffusion(20)
    x0 = data_pair(4, 40, 1)[0]
    kw = dict(n=30, kernels=('gaussian', 'imq'), t_stride=6)
    a = errprop_curve(model, diff, x0, generator=torch.Generator().manual_seed(0), **kw)
    b = errprop_curve(model, diff, x0, generator=torch.Generator().manual_seed(0), batch_size=7, **kw)
    c = errprop_curve(model, diff, x0, generator=torch.Generator().manual_seed(1), **kw)
    assert set(a) == {'t', 'gaussian', 'imq', 'delta', 'std', 'std_q'}
    assert a['t'] == [20, 18, 12, 6, 0]
    assert all(len(a[k]) == 5 for k in ('gaussian', 'imq'))
    assert a['t'] == b['t']
    for k in ('gaussian', 'imq'):
        assert np.allclose(a[k], b[k], rtol=1e-4, atol=1e-6)
        assert not np.allclose(a[k], c[k])
        assert all(math.isfinite(v) for v in a[k])
    # every step reported with stride 1; an untrained model drifts away from the data at t = 0
    full = errprop_curve(model, diff, x0, n=30, kernels=('gaussian',), estimator='v',
                         generator=torch.Generator().manual_seed(0))
    assert full['t'] == list(range(20, -1, -1))
    assert all(v > 0 for v in full['gaussian'])      # V-statistic: positive
    assert full['gaussian'][-1] > full['gaussian'][0]


def test_errprop_curve_signed_unbiased_and_exact_value():
    """The value at t = T is the unbiased MMD between the starting noise and q(x_T) samples; a
    negative MMD^2 is reported as -sqrt(|MMD^2|)."""
    diff = Diffusion(5)
    x0 = torch.zeros(40, 2)
    zero = lambda x, t: torch.zeros_like(x)   # noqa: E731
    g = torch.Generator().manual_seed(3)
    out = errprop_curve(zero, diff, x0, n=40, kernels=('gaussian',), generator=g)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 2, generator=g)
    y = diff.q_sample(x0, 5, torch.randn(40, 2, generator=g))
    v = mmd2(x, y, 'gaussian', 'u').item()
    assert out['gaussian'][0] == pytest.approx(math.copysign(math.sqrt(abs(v)), v), rel=1e-5)


def test_errprop_curve_flat_for_exact_model():
    """With the exact eps of N(0, I) data the backward marginals equal the forward ones: the
    unbiased curve stays near 0 and shows negative values (reported signed, not clipped), while
    a wrong model drifts far away."""
    diff = Diffusion(50, beta_T=0.2)     # abar_T about 5e-3 with only 50 steps
    x0 = torch.randn(200, 2, generator=torch.Generator().manual_seed(5))

    def exact(x, t):   # E[eps | x_t] for x_0 ~ N(0, I): sqrt(1 - abar_t) x_t
        return diff.sqrt_1m_abar[t + 1][:, None] * x

    def wrong(x, t):
        return exact(x, t) + 0.3
    kw = dict(n=200, kernels=('gaussian',), t_stride=5)
    good = errprop_curve(exact, diff, x0, generator=torch.Generator().manual_seed(6), **kw)['gaussian']
    bad = errprop_curve(wrong, diff, x0, generator=torch.Generator().manual_seed(6), **kw)['gaussian']
    assert min(good) < 0 and max(abs(v) for v in good) < 0.1
    assert bad[-1] > 3 * max(abs(v) for v in good)


def test_chunked_wrapper():
    model = tiny_mlp()
    x, t = torch.randn(23, 2), torch.randint(0, 1000, (23,))
    sizes = []

    def net(xc, tc):
        sizes.append(len(xc))
        return model(xc, tc)
    with torch.no_grad():
        assert torch.allclose(chunked(net, 10)(x, t), model(x, t), atol=1e-6)
    assert sizes == [10, 10, 3]
