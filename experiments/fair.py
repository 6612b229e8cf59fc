"""Issue 28: the paper's claim given a fair chance, on 8gaussians. Vanilla bases are trained until
their metric plateaus (BASE_STEPS, scored on the way), then fine-tuned for FT_STEPS in every arm:
the control (vanilla continued), the regulariser from Algorithm 1's literal weight up to the
released code's, without warm start, on the 20-step chain, ADM-IP and SA-DPM. Every model is scored
by the metric with resolution (protocol.resolution_scores) and measured by bench --what reg-grad
(the regulariser's effective weight, and the cosine of its gradients on two independent batches:
its signal-to-noise). Arms are paired by seed with the control; Holm over each (T, kernel) table.
`--extra` adds ADM's grid, the Time-Shift Sampler and D_MMD(t) curves on the main arms.

    python -m experiments.reproduce --fair [--extra]  # resumable, 2 processes; then the report
    python -m experiments.reproduce --fair --report   # only the report: results/fair_toy.md/.json/.png

This module holds the job list, the extra scores and the report; experiments/reproduce.py runs the jobs.
"""
import math
import os

import numpy as np
import torch

import data as D
import runtime as R
from mmd import errprop_curve, mmd2, signed_sqrt
from metrics import stats as ST
from experiments.protocol import RES, REGIMES, STEPS, SWEEP, TOY_DTYPE, read_json

DS = '8gaussians'
BASE_STEPS, FT_STEPS = 20000, 1000
STAGES = (1000, 2000, 5000, 10000, 20000)   # where the base's plateau is scored (and BASE_STEPS)
PLATEAU_N, PLATEAU_STEPS = 2000, (20, None)   # None: S = T, the full ancestral chain
ARMS = {   # fine-tuning arm -> train.py flags (every --reg arm: Algorithm 1's second batch)
    'control': [],                                             # vanilla continued for FT_STEPS
    'lit': SWEEP['lit'],                                       # Algorithm 1 literally: sum_t w_t = 1
    'm0.2': SWEEP['m0.2'],                                     # the paper's lambda_reg under mean1
    'released': SWEEP['released'],                             # the released code's unweighted MMD^2
    'm0.02': SWEEP['m0.02'],
    'nowarm': ['--reg', '--no-warm-start'],                    # Table 2's ablation: x~_s ~ N(0, I)
    'S20': ['--reg', '--reg-steps', '20'],                     # the regulariser on the 20-step chain
    'ip': ['--loss', 'ip'], 'sa': ['--loss', 'sa'],
}
GROUPS = (('control', 'lit', 'm0.2', 'released'), ('m0.02', 'nowarm', 'S20', 'ip', 'sa'))   # run order
LABEL = {'base': 'before fine-tuning', 'control': 'control (vanilla)', 'lit': 'reg, literal (sum1)',
         'm0.2': 'reg, mean1 0.2', 'released': 'reg, released code', 'm0.02': 'reg, mean1 0.02',
         'nowarm': 'reg 0.2, no warm start', 'S20': 'reg 0.2, 20-step chain', 'ip': 'ADM-IP', 'sa': 'SA-DPM'}


def stages(base_steps):
    return sorted({s for s in STAGES if s < base_steps} | {base_steps})


def base_name(rg, seed):
    return f'fair_{DS}_{rg}_base_s{seed}'


def job_list(a):
    """The bases first, then the arms in GROUPS' order, seed by seed: a budget that runs out leaves
    complete paired tables over fewer seeds, the main arms first."""
    common = dict(dataset=DS, deps=[])
    jobs = [dict(common, name=base_name(rg, seed), kind='fair_base', regime=rg, method='base', seed=seed,
                 steps=a.fair_base_steps, flags=REGIMES[rg] + TOY_DTYPE)
            for seed in a.seeds for rg in REGIMES]
    for group in GROUPS:
        for seed in a.seeds:
            for rg in REGIMES:
                for arm in group:
                    if arm == 'S20' and rg == 'T50':   # T = 50 samples on fewer than 20 steps' worth anyway
                        continue
                    jobs.append(dict(common, name=f'fair_{DS}_{rg}_{arm}_s{seed}', kind='fair_arm', regime=rg,
                                     method=arm, seed=seed, steps=a.fair_ft_steps, deps=[base_name(rg, seed)],
                                     flags=REGIMES[rg] + ARMS[arm] + TOY_DTYPE))
    return jobs


# ---- after the arms: ADM's grid and the Time-Shift Sampler on every model (--fair --extra) -----------
GRID_STEPS = (10, 20)   # where the field's few-step numbers are reported
TS_WINDOW = {10: 40, 20: 30, 50: 8, 100: 2}   # Li et al.'s CIFAR-10 TS-DDIM windows (their Fig. 7), at T = 1000


def ts_setting(T, S, var='sample'):
    """The Time-Shift Sampler at S steps of a T-step chain: the paper's window scaled by T / 1000, the
    cutoff 0.3 T (their 300); None where the scaled window is below 2 (no candidate but t)."""
    w = round(TS_WINDOW[S] * T / 1000)
    return dict(window=w, cutoff=round(0.3 * T), var=var) if w >= 2 else None


EXTRA_ARMS = ('base',) + GROUPS[0]   # the CPU budget of this round: the bases and the main arms


def extra_jobs(a):
    """One job per fair_* run of EXTRA_ARMS: its extras (results/fairx/), run as soon as the run's own
    result exists."""
    return [dict(j, name='fairx' + j['name'][4:], kind='fair_extra', deps=[j['name']], run=j['name'])
            for j in job_list(a) if j['method'] in EXTRA_ARMS]


CURVE_ARMS, CURVE_N = ('control', 'm0.2'), 2000   # Fig. 1 / Fig. 3's analogue: D_MMD(t)


def curve_scores(model, diff, seed, n=CURVE_N):
    """D_MMD(t) (laplace, unbiased, signed root; mmd.errprop_curve) along the ancestral chains of
    S = 20 and S = T (every T / 20-th index) of n samples against n forward samples of fresh true
    draws, each stream from (seed, purpose, S); and the perfect-model floor at t = 0 (the same
    statistic between two fresh true sets), 5 draws."""
    out = {}
    for S, stride in ((20, None), (diff.T, max(1, diff.T // 20))):
        x0 = D.sample_toy(DS, n, R.rng(seed, 'fair-curve-x0', S))
        c = errprop_curve(model, diff, x0, n=n, kernels=('laplace',), estimator='u', t_stride=stride, steps=S,
                          generator=R.rng(seed, 'fair-curve-chain', S), ref_generator=R.rng(seed, 'fair-curve-q', S))
        out[str(S)] = dict(t=c['t'], d=c['laplace'])
    g = R.rng(seed, 'fair-curve-floor')
    out['floor'] = [signed_sqrt(float(mmd2(D.sample_toy(DS, n, g), D.sample_toy(DS, n, g), 'laplace', 'u'))) for _ in range(5)]
    return out


def extra_scores(model, diff, seed, n, resolution_scores, curves=False):
    """ADM's grid at GRID_STEPS and the Time-Shift Sampler (per-sample variance, the paper's; at S <= 20
    also the batch variance) at S <= 50 (at S = 100 the paper's window, 2, leaves t_s within one
    index of t), each on the same streams as the run's own scores."""
    out = dict(adm=resolution_scores(model, diff, DS, seed, n=n, steps=GRID_STEPS, spacing='adm', floor=False))
    for var, Ss in (('sample', (10, 20, 50)), ('batch', (10, 20))):
        for S in (S for S in Ss if S <= diff.T and ts_setting(diff.T, S)):
            sc = resolution_scores(model, diff, DS, seed, n=n, steps=(S,), floor=False, time_shift=ts_setting(diff.T, S, var))
            for e, d in sc.items():
                for kern, v in d.items():
                    out.setdefault(f'ts_{var}', {}).setdefault(e, {}).setdefault(kern, {}).update(v)
    if curves:
        with torch.inference_mode():
            out['curves'] = curve_scores(model, diff, seed)
    return out


# ---- the report -----------------------------------------------------------------------------------
def load(folder):   # {(regime, arm, seed): run JSON}
    return {(r['job']['regime'], r['job']['method'], r['job']['seed']): r for r in
            (read_json(os.path.join(folder, f)) for f in sorted(os.listdir(folder)) if f.endswith('.json'))}


def summary(folder=os.path.join(RES, 'fair')):
    """results/fair_toy.json, .md, .png from results/fair/: per T and kernel, every arm's paired change
    against the control at each S (95 % t interval, p, Holm over the table's cells), the smallest
    detectable change, the floor; the bases' plateau; the arms' effective weight and gradient
    signal-to-noise; the cost. Returns the markdown."""
    by = load(folder)
    out = dict(dataset=DS, tables={}, plateau={}, weights={}, cost={})
    for rg in REGIMES:
        seeds = sorted(s for (g, m, s) in by if (g, m) == (rg, 'control') and (g, 'base', s) in by)
        if len(seeds) < 2:
            continue
        T = int(rg[1:])
        have = {m: [s for s in seeds if (rg, m, s) in by] for m in ARMS}   # an arm cut by the budget: its seeds so far
        arms = ['base'] + [m for m in ARMS if m != 'control' and len(have[m]) >= 2]
        for kern in ('gaussian', 'laplace'):
            cells = []
            for S in (S for S in STEPS if S <= T):
                get = lambda m, s, what='model': by[(rg, m, s)]['scores']['e0'][kern][str(S)][what]  # noqa: E731
                ctl = [get('control', s) for s in seeds]
                floor = [get('control', s, 'floor') for s in seeds]
                for m in arms:
                    cells.append(paired_cell([get(m, s) - get('control', s) for s in have.get(m, seeds)], arm=m, S=S,
                                             control_mean=float(np.mean(ctl)), control_std=float(np.std(ctl, ddof=1)),
                                             floor_mean=float(np.mean(floor)), floor_std=float(np.std(floor, ddof=1))))
            out['tables'][f'{rg}_{kern}'] = dict(regime=rg, kernel=kern, seeds=seeds, arms=arms, cells=holm_fill(cells))
        pl = {}
        for s in seeds:
            for st in by[(rg, 'base', s)]['plateau']:
                for kern in ('gaussian', 'laplace'):
                    for S, v in next(iter(st['scores'].values()))[kern].items():
                        pl.setdefault(f'{kern}_S{S}', {}).setdefault(st['step'], []).append(v['model'])
                        pl.setdefault(f'{kern}_S{S}_floor', {}).setdefault(st['step'], []).append(v['floor'])
        out['plateau'][rg] = {k: {str(step): [float(np.mean(v)), float(np.std(v, ddof=1))] for step, v in sorted(d.items())}
                              for k, d in pl.items()}
        for m in ['base', 'control'] + arms[1:]:
            ss = have.get(m, seeds)
            g = [by[(rg, m, s)].get('reg_grad') for s in ss]
            if all(g):
                out['weights'][f'{rg}_{m}'] = dict(
                    ratio_median=float(np.mean([x['median_ratio'] for x in g])),
                    cos_reg=float(np.mean([x['mean_cos_reg'] for x in g])), cos_reg_std=float(np.std([x['mean_cos_reg'] for x in g], ddof=1)),
                    cos_nll=float(np.mean([x['mean_cos_nll'] for x in g])), cos_nll_std=float(np.std([x['mean_cos_nll'] for x in g], ddof=1)))
            out['cost'][f'{rg}_{m}'] = dict(train_s=float(np.mean([by[(rg, m, s)].get('train_wall_s') or np.nan for s in ss])),
                                            eval_s=float(np.mean([by[(rg, m, s)].get('eval_wall_s') or np.nan for s in ss])),
                                            steps=by[(rg, m, ss[0])]['steps'])
            out['cost'][f'{rg}_{m}']['train_s_per_1000'] = 1000 * out['cost'][f'{rg}_{m}']['train_s'] / out['cost'][f'{rg}_{m}']['steps']
    fx = os.path.join(os.path.dirname(folder), 'fairx')
    bx = load(fx) if os.path.isdir(fx) else {}
    extra_tables(by, bx, out)
    out['process_hours'] = sum(r.get('eval_wall_s') or 0 for r in bx.values()) / 3600 + sum((r.get('train_wall_s') or 0) + (r.get('eval_wall_s') or 0) for r in by.values()) / 3600
    out['runs'] = len(by)
    res = os.path.dirname(folder)   # results/: fair_toy.* beside results/fair/
    R.write_json(os.path.join(res, 'fair_toy.json'), out)
    md = markdown(out)
    R.atomic_write(os.path.join(res, 'fair_toy.md'), lambda f: f.write(md), binary=False)
    if out['tables']:
        plot(out, os.path.join(res, 'fair_toy.png'))
    return md


def paired_cell(diffs, **info):
    t = ST.paired(diffs)
    return dict(info, diff=t['mean'], ci=list(t['ci']), p=t['p'], diff_std=t['std'], n=t['n'])


def holm_fill(cells):
    for c, q in zip(cells, ST.holm([c['p'] for c in cells])):
        c['p_holm'] = q
        c['min_detectable'] = ST.min_detectable(c['diff_std'], c['n'], 0.05 / len(cells))
    return cells


def extra_tables(by, bx, out):
    """From results/fairx/: out['grid'] (per T and kernel: arm - control on this project's trailing grid
    and on ADM's, and the control's own adm - trailing) and out['ts'] (the Time-Shift Sampler minus the
    plain ancestral chain, per model: the same network, streams and S). Holm over each table."""
    out['grid'], out['ts'] = {}, {}
    for key, tb in out['tables'].items():
        rg, kern, seeds = tb['regime'], tb['kernel'], tb['seeds']
        ok = lambda m: [s for s in seeds if (rg, m, s) in bx and (rg, m, s) in by and (rg, 'control', s) in bx]  # noqa: E731
        models = [m for m in ['base', 'control'] + tb['arms'][1:] if len(ok(m)) >= 2]
        if 'control' not in models:
            continue
        main = lambda m, s, S: by[(rg, m, s)]['scores']['e0'][kern][str(S)]['model']  # noqa: E731
        ext = lambda m, s, what, S: bx[(rg, m, s)]['scores'][what]['e0'][kern][str(S)]['model']  # noqa: E731
        cells = []
        for S in GRID_STEPS:
            cells.append(paired_cell([ext('control', s, 'adm', S) - main('control', s, S) for s in ok('control')],
                                     arm='control', S=S, grid='adm - trailing'))
            for m in models[2:]:
                for grid, get in (('trailing', lambda m, s: main(m, s, S)), ('adm', lambda m, s: ext(m, s, 'adm', S))):
                    cells.append(paired_cell([get(m, s) - get('control', s) for s in ok(m)], arm=m, S=S, grid=grid))
        out['grid'][key] = holm_fill(cells)
        common = lambda what: set.intersection(*[set(bx[(rg, m, s)]['scores'].get(what, {}).get('e0', {}).get(kern, {}))  # noqa: E731
                                                 for m in models for s in ok(m)])
        cells = [paired_cell([ext(m, s, what, S) - main(m, s, S) for s in ok(m)], arm=m, S=int(S), var=what[3:])
                 for what in ('ts_sample', 'ts_batch') for S in sorted(common(what), key=int) for m in models]
        out['ts'][key] = holm_fill(cells)
        cv = [m for m in models if all('curves' in bx[(rg, m, s)]['scores'] for s in ok(m))]
        if kern == 'laplace' and 'control' in cv:   # D_MMD(t): mean curve per model, D(0) paired with the control
            cur = {m: {S: dict(t=bx[(rg, m, ok(m)[0])]['scores']['curves'][S]['t'],
                               mean=np.mean([bx[(rg, m, s)]['scores']['curves'][S]['d'] for s in ok(m)], 0).tolist())
                       for S in bx[(rg, m, ok(m)[0])]['scores']['curves'] if S != 'floor'} for m in cv}
            fl = [v for s in ok('control') for v in bx[(rg, 'control', s)]['scores']['curves']['floor']]
            d0 = lambda m, s, S: bx[(rg, m, s)]['scores']['curves'][S]['d'][-1]  # noqa: E731
            out.setdefault('curves', {})[rg] = dict(models=cur, floor=[float(np.mean(fl)), float(np.std(fl, ddof=1))], d0=holm_fill(
                [paired_cell([d0(m, s, S) - d0('control', s, S) for s in ok(m)], arm=m, S=int(S)) for S in cur['control'] for m in cv[1:]]))


def e4(v):
    return 'n/a' if v is None or (isinstance(v, float) and math.isnan(v)) else f'{1e4 * v:.2f}'


def cell_text(c, n=None):
    """paired change x 1e-4 [95 % CI], * where Holm p < 0.05, (n = k) where fewer seeds than the table's."""
    star = '*' if c['p_holm'] < 0.05 else ''
    return f"{1e4 * c['diff']:+.2f} [{e4(c['ci'][0])}, {e4(c['ci'][1])}]{star}" + (f" (n = {c['n']})" if n and c['n'] < n else '')


HEADLINE = (('T1000', 10), ('T1000', 20), ('T1000', 1000), ('T50', 10), ('T50', 20), ('T50', 50))   # few steps, full chain


def headline(out, kern='laplace'):
    """One row per arm: its paired change against the control at the few-step and full-chain cells of
    both regimes, with the Holm p of its (T, kernel) table, its training cost and effective weight."""
    cols = [(rg, S) for rg, S in HEADLINE if f'{rg}_{kern}' in out['tables']]
    if not cols:
        return []
    cell = {(rg, c['arm'], c['S']): c for rg, _ in cols for c in out['tables'][f'{rg}_{kern}']['cells']}
    ctl = {(rg, c['S']): c for (rg, m, S), c in cell.items()}
    arms = list(dict.fromkeys(m for (rg, m, S) in cell))
    n = {rg: len(out['tables'][f'{rg}_{kern}']['seeds']) for rg, _ in cols}
    lines = [f'**The fair test, headline** ({kern} kernel; arm - control after {out.get("ft_steps", FT_STEPS)} fine-tuning '
             f'steps from the same converged base, paired by seed; unbiased MMD^2 x 1e-4 [95 % CI], Holm p over the '
             'arm x S cells of its T; seeds: ' + ', '.join(f'T = {rg[1:]} {k}' for rg, k in n.items()) + ')\n',
             '| arm | ' + ' | '.join(f'T = {rg[1:]}, S = {S}' for rg, S in cols) + ' | train s / 1000 steps (T = 1000) | grad ratio (T = 1000 / 50) |',
             '|---|' + '---:|' * (len(cols) + 2),
             '| control (value) | ' + ' | '.join(f"{e4(ctl[k]['control_mean'])} ± {e4(ctl[k]['control_std'])}" for k in cols) + ' | '
             + f"{out['cost'].get('T1000_control', {}).get('train_s_per_1000', float('nan')):.0f} | "
             + ' / '.join(f"{out['weights'].get(f'{rg}_control', {}).get('ratio_median', float('nan')):.3g}" for rg in ('T1000', 'T50')) + ' |',
             '| floor (value) | ' + ' | '.join(f"{e4(ctl[k]['floor_mean'])} ± {e4(ctl[k]['floor_std'])}" for k in cols) + ' | | |']
    for m in arms:
        cs = [cell.get((rg, m, S)) for rg, S in cols]
        txt = [f"{cell_text(c, n[rg])} p {c['p_holm']:.2g}" if c else '-' for c, (rg, S) in zip(cs, cols)]
        w = ' / '.join(f"{out['weights'][f'{rg}_{m}']['ratio_median']:.3g}" if f'{rg}_{m}' in out['weights'] else '-'
                       for rg in ('T1000', 'T50'))
        lines.append(f'| {LABEL[m]} | ' + ' | '.join(txt) + f" | {out['cost'].get(f'T1000_{m}', {}).get('train_s_per_1000', float('nan')):.0f} | {w} |")
    return lines + ['']


def markdown(out):
    lines = headline(out)
    for key, tb in out['tables'].items():
        Ss = sorted({c['S'] for c in tb['cells']})
        first = [c for c in tb['cells'] if c['arm'] == tb['arms'][0]]
        lines += [f"**T = {tb['regime'][1:]}, {tb['kernel']} kernel** ({len(tb['seeds'])} seeds; unbiased MMD^2 x 1e-4, "
                  'arm - control paired by seed, 95 % CI, * Holm p < 0.05 over this table)\n',
                  '| arm | ' + ' | '.join(f'S = {S}' for S in Ss) + ' |', '|---|' + '---:|' * len(Ss),
                  '| control (value) | ' + ' | '.join(f"{e4(c['control_mean'])} ± {e4(c['control_std'])}" for c in first) + ' |',
                  '| floor (value) | ' + ' | '.join(f"{e4(c['floor_mean'])} ± {e4(c['floor_std'])}" for c in first) + ' |']
        for m in tb['arms']:
            cs = {c['S']: c for c in tb['cells'] if c['arm'] == m}
            lines.append(f'| {LABEL[m]} | ' + ' | '.join(cell_text(cs[S], len(tb['seeds'])) for S in Ss) + ' |')
        det = [c['min_detectable'] for c in tb['cells']]
        lines += ['', f"Smallest change this table detects (80 % power, Holm's first step): {e4(min(det))} to {e4(max(det))}; "
                  f"Holm p of every cell: results/fair_toy.json.\n"]
    for key, cells in out.get('grid', {}).items():
        if not key.endswith('laplace'):
            continue
        cols = [(S, g) for S in GRID_STEPS for g in ('trailing', 'adm')]
        lines += [f"**ADM's grid against this project's, T = {key[1:].split('_')[0]}** (laplace, unbiased MMD^2 x 1e-4; arm - "
                  "control on each grid, paired by seed; first row: the control's own adm - trailing; * Holm p < 0.05)\n",
                  '| arm | ' + ' | '.join(f'S = {S}, {g}' for S, g in cols) + ' |', '|---|' + '---:|' * len(cols)]
        for m in dict.fromkeys(c['arm'] for c in cells):
            cs = {(c['S'], 'adm' if c['grid'] == 'adm - trailing' else c['grid']): c for c in cells if c['arm'] == m}
            name = 'control: adm - trailing' if m == 'control' else LABEL[m]
            lines.append(f'| {name} | ' + ' | '.join(cell_text(cs[k]) if k in cs else '' for k in cols) + ' |')
        lines.append('')
    for key, cells in out.get('ts', {}).items():
        if not key.endswith('laplace') or not cells:
            continue
        cols = list(dict.fromkeys((c['S'], c['var']) for c in cells))
        lines += [f"**The Time-Shift Sampler, T = {key[1:].split('_')[0]}** (laplace, unbiased MMD^2 x 1e-4; TS - plain "
                  'ancestral chain of the same model, streams and S, paired by seed; window: Li et al.\'s CIFAR-10 one '
                  'scaled by T / 1000, cutoff 0.3 T; var: the state\'s variance per sample (the paper) or over the '
                  'batch; * Holm p < 0.05)\n',
                  '| model | ' + ' | '.join(f'S = {S}, {v}' for S, v in cols) + ' |', '|---|' + '---:|' * len(cols)]
        for m in dict.fromkeys(c['arm'] for c in cells):
            cs = {(c['S'], c['var']): c for c in cells if c['arm'] == m}
            lines.append(f'| {LABEL[m]} | ' + ' | '.join(cell_text(cs[k]) for k in cols) + ' |')
        lines.append('')
    for rg, c in out.get('curves', {}).items():
        lines += [f"**D_MMD(t = 0) after fine-tuning, T = {rg[1:]}** (laplace, unbiased, signed root, N = M = {CURVE_N}; "
                  f"arm - control, paired by seed; perfect-model floor {c['floor'][0]:+.4f} ± {c['floor'][1]:.4f}; * Holm p < 0.05)\n",
                  '| arm | ' + ' | '.join(f'S = {S}' for S in c['models']['control']) + ' |', '|---|' + '---:|' * len(c['models']['control']),
                  '| control (value) | ' + ' | '.join(f"{v['mean'][-1]:+.4f}" for v in c['models']['control'].values()) + ' |']
        for m in list(c['models'])[1:]:
            cs = {str(x['S']): x for x in c['d0'] if x['arm'] == m}
            lines.append(f'| {LABEL[m]} | ' + ' | '.join(f"{cs[S]['diff']:+.4f} [{cs[S]['ci'][0]:+.4f}, {cs[S]['ci'][1]:+.4f}]"
                                                         + ('*' if cs[S]['p_holm'] < 0.05 else '') for S in c['models']['control']) + ' |')
        lines.append('')
    if out['weights']:
        lines += ["**The regulariser's effective weight and signal** (bench --what reg-grad, 40 batches, mean over seeds): "
                  "|grad of the weighted regulariser| / |grad of the weighted eps-MSE| (median over batches), and the cosine "
                  'between the gradients of two independent batches at the same weights (20 pairs), of the regulariser and of '
                  'the eps-MSE. base / control: the vanilla model measured with the paper\'s regulariser.\n',
                  '| T | arm | grad ratio | cos (reg) | cos (eps-MSE) |', '|---|---|---:|---:|---:|']
        for k, w in out['weights'].items():
            rg, m = k.split('_', 1)
            lines.append(f"| {rg[1:]} | {LABEL[m]} | {w['ratio_median']:.3g} | {w['cos_reg']:+.3f} ± {w['cos_reg_std']:.3f} | "
                         f"{w['cos_nll']:+.3f} ± {w['cos_nll_std']:.3f} |")
        lines.append('')
    for rg, pl in out['plateau'].items():
        ks = [k for k in pl if not k.endswith('_floor')]
        steps = list(next(iter(pl.values())))
        lines += [f"**Plateau of the T = {rg[1:]} bases** (unbiased MMD^2 x 1e-4 of {PLATEAU_N} samples, mean ± std over "
                  'seeds, by training step)\n', '| step | ' + ' | '.join(ks) + ' |', '|---:|' + '---:|' * len(ks)]
        lines += [f'| {st} | ' + ' | '.join(f"{e4(pl[k][st][0])} ± {e4(pl[k][st][1])}" for k in ks) + ' |' for st in steps]
        lines.append('')
    lines.append(f"{out['runs']} runs, {out['process_hours']:.2f} process-hours (training + evaluation, from the runs' JSONs).")
    return '\n'.join(lines).strip() + '\n'


def plot(out, path):
    """Top: the bases' plateau (laplace MMD^2 against training steps, S = 20 and S = T) with the floor
    band. Bottom: every arm's paired change against the control with its 95 % CI, at S = 10 and S = T."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rgs = list(out['plateau'])
    fig, axes = plt.subplots(2, len(rgs), figsize=(6 * len(rgs), 7.5), squeeze=False)
    for j, rg in enumerate(rgs):
        ax, pl = axes[0, j], out['plateau'][rg]
        for k in (k for k in pl if k.startswith('laplace') and not k.endswith('_floor')):
            st = [int(s) for s in pl[k]]
            ax.errorbar(st, [v[0] for v in pl[k].values()], yerr=[v[1] for v in pl[k].values()], fmt='o-', capsize=3,
                        label=k.replace('_', ', '))
            fl = list(pl[k + '_floor'].values())
            ax.fill_between(st, [v[0] - 2 * v[1] for v in fl], [v[0] + 2 * v[1] for v in fl], color='grey', alpha=0.2)
        ax.set_xscale('log')
        ax.set_xlabel('training steps (vanilla base)')
        ax.set_ylabel('MMD^2 (laplace, unbiased)')
        ax.set_title(f'T = {rg[1:]}: plateau of the bases (grey: perfect-model floor ± 2 std)', fontsize=9)
        ax.legend(fontsize=7)
        ax, tb = axes[1, j], out['tables'][f'{rg}_laplace']
        T = int(rg[1:])
        for off, S in ((-0.15, 10), (0.15, T)):
            cs = [c for c in tb['cells'] if c['S'] == S]
            x = np.arange(len(cs)) + off
            ax.errorbar(x, [1e4 * c['diff'] for c in cs], yerr=[[1e4 * (c['diff'] - c['ci'][0]) for c in cs],
                        [1e4 * (c['ci'][1] - c['diff']) for c in cs]], fmt='o', capsize=3, label=f'S = {S}')
        ax.axhline(0, color='k', lw=0.8)
        ax.set_xticks(range(len(tb['arms'])))
        ax.set_xticklabels([LABEL[m] for m in tb['arms']], rotation=35, ha='right', fontsize=7)
        ax.set_ylabel('arm - control, MMD^2 x 1e-4 (laplace)')
        ax.set_title(f"T = {rg[1:]}: paired change after {FT_STEPS} fine-tuning steps, 95 % CI "
                     f"({len(tb['seeds'])} seeds; < 0 = better)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    R.save_figure(fig, path)
    if out.get('curves'):
        plot_curves(out['curves'], path.replace('fair_toy.png', 'fair_curves.png'))
    if out['weights']:
        plot_snr(out, path.replace('fair_toy.png', 'fair_snr.png'))


def plot_snr(out, path):
    """The gradients' signal-to-noise over training (cosine of two independent batches' gradients at the
    same weights): vanilla seed 0 at 500 / 2000 / 8000 steps (results/reg_snr.json, ± s.e.), then the
    converged bases (20 k, mean ± std over seeds) and each fine-tuned regulariser arm (+1 k)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    snr = os.path.join(os.path.dirname(path), 'reg_snr.json')
    early = read_json(snr)['runs'] if os.path.isfile(snr) else {}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, rg in zip(axes, REGIMES):
        for what, mk in (('nll', 'o'), ('reg', 's')):
            e = early.get(f'{rg}_vanilla', {})
            st = sorted(e, key=int)
            ax.errorbar([int(k) for k in st], [e[k][f'cos_{what}'] for k in st], [e[k][f'se_{what}'] for k in st], fmt=mk + '-',
                        capsize=3, label=f"{'eps-MSE' if what == 'nll' else 'regulariser'}: vanilla seed 0 (± s.e.), then the bases")
            for i, m in enumerate(m for m in ['base'] + list(ARMS) if f'{rg}_{m}' in out['weights'] and m != 'control'):
                w, x = out['weights'][f'{rg}_{m}'], BASE_STEPS + (0 if m == 'base' else FT_STEPS * (1 + 0.15 * i))
                ax.errorbar([x], [w[f'cos_{what}']], [w[f'cos_{what}_std']], fmt=mk, color='C0' if what == 'nll' else 'C1', capsize=2)
        ax.axhline(0, color='k', lw=0.8), ax.set_xscale('log'), ax.legend(fontsize=6)
        ax.set(xlabel='training steps (right of 20 k: the bases and the fine-tuned arms)', ylabel="cosine of two batches' gradients")
        ax.set_title(f'T = {rg[1:]}: gradient signal-to-noise', fontsize=9)
    fig.tight_layout()
    R.save_figure(fig, path)


def plot_curves(curves, path):
    """Fig. 1 / Fig. 3's analogue: D_MMD(t) of the control and the regulariser arms (mean over seeds)
    along S = 20 and S = T, with the perfect-model floor at t = 0 as a band (mean ± 2 std)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    panels = [(rg, S) for rg, c in curves.items() for S in c['models']['control']]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (rg, S) in zip(axes[0], panels):
        c = curves[rg]
        for m, cur in c['models'].items():
            ax.plot(cur[S]['t'], cur[S]['mean'], '-' if m == 'control' else '--', label=LABEL[m])
        lo, hi = c['floor'][0] - 2 * c['floor'][1], c['floor'][0] + 2 * c['floor'][1]
        ax.axhspan(lo, hi, color='grey', alpha=0.25, label='perfect-model floor at t = 0')
        ax.invert_xaxis()
        ax.set_xlabel('chain index t (sampling runs right)')
        ax.set_ylabel('D_MMD(t), laplace')
        ax.set_title(f'T = {rg[1:]}, S = {S}', fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    R.save_figure(fig, path)
