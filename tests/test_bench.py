"""bench.py --what compare: the working tree's training step against a git ref's, in one process."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def in_git_checkout():
    if shutil.which('git') is None:
        return False
    r = subprocess.run(['git', '-C', ROOT, 'rev-parse', '--verify', '-q', 'HEAD'], capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(not in_git_checkout(), reason='needs git and a git checkout of the project')
def test_compare_head_with_working_tree(tmp_path):
    out = tmp_path / 'cmp.json'
    cmd = [sys.executable, '-m', 'experiments.bench', '--what', 'compare', '--compare', 'HEAD', '--model', 'tiny',
           '--batch-size', '4', '--dtype', 'fp32', '--iters', '1', '--reps', '1', '--warmup', '0', '--threads', '1',
           '--json', str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    row, = json.loads(out.read_text())['compare']
    assert row['model'] == 'tiny' and row['batch'] == 4
    assert math.isfinite(row['ratio']) and row['ratio'] > 0
    assert row['ratio_min'] <= row['ratio'] <= row['ratio_max']
    assert math.isfinite(row['loss_max_rel_diff'])



def test_es_search_replay_counts_picks_and_misses(tmp_path):
    """--what es-search on two crafted grids: a unimodal one (same pick) and one whose best sits
    in a second valley that the golden-section search does not visit (a miss, its excess > 0)."""
    steps = tmp_path / 'steps'
    steps.mkdir()
    uni = [9, 8, 7, 6, 5, 4, 5, 6, 7]
    two = [5, 6, 7, 8, 9, 8, 7, 6, 1]   # the search narrows to the left valley, b = 1
    rows = [dict(sampler='ddpm', steps=10, es_grid=uni), dict(sampler='ddim', steps=10, es_grid=two)]
    (steps / 'steps_x_T50_vanilla_s0.json').write_text(json.dumps(dict(rows=rows)))
    out = tmp_path / 'es.json'
    r = subprocess.run([sys.executable, '-m', 'experiments.bench', '--what', 'es-search', '--json', str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, REPRO_RESULTS=str(tmp_path)))
    assert r.returncode == 0, r.stderr[-2000:]
    es = json.loads(out.read_text())['es_search']
    assert es['grids'] == 2 and es['same_pick'] == 1 and es['max_scores'] <= 6
    miss, = es['misses']
    assert miss['sampler'] == 'ddim' and miss['grid_best'] == 1.5 and miss['excess'] > 0


def test_reg_grad_reports_ratio_and_independent_batch_cosines(tmp_path):
    """--what reg-grad on a 3-step toy model: the gradient ratio per batch and, over disjoint pairs
    of batches, the cosine of each loss's gradients (different batches: not 1; a cosine: in [-1, 1])."""
    run = tmp_path / 'run'
    p = subprocess.run([sys.executable, 'train.py', '--dataset', '8gaussians', '--T', '50', '--max-steps', '3',
                        '--out-dir', str(run), '--dtype', 'fp32', '--sample-every', '0'],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    out = tmp_path / 'g.json'
    r = subprocess.run([sys.executable, '-m', 'experiments.bench', '--what', 'reg-grad', '--ckpt', str(run),
                        '--batches', '4', '--json', str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    g = json.loads(out.read_text())['reg_grad']
    assert len(g['rows']) == 4 and g['pairs'] == 2 and all(math.isfinite(x['ratio']) and x['ratio'] > 0 for x in g['rows'])
    cos = [x[k] for x in g['rows'] for k in ('cos_nll', 'cos_reg') if k in x]
    assert len(cos) == 4 and all(-1 <= c < 0.9999 for c in cos)


def test_profile_lists_the_step_s_operators_by_self_time(tmp_path):
    out = tmp_path / 'prof.json'
    cmd = [sys.executable, '-m', 'experiments.bench', '--what', 'profile', '--model', 'tiny', '--batch-size', '4',
           '--dtype', 'fp32', '--threads', '1', '--json', str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())['profile_fp32']
    ops = [row['op'] for row in rows]
    assert any('convolution' in op for op in ops)   # a U-Net step is convolutions first
    ms = [row['ms'] for row in rows]
    assert ms == sorted(ms, reverse=True) and 0 < sum(row['share'] for row in rows) <= 1 + 1e-9


def test_sample_batch_rates_per_network_batch_and_compile():
    """--what sample-batch: one row per (network, dtype, batch); with compile a compiled row beside each
    eager one, its first call (the trace) timed apart. The toy MLP only: the U-Nets trace for a minute."""
    import torch
    from experiments.benchlib import SAMPLE_NETS, sample_batch_rates
    torch._dynamo.reset()
    rows = sample_batch_rates('cpu', ['fp32'], reps=1, compile=True, nets=['mlp'])
    batches = dict((n, b) for n, _, b in SAMPLE_NETS)['mlp']
    assert [(r['batch'], r['compile']) for r in rows] == [(b, c) for b in batches for c in (False, True)]
    assert all(r['model'] == 'mlp' and r['rows_per_s'] > 0 for r in rows)
    assert all(r['first_call_s'] > 0 if r['compile'] else r['first_call_s'] is None for r in rows)


def test_eval_bench_times_every_variant_and_the_grid_does_more_work(tmp_path):
    """--what eval --compile on a 2-step toy model (T = 20): the four variants run, each times every
    repetition, the fast ones evaluate fewer network rows than the grid, and fast_fp32 leaves every
    metric but the ES search's to the bit (at S <= 100 no chain is shared; the search may pick
    another scale of an untrained model's non-unimodal grid)."""
    run = tmp_path / 'run'
    subprocess.run([sys.executable, 'train.py', '--dataset', '8gaussians', '--T', '20', '--toy-n', '1000',
                    '--max-steps', '2', '--sample-every', '0', '--out-dir', str(run)],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    out = tmp_path / 'eval.json'
    r = subprocess.run([sys.executable, '-m', 'experiments.bench', '--what', 'eval', '--ckpt', str(run), '--reps', '1',
                        '--threads', '1', '--compile', '--json', str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, REPRO_RESULTS=str(tmp_path)))
    assert r.returncode == 0, r.stderr[-2000:]
    row, = json.loads(out.read_text())['eval']
    vs = ('grid_fp32', 'fast_fp32', 'fast_default', 'fast_default_compile')
    assert all(len(row[v]['s_reps']) == 1 and row[v]['s'] > 0 for v in vs)
    assert all(row[v]['net_evals'] < row['grid_fp32']['net_evals'] for v in vs[1:])
    assert row['fast_fp32']['net_evals'] == row['fast_default_compile']['net_evals']
    moved = {k: g for k, g in row['fast_fp32']['metrics'].items() if g['max_abs_diff'] > 0}
    assert {'mmd', 'D_MMD_gaussian', 'A'} <= set(row['fast_fp32']['metrics']) and set(moved) <= {'mmd_es', 'es_scale'}, moved
