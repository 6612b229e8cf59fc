"""diffusion.py: schedule, forward process, losses and samplers against closed forms (Sec. 2, Eq. 1,
5, 16), with stub networks whose output is known. Networks are called with the 0-based index t - 1."""
import math

import numpy as np
import pytest
import torch

from diffusion import Diffusion

T = 1000


def np_schedule(T=1000, b1=1e-4, bT=0.02):
    """Independent float64 reference: padded beta, alpha, abar with abar[0] = 1."""
    beta = np.zeros(T + 1)
    beta[1:] = [b1 + (bT - b1) * (t - 1) / (T - 1) for t in range(1, T + 1)]
    abar = np.ones(T + 1)
    for t in range(1, T + 1):
        abar[t] = abar[t - 1] * (1 - beta[t])
    return beta, 1 - beta, abar


def stub(x, t):
    """A fake eps_theta with a known output; t is the 0-based index the network receives."""
    return 0.3 * x + t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype) * 1e-3


# ---- schedule ----------------------------------------------------------------------------------

def test_beta_linear_endpoints_and_middle():
    d = Diffusion(T)
    beta, _, _ = np_schedule()
    assert d.beta[1].item() == pytest.approx(1e-4, rel=1e-6)
    assert d.beta[T].item() == pytest.approx(0.02, rel=1e-6)
    assert d.beta[500].item() == pytest.approx(1e-4 + (0.02 - 1e-4) * 499 / 999, rel=1e-6)
    assert d.beta[0].item() == 0.0
    assert torch.allclose(d.beta.double(), torch.from_numpy(beta), rtol=1e-6, atol=0)
    assert torch.allclose(d.alpha.double(), torch.from_numpy(1 - beta), rtol=1e-7, atol=0)
    assert d.beta.shape == (T + 1,)


def test_abar_against_float64_product():
    d = Diffusion(T)
    _, _, abar = np_schedule()
    assert d.abar[0].item() == 1.0
    for t in (1, 2, 10, 100, 500, 999, 1000):
        assert d.abar[t].item() == pytest.approx(abar[t], rel=1e-5), t
        assert d.sqrt_abar[t].item() == pytest.approx(math.sqrt(abar[t]), rel=1e-5)
        assert d.sqrt_1m_abar[t].item() == pytest.approx(math.sqrt(1 - abar[t]), rel=1e-5)
    # abar_T for the DDPM schedule is about 4e-5: x_T is almost pure noise
    assert 3e-5 < d.abar[T].item() < 5e-5


def test_sigma_choices():
    beta, _, abar = np_schedule()
    d = Diffusion(T, sigma='beta')
    assert torch.allclose(d.sigma[1:].double(), torch.from_numpy(np.sqrt(beta[1:])), rtol=1e-6)
    dp = Diffusion(T, sigma='posterior')
    for t in (1, 2, 50, 999, 1000):
        want = math.sqrt((1 - abar[t - 1]) / (1 - abar[t]) * beta[t])
        assert dp.sigma[t].item() == pytest.approx(want, rel=1e-5, abs=1e-12), t
    assert dp.sigma[1].item() == 0.0   # beta~_1 = 0 since abar_0 = 1
    with pytest.raises(ValueError, match='sigma'):
        Diffusion(T, sigma='fixedlarge')


def test_custom_schedule_endpoints():
    d = Diffusion(50, beta_1=1e-3, beta_T=0.05)
    beta, _, abar = np_schedule(50, 1e-3, 0.05)
    assert d.beta[1].item() == pytest.approx(1e-3, rel=1e-6)
    assert d.beta[50].item() == pytest.approx(0.05, rel=1e-6)
    assert d.abar[50].item() == pytest.approx(abar[50], rel=1e-5)


# ---- forward process ---------------------------------------------------------------------------

def test_q_sample_statistics():
    d = Diffusion(T)
    _, _, abar = np_schedule()
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([[1.0, -2.0, 0.5]])
    n = 200_000
    for t in (1, 100, 700):
        noise = torch.randn(n, 3, generator=g)
        xt = d.q_sample(x0.expand(n, 3), t, noise).double()
        se = math.sqrt(1 - abar[t]) / math.sqrt(n)
        assert torch.allclose(xt.mean(0), math.sqrt(abar[t]) * x0[0].double(), atol=5 * se), t
        # variance of a sample variance: 2 v^2 / n
        v = 1 - abar[t]
        assert torch.allclose(xt.var(0), torch.full((3,), v, dtype=torch.float64),
                              atol=5 * v * math.sqrt(2 / n)), t


def test_q_sample_per_sample_t_broadcast():
    d = Diffusion(T)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 2, 4, 4, generator=g)
    noise = torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([1, 500, 1000])
    xt = d.q_sample(x0, t, noise)
    assert xt.shape == x0.shape
    for i, ti in enumerate(t.tolist()):
        assert torch.allclose(xt[i], d.q_sample(x0[i:i + 1], ti, noise[i:i + 1])[0])
        want = d.sqrt_abar[ti] * x0[i] + d.sqrt_1m_abar[ti] * noise[i]
        assert torch.allclose(xt[i], want)
    # per-sample t really differs per row (not the first t broadcast to every row)
    assert not torch.allclose(xt[0], d.q_sample(x0[:1], 1000, noise[:1])[0])


# ---- backward step -----------------------------------------------------------------------------

def test_p_step_matches_eq16():
    d = Diffusion(T)
    beta, alpha, abar = np_schedule()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, generator=g)
    z = torch.randn(5, 3, generator=g)
    for t in (2, 10, 500, 1000):
        got = d.p_step(stub, x, t, z).double()
        xd, zd = x.double(), z.double()
        eps = 0.3 * xd + (t - 1) * 1e-3             # network sees t - 1
        mean = (xd - beta[t] / math.sqrt(1 - abar[t]) * eps) / math.sqrt(alpha[t])
        want = mean + math.sqrt(beta[t]) * zd
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), t
        # noise enters scaled by sigma_t
        diff_noise = d.p_step(stub, x, t, 2 * z) - d.p_step(stub, x, t, z)
        assert torch.allclose(diff_noise.double(), math.sqrt(beta[t]) * zd, rtol=1e-4, atol=1e-6)
        assert torch.allclose(d.p_step(stub, x, t, None).double(), mean, rtol=1e-5, atol=1e-5)


def test_p_step_no_noise_at_t1_and_posterior_sigma():
    d = Diffusion(T)
    beta, alpha, abar = np_schedule()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 2, generator=g)
    z = torch.randn(4, 2, generator=g)
    out = d.p_step(stub, x, 1, z)
    assert torch.equal(out, d.p_step(stub, x, 1, None))
    eps = 0.3 * x.double()                           # t - 1 = 0
    want = (x.double() - beta[1] / math.sqrt(1 - abar[1]) * eps) / math.sqrt(alpha[1])
    assert torch.allclose(out.double(), want, rtol=1e-5, atol=1e-6)
    dp = Diffusion(T, sigma='posterior')
    t = 300
    delta = (dp.p_step(stub, x, t, z) - dp.p_step(stub, x, t, None)).double()
    sig = math.sqrt((1 - abar[t - 1]) / (1 - abar[t]) * beta[t])
    assert torch.allclose(delta, sig * z.double(), rtol=1e-4, atol=1e-6)


def test_network_receives_zero_based_index():
    d = Diffusion(T)
    seen = []

    def rec(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)
    x = torch.zeros(3, 2)
    d.p_step(rec, x, 7, torch.zeros_like(x))
    d.loss_eps(rec, x, torch.tensor([1, 5, 1000]), torch.zeros_like(x))
    d.ddim_step(rec, x, 20, 10)
    assert seen[0].dtype == torch.long and seen[0].shape == (3,)
    assert seen[0].tolist() == [6, 6, 6]
    assert seen[1].tolist() == [0, 4, 999]
    assert seen[2].tolist() == [19, 19, 19]


def test_ddim_step_formula():
    d = Diffusion(T)
    _, _, abar = np_schedule()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 2, generator=g)
    t, tn = 600, 540
    eps = 0.3 * x.double() + (t - 1) * 1e-3
    x0 = (x.double() - math.sqrt(1 - abar[t]) * eps) / math.sqrt(abar[t])
    want = math.sqrt(abar[tn]) * x0 + math.sqrt(1 - abar[tn]) * eps
    assert torch.allclose(d.ddim_step(stub, x, t, tn).double(), want, rtol=1e-4, atol=1e-5)


# ---- losses ------------------------------------------------------------------------------------

def test_loss_eps_oracle_is_zero_and_value():
    d = Diffusion(T)
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(8, 3, generator=g)
    noise = torch.randn(8, 3, generator=g)
    t = torch.randint(1, T + 1, (8,), generator=g)

    def oracle(x, tt):   # recovers the true noise from x_t: exact only with the right t and x_t
        ti = tt + 1
        return (x - d.sqrt_abar[ti][:, None] * x0) / d.sqrt_1m_abar[ti][:, None]
    assert d.loss_eps(oracle, x0, t, noise).item() < 1e-8
    # and a stub's loss is the plain mean of squares
    xt = d.q_sample(x0, t, noise)
    want = (noise - stub(xt, t - 1)).pow(2).mean()
    assert d.loss_eps(stub, x0, t, noise).item() == pytest.approx(want.item(), rel=1e-6)


def test_loss_ip_builds_input_from_perturbed_noise():
    d = Diffusion(T)
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(8, 3, generator=g)
    noise, xi = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    t = torch.randint(1, T + 1, (8,), generator=g)
    seen = {}

    def rec(x, tt):
        seen['x'], seen['t'] = x.clone(), tt.clone()
        return stub(x, tt)
    loss = d.loss_ip(rec, x0, t, noise, xi, 0.15)
    xt = d.q_sample(x0, t, noise + 0.15 * xi)
    assert torch.equal(seen['x'], xt)
    assert torch.equal(seen['t'], t - 1)
    # target stays eps (not eps + gamma xi)
    assert loss.item() == pytest.approx((noise - stub(xt, t - 1)).pow(2).mean().item(), rel=1e-6)
    # gamma = 0 is the plain eps loss
    assert d.loss_ip(stub, x0, t, noise, xi, 0.0).item() == pytest.approx(
        d.loss_eps(stub, x0, t, noise).item(), rel=1e-6)


def test_loss_sa_hand_computed_k2_with_mask():
    d = Diffusion(T)
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(3, 2, generator=g).double()
    e0, e1 = torch.randn(3, 2, generator=g).double(), torch.randn(3, 2, generator=g).double()
    t = torch.tensor([1, 5, 300])     # row 0: t - 1 = 0 < 1 -> its k = 1 term is masked
    d64 = Diffusion(T)
    for name in ('sqrt_abar', 'sqrt_1m_abar'):
        setattr(d64, name, getattr(d64, name).double())
    total, mse, sa = d64.loss_sa(stub, x0, t, [e0, e1], lam=0.7)
    _, _, abar = np_schedule()
    rows_mse, gap = [], torch.zeros(3, 2, dtype=torch.float64)
    for i in range(3):
        ti = t[i].item()
        xt = math.sqrt(abar[ti]) * x0[i] + math.sqrt(1 - abar[ti]) * e0[i]
        d0 = e0[i] - (0.3 * xt + (ti - 1) * 1e-3)
        rows_mse.append(d0)
        g_i = d0.clone()
        if ti - 1 >= 1:
            t1 = ti - 1
            x1 = math.sqrt(abar[t1]) * x0[i] + math.sqrt(1 - abar[t1]) * e1[i]
            g_i = g_i + e1[i] - (0.3 * x1 + (t1 - 1) * 1e-3)
        gap[i] = g_i
    mse_want = torch.stack(rows_mse).pow(2).mean().item()
    sa_want = gap.pow(2).mean().item() / 4
    assert mse.item() == pytest.approx(mse_want, rel=1e-5)
    assert sa.item() == pytest.approx(sa_want, rel=1e-5)
    assert total.item() == pytest.approx(mse_want + 0.7 * sa_want, rel=1e-5)
    # lambda = 0: the plain eps-MSE
    x0f, e0f, e1f = x0.float(), e0.float(), e1.float()
    tot0, mse0, _ = d.loss_sa(stub, x0f, t, [e0f, e1f], lam=0.0)
    assert tot0.item() == pytest.approx(d.loss_eps(stub, x0f, t, e0f).item(), rel=1e-6)
    assert mse0.item() == pytest.approx(tot0.item(), rel=1e-7)


# ---- samplers ----------------------------------------------------------------------------------

def test_sample_chain_callback_order_ddpm_and_ddim():
    d = Diffusion(20)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(8))
    seen = []
    d.sample_chain(stub, x, callback=lambda t, xt: seen.append(t),
                   generator=torch.Generator().manual_seed(0))
    assert seen == list(range(20, -1, -1))
    seen.clear()
    d.sample_chain(stub, x, t_start=12, t_stop=5, callback=lambda t, xt: seen.append(t))
    assert seen == list(range(12, 4, -1))
    seen.clear()
    d.sample_chain(stub, x, sampler='ddim', steps=4, callback=lambda t, xt: seen.append(t))
    assert seen == d.ddim_times(20, 0, 4) == [20, 15, 10, 5, 0]
    ts = Diffusion(T).ddim_times(T, 0, 100)
    assert ts[0] == T and ts[-1] == 0 and len(ts) == 101 and ts == sorted(ts, reverse=True)


def test_sample_chain_validation():
    d = Diffusion(20)
    x = torch.zeros(2, 2)
    for kw in (dict(t_start=21), dict(t_start=5, t_stop=5), dict(t_start=5, t_stop=6),
               dict(t_stop=-1), dict(t_start=0)):
        with pytest.raises(ValueError, match='t_start'):
            d.sample_chain(stub, x, **kw)
    with pytest.raises(ValueError, match='sampler'):
        d.sample_chain(stub, x, sampler='euler')


def test_sample_chain_reproducible_with_generator():
    d = Diffusion(50)
    a = d.sample(stub, (16, 2), generator=torch.Generator().manual_seed(3))
    b = d.sample(stub, (16, 2), generator=torch.Generator().manual_seed(3))
    c = d.sample(stub, (16, 2), generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # x_{t_stop} of a partial chain continued with the rest = the full chain (same noise stream)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))
    full = d.sample_chain(stub, x, 50, 0, generator=g1)
    half = d.sample_chain(stub, x, 50, 20, generator=g2)
    assert torch.allclose(full, d.sample_chain(stub, half, 20, 0, generator=g2))


MU, S = 1.5, 0.5


def gaussian_oracle(d):
    """The exact eps*(x_t, t) for data N(MU, S^2): E[eps | x_t] (network index t - 1)."""
    def eps(x, t):
        a = d.abar.double()[t + 1].view(-1, 1)
        return ((1 - a).sqrt() * (x.double() - a.sqrt() * MU) / (a * S * S + 1 - a)).to(x.dtype)
    return eps


@pytest.mark.parametrize('sigma', ['beta', 'posterior'])
def test_ancestral_sampling_reproduces_gaussian(sigma):
    d = Diffusion(T, sigma=sigma)
    beta, alpha, abar = np_schedule()
    var = beta if sigma == 'beta' else np.r_[0, (1 - abar[:-1]) / (1 - abar[1:]) * beta[1:]]
    n = 20000
    x = d.sample(gaussian_oracle(d), (n, 1), generator=torch.Generator().manual_seed(10)).double()
    # the chain is linear-Gaussian here: propagate its exact mean / variance in float64
    m, v = 0.0, 1.0
    for t in range(T, 0, -1):
        vt = abar[t] * S * S + 1 - abar[t]
        c = beta[t] / math.sqrt(1 - abar[t]) * math.sqrt(1 - abar[t]) / vt
        A, b = (1 - c) / math.sqrt(alpha[t]), c * math.sqrt(abar[t]) * MU / math.sqrt(alpha[t])
        m, v = A * m + b, A * A * v + (var[t] if t > 1 else 0.0)
    assert abs(m - MU) < 1e-3 and abs(math.sqrt(v) - S) < 0.01     # T = 1000 steps: nearly exact
    se = S / math.sqrt(n)
    assert abs(x.mean().item() - m) < 4 * se
    assert abs(x.std().item() - math.sqrt(v)) < 4 * S / math.sqrt(2 * n)
    assert abs(x.mean().item() - MU) < 0.02 and abs(x.std().item() - S) < 0.02


def test_ddim_sampling_reproduces_gaussian():
    d = Diffusion(T)
    _, _, abar = np_schedule()
    n = 20000
    xT = torch.randn(n, 1, generator=torch.Generator().manual_seed(11))
    x = d.sample_chain(gaussian_oracle(d), xT, sampler='ddim', steps=100).double()
    # DDIM (eta = 0) with the exact eps is the affine map x_T -> MU + P (x_T - sqrt(abar_T) MU),
    # P = prod over steps of (sqrt(a a') S^2 + sqrt((1-a)(1-a'))) / (a S^2 + 1 - a)
    P = 1.0
    ts = d.ddim_times(T, 0, 100)
    for t, tn in zip(ts[:-1], ts[1:]):
        a, an = abar[t], abar[tn]
        P *= (math.sqrt(a * an) * S * S + math.sqrt((1 - a) * (1 - an))) / (a * S * S + 1 - a)
    want = MU + P * (xT.double() - math.sqrt(abar[T]) * MU)
    assert torch.allclose(x, want, atol=2e-4)
    assert 0.95 * S < P < S       # 100 deterministic steps shrink the spread by a few per cent
    assert abs(x.mean().item() - MU) < 0.02
    assert abs(x.std().item() - S) < 0.03
