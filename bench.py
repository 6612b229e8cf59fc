"""Throughput and memory benchmarks: training speed, the cost of the consistency regulariser
(Sec. 5; the paper's Fig. 4 is about this cost) and the cost of measuring D_MMD(t) (Sec. 4.2).

    python bench.py                                    # all three, small settings: minutes on a CPU
    python bench.py --what reg --batch-size 128 --k both --json reg.json

Every measurement runs train.py's training step (train.compute_loss, backward, clip, Adam, EMA)
on random uint8 images of CIFAR-10's shape. Shared CPU cores make timings noisy, so the reg table
times its variants interleaved (each repetition runs every variant once) and reports medians of
per-repetition ratios to vanilla. Memory is what a measurement allocated on top of what existed
when it started: CUDA max_memory_allocated; CPU peak process RSS (VmHWM, reset per measurement;
where that reset is not allowed, ru_maxrss growth, which never goes down).
"""
import argparse
import contextlib
import copy
import ctypes
import functools
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import time

import torch

import train
from diffusion import Diffusion
from mmd import chunked, mmd2
from model import build_model

try:   # hand freed heap back to the OS, so that RSS growth belongs to the next measurement
    _trim = ctypes.CDLL('libc.so.6').malloc_trim
except (OSError, AttributeError):
    _trim = int


def sync(dev):
    if dev.startswith('cuda'):
        torch.cuda.synchronize()


def proc_field(field, file='/proc/self/status'):
    with open(file) as f:
        return next(line.split(':', 1)[1].strip() for line in f if line.startswith(field))


def peak_rss_kb():
    try:
        return int(proc_field('VmHWM').split()[0])
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def mem_start(dev):
    """Start a peak-memory measurement: returns the baseline that mem_peak_mb subtracts."""
    if dev.startswith('cuda'):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    _trim(0)
    with contextlib.suppress(OSError), open('/proc/self/clear_refs', 'w') as f:
        f.write('5')   # Linux >= 4.0: resets the peak RSS (VmHWM) to the current RSS
    return peak_rss_kb()


def mem_peak_mb(dev, start):
    return ((torch.cuda.max_memory_allocated() - start) / 2 ** 20 if dev.startswith('cuda')
            else (peak_rss_kb() - start) / 1024)


def amp(dev, dtype):
    return torch.autocast(dev.split(':')[0], torch.bfloat16) if dtype == 'bf16' else contextlib.nullcontext()


def make_step(name, bs, dev, dtype, compile_):
    """train.py's step for model config `name`: returns (step(i, cfg, loss_fn) -> stats, cfg, n_params)."""
    cfg = train.parse_config(['--dataset', 'cifar10', '--model', name, '--batch-size', str(bs)])[0]
    raw = build_model(cfg['model'], (3, 32, 32)).to(dev)
    ema = copy.deepcopy(raw).eval().requires_grad_(False)
    opt = torch.optim.Adam(raw.parameters(), lr=cfg['lr'])
    model = torch.compile(raw) if compile_ else raw
    diff = Diffusion(cfg['T'], cfg['beta_1'], cfg['beta_T'], cfg['sigma'], dev)
    data = torch.randint(0, 256, (4 * bs, 3, 32, 32), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0)).to(dev)

    def step(i, cfg=cfg, loss_fn=train.compute_loss):
        torch.manual_seed(i)   # dropout, seeded per step as in train.py
        x0 = train.local_batch(data, cfg, i, 0, 1, dev)
        with amp(dev, dtype):
            loss, stats = loss_fn(model, diff, x0, cfg, i)
        train.optimizer_step(loss, raw, opt, ema, cfg)
        return stats
    return step, cfg, sum(p.numel() for p in raw.parameters())


def loss_fixed_k(k):
    """compute_loss with k fixed instead of k ~ U{1..L}: the cost without k's sampling noise."""
    return functools.partial(train.compute_loss, fixed_k=k)


def bench_train(a, dev):
    rows = []
    for name in a.model or ['small', 'cifar10']:
        bs = a.batch_size or (128 if a.gpu else 16 if name == 'small' else 4)
        for dtype in a.dtype:
            for comp in ([False, True] if a.compile else [False]):
                m0 = mem_start(dev)   # before the model: weights, Adam state and EMA count too
                step, cfg, n = make_step(name, bs, dev, dtype, comp)
                for i in range(a.warmup + 2 * comp):   # compile traces on its first calls
                    step(i)
                sync(dev)
                t0 = time.perf_counter()
                for i in range(a.steps):
                    step(1000 + i)
                sync(dev)
                dt = time.perf_counter() - t0
                rows.append(dict(model=name, params_M=n / 1e6, batch=bs, dtype=dtype, compile=comp,
                                 s_per_step=dt / a.steps, img_per_s=bs * a.steps / dt,
                                 peak_mem_MB=mem_peak_mb(dev, m0)))
                del step
    return rows


def bench_reg(a, dev):
    name, bs = (a.model or ['cifar10' if a.gpu else 'small'])[0], a.batch_size or (128 if a.gpu else 16)
    dtype, comp, reps = a.dtype[-1], a.compile, a.reps or (5 if a.gpu else 3)
    step, cfg0, _ = make_step(name, bs, dev, dtype, comp)
    k_modes = {'random', 'mean'} if a.k == 'both' else {a.k or ('random' if a.gpu else 'mean')}
    variants = [('vanilla', None, '-', cfg0, train.compute_loss)]
    for L in a.reg_L:
        for grad in ('full', 'last'):
            cfg = train.parse_config(['--dataset', 'cifar10', '--model', name, '--batch-size', str(bs),
                                      '--reg', '--reg-L', str(L), '--reg-grad', grad])[0]
            if 'random' in k_modes:
                variants.append(('k~U{1..L}', L, grad, cfg, train.compute_loss))
            if 'mean' in k_modes:   # cost is linear in k, so k = E[k] = (L+1)/2 gives the mean cost
                variants.append((f'k={(L + 1) // 2} fixed', L, grad, cfg, loss_fixed_k((L + 1) // 2)))
    for v in variants:   # warm up (and compile) every code path
        for i in range(a.warmup + 2 * comp):
            step(i, v[3], v[4])
    times, ks, mems = [[] for _ in variants], [[] for _ in variants], [0.0] * len(variants)
    for rep in range(reps):
        for j, (_, _, _, cfg, loss_fn) in enumerate(variants):
            m0 = mem_start(dev)
            t0 = time.perf_counter()
            for i in range(a.steps):   # the same step indices, so the same (r, k) draws, in every variant
                ks[j].append(step(10_000 + rep * a.steps + i, cfg, loss_fn).get('k', 0))
            sync(dev)
            times[j].append((time.perf_counter() - t0) / a.steps)
            mems[j] = max(mems[j], mem_peak_mb(dev, m0))
    rows = [dict(variant=kind, L=L or '-', grad=grad, s_per_step=statistics.median(times[j]),
                 ratio=statistics.median(t / v for t, v in zip(times[j], times[0])),
                 mean_k=statistics.mean(ks[j]) if L else '-', peak_mem_MB=mems[j],
                 mem_ratio=mems[j] / max(mems[0], 1e-9))
            for j, (kind, L, grad, _, _) in enumerate(variants)]
    return rows, (f'reg: model {name}, batch {bs}, {dtype}, compile {comp}; {reps} interleaved reps x '
                  f'{a.steps} steps per variant; ratio = median over reps of t / t_vanilla')


def bench_errprop(a, dev):
    name, reps = (a.model or ['cifar10' if a.gpu else 'small'])[0], a.reps or (3 if a.gpu else 1)
    model, diff = build_model(name, (3, 32, 32)).to(dev).eval(), Diffusion(device=dev)
    net = chunked(model, a.chunk) if a.chunk else model
    g = torch.Generator(dev).manual_seed(0)
    x = torch.randn((a.n, 3, 32, 32), generator=g, device=dev)
    x0 = torch.rand((a.n, 3, 32, 32), generator=g, device=dev) * 2 - 1
    rows = []
    for dtype in a.dtype:
        ts, tm = [], []
        for rep in range(reps + 1):   # rep 0: warm-up on a small slice
            xr, x0r = (x, x0) if rep else (x[:8], x0[:8])
            with torch.no_grad(), amp(dev, dtype):
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


def show(title, rows):
    cells = [[f'{v:.4g}' if isinstance(v, float) else str(v) for v in r.values()] for r in rows]
    w = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(rows[0])]
    print(f'\n== {title}')
    for r in [list(rows[0])] + cells:
        print('  '.join(v.rjust(w[i]) for i, v in enumerate(r)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--what', default='all', choices=('train', 'reg', 'errprop', 'all'))
    p.add_argument('--model', nargs='+', help='train: these configs (default small cifar10); '
                   'reg, errprop: the first one (default small on CPU, cifar10 on GPU)')
    p.add_argument('--batch-size', type=int, help='default 128 on GPU; CPU: 16 (small), 4 (others)')
    p.add_argument('--steps', type=int, help='timed steps (reg: per variant and rep); default GPU 20, CPU 2')
    p.add_argument('--warmup', type=int, help='untimed steps first; default GPU 3, CPU 1')
    p.add_argument('--reps', type=int, help='repetitions; default reg 5 GPU, 3 CPU; errprop 3 GPU, 1 CPU')
    p.add_argument('--device', default='auto')
    p.add_argument('--threads', type=int, help="torch.set_num_threads (default: torch's own choice)")
    p.add_argument('--dtype', nargs='+', choices=('fp32', 'bf16'), help='default GPU fp32 bf16, CPU fp32')
    p.add_argument('--compile', action=argparse.BooleanOptionalAction, help='default: on for GPU')
    p.add_argument('--reg-L', type=int, nargs='+', default=[1, 3, 5, 7, 9])
    p.add_argument('--k', choices=('random', 'mean', 'both'), help='reg: k ~ U{1..L} via '
                   'train.compute_loss and/or k fixed at (L+1)/2; default GPU random, CPU mean')
    p.add_argument('--n', type=int, default=1000, help='errprop: N = M samples')
    p.add_argument('--chunk', type=int, help='errprop: network batch size (default: all N at once)')
    p.add_argument('--json', help='also write the tables to this JSON file')
    a = p.parse_args(argv)
    dev = a.device if a.device != 'auto' else 'cuda' if torch.cuda.is_available() else 'cpu'
    a.gpu = dev.startswith('cuda')
    if a.gpu:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True   # as train.py
    if a.threads:
        torch.set_num_threads(a.threads)
    a.steps = a.steps or (20 if a.gpu else 2)
    a.warmup = (3 if a.gpu else 1) if a.warmup is None else a.warmup
    a.dtype = a.dtype or (['fp32', 'bf16'] if a.gpu else ['fp32'])
    a.compile = a.gpu if a.compile is None else a.compile
    if a.steps < 1 or a.warmup < 0 or (a.reps or 1) < 1 or (a.batch_size or 4) < 4 or a.n < 4 or min(a.reg_L) < 1:
        raise SystemExit('error: --steps, --reps, --reg-L must be >= 1, --warmup >= 0, --batch-size and --n >= 4')
    try:
        name = torch.cuda.get_device_name(dev) if a.gpu else proc_field('model name', '/proc/cpuinfo')
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    out = dict(device=f'{dev} ({name})', torch=torch.__version__, threads=torch.get_num_threads(),
               load_avg=' '.join(f'{v:.2f}' for v in os.getloadavg()), cores=os.cpu_count(),
               command=shlex.join([sys.executable] + sys.argv if argv is None else ['bench.py'] + argv))
    for k, v in out.items():
        print(f'{k}: {v}')
    if not a.gpu and os.getloadavg()[0] > os.cpu_count() - 0.5 and torch.get_num_threads() > 1:
        print('warning: the CPU is busy with other processes; timings with several threads suffer '
              'badly from oversubscription (try --threads 1)')
    print('peak_mem_MB: ' + ('CUDA max_memory_allocated' if a.gpu else 'peak process RSS (VmHWM)')
          + ' growth over the start of each measurement')
    if a.what in ('train', 'all'):
        out['train'] = bench_train(a, dev)
        show(f'train: {a.warmup} warm-up + {a.steps} timed steps each', out['train'])
    if a.what in ('reg', 'all'):
        out['reg'], head = bench_reg(a, dev)
        show(head, out['reg'])
        for kind in sorted({r['variant'] for r in out['reg'] if r['L'] == 5}):
            got = {r['grad']: r['ratio'] for r in out['reg'] if r['variant'] == kind and r['L'] == 5}
            print(f'goal L=5 ({kind}): ' + ', '.join(
                f"{g} {got[g]:.2f}x vanilla (<= {lim}x: {'PASS' if got[g] <= lim else 'MISS'})"
                for g, lim in (('full', 2.8), ('last', 2.0))))
    if a.what in ('errprop', 'all'):
        out['errprop'] = bench_errprop(a, dev)
        show('errprop: one chain step of errprop_curve = p_step on N, then q_sample + MMD^2 (3 kernels, '
             'U-statistic) on N = M; T1000_total_min = projected whole T = 1000 run', out['errprop'])
    if a.json:
        with open(a.json, 'w') as f:
            json.dump(out, f, indent=1)


if __name__ == '__main__':
    main()
