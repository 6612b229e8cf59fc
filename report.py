"""Aggregate the runs of reproduce.py into results/: mean and spread over seeds, the markdown
tables of RESULTS.md (results/tables.md), summary.json and the figures (D_MMD(t) curves per
data set, final metrics, time per step against L, MNIST sample grids).

    python reproduce.py --report     # re-aggregate results/runs/*.json (report.report)

Reads only results/runs/*.json, results/timing*.json, results/diagnostics.json and, for the
reference floors, the data. Also home of the protocol's shared constants (reproduce.py imports them).
"""
import json
import os
import statistics

import torch

import data as D
import runtime as R
from mmd import mmd2, signed_sqrt

ROOT = os.path.dirname(os.path.abspath(__file__))
# where results (committed) and raw runs (git-ignored) go; the environment can redirect both
RES = os.environ.get('REPRO_RESULTS', os.path.join(ROOT, 'results'))
OUT = os.environ.get('REPRO_OUT', os.path.join(ROOT, 'out', 'repro'))
KERNELS = ('gaussian', 'laplace', 'imq')
DATASETS = ('8gaussians', 'swissroll', 'mnist')
EVAL_SEED, SAMPLE_SEED, FRESH_SEED = 0, 1, 99991
MNIST_DIR = os.path.join(ROOT, '..', 'shared', 'data')
# the CPU-sized MNIST preset (runtime.py), --data-dir where earlier results files have it
MNIST_FLAGS = [*R.MNIST14_FLAGS[:6], '--data-dir', MNIST_DIR, *R.MNIST14_FLAGS[6:]]

# variant -> (train.py flags, how many steps: 'S' | 'S/5' | 'eqtime' , curve or t=0 only)
MAIN = {'vanilla': [], 'ip': ['--loss', 'ip'], 'sa': ['--loss', 'sa'], 'reg': ['--reg']}
ABLATIONS = {
    'abl_uniform': ['--reg', '--reg-weight', 'uniform'],
    'abl_nows_L5': ['--reg', '--no-warm-start'],
    'abl_nows_L7': ['--reg', '--no-warm-start', '--reg-L', '7'],
    'abl_L1': ['--reg', '--reg-L', '1'], 'abl_L3': ['--reg', '--reg-L', '3'],
    'abl_L7': ['--reg', '--reg-L', '7'], 'abl_L9': ['--reg', '--reg-L', '9'],
    'abl_sum1': ['--reg', '--reg-norm', 'sum1'],
    'abl_last': ['--reg', '--reg-grad', 'last'],
}
TIMED = {  # timing variants (interleaved in one process): name -> train.py flags
    'vanilla': [], 'ip': ['--loss', 'ip'], 'sa': ['--loss', 'sa'],
    **{f'reg_L{L}_full': ['--reg', '--reg-L', str(L)] for L in (1, 3, 5, 7, 9)},
    **{f'reg_L{L}_last': ['--reg', '--reg-L', str(L), '--reg-grad', 'last'] for L in (1, 3, 5, 7, 9)},
}


def mnist_flags(a):
    return MNIST_FLAGS + ['--lr', str(a.mnist_lr)]


def read_json(path):
    with open(path) as f:
        return json.load(f)


def run_json(name):
    return os.path.join(RES, 'runs', name + '.json')


def result_path(name):
    """The file whose existence means job `name` is done."""
    if name.startswith('steps_'):   # the step-count protocol (sweep.py)
        return os.path.join(RES, 'steps', name + '.json')
    return os.path.join(RES, name + '.json') if name.startswith(('timing', 'diagnostics', 'fewstep')) else run_json(name)


def mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None, 0
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0), len(xs)


def fmt(xs, digits=4):
    m, s, n = mean_std(xs)
    return '-' if m is None else f'{m:.{digits}f} ± {s:.{digits}f}' + ('' if n == 3 else f' (n={n})')


def examples(cfg, n):
    """The evaluation's x_0: n training examples drawn with EVAL_SEED (as errprop does)."""
    return D.random_examples(n, EVAL_SEED, cfg['dataset'], cfg['data_dir'], cfg['image_size'], cfg['toy_n'],
                             cfg['seed'])


@torch.no_grad()
def reference_floor(ds, n):
    """What a perfect model would score: fresh draws of the true distribution in place of the
    model's samples (D_MMD(t=0) vs the training subset, and vs the fresh reference set)."""
    out = {}
    if ds == 'mnist':   # n other real digits, disjoint from the evaluation set, three times
        cfg = R.parse_config(['--dataset', ds] + MNIST_FLAGS)[0]
        x = D.to_model_space(D.load_data(ds, cfg['data_dir'], cfg['image_size']))
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(EVAL_SEED))
        x0 = examples(cfg, n)   # == x[idx[:n]]
        for i in (1, 2, 3):
            for k in KERNELS:
                out.setdefault(k, []).append(signed_sqrt(float(mmd2(x[idx[i * n:(i + 1) * n]], x0, k, 'u'))))
        return out
    for seed in (0, 1, 2):
        cfg = R.parse_config(['--dataset', ds, '--seed', str(seed)])[0]
        x0 = examples(cfg, n)
        s = D.sample_toy(ds, n, torch.Generator().manual_seed(777 + seed))
        fresh = D.sample_toy(ds, 2000, torch.Generator().manual_seed(FRESH_SEED))
        for k in KERNELS:
            out.setdefault(k, []).append(signed_sqrt(float(mmd2(s, x0, k, 'u'))))
        s1 = D.sample_toy(ds, 1000, torch.Generator().manual_seed(555 + seed))
        out.setdefault('mmd_true', []).append(signed_sqrt(float(mmd2(s1, fresh, 'gaussian', 'u'))))
    return out


def load_runs():
    """{(data set, variant): [run JSON, ...] sorted by seed} from results/runs/."""
    runs, folder = {}, os.path.join(RES, 'runs')
    for f in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if f.endswith('.json'):
            r = read_json(os.path.join(folder, f))
            runs.setdefault((r['job']['dataset'], r['job']['variant']), []).append(r)
    for rs in runs.values():
        rs.sort(key=lambda r: r['job']['seed'])
    return runs


def aggregate(runs):
    """{'ds/variant': mean and spread over seeds of the final metrics and, where measured, of the
    whole D_MMD(t) curve}."""
    agg = {}
    for (ds, v), rs in sorted(runs.items()):
        e = dict(seeds=[r['job']['seed'] for r in rs], steps=[r['steps'] for r in rs],
                 eqtime_ratio=rs[0]['eqtime_ratio'], train_argv=rs[0]['train_argv'],
                 d_t0={k: mean_std([r['d_t0'][k] for r in rs])[:2] for k in KERNELS},
                 d_T={k: mean_std([r['curve'][k][0] for r in rs])[:2] for k in KERNELS},
                 mmd_true=mean_std([r.get('mmd_true') for r in rs])[:2],
                 per_seed=[dict(seed=r['job']['seed'], d_t0=r['d_t0'], mmd_true=r.get('mmd_true'),
                                d_T={k: r['curve'][k][0] for k in KERNELS}) for r in rs])
        if rs[0]['t_stride'] < rs[0]['curve']['t'][0]:
            ts = rs[0]['curve']['t']
            e['curve'] = dict(t=ts, **{k: dict(
                mean=[statistics.mean(r['curve'][k][i] for r in rs) for i in range(len(ts))],
                std=[statistics.stdev(r['curve'][k][i] for r in rs) if len(rs) > 1 else 0.0
                     for i in range(len(ts))]) for k in KERNELS})
        agg[f'{ds}/{v}'] = e
    return agg


def paired_differences(runs, big):
    """{'ds/variant': mean and spread of method - vanilla of the SAME seed}: every run is evaluated
    with the same evaluation randomness (x_T, chain noise, forward noise, reference sets), so the
    paired difference cancels most of the estimator noise that dominates the across-seed spread."""
    paired = {}
    for ds in DATASETS:
        base = {r['job']['seed']: r for r in runs.get((ds, 'vanilla'), [])}
        for (d2, v), rs in sorted(runs.items()):
            pr = [(r, base[r['job']['seed']]) for r in rs if r['job']['seed'] in base]
            if d2 != ds or v in ('vanilla', big) or not pr:   # (big: a different N, not comparable)
                continue
            dd = {k: [r['d_t0'][k] - b['d_t0'][k] for r, b in pr] for k in KERNELS}
            dd['mmd_true'] = [r['mmd_true'] - b['mmd_true'] for r, b in pr if r.get('mmd_true') is not None]
            paired[f'{ds}/{v}'] = dict(n=len(pr), values=dd)
    return paired


def tables(a, runs, agg, floors, paired, timings, diag, big):
    """The markdown tables of RESULTS.md, as a list of lines."""
    lines = []

    def table(ds, variants, title):
        rows = [(v, runs[(ds, v)]) for v in variants if (ds, v) in runs]
        if not rows:
            return
        lines.extend([f'\n### {title}\n', '| method | steps | D_MMD(t=0) gaussian | laplace | imq | '
                      'MMD vs true dist. (gaussian) | D_MMD(t=T) gaussian |', '|---|---|---|---|---|---|---|'])
        if ds in floors:
            f = floors[ds]
            lines.append(f"| *perfect model ({'other real digits' if ds == 'mnist' else 'fresh true samples'})* | - | "
                         f"{fmt(f['gaussian'])} | {fmt(f['laplace'])} | {fmt(f['imq'])} | {fmt(f.get('mmd_true', []))} | - |")
        if f'{ds}_{big}' in floors:
            f = floors[f'{ds}_{big}']
            lines.append(f"| *perfect model, N = M = {a.mnist_n_full}* | - | {fmt(f['gaussian'])} | {fmt(f['laplace'])} | "
                         f"{fmt(f['imq'])} | - | - |")
        for v, rs in rows:
            steps = sorted({r['steps'] for r in rs})
            lines.append(f'| {v} | {"/".join(map(str, steps))} | ' +
                         ' | '.join(fmt([r['d_t0'][k] for r in rs]) for k in KERNELS) +
                         f" | {fmt([r.get('mmd_true') for r in rs])} | {fmt([r['curve']['gaussian'][0] for r in rs])} |")

    for ds in DATASETS:
        table(ds, ['vanilla', 'ip', 'sa', 'reg', 'ip_eqtime', 'sa_eqtime', 'reg_eqtime',
                   'vanilla_regsteps', f'vanilla_S{a.long_steps}', f'reg_S{a.long_steps}', big],
              f'{ds}: methods (equal steps S, then equal wall-clock time)')
    table('8gaussians', ['vanilla', 'ft_vanilla', 'ft_reg'], '8gaussians: fine-tuning the vanilla run for S/5 steps')
    table('8gaussians', ['reg'] + list(ABLATIONS), '8gaussians: ablations of the regulariser (reg = L 5, exp '
          'weight, warm start, mean1, full grad)')
    for ds in DATASETS:
        if (ds, 'vanilla') not in runs:
            continue
        lines.extend([f'\n### {ds}: paired difference to vanilla of the same seed (method - vanilla; < 0 = better)\n',
                      '| method | n seeds | Δ D_MMD(t=0) gaussian | Δ laplace | Δ imq | Δ MMD vs true dist. |',
                      '|---|---|---|---|---|---|'])
        for key, p in paired.items():
            if key.split('/')[0] == ds:
                lines.append(f"| {key.split('/', 1)[1]} | {p['n']} | " +
                             ' | '.join(fmt(p['values'][k]) for k in (*KERNELS, 'mmd_true')) + ' |')
    tsel = [1000, 600, 300, 100, 60, 40, 20, 0]
    for k in KERNELS:
        lines.extend([f'\n### D_MMD(t) along the chain ({k} kernel, mean ± std over seeds)\n',
                      '| data set / method | ' + ' | '.join(f't={t}' for t in tsel) + ' |',
                      '|---|' + '---|' * len(tsel)])
        for key, e in agg.items():
            if 'curve' not in e:
                continue
            idx = [e['curve']['t'].index(t) for t in tsel if t in e['curve']['t']]
            lines.append(f'| {key} ({len(e["seeds"])}) | ' + ' | '.join(
                f"{e['curve'][k]['mean'][i]:.3f} ± {e['curve'][k]['std'][i]:.3f}" for i in idx) + ' |')
    for name, what in (('timing', 'toy MLP, batch 256'), ('timing_mnist', 'tiny U-Net, MNIST 14x14, batch 64')):
        if name in timings:
            lines.extend([f'\n### time per training step ({what}, 1 thread, interleaved)\n',
                          '| method | ms / step (median) | ratio to vanilla |', '|---|---|---|'])
            for k, r in timings[name]['methods'].items():
                lines.append(f"| {k} | {1e3 * r['s_per_step']:.1f} | {r['ratio']:.2f} |")
    for key, ds in (('reg_grad', '8gaussians'), ('reg_grad_mnist', 'MNIST')):
        if key not in diag:
            continue
        rg = diag[key]
        lines.extend([f'\n### diagnostics ({ds}, seed 0)\n',
                      f"regulariser gradient / eps-MSE gradient at lambda_reg 0.2, lambda_nll 0.8: median "
                      f"{rg['median_ratio']:.3f} (range {rg['min_ratio']:.3f}-{rg['max_ratio']:.3f}, 12 batches)"
                      + ('\n' if key == 'reg_grad' else '')])
        if key == 'reg_grad':
            lines.extend(['| samples of | rms distance to nearest mode | fraction farther than 0.5 |', '|---|---|---|'])
            for v, d in diag['mode_spread_seed0'].items():
                lines.append(f"| {v} | {d['rms_dist_to_mode']:.3f} | {d['frac_farther_than_0_5']:.3f} |")
    return lines


STYLES = {'vanilla': ('k', '-'), 'ip': ('tab:blue', '-'), 'sa': ('tab:green', '-'), 'reg': ('tab:red', '-'),
          'ip_eqtime': ('tab:blue', '--'), 'sa_eqtime': ('tab:green', '--'), 'reg_eqtime': ('tab:red', '--'),
          'ft_vanilla': ('tab:gray', '-'), 'ft_reg': ('tab:purple', '-'), 'vanilla_N1000': ('k', ':'),
          'vanilla_regsteps': ('tab:gray', '--')}


def plot_curves(agg):
    """results/errprop_<ds>[_finetune].png: D_MMD(t) per kernel, mean ± std over seeds per method."""
    import matplotlib.pyplot as plt
    groups = {'': ['vanilla', 'ip', 'sa', 'reg', 'ip_eqtime', 'sa_eqtime', 'reg_eqtime', 'vanilla_regsteps',
                   'vanilla_N1000'],
              '_finetune': ['vanilla', 'ft_vanilla', 'ft_reg']}
    for ds in DATASETS:
        for suffix, vs in groups.items():
            vs = [v for v in vs if 'curve' in agg.get(f'{ds}/{v}', {})]
            if not vs or vs == ['vanilla'] and suffix:   # a fine-tuning figure needs fine-tuning runs
                continue
            fig, axes = plt.subplots(1, 3, figsize=(15, 4))
            for ax, k in zip(axes, KERNELS):
                for v in vs:
                    c = agg[f'{ds}/{v}']['curve']
                    mu, sd = torch.tensor(c[k]['mean']), torch.tensor(c[k]['std'])
                    col, ls = STYLES[v]
                    ax.plot(c['t'], mu, color=col, ls=ls, label=f"{v} ({len(agg[f'{ds}/{v}']['seeds'])} seeds)")
                    ax.fill_between(c['t'], mu - sd, mu + sd, color=col, alpha=0.12)
                ax.invert_xaxis()
                ax.axhline(0, color='grey', lw=0.5)
                ax.set(xlabel='t (sampling runs T -> 0)', ylabel='D_MMD(t), unbiased', title=f'{ds}: {k} kernel')
            axes[0].legend(fontsize=8)
            fig.tight_layout()
            R.save_figure(fig, os.path.join(RES, f'errprop_{ds}{suffix}.png'), dpi=90, tight=False)


def plot_final_metrics(runs, floors):
    """results/final_metrics_<ds>.png: bars of the final metrics per method, with the floor."""
    import matplotlib.pyplot as plt
    for ds in DATASETS:
        vs = [v for v in ['vanilla', 'ip', 'sa', 'reg', 'ip_eqtime', 'sa_eqtime', 'reg_eqtime', 'vanilla_regsteps',
                          'ft_vanilla', 'ft_reg'] + list(ABLATIONS) if (ds, v) in runs]
        if not vs:
            continue
        panels = [('D_MMD(t=0) vs training data, gaussian', lambda r: r['d_t0']['gaussian'])]
        if ds != 'mnist':
            panels.append(('MMD vs the known distribution, gaussian', lambda r: r.get('mmd_true')))
        else:
            panels.append(('D_MMD(t=0) vs training data, laplace', lambda r: r['d_t0']['laplace']))
        fig, axes = plt.subplots(1, 2, figsize=(14 if len(vs) > 4 else 9, 4.5))
        for ax, (lab, get) in zip(axes, panels):
            ms = [mean_std([get(r) for r in runs[(ds, v)]]) for v in vs]
            ax.bar(range(len(vs)), [m[0] for m in ms], yerr=[m[1] for m in ms], capsize=3,
                   color=[STYLES.get(v, ('tab:orange', '-'))[0] for v in vs])
            if ds in floors:
                key = lab.split(', ')[1] if 'training' in lab else 'mmd_true'
                ax.axhline(mean_std(floors[ds][key])[0], color='grey', ls=':', label='perfect model')
                ax.legend()
            ax.set_xticks(range(len(vs)), vs, rotation=60, ha='right', fontsize=8)
            ax.set_title(f'{ds}: {lab}\n(mean ± std over seeds)', fontsize=10)
        fig.tight_layout()
        R.save_figure(fig, os.path.join(RES, f'final_metrics_{ds}.png'), dpi=90, tight=False)


def plot_mnist_samples():
    """results/samples_mnist.png: seed-0 EMA samples of each MNIST method beside real digits."""
    import matplotlib.pyplot as plt
    grids = [(v, os.path.join(RES, 'samples', f'mnist_{v}_s0.png'))
             for v in ('vanilla', 'reg', 'reg_eqtime', 'vanilla_regsteps', 'ip', 'sa')]
    grids = [(v, path) for v, path in grids if os.path.isfile(path)]
    if not grids:
        return
    import torchvision
    real = examples(R.parse_config(['--dataset', 'mnist'] + MNIST_FLAGS)[0], 64)
    fig, axes = plt.subplots(1, len(grids) + 1, figsize=(2.7 * (len(grids) + 1), 3))
    axes[0].imshow(torchvision.utils.make_grid((real + 1) / 2, nrow=8).permute(1, 2, 0))
    axes[0].set_title('real digits (14x14)', fontsize=9)
    for ax, (v, path) in zip(axes[1:], grids):
        ax.imshow(plt.imread(path))
        ax.set_title(f'{v}, seed 0, EMA', fontsize=9)
    for ax in axes:
        ax.axis('off')
    fig.tight_layout()
    R.save_figure(fig, os.path.join(RES, 'samples_mnist.png'), dpi=90, tight=False)


def plot_time_vs_L(timing):
    """results/time_vs_L.png: ms per training step against L, full and last-step gradients."""
    import matplotlib.pyplot as plt
    m = timing['methods']
    fig, ax = plt.subplots(figsize=(6, 4))
    Ls = [1, 3, 5, 7, 9]
    for grad, col in (('full', 'tab:red'), ('last', 'tab:orange')):
        ax.plot(Ls, [1e3 * m[f'reg_L{L}_{grad}']['s_per_step'] for L in Ls], 'o-', color=col,
                label=f'--reg --reg-grad {grad}')
    for k, col in (('vanilla', 'k'), ('ip', 'tab:blue'), ('sa', 'tab:green')):
        ax.axhline(1e3 * m[k]['s_per_step'], color=col, ls='--', label=k)
    ax.set(xlabel='L (k ~ U{1..L})', ylabel='ms per training step (median)',
           title='toy MLP, batch 256, 1 CPU thread (shared machine)')
    ax.legend(fontsize=8)
    fig.tight_layout()
    R.save_figure(fig, os.path.join(RES, 'time_vs_L.png'), dpi=90, tight=False)


def plot_fewstep(res):
    """results/fewstep_8gaussians.png: final error against S, with and without epsilon scaling."""
    import matplotlib.pyplot as plt
    fresh = D.sample_toy('8gaussians', 2000, torch.Generator().manual_seed(FRESH_SEED))
    floor = [signed_sqrt(float(mmd2(D.sample_toy('8gaussians', 1000, torch.Generator().manual_seed(555 + i)),
                                    fresh, 'gaussian', 'u'))) for i in range(5)]
    fig, ax = plt.subplots(figsize=(6, 4))
    m, s = mean_std(floor)[:2]
    ax.axhspan(m - s, m + s, color='grey', alpha=0.2, label='perfect model (true samples), mean ± std')
    for sampler, col in (('ddpm', 'tab:red'), ('ddim', 'tab:blue')):
        rows = [r for r in res['rows'] if r['sampler'] == sampler]
        S = [r['steps'] for r in rows]
        ax.plot(S, [r['plain'] for r in rows], 'o-', color=col, label=f'{sampler}')
        ax.plot(S, [r['eps_scaled'] for r in rows], 's--', color=col, label=f'{sampler} + eps scaling')
    ax.set_xscale('log')
    ax.axhline(0, color='grey', lw=0.5)
    ax.set(xlabel='sampling steps S', ylabel='MMD to the true distribution',
           title=f"8gaussians, vanilla ({res['run']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    R.save_figure(fig, os.path.join(RES, 'fewstep_8gaussians.png'), dpi=90, tight=False)


def report(a):
    """Everything in results/ from results/runs/*.json, the timing and diagnostics files."""
    import matplotlib
    matplotlib.use('Agg')
    runs = load_runs()
    agg = aggregate(runs)
    summary = os.path.join(RES, 'summary.json')
    lost = sorted(set(read_json(summary)['runs']) - set(agg)) if os.path.isfile(summary) else []
    if lost and not a.force_report:   # never replace aggregated results by fewer: the raw runs are gone
        print(f'report: results/runs/ lacks {len(lost)} runs that {summary} aggregates (e.g. {lost[0]}); '
              f'tables, summary and their figures left as they are (--force-report rewrites them)')
    else:
        report_runs(a, runs, agg)
    if os.path.isfile(result_path('fewstep_8gaussians')):
        plot_fewstep(read_json(result_path('fewstep_8gaussians')))


def report_runs(a, runs, agg):
    """summary.json, tables.md and the figures of the training runs."""
    big = f'vanilla_N{a.mnist_n_full}'
    floors = {ds: reference_floor(ds, a.mnist_n if ds == 'mnist' else a.n) for ds in DATASETS
              if any(k[0] == ds for k in runs)}
    if ('mnist', big) in runs:   # the noise floor at that N too
        floors['mnist_' + big] = reference_floor('mnist', a.mnist_n_full)
    diag = {}
    for name in ('diagnostics', 'diagnostics_mnist'):
        if os.path.isfile(result_path(name)):
            diag.update(read_json(result_path(name)))
    timings = {n: read_json(result_path(n)) for n in ('timing', 'timing_mnist') if os.path.isfile(result_path(n))}
    paired = paired_differences(runs, big)
    R.write_json(os.path.join(RES, 'summary.json'), dict(
        settings=dict(S=a.max_steps, seeds=a.seeds, t_stride=a.t_stride, n=a.n, m=a.n, estimator='unbiased U-statistic',
                      value='sign(MMD^2) * sqrt(|MMD^2|)', fresh='1000 model samples vs 2000 data.sample_toy '
                      f'draws (seed {FRESH_SEED}), gaussian kernel, unbiased'),
        runs=agg, reference_floor={ds: {k: mean_std(v)[:2] for k, v in f.items()} for ds, f in floors.items()},
        timing=timings.get('timing'), timing_mnist=timings.get('timing_mnist'), settings_mnist=dict(
            steps=a.mnist_max_steps, lr=a.mnist_lr, n=a.mnist_n, m=a.mnist_n, flags=mnist_flags(a),
            reference_floor='other real training digits (disjoint from the evaluation set) instead of samples'),
        paired_vs_vanilla={key: {k: mean_std(x)[:2] for k, x in p['values'].items()} for key, p in paired.items()}))
    lines = tables(a, runs, agg, floors, paired, timings, diag, big)
    R.atomic_write(os.path.join(RES, 'tables.md'), lambda f: f.write('\n'.join(lines) + '\n'), binary=False)
    print('\n'.join(lines))
    plot_curves(agg)
    plot_final_metrics(runs, floors)
    plot_mnist_samples()
    if 'timing' in timings:
        plot_time_vs_L(timings['timing'])
