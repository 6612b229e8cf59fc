"""Evaluation randomness (runtime.eval_rngs): every purpose (x_T, chain noise, perturbation,
reference draws) its own stream, so that x_T is never the first step's z, as it was in
evaluate faulttol and in the protocol's A(t); the protocol's 'legacy' streams stay the old ones."""
import json

import pytest
import torch

import evaluate as ev
import runtime as R
from diffusion import Diffusion
from experiments import protocol as P

PURPOSES = ('x_T', 'chain', 'perturb', 'ref')


def first(g, shape=(250, 2)):
    """The next draw of g without consuming it."""
    c = torch.Generator(g.device).set_state(g.get_state())
    return torch.randn(shape, generator=c)


def test_streams_apart_deterministic_and_pinned():
    g = R.eval_rngs(7)
    draws = {p: first(g[p]) for p in PURPOSES}
    for i, p in enumerate(PURPOSES):
        for q in PURPOSES[i + 1:]:
            assert not torch.equal(draws[p], draws[q]), (p, q)
    again = R.eval_rngs(7)
    assert all(torch.equal(draws[p], first(again[p])) for p in PURPOSES)
    assert not torch.equal(draws['x_T'], first(R.eval_rngs(8)['x_T']))
    # a hash of the names (blake2b), not Python's salted hash(): the same seed on every run and platform
    assert R.seed_of(0, 'eval-x_T') == R.seed_of(0, 'eval-x_T') and R.seed_of(0, 'eval-x_T') == 6910484189612045484


def test_legacy_streams_are_the_old_seeds():
    """What results/steps was evaluated with: x_T and z from manual_seed(seed) (the collision),
    the perturbation from seed + 1."""
    g = R.eval_rngs(0, legacy=True)
    old = lambda s: torch.randn((250, 2), generator=torch.Generator().manual_seed(s))  # noqa: E731
    assert torch.equal(first(g['x_T']), old(0)) and torch.equal(first(g['chain']), old(0))
    assert torch.equal(first(g['perturb']), old(1))


def spy(monkeypatch, module, seen):
    real = module.fault_tolerance

    def wrapped(model, diff, x_T, t0, delta, *args, generators=None, **kw):
        seen.append((x_T.clone(), None if generators is None else first(generators['chain'], x_T.shape)))
        return real(model, diff, x_T, t0, delta, *args, generators=generators, **kw)
    monkeypatch.setattr(module, 'fault_tolerance', wrapped)


def test_evaluate_faulttol_x_T_is_not_the_first_chain_noise(tmp_path, monkeypatch):
    import train
    train.main(['--dataset', '8gaussians', '--max-steps', '3', '--T', '20', '--toy-n', '500', '--out-dir',
                str(tmp_path / 'r'), '--log-every', '100', '--n-preview', '16', '--device', 'cpu'])
    seen = []
    spy(monkeypatch, ev, seen)
    ev.main(['faulttol', '--ckpt', str(tmp_path / 'r'), '--steps', '10', '--t0', '10', '4', '--delta', '0.1',
             '--n', '32', '--seed', '0', '--out', str(tmp_path / 'f'), '--device', 'cpu'])
    assert len(seen) == 2 and json.load(open(tmp_path / 'f.json'))['runs'][0]['t'][0] == 10
    for x_T, z in seen:
        assert z is not None and z.shape == x_T.shape and not torch.equal(x_T, z)
        assert not torch.allclose(x_T, z, atol=0.1)
    assert torch.equal(seen[0][1], seen[1][1])   # every t0: the same z (a fresh chain stream each)


@pytest.mark.parametrize('streams', P.STREAMS)
def test_protocol_faulttol_streams(monkeypatch, streams):
    """evaluate_steps' A(t) on a stub network: independent streams keep x_T and z apart; legacy
    keeps the old collision (how results/steps was computed), bit for bit."""
    cfg = dict(dataset='8gaussians', data_shape=[2], data_dir='data', image_size=None, toy_n=500, seed=0)
    diff = Diffusion(20, 1e-4, 0.2, 'beta')
    seen = []
    spy(monkeypatch, P, seen)
    out = P.evaluate_steps(lambda x, t: 0.1 * x, diff, cfg, n=40, n_select=20, es_max_steps=0, n_ref=50, fast=False,
                           streams=streams)
    assert len(seen) == 3 and set(out['faulttol'][20]) == set(P.T0_FRACTIONS)
    for x_T, z in seen:
        assert torch.equal(x_T, z) == (streams == 'legacy')
    if streams == 'legacy':   # the old call: x_T from manual_seed(EVAL_SEED), noise_seed 0
        old = P.fault_tolerance(lambda x, t: 0.1 * x, diff, seen[0][0], out['faulttol'][20][0.9]['t0'], 0.1,
                                steps=20, kernels=())
        assert torch.equal(seen[0][0], torch.randn((40, 2), generator=torch.Generator().manual_seed(P.EVAL_SEED)))
        assert old['amp'] == out['faulttol'][20][0.9]['amp'] and 'eval_streams' not in out
    else:
        assert out['eval_streams'] == 'independent'
    with pytest.raises(ValueError, match='streams'):
        P.evaluate_steps(None, diff, cfg, streams='shared')
