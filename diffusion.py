"""DDPM (Ho et al. 2020) as restated in the paper's Sec. 2: the noise schedule, the forward
process q(x_t | x_0), the training losses and the backward samplers.

Index convention. The chain index t runs over 1..T as in the paper, with x_0 the data. Every
schedule array below is padded at index 0 (beta_0 = 0, abar_0 = 1), so `abar[t]` is literally
the paper's abar_t. Networks are called with the 0-based index t - 1, as in DDPM's code and in
diffusers, so that released weights load unchanged; `Diffusion.eps` is the one place that
does the shift.

Losses (all means over every element, i.e. Eq. (5) divided by the dimension K):
  eps  : ||eps - eps_theta(x_t, t)||^2                                   Eq. (5)
  ip   : input perturbation (ADM-IP): x_t built from eps + gamma xi, target eps
  sa   : sequence-aware loss of SA-DPM: eps-MSE + lambda * SA
Samplers: `sample_chain` is the one backward loop (ancestral Eq. (16) or DDIM), used by the
training previews, sample.py, the D_MMD(t) measurement and the regulariser's bootstrapped chain.
"""
import torch


def _at(a, t, x):
    """Gather schedule values a[t] (t: int or LongTensor (B,)) and broadcast against x."""
    if isinstance(t, int):
        return a[t]
    return a[t].view(-1, *([1] * (x.dim() - 1)))


class Diffusion:
    """Linear beta schedule and everything that depends on it.

    sigma: 'beta' gives sigma_t^2 = beta_t (the paper's choice, Sec. 7.1); 'posterior' gives the
    posterior variance beta~_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t (DDPM's other choice).
    """

    def __init__(self, T=1000, beta_1=1e-4, beta_T=0.02, sigma='beta', device='cpu'):
        if sigma not in ('beta', 'posterior'):
            raise ValueError(f"sigma must be 'beta' or 'posterior', got {sigma!r}")
        self.T, self.sigma_type = T, sigma
        beta = torch.cat([torch.zeros(1, dtype=torch.float64),
                          torch.linspace(beta_1, beta_T, T, dtype=torch.float64)])
        alpha = 1.0 - beta
        abar = torch.cumprod(alpha, 0)                      # abar[0] = 1
        if sigma == 'beta':
            var = beta.clone()
        else:
            var = torch.zeros_like(beta)
            var[1:] = (1 - abar[:-1]) / (1 - abar[1:]).clamp(min=1e-20) * beta[1:]
        # double precision for the products above, float32 for use
        f = dict(dtype=torch.float32, device=device)
        self.beta, self.alpha, self.abar = beta.to(**f), alpha.to(**f), abar.to(**f)
        self.sqrt_abar, self.sqrt_1m_abar = abar.sqrt().to(**f), (1 - abar).sqrt().to(**f)
        self.sigma = var.sqrt().to(**f)
        self.device = device

    # ---- forward process -------------------------------------------------------------------
    def q_sample(self, x0, t, noise):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (closed form of Eq. (1)). t: int or (B,)."""
        return _at(self.sqrt_abar, t, x0) * x0 + _at(self.sqrt_1m_abar, t, x0) * noise

    def eps(self, model, x, t):
        """eps_theta(x_t, t) for chain index t (int or (B,) in 1..T); the net sees t - 1."""
        if isinstance(t, int):
            t = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        return model(x, t - 1)

    # ---- losses ----------------------------------------------------------------------------
    def loss_eps(self, model, x0, t, noise):
        """L_t^nll of Eq. (5) (mean over elements). x0 (B,...), t (B,) in 1..T, noise like x0."""
        return (noise - self.eps(model, self.q_sample(x0, t, noise), t)).float().pow(2).mean()

    def loss_ip(self, model, x0, t, noise, xi, gamma):
        """ADM-IP (Ning et al. 2023): the input is built from eps + gamma * xi, the target stays eps."""
        x_t = self.q_sample(x0, t, noise + gamma * xi)
        return (noise - self.eps(model, x_t, t)).float().pow(2).mean()

    def loss_sa(self, model, x0, t, noises, lam):
        """SA-DPM (seed 003): eps-MSE + lam * (1/K^2) || sum_k m_k (eps_k - eps_theta(x_{t-k}, t-k)) ||^2.

        noises: list of K tensors like x0; noises[k] draws an independent x_{t-k} of the same x_0.
        m_k masks the terms whose step t - k falls below 1. Returns (total, mse, sa).
        """
        K = len(noises)
        gap, mse = 0.0, None
        for k, eps_k in enumerate(noises):
            tk = t - k
            m = (tk >= 1).to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
            tk = tk.clamp(min=1)
            diff = eps_k - self.eps(model, self.q_sample(x0, tk, eps_k), tk)
            if k == 0:
                mse = diff.float().pow(2).mean()
            gap = gap + m * diff
        sa = gap.float().pow(2).mean() / K ** 2
        return mse + lam * sa, mse, sa

    # ---- backward process ------------------------------------------------------------------
    def p_step(self, model, x_t, t, noise=None):
        """One backward step of Eq. (16): x_t -> x_{t-1} (t an int in 1..T).

        x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) * eps_theta(x_t, t)) / sqrt(alpha_t) + sigma_t z;
        no noise at the last step (t = 1), as in DDPM.
        """
        eps = self.eps(model, x_t, t)
        mean = (x_t - self.beta[t] / self.sqrt_1m_abar[t] * eps) / self.alpha[t].sqrt()
        if t == 1 or noise is None:
            return mean
        return mean + self.sigma[t] * noise

    def ddim_step(self, model, x_t, t, t_next):
        """Deterministic DDIM step (eta = 0) from chain index t to t_next < t."""
        eps = self.eps(model, x_t, t)
        x0_pred = (x_t - self.sqrt_1m_abar[t] * eps) / self.sqrt_abar[t]
        return self.sqrt_abar[t_next] * x0_pred + self.sqrt_1m_abar[t_next] * eps

    def ddim_times(self, t_start, t_stop, steps):
        """Chain indices visited by DDIM with `steps` steps: evenly spaced from t_start to t_stop."""
        ts = torch.linspace(t_start, t_stop, steps + 1).round().long().tolist()
        return sorted(set(ts), reverse=True)

    def sample_chain(self, model, x, t_start=None, t_stop=0, sampler='ddpm', steps=None,
                     generator=None, callback=None):
        """Run the backward chain from x = x_{t_start} down to x_{t_stop}; returns x_{t_stop}.

        sampler: 'ddpm' (ancestral, Eq. (16), every step) or 'ddim' (eta = 0, `steps` steps).
        generator: torch.Generator for the ancestral noise z (reproducible chains).
        callback(t, x_t) is called with the starting state and after every step, so a caller can
        measure the chain on the fly (D_MMD(t)) without storing trajectories.
        Gradients flow if the caller has them enabled (the regulariser); wrap in torch.no_grad()
        for sampling.
        """
        t_start = self.T if t_start is None else t_start
        if not 0 <= t_stop < t_start <= self.T:
            raise ValueError(f'need 0 <= t_stop < t_start <= T, got t_start={t_start}, t_stop={t_stop}')
        if callback is not None:
            callback(t_start, x)
        if sampler == 'ddpm':
            for t in range(t_start, t_stop, -1):
                z = None
                if t > 1:
                    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = self.p_step(model, x, t, z)
                if callback is not None:
                    callback(t - 1, x)
        elif sampler == 'ddim':
            ts = self.ddim_times(t_start, t_stop, steps or 100)
            for t, t_next in zip(ts[:-1], ts[1:]):
                x = self.ddim_step(model, x, t, t_next)
                if callback is not None:
                    callback(t_next, x)
        else:
            raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
        return x

    @torch.no_grad()
    def sample(self, model, shape, sampler='ddpm', steps=None, generator=None, callback=None,
               device=None):
        """Draw samples of `shape` (B, ...) from x_T ~ N(0, I) with the full chain."""
        device = device or self.device
        x = torch.randn(shape, generator=generator, device=device)
        return self.sample_chain(model, x, self.T, 0, sampler, steps, generator, callback)
