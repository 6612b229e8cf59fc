"""evaluate.py: the D_MMD(t) curve on tiny toy checkpoints, and the FID pipeline with a randomly
initialised Inception (the real weights are a download; these tests check the plumbing, not FID
values). Kept small for a shared 2-core CPU: Inception at 299x299 costs about 0.1-0.5 s per image
there, and a 2048-d matrix square root tens of seconds, so FID numbers are checked on the 64-d
first block (pytorch-fid's --dims 64) and the 2048-d network only for equality with pytorch-fid's.
"""
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_fid import inception as I
from pytorch_fid.fid_score import calculate_frechet_distance

import data as D
import evaluate as ev
import sample
from metrics import fid as F
import runtime as R
import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_ROOT = os.environ.get('DATA_ROOT', os.path.join(REPO, '..', 'shared', 'data'))
CIFAR1 = os.path.join(DATA_ROOT, 'cifar-10-batches-py', 'data_batch_1')
need_mnist = pytest.mark.skipif(D._mnist_file(DATA_ROOT, 't10k-labels-idx1-ubyte') is None,
                                reason=f'MNIST idx files (train and t10k) not found under {DATA_ROOT} (set DATA_ROOT)')


@pytest.fixture(scope='module')
def toy_runs(tmp_path_factory):
    """Two 8gaussians runs with T = 100: 'good' (200 steps) and 'bad' (3 steps, noise-like output).
    beta_T = 0.2 so that abar_T ~ 5e-5: q(x_T) is N(0, I) as with the standard T = 1000."""
    root = tmp_path_factory.mktemp('toy')
    for name, steps in (('good', 200), ('bad', 3)):
        train.main(['--dataset', '8gaussians', '--max-steps', str(steps), '--T', '100', '--beta-T', '0.2',
                    '--toy-n', '2000', '--out-dir', str(root / name), '--log-every', '100',
                    '--n-preview', '100', '--device', 'cpu'])
    return str(root / 'good'), str(root / 'bad')


def test_errprop(toy_runs, tmp_path, capsys):
    good, bad = toy_runs
    args = ['errprop', '--ckpt', good, bad, '--n', '200', '--m', '200', '--t-stride', '30',
            '--seed', '3', '--device', 'cpu']
    ev.main(args + ['--out', str(tmp_path / 'a')])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith('D_MMD(t=0) [unbiased U-statistic] good: gaussian') and 'a.png' in line
    ev.main(args + ['--out', str(tmp_path / 'b')])
    res = json.load(open(tmp_path / 'a.json'))
    assert res == dict(json.load(open(tmp_path / 'b.json')), settings=res['settings'])  # same seed
    assert res['settings']['estimator'] == 'u' and 'unbiased' in res['settings']['estimator_name']
    assert [r['label'] for r in res['runs']] == ['good', 'bad']
    for r in res['runs']:
        assert r['t'] == [100, 90, 60, 30, 0] and r['T'] == 100
        for k in ('gaussian', 'laplace', 'imq'):
            assert len(r[k]) == 5 and all(np.isfinite(r[k]))
            assert abs(r[k][0]) < 0.1            # t = T: both sides N(0, I)
    g, b = res['runs']
    for k in ('gaussian', 'laplace', 'imq'):
        assert b[k][-1] > 0.3 and b[k][-1] > g[k][-1]   # 3 steps of training: far from the data
    png = tmp_path / 'a.png'
    assert png.stat().st_size > 1000 and Image.open(png).size[0] > 2 * Image.open(png).size[1]


def test_compiled_sampling_matches_eager(toy_runs, tmp_path):
    """--compile (torch.compile of the sampling network) draws the same samples as the eager network,
    to fp32 rounding, on the same seeds; with quantised sampling it is refused before anything runs."""
    good, _ = toy_runs
    base = ['--ckpt', good, '--n', '64', '--steps', '10', '--dtype', 'fp32', '--device', 'cpu']
    for c in ('eager', 'compiled'):
        sample.main(base + ['--npz', str(tmp_path / f'{c}.npz')] + (['--compile'] if c == 'compiled' else []))
    a, b = (np.load(tmp_path / f'{c}.npz')['samples'] for c in ('eager', 'compiled'))
    assert a.shape == (64, 2) and np.abs(a - b).max() < 1e-4
    with pytest.raises(SystemExit, match='--compile do not go with quantised'):
        sample.main(base + ['--npz', str(tmp_path / 'q.npz'), '--compile', '--quant', 'w8a8'])
    assert not (tmp_path / 'q.npz').exists()


def test_errprop_v_statistic_and_bad_input(toy_runs, tmp_path):
    good, _ = toy_runs
    ev.main(['errprop', '--ckpt', good, '--n', '50', '--m', '60', '--t-stride', '50', '--kernels',
             'imq', '--estimator', 'v', '--labels', 'x', '--out', str(tmp_path / 'v'), '--device', 'cpu'])
    r = json.load(open(tmp_path / 'v.json'))['runs'][0]
    assert r['t'] == [100, 50, 0] and r['label'] == 'x' and all(v > 0 for v in r['imq'])  # V >= 0
    with pytest.raises(SystemExit, match='--labels'):
        ev.main(['errprop', '--ckpt', good, '--labels', 'a', 'b'])
    with pytest.raises(SystemExit, match='--m'):
        ev.main(['errprop', '--ckpt', good, '--m', '5000', '--device', 'cpu'])
    with pytest.raises(SystemExit, match='FID needs images'):
        ev.main(['fid', '--ckpt', good, '--random-inception', '--device', 'cpu'])


# ---- FID -----------------------------------------------------------------------------------------

def real_images(n):
    """n CIFAR-10 training images (uint8 NCHW) if the copy is there, else smooth synthetic ones."""
    if os.path.isfile(CIFAR1):
        with open(CIFAR1, 'rb') as f:
            rows = pickle.load(f, encoding='bytes')[b'data'][:n]
        return torch.from_numpy(rows.reshape(n, 3, 32, 32).copy())
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=32, mode='bilinear')
    return (x * 255).round().to(torch.uint8)


def noise_images(n):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)


@pytest.fixture(scope='module')
def inc64():
    return F.inception_model(random_init=True, dims=64)


def test_fid_numbers(inc64):
    a, b = real_images(16), noise_images(16)
    fa, fb = F.inception_features(inc64, a, 8), F.inception_features(inc64, b, 8)
    assert fa.shape == (16, 64) and fa.dtype == np.float32 and fa.std() > 1e-3
    # reproducible, batch-size independent; grayscale is repeated to 3 channels
    assert np.allclose(F.inception_features(inc64, a[:3].numpy(), 2), fa[:3], rtol=1e-4, atol=1e-5)
    gray = a[:2, :1]
    assert np.allclose(F.inception_features(inc64, gray, 2),
                       F.inception_features(inc64, gray.expand(-1, 3, -1, -1), 2), atol=1e-6)
    self_fid, cross = F.fid_from_features(fa, fa), F.fid_from_features(fa, fb)
    trace = np.trace(np.cov(fa, rowvar=False))
    assert abs(self_fid) < 1e-3 * trace      # N = 16 < 64 dims: singular covariance, still ~0
    assert cross > 0.1 * trace and cross > 1000 * abs(self_fid)
    ref = calculate_frechet_distance(np.mean(fa, 0), np.cov(fa, rowvar=False),
                                     np.mean(fb, 0), np.cov(fb, rowvar=False))
    assert cross == pytest.approx(ref, rel=1e-9)
    with pytest.raises(ValueError, match='uint8'):
        F.inception_features(inc64, a.float(), 8)


def test_architecture_matches_pytorch_fid(tmp_path, monkeypatch):
    """Our download-free construction == pytorch-fid's InceptionV3([3]) loading the same file."""
    torch.manual_seed(0)
    path = str(tmp_path / F.FID_WEIGHTS)
    torch.save(F.fid_inception_net().state_dict(), path)
    ours = F.inception_model(weights_path=path)
    monkeypatch.setattr(I, 'load_state_dict_from_url', lambda *a, **k: torch.load(path, weights_only=True))
    theirs = I.InceptionV3([I.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = real_images(2)
    f = F.inception_features(ours, x, 2)
    with torch.no_grad():
        g = theirs(x.float() / 255)[0].flatten(1).numpy()
    assert f.shape == (2, 2048) and np.abs(f).max() > 0
    assert np.allclose(f, g, rtol=1e-5, atol=1e-6 * np.abs(g).max())


def test_missing_weights_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path))
    for kw in ({}, dict(weights_path=str(tmp_path / 'nope.pth'))):
        with pytest.raises(FileNotFoundError) as e:
            F.inception_model(**kw)
        msg = str(e.value)
        assert '\n' not in msg and 'pt_inception-2015-12-05-6726825d.pth' in msg
        assert I.FID_WEIGHTS_URL in msg and '--inception-weights' in msg


def test_load_samples(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / 'adm.npz', arr_0=x)                 # ADM's reference batches
    np.savez(tmp_path / 'gray.npz', samples=x[..., 0])      # NHW grayscale
    assert torch.equal(F.load_samples(str(tmp_path / 'adm.npz')), torch.from_numpy(x).permute(0, 3, 1, 2))
    assert F.load_samples(str(tmp_path / 'gray.npz')).shape == (3, 1, 8, 8)
    np.savez(tmp_path / 'vec.npz', samples=x.astype(np.float32))
    with pytest.raises(ValueError, match='uint8'):
        F.load_samples(str(tmp_path / 'vec.npz'))


def test_fid_cli_samples_and_cached_ref_stats(tmp_path, capsys):
    """Reference statistics from a folder data set are computed once, cached, then reused."""
    imgs, ref = tmp_path / 'imgs', str(tmp_path / 'ref.npz')
    os.makedirs(imgs)
    for i, im in enumerate(real_images(12).permute(0, 2, 3, 1).numpy()):
        Image.fromarray(im).save(imgs / f'{i:03d}.png')
    npz = str(tmp_path / 'samples.npz')
    np.savez(npz, samples=noise_images(12).permute(0, 2, 3, 1).numpy())
    common = ['fid', '--random-inception', '--dims', '64', '--sample-batch', '6', '--device', 'cpu',
              '--ref-stats', ref]
    # the reference set against itself (a PNG folder as --samples): FID ~ 0
    ev.main(common + ['--samples', str(imgs), '--dataset', 'folder', '--data-dir', str(imgs),
                      '--image-size', '32', '--out', str(tmp_path / 'same')])
    same = json.load(open(tmp_path / 'same.json'))
    z = np.load(ref)
    assert z['mu'].shape == (64,) and z['sigma'].shape == (64, 64) and int(z['n']) == 12
    assert same['n'] == 12 and same['ref_stats'] == ref and 'not a FID' in same['inception']
    assert abs(same['fid']) < 1e-3 * np.trace(z['sigma'])
    mtime = os.stat(ref).st_mtime_ns
    shutil.rmtree(imgs)   # from now on only the cache can provide the reference
    ev.main(common + ['--samples', npz, '--n', '10', '--out', str(tmp_path / 'noise')])
    out = capsys.readouterr().out.strip().splitlines()[-1]
    res = json.load(open(tmp_path / 'noise.json'))
    assert os.stat(ref).st_mtime_ns == mtime
    assert res['n'] == 10 and res['fid'] > 100 * abs(same['fid']) and res['samples'] == npz
    assert out.startswith(f"FID {res['fid']:.4f} (n=10,")
    with pytest.raises(SystemExit, match='computed with'):   # a cache from another network
        ev.main(common + ['--samples', npz, '--seed', '5'])
    with pytest.raises(SystemExit, match='pass --dataset'):   # no cache, nothing to compute it from
        ev.main(common[:-1] + [str(tmp_path / 'none.npz'), '--samples', npz])
    with pytest.raises(SystemExit, match='exactly one'):
        ev.main(['fid'])


# ---- MNIST classifier features: Frechet distance and KID -----------------------------------------

def slow_mmd2(x, y):
    """The unbiased MMD^2 under (x.y / d + 1)^3, term by term."""
    k = lambda a, b: (sum(float(ai) * float(bi) for ai, bi in zip(a, b)) / len(a) + 1) ** 3
    m = len(x)
    pairs = [(i, j) for i in range(m) for j in range(m) if i != j]
    return (sum(k(x[i], x[j]) + k(y[i], y[j]) for i, j in pairs) / len(pairs)
            - 2 * sum(k(a, b) for a in x for b in y) / m ** 2)


def test_kid_numbers():
    g = np.random.default_rng(0)
    x, y = g.normal(size=(5, 3)), g.normal(size=(5, 3)) + 0.5
    mean, std = F.kid(x, y, subsets=3, subset_size=100)   # m = 5: every subset is a whole set
    assert mean == pytest.approx(slow_mmd2(x, y), rel=1e-12) and std < 1e-12
    a, b = g.normal(size=(600, 16)).astype(np.float32), g.normal(size=(600, 16)).astype(np.float32)
    same, same_std = F.kid(a, b, subset_size=300)
    shifted, _ = F.kid(a, b + 0.5, subset_size=300)
    assert abs(same) < 0.01 and same_std < 0.01 and shifted > 0.1 > 10 * abs(same)
    assert F.kid(a, b, subset_size=300) == (same, same_std)            # seeded subsets
    assert F.kid(a, b, subset_size=300, seed=1) != (same, same_std)
    with pytest.raises(ValueError, match='at least 2'):
        F.kid(a[:1], b)


@pytest.fixture(scope='module')
def mnist_net(tmp_path_factory):
    """A 14x14 classifier trained on 6,000 real digits (2 epochs, ~3 s), cached in a tmp file."""
    path = str(tmp_path_factory.mktemp('cls') / 'c14.pt')
    net, info = F.mnist_classifier(DATA_ROOT, 14, n_train=6000, path=path, download=False)
    return net, info, path


@need_mnist
def test_mnist_classifier_trains_caches_and_reloads(mnist_net, tmp_path, capsys):
    net, info, path = mnist_net
    assert info['test_accuracy'] > 0.8                   # chance: 0.1
    assert (info['epochs'], info['seed'], info['image_size'], info['n_train']) == (2, 0, 14, 6000)
    mtime = os.stat(path).st_mtime_ns
    net2, info2 = F.mnist_classifier(DATA_ROOT, 14, path=path, epochs=5)   # the cache wins, as it is
    assert info2 == info and os.stat(path).st_mtime_ns == mtime and not net2.training
    assert all(torch.equal(p, q) for p, q in zip(net.state_dict().values(), net2.state_dict().values()))
    # training is seeded: the same settings give the same weights
    a, _ = F.mnist_classifier(DATA_ROOT, 14, epochs=1, n_train=500, path=str(tmp_path / 'a.pt'), download=False)
    b, _ = F.mnist_classifier(DATA_ROOT, 14, epochs=1, n_train=500, path=str(tmp_path / 'b.pt'), download=False)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert 'test accuracy' in capsys.readouterr().out
    with pytest.raises(ValueError, match='not 28x28'):
        F.mnist_classifier(DATA_ROOT, 28, path=path)
    (tmp_path / 'bad.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match='delete it'):
        F.mnist_classifier(DATA_ROOT, 14, path=str(tmp_path / 'bad.pt'))


@need_mnist
def test_classifier_features_and_scores(mnist_net):
    net, _, _ = mnist_net
    x, _ = D.load_mnist_labelled(DATA_ROOT, 'test', 14, download=False)
    f = F.classifier_features(net, x[:300], 128)
    assert f.shape == (300, 128) and f.dtype == np.float32 and (f.std(0) > 0).all()   # no dead dims
    assert np.allclose(F.classifier_features(net, x[:7].numpy(), 3), f[:7], atol=1e-5)
    with pytest.raises(ValueError, match=r'\(N, 1, 14, 14\)'):
        F.classifier_features(net, x[:2].float())
    ref, real = f[:200], x[200:300]
    sc = F.classifier_scores(net, real, ref)
    assert F.classifier_scores(net, D.to_model_space(real), ref) == sc     # model space = its uint8
    noise = torch.randint(0, 256, (100, 1, 14, 14), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    sn = F.classifier_scores(net, noise, ref)
    assert sn['fd'] > 10 * sc['fd'] > 0 and sn['kid'] > 10 * abs(sc['kid']) and set(sc) == {'fd', 'kid', 'kid_std'}


def write_idx(path, arr):
    """uint8 images (N, H, W) or labels (N,) as an (uncompressed) idx file."""
    head = np.array([0x800 + arr.ndim, *arr.shape], dtype='>i4').tobytes()
    path.write_bytes(head + np.ascontiguousarray(arr, np.uint8).tobytes())


@pytest.fixture(scope='module')
def mnist_small(tmp_path_factory):
    """A data dir with the first 3,000 MNIST training digits (a cheap reference set), and .npz
    samples: 200 real t10k digits and 200 noise images, 14x14."""
    root = tmp_path_factory.mktemp('mnist_small')
    raw = root / 'MNIST' / 'raw'
    raw.mkdir(parents=True)
    x, y = D.load_mnist_labelled(DATA_ROOT, 'train', download=False)
    write_idx(raw / 'train-images-idx3-ubyte', x[:3000, 0].numpy())
    write_idx(raw / 'train-labels-idx1-ubyte', y[:3000].numpy())
    real = D.load_mnist_labelled(DATA_ROOT, 'test', 14, download=False)[0][:200, 0].numpy()
    noise = np.random.default_rng(0).integers(0, 256, real.shape, dtype=np.uint8)
    np.savez(root / 'real.npz', samples=real)
    np.savez(root / 'noise.npz', samples=noise)
    return root


@need_mnist
def test_fid_cli_mnist_classifier(mnist_net, mnist_small, tmp_path, capsys):
    _, info, path = mnist_net
    common = ['fid', '--features', 'mnist-classifier', '--classifier', path, '--data-dir', str(mnist_small),
              '--device', 'cpu']
    res = {}
    for name in ('real', 'noise'):
        ev.main(common + ['--samples', str(mnist_small / f'{name}.npz'), '--out', str(tmp_path / name)])
        res[name] = json.load(open(tmp_path / f'{name}.json'))
        line = capsys.readouterr().out.strip().splitlines()[-1]
        assert line.startswith(f"FD_mnist-classifier {res[name]['fid']:.4f} KID ") and 'not an Inception FID' in line
    r, n = res['real'], res['noise']
    assert (r['features'], r['dataset'], r['n'], r['n_ref'], r['image_size']) == ('mnist-classifier', 'mnist', 200, 3000, 14)
    assert r['test_accuracy'] == info['test_accuracy'] and r['classifier'] == path and r['classifier_info'] == info
    assert n['fid'] > 10 * r['fid'] > 0 and n['kid'] > 10 * abs(r['kid']) and r['kid_std'] >= 0


def tiny_mnist_run(data_dir, out):
    """A 2-step run of the tiny U-Net on 14 x 14 digits at T = 10; returns its folder."""
    train.main(['--dataset', 'mnist', '--data-dir', str(data_dir), '--image-size', '14', '--model', 'tiny',
                '--T', '10', '--max-steps', '2', '--batch-size', '8', '--n-preview', '4', '--log-every', '1',
                '--out-dir', str(out), '--device', 'cpu'])
    return str(out)


@need_mnist
def test_fid_cli_mnist_classifier_ckpt(mnist_net, mnist_small, tmp_path, monkeypatch):
    """--ckpt: samples drawn with the chain flags at the run's size; a non-MNIST run is refused
    before any sampling."""
    _, info, path = mnist_net
    run = tiny_mnist_run(mnist_small, tmp_path / 'run')
    common = ['fid', '--ckpt', run, '--features', 'mnist-classifier', '--classifier', path, '--n', '8',
              '--sample-batch', '8', '--device', 'cpu']
    ev.main(common + ['--sampler', 'ddim', '--steps', '5', '--out', str(tmp_path / 'f')])
    r = json.load(open(tmp_path / 'f.json'))
    assert (r['n'], r['sampler'], r['steps'], r['ckpt'], r['n_ref'], r['image_size']) == (8, 'ddim', 5, run, 3000, 14)
    assert r['test_accuracy'] == info['test_accuracy'] and r['fid'] > 0
    load = R.load_checkpoint

    def as_folder_run(*a, **k):   # the same network, claimed by a folder run
        model, diff, cfg = load(*a, **k)
        return model, diff, dict(cfg, dataset='folder')
    monkeypatch.setattr(R, 'load_checkpoint', as_folder_run)
    monkeypatch.setattr(R, 'generate', lambda *a, **k: pytest.fail('sampled before refusing'))
    with pytest.raises(SystemExit, match='models folder'):
        ev.main(common + ['--out', str(tmp_path / 'g')])
    assert not os.path.exists(tmp_path / 'g.json')


def test_fid_cli_mnist_classifier_refuses_other_data(tmp_path, monkeypatch):
    """A non-MNIST data set, or a flag of the other features: one line, before anything is read."""
    def nothing(*a, **k):
        raise AssertionError('read or computed something before refusing')
    for fn in ('load_samples', 'mnist_classifier', 'inception_model'):
        monkeypatch.setattr(F, fn, nothing)
    npz = str(tmp_path / 's.npz')
    cls = ['--features', 'mnist-classifier', '--classifier', str(tmp_path / 'c.pt')]
    for args, word in ((cls + ['--dataset', 'cifar10'], 'not cifar10'),
                       (cls + ['--random-inception'], '--random-inception goes with --features inception'),
                       (['--classifier', str(tmp_path / 'c.pt')], '--classifier goes with')):
        with pytest.raises(SystemExit) as e:
            ev.main(['fid', '--samples', npz, '--out', str(tmp_path / 'x'), '--device', 'cpu'] + args)
        msg = str(e.value)
        assert msg.startswith('error:') and '\n' not in msg and word in msg, msg
    assert os.listdir(tmp_path) == []


@need_mnist
def test_fid_cli_mnist_classifier_size_mismatch(mnist_small, tmp_path):
    with pytest.raises(SystemExit, match=r'at 28x28 needs \(1, 28, 28\) images; the samples are \(1, 14, 14\)'):
        ev.main(['fid', '--features', 'mnist-classifier', '--samples', str(mnist_small / 'real.npz'),
                 '--image-size', '28', '--classifier', str(tmp_path / 'c.pt'), '--out', str(tmp_path / 'x'),
                 '--data-dir', str(mnist_small), '--device', 'cpu'])
    assert os.listdir(tmp_path) == []


# ---- few-step chains: faulttol and es-search through the command line ---------------------------

def test_errprop_on_a_respaced_chain_records_the_chain(toy_runs, tmp_path):
    good, _ = toy_runs
    ev.main(['errprop', '--ckpt', good, '--n', '64', '--m', '64', '--steps', '10', '--eps-scale', '1.01',
             '--kernels', 'gaussian', '--out', str(tmp_path / 'e'), '--device', 'cpu'])
    r = json.load(open(tmp_path / 'e.json'))['runs'][0]
    assert r['t'] == [100, 90, 80, 70, 60, 50, 40, 30, 20, 10, 0]   # every visited t of a 10-step chain
    assert (r['sampler'], r['steps'], r['eps_scale']) == ('ddpm', 10, 1.01)
    assert len(r['delta']) == len(r['t']) and all(np.isfinite(r['delta']))


def test_faulttol_and_es_search_cli(toy_runs, tmp_path, capsys):
    good, _ = toy_runs
    ev.main(['faulttol', '--ckpt', good, '--steps', '20', '--t0', '50', '20', '--delta', '0.1', '--n', '64',
             '--out', str(tmp_path / 'f'), '--device', 'cpu'])
    runs = json.load(open(tmp_path / 'f.json'))['runs']
    assert [r['label'] for r in runs] == ['good, t0=50', 'good, t0=20']
    for r, t0 in zip(runs, (50, 20)):
        assert r['t'][0] == t0 and r['t'][-1] == 0 and r['amp'][0] == pytest.approx(1.0)
        assert r['gap'][0] == pytest.approx(0.1, rel=1e-4) and all(np.isfinite(r['amp']))
    assert (tmp_path / 'f.png').stat().st_size > 1000
    ev.main(['es-search', '--ckpt', good, '--steps', '10', '--grid', '1', '1.05', '--n', '64', '--m', '64',
             '--out', str(tmp_path / 's'), '--device', 'cpu'])
    res = json.load(open(tmp_path / 's.json'))
    assert [g['eps_scale'] for g in res['grid']] == [1.0, 1.05] and res['best'] in res['grid']
    assert 'fresh true samples' in res['metric'] and 'best eps scale' in capsys.readouterr().out


@pytest.mark.parametrize('args,word', [
    (['errprop', '--steps', '101'], '--steps'), (['errprop', '--steps', '0'], '--steps'),
    (['errprop', '--sampler', 'ddim', '--eta', '-0.5'], '--eta'), (['errprop', '--eps-scale', '0'], 'eps'),
    (['faulttol', '--steps', '20', '--t0', '7'], '--t0'), (['faulttol', '--t0', '50', '--delta', '-1'], '--delta'),
    (['es-search', '--grid', '0.9', '-1'], '--grid'),
    (['errprop', '--spacing', 'adm', '--sampler', 'ddim', '--steps', '30'], 'integer stride'),
    (['errprop', '--time-shift', '-2'], '--time-shift')])
def test_few_step_bad_input_one_line(toy_runs, tmp_path, args, word):
    good, _ = toy_runs
    with pytest.raises(SystemExit) as e:
        ev.main(args[:1] + ['--ckpt', good, '--out', str(tmp_path / 'x'), '--device', 'cpu'] + args[1:])
    msg = str(e.value)
    assert msg.startswith('error:') and '\n' not in msg and word in msg, msg
    assert os.listdir(tmp_path) == []


@need_mnist
def test_fid_repeats_score_disjoint_seed_blocks_whatever_the_batch(mnist_net, mnist_small, tmp_path, capsys):
    """--repeats R scores R disjoint blocks of sample seeds (0..n-1, n..2n-1, ...) and reports their
    mean ± std, not the best; a sample's seed alone fixes its image, so the batch size changes
    nothing and block 0 is the plain run of n samples."""
    _, _, path = mnist_net
    run = tiny_mnist_run(mnist_small, tmp_path / 'run')
    common = ['fid', '--ckpt', run, '--features', 'mnist-classifier', '--classifier', path, '--n', '6',
              '--steps', '5', '--device', 'cpu']
    res = {}
    for name, extra in (('b4', ['--repeats', '3', '--sample-batch', '4']),
                        ('b18', ['--repeats', '3', '--sample-batch', '18']), ('one', ['--sample-batch', '5'])):
        ev.main(common + extra + ['--out', str(tmp_path / name)])
        res[name] = json.load(open(tmp_path / f'{name}.json'))
    line = capsys.readouterr().out.strip().splitlines()[-2]   # the b18 run's line
    r = res['b4']
    assert r['repeats'] == 3 and r['n'] == 6 and len(r['fid_blocks']) == len(r['kid_blocks']) == 3
    assert r['fid_blocks'] == pytest.approx(res['b18']['fid_blocks'], rel=1e-5)   # batch size: no effect
    assert res['one']['fid'] == pytest.approx(r['fid_blocks'][0], rel=1e-5)         # block 0 = seeds 0..n-1
    assert len(set(np.round(r['fid_blocks'], 6))) == 3                                # disjoint blocks differ
    assert r['fid'] == pytest.approx(np.mean(r['fid_blocks'])) and r['fid'] != min(r['fid_blocks'])
    assert r['fid_std'] == pytest.approx(np.std(r['fid_blocks'], ddof=1))
    assert r['kid_std'] == pytest.approx(np.std(r['kid_blocks'], ddof=1))
    assert f"FD_mnist-classifier {res['b18']['fid']:.4f} ± {res['b18']['fid_std']:.4f} (std over 3 blocks)" in line
    assert res['one']['fid_std'] is None
    with pytest.raises(SystemExit, match='--repeats >= 1'):
        ev.main(common + ['--repeats', '0', '--out', str(tmp_path / 'bad')])


def test_sample_py_images_depend_on_their_seed_alone(tmp_path):
    run = str(tmp_path / 'run')
    train.main(['--dataset', '8gaussians', '--T', '20', '--toy-n', '500', '--max-steps', '2', '--n-preview', '8',
                '--log-every', '1', '--out-dir', run])
    out = {}
    for b in (3, 7):
        sample.main(['--ckpt', run, '--n', '10', '--sample-batch', str(b), '--npz', str(tmp_path / f'{b}.npz')])
        out[b] = np.load(tmp_path / f'{b}.npz')['samples']
    sample.main(['--ckpt', run, '--n', '4', '--npz', str(tmp_path / 'four.npz')])
    # the same noise per sample; the network's fp32 matrix products may round differently at another
    # batch size (MKL picks its kernel by shape: 4e-7 relative seen here), so equal to float rounding
    np.testing.assert_allclose(out[3], out[7], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / 'four.npz')['samples'], out[3][:4], rtol=1e-5, atol=1e-6)


def test_errprop_on_adms_grid_with_the_time_shift_sampler(toy_runs, tmp_path):
    """--spacing adm visits ADM's grid (from T, last step from index 1), --time-shift runs the
    Time-Shift Sampler; both are recorded with the curve."""
    from diffusion import adm_times
    good, _ = toy_runs
    ev.main(['errprop', '--ckpt', good, '--steps', '10', '--spacing', 'adm', '--time-shift', '6', '--n', '64', '--m', '64',
             '--out', str(tmp_path / 'e'), '--device', 'cpu'])
    r = json.load(open(tmp_path / 'e.json'))['runs'][0]
    assert r['t'] == adm_times(r['T'], 10) and r['spacing'] == 'adm'
    assert r['time_shift'] == dict(window=6, cutoff=round(0.3 * r['T']), var='sample')
