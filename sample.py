"""Draw samples from a trained checkpoint (EMA weights by default).

    python sample.py --ckpt out/cifar10 --n 64 --grid samples.png
    python sample.py --ckpt out/cifar10 --n 50000 --npz samples.npz          # for FID
    python sample.py --ckpt out/cifar10 --n 64 --grid s.png --steps 20       # respaced ancestral
    torchrun --nproc_per_node=8 sample.py --ckpt out/cifar10 --num-samples 50000 --npz samples.npz

--npz writes uint8 NHWC images under key 'samples' (pytorch-fid / ADM layout) or, for vector
data, float32 (N, D). --png-dir writes one PNG per image. Every file is written to a temporary
name, fsynced and renamed, so an interrupted run leaves no half-written file.
"""
import argparse
import os

import runtime as R
from data import to_model_space, to_uint8
from model import resolve_weights
from neighbours import quant


def save_png_dir(x, folder, start=0):
    """uint8 images (N, C, H, W) as folder/{start + i:06d}.png."""
    from PIL import Image
    for i, img in enumerate(x.permute(0, 2, 3, 1).numpy(), start):
        im = Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img)
        R.atomic_write(os.path.join(folder, f'{i:06d}.png'), lambda f: im.save(f, 'PNG'))


def main(argv=None):
    p = argparse.ArgumentParser(description='Sample from a checkpoint.')
    p.add_argument('--ckpt', required=True, help='run folder, ckpt.pt, diffusers DDPM folder, or hub model id (google/ddpm-cifar10-32)')
    p.add_argument('--n', '--num-samples', dest='n', type=int, default=64,
                   help='number of samples (--num-samples under torchrun, whose parser takes --n)')
    p.add_argument('--sample-batch', type=int, default=256, help='chains run side by side')
    p.add_argument('--seed', type=int, default=0, help='sample i is drawn from seed (seed, i) alone')
    p.add_argument('--no-ema', action='store_true', help='use the raw weights, not the EMA')
    p.add_argument('--grid', help='PNG grid (images) or scatter plot (vector data)')
    p.add_argument('--npz', help='.npz with all samples')
    p.add_argument('--png-dir', help='folder for one PNG per image')
    p.add_argument('--device', default='auto')
    R.add_sampling_args(p)
    a = p.parse_args(argv)
    if not (a.grid or a.npz or a.png_dir):
        R.fail('say where to write: --grid PNG, --npz FILE and/or --png-dir DIR')
    if a.n < 1 or a.sample_batch < 1:
        R.fail('--n and --sample-batch must be >= 1')
    for path in filter(None, (a.grid, a.npz)):
        R.check_writable(path)
    if a.png_dir:
        R.check_writable(os.path.join(a.png_dir, 'x.png'))
    device, rank, world = R.setup_device(a.device)
    a.ckpt = resolve_weights(a.ckpt)   # a hub id -> its cached folder (the calibration is stored beside it)
    model, diff, cfg = R.load_checkpoint(a.ckpt, device, ema=not a.no_ema, dtype=R.sampling_dtype(a, a.quant != 'none'), compile=a.compile)
    shape = tuple(cfg['data_shape'])
    if a.png_dir and len(shape) != 3:
        R.fail(f"--png-dir needs images; {a.ckpt} models {cfg['dataset']} vectors: use --npz or --grid")
    chain = R.chain_kwargs(a, diff)
    model = quant.for_sampling(model, diff, shape, a.ckpt, a.quant, a.quant_compensate,
                               a.calib_traj, a.recalibrate, device, **chain)   # --quant w8a8 | w4a8
    lo, hi = R.shard(a.n, rank, world)   # rank r draws samples [lo, hi), each from its own seed
    x = R.generate(model, diff, hi - lo, shape, a.sample_batch, a.seed, device, progress=rank == 0,
                   first=lo, **chain)   # sample i from seed (--seed, i): the same whatever the batch or ranks
    if x.dim() == 4:
        x = to_uint8(x)   # images travel and are stored as uint8
    if a.png_dir:
        save_png_dir(x, a.png_dir, start=lo)
    x = R.gather(x, world)
    if rank == 0:
        if a.npz:
            arr = x.permute(0, 2, 3, 1) if x.dim() == 4 else x.float()   # NHWC: the FID layout
            R.save_npz(a.npz, samples=arr.numpy())
        if a.grid:
            R.save_preview(to_model_space(x[:256]), x[:0], a.grid)
        steps = a.steps or diff.T
        print(f'wrote {len(x)} samples of shape {tuple(x.shape[1:])} ({a.sampler}, {steps} steps, {a.spacing} grid, '
              f'EMA={not a.no_ema}) to ' + ', '.join(filter(None, [a.grid, a.npz, a.png_dir])))
    R.teardown(end_process=True)


if __name__ == '__main__':
    try:
        main()
    except (FileNotFoundError, ValueError) as e:   # bad input: one clear line, no traceback
        raise SystemExit(f'error: {e}') from None
