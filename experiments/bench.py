"""Throughput and memory benchmarks of the training step, the cost of the consistency regulariser
(Sec. 5; the paper's Fig. 4 is about this cost), the cost of measuring D_MMD(t) (Sec. 4.2), and
the regulariser's gradient against the eps-MSE gradient on a trained model.

    python -m experiments.bench                                    # train, reg, errprop: minutes on a CPU
    python -m experiments.bench --what reg --batch-size 128 --k both --json reg.json
    python -m experiments.bench --what methods --flags "--dataset 8gaussians" --variant vanilla= "ip=--loss ip"
    python -m experiments.bench --what reg-grad --ckpt out/8gaussians
    python -m experiments.bench --what compare --compare 06936f2 --model cifar10 --batch-size 8 --reps 5
    python -m experiments.bench --what eval --ckpt out/8gaussians --reps 1 --json results/bench_eval.json
    python -m experiments.bench --what es-search                  # the ES search replayed on results/steps
    python -m experiments.bench --what kernels --threads 1         # matmul / conv TFLOP/s: the ceiling, per dtype
    python -m experiments.bench --what profile --model cifar10 --batch-size 8 --threads 1   # self time per op
    python -m experiments.bench --what sample-batch --threads 1   # inference rows/s by batch: the batch to use

Every timing runs train.py's own step (trainstep.local_batch, trainstep.compute_loss, then
trainstep.optimizer_step: backward, clip, Adam, EMA), the module train.py runs it from.
Shared CPU cores make timings noisy, so variants are timed interleaved (each repetition runs
every variant once) and reported as medians of per-repetition ratios to the first variant.
Memory is what a measurement allocated on top of what existed when it started: CUDA
max_memory_allocated; on a CPU the peak process RSS (VmHWM, reset per measurement where Linux
allows it, else ru_maxrss growth, which never goes down).
The train rows also give the model FLOPs per image of the step (torch's FlopCounterMode over one
forward and backward) and the MFU: achieved FLOP/s over the device's dense peak (benchlib.PEAKS, bf16 rows
against bf16, fp32 rows against TF32; --peak-tflops overrides).
"""
import argparse
import contextlib
import glob
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time

import torch

import runtime as R
import trainstep
from diffusion import Diffusion
from experiments.benchlib import (count_flops, device_peak, image_config, import_tree, kernel_rates, make_step,
                                  mem_peak_mb, mem_start, proc_field, random_images, sample_batch_rates,
                                  step_profile, sync, time_variants)
from mmd import chunked, mmd2
from model import build_model, resolve_dtype


def bench_train(a, dev):
    rows = []
    for name in a.model or ['small', 'cifar10']:
        cfg = image_config(a, name)
        fwd, fwdbwd = count_flops(cfg, dev)
        for dtype in a.dtype:
            for comp in ([False, True] if a.compile else [False]):
                m0 = mem_start(dev)   # before the model: weights, Adam state and EMA count too
                step, net = make_step(cfg, random_images(4 * cfg['batch_size'], dev), dev, dtype, comp)
                n = sum(p.numel() for p in net.parameters())
                for i in range(a.warmup + 2 * comp):   # compile traces on its first calls
                    step(i)
                sync(dev)
                t0 = time.perf_counter()
                for i in range(a.iters):
                    step(1000 + i)
                sync(dev)
                dt = time.perf_counter() - t0
                img_s = cfg['batch_size'] * a.iters / dt
                peak = a.peak[dtype] if a.peak else None   # MFU: achieved model FLOP/s over the peak
                rows.append(dict(model=name, params_M=n / 1e6, batch=cfg['batch_size'], dtype=dtype,
                                 compile=comp, s_per_step=dt / a.iters, img_per_s=img_s,
                                 peak_mem_MB=mem_peak_mb(dev, m0), gflop_fwd_img=fwd / 1e9,
                                 gflop_fwdbwd_img=fwdbwd / 1e9, tflop_s=fwdbwd * img_s / 1e12,
                                 mfu=fwdbwd * img_s / (peak * 1e12) if peak else None))
                del step, net
    return rows


def bench_reg(a, dev):
    name = (a.model or ['cifar10' if a.gpu else 'small'])[0]
    base = image_config(a, name)
    step, _ = make_step(base, random_images(4 * base['batch_size'], dev), dev, a.dtype[-1], a.compile)
    k_modes = {'random', 'mean'} if a.k == 'both' else {a.k or ('random' if a.gpu else 'mean')}
    variants = [('vanilla', base, None)]
    for L in a.reg_L:
        for grad in ('full', 'last'):
            cfg = image_config(a, name, ['--reg', '--reg-L', str(L), '--reg-grad', grad])
            if 'random' in k_modes:
                variants.append((f'L={L} {grad} k~U{{1..L}}', cfg, None))
            if 'mean' in k_modes:   # cost is linear in k, so k = E[k] = (L+1)/2 gives the mean cost
                variants.append((f'L={L} {grad} k={(L + 1) // 2}', cfg, (L + 1) // 2))
    rows = time_variants(step, variants, a, dev)
    for r in rows:
        r.pop('all_s_per_step')
    return rows, (f"reg: model {name}, batch {base['batch_size']}, {a.dtype[-1]}, compile {a.compile}; "
                  f'{a.reps} interleaved reps x {a.iters} steps per variant; ratio = median over reps of t / t_vanilla')


def bench_methods(a, dev):
    """--variant NAME=FLAGS ...: train.py flag sets on top of --flags, on the real training set of
    the first variant's data set, timed interleaved (experiments/reproduce.py's timing jobs)."""
    variants = []
    for v in a.variant:
        name, _, flags = v.partition('=')
        variants.append((name, R.parse_config(shlex.split(a.flags) + shlex.split(flags))[0], None))
    data = trainstep.training_set(variants[0][1]).to(dev)
    step, _ = make_step(variants[0][1], data, dev, a.dtype[-1], a.compile)
    rows = time_variants(step, variants, a, dev)
    return {r.pop('variant'): dict(r, flags=shlex.split(v.partition('=')[2])) for r, v in zip(rows, a.variant)}


def bench_errprop(a, dev):
    name = (a.model or ['cifar10' if a.gpu else 'small'])[0]
    model, diff = build_model(name, (3, 32, 32)).to(dev).eval(), Diffusion(device=dev)   # DDPM's T = 1000
    net = chunked(model, a.chunk) if a.chunk else model
    g = torch.Generator(dev).manual_seed(0)
    x = torch.randn((a.n, 3, 32, 32), generator=g, device=dev)
    x0 = torch.rand((a.n, 3, 32, 32), generator=g, device=dev) * 2 - 1
    rows = []
    for dtype in a.dtype:
        ts, tm = [], []
        amp = torch.autocast(dev.split(':')[0], torch.bfloat16) if dtype == 'bf16' else contextlib.nullcontext()
        for rep in range(a.reps + 1):   # rep 0: warm-up on a small slice
            xr, x0r = (x, x0) if rep else (x[:8], x0[:8])
            with torch.no_grad(), amp:
                t0 = time.perf_counter()   # as errprop_curve: one ancestral step, then the measurement
                diff.p_step(net, xr, 500, torch.randn(xr.shape, generator=g, device=dev))
                sync(dev)
                t1 = time.perf_counter()
                y = diff.q_sample(x0r, 500, torch.randn(x0r.shape, generator=g, device=dev))
                for k in ('gaussian', 'laplace', 'imq'):
                    mmd2(xr, y, k, 'u').item()
                t2 = time.perf_counter()
            ts, tm = (ts + [t1 - t0], tm + [t2 - t1]) if rep else (ts, tm)
        s, m = statistics.median(ts), statistics.median(tm)
        rows.append(dict(model=name, N=a.n, M=a.n, dtype=dtype, p_step_s=s, mmd_3kernels_s=m,
                         per_step_s=s + m, T1000_total_min=(1000 * (s + m) + m) / 60))
    return rows


def bench_compare(a, dev):
    """--compare REF: REF's training step against this tree's, interleaved (each repetition runs
    a.iters steps of both, in alternating order), same config, data and initial weights.
    ratio = REF time / this tree's time per repetition (> 1: this tree is faster). The losses of a
    step agree when both trees draw a step's t, noise and batch alike (not so before runtime.py)."""
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        ref = import_tree(a.compare, folder)
        conf = ref['runtime'] if hasattr(ref.get('runtime'), 'parse_config') else ref['train']
        for name in a.model or ['small', 'cifar10']:
            cfg = image_config(a, name)   # --channels-last for REF only if REF has it
            cl = ['--channels-last'] if a.channels_last and 'channels_last' in conf.CONFIG else []
            ref_cfg = conf.parse_config(['--dataset', 'cifar10', '--model', name, '--batch-size',
                                         str(cfg['batch_size'])] + cl)[0]
            data = random_images(4 * cfg['batch_size'], dev)
            for dtype in a.dtype:
                s_cur, net = make_step(cfg, data, dev, dtype, a.compile)
                s_ref = make_step(ref_cfg, data, dev, dtype, a.compile, ref, net.state_dict())[0]
                steps = {'ref': s_ref, 'cur': s_cur}
                for i in range(a.warmup + 2 * a.compile):
                    for s in steps.values():
                        s(i)
                times, losses = {'ref': [], 'cur': []}, {'ref': [], 'cur': []}
                for rep in range(a.reps):
                    for who in (('ref', 'cur') if rep % 2 == 0 else ('cur', 'ref')):
                        sync(dev)
                        t0 = time.perf_counter()
                        losses[who] += [steps[who](10_000 + rep * a.iters + i)['loss']
                                        for i in range(a.iters)]
                        sync(dev)
                        times[who].append((time.perf_counter() - t0) / a.iters)
                    if a.verbose:
                        print(f"rep {rep + 1}/{a.reps}: {a.compare} {1e3 * times['ref'][-1]:.1f} ms, "
                              f"current {1e3 * times['cur'][-1]:.1f} ms", flush=True)
                ratio = [r / c for r, c in zip(times['ref'], times['cur'])]
                rel = [abs(float(r - c)) / max(abs(float(c)), 1e-12) for r, c in zip(losses['ref'], losses['cur'])]
                rows.append(dict(model=name, batch=cfg['batch_size'], dtype=dtype, channels_last=cfg['channels_last'],
                                 ref_s_per_step=statistics.median(times['ref']),
                                 cur_s_per_step=statistics.median(times['cur']), ratio=statistics.median(ratio),
                                 ratio_min=min(ratio), ratio_max=max(ratio), loss_max_rel_diff=max(rel)))
    return rows


def bench_reg_grad(a, dev):
    """How strong is the regulariser, and does its gradient carry signal? On --ckpt's EMA model with
    its own settings plus --reg at the paper's values, over a.batches training batches:
    |grad of lambda_reg w_r L_reg| / |grad of lambda_nll L_nll| (compute_loss once with
    lambda_reg = 0 and once with lambda_nll = 0, the same step index, so the same t, noise, r and k),
    and the gradient signal-to-noise: the cosine between the gradients of two independent batches
    (consecutive step indices: their own data, t, noise, r and k) at the same weights, of each loss.
    A cosine near 0 means that one batch's gradient says nothing about the next one's."""
    model, _, saved = R.load_checkpoint(a.ckpt[0], dev, ema=True)
    cfg = {**saved, 'reg': True, 'reg_L': 5, 'reg_grad': 'full', 'warm_start': True}
    R.resolve_schedule(cfg)
    data, ps, rows = trainstep.training_set(cfg).to(dev), list(model.parameters()), []
    diff = R.make_diffusion(cfg, dev)
    flat = lambda loss: torch.cat([g.flatten() for g in torch.autograd.grad(loss, ps)])   # noqa: E731
    prev = None
    for step in range(5000, 5000 + a.batches):
        x0 = trainstep.local_batch(data, cfg, step, 0, 1, dev)
        xr = trainstep.local_batch(data, cfg, step, 0, 1, dev, 'reg') if trainstep.reg_batch_size(cfg) else None
        nll, _ = trainstep.compute_loss(model, diff, x0, {**cfg, 'lambda_reg': 0.0}, step, x_reg=xr)
        reg, st = trainstep.compute_loss(model, diff, x0, {**cfg, 'lambda_nll': 0.0}, step, x_reg=xr)
        gn, gr = flat(nll), flat(reg)
        row = dict(step=step, r=st['r'], k=st['k'], w=st['w'], grad_nll=float(gn.norm()), grad_reg=float(gr.norm()),
                   ratio=float(gr.norm() / gn.norm()))
        if prev is not None:   # disjoint pairs (5000, 5001), (5002, 5003), ...: independent cosines
            cos = torch.nn.functional.cosine_similarity
            row.update(cos_nll=float(cos(gn, prev[0], 0)), cos_reg=float(cos(gr, prev[1], 0)))
        prev = None if prev is not None else (gn, gr)
        rows.append(row)
    ratio = [r['ratio'] for r in rows]
    cn, cr = [r['cos_nll'] for r in rows if 'cos_nll' in r], [r['cos_reg'] for r in rows if 'cos_reg' in r]
    return dict(rows=rows, median_ratio=statistics.median(ratio), min_ratio=min(ratio), max_ratio=max(ratio),
                pairs=len(cn), mean_cos_nll=statistics.mean(cn) if cn else None,
                mean_cos_reg=statistics.mean(cr) if cr else None,
                se_cos_nll=statistics.stdev(cn) / len(cn) ** 0.5 if len(cn) > 1 else None,
                se_cos_reg=statistics.stdev(cr) / len(cr) ** 0.5 if len(cr) > 1 else None,
                what=f"|grad of {cfg['lambda_reg']} w_r L_reg| / |grad of {cfg['lambda_nll']} L_nll|, "
                     f"{a.ckpt[0]} EMA model, batch {cfg['batch_size']} "
                     f"({'halves' if cfg.get('reg_halves') else 'a second batch'} for the regulariser)")


class CountCalls(torch.nn.Module):
    """The network, counting the samples it is evaluated on (network evaluations)."""
    def __init__(self, net):
        super().__init__()
        self.net, self.n = net, 0

    def forward(self, x, t):
        self.n += len(x)
        return self.net(x, t)


def bench_eval(a, dev):
    """--what eval: the step-count protocol's evaluation of each --ckpt (protocol.evaluate_steps with
    experiments/reproduce.py's settings) as results/steps was evaluated (fp32 network, the whole ES
    grid, separate chains), in fp32 with the fast evaluation, and in the default (--dtype auto,
    fast; with --compile also compiled: rep 0 traces, later reps reuse), interleaved; per variant
    (dtype, fast, compile) each repetition's wall time, network evaluations, the speed-up over the
    first, and per metric the largest difference to the first beside results/steps' seed spread."""
    from experiments import protocol as P
    variants = dict(grid_fp32=('fp32', False, False), fast_fp32=('fp32', True, False), fast_default=('auto', True, False),
                    **({'fast_default_compile': ('auto', True, True)} if a.compile else {}))
    rows = []
    for ckpt in a.ckpt:
        runs = {v: [] for v in variants}
        for rep in range(a.reps):
            for v in (list(runs) if rep % 2 == 0 else reversed(list(runs))):
                model, diff, cfg = R.load_checkpoint(ckpt, dev, ema=True, dtype=variants[v][0], compile=variants[v][2])
                net, mnist = CountCalls(model), cfg['dataset'] == 'mnist'
                t0 = time.perf_counter()
                res = P.evaluate_steps(net, diff, cfg, n=256 if mnist else 1000, n_select=128 if mnist else 500,
                                       chunk=250 if mnist else None, n_ref=P.N_REF, fast=variants[v][1])
                runs[v].append(dict(s=time.perf_counter() - t0, evals=net.n, res=res, dtype=diff.net_dtype))
        ref = glob.glob(os.path.join(P.RES, 'steps', f"steps_{cfg['dataset']}_T{cfg['T']}_{a.method}_s*.json"))
        seeds = [P.flat_metrics(P.read_json(f)) for f in ref]
        old = P.flat_metrics(runs['grid_fp32'][0]['res'])
        row = dict(ckpt=ckpt, dataset=cfg['dataset'], T=cfg['T'],
                   seed_spread_from=f'{len(seeds)} seeds of results/steps ({a.method})')
        for v in variants:
            t = [r['s'] for r in runs[v]]
            new, groups = P.flat_metrics(runs[v][0]['res']), {}
            for key in old:
                spread = statistics.stdev([s[key] for s in seeds if key in s]) if len(seeds) > 1 else float('nan')
                g = groups.setdefault(key[0], dict(max_abs_diff=0.0, at=None, seed_std_there=None, n=0, n_beyond_2std=0))
                d = abs(new[key] - old[key])
                g['n'] += 1
                g['n_beyond_2std'] += d > 2 * spread
                if d >= g['max_abs_diff']:
                    g.update(max_abs_diff=d, at=str(key[1:]), seed_std_there=spread)
            row[v] = dict(dtype=runs[v][0]['dtype'], s=statistics.median(t), s_reps=t, net_evals=runs[v][0]['evals'],
                          speedup=statistics.median(o['s'] / r['s'] for o, r in zip(runs['grid_fp32'], runs[v])),
                          metrics=groups)
        rows.append(row)
    return rows


def bench_es_search():
    """--what es-search: protocol.es_search replayed on every ES grid of results/steps (the scores
    it visits are the grid's, on the same streams): how often it picks the grid's best scale, the
    excess score where it does not, and the scores it needs against the grid's."""
    from experiments import protocol as P
    rows, misses = [], []
    for f in sorted(glob.glob(os.path.join(P.RES, 'steps', 'steps_*.json'))):
        res = P.read_json(f)
        for r in res.get('rows', []):
            if r.get('es_grid') and None not in r['es_grid']:
                g = dict(zip(P.ES_GRID, r['es_grid']))
                best, seen = P.es_search(g.get, P.ES_GRID)
                full = min(g, key=g.get)
                rows.append(dict(same=best == full, scores=len(seen)))
                if best != full:
                    misses.append(dict(run=os.path.basename(f), sampler=r['sampler'], S=r['steps'], grid_best=full,
                                       search_best=best, excess=g[best] - g[full]))
    return dict(grids=len(rows), same_pick=sum(r['same'] for r in rows), grid_scores=len(P.ES_GRID),
                mean_scores=statistics.mean(r['scores'] for r in rows), max_scores=max(r['scores'] for r in rows),
                misses=misses)


def show(title, rows):
    cells = [[f'{v:.4g}' if isinstance(v, float) else '-' if v is None else str(v) for v in r.values()]
             for r in rows]
    w = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(rows[0])]
    print(f'\n== {title}')
    for r in [list(rows[0])] + cells:
        print('  '.join(v.rjust(w[i]) for i, v in enumerate(r)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--what', default='all', choices=('train', 'reg', 'errprop', 'methods', 'reg-grad', 'compare', 'eval', 'es-search', 'kernels', 'profile', 'sample-batch', 'all'),
                   help='all = train, reg and errprop; kernels: matmul and conv TFLOP/s per dtype and layout; profile: '
                   'one training step\'s self time per operator, per --dtype; sample-batch: inference rows/s by batch')
    p.add_argument('--model', nargs='+', help='train: these configs (default small cifar10); '
                   'reg, errprop: the first one (default small on CPU, cifar10 on GPU); sample-batch: these of mlp, tiny, cifar10')
    p.add_argument('--batch-size', type=int, help='default 128 on GPU; CPU: 16 (small), 4 (others)')
    p.add_argument('--iters', type=int, help='timed steps (per variant and rep); default GPU 20, CPU 2')
    p.add_argument('--warmup', type=int, help='untimed steps first; default GPU 3, CPU 1')
    p.add_argument('--reps', type=int, help='interleaved repetitions (reg, methods, errprop); default '
                                            'GPU 5, CPU 3 (errprop: GPU 3, CPU 1)')
    p.add_argument('--device', default='auto')
    p.add_argument('--threads', type=int, help="torch.set_num_threads (default: torch's own choice)")
    p.add_argument('--dtype', nargs='+', choices=('fp32', 'bf16', 'auto'),
                   help='default GPU fp32 bf16, CPU fp32 auto (auto: what train.py runs by default here)')
    p.add_argument('--compile', action=argparse.BooleanOptionalAction, help='default: on for GPU')
    p.add_argument('--channels-last', action='store_true', help='train, reg, compare: channels_last U-Net (train.py --channels-last)')
    p.add_argument('--reg-L', type=int, nargs='+', default=[1, 3, 5, 7, 9])
    p.add_argument('--k', choices=('random', 'mean', 'both'), help='reg: k ~ U{1..L} as in training '
                   'and/or k fixed at (L+1)/2; default GPU random, CPU mean')
    p.add_argument('--flags', default='', help='methods: train.py flags common to every variant')
    p.add_argument('--variant', nargs='+', default=[], help='methods: NAME=FLAGS (the first is the reference)')
    p.add_argument('--compare', metavar='REF', help="compare: this tree's training step against git ref "
                   'REF (e.g. 06936f2, HEAD), interleaved; --channels-last applies to REF only if it has it')
    p.add_argument('--ckpt', nargs='+', help='reg-grad: the trained run; eval: one or more runs')
    p.add_argument('--method', default='vanilla', help="eval: results/steps' method whose seeds give the spread")
    p.add_argument('--batches', type=int, default=12, help='reg-grad: training batches')
    p.add_argument('--n', type=int, default=1000, help='errprop: N = M samples')
    p.add_argument('--chunk', type=int, help='errprop: network batch size (default: all N at once)')
    p.add_argument('--peak-tflops', type=float, nargs='+', metavar='TFLOPS',
                   help='train: the MFU denominator, BF16 [FP32] dense peak TFLOP/s (default: by device '
                        'name, see benchlib.PEAKS; fp32 = bf16 / 2 when only one is given)')
    p.add_argument('--verbose', action='store_true', help='print every repetition')
    p.add_argument('--json', help='also write the results to this JSON file')
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = R.setup_device(a.device, distributed=False)[0]
    a.gpu = dev.startswith('cuda')
    a.iters = a.iters or (20 if a.gpu else 2)
    a.warmup = (3 if a.gpu else 1) if a.warmup is None else a.warmup
    a.dtype = list(dict.fromkeys(resolve_dtype(d, dev) for d in a.dtype or (['fp32', 'bf16'] if a.gpu else ['fp32', 'auto'])))
    a.compile = a.gpu if a.compile is None else a.compile
    a.reps = a.reps or ((3 if a.gpu else 1) if a.what == 'errprop' else (5 if a.gpu else 3))
    if a.peak_tflops and (len(a.peak_tflops) > 2 or min(a.peak_tflops) <= 0):
        R.fail('--peak-tflops takes one or two positive numbers: BF16 [FP32] TFLOP/s')
    if a.iters < 1 or a.warmup < 0 or a.reps < 1 or (a.batch_size or 4) < 4 or a.n < 4 or min(a.reg_L) < 1:
        R.fail('--iters, --reps, --reg-L must be >= 1, --warmup >= 0, --batch-size and --n >= 4')
    if a.what == 'methods' and not a.variant:
        R.fail('--what methods needs --variant NAME=FLAGS (one or more)')
    if (a.what == 'compare') != bool(a.compare):
        R.fail('--what compare and --compare REF go together')
    if a.what == 'reg-grad' and len(a.ckpt or []) != 1:
        R.fail('--what reg-grad needs --ckpt RUN (one)')
    if a.what == 'eval' and not a.ckpt:
        R.fail('--what eval needs --ckpt RUN [RUN ...]')
    if a.json:
        R.check_writable(a.json)
    try:
        name = torch.cuda.get_device_name(dev) if a.gpu else proc_field('model name', '/proc/cpuinfo')
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    a.peak = device_peak(a, name)
    out = dict(device=f'{dev} ({name})', torch=torch.__version__, threads=torch.get_num_threads(),
               load_avg=' '.join(f'{v:.2f}' for v in os.getloadavg()), cores=os.cpu_count(),
               command=shlex.join([sys.executable] + sys.argv if argv is None else ['-m', 'experiments.bench'] + argv))
    for k, v in out.items():
        print(f'{k}: {v}')
    if not a.gpu and os.getloadavg()[0] > os.cpu_count() - 0.5 and torch.get_num_threads() > 1:
        print('warning: the CPU is busy with other processes; timings with several threads suffer '
              'badly from oversubscription (try --threads 1)')
    print('peak_mem_MB: ' + ('CUDA max_memory_allocated' if a.gpu else 'peak process RSS (VmHWM)')
          + ' growth over the start of each measurement')
    if a.what in ('train', 'all'):
        out['peak'] = a.peak
        out['train'] = bench_train(a, dev)
        show(f'train: {a.warmup} warm-up + {a.iters} timed steps each; GFLOPs per image of the step '
             f"(FlopCounterMode); mfu against {a.peak['name'] if a.peak else 'no known peak (CPU)'}",
             out['train'])
    if a.what in ('reg', 'all'):
        out['reg'], head = bench_reg(a, dev)
        show(head, out['reg'])
    if a.what == 'methods':
        out['methods'] = bench_methods(a, dev)
        show(f'methods ({a.reps} interleaved reps x {a.iters} steps; ratio to {a.variant[0].partition("=")[0]})',
             [dict(method=k, ms_per_step=1e3 * r['s_per_step'], ratio=r['ratio']) for k, r in out['methods'].items()])
    if a.what in ('errprop', 'all'):
        out['errprop'] = bench_errprop(a, dev)
        show('errprop: one chain step of errprop_curve = p_step on N, then q_sample + MMD^2 (3 kernels, '
             'U-statistic) on N = M; T1000_total_min = projected whole T = 1000 run', out['errprop'])
    if a.what == 'compare':
        out['compare'] = bench_compare(a, dev)
        show(f'compare: {a.compare} vs the working tree, {a.reps} interleaved reps x {a.iters} steps (order '
             f'alternating), {a.warmup} warm-up; ratio = {a.compare} time / current time per rep: median, min, max; '
             f'loss_max_rel_diff: the two losses of the same step', out['compare'])
    if a.what == 'reg-grad':
        out['reg_grad'] = bench_reg_grad(a, dev)
        r = out['reg_grad']
        print(f"{r['what']}: median {r['median_ratio']:.3f} (range {r['min_ratio']:.3f}-{r['max_ratio']:.3f}, "
              f'{a.batches} batches)')
        if r['pairs']:
            print(f"gradient cosine between independent batches ({r['pairs']} pairs): eps-MSE "
                  f"{r['mean_cos_nll']:.3f} +- {r['se_cos_nll'] or 0:.3f}, regulariser {r['mean_cos_reg']:.3f} "
                  f"+- {r['se_cos_reg'] or 0:.3f} (mean +- s.e.)")
    if a.what == 'eval':
        out['eval'] = bench_eval(a, dev)
        for r in out['eval']:
            print(f"\neval {r['ckpt']} ({r['dataset']}, T = {r['T']}):")
            vs = [v for v in ('grid_fp32', 'fast_fp32', 'fast_default', 'fast_default_compile') if v in r]
            for v in vs:
                reps = ', '.join(f'{s:.1f}' for s in r[v]['s_reps'])
                print(f"  {v:20s} ({r[v]['dtype']}): {r[v]['s']:7.1f} s (reps {reps}), {r[v]['net_evals']:>10,} network rows, "
                      f"{r[v]['speedup']:.2f}x")
            for v in vs[1:]:
                show(f"{v}: largest |difference to grid_fp32| per metric, beside the seed spread ({r['seed_spread_from']})",
                     [dict(metric=k, **g) for k, g in r[v]['metrics'].items()])
    if a.what == 'kernels':
        show('kernels: TFLOP/s of one process (median of 5 calls)', out.setdefault('kernels', kernel_rates(dev, a.batch_size or 8)))
    if a.what == 'sample-batch':
        show('sample-batch: one chain step of inference (Diffusion.eps), chain rows/s', out.setdefault('sample_batch', sample_batch_rates(dev, a.dtype, compile=a.compile, nets=a.model)))
    if a.what == 'profile':   # where the step's time goes, per operator, for each --dtype
        cfg = image_config(a, (a.model or ['cifar10'])[0])
        for dtype in a.dtype:
            out[f'profile_{dtype}'] = step_profile(make_step(cfg, random_images(4 * cfg['batch_size'], dev), dev, dtype, False)[0])
            show(f"profile of one {cfg['model']} step, batch {cfg['batch_size']}, {dtype}: self time per operator", out[f'profile_{dtype}'])
    if a.what == 'es-search':
        r = out['es_search'] = bench_es_search()
        print(f"es_search on {r['grids']} grids of results/steps: the grid's pick in {r['same_pick']}, "
              f"{r['mean_scores']:.2f} scores on average (at most {r['max_scores']}) instead of {r['grid_scores']}")
        if r['misses']:
            show('where it picks another scale (excess: its score minus the grid best, selection stream)', r['misses'])
    if a.json:
        R.write_json(a.json, out)


if __name__ == '__main__':
    try:
        main()
    except (FileNotFoundError, ValueError) as e:   # bad input: one clear line, no traceback
        raise SystemExit(f'error: {e}') from None
