"""Train a DDPM, optionally with the paper's consistency regulariser (--reg), on one CPU, one GPU
or many GPUs:

    python train.py                                  # 2-D toy run, a few minutes on a laptop CPU
    python train.py --dataset cifar10 --reg          # the paper's setting
    torchrun --nproc_per_node=8 train.py --dataset cifar10 --reg

Every setting below is a flag (--batch-size 64, --no-warm-start, ...); per-dataset presets fill in
what the command line leaves open. A run writes into --out-dir: config.json, log.jsonl, ckpt.pt
(written atomically) and sample pictures. All randomness of a step is a function of
(seed, step), so a resumed run continues exactly and N ranks see the same global batch as one.
"""
import argparse
import contextlib
import copy
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist

import data as D
from diffusion import Diffusion
from mmd import KERNELS, consistency_reg, reg_weight
from model import build_model, is_diffusers_folder, load_diffusers_unet

# ---- configuration: one flat set of named defaults -------------------------------------------
CONFIG = dict(
    dataset='8gaussians', data_dir='data', image_size=None, toy_n=50000,
    model=None, dropout=None,                        # None: the dataset's preset
    T=1000, beta_1=1e-4, beta_T=0.02, sigma='beta',  # diffusion (sigma_t^2 = beta_t, Sec. 7.1)
    loss='eps', ip_gamma=None, sa_k=2, sa_lambda=1.0,  # eps | ip (ADM-IP) | sa (SA-DPM)
    reg=False, reg_L=5, reg_rho=0.003, lambda_reg=0.2, lambda_nll=0.8,  # Sec. 7.1 values
    reg_kernel='multigauss', reg_stat='mmd', reg_grad='full', reg_norm='mean1',
    reg_weight='exp', warm_start=True,
    synthetic=None, fresh_frac=1.0,                  # recursive retraining (model collapse)
    batch_size=None, lr=None, warmup=None, grad_clip=1.0, ema_decay=None, max_steps=None,
    seed=0, device='auto', dtype='fp32', compile=False,
    out_dir=None, resume=False, init_from=None,
    log_every=None, sample_every=None, save_every=None, n_preview=None,
)
TOY_PRESET = dict(model='mlp', batch_size=256, lr=1e-3, warmup=200, ema_decay=0.995,
                  max_steps=10000, log_every=1000, sample_every=0, save_every=5000, n_preview=2000)
DDPM_PRESET = dict(batch_size=128, lr=2e-4, warmup=5000, ema_decay=0.9999, max_steps=800000,
                   log_every=100, sample_every=10000, save_every=10000, n_preview=64)  # Ho et al.
PRESETS = {
    **{name: TOY_PRESET for name in D.TOY},
    'mnist': dict(DDPM_PRESET, model='mnist', warmup=1000, ema_decay=0.999, max_steps=50000,
                  sample_every=5000, save_every=5000),
    'cifar10': dict(DDPM_PRESET, model='cifar10', ip_gamma=0.15),  # 0.15: ADM-IP's CIFAR-10 value
    'imagenet32': dict(DDPM_PRESET, model='imagenet32'),
    'celeba64': dict(DDPM_PRESET, model='celeba64'),
    'folder': dict(DDPM_PRESET, model='small'),
}
CHOICES = dict(dataset=D.DATASETS, sigma=('beta', 'posterior'), loss=('eps', 'ip', 'sa'),
               reg_kernel=KERNELS, reg_stat=('mmd', 'mmd2'), reg_grad=('full', 'last'),
               reg_norm=('mean1', 'sum1'), reg_weight=('exp', 'uniform'),
               dtype=('fp32', 'bf16'), device=None)
NONE_TYPES = dict(image_size=int, model=str, dropout=float, ip_gamma=float, synthetic=str,
                  batch_size=int, lr=float, warmup=int, ema_decay=float, max_steps=int,
                  out_dir=str, init_from=str, log_every=int, sample_every=int, save_every=int,
                  n_preview=int)


def parse_config(argv=None):
    """Defaults <- dataset preset <- command line. Returns (config, keys given on the command line)."""
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    for key, val in CONFIG.items():
        flag = '--' + key.replace('_', '-')
        if isinstance(val, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            p.add_argument(flag, type=NONE_TYPES.get(key, type(val)), default=None,
                           choices=CHOICES.get(key))
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    cfg = dict(CONFIG)
    cfg.update(PRESETS[args.get('dataset', cfg['dataset'])])
    cfg.update(args)
    if cfg['ip_gamma'] is None:
        cfg['ip_gamma'] = 0.1
    if cfg['out_dir'] is None:
        cfg['out_dir'] = os.path.join('out', cfg['dataset'] + ('-reg' if cfg['reg'] else ''))
    check_config(cfg)
    return cfg, set(args)


def check_config(cfg):
    def bad(msg):
        raise SystemExit(f'error: {msg}')
    if not 0 < cfg['fresh_frac'] <= 1:
        bad('--fresh-frac must be in (0, 1]')
    if cfg['fresh_frac'] < 1 and not cfg['synthetic']:
        bad('--fresh-frac < 1 needs --synthetic PATH (a previous generation\'s checkpoint or .npz)')
    if cfg['reg'] and not 1 <= cfg['reg_L'] <= cfg['T']:
        bad(f"--reg-L must be in 1..T={cfg['T']}")
    for k in ('batch_size', 'max_steps', 'T'):
        if cfg[k] < 1:
            bad(f'--{k.replace("_", "-")} must be positive')
    if cfg['reg'] and cfg['batch_size'] < 4:
        bad('--reg splits the batch in two halves for MMD: use --batch-size >= 4')
    if cfg['resume'] and cfg['init_from']:
        bad('--resume continues a run; --init-from starts a new one: pass only one')


def model_overrides(cfg):
    return {} if cfg['dropout'] is None else dict(dropout=cfg['dropout'])


# ---- checkpoints: one format, written atomically -------------------------------------------
def save_checkpoint(path, **state):
    tmp = path + '.tmp'
    torch.save(state, tmp)
    os.replace(tmp, path)   # readers see the old file or the new one, never half of one


def load_checkpoint(path, device='cpu', ema=True):
    """(model, diffusion, config) from a run folder, a ckpt.pt, or a diffusers DDPM folder.
    ema=True takes the EMA weights (what sampling and evaluation use)."""
    if os.path.isdir(path) and is_diffusers_folder(path):
        state, name, shape = load_diffusers_unet(path)
        cfg = {**CONFIG, **PRESETS['cifar10'], 'model': name, 'data_shape': list(shape)}
        model = build_model(name, shape)
        model.load_state_dict(state)
    else:
        file = os.path.join(path, 'ckpt.pt') if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f'no checkpoint at {file}: pass a run folder with ckpt.pt, '
                                    f'a .pt file, or a diffusers DDPM folder')
        try:
            ck = torch.load(file, map_location='cpu', weights_only=True)
            cfg = dict(ck['config'], data_shape=list(ck['data_shape']))
            model = build_model(cfg['model'], tuple(ck['data_shape']), **model_overrides(cfg))
            model.load_state_dict(ck['ema' if ema else 'model'])
        except Exception as e:
            why = ' '.join(str(e).split())[:200]   # torch's messages span lines: keep one
            raise ValueError(f'{file} is not a readable checkpoint of this project '
                             f'({type(e).__name__}: {why})') from None
    diff = Diffusion(cfg['T'], cfg['beta_1'], cfg['beta_T'], cfg['sigma'], device)
    return model.to(device).eval(), diff, cfg


# ---- data -----------------------------------------------------------------------------------
def training_set(cfg):
    """The in-memory training set: real data, or a mix of fresh real data (fraction fresh_frac)
    and synthetic samples of a previous generation (recursive retraining, seed 001)."""
    x = D.load_data(cfg['dataset'], cfg['data_dir'], cfg['image_size'], cfg['toy_n'], cfg['seed'])
    if not cfg['synthetic']:
        return x
    n_fresh = round(cfg['fresh_frac'] * len(x))
    syn = load_synthetic(cfg['synthetic'], len(x) - n_fresh, x, cfg['seed'])
    keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg['seed']))[:n_fresh]
    return torch.cat([x[keep], syn])


def load_synthetic(path, n, like, seed):
    """n synthetic samples from a sample file (.npz with 'samples', as sample.py writes) or drawn
    from a checkpoint's EMA model; converted to the training set's dtype and shape."""
    if path.endswith('.npz'):
        import numpy as np
        s = torch.from_numpy(np.load(path)['samples'])
        if s.dtype == torch.uint8 and s.dim() == 4 and s.shape[-1] in (1, 3):
            s = s.permute(0, 3, 1, 2)   # NHWC (the FID layout) -> NCHW
    else:
        model, diff, _ = load_checkpoint(path)
        g = torch.Generator().manual_seed(seed + 7919)
        s = torch.cat([diff.sample(model, (min(n - i, 4096), *like.shape[1:]), generator=g)
                       for i in range(0, n, 4096)]) if n else like[:0]
        s = D.to_uint8(s) if like.dtype == torch.uint8 else s
    if len(s) < n or tuple(s.shape[1:]) != tuple(like.shape[1:]) or s.dtype != like.dtype:
        raise SystemExit(f'error: {path} holds {tuple(s.shape)} {s.dtype}; need >= {n} samples of '
                         f'shape {tuple(like.shape[1:])} {like.dtype} (write more with sample.py --n)')
    return s[:n]


# ---- one training step's loss ---------------------------------------------------------------
def compute_loss(model, diff, x0, cfg, step, rank=0, world=1, fixed_k=None):
    """Total loss for the local batch x0 (b, ...) of rank `rank`; returns (loss, stats).
    fixed_k replaces the draw k ~ U{1..L} (bench.py measures the cost at a given k).

    Per-sample randomness (t, eps, flips) is drawn for the whole global batch from a generator
    seeded by (seed, step) and sliced, so N ranks reproduce one process. The regulariser works
    on the rank's own batch: one half warm-starts the chain, the other gives q(x_r).
    """
    dev, b = x0.device, x0.shape[0]
    B, lo = b * world, b * rank
    g = torch.Generator(dev).manual_seed(cfg['seed'] * 1_000_003 + step)

    def randn_global(shape):
        return torch.randn((B, *shape), generator=g, device=dev)[lo:lo + b]

    t = torch.randint(1, diff.T + 1, (B,), generator=g, device=dev)[lo:lo + b]  # t ~ U{1..T}
    noise = randn_global(x0.shape[1:])
    if cfg['loss'] == 'eps':
        nll = diff.loss_eps(model, x0, t, noise)                                 # Eq. (5)
    elif cfg['loss'] == 'ip':
        nll = diff.loss_ip(model, x0, t, noise, randn_global(x0.shape[1:]), cfg['ip_gamma'])
    else:
        extra = [randn_global(x0.shape[1:]) for _ in range(cfg['sa_k'] - 1)]
        nll = diff.loss_sa(model, x0, t, [noise] + extra, cfg['sa_lambda'])[0]
    stats = dict(loss_nll=nll.detach())   # tensors: no device sync until the log line
    if not cfg['reg']:
        return nll, stats
    # the regulariser (Sec. 5): one r and one k for the batch (drawn on the CPU: no sync);
    # each rank has its own generator for the chain's noise
    seed = (cfg['seed'] * 1_000_003 + step) * 64 + rank + 1
    gc, gr = torch.Generator().manual_seed(seed), torch.Generator(dev).manual_seed(seed)
    r = int(torch.randint(0, diff.T, (1,), generator=gc))               # r ~ U{0..T-1}
    k = int(torch.randint(1, cfg['reg_L'] + 1, (1,), generator=gc))     # k ~ U{1..L}
    k = fixed_k or k
    half = b // 2
    reg = consistency_reg(model, diff, x0[:half], x0[half:2 * half], r, k,
                          lambda shape: torch.randn(shape, generator=gr, device=dev),
                          cfg['reg_grad'], cfg['warm_start'], cfg['reg_kernel'], cfg['reg_stat'])
    w = reg_weight(r, diff.T, cfg['reg_rho'], cfg['reg_weight'], cfg['reg_norm'])   # Eq. (14)
    loss = cfg['lambda_nll'] * nll + cfg['lambda_reg'] * w * reg
    stats.update(loss_reg=reg.detach(), r=r, k=k, w=w)
    return loss, stats


def optimizer_step(loss, raw, opt, ema, cfg):
    """Backward, gradient clipping, Adam, then the EMA of the weights; returns the grad norm."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg['grad_clip'])
    opt.step()
    with torch.no_grad():   # ema <- decay * ema + (1 - decay) * w
        torch._foreach_lerp_(list(ema.parameters()), list(raw.parameters()), 1 - cfg['ema_decay'])
    return gnorm


def local_batch(data, cfg, step, rank, world, device):
    """This rank's slice of the global batch of `step`, in model space, flipped where DDPM did."""
    B, b = cfg['batch_size'], cfg['batch_size'] // world
    idx = D.batch_indices(len(data), B, step, cfg['seed'])[rank * b:(rank + 1) * b]
    x = D.to_model_space(data[idx.to(data.device)].to(device))
    if D.uses_flips(cfg['dataset']):
        g = torch.Generator().manual_seed(cfg['seed'] * 1_000_003 + step + 17)
        flip = (torch.rand(B, generator=g) < 0.5)[rank * b:(rank + 1) * b].to(device)
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    return x


# ---- previews --------------------------------------------------------------------------------
def save_preview(samples, real, path):
    """A grid of images, or for vector data a scatter of samples over the data (first 2 dims)."""
    if samples.dim() == 4:
        import torchvision
        torchvision.utils.save_image((samples + 1) / 2, path, nrow=int(math.sqrt(len(samples))))
        return
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 5))
    r = real[:len(samples)].float().cpu()
    ax.scatter(r[:, 0], r[:, 1], s=2, alpha=0.4, label='data')
    ax.scatter(samples[:, 0].cpu(), samples[:, 1].cpu(), s=2, alpha=0.6, label='samples (EMA)')
    ax.legend(loc='upper right', markerscale=4)
    ax.set_aspect('equal')
    fig.savefig(path, dpi=100, bbox_inches='tight')
    plt.close(fig)


# ---- the training loop -----------------------------------------------------------------------
def main(argv=None):
    cfg, given = parse_config(argv)
    ddp = int(os.environ.get('WORLD_SIZE', 1)) > 1
    rank, world = (int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])) if ddp else (0, 1)
    device = cfg['device']
    if device == 'auto':
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else 'cpu'
    if ddp:
        dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
    if device.startswith('cuda'):
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if cfg['batch_size'] % world:
        raise SystemExit(f"error: --batch-size {cfg['batch_size']} must divide over {world} ranks")
    if cfg['reg'] and cfg['batch_size'] // world < 4:
        raise SystemExit(f"error: --reg splits each rank's batch in two halves for MMD: use "
                         f"--batch-size >= {4 * world} on {world} ranks")
    master, out = rank == 0, cfg['out_dir']
    ckpt_path = os.path.join(out, 'ckpt.pt')

    resume_state = None
    if cfg['resume']:
        if not os.path.isfile(ckpt_path):
            raise SystemExit(f'error: --resume found no {ckpt_path}; pass the --out-dir of the run')
        resume_state = torch.load(ckpt_path, map_location='cpu', weights_only=True)
        saved = resume_state['config']   # the run's own settings; explicit flags still win
        cfg = dict(saved, **{k: cfg[k] for k in given if k != 'resume'}, resume=True)
    elif os.path.isfile(ckpt_path):
        raise SystemExit(f'error: {out} already holds a run; pass --resume to continue it '
                         f'or --out-dir NEW for a new one')
    if master:
        os.makedirs(out, exist_ok=True)
        print(json.dumps(cfg, indent=1))
        if cfg['dtype'] == 'bf16' and not device.startswith('cuda'):
            print('warning: bf16 autocast on a CPU is usually much slower than fp32')
        with open(os.path.join(out, 'config.json'), 'w') as f:
            json.dump(cfg, f, indent=1)

    data = training_set(cfg).to(device)
    shape = D.data_shape(data)
    diff = Diffusion(cfg['T'], cfg['beta_1'], cfg['beta_T'], cfg['sigma'], device)
    torch.manual_seed(cfg['seed'])   # the initial weights depend on --seed alone
    raw = build_model(cfg['model'], shape, **model_overrides(cfg))
    if cfg['init_from']:   # fine-tuning: start (model and EMA) from trained weights
        src, _, src_cfg = load_checkpoint(cfg['init_from'])
        if src_cfg['model'] != cfg['model'] or tuple(src_cfg['data_shape']) != shape:
            raise SystemExit(f"error: --init-from holds a {src_cfg['model']!r} network for data of "
                             f"shape {tuple(src_cfg['data_shape'])}, this run builds {cfg['model']!r} "
                             f"for {shape}: pass the matching --model / --dataset")
        raw.load_state_dict(src.state_dict())
    raw.to(device)
    ema = copy.deepcopy(raw).eval().requires_grad_(False)
    opt = torch.optim.Adam(raw.parameters(), lr=cfg['lr'])
    step = 0
    if resume_state is not None:
        raw.load_state_dict(resume_state['model'])
        ema.load_state_dict(resume_state['ema'])
        opt.load_state_dict(resume_state['opt'])
        step = resume_state['step']
    n_params = sum(p.numel() for p in raw.parameters())
    model = torch.compile(raw) if cfg['compile'] else raw
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.startswith('cuda') else None)
    autocast = (torch.autocast(device.split(':')[0], dtype=torch.bfloat16)
                if cfg['dtype'] == 'bf16' else contextlib.nullcontext())
    if master:
        print(f"{cfg['dataset']}: {len(data)} examples of shape {shape}; model {cfg['model']} "
              f"with {n_params:,} parameters; {world} rank(s) on {device}")
    log = open(os.path.join(out, 'log.jsonl'), 'a') if master else None

    def checkpoint():
        save_checkpoint(ckpt_path, model=raw.state_dict(), ema=ema.state_dict(),
                        opt=opt.state_dict(), step=step, config=cfg, data_shape=list(shape),
                        rng=torch.get_rng_state())

    def preview():
        g = torch.Generator(device).manual_seed(cfg['seed'])   # fp32: no bf16 drift in the chain
        s = diff.sample(ema, (cfg['n_preview'], *shape), generator=g, device=device)
        save_preview(s, D.to_model_space(data[:cfg['n_preview']]),
                     os.path.join(out, f'samples_{step:07d}.png'))

    t_last, n_seen = time.time(), 0
    while step < cfg['max_steps']:
        # dropout and other global-RNG use: deterministic per (seed, step, rank)
        torch.manual_seed(cfg['seed'] * 1_000_003 + step * 1009 + rank)
        for grp in opt.param_groups:   # linear warm-up, then constant (DDPM)
            grp['lr'] = cfg['lr'] * min(1.0, (step + 1) / max(1, cfg['warmup']))
        x0 = local_batch(data, cfg, step, rank, world, device)
        with autocast:
            loss, stats = compute_loss(model, diff, x0, cfg, step, rank, world)
        gnorm = optimizer_step(loss, raw, opt, ema, cfg)
        step += 1
        n_seen += cfg['batch_size']
        if master and (step % cfg['log_every'] == 0 or step == cfg['max_steps']):
            if device.startswith('cuda'):
                torch.cuda.synchronize()
            dt, t_last = time.time() - t_last, time.time()
            ips, eta = n_seen / dt, (cfg['max_steps'] - step) * dt / max(1, n_seen) * cfg['batch_size']
            stats = {k: float(v) for k, v in stats.items()}
            rec = dict(step=step, loss=loss.item(), **stats, grad_norm=float(gnorm),
                       lr=opt.param_groups[0]['lr'], img_per_s=round(ips, 1))
            log.write(json.dumps(rec) + '\n')
            log.flush()
            extra = ''.join(f' | {k} {v:.4g}' for k, v in stats.items() if k != 'loss_nll')
            print(f"step {step}/{cfg['max_steps']} | loss {rec['loss']:.4f}{extra} | "
                  f"{ips:.0f} img/s | eta {int(eta // 3600)}h{int(eta % 3600 // 60):02d}m"
                  f"{int(eta % 60):02d}s", flush=True)
            n_seen = 0
        if master and (step % cfg['save_every'] == 0 or step == cfg['max_steps']):
            checkpoint()
        if master and ((cfg['sample_every'] and step % cfg['sample_every'] == 0)
                       or step == cfg['max_steps']):
            preview()
    if master:
        log.close()
        print(f"done: {step} steps; checkpoint {ckpt_path}")
    if ddp:
        dist.destroy_process_group()


if __name__ == '__main__':
    try:
        main()
    except (FileNotFoundError, ValueError) as e:   # bad input: one clear line, no traceback
        sys.exit(f'error: {e}')
