"""FID machinery (used by `evaluate.py fid`): pytorch-fid's InceptionV3 built without a download,
features, their statistics and the Frechet distance, and the cached reference statistics of a
training set. Nothing here downloads: without the weights file it stops with a one-line error.
For MNIST, a sharper alternative: the Frechet distance and KID in the 128-d features of a small
CNN classifier that the project trains itself (seeded, cached beside the data).
"""
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_fid import inception as I
from pytorch_fid.fid_score import calculate_frechet_distance

import data as D
import runtime as R

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
        x = []
        for f in files:
            try:
                x.append(np.asarray(Image.open(os.path.join(path, f))))
            except OSError as e:   # PIL's UnidentifiedImageError and truncated files are OSErrors
                raise ValueError(f'{os.path.join(path, f)} is not a readable image ({type(e).__name__}): '
                                 f'remove it from the samples folder') from None
        if len({a.shape for a in x}) > 1:
            raise ValueError(f'{path}: the PNGs differ in size ({sorted({a.shape for a in x})[:3]}): '
                             f'FID needs samples of one size')
        x = np.stack(x)
    elif os.path.isfile(path):
        z = R.read_npz(path)
        if 'samples' not in z and 'arr_0' not in z:
            raise ValueError(f"{path} has neither 'samples' nor 'arr_0' (it has {sorted(z)})")
        x = z['samples' if 'samples' in z else 'arr_0']
    else:
        raise FileNotFoundError(f'--samples {path} does not exist: pass a PNG folder or an .npz')
    if x.dtype != np.uint8 or x.ndim not in (3, 4):
        raise ValueError(f'{path}: FID needs uint8 images (N, H, W[, C]), got {x.dtype} {x.shape}')
    x = torch.from_numpy(x[..., None] if x.ndim == 3 else x)
    return x.permute(0, 3, 1, 2).contiguous()


def writable_folder(d):
    """A folder this process may add files to. Its mode bits count too: root passes os.access on a
    read-only (r-x) data folder, which must stay as it was given (as ../shared/data here)."""
    return os.path.isdir(d) and os.access(d, os.W_OK) and bool(os.stat(d).st_mode & 0o222)


def ref_stats_path(dataset, data_dir, image_size, dims=2048, random_inception=False):
    name = f"fid_stats_{dataset}_{image_size or NATIVE_SIZE.get(dataset, 'native')}"
    name += (f'_dims{dims}' if dims != 2048 else '') + ('_random-inception' if random_inception else '')
    name += '.npz'
    path = os.path.join(data_dir, name)
    ok = os.path.isfile(path) or writable_folder(data_dir)
    return path if ok else name


def ref_stats(path, inc, net_tag, dataset, data_dir, image_size, batch_size, device, rank=0, world=1):
    """(mu, sigma) of the whole training set: read from the cache `path`, or computed (sharded
    over ranks) and cached there by rank 0."""
    if os.path.isfile(path):
        z = R.read_npz(path, need=['mu', 'sigma'])
        if 'net' in z and str(z['net']) != net_tag:
            R.fail(f"{path} was computed with {z['net']}, not {net_tag}: delete it or pass another --ref-stats")
        return z['mu'], z['sigma']
    if dataset is None:
        R.fail(f'no reference statistics at {path}: pass --dataset (one of {", ".join(IMAGE_SETS)}) '
               f'and --data-dir, or --ref-stats FILE')
    x = D.load_data(dataset, data_dir, image_size)
    lo, hi = R.shard(len(x), rank, world)
    if rank == 0:
        print(f'reference statistics: {len(x)} {dataset} training images -> {path}')
    mu, sigma = feature_stats(R.gather(inception_features(inc, x[lo:hi], batch_size, device), world))
    if rank == 0:
        R.save_npz(path, mu=mu, sigma=sigma, n=len(x), net=np.array(net_tag))
    return mu, sigma


# ---- MNIST classifier features: a sharper metric than Inception's on digits -------------------
class MNISTNet(nn.Module):
    """conv 32 - pool - conv 64 - pool - fc 128 - ReLU - fc 10 on (N, 1, S, S) in model space
    [-1, 1]; forward -> logits (N, 10), features -> the penultimate layer's 128 pre-activations
    (N, 128): after the ReLU about a third of the units are dead on every digit: a singular covariance."""

    def __init__(self, image_size=28):
        super().__init__()
        self.image_size = image_size
        side = image_size // 4                   # two 2x2 pools (floored: 14 -> 7 -> 3)
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * side * side, 128))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(128, 10))

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


def classifier_path(data_dir, image_size, seed=0):
    """<data_dir>/mnist_classifier_<size>_s<seed>.pt, or ./ if data_dir is read-only (as ref_stats_path)."""
    name = f'mnist_classifier_{image_size or 28}_s{seed}.pt'
    path = os.path.join(data_dir, name)
    ok = os.path.isfile(path) or writable_folder(data_dir)
    return path if ok else name


@torch.no_grad()
def _accuracy(net, x, y, batch_size=1000, device='cpu'):
    hits = sum((net(D.to_model_space(xb).to(device)).argmax(1).cpu() == yb).sum().item()
               for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    return hits / len(y)


def mnist_classifier(data_dir, image_size, device='cpu', seed=0, epochs=2, path=None, n_train=None,
                     batch_size=128, download=True):
    """(MNISTNet in eval mode, info dict: test_accuracy, epochs, seed, image_size, n_train), read
    from the cache `path` (default classifier_path) or trained (Adam 1e-3, seeded init and shuffle,
    on the first n_train training digits, None: all 60,000), scored on t10k and cached there.
    Training repeats bit for bit at a given torch thread count (the thread count changes how float
    sums are split, so 1 and 2 threads give slightly different weights)."""
    size = image_size or 28
    path = path or classifier_path(data_dir, size, seed)
    if os.path.isfile(path):
        net = MNISTNet(size)
        try:
            ck = torch.load(path, map_location='cpu', weights_only=True)
            info = dict(ck['info'])
            if info['image_size'] == size:
                net.load_state_dict(ck['model'])
        except Exception as e:
            raise ValueError(f'{path} is not a readable MNIST classifier ({type(e).__name__}): '
                             f'delete it to train a new one') from None
        if info['image_size'] != size:
            raise ValueError(f"{path} holds a classifier of {info['image_size']}x{info['image_size']} "
                             f"digits, not {size}x{size}: pass another --classifier path or delete it")
        return net.to(device).eval(), info
    x, y = D.load_mnist_labelled(data_dir, 'train', size, download)
    x, y = x[:n_train], y[:n_train]
    with torch.random.fork_rng(devices=[]):   # seeded init, the global stream untouched
        torch.manual_seed(R.seed_of(seed, 'mnist-classifier-init'))
        net = MNISTNet(size).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = R.rng(seed, 'mnist-classifier-shuffle')
    t0 = time.time()
    with torch.enable_grad():   # callers may sit under no_grad (sweep.evaluate_steps does)
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=g).split(batch_size):
                loss = F.cross_entropy(net(D.to_model_space(x[idx]).to(device)), y[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    net.eval()
    xt, yt = D.load_mnist_labelled(data_dir, 'test', size, download)
    info = dict(test_accuracy=_accuracy(net, xt, yt, device=device), epochs=epochs, seed=seed,
                image_size=size, n_train=len(x), train_seconds=round(time.time() - t0, 1))
    print(f"MNIST classifier {size}x{size} (seed {seed}, {epochs} epochs on {len(x)} digits, "
          f"{info['train_seconds']:.0f} s): test accuracy {info['test_accuracy']:.2%} -> {path}", flush=True)
    R.save_checkpoint(path, model={k: v.cpu() for k, v in net.state_dict().items()}, info=info)
    return net, info


@torch.no_grad()
def classifier_features(net, images, batch_size=500, device='cpu'):
    """uint8 images (N, 1, S, S), S = net.image_size (tensor or array) -> float32 array (N, 128)."""
    images = torch.as_tensor(images)
    s = net.image_size
    if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != (1, s, s):
        raise ValueError(f'the MNIST classifier needs uint8 images (N, 1, {s}, {s}), got {images.dtype} '
                         f'{tuple(images.shape)}')
    out = [net.features(D.to_model_space(x).to(device)).cpu().numpy() for x in images.split(batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 128), np.float32)


def kid(f1, f2, subsets=10, subset_size=1000, seed=0):
    """Kernel Inception Distance (Binkowski et al. 2018) of features (N1, d) and (N2, d): the
    unbiased MMD^2 under k(x, y) = (x.y / d + 1)^3, over `subsets` seeded random subsets (without
    replacement) of m = min(subset_size, N1, N2) rows each; (mean, std over subsets), in float64."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    m, d = min(subset_size, len(f1), len(f2)), f1.shape[1]
    if m < 2:
        raise ValueError(f'KID needs at least 2 feature rows on each side, got {len(f1)} and {len(f2)}')
    g = np.random.default_rng(R.seed_of(seed, 'kid'))
    off = lambda k: (k.sum() - np.trace(k)) / (m * (m - 1))   # the diagonal left out: unbiased
    vals = []
    for _ in range(subsets):
        x, y = f1[g.choice(len(f1), m, replace=False)], f2[g.choice(len(f2), m, replace=False)]
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        vals.append(off(kxx) + off(kyy) - 2 * kxy.mean())
    return float(np.mean(vals)), float(np.std(vals))


def feature_scores(f, ref, seed=0):
    """dict(fd: Frechet distance, kid, kid_std) of sample features f against reference features."""
    k, k_std = kid(f, ref, seed=seed)
    return dict(fd=fid_from_features(f, ref), kid=k, kid_std=k_std)


def classifier_scores(net, samples, ref_features, batch_size=500, device='cpu', seed=0):
    """feature_scores of samples (uint8 (N, 1, S, S), or floats in model space [-1, 1], which are
    rounded to uint8 as saved samples are) in the classifier's features against ref_features."""
    samples = torch.as_tensor(samples)
    x = samples if samples.dtype == torch.uint8 else D.to_uint8(samples)
    return feature_scores(classifier_features(net, x, batch_size, device), ref_features, seed)
