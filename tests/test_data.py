import os
import pickle

import numpy as np
import pytest
import torch

import data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_ROOT = os.environ.get('DATA_ROOT', os.path.join(REPO, '..', 'shared', 'data'))
CIFAR = os.path.join(DATA_ROOT, 'cifar-10-batches-py')
need_cifar = pytest.mark.skipif(not os.path.isfile(os.path.join(CIFAR, 'data_batch_1')),
                                reason=f"CIFAR-10 pickles not found in {CIFAR} (set DATA_ROOT)")
need_mnist = pytest.mark.skipif(data._mnist_file(DATA_ROOT) is None,
                                reason=f"MNIST idx files not found under {DATA_ROOT} (set DATA_ROOT)")


@need_cifar
def test_cifar10_real_copy():
    x = data.load_data('cifar10', DATA_ROOT, download=False)
    assert x.shape == (50000, 3, 32, 32) and x.dtype == torch.uint8
    with open(os.path.join(CIFAR, 'data_batch_1'), 'rb') as f:
        row = pickle.load(f, encoding='bytes')[b'data'][0]
    assert torch.equal(x[0], torch.from_numpy(row.reshape(3, 32, 32)))   # CHW planar
    x2 = data.load_data('cifar10', CIFAR, download=False)               # the folder itself
    assert torch.equal(x[:100], x2[:100])
    assert data.data_shape(x) == (3, 32, 32)


@need_cifar
def test_cifar10_resize():
    x = data._resize(data.load_data('cifar10', DATA_ROOT, download=False)[:8], 16)
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.uint8


@need_mnist
def test_mnist_real_copy():
    x = data.load_data('mnist', DATA_ROOT, download=False)
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.uint8
    assert abs(x.float().mean().item() - 33.3) < 0.2


@need_mnist
def test_mnist_labelled():
    x, y = data.load_mnist_labelled(DATA_ROOT, 'test', download=False)
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert y[:5].tolist() == [7, 2, 1, 0, 4] and torch.bincount(y).min() > 800   # t10k's first labels
    x14, y14 = data.load_mnist_labelled(DATA_ROOT, 'test', image_size=14, download=False)
    assert x14.shape == (10000, 1, 14, 14) and torch.equal(y14, y)
    xt, yt = data.load_mnist_labelled(DATA_ROOT, 'train', download=False)
    assert torch.equal(xt, data.load_data('mnist', DATA_ROOT, download=False)) and len(yt) == 60000


def test_mnist_labelled_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        data.load_mnist_labelled(str(tmp_path), 'test', download=False)
    msg = str(e.value)
    assert 't10k-images-idx3-ubyte' in msg and str(tmp_path) in msg and '--data-dir' in msg and '\n' not in msg
    raw = tmp_path / 'MNIST' / 'raw'
    raw.mkdir(parents=True)
    (raw / 't10k-images-idx3-ubyte').write_bytes(b'\x00\x00\x08\x01' + b'\x00\x00\x00\x01' + b'\x07')
    with pytest.raises(ValueError, match='not an idx3 image file .magic 2049, expected 2051'):
        data.load_mnist_labelled(str(tmp_path), 'test', download=False)
    with pytest.raises(ValueError, match='split'):
        data.load_mnist_labelled(str(tmp_path), 'val')


@pytest.mark.parametrize('name,word', [('cifar10', 'cifar-10-batches-py'), ('mnist', 'train-images'),
                                       ('imagenet32', 'train_data_batch'), ('celeba64', 'img_align_celeba')])
def test_missing_data_error(tmp_path, name, word):
    with pytest.raises(FileNotFoundError) as e:
        data.load_data(name, str(tmp_path), download=False)
    msg = str(e.value)
    assert str(tmp_path) in msg and word in msg and '--data-dir' in msg and '\n' not in msg


def test_imagenet32_fake_files(tmp_path):
    d = tmp_path / 'Imagenet32_train'
    d.mkdir()
    rows = np.arange(4 * 3072).astype(np.uint8).reshape(4, 3072)
    with open(d / 'train_data_batch_1', 'wb') as f:
        pickle.dump({'data': rows, 'labels': [0] * 4}, f)
    np.savez(d / 'train_data_batch_2.npz', data=rows[:2])
    x = data.load_data('imagenet32', str(tmp_path))
    assert x.shape == (6, 3, 32, 32) and torch.equal(x[1], torch.from_numpy(rows[1].reshape(3, 32, 32)))


def test_unknown_name():
    with pytest.raises(ValueError, match='cifar10'):
        data.load_data('svhn')


def test_folder_loader(tmp_path):
    from PIL import Image
    (tmp_path / 'sub').mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(40, 30), (20, 50), (33, 33)]):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / ('sub' if i == 1 else '.') / f'im{i}.{["png", "jpg", "bmp"][i]}')
    (tmp_path / 'notes.txt').write_text('not an image')
    x = data.load_data('folder', str(tmp_path), image_size=16)
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.uint8
    with pytest.raises(ValueError, match='image-size'):
        data.load_data('folder', str(tmp_path))
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match='no images'):
        data.load_data('folder', str(empty), image_size=16)


@pytest.mark.parametrize('name', data.TOY)
def test_toy_sets(name):
    x = data.load_data(name, toy_n=2000, seed=3)
    d = 10 if name in ('gmm10d', 'gmm5x10') else 2
    assert x.shape == (2000, d) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert torch.equal(x, data.load_data(name, toy_n=2000, seed=3))
    assert not torch.equal(x, data.load_data(name, toy_n=2000, seed=4))
    assert data.data_shape(x) == (d,) and data.is_toy(name) and not data.uses_flips(name)
    assert 0.1 < x.pow(2).mean().item() < 10   # roughly unit scale


def test_toy_second_moments():
    for name in ('gmm10d', '8gaussians'):
        x = data.sample_toy(name, 200_000, torch.Generator().manual_seed(0))
        emp = x.pow(2).sum(1).mean().item() / x.shape[1]
        assert abs(emp / data.toy_second_moment(name) - 1) < 0.03
    assert torch.equal(data.gmm10d_means(), data.gmm10d_means()) and data.gmm10d_means().shape == (5, 10)
    x = data.sample_toy('checkerboard', 10000, torch.Generator().manual_seed(0))
    assert ((x >= -2) & (x <= 2)).all() and ((x.floor().sum(1) % 2) == 0).all()  # only "black" squares


def test_model_space_round_trip():
    u = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    f = data.to_model_space(u)
    assert f.dtype == torch.float32 and f.min() >= -1 and f.max() <= 1
    assert torch.equal(data.to_uint8(f), u)
    assert torch.equal(data.to_uint8(torch.tensor([-3.0, 3.0])), torch.tensor([0, 255], dtype=torch.uint8))
    t = torch.randn(5, 2, dtype=torch.float64)
    assert data.to_model_space(t).dtype == torch.float32 and torch.allclose(data.to_model_space(t).double(), t)
