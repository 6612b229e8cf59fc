"""Maximum mean discrepancy: kernels, estimators, the paper's consistency regulariser with
TD-style bootstrapping (Sec. 5, Eq. 14-16, Algorithm 1) and the error-propagation curve D_MMD(t)
(Sec. 4.2, Eq. 8-10, Fig. 1).

Kernels act on squared Euclidean distances between flattened samples. Their bandwidth comes from
the pooled set {x} u {y} (median or mean pairwise squared distance), is detached from the graph
and recomputed for every call, i.e. at every t.
"""
import math

import torch

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
    """{kernel: (Kxx, Kyy, Kxy)} for several kernels, sharing one distance matrix and bandwidth."""
    bad = [k for k in kernels if k not in KERNELS]
    if bad:
        raise ValueError(f'unknown kernel {bad[0]!r}; choose one of {KERNELS}')
    x, y = x.flatten(1).float(), y.flatten(1).float()
    z = torch.cat([x, y])
    n, off = len(x), ~torch.eye(len(z), dtype=torch.bool, device=z.device)
    with torch.autocast(z.device.type, enabled=False):   # |a|^2 + |b|^2 - 2ab cancels: keep fp32
        d2 = pairwise_sq_dists(z, z) * off   # exact zeros on the diagonal despite float rounding
    with torch.no_grad():   # the bandwidth is a statistic of the pooled set, not a path for gradients
        if any(k != 'multigauss' for k in kernels):
            h_med = d2[off].median().clamp(min=1e-12)
        if 'multigauss' in kernels:
            h_mean = d2[off].mean().clamp(min=1e-12)
    out = {}
    for kernel in kernels:
        if kernel == 'gaussian':
            k = torch.exp(-d2 / (2 * h_med))
        elif kernel == 'laplace':
            # sqrt has an infinite slope at 0: clamp, then restore the exact zeros of the diagonal
            d = d2.clamp(min=1e-12).sqrt() * off
            k = torch.exp(-d / h_med.sqrt())
        elif kernel == 'imq':
            k = (1 + d2 / h_med).rsqrt()
        else:
            k = sum(torch.exp(-d2 / (h_mean * 2.0 ** i)) for i in range(-2, 3))
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


def mmd2_vstat(x, y, kernel='gaussian'):
    """Eq. (10): (1/N^2) sum Kxx + (1/M^2) sum Kyy - (2/NM) sum Kxy. Biased, >= 0, floor O(1/N)."""
    return _estimate(*kernel_matrices(x, y, kernel), 'v')


def mmd2_unbiased(x, y, kernel='gaussian'):
    """Unbiased U-statistic of MMD^2: the diagonals of Kxx and Kyy left out. Can be < 0."""
    return _estimate(*kernel_matrices(x, y, kernel), 'u')


def mmd2(x, y, kernel='gaussian', estimator='v'):
    """MMD^2 with estimator 'v' (Eq. 10) or 'u' (unbiased)."""
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


def consistency_reg(model, diff, x0_a, x0_b, r, k, noise, grad='full', warm_start=True,
                    kernel='multigauss', stat='mmd', estimator='v'):
    """L_r^reg with bootstrapping (Eq. 14-16, Algorithm 1) for one regularised step r.

    x0_a (n, ...): real samples that warm-start the chain; x0_b (m, ...): independent real samples
    for the forward marginal q(x_r). r in 0..T-1 and k in 1..L are shared by the whole batch,
    since MMD compares two sets at the same step; s = min(r + k, T).
    noise: callable(shape) -> standard normal tensor on the right device (the caller's RNG).
    grad: 'full' backpropagates through all k steps (paper and official code); 'last' only
    through the final step (cheaper). warm_start False: x~_s ~ N(0, I) (Table 2's ablation).
    stat: 'mmd' (Eq. 14 regularises D_MMD itself) or 'mmd2' (its square, as the released code).
    Returns the scalar L_r^reg (before w_r and lambda_reg).
    """
    T = diff.T
    s = min(r + k, T)
    # Eq. (15): warm start from the forward process at step s (the possibly biased estimate)
    x = diff.q_sample(x0_a, s, noise(x0_a.shape)) if warm_start else noise(x0_a.shape)
    # Eq. (16): s - r backward steps of the model
    if grad == 'full':
        for t in range(s, r, -1):
            x = diff.p_step(model, x, t, noise(x.shape) if t > 1 else None)
    elif grad == 'last':
        with torch.no_grad():
            for t in range(s, r + 1, -1):
                x = diff.p_step(model, x, t, noise(x.shape))
        x = diff.p_step(model, x.detach(), r + 1, noise(x.shape) if r + 1 > 1 else None)
    else:
        raise ValueError(f"reg grad must be 'full' or 'last', got {grad!r}")
    # forward samples of q(x_r) from the other batch (at r = 0: the data themselves)
    y = diff.q_sample(x0_b, r, noise(x0_b.shape)) if r > 0 else x0_b
    if stat == 'mmd':
        return mmd(x, y, kernel, estimator)
    if stat == 'mmd2':
        return mmd2(x, y, kernel, estimator)
    raise ValueError(f"reg stat must be 'mmd' or 'mmd2', got {stat!r}")


# ---- the error-propagation curve D_MMD(t) (Sec. 4.2, Fig. 1) ---------------------------------

@torch.no_grad()
def errprop_curve(model, diff, x0_real, n=1000, kernels=('gaussian', 'laplace', 'imq'),
                  estimator='u', t_stride=1, generator=None, batch_size=None, progress=None,
                  device='cpu'):
    """D_MMD(t) between the backward marginal p_theta(x_t) and the forward q(x_t), t = T..0.

    Runs the ancestral chain (Eq. 16) from n noise samples and, at every t_stride-th step (and at
    t = T and t = 0), compares the n backward samples with M = len(x0_real) forward samples
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps drawn afresh (Eq. 1). Computed on the fly: only
    the current state of the chain is kept. batch_size chunks the network calls (memory).
    Returns {'t': [...], kernel: [value per t], ...} with MMD (not squared) values;
    with estimator 'u' a negative MMD^2 estimate is reported as -sqrt(|MMD^2|) so that the
    estimator's noise around 0 stays visible instead of being clipped.
    """
    x0_real = x0_real.to(device)
    out = {'t': [], **{k: [] for k in kernels}}
    net = chunked(model, batch_size) if batch_size else model

    def measure(t, x):
        if not (t % t_stride == 0 or t in (0, diff.T)):
            return
        eps = torch.randn(x0_real.shape, generator=generator, device=device)
        y = diff.q_sample(x0_real, t, eps) if t > 0 else x0_real
        out['t'].append(t)
        for k, v in mmd2_many(x, y, kernels, estimator).items():
            v = v.item()
            out[k].append(signed_sqrt(v))
        if progress is not None:
            progress(t)

    x = torch.randn((n, *x0_real.shape[1:]), generator=generator, device=device)
    diff.sample_chain(net, x, diff.T, 0, 'ddpm', generator=generator, callback=measure)
    return out


def chunked(model, batch_size):
    """Wrap a network so that one call on a large batch runs in chunks of batch_size."""
    def run(x, t):
        return torch.cat([model(xc, tc) for xc, tc in zip(x.split(batch_size), t.split(batch_size))])
    return run
