"""Nothing lost, nothing cryptic: a diverging run keeps its last good checkpoint, a failed start or
resume leaves no trace, logs stay valid JSON lines, N DDP ranks with dropout train exactly like one
process, released DDPM folders work wherever a checkpoint is accepted, and bad input gets one line
before anything is written or computed."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

import evaluate
import runtime as R
import sample
import train
import trainstep
from test_model import DDPM_KW, DOWN, UP, _diffusers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get('DATA_ROOT', os.path.join(REPO, '..', 'shared', 'data'))
FAST = ['--dataset', '8gaussians', '--T', '100', '--toy-n', '2000', '--n-preview', '20']


def run(out, *args):
    train.main(FAST + ['--out-dir', str(out)] + [str(a) for a in args])


def fails(main, argv):
    """main(argv)'s one-line error, as the scripts' __main__ prints it (ValueError and
    FileNotFoundError become 'error: ...' there)."""
    with pytest.raises((SystemExit, ValueError, FileNotFoundError)) as e:
        main(argv)
    msg = str(e.value) if e.type is SystemExit else f'error: {e.value}'
    assert msg.startswith('error:') and '\n' not in msg, msg
    return msg


def one_line(excinfo):
    msg = str(excinfo.value)
    assert msg.startswith('error:') and '\n' not in msg, msg
    return msg


def read_log(out):
    with open(os.path.join(out, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def healthy(tmp_path_factory):
    out = tmp_path_factory.mktemp('healthy')
    run(out, '--max-steps', 100, '--log-every', 50, '--save-every', 50)
    return out


# ---- a diverging run -------------------------------------------------------------------------
def test_divergence_stops_and_keeps_the_last_good_checkpoint(healthy, tmp_path):
    out = tmp_path / 'run'
    os.system(f'cp -r {healthy} {out}')
    before = (out / 'ckpt.pt').read_bytes()
    with pytest.raises(SystemExit) as e:
        train.main(['--out-dir', str(out), '--resume', '--max-steps', '160', '--lr', '1e3', '--save-every', '50'])
    msg = one_line(e)
    assert 'non-finite' in msg and 'keeps step 100' in msg and '--lr' in msg
    assert (out / 'ckpt.pt').read_bytes() == before          # nothing written after the divergence
    ck = R.read_checkpoint(str(out / 'ckpt.pt'))
    assert all(torch.isfinite(v).all() for v in ck['model'].values())
    assert [r['step'] for r in read_log(out)] == [50, 100]


def test_nonfinite_weights_are_refused(healthy, tmp_path):
    ck = R.read_checkpoint(str(healthy / 'ckpt.pt'))
    ck['ema'] = {k: torch.full_like(v, float('nan')) for k, v in ck['ema'].items()}
    torch.save(ck, tmp_path / 'nan.pt')
    with pytest.raises(ValueError, match='non-finite'):
        R.load_checkpoint(str(tmp_path / 'nan.pt'))
    with pytest.raises(ValueError, match='non-finite'):
        sample.main(['--ckpt', str(tmp_path / 'nan.pt'), '--npz', str(tmp_path / 's.npz'), '--device', 'cpu'])
    assert not (tmp_path / 's.npz').exists()


# ---- resume, logs and failed starts -------------------------------------------------------------
def test_resume_trims_the_log_and_refuses_run_defining_flags(healthy, tmp_path):
    out = tmp_path / 'run'
    os.system(f'cp -r {healthy} {out}')
    with open(out / 'log.jsonl', 'a') as f:   # as a run killed after step 100's log but before a save
        f.write(json.dumps(dict(step=150, loss=1.0)) + '\n')
    config = (out / 'config.json').read_bytes()
    for flag, value in (('--model', 'tiny'), ('--T', '10'), ('--reg', None)):
        with pytest.raises(SystemExit) as e:
            train.main(['--out-dir', str(out), '--resume', flag] + ([value] if value else []))
        assert 'cannot change' in one_line(e)
        assert (out / 'config.json').read_bytes() == config   # a failed resume touches nothing
    train.main(['--out-dir', str(out), '--resume', '--max-steps', '150', '--log-every', '50'])
    assert [r['step'] for r in read_log(out)] == [50, 100, 150]   # step 150 once, from the resumed run


def test_failed_starts_leave_no_trace(tmp_path):
    cases = [(['--log-every', '0'], 'log-every'), (['--save-every', '0'], 'save-every'),
             (['--sample-every', '-1'], 'sample-every'), (['--synthetic', 'x.npz', '--fresh-frac', '0.5'], 'x.npz')]
    for args, word in cases:
        out = tmp_path / word
        assert word in fails(train.main, FAST + ['--out-dir', str(out)] + args)
        assert not out.exists(), args
    (tmp_path / 'file').write_text('x')
    with pytest.raises(SystemExit) as e:
        run(tmp_path / 'file')
    assert 'is a file' in one_line(e)


def test_log_is_json_with_null_for_nonfinite():
    assert json.loads(json.dumps(R.json_safe(dict(a=float('nan'), b=[1.0, float('inf')])), allow_nan=False)) \
        == dict(a=None, b=[1.0, None])


def test_atomic_write_fsyncs_file_and_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, 'fsync', lambda fd: synced.append(os.readlink(f'/proc/self/fd/{fd}')) or real(fd))
    R.save_checkpoint(str(tmp_path / 'ckpt.pt'), step=1)
    assert synced[0].endswith('.tmp') and synced[-1] == str(tmp_path)   # the file, then its folder
    assert os.listdir(tmp_path) == ['ckpt.pt']


# ---- DDP with dropout -------------------------------------------------------------------------
needs_dist = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason='torch.distributed with the gloo backend is not available')


@needs_dist
def test_torchrun_with_dropout_matches_one_process(tmp_path):
    """The README's claim, with a dropout U-Net: 2 ranks train the same weights as 1 process."""
    imgs = tmp_path / 'imgs'
    imgs.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(16):
        Image.fromarray(torch.randint(0, 256, (8, 8, 3), generator=g, dtype=torch.uint8).numpy()).save(imgs / f'{i}.png')
    args = ['--dataset', 'folder', '--data-dir', str(imgs), '--image-size', '8', '--model', 'tiny',
            '--dropout', '0.3', '--batch-size', '8', '--max-steps', '3', '--log-every', '1', '--T', '50',
            '--n-preview', '4', '--device', 'cpu', '--lr', '1e-4', '--warmup', '1',
            '--dtype', 'fp32']   # exact fp32: bf16 kernels round differently on half the batch
    env = dict(os.environ, OMP_NUM_THREADS='1')
    env.pop('WORLD_SIZE', None)
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        'train.py', '--out-dir', str(tmp_path / 'ddp')] + args,
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    train.main(['--out-dir', str(tmp_path / 'one')] + args)
    a = R.read_checkpoint(str(tmp_path / 'ddp' / 'ckpt.pt'))
    b = R.read_checkpoint(str(tmp_path / 'one' / 'ckpt.pt'))
    la, lb = read_log(tmp_path / 'ddp'), read_log(tmp_path / 'one')
    assert [r['step'] for r in la] == [r['step'] for r in lb] == [1, 2, 3]
    for ra, rb in zip(la, lb):   # the global loss (not rank 0's share) and the all-reduced gradient
        assert ra['loss'] == pytest.approx(rb['loss'], rel=1e-5)
        assert ra['grad_norm'] == pytest.approx(rb['grad_norm'], rel=1e-5)
    # weights: Adam's first steps move every weight by about lr whatever the gradient's size, so
    # float rounding of near-zero gradients can flip a step; 3 steps of lr 1e-4 bound that by 6e-4
    for k in a['model']:
        assert torch.allclose(a['model'][k], b['model'][k], rtol=0, atol=6e-4), k
    torch.manual_seed(R.seed_of(0, 'init'))   # and the runs moved the weights: allclose is not vacuous
    init = train.build_model('tiny', (3, 8, 8), dropout=0.3).state_dict()
    assert any(not torch.allclose(init[k], b['model'][k], atol=1e-4) for k in init)


# ---- released DDPM folders wherever a checkpoint goes ------------------------------------------
def diffusers_folder(path, widths, layers):
    diffusers = _diffusers()
    torch.manual_seed(0)
    n = len(widths)
    d = diffusers.UNet2DModel(sample_size=32, block_out_channels=widths, layers_per_block=layers,
                              down_block_types=DOWN[:n], up_block_types=UP[-n:] if n == 4 else
                              ('UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'), dropout=0.1, **DDPM_KW)
    d.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope='module')
def small_ddpm(tmp_path_factory):
    return diffusers_folder(tmp_path_factory.mktemp('small_ddpm'), (32, 64, 64), 1)


needs_cifar = pytest.mark.skipif(not os.path.isfile(os.path.join(DATA, 'cifar-10-batches-py', 'data_batch_1')),
                                 reason=f'no CIFAR-10 copy under {DATA}')


def test_released_config_folder_is_a_cifar10_run(tmp_path):
    """The released network's configuration (35.7 M parameters) loads as a CIFAR-10 run of ours
    and samples through sample.py's command line."""
    folder = diffusers_folder(tmp_path / 'ddpm', (128, 256, 256, 256), 2)
    model, diff, cfg = R.load_checkpoint(folder)
    assert (cfg['dataset'], cfg['model'], cfg['T'], cfg['data_shape']) == ('cifar10', 'cifar10', 1000, [3, 32, 32])
    assert diff.beta[1].item() == pytest.approx(1e-4) and diff.beta[1000].item() == pytest.approx(0.02)
    sample.main(['--ckpt', folder, '--n', '2', '--steps', '2', '--npz', str(tmp_path / 's.npz'), '--device', 'cpu'])
    assert np.load(tmp_path / 's.npz')['samples'].shape == (2, 32, 32, 3)


@needs_cifar
def test_small_ddpm_folder_through_every_command(small_ddpm, tmp_path):
    common = ['--device', 'cpu', '--data-dir', DATA]
    evaluate.main(['errprop', '--ckpt', small_ddpm, '--n', '4', '--m', '4', '--steps', '2', '--kernels', 'gaussian',
                   '--out', str(tmp_path / 'e')] + common)
    res = json.load(open(tmp_path / 'e.json'))['runs'][0]
    assert res['dataset'] == 'cifar10' and res['t'][0] == 1000 and res['t'][-1] == 0
    stats = str(tmp_path / 'ref.npz')   # reference statistics given: no pass over the 50k images
    np.savez(stats, mu=np.zeros(64), sigma=np.eye(64), net=np.array('random-init seed 0, dims 64'))
    evaluate.main(['fid', '--ckpt', small_ddpm, '--n', '4', '--steps', '2', '--random-inception', '--dims', '64',
                   '--ref-stats', stats, '--out', str(tmp_path / 'f')] + common)
    assert json.load(open(tmp_path / 'f.json'))['dataset'] == 'cifar10'
    sample.main(['--ckpt', small_ddpm, '--n', '2', '--steps', '2', '--png-dir', str(tmp_path / 'png'), '--device', 'cpu'])
    assert sorted(os.listdir(tmp_path / 'png')) == ['000000.png', '000001.png']
    train.main(['--dataset', 'cifar10', '--data-dir', DATA, '--model', 'small', '--init-from', small_ddpm,
                '--max-steps', '1', '--batch-size', '2', '--lr', '0', '--n-preview', '1', '--sample-every', '0',
                '--T', '1000', '--out-dir', str(tmp_path / 'ft'), '--device', 'cpu'])
    src = R.load_checkpoint(small_ddpm)[0].state_dict()
    ck = R.read_checkpoint(str(tmp_path / 'ft' / 'ckpt.pt'))
    assert all(torch.equal(ck['ema'][k], v) for k, v in src.items())


# ---- bad input: one line, before anything is written or computed --------------------------------
def test_bad_input_one_line(healthy, tmp_path):
    ck = str(healthy)
    (tmp_path / 'afile').write_text('x')
    garbage = tmp_path / 'garbage.npz'
    garbage.write_bytes(b'not an npz at all')
    np.savez(tmp_path / 'nokey.npz', other=np.zeros(3))
    cases = [
        (sample.main, ['--ckpt', ck, '--sample-batch', '0', '--npz', str(tmp_path / 'a.npz')], 'sample-batch'),
        (sample.main, ['--ckpt', ck, '--grid', str(tmp_path / 'afile' / 'g.png')], 'cannot write'),
        (sample.main, ['--ckpt', ck, '--png-dir', str(tmp_path / 'p')], 'needs images'),
        (sample.main, ['--ckpt', ck, '--steps', '0', '--npz', str(tmp_path / 'a.npz')], '--steps'),
        (sample.main, ['--ckpt', ck, '--sampler', 'ddim', '--eta', '-1', '--npz', str(tmp_path / 'a.npz')], 'eta'),
        (sample.main, ['--ckpt', ck, '--device', 'cuda:0', '--npz', str(tmp_path / 'a.npz')], 'no CUDA'),
        (train.main, FAST + ['--synthetic', str(garbage), '--fresh-frac', '0.5', '--out-dir', str(tmp_path / 'r1')],
         'garbage.npz'),
        (train.main, FAST + ['--synthetic', str(tmp_path / 'nokey.npz'), '--fresh-frac', '0.5',
                             '--out-dir', str(tmp_path / 'r2')], "'samples'"),
        (evaluate.main, ['fid', '--samples', str(garbage), '--dataset', 'mnist', '--random-inception',
                         '--out', str(tmp_path / 'fid')], 'garbage.npz'),
    ]
    for main, argv, word in cases:
        assert word in fails(main, argv), argv
    assert sorted(os.listdir(tmp_path)) == ['afile', 'garbage.npz', 'nokey.npz']


def test_synthetic_run_of_another_data_set_fails_before_sampling(healthy, tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(['--dataset', 'gmm10d', '--toy-n', '200', '--synthetic', str(healthy), '--fresh-frac', '0.5',
                    '--out-dir', str(tmp_path / 'r')])
    assert 'shape (2,)' in one_line(e)
    assert not (tmp_path / 'r').exists()


def test_corrupt_image_in_a_folder_data_set(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'ok.png')
    (tmp_path / 'bad.png').write_bytes(b'\x89PNG not really')
    with pytest.raises(ValueError, match='bad.png'):
        trainstep.training_set(R.parse_config(['--dataset', 'folder', '--data-dir', str(tmp_path),
                                           '--image-size', '8'])[0])


def test_collapse_with_a_corrupt_checkpoint(tmp_path):
    from neighbours import collapse
    (tmp_path / 'gen00').mkdir()
    (tmp_path / 'gen00' / 'ckpt.pt').write_bytes(b'truncated')
    with pytest.raises(ValueError, match='not a readable checkpoint'):
        collapse.main(['--generations', '0', '--T', '100', '--n-train', '100', '--n-eval', '50',
                       '--out-dir', str(tmp_path), '--device', 'cpu'])


def test_checkpoint_written_before_the_redesign_loads_and_resumes(healthy, tmp_path):
    """The format of commit 06936f2: no reg_steps / preview_steps / channels_last in the config,
    explicit betas and rho, an (unused) 'rng' field."""
    ck = R.read_checkpoint(str(healthy / 'ckpt.pt'))
    old = {k: v for k, v in ck['config'].items() if k not in ('reg_steps', 'preview_steps', 'channels_last')}
    ck.update(config=old, rng=torch.get_rng_state())
    run_dir = tmp_path / 'old'
    run_dir.mkdir()
    torch.save(ck, run_dir / 'ckpt.pt')
    model, diff, cfg = R.load_checkpoint(str(run_dir))
    assert diff.T == 100 and cfg['beta_T'] == ck['config']['beta_T']
    train.main(['--out-dir', str(run_dir), '--resume', '--max-steps', '110', '--log-every', '10'])
    assert R.read_checkpoint(str(run_dir / 'ckpt.pt'))['step'] == 110
