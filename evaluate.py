"""Evaluate trained checkpoints: the error-propagation curve D_MMD(t) and FID.

    python evaluate.py errprop --ckpt out/cifar10 out/cifar10-reg        # Fig. 1 vs Fig. 3
    python evaluate.py fid --ckpt out/cifar10 --n 50000                  # EMA weights, 1000 steps
    torchrun --nproc_per_node=8 evaluate.py fid --ckpt out/cifar10 --num-samples 50000
    python evaluate.py fid --samples samples.npz --dataset cifar10 --data-dir data
    python evaluate.py quanterr --ckpt out/8gaussians --quant w8a8 w4a8     # quantised sampling

errprop runs the ancestral chain (Eq. 16) from N noise samples and compares, at every measured t,
the backward samples with M forward samples x_t of real training data (Sec. 4.2, Eq. 8-10).
fid uses pytorch-fid's Inception (2048-d pool3 features) against statistics of the training set,
computed once and cached as .npz. Every output file is written to a temporary name and renamed.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from pytorch_fid import inception as I
from pytorch_fid.fid_score import calculate_frechet_distance

import data as D
import quant
from mmd import KERNELS, errprop_curve
from sample import atomic_save_npz, generate
from train import load_checkpoint

ESTIMATOR_NAMES = {'u': 'unbiased U-statistic', 'v': 'V-statistic, Eq. 10'}


def pick_device(device):
    if device == 'auto':
        return f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else 'cpu'
    return device


def write_json(path, obj):
    with open(path + '.tmp', 'w') as f:
        json.dump(obj, f, indent=1)
    os.replace(path + '.tmp', path)


# ---- errprop: D_MMD(t) along the sampling chain (Sec. 4.2, Eq. 8-10, Fig. 1 / Fig. 3) ----------

def real_examples(cfg, m, seed, data_dir=None):
    """M training examples (a seeded choice) in model space: the x_0 of q(x_t). Toy sets too use
    their training set, since the model is compared with what it was trained on."""
    x = D.load_data(cfg['dataset'], data_dir or cfg['data_dir'], cfg['image_size'], cfg['toy_n'],
                    cfg['seed'])
    if m > len(x):
        raise SystemExit(f"error: --m {m} exceeds the {len(x)} examples of {cfg['dataset']}; lower --m")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:m]
    return D.to_model_space(x[idx])


def run_label(path):
    path = os.path.normpath(path)
    return os.path.basename(path if os.path.isdir(path) else os.path.dirname(path) or path)


def plot_errprop(runs, kernels, estimator, path):
    """One panel per kernel, one line per checkpoint; t runs from T (left) to 0 (right)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(kernels), figsize=(4.5 * len(kernels), 3.6), squeeze=False)
    for ax, k in zip(axes[0], kernels):
        for r in runs:
            ax.plot(r['t'], r[k], label=r['label'])
        ax.invert_xaxis()
        ax.axhline(0, color='grey', lw=0.5)
        ax.set(xlabel='t (sampling goes T -> 0)', ylabel=f'D_MMD(t) ({ESTIMATOR_NAMES[estimator]})',
               title=f'{k} kernel')
        ax.legend()
    fig.tight_layout()
    fig.savefig(path + '.tmp', format='png', dpi=100)
    plt.close(fig)
    os.replace(path + '.tmp', path)


def run_errprop(a):
    device = pick_device(a.device)
    labels = a.labels or [run_label(c) for c in a.ckpt]
    if len(labels) != len(a.ckpt):
        raise SystemExit(f'error: {len(labels)} --labels for {len(a.ckpt)} --ckpt: give one per checkpoint')
    if a.t_stride < 1 or a.n < 2 or a.m < 2:
        raise SystemExit('error: need --t-stride >= 1 and --n, --m >= 2')
    from tqdm import tqdm
    runs = []
    for ckpt, label in zip(a.ckpt, labels):
        model, diff, cfg = load_checkpoint(ckpt, device, ema=True)
        model = quant.apply_quant(model, diff, tuple(cfg['data_shape']), ckpt, a, device)
        x0 = real_examples(cfg, a.m, a.seed, a.data_dir)
        n_t = sum(1 for t in range(diff.T + 1) if t % a.t_stride == 0 or t == diff.T)  # T and 0 always
        with tqdm(total=n_t, desc=label, unit='t') as bar:
            curve = errprop_curve(model, diff, x0, a.n, a.kernels, a.estimator, a.t_stride,
                                  torch.Generator(device).manual_seed(a.seed), a.batch_size,
                                  lambda t: bar.update(1), device)
        runs.append(dict(ckpt=ckpt, label=label, dataset=cfg['dataset'], T=diff.T, **curve))
    settings = dict(vars(a), estimator_name=ESTIMATOR_NAMES[a.estimator],
                    value='sign(MMD^2) * sqrt(|MMD^2|), MMD^2 estimated with the estimator above')
    settings.pop('run', None)
    json_path, png_path = a.out + '.json', a.out + '.png'
    write_json(json_path, dict(settings=settings, runs=runs))
    plot_errprop(runs, a.kernels, a.estimator, png_path)
    at0 = '; '.join(r['label'] + ': ' + ', '.join(f'{k} {r[k][-1]:.4g}' for k in a.kernels) for r in runs)
    print(f'D_MMD(t=0) [{ESTIMATOR_NAMES[a.estimator]}] {at0} | wrote {json_path}, {png_path}')


# ---- fid: pytorch-fid's Inception, built without a download ------------------------------------

FID_WEIGHTS = os.path.basename(I.FID_WEIGHTS_URL)   # pt_inception-2015-12-05-6726825d.pth
NATIVE_SIZE = dict(cifar10=32, mnist=28, imagenet32=32, celeba64=64)
IMAGE_SETS = [d for d in D.DATASETS if not D.is_toy(d)]


def fid_inception_net():
    """The FID variant of Inception v3 (TF's graph), as pytorch_fid.inception.fid_inception_v3
    assembles it, minus its load_state_dict_from_url: the caller loads the weights."""
    net = I._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = I.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = I.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = I.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = I.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = I.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = I.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = I.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = I.FIDInceptionE_1(1280)
    net.Mixed_7c = I.FIDInceptionE_2(2048)
    return net


class FIDInception(I.InceptionV3):
    """pytorch-fid's InceptionV3([BLOCK_INDEX_BY_DIM[dims]]) around a given network: same blocks
    (same state-dict keys), same forward (bilinear resize to 299, [0, 1] -> [-1, 1]); returns
    [features (B, dims, h, w)] (h = w = 1 for the 2048-d pool3 block that FID uses)."""

    def __init__(self, net, dims=2048):
        nn.Module.__init__(self)   # not InceptionV3.__init__, which would download the weights
        idx = self.BLOCK_INDEX_BY_DIM[dims]
        self.resize_input = self.normalize_input = True
        self.output_blocks, self.last_needed_block = [idx], idx
        self.dims, n = dims, net
        self.blocks = nn.ModuleList([
            nn.Sequential(n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, nn.MaxPool2d(3, 2)),
            nn.Sequential(n.Conv2d_3b_1x1, n.Conv2d_4a_3x3, nn.MaxPool2d(3, 2)),
            nn.Sequential(n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b, n.Mixed_6c,
                          n.Mixed_6d, n.Mixed_6e),
            nn.Sequential(n.Mixed_7a, n.Mixed_7b, n.Mixed_7c, nn.AdaptiveAvgPool2d((1, 1)))][:idx + 1])
        self.requires_grad_(False)


def inception_model(weights_path=None, random_init=False, device='cpu', seed=0, dims=2048):
    """The FID Inception in eval mode. Weights from weights_path, else from the torch hub cache
    (where pytorch-fid downloads them). random_init: the same architecture with seeded random
    (Kaiming) weights -- a pipeline check for tests and --random-inception, not a FID.
    dims: 2048 (pool3, the FID) or 64 / 192 / 768, earlier blocks as in pytorch-fid's --dims."""
    if random_init:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = fid_inception_net()
            for mod in net.modules():   # variance-preserving, so pool3 features stay O(1)
                if isinstance(mod, nn.Conv2d):
                    nn.init.kaiming_normal_(mod.weight, nonlinearity='relu')
    else:
        hub = os.path.join(torch.hub.get_dir(), 'checkpoints')
        path = weights_path or os.path.join(hub, FID_WEIGHTS)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'Inception weights {FID_WEIGHTS} not found at {path}: download '
                                    f'{I.FID_WEIGHTS_URL} and pass --inception-weights PATH '
                                    f'or put it in {hub}')
        net = fid_inception_net()
        try:
            net.load_state_dict(torch.load(path, map_location='cpu', weights_only=True))
        except Exception as e:
            raise ValueError(f'{path} is not pytorch-fid\'s {FID_WEIGHTS} ({type(e).__name__})') from None
    return FIDInception(net, dims).to(device).eval()


@torch.no_grad()
def inception_features(model, images, batch_size=200, device='cpu'):
    """uint8 images (N, C, H, W), C in {1, 3} (tensor or array) -> float32 array (N, dims)."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f'FID needs uint8 images (N, 1 or 3, H, W), got {images.dtype} '
                         f'{tuple(images.shape)}')
    out = []
    for x in images.split(batch_size):
        x = x.to(device).float() / 255           # pytorch-fid's input range [0, 1]
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        f = model(x)[0]
        out.append(F.adaptive_avg_pool2d(f, 1).flatten(1).cpu().numpy())   # as pytorch-fid does
    return np.concatenate(out) if out else np.zeros((0, getattr(model, 'dims', 2048)), np.float32)


def feature_stats(f):
    """(mu (d,), sigma (d, d)) of features (N, d), as pytorch-fid computes them."""
    return np.mean(f, axis=0), np.cov(f, rowvar=False)


def fid_from_stats(s1, s2):
    return float(calculate_frechet_distance(s1[0], s1[1], s2[0], s2[1]))


def fid_from_features(f1, f2):
    return fid_from_stats(feature_stats(f1), feature_stats(f2))


def load_samples(path):
    """A folder of PNGs or an .npz ('samples' as sample.py writes, or ADM's 'arr_0'), NHWC uint8
    -> uint8 tensor (N, C, H, W)."""
    if os.path.isdir(path):
        from PIL import Image
        files = sorted(f for f in os.listdir(path) if f.lower().endswith('.png'))
        if not files:
            raise FileNotFoundError(f'no .png files in {path}: pass a folder of PNGs or an .npz')
        x = np.stack([np.asarray(Image.open(os.path.join(path, f))) for f in files])
    elif os.path.isfile(path):
        z = np.load(path)
        key = 'samples' if 'samples' in z.files else 'arr_0'
        if key not in z.files:
            raise ValueError(f"{path} has neither 'samples' nor 'arr_0' (keys: {z.files})")
        x = z[key]
    else:
        raise FileNotFoundError(f'--samples {path} does not exist: pass a PNG folder or an .npz')
    if x.dtype != np.uint8 or x.ndim not in (3, 4):
        raise ValueError(f'{path}: FID needs uint8 images (N, H, W[, C]), got {x.dtype} {x.shape}')
    x = torch.from_numpy(x[..., None] if x.ndim == 3 else x)
    return x.permute(0, 3, 1, 2).contiguous()


def gather(f, world):
    """Concatenate every rank's features in rank order (the shards' order)."""
    if world == 1:
        return f
    parts = [None] * world
    dist.all_gather_object(parts, f)
    return np.concatenate(parts)


def shard(n, rank, world):
    per = -(-n // world)
    return min(n, rank * per), min(n, (rank + 1) * per)


def ref_stats_path(dataset, data_dir, image_size, dims=2048, random_inception=False):
    name = f"fid_stats_{dataset}_{image_size or NATIVE_SIZE.get(dataset, 'native')}"
    name += (f'_dims{dims}' if dims != 2048 else '') + ('_random-inception' if random_inception else '')
    name += '.npz'
    path = os.path.join(data_dir, name)
    ok = os.path.isfile(path) or (os.path.isdir(data_dir) and os.access(data_dir, os.W_OK))
    return path if ok else name


def ref_stats(path, inc, net_tag, dataset, data_dir, image_size, batch_size, device, rank=0, world=1):
    """(mu, sigma) of the whole training set: read from the cache `path`, or computed (sharded
    over ranks) and cached there by rank 0."""
    if os.path.isfile(path):
        z = np.load(path)
        if 'net' in z.files and str(z['net']) != net_tag:
            raise SystemExit(f"error: {path} was computed with {z['net']}, not {net_tag}: "
                             f'delete it or pass another --ref-stats')
        return z['mu'], z['sigma']
    if dataset is None:
        raise SystemExit(f'error: no reference statistics at {path}: pass --dataset (one of '
                         f'{", ".join(IMAGE_SETS)}) and --data-dir, or --ref-stats FILE')
    x = D.load_data(dataset, data_dir, image_size)
    lo, hi = shard(len(x), rank, world)
    if rank == 0:
        print(f'reference statistics: {len(x)} {dataset} training images -> {path}')
    mu, sigma = feature_stats(gather(inception_features(inc, x[lo:hi], batch_size, device), world))
    if rank == 0:
        atomic_save_npz(path, mu=mu, sigma=sigma, n=len(x), net=np.array(net_tag))
    return mu, sigma


def run_fid(a):
    if bool(a.ckpt) == bool(a.samples):
        raise SystemExit('error: pass exactly one of --ckpt RUN and --samples DIR_or_NPZ')
    if a.n is not None and a.n < 2:
        raise SystemExit('error: --n must be >= 2 (a covariance needs two samples)')
    ddp = int(os.environ.get('WORLD_SIZE', 1)) > 1
    rank, world = (int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])) if ddp else (0, 1)
    device = pick_device(a.device)
    if ddp:
        dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
    cfg = {}
    if a.ckpt:
        model, diff, cfg = load_checkpoint(a.ckpt, device, ema=True)
        if len(cfg['data_shape']) != 3:
            raise SystemExit(f"error: {a.ckpt} models {cfg['dataset']} vectors; FID needs images "
                             f'(use `evaluate.py errprop` for toy data)')
        model = quant.apply_quant(model, diff, tuple(cfg['data_shape']), a.ckpt, a, device)
    dataset = a.dataset or cfg.get('dataset')
    data_dir = a.data_dir or cfg.get('data_dir', 'data')
    image_size = a.image_size or cfg.get('image_size')
    net_tag = (f'random-init seed {a.seed}' if a.random_inception else FID_WEIGHTS) + f', dims {a.dims}'
    ref = a.ref_stats or ref_stats_path(dataset, data_dir, image_size, a.dims, a.random_inception)
    inc = inception_model(a.inception_weights, a.random_inception, device, a.seed, a.dims)
    ref_mu, ref_sigma = ref_stats(ref, inc, net_tag, dataset, data_dir, image_size, a.batch_size,
                                  device, rank, world)
    if a.ckpt:   # each rank draws its share with its own seed, as sample.py does
        n = a.n or 50000
        lo, hi = shard(n, rank, world)
        x = D.to_uint8(generate(model, diff, hi - lo, tuple(cfg['data_shape']), a.batch_size,
                                a.sampler, a.steps, a.seed * 1009 + rank, device, progress=rank == 0))
    else:
        x = load_samples(a.samples)
        n = min(a.n or len(x), len(x))
        lo, hi = shard(n, rank, world)
        x = x[lo:hi]
    f = gather(inception_features(inc, x, a.batch_size, device), world)
    if rank == 0:
        fid = fid_from_stats(feature_stats(f), (ref_mu, ref_sigma))
        sampler, steps = (a.sampler, a.steps if a.sampler == 'ddim' else diff.T) if a.ckpt else (None, None)
        warn = ' (random Inception: pipeline check only, not a FID)' if a.random_inception else ''
        write_json(a.out + '.json', dict(fid=fid, n=len(f), sampler=sampler, steps=steps, ckpt=a.ckpt,
                                         ema=bool(a.ckpt), samples=a.samples, seed=a.seed, dataset=dataset,
                                         ref_stats=ref, inception=net_tag + warn))
        print(f'FID {fid:.4f} (n={len(f)}, sampler={sampler}, steps={steps}, ckpt={a.ckpt}, '
              f'samples={a.samples}, ref={ref}){warn} -> {a.out}.json')
    if ddp:
        dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sub = p.add_subparsers(dest='cmd', required=True)

    e = sub.add_parser('errprop', help='D_MMD(t) along the sampling chain (Sec. 4.2, Fig. 1)')
    e.add_argument('--ckpt', nargs='+', required=True, help='run folders or ckpt.pt files (EMA weights)')
    e.add_argument('--labels', nargs='+', help='one per --ckpt (default: run folder names)')
    e.add_argument('--n', type=int, default=1000, help='backward samples N')
    e.add_argument('--m', type=int, default=1000, help='forward samples M of real data')
    e.add_argument('--t-stride', type=int, default=1, help='measure every k-th t (T and 0 always)')
    e.add_argument('--kernels', nargs='+', default=['gaussian', 'laplace', 'imq'], choices=KERNELS)
    e.add_argument('--estimator', choices=('u', 'v'), default='u',
                   help='u: unbiased U-statistic; v: V-statistic of Eq. (10), floor O(1/N)')
    e.add_argument('--seed', type=int, default=0)
    e.add_argument('--batch-size', type=int, default=None, help='network chunk size (memory)')
    e.add_argument('--data-dir', help="override the checkpoint's data dir")
    e.add_argument('--out', default='errprop', help='writes OUT.json and OUT.png')
    e.add_argument('--device', default='auto')
    e.set_defaults(run=run_errprop)

    f = sub.add_parser('fid', help='FID with pytorch-fid Inception against training-set statistics')
    f.add_argument('--ckpt', help='run folder / ckpt.pt: sample with its EMA weights')
    f.add_argument('--samples', help='folder of PNGs or .npz (samples or arr_0, NHWC uint8)')
    f.add_argument('--n', '--num-samples', dest='n', type=int,   # torchrun takes --n for its own --n*
                   help='samples (default: 50000 with --ckpt, all with --samples)')
    f.add_argument('--sampler', choices=('ddpm', 'ddim'), default='ddpm')
    f.add_argument('--steps', type=int, default=100, help='DDIM steps')
    f.add_argument('--batch-size', type=int, default=250, help='sampling and Inception batch')
    f.add_argument('--seed', type=int, default=0)
    f.add_argument('--dataset', choices=IMAGE_SETS, help="reference data set (default: the checkpoint's)")
    f.add_argument('--data-dir', help="reference data dir (default: the checkpoint's)")
    f.add_argument('--image-size', type=int, help='reference image size (default: native)')
    f.add_argument('--ref-stats', help='cached reference statistics .npz (default: <data-dir>/fid_stats_'
                                       '<dataset>_<size>.npz, or ./ if data-dir is read-only)')
    f.add_argument('--inception-weights', help=f'path to {FID_WEIGHTS} (default: torch hub cache)')
    f.add_argument('--dims', type=int, choices=(64, 192, 768, 2048), default=2048,
                   help="Inception block (pytorch-fid's --dims); FID is defined on 2048")
    f.add_argument('--random-inception', action='store_true',
                   help='random Inception weights: pipeline check only, not a FID')
    f.add_argument('--out', default='fid', help='writes OUT.json')
    f.add_argument('--device', default='auto')
    f.set_defaults(run=run_fid)

    # quanterr: per-step error of quantised sampling against full precision (seed 002), in quant.py
    q = sub.add_parser('quanterr', help='trajectory error of W8A8 / W4A8 sampling, with and '
                                        'without timestep-aware compensation')
    quant.add_quanterr_args(q)
    q.set_defaults(run=quant.main_quanterr)
    for sp in (e, f):   # errprop and fid can measure a quantised model too
        quant.add_quant_args(sp)
    a = p.parse_args(argv)
    a.run(a)


if __name__ == '__main__':
    try:
        main()
    except (FileNotFoundError, ValueError) as e:   # bad input: one clear line, no traceback
        sys.exit(f'error: {e}')
