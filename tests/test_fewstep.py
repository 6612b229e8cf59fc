"""Few-step chains: the respaced ancestral sampler, DDIM with eta, epsilon scaling (ADM-ES), the
regulariser on a respaced chain, and Theorem 4.1 tested through `fault_tolerance` on a data
distribution whose exact eps is known in closed form (N(0, s^2 I)), so every number has a
hand-derived value. Networks are called with the 0-based index t - 1."""
import math

import numpy as np
import pytest
import torch

from diffusion import Diffusion, eps_scale_schedule, times
from mmd import consistency_reg, errprop_curve, fault_tolerance, mmd2, reg_chain_times


def stub(x, t):
    return 0.3 * x + t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype) * 1e-3


def zero(x, t):
    return torch.zeros_like(x)


def exact(d, s):
    """E[eps | x_t] for data N(0, s^2 I): sqrt(1 - abar_t) x_t / (abar_t s^2 + 1 - abar_t)."""
    def eps(x, t):
        a = d.abar.double()[t + 1].view(-1, *([1] * (x.dim() - 1)))
        return ((1 - a).sqrt() * x.double() / (a * s * s + 1 - a)).to(x.dtype)
    return eps


def gen(seed):
    return torch.Generator().manual_seed(seed)


def abar64(d):
    return d._abar64.tolist()


# ---- S = T is today's chain, bitwise ------------------------------------------------------------

@pytest.mark.parametrize('sigma', ['beta', 'posterior'])
def test_every_step_chain_is_todays_chain_bitwise(sigma):
    d, T = Diffusion(30, sigma=sigma), 30
    x = torch.randn(6, 2, generator=gen(0))
    ref, g = x.clone(), gen(1)           # the ancestral loop of Eq. (16) as it was written before
    for t in range(T, 0, -1):
        z = torch.randn(ref.shape, generator=g) if t > 1 else None
        eps = stub(ref, torch.full((6,), t - 1))
        ref = (ref - d.beta[t] / d.sqrt_1m_abar[t] * eps) / d.alpha[t].sqrt()
        ref = ref + d.sigma[t] * z if z is not None else ref
    for kw in (dict(), dict(steps=T), dict(steps=T, eps_scale=1.0),
               dict(steps=T, eps_scale=torch.ones(T + 1))):
        assert torch.equal(d.sample_chain(stub, x, noise=gen(1), **kw), ref), kw
    assert torch.equal(d.sample_chain(stub, x, generator=gen(1)), ref)     # the old keyword
    assert not torch.equal(d.sample_chain(stub, x, steps=T - 1, noise=gen(1)), ref)
    with pytest.raises(ValueError, match='not both'):
        d.sample_chain(stub, x, noise=gen(1), generator=gen(1))


def test_ddim_eta0_is_todays_ddim_bitwise_and_draws_no_noise():
    d = Diffusion(1000)
    x = torch.randn(5, 3, generator=gen(2))
    ts = torch.linspace(1000, 0, 8).round().long().tolist()
    ref = x.clone()
    for t, tn in zip(ts[:-1], ts[1:]):
        eps = stub(ref, torch.full((5,), t - 1))
        x0 = (ref - d.sqrt_1m_abar[t] * eps) / d.sqrt_abar[t]
        ref = d.sqrt_abar[tn] * x0 + d.sqrt_1m_abar[tn] * eps
    draws = []

    def noise(shape):
        draws.append(shape)
        return torch.randn(shape)
    for lam in (None, 1.0):
        got = d.sample_chain(stub, x, sampler='ddim', steps=7, noise=noise, eps_scale=lam)
        assert torch.equal(got, ref)
    assert draws == []
    assert d.times(1000, 0, 7) == ts and times(1000, 0, 7) == ts


# ---- the respaced ancestral step (improved DDPM / ADM) -------------------------------------------

@pytest.mark.parametrize('sigma', ['beta', 'posterior'])
def test_respaced_alphas_multiply_to_abar(sigma):
    d = Diffusion(1000, sigma=sigma)
    ab = abar64(d)
    for S in (10, 37, 100):
        grid = times(1000, 0, S)[::-1]
        prod = 1.0
        for tn, t in zip(grid[:-1], grid[1:]):
            # zero network: x_t' = x_t / sqrt(alpha') + sigma' z
            alpha = 1 / d.p_step(zero, torch.ones(1, 1), t, None, tn).double().item() ** 2
            prod *= alpha
            assert prod == pytest.approx(ab[t], rel=1e-5, abs=1e-6), (S, t)
            assert alpha == pytest.approx(ab[t] / ab[tn], rel=1e-6)
            sig = d.p_step(zero, torch.zeros(1, 1), t, torch.ones(1, 1), tn).item()
            beta = 1 - ab[t] / ab[tn]
            want = beta if sigma == 'beta' else (1 - ab[tn]) / (1 - ab[t]) * beta
            assert sig ** 2 == pytest.approx(want if tn > 0 else 0.0, rel=1e-5, abs=1e-12), (S, t)


def test_ddim_eta_noise_std_and_eps_coefficient():
    d = Diffusion(1000)
    ab = abar64(d)
    x, z = torch.zeros(1, 1), torch.ones(1, 1)
    for t, tn in ((1000, 900), (300, 200), (20, 1)):
        s1 = math.sqrt((1 - ab[tn]) / (1 - ab[t]) * (1 - ab[t] / ab[tn]))
        for eta in (1.0, 0.5):
            s = eta * s1
            got = (d.ddim_step(zero, x, t, tn, z, eta) - d.ddim_step(zero, x, t, tn, 0 * z, eta)).item()
            assert got == pytest.approx(s, rel=1e-5), (t, eta)
            # eps = 1 at x = 0: x_t' = -sqrt(abar_t') sqrt(1 - abar_t) / sqrt(abar_t) + sqrt(1 - abar_t' - s^2)
            one = lambda x, t: torch.ones_like(x)   # noqa: E731
            want = -math.sqrt(ab[tn] * (1 - ab[t]) / ab[t]) + math.sqrt(1 - ab[tn] - s * s)
            assert d.ddim_step(one, x, t, tn, 0 * z, eta).item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_ddim_eta1_is_the_posterior_ancestral_chain():
    """DDIM with eta = 1 has s^2 = beta~' and the same mean as the posterior-variance DDPM step."""
    d = Diffusion(1000, sigma='posterior')
    x = torch.randn(64, 2, generator=gen(3))
    a = d.sample_chain(stub, x, sampler='ddim', steps=10, eta=1.0, noise=gen(4))
    b = d.sample_chain(stub, x, sampler='ddpm', steps=10, noise=gen(4))
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a, d.sample_chain(stub, x, sampler='ddim', steps=10, noise=gen(4)))


# ---- Theorem 4.1 on the exact model: the gap's per-step factors ----------------------------------

def factor(ab, t, tn, s, sampler, eta=0.0, lam=1.0):
    """The chain is linear in x for the exact eps of N(0, s^2 I), eps = c_t x with
    c_t = sqrt(1 - abar_t) / v_t, v_t = abar_t s^2 + 1 - abar_t; with shared noise the gap e obeys
    e_t' = F e_t.  Ancestral (alpha' = abar_t / abar_t', beta' = 1 - alpha'):
        F = (1 - beta' / (lam v_t)) / sqrt(alpha').
    DDIM (x0 = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t), sigma_s = eta * the s of ddim_step):
        F = sqrt(abar_t' / abar_t) + (sqrt(1 - abar_t' - sigma_s^2) - sqrt(abar_t' / abar_t)
            sqrt(1 - abar_t)) sqrt(1 - abar_t) / (lam v_t)."""
    a, an = ab[t], ab[tn]
    v = a * s * s + 1 - a
    if sampler == 'ddpm':
        alpha = a / an
        return (1 - (1 - alpha) / (lam * v)) / math.sqrt(alpha)
    sig = eta * math.sqrt((1 - an) / (1 - a) * (1 - a / an))
    r = math.sqrt(an / a)
    return r + (math.sqrt(max(1 - an - sig * sig, 0)) - r * math.sqrt(1 - a)) * math.sqrt(1 - a) / (lam * v)


@pytest.mark.parametrize('sampler,sigma,eta,lam,mode', [
    ('ddpm', 'beta', 0.0, 1.0, 'iso'), ('ddpm', 'posterior', 0.0, 1.0, 'model'),
    ('ddim', 'beta', 0.0, 1.0, 'iso'), ('ddim', 'beta', 0.5, 1.0, 'model'),
    ('ddpm', 'beta', 0.0, 1.05, 'iso')])
def test_fault_tolerance_amplification_is_product_of_factors(sampler, sigma, eta, lam, mode):
    s, S, t0 = 0.5, 10, 700
    d = Diffusion(1000, sigma=sigma)
    ab = abar64(d)
    x_T = torch.randn(64, 2, generator=gen(5))
    out = fault_tolerance(exact(d, s), d, x_T, t0, 0.1, mode=mode, sampler=sampler, steps=S,
                          eta=eta, eps_scale=lam, kernels=('gaussian', 'imq'))
    grid = [t for t in times(1000, 0, S) if t <= t0]
    assert out['t'] == grid == [700, 600, 500, 400, 300, 200, 100, 0]
    assert out['gap'][0] == pytest.approx(0.1, rel=1e-5)
    want = [1.0]
    for t, tn in zip(grid[:-1], grid[1:]):
        want.append(want[-1] * factor(ab, t, tn, s, sampler, eta, lam))
    assert np.allclose(out['amp'], want, rtol=2e-4, atol=0), (out['amp'], want)
    assert set(out['mmd']) == {'gaussian', 'imq'} and len(out['mmd']['imq']) == len(grid)
    assert out['mode'] == mode and out['t0'] == t0


def test_fault_tolerance_exact_model_shrinks_the_gap_and_mmd_sees_large_shifts():
    """For N(0, s^2) data with s < 1 every ancestral factor is < 1 near t = 0, so the exact chain
    removes part of an error it receives; a perturbation of RMS 2 is visible to the MMD at t0."""
    d = Diffusion(1000)
    x_T = torch.randn(100, 2, generator=gen(6))
    out = fault_tolerance(exact(d, 0.5), d, x_T, 500, 2.0, steps=20)
    assert out['amp'][-1] < 1
    assert out['mmd']['gaussian'][0] > 0.3
    zero_gap = fault_tolerance(exact(d, 0.5), d, x_T, 500, 0.0, steps=20)
    assert all(g == 0 for g in zero_gap['gap'])


@pytest.mark.parametrize('mode', ['iso', 'model'])
def test_fault_tolerance_forks_from_one_chain_equal_separate_runs(mode):
    """A list of t0: every perturbed copy forks from the one unperturbed chain and gets the
    numbers of its own call (same x_T, z and e), in the order given."""
    d = Diffusion(100)
    x_T = torch.randn(50, 3, generator=gen(7))
    t0s = [10, 90, 50]
    many = fault_tolerance(stub, d, x_T, t0s, 0.1, mode=mode, steps=20, noise_seed=4, kernels=('gaussian',))
    for t0, got in zip(t0s, many):
        one = fault_tolerance(stub, d, x_T, t0, 0.1, mode=mode, steps=20, noise_seed=4, kernels=('gaussian',))
        assert got['t0'] == t0 and got['t'] == one['t']
        assert np.allclose(got['gap'], one['gap'], rtol=1e-5) and np.allclose(got['amp'], one['amp'], rtol=1e-5)
        assert np.allclose(got['mmd']['gaussian'], one['mmd']['gaussian'], rtol=1e-4, atol=1e-6)


def test_errprop_exact_model_stays_at_estimator_floor():
    """Data N(0, I), sigma^2 = beta': the exact eps is sqrt(1 - abar_t) x_t, an ancestral step maps
    x -> sqrt(alpha') x + sqrt(beta') z and keeps N(0, I) exactly, also respaced. So D_MMD(t) must
    lie inside the spread of D_MMD between two independent N(0, I) sets of the same sizes."""
    d = Diffusion(1000)
    x0 = torch.randn(200, 2, generator=gen(7))
    g = gen(8)
    null = [mmd2(torch.randn(200, 2, generator=g), torch.randn(200, 2, generator=g), 'gaussian', 'u').item()
            for _ in range(40)]
    bound = 1.25 * max(math.sqrt(abs(v)) for v in null)
    kw = dict(n=200, kernels=('gaussian',), steps=10)
    good = errprop_curve(exact(d, 1.0), d, x0, generator=gen(9), **kw)
    bad = errprop_curve(lambda x, t: exact(d, 1.0)(x, t) + 0.3, d, x0, generator=gen(9), **kw)
    assert good['t'] == times(1000, 0, 10)          # <= 100 steps: every visited index
    assert max(abs(v) for v in good['gaussian']) < bound
    assert bad['gaussian'][-1] > 2 * bound
    # delta_t = (std - std_q)^2: the std of a sample std at n = 200 is 1 / sqrt(2n) = 0.05, so the
    # exact chain stays below (4 * 0.05)^2 = 0.04; eps scaled by 1.2 widens the samples (see below)
    assert max(good['delta']) < 0.04 and good['std_q'][0] == pytest.approx(1.0, abs=0.1)
    wide = errprop_curve(exact(d, 1.0), d, x0, generator=gen(9), eps_scale=1.2, **kw)
    assert wide['delta'][-1] > 0.04 and wide['std'][-1] > wide['std_q'][-1]


# ---- epsilon scaling (ADM-ES) --------------------------------------------------------------------

def test_eps_scale_above_one_raises_the_final_variance():
    """Ancestral factor F = (1 - beta' / (lam v_t)) / sqrt(alpha') grows with lam and the added
    variance does not depend on lam, so Var(x_0) = sum of F^2 products is increasing in lam:
    dividing eps by lam > 1 removes less noise and leaves a wider sample (here, above s)."""
    s, S = 0.5, 20
    d = Diffusion(1000)
    ab = abar64(d)
    grid = times(1000, 0, S)

    def var(lam):
        v = 1.0
        for t, tn in zip(grid[:-1], grid[1:]):
            v = factor(ab, t, tn, s, 'ddpm', lam=lam) ** 2 * v + (1 - ab[t] / ab[tn] if tn else 0)
        return v
    assert var(1.0) < var(1.1)
    x_T = torch.randn(4000, 1, generator=gen(10))
    sd = {lam: d.sample_chain(exact(d, s), x_T, steps=S, noise=gen(11), eps_scale=lam).std().item()
          for lam in (1.0, 1.1)}
    assert sd[1.1] > sd[1.0]
    for lam in (1.0, 1.1):
        assert sd[lam] == pytest.approx(math.sqrt(var(lam)), rel=4 / math.sqrt(2 * 4000))


def test_eps_scale_schedule_forms():
    T = 1000
    assert torch.equal(eps_scale_schedule(T, 1.017), torch.full((T + 1,), 1.017))
    lam = eps_scale_schedule(T, 1.0, 1e-3, steps=10)   # ADM-ES: lambda = b + k i, i = respaced index
    grid = times(T, 0, 10)[::-1]
    for i, t in enumerate(grid[1:]):
        assert lam[t].item() == pytest.approx(1.0 + 1e-3 * i)
    assert torch.isnan(lam[50]) and lam[0] == 1.0
    full = eps_scale_schedule(T, 1.0, 1e-4)
    assert full[1].item() == 1.0 and full[T].item() == pytest.approx(1.0 + 1e-4 * (T - 1))
    d = Diffusion(T)
    x = torch.randn(4, 2, generator=gen(12))
    d.sample_chain(stub, x, steps=10, eps_scale=lam, noise=gen(0))
    with pytest.raises(ValueError, match='eps_scale_schedule'):
        d.sample_chain(stub, x, steps=20, eps_scale=lam, noise=gen(0))


# ---- the short T = 50 schedule --------------------------------------------------------------------

def test_T50_rescaled_schedule():
    d = Diffusion(50, beta_1=1e-4 * 20, beta_T=0.02 * 20)
    assert d.beta[50].item() == pytest.approx(0.4) and d.abar[50].item() < 1e-3
    x = d.sample(exact(d, 0.5), (2000, 1), noise=gen(13))
    assert torch.isfinite(x).all() and abs(x.std().item() - 0.5) < 0.05


# ---- bad input: one-line ValueErrors ----------------------------------------------------------------

def test_bad_input_one_line_errors():
    d = Diffusion(20)
    x = torch.zeros(4, 2)
    cases = [(lambda: d.sample_chain(stub, x, steps=21), 'steps must be in 1..20'),
             (lambda: d.sample_chain(stub, x, t_start=10, t_stop=5, steps=6), r'steps must be in 1\.\.5'),
             (lambda: d.sample_chain(stub, x, steps=0), 'steps'),
             (lambda: d.sample_chain(stub, x, sampler='ddim', eta=-0.1), 'eta'),
             (lambda: d.sample_chain(stub, x, eps_scale=0.0), 'eps_scale'),
             (lambda: d.sample_chain(stub, x, eps_scale=-1.0), 'eps_scale'),
             (lambda: d.sample_chain(stub, x, eps_scale=torch.ones(5)), 'length T'),
             (lambda: eps_scale_schedule(20, 0.0), 'b must be > 0'),
             (lambda: eps_scale_schedule(20, 1.0, -0.1), 'stay > 0'),
             (lambda: fault_tolerance(stub, d, x, 7, 0.1, steps=4), 't0=7 is not visited'),
             (lambda: fault_tolerance(stub, d, x, 25, 0.1), 't0=25'),
             (lambda: fault_tolerance(stub, d, x, 0, 0.1, mode='model'), 't0=0'),
             (lambda: fault_tolerance(stub, d, x, 10, -0.1), 'delta'),
             (lambda: fault_tolerance(stub, d, x, 10, 0.1, mode='grad'), 'mode'),
             (lambda: reg_chain_times(20, 5, 2, reg_steps=5), 'r is a grid position')]
    for f, msg in cases:
        with pytest.raises(ValueError, match=msg) as e:
            f()
        assert '\n' not in str(e.value), msg


# ---- the regulariser on a respaced chain ------------------------------------------------------------

def test_reg_steps_chain_indices_and_calls():
    d = Diffusion(1000)
    xa, xb = torch.randn(8, 2, generator=gen(14)), torch.randn(8, 2, generator=gen(15))
    calls, draws = [], []

    def net(x, t):
        calls.append((torch.is_grad_enabled(), t[0].item()))
        return stub(x, t)
    g = gen(16)

    def noise(shape):
        draws.append(tuple(shape))
        return torch.randn(shape, generator=g)
    # S = 10: the grid is 0, 100, ..., 1000; r = 2, k = 3 -> from 500 down to 200 in 3 steps
    assert reg_chain_times(1000, 2, 3, 10) == (500, 200)
    assert reg_chain_times(1000, 8, 5, 10) == (1000, 800)      # s capped at the top of the grid
    assert reg_chain_times(1000, 2, 3) == (5, 2)                # the paper's chain
    consistency_reg(net, d, xa, xb, 2, 3, noise, reg_steps=10)
    assert calls == [(True, 499), (True, 399), (True, 299)]
    assert len(draws) == 1 + 3 + 1                              # warm start, three z, y
    calls.clear()
    consistency_reg(net, d, xa, xb, 2, 3, noise, grad='last', reg_steps=10)
    assert calls == [(False, 499), (False, 399), (True, 299)]
    calls.clear()
    consistency_reg(net, d, xa, xb, 8, 5, noise, reg_steps=10)
    assert [c[1] for c in calls] == [999, 899]
    calls.clear()
    consistency_reg(net, d, xa, xb, 0, 2, noise, reg_steps=7)   # grid of 7: 0, 143, 286, ...
    assert [c[1] for c in calls] == [285, 142] and times(1000, 0, 7)[-3:] == [286, 143, 0]


def test_reg_steps_T_is_the_papers_regulariser():
    d = Diffusion(20)
    xa, xb = torch.randn(8, 2, generator=gen(17)), torch.randn(8, 2, generator=gen(18))
    for r, k in ((0, 3), (5, 2), (18, 5)):
        for grad in ('full', 'last'):
            a = consistency_reg(stub, d, xa, xb, r, k, lambda sh, g=gen(19): torch.randn(sh, generator=g),
                                grad=grad)
            b = consistency_reg(stub, d, xa, xb, r, k, lambda sh, g=gen(19): torch.randn(sh, generator=g),
                                grad=grad, reg_steps=20)
            assert torch.equal(a, b), (r, k, grad)


# ---- the two S-step grids: this project's (diffusers' trailing) and ADM's space_timesteps ----------
@pytest.mark.parametrize('T,S', [(1000, 10), (1000, 20), (1000, 50), (1000, 100), (50, 10)])
def test_grids_equal_diffusers_trailing_and_adms(T, S):
    """times() is diffusers' "trailing" grid; adm_times is ADM's: its DDPM grid is diffusers'
    "linspace" one (0 .. T-1, ending with the step from timestep 0), its DDIM grid the "leading" one.
    Timesteps are 0-based there, chain indices t = timestep + 1 here; every chain ends at x_0."""
    pytest.importorskip('diffusers')
    from diffusers import DDIMScheduler, DDPMScheduler
    from diffusion import adm_times

    def grid(cls, spacing):
        s = cls(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=0)
        s.set_timesteps(S)
        return [int(k) + 1 for k in s.timesteps] + [0]
    assert times(T, 0, S) == grid(DDPMScheduler, 'trailing')
    assert adm_times(T, S, 'ddpm') == grid(DDPMScheduler, 'linspace')
    assert adm_times(T, S, 'ddim') == grid(DDIMScheduler, 'leading')
    assert adm_times(T, S)[0] == T and adm_times(T, S)[-2:] == [1, 0] and len(adm_times(T, S)) == S + 1


def test_adm_grid_runs_the_chain_and_eps_scaling_on_it():
    """An explicit grid goes through sample_chain and eps_scale_schedule unchanged; ADM's DDIM grid
    with no integer stride is refused in one line."""
    from diffusion import adm_times
    d = Diffusion(T=1000)
    ts = adm_times(1000, 10, 'ddim')
    seen = []
    d.sample(stub, (4, 2), sampler='ddim', steps=ts, generator=gen(0), callback=lambda t, x: seen.append(t))
    assert seen == ts
    lam = eps_scale_schedule(1000, 1.1, 0.01, ts)
    assert [round(float(lam[t]), 6) for t in ts[:-1]] == [round(1.1 + 0.01 * i, 6) for i in range(9, -1, -1)]
    with pytest.raises(ValueError, match='no integer stride'):
        adm_times(50, 20, 'ddim')


# ---- the Time-Shift Sampler (Li et al., ICLR 2024, Alg. 3) -----------------------------------------
def test_time_shift_picks_the_index_whose_noise_variance_matches_the_state():
    """Rows built with variance exactly 1 - abar_tau get t_s = tau (inside the window); var='batch'
    gives every row the one index matching the whole batch's variance."""
    d = Diffusion(T=1000)
    taus = torch.tensor([495, 500, 507])
    x = torch.randn(3, 64, generator=gen(0))
    x = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True) * (1 - d.abar[taus]).sqrt()[:, None]
    assert d.shifted_time(x, 500, 400, 20).tolist() == taus.tolist()
    assert d.shifted_time(x, 500, 400, 4).tolist() == [498, 500, 502]   # clipped to the window
    v = float(x.var())
    want = int((v - (1 - d.abar[490:511])).abs().argmin()) + 490
    assert d.shifted_time(x, 500, 400, 20, 'batch').tolist() == [want] * 3
    assert d.shifted_time(x, 500, 495, 20).min() >= 496   # never at or below the step's target


@pytest.mark.parametrize('sampler', ['ddpm', 'ddim'])
def test_time_shifted_step_is_the_step_from_t_s_per_sample(sampler):
    """A step from per-sample t_s equals, row by row, the plain respaced step from that int index."""
    d = Diffusion(T=1000, sigma='posterior')
    x, z = torch.randn(2, 3, generator=gen(1)), torch.randn(2, 3, generator=gen(2))
    ts = torch.tensor([510, 490])
    step = (lambda t, x, z: d.p_step(stub, x, t, z, 400)) if sampler == 'ddpm' else \
        (lambda t, x, z: d.ddim_step(stub, x, t, 400, z, eta=0.5))
    both = step(ts, x, z)
    for i in range(2):
        torch.testing.assert_close(both[i:i + 1], step(int(ts[i]), x[i:i + 1], z[i:i + 1]), rtol=1e-6, atol=1e-6)


def test_time_shift_chain_calls_the_network_at_t_s_only_where_the_paper_shifts():
    """Off (window 0) it is the plain chain bitwise; on, the first step and every step from t <= cutoff
    run at the nominal index, the others at a t_s inside the window."""
    d = Diffusion(T=1000)
    seen = []

    def net(x, t):
        seen.append(t.tolist())
        return stub(x, t)
    plain = d.sample(stub, (5, 2), steps=10, generator=gen(3))
    off = d.sample(stub, (5, 2), steps=10, generator=gen(3), time_shift=dict(window=0, cutoff=300))
    assert torch.equal(plain, off)
    d.sample(net, (5, 2), steps=10, generator=gen(3), time_shift=dict(window=40, cutoff=300))
    nominal = times(1000, 0, 10)[:-1]
    for i, (t, got) in enumerate(zip(nominal, seen)):
        if i == 0 or t <= 300:
            assert got == [t - 1] * 5
        else:
            assert all(abs(g + 1 - t) <= 20 for g in got)
    assert any(g != [t - 1] * 5 for t, g in zip(nominal, seen))   # something did shift
