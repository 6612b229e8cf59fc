"""Regenerate every CPU result of RESULTS.md from scratch: error propagation D_MMD(t) on toy data
(Fig. 1), vanilla vs ADM-IP vs SA-DPM vs the consistency regulariser at equal steps and at equal
wall-clock time (Fig. 3, Table 1), the paper's ablations (Table 2, Fig. 4), fine-tuning with
--reg, and the cost per step (against L).

    python reproduce.py                       # everything on the toy sets (2 processes at a time)
    python reproduce.py --report              # only re-aggregate results/ and redraw the plots
    python reproduce.py --mnist               # adds the (expensive on CPU) MNIST runs

Resumable: a finished run (results/runs/NAME.json) is skipped, an interrupted training continues
from its checkpoint. Raw runs live in out/repro/ (git-ignored); small artifacts in results/.
Every training run is exactly `python train.py ARGS` (train.main(ARGS), printed in the run's
log and stored in its JSON), every curve exactly `python evaluate.py errprop --ckpt RUN --n 1000
--m 1000 --estimator u --t-stride K --seed 0` (the same function, mmd.errprop_curve, in process).
All processes run single-threaded (OMP_NUM_THREADS=1): the machine is a shared 2-core CPU.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault('OMP_NUM_THREADS', '1')
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
RES, OUT = os.path.join(ROOT, 'results'), os.path.join(ROOT, 'out', 'repro')
KERNELS = ('gaussian', 'laplace', 'imq')
EVAL_SEED, SAMPLE_SEED, FRESH_SEED = 0, 1, 99991
MNIST_DIR = os.path.join(ROOT, '..', 'shared', 'data')

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


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + '.tmp', 'w') as f:
        json.dump(obj, f, indent=1)
    os.replace(path + '.tmp', path)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def run_json(name):
    return os.path.join(RES, 'runs', name + '.json')


# ---- the job list ------------------------------------------------------------------------------
def job_list(a):
    """Ordered by priority (what RESULTS.md needs most comes first). Each job: dict(name, kind,
    deps, ...). A job starts once its deps have their result files."""
    S, seeds, jobs = a.steps, a.seeds, [dict(name='timing', kind='timing', deps=[])]

    def run(ds, variant, seed, flags, steps, curve=True, deps=(), extra=None):
        jobs.append(dict(name=f'{ds}_{variant}_s{seed}', kind='run', dataset=ds, variant=variant,
                         seed=seed, flags=flags, steps=steps, curve=curve, deps=list(deps), **(extra or {})))

    for seed in seeds:   # Q1 + Q2 at equal steps
        for v, fl in MAIN.items():
            run('8gaussians', v, seed, fl, S)
    for seed in seeds:   # Q2 at equal wall-clock time: steps from the interleaved timing
        for v in ('ip', 'sa', 'reg'):
            run('8gaussians', v + '_eqtime', seed, MAIN[v], 'eqtime:' + v, curve=False, deps=['timing'])
    for seed in seeds:   # Q3: fine-tune the vanilla run S/5 more steps, with and without --reg
        base = f'8gaussians_vanilla_s{seed}'
        src = os.path.join(OUT, base)
        run('8gaussians', 'ft_reg', seed, ['--init-from', src, '--reg'], S // 5, curve=False, deps=[base])
        run('8gaussians', 'ft_vanilla', seed, ['--init-from', src], S // 5, curve=False, deps=[base])
    # ablations (Table 2, Fig. 4; final metrics only), seed-major, interleaved with the second data set
    # (Q1 there, and vanilla vs reg): whatever a time budget cuts off is the least needed
    second = [('swissroll', 'vanilla'), ('swissroll', 'reg'), ('swissroll', 'ip'), ('swissroll', 'sa')]
    for i, seed in enumerate(seeds):
        for v, fl in ABLATIONS.items():
            run('8gaussians', v, seed, fl, S, curve=False)
        for ds, v in second[i:i + 1] if i < len(seeds) - 1 else second[i:]:
            for s2 in seeds:
                run(ds, v, s2, MAIN[v], S)
        if i == 0 and a.long_steps:   # is the picture different for a better-trained model?
            for s2 in a.long_seeds:
                for v in ('vanilla', 'reg'):
                    run('8gaussians', f'{v}_S{a.long_steps}', s2, MAIN[v], a.long_steps)
    if a.mnist:   # small U-Net on real MNIST: Q1 and vanilla vs reg
        for seed in seeds[:1] if a.mnist_one_seed else seeds:
            for v in ('vanilla', 'reg'):
                run('mnist', v, seed, MAIN[v] + ['--model', 'tiny', '--batch-size', '64', '--data-dir', MNIST_DIR,
                                                 '--warmup', '200', '--ema-decay', '0.995'],
                    a.mnist_steps, extra=dict(n_eval=256, t_stride=20))
    if a.only:
        jobs = [j for j in jobs if any(o in j['name'] for o in a.only)]
    return jobs


# ---- job: interleaved timing of one training step per method ---------------------------------
def job_timing(a):
    """Time train.py's step (compute_loss + backward + clip + Adam + EMA) for every method in ONE
    process, interleaved: each repetition runs every method for the same step indices, so a change
    of the machine's load hits all methods alike. Reports median seconds per step over repetitions
    and the median over repetitions of the per-repetition ratio to vanilla."""
    import copy
    import train
    from diffusion import Diffusion
    from model import build_model
    torch.set_num_threads(1)
    cfgs = {k: train.parse_config(['--dataset', '8gaussians', '--seed', '0'] + fl)[0] for k, fl in TIMED.items()}
    data = train.training_set(cfgs['vanilla'])
    diff = Diffusion()
    torch.manual_seed(0)
    raw = build_model('mlp', (2,))
    ema = copy.deepcopy(raw).requires_grad_(False)
    opt = torch.optim.Adam(raw.parameters(), lr=1e-3)

    def step(cfg, i):
        x0 = train.local_batch(data, cfg, i, 0, 1, 'cpu')
        loss, _ = train.compute_loss(raw, diff, x0, cfg, i)
        train.optimizer_step(loss, raw, opt, ema, cfg)

    for cfg in cfgs.values():   # warm-up
        for i in range(3):
            step(cfg, i)
    times = {k: [] for k in cfgs}
    for rep in range(a.timing_reps):
        for k, cfg in cfgs.items():
            t0 = time.perf_counter()
            for i in range(a.timing_steps):
                step(cfg, 1000 + rep * a.timing_steps + i)   # same (r, k) seeds in every method
            times[k].append((time.perf_counter() - t0) / a.timing_steps)
        print(f'timing rep {rep + 1}/{a.timing_reps}: ' +
              ', '.join(f'{k} {1e3 * v[-1]:.1f} ms' for k, v in times.items()), flush=True)
    rows = {k: dict(flags=TIMED[k], s_per_step=statistics.median(v), all_s_per_step=v,
                    ratio=statistics.median(t / b for t, b in zip(v, times['vanilla'])))
            for k, v in times.items()}
    write_json(os.path.join(RES, 'timing.json'), dict(
        what='train step of the toy MLP (8gaussians, batch 256, fp32, 1 thread): train.compute_loss + '
             'backward + clip + Adam + EMA; interleaved reps', reps=a.timing_reps, steps_per_rep=a.timing_steps,
        cpu=open('/proc/cpuinfo').read().split('model name')[1].split('\n')[0].strip(': '),
        torch=torch.__version__, note='shared 2-core CPU: absolute times are load-dependent; ratios are '
        'taken within each repetition', methods=rows))


# ---- job: train one run, then evaluate it ------------------------------------------------------
def steps_of(job, a):
    s = job['steps']
    if isinstance(s, str) and s.startswith('eqtime:'):   # equal time: S * t_vanilla / t_method
        ratio = read_json(os.path.join(RES, 'timing.json'))['methods'][
            {'ip': 'ip', 'sa': 'sa', 'reg': 'reg_L5_full'}[s.split(':')[1]]]['ratio']
        return max(1, round(a.steps / ratio)), ratio
    return s, None


def job_run(job, a):
    import train
    torch.set_num_threads(1)
    out = os.path.join(OUT, job['name'])
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'job.pid'), 'w') as f:
        f.write(str(os.getpid()))
    steps, ratio = steps_of(job, a)
    argv = ['--dataset', job['dataset'], '--seed', str(job['seed']), '--max-steps', str(steps),
            '--out-dir', out, '--log-every', '250', '--save-every', '500', '--n-preview', '256'] + job['flags']
    if job['dataset'] == 'mnist':
        argv += ['--sample-every', '0', '--n-preview', '16']
    ckpt = os.path.join(out, 'ckpt.pt')
    done = (os.path.isfile(ckpt) and
            torch.load(ckpt, map_location='cpu', weights_only=True)['step'] >= steps)
    t0 = time.time()
    if not done:
        print('python train.py ' + ' '.join(argv), flush=True)
        train.main(['--out-dir', out, '--resume'] if os.path.isfile(ckpt) else argv)
    train_wall = time.time() - t0
    model, diff, cfg = train.load_checkpoint(out, 'cpu', ema=True)
    res = dict(job={k: v for k, v in job.items() if k != 'deps'}, steps=steps, eqtime_ratio=ratio,
               train_argv=argv, train_wall_s=train_wall if not done else None, config=cfg)
    res.update(evaluate_run(model, diff, cfg, job, a))
    write_json(run_json(job['name']), res)


@torch.no_grad()
def evaluate_run(model, diff, cfg, job, a):
    """D_MMD(t) (unbiased U-statistic, N = M, three kernels) with evaluate.py's own function; for
    the toy sets also the unbiased MMD (gaussian) of 1000 fresh model samples against 2000 fresh
    samples of the known distribution (data.sample_toy)."""
    import data as D
    from evaluate import real_examples
    from mmd import errprop_curve, mmd2
    n = job.get('n_eval', a.n)
    stride = job.get('t_stride', a.t_stride) if job['curve'] else diff.T   # t = T and 0 only
    x0 = real_examples(cfg, n, EVAL_SEED)
    t0 = time.time()
    curve = errprop_curve(model, diff, x0, n, KERNELS, 'u', stride,
                          torch.Generator().manual_seed(EVAL_SEED), None if D.is_toy(cfg['dataset']) else 64)
    res = dict(curve=curve, t_stride=stride, n=n, m=n, estimator='u',
               d_t0={k: curve[k][-1] for k in KERNELS}, eval_wall_s=time.time() - t0)
    if D.is_toy(cfg['dataset']):
        s = diff.sample(model, (1000, *cfg['data_shape']), generator=torch.Generator().manual_seed(SAMPLE_SEED))
        fresh = D.sample_toy(cfg['dataset'], 2000, torch.Generator().manual_seed(FRESH_SEED))
        v = float(mmd2(s, fresh, 'gaussian', 'u'))
        res['mmd_true'] = math.copysign(math.sqrt(abs(v)), v)
    return res


class Waiter:
    """Popen-like handle of a job that another (earlier) scheduler started."""
    def __init__(self, name, alive):
        self.name, self.alive, self.returncode = name, alive, None

    def poll(self):
        if self.alive(self.name):
            return None
        self.returncode = 0
        return 0


# ---- scheduler: at most --jobs processes at a time ----------------------------------------------
def schedule(a):
    jobs = job_list(a)
    todo = [j for j in jobs if not os.path.isfile(
        os.path.join(RES, 'timing.json') if j['kind'] == 'timing' else run_json(j['name']))]
    print(f'{len(jobs)} jobs, {len(todo)} to run (S = {a.steps}, seeds {a.seeds}, t-stride {a.t_stride})', flush=True)
    os.makedirs(os.path.join(OUT, 'logs'), exist_ok=True)
    t_start, running, failed = time.time(), {}, set()

    def finished(name):
        return os.path.isfile(os.path.join(RES, 'timing.json') if name == 'timing' else run_json(name))

    def alive_elsewhere(name):
        try:
            with open(os.path.join(OUT, name, 'job.pid')) as f:
                pid = int(f.read())
            os.kill(pid, 0)
            return pid != os.getpid()
        except (OSError, ValueError):
            return False

    while todo or running:
        for name, (p, t0) in list(running.items()):
            if p.poll() is not None:
                del running[name]
                ok = p.returncode == 0 and finished(name)
                failed |= set() if ok else {name}
                print(f'[{(time.time() - t_start) / 60:6.1f} min] {"done" if ok else "FAILED"} {name} '
                      f'({time.time() - t0:.0f} s)', flush=True)
        over = a.budget_min and (time.time() - t_start) / 60 > a.budget_min
        for j in list(todo):
            if len(running) >= a.jobs or over:
                break
            if any(d in failed for d in j['deps']):
                todo.remove(j)
                failed.add(j['name'])
                continue
            if not all(finished(d) for d in j['deps']):
                continue
            todo.remove(j)
            if alive_elsewhere(j['name']):   # started by an earlier scheduler: wait for it
                running[j['name']] = (Waiter(j['name'], alive_elsewhere), time.time())
                print(f'[{(time.time() - t_start) / 60:6.1f} min] waiting for running {j["name"]}', flush=True)
                continue
            cmd = [sys.executable, os.path.abspath(__file__), '--job', j['name']] + a.passthrough
            log = open(os.path.join(OUT, 'logs', j['name'] + '.log'), 'a')
            running[j['name']] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                                   env=dict(os.environ, OMP_NUM_THREADS='1')), time.time())
            print(f'[{(time.time() - t_start) / 60:6.1f} min] start {j["name"]}', flush=True)
        if over and not running:
            print(f'budget of {a.budget_min} min reached; not started: {[j["name"] for j in todo]}', flush=True)
            break
        time.sleep(2)
    print(f'all done in {(time.time() - t_start) / 60:.1f} min; failed: {sorted(failed) or "none"}', flush=True)


# ---- report: aggregate over seeds, tables, plots -----------------------------------------------
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


def diagnostics():
    """Two small checks that explain the 8gaussians numbers (cached in results/diagnostics.json):
    (1) the size of the regulariser's gradient against the eps-MSE gradient at the paper's lambdas,
    on the trained vanilla seed-0 model, 12 training batches; (2) how far samples lie from the
    nearest of the 8 modes (true std 0.1 per coordinate), for the main methods at seed 0."""
    path = os.path.join(RES, 'diagnostics.json')
    if os.path.isfile(path) or not os.path.isfile(run_json('8gaussians_vanilla_s0')):
        return read_json(path) if os.path.isfile(path) else None
    import train
    from mmd import consistency_reg, reg_weight
    torch.set_num_threads(1)
    model, diff, cfg = train.load_checkpoint(os.path.join(OUT, '8gaussians_vanilla_s0'), ema=True)
    data, ps, rows = train.training_set(cfg), list(model.parameters()), []
    for step in range(5000, 5012):
        x0 = train.local_batch(data, cfg, step, 0, 1, 'cpu')
        g = torch.Generator().manual_seed(step)
        t = torch.randint(1, diff.T + 1, (len(x0),), generator=g)
        nll = diff.loss_eps(model, x0, t, torch.randn(x0.shape, generator=g))
        gn = torch.autograd.grad(nll, ps)
        r, k = int(torch.randint(0, diff.T, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
        reg = consistency_reg(model, diff, x0[:128], x0[128:], r, k, lambda sh: torch.randn(sh, generator=g),
                              'full', True, 'multigauss', 'mmd')
        gr = torch.autograd.grad(reg, ps)
        norm = lambda gs: float(sum(x.pow(2).sum() for x in gs).sqrt())   # noqa: E731
        rows.append(dict(r=r, k=k, reg=float(reg.detach()), g_nll=0.8 * norm(gn),
                         g_reg=0.2 * reg_weight(r, diff.T) * norm(gr)))
    ratio = [x['g_reg'] / x['g_nll'] for x in rows]
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
    out = dict(reg_grad=dict(rows=rows, median_ratio=statistics.median(ratio), min_ratio=min(ratio),
                             max_ratio=max(ratio), what='|grad of 0.2 w_r L_reg| / |grad of 0.8 L_nll|, '
                             'vanilla seed-0 EMA model, batch 256 (128 + 128 for the regulariser)'),
               mode_spread_seed0=spread)
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
    floors = {ds: reference_floor(ds, a.n) for ds in ('8gaussians', 'swissroll')
              if any(k[0] == ds for k in runs)}
    diag = diagnostics()
    timing = read_json(os.path.join(RES, 'timing.json')) if os.path.isfile(os.path.join(RES, 'timing.json')) else None
    write_json(os.path.join(RES, 'summary.json'), dict(
        settings=dict(S=a.steps, seeds=a.seeds, t_stride=a.t_stride, n=a.n, m=a.n, estimator='unbiased U-statistic',
                      value='sign(MMD^2) * sqrt(|MMD^2|)', fresh='1000 model samples vs 2000 data.sample_toy '
                      f'draws (seed {FRESH_SEED}), gaussian kernel, unbiased'),
        runs=agg, reference_floor={ds: {k: mean_std(v)[:2] for k, v in f.items()} for ds, f in floors.items()},
        timing=timing))

    # ---- markdown tables
    def table(ds, variants, title):
        rows = [(v, runs[(ds, v)]) for v in variants if (ds, v) in runs]
        if not rows:
            return
        lines.extend([f'\n### {title}\n', '| method | steps | D_MMD(t=0) gaussian | laplace | imq | '
                      'MMD vs true dist. (gaussian) | D_MMD(t=T) gaussian |', '|---|---|---|---|---|---|---|'])
        if ds in floors:
            f = floors[ds]
            lines.append(f"| *perfect model (fresh true samples)* | - | {fmt(f['gaussian'])} | {fmt(f['laplace'])} | "
                         f"{fmt(f['imq'])} | {fmt(f['mmd_true'])} | - |")
        for v, rs in rows:
            steps = sorted({r['steps'] for r in rs})
            lines.append(f'| {v} | {"/".join(map(str, steps))} | ' +
                         ' | '.join(fmt([r['d_t0'][k] for r in rs]) for k in KERNELS) +
                         f" | {fmt([r.get('mmd_true') for r in rs])} | {fmt([r['curve']['gaussian'][0] for r in rs])} |")

    for ds in ('8gaussians', 'swissroll', 'mnist'):
        table(ds, ['vanilla', 'ip', 'sa', 'reg', 'ip_eqtime', 'sa_eqtime', 'reg_eqtime',
                   f'vanilla_S{a.long_steps}', f'reg_S{a.long_steps}'],
              f'{ds}: methods (equal steps S, then equal wall-clock time)')
    table('8gaussians', ['vanilla', 'ft_vanilla', 'ft_reg'], '8gaussians: fine-tuning the vanilla run for S/5 steps')
    table('8gaussians', ['reg'] + list(ABLATIONS), '8gaussians: ablations of the regulariser (reg = L 5, exp '
          'weight, warm start, mean1, full grad)')
    # paired differences: every run is evaluated with the same evaluation randomness (x_T, chain
    # noise, forward noise, reference sets), so method - vanilla of the SAME seed cancels most of
    # the estimator noise that dominates the across-seed spread of the raw values
    paired = {}
    for ds in ('8gaussians', 'swissroll'):
        base = {r['job']['seed']: r for r in runs.get((ds, 'vanilla'), [])}
        if not base:
            continue
        lines.extend([f'\n### {ds}: paired difference to vanilla of the same seed (method - vanilla; < 0 = better)\n',
                      '| method | n seeds | Δ D_MMD(t=0) gaussian | Δ laplace | Δ imq | Δ MMD vs true dist. |',
                      '|---|---|---|---|---|---|'])
        for (d2, v), rs in sorted(runs.items()):
            if d2 != ds or v == 'vanilla':
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
    if timing:
        m = timing['methods']
        lines.extend(['\n### time per training step (toy MLP, batch 256, 1 thread, interleaved)\n',
                      '| method | ms / step (median) | ratio to vanilla |', '|---|---|---|'])
        for k, r in m.items():
            lines.append(f"| {k} | {1e3 * r['s_per_step']:.1f} | {r['ratio']:.2f} |")
    if diag:
        rg = diag['reg_grad']
        lines.extend(['\n### diagnostics (8gaussians, seed 0)\n',
                      f"regulariser gradient / eps-MSE gradient at lambda_reg 0.2, lambda_nll 0.8: median "
                      f"{rg['median_ratio']:.3f} (range {rg['min_ratio']:.3f}-{rg['max_ratio']:.3f}, 12 batches)\n",
                      '| samples of | rms distance to nearest mode | fraction farther than 0.5 |', '|---|---|---|'])
        for v, d in diag['mode_spread_seed0'].items():
            lines.append(f"| {v} | {d['rms_dist_to_mode']:.3f} | {d['frac_farther_than_0_5']:.3f} |")
    with open(os.path.join(RES, 'tables.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))

    # ---- plots
    styles = {'vanilla': ('k', '-'), 'ip': ('tab:blue', '-'), 'sa': ('tab:green', '-'), 'reg': ('tab:red', '-'),
              'ip_eqtime': ('tab:blue', '--'), 'sa_eqtime': ('tab:green', '--'), 'reg_eqtime': ('tab:red', '--'),
              'ft_vanilla': ('tab:gray', '-'), 'ft_reg': ('tab:purple', '-')}
    groups = {'': ['vanilla', 'ip', 'sa', 'reg', 'ip_eqtime', 'sa_eqtime', 'reg_eqtime'],
              '_finetune': ['vanilla', 'ft_vanilla', 'ft_reg']}
    for ds in ('8gaussians', 'swissroll', 'mnist'):
        for suffix, vs in groups.items():
            vs = [v for v in vs if 'curve' in agg.get(f'{ds}/{v}', {})]
            if not vs:
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
    for ds in ('8gaussians', 'swissroll'):
        vs = [v for v in ['vanilla', 'ip', 'sa', 'reg', 'ip_eqtime', 'sa_eqtime', 'reg_eqtime', 'ft_vanilla', 'ft_reg']
              + list(ABLATIONS) if (ds, v) in runs]
        if not vs:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
        for ax, (lab, get) in zip(axes, [('D_MMD(t=0) vs training data, gaussian', lambda r: r['d_t0']['gaussian']),
                                         ('MMD vs the known distribution, gaussian', lambda r: r.get('mmd_true'))]):
            ms = [mean_std([get(r) for r in runs[(ds, v)]]) for v in vs]
            ax.bar(range(len(vs)), [m[0] for m in ms], yerr=[m[1] for m in ms], capsize=3,
                   color=[styles.get(v, ('tab:orange', '-'))[0] for v in vs])
            if ds in floors:
                key = 'gaussian' if 'training' in lab else 'mmd_true'
                ax.axhline(mean_std(floors[ds][key])[0], color='grey', ls=':', label='perfect model')
                ax.legend()
            ax.set_xticks(range(len(vs)), vs, rotation=60, ha='right', fontsize=8)
            ax.set_title(f'{ds}: {lab} (mean ± std, seeds)')
        fig.tight_layout()
        fig.savefig(os.path.join(RES, f'final_metrics_{ds}.png'), dpi=90)
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


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--steps', type=int, default=1000, help='S: training steps of every full run')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--t-stride', type=int, default=20, help='errprop: measure every k-th t')
    p.add_argument('--n', type=int, default=1000, help='errprop: N = M')
    p.add_argument('--jobs', type=int, default=2, help='processes at a time')
    p.add_argument('--timing-reps', type=int, default=5)
    p.add_argument('--timing-steps', type=int, default=20)
    p.add_argument('--budget-min', type=float, default=0, help='start no new job after this many minutes')
    p.add_argument('--only', nargs='+', help='only jobs whose name contains one of these')
    p.add_argument('--long-steps', type=int, default=5000, help='extra vanilla/reg runs this long (0: none)')
    p.add_argument('--long-seeds', type=int, nargs='+', default=[0])
    p.add_argument('--mnist', action='store_true', help='also the MNIST runs (tiny U-Net; slow on CPU)')
    p.add_argument('--mnist-steps', type=int, default=3000)
    p.add_argument('--mnist-one-seed', action='store_true')
    p.add_argument('--report', action='store_true', help='only aggregate and plot what exists')
    p.add_argument('--job', help=argparse.SUPPRESS)
    a = p.parse_args()
    if len(a.seeds) < 1 or a.steps < 5 or a.t_stride < 1:
        raise SystemExit('error: need --seeds, --steps >= 5, --t-stride >= 1')
    a.passthrough = [x for x in sys.argv[1:] if x != '--report']
    if a.job:
        a.only = None   # the child must find its job in the full list
        job = next((j for j in job_list(a) if j['name'] == a.job), None)
        if job is None:
            raise SystemExit(f'error: no job {a.job}')
        job_timing(a) if job['kind'] == 'timing' else job_run(job, a)
        return
    if not a.report:
        schedule(a)
    report(a)


if __name__ == '__main__':
    main()
