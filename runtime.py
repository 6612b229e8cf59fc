"""The plumbing every script shares: the configuration (defaults, presets, command line), the device
and torchrun set-up, seeded random streams, checkpoints (ours and diffusers DDPM folders), atomic file
writes and the sampling flags. Scripts import this and the library modules; never another script."""
import argparse
import gc
import hashlib
import json
import math
import os
import sys
import zipfile

import numpy as np
import torch
import torch.distributed as dist

import data as D
from diffusion import Diffusion, per_sample_noise
from mmd import KERNELS
from model import build_model, is_diffusers_folder, load_diffusers_unet, resolve_dtype, resolve_weights


def fail(msg):   # bad input: one line on stderr, exit status 1, no traceback
    raise SystemExit(f'error: {msg}')


# ---- configuration: one flat set of named defaults -------------------------------------------
CONFIG = dict(
    dataset='8gaussians', data_dir='data', image_size=None, toy_n=50000,
    model=None, dropout=None,                 # None: the model config's own value (model.py)
    T=1000, beta_1=None, beta_T=None, sigma='beta',  # betas None: 1e-4 and 0.02 scaled by 1000 / T
    loss='eps', ip_gamma=0.1, sa_k=2, sa_lambda=1.0,  # eps | ip (ADM-IP) | sa (SA-DPM)
    reg=False, reg_L=5, reg_rho=None, lambda_reg=0.2, lambda_nll=0.8,  # Sec. 7.1; rho None: 3 / T
    reg_kernel='multigauss', reg_stat='mmd', reg_grad='full', reg_norm='mean1',
    reg_weight='exp', warm_start=True, reg_steps=None,
    reg_batch=None, reg_halves=False,         # Algorithm 1's second batch (None: --batch-size); halves: released code
    synthetic=None, fresh_frac=1.0,           # recursive retraining (model collapse)
    batch_size=None, lr=None, warmup=None, grad_clip=1.0, ema_decay=None, max_steps=None,
    seed=0, device='auto', dtype='auto', compile=False, channels_last=False,
    out_dir=None, resume=False, init_from=None, log='json',   # log: json (log.jsonl) | tensorboard (and RUN/tb)
    log_every=None, sample_every=None, save_every=None, n_preview=None,
    preview_steps=None,                       # previews: respaced ancestral chain of S steps (None: T)
)
TOY_PRESET = dict(model='mlp', batch_size=256, lr=1e-3, warmup=200, ema_decay=0.995,
                  max_steps=10000, log_every=1000, sample_every=0, save_every=5000, n_preview=2000)
DDPM_PRESET = dict(batch_size=128, lr=2e-4, warmup=5000, ema_decay=0.9999, max_steps=800000,
                   log_every=100, sample_every=10000, save_every=10000, n_preview=64)  # Ho et al.
PRESETS = {   # per data set: what the command line leaves open
    **{name: TOY_PRESET for name in D.TOY},
    'mnist': dict(DDPM_PRESET, model='mnist', warmup=1000, ema_decay=0.999, max_steps=50000,
                  sample_every=5000, save_every=5000),
    'cifar10': dict(DDPM_PRESET, model='cifar10', ip_gamma=0.15),  # 0.15: ADM-IP's CIFAR-10 value
    'imagenet32': dict(DDPM_PRESET, model='imagenet32'),
    'celeba64': dict(DDPM_PRESET, model='celeba64'),
    'folder': dict(DDPM_PRESET, model='small'),
}
# the CPU-sized MNIST of reproduce.py (RESULTS.md): real digits at 14x14, the 'tiny' U-Net, batch 64
# (a step costs about a third of a 28x28 step); reproduce.py adds --lr and --data-dir
MNIST14_FLAGS = ['--model', 'tiny', '--image-size', '14', '--batch-size', '64', '--warmup', '200',
                 '--ema-decay', '0.995']
CHOICES = dict(dataset=D.DATASETS, sigma=('beta', 'posterior'), loss=('eps', 'ip', 'sa'),
               reg_kernel=KERNELS, reg_stat=('mmd', 'mmd2'),
               reg_grad=('full', 'last'), reg_norm=('mean1', 'sum1'), reg_weight=('exp', 'uniform'),
               dtype=('auto', 'fp32', 'bf16'), log=('json', 'tensorboard'))
NONE_TYPES = dict(image_size=int, model=str, dropout=float, beta_1=float, beta_T=float, reg_rho=float,
                  reg_steps=int, reg_batch=int, synthetic=str, batch_size=int, lr=float, warmup=int, ema_decay=float,
                  max_steps=int, out_dir=str, init_from=str, log_every=int, sample_every=int,
                  save_every=int, n_preview=int, preview_steps=int)
# what a checkpoint written before a setting existed was trained with (a resumed run keeps it)
LEGACY = dict(reg_halves=True, dtype='fp32')
# what a resumed run may change; everything else defines the run and is refused
RESUMABLE = {'max_steps', 'log_every', 'save_every', 'sample_every', 'n_preview', 'preview_steps', 'device',
             'dtype', 'compile', 'channels_last', 'data_dir', 'out_dir', 'resume', 'lr', 'grad_clip', 'log'}


def parse_config(argv=None):
    """Defaults <- data set preset <- command line. Returns (config, keys given on the command line)."""
    p = argparse.ArgumentParser(description='Train a DDPM (see train.py).')
    for key, val in CONFIG.items():
        flag = '--' + key.replace('_', '-')
        if isinstance(val, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            p.add_argument(flag, type=NONE_TYPES.get(key, type(val)), default=None,
                           choices=CHOICES.get(key))
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    cfg = {**CONFIG, **PRESETS[args.get('dataset', CONFIG['dataset'])], **args}
    resolve_schedule(cfg)
    if cfg['out_dir'] is None:
        cfg['out_dir'] = os.path.join('out', cfg['dataset'] + ('-reg' if cfg['reg'] else ''))
    if cfg['resume'] and cfg['init_from']:
        fail('--resume continues a run; --init-from starts a new one: pass only one')
    if not cfg['resume']:   # a resumed run is checked once merged with its saved settings
        check_config(cfg)
    return cfg, set(args)


def resolve_schedule(cfg):
    """Short chains (--T) keep reaching noise: the linear betas scale by 1000 / T (1e-4 and 0.02 at
    T = 1000, DDPM's; 0.002 and 0.4 at T = 50), capped at 0.999 for T < 21; rho = 3 / T keeps
    w_0 / w_{T-1} = e^3 as 0.003 does at T = 1000. Explicit --beta-1 / --beta-T / --reg-rho win."""
    if cfg['beta_1'] is None:
        cfg['beta_1'] = min(1e-4 * 1000 / cfg['T'], 0.999)
    if cfg['beta_T'] is None:
        cfg['beta_T'] = min(0.02 * 1000 / cfg['T'], 0.999)
    if cfg['reg_rho'] is None:
        cfg['reg_rho'] = 3 / cfg['T']


def check_config(cfg):
    """Every impossible setting, one line each, before anything is written."""
    for k in ('batch_size', 'max_steps', 'T', 'log_every', 'save_every', 'n_preview', 'toy_n'):
        if cfg[k] < 1:
            fail(f'--{k.replace("_", "-")} must be >= 1, got {cfg[k]}')
    if cfg['sample_every'] < 0:
        fail('--sample-every must be >= 0 (0: a preview only at the end)')
    if cfg.get('preview_steps') is not None and not 1 <= cfg['preview_steps'] <= cfg['T']:
        fail(f"--preview-steps must be in 1..T={cfg['T']}")
    if not 0 < cfg['beta_1'] <= cfg['beta_T'] < 1:
        fail(f"need 0 < --beta-1 <= --beta-T < 1, got {cfg['beta_1']:g}, {cfg['beta_T']:g}")
    if not 0 < cfg['fresh_frac'] <= 1:
        fail('--fresh-frac must be in (0, 1]')
    if cfg['fresh_frac'] < 1 and not cfg['synthetic']:
        fail("--fresh-frac < 1 needs --synthetic PATH (a previous generation's checkpoint or .npz)")
    if cfg['reg'] and not 1 <= cfg['reg_L'] <= cfg['T']:
        fail(f"--reg-L must be in 1..T={cfg['T']}")
    if cfg['reg_steps'] is not None and not (cfg['reg'] and cfg['reg_L'] <= cfg['reg_steps'] <= cfg['T']):
        fail(f"--reg-steps S needs --reg and --reg-L <= S <= T={cfg['T']}")
    if cfg['reg'] and cfg['reg_halves'] and cfg['batch_size'] < 4:
        fail('--reg-halves splits the batch in two halves for MMD: use --batch-size >= 4')
    if cfg['reg_batch'] is not None and (cfg['reg_halves'] or not cfg['reg'] or cfg['reg_batch'] < 2):
        fail('--reg-batch N (>= 2) sets the size of the regulariser\'s second batch: it needs --reg and no --reg-halves')
    if cfg['lr'] < 0 or cfg['grad_clip'] <= 0 or not 0 <= cfg['ema_decay'] < 1:
        fail('need --lr >= 0, --grad-clip > 0 and 0 <= --ema-decay < 1')


def model_overrides(cfg):   # the network's settings that a run may change (build_model's keywords)
    return {} if cfg.get('dropout') is None else dict(dropout=cfg['dropout'])


def make_diffusion(cfg, device='cpu', dtype='fp32'):
    """cfg's schedule on `device`; dtype (auto | fp32 | bf16): the network's arithmetic."""
    return Diffusion(cfg['T'], cfg['beta_1'], cfg['beta_T'], cfg['sigma'], device, resolve_dtype(dtype, device))


# ---- seeded random streams: the one way the project seeds randomness ---------------------------
def seed_of(seed, stream, *index):
    """A 63-bit seed for the random stream `stream` (a name) at `index` (e.g. step, rank) of run
    `seed`. Hashing keeps every (seed, stream, index) apart: no two streams share a seed."""
    h = hashlib.blake2b(repr((int(seed), stream) + tuple(int(i) for i in index)).encode(), digest_size=8)
    return int.from_bytes(h.digest(), 'little') >> 1


def rng(seed, stream, *index, device='cpu'):
    """torch.Generator on `device` seeded with seed_of(seed, stream, *index)."""
    return torch.Generator(device).manual_seed(seed_of(seed, stream, *index))


def eval_rngs(seed, legacy=False, device='cpu'):
    """An evaluation's streams of run `seed`, one per purpose, all distinct: 'x_T' (on the CPU: one x_T on
    every device), 'chain' (each step's z), 'perturb' (fault_tolerance's error), 'ref' (D_MMD's forward
    samples). legacy: results/steps' shared seeds, where x_T and the first z are one tensor."""
    if legacy:
        return {p: torch.Generator('cpu' if p == 'x_T' else device).manual_seed(seed + (p == 'perturb'))
                for p in ('x_T', 'chain', 'perturb', 'ref')}
    return {p: rng(seed, 'eval-' + p, device='cpu' if p == 'x_T' else device) for p in ('x_T', 'chain', 'perturb', 'ref')}


# ---- device and torchrun ---------------------------------------------------------------------
def setup_device(device='auto', distributed=True):
    """(device, rank, world). 'auto': cuda:LOCAL_RANK when CUDA is there, else cpu. Under torchrun
    (WORLD_SIZE set, even to 1) joins the process group: nccl on GPUs, gloo on CPUs."""
    torchrun = distributed and 'WORLD_SIZE' in os.environ
    world = int(os.environ['WORLD_SIZE']) if torchrun else 1
    rank = int(os.environ.get('RANK', 0)) if torchrun else 0
    if device == 'auto':
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else 'cpu'
    if device.startswith('cuda'):
        if not torch.cuda.is_available():
            fail(f'--device {device}: this machine has no CUDA GPU (torch {torch.__version__}); use --device cpu or auto')
        torch.cuda.set_device(device if ':' in device else 'cuda:0')
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    elif device != 'cpu' and not device.startswith('mps'):
        fail(f"--device {device!r}: use auto, cpu, cuda or cuda:N")
    if torchrun and not dist.is_initialized():
        dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
    return device, rank, world


def shard(n, rank, world):   # [lo, hi) of n items for `rank`: contiguous, in rank order
    per = -(-n // world)
    return min(n, rank * per), min(n, (rank + 1) * per)


def gather(x, world):
    """Every rank's tensor or array, concatenated in rank order (the shards' order)."""
    if world == 1:
        return x
    parts = [None] * world
    dist.all_gather_object(parts, x)
    return torch.cat(parts) if isinstance(x, torch.Tensor) else np.concatenate(parts)


def teardown(end_process=False, code=0):
    """Leave the process group together (a rank destroying its gloo group while another still writes
    can abort). end_process (a script's last line): under torchrun, exit right after with `code`, files
    closed and interpreter finalisation skipped: gloo's threads freeing tensors then abort the rank
    ('terminate called without an active exception', a race seen in CI)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        if end_process:
            gc.collect()
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)


# ---- atomic, durable writes ------------------------------------------------------------------
def atomic_write(path, write, binary=True):
    """write(f) into a temporary file beside `path`, fsync it, rename it over `path`, fsync the
    folder: readers see the old file or the new one, never half of one, even after a power loss."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f'{path}.{os.getpid()}.tmp'   # pid: ranks writing side by side never share a tmp file
    try:
        with open(tmp, 'wb' if binary else 'w') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fd = os.open(folder, os.O_RDONLY)   # the rename itself is durable once the folder is
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def json_safe(obj):
    """Non-finite floats as None (null): JSON has no NaN or Infinity."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def write_json(path, obj):   # atomically, non-finite floats as null
    atomic_write(path, lambda f: json.dump(json_safe(obj), f, indent=1, allow_nan=False), binary=False)


def save_figure(fig, path, dpi=100, tight=True):
    import matplotlib.pyplot as plt
    atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=dpi, bbox_inches='tight' if tight else None))
    plt.close(fig)


def save_npz(path, **arrays):
    atomic_write(path, lambda f: np.savez(f, **arrays))


def read_npz(path, need=()):
    """{name: array} of an .npz file, holding every name in `need`, or a one-line error naming it."""
    if not os.path.isfile(path):   # (FileNotFoundError, as np.load's own)
        raise FileNotFoundError(f'{path} does not exist')
    if not zipfile.is_zipfile(path):
        raise ValueError(f'{path} is not an .npz file (not a zip archive): pass one written by sample.py --npz')
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise ValueError(f"{path} is not a readable .npz file ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:120]})") from None
    missing = [k for k in need if k not in arrays]
    if missing:
        raise ValueError(f'{path} has no {missing[0]!r} array (it has {sorted(arrays)})')
    return arrays


def check_writable(path):
    """Fail now, before any long computation, if `path` could not be written later."""
    probe = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK) or os.path.isdir(path):
        fail(f'cannot write {path}: {probe} is not a writable folder' if not os.path.isdir(path)
             else f'cannot write {path}: it is a folder')


def save_preview(samples, real, path):
    """A grid of images, or for vector data a scatter of samples over the data (first 2 dims)."""
    if samples.dim() == 4:
        import torchvision
        return atomic_write(path, lambda f: torchvision.utils.save_image(
            (samples + 1) / 2, f, format='png', nrow=int(math.sqrt(len(samples)))))
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 5))
    r, x = real[:len(samples)].float().cpu(), samples.cpu()
    ax.scatter(r[:, 0], r[:, 1], s=2, alpha=0.4, label='data')
    ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.6, label='samples (EMA)')
    ax.legend(loc='upper right', markerscale=4), ax.set_aspect('equal')
    save_figure(fig, path)


# ---- checkpoints: one format ------------------------------------------------------------------
def save_checkpoint(path, **state):
    atomic_write(path, lambda f: torch.save(state, f))


def read_checkpoint(file):
    """The raw checkpoint dict of one of our ckpt.pt files, or a one-line ValueError."""
    try:
        ck = torch.load(file, map_location='cpu', weights_only=True)
        missing = {'model', 'ema', 'config', 'data_shape', 'step'} - set(ck)
        if missing:
            raise KeyError(f'no {sorted(missing)}')
        return ck
    except Exception as e:
        why = ' '.join(str(e).split()).split('. ')[0][:120]   # one line, none of torch's advice
        raise ValueError(f'{file} is not a readable checkpoint of this project '
                         f'({type(e).__name__}: {why}); it may be truncated or corrupt') from None


def checkpoint_file(path):
    file = os.path.join(path, 'ckpt.pt') if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f'no checkpoint at {file}: pass a run folder with ckpt.pt, a .pt file, or a diffusers DDPM folder')
    return file


def diffusers_config(name, shape):
    """A released DDPM folder behaves as one of our runs of the matching data set: DDPM's schedule
    (T = 1000, linear 1e-4..0.02), the cifar10 / celeba64 preset, or a folder run at its size."""
    dataset = {(3, 32, 32): 'cifar10', (3, 64, 64): 'celeba64'}.get(tuple(shape), 'folder')
    cfg = {**CONFIG, **PRESETS[dataset], 'dataset': dataset, 'model': name, 'data_shape': list(shape),
           'image_size': None if dataset != 'folder' else shape[-1]}
    resolve_schedule(cfg)
    return cfg


def load_checkpoint(path, device='cpu', ema=True, dtype='fp32', compile=False):
    """(model in eval mode, diffusion, config) from a run folder, a ckpt.pt, or a diffusers DDPM
    folder, or a hub model id (model.resolve_weights). ema=True takes the EMA weights (what sampling
    and evaluation use); dtype: the network's arithmetic when sampling (make_diffusion); compile:
    the network wrapped in torch.compile (one trace per batch shape; docs/performance.md)."""
    path = resolve_weights(path)
    if os.path.isdir(path) and is_diffusers_folder(path):
        state, name, shape = load_diffusers_unet(path)
        cfg = diffusers_config(name, shape)
        model = build_model(name, shape)
        model.load_state_dict(state)
    else:
        file = checkpoint_file(path)
        ck = read_checkpoint(file)
        cfg = dict(LEGACY, **ck['config'], data_shape=list(ck['data_shape']))
        resolve_schedule(cfg)   # runs written before the schedule rule stored explicit betas
        state = ck['ema' if ema else 'model']
        try:
            model = build_model(cfg['model'], tuple(ck['data_shape']), **model_overrides(cfg))
            model.load_state_dict(state)
        except Exception as e:
            raise ValueError(f"{file} does not fit the network it names ({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f'{path} holds non-finite weights ({bad[0]}, ...): the run diverged; use an earlier checkpoint '
                         'or retrain with a lower --lr')
    model = model.to(device).eval()
    return torch.compile(model, dynamic=False) if compile else model, make_diffusion(cfg, device, dtype), cfg


def progress_bar(total, desc, unit='it', on=True):
    """A tqdm line (count, rate, ETA) on stderr if it is a terminal; none in logs and pipes, or if not `on`."""
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, disable=None if on else True, mininterval=1.0, dynamic_ncols=True, file=sys.stderr)


def generate(model, diff, n, shape, sample_batch=256, seed=0, device='cpu', progress=False, first=None, **chain):
    """n samples (float, model space, on the CPU) drawn sample_batch at a time from one seeded generator, or
    (first: an int) sample first + i from its own seed, seed_of(seed, 'image', first + i), whatever the batch."""
    g, steps = torch.Generator(device).manual_seed(seed), chain.get('steps') or diff.T
    out, n_steps = [], (len(steps) if isinstance(steps, (list, tuple)) else steps + 1)   # the callback sees the start too
    with progress_bar(n, 'sampling', 'img', on=progress) as bar:
        for i in range(0, n, sample_batch):
            b = min(sample_batch, n - i)
            tick = None if bar.disable else (lambda t, x, i=i, b=b, k=iter(range(1, n_steps + 1)):
                                             bar.update(i + b * next(k) // n_steps - bar.n))   # whole images
            z = g if first is None else per_sample_noise([seed_of(seed, 'image', first + j) for j in range(i, i + b)], device)
            out.append(diff.sample(model, (b, *shape), noise=z, device=device, callback=tick, **chain).cpu())
    return torch.cat(out) if out else torch.empty(0, *shape)


# ---- sampling flags, one vocabulary for sample.py and evaluate.py ------------------------------
def add_sampling_args(p, quant=True):
    """--sampler/--steps/--eta/--eps-scale(-k) and, with quant, the quantised-sampling flags."""
    p.add_argument('--dtype', choices=('auto', 'fp32', 'bf16'), default='auto',
                   help="the network's arithmetic (auto: bf16 where the hardware has it); the chain stays fp32")
    p.add_argument('--compile', action='store_true', help='torch.compile the network: a trace per batch shape (a minute on a CPU)')
    p.add_argument('--sampler', choices=('ddpm', 'ddim'), default='ddpm', help='ddpm: ancestral (Eq. 16), respaced when --steps < T; ddim: DDIM with --eta')
    p.add_argument('--steps', type=int, help='sampling steps S (default: every step of the T-step chain)')
    p.add_argument('--spacing', choices=('trailing', 'adm'), default='trailing', help="the S-step grid: trailing "
                   "(diffusers', from T; this project's), adm (ADM's space_timesteps: ADM-ES / ADM-IP's; DDIM: leading)")
    p.add_argument('--eta', type=float, default=0.0, help='DDIM noise: 0 deterministic, 1 DDPM-like')
    p.add_argument('--time-shift', type=int, default=0, metavar='W', help='Time-Shift Sampler (Li et al. 2024): window '
                   'of candidate t_s around each t (0: off; their CIFAR-10 DDIM: 40/30/8/2 at S = 10/20/50/100)')
    p.add_argument('--time-shift-cutoff', type=int, metavar='C', help='no shift at t <= C (default 0.3 T: their 300)')
    p.add_argument('--time-shift-var', choices=('sample', 'batch'), default='sample', help="the state's variance per sample (paper) or batch")
    p.add_argument('--eps-scale', type=float, default=1.0, help="epsilon scaling (ADM-ES): divide eps by "
                   "lambda = B + K i, i the step's position on the S-step grid from the bottom (1: off)")
    p.add_argument('--eps-scale-k', type=float, default=0.0, help='K of the linear eps-scaling schedule')
    if quant:
        p.add_argument('--quant', default='none', choices=('none', 'w8a8', 'w4a8', 'w4a4'), help='fake-quantised sampling (seed 002)')
        p.add_argument('--quant-compensate', action='store_true', help='apply the timestep-aware correction')
        p.add_argument('--calib-traj', type=int, help='calibration chains (default 4 x 64 toy, 2 x 16 images)')
        p.add_argument('--recalibrate', action='store_true', help='ignore a stored quant_<spec>.pt')


def sampling_dtype(a, quantised=False):
    """--dtype for load_checkpoint; fake-quantised networks (--quant, quanterr) compute in fp32."""
    if quantised and (a.dtype == 'bf16' or a.compile):
        fail('--dtype bf16 and --compile do not go with quantised sampling (fake quantisation swaps the layers, in fp32)')
    return 'fp32' if quantised else a.dtype


def chain_kwargs(a, diff):
    """Diffusion.sample_chain's sampler settings from add_sampling_args' flags, checked before anything long starts."""
    from diffusion import adm_times, eps_scale_schedule
    if a.steps is not None and not 1 <= a.steps <= diff.T:
        fail(f'--steps must be in 1..T={diff.T}, got {a.steps}')
    if a.eta < 0 or (a.eta and a.sampler != 'ddim'):
        fail('--eta must be >= 0 and goes with --sampler ddim')
    try:   # --spacing adm: the explicit list of chain indices (sample_chain and ES take it as it is)
        steps = adm_times(diff.T, a.steps or diff.T, a.sampler) if getattr(a, 'spacing', 'trailing') == 'adm' else a.steps
    except ValueError as e:
        fail(f'--spacing adm: {e}')
    kw = dict(sampler=a.sampler, steps=steps, eta=a.eta)
    if min(getattr(a, 'time_shift', 0), getattr(a, 'time_shift_cutoff', 0) or 0) < 0:
        fail('--time-shift W and --time-shift-cutoff C must be >= 0')
    if getattr(a, 'time_shift', 0):
        c = round(0.3 * diff.T) if a.time_shift_cutoff is None else a.time_shift_cutoff
        kw['time_shift'] = dict(window=a.time_shift, cutoff=c, var=a.time_shift_var)
    try:
        if a.eps_scale != 1.0 or a.eps_scale_k:
            kw['eps_scale'] = eps_scale_schedule(diff.T, a.eps_scale, a.eps_scale_k, steps).to(diff.device)
    except ValueError as e:
        fail(f'--eps-scale {a.eps_scale:g} --eps-scale-k {a.eps_scale_k:g}: {e}')
    return kw
