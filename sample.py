"""Draw samples from a trained checkpoint (EMA weights by default).

    python sample.py --ckpt out/cifar10 --n 64 --grid samples.png
    python sample.py --ckpt out/cifar10 --n 50000 --npz samples.npz          # for FID
    torchrun --nproc_per_node=8 sample.py --ckpt out/cifar10 --num-samples 50000 --npz samples.npz

--npz writes uint8 NHWC images under key 'samples' (pytorch-fid / ADM layout) or, for vector
data, float32 (N, D). --png-dir writes one PNG per image. Every file is written to a temporary
name and renamed, so an interrupted run leaves no half-written file.
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

import quant
from data import to_model_space, to_uint8
from train import load_checkpoint, save_preview


def generate(model, diff, n, shape, batch_size=256, sampler='ddpm', steps=None, seed=0,
             device='cpu', progress=False):
    """n samples (float, model space) drawn in batches; reproducible from `seed`."""
    g = torch.Generator(device).manual_seed(seed)
    out = []
    it = range(0, n, batch_size)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc='sampling', unit='batch')
    for i in it:
        b = min(batch_size, n - i)
        out.append(diff.sample(model, (b, *shape), sampler, steps, g, device=device).cpu())
    return torch.cat(out) if out else torch.empty(0, *shape)


def atomic_save_npz(path, **arrays):
    tmp = path + '.tmp.npz'
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def save_npz(x, path):
    """uint8 NHWC for images (the FID layout), float32 for vector data."""
    if x.dim() == 4:
        arr = (x if x.dtype == torch.uint8 else to_uint8(x)).permute(0, 2, 3, 1).numpy()
    else:
        arr = x.float().numpy()
    atomic_save_npz(path, samples=arr)


def save_png_dir(x, folder, start=0):
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    x = x if x.dtype == torch.uint8 else to_uint8(x)
    for i, img in enumerate(x.permute(0, 2, 3, 1).numpy(), start):
        path = os.path.join(folder, f'{i:06d}.png')
        Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(path + '.tmp', 'PNG')
        os.replace(path + '.tmp', path)


def main(argv=None):
    p = argparse.ArgumentParser(description='Sample from a checkpoint.')
    p.add_argument('--ckpt', required=True, help='run folder, ckpt.pt, or diffusers DDPM folder')
    p.add_argument('--n', '--num-samples', dest='n', type=int, default=64,
                   help='number of samples (--num-samples under torchrun, whose parser takes --n)')
    p.add_argument('--batch-size', type=int, default=256)
    p.add_argument('--sampler', choices=('ddpm', 'ddim'), default='ddpm')
    p.add_argument('--steps', type=int, default=100, help='DDIM steps')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--no-ema', action='store_true', help='use the raw weights, not the EMA')
    p.add_argument('--grid', help='PNG grid (images) or scatter plot (vector data)')
    p.add_argument('--npz', help='.npz with all samples')
    p.add_argument('--png-dir', help='folder for one PNG per image')
    p.add_argument('--device', default='auto')
    quant.add_quant_args(p)
    a = p.parse_args(argv)
    if not (a.grid or a.npz or a.png_dir):
        raise SystemExit('error: say where to write: --grid PNG, --npz FILE and/or --png-dir DIR')
    if a.n < 1:
        raise SystemExit('error: --n must be positive')
    ddp = int(os.environ.get('WORLD_SIZE', 1)) > 1
    rank, world = (int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])) if ddp else (0, 1)
    device = a.device
    if device == 'auto':
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else 'cpu'
    if ddp:
        dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
    model, diff, cfg = load_checkpoint(a.ckpt, device, ema=not a.no_ema)
    shape = tuple(cfg['data_shape'])
    model = quant.apply_quant(model, diff, shape, a.ckpt, a, device)   # --quant w8a8 | w4a8
    # shard: rank r draws samples [lo, hi) with its own seed; rank 0 gathers for the files
    per = -(-a.n // world)
    lo, hi = min(a.n, rank * per), min(a.n, (rank + 1) * per)
    x = generate(model, diff, hi - lo, shape, a.batch_size, a.sampler, a.steps,
                 a.seed * 1009 + rank, device, progress=rank == 0)
    if x.dim() == 4:
        x = to_uint8(x)   # images travel and are stored as uint8
    if a.png_dir and x.dim() == 4:
        save_png_dir(x, a.png_dir, start=lo)
    if ddp:
        parts = [None] * world
        dist.all_gather_object(parts, x)
        x = torch.cat(parts)
    if rank == 0:
        if a.npz:
            save_npz(x, a.npz)
        if a.grid:
            save_preview(to_model_space(x[:256]), x[:0], a.grid)
        print(f'wrote {len(x)} samples of shape {tuple(x.shape[1:])} '
              f'({a.sampler}, EMA={not a.no_ema}) to ' + ', '.join(filter(None, [a.grid, a.npz, a.png_dir])))
    if ddp:
        dist.destroy_process_group()


if __name__ == '__main__':
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f'error: {e}')
