"""What quantised sampling costs in accuracy and time (seed 002; `python evaluate.py quanterr`): the
full-precision chain, the plain quantised one and every compensation of quant.py run in lockstep
from the same x_T and noise, through the one loop Diffusion.sample_chain; the trajectory distance
to full precision at every step, PSNR and the median distance at t = 0, D_MMD(0), and each
compensation's sampling-time overhead (chains interleaved).
"""
import math
import time

import torch

import runtime as R
from mmd import chunked, mmd2, signed_sqrt
from neighbours.quant import build_comp, build_quantized, calibrate, chain_coefficients, comp_keys, weight_group


def psnr(x, ref):
    """Mean over images of 10 log10(1 / MSE), images in [-1, 1] (clipped) mapped to [0, 1]."""
    x, ref = ((t.clamp(-1, 1) + 1) / 2 for t in (x, ref))
    mse = (x - ref).pow(2).flatten(1).mean(1).clamp(min=1e-20)
    return (10 * torch.log10(1 / mse)).mean().item()


def _sync(device):
    if str(device).startswith('cuda'):
        torch.cuda.synchronize()


@torch.no_grad()
def time_overhead(nets, diff, x, seed=0, reps=5, device='cpu', min_time=0.1, **chain):
    """{key: median over reps of time(chain with nets[key]) / time(chain with nets['none']) - 1}:
    whole sampling chains from the same x_T and noise, the variants interleaved within every rep
    (their order rotated), after one untimed warm-up rep. A timed unit repeats the chain as often as
    the warm-up says it takes for the plain quantised chain to run min_time seconds (tiny models)."""
    keys = list(nets)

    def run(k, inner):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            diff.sample_chain(nets[k], x, noise=torch.Generator(device).manual_seed(seed), **chain)
        _sync(device)
        return time.perf_counter() - t0
    for k in keys:   # warm-up
        run(k, 1)
    inner = max(1, math.ceil(min_time / max(run('none', 1), 1e-9)))
    times = {k: [] for k in keys}
    for rep in range(reps):
        for k in keys[rep % len(keys):] + keys[:rep % len(keys)]:
            times[k].append(run(k, inner))
    base = times['none']
    return {k: float(torch.tensor([a / b for a, b in zip(times[k], base)]).median()) - 1.0
            for k in keys if k != 'none'}


@torch.no_grad()
def quanterr(model, diff, x0_real, spec, calib=None, n=256, seed=0, device='cpu', kernels=('gaussian',),
             estimator='u', batch_size=None, comps=('affine',), windows=(1,), overhead_reps=0, **chain):
    """The FP chain, the quantised chain ('none') and one chain per compensation (comp_keys(comps,
    windows)) in lockstep from the same x_T and the same noise z_t: one batch through sample_chain,
    each part through its own network, the noise of n drawn once and repeated (so the FP part equals
    diff.sample). Records at every visited t the RMS distance of each to FP ('err'); at t = 0 the RMS
    ('rms0'), the median over samples of the distance to FP ('med0'; a few runaway chains dominate
    the RMS) and, for images, the PSNR against FP ('psnr': images in [-1, 1] mapped to [0, 1],
    10 log10(1 / MSE), mean over images); D_MMD(0) of each against x0_real (signed sqrt of the
    unbiased MMD^2, as errprop_curve); with overhead_reps > 0 the sampling-time overhead of every
    compensation against 'none' (time_overhead)."""
    shape = tuple(x0_real.shape[1:])
    calib = calib or calibrate(model, diff, shape, spec, seed=seed, device=device, **chain)
    if calib['spec'] != spec:
        raise ValueError(f"calibration is for {calib['spec']}, not {spec}")
    S = len(chain_coefficients(diff, **chain))
    keys = comp_keys(comps, windows, S)
    q = build_quantized(model, calib)
    qc = chunked(q, batch_size) if batch_size else q   # chunking inside the stateful compensations
    comp_nets = {k: build_comp(qc, calib, k, diff, **chain) if k != 'none' else qc for k in keys}
    nets = [chunked(model.eval(), batch_size) if batch_size else model.eval()] + list(comp_nets.values())
    P = len(nets)

    def lockstep(x, t):
        return torch.cat([m(xi, ti) for m, xi, ti in zip(nets, x.chunk(P), t.chunk(P))])
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn((n, *shape), generator=g, device=device)
    out = {'spec': spec, 'weight_group': weight_group(spec), 'steps': S, 'comps': keys, 't': [],
           'err': {k: [] for k in keys}}

    def record(t, x):
        fp, *rest = x.chunk(P)
        out['t'].append(t)
        for k, xi in zip(keys, rest):
            out['err'][k].append((xi - fp).pow(2).mean().sqrt().item())
    reps = [1] * len(shape)
    noise = lambda sh: torch.randn((sh[0] // P, *sh[1:]), generator=g, device=device).repeat(P, *reps)   # noqa: E731
    xs = diff.sample_chain(lockstep, x.repeat(P, *reps), noise=noise, callback=record, **chain).chunk(P)
    out['rms0'] = {k: out['err'][k][-1] for k in keys}
    # the RMS is dominated by the few chains that run away; the median sample's distance is not
    out['med0'] = {k: (xi - xs[0]).flatten(1).norm(dim=1).median().item() for k, xi in zip(keys, xs[1:])}
    if len(shape) == 3:
        out['psnr'] = {k: psnr(xi, xs[0]) for k, xi in zip(keys, xs[1:])}
    real = x0_real.to(device)
    out['mmd0_kernels'] = {kern: {name: signed_sqrt(mmd2(xi, real, kern, estimator).item())
                                  for name, xi in zip(['fp'] + keys, xs)} for kern in kernels}
    out['mmd0'] = out['mmd0_kernels'][kernels[0]]
    if overhead_reps:
        out['overhead'] = time_overhead(comp_nets, diff, x, seed, overhead_reps, device, **chain)
    return out


def plot_quanterr(results, path):
    """results {spec: quanterr dict} -> PNG of the RMS trajectory error vs t (T on the left, 0 on the
    right), one panel per spec, one line per compensation."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8), squeeze=False)
    for ax, (spec, r) in zip(axes[0], results.items()):
        for k in r['comps']:
            ax.plot(r['t'], r['err'][k], label=k, ls='-' if k == 'none' else '--')
        ax.invert_xaxis()
        ax.set(xlabel='t', ylabel='RMS distance to the FP chain', title=spec.upper())
        ax.legend(fontsize=7)
    fig.tight_layout()
    R.save_figure(fig, path)
