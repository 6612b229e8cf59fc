"""Post-training quantised sampling and timestep-aware error compensation (seed 002; DESIGN.md Sec. 6).

Fake quantisation (quantise-dequantise in float): weights of every nn.Conv2d / nn.Linear per output
channel; their INPUT activations per tensor, with a scale frozen from an offline calibration. Every
step of the quantised chain adds an error eps_q(x_t) - eps(x_t) that the backward chain (Eq. 16)
carries on to x_0. The compensation is a per-(t, channel) map calibrated offline on full-precision
trajectories, where both nets see the same x_t: by default (fit='affine') the least-squares
eps ~ a_{t,c} eps_q + b_{t,c}; fit='bias' only subtracts the mean error E[eps_q(x_t) - eps(x_t)]
(README.md measures both).

    python evaluate.py quanterr --ckpt out/8gaussians --quant w8a8 w4a8
"""
import copy
import math
import os
import re

import torch
import torch.nn as nn

import runtime as R
from mmd import chunked, mmd2, signed_sqrt

SPECS = ('w8a8', 'w4a8')
FITS = ('affine', 'bias')


def parse_spec(spec):
    """'w8a8' -> (8, 8): weight bits, activation bits."""
    m = re.fullmatch(r'w(\d+)a(\d+)', str(spec))
    if not m or not all(2 <= int(b) <= 16 for b in m.groups()):
        raise ValueError(f"quantisation spec must look like 'w8a8' or 'w4a8' (bits 2..16), got {spec!r}")
    return int(m[1]), int(m[2])


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
    q = copy.deepcopy(model).eval()
    for name, m in q.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            with torch.no_grad():
                m.weight.copy_(fake_quant(m.weight, wbits, dim=0))
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


def _channel_sums(a, b):
    """Per-channel sums over batch and positions of a, b, a*a, a*b, 1 -> (C, 5)."""
    C = a.shape[1]
    a, b = a.double().transpose(0, 1).reshape(C, -1), b.double().transpose(0, 1).reshape(C, -1)
    return torch.stack([a.sum(1), b.sum(1), (a * a).sum(1), (a * b).sum(1),
                        torch.full((C,), a.shape[1], dtype=a.dtype, device=a.device)], 1)


def fit_correction(stats, fit='affine'):
    """Per-(t, c) correction from the calibration sums (T, C, 5) of _channel_sums.
    'bias': b = mean(eps_q - eps), (T, C), subtracted. 'affine': least squares eps ~ a eps_q + b,
    (T, C, 2) = (a, b); it also undoes the part of the error that scales with eps_q."""
    sq, sf, sqq, sqf, n = stats.double().unbind(-1)
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


@torch.no_grad()
def quanterr(model, diff, x0_real, spec, calib=None, n=256, seed=0, device='cpu', kernels=('gaussian',),
             estimator='u', batch_size=None, **chain):
    """FP, quantised (Q) and compensated (Q+comp) chains in lockstep from the same x_T and the same
    noise z_t: one batch of 3n through sample_chain, each third through its own network, the noise
    of n drawn once and repeated (so the FP third equals diff.sample). Records at every visited t
    the RMS distance of Q and Q+comp to FP, and D_MMD(0) of each against x0_real (signed sqrt of the
    unbiased MMD^2, as errprop_curve). Returns {'t', 'err_q', 'err_qc', 'mmd0', 'mmd0_kernels'}."""
    shape = tuple(x0_real.shape[1:])
    calib = calib or calibrate(model, diff, shape, spec, seed=seed, device=device, **chain)
    if calib['spec'] != spec:
        raise ValueError(f"calibration is for {calib['spec']}, not {spec}")
    q = build_quantized(model, calib)
    nets = [model.eval(), q, CompensatedModel(q, calib['correction'].to(device))]
    nets = [chunked(m, batch_size) if batch_size else m for m in nets]

    def three(x, t):
        return torch.cat([m(xi, ti) for m, xi, ti in zip(nets, x.chunk(3), t.chunk(3))])
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn((n, *shape), generator=g, device=device)
    out = {'spec': spec, 't': [], 'err_q': [], 'err_qc': []}

    def record(t, x):
        fp, xq, xqc = x.chunk(3)
        out['t'].append(t)
        out['err_q'].append((xq - fp).pow(2).mean().sqrt().item())
        out['err_qc'].append((xqc - fp).pow(2).mean().sqrt().item())
    noise = lambda sh: torch.randn((sh[0] // 3, *sh[1:]), generator=g, device=device).repeat(   # noqa: E731
        3, *[1] * len(shape))
    xs = diff.sample_chain(three, x.repeat(3, *[1] * len(shape)), noise=noise, callback=record, **chain).chunk(3)
    real = x0_real.to(device)
    out['mmd0_kernels'] = {k: {name: signed_sqrt(mmd2(xi, real, k, estimator).item())
                               for name, xi in zip(('fp', 'q', 'qc'), xs)} for k in kernels}
    out['mmd0'] = out['mmd0_kernels'][kernels[0]]
    return out


def for_sampling(model, diff, shape, ckpt_path, spec='none', compensate=False, n_traj=None,
                 recalibrate=False, device='cpu', **chain):
    """The network to sample with (sample.py, evaluate.py --quant): `model` itself for spec 'none',
    else its fake-quantised (and with `compensate`, corrected) copy from the stored calibration."""
    if spec == 'none':
        if compensate:
            raise ValueError('--quant-compensate needs --quant w8a8 or w4a8')
        return model
    c = get_calibration(model, diff, shape, spec, ckpt_path, n_traj, recalibrate=recalibrate, device=device,
                        **chain)
    return build_quantized(model, c, compensate)


def plot_quanterr(results, path):
    """results {spec: quanterr dict} -> PNG of the RMS trajectory error vs t (T on the left, 0 on the right)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (spec, r) in enumerate(results.items()):
        ax.plot(r['t'], r['err_q'], color=f'C{i}', label=spec.upper())
        ax.plot(r['t'], r['err_qc'], color=f'C{i}', ls='--', label=spec.upper() + ' + comp.')
    ax.invert_xaxis()
    ax.set_xlabel('t')
    ax.set_ylabel('RMS distance to the full-precision chain')
    ax.legend()
    R.save_figure(fig, path)
