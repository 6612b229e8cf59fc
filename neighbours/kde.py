"""The seed-001 paper's "model" for its synthetic recursive-retraining experiment (arXiv 2602.16601):
the exact score of a Gaussian kernel density estimate, forward-diffused, and the reverse VP-SDE
sampler that uses it; and the third-party analytic closure of that setting. collapse.py --score kde
runs the protocol.

The model's score at diffusion time t is the EXACT score of the forward-diffused KDE: under the VP
SDE dx = -beta(t) x / 2 dt + sqrt(beta(t)) dW, x_t = m(t) x_0 + s(t) eps with m = exp(-B/2),
s^2 = 1 - exp(-B), B(t) = int_0^t beta, the KDE
(1/n) sum_i N(x_i, h^2 I) diffuses to (1/n) sum_i N(m x_i, (m^2 h^2 + s^2) I), whose score is
(m sum_i w_i x_i - x) / (m^2 h^2 + s^2), w = softmax_i(-||x - m x_i||^2 / (2 (m^2 h^2 + s^2))), computed
exactly in row chunks (N x n distances per step). beta(t) = beta_min + (beta_max - beta_min) t / T is
linear on [0, T]: Song et al.'s (2021) VP SDE (0.1, 20 on [0, 1]) stretched to the paper's horizon T = 4
(the paper's beta values were not available to us: --beta-min/--beta-max). Sampling is Euler-Maruyama
of the reverse SDE dx = [-beta x / 2 - beta score] dt + sqrt(beta) dW from x_T ~ N(0, I) at T = 4 down to
t0 = 0.02 in 500 uniform steps (--steps); the last step adds no noise (the mean of the final transition,
as in Song et al.'s samplers), and the state at t0 is returned as the sample: x_t0 = m(t0) x_0 +
s(t0) eps differs from a KDE draw by m(t0) = 0.9985 and s(t0)^2 = 0.003 (h^2 = 0.36), so no Tweedie
denoising, which would also shrink the KDE's own h^2 spread. Sampling costs N x n distances per step: the paper's
N = n = 100,000 is out of reach on a CPU (README.md gives the times and the effect of n).
"""
import math

import torch

import data as D


class VPSchedule:
    """VP SDE with beta(t) = beta_min + (beta_max - beta_min) t / T on [0, T]."""

    def __init__(self, T=4.0, beta_min=0.1, beta_max=20.0):
        self.T, self.b0, self.b1 = float(T), float(beta_min), float(beta_max)

    def beta(self, t):
        return self.b0 + (self.b1 - self.b0) * t / self.T

    def integral(self, t):                      # B(t) = int_0^t beta
        return self.b0 * t + (self.b1 - self.b0) * t * t / (2 * self.T)

    def m_s2(self, t):
        """x_t = m x_0 + s eps: (m(t), s(t)^2)."""
        B = self.integral(t)
        return math.exp(-B / 2), -math.expm1(-B)


def kde_score(x, X, m, s2, h, chunk=2_000_000):
    """Exact score at x (N, D) of (1/n) sum_i N(m X_i, (m^2 h^2 + s2) I): the KDE of X (n, D) with
    bandwidth h, forward-diffused to the time where x_t = m x_0 + sqrt(s2) eps. In x's dtype."""
    X = X.to(x.dtype)
    var = m * m * h * h + s2
    half_sq = 0.5 * m * m * X.pow(2).sum(1)                # ||x||^2 cancels in the softmax
    out = torch.empty_like(x)
    rows = max(1, chunk // max(1, len(X)))
    for i in range(0, len(x), rows):
        xb = x[i:i + rows]
        w = torch.softmax((m * (xb @ X.T) - half_sq) / var, dim=1)
        out[i:i + rows] = (m * (w @ X) - xb) / var
    return out


def kde_log_density(x, X, m, s2, h):
    """log of the same diffused KDE density at x (for tests: its autograd gradient is the score)."""
    var = m * m * h * h + s2
    d2 = (x[:, None, :] - m * X[None]).pow(2).sum(-1)
    return torch.logsumexp(-d2 / (2 * var), 1) - math.log(len(X)) - 0.5 * x.shape[1] * math.log(2 * math.pi * var)


def sample_kde(X, N, h, sched, steps, t0, generator, chunk=2_000_000):
    """N samples of the KDE model of X: Euler-Maruyama of the reverse VP SDE from x_T ~ N(0, I) to t0
    in `steps` uniform steps with the exact diffused-KDE score; no noise on the last step."""
    x = torch.randn(N, X.shape[1], generator=generator)
    ts = torch.linspace(sched.T, t0, steps + 1, dtype=torch.float64).tolist()
    for k in range(steps):
        t, dt = ts[k], ts[k] - ts[k + 1]
        b = sched.beta(t)
        m, s2 = sched.m_s2(t)
        x = x + (0.5 * b * x + b * kde_score(x, X, m, s2, h, chunk)) * dt
        if k < steps - 1:
            x = x + math.sqrt(b * dt) * torch.randn(x.shape, generator=generator)
    return x


def within_var(x, name):
    """Per-coordinate second moment of x about the nearest true component mean (mixture toy sets)."""
    comp = D.toy_components(name)
    if comp is None:
        return None
    mu = comp[0].to(x.dtype)
    d2 = torch.cdist(x, mu).pow(2).min(1).values
    return float(d2.mean() / x.shape[1])


def closure_drift_pct(alpha, g, h, name):
    """Third-party closure (see the docstring): drift % of E||x||^2 / D at generation g."""
    return 100.0 * h * h * (1 - (1 - alpha) ** g) / alpha / D.toy_second_moment(name)


def closure_within_var(alpha, g, h, name):
    comp = D.toy_components(name)
    return None if comp is None else comp[1] ** 2 + h * h * (1 - (1 - alpha) ** g) / alpha
