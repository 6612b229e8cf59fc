"""Noise-prediction networks eps_theta(x_t, t) for the diffusion models (paper Eq. 2 / Eq. 4 use them).

- UNet: the DDPM CIFAR-10 U-Net family (Ho et al. 2020, original TF code), laid out so that the
  released diffusers weights (google/ddpm-cifar10-32) load exactly via load_diffusers_unet.
- MLPDenoiser: a small MLP for 2-D / N-D toy data.
Networks take the 0-based step index t in 0..T-1 (LongTensor (B,)); diffusion.py does the shift from the
paper's t in 1..T.
"""
import json
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(t, dim):
    """DDPM sinusoidal embedding. t: (B,) step indices -> (B, dim) = [sin(t*f), cos(t*f)], f_i = 10000^(-i/(half-1))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1))
    emb = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class ShardedDropout(nn.Dropout):
    """Dropout whose mask is drawn for the whole global batch and sliced to this rank's share
    (rank, world: set_dropout_shard), so a sample's mask depends on its index in the global batch,
    not on the rank holding it: N DDP ranks drop exactly what one process drops. Costs a mask of
    the global batch per rank; in eval mode it is the identity."""
    rank, world = 0, 1

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        b = x.shape[0]
        u = torch.rand((b * self.world, *x.shape[1:]), device=x.device)[self.rank * b:(self.rank + 1) * b]
        return x * (u >= self.p).to(x.dtype) / (1 - self.p)


def set_dropout_shard(model, rank, world):
    for m in model.modules():
        if isinstance(m, ShardedDropout):
            m.rank, m.world = rank, world


def cpu_has_native_bf16():
    """True if this CPU has bf16 arithmetic units (x86 AVX512-BF16 or AMX-BF16, Arm BF16), where bf16
    autocast is faster than fp32; elsewhere oneDNN emulates bf16 and autocast is much slower."""
    caps = getattr(torch.cpu, 'get_capabilities', dict)()  # torch >= 2.9
    if caps.get('avx512_bf16') or caps.get('amx_bf16'):
        return True
    try:
        with open('/proc/cpuinfo') as f:
            return bool({'avx512_bf16', 'amx_bf16', 'bf16'} & set(f.read().split()))
    except OSError:
        return False


AUTO_DTYPE_ENV = 'REPRO_AUTO_DTYPE'   # fp32 / bf16: what 'auto' resolves to, whatever the hardware


def resolve_dtype(dtype, device):
    """'auto' -> 'bf16' where the hardware computes in bf16 natively (a CUDA GPU with bf16, a CPU
    with AVX512-BF16 / AMX / Arm BF16), else 'fp32'; 'fp32' and 'bf16' pass through. The environment
    variable REPRO_AUTO_DTYPE (fp32 or bf16) overrides the detection: the test suite runs with bf16
    off and on by it (tests/conftest.py's --auto-dtype), and a user can by it where detection errs."""
    if dtype != 'auto':
        return dtype
    forced = os.environ.get(AUTO_DTYPE_ENV, '')
    if forced:
        if forced not in ('fp32', 'bf16'):
            raise ValueError(f'{AUTO_DTYPE_ENV}={forced!r}: set it to fp32 or bf16, or unset it')
        return forced
    if str(device).startswith('cuda'):
        return 'bf16' if torch.cuda.is_bf16_supported() else 'fp32'
    return 'bf16' if str(device) == 'cpu' and cpu_has_native_bf16() else 'fp32'


# -----------------------------------------------------------------------------
# U-Net (DDPM). PyTorch default init everywhere (DDPM zero-inits some output convs; not needed here).

class ResBlock(nn.Module):
    def __init__(self, in_ch, out_ch, temb_dim, dropout):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, in_ch, eps=1e-6)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = nn.GroupNorm(32, out_ch, eps=1e-6)
        self.dropout = ShardedDropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, temb):
        """x: (B, in_ch, H, W), temb: silu of the time embedding (B, temb_dim) -> (B, out_ch, H, W)"""
        h = self.conv1(F.silu(self.norm1(x)))
        h += self.temb_proj(temb)[:, :, None, None]  # in place is safe: a conv does not save its output
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h.add_(self.skip(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with residual."""

    def __init__(self, ch):
        super().__init__()
        self.norm = nn.GroupNorm(32, ch, eps=1e-6)
        self.qkv = nn.Linear(ch, 3 * ch)  # fused q, k, v (diffusers to_q/to_k/to_v stacked)
        self.proj = nn.Linear(ch, ch)

    def forward(self, x):
        """x: (B, C, H, W) -> (B, C, H, W)"""
        B, C, H, W = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, HW, C); a view if channels_last
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        h = self.proj(F.scaled_dot_product_attention(q, k, v))  # scale 1/sqrt(C)
        return x + h.reshape(B, H, W, C).permute(0, 3, 1, 2)


class UNet(nn.Module):
    """DDPM U-Net. forward(x (B, in_ch, S, S), t (B,) long in 0..T-1) -> eps prediction (B, out_ch, S, S).
    Opt-in on CPU: model.to(memory_format=torch.channels_last) runs the net channels_last (same numbers),
    1.05-1.07x faster fp32 steps for ch=128 but none at ch=32, and slower under bf16 autocast."""

    def __init__(self, in_ch, ch, ch_mult, num_res_blocks, attn_res, dropout, img_size, out_ch=None):
        super().__init__()
        temb_dim = 4 * ch
        self.ch = ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)

        # down path; skip_chs records the channels of every hidden state kept for the skips
        skip_chs, cur, res = [ch], ch, img_size
        self.down = nn.ModuleList()
        for i, m in enumerate(ch_mult):
            level = nn.Module()
            level.res, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                level.res.append(ResBlock(cur, ch * m, temb_dim, dropout))
                cur = ch * m
                if res in attn_res:
                    level.attn.append(AttnBlock(cur))
                skip_chs.append(cur)
            if i != len(ch_mult) - 1:
                level.downsample = nn.Conv2d(cur, cur, 3, stride=2)  # input padded (0,1,0,1) in forward
                skip_chs.append(cur)
                res //= 2
            self.down.append(level)

        self.mid_res1 = ResBlock(cur, cur, temb_dim, dropout)
        self.mid_attn = AttnBlock(cur)
        self.mid_res2 = ResBlock(cur, cur, temb_dim, dropout)

        # up path, lowest resolution first; each level eats num_res_blocks+1 skips
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(ch_mult))):
            level = nn.Module()
            level.res, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.res.append(ResBlock(cur + skip_chs.pop(), ch * m, temb_dim, dropout))
                cur = ch * m
                if res in attn_res:
                    level.attn.append(AttnBlock(cur))
            if i != 0:
                level.upsample = nn.Conv2d(cur, cur, 3, padding=1)
                res *= 2
            self.up.append(level)

        self.norm_out = nn.GroupNorm(32, cur, eps=1e-6)
        self.conv_out = nn.Conv2d(cur, out_ch or in_ch, 3, padding=1)

    def forward(self, x, t):
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        # the net runs in its weights' memory format (model.to(memory_format=torch.channels_last))
        cl = self.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        temb = F.silu(self.time_mlp(timestep_embedding(t, self.ch)))  # every ResBlock starts with silu(temb)
        hs = [self.conv_in(x)]
        for level in self.down:
            for j, block in enumerate(level.res):
                h = block(hs[-1], temb)
                hs.append(level.attn[j](h) if len(level.attn) else h)
            if hasattr(level, 'downsample'):
                hs.append(level.downsample(F.pad(hs[-1], (0, 1, 0, 1))))
        h = self.mid_res2(self.mid_attn(self.mid_res1(hs[-1], temb)), temb)
        for level in self.up:
            for j, block in enumerate(level.res):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, 'upsample'):
                h = level.upsample(F.interpolate(h, scale_factor=2.0, mode='nearest'))
        return self.conv_out(F.silu(self.norm_out(h))).contiguous()  # NCHW for the callers


# -----------------------------------------------------------------------------
# MLP for toy vector data

class MLPDenoiser(nn.Module):
    """forward(x (B, dim), t (B,) long in 0..T-1) -> eps prediction (B, dim).
    depth hidden layers of width `hidden`; the time embedding is added before every SiLU."""

    def __init__(self, dim, hidden=256, depth=4, temb_dim=128):
        super().__init__()
        self.temb_dim = temb_dim
        self.time_mlp = nn.Sequential(nn.Linear(temb_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.layers = nn.ModuleList([nn.Linear(dim if i == 0 else hidden, hidden) for i in range(depth)])
        self.out = nn.Linear(hidden, dim)

    def forward(self, x, t):
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        # integer t in 0..999 is fine for the 10000-period sinusoids: wavelengths span 2*pi .. 2*pi*1e4
        temb = self.time_mlp(timestep_embedding(t, self.temb_dim))
        h = x
        for layer in self.layers:
            h = F.silu(layer(h) + temb)
        return self.out(h)


# -----------------------------------------------------------------------------
# presets and construction

MODEL_CONFIGS = {
    # DDPM's CIFAR-10 net == diffusers google/ddpm-cifar10-32
    'cifar10': dict(kind='unet', ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_res=(16,), dropout=0.1),
    # DDIM's CelebA-64 net
    'celeba64': dict(kind='unet', ch=128, ch_mult=(1, 2, 2, 2, 4), num_res_blocks=2, attn_res=(16,), dropout=0.1),
    # same as the cifar10 net without dropout (the paper gives no ImageNet-32 architecture)
    'imagenet32': dict(kind='unet', ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_res=(16,), dropout=0.0),
    'mnist': dict(kind='unet', ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_res=(14,), dropout=0.1),
    'small': dict(kind='unet', ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_res=(16,), dropout=0.0),
    'tiny': dict(kind='unet', ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_res=(), dropout=0.0),
    'mlp': dict(kind='mlp', hidden=256, depth=4, temb_dim=128),
}


def build_model(config_name, data_shape, **overrides):
    """data_shape: (C, H, W) for images (H == W) or (D,) for vectors; overrides replace preset keys."""
    if config_name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model config {config_name!r}; choose one of {sorted(MODEL_CONFIGS)}")
    cfg = dict(MODEL_CONFIGS[config_name])
    bad = sorted(set(overrides) - (set(cfg) - {'kind'}))
    if bad:
        raise ValueError(f"unknown override(s) {bad} for config {config_name!r}; allowed: {sorted(set(cfg) - {'kind'})}")
    cfg.update(overrides)
    kind, shape = cfg.pop('kind'), tuple(data_shape)
    if kind == 'mlp':
        if len(shape) != 1:
            raise ValueError(f"config {config_name!r} is an MLP for vector data (D,), got data_shape {shape}")
        return MLPDenoiser(shape[0], **cfg)
    if len(shape) != 3:
        raise ValueError(f"config {config_name!r} is a U-Net for images (C, H, W), got data_shape {shape}")
    C, H, W = shape
    n_down = len(cfg['ch_mult']) - 1
    if H != W or H % 2 ** n_down:
        raise ValueError(f"config {config_name!r} needs square images with size divisible by 2**{n_down} "
                         f"(every downsampled size must halve exactly), got {H}x{W}")
    if any(cfg['ch'] * m % 32 for m in cfg['ch_mult']):
        raise ValueError(f"GroupNorm(32) needs ch*ch_mult divisible by 32, got ch={cfg['ch']} ch_mult={cfg['ch_mult']}")
    cfg['ch_mult'], cfg['attn_res'] = tuple(cfg['ch_mult']), tuple(cfg['attn_res'])
    return UNet(C, img_size=H, **cfg)


def count_params(model):
    return sum(p.numel() for p in model.parameters())


# -----------------------------------------------------------------------------
# released DDPM weights (diffusers UNet2DModel folder) -> our UNet state dict

# config fields that define DDPM's architecture: (value we need, diffusers default when the key is absent)
_DDPM_FIELDS = {
    'act_fn': ('silu', 'silu'), 'norm_eps': (1e-6, 1e-5), 'norm_num_groups': (32, 32),
    'flip_sin_to_cos': (False, True), 'freq_shift': (1, 0), 'time_embedding_type': ('positional', 'positional'),
    'downsample_padding': (0, 1), 'resnet_time_scale_shift': ('default', 'default'),
    'attention_head_dim': (None, 8), 'center_input_sample': (False, False), 'mid_block_scale_factor': (1, 1),
    'mid_block_type': ('UNetMidBlock2D', 'UNetMidBlock2D'), 'add_attention': (True, True),
    'downsample_type': ('conv', 'conv'), 'upsample_type': ('conv', 'conv'), 'attn_norm_num_groups': (None, None),
    'class_embed_type': (None, None), 'num_class_embeds': (None, None), 'time_embedding_dim': (None, None),
}
_WEIGHTS = ('diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin')
_RENAMES = [  # diffusers key pattern -> ours, applied in order
    (r'^time_embedding\.linear_1', 'time_mlp.0'), (r'^time_embedding\.linear_2', 'time_mlp.2'),
    (r'^down_blocks', 'down'), (r'^up_blocks', 'up'), (r'\.resnets\.', '.res.'), (r'\.attentions\.', '.attn.'),
    (r'\.downsamplers\.0\.conv', '.downsample'), (r'\.upsamplers\.0\.conv', '.upsample'),
    (r'^mid_block\.res\.0', 'mid_res1'), (r'^mid_block\.res\.1', 'mid_res2'), (r'^mid_block\.attn\.0', 'mid_attn'),
    (r'time_emb_proj', 'temb_proj'), (r'conv_shortcut', 'skip'), (r'group_norm', 'norm'),
    (r'(to_out\.0|proj_attn)', 'proj'), (r'\.(query|to_q)\.', '.q.'), (r'\.(key|to_k)\.', '.k.'),
    (r'\.(value|to_v)\.', '.v.'), (r'^conv_norm_out', 'norm_out'),
]


HUB_ID = re.compile(r'^[A-Za-z0-9][\w.-]*/[\w.-]+$')   # owner/name, as google/ddpm-cifar10-32


def resolve_weights(path):
    """`path` itself if it exists or is no hub id; a hub model id (owner/name) -> its folder in the
    huggingface cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub), fetched
    first if it is not cached and the hub can be reached (not under HF_HUB_OFFLINE=1). The weights
    stay the hub's; load_diffusers_unet converts them as it converts any local folder."""
    if os.path.exists(path) or not HUB_ID.match(path):
        return path
    how = (f"fetch it where there is internet (huggingface-cli download {path}, then copy the cache to "
           f"this machine's HF_HOME) or put its files (config.json, diffusion_pytorch_model.safetensors) "
           f"in a folder and pass that folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f'{path} is no local path; as a hub model id it needs huggingface_hub '
                                f'(pip install huggingface_hub), or {how}') from None
    cache = os.environ.get('HF_HUB_CACHE') or None   # read now, not at huggingface_hub's import
    kw = dict(cache_dir=cache, allow_patterns=['*.json', *_WEIGHTS])
    try:
        return snapshot_download(path, local_files_only=True, **kw)
    except Exception:   # not in the cache
        pass
    if os.environ.get('HF_HUB_OFFLINE', '').lower() not in ('1', 'true', 'yes', 'on'):
        try:
            return snapshot_download(path, **kw)
        except Exception as e:
            why = f"{type(e).__name__}: {' '.join(str(e).split())[:100]}"
            raise FileNotFoundError(f'{path} is no local path, not in the huggingface cache, and could '
                                    f'not be fetched ({why}): {how}') from None
    raise FileNotFoundError(f'{path} is no local path and not in the huggingface cache (HF_HUB_OFFLINE '
                            f'is set): {how}')


def _unet_dir(path):
    sub = os.path.join(path, 'unet')  # a whole pipeline folder keeps the U-Net in unet/
    return sub if os.path.isfile(os.path.join(sub, 'config.json')) else path


def is_diffusers_folder(path):
    d = _unet_dir(str(path))
    return os.path.isfile(os.path.join(d, 'config.json')) and any(os.path.isfile(os.path.join(d, w)) for w in _WEIGHTS)


def load_diffusers_unet(folder):
    """diffusers UNet2DModel folder (DDPM architecture) -> (state_dict for our UNet, MODEL_CONFIGS name,
    data shape (C, H, W))."""
    d = _unet_dir(str(folder))
    if not is_diffusers_folder(d):
        raise FileNotFoundError(f"{folder}: expected config.json and {_WEIGHTS[0]} (or .bin); download "
                                f"google/ddpm-cifar10-32 (config.json and {_WEIGHTS[0]}) from the Hugging Face hub into {folder}")
    with open(os.path.join(d, 'config.json')) as f:
        c = json.load(f)
    for k, (need, default) in _DDPM_FIELDS.items():
        if c.get(k, default) != need:
            raise ValueError(f"{folder}: config field {k}={c.get(k, default)!r} but DDPM needs {need!r}; "
                             "only DDPM-architecture folders are supported")
    down, up = list(c['down_block_types']), list(c['up_block_types'])
    attn = [b == 'AttnDownBlock2D' for b in down]
    if (set(down) - {'DownBlock2D', 'AttnDownBlock2D'} or set(up) - {'UpBlock2D', 'AttnUpBlock2D'}
            or [b == 'AttnUpBlock2D' for b in up] != attn[::-1] or c.get('out_channels', 3) != c.get('in_channels', 3)):
        raise ValueError(f"{folder}: down/up_block_types {down} / {up} (or in/out_channels) are not a DDPM layout; "
                         "only DDPM-architecture folders are supported")
    size = c.get('sample_size') or 32
    size = size[0] if isinstance(size, (list, tuple)) else size
    got = dict(block_out_channels=list(c['block_out_channels']), layers_per_block=c.get('layers_per_block', 2),
               attn_res=sorted(size // 2 ** i for i, a in enumerate(attn) if a))
    best, diffs = None, []
    for name, p in MODEL_CONFIGS.items():  # first match wins, so cifar10 before imagenet32
        if p['kind'] != 'unet':
            continue
        want = dict(block_out_channels=[p['ch'] * m for m in p['ch_mult']], layers_per_block=p['num_res_blocks'],
                    attn_res=sorted(size // 2 ** i for i in range(len(p['ch_mult'])) if size // 2 ** i in p['attn_res']))
        diffs.append([f"{k}={got[k]} (preset {name!r} has {want[k]})" for k in want if got[k] != want[k]])
        if not diffs[-1]:
            best = name
            break
    if best is None:
        raise ValueError(f"{folder}: {', '.join(min(diffs, key=len))}; only DDPM-architecture folders "
                         "matching a MODEL_CONFIGS U-Net preset are supported")

    w = os.path.join(d, _WEIGHTS[0])
    if os.path.isfile(w):
        from safetensors.torch import load_file
        src = load_file(w)
    else:
        src = torch.load(os.path.join(d, _WEIGHTS[1]), map_location='cpu', weights_only=True)
    sd = {}
    for k, v in src.items():
        for pat, rep in _RENAMES:
            k = re.sub(pat, rep, k)
        sd[k] = v
    for k in [k for k in sd if re.search(r'\.q\.(weight|bias)$', k)]:  # fuse q, k, v into one Linear
        pre, kind = k.rsplit('.q.', 1)
        sd[f'{pre}.qkv.{kind}'] = torch.cat([sd.pop(f'{pre}.{n}.{kind}') for n in 'qkv'])
    with torch.device('meta'):  # check keys and shapes without allocating a model
        ref = build_model(best, (c.get('in_channels', 3), size, size)).state_dict()
    if set(sd) != set(ref) or any(sd[k].shape != ref[k].shape for k in ref):
        raise ValueError(f"{folder}: weights do not map onto preset {best!r} "
                         f"(unmapped: {sorted(set(sd) - set(ref))[:3]}, missing: {sorted(set(ref) - set(sd))[:3]})")
    return sd, best, (c.get('in_channels', 3), size, size)
