"""The measuring instruments of experiments/bench.py: device sync, peak memory (CUDA or the
process RSS), dense peak FLOP/s by device name, FLOPs per image, train.py's step built for a
benchmark (this tree's or another git ref's, imported side by side), and interleaved timing of
variants. bench.py holds the benchmarks themselves and the command line."""
import contextlib
import copy
import ctypes
import glob
import importlib
import io
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import runtime as R
import trainstep
from diffusion import Diffusion
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


# dense peak TFLOP/s of the tensor cores by device name (first match wins): (name, bf16, TF32);
# fp32 runs use TF32 matmuls on CUDA (runtime.setup_device), so they are measured against TF32
PEAKS = [('H100 PCIe', 'H100 PCIe dense', 756.0, 378.0), ('H100', 'H100 SXM dense', 989.0, 494.5),
         ('H200', 'H200 dense (as H100 SXM)', 989.0, 494.5), ('A100', 'A100 dense', 312.0, 156.0)]


def device_peak(a, name):
    """{'name', 'bf16', 'fp32'} peak TFLOP/s: --peak-tflops BF16 [FP32] (FP32 default BF16 / 2, the
    TF32 : bf16 ratio of Ampere and Hopper), else the PEAKS row matching the device name; None
    when unknown (a CPU), and then no MFU is reported."""
    if a.peak_tflops:
        bf, fp = a.peak_tflops[0], (a.peak_tflops[1:] or [a.peak_tflops[0] / 2])[0]
        return dict(name=f'--peak-tflops {bf:g} bf16 / {fp:g} fp32', bf16=bf, fp32=fp)
    for key, label, bf, fp in PEAKS if a.gpu else []:
        if key in name:
            return dict(name=f'{label}: {bf:g} bf16 / {fp:g} TF32 TFLOP/s', bf16=bf, fp32=fp)
    return None


def count_flops(cfg, dev):
    """FLOPs per image of one vanilla training step (trainstep.compute_loss, then backward), counted by
    torch's FlopCounterMode (matmuls, convolutions, attention) on the uncompiled fp32 network:
    (forward, forward + backward)."""
    torch.manual_seed(R.seed_of(cfg['seed'], 'init'))
    model = build_model(cfg['model'], (3, 32, 32), **R.model_overrides(cfg)).to(dev)
    x0 = trainstep.local_batch(random_images(cfg['batch_size'], dev), cfg, 0, 0, 1, dev)
    with sdpa_kernel(SDPBackend.MATH):   # attention as plain matmuls: counted alike on every device
        with FlopCounterMode(display=False) as fwd:
            loss, _ = trainstep.compute_loss(model, R.make_diffusion(cfg, dev), x0, cfg, 0)
        with FlopCounterMode(display=False) as bwd:
            loss.backward()
    n = cfg['batch_size']
    return fwd.get_total_flops() / n, (fwd.get_total_flops() + bwd.get_total_flops()) / n


def make_step(cfg, data, dev, dtype, compile_, mods=None, state=None):
    """train.py's step for config cfg on `data`: returns (step(i, cfg, fixed_k) -> stats, network).
    One network and optimiser serve every cfg passed later (same model, other losses). mods: another
    tree's modules (import_tree), built from what it has (runtime.make_diffusion, or diffusion.Diffusion
    before runtime.py existed); state: initial weights to load."""
    # the step's functions: trainstep.py's, or train.py's in trees from before trainstep.py
    if mods:
        T, Rm = mods.get('trainstep') or mods['train'], mods.get('runtime')
    else:
        T, Rm, mods = trainstep, R, sys.modules
    torch.manual_seed(R.seed_of(cfg['seed'], 'init'))
    raw = mods['model'].build_model(cfg['model'], tuple(data.shape[1:]),
                                    **({} if cfg.get('dropout') is None else dict(dropout=cfg['dropout'])))
    if state is not None:
        raw.load_state_dict(state)
    raw.to(dev, memory_format=torch.channels_last if cfg.get('channels_last') else torch.preserve_format)
    ema = copy.deepcopy(raw).eval().requires_grad_(False)
    opt = (T.make_adam(raw.parameters(), cfg['lr']) if hasattr(T, 'make_adam')
           else torch.optim.Adam(raw.parameters(), lr=cfg['lr']))
    model = torch.compile(raw) if compile_ else raw
    diff = (Rm.make_diffusion(cfg, dev) if hasattr(Rm, 'make_diffusion') else
            mods['diffusion'].Diffusion(cfg['T'], cfg['beta_1'], cfg['beta_T'], cfg['sigma'], dev))
    amp = torch.autocast(dev.split(':')[0], torch.bfloat16) if dtype == 'bf16' else contextlib.nullcontext()

    def step(i, cfg=cfg, fixed_k=None):
        torch.manual_seed(R.seed_of(cfg['seed'], 'dropout', i))   # as train.py
        x0 = T.local_batch(data, cfg, i, 0, 1, dev)
        extra = {}   # the regulariser's second batch (trees from before it took the batch's halves)
        if getattr(T, 'reg_batch_size', lambda c: 0)(cfg):
            extra['x_reg'] = T.local_batch(data, cfg, i, 0, 1, dev, 'reg')
        with amp:
            loss, stats = T.compute_loss(model, diff, x0, cfg, i, fixed_k=fixed_k, **extra)
        T.optimizer_step(loss, raw, opt, ema, cfg)
        return dict(stats, loss=loss.detach())
    return step, raw


def image_config(a, name, extra=()):
    """The cifar10 preset with network `name` and --batch-size, on random uint8 CIFAR-sized data."""
    bs = a.batch_size or (128 if a.gpu else 16 if name == 'small' else 4)
    cl = ['--channels-last'] if a.channels_last else []
    return R.parse_config(['--dataset', 'cifar10', '--model', name, '--batch-size', str(bs)] + cl + list(extra))[0]


def random_images(n, dev):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0)).to(dev)


def time_variants(step, variants, a, dev):
    """Interleaved timing: variants [(name, cfg, fixed_k)] all run a.iters steps in every one of
    a.reps repetitions, on the same step indices (so the same r, k draws). Returns one row each:
    median seconds per step, median per-repetition ratio to the first variant, peak memory."""
    for _, cfg, k in variants:   # warm up (and compile) every code path
        for i in range(a.warmup + 2 * a.compile):
            step(i, cfg, k)
    times, ks, mems = [[] for _ in variants], [[] for _ in variants], [0.0] * len(variants)
    for rep in range(a.reps):
        for j, (_, cfg, fixed_k) in enumerate(variants):
            m0 = mem_start(dev)
            t0 = time.perf_counter()
            for i in range(a.iters):
                ks[j].append(step(10_000 + rep * a.iters + i, cfg, fixed_k).get('k', 0))
            sync(dev)
            times[j].append((time.perf_counter() - t0) / a.iters)
            mems[j] = max(mems[j], mem_peak_mb(dev, m0))
        if a.verbose:
            print(f'rep {rep + 1}/{a.reps}: ' + ', '.join(f'{v[0]} {1e3 * t[-1]:.1f} ms'
                                                          for v, t in zip(variants, times)), flush=True)
    return [dict(variant=name, s_per_step=statistics.median(times[j]), all_s_per_step=times[j],
                 ratio=statistics.median(t / v for t, v in zip(times[j], times[0])),
                 mean_k=statistics.mean(ks[j]), peak_mem_MB=mems[j], mem_ratio=mems[j] / max(mems[0], 1e-9))
            for j, (name, _, _) in enumerate(variants)]


PROJECT = ('model', 'diffusion', 'mmd', 'data', 'train', 'trainstep', 'runtime', 'quant', 'fid',
           'neighbours', 'neighbours.quant', 'metrics', 'metrics.fid')   # flat trees, then folders


def median_time(f, dev, reps):
    """Median wall time of `reps` calls of f, after one untimed call."""
    f()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); f(); sync(dev); ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def kernel_rates(dev, batch=8, reps=5):
    """What the device's units give one process: a 2048^2 matrix product and the cifar10 net's 3x3
    convolutions (batch `batch`; forward, and forward + both backward products) in fp32 and bf16,
    NCHW and channels_last; TFLOP/s of the median of `reps` calls. The ceiling a training step can
    approach where convolutions dominate it."""
    def rate(flop, f):
        return flop / median_time(f, dev, reps) / 1e12
    rows = []
    for dt in (torch.float32, torch.bfloat16):
        a, b = (torch.randn(2048, 2048, dtype=dt, device=dev) for _ in range(2))
        rows.append(dict(op='matmul 2048^2', dtype=str(dt)[6:], layout='-', fwd_tflop_s=rate(2 * 2048 ** 3, lambda: a @ b), fwdbwd_tflop_s=None))
        for C, H in ((128, 32), (256, 16), (256, 8)):
            for cl in (False, True):
                fmt = torch.channels_last if cl else torch.contiguous_format
                x = torch.randn(batch, C, H, H, dtype=dt, device=dev).contiguous(memory_format=fmt).requires_grad_()
                w = torch.randn(C, C, 3, 3, dtype=dt, device=dev).contiguous(memory_format=fmt).requires_grad_()
                g = torch.randn_like(x)
                flop = 2 * batch * C * C * 9 * H * H
                with torch.no_grad():
                    fwd = rate(flop, lambda: torch.nn.functional.conv2d(x, w, padding=1))
                both = rate(3 * flop, lambda: torch.autograd.grad(torch.nn.functional.conv2d(x, w, padding=1), (x, w), g))
                rows.append(dict(op=f'conv3x3 {C}ch {H}^2 b{batch}', dtype=str(dt)[6:], layout='CL' if cl else 'NCHW',
                                 fwd_tflop_s=fwd, fwdbwd_tflop_s=both))
    return rows


SAMPLE_NETS = (('mlp', (2,), (256, 1024, 4096, 16384)), ('tiny', (1, 14, 14), (16, 64, 256, 1024)),
               ('cifar10', (3, 32, 32), (4, 16, 64)))   # the toy MLP, the protocol's MNIST net, the cifar10 net


def sample_batch_rates(dev, dtypes, reps=3, compile=False, nets=None):
    """Inference of one chain step (Diffusion.eps under inference_mode, as every sampler calls it) per
    network (nets: these names of SAMPLE_NETS), dtype and batch: chain rows per second (median of
    `reps`) and peak memory; where the throughput plateaus is the sample batch worth using on this
    device. compile: each batch also through torch.compile(net) (as --compile samples), timed right
    after the eager one, with its first call (the trace) timed apart."""
    rows = []
    for name, shape, batches in (n for n in SAMPLE_NETS if not nets or n[0] in nets):
        torch.manual_seed(0)
        net = build_model(name, shape).to(dev).eval()
        for dtype in dtypes:
            diff = Diffusion(T=1000, device=dev, net_dtype=dtype)
            for b in batches:
                x = torch.randn(b, *shape, device=dev)
                for comp in ((False, True) if compile else (False,)):
                    m0, f, first = mem_start(dev), torch.compile(net, dynamic=False) if comp else net, None
                    with torch.inference_mode():
                        if comp:
                            t0 = time.perf_counter(); diff.eps(f, x, 500); sync(dev); first = time.perf_counter() - t0
                        s = median_time(lambda: diff.eps(f, x, 500), dev, reps)
                    rows.append(dict(model=name, dtype=dtype, batch=b, rows_per_s=b / s, peak_mem_MB=mem_peak_mb(dev, m0),
                                     **({'compile': comp, 'first_call_s': first} if compile else {})))
    return rows


def step_profile(step, top=12):
    """Self time per operator of one training step (torch.profiler), largest first: [(op, ms, share)]."""
    step(0)
    with torch.profiler.profile() as prof:
        step(1)
    ev = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ev)
    return [dict(op=e.key[:48], calls=e.count, ms=e.self_cpu_time_total / 1e3, share=e.self_cpu_time_total / total)
            for e in ev[:top]]


def import_tree(ref, folder):
    """The project's modules as of git ref `ref` (extracted into `folder`), imported beside the
    current tree's: REF's train.py and what it imports of its own tree, under their usual names
    while importing, then put aside and the current tree's modules restored. -> {name: module}"""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository
    tar = subprocess.run(['git', '-C', here, 'archive', ref], capture_output=True)
    if tar.returncode:
        raise ValueError(f'--compare {ref}: git archive failed: {tar.stderr.decode().strip()}')
    with tarfile.open(fileobj=io.BytesIO(tar.stdout)) as t:
        t.extractall(folder, **({'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}))
    names = set(PROJECT) | {os.path.basename(f)[:-3] for f in glob.glob(os.path.join(folder, '*.py'))}
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    sys.path.insert(0, folder)
    try:
        importlib.import_module('train')
        return {n: sys.modules[n] for n in names if n in sys.modules}
    finally:
        sys.path.remove(folder)
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)
