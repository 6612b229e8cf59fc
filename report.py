"""Aggregate the runs of reproduce.py into results/: mean and spread over seeds, the markdown
tables of RESULTS.md (results/tables.md), summary.json and the figures (D_MMD(t) curves per
data set, final metrics, time per step against L, MNIST sample grids).

    python reproduce.py --report     # re-aggregate results/runs/*.json (report.report)

Reads only results/runs/*.json, results/timing*.json and, for the diagnostics and the
reference floors, the checkpoints in out/repro/ and the data.
"""
import math
import os
import statistics

import torch

from reproduce import (ABLATIONS, EVAL_SEED, FRESH_SEED, KERNELS, MNIST_FLAGS, OUT, RES, SAMPLE_SEED,
                       mnist_flags, read_json, result_path, run_json, write_json)


def mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None, 0
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0), len(xs)


def fmt(xs, digits=4):
    m, s, n = mean_std(xs)
    return '-' if m is None else f'{m:.{digits}f} ± {s:.{digits}f}' + ('' if n == 3 else f' (n={n})')


@torch.no_grad()
def reference_floor(ds, n):
    """What a perfect model would score: fresh draws of the true distribution in place of the
    model's samples (D_MMD(t=0) vs the training subset, and vs the fresh reference set)."""
    import data as D
    import train
    from evaluate import real_examples
    from mmd import mmd2
    out = {}
    if ds == 'mnist':   # n other real digits, disjoint from the evaluation set, three times
        cfg = train.parse_config(['--dataset', ds] + MNIST_FLAGS)[0]
        x = D.to_model_space(D.load_data(ds, cfg['data_dir'], cfg['image_size']))
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(EVAL_SEED))
        x0 = real_examples(cfg, n, EVAL_SEED)   # == x[idx[:n]]
        for i in (1, 2, 3):
            for k in KERNELS:
                v = float(mmd2(x[idx[i * n:(i + 1) * n]], x0, k, 'u'))
                out.setdefault(k, []).append(math.copysign(math.sqrt(abs(v)), v))
        return out
    for seed in (0, 1, 2):
        cfg = train.parse_config(['--dataset', ds, '--seed', str(seed)])[0]
        x0 = real_examples(cfg, n, EVAL_SEED)
        s = D.sample_toy(ds, n, torch.Generator().manual_seed(777 + seed))
        fresh = D.sample_toy(ds, 2000, torch.Generator().manual_seed(FRESH_SEED))
        for k in KERNELS:
            v = float(mmd2(s, x0, k, 'u'))
            out.setdefault(k, []).append(math.copysign(math.sqrt(abs(v)), v))
        s1 = D.sample_toy(ds, 1000, torch.Generator().manual_seed(555 + seed))
        v = float(mmd2(s1, fresh, 'gaussian', 'u'))
        out.setdefault('mmd_true', []).append(math.copysign(math.sqrt(abs(v)), v))
    return out


def reg_grad_ratio(run, n_batches=12):
    """How strong is the regulariser? |grad of lambda_reg w_r L_reg| / |grad of lambda_nll L_nll|
    (paper defaults: L 5, multigauss, full gradient, warm start) on run's trained EMA model, for
    n_batches training batches (the first half of each batch against the second for the MMD)."""
    import train
    from mmd import consistency_reg, reg_weight
    model, diff, cfg = train.load_checkpoint(os.path.join(OUT, run), ema=True)
    data, ps, rows, half = train.training_set(cfg), list(model.parameters()), [], cfg['batch_size'] // 2
    norm = lambda gs: float(sum(x.pow(2).sum() for x in gs).sqrt())   # noqa: E731
    for step in range(5000, 5000 + n_batches):
        x0 = train.local_batch(data, cfg, step, 0, 1, 'cpu')
        g = torch.Generator().manual_seed(step)
        t = torch.randint(1, diff.T + 1, (len(x0),), generator=g)
        gn = torch.autograd.grad(diff.loss_eps(model, x0, t, torch.randn(x0.shape, generator=g)), ps)
        r, k = int(torch.randint(0, diff.T, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
        reg = consistency_reg(model, diff, x0[:half], x0[half:], r, k, lambda sh: torch.randn(sh, generator=g),
                              'full', True, 'multigauss', 'mmd')
        gr = torch.autograd.grad(reg, ps)
        rows.append(dict(r=r, k=k, reg=float(reg.detach()), g_nll=cfg['lambda_nll'] * norm(gn),
                         g_reg=cfg['lambda_reg'] * reg_weight(r, diff.T) * norm(gr)))
    ratio = [x['g_reg'] / x['g_nll'] for x in rows]
    return dict(rows=rows, median_ratio=statistics.median(ratio), min_ratio=min(ratio), max_ratio=max(ratio),
                what=f'|grad of 0.2 w_r L_reg| / |grad of 0.8 L_nll|, {run} EMA model, batch '
                     f'{2 * half} ({half} + {half} for the regulariser)')


def diagnostics():
    """Small checks that explain the numbers (cached in results/diagnostics.json): (1) the size of
    the regulariser's gradient against the eps-MSE gradient at the paper's lambdas on the trained
    vanilla seed-0 models (8gaussians; MNIST when its run exists); (2) how far 8gaussians samples
    lie from the nearest of the 8 modes (true std 0.1 per coordinate), main methods at seed 0."""
    import train
    path = os.path.join(RES, 'diagnostics.json')
    out = read_json(path) if os.path.isfile(path) else {}
    torch.set_num_threads(1)
    if 'reg_grad_mnist' not in out and os.path.isfile(run_json('mnist_vanilla_s0')):
        out['reg_grad_mnist'] = reg_grad_ratio('mnist_vanilla_s0')
        write_json(path, out)
    if 'reg_grad' in out or not os.path.isfile(run_json('8gaussians_vanilla_s0')):
        return out or None
    out['reg_grad'] = reg_grad_ratio('8gaussians_vanilla_s0')
    spread = {}
    for v in ('vanilla', 'ip', 'sa', 'reg', 'reg_eqtime'):
        if not os.path.isfile(run_json(f'8gaussians_{v}_s0')):
            continue
        m, d, _ = train.load_checkpoint(os.path.join(OUT, f'8gaussians_{v}_s0'), ema=True)
        with torch.no_grad():
            x = d.sample(m, (1000, 2), generator=torch.Generator().manual_seed(SAMPLE_SEED))
        ang = torch.round(torch.atan2(x[:, 1], x[:, 0]) / (math.pi / 4)) * (math.pi / 4)
        dist = (x - 2 * torch.stack([ang.cos(), ang.sin()], 1)).norm(dim=1)
        spread[v] = dict(rms_dist_to_mode=float(dist.pow(2).mean().sqrt()),
                         frac_farther_than_0_5=float((dist > 0.5).float().mean()))
    import data as D
    x = D.sample_toy('8gaussians', 1000, torch.Generator().manual_seed(SAMPLE_SEED))
    ang = torch.round(torch.atan2(x[:, 1], x[:, 0]) / (math.pi / 4)) * (math.pi / 4)
    dist = (x - 2 * torch.stack([ang.cos(), ang.sin()], 1)).norm(dim=1)
    spread['true distribution'] = dict(rms_dist_to_mode=float(dist.pow(2).mean().sqrt()),
                                       frac_farther_than_0_5=float((dist > 0.5).float().mean()))
    out['mode_spread_seed0'] = spread
    write_json(path, out)
    return out


def report(a):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    runs = {}
    if os.path.isdir(os.path.join(RES, 'runs')):
        for f in sorted(os.listdir(os.path.join(RES, 'runs'))):
            if f.endswith('.json'):
                r = read_json(os.path.join(RES, 'runs', f))
                runs.setdefault((r['job']['dataset'], r['job']['variant']), []).append(r)
    agg, lines = {}, []
    for (ds, v), rs in sorted(runs.items()):
        rs.sort(key=lambda r: r['job']['seed'])
        e = dict(seeds=[r['job']['seed'] for r in rs], steps=[r['steps'] for r in rs],
                 eqtime_ratio=rs[0]['eqtime_ratio'], train_argv=rs[0]['train_argv'],
                 d_t0={k: mean_std([r['d_t0'][k] for r in rs])[:2] for k in KERNELS},
                 d_T={k: mean_std([r['curve'][k][0] for r in rs])[:2] for k in KERNELS},
                 mmd_true=mean_std([r.get('mmd_true') for r in rs])[:2],
                 per_seed=[dict(seed=r['job']['seed'], d_t0=r['d_t0'], mmd_true=r.get('mmd_true'),
                                d_T={k: r['curve'][k][0] for k in KERNELS}) for r in rs])
        if rs[0]['t_stride'] < rs[0]['curve']['t'][0]:
            ts = rs[0]['curve']['t']
            e['curve'] = dict(t=ts, **{k: dict(mean=[statistics.mean(r['curve'][k][i] for r in rs) for i in range(len(ts))],
                                               std=[statistics.stdev(r['curve'][k][i] for r in rs) if len(rs) > 1 else 0.0
                                                    for i in range(len(ts))]) for k in KERNELS})
        agg[f'{ds}/{v}'] = e
    floors = {ds: reference_floor(ds, a.mnist_n if ds == 'mnist' else a.n) for ds in ('8gaussians', 'swissroll', 'mnist')
              if any(k[0] == ds for k in runs)}
    big = f'vanilla_N{a.mnist_n_full}'
    if ('mnist', big) in runs:   # the noise floor at that N too
        floors['mnist_' + big] = reference_floor('mnist', a.mnist_n_full)
    diag = diagnostics()
    timings = {n: read_json(result_path(n)) for n in ('timing', 'timing_mnist') if os.path.isfile(result_path(n))}
    timing = timings.get('timing')
    write_json(os.path.join(RES, 'summary.json'), dict(
        settings=dict(S=a.steps, seeds=a.seeds, t_stride=a.t_stride, n=a.n, m=a.n, estimator='unbiased U-statistic',
                      value='sign(MMD^2) * sqrt(|MMD^2|)', fresh='1000 model samples vs 2000 data.sample_toy '
                      f'draws (seed {FRESH_SEED}), gaussian kernel, unbiased'),
        runs=agg, reference_floor={ds: {k: mean_std(v)[:2] for k, v in f.items()} for ds, f in floors.items()},
        timing=timing, timing_mnist=timings.get('timing_mnist'), settings_mnist=dict(
            steps=a.mnist_steps, lr=a.mnist_lr, n=a.mnist_n, m=a.mnist_n, flags=mnist_flags(a),
            reference_floor='other real training digits (disjoint from the evaluation set) instead of samples')))

    # ---- markdown tables
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

    for ds in ('8gaussians', 'swissroll', 'mnist'):
        table(ds, ['vanilla', 'ip', 'sa', 'reg', 'ip_eqtime', 'sa_eqtime', 'reg_eqtime',
                   'vanilla_regsteps', f'vanilla_S{a.long_steps}', f'reg_S{a.long_steps}', big],
              f'{ds}: methods (equal steps S, then equal wall-clock time)')
    table('8gaussians', ['vanilla', 'ft_vanilla', 'ft_reg'], '8gaussians: fine-tuning the vanilla run for S/5 steps')
    table('8gaussians', ['reg'] + list(ABLATIONS), '8gaussians: ablations of the regulariser (reg = L 5, exp '
          'weight, warm start, mean1, full grad)')
    # paired differences: every run is evaluated with the same evaluation randomness (x_T, chain
    # noise, forward noise, reference sets), so method - vanilla of the SAME seed cancels most of
    # the estimator noise that dominates the across-seed spread of the raw values
    paired = {}
    for ds in ('8gaussians', 'swissroll', 'mnist'):
        base = {r['job']['seed']: r for r in runs.get((ds, 'vanilla'), [])}
        if not base:
            continue
        lines.extend([f'\n### {ds}: paired difference to vanilla of the same seed (method - vanilla; < 0 = better)\n',
                      '| method | n seeds | Δ D_MMD(t=0) gaussian | Δ laplace | Δ imq | Δ MMD vs true dist. |',
                      '|---|---|---|---|---|---|'])
        for (d2, v), rs in sorted(runs.items()):
            if d2 != ds or v == 'vanilla' or v == big:   # (a different N: not comparable)
                continue
            pr = [(r, base[r['job']['seed']]) for r in rs if r['job']['seed'] in base]
            if not pr:
                continue
            dd = {k: [r['d_t0'][k] - b['d_t0'][k] for r, b in pr] for k in KERNELS}
            dd['mmd_true'] = [r['mmd_true'] - b['mmd_true'] for r, b in pr if r.get('mmd_true') is not None]
            paired[f'{ds}/{v}'] = {k: mean_std(x)[:2] for k, x in dd.items()}
            lines.append(f'| {v} | {len(pr)} | ' + ' | '.join(fmt(dd[k]) for k in (*KERNELS, 'mmd_true')) + ' |')
    summary = read_json(os.path.join(RES, 'summary.json'))
    summary['paired_vs_vanilla'] = paired
    write_json(os.path.join(RES, 'summary.json'), summary)
    # curve growth tables
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
    if diag and 'reg_grad' in diag:
        rg = diag['reg_grad']
        lines.extend(['\n### diagnostics (8gaussians, seed 0)\n',
                      f"regulariser gradient / eps-MSE gradient at lambda_reg 0.2, lambda_nll 0.8: median "
                      f"{rg['median_ratio']:.3f} (range {rg['min_ratio']:.3f}-{rg['max_ratio']:.3f}, 12 batches)\n",
                      '| samples of | rms distance to nearest mode | fraction farther than 0.5 |', '|---|---|---|'])
        for v, d in diag['mode_spread_seed0'].items():
            lines.append(f"| {v} | {d['rms_dist_to_mode']:.3f} | {d['frac_farther_than_0_5']:.3f} |")
    if diag and 'reg_grad_mnist' in diag:
        rg = diag['reg_grad_mnist']
        lines.extend(['\n### diagnostics (MNIST, seed 0)\n',
                      f"regulariser gradient / eps-MSE gradient at lambda_reg 0.2, lambda_nll 0.8: median "
                      f"{rg['median_ratio']:.3f} (range {rg['min_ratio']:.3f}-{rg['max_ratio']:.3f}, 12 batches)"])
    with open(os.path.join(RES, 'tables.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))

    # ---- plots
    styles = {'vanilla': ('k', '-'), 'ip': ('tab:blue', '-'), 'sa': ('tab:green', '-'), 'reg': ('tab:red', '-'),
              'ip_eqtime': ('tab:blue', '--'), 'sa_eqtime': ('tab:green', '--'), 'reg_eqtime': ('tab:red', '--'),
              'ft_vanilla': ('tab:gray', '-'), 'ft_reg': ('tab:purple', '-'), 'vanilla_N1000': ('k', ':'),
              'vanilla_regsteps': ('tab:gray', '--')}
    groups = {'': ['vanilla', 'ip', 'sa', 'reg', 'ip_eqtime', 'sa_eqtime', 'reg_eqtime', 'vanilla_regsteps',
                   'vanilla_N1000'],
              '_finetune': ['vanilla', 'ft_vanilla', 'ft_reg']}
    for ds in ('8gaussians', 'swissroll', 'mnist'):
        for suffix, vs in groups.items():
            vs = [v for v in vs if 'curve' in agg.get(f'{ds}/{v}', {})]
            if not vs or vs == ['vanilla'] and suffix:   # a fine-tuning figure needs fine-tuning runs
                continue
            fig, axes = plt.subplots(1, 3, figsize=(15, 4))
            for ax, k in zip(axes, KERNELS):
                for v in vs:
                    c = agg[f'{ds}/{v}']['curve']
                    mu, sd = torch.tensor(c[k]['mean']), torch.tensor(c[k]['std'])
                    col, ls = styles[v]
                    ax.plot(c['t'], mu, color=col, ls=ls, label=f"{v} ({len(agg[f'{ds}/{v}']['seeds'])} seeds)")
                    ax.fill_between(c['t'], mu - sd, mu + sd, color=col, alpha=0.12)
                ax.invert_xaxis()
                ax.axhline(0, color='grey', lw=0.5)
                ax.set(xlabel='t (sampling runs T -> 0)', ylabel='D_MMD(t), unbiased', title=f'{ds}: {k} kernel')
            axes[0].legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(os.path.join(RES, f'errprop_{ds}{suffix}.png'), dpi=90)
            plt.close(fig)
    for ds in ('8gaussians', 'swissroll', 'mnist'):
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
                   color=[styles.get(v, ('tab:orange', '-'))[0] for v in vs])
            if ds in floors:
                key = lab.split(', ')[1] if 'training' in lab else 'mmd_true'
                ax.axhline(mean_std(floors[ds][key])[0], color='grey', ls=':', label='perfect model')
                ax.legend()
            ax.set_xticks(range(len(vs)), vs, rotation=60, ha='right', fontsize=8)
            ax.set_title(f'{ds}: {lab}\n(mean ± std over seeds)', fontsize=10)
        fig.tight_layout()
        fig.savefig(os.path.join(RES, f'final_metrics_{ds}.png'), dpi=90)
        plt.close(fig)
    grids = [(v, os.path.join(RES, 'samples', f'mnist_{v}_s0.png'))
             for v in ('vanilla', 'reg', 'reg_eqtime', 'vanilla_regsteps', 'ip', 'sa')]
    grids = [(v, path) for v, path in grids if os.path.isfile(path)]
    if grids:   # seed-0 EMA samples of each MNIST method next to real (downsampled) digits
        import torchvision
        import train
        from evaluate import real_examples
        real = real_examples(train.parse_config(['--dataset', 'mnist'] + MNIST_FLAGS)[0], 64, EVAL_SEED)
        fig, axes = plt.subplots(1, len(grids) + 1, figsize=(2.7 * (len(grids) + 1), 3))
        axes[0].imshow(torchvision.utils.make_grid((real + 1) / 2, nrow=8).permute(1, 2, 0))
        axes[0].set_title('real digits (14x14)', fontsize=9)
        for ax, (v, path) in zip(axes[1:], grids):
            ax.imshow(plt.imread(path))
            ax.set_title(f'{v}, seed 0, EMA', fontsize=9)
        for ax in axes:
            ax.axis('off')
        fig.tight_layout()
        fig.savefig(os.path.join(RES, 'samples_mnist.png'), dpi=90)
        plt.close(fig)
    if timing:
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
        fig.savefig(os.path.join(RES, 'time_vs_L.png'), dpi=90)
        plt.close(fig)
