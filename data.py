"""
Data sets, each held in memory as ONE tensor. Training draws batches by index
(trainstep.batch_indices); evaluation draws a seeded subset (random_examples).

Images: load_data returns uint8 (N, C, H, W); to_model_space maps to float32 in [-1, 1].
Toy sets: load_data returns float32 (N, D), drawn from sample_toy with a generator seeded by `seed`.
Toy definitions (the 2-D sets lie roughly within [-3, 3], as in common 2-D diffusion/flow demos):
  8gaussians   : equal mixture of 8 isotropic Gaussians, means at radius 2 on angles k*pi/4, std 0.1.
  swissroll    : t ~ U[1.5pi, 4.5pi], (t cos t, t sin t) + N(0, 0.5^2), divided by 7 (about unit std).
  moons        : two interleaved half circles (sklearn's make_moons layout) + N(0, 0.1^2),
                 centred at (0.5, 0.25) and scaled by 1.4 (about unit std).
  checkerboard : uniform on the 8 "black" unit squares of a 4x4 board covering [-2, 2]^2.
  gmm10d       : 10-D equal mixture of 5 Gaussians N(mu_k, I); means mu_k ~ N(0, 4 I) drawn ONCE with
                 torch.Generator seed 1234 (fixed, independent of `seed`). Used for the model-collapse
                 protocol because E||x||^2 = mean_k ||mu_k||^2 + D is known exactly.
  gmm5x10      : the seed-001 paper's synthetic geometry (arXiv 2602.16601): 10-D equal mixture of 5
                 isotropic Gaussians with std 0.6, one mean at the origin and four at (+-4, +-4, 0, ..., 0).
                 E||x||^2 / D = (4 * 32 / 5 + 10 * 0.36) / 10 = 2.92 exactly.
"""

import functools
import glob
import gzip
import math
import os
import pickle

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ('cifar10', 'mnist', 'celeba64', 'imagenet32', 'folder',
            '8gaussians', 'swissroll', 'moons', 'checkerboard', 'gmm10d', 'gmm5x10')
TOY = ('8gaussians', 'swissroll', 'moons', 'checkerboard', 'gmm10d', 'gmm5x10')
IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp')


def is_toy(name):
    return name in TOY


def uses_flips(name):
    """Random horizontal flips in training: DDPM used them on CIFAR-10 and CelebA; ImageNet-32 and
    image folders (natural images) get them too; digits and toy sets do not."""
    return name in ('cifar10', 'celeba64', 'imagenet32', 'folder')


def to_model_space(batch):
    """uint8 images -> float32 in [-1, 1]; float input (toy data) -> float32 unchanged."""
    if batch.dtype == torch.uint8:
        return batch.float() / 127.5 - 1.0
    return batch.float()


def to_uint8(x):
    """float images in [-1, 1] -> uint8 in [0, 255] (clamped, rounded)."""
    return ((x.float() + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8)


def data_shape(data):
    """Per-example shape: (C, H, W) for images, (D,) for toy data."""
    return tuple(data.shape[1:])


# ----------------------------------------------------------------------------- toy sets

@functools.lru_cache(maxsize=1)
def gmm10d_means():
    """(5, 10) fixed component means of gmm10d, mu_k ~ N(0, 4 I) with seed 1234."""
    return 2.0 * torch.randn(5, 10, generator=torch.Generator().manual_seed(1234))


GMM5X10_STD = 0.6


@functools.lru_cache(maxsize=1)
def gmm5x10_means():
    """(5, 10) component means of gmm5x10: the origin and (+-4, +-4, 0, ..., 0)."""
    m = torch.zeros(5, 10)
    m[1:, :2] = torch.tensor([[4.0, 4.0], [4.0, -4.0], [-4.0, 4.0], [-4.0, -4.0]])
    return m


def toy_components(name):
    """(means (K, D), per-coordinate std) of an isotropic Gaussian-mixture toy set, else None."""
    return {'gmm10d': lambda: (gmm10d_means(), 1.0),
            'gmm5x10': lambda: (gmm5x10_means(), GMM5X10_STD)}.get(name, lambda: None)()


def sample_toy(name, n, generator=None):
    """n fresh float32 draws (n, D) from the true toy distribution `name`."""
    g = generator
    if name == '8gaussians':
        k = torch.randint(8, (n,), generator=g).float() * (math.pi / 4)
        centers = 2.0 * torch.stack([k.cos(), k.sin()], 1)
        return centers + 0.1 * torch.randn(n, 2, generator=g)
    if name == 'swissroll':
        t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g))
        x = torch.stack([t * t.cos(), t * t.sin()], 1) + 0.5 * torch.randn(n, 2, generator=g)
        return x / 7.0
    if name == 'moons':
        th = math.pi * torch.rand(n, generator=g)
        lower = torch.randint(2, (n,), generator=g).bool()[:, None]
        upper_arc = torch.stack([th.cos(), th.sin()], 1)
        lower_arc = torch.stack([1 - th.cos(), 0.5 - th.sin()], 1)
        x = torch.where(lower, lower_arc, upper_arc) + 0.1 * torch.randn(n, 2, generator=g)
        return (x - torch.tensor([0.5, 0.25])) * 1.4
    if name == 'checkerboard':
        x1 = 4 * torch.rand(n, generator=g) - 2                      # column in [-2, 2)
        x2 = torch.rand(n, generator=g) - 2 * torch.randint(2, (n,), generator=g).float()  # [-2,-1) or [0,1)
        x2 = x2 + (torch.floor(x1) % 2)                              # shift odd columns up one square
        return torch.stack([x1, x2], 1)
    if name == 'gmm10d':
        k = torch.randint(5, (n,), generator=g)
        return gmm10d_means()[k] + torch.randn(n, 10, generator=g)
    if name == 'gmm5x10':
        k = torch.randint(5, (n,), generator=g)
        return gmm5x10_means()[k] + GMM5X10_STD * torch.randn(n, 10, generator=g)
    raise ValueError(f"unknown toy data set {name!r}; toy sets are {TOY}")


@functools.lru_cache(maxsize=None)
def toy_second_moment(name):
    """E||x||^2 / D of the true distribution: analytic for gmm10d, gmm5x10 and 8gaussians, else
    Monte Carlo (1e6 samples, fixed seed)."""
    if toy_components(name) is not None:
        mu, std = toy_components(name)
        return float((mu.pow(2).sum(1).mean() + mu.shape[1] * std ** 2) / mu.shape[1])
    if name == '8gaussians':
        return (2.0 ** 2 + 2 * 0.1 ** 2) / 2
    x = sample_toy(name, 1_000_000, torch.Generator().manual_seed(12345))
    return float(x.pow(2).sum(1).mean() / x.shape[1])


# ----------------------------------------------------------------------------- image helpers

def _resize(x, size):
    """uint8 (N, C, H, W) -> uint8 (N, C, size, size), antialiased bilinear; no-op at native size."""
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    out = [F.interpolate(c.float(), size=(size, size), mode='bilinear', antialias=True, align_corners=False)
           .round().clamp(0, 255).to(torch.uint8) for c in x.split(4096)]
    return torch.cat(out)


def _load_square(path, size, crop=None):
    """One image file -> uint8 HWC numpy (size, size, 3): centre crop (`crop` or the short side), resize."""
    from PIL import Image, UnidentifiedImageError
    try:
        im = Image.open(path)
        im = im.convert('RGB')
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise ValueError(f'{path} is not a readable image ({type(e).__name__}): remove it from the '
                         f'data folder') from None
    with im:
        w, h = im.size
        c = crop or min(w, h)
        left, top = (w - c) // 2, (h - c) // 2
        im = im.crop((left, top, left + c, top + c)).resize((size, size), Image.BICUBIC)
        return np.asarray(im, dtype=np.uint8)


def _stack_hwc(arrays):
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _planar(rows):
    """uint8 (N, 3072) CHW-planar rows -> uint8 tensor (N, 3, 32, 32)."""
    return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.uint8).reshape(-1, 3, 32, 32))


# ----------------------------------------------------------------------------- image data sets

def _cifar_dir(data_dir):
    for d in (data_dir, os.path.join(data_dir, 'cifar-10-batches-py')):
        if os.path.isfile(os.path.join(d, 'data_batch_1')):
            return d
    return None


def _find(find, data_dir, download, torchvision_set, name, what):
    """find(data_dir), after a torchvision download into data_dir if allowed and needed (only to
    fetch and extract: we read the files ourselves); a one-line error saying what to put where."""
    found = find(data_dir)
    if found is None and download:
        try:
            import torchvision
            getattr(torchvision.datasets, torchvision_set)(root=data_dir, train=True, download=True)
        except Exception:
            pass
        found = find(data_dir)
    if found is None:
        how = " and could not be downloaded (offline?)" if download else " (download disabled)"
        raise FileNotFoundError(f"{name} not found under {data_dir}{how}: {what} or pass --data-dir DIR")
    return found


def _load_cifar10(data_dir, download):
    d = _find(_cifar_dir, data_dir, download, 'CIFAR10', 'CIFAR-10', 'put the cifar-10-batches-py folder there')
    # a folder may hold only some of the five batches (a subset carried to a GPU machine):
    # read those present, in order; data_batch_1 is always there (_cifar_dir requires it)
    names = [f'data_batch_{i}' for i in range(1, 6) if os.path.isfile(os.path.join(d, f'data_batch_{i}'))]
    rows = []
    for name in names:
        with open(os.path.join(d, name), 'rb') as f:
            rows.append(pickle.load(f, encoding='bytes')[b'data'])
    x = _planar(np.concatenate(rows))
    if len(names) < 5:
        print(f"CIFAR-10: read {len(x)} images from {len(names)} of 5 training batches "
              f"({', '.join(names)}) in {d}", flush=True)
    return x


def _mnist_file(data_dir, name='train-images-idx3-ubyte'):
    for d in (os.path.join(data_dir, 'MNIST', 'raw'), os.path.join(data_dir, 'raw'), data_dir):
        for file in (name + '.gz', name):
            if os.path.isfile(os.path.join(d, file)):
                return os.path.join(d, file)
    return None


def _read_idx(path, magic):
    """An idx file, gzipped or not -> uint8 array of the shape its header gives: magic 2051 (idx3,
    images (N, H, W)) or 2049 (idx1, labels (N,)); the low byte of the magic is the rank."""
    with (gzip.open if path.endswith('.gz') else open)(path, 'rb') as f:
        raw = f.read()
    got, ndim = int(np.frombuffer(raw[:4], dtype='>i4')[0]), magic & 0xff
    if got != magic:
        raise ValueError(f"{path} is not an idx{ndim} {'image' if ndim == 3 else 'label'} file "
                         f"(magic {got}, expected {magic})")
    shape = np.frombuffer(raw[4:4 + 4 * ndim], dtype='>i4')
    return np.frombuffer(raw[4 + 4 * ndim:], dtype=np.uint8).reshape(shape).copy()


def _mnist_idx(data_dir, download, name, magic):
    path = _find(functools.partial(_mnist_file, name=name), data_dir, download, 'MNIST', f'MNIST {name}',
                 f"put {name}(.gz) in {os.path.join(data_dir, 'MNIST', 'raw')}")
    return _read_idx(path, magic)


def _load_mnist(data_dir, download):
    return torch.from_numpy(_mnist_idx(data_dir, download, 'train-images-idx3-ubyte', 2051)[:, None])


def load_mnist_labelled(data_dir, split='train', image_size=None, download=True):
    """(uint8 images (N, 1, H, W), int64 labels (N,)) of MNIST's 'train' (60,000) or 'test' (t10k,
    10,000) split, resized to image_size (None: native 28)."""
    if split not in ('train', 't10k', 'test'):
        raise ValueError(f"MNIST split {split!r}: use 'train' or 'test'")
    pre = 'train' if split == 'train' else 't10k'
    x = torch.from_numpy(_mnist_idx(data_dir, download, f'{pre}-images-idx3-ubyte', 2051)[:, None])
    y = torch.from_numpy(_mnist_idx(data_dir, download, f'{pre}-labels-idx1-ubyte', 2049)).long()
    if len(x) != len(y):
        raise ValueError(f'MNIST {split}: {len(x)} images but {len(y)} labels under {data_dir}')
    return _resize(x, image_size), y


def _load_imagenet32(data_dir):
    for d in (data_dir, os.path.join(data_dir, 'Imagenet32_train')):
        paths = [p for i in range(1, 11) for p in (os.path.join(d, f'train_data_batch_{i}'),
                                                   os.path.join(d, f'train_data_batch_{i}.npz'))
                 if os.path.isfile(p)]
        if paths:
            break
    else:
        raise FileNotFoundError(f"ImageNet 32x32 not found under {data_dir} (no automatic download: registration "
                                f"needed): get Imagenet32_train from image-net.org, put train_data_batch_1..10 there "
                                f"or pass --data-dir DIR")
    rows = []
    for p in paths:
        if p.endswith('.npz'):
            rows.append(np.load(p)['data'])
        else:
            with open(p, 'rb') as f:
                dct = pickle.load(f, encoding='latin1')
            rows.append(dct['data'] if 'data' in dct else dct[b'data'])
    return _planar(np.concatenate(rows))


def _load_celeba64(data_dir):
    """CelebA aligned 178x218 -> centre crop 140x140 -> 64x64 (as in DDIM and common practice).
    Uses the official train split (list_eval_partition.txt) when present, else every image."""
    cache = os.path.join(data_dir, 'celeba64_train.npy')
    if os.path.isfile(cache):
        return torch.from_numpy(np.load(cache))
    for root in (data_dir, os.path.join(data_dir, 'celeba')):
        img_dir = os.path.join(root, 'img_align_celeba')
        files = sorted(glob.glob(os.path.join(img_dir, '*.jpg')))
        if files:
            break
    else:
        raise FileNotFoundError(f"CelebA not found under {data_dir} (no automatic download: Google Drive): put "
                                f"img_align_celeba/*.jpg there or pass --data-dir DIR")
    split = os.path.join(root, 'list_eval_partition.txt')
    if os.path.isfile(split):
        with open(split) as f:
            train = {ln.split()[0] for ln in f if ln.split() and ln.split()[1] == '0'}
        files = [p for p in files if os.path.basename(p) in train]
    x = _stack_hwc([_load_square(p, 64, crop=140) for p in files]).numpy()
    try:
        np.save(cache, x)
    except OSError:
        pass  # read-only data dir: just decode again next time
    return torch.from_numpy(x)


def _load_folder(data_dir, image_size):
    if image_size is None:
        raise ValueError("data set 'folder' needs an image size: pass --image-size N")
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"image folder {data_dir} does not exist: pass --data-dir DIR")
    files = sorted(p for p in glob.glob(os.path.join(data_dir, '**', '*'), recursive=True)
                   if p.lower().endswith(IMAGE_EXTS))
    if not files:
        raise FileNotFoundError(f"no images ({'/'.join(e[1:] for e in IMAGE_EXTS)}) found under {data_dir}: "
                                f"pass --data-dir DIR pointing at a folder of images")
    return _stack_hwc([_load_square(p, image_size) for p in files])


def random_examples(n, pick_seed, name, data_dir='data', image_size=None, toy_n=50000, seed=0):
    """n examples of the training set (a seeded choice without replacement) in model space: the x_0
    of q(x_t) for D_MMD(t), and real data for the other measurements. Toy sets too use their
    training set, since the model is compared with what it was trained on."""
    x = load_data(name, data_dir, image_size, toy_n, seed)
    if n > len(x):
        raise ValueError(f'{n} examples asked of the {len(x)} of {name}: ask for fewer')
    return to_model_space(x[torch.randperm(len(x), generator=torch.Generator().manual_seed(pick_seed))[:n]])


def load_data(name, data_dir='data', image_size=None, toy_n=50000, seed=0, download=True):
    """The whole training set as one tensor: images uint8 (N, C, H, W), toy sets float32 (N, D)."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if is_toy(name):
        return sample_toy(name, toy_n, torch.Generator().manual_seed(seed))
    if name == 'folder':
        return _load_folder(data_dir, image_size)
    if name == 'cifar10':
        x = _load_cifar10(data_dir, download)
    elif name == 'mnist':
        x = _load_mnist(data_dir, download)
    elif name == 'imagenet32':
        x = _load_imagenet32(data_dir)
    else:
        x = _load_celeba64(data_dir)
    return _resize(x, image_size)
