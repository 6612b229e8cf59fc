"""Issue 28's Table 1 analogue on real digits (MNIST 14 x 14, T = 1000). Vanilla bases are trained
to BASE_STEPS (their plateau scored at STAGES), then fine-tuned for FT_STEPS in each of Table 1's
arms: the control (vanilla continued), the paper's regulariser as Algorithm 1 reads literally
(sum_t w_t = 1, a second batch), ADM-IP and SA-DPM. Every arm is scored by the Frechet distance and
KID of n samples in the MNIST classifier's features against the training set, at S = 1000 (the
paper's ancestral chain) and at S = 100 / 20 (ancestral and DDIM), beside the perfect-model floor
(n held-out test digits). Arms are paired by seed with the control (same x_T and chain noise);
Holm over each metric's table.

    python -m experiments.reproduce --table1            # resumable, 2 processes; then the report
    python -m experiments.reproduce --table1 --report   # only the report: results/table1_mnist.md/.json/.png

This module holds the job list, the scores and the report; experiments/reproduce.py runs the jobs.
"""
import os

import numpy as np
import torch

import data as D
import runtime as R
from diffusion import eps_scale_schedule
from experiments.fair import holm_fill, paired_cell
from experiments.protocol import ES_GRID, MNIST_FLAGS, RES, SWEEP, ClassifierMetric, es_search, read_json

T, BASE_STEPS, FT_STEPS = 1000, 8000, 1000
STAGES = (2000, 4000, 8000)   # where the base's plateau is scored (and BASE_STEPS)
PLATEAU_N, PLATEAU_EVAL = 256, (('ddpm', 20), ('ddpm', 100))
EVAL = (('ddpm', 1000), ('ddpm', 100), ('ddpm', 20), ('ddim', 100), ('ddim', 20))   # Table 1's S = 1000 first
N, CHUNK = 400, 250   # samples per score; chains run CHUNK at a time (the MNIST net's bf16 plateau: 256)
ES_AT = (('ddpm', 100), ('ddpm', 20))   # epsilon scaling on top of every arm (ancestral; its CPU cost)
GRID_N, GRID_AT = 32, ('ddpm1000', 'ddpm20')   # seed 0's first samples kept for the sample grid
FLAGS = MNIST_FLAGS + ['--lr', '5e-4', '--T', str(T)]   # results/steps' MNIST recipe; --dtype auto
ARMS = {'control': [], 'lit': SWEEP['lit'], 'ip': ['--loss', 'ip'], 'sa': ['--loss', 'sa']}
LABEL = {'control': 'control (vanilla)', 'lit': 'reg, Algorithm 1 literally', 'ip': 'ADM-IP', 'sa': 'SA-DPM'}


def stages(base_steps):
    return sorted({s for s in STAGES if s < base_steps} | {base_steps})


def base_name(seed):
    return f'table1_T{T}_base_s{seed}'


def job_list(a):
    """The bases of the first 3 seeds, then the arms seed by seed: a budget that runs out leaves
    complete paired tables over fewer seeds."""
    seeds = a.seeds[:3]
    jobs = [dict(name=base_name(s), kind='t1_base', dataset='mnist', method='base', seed=s, deps=[],
                 steps=a.t1_base_steps, flags=FLAGS) for s in seeds]
    return jobs + [dict(name=f'table1_T{T}_{arm}_s{s}', kind='t1_arm', dataset='mnist', method=arm, seed=s,
                        deps=[base_name(s)], steps=a.t1_ft_steps, flags=FLAGS + fl)
                   for s in seeds for arm, fl in ARMS.items()]


def chains(model, diff, shape, seed, n, sampler, S, chunk=CHUNK, b=1.0, purpose='t1'):
    """n samples (n, *shape) of the S-step chain with eps / b (epsilon scaling, Ning et al.'s
    uniform schedule); x_T from the stream (seed, purpose-x_T, S) (one start per S for both samplers
    and every b) and the chain's noise from (seed, purpose-chain, sampler, S)."""
    gx, gz = R.rng(seed, purpose + '-x_T', S), R.rng(seed, purpose + '-chain', sampler == 'ddim', S)
    lam = None if b == 1.0 else eps_scale_schedule(diff.T, b, 0.0, S)
    out = []
    with torch.inference_mode():
        for m in range(0, n, chunk):
            x = torch.randn((min(chunk, n - m), *shape), generator=gx)
            out.append(diff.sample_chain(model, x, diff.T, 0, sampler, S, generator=gz, eps_scale=lam))
    return torch.cat(out)


def scores(model, diff, cfg, seed, n=N, evals=EVAL, metric=None, keep=(), es=()):
    """{sampler + S: dict(fd, kid)} of n samples per setting, and the floor (n test digits drawn by
    (seed, 't1-floor')); es: settings also scored with epsilon scaling (key + '_es': the scale B that
    protocol.es_search picks on n / 2 chains of their own streams, FD as its criterion); keep:
    settings whose first GRID_N samples are returned (uint8)."""
    metric, shape = metric or ClassifierMetric(cfg), tuple(cfg['data_shape'])
    out, grids = {}, {}
    for sampler, S in evals:
        x = chains(model, diff, shape, seed, n, sampler, S)
        out[f'{sampler}{S}'] = metric(x)
        if f'{sampler}{S}' in keep:
            grids[f'{sampler}{S}'] = D.to_uint8(x[:GRID_N]).squeeze(1).tolist()
        print(sampler, S, out[f'{sampler}{S}'], flush=True)
        if (sampler, S) in es:   # epsilon scaling on top: B chosen on other chains, then scored on these streams
            best, grid = es_search(lambda b: metric(chains(model, diff, shape, seed, n // 2, sampler, S, b=b,
                                                           purpose='t1-select'))['fd'], ES_GRID)
            out[f'{sampler}{S}_es'] = dict(out[f'{sampler}{S}'] if best == 1.0 else
                                           metric(chains(model, diff, shape, seed, n, sampler, S, b=best)),
                                           es_scale=best, es_grid={str(b): v for b, v in grid.items()})
            print(sampler, S, 'ES', out[f'{sampler}{S}_es'], flush=True)
    test = D.load_mnist_labelled(cfg['data_dir'], 'test', cfg['image_size'])[0]
    pick = torch.randperm(len(test), generator=R.rng(seed, 't1-floor'))[:n]
    out['floor'] = metric(D.to_model_space(test[pick]))
    return out, grids


# ---- the report -----------------------------------------------------------------------------------
def summary(folder=os.path.join(RES, 'table1')):
    """results/table1_mnist.json, .md, .png from results/table1/: per metric (FD, KID) every arm's
    paired change against the control at each setting (95 % t interval, Holm over the table), the
    smallest detectable change, the control's value and the floor; the bases' plateau; the cost."""
    runs = [read_json(os.path.join(folder, f)) for f in sorted(os.listdir(folder)) if f.endswith('.json')] if os.path.isdir(folder) else []
    by = {(r['job']['method'], r['job']['seed']): r for r in runs}
    seeds = sorted(s for (m, s) in by if m == 'control' and ('base', s) in by)
    out = dict(dataset='mnist', T=T, seeds=seeds, tables={}, plateau={}, cost={}, runs=len(by))
    if len(seeds) < 2:
        return f'Table 1 analogue: {len(seeds)} complete seed(s) in {folder}; at least 2 are needed\n'
    have = {m: [s for s in seeds if (m, s) in by] for m in ARMS}   # an arm cut by the budget: its seeds so far
    arms = [m for m in ARMS if m != 'control' and len(have[m]) >= 2]
    cols = list(by[('control', seeds[0])]['scores'])
    cols.remove('floor')
    for key in ('fd', 'kid'):
        cells = []
        for col in cols:
            get = lambda m, s, c=col: by[(m, s)]['scores'][c][key]  # noqa: E731
            ctl, fl = [get('control', s) for s in seeds], [get('control', s, 'floor') for s in seeds]
            cells += [paired_cell([get(m, s) - get('control', s) for s in have[m]], arm=m, col=col,
                                  control_mean=float(np.mean(ctl)), control_std=float(np.std(ctl, ddof=1)),
                                  floor_mean=float(np.mean(fl)), floor_std=float(np.std(fl, ddof=1))) for m in arms]
        out['tables'][key] = holm_fill(cells)
    out['es'] = {}   # what epsilon scaling buys on top of each model: model + ES - model, paired by seed; the scales chosen
    for col in (c for c in cols if c.endswith('_es')):
        get = lambda m, s, c, k='fd': by[(m, s)]['scores'][c][k]  # noqa: E731
        out['es'][col] = holm_fill([paired_cell([get(m, s, col) - get(m, s, col[:-3]) for s in have[m]], arm=m, col=col,
                                                scales=[get(m, s, col, 'es_scale') for s in have[m]]) for m in ['control'] + arms])
    for s in seeds:
        for st in by[('base', s)]['plateau']:
            for col, v in st['scores'].items():
                out['plateau'].setdefault(col, {}).setdefault(str(st['step']), []).append(v['fd'])
    out['plateau'] = {c: {st: [float(np.mean(v)), float(np.std(v, ddof=1))] for st, v in d.items()} for c, d in out['plateau'].items()}
    fl = [st['floor']['fd'] for s in seeds for st in by[('base', s)]['plateau']]   # PLATEAU_N test digits, per stage
    out['plateau_floor'] = [float(np.mean(fl)), float(np.std(fl, ddof=1))]
    out['weights'] = {m: {k: [float(np.mean(v)), float(np.std(v, ddof=1))] for k, v in
                          {k: [by[(m, s)]['reg_grad'][k] for s in have[m]] for k in ('median_ratio', 'mean_cos_reg', 'mean_cos_nll')}.items()}
                      for m in ['control'] + arms if all('reg_grad' in by[(m, s)] for s in have[m])}
    for m in ['base', 'control'] + arms:
        rs = [by[(m, s)] for s in (seeds if m == 'base' else have[m])]
        out['cost'][m] = dict(steps=rs[0]['steps'], train_s=float(np.mean([r.get('train_wall_s') or np.nan for r in rs])),
                              eval_s=float(np.mean([r.get('eval_wall_s') or np.nan for r in rs])))
    out['process_hours'] = sum((r.get('train_wall_s') or 0) + (r.get('eval_wall_s') or 0) for r in by.values()) / 3600
    R.write_json(os.path.join(os.path.dirname(folder), 'table1_mnist.json'), out)
    md = markdown(out)
    R.atomic_write(os.path.join(os.path.dirname(folder), 'table1_mnist.md'), lambda f: f.write(md), binary=False)
    grids = {m: by[(m, seeds[0])].get('grids', {}) for m in ['control'] + arms}
    plot(out, grids, os.path.join(os.path.dirname(folder), 'table1_mnist.png'))
    return md


def label(col):   # 'ddpm100_es' -> 'ddpm S = 100 + ES'
    S, es = (col[4:].split('_') + [''])[:2]
    return f"{col[:4]} S = {S}" + (' + ES' if es else '')


def fmt(key, v):
    return f'{v:.2f}' if key == 'fd' else f'{v:.1f}'


def markdown(out):
    n, lines = len(out['seeds']), []
    for key, cells in out['tables'].items():
        cols = list(dict.fromkeys(c['col'] for c in cells))
        first = {c['col']: c for c in cells}
        unit = 'Frechet distance' if key == 'fd' else 'KID (cubic kernel, unbiased)'
        lines += [f"**Table 1's analogue, MNIST 14 x 14, T = {out['T']}: {unit}** ({n} seeds; {N} samples per score in "
                  'the classifier\'s features against the training set; arm - control after '
                  f"{out['cost']['control']['steps']} fine-tuning steps from the same base, paired by seed, 95 % CI, "
                  '* Holm p < 0.05 over this table)\n',
                  '| arm | ' + ' | '.join(label(c) for c in cols) + ' |', '|---|' + '---:|' * len(cols),
                  '| control (value) | ' + ' | '.join(f"{fmt(key, first[c]['control_mean'])} ± {fmt(key, first[c]['control_std'])}"
                                                      for c in cols) + ' |',
                  '| floor (value) | ' + ' | '.join(f"{fmt(key, first[c]['floor_mean'])} ± {fmt(key, first[c]['floor_std'])}"
                                                    for c in cols) + ' |']
        for m in dict.fromkeys(c['arm'] for c in cells):
            cs = {c['col']: c for c in cells if c['arm'] == m}
            lines.append(f'| {LABEL[m]} | ' + ' | '.join(
                f"{'+' if cs[c]['diff'] >= 0 else ''}{fmt(key, cs[c]['diff'])} [{fmt(key, cs[c]['ci'][0])}, "
                f"{fmt(key, cs[c]['ci'][1])}]{'*' if cs[c]['p_holm'] < 0.05 else ''} p {cs[c]['p_holm']:.2g}"
                + (f" (n = {cs[c]['n']})" if cs[c]['n'] < n else '') for c in cols) + ' |')
        det = [c['min_detectable'] for c in cells]
        lines += ['', f"Smallest change this table detects (80 % power, Holm's first step): {fmt(key, min(det))} to "
                  f"{fmt(key, max(det))}.\n"]
    if out.get('es'):
        cols = list(out['es'])
        lines += ['**Epsilon scaling on top of each model** (FD; model + ES - the same model, paired by seed, 95 % CI, * Holm p '
                  '< 0.05 over this table; B chosen by protocol.es_search on chains of their own streams; mean B chosen)\n',
                  '| model | ' + ' | '.join(label(c) for c in cols) + ' |', '|---|' + '---:|' * len(cols)]
        for m in dict.fromkeys(c['arm'] for c in out['es'][cols[0]]):
            cs = {c['col']: c for col in cols for c in out['es'][col] if c['arm'] == m}
            lines.append(f'| {LABEL[m]} | ' + ' | '.join(
                f"{cs[c]['diff']:+.2f} [{cs[c]['ci'][0]:.2f}, {cs[c]['ci'][1]:.2f}]{'*' if cs[c]['p_holm'] < 0.05 else ''}"
                f" (B {np.mean(cs[c]['scales']):.3g})" for c in cols) + ' |')
        lines.append('')
    if out.get('weights'):
        lines += ["**The regulariser's effective weight and signal on MNIST** (bench --what reg-grad, 40 batches of 64, mean ± std "
                  'over seeds): |grad of the weighted regulariser| / |grad of the weighted eps-MSE| (median over batches) and the '
                  "cosine between two independent batches' gradients at the same weights (20 pairs); the control is measured with "
                  "--reg's defaults (mean1, lambda_reg 0.2: T times Algorithm 1's literal weight; the cosines do not depend on the weight)\n", '| model | grad ratio | cos (reg) | cos (eps-MSE) |', '|---|---:|---:|---:|']
        lines += [f"| {LABEL[m]} | {w['median_ratio'][0]:.3g} ± {w['median_ratio'][1]:.2g} | {w['mean_cos_reg'][0]:+.3f} ± "
                  f"{w['mean_cos_reg'][1]:.3f} | {w['mean_cos_nll'][0]:+.3f} ± {w['mean_cos_nll'][1]:.3f} |" for m, w in out['weights'].items()]
        lines.append('')
    cols = list(out['plateau'])
    lines += [f'**Plateau of the vanilla bases** (Frechet distance of {PLATEAU_N} samples, mean ± std over seeds, by '
              f"training step; the perfect model, {PLATEAU_N} test digits: {out['plateau_floor'][0]:.1f} ± "
              f"{out['plateau_floor'][1]:.1f})\n", '| step | ' + ' | '.join(label(c) for c in cols) + ' |', '|---:|' + '---:|' * len(cols)]
    steps = sorted({st for c in cols for st in out['plateau'][c]}, key=int)
    lines += [f'| {st} | ' + ' | '.join('{:.1f} ± {:.1f}'.format(*out['plateau'][c][st]) for c in cols) + ' |' for st in steps]
    lines += ['', '| model | steps | train s | eval s |', '|---|---:|---:|---:|']
    lines += [f"| {LABEL.get(m, 'vanilla base')} | {c['steps']} | {c['train_s']:.0f} | "
              + ('n/a' if np.isnan(c['eval_s']) else f"{c['eval_s']:.0f}") + ' |' for m, c in out['cost'].items()]
    lines.append(f"\n{out['runs']} runs, {out['process_hours']:.2f} process-hours (training + evaluation, from the runs' JSONs).")
    return '\n'.join(lines).strip() + '\n'


def plot(out, grids, path):
    """Left: the bases' plateau (FD against training steps) with the floor band. Middle: every arm's
    paired change in FD with its 95 % CI per setting. Right: seed 0's samples per arm at S = 1000 and 20."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(15, 4.5))
    ax = fig.add_subplot(1, 3, 1)
    for c, d in out['plateau'].items():
        st = sorted(d, key=int)
        ax.errorbar([int(s) for s in st], [d[s][0] for s in st], [d[s][1] for s in st], fmt='o-', capsize=3, label=label(c))
    m, sd = out['plateau_floor']
    ax.axhspan(m - 2 * sd, m + 2 * sd, color='grey', alpha=0.25, label=f'perfect-model floor (n = {PLATEAU_N}) ± 2 std')
    ax.set(xscale='log', xlabel='training steps (vanilla base)', ylabel=f'FD ({PLATEAU_N} samples)')
    ax.set_title('plateau of the bases', fontsize=9)
    ax.legend(fontsize=7)
    ax = fig.add_subplot(1, 3, 2)
    cells = out['tables']['fd']
    arms, cols = list(dict.fromkeys(c['arm'] for c in cells)), list(dict.fromkeys(c['col'] for c in cells))
    for i, m in enumerate(arms):
        cs = [c for c in cells if c['arm'] == m]
        x = np.arange(len(cs)) + 0.2 * (i - (len(arms) - 1) / 2)
        ax.errorbar(x, [c['diff'] for c in cs], [[c['diff'] - c['ci'][0] for c in cs], [c['ci'][1] - c['diff'] for c in cs]],
                    fmt='o', capsize=3, label=LABEL[m])
    ax.axhline(0, color='k', lw=0.8)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([label(c).replace(' S = ', ' ') for c in cols], fontsize=7, rotation=20)
    ax.set(ylabel='arm - control, FD (< 0 = better)')
    ax.set_title(f"paired change, 95 % CI ({len(out['seeds'])} seeds)", fontsize=9)
    ax.legend(fontsize=7)
    ax = fig.add_subplot(1, 3, 3)
    rows = [np.concatenate([np.concatenate(np.array(g[k][:8], np.uint8), 1) for k in GRID_AT if k in g], 1)
            for g in grids.values() if g]
    if rows:
        ax.imshow(np.concatenate(rows, 0), cmap='gray', vmin=0, vmax=255)
        ax.set_yticks([14 * (i + 0.5) for i in range(len(rows))])
        ax.set_yticklabels([LABEL[m] for m, g in grids.items() if g], fontsize=7)
    ax.set_xticks([56, 168])
    ax.set_xticklabels(['ancestral S = 1000', 'ancestral S = 20'], fontsize=8)
    ax.set_title('seed 0, the first 8 samples (same x_T in every arm)', fontsize=9)
    fig.tight_layout()
    R.save_figure(fig, path)
