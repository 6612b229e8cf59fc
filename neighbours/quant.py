"""Post-training quantised sampling and timestep-aware error compensation (seed 002; DESIGN.md Sec. 6).

Fake quantisation (quantise-dequantise in float): weights of every nn.Conv2d / nn.Linear per output
channel (w4a4: per output channel and group of 64 along the input dimension, per channel where that
dimension is < 64); their INPUT activations per tensor, with a scale frozen from an offline
calibration (no SVDQuant-style low-rank branch: our W4A4 is plain per-tensor 4-bit activations).
Every step of the quantised chain adds an error eps_q(x_t) - eps(x_t) that the chain carries on to x_0.

Compensations, all calibrated offline on trajectories of the chain used for sampling (FP chains; at
every visited t both nets see the same x_t), per (t, channel):
  bias       : subtract the mean error E[eps_q - eps]                      (per step, ablation)
  affine     : least squares eps ~ a eps_q + b                             (per step, ablation)
  cumulative : the error model delta_t = eps_q - eps ~ K_t (.) eps_q (K by least squares, no
               intercept) and the cumulative compensation over a window of m steps (seed 002's
               scheme as reconstructed in DESIGN.md Sec. 6; CumulativeCompensated below).

    python evaluate.py quanterr --ckpt out/8gaussians --quant w8a8 w4a8 w4a4 --comp none affine cumulative

quanterr.py measures what these cost (the quanterr command).
"""
import copy
import math
import os
import re

import torch
import torch.nn as nn

import runtime as R

SPECS = ('w8a8', 'w4a8', 'w4a4')
FITS = ('affine', 'bias', 'scale')
COMPS = ('none', 'bias', 'affine', 'cumulative')
W4A4_GROUP = 64


def parse_spec(spec):
    """'w8a8' -> (8, 8): weight bits, activation bits. An optional 'g<N>' suffix ('w4a8g64') sets a
    weight group size; w4a4 means w4a4g64 (see weight_group)."""
    m = re.fullmatch(r'w(\d+)a(\d+)(?:g(\d+))?', str(spec))
    if not m or not all(2 <= int(b) <= 16 for b in m.groups()[:2]) or (m[3] and int(m[3]) < 1):
        raise ValueError(f"quantisation spec must look like 'w8a8', 'w4a8', 'w4a4' or 'w4a8g64' "
                         f"(bits 2..16, group >= 1), got {spec!r}")
    return int(m[1]), int(m[2])


def weight_group(spec):
    """Weight group size along the input dimension: the 'g<N>' suffix, 64 for plain w4a4, else None
    (one scale per output channel)."""
    m = re.fullmatch(r'w(\d+)a(\d+)(?:g(\d+))?', str(spec))
    if m and m[3]:
        return int(m[3])
    return W4A4_GROUP if m and int(m[1]) <= 4 and int(m[2]) <= 4 else None


def fake_quant(x, bits, dim=None, amax=None):
    """Symmetric uniform quantise-dequantise, round to nearest, scale = max|x| / (2^(bits-1) - 1).

    dim: per-channel scales along that dim (weights: 0, the output channel); None: one scale.
    amax: a given range (calibrated activations); values beyond it are clipped. Zero ranges are safe.
    """
    qmax = 2 ** (bits - 1) - 1
    if amax is None and dim is None:
        amax = x.detach().abs().max()
    elif amax is None:
        other = [d for d in range(x.dim()) if d != dim % x.dim()]
        amax = x.detach().abs().amax(dim=other, keepdim=True) if other else x.detach().abs()
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    return (x / scale).round().clamp(-qmax, qmax) * scale


def fake_quant_groups(w, bits, group):
    """Weights (out, in, ...) quantised with one scale per output channel and per group of `group`
    consecutive entries of the flattened input dimension (in * kh * kw for a conv; the last group
    may be shorter). Where that dimension is < group: per output channel (fake_quant dim=0)."""
    flat = w.reshape(w.shape[0], -1)
    k = flat.shape[1]
    if k < group:
        return fake_quant(w, bits, dim=0)
    pad = (-k) % group
    g = torch.nn.functional.pad(flat, (0, pad)).view(w.shape[0], -1, group)   # zero pad: no effect on max
    return fake_quant(g, bits, dim=None, amax=g.detach().abs().amax(-1, keepdim=True)).reshape(
        w.shape[0], -1)[:, :k].reshape(w.shape)


class _ActQuant:
    """Forward pre-hook on a layer: fake-quantises its input with a frozen per-tensor range; while
    `observing` it leaves the input alone and records the running max |input| (our calibration
    statistic: the max, not a percentile, since a few trajectories give few outliers and the max
    never clips what calibration saw)."""

    def __init__(self, bits, amax=None):
        self.bits, self.amax, self.observing = bits, amax, amax is None

    def __call__(self, module, args):
        x = args[0]
        if self.observing:
            m = x.detach().abs().max().float()
            self.amax = m if self.amax is None else torch.maximum(self.amax, m)
            return None
        return (fake_quant(x, self.bits, amax=self.amax),) + tuple(args[1:])


def _quantize_weights(model, spec, act_scales=None):
    """Deep copy with fake-quantised weights (biases stay float) and an _ActQuant hook per layer."""
    wbits, abits = parse_spec(spec)
    group = weight_group(spec)
    q = copy.deepcopy(model).eval()
    for name, m in q.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            with torch.no_grad():
                m.weight.copy_(fake_quant(m.weight, wbits, dim=0) if group is None
                               else fake_quant_groups(m.weight, wbits, group))
            amax = None if act_scales is None else torch.tensor(act_scales[name], device=m.weight.device)
            m._act_quant = _ActQuant(abits, amax)
            m.register_forward_pre_hook(m._act_quant)
    return q


def act_scales(qmodel):
    """{layer name: calibrated max |input|} of a quantised model."""
    return {n: float(m._act_quant.amax) for n, m in qmodel.named_modules() if hasattr(m, '_act_quant')}


@torch.no_grad()
def quantize_model(model, spec, calib_fn):
    """Fake-quantised deep copy of `model` ('w8a8', 'w4a8', ...): weights per output channel, inputs of
    every Conv2d / Linear per tensor. calib_fn(qmodel) drives qmodel (weights already quantised,
    activations observed, not yet quantised) over calibration inputs; then the ranges are frozen."""
    q = _quantize_weights(model, spec)
    calib_fn(q)
    for n, m in q.named_modules():
        if hasattr(m, '_act_quant'):
            if m._act_quant.amax is None:
                raise ValueError(f'calibration never reached layer {n!r}: calib_fn must call the model')
            m._act_quant.observing = False
    return q


class CompensatedModel(nn.Module):
    """forward(x, t_index) = qmodel(x, t_index) corrected with the table of timestep t_index:
    correction (T, C): eps_q - b_{t,c}; (T, C, 2): a_{t,c} * eps_q + b_{t,c}. C = channels (D for vectors)."""

    def __init__(self, qmodel, correction):
        super().__init__()
        self.qmodel = qmodel
        self.register_buffer('correction', correction.float())

    def forward(self, x, t):
        eps = self.qmodel(x, t)
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        c = self.correction[t]                                   # gathered per sample: (B, C[, 2])
        view = (x.shape[0], -1) + (1,) * (x.dim() - 2)
        if c.dim() == 2:
            return eps - c.view(view)
        return c[..., 0].view(view) * eps + c[..., 1].view(view)


def chain_coefficients(diff, sampler='ddpm', steps=None, eta=0.0, eps_scale=None):
    """[(t, t', a, b)] for every step of the chain sample_chain runs (full chain, T -> 0), in float64:
    x_{t'} = a x_t + b eps_theta(x_t, t) (+ s z, the noise, the same in the chains compared).
    DDIM: a = sqrt(abar_t' / abar_t), b = c - a sqrt(1 - abar_t), c = sqrt(1 - abar_t' - s^2)
    (eta = 0: s = 0, c = sqrt(1 - abar_t')). Ancestral (respaced): alpha = abar_t / abar_t',
    a = 1 / sqrt(alpha), b = -(1 - alpha) / (sqrt(alpha) sqrt(1 - abar_t)). Epsilon scaling
    divides b by lambda_t."""
    if sampler not in ('ddpm', 'ddim'):
        raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
    ts = list(steps) if isinstance(steps, (list, tuple)) else diff.times(diff.T, 0, steps)
    lam = diff._lambda(eps_scale, ts[:-1])
    out = []
    for t, tn in zip(ts[:-1], ts[1:]):
        at, an = diff._abar64[t], diff._abar64[tn]
        if sampler == 'ddim':
            a = (an / at).sqrt()
            s2 = eta ** 2 * (1 - an) / (1 - at) * (1 - at / an) if eta and tn > 0 else 0.0
            b = (1 - an - s2).clamp(min=0).sqrt() - a * (1 - at).sqrt()
        else:
            alpha = at / an
            a, b = 1 / alpha.sqrt(), -(1 - alpha) / (alpha.sqrt() * (1 - at).sqrt())
        out.append((t, tn, float(a), float(b) / (1.0 if lam is None else float(lam[t]))))
    return out


class CumulativeCompensated(nn.Module):
    """The error model delta_t = eps_q - eps ~ K_t (.) eps_q and the cumulative compensation over a
    window of m steps, on the chain given by `chain` (sample_chain's sampler, steps, eta, eps_scale).

    Step k of the chain (t_k -> t_k+1): x_{k+1} = a_k x_k + b_k eps (chain_coefficients). With J =
    d eps / dx ~ 0 the quantised chain's error is E_{k+1} = sum_{j<=k} (prod_{r=j+1}^{k} a_r) d_j,
    d_j = b_j K_j eps_q,j (the closed form). The compensated state is the quantised update minus the
    estimate of the error accumulated over the last m steps, Ehat_{k+1} = sum_{j=k-m+1}^{k}
    (prod_{r=j+1}^{k} a_r) d_j. The state entering step k already had Ehat_k removed, so step k removes
    the increment Ehat_{k+1} - a_k Ehat_k = d_k - P_k d_{k-m}, P_k = prod_{r=k-m+1}^{k} a_r: the new
    step's error, less the propagated term that leaves the window (no double counting). It is folded
    into the network output, so that the one loop needs no callback:
        eps_out = (1 - K_t) eps_q + P_k d_{k-m} / b_k.
    m >= S (the full closed form): eps_out = (1 - K_t) eps_q, nothing cached. m = 1: the current
    output and the cached previous one. Stateful: a call at the chain's first t starts a new chain;
    calls must follow the chain's steps in order, one call per step with the whole batch (put any
    chunking inside, around qmodel)."""

    def __init__(self, qmodel, K, diff, window=1, **chain):
        super().__init__()
        if int(window) < 1:
            raise ValueError(f'the compensation window m must be >= 1, got {window}')
        self.qmodel = qmodel
        self.register_buffer('K', K.float())
        coef = chain_coefficients(diff, **chain)
        self.S, self.m = len(coef), min(int(window), len(coef))
        self.index = {t - 1: k for k, (t, _, _, _) in enumerate(coef)}   # the net sees t - 1
        self.a = [c[2] for c in coef]
        self.b = [c[3] for c in coef]
        self.P = [math.prod(self.a[k - self.m + 1:k + 1]) if k >= self.m else 0.0 for k in range(self.S)]
        self._cache, self._next = [], None

    def forward(self, x, t):
        ti = int(t.reshape(-1)[0]) if torch.is_tensor(t) else int(t)
        if torch.is_tensor(t) and t.numel() > 1 and not bool((t == ti).all()):
            raise ValueError('CumulativeCompensated needs one t per call (the chain steps all samples together)')
        k = self.index.get(ti)
        if k is None:
            raise ValueError(f't = {ti + 1} is not a step of the chain this compensation was built for')
        if k == 0:
            self._cache, self._next = [], 0
        if k != self._next:
            raise ValueError(f'step {k} of the chain called out of order (expected {self._next})')
        eps = self.qmodel(x, t)
        K = self.K[ti].view(1, -1, *([1] * (x.dim() - 2)))
        out = eps - K * eps
        if self.m < self.S:   # the term leaving the window goes back
            if k >= self.m:
                out = out + (self.P[k] / self.b[k]) * self._cache.pop(0)
            self._cache.append(self.b[k] * K * eps)   # d_k
        self._next = k + 1 if k + 1 < self.S else None
        return out


def _channel_sums(a, b):
    """Per-channel sums over batch and positions of a, b, a*a, a*b, 1 -> (C, 5)."""
    C = a.shape[1]
    a, b = a.double().transpose(0, 1).reshape(C, -1), b.double().transpose(0, 1).reshape(C, -1)
    return torch.stack([a.sum(1), b.sum(1), (a * a).sum(1), (a * b).sum(1),
                        torch.full((C,), a.shape[1], dtype=a.dtype, device=a.device)], 1)


def fit_correction(stats, fit='affine'):
    """Per-(t, c) correction from the calibration sums (T, C, 5) of _channel_sums.
    'bias': b = mean(eps_q - eps), (T, C), subtracted. 'affine': least squares eps ~ a eps_q + b,
    (T, C, 2) = (a, b); it also undoes the part of the error that scales with eps_q.
    'scale': K (T, C) of the error model delta = eps_q - eps ~ K eps_q (least squares, no intercept:
    K = sum(delta eps_q) / sum(eps_q^2)), regressed on eps_q because eps_q is what sampling sees;
    the fitted 1 - K is the no-intercept affine a. Timesteps never visited: K = 0."""
    sq, sf, sqq, sqf, n = stats.double().unbind(-1)
    if fit == 'scale':   # K of delta = eps_q - eps ~ K eps_q, least squares without intercept
        return torch.where((n > 0) & (sqq > 1e-12), (sqq - sqf) / sqq.clamp(min=1e-12),
                           torch.zeros_like(sq)).float()
    if fit == 'bias':   # timesteps the chain never visited (n = 0): no correction
        return torch.where(n > 0, (sq - sf) / n.clamp(min=1), torch.zeros_like(sq)).float()
    var = sqq / n - (sq / n) ** 2
    a = torch.where(var > 1e-12, (sqf / n - sq * sf / n ** 2) / var.clamp(min=1e-12), torch.ones_like(var))
    a = torch.where(n > 0, a, torch.ones_like(a))   # timesteps the chain never visited: identity
    return torch.stack([a, torch.where(n > 0, sf / n - a * sq / n, torch.zeros_like(a))], -1).float()


@torch.no_grad()
def calibrate(model, diff, shape, spec, n_traj=None, batch=None, seed=0, device='cpu', fit='affine', **chain):
    """Activation ranges and the per-(t, channel) correction from n_traj full-precision chains of
    `batch` samples from fixed noise (defaults: 4 x 64 for vectors, 2 x 16 for images), on the chain
    that sampling will use (`chain`: sample_chain's sampler, steps, eta, eps_scale). At every visited
    t both nets see the FP state x_t. Returns {'spec', 'act_scales', 'correction', 'stats', 'fit',
    'chain', ...}: all that build_quantized needs."""
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    image = len(shape) == 3
    n_traj, batch = n_traj or (2 if image else 4), batch or (16 if image else 64)
    model = model.eval()

    def trajectories(probe):
        """The same FP chains every time; probe(x_t, t_index, eps_fp) sees every network call."""
        def net(x, t):
            e = model(x, t)
            probe(x, t, e)
            return e
        g = R.rng(seed, 'calibration', device=device)   # never an evaluation chain's noise
        for _ in range(n_traj):
            diff.sample_chain(net, torch.randn((batch, *shape), generator=g, device=device), noise=g, **chain)

    qmodel = quantize_model(model, spec, lambda q: trajectories(lambda x, t, e: q(x, t)))
    stats = torch.zeros(diff.T, shape[0], 5, dtype=torch.float64, device=device)

    def record(x, t, e):
        stats[int(t[0])] += _channel_sums(qmodel(x, t), e)
    trajectories(record)
    return dict(spec=spec, act_scales=act_scales(qmodel), stats=stats.cpu(), fit=fit,
                correction=fit_correction(stats, fit).cpu(), n_traj=n_traj, batch=batch, seed=seed,
                T=diff.T, shape=list(shape), fingerprint=weights_fingerprint(model), chain=chain_key(chain))


def chain_key(chain):
    """The chain settings a calibration was made on, comparable across runs (no tensors)."""
    c = {'sampler': 'ddpm', 'steps': None, 'eta': 0.0, **chain}
    lam = c.pop('eps_scale', None)
    c['eps_scale'] = None if lam is None else [round(float(v), 9) for v in lam[1:]]
    return c


def build_quantized(model, calib, compensate=False):
    """The quantised (optionally compensated) model from a stored calibration, without recalibrating."""
    q = _quantize_weights(model, calib['spec'], calib['act_scales'])
    if not compensate:
        return q
    return CompensatedModel(q, calib['correction'].to(next(model.parameters()).device))


def weights_fingerprint(model):
    """A cheap checksum of the weights: a stored calibration is reused only for the same weights."""
    return float(sum(p.double().sum() + p.double().abs().sum() for p in model.state_dict().values()
                     if p.is_floating_point()))


def save_calibration(path, calib):
    R.atomic_write(path, lambda f: torch.save(calib, f))


def load_calibration(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no calibration at {path}: run with --recalibrate or calibrate() first')
    return torch.load(path, map_location='cpu', weights_only=True)


def calibration_path(ckpt_path, spec):
    """<run dir>/quant_<spec>.pt, beside the checkpoint."""
    run = ckpt_path if os.path.isdir(ckpt_path) else os.path.dirname(os.path.abspath(ckpt_path))
    return os.path.join(run, f'quant_{spec}.pt')


def get_calibration(model, diff, shape, spec, ckpt_path, n_traj=None, batch=None, recalibrate=False,
                    device='cpu', fit='affine', **chain):
    """The stored calibration beside the checkpoint if it was made for these weights, settings and
    chain (a different fit is refitted from the stored sums), else a new one, saved there."""
    path = calibration_path(ckpt_path, spec)
    if os.path.isfile(path) and not recalibrate:
        c = load_calibration(path)
        if (c['T'] == diff.T and c['shape'] == list(shape) and n_traj in (None, c['n_traj'])
                and batch in (None, c['batch']) and c.get('chain') == chain_key(chain)
                and math.isclose(c['fingerprint'], weights_fingerprint(model), rel_tol=1e-9)):
            if c['fit'] != fit:
                c.update(fit=fit, correction=fit_correction(c['stats'], fit))
            return c
        print(f'{path} was made for other weights or settings: recalibrating')
    print(f'calibrating {spec} ...', flush=True)
    c = calibrate(model, diff, shape, spec, n_traj, batch, 0, device, fit, **chain)
    try:
        save_calibration(path, c)
    except OSError as e:   # a read-only checkpoint folder: go on without storing
        print(f'could not store the calibration at {path} ({e}); it will be recomputed next time')
    return c


def comp_keys(comps, windows=(1,), steps=None):
    """--comp / --window -> result keys: 'none', 'bias', 'affine', 'cumulative_m<m>' (one per window;
    a window 'S' or one >= S is the full closed form, m = S). 'none' (the plain quantised chain, the
    baseline every compensation is compared with) always comes first."""
    bad = [c for c in comps if c not in COMPS]
    if bad:
        raise ValueError(f'unknown compensation {bad[0]!r}: pick from {", ".join(COMPS)}')
    keys = ['none']
    for c in comps:
        if c == 'cumulative':
            for w in windows:
                m = steps if str(w).upper() == 'S' else _window(w)
                keys.append(f'cumulative_m{min(m, steps)}')
        elif c != 'none':
            keys.append(c)
    return list(dict.fromkeys(keys))


def _window(w):
    try:
        m = int(w)
    except (TypeError, ValueError):
        raise ValueError(f"the compensation window must be an integer >= 1 or 'S', got {w!r}") from None
    if m < 1:
        raise ValueError(f"the compensation window must be an integer >= 1 or 'S', got {w!r}")
    return m


def build_comp(qmodel, calib, key, diff, **chain):
    """The network of one compensation key (comp_keys) around the quantised model `qmodel`."""
    device = next(qmodel.parameters()).device if isinstance(qmodel, nn.Module) else diff.device
    if key == 'none':
        return qmodel
    if key in ('bias', 'affine'):
        return CompensatedModel(qmodel, fit_correction(calib['stats'], key).to(device))
    if key.startswith('cumulative_m'):
        return CumulativeCompensated(qmodel, fit_correction(calib['stats'], 'scale').to(device), diff,
                                     _window(key[len('cumulative_m'):]), **chain)
    raise ValueError(f'unknown compensation {key!r}')


def for_sampling(model, diff, shape, ckpt_path, spec='none', compensate=False, n_traj=None,
                 recalibrate=False, device='cpu', window=1, **chain):
    """The network to sample with (sample.py, evaluate.py --quant): `model` itself for spec 'none',
    else its fake-quantised copy from the stored calibration; compensate: False, True (the per-step
    affine correction, as --quant-compensate) or a compensation name of COMPS ('cumulative' with
    `window`, on the chain given by `chain`)."""
    if spec == 'none':
        if compensate:
            raise ValueError('--quant-compensate needs --quant w8a8, w4a8 or w4a4')
        return model
    c = get_calibration(model, diff, shape, spec, ckpt_path, n_traj, recalibrate=recalibrate, device=device,
                        **chain)
    if compensate is True or not compensate:
        return build_quantized(model, c, bool(compensate))
    key = comp_keys([compensate], [window], len(chain_coefficients(diff, **chain)))[-1]
    return build_comp(build_quantized(model, c), c, key, diff, **chain)
