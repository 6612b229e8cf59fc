"""Maximum mean discrepancy: kernels, estimators, the paper's consistency regulariser with
TD-style bootstrapping (Sec. 5, Eq. 14-16, Algorithm 1) and the error-propagation curve D_MMD(t)
(Sec. 4.2, Eq. 8-10, Fig. 1), with ADM-ES's exposure-bias measure delta_t alongside, and a direct
test of Theorem 4.1 (fault_tolerance: two chains sharing their noise, one perturbed at t0).

Kernels act on squared Euclidean distances between flattened samples. Their bandwidth comes from
the pooled set {x} u {y} (median or mean pairwise squared distance), is detached from the graph
and recomputed for every call, i.e. at every t.
"""
import math

import torch

from diffusion import times

KERNELS = ('gaussian', 'laplace', 'imq', 'multigauss')
ESTIMATORS = ('v', 'u')   # V-statistic of Eq. (10) (diagonal included) / unbiased U-statistic


def signed_sqrt(v):
    """sign(v) sqrt|v| of an MMD^2 estimate: the U-statistic can be < 0, and its noise around 0
    stays visible instead of being clipped."""
    return math.copysign(math.sqrt(abs(v)), v)


def pairwise_sq_dists(a, b):
    """Squared distances between rows of a (N, K) and b (M, K) -> (N, M), clamped at 0."""
    d2 = a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1)[None] - 2.0 * a @ b.T
    return d2.clamp(min=0)


def _pooled_sq_dists(z):
    """pairwise_sq_dists(z, z) with an exact zero diagonal, the same numbers bit for bit
    ((|a|^2 + |b|^2) + (-2 ab) = (|a|^2 + |b|^2) - 2 ab), in place on one (L, L) buffer; autograd
    sees ordinary ops, so gradients reach z."""
    sq = z.pow(2).sum(1)
    d2 = torch.mm(z, z.T).mul_(-2.0).add_(sq[:, None] + sq[None]).clamp_(min=0)
    d2.diagonal().zero_()   # exact zeros despite float rounding
    return d2


def kth_smallest(v, k):
    """The k-th smallest (1-based) of the flat tensor v, as v.kthvalue(k) but by cheap passes for
    large v: bracket the answer between two order statistics of a strided subsample, count what
    lies at or below the bracket's top, and select within the bracket (an exact answer; a bracket
    that misses falls back to kthvalue on the whole). One mask serves both the count and the band:
    1.75x faster than counting v < lo separately (3000 pooled points, one thread; the toy
    evaluation spent a quarter of its time here, docs/performance.md)."""
    n = v.numel()
    if n < 200_000:
        return v.kthvalue(k).values
    s = v[::n // 16384].sort().values   # ~16k values; the answer lies near rank k n_s / n in them
    q, w = k * len(s) // n, 3 * math.isqrt(len(s)) + 2   # 6 sigma: the rank's sd is <= sqrt(n_s) / 2
    lo, hi = s[max(q - w, 0)], s[min(q + w, len(s) - 1)]
    mask = v <= hi
    up_to_hi = int(torch.count_nonzero(mask))
    band = v[mask.logical_and_(v >= lo)]
    below = up_to_hi - len(band)   # the values < lo
    if below < k <= below + len(band):
        return band.kthvalue(k - below).values
    return v.kthvalue(k).values


def kernel_matrices(x, y, kernel='gaussian'):
    """Kxx (N,N), Kyy (M,M), Kxy (N,M) for samples x (N, ...) and y (M, ...).

    gaussian  : exp(-d^2 / (2 h)),          h = median pooled squared distance
    laplace   : exp(-d / sqrt(h)),          sqrt(h) = median pooled distance
    imq       : (1 + d^2 / h)^(-1/2),       inverse multiquadric
    multigauss: sum_{i=-2..2} exp(-d^2 / (m 2^i)), m = mean pooled squared distance; the kernel of
                the authors' released code.
    """
    return kernel_matrices_many(x, y, (kernel,))[kernel]


def kernel_matrices_many(x, y, kernels):
    """{kernel: (Kxx, Kyy, Kxy)} for several kernels, sharing one distance matrix and bandwidth.

    The median is that of the L (L - 1) off-diagonal pooled distances (the lower of the two middle
    values, as torch.median), found by selection: with the L exact zeros of the diagonal in front,
    it is the (L + L (L - 1) / 2)-th smallest entry of the whole matrix. Without a graph to keep,
    every kernel is computed in place on one buffer of its own. multigauss's five exps are powers
    of one."""
    bad = [k for k in kernels if k not in KERNELS]
    if bad:
        raise ValueError(f'unknown kernel {bad[0]!r}; choose one of {KERNELS}')
    x, y = x.flatten(1).float(), y.flatten(1).float()
    z = torch.cat([x, y])
    n, L = len(x), len(z)
    with torch.autocast(z.device.type, enabled=False):   # |a|^2 + |b|^2 - 2ab cancels: keep fp32
        d2 = _pooled_sq_dists(z)
    with torch.no_grad():   # the bandwidth is a statistic of the pooled set, not a path for gradients
        if any(k != 'multigauss' for k in kernels):
            h_med = kth_smallest(d2.detach().view(-1), L + L * (L - 1) // 2).clamp(min=1e-12)
        if 'multigauss' in kernels:
            h_mean = (d2.detach().sum() / (L * (L - 1))).clamp(min=1e-12)
    graph = torch.is_grad_enabled() and d2.requires_grad
    out = {}
    for kernel in kernels:
        if kernel == 'gaussian':
            k = torch.div(d2, -2 * h_med)      # -d2 / (2 h), bit for bit
            k = k.exp() if graph else k.exp_()
        elif kernel == 'laplace':
            # sqrt has an infinite slope at 0: clamp, then restore the exact zeros of the diagonal
            k = d2.clamp(min=1e-12)
            k = k.sqrt() if graph else k.sqrt_()
            if graph:
                k = k * ~torch.eye(L, dtype=torch.bool, device=k.device)
            else:
                k.diagonal().zero_()
            k = torch.exp(k / -h_med.sqrt()) if graph else k.div_(-h_med.sqrt()).exp_()
        elif kernel == 'imq':
            k = torch.div(d2, h_med)
            k = (k + 1).rsqrt() if graph else k.add_(1).rsqrt_()
        else:   # e^(-d2 / (m 2^i)) for i = 2, 1, ..., -2 are u, u^2, u^4, u^8, u^16: one exp
            u = torch.div(d2, -4 * h_mean)     # (within 5e-7 relative of five exps)
            u = u.exp() if graph else u.exp_()
            p = u * u
            k = u + p
            for _ in range(3):
                p = p * p if graph else p.mul_(p)
                k = k + p if graph else k.add_(p)
        out[kernel] = (k[:n, :n], k[n:, n:], k[:n, n:])
    return out


def _estimate(kxx, kyy, kxy, estimator):
    if estimator == 'v':   # Eq. (10)
        return kxx.mean() + kyy.mean() - 2 * kxy.mean()
    if estimator == 'u':
        n, m = len(kxx), len(kyy)
        return ((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
                + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1)) - 2 * kxy.mean())
    raise ValueError(f"estimator must be 'v' (Eq. 10) or 'u' (unbiased), got {estimator!r}")


def mmd2(x, y, kernel='gaussian', estimator='v'):
    """MMD^2 with estimator 'v' (Eq. 10: (1/N^2) sum Kxx + (1/M^2) sum Kyy - (2/NM) sum Kxy; biased,
    >= 0, floor O(1/N)) or 'u' (the unbiased U-statistic: the diagonals of Kxx and Kyy left out;
    can be < 0)."""
    return _estimate(*kernel_matrices(x, y, kernel), estimator)


def mmd2_many(x, y, kernels, estimator='v'):
    """{kernel: MMD^2} for several kernels at the cost of one distance matrix."""
    return {k: _estimate(*b, estimator) for k, b in kernel_matrices_many(x, y, kernels).items()}


def mmd(x, y, kernel='gaussian', estimator='v'):
    """D_MMD of Eq. (9) = sqrt(MMD^2). A small floor keeps the gradient finite at 0; a negative
    unbiased estimate maps to that floor."""
    return mmd2(x, y, kernel, estimator).clamp(min=1e-12).sqrt()


# ---- the consistency regulariser (Sec. 5) ------------------------------------------------------

def reg_weight(r, T, rho=0.003, schedule='exp', norm='mean1'):
    """w_r of Eq. (14): w_t proportional to exp(rho (T - t)) for t in 0..T-1.

    norm 'mean1' (default): mean over t is 1, so lambda_reg : lambda_nll is the real balance of the
    two terms when one r is drawn per step. 'sum1': the paper's literal sum_t w_t = 1 (about T
    times weaker). schedule 'uniform': the ablation w_t = const (1, or 1/T with sum1).
    """
    if schedule == 'uniform':
        return 1.0 if norm == 'mean1' else 1.0 / T
    ts = torch.arange(T, dtype=torch.float64)
    w = torch.exp(rho * (T - ts))
    z = w.mean() if norm == 'mean1' else w.sum()
    return float(math.exp(rho * (T - r)) / z)


def reg_chain_times(T, r, k, reg_steps=None):
    """(s, r_t): the chain indices where the bootstrapped chain starts and stops.

    reg_steps None (the paper): r in 0..T-1 is a chain index, s = min(r + k, T), k ordinary steps.
    reg_steps = S (an extension: the regulariser on a few-step chain): r in 0..S-1 is a *position*
    on the S-step grid g = times(T, 0, S) counted from the bottom (g_0 = 0, g_S = T); the chain
    starts at g_{min(r + k, S)} and takes min(k, S - r) respaced steps down to r_t = g_r. The caller
    draws r uniformly in 0..S-1 (positions, not indices); S = T gives back the paper's chain.
    """
    if reg_steps is None:
        return min(r + k, T), r
    if not 0 <= r < reg_steps:
        raise ValueError(f'with reg_steps={reg_steps}, r is a grid position in 0..{reg_steps - 1}, got {r}')
    g = times(T, 0, reg_steps)[::-1]
    return g[min(r + k, reg_steps)], g[r]


def consistency_reg(model, diff, x0_a, x0_b, r, k, noise, grad='full', warm_start=True,
                    kernel='multigauss', stat='mmd', estimator='v', reg_steps=None):
    """L_r^reg with bootstrapping (Eq. 14-16, Algorithm 1) for one regularised step r.

    x0_a (n, ...): real samples that warm-start the chain; x0_b (m, ...): independent real samples
    for the forward marginal q(x_r). r in 0..T-1 and k in 1..L are shared by the whole batch,
    since MMD compares two sets at the same step; s = min(r + k, T).
    noise: callable(shape) -> standard normal tensor on the right device (the caller's RNG).
    grad: 'full' backpropagates through all k steps (paper and official code); 'last' only
    through the final step (cheaper). warm_start False: x~_s ~ N(0, I) (Table 2's ablation).
    stat: 'mmd' (Eq. 14 regularises D_MMD itself) or 'mmd2' (its square, as the released code).
    reg_steps S: the k steps are respaced steps of the S-step chain; r is then a grid position
    (see reg_chain_times). Returns the scalar L_r^reg (before w_r and lambda_reg).
    """
    if grad not in ('full', 'last'):
        raise ValueError(f"reg grad must be 'full' or 'last', got {grad!r}")
    T = diff.T
    s, r_t = reg_chain_times(T, r, k, reg_steps)
    if reg_steps is None:
        ts = list(range(s, r_t - 1, -1))
    else:
        ts = [t for t in times(T, 0, reg_steps) if r_t <= t <= s]
    # Eq. (15): warm start from the forward process at step s (the possibly biased estimate)
    x = diff.q_sample(x0_a, s, noise(x0_a.shape)) if warm_start else noise(x0_a.shape)
    # Eq. (16): the chain's backward steps s -> r_t ('last': all but the final one without grad)
    if grad == 'last' and len(ts) > 2:
        with torch.no_grad():
            x = diff.sample_chain(model, x, steps=ts[:-1], noise=noise)
        ts = ts[-2:]
    x = diff.sample_chain(model, x.detach() if grad == 'last' else x, steps=ts, noise=noise)
    # forward samples of q(x_r) from the other batch (at r = 0: the data themselves)
    y = diff.q_sample(x0_b, r_t, noise(x0_b.shape)) if r_t > 0 else x0_b
    if stat == 'mmd':
        return mmd(x, y, kernel, estimator)
    if stat == 'mmd2':
        return mmd2(x, y, kernel, estimator)
    raise ValueError(f"reg stat must be 'mmd' or 'mmd2', got {stat!r}")


# ---- the error-propagation curve D_MMD(t) (Sec. 4.2, Fig. 1) ---------------------------------

def _measured(ts, t_stride):
    """The visited indices to measure: every t_stride-th position counted from the bottom of the
    chain, plus the first. t_stride None: all of them up to 100 steps, else every 10th."""
    n = len(ts) - 1
    t_stride = t_stride or (1 if n <= 100 else 10)
    return {t for p, t in enumerate(ts[::-1]) if p % t_stride == 0 or p == n}


def _mean_std(x):
    """Mean over elements of the per-element std over the set (ADM-ES's statistic)."""
    return x.flatten(1).float().std(0, unbiased=False).mean().item()


@torch.no_grad()
def errprop_curve(model, diff, x0_real, n=1000, kernels=('gaussian', 'laplace', 'imq'),
                  estimator='u', t_stride=None, generator=None, batch_size=None, progress=None,
                  device='cpu', sampler='ddpm', steps=None, eta=0.0, eps_scale=None, x_T=None,
                  ref_generator=None, return_samples=False, time_shift=None):
    """D_MMD(t) between the backward marginal p_theta(x_t) and the forward q(x_t) at the indices
    the chain visits (sampler / steps / eta / eps_scale / time_shift as in Diffusion.sample_chain).

    Runs the chain from n noise samples and, at every t_stride-th visited index (counted from
    t = 0; always the first and the last; t_stride None: all up to 100 steps, else every 10th),
    compares the n backward samples with M = len(x0_real) forward samples x_t = sqrt(abar_t) x_0 +
    sqrt(1 - abar_t) eps drawn afresh (Eq. 1). Computed on the fly: only the current state of the
    chain is kept. batch_size chunks the network calls (memory). Randomness: x_T (n, ...) or
    n draws from generator; each step's z from generator; the forward samples from ref_generator
    (None: generator, one stream for all three, drawn in turn).
    Returns {'t': [...], kernel: [value per t], 'delta', 'std', 'std_q'}: MMD values (not squared);
    return_samples: (that dict, the chain's n final samples x_0), so that one chain also scores S;
    with estimator 'u' a negative MMD^2 estimate is reported as -sqrt(|MMD^2|) so that the
    estimator's noise around 0 stays visible instead of being clipped.

    delta_t: the exposure-bias measure of ADM-ES (Ning et al., ICLR 2024, Sec. 4, "metric for
    exposure bias"): delta_t = (std_t - std_q_t)^2, the squared gap between the standard deviation
    of the sampled x_t and that of the training-time x_t. As in their code (branch
    x_t_distribution_*), a std is the per-element std over the samples, averaged over elements.
    ADM-ES starts each chain from q(x_T | x_0) with a known x_0 and takes std_q = sqrt(1 - abar_t)
    (the std of q(x_t | x_0)); the chain here starts from N(0, I) with no x_0 attached, so the
    reference is the forward *marginal*: std_q_t = mean over elements of
    sqrt(abar_t var(x_0) + 1 - abar_t), var(x_0) the per-element variance of x0_real. This draws
    nothing from the generator, so the D_MMD values are those of the chain without it.
    """
    x0_real = x0_real.to(device)
    var0 = x0_real.flatten(1).float().var(0, unbiased=False)
    out = {'t': [], **{k: [] for k in kernels}, 'delta': [], 'std': [], 'std_q': []}
    net = chunked(model, batch_size) if batch_size else model
    ts = diff.times(diff.T, 0, steps)
    keep = _measured(ts, t_stride)

    def measure(t, x):
        if t not in keep:
            return
        eps = torch.randn(x0_real.shape, generator=ref_generator or generator, device=device)
        y = diff.q_sample(x0_real, t, eps) if t > 0 else x0_real
        out['t'].append(t)
        for k, v in mmd2_many(x, y, kernels, estimator).items():
            out[k].append(signed_sqrt(v.item()))
        a = diff.abar[t].item()
        sd, sd_q = _mean_std(x), (a * var0 + 1 - a).sqrt().mean().item()
        out['std'].append(sd)
        out['std_q'].append(sd_q)
        out['delta'].append((sd - sd_q) ** 2)
        if progress is not None:
            progress(t)

    x = torch.randn((n, *x0_real.shape[1:]), generator=generator, device=device) if x_T is None else x_T.to(device)
    x = diff.sample_chain(net, x, diff.T, 0, sampler, steps, generator, measure, eta, eps_scale, time_shift=time_shift)
    return (out, x) if return_samples else out


# ---- Theorem 4.1 tested directly: does the chain remove an error it receives? ------------------

@torch.no_grad()
def fault_tolerance(model, diff, x_T, t0, delta, mode='iso', sampler='ddpm', steps=None, eta=0.0,
                    eps_scale=None, noise_seed=0, kernels=('gaussian',), batch_size=None,
                    device='cpu', generators=None, time_shift=None):
    """Follow the gap between two chains that differ only by a perturbation injected at t0.

    Both chains start from the same x_T (n, ...) and share the noise z of every step: one chain of
    n runs through sample_chain, and when it reaches the visited index t0 a perturbed copy
    x_t0 + e with RMS(e) = delta joins the batch (a noise callable draws n and repeats it):
      'iso'  : e isotropic Gaussian (its own generator);
      'model': e along the model's own eps_theta(x_t0, t0) (per sample, scaled to RMS delta over
               the batch). This is the direction of the error that epsilon scaling (ADM-ES)
               corrects: a step run with eps / lambda instead of eps moves its output by
               c_t (1 - 1 / lambda) eps_theta, so e is the state error of a mis-scaled eps.
    At every visited t <= t0 it records gap(t) = RMS of (second - first), the amplification
    A(t) = gap(t) / gap(t0) (Theorem 4.1: a chain that removes errors has A < 1), and D_MMD between
    the perturbed and unperturbed sets (signed sqrt of the unbiased MMD^2, as errprop_curve).
    t0 may be a list: every t0 gets its own copy, forked from the one shared unperturbed chain
    (the same numbers as separate calls, for n (T + sum_t0 t0) network rows instead of
    2 n T per call).
    Randomness: generators {'chain': z of every step, 'perturb': e} (runtime.eval_rngs: streams
    apart from the one x_T came from); None: the old seeds noise_seed and noise_seed + 1, with which
    an x_T drawn from manual_seed(noise_seed) IS the first step's z. Every t0's e is drawn from the
    perturb stream's starting state, as a call of its own would draw it.
    Returns dict(t, gap, amp, mmd={kernel: [...]}, and the settings), or for a list of t0 the
    list of those dicts.
    """
    if delta < 0:
        raise ValueError(f'delta is the RMS of the perturbation: must be >= 0, got {delta}')
    if mode not in ('iso', 'model'):
        raise ValueError(f"mode must be 'iso' or 'model', got {mode!r}")
    ts = diff.times(diff.T, 0, steps)
    many = isinstance(t0, (list, tuple))
    t0s = list(t0) if many else [t0]
    for t in t0s:
        if t not in ts or (mode == 'model' and t == 0):
            raise ValueError(f't0={t} is not visited by this chain; pick one of its indices '
                             f'{ts[:3]} ... {ts[-3:]} (times(T, 0, steps={steps}); t0 >= 1 for mode "model")')
    x_T = x_T.to(device)
    n = len(x_T)
    if generators is None:
        generators = {k: torch.Generator(device=device).manual_seed(noise_seed + i)
                      for i, k in enumerate(('chain', 'perturb'))}
    g, gp = generators['chain'], generators['perturb']
    perturb_start = gp.get_state()
    net = chunked(model, batch_size) if batch_size else model

    def noise(shape):   # the same z for every copy
        z = torch.randn((n, *shape[1:]), generator=g, device=device)
        return torch.cat([z] * (shape[0] // n))

    outs = {t: dict(t=[], gap=[], amp=[], mmd={k: [] for k in kernels}, t0=t, delta=delta, mode=mode,
                    sampler=sampler, steps=steps, eta=eta, n=n) for t in t0s}
    forks = []   # the t0 of each perturbed copy, in the order of its rows after the first n

    def step(t, x):
        a = x[:n]
        if t in outs:
            if mode == 'iso':
                gp.set_state(perturb_start)
                e = torch.randn(a.shape, generator=gp, device=device)
            else:   # (a scale lambda would not change the direction)
                e = diff.eps(net, a, t)
            x = torch.cat([x, a + e * (delta / e.float().pow(2).mean().sqrt().clamp(min=1e-30))])
            forks.append(t)
        for i, t_fork in enumerate(forks):
            out, b = outs[t_fork], x[n * (i + 1):n * (i + 2)]
            out['t'].append(t)
            out['gap'].append((b - a).float().pow(2).mean().sqrt().item())
            out['amp'].append(out['gap'][-1] / out['gap'][0] if out['gap'][0] > 0 else float('nan'))
            for k, v in (mmd2_many(a, b, kernels, 'u') if kernels else {}).items():   # kernels=(): gaps only
                out['mmd'][k].append(signed_sqrt(v.item()))
        return x

    # A difference of two chains: with a bf16 network each copy's eps carries its own rounding
    # (~4e-3 relative) that does not cancel in b - a and floors the gap (measured: A(t) moves by up
    # to 0.017, 10x the seed spread, results/dtype_toy.json), so the network runs in fp32 here.
    dtype = diff.net_dtype
    try:
        diff.net_dtype = 'fp32'
        diff.sample_chain(net, x_T, diff.T, 0, sampler, steps, noise, step, eta, eps_scale, time_shift=time_shift)
    finally:
        diff.net_dtype = dtype
    return [outs[t] for t in t0s] if many else outs[t0]


def chunked(model, batch_size):
    """Wrap a network so that one call on a large batch runs in chunks of batch_size."""
    def run(x, t):
        return torch.cat([model(xc, tc) for xc, tc in zip(x.split(batch_size), t.split(batch_size))])
    return run
