"""Issue 28's Table 1 analogue on MNIST (experiments/table1.py): the job list, the chains' streams and
the report on a synthetic fixture (no MNIST training: the protocol's own cost is in RESULTS.md)."""
import json
from argparse import Namespace

import numpy as np
import pytest
import torch

import runtime as R
from experiments import table1 as T1


def test_job_list_bases_first_and_every_arm_from_its_own_seed():
    jobs = T1.job_list(Namespace(seeds=[0, 1, 2, 3, 4], t1_base_steps=300, t1_ft_steps=20))
    bases = [j for j in jobs if j['kind'] == 't1_base']
    assert jobs[:3] == bases and [j['seed'] for j in bases] == [0, 1, 2]   # Table 1's 3 seeds
    arms = jobs[3:]
    assert [j['method'] for j in arms[:4]] == list(T1.ARMS) and len(arms) == 12
    assert all(j['deps'] == [T1.base_name(j['seed'])] and j['steps'] == 20 for j in arms)
    lit = next(j for j in arms if j['method'] == 'lit')
    assert lit['flags'][-3:] == ['--reg', '--reg-norm', 'sum1'] and '--T' in lit['flags']
    assert T1.stages(300) == [300] and T1.stages(T1.BASE_STEPS) == list(T1.STAGES)


def test_chains_share_x_T_across_samplers_and_never_a_noise_stream(monkeypatch):
    """At one S both samplers start from the same x_T (a paired comparison) and each has its own chain
    noise; the streams depend on (seed, S) alone, so every arm of one seed gets the same draws."""
    import model as M
    net, diff = M.build_model('mlp', (2,)).eval(), R.make_diffusion(dict(T=20, beta_1=1e-3, beta_T=0.2, sigma='beta'))
    a = T1.chains(net, diff, (2,), 0, 6, 'ddpm', 10, chunk=4)
    assert a.shape == (6, 2) and torch.equal(a, T1.chains(net, diff, (2,), 0, 6, 'ddpm', 10, chunk=4))
    assert not torch.equal(a, T1.chains(net, diff, (2,), 1, 6, 'ddpm', 10, chunk=4))
    seen, run = [], diff.sample_chain

    def spy(model, x, *args, generator=None, **kw):   # x_T and the chain's first z of every chunk
        twin = torch.Generator()
        twin.set_state(generator.get_state())
        seen.append((x.clone(), torch.randn(x.shape, generator=twin)))
        return run(model, x, *args, generator=generator, **kw)
    monkeypatch.setattr(diff, 'sample_chain', spy)
    for sampler in ('ddpm', 'ddim'):
        T1.chains(net, diff, (2,), 0, 6, sampler, 10, chunk=4)
    (xp, zp), (xd, zd) = seen[0], seen[2]   # the first chunk of each sampler
    assert torch.equal(xp, xd) and not torch.equal(zp, zd)
    assert not any(torch.equal(x, z) for x, z in seen) and not torch.equal(seen[0][0][:2], seen[1][0])


def test_summary_pairs_arms_with_the_control_by_seed(tmp_path):
    jobs = T1.job_list(Namespace(seeds=[0, 1, 2], t1_base_steps=200, t1_ft_steps=20))
    shift = dict(control=0.0, lit=1.5, ip=-0.5, sa=-4.0)
    rng = np.random.default_rng(0)
    (tmp_path / 'table1').mkdir()
    for seed in range(3):
        noise = {f'{s}{S}': 10 * rng.standard_normal() for s, S in T1.EVAL}
        for j in (j for j in jobs if j['seed'] == seed):
            m = j['method']
            res = dict(job=j, steps=j['steps'], train_wall_s=10.0, eval_wall_s=20.0)
            if m == 'base':
                res['plateau'] = [dict(step=st, scores={'ddpm20': dict(fd=1000.0 / st), 'ddpm100': dict(fd=900.0 / st)},
                                       floor=dict(fd=12.0 + seed)) for st in (100, 200)]
            else:
                res['scores'] = {k: dict(fd=50 + v + shift[m], kid=5 * (50 + v) + 2 * shift[m]) for k, v in noise.items()}
                for sampler, S in T1.ES_AT:   # ES takes 3 FD off every model, picking B = 1.1
                    plain = res['scores'][f'{sampler}{S}']
                    res['scores'][f'{sampler}{S}_es'] = dict(fd=plain['fd'] - 3, kid=plain['kid'], es_scale=1.1, es_grid={})
                res['scores']['floor'] = dict(fd=11.0 + 0.1 * seed, kid=0.5)
                if m in ('control', 'lit'):
                    res['reg_grad'] = dict(median_ratio=0.01 if m == 'control' else 1e-6, mean_cos_reg=0.1 * seed, mean_cos_nll=0.9)
                if seed == 0:
                    res['grids'] = {k: np.full((T1.GRID_N, 14, 14), 40 * i, np.uint8).tolist() for i, k in enumerate(T1.GRID_AT)}
            if m == 'sa' and seed == 2:   # cut by the budget: the arm is reported on its 2 seeds
                continue
            R.write_json(tmp_path / 'table1' / f"{j['name']}.json", res)
    md = T1.summary(str(tmp_path / 'table1'))
    out = json.load(open(tmp_path / 'table1_mnist.json'))
    assert out['seeds'] == [0, 1, 2] and (tmp_path / 'table1_mnist.png').is_file() and out['runs'] == 14
    for key, scale in (('fd', 1), ('kid', 2)):
        cells = out['tables'][key]
        assert len(cells) == 3 * (len(T1.EVAL) + len(T1.ES_AT)) and {c['arm'] for c in cells} == {'lit', 'ip', 'sa'}
        for c in cells:
            assert c['diff'] == pytest.approx(scale * shift[c['arm']], abs=1e-9) and c['n'] == (2 if c['arm'] == 'sa' else 3)
            assert c['floor_mean'] == pytest.approx(11.1 if key == 'fd' else 0.5)
    es = out['es']['ddpm20_es']
    assert [c['arm'] for c in es] == ['control', 'lit', 'ip', 'sa'] and all(c['diff'] == pytest.approx(-3) for c in es)
    assert es[0]['scales'] == [1.1] * 3 and 'ddpm S = 20 + ES' in md and '(B 1.1)' in md
    assert out['plateau']['ddpm20'] == {'100': [10.0, 0.0], '200': [5.0, 0.0]}
    assert out['plateau_floor'][0] == pytest.approx(13.0) and set(out['weights']) == {'control', 'lit'}
    assert out['weights']['lit']['mean_cos_reg'] == pytest.approx([0.1, 0.1]) and '| reg, Algorithm 1 literally | 1e-06 ± 0 |' in md
    assert out['process_hours'] == pytest.approx(14 * 30 / 3600) and '(n = 2)' in md
    assert md.startswith("**Table 1's analogue, MNIST 14 x 14, T = 1000: Frechet distance** (3 seeds")
    assert '| reg, Algorithm 1 literally | +1.50 [' in md and 'KID (cubic kernel, unbiased)' in md


def test_summary_needs_two_complete_seeds(tmp_path):
    (tmp_path / 'table1').mkdir()
    assert 'at least 2 are needed' in T1.summary(str(tmp_path / 'table1'))
    assert not (tmp_path / 'table1_mnist.json').exists()
