"""The step-count protocol's aggregation (experiments/reproduce.py --report runs it): results/steps/*.json ->
results/steps_tables.md (the headline table per data set and sampler, the final metric against S,
the shape of D_MMD(t) and A(t), the regulariser's signal, the cost per step), steps_summary.json
and the figures steps_final_DS.png, steps_curves_DS.png, steps_reg_signal.png.

    python -m experiments.reproduce --report
"""
import json
import math
import os

import numpy as np
import torch

import data as D
import runtime as R
from metrics import stats as ST
from experiments.protocol import RES, CURVE_STEPS, read_json, FRESH_SEED, METHODS, N_REF, REGIMES, STEPS, T0_FRACTIONS, ClassifierMetric, ToyMetric

ALPHA = 0.05   # family-wise error rate per table (Holm)


def load_steps(res_dir):
    """({(data set, regime, method): [run JSON sorted by seed]}, {data set: timing JSON})."""
    runs, timing, folder = {}, {}, os.path.join(res_dir, 'steps')
    for f in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if not f.endswith('.json'):
            continue
        with open(os.path.join(folder, f)) as fh:
            r = json.load(fh)
        if f.startswith('steps_timing_'):
            timing[f[len('steps_timing_'):-5]] = r
        else:
            j = r['job']
            runs.setdefault((j['dataset'], j['regime'], j['method']), []).append(r)
    for rs in runs.values():
        rs.sort(key=lambda r: r['job']['seed'])
    return runs, timing


def stat(xs, diff=False):
    """mean, std over seeds; for a paired difference (diff) also its 95 % t interval (ci) and the
    paired t-test's p (metrics/stats.py). Whether it is marked is decided per table (mark)."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    if diff:
        r = ST.paired(xs)
        return dict(mean=r['mean'], std=0.0 if r['n'] < 2 else r['std'], n=r['n'], diff=True, ci=list(r['ci']),
                    p=r['p'], sig=False)
    m, s = float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0
    return dict(mean=m, std=s, n=len(xs), diff=False, sig=False)


def mark(cells, alpha=ALPHA):
    """One table's paired cells (stat dicts, None skipped) as one family: Holm-adjusted p
    (p_holm) and sig = p_holm < alpha. Returns the table's note: m, and the smallest mean
    difference detectable with 80 % power at Holm's first step (alpha / m) in units of a cell's
    paired std, with its median over the cells in the metric's units."""
    cells = [c for c in cells if c and c.get('diff')]
    for c, q in zip(cells, ST.holm([c['p'] for c in cells])):
        c.update(p_holm=q, sig=bool(q < alpha))   # NaN (n < 2) is never marked
    tested = [c for c in cells if not math.isnan(c['p_holm'])]
    if not tested:
        return dict(m=0, note='')
    m, n = len(tested), int(np.median([c['n'] for c in tested]))
    k = ST.min_detectable(1.0, n, alpha / m)
    med = float(np.median([ST.min_detectable(c['std'], c['n'], alpha / m) for c in tested]))
    note = (f'* = Holm-adjusted paired t-test p < {alpha:g} over this table\'s m = {m} cells '
            f'({sum(c["sig"] for c in tested)} marked). Smallest detectable |mean difference| (80 % power, '
            f'alpha = {alpha:g} / {m}, n = {n}): {k:.2f} x a cell\'s paired std, median over the cells {med:.4f}.')
    return dict(m=m, marked=sum(c['sig'] for c in tested), k_std=k, median_min_detectable=med, note=note)


def fmt(st, digits=4):
    if st is None:
        return '-'
    star, n = '*' if st.get('sig') else '', (f" (n={st['n']})" if st['n'] != 5 else '')
    if st['diff'] and all(map(math.isfinite, st.get('ci', [math.nan]))):   # a paired difference: its 95 % interval
        return f"{st['mean']:+.{digits}f} [{st['ci'][0]:+.{digits}f}, {st['ci'][1]:+.{digits}f}]{star}{n}"
    return f"{st['mean']:{'+' if st['diff'] else ''}.{digits}f} ± {st['std']:.{digits}f}{star}{n}"


def row_of(run, sampler, S):
    return next((r for r in run['rows'] if r['sampler'] == sampler and r['steps'] == S), None)


def final_floor(ds, n=1000, draws=5, cfg=None, n_ref=N_REF):
    """The perfect model's score: n fresh true draws (MNIST: held-out test digits, disjoint sets)
    in place of the model's samples."""
    if not D.is_toy(ds):
        score = ClassifierMetric(cfg)
        x = D.to_model_space(D.load_mnist_labelled(cfg['data_dir'], 'test', cfg['image_size'])[0])
        return stat([score(x[i * n:(i + 1) * n])['fd'] for i in range(min(draws, len(x) // n))])
    ref = ToyMetric(ds, FRESH_SEED, n_ref)
    return stat([ref(D.sample_toy(ds, n, torch.Generator().manual_seed(777 + i)))['mmd'] for i in range(draws)])


def paired(runs, base, key, sampler, S, base_key=None):
    """method - vanilla at the same seed (same evaluation randomness): stat over seeds."""
    b = {r['job']['seed']: row_of(r, sampler, S) for r in base}
    out = []
    for r in runs:
        x, y = row_of(r, sampler, S), b.get(r['job']['seed'])
        if x and y and x.get(key) is not None and y.get(base_key or key) is not None:
            out.append(x[key] - y[base_key or key])
    return stat(out, diff=True)


def final_table(runs, ds, key, cols):
    """The final metric against S, one family for Holm: {(regime, sampler, S): dict(vanilla=stat of
    vanilla's value, cells={'vanilla+ES' | method | method+ES: paired stat against vanilla})}, and
    the table's note (mark)."""
    table = {}
    for rg in REGIMES:
        base = runs.get((ds, rg, 'vanilla'), [])
        for sampler in ('ddpm', 'ddim'):
            for S in STEPS:
                if not base or not row_of(base[0], sampler, S):
                    continue
                cells = [paired(base, base, key + '_es', sampler, S, key)]
                cells += [paired(runs.get((ds, rg, m), []), base, key, sampler, S) for m in cols]
                cells += [paired(runs.get((ds, rg, m), []), base, key + '_es', sampler, S, key) for m in cols]
                table[(rg, sampler, S)] = dict(vanilla=stat([row_of(r, sampler, S)[key] for r in base]), cells=dict(
                    zip(['vanilla+ES'] + cols + [c + '+ES' for c in cols], cells)))
    return table, mark([c for v in table.values() for c in v['cells'].values()])


def report_steps(a):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    runs, timing = load_steps(RES)
    if not runs:
        print(f'no step-count runs in {RES}/steps yet')
        return
    key = {ds: 'mmd' if D.is_toy(ds) else 'fd' for ds, _, _ in runs}
    summary, md = dict(final={}, shape={}, reg={}, cost=timing), []
    md.append('Paired differences to vanilla at the same seed (negative = better): mean over seeds and its 95 % t '
              'interval [lo, hi]; values (rows marked "value"): mean ± std over seeds (n = 5 unless shown); '
              f'* = paired t-test p < {ALPHA:g} after Holm\'s correction over the cells of its table '
              '(metrics/stats.py; every cell\'s p and Holm p: steps_summary.json). "+ES": after epsilon scaling.')
    for ds in sorted({k[0] for k in runs}):
        first = next(rs[0] for k, rs in runs.items() if k[0] == ds)
        floor = final_floor(ds, first['n'], cfg=first['config'], n_ref=first.get('n_ref', N_REF))
        methods = [m for m in METHODS if any((ds, rg, m) in runs for rg in REGIMES)]
        methods += sorted({k[2] for k in runs if k[0] == ds and k[2] not in METHODS})
        md += headline(ds, runs, key[ds], methods, timing.get(ds), floor)
        md.append(f'\n### {ds}: final {key[ds]} against S' + (f" (perfect-model floor {fmt(floor)})" if floor else ''))
        cols = [m for m in methods if m != 'vanilla']
        names = ['vanilla+ES'] + cols + [c + '+ES' for c in cols]
        md.append('| T | sampler | S | vanilla | ' + ' | '.join(names) + ' |')
        md.append('|' + '---|' * (4 + len(names)))
        table, note = final_table(runs, ds, key[ds], cols)
        for (rg, sampler, S), v in table.items():
            summary['final'][f'{ds}/{rg}/{sampler}/{S}'] = v
            md.append(f"| {rg[1:]} | {sampler} | {S} | {fmt(v['vanilla'])} | " +
                      ' | '.join(fmt(v['cells'][c]) for c in names) + ' |')
        md.append('\n' + note['note'])
        summary['final'][f'{ds}/table'] = note
        # shape: D_MMD(0) of the ancestral chain and A(0) of an error injected at 0.9 T / 0.5 T / 0.1 T
        md.append(f'\n### {ds}: shape of D_MMD(t) (laplace kernel, value at t = 0 and max over t) and '
                  'amplification A(0) of an error (RMS 0.1) injected at t0, ancestral chain; mean over seeds')
        md.append('| T | S | method | D_MMD(0) | max_t D_MMD | ' + ' | '.join(f'A(0), t0 = {f} T' for f in T0_FRACTIONS) + ' |')
        md.append('|' + '---|' * (5 + len(T0_FRACTIONS)))
        for rg in REGIMES:
            for S in CURVE_STEPS:
                for m in methods:
                    rs = [r for r in runs.get((ds, rg, m), []) if str(S) in r.get('curves', {})]
                    if not rs:
                        continue
                    d0 = stat([r['curves'][str(S)]['laplace'][-1] for r in rs])
                    dmax = stat([max(r['curves'][str(S)]['laplace']) for r in rs])
                    amps = [stat([r['faulttol'][str(S)][str(f)]['amp'][-1] for r in rs
                                  if str(f) in r['faulttol'].get(str(S), {})]) for f in T0_FRACTIONS]
                    summary['shape'][f'{ds}/{rg}/{S}/{m}'] = dict(d_mmd0=d0, d_mmd_max=dmax, amp0=amps)
                    md.append(f'| {rg[1:]} | {S} | {m} | {fmt(d0)} | {fmt(dmax)} | ' +
                              ' | '.join(fmt(x, 3) for x in amps) + ' |')
        plot_final(plt, ds, runs, key[ds], methods, floor)
        plot_curves(plt, ds, runs, methods)
    reg_rows = reg_signal(runs)
    summary['reg'] = reg_rows
    if reg_rows:
        md.append('\n### The regulariser\'s signal: logged L_reg over the last 20 % of training against its '
                  'perfect-model floor (reg_floor), and |grad of lambda_reg w_r L_reg| / |grad of lambda_nll L_nll| '
                  '(python -m experiments.bench --what reg-grad, seed 0, end of training)')
        md.append('| data set | T | method | L_reg (end) | floor | ratio | grad fraction (median) |')
        md.append('|---|---|---|---|---|---|---|')
        for k, v in reg_rows.items():
            md.append(f"| {' | '.join(k.split('/'))} | {fmt(v['end'])} | {fmt(v['floor'])} | "
                      f"{fmt(v['ratio'], 2)} | {v['grad_fraction'] if v['grad_fraction'] is not None else '-'} |")
        plot_reg_signal(plt, runs)
    for ds, t in timing.items():
        md.append(f'\n### {ds}: cost of one training step (`python -m experiments.bench --what methods`, interleaved, 1 thread)')
        md.append('| method | ms/step | ratio to vanilla | peak memory (MB) |')
        md.append('|---|---|---|---|')
        for m, r in t['methods'].items():
            mem = r.get('peak_mem_MB')
            md.append(f"| {m} | {1e3 * r['s_per_step']:.1f} | {r['ratio']:.2f} | {'-' if mem is None else f'{mem:.1f}'} |")
    R.write_json(os.path.join(RES, 'steps_summary.json'), summary)
    R.atomic_write(os.path.join(RES, 'steps_tables.md'), lambda f: f.write('\n'.join(md) + '\n'), binary=False)
    print(f"step-count report: {sum(map(len, runs.values()))} runs -> {RES}/steps_tables.md")


HEADLINE = [('T1000', 10), ('T1000', 20), ('T1000', 100), ('T1000', 1000), ('T50', 10), ('T50', 20), ('T50', 50)]


def headline(ds, runs, key, methods, timing, floor):
    """method (and method + ES) x regime (T, S) -> paired change of the final metric, cost per
    training step, and the amplification A(0) of an error injected at t0 = 0.5 T (S = 20)."""
    md = []
    for sampler in ('ddpm', 'ddim'):
        md.append(f'\n### Headline, {ds}, {"ancestral" if sampler == "ddpm" else "DDIM"} sampling: change of the final '
                  f'{key} against vanilla at the same seed (negative = better)')
        md.append('| method | cost / step | ' + ' | '.join(f'T={rg[1:]}, S={S}' for rg, S in HEADLINE) +
                  ' | A(0) ancestral, t0 = T/2, S = 20, T = 1000 |')
        md.append('|' + '---|' * (3 + len(HEADLINE)))
        van = [stat([row_of(r, sampler, S)[key] for r in runs.get((ds, rg, 'vanilla'), []) if row_of(r, sampler, S)])
               for rg, S in HEADLINE]
        amp = lambda rs: stat([r['faulttol']['20']['0.5']['amp'][-1] for r in rs if '20' in r.get('faulttol', {})])  # noqa: E731
        md.append(f'| vanilla (value) | 1 | ' + ' | '.join(map(fmt, van)) +
                  f" | {fmt(amp(runs.get((ds, 'T1000', 'vanilla'), [])), 3)} |")
        if floor:
            md.append('| perfect model (value) | - | ' + ' | '.join(fmt(floor) for _ in HEADLINE) + ' | - |')
        rows, note = headline_table(runs, ds, key, methods, sampler)
        for m, es, cells in rows:
            timed = 'reg' if m.startswith('reg_l') else m.replace('_eqtime', '')   # lambda does not change the cost
            ratio = (timing or {}).get('methods', {}).get(timed, {}).get('ratio')
            a = amp(runs.get((ds, 'T1000', m), [])) if not es else None
            md.append(f"| {m}{' + ES' if es else ''} | {'-' if ratio is None or es else f'{ratio:.2f}'} | " +
                      ' | '.join(map(fmt, cells)) + f" | {fmt(a, 3) if a else '-'} |")
        md.append('\n' + note['note'])
    return md


def headline_table(runs, ds, key, methods, sampler):
    """The headline table's paired cells, one family for Holm: [(method, with ES, [paired stat
    against vanilla per HEADLINE regime and S])] (rows with no cell left out), and its note (mark)."""
    rows = []
    for m in methods:
        for es in ([False, True] if m != 'vanilla' else [True]):
            cells = [paired(runs.get((ds, rg, m), []), runs.get((ds, rg, 'vanilla'), []),
                            key + ('_es' if es else ''), sampler, S, key) for rg, S in HEADLINE]
            if any(cells):
                rows.append((m, es, cells))
    return rows, mark([c for _, _, cells in rows for c in cells])


def reg_signal(runs):
    rows = {}
    for (ds, rg, m), rs in runs.items():
        rs = [r for r in rs if 'reg_floor' in r and r.get('reg_curve')]
        if not rs:
            continue
        ends = [float(np.mean([v for _, v in r['reg_curve'][-max(1, len(r['reg_curve']) // 5):]])) for r in rs]
        floors = [r['reg_floor']['mean'] for r in rs]
        g = next((r['reg_grad']['median_ratio'] for r in rs if 'reg_grad' in r), None)
        rows[f'{ds}/{rg[1:]}/{m}'] = dict(end=stat(ends), floor=stat(floors),
                                          ratio=stat([e / f for e, f in zip(ends, floors)]),
                                          grad_fraction=None if g is None else round(g, 3))
    return rows


def plot_final(plt, ds, runs, key, methods, floor):
    fig, axes = plt.subplots(len(REGIMES), 2, figsize=(12, 4 * len(REGIMES)), squeeze=False)
    for i, rg in enumerate(REGIMES):
        for j, sampler in enumerate(('ddpm', 'ddim')):
            ax = axes[i][j]
            for c, m in enumerate(methods):
                rs = runs.get((ds, rg, m), [])
                for k, ls in ((key, '-'), (key + '_es', ':')):
                    pts = [(S, stat([row_of(r, sampler, S).get(k) for r in rs if row_of(r, sampler, S)]))
                           for S in STEPS]
                    pts = [(S, st) for S, st in pts if st]
                    if pts and (ls == '-' or m == 'vanilla'):
                        ax.errorbar([p[0] for p in pts], [p[1]['mean'] for p in pts], [p[1]['std'] for p in pts],
                                    ls=ls, marker='o', ms=3, capsize=2, color=f'C{c}',
                                    label=m + (' + ES' if ls == ':' else ''))
            if floor:
                ax.axhspan(floor['mean'] - floor['std'], floor['mean'] + floor['std'], color='grey', alpha=.3,
                           label='perfect model')
            ax.set_xscale('log')
            ax.set_xticks([S for S in STEPS if S <= int(rg[1:])], [str(S) for S in STEPS if S <= int(rg[1:])])
            ax.minorticks_off()
            ax.set_title(f'{ds}, trained with {rg}, {sampler}')
            ax.set_xlabel('sampling steps S')
            ax.set_ylabel(key)
            ax.legend(fontsize=7)
    fig.tight_layout()
    R.save_figure(fig, os.path.join(RES, f'steps_final_{ds}.png'), dpi=80)
    plt.close(fig)


def plot_curves(plt, ds, runs, methods):
    panels = [(rg, S) for rg in REGIMES for S in CURVE_STEPS if S <= int(rg[1:])]
    fig, axes = plt.subplots(2, len(panels), figsize=(5 * len(panels), 8), squeeze=False)
    for j, (rg, S) in enumerate(panels):
        for c, m in enumerate(methods):
            rs = [r for r in runs.get((ds, rg, m), []) if str(S) in r.get('curves', {})]
            if not rs:
                continue
            cv = rs[0]['curves'][str(S)]
            axes[0][j].plot(cv['t'], np.mean([r['curves'][str(S)]['laplace'] for r in rs], 0), color=f'C{c}', label=m)
            for f, ls in zip(T0_FRACTIONS, ('-', '--', ':')):
                if str(f) not in rs[0]['faulttol'].get(str(S), {}):
                    continue
                ft = rs[0]['faulttol'][str(S)][str(f)]
                axes[1][j].plot(ft['t'], np.mean([r['faulttol'][str(S)][str(f)]['amp'] for r in rs], 0),
                                ls=ls, color=f'C{c}', label=f'{m}, t0={ft["t0"]}' if c == 0 or f == 0.9 else None)
        axes[0][j].set_title(f'{ds}, {rg}, S = {S}: D_MMD(t) (laplace)')
        axes[1][j].set_title('A(t) = gap(t) / gap(t0)')
        axes[1][j].set_yscale('log')
        for ax in axes[:, j]:
            ax.invert_xaxis()
            ax.set_xlabel('t')
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
            else:   # not run yet, or not measured for this data set (MNIST: A(t) at S = 20 only)
                ax.text(0.5, 0.5, 'not measured', transform=ax.transAxes, ha='center', color='grey')
    fig.tight_layout()
    R.save_figure(fig, os.path.join(RES, f'steps_curves_{ds}.png'), dpi=80)
    plt.close(fig)


def plot_reg_signal(plt, runs):
    """One panel per data set; colour = method, line style = regime (T = 1000 solid, T = 50 dashed)."""
    names = list(METHODS) + sorted({k[2] for k in runs} - set(METHODS))
    sets = sorted({ds for ds, _, _ in runs})
    fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 4), squeeze=False)
    for (ds, rg, m), rs in sorted(runs.items()):
        ax, c = axes[0][sets.index(ds)], names.index(m)
        rs = [r for r in rs if 'reg_floor' in r and r.get('reg_curve')]
        if not rs:
            continue
        n = min(len(r['reg_curve']) for r in rs)
        y = np.mean([np.array([v for _, v in r['reg_curve'][:n]]) / r['reg_floor']['mean'] for r in rs], 0)
        y = np.convolve(y, np.ones(10) / 10, mode='valid') if n >= 10 else y
        ax.plot([s for s, _ in rs[0]['reg_curve'][:n]][-len(y):], y, color=f'C{c % 10}',
                ls='-' if rg == 'T1000' else '--', label=f'{rg} {m} (n={len(rs)})')
    for ax, ds in zip(axes[0], sets):
        ax.axhline(1, color='k', lw=.8)
        ax.set_title(ds)
        ax.set_xlabel('training step')
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    axes[0][0].set_ylabel('L_reg / perfect-model floor (moving mean of 10 logs)')
    fig.tight_layout()
    R.save_figure(fig, os.path.join(RES, 'steps_reg_signal.png'), dpi=80)
    plt.close(fig)



# ---- the toy metric with resolution (reproduce --resolution) -------------------------------------
def resolution_summary():
    """results/resolution_toy.json, .md and .png from results/resolution/: per regime, kernel and S,
    the vanilla models' unbiased MMD^2, the paired change reg - vanilla (95 % t interval, p, Holm
    over the regime's cells), the perfect-model floor (mean and std over seeds), the smallest
    change the table detects (80 % power at Holm's first-step level), and the spread of repeated
    evaluation of one model (seed 0) beside the spread over training seeds. Returns the markdown."""
    folder = os.path.join(RES, 'resolution')
    runs = [read_json(os.path.join(folder, f)) for f in sorted(os.listdir(folder)) if f.endswith('.json')]
    by = {(r['job'].get('dataset', '8gaussians'), r['job']['regime'], r['job']['method'], r['job']['seed']): r
          for r in runs}
    out = {}
    for ds, rg in sorted({k[:2] for k in by}, key=lambda k: (k[0], k[1] != 'T1000')):
        seeds = sorted(s for (d, g, m, s) in by if (d, g, m) == (ds, rg, 'vanilla') and (ds, g, 'reg', s) in by)
        if len(seeds) < 2:
            continue
        cells = []
        for kern in ('gaussian', 'laplace'):
            for S in (S for S in STEPS if str(S) in by[(ds, rg, 'vanilla', seeds[0])]['scores']['e0'][kern]):
                get = lambda m, s, e='e0', what='model': by[(ds, rg, m, s)]['scores'][e][kern][str(S)][what]  # noqa: E731
                van = [get('vanilla', s) for s in seeds]
                t = ST.paired([get('reg', s) - get('vanilla', s) for s in seeds])
                floor = [get(m, s, what='floor') for m in ('vanilla', 'reg') for s in seeds]
                reps = [get('vanilla', 0, e) for e in by[(ds, rg, 'vanilla', 0)]['scores']] if 0 in seeds else []
                cells.append(dict(kernel=kern, S=S, vanilla_mean=float(np.mean(van)), vanilla_std=float(np.std(van, ddof=1)),
                                  diff=t['mean'], ci=list(t['ci']), p=t['p'], diff_std=t['std'],
                                  floor_mean=float(np.mean(floor)), floor_std=float(np.std(floor, ddof=1)),
                                  eval_repeat_std=float(np.std(reps, ddof=1)) if len(reps) > 1 else None))
        for c, q in zip(cells, ST.holm([c['p'] for c in cells])):
            c['p_holm'] = q
            c['min_detectable'] = ST.min_detectable(c['diff_std'], len(seeds), 0.05 / len(cells))
        out[f'{ds}_{rg}'] = dict(dataset=ds, regime=rg, seeds=seeds, n=runs[0]['n'], cells=cells)
    e4 = lambda v: 'n/a' if v is None or (isinstance(v, float) and math.isnan(v)) else f'{1e4 * v:.2f}'  # noqa: E731
    lines = [f"Unbiased MMD^2 of n = {runs[0]['n']} ancestral samples against n fresh true draws, x 1e-4; "
             'reg - vanilla paired by seed, Holm over each (set, T) table; seeds: '
             + ', '.join(f"{k} {len(r['seeds'])}" for k, r in out.items()) + '.\n',
             '| set | T | kernel | S | vanilla | floor | reg - vanilla [95 % CI] | Holm p | detectable | eval-repeat std |',
             '|---|---|---|---:|---:|---:|---:|---:|---:|---:|']
    for r in out.values():
        for c in r['cells']:
            lines.append(f"| {r['dataset']} | {r['regime'][1:]} | {c['kernel']} | {c['S']} | {e4(c['vanilla_mean'])} ± "
                         f"{e4(c['vanilla_std'])} | {e4(c['floor_mean'])} ± {e4(c['floor_std'])} | "
                         f"{1e4 * c['diff']:+.2f} [{e4(c['ci'][0])}, {e4(c['ci'][1])}] | {c['p_holm']:.2g} | "
                         f"{e4(c['min_detectable'])} | {e4(c['eval_repeat_std'])} |")
    R.write_json(os.path.join(RES, 'resolution_toy.json'), out)
    md = '\n'.join(lines).strip() + '\n'
    R.atomic_write(os.path.join(RES, 'resolution_toy.md'), lambda f: f.write(md), binary=False)
    plot_resolution(out)
    return md


def plot_resolution(out):
    """Vanilla and reg (mean over seeds of the unbiased MMD^2) against S, per kernel (rows) and
    regime (columns), with the perfect-model floor as a band (its mean ± 2 std)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, len(out), figsize=(5 * len(out), 6.4), squeeze=False)
    for j, (rg, r) in enumerate(out.items()):
        for ax, kern in zip(axes[:, j], ('gaussian', 'laplace')):
            c = [x for x in r['cells'] if x['kernel'] == kern]
            S = [x['S'] for x in c]
            ax.plot(S, [x['vanilla_mean'] for x in c], 'o-', label='vanilla')
            ax.errorbar(S, [x['vanilla_mean'] + x['diff'] for x in c], yerr=[(x['ci'][1] - x['ci'][0]) / 2 for x in c],
                        fmt='s--', capsize=3, label='reg (paired 95 % CI of the change)')
            ax.fill_between(S, [x['floor_mean'] - 2 * x['floor_std'] for x in c],
                            [x['floor_mean'] + 2 * x['floor_std'] for x in c], color='grey', alpha=0.3,
                            label='perfect-model floor (mean ± 2 std)')
            ax.set_xscale('log')
            ax.set_xlabel('sampling steps S (ancestral)')
            ax.set_ylabel(f'MMD^2 ({kern}, unbiased)')
            ax.set_title(f"{rg.replace('_', ' ')}, {kern}: n = {r['n']}, {len(r['seeds'])} seeds", fontsize=9)
            ax.legend(fontsize=6)
    fig.tight_layout()
    R.save_figure(fig, os.path.join(RES, 'resolution_toy.png'))
