"""Evaluate trained checkpoints along the sampling chain and at its end.

    python evaluate.py errprop --ckpt out/cifar10 out/cifar10-reg        # Fig. 1 vs Fig. 3
    python evaluate.py errprop --ckpt out/8gaussians --steps 20          # a 20-step respaced chain
    python evaluate.py fid --ckpt out/cifar10 --n 50000                  # EMA weights, 1000 steps
    python evaluate.py fid --ckpt out/cifar10 --n 10000 --repeats 3      # mean ± std over 3 seed blocks
    torchrun --nproc_per_node=8 evaluate.py fid --ckpt out/cifar10 --num-samples 50000
    python evaluate.py fid --samples samples.npz --dataset cifar10 --data-dir data
    python evaluate.py fid --ckpt out/mnist --n 10000 --features mnist-classifier   # digits: FD and KID
    python evaluate.py quanterr --ckpt out/8gaussians --quant w8a8 w4a8     # quantised sampling
    python evaluate.py faulttol --ckpt out/8gaussians --steps 20 --t0 10 --delta 0.1   # Theorem 4.1
    python evaluate.py es-search --ckpt out/8gaussians --steps 20     # epsilon scaling (ADM-ES)

errprop runs the chain from N noise samples and compares, at every measured t, the backward
samples with M forward samples x_t of real training data (Sec. 4.2, Eq. 8-10), and records the
exposure bias delta_t of ADM-ES beside it. faulttol perturbs one of two chains that share x_T
and their noise at t0 and follows the gap (the paper's Theorem 4.1, measured). es-search picks
the epsilon-scaling factor for a checkpoint and step count on a grid. fid uses pytorch-fid's
Inception (2048-d pool3, fid.py) against cached training-set statistics; on MNIST, --features
mnist-classifier the Frechet distance and KID in a small digit classifier's features. Every
output file is written atomically.
"""
import argparse
import os
import sys

import numpy as np
import torch

import data as D
import runtime as R
from metrics import fid as F
from neighbours import quant
from neighbours import quanterr as QE
from mmd import KERNELS, errprop_curve, fault_tolerance, mmd2, signed_sqrt
from model import resolve_weights

ESTIMATOR_NAMES = {'u': 'unbiased U-statistic', 'v': 'V-statistic, Eq. 10'}


def run_label(path):
    path = os.path.normpath(path)
    return os.path.basename(path if os.path.isdir(path) else os.path.dirname(path) or path)


def real_examples(cfg, m, seed, data_dir=None):
    """M training examples of the checkpoint's data set (a seeded choice), in model space."""
    try:
        return D.random_examples(m, seed, cfg['dataset'], data_dir or cfg['data_dir'], cfg['image_size'],
                                 cfg['toy_n'], cfg['seed'])
    except ValueError as e:
        R.fail(f'{e}: lower --m (or --n)')


def plot_curves(runs, keys, ylabel, path, titles=None):
    """One panel per key, one line per run (r['t'], r[key]); t runs from T (left) to 0 (right), so
    chains of different step counts share the axis."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
    for ax, k in zip(axes[0], keys):
        for r in runs:
            ax.plot(r['t'], r[k], label=r['label'])
        ax.invert_xaxis()
        ax.axhline(0, color='grey', lw=0.5)
        ax.set(xlabel='t (sampling goes T -> 0)', ylabel=ylabel, title=(titles or {}).get(k, k))
        ax.legend()
    fig.tight_layout()
    R.save_figure(fig, path)


def start(a, *exts):
    """Check that OUT.<ext> can be written (before anything long starts); the device to use."""
    for ext in exts:
        R.check_writable(a.out + ext)
    return R.setup_device(a.device, distributed=False)[0]


def load_runs(a, device):
    """[(ckpt, label, model, diff, cfg)] for --ckpt/--labels, with --quant applied; checks the
    sampler flags against each checkpoint before anything long starts."""
    labels = a.labels or [run_label(c) for c in a.ckpt]
    if len(labels) != len(a.ckpt):
        R.fail(f'{len(labels)} --labels for {len(a.ckpt)} --ckpt: give one per checkpoint')
    runs = []
    for ckpt, label in zip(map(resolve_weights, a.ckpt), labels):   # hub ids -> their cached folders
        model, diff, cfg = R.load_checkpoint(ckpt, device, ema=True, dtype=R.sampling_dtype(a, a.quant != 'none'), compile=a.compile)
        chain = R.chain_kwargs(a, diff)
        runs.append((ckpt, label, model, diff, cfg, chain))
    return [(c, lab, quant.for_sampling(m, d, tuple(cfg['data_shape']), c, a.quant, a.quant_compensate,
                                        a.calib_traj, a.recalibrate, device, **ch), d, cfg, ch)
            for c, lab, m, d, cfg, ch in runs]


# ---- errprop: D_MMD(t) along the sampling chain (Sec. 4.2, Eq. 8-10, Fig. 1 / Fig. 3) ----------
def run_errprop(a):
    if (a.t_stride or 1) < 1 or a.n < 2 or a.m < 2:
        R.fail('need --t-stride >= 1 and --n, --m >= 2')
    device = start(a, '.json', '.png')
    runs = []
    for ckpt, label, model, diff, cfg, chain in load_runs(a, device):
        x0 = real_examples(cfg, a.m, a.seed, a.data_dir)
        with R.progress_bar(len(diff.times(diff.T, 0, chain['steps'])), f'errprop {label}', 't') as bar:
            curve = errprop_curve(model, diff, x0, a.n, a.kernels, a.estimator, a.t_stride,
                                  torch.Generator(device).manual_seed(a.seed), a.chunk,
                                  lambda t: bar.update(1), device, **chain)
        runs.append(dict(ckpt=ckpt, label=label, dataset=cfg['dataset'], T=diff.T, **chain_settings(a, diff),
                         **curve))
    settings = dict(vars(a), estimator_name=ESTIMATOR_NAMES[a.estimator],
                    value='sign(MMD^2) * sqrt(|MMD^2|), MMD^2 estimated with the estimator above')
    settings.pop('run', None)
    R.write_json(a.out + '.json', dict(settings=settings, runs=runs))
    plot_curves(runs, list(a.kernels), f'D_MMD(t) ({ESTIMATOR_NAMES[a.estimator]})', a.out + '.png',
                {k: f'{k} kernel' for k in a.kernels})
    at0 = '; '.join(r['label'] + ': ' + ', '.join(f'{k} {r[k][-1]:.4g}' for k in a.kernels) for r in runs)
    print(f'D_MMD(t=0) [{ESTIMATOR_NAMES[a.estimator]}] {at0} | wrote {a.out}.json, {a.out}.png')


def chain_settings(a, diff):   # what the JSON records about the chain
    return dict(sampler=a.sampler, steps=a.steps or diff.T, spacing=a.spacing, eta=a.eta, eps_scale=a.eps_scale, eps_scale_k=a.eps_scale_k,
                time_shift=R.chain_kwargs(a, diff).get('time_shift'))


# ---- faulttol: Theorem 4.1 (fault intolerance), measured -----------------------------------------
def run_faulttol(a):
    if a.delta < 0 or a.n < 2:
        R.fail('need --delta >= 0 (the RMS of the perturbation) and --n >= 2')
    device = start(a, '.json', '.png')
    runs, bar = [], R.progress_bar(len(a.ckpt) * len(a.t0), 'faulttol', 't0')
    for ckpt, label, model, diff, cfg, chain in load_runs(a, device):
        visited = diff.times(diff.T, 0, chain['steps'])
        bad = [t0 for t0 in a.t0 if t0 not in visited or t0 == 0]
        if bad:
            R.fail(f'--t0 {bad[0]} is not a step of this chain ({a.sampler}, {len(visited) - 1} steps): '
                   f'pick from {visited[:4]} ... {visited[-4:-1]}')
        x_T = torch.randn((a.n, *cfg['data_shape']), generator=R.eval_rngs(a.seed)['x_T'])
        for t0 in a.t0:   # every t0: the same x_T and the same z, from streams apart from x_T's
            r = fault_tolerance(model, diff, x_T, t0, a.delta, a.mode, kernels=a.kernels, batch_size=a.chunk,
                                device=device, generators=R.eval_rngs(a.seed, device=device), **chain)
            runs.append(dict(r, ckpt=ckpt, label=f'{label}, t0={t0}', dataset=cfg['dataset'], T=diff.T,
                             **chain_settings(a, diff)))
            bar.update()
            bar.write(f"{label}: perturbation of RMS {a.delta:g} at t0={t0} ({a.mode}) -> gap at t=0 "
                      f"{r['gap'][-1]:.4g}, A(0) = {r['amp'][-1]:.4g}, max A = {max(r['amp']):.4g}", sys.stdout)
    bar.close()
    R.write_json(a.out + '.json', dict(settings={k: v for k, v in vars(a).items() if k != 'run'}, runs=runs))
    plot_curves(runs, ['amp'], 'A(t) = gap(t) / gap(t0)', a.out + '.png',
                {'amp': 'amplification of an injected error (> 1: amplified)'})
    print(f'wrote {a.out}.json, {a.out}.png')


# ---- es-search: the epsilon-scaling factor for a checkpoint and step count (ADM-ES) --------------
def run_es_search(a):
    """For every B on the grid, n samples of the chain with eps / B, scored by D_MMD(0) (signed
    sqrt of the unbiased MMD^2, gaussian kernel) against m real examples held out from the draw:
    fresh draws of the true distribution for toy sets, training examples for image sets."""
    if a.n < 2 or a.m < 2 or not a.grid or min(a.grid) <= 0:
        R.fail('need --n, --m >= 2 and a --grid of scales > 0')
    device = start(a, '.json')
    model, diff, cfg = R.load_checkpoint(a.ckpt, device, ema=True, dtype=R.sampling_dtype(a), compile=a.compile)
    R.chain_kwargs(a, diff)   # checks --steps / --eta
    if D.is_toy(cfg['dataset']):
        real, held = D.sample_toy(cfg['dataset'], a.m, torch.Generator().manual_seed(a.seed + 1)), 'fresh true samples'
    else:
        real, held = real_examples(cfg, a.m, a.seed + 1, a.data_dir), 'training examples'
    rows = []
    with R.progress_bar(len(a.grid), 'es-search', 'scale') as bar:
        for b in a.grid:
            a.eps_scale = b
            chain = R.chain_kwargs(a, diff)
            x = R.generate(model, diff, a.n, tuple(cfg['data_shape']), a.chunk or a.n, a.seed, device, **chain)
            rows.append(dict(eps_scale=b, d_mmd0=signed_sqrt(float(mmd2(x, real.to(x.device), 'gaussian', 'u')))))
            bar.update()
            bar.write(f"eps scale {b:g}: D_MMD(0) {rows[-1]['d_mmd0']:.4g}", sys.stdout)
    best = min(rows, key=lambda r: r['d_mmd0'])
    metric = f'D_MMD(0), gaussian kernel, unbiased, n = {a.n} samples vs m = {a.m} {held}'
    R.write_json(a.out + '.json', dict(ckpt=a.ckpt, sampler=a.sampler, steps=a.steps or diff.T, eta=a.eta,
                                       eps_scale_k=a.eps_scale_k, metric=metric, grid=rows, best=best))
    print(f"best eps scale for {a.sampler} with {a.steps or diff.T} steps: {best['eps_scale']:g} "
          f"(D_MMD(0) {best['d_mmd0']:.4g}; metric: {metric}) -> {a.out}.json")


# ---- fid: pytorch-fid's Inception against cached training-set statistics, or (MNIST) the ----------
# ---- Frechet distance and KID in the features of the project's own digit classifier -------------
def check_feature_flags(a):
    """Flags that belong to the other --features, and a non-MNIST --dataset, fail at once."""
    if a.features == 'inception':
        if a.classifier:
            R.fail('--classifier goes with --features mnist-classifier')
        return
    inception_only = [f for f, on in (('--ref-stats', a.ref_stats), ('--inception-weights', a.inception_weights),
                                      ('--dims', a.dims != 2048), ('--random-inception', a.random_inception)) if on]
    if inception_only:
        R.fail(f'{inception_only[0]} goes with --features inception, not mnist-classifier')
    if a.dataset not in (None, 'mnist'):
        R.fail(f'--features mnist-classifier scores MNIST digits, not {a.dataset}: use --features inception')


def classifier_on_ranks(a, data_dir, size, device, rank, world):
    """(net, info, path) of the MNIST classifier: rank 0 reads or trains it first, the others then
    read its cache (seed 0 always: every run is scored by the same network, whatever its --seed)."""
    path = a.classifier or F.classifier_path(data_dir, size)
    if not os.path.isfile(path):
        R.check_writable(path)   # before a minute of training, not after
    if rank == 0:
        net, info = F.mnist_classifier(data_dir, size, device, path=path)
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        net, info = F.mnist_classifier(data_dir, size, device, path=path)
    return net, info, path


def run_fid(a):
    if bool(a.ckpt) == bool(a.samples):
        R.fail('pass exactly one of --ckpt RUN and --samples DIR_or_NPZ')
    if (a.n is not None and a.n < 2) or a.repeats < 1:
        R.fail('--n must be >= 2 (a covariance needs two samples) and --repeats >= 1')
    check_feature_flags(a)
    classifier = a.features == 'mnist-classifier'
    R.check_writable(a.out + '.json')
    x, cfg = None, {}
    if a.samples:   # open the samples first: a bad file fails before any statistics are computed
        x = F.load_samples(a.samples)
    device, rank, world = R.setup_device(a.device)
    if a.ckpt:
        a.ckpt = resolve_weights(a.ckpt)   # a hub id -> its cached folder
        model, diff, cfg = R.load_checkpoint(a.ckpt, device, ema=True, dtype=R.sampling_dtype(a, a.quant != 'none'), compile=a.compile)
        if len(cfg['data_shape']) != 3:
            R.fail(f"{a.ckpt} models {cfg['dataset']} vectors; FID needs images (use `evaluate.py errprop`)")
        if classifier and not a.dataset and cfg['dataset'] != 'mnist':
            R.fail(f"--features mnist-classifier scores MNIST digits; {a.ckpt} models {cfg['dataset']}")
        chain = R.chain_kwargs(a, diff)
        model = quant.for_sampling(model, diff, tuple(cfg['data_shape']), a.ckpt, a.quant,
                                   a.quant_compensate, a.calib_traj, a.recalibrate, device, **chain)
    dataset = a.dataset or cfg.get('dataset') or ('mnist' if classifier else None)
    data_dir = a.data_dir or cfg.get('data_dir', 'data')
    image_size = a.image_size or cfg.get('image_size')
    if classifier:   # the network sees the samples as they are: its size is theirs
        shape = tuple(cfg['data_shape']) if a.ckpt else tuple(x.shape[1:])
        size = a.image_size or shape[-1]
        if shape != (1, size, size):
            R.fail(f"the MNIST classifier at {size}x{size} needs (1, {size}, {size}) images; the "
                   f"{'checkpoint makes' if a.ckpt else 'samples are'} {shape}")
        net, info, cls_path = classifier_on_ranks(a, data_dir, size, device, rank, world)
        train = D.load_data('mnist', data_dir, size)
        lo, hi = R.shard(len(train), rank, world)
        ref_f = R.gather(F.classifier_features(net, train[lo:hi], a.sample_batch, device), world)
        embed = lambda imgs: F.classifier_features(net, imgs, a.sample_batch, device)
    else:
        net_tag = (f'random-init seed {a.seed}' if a.random_inception else F.FID_WEIGHTS) + f', dims {a.dims}'
        ref = a.ref_stats or F.ref_stats_path(dataset, data_dir, image_size, a.dims, a.random_inception)
        inc = F.inception_model(a.inception_weights, a.random_inception, device, a.seed, a.dims)
        ref_mu, ref_sigma = F.ref_stats(ref, inc, net_tag, dataset, data_dir, image_size, a.sample_batch,
                                        device, rank, world)
        embed = lambda imgs: F.inception_features(inc, imgs, a.sample_batch, device)
    R_ = a.repeats   # R disjoint blocks of sample seeds: 0..n-1, n..2n-1, ... (the EDM convention)
    if a.ckpt:   # sample i from its own seed (--seed, i), as sample.py: the same images on any batch or ranks
        n = a.n or 50000
        lo, hi = R.shard(R_ * n, rank, world)
        x = D.to_uint8(R.generate(model, diff, hi - lo, tuple(cfg['data_shape']), a.sample_batch, a.seed, device,
                                  progress=rank == 0, first=lo, **chain))
    else:
        n = min(a.n or len(x) // R_, len(x) // R_)
        if n < 2:
            R.fail(f'{a.samples} holds {len(x)} samples: too few for --repeats {R_} blocks of at least 2')
        lo, hi = R.shard(R_ * n, rank, world)
        x = x[lo:hi]
    f = R.gather(embed(x), world)
    if rank == 0:
        sampler, steps = (a.sampler, a.steps or diff.T) if a.ckpt else (None, None)
        run = dict(n=n, repeats=R_, sample_seeds=f'block r: {n} r .. {n} (r + 1) - 1', sampler=sampler, steps=steps,
                   ckpt=a.ckpt, ema=bool(a.ckpt), samples=a.samples, seed=a.seed, dataset=dataset, features=a.features)
        blocks = [f[r * n:(r + 1) * n] for r in range(R_)]
        spread = lambda v: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else None)   # noqa: E731
        pm = lambda m, sd, fmt: f'{m:{fmt}}' + ('' if sd is None else f' ± {sd:{fmt}} (std over {R_} blocks)')  # noqa: E731
        if classifier:
            sc = [F.feature_scores(b, ref_f, a.seed) for b in blocks]
            (fd, fd_sd), (kid, kid_sd) = spread([s['fd'] for s in sc]), spread([s['kid'] for s in sc])
            kid_sd = kid_sd if R_ > 1 else sc[0]['kid_std']   # one block: the KID's own subset std, as before
            R.write_json(a.out + '.json', dict(fid=fd, fid_std=fd_sd, fid_blocks=[s['fd'] for s in sc], kid=kid,
                                               kid_std=kid_sd, kid_blocks=[s['kid'] for s in sc], **run,
                                               test_accuracy=info['test_accuracy'], classifier=cls_path,
                                               classifier_info=info, image_size=size, n_ref=len(ref_f)))
            print(f"FD_mnist-classifier {pm(fd, fd_sd, '.4f')} KID {kid:.5f} ± {kid_sd:.5f} "
                  f"({'std over blocks' if R_ > 1 else 'subset std'}; features of "
                  f"the project's MNIST classifier, test accuracy {info['test_accuracy']:.2%}; not an Inception "
                  f"FID; n={n}{' per block' * (R_ > 1)} vs {len(ref_f)} training digits at {size}x{size}, sampler={sampler}, "
                  f"steps={steps}, ckpt={a.ckpt}, samples={a.samples}) -> {a.out}.json")
        else:
            fids = [F.fid_from_stats(F.feature_stats(b), (ref_mu, ref_sigma)) for b in blocks]
            fid, fid_sd = spread(fids)
            warn = ' (random Inception: pipeline check only, not a FID)' if a.random_inception else ''
            R.write_json(a.out + '.json', dict(fid=fid, fid_std=fid_sd, fid_blocks=fids, **run, ref_stats=ref,
                                               inception=net_tag + warn))
            print(f"FID {pm(fid, fid_sd, '.4f')} (n={n}{' per block' * (R_ > 1)}, sampler={sampler}, steps={steps}, "
                  f'ckpt={a.ckpt}, samples={a.samples}, ref={ref}){warn} -> {a.out}.json')
    R.teardown(end_process=True)


# ---- quanterr: quantised vs full-precision chains (seed 002) -----------------------------------
def run_quanterr(a):
    try:
        for s in a.quant:
            quant.parse_spec(s)
        quant.comp_keys(a.comp, a.window, 10 ** 9)   # names and windows, before anything long starts
    except ValueError as e:
        R.fail(str(e))
    if a.n < 2:
        R.fail('--n must be >= 2 (unbiased MMD)')
    if a.overhead_reps < 0:
        R.fail('--overhead-reps must be >= 0 (0: no timing)')
    device = start(a, '.json', '.png')
    a.ckpt = resolve_weights(a.ckpt)   # a hub id -> its cached folder (the calibration is stored beside it)
    model, diff, cfg = R.load_checkpoint(a.ckpt, device, dtype=R.sampling_dtype(a, quantised=True))
    shape, chain = tuple(cfg['data_shape']), R.chain_kwargs(a, diff)
    if D.is_toy(cfg['dataset']):   # fresh draws of the known distribution
        x0 = D.sample_toy(cfg['dataset'], a.n, torch.Generator().manual_seed(a.seed + 1))
    else:
        x0 = real_examples(cfg, a.n, a.seed + 1, a.data_dir)
    image = len(shape) == 3
    results, bar = {}, R.progress_bar(len(a.quant), 'quanterr', 'spec')
    for spec in a.quant:
        c = quant.get_calibration(model, diff, shape, spec, a.ckpt, a.calib_traj, a.calib_batch,
                                  a.recalibrate, device, **chain)
        r = results[spec] = QE.quanterr(model, diff, x0, spec, c, a.n, a.seed, device, batch_size=a.chunk,
                                           comps=a.comp, windows=a.window, overhead_reps=a.overhead_reps,
                                           **chain)
        for k in r['comps']:
            final = (f"PSNR {r['psnr'][k]:.2f} dB" if image else f"RMS(t=0) {r['rms0'][k]:.4g}") + \
                f"; median distance(t=0) {r['med0'][k]:.4g}"
            mean = sum(r['err'][k]) / len(r['err'][k])
            over = f"; time {100 * r['overhead'][k]:+.1f} %" if k in r.get('overhead', {}) else ''
            print(f"{spec} {k:>15}: {final}; RMS mean over t {mean:.4g}; D_MMD(0) {r['mmd0'][k]:.4g}{over}")
        print(f"{spec} {'fp':>15}: D_MMD(0) {r['mmd0']['fp']:.4g}", flush=True)
        bar.update()
    bar.close()
    final = ('PSNR of the final samples against FP from the same noise: images in [-1, 1] mapped to '
             '[0, 1], 10 log10(1 / MSE), mean over images' if image else
             'vector data: RMS distance of the final samples to FP from the same noise (rms0), no PSNR')
    R.write_json(a.out + '.json', dict(ckpt=a.ckpt, n=a.n, seed=a.seed, comp=a.comp, window=a.window,
                                       final_metric=final, overhead_reps=a.overhead_reps,
                                       overhead='median over reps of time(comp) / time(none) - 1, whole '
                                                'chains interleaved', **chain_settings(a, diff),
                                       results=results))
    QE.plot_quanterr(results, a.out + '.png')
    print(f'wrote {a.out}.json and {a.out}.png ({final})')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sub = p.add_subparsers(dest='cmd', required=True)

    e = sub.add_parser('errprop', help='D_MMD(t) along the sampling chain (Sec. 4.2, Fig. 1)')
    e.add_argument('--ckpt', nargs='+', required=True, help='run folders, ckpt.pt files, diffusers folders or hub model ids')
    e.add_argument('--labels', nargs='+', help='one per --ckpt (default: run folder names)')
    e.add_argument('--n', type=int, default=1000, help='backward samples N')
    e.add_argument('--m', type=int, default=1000, help='forward samples M of real data')
    e.add_argument('--t-stride', type=int,
                   help='measure every k-th visited t (first and last always); default: every one for '
                        'chains of up to 100 steps, every 10th beyond')
    e.add_argument('--kernels', nargs='+', default=['gaussian', 'laplace', 'imq'], choices=KERNELS)
    e.add_argument('--estimator', choices=('u', 'v'), default='u',
                   help='u: unbiased U-statistic; v: V-statistic of Eq. (10), floor O(1/N)')
    e.set_defaults(run=run_errprop, out='errprop')

    f = sub.add_parser('fid', help='FID with pytorch-fid Inception against training-set statistics')
    f.add_argument('--ckpt', help='run folder / ckpt.pt / diffusers folder / hub model id: sample with its EMA weights')
    f.add_argument('--samples', help='folder of PNGs or .npz (samples or arr_0, NHWC uint8)')
    f.add_argument('--n', '--num-samples', dest='n', type=int,   # torchrun takes --n for its own --n*
                   help='samples (default: 50000 with --ckpt, all with --samples)')
    f.add_argument('--repeats', type=int, default=1, help='score R disjoint blocks of n sample seeds (0..n-1, '
                   'n..2n-1, ...) and report mean ± std over them (never the best); R n samples in all')
    f.add_argument('--sample-batch', type=int, default=250, help='chains side by side, and Inception batch')
    f.add_argument('--dataset', choices=F.IMAGE_SETS, help="reference data set (default: the checkpoint's)")
    f.add_argument('--image-size', type=int, help='reference image size (default: native)')
    f.add_argument('--ref-stats', help='cached reference statistics .npz (default: <data-dir>/fid_stats_'
                                       '<dataset>_<size>.npz, or ./ if data-dir is read-only)')
    f.add_argument('--inception-weights', help=f'path to {F.FID_WEIGHTS} (default: torch hub cache)')
    f.add_argument('--dims', type=int, choices=(64, 192, 768, 2048), default=2048,
                   help="Inception block (pytorch-fid's --dims); FID is defined on 2048")
    f.add_argument('--random-inception', action='store_true',
                   help='random Inception weights: pipeline check only, not a FID')
    f.add_argument('--features', choices=('inception', 'mnist-classifier'), default='inception',
                   help='inception: FID; mnist-classifier (MNIST only): Frechet distance and KID in the '
                        "128-d features of the project's own digit CNN, trained once and cached")
    f.add_argument('--classifier', help='cached MNIST classifier .pt (default: <data-dir>/mnist_classifier_'
                                        '<size>_s0.pt, or ./ if data-dir is read-only); trained if absent')
    f.set_defaults(run=run_fid, out='fid')

    t = sub.add_parser('faulttol', help="Theorem 4.1 measured: does the chain amplify an error injected at t0?")
    t.add_argument('--ckpt', nargs='+', required=True, help='run folders, ckpt.pt files, diffusers folders or hub model ids')
    t.add_argument('--labels', nargs='+', help='one per --ckpt (default: run folder names)')
    t.add_argument('--t0', type=int, nargs='+', required=True, help='chain indices where the error enters')
    t.add_argument('--delta', type=float, default=0.1, help='RMS of the injected error')
    t.add_argument('--mode', choices=('iso', 'model'), default='iso',
                   help="iso: isotropic Gaussian; model: along the model's own eps (a mis-scaled eps)")
    t.add_argument('--n', type=int, default=1000, help='pairs of chains')
    t.add_argument('--kernels', nargs='+', default=['gaussian'], choices=KERNELS)
    t.set_defaults(run=run_faulttol, out='faulttol')

    s = sub.add_parser('es-search', help='epsilon scaling: the best factor on a grid for one step count')
    s.add_argument('--ckpt', required=True, help='run folder, ckpt.pt, diffusers DDPM folder, or hub model id (google/ddpm-cifar10-32)')
    s.add_argument('--grid', type=float, nargs='+', default=[1.0, 1.002, 1.005, 1.01, 1.02, 1.03, 1.05],
                   help='eps scales B to try (lambda = B + K i with --eps-scale-k)')
    s.add_argument('--n', type=int, default=1000, help='samples per scale')
    s.add_argument('--m', type=int, default=1000, help='held-out real examples')
    s.set_defaults(run=run_es_search, out='es_search')

    q = sub.add_parser('quanterr', help='trajectory error of W8A8 / W4A8 / W4A4 sampling, with and without '
                                        'error compensation')
    q.add_argument('--ckpt', required=True, help='run folder, ckpt.pt, diffusers DDPM folder, or hub model id (google/ddpm-cifar10-32)')
    q.add_argument('--quant', nargs='+', default=list(quant.SPECS),
                   help='specs: w8a8, w4a8 (weights per output channel), w4a4 (weight groups of 64), '
                        'wXaYgN (groups of N)')
    q.add_argument('--n', type=int, default=256, help='chains compared (and real samples for D_MMD)')
    q.add_argument('--calib-traj', type=int, help='calibration chains (default 4 x 64 toy, 2 x 16 images)')
    q.add_argument('--calib-batch', type=int)
    q.add_argument('--comp', nargs='+', default=['bias', 'affine', 'cumulative'], metavar='COMP',
                   help=f'compensations compared with the plain quantised chain: {", ".join(quant.COMPS)} '
                        '(bias / affine: per-step fits; cumulative: K_t error model, window --window)')
    q.add_argument('--window', nargs='+', default=['1'], metavar='M',
                   help="windows m of --comp cumulative, one result each: integers >= 1 or S (all steps)")
    q.add_argument('--overhead-reps', type=int, default=5,
                   help='timed reps of the sampling-time overhead per compensation (0: no timing)')
    q.add_argument('--recalibrate', action='store_true', help='ignore a stored quant_<spec>.pt')
    q.set_defaults(run=run_quanterr, out='quanterr')

    for sp in (e, f, t, s, q):   # the same meaning in every subcommand
        sp.add_argument('--seed', type=int, default=0)
        sp.add_argument('--data-dir', help="real data (default: the checkpoint's data dir)")
        sp.add_argument('--out', default=sp.get_default('out'), help='writes OUT.json (and OUT.png)')
        sp.add_argument('--device', default='auto')
        if sp is not f:
            sp.add_argument('--chunk', type=int, help='network batch size (memory only; results do not change)')
    for sp in (e, f, t):   # any sampler, quantised models too
        R.add_sampling_args(sp)
    R.add_sampling_args(s, quant=False)
    R.add_sampling_args(q, quant=False)
    a = p.parse_args(argv)
    a.out = a.out[:-5] if a.out.endswith('.json') else a.out
    a.run(a)


if __name__ == '__main__':
    try:
        main()
    except (FileNotFoundError, ValueError) as e:   # bad input: one clear line, no traceback
        raise SystemExit(f'error: {e}') from None
