"""The speed-ups in model.UNet (silu(temb) once, in-place adds, channels_last) leave the numbers alone:
the optimised forward and its gradients equal a plain re-statement of DDPM's forward to float rounding."""
import copy
import os

import pytest
import torch
import torch.nn.functional as F

from model import build_model, cpu_has_native_bf16

CL = torch.channels_last


def ref_resblock(b, x, temb):
    h = b.conv1(F.silu(b.norm1(x)))
    h = h + b.temb_proj(F.silu(temb))[:, :, None, None]
    h = F.silu(b.norm2(h))
    if b.training and b.dropout.p:   # model.ShardedDropout on one rank: a uniform per element, kept if >= p
        h = h * (torch.rand(h.shape) >= b.dropout.p).to(h.dtype) / (1 - b.dropout.p)
    h = b.conv2(h)
    return b.skip(x) + h


def ref_attn(a, x):
    B, C, H, W = x.shape
    h = a.norm(x).reshape(B, C, H * W).transpose(1, 2)
    q, k, v = a.qkv(h).chunk(3, dim=-1)
    h = a.proj(torch.softmax(q @ k.transpose(1, 2) / C ** 0.5, dim=-1) @ v)
    return x + h.transpose(1, 2).reshape(B, C, H, W)


def ref_forward(m, x, t):
    """DDPM's U-Net forward written out plainly (NCHW, explicit attention, silu(temb) per block)."""
    from model import timestep_embedding
    x = x.contiguous()
    temb = m.time_mlp(timestep_embedding(t, m.ch))
    hs = [m.conv_in(x)]
    for level in m.down:
        for j, block in enumerate(level.res):
            h = ref_resblock(block, hs[-1], temb)
            hs.append(ref_attn(level.attn[j], h) if len(level.attn) else h)
        if hasattr(level, 'downsample'):
            hs.append(level.downsample(F.pad(hs[-1], (0, 1, 0, 1))))
    h = ref_resblock(m.mid_res2, ref_attn(m.mid_attn, ref_resblock(m.mid_res1, hs[-1], temb)), temb)
    for level in m.up:
        for j, block in enumerate(level.res):
            h = ref_resblock(block, torch.cat([h, hs.pop()], dim=1), temb)
            if len(level.attn):
                h = ref_attn(level.attn[j], h)
        if hasattr(level, 'upsample'):
            h = level.upsample(F.interpolate(h, scale_factor=2.0, mode='nearest'))
    return m.conv_out(F.silu(m.norm_out(h)))


def _net(dropout, fmt):
    torch.manual_seed(0)
    m = build_model('small', (3, 16, 16), dropout=dropout)  # attention at 16x16, two levels below it
    with torch.no_grad():  # non-zero biases everywhere so every term of the forward matters
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.to(memory_format=fmt)


def _run(fwd, m, x, t, seed=1):
    m.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    y = fwd(m, x, t)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    return y.detach(), torch.cat([p.grad.flatten() for p in m.parameters()])


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize('fmt', [torch.contiguous_format, CL], ids=['nchw', 'channels_last'])
@pytest.mark.parametrize('dropout', [0.0, 0.1])
def test_forward_and_grads_match_plain_reference(dropout, fmt):
    m = _net(dropout, fmt).eval()   # eval: dropout off, so both layouts compare to the same numbers
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 500, 999])
    y, g = _run(lambda m, x, t: m(x, t), m, x, t)
    y_ref, g_ref = _run(ref_forward, m, x, t)
    assert y.shape == x.shape and y.is_contiguous()   # NCHW back to the caller in either layout
    assert _rel(y, y_ref) < 1e-5 and _rel(g, g_ref) < 1e-5
    # the test can fail: a real change to the network (one bias nudged by 0.1) is far outside the tolerance
    with torch.no_grad():
        m.mid_attn.proj.bias[0] += 0.1
    assert _rel(m(x, t), y_ref) > 1e-4


@pytest.mark.parametrize('fmt', [torch.contiguous_format, CL], ids=['nchw', 'channels_last'])
def test_train_mode_dropout_matches_reference(fmt):
    """Dropout draws its mask by the element's logical index: the same mask from the same seed in
    either memory layout."""
    m = _net(0.1, fmt).train()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    y, g = _run(lambda m, x, t: m(x, t), m, x, t)
    y_ref, g_ref = _run(ref_forward, m, x, t)
    assert _rel(y, y_ref) < 1e-5 and _rel(g, g_ref) < 1e-5
    assert _rel(_run(ref_forward, m, x, t, seed=2)[0], y_ref) > 1e-3   # the masks do matter


def test_channels_last_state_dict_and_input_layouts():
    a = _net(0.0, torch.contiguous_format).eval()
    b = copy.deepcopy(a).to(memory_format=CL)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    c = _net(0.0, CL)
    c.load_state_dict(a.state_dict())   # an NCHW checkpoint loads into a channels_last net and back
    a.load_state_dict(c.state_dict())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    with torch.no_grad():
        y = a(x, t)
        for m in (b, c):
            for inp in (x, x.contiguous(memory_format=CL)):
                out = m(inp, t)
                assert out.is_contiguous() and _rel(out, y) < 1e-5


def test_cpu_has_native_bf16_is_bool():
    assert isinstance(cpu_has_native_bf16(), bool)


# ---- --dtype: auto resolves to what the hardware runs; only the network leaves fp32 ----------------
def test_resolve_dtype():
    from model import resolve_dtype
    assert resolve_dtype('fp32', 'cpu') == 'fp32' and resolve_dtype('bf16', 'cpu') == 'bf16'
    assert resolve_dtype('auto', 'cpu') == (os.environ.get('REPRO_AUTO_DTYPE') or
                                            ('bf16' if cpu_has_native_bf16() else 'fp32'))


def test_auto_dtype_can_be_forced_by_the_environment(monkeypatch):
    """REPRO_AUTO_DTYPE decides what auto means (the suite's --auto-dtype); explicit dtypes pass through."""
    from model import resolve_dtype
    monkeypatch.delenv('REPRO_AUTO_DTYPE', raising=False)
    assert resolve_dtype('auto', 'mps') == 'fp32'
    for forced in ('fp32', 'bf16'):
        monkeypatch.setenv('REPRO_AUTO_DTYPE', forced)
        assert resolve_dtype('auto', 'cpu') == forced and resolve_dtype('fp32', 'cpu') == 'fp32'
    monkeypatch.setenv('REPRO_AUTO_DTYPE', 'fp16')
    with pytest.raises(ValueError, match='REPRO_AUTO_DTYPE'):
        resolve_dtype('auto', 'cpu')


def test_bf16_network_fp32_chain():
    """net_dtype bf16: the network computes in bf16 (its output differs from fp32 by bf16 rounding,
    not more), eps comes back float32, and the chain's state stays float32."""
    from diffusion import Diffusion
    torch.manual_seed(0)
    net = build_model('tiny', (1, 8, 8)).eval()
    d32, d16 = Diffusion(T=20), Diffusion(T=20, net_dtype='bf16')
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([1, 5, 10, 20])
    with torch.no_grad():
        e32, e16 = d32.eps(net, x, t), d16.eps(net, x, t)
        assert e32.dtype == e16.dtype == torch.float32
        rel = ((e16 - e32).norm() / e32.norm()).item()
        assert 0 < rel < 0.05, rel   # bf16 really ran (not 0), and only rounding apart
        seen = []
        out = d16.sample(net, (2, 1, 8, 8), steps=5, generator=torch.Generator().manual_seed(0),
                         callback=lambda t, x: seen.append(x.dtype))
    assert out.dtype == torch.float32 and set(seen) == {torch.float32}
    with pytest.raises(ValueError, match='net_dtype'):
        Diffusion(T=20, net_dtype='fp16')


def test_fault_tolerance_runs_the_network_in_fp32():
    """A(t) is a difference of two chains, which bf16 rounding would floor: fault_tolerance gives
    exactly the fp32 answer under a bf16 Diffusion, and leaves the Diffusion's dtype as it was."""
    from diffusion import Diffusion
    from mmd import fault_tolerance
    torch.manual_seed(0)
    net = build_model('tiny', (1, 8, 8)).eval()
    d32, d16 = Diffusion(T=20), Diffusion(T=20, net_dtype='bf16')
    x_T = torch.randn(8, 1, 8, 8)
    ref, got = (fault_tolerance(net, d, x_T, 12, 0.01, steps=5, noise_seed=3) for d in (d32, d16))
    assert got['amp'] == ref['amp'] and got['gap'] == ref['gap']
    assert d16.net_dtype == 'bf16'
