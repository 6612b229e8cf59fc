"""experiments/reproduce.py end to end on a miniature step-count protocol: the scheduler, the
timing job, an equal-time run job, the report, and resuming (a finished protocol starts nothing)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import runtime as R

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(tmp_path, *args):
    env = dict(os.environ, REPRO_RESULTS=str(tmp_path / 'results'), REPRO_OUT=str(tmp_path / 'out'),
               OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, '-m', 'experiments.reproduce', *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_bad_settings_fail_with_one_line(tmp_path):
    p = run(tmp_path, '--max-steps', '2')
    assert p.returncode != 0 and p.stderr.strip().splitlines()[-1].startswith('error: ')
    assert not (tmp_path / 'results').exists()


TINY = ['--max-steps', '5', '--seeds', '1', '--n-true', '64', '--n-ref', '128', '--timing-reps', '1',
        '--timing-iters', '1', '--only', 'steps_timing_8gaussians', 'steps_8gaussians_T50_reg_eqtime_s1']


def test_step_count_protocol_runs_reports_and_resumes(tmp_path):
    """One tiny T = 50 --reg run at equal time: the timing job first, then every S <= T for both
    samplers with and without epsilon scaling, the curves at S = 20, the regulariser's floor, the
    report; run again, it starts nothing and keeps the report."""
    p = run(tmp_path, *TINY)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert 'failed: none' in p.stdout
    res = tmp_path / 'results'
    reg = json.loads((res / 'steps' / 'steps_8gaussians_T50_reg_eqtime_s1.json').read_text())
    assert reg['config']['T'] == 50 and reg['config']['reg'] and reg['job']['method'] == 'reg_eqtime'
    # equal time: steps = S / (measured cost ratio of --reg), the ratio from the timing job
    ratio = json.loads((res / 'steps' / 'steps_timing_8gaussians.json').read_text())['methods']['reg']['ratio']
    assert reg['eqtime_ratio'] == ratio and reg['steps'] == max(1, round(5 / ratio))
    assert reg['n_ref'] == 128 and 'vs 128 fresh true draws' in reg['metric']
    assert [(r['sampler'], r['steps']) for r in reg['rows']] == [(s, S) for s in ('ddpm', 'ddim') for S in (10, 20, 50)]
    for r in reg['rows']:   # the chosen scale is the grid's best; at scale 1 +ES is the plain chain
        assert r['es_scale'] == reg['es_grid'][r['es_grid'].index(min(r['es_grid']))]
        assert r['mmd_es'] == r['mmd'] or r['es_scale'] != 1.0
    assert list(reg['curves']) == ['20'] and reg['curves']['20']['t'][0] == 50
    ft = reg['faulttol']['20']
    assert set(ft) == {'0.9', '0.5', '0.1'} and all(f['amp'][0] == 1.0 for f in ft.values())
    assert reg['reg_floor']['mean'] > 0 and 'reg_grad' not in reg   # the gradient fraction: seed 0 only
    assert len(reg['reg_curve']) == 1   # --log-every 10 with < 10 steps: the last step only
    tables = (res / 'steps_tables.md').read_text()
    assert '| 50 | ddpm | 10 |' not in tables   # the table against S needs a vanilla run to pair with
    assert '| 50 | 20 | reg_eqtime |' in tables and '| reg | ' in tables   # shape table, cost table
    assert (res / 'steps_final_8gaussians.png').is_file() and (res / 'steps_curves_8gaussians.png').is_file()
    again = run(tmp_path, *TINY)
    assert again.returncode == 0 and '2 jobs, 0 to run' in again.stdout and 'report kept' in again.stdout


def test_es_search_finds_the_argmin_of_unimodal_scores_with_fewer_scores():
    from experiments.protocol import ES_GRID, es_search
    for k, peak in enumerate(ES_GRID):   # every position of the minimum, and a tie-free V shape
        calls = []
        best, seen = es_search(lambda b: calls.append(b) or abs(ES_GRID.index(b) - k), ES_GRID)
        assert best == peak and 1.0 in seen and len(calls) == len(seen) == len(set(calls)) <= 6


def test_fast_evaluation_equals_the_grid_where_it_shares_nothing(tmp_path):
    """evaluate_steps fast vs grid on a T = 50 model (no S above es_max_steps to share): the same
    plain rows and curves, A(t) from forked chains equal to separate pairs, the ES scores it
    visits equal to the grid's, its pick the best of them."""
    import runtime as R
    from experiments.protocol import evaluate_steps
    p = subprocess.run([sys.executable, 'train.py', '--dataset', '8gaussians', '--T', '50', '--max-steps', '3',
                        '--out-dir', str(tmp_path / 'run'), '--dtype', 'fp32', '--sample-every', '0'],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    model, diff, cfg = R.load_checkpoint(str(tmp_path / 'run'), 'cpu', ema=True)
    grid, fast = (evaluate_steps(model, diff, cfg, n=64, n_select=32, n_ref=128, fast=f) for f in (False, True))
    assert (grid['eval'], fast['eval']) == ('grid', 'fast')
    for g, f in zip(grid['rows'], fast['rows']):
        assert (g['sampler'], g['steps'], g['mmd']) == (f['sampler'], f['steps'], f['mmd'])
        visited = [(a, b) for a, b in zip(g['es_grid'], f['es_grid']) if b is not None]
        assert len(visited) < len(g['es_grid']) and all(a == b for a, b in visited)
        assert f['es_grid'][grid['es_grid'].index(f['es_scale'])] == min(b for _, b in visited)
    assert grid['curves'] == fast['curves']
    for frac, ft in grid['faulttol'][20].items():
        assert ft['t'] == fast['faulttol'][20][frac]['t']
        assert all(abs(a - b) < 1e-5 for a, b in zip(ft['amp'], fast['faulttol'][20][frac]['amp']))


def test_sigterm_stops_the_scheduler_keeps_results_and_a_rerun_resumes(tmp_path):
    """SIGTERM to the scheduler: its running job is stopped (train.py saves where it is), the
    scheduler exits 143 naming it, no result file claims it done; the same command again finishes it."""
    import signal
    import time
    env = dict(os.environ, REPRO_RESULTS=str(tmp_path / 'results'), REPRO_OUT=str(tmp_path / 'out'),
               OMP_NUM_THREADS='1')
    job = 'steps_8gaussians_T50_vanilla_s1'
    args = ['--seeds', '1', '--n-true', '64', '--n-ref', '128', '--only', job]
    p = subprocess.Popen([sys.executable, '-m', 'experiments.reproduce', *args, '--max-steps', '100000'], cwd=REPO,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / 'out' / 'logs' / f'{job}.log'
    for _ in range(600):   # until the job's train.py is inside its loop
        if log.is_file() and 'step ' in log.read_text():
            break
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 143, out[-2000:]
    assert f"stopped by SIGTERM: finished results kept, unfinished jobs ['{job}']" in out
    assert not (tmp_path / 'results' / 'steps' / f'{job}.json').exists()
    assert 'stopped by SIGTERM at step' in log.read_text()   # train.py saved where it was
    again = run(tmp_path, *args, '--max-steps', '5')
    assert again.returncode == 0 and 'failed: none' in again.stdout, again.stdout[-2000:]
    assert (tmp_path / 'results' / 'steps' / f'{job}.json').is_file()


def test_resolution_scores_and_summary(tmp_path, monkeypatch):
    """The toy metric with resolution: unbiased MMD^2 and its floor from streams of (seed, eval
    seed, purpose, S); the summary pairs reg with vanilla by seed, Holm over the table's cells."""
    import model as M
    from experiments import protocol as P, report as RP
    torch.manual_seed(0)
    net, diff = M.build_model('mlp', (2,)).eval(), R.make_diffusion(dict(T=20, beta_1=1e-3, beta_T=0.2, sigma='beta'))
    a = P.resolution_scores(net, diff, '8gaussians', 0, n=60, steps=(5, 10, 1000), eval_seeds=(0, 1))
    b = P.resolution_scores(net, diff, '8gaussians', 0, n=60, steps=(5, 10, 1000), eval_seeds=(0,))
    c = P.resolution_scores(net, diff, '8gaussians', 1, n=60, steps=(5, 10, 1000), eval_seeds=(0,))
    assert sorted(a) == ['e0', 'e1'] and sorted(a['e0']) == ['gaussian', 'laplace'] and sorted(a['e0']['gaussian']) == [5, 10]
    assert a['e0'] == b['e0'] and a['e0'] != a['e1'] and a['e0'] != c['e0']   # deterministic, apart per seed
    assert a['e0']['gaussian'][5]['model'] > 10 * abs(a['e0']['gaussian'][5]['floor'])   # an untrained net
    folder = tmp_path / 'resolution'
    folder.mkdir()
    rng = np.random.default_rng(0)
    for seed in range(4):
        base = {k: {S: dict(model=0.01 + 0.001 * rng.standard_normal(), floor=1e-4 * rng.standard_normal())
                    for S in (10, 20, 50)} for k in ('gaussian', 'laplace')}
        for m, shift in (('vanilla', 0.0), ('reg', 0.005)):
            scores = {f'e{e}': {k: {S: dict(v, model=v['model'] + shift + 1e-5 * e) for S, v in d.items()}
                                for k, d in base.items()} for e in range(3 if seed == 0 else 1)}
            R.write_json(folder / f'resolution_8gaussians_T50_{m}_s{seed}.json',
                         dict(job=dict(regime='T50', method=m, seed=seed), n=60, scores=scores))
    monkeypatch.setattr(RP, 'RES', str(tmp_path))
    md = RP.resolution_summary()
    s = json.load(open(tmp_path / 'resolution_toy.json'))['8gaussians_T50']
    assert s['seeds'] == [0, 1, 2, 3] and len(s['cells']) == 6 and (tmp_path / 'resolution_toy.png').is_file()
    for cell in s['cells']:
        assert cell['diff'] == pytest.approx(0.005) and cell['p_holm'] < 1e-6 and cell['ci'][0] > 0.004
        assert cell['eval_repeat_std'] == pytest.approx(1e-5) and cell['floor_std'] > 0
    assert '| 8gaussians | 50 | gaussian | 10 |' in md and 'Holm' in md


def test_results_md_checks_itself(tmp_path):
    """reproduce --check: RESULTS.md on main agrees with results/; on a fixture, a changed number in
    a copied table, a resolution row, a missing file and a run newer than the report all fail."""
    from experiments import check as RP
    assert RP.check_results() == []
    res = tmp_path / 'results'
    (res / 'steps').mkdir(parents=True)
    (res / 'steps' / 'steps_a_s0.json').write_text('{}')
    table = '| method | S=10 |\n|---|---|\n| sa | -0.0114 ± 0.0023* |\n'
    (res / 'steps_tables.md').write_text(f'note\n\n### Headline, toy, ancestral: change\n{table}\n* = Holm ...\n')
    (res / 'resolution_toy.md').write_text('| set | T | kernel | S | vanilla | floor |\n|---|---|---|---|---|---|\n'
                                           '| toy | 50 | laplace | 10 | 72.28 ± 1.70 | floor |\n')
    good = (f'See results/steps_tables.md.\n\n**toy, ancestral: change**\n\n{table}\n'
            '| toy | 50 | laplace | 10 | 72.28 ± 1.70 | floor |\n')
    md = tmp_path / 'RESULTS.md'
    md.write_text(good)
    assert RP.check_results(str(md), str(res)) == []
    for broken, why in ((good.replace('-0.0114', '-0.0115'), 'differs from results/steps_tables.md'),
                        (good.replace('72.28', '72.29'), 'is not in resolution_toy.md'),
                        (good + 'and results/missing.json\n', 'does not hold')):
        md.write_text(broken)
        bad = RP.check_results(str(md), str(res))
        assert len(bad) == 1 and why in bad[0], bad
    md.write_text(good)
    os.utime(res / 'steps' / 'steps_a_s0.json', (2e9, 2e9))   # a run newer than the report
    assert any('older than a run' in b for b in RP.check_results(str(md), str(res)))


def test_results_md_claims_and_fair_tables_check_and_sync(tmp_path):
    """A claim marker must equal its JSON value at the printed precision; a table copied from
    fair_toy.md must equal it; --sync-tables rewrites copied tables (and only them) from the reports."""
    from experiments import check as RP
    res = tmp_path / 'results'
    res.mkdir()
    R.write_json(res / 'fair_toy.json', dict(tables=dict(T50_laplace=dict(cells=[dict(arm='lit', S=10, diff=2.7359e-4),
                                                                                 dict(arm='m0.2', S=10, diff=-1e-5)]))))
    (res / 'fair_toy.md').write_text('**T = 50, laplace kernel** (3 seeds)\n\n| arm | S = 10 |\n|---|---:|\n| lit | +2.74 |\n')
    claim = '<!-- claim results/fair_toy.json tables.T50_laplace.cells[arm=lit,S=10].diff*1e4 = +2.74 -->'
    good = f'The literal arm: +2.74 {claim}\n\n**T = 50, laplace kernel** (copied)\n\n| arm | S = 10 |\n|---|---:|\n| lit | +2.74 |\n'
    md = tmp_path / 'RESULTS.md'
    md.write_text(good)
    assert RP.check_results(str(md), str(res)) == []
    for broken, why in ((good.replace('= +2.74 -->', '= +2.75 -->'), 'claims'), (good.replace('arm=lit', 'arm=none'), 'claims'),
                        (good.replace('| lit | +2.74 |', '| lit | +2.70 |'), 'differs from results/fair_toy.md')):
        md.write_text(broken)
        bad = RP.check_results(str(md), str(res))
        assert len(bad) == 1 and why in bad[0], bad
    assert RP.claim_value(str(res / 'fair_toy.json'), 'tables.T50_laplace.cells[arm=m0.2,S=10].diff') == pytest.approx(-1e-5)
    R.write_json(res / 'x.json', {'a_m0.2_b': {'10': dict(v=3.5)}})
    assert RP.claim_value(str(res / 'x.json'), 'a_m0.2_b.10.v') == 3.5
    R.write_json(res / 'y.json', dict(w=[0.25, 0.5]))
    assert RP.claim_value(str(res / 'y.json'), 'w[1]') == 0.5 and RP.claim_value(str(res / 'y.json'), 'w[2]') is None
    assert RP.sync_tables(str(md), str(res)) == ['T = 50, laplace kernel']
    assert md.read_text() == good and RP.check_results(str(md), str(res)) == []   # the +2.70 table restored


def test_fair_job_list_and_summary(tmp_path):
    """Issue 28's fair test: every arm fine-tunes from its own seed's base (the bases run first, the main
    arms before the others); the summary pairs each arm with the control by seed, Holm over each table,
    and reads the grid and Time-Shift extras and the bases' plateau."""
    from argparse import Namespace
    from experiments import fair as F
    a = Namespace(seeds=[0, 1, 2], fair_base_steps=200, fair_ft_steps=20)
    jobs = F.job_list(a)
    bases = [j for j in jobs if j['kind'] == 'fair_base']
    assert jobs[:len(bases)] == bases and len(bases) == 6 and F.stages(200) == [200] and F.stages(20000) == list(F.STAGES)
    arms = [j for j in jobs if j['kind'] == 'fair_arm']
    assert all(j['deps'] == [F.base_name(j['regime'], j['seed'])] and j['steps'] == 20 for j in arms)
    assert not any(j['method'] == 'S20' and j['regime'] == 'T50' for j in arms)
    assert max(i for i, j in enumerate(arms) if j['method'] in F.GROUPS[0]) < min(i for i, j in enumerate(arms) if j['method'] in F.GROUPS[1])
    assert [j['run'] for j in F.extra_jobs(a)] == [j['name'] for j in jobs if j['method'] in F.EXTRA_ARMS]
    assert F.ts_setting(1000, 10) == dict(window=40, cutoff=300, var='sample') and F.ts_setting(50, 50) is None
    rng = np.random.default_rng(0)
    shift = dict(control=0.0, base=0.002, lit=0.0, **{m: 0.001 for m in F.ARMS if m not in ('control', 'lit')})
    for folder in ('fair', 'fairx'):
        (tmp_path / folder).mkdir()
    for seed in range(3):
        noise = {S: 1e-4 * rng.standard_normal() for S in F.STEPS}
        for j in (j for j in jobs if j['seed'] == seed):
            rg, m, T = j['regime'], j['method'], int(j['regime'][1:])
            sc = lambda extra=0.0: {'e0': {k: {str(S): dict(model=0.01 + noise[S] + shift[m] + extra, floor=1e-5 * seed)  # noqa: E731
                                               for S in F.STEPS if S <= T} for k in ('gaussian', 'laplace')}}
            res = dict(job=j, scores=sc(), train_wall_s=1.0, eval_wall_s=2.0, steps=j['steps'],
                       reg_grad=dict(median_ratio=0.1, mean_cos_reg=0.01 * seed, mean_cos_nll=0.5 + 0.01 * seed))
            if m == 'base':
                res['plateau'] = [dict(step=st, scores={f'e{st}': {k: {'20': dict(model=1.0 / st, floor=0.0)}
                                                                  for k in ('gaussian', 'laplace')}}) for st in (100, 200)]
            if m == 'sa' and seed == 2:   # cut by the budget: the arm is reported on its 2 seeds
                continue
            R.write_json(tmp_path / 'fair' / f"{j['name']}.json", res)
            if m not in F.EXTRA_ARMS:
                continue
            R.write_json(tmp_path / 'fairx' / f"fairx{j['name'][4:]}.json", dict(job=j, eval_wall_s=1.0, scores=dict(
                adm=sc(0.003), ts_sample=sc(-0.004), ts_batch={'e0': {k: {'10': v['10']} for k, v in sc(0.0)['e0'].items()}},
                **({'curves': {'20': dict(t=[T, 0], d=[0.01, 0.05 + shift[m] + 1e-3 * seed]), 'floor': [0.001, -0.001]}}
                   if m in F.CURVE_ARMS else {}))))
    md = F.summary(str(tmp_path / 'fair'))
    out = json.load(open(tmp_path / 'fair_toy.json'))
    tb = out['tables']['T1000_laplace']
    assert tb['seeds'] == [0, 1, 2] and tb['arms'][0] == 'base' and (tmp_path / 'fair_toy.png').is_file()
    for c in tb['cells']:
        assert c['diff'] == pytest.approx(shift[c['arm']], abs=1e-12)
        assert c['p_holm'] >= c['p'] or np.isnan(c['p'])
    grid = {(c['arm'], c['S'], c['grid']): c['diff'] for c in out['grid']['T1000_laplace']}
    assert grid[('control', 10, 'adm - trailing')] == pytest.approx(0.003) and grid[('m0.2', 20, 'adm')] == pytest.approx(0.001)
    ts = {(c['arm'], c['S'], c['var']): c['diff'] for c in out['ts']['T50_laplace']}
    assert ts[('control', 50, 'sample')] == pytest.approx(-0.004) and ts[('m0.2', 10, 'batch')] == pytest.approx(0.0, abs=1e-12)
    assert not any(c['arm'] == 'sa' for c in out['ts']['T50_laplace'])   # no extras for the other arms
    assert {c['n'] for c in tb['cells'] if c['arm'] == 'sa'} == {2} and '(n = 2)' in md
    assert out['plateau']['T50']['laplace_S20'] == {'100': [0.01, 0.0], '200': [0.005, 0.0]}
    assert out['weights']['T1000_lit']['cos_reg'] == pytest.approx(0.01) and out['runs'] == len(jobs) - 2
    assert "ADM's grid against this project's, T = 1000" in md and 'The Time-Shift Sampler, T = 50' in md
    d0 = {(c['arm'], c['S']): c['diff'] for c in out['curves']['T50']['d0']}
    assert d0 == {('m0.2', 20): pytest.approx(0.001)} and (tmp_path / 'fair_curves.png').is_file() and (tmp_path / 'fair_snr.png').is_file()
    assert out['curves']['T50']['floor'][0] == pytest.approx(0.0) and 'D_MMD(t = 0) after fine-tuning, T = 50' in md
    assert md.startswith('**The fair test, headline**') and out['cost']['T50_base']['train_s_per_1000'] == pytest.approx(5.0)
