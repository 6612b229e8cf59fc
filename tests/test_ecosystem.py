"""What users of the ecosystem expect: TensorBoard logs read back with tensorboard's own reader
(resume included), released weights by hub id from a fake huggingface cache, progress lines
only on a terminal, and the teaching notebook executed end to end."""
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import runtime as R
import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ['--dataset', '8gaussians', '--T', '100', '--toy-n', '2000', '--n-preview', '50']


# ---- --log tensorboard -----------------------------------------------------------------------------
def tb_events(out):
    """{tag: [(step, value)]} and {tag: [step]} of the images, as TensorBoard itself reads RUN/tb."""
    ea_mod = pytest.importorskip('tensorboard.backend.event_processing.event_accumulator')
    ea = ea_mod.EventAccumulator(os.path.join(out, 'tb'), size_guidance={'scalars': 0, 'images': 0})
    ea.Reload()
    scalars = {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()['scalars']}
    images = {t: [e.step for e in ea.Images(t)] for t in ea.Tags()['images']}
    return scalars, images


def test_tensorboard_log_holds_every_logged_step_once_across_resumes(tmp_path):
    pytest.importorskip('tensorboard')
    out = tmp_path / 'run'
    args = FAST + ['--out-dir', str(out), '--log', 'tensorboard', '--reg', '--reg-L', '2',
                   '--log-every', '10', '--save-every', '20', '--batch-size', '32']
    train.main(args + ['--max-steps', '20'])
    shutil.copy(out / 'ckpt.pt', tmp_path / 'ckpt20.pt')
    train.main(args + ['--max-steps', '40', '--resume'])          # appends steps 30, 40
    first = tb_events(out)[0]['train/loss']
    shutil.copy(tmp_path / 'ckpt20.pt', out / 'ckpt.pt')          # as if preempted after step 20's save
    train.main(args + ['--max-steps', '40', '--resume'])          # redoes 30 and 40: purged, not doubled
    scalars, images = tb_events(out)
    log = [json.loads(ln) for ln in open(out / 'log.jsonl')]
    assert [s for s, _ in scalars['train/loss']] == [10, 20, 30, 40] == [r['step'] for r in log]
    for tag in ('train/loss', 'train/loss_nll', 'reg/loss_reg', 'reg/r', 'reg/k', 'reg/w', 'train/grad_norm',
                'train/lr', 'train/img_per_s'):
        assert len(scalars[tag]) == 4, tag
    key = {v: k for k, v in train.TB_TAGS.items()}
    for tag, series in scalars.items():   # the events carry the JSON log's values (the source of truth)
        if tag != 'train/img_per_s':
            assert [v for _, v in series] == pytest.approx([r[key[tag]] for r in log], rel=1e-6), tag
    assert [v for _, v in scalars['train/loss']] == pytest.approx([v for _, v in first], rel=1e-6)  # bit-exact resume
    assert images == {'samples': [20, 40]}   # each run's closing preview, step 40's once


def test_json_log_stays_the_default_and_tensorboard_missing_is_one_line(tmp_path, monkeypatch):
    out = tmp_path / 'run'
    train.main(FAST + ['--out-dir', str(out), '--max-steps', '5', '--log-every', '5'])
    assert not (out / 'tb').exists() and (out / 'log.jsonl').is_file()
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)   # as if not installed
    out2 = tmp_path / 'run2'
    with pytest.raises(SystemExit, match='needs the tensorboard package: pip install tensorboard'):
        train.main(FAST + ['--out-dir', str(out2), '--max-steps', '5', '--log', 'tensorboard'])
    assert not out2.exists()   # refused before anything was written


# ---- released weights by hub id ----------------------------------------------------------------------
@pytest.fixture(scope='module')
def fake_hub_cache(tmp_path_factory):
    """A huggingface cache holding one tiny DDPM U-Net as google/ddpm-cifar10-32, in the hub's
    layout (models--owner--name/refs/main -> snapshots/<commit>/), and the same folder on its own."""
    try:
        import diffusers
    except Exception as e:  # noqa: BLE001
        pytest.skip(f'diffusers not importable ({e}); pip install -r requirements-test.txt')
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=32, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D'),
        up_block_types=('UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'), norm_eps=1e-6, downsample_padding=0,
        flip_sin_to_cos=False, freq_shift=1, attention_head_dim=None)
    cache = tmp_path_factory.mktemp('hf') / 'hub'
    repo = cache / 'models--google--ddpm-cifar10-32'
    commit = '0123456789abcdef0123456789abcdef01234567'
    unet.save_pretrained(str(repo / 'snapshots' / commit))
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(commit)
    return cache, repo / 'snapshots' / commit


def hub_env(cache):
    return dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE='1', PYTHONPATH=REPO)


def test_hub_id_resolves_from_the_cache_and_loads_as_the_folder(fake_hub_cache, monkeypatch):
    from model import resolve_weights
    cache, folder = fake_hub_cache
    monkeypatch.setenv('HF_HUB_CACHE', str(cache))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    assert os.path.samefile(resolve_weights('google/ddpm-cifar10-32'), folder)
    assert resolve_weights('out/no-such-run/ckpt.pt') == 'out/no-such-run/ckpt.pt'   # not an id: as given
    by_id, _, cfg = R.load_checkpoint('google/ddpm-cifar10-32')
    by_folder, _, _ = R.load_checkpoint(str(folder))
    assert cfg['dataset'] == 'cifar10' and cfg['model'] == 'small'
    for (k, a), b in zip(by_id.state_dict().items(), by_folder.state_dict().values()):
        assert torch.equal(a, b), k


def test_sample_py_takes_a_hub_id_and_fails_offline_in_one_line(fake_hub_cache, tmp_path):
    cache, _ = fake_hub_cache
    grid = tmp_path / 'g.png'
    r = subprocess.run([sys.executable, 'sample.py', '--ckpt', 'google/ddpm-cifar10-32', '--n', '2', '--steps', '2',
                        '--grid', str(grid)], cwd=REPO, env=hub_env(cache), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert grid.is_file()
    r = subprocess.run([sys.executable, 'sample.py', '--ckpt', 'google/ddpm-celebahq-256', '--n', '2',
                        '--grid', str(tmp_path / 'h.png')], cwd=REPO, env=hub_env(cache), capture_output=True, text=True)
    lines = r.stderr.strip().split('\n')
    assert r.returncode == 1 and len(lines) == 1, r.stderr[-2000:]
    assert 'not in the huggingface cache' in lines[0] and 'huggingface-cli download google/ddpm-celebahq-256' in lines[0]
    assert not (tmp_path / 'h.png').exists()


def test_init_from_a_hub_id_not_cached_is_refused_before_anything_is_written(fake_hub_cache, tmp_path, monkeypatch):
    cache, _ = fake_hub_cache
    monkeypatch.setenv('HF_HUB_CACHE', str(cache))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    out = tmp_path / 'run'
    with pytest.raises(FileNotFoundError, match='not in the huggingface cache'):
        train.main(FAST + ['--out-dir', str(out), '--max-steps', '2', '--init-from', 'google/ddpm-church-256'])
    assert not out.exists()


# ---- progress lines: on a terminal only ------------------------------------------------------------
class Terminal(io.StringIO):
    def isatty(self):
        return True


def tiny_toy_model():
    import model
    torch.manual_seed(0)
    return model.build_model('mlp', (2,)).eval(), R.make_diffusion(dict(T=20, beta_1=1e-3, beta_T=0.2, sigma='beta'))


@pytest.mark.parametrize('terminal', [True, False])
def test_sampling_shows_one_progress_line_on_a_terminal_and_nothing_in_a_log(terminal, monkeypatch):
    err = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, 'stderr', err)
    net, diff = tiny_toy_model()
    x = R.generate(net, diff, 10, (2,), sample_batch=4, progress=True)
    assert x.shape == (10, 2)
    text = err.getvalue()
    if not terminal:
        assert text == ''
        return
    last = text.split('\r')[-1]
    assert last.startswith('sampling: 100%') and '10/10' in last and 'img/s' in last, text[-300:]
    assert '\n' not in text.rstrip('\n')   # one line, redrawn in place


def test_es_search_output_in_a_pipe_carries_no_progress_bar(tmp_path):
    out = tmp_path / 'run'
    train.main(FAST + ['--out-dir', str(out), '--max-steps', '3', '--log-every', '3'])
    r = subprocess.run([sys.executable, 'evaluate.py', 'es-search', '--ckpt', str(out), '--steps', '5', '--n', '20',
                        '--m', '20', '--grid', '1', '1.01', '--out', str(tmp_path / 'es')],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert '\r' not in r.stdout + r.stderr and 'it/s' not in r.stderr and 'scale/s' not in r.stderr
    assert r.stdout.count('\neps scale 1') == 1 and r.stdout.startswith('eps scale 1:')   # per-scale lines still logged


# ---- the teaching notebook -----------------------------------------------------------------------------
NOTEBOOK = os.path.join(REPO, 'notebooks', 'paper_in_15_minutes.ipynb')


def test_committed_notebook_carries_its_outputs():
    nbformat = pytest.importorskip('nbformat')
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == 'code']
    assert code and all(c.outputs for c in code), 'run the notebook and commit it with its outputs'
    assert not [o for c in code for o in c.outputs if o.output_type == 'error']
    assert sum('image/png' in o.get('data', {}) for c in code for o in c.outputs) >= 5   # its figures


def test_notebook_executes_end_to_end(monkeypatch):
    nbformat = pytest.importorskip('nbformat')
    nbclient = pytest.importorskip('nbclient')
    pytest.importorskip('ipykernel')
    monkeypatch.setenv('PAPER15_STEPS', '200')   # the kernel inherits these: a short run, the same cells
    monkeypatch.setenv('PAPER15_N', '200')
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name='python3',
                            resources={'metadata': {'path': os.path.join(REPO, 'notebooks')}}).execute()
    text = '\n'.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code' for o in c.outputs)
    assert '200 training steps per model, N = 200 samples' in text and 'done: 200 steps' in text
    line = next(ln for ln in text.split('\n') if ln.startswith('r = 40, k = 5: L_r^reg'))
    value, by_hand = (float(v) for v in line.replace(')', '').split(' = ')[-1].split(' (by hand from the drawn chain: '))
    assert value == pytest.approx(by_hand, abs=1e-5) and value > 0   # consistency_reg is the chain drawn
    assert 'vanilla: final MMD' in text and '--reg: final MMD' in text
