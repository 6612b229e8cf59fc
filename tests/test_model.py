import json
import math
import os
import shutil

import pytest
import torch

from model import (MODEL_CONFIGS, MLPDenoiser, UNet, build_model, count_params, is_diffusers_folder,
                   load_diffusers_unet, timestep_embedding)

# exact counts; cifar10 equals diffusers' UNet2DModel for google/ddpm-cifar10-32 (checked below)
EXPECTED = {
    ('cifar10', (3, 32, 32)): 35_746_307,
    ('celeba64', (3, 64, 64)): 78_700_803,
    ('imagenet32', (3, 32, 32)): 35_746_307,
    ('mnist', (1, 28, 28)): 1_623_169,
    ('small', (3, 32, 32)): 1_113_955,
    ('tiny', (3, 32, 32)): 652_195,
    ('mlp', (2,)): 297_474,
    ('mlp', (10,)): 301_578,
}

DOWN = ('DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D')
# mirror of DOWN: diffusers' up_blocks[2] runs at 16x16 (up_blocks[1] would put attention at 8x8)
UP = ('UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D')
DDPM_KW = dict(norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, attention_head_dim=None)


@pytest.mark.parametrize('name,shape', list(EXPECTED))
def test_param_count_and_shape(name, shape):
    torch.manual_seed(0)
    m = build_model(name, shape).eval()
    n = count_params(m)
    print(f'{name} {shape}: {n:,} parameters')
    assert n == EXPECTED[(name, shape)]
    assert isinstance(m, MLPDenoiser if MODEL_CONFIGS[name]['kind'] == 'mlp' else UNet)
    B = 1 if name == 'celeba64' else 2
    x = torch.randn(B, *shape)
    with torch.no_grad():
        y = m(x, torch.randint(0, 1000, (B,)))
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_timestep_embedding_closed_form():
    t = torch.tensor([0, 1, 17, 999])
    emb = timestep_embedding(t, 128)
    assert emb.shape == (4, 128)
    for b, tv in enumerate(t.tolist()):
        for j in (0, 1, 30, 63):
            f = math.exp(-math.log(10000) * j / 63)
            assert abs(emb[b, j].item() - math.sin(tv * f)) < 2e-4
            assert abs(emb[b, 64 + j].item() - math.cos(tv * f)) < 2e-4


def test_build_model_errors_and_overrides():
    with pytest.raises(ValueError, match='unknown model config'):
        build_model('resnet', (3, 32, 32))
    with pytest.raises(ValueError, match='U-Net'):
        build_model('cifar10', (2,))
    with pytest.raises(ValueError, match='MLP'):
        build_model('mlp', (3, 32, 32))
    with pytest.raises(ValueError, match='divisible'):
        build_model('cifar10', (3, 30, 30))
    with pytest.raises(ValueError, match='square'):
        build_model('tiny', (3, 32, 16))
    with pytest.raises(ValueError, match='unknown override'):
        build_model('tiny', (3, 32, 32), widht=3)
    with pytest.raises(ValueError, match='GroupNorm'):
        build_model('tiny', (3, 32, 32), ch=16)
    m = build_model('mnist', (1, 28, 28), dropout=0.0)
    assert all(d.p == 0.0 for d in m.modules() if isinstance(d, torch.nn.Dropout))
    assert count_params(build_model('mlp', (2,), depth=2)) < EXPECTED[('mlp', (2,))]


# ---------------------------------------------------------------------------- diffusers mapping

def _diffusers():
    try:
        import diffusers
    except Exception as e:  # noqa: BLE001
        pytest.skip(f'diffusers not importable ({e}); pip install -r requirements-test.txt')
    return diffusers


def _save(unet, folder, perturb=True, **kw):
    """Randomise every parameter (so norms/biases are checked too), save, return the model in eval mode."""
    if perturb:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    unet.save_pretrained(str(folder), **kw)
    return unet.eval()


def _check_equal(dunet, folder, shape, expect_name, B=2):
    sd, name, data_shape = load_diffusers_unet(folder)
    assert data_shape == shape
    assert name == expect_name
    ours = build_model(name, shape).eval()
    ours.load_state_dict(sd)  # strict
    assert count_params(ours) == count_params(dunet)
    torch.manual_seed(0)
    x, t = torch.randn(B, *shape), torch.randint(0, 1000, (B,))
    with torch.no_grad():
        diff = (ours(x, t) - dunet(x, t).sample).abs().max().item()
    assert diff < 1e-4, diff


def test_diffusers_ddpm_cifar10_full_size(tmp_path):
    diffusers = _diffusers()
    torch.manual_seed(0)
    d = diffusers.UNet2DModel(sample_size=32, block_out_channels=(128, 256, 256, 256), down_block_types=DOWN,
                              up_block_types=UP, layers_per_block=2, dropout=0.1, **DDPM_KW)
    _save(d, tmp_path)  # safetensors
    assert os.path.isfile(tmp_path / 'diffusion_pytorch_model.safetensors') and is_diffusers_folder(tmp_path)
    print('diffusers ddpm-cifar10-32 parameters:', count_params(d))
    assert count_params(d) == EXPECTED[('cifar10', (3, 32, 32))]
    _check_equal(d, tmp_path, (3, 32, 32), 'cifar10')


@pytest.fixture(scope='module')
def small_folder(tmp_path_factory):
    """diffusers twin of our 'small' preset: 32x32, widths (32, 64, 64), attention at 16, 1 block per level."""
    diffusers = _diffusers()
    torch.manual_seed(0)
    d = diffusers.UNet2DModel(sample_size=32, block_out_channels=(32, 64, 64), layers_per_block=1,
                              down_block_types=DOWN[:3], up_block_types=('UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'),
                              **DDPM_KW)
    folder = tmp_path_factory.mktemp('small')
    return _save(d, folder), folder


def test_diffusers_small_and_pipeline_layout(small_folder, tmp_path):
    d, folder = small_folder
    _check_equal(d, folder, (3, 32, 32), 'small')
    shutil.copytree(folder, tmp_path / 'unet')  # a DDPMPipeline folder keeps the U-Net in unet/
    _check_equal(d, tmp_path, (3, 32, 32), 'small')


def test_diffusers_mnist_bin(tmp_path):
    diffusers = _diffusers()
    torch.manual_seed(0)
    d = diffusers.UNet2DModel(sample_size=28, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
                              layers_per_block=2, down_block_types=DOWN[:3],
                              up_block_types=('UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'), **DDPM_KW)
    _save(d, tmp_path, safe_serialization=False)
    assert os.path.isfile(tmp_path / 'diffusion_pytorch_model.bin')
    _check_equal(d, tmp_path, (1, 28, 28), 'mnist')


def test_diffusers_legacy_attention_names(small_folder, tmp_path):
    # early diffusers files (as first released on the hub) name attention query/key/value/proj_attn
    d, folder = small_folder
    names = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}
    sd = {}
    for k, v in d.state_dict().items():
        for new, old in names.items():
            k = k.replace(f'.{new}.', f'.{old}.')
        sd[k] = v.clone()
    torch.save(sd, tmp_path / 'diffusion_pytorch_model.bin')
    shutil.copy(folder / 'config.json', tmp_path / 'config.json')
    _check_equal(d, tmp_path, (3, 32, 32), 'small')


@pytest.mark.parametrize('field,value,msg', [
    ('layers_per_block', 3, 'layers_per_block'),
    ('freq_shift', 0, 'freq_shift'),
    ('norm_eps', 1e-5, 'norm_eps'),
    ('attention_head_dim', 8, 'attention_head_dim'),
    ('up_block_types', ['UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D'], 'not a DDPM layout'),
    ('block_out_channels', [64, 128, 128], 'block_out_channels'),
])
def test_diffusers_config_mismatch(small_folder, tmp_path, field, value, msg):
    _, folder = small_folder
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    cfg = json.loads((tmp_path / 'config.json').read_text())
    cfg[field] = value
    (tmp_path / 'config.json').write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=msg) as e:
        load_diffusers_unet(tmp_path)
    assert 'only DDPM-architecture folders' in str(e.value)


def test_diffusers_missing_files(tmp_path):
    assert not is_diffusers_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match='download google/ddpm-cifar10-32'):
        load_diffusers_unet(tmp_path / 'nowhere')
    (tmp_path / 'config.json').write_text('{}')  # config without weights
    assert not is_diffusers_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match='diffusion_pytorch_model.safetensors'):
        load_diffusers_unet(tmp_path)


def test_train_init_from_diffusers_folder(small_folder, tmp_path):
    """train.py --init-from a diffusers folder: the run starts from exactly the converted weights."""
    import train
    from PIL import Image
    imgs = tmp_path / 'imgs'
    imgs.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        arr = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(arr).save(imgs / f'{i}.png')
    _, folder = small_folder
    out = tmp_path / 'run'
    train.main(['--dataset', 'folder', '--data-dir', str(imgs), '--image-size', '32', '--model', 'small',
                '--init-from', str(folder), '--max-steps', '1', '--lr', '0', '--warmup', '1', '--batch-size', '4',
                '--T', '10', '--n-preview', '4', '--out-dir', str(out)])
    ck = torch.load(out / 'ckpt.pt', map_location='cpu', weights_only=True)
    sd, _, _ = load_diffusers_unet(folder)
    assert all(torch.equal(ck['model'][k], v) and torch.equal(ck['ema'][k], v) for k, v in sd.items())
