"""One training step, shared by train.py (which runs it) and bench.py (which times it): the
training set, the global batch of a step, the loss (Eq. 5, ADM-IP, SA-DPM, plus the paper's
consistency regulariser of Sec. 5 with its weight, Eq. 14) and the optimiser update with the EMA.

Every random draw of a step is a function of (seed, step) and of each sample's index in the
global batch, so a resumed run continues exactly and N ranks see the same global batch as one
process.
"""
import functools

import torch

import data as D
import runtime as R
from mmd import consistency_reg, reg_chain_times, reg_weight


# ---- data -----------------------------------------------------------------------------------
def training_set(cfg):
    """The in-memory training set: real data, or a mix of fresh real data (fraction fresh_frac)
    and synthetic samples of a previous generation (recursive retraining, seed 001)."""
    x = D.load_data(cfg['dataset'], cfg['data_dir'], cfg['image_size'], cfg['toy_n'], cfg['seed'])
    if not cfg['synthetic']:
        return x
    n_fresh = round(cfg['fresh_frac'] * len(x))
    keep = torch.randperm(len(x), generator=R.rng(cfg['seed'], 'fresh'))[:n_fresh]
    if n_fresh == len(x):   # --fresh-frac 1 (collapse.py's alpha = 1): the synthetic set is not used
        return x[keep]
    return torch.cat([x[keep], load_synthetic(cfg['synthetic'], len(x) - n_fresh, x, cfg['seed'])])


def load_synthetic(path, n, like, seed):
    """n synthetic samples from a sample file (.npz with 'samples', as sample.py writes) or drawn
    from a checkpoint's EMA model; in the training set's dtype and shape."""
    want = f'>= {n} samples of shape {tuple(like.shape[1:])} {like.dtype}'
    if path.endswith('.npz'):
        s = torch.from_numpy(R.read_npz(path, need=['samples'])['samples'])
        if s.dtype == torch.uint8 and s.dim() == 4 and s.shape[-1] in (1, 3):
            s = s.permute(0, 3, 1, 2)   # NHWC (the FID layout) -> NCHW
    else:
        model, diff, cfg = R.load_checkpoint(path)
        if tuple(cfg['data_shape']) != tuple(like.shape[1:]):   # before any sampling
            R.fail(f"--synthetic {path} models {cfg['dataset']} data of shape {tuple(cfg['data_shape'])}; "
                   f'this run needs {want}')
        s = R.generate(model, diff, n, like.shape[1:], 4096, seed=R.seed_of(seed, 'synthetic'))
        s = D.to_uint8(s) if like.dtype == torch.uint8 else s
    if len(s) < n or tuple(s.shape[1:]) != tuple(like.shape[1:]) or s.dtype != like.dtype:
        R.fail(f'{path} holds {tuple(s.shape)} {s.dtype}; need {want} (write more with sample.py --n)')
    return s[:n]


@functools.lru_cache(maxsize=2)
def epoch_permutation(n, seed, epoch):
    return torch.randperm(n, generator=R.rng(seed, 'epoch', epoch))


def batch_indices(n, batch_size, step, seed):
    """(batch_size,) example indices of global `step`: one random permutation per epoch (without
    replacement), drop-last. A pure function of its arguments."""
    if not 1 <= batch_size <= n:
        raise ValueError(f'--batch-size {batch_size} must be in [1, data set size {n}]: lower --batch-size')
    epoch, i = divmod(step, n // batch_size)
    return epoch_permutation(n, seed, epoch)[i * batch_size:(i + 1) * batch_size].clone()


def local_batch(data, cfg, step, rank, world, device, purpose='batch'):
    """This rank's slice of the global batch of `step`, in model space, flipped where DDPM did.
    purpose 'reg': the regulariser's second batch (Algorithm 1's S_0', reg_batch_size samples),
    drawn independently of the training batch (its own permutation per step, its own flips)."""
    if purpose == 'batch':
        B = cfg['batch_size']
        idx = batch_indices(len(data), B, step, cfg['seed'])
    else:
        B = reg_batch_size(cfg)
        if B > len(data):
            raise ValueError(f'--reg-batch {B} exceeds the data set size {len(data)}: lower --reg-batch')
        idx = torch.randperm(len(data), generator=R.rng(cfg['seed'], 'reg-batch', step))[:B]
    b = B // world
    idx = idx[rank * b:(rank + 1) * b]
    x = D.to_model_space(data[idx.to(data.device)].to(device))
    if D.uses_flips(cfg['dataset']):
        flip = torch.rand(B, generator=R.rng(cfg['seed'], 'flip' if purpose == 'batch' else 'reg-flip', step)) < 0.5
        x = torch.where(flip[rank * b:(rank + 1) * b].to(device).view(-1, 1, 1, 1), x.flip(3), x)
    return x


def reg_batch_size(cfg):
    """The global size of the regulariser's second batch (Algorithm 1's S_0'), or 0 with
    --reg-halves (the released code's shortcut: the two halves of the training batch)."""
    if not cfg['reg'] or cfg.get('reg_halves'):
        return 0
    return cfg.get('reg_batch') or cfg['batch_size']


# ---- one training step ------------------------------------------------------------------------
def compute_loss(model, diff, x0, cfg, step, rank=0, world=1, fixed_k=None, x_reg=None):
    """Total loss for the local batch x0 (b, ...) of rank `rank`; returns (loss, stats).
    fixed_k replaces the draw k ~ U{1..L} (bench.py measures the cost at a given k).
    x_reg (m, ...): the regulariser's second batch, local_batch(..., purpose='reg') (needed with
    --reg unless --reg-halves).

    Per-sample randomness (t, eps) is drawn for the whole global batch from a generator seeded by
    (seed, step) and sliced, so N ranks reproduce one process. The regulariser works on the
    rank's own batches: as Algorithm 1, the training batch warm-starts the chain and the second,
    independent batch gives q(x_r); with --reg-halves one half of x0 does each.
    """
    dev, b = x0.device, x0.shape[0]
    B, lo = b * world, b * rank
    g = R.rng(cfg['seed'], 'loss', step, device=dev)

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
    # the regulariser (Sec. 5): one r and one k for the rank's batch, drawn on the CPU (no sync)
    # (--reg-steps S: r is a position on the S-step sampling grid, the chain takes respaced steps)
    gc, gr = R.rng(cfg['seed'], 'reg', step, rank), R.rng(cfg['seed'], 'reg', step, rank, device=dev)
    S = cfg.get('reg_steps')
    r = int(torch.randint(0, S or diff.T, (1,), generator=gc))          # r ~ U{0..T-1}
    k = fixed_k or int(torch.randint(1, cfg['reg_L'] + 1, (1,), generator=gc))   # k ~ U{1..L}
    if cfg.get('reg_halves'):
        x_a, x_b = x0[:b // 2], x0[b // 2:2 * (b // 2)]
    elif x_reg is None:
        raise ValueError('--reg needs its second batch: pass x_reg=local_batch(..., purpose="reg") (or use --reg-halves)')
    else:
        x_a, x_b = x0, x_reg
    reg = consistency_reg(model, diff, x_a, x_b, r, k,
                          lambda shape: torch.randn(shape, generator=gr, device=dev),
                          cfg['reg_grad'], cfg['warm_start'], cfg['reg_kernel'], cfg['reg_stat'],
                          reg_steps=S)
    r_t = reg_chain_times(diff.T, r, k, S)[1]   # the chain index where x~_r and q(x_r) meet
    w = reg_weight(r_t, diff.T, cfg['reg_rho'], cfg['reg_weight'], cfg['reg_norm'])   # Eq. (14)
    loss = cfg['lambda_nll'] * nll + cfg['lambda_reg'] * w * reg
    stats.update(loss_reg=reg.detach(), r=r_t, k=k, w=w)
    return loss, stats


def make_adam(params, lr):
    """Adam with torch's fused kernel where this torch has it for the device (CPU since 2.4: one pass
    over the weights instead of foreach's several, 0.12 -> 0.04 s per step of the cifar10 net on one
    core), the foreach one elsewhere. The two agree to float rounding, not to the bit; a checkpoint
    restores the implementation it was saved with (its param_groups carry the flag)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


def optimizer_step(loss, raw, opt, ema, cfg):
    """Backward, gradient clipping, Adam, then the EMA of the weights; returns the grad norm."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg['grad_clip'])
    opt.step()
    with torch.no_grad():   # ema <- decay * ema + (1 - decay) * w
        torch._foreach_lerp_(list(ema.parameters()), list(raw.parameters()), 1 - cfg['ema_decay'])
    return gnorm


def set_lr(opt, cfg, step):
    for grp in opt.param_groups:   # linear warm-up, then constant (DDPM)
        grp['lr'] = cfg['lr'] * min(1.0, (step + 1) / max(1, cfg['warmup']))
