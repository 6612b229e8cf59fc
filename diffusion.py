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
Samplers: `sample_chain` is the one backward loop (ancestral Eq. (16), respaced to S steps as in
improved DDPM / ADM, or DDIM with eta; optional epsilon scaling of ADM-ES), used by the training
previews, sample.py, the D_MMD(t) measurement, fault_tolerance and the regulariser's chain.
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

    def __init__(self, T=1000, beta_1=1e-4, beta_T=0.02, sigma='beta', device='cpu', net_dtype='fp32'):
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
        self._abar64 = abar   # float64, for the respaced and DDIM-eta coefficients
        self.device = device
        if net_dtype not in ('fp32', 'bf16'):
            raise ValueError(f"net_dtype must be 'fp32' or 'bf16', got {net_dtype!r}")
        self.net_dtype = net_dtype   # the network's arithmetic only: schedule and x updates stay fp32

    # ---- forward process -------------------------------------------------------------------
    def q_sample(self, x0, t, noise):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (closed form of Eq. (1)). t: int or (B,)."""
        return _at(self.sqrt_abar, t, x0) * x0 + _at(self.sqrt_1m_abar, t, x0) * noise

    def eps(self, model, x, t):
        """eps_theta(x_t, t) for chain index t (int or (B,) in 1..T); the net sees t - 1. With
        net_dtype 'bf16' the network runs under bf16 autocast and its output comes back as float32,
        so that the chain's arithmetic, the losses and MMD stay in float32."""
        if isinstance(t, int):
            t = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        if self.net_dtype == 'fp32':
            return model(x, t - 1)
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return model(x, t - 1).float()

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
    def _eps(self, model, x, t, lam):
        """eps_theta(x_t, t) / lambda_t: epsilon scaling of ADM-ES (lam None: no scaling)."""
        eps = self.eps(model, x, t)
        return eps if lam is None else eps / lam

    def p_step(self, model, x_t, t, noise=None, t_next=None, lam=None):
        """One ancestral step x_t -> x_{t'} (t' = t_next, default t - 1; ints, t' < t).

        t' = t - 1 is Eq. (16) with the stored float32 beta_t, alpha_t, sigma_t. A longer step is
        the respaced step of improved DDPM / ADM: alpha' = abar_t / abar_t', beta' = 1 - alpha',
        variance beta' ('beta') or (1 - abar_t') / (1 - abar_t) beta' ('posterior'), computed in
        float64 from abar. No noise on the step that lands on t' = 0.
        """
        t_next = t - 1 if t_next is None else t_next
        if isinstance(t, int) and t_next == t - 1:
            beta, alpha, sigma = self.beta[t], self.alpha[t], self.sigma[t]
        else:   # t (B,): the time-shifted step, each sample from its own t_s (sample_chain's time_shift)
            a_t, a_n = self._abar_at(t, x_t), self._abar64[t_next]
            alpha = a_t / a_n
            var = (1 - alpha) * ((1 - a_n) / (1 - a_t) if self.sigma_type == 'posterior' else 1.0)
            f = dict(dtype=torch.float32, device=x_t.device)
            beta, alpha, sigma = (1 - alpha).to(**f), alpha.to(**f), var.sqrt().to(**f)
        eps = self._eps(model, x_t, t, lam)
        mean = (x_t - beta / _at(self.sqrt_1m_abar, t, x_t) * eps) / alpha.sqrt()
        if t_next == 0 or noise is None:
            return mean
        return mean + sigma * noise

    def ddim_step(self, model, x_t, t, t_next, noise=None, eta=0.0, lam=None):
        """DDIM step from chain index t to t_next < t (Song et al. 2021, Eq. 12):

        x_t' = sqrt(abar_t') x0_pred + sqrt(1 - abar_t' - s^2) eps + s z,
        s = eta sqrt((1 - abar_t') / (1 - abar_t)) sqrt(1 - abar_t / abar_t'); eta = 0: deterministic.
        """
        eps = self._eps(model, x_t, t, lam)
        x0_pred = (x_t - _at(self.sqrt_1m_abar, t, x_t) * eps) / _at(self.sqrt_abar, t, x_t)
        if eta == 0 or t_next == 0 or noise is None:
            return self.sqrt_abar[t_next] * x0_pred + self.sqrt_1m_abar[t_next] * eps
        a_t, a_n = self._abar_at(t, x_t), self._abar64[t_next]
        s = eta * ((1 - a_n) / (1 - a_t) * (1 - a_t / a_n)).sqrt()
        f = dict(dtype=torch.float32, device=self.beta.device)
        c = (1 - a_n - s * s).clamp(min=0).sqrt().to(**f)
        return self.sqrt_abar[t_next] * x0_pred + c * eps + s.to(**f) * noise

    def _abar_at(self, t, x):
        """float64 abar_t for an int t, or for t (B,) broadcast against x (on the CPU, where it lives)."""
        return self._abar64[t] if isinstance(t, int) else _at(self._abar64, t.cpu(), x.cpu())

    def shifted_time(self, x, t, t_next, window, var='sample'):
        """The Time-Shift Sampler's t_s (Li et al., ICLR 2024, Alg. 3): the chain index tau in the window
        [t - window // 2, t + window // 2] (within t_next + 1 .. T, so the step still goes down) whose
        forward noise variance 1 - abar_tau is closest to the variance of the state x: per sample over
        all its dimensions, as the paper (var='sample'), or over the whole batch (var='batch', one t_s
        for all: for low-dimensional data, where one sample's variance says little). Returns t_s (B,)."""
        lo, hi = max(t - window // 2, t_next + 1), min(t + window // 2, self.T)
        cand = torch.arange(lo, hi + 1)
        v = x.detach().flatten(1).float().var(1) if var == 'sample' else x.detach().float().var().expand(len(x))
        best = ((v.cpu()[:, None] - (1 - self.abar.cpu()[cand])[None]).abs()).argmin(1)
        return cand[best].to(x.device)

    def times(self, t_start=None, t_stop=0, steps=None):
        """Chain indices visited from t_start (default T) down to t_stop: see `times` below (an
        explicit list, e.g. adm_times', is returned as it is)."""
        if isinstance(steps, (list, tuple)):
            return list(steps)
        t_start = self.T if t_start is None else t_start
        if not 0 <= t_stop < t_start <= self.T:
            raise ValueError(f'need 0 <= t_stop < t_start <= T, got t_start={t_start}, t_stop={t_stop}')
        return times(t_start, t_stop, steps)

    ddim_times = times   # old name

    def sample_chain(self, model, x, t_start=None, t_stop=0, sampler='ddpm', steps=None, noise=None,
                     callback=None, eta=0.0, eps_scale=None, generator=None, time_shift=None):
        """Run the backward chain from x = x_{t_start} down to x_{t_stop}; returns x_{t_stop}.

        sampler: 'ddpm' (ancestral: Eq. (16), respaced when steps < t_start - t_stop) or 'ddim'
        (`eta` scales its noise; 0: deterministic). steps: int (evenly spaced, see `times`), None
        (every index) or the explicit descending list of visited indices, t_start first, t_stop last.
        noise: source of z, a torch.Generator, None (torch's default generator) or a callable
        noise(shape) -> tensor (shared or recorded noise); `generator=` is the old name for it.
        eps_scale: lambda of epsilon scaling (ADM-ES), eps_theta / lambda_t at every step: None,
        a float, or a tensor (T + 1,) indexed by chain index t (see `eps_scale_schedule`).
        callback(t, x_t) is called with the starting state and after every step; if it returns a
        tensor, that tensor replaces x_t (used to inject perturbations). Gradients flow if enabled.
        time_shift: None, or dict(window=w, cutoff=c, var='sample'|'batch') for the Time-Shift Sampler:
        every step after the first that leaves an index t > c runs the network at, and steps from,
        t_s = shifted_time(x, t, ...) instead of t, to the next index of the grid (Alg. 3 of Li et al.).
        """
        noise = _noise_source(noise, generator)
        if sampler not in ('ddpm', 'ddim'):
            raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
        if eta < 0:
            raise ValueError(f'DDIM eta must be >= 0 (0: deterministic, 1: DDPM-like), got {eta}')
        if isinstance(steps, (list, tuple)):
            ts = list(steps)
            if len(ts) < 2 or any(a <= b for a, b in zip(ts, ts[1:])) or not 0 <= ts[-1] < ts[0] <= self.T:
                raise ValueError(f'explicit steps must be a descending list of chain indices in '
                                 f'0..T, got {ts}')
        else:
            ts = self.times(t_start, t_stop, steps)
        lam = self._lambda(eps_scale, ts[:-1])
        draw = noise if callable(noise) and not isinstance(noise, torch.Generator) else \
            (lambda shape: torch.randn(shape, generator=noise, device=x.device, dtype=x.dtype))
        if callback is not None:
            x = _replace(x, callback(ts[0], x))
        for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
            lt = None if lam is None else lam[t]
            needs_z = t_next > 0 and (sampler == 'ddpm' or eta > 0)
            z = draw(x.shape) if needs_z else None
            shift = time_shift is not None and i > 0 and t > time_shift['cutoff'] and time_shift['window'] > 1
            ts_ = self.shifted_time(x, t, t_next, time_shift['window'], time_shift.get('var', 'sample')) if shift else t
            if sampler == 'ddpm':
                x = self.p_step(model, x, ts_, z, t_next, lt)
            else:
                x = self.ddim_step(model, x, ts_, t_next, z, eta, lt)
            if callback is not None:
                x = _replace(x, callback(t_next, x))
        return x

    def _lambda(self, eps_scale, ts):
        """eps_scale -> None or a (T + 1,) tensor; lambda must be > 0 at every t the chain uses."""
        if eps_scale is None:
            return None
        lam = torch.as_tensor(eps_scale, dtype=torch.float32)
        lam = lam.expand(self.T + 1) if lam.dim() == 0 else lam
        if lam.shape != (self.T + 1,):
            raise ValueError(f'eps_scale must be a float or a tensor of length T + 1 = {self.T + 1}, '
                             f'got shape {tuple(lam.shape)}')
        bad = [t for t in ts if not lam[t] > 0]   # NaN fails too
        if bad:
            raise ValueError(f'eps_scale lambda_t must be > 0 at every visited t, got '
                             f'{lam[bad[0]].item()} at t={bad[0]}; build it with '
                             f'eps_scale_schedule(T, b, k, steps) for this chain')
        return lam.to(self.beta.device)

    @torch.no_grad()
    def sample(self, model, shape, sampler='ddpm', steps=None, noise=None, callback=None,
               device=None, eta=0.0, eps_scale=None, generator=None, time_shift=None):
        """Draw samples of `shape` (B, ...) from x_T ~ N(0, I) with the full chain (see sample_chain)."""
        device = device or self.device
        noise = _noise_source(noise, generator)
        if callable(noise) and not isinstance(noise, torch.Generator):
            x = noise(shape)
        else:
            x = torch.randn(shape, generator=noise, device=device)
        return self.sample_chain(model, x, self.T, 0, sampler, steps, noise, callback, eta, eps_scale,
                                 time_shift=time_shift)


def per_sample_noise(seeds, device='cpu'):
    """A noise source (sample / sample_chain's `noise`) in which row i draws from its own generator,
    seeded seeds[i]: a sample's x_T and every z it sees depend on its seed alone, not on the batch
    it is drawn in, the number of ranks or the device (the per-image seeds of the EDM line of work).
    The draws are made on the CPU and moved once per step: one small draw per row costs little there."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def noise(shape):
        if shape[0] != len(gens):
            raise ValueError(f'per_sample_noise holds {len(gens)} seeds, asked for {shape[0]} rows')
        return torch.stack([torch.randn(shape[1:], generator=g) for g in gens]).to(device)
    return noise


def _noise_source(noise, generator):
    if generator is None:
        return noise
    if noise is not None:
        raise ValueError('pass the noise source as noise= or generator=, not both')
    return generator


def _replace(x, y):
    return x if y is None else y


def times(t_start, t_stop=0, steps=None):
    """The chain indices a chain of `steps` steps visits: evenly spaced from t_start down to t_stop
    (linspace, rounded; steps None: every index). One rule for both samplers. With
    1 <= steps <= t_start - t_stop the spacing is >= 1, so exactly `steps` steps result."""
    if steps is None:
        return list(range(t_start, t_stop - 1, -1))
    if not 1 <= steps <= t_start - t_stop:
        raise ValueError(f'steps must be in 1..{t_start - t_stop} (= t_start - t_stop), got {steps}')
    ts = torch.linspace(t_start, t_stop, steps + 1).round().long().tolist()
    return sorted(set(ts), reverse=True)


def adm_times(T, steps, sampler='ddpm'):
    """The chain indices of ADM's `space_timesteps` grid (openai/improved-diffusion respace.py), the
    grid ADM-ES and ADM-IP report their few-step numbers on, as an explicit list for sample_chain.
    ddpm (ADM's "S"): S 0-based timesteps from 0 to T - 1 at the float stride (T - 1) / (S - 1),
    accumulated and rounded as ADM does (Python's round), so the chain starts at T and its last step
    leaves chain index 1 (timestep 0) for x_0. ddim (ADM's "ddimS", DDIM's own grid): the integer
    stride k with len(range(0, T, k)) == S, i.e. the leading grid, whose chain starts at
    T - k + 1, not T. This project's own grid (`times`) is diffusers' "trailing" one."""
    if not 1 <= steps <= T:
        raise ValueError(f'steps must be in 1..T={T}, got {steps}')
    if sampler == 'ddim':
        stride = next((k for k in range(1, T) if len(range(0, T, k)) == steps), None)
        if stride is None:
            raise ValueError(f"ADM's DDIM grid has no integer stride giving exactly {steps} steps of T = {T}: "
                             'choose another --steps or --spacing trailing')
        kept = set(range(0, T, stride))
    else:
        frac, cur, kept = (T - 1) / (steps - 1) if steps > 1 else 1, 0.0, set()
        for _ in range(steps):
            kept.add(round(cur))
            cur += frac
    return sorted((k + 1 for k in kept), reverse=True) + [0]


def eps_scale_schedule(T, b, k=0.0, steps=None):
    """lambda_t of epsilon scaling (ADM-ES: Ning et al., ICLR 2024, Sec. 5), as a (T + 1,) tensor
    indexed by chain index t, for sample_chain(eps_scale=...).

    The paper's schedule is lambda = k i + b (k = 0: the uniform schedule lambda = b, its default).
    In the released code (forever208/ADM-ES, guided_diffusion/gaussian_diffusion.py, the
    `sampling_scaler` list and _predict_xstart_from_eps) i is the 0-based index of the *respaced*
    timestep, i.e. the step's position on the S-step sampling grid counted from the bottom: i = 0
    is the last step (landing on x_0), i = S - 1 the first (from x_T). The network output is
    divided by lambda before x0_pred and the mean are formed, for both ancestral and DDIM sampling.
    Here i = j - 1 for the step leaving the j-th index from the bottom of times(T, 0, steps)
    (steps None: every index, so i = t - 1; an explicit list of indices, e.g. adm_times: that
    grid). Indices off that grid are NaN (sample_chain refuses
    them), so build the schedule with the same steps as the chain. lambda must be > 0.
    """
    if b <= 0:
        raise ValueError(f'eps scale b must be > 0 (1: no scaling), got {b}')
    lam = torch.full((T + 1,), float('nan'), dtype=torch.float64)
    grid = sorted(steps) if isinstance(steps, (list, tuple)) else times(T, 0, steps)[::-1]   # ascending: grid[j], j = 0..S
    for j in range(1, len(grid)):
        lam[grid[j]] = b + k * (j - 1)
    lam[0] = b   # never used (no step leaves x_0); keeps lambda_0 defined
    if not (lam[grid[1:]] > 0).all():
        raise ValueError(f'eps scale k t + b must stay > 0 on all {len(grid) - 1} steps, got b={b}, k={k}')
    return lam.float()
