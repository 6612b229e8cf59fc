"""Train a DDPM, optionally with the paper's consistency regulariser (--reg), on one CPU, one GPU
or many GPUs:

    python train.py                                  # 2-D toy run, a few minutes on a laptop CPU
    python train.py --dataset cifar10 --reg          # the paper's setting
    torchrun --nproc_per_node=8 train.py --dataset cifar10 --reg

Every entry of runtime.CONFIG is a flag (--batch-size 64, --no-warm-start, ...); per-data-set
presets fill in what the command line leaves open. A run writes into --out-dir: config.json,
log.jsonl, ckpt.pt (written atomically), sample pictures and, with --log tensorboard, tb/. All
randomness of a step is a function of (seed, step) and of each sample's index in the global
batch, so a resumed run continues exactly and N ranks see the same global batch as one process.

The training step itself (local_batch, compute_loss: the loss, optimizer_step) is trainstep.py's,
which bench.py times as it is.
"""
import copy
import json
import os
import signal
import threading
import time

import torch
import torch.distributed as dist

import data as D
import runtime as R
from model import build_model, cpu_has_native_bf16, resolve_dtype, set_dropout_shard
from trainstep import compute_loss, local_batch, make_adam, optimizer_step, reg_batch_size, set_lr, training_set


# ---- set-up: a new run or a resumed one; nothing is written until every check has passed -------
def start_or_resume(cfg, given):
    """(config, checkpoint dict or None). A resumed run keeps its own settings; of the flags given
    now only those in runtime.RESUMABLE may differ from them."""
    out, ckpt_path = cfg['out_dir'], os.path.join(cfg['out_dir'], 'ckpt.pt')
    if os.path.exists(out) and not os.path.isdir(out):
        R.fail(f'--out-dir {out} is a file: pass a folder')
    if not cfg['resume']:
        if os.path.isfile(ckpt_path):
            R.fail(f'{out} already holds a run; pass --resume to continue it or --out-dir NEW for a new one')
        return cfg, None
    if not os.path.isfile(ckpt_path):
        R.fail(f'--resume found no {ckpt_path}; pass the --out-dir of the run')
    ck = R.read_checkpoint(ckpt_path)
    saved = {**R.CONFIG, **R.LEGACY, **ck['config']}
    R.resolve_schedule(saved)
    changed = sorted(k for k in given - R.RESUMABLE if cfg[k] != saved.get(k))
    if changed:
        k = changed[0]
        R.fail(f"--resume cannot change --{k.replace('_', '-')} (the run has {saved.get(k)!r}, given "
               f"{cfg[k]!r}): start a new run, e.g. with --init-from {out}")
    cfg = {**saved, **{k: cfg[k] for k in given}, 'resume': True}
    R.check_config(cfg)
    return cfg, ck


def build_state(cfg, shape, device, ck):
    """Network, EMA copy and Adam, from scratch (weights seeded by --seed alone), from
    --init-from's EMA weights, or from the checkpoint `ck` of a resumed run; and the step."""
    torch.manual_seed(R.seed_of(cfg['seed'], 'init'))
    raw = build_model(cfg['model'], shape, **R.model_overrides(cfg))
    if cfg['init_from']:   # fine-tuning: start (model and EMA) from trained weights
        src, _, src_cfg = R.load_checkpoint(cfg['init_from'])
        if src_cfg['model'] != cfg['model'] or tuple(src_cfg['data_shape']) != shape:
            R.fail(f"--init-from holds a {src_cfg['model']!r} network for data of shape "
                   f"{tuple(src_cfg['data_shape'])}, this run builds {cfg['model']!r} for {shape}: "
                   f'pass the matching --model / --dataset')
        raw.load_state_dict(src.state_dict())
    raw.to(device, memory_format=torch.channels_last if cfg.get('channels_last') else torch.preserve_format)
    ema = copy.deepcopy(raw).eval().requires_grad_(False)
    opt = make_adam(raw.parameters(), cfg['lr'])
    if ck is None:
        return raw, ema, opt, 0
    raw.load_state_dict(ck['model'])
    ema.load_state_dict(ck['ema'])
    opt.load_state_dict(ck['opt'])
    return raw, ema, opt, ck['step']


def open_log(path, upto):
    """log.jsonl for appending, cut back to the lines of steps <= upto (a resumed run redoes the rest)."""
    if os.path.isfile(path):
        with open(path) as f:
            keep = [ln for ln in f if ln.strip() and json.loads(ln)['step'] <= upto]
        R.atomic_write(path, lambda f: f.writelines(keep), binary=False)
    return open(path, 'a')


def log_line(log, stats, loss, gnorm, lr, step, cfg, world, n_seen, dt):
    """One JSON line (losses averaged over ranks) and one progress line. Every rank calls this."""
    vals = torch.stack([loss.detach().float()] + [torch.as_tensor(v, dtype=torch.float32, device=loss.device)
                                                  for v in stats.values()])
    if world > 1:   # the global loss, not rank 0's share (r, k, w are rank 0's own draw)
        dist.all_reduce(vals)
        vals /= world
    if log is None:
        return None
    keys = ['loss'] + list(stats)
    rec = dict(step=step, **dict(zip(keys, vals.tolist())), grad_norm=float(gnorm), lr=lr,
               img_per_s=round(n_seen / dt, 1))
    if 'r' in rec:
        rec.update(r=int(stats['r']), k=int(stats['k']), w=float(stats['w']))
    log.write(json.dumps(R.json_safe(rec), allow_nan=False) + '\n')
    log.flush()
    eta = (cfg['max_steps'] - step) * dt / max(1, n_seen) * cfg['batch_size']
    extra = ''.join(f' | {k} {rec[k]:.4g}' for k in keys[1:] if k != 'loss_nll')
    print(f"step {step}/{cfg['max_steps']} | loss {rec['loss']:.4f}{extra} | {n_seen / dt:.0f} img/s | "
          f"eta {int(eta // 3600)}h{int(eta % 3600 // 60):02d}m{int(eta % 60):02d}s", flush=True)
    return rec


# ---- --log tensorboard: the same records, and the previews, as TensorBoard events under RUN/tb --
TB_TAGS = dict(loss='train/loss', loss_nll='train/loss_nll', loss_reg='reg/loss_reg', r='reg/r', k='reg/k',
               w='reg/w', grad_norm='train/grad_norm', lr='train/lr', img_per_s='train/img_per_s')


def check_tensorboard(cfg):
    if cfg['log'] == 'tensorboard':
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            R.fail('--log tensorboard needs the tensorboard package: pip install tensorboard (or use --log json)')


def open_tensorboard(cfg, step):
    """A SummaryWriter on RUN/tb, or None (--log json). A resumed run purges the events of the steps
    it redoes (after its checkpoint's step), so that no step appears twice."""
    if cfg['log'] != 'tensorboard':
        return None
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(os.path.join(cfg['out_dir'], 'tb'), purge_step=step + 1 if step else None)


def tb_write(tb, rec=None, preview=None, step=None):
    """One log record's scalars (TB_TAGS; loss_nll is the eps-MSE of --loss eps) or a preview PNG."""
    if rec is not None:
        for k, tag in TB_TAGS.items():
            if rec.get(k) is not None:
                tb.add_scalar(tag, rec[k], rec['step'])
    if preview is not None:
        import numpy as np
        from PIL import Image
        with Image.open(preview) as im:
            tb.add_image('samples', np.asarray(im.convert('RGB')), step, dataformats='HWC')
    tb.flush()


# ---- preemption and the run folder's one writer --------------------------------------------------
class StopSignal:
    """SIGTERM (a scheduler's preemption or time limit) and SIGINT (Ctrl-C) ask the loop to stop
    after the current optimizer step, save and exit 128 + signal (143 / 130) so that a scheduler
    can requeue. The handler only records the signal: a second one, during the save or not, changes
    nothing. Under torchrun the ranks agree (all-reduced flag, every 10 steps) on the same step."""
    def __enter__(self):
        self.signum, self.old = 0, {}
        if threading.current_thread() is threading.main_thread():   # (signals reach the main thread only)
            self.old = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def handle(self, signum, frame):
        self.signum = self.signum or signum

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)

    def requested(self, step, world, device):
        """The signal to stop on (0: none), the same on every rank."""
        if world == 1:
            return self.signum
        if step % 10:
            return 0
        flag = torch.tensor(self.signum, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag)


def lock_run_dir(out):
    """Hold RUN/.lock (flock) for the life of this process: one writer per run folder. The OS drops
    the lock when the process ends, however it ends, so a crash leaves no stale lock."""
    try:
        import fcntl
    except ImportError:   # not POSIX: no lock
        return None
    key = os.path.realpath(out)
    if key in _LOCKS:   # this process holds it already (main() called again in one process)
        return _LOCKS[key]
    os.makedirs(out, exist_ok=True)
    fd = os.open(os.path.join(out, '.lock'), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 32).decode(errors='replace').strip() or '?'
        os.close(fd)
        R.fail(f'{out} is in use by pid {holder} (another train.py writes it): wait for it to end, '
               f'or pass another --out-dir')
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _LOCKS[key] = fd
    return fd


_LOCKS = {}   # run folder -> the descriptor whose flock this process holds


# ---- the training loop -----------------------------------------------------------------------
def main(argv=None):
    cfg, given = R.parse_config(argv)
    device, rank, world = R.setup_device(cfg['device'])
    if cfg['batch_size'] % world:
        R.fail(f"--batch-size {cfg['batch_size']} must divide over {world} ranks")
    cfg, ck = start_or_resume(cfg, given)   # reads only: nothing is written before these checks pass
    check_tensorboard(cfg)
    cfg['dtype'] = resolve_dtype(cfg['dtype'], device)   # auto -> what this machine runs (saved as such)
    if cfg['reg'] and cfg['reg_halves'] and cfg['batch_size'] // world < 4:
        R.fail(f"--reg-halves splits each rank's batch in two halves for MMD: use --batch-size >= {4 * world} "
               f'on {world} ranks')
    if reg_batch_size(cfg) % world or 0 < reg_batch_size(cfg) // world < 2:
        R.fail(f'--reg-batch {reg_batch_size(cfg)} must divide over {world} ranks, at least 2 samples each')
    master, out = rank == 0, cfg['out_dir']
    ckpt_path = os.path.join(out, 'ckpt.pt')
    data = training_set(cfg).to(device)
    if reg_batch_size(cfg) > len(data):
        R.fail(f'--reg-batch {reg_batch_size(cfg)} exceeds the {len(data)} training examples: lower --reg-batch')
    shape = D.data_shape(data)
    diff = R.make_diffusion(cfg, device, cfg['dtype'])   # the network in cfg's dtype, the rest fp32
    raw, ema, opt, step = build_state(cfg, shape, device, ck)
    set_dropout_shard(raw, rank, world)   # dropout masks of the global batch, sliced per rank
    model = torch.compile(raw) if cfg['compile'] else raw
    if dist.is_initialized():   # under torchrun, one rank included (that proves the DDP path too)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.startswith('cuda') else None)
    log = tb = None
    if master:   # every check has passed: only now does the run folder change
        lock_run_dir(out)   # held until the process ends
        print(json.dumps(cfg, indent=1))
        if cfg['dtype'] == 'bf16' and device == 'cpu' and not cpu_has_native_bf16():
            print('warning: this CPU has no native bf16 units (no AVX512-BF16 / AMX / Arm BF16): bf16 '
                  'autocast is emulated and usually slower than fp32 here')
        R.write_json(os.path.join(out, 'config.json'), cfg)
        log = open_log(os.path.join(out, 'log.jsonl'), step)
        tb = open_tensorboard(cfg, step)
        print(f"{cfg['dataset']}: {len(data)} examples of shape {shape}; model {cfg['model']} with "
              f"{sum(p.numel() for p in raw.parameters()):,} parameters; {world} rank(s) on {device}")
    saved_step = ck['step'] if ck else None
    # the first step whose loss or gradient norm was not finite (-1: none), kept on the device so
    # that GPUs do not wait for it; checked every step on a CPU, at log/save points on a GPU
    first_bad = torch.tensor(-1, device=device)
    t_last, n_seen, signum = time.time(), 0, 0
    with StopSignal() as stop:   # SIGTERM / SIGINT: stop after this step, save, exit 143 / 130
        while step < cfg['max_steps']:
            torch.manual_seed(R.seed_of(cfg['seed'], 'dropout', step))   # the same on every rank
            set_lr(opt, cfg, step)
            x0 = local_batch(data, cfg, step, rank, world, device)
            x_reg = local_batch(data, cfg, step, rank, world, device, 'reg') if reg_batch_size(cfg) else None
            loss, stats = compute_loss(model, diff, x0, cfg, step, rank, world, x_reg=x_reg)
            gnorm = optimizer_step(loss, raw, opt, ema, cfg)
            first_bad = torch.where((first_bad < 0) & ~(torch.isfinite(loss.detach()) & torch.isfinite(gnorm)),
                                    step + 1, first_bad)
            step += 1
            n_seen += cfg['batch_size']
            signum = stop.requested(step, world, device)
            logs = step % cfg['log_every'] == 0 or step == cfg['max_steps'] or signum
            saves = step % cfg['save_every'] == 0 or step == cfg['max_steps'] or signum
            previews = ((cfg['sample_every'] and step % cfg['sample_every'] == 0) or step == cfg['max_steps']) and not signum
            if not device.startswith('cuda') or logs or saves or previews:
                stop_if_diverged(first_bad, world, loss, gnorm, ckpt_path, saved_step)
            if logs:
                if device.startswith('cuda'):
                    torch.cuda.synchronize()
                dt, t_last = time.time() - t_last, time.time()
                rec = log_line(log, stats, loss, gnorm, opt.param_groups[0]['lr'], step, cfg, world, n_seen, dt)
                if tb:
                    tb_write(tb, rec)
                n_seen = 0
            if master and saves:
                R.save_checkpoint(ckpt_path, model=raw.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                                  step=step, config=cfg, data_shape=list(shape))
                saved_step = step
            if master and previews:
                g = torch.Generator(device).manual_seed(cfg['seed'])
                s = diff.sample(ema, (cfg['n_preview'], *shape), steps=cfg.get('preview_steps'), generator=g,
                                device=device)
                png = os.path.join(out, f'samples_{step:07d}.png')
                R.save_preview(s, D.to_model_space(data[:cfg['n_preview']]), png)
                if tb:
                    tb_write(tb, preview=png, step=step)
            if signum:
                break
    if master:
        log.close()
        if tb:
            tb.close()
        print(f"stopped by {signal.Signals(signum).name} at step {step}; {ckpt_path} holds it; resume with: "
              f"python train.py --resume --out-dir {out}" if signum else f'done: {step} steps; checkpoint {ckpt_path}',
              flush=True)
    del model   # DDP's reducer holds the process group: free it while the interpreter is alive
    R.teardown(end_process=True, code=128 + signum if signum else 0)
    if signum:
        raise SystemExit(128 + signum)


def stop_if_diverged(first_bad, world, loss, gnorm, ckpt_path, saved_step):
    """A non-finite loss or gradient stops the run before anything more is written, so the last
    good checkpoint survives. Every rank decides alike (the flag is all-reduced)."""
    bad = first_bad.clone()
    if world > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if int(bad) < 0:
        return
    kept = f'{ckpt_path} keeps step {saved_step}' if saved_step else 'no checkpoint was written'
    R.teardown()
    R.fail(f'non-finite loss or gradient norm at step {int(bad)} (last: loss {float(loss.detach()):.4g}, '
           f'grad norm {float(gnorm):.4g}); stopped, {kept}: try a lower --lr, a smaller --grad-clip, '
           f'or --dtype fp32')


if __name__ == '__main__':
    try:
        main()
    except (FileNotFoundError, ValueError) as e:   # bad input: one clear line, no traceback
        raise SystemExit(f'error: {e}') from None
