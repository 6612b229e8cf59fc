"""Regenerate every CPU result of RESULTS.md from scratch: error propagation D_MMD(t) on toy data
(Fig. 1), vanilla vs ADM-IP vs SA-DPM vs the consistency regulariser at equal steps and at equal
wall-clock time (Fig. 3, Table 1), the paper's ablations (Table 2, Fig. 4), fine-tuning with
--reg, and the cost per step (against L).

    python reproduce.py                       # everything on the toy sets (2 processes at a time)
    python reproduce.py --report              # only re-aggregate results/ and redraw (report.py)
    python reproduce.py --mnist --only mnist  # the (expensive on CPU) MNIST runs, 14x14, tiny U-Net

Resumable: a finished run (results/runs/NAME.json) is skipped, an interrupted training continues
from its checkpoint. Raw runs live in out/repro/ (git-ignored); small artifacts in results/.
Every training run is exactly `python train.py ARGS` (run as such, printed in the job's log and
stored in its JSON), every timing `python bench.py --what methods ...`, every curve
`python evaluate.py errprop --ckpt RUN --n N --m N --estimator u --t-stride K --seed 0` (the same
function, mmd.errprop_curve, in process; N = 1000 on the toy sets, 256 on MNIST).
All processes run single-threaded (OMP_NUM_THREADS=1): the machine is a shared 2-core CPU.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

os.environ.setdefault('OMP_NUM_THREADS', '1')
import torch  # noqa: E402

import data as D  # noqa: E402
import runtime as R  # noqa: E402
from diffusion import eps_scale_schedule  # noqa: E402
from mmd import errprop_curve, mmd2, signed_sqrt  # noqa: E402
import report  # noqa: E402
import sweep  # noqa: E402
import sweep_report  # noqa: E402
from report import (ABLATIONS, EVAL_SEED, FRESH_SEED, KERNELS, MAIN, OUT, RES, ROOT, SAMPLE_SEED,  # noqa: E402
                    TIMED, mnist_flags, read_json, result_path, run_json)


# ---- the job list ------------------------------------------------------------------------------
def job_list(a):
    """Ordered by priority (what RESULTS.md needs most comes first). Each job: dict(name, kind,
    deps, ...). A job starts once its deps have their result files."""
    if a.protocol == 'steps':
        jobs = sweep.job_list(a, mnist_flags)
        return [j for j in jobs if any(o in j['name'] for o in a.only)] if a.only else jobs
    S, seeds, jobs = a.max_steps, a.seeds, [dict(name='timing', kind='timing', deps=[])]

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
    if a.mnist:   # real MNIST, downsampled to 14x14, tiny U-Net: Q1, vanilla vs reg (equal steps, equal
        jobs.append(dict(name='timing_mnist', kind='timing', dataset='mnist', deps=[]))   # time), IP, SA
        ev = dict(n_eval=a.mnist_n, t_stride=20, base_steps=a.mnist_max_steps, timing='timing_mnist')
        for v in ('vanilla', 'reg', 'reg_eqtime', 'ip', 'sa', 'dtype'):
            method, eq = v.split('_')[0], v.endswith('_eqtime')
            if v in a.mnist_variants and v != 'dtype':
                for seed in seeds:
                    run('mnist', v, seed, MAIN[method] + mnist_flags(a), 'eqtime:reg' if eq else a.mnist_max_steps,
                        deps=['timing_mnist'] if eq else (), extra=ev)
            if v == 'reg_eqtime':   # control: vanilla for the steps --reg gets at equal time (seed 0)
                run('mnist', 'vanilla_regsteps', 0, mnist_flags(a), 'eqtime:reg', deps=['timing_mnist'], extra=ev)
            if v == 'dtype':   # does bf16 autocast train as well as fp32? same seed, same steps
                for dt in ('fp32', 'bf16'):
                    run('mnist', f'dtype_{dt}', 0, mnist_flags(a) + ['--dtype', dt], a.mnist_max_steps, extra=ev)
            if v == 'vanilla' and a.mnist_n_full:   # seed 0's curve again, at the paper's N = M
                run('mnist', f'vanilla_N{a.mnist_n_full}', 0, mnist_flags(a), a.mnist_max_steps, deps=['mnist_vanilla_s0'],
                    extra=dict(ev, n_eval=a.mnist_n_full, eval_of='mnist_vanilla_s0'))
    if a.long_steps and 0 in a.long_seeds:   # error against the number of sampling steps, +- eps scaling
        jobs.append(dict(name='fewstep_8gaussians', kind='fewstep', deps=[f'8gaussians_vanilla_S{a.long_steps}_s0']))
    spread = [f'8gaussians_{v}_s0' for v in ('vanilla', 'ip', 'sa', 'reg', 'reg_eqtime') if 0 in seeds]
    if spread:   # what explains the numbers: the regulariser's gradient, the samples' spread
        jobs.append(dict(name='diagnostics', kind='diagnostics', deps=spread))
    if a.mnist and 0 in seeds and 'vanilla' in a.mnist_variants:
        jobs.append(dict(name='diagnostics_mnist', kind='diagnostics', deps=['mnist_vanilla_s0']))
    if a.only:
        jobs = [j for j in jobs if any(o in j['name'] for o in a.only)]
    return jobs


# ---- job: interleaved timing of one training step per method (bench.py) ---------------------
def job_timing(a, job):
    """`python bench.py --what methods`: train.py's step for every method in ONE process,
    interleaved (each repetition runs every method for the same step indices), 1 thread."""
    mnist = job.get('dataset') == 'mnist'
    base = ['--dataset', 'mnist'] + mnist_flags(a) if mnist else ['--dataset', job.get('dataset', '8gaussians')]
    timed = job.get('timed') or {k: fl for k, fl in TIMED.items()
                                 if not mnist or k in ('vanilla', 'ip', 'sa', 'reg_L5_full', 'reg_L5_last')}
    cmd = [sys.executable, os.path.join(ROOT, 'bench.py'), '--what', 'methods', '--threads', '1',
           '--device', 'cpu', '--reps', str(a.timing_reps), '--iters', str(4 if mnist else a.timing_iters),
           '--warmup', '3', '--verbose', '--flags', ' '.join(base + ['--seed', '0']),
           '--json', result_path(job['name']), '--variant'] + [f"{k}={' '.join(fl)}" for k, fl in timed.items()]
    print(' '.join(cmd), flush=True)
    subprocess.run(cmd, check=True)


# ---- job: train one run, then evaluate it ------------------------------------------------------
def steps_of(job, a):
    s = job['steps']
    if isinstance(s, str) and s.startswith('eqtime:'):   # equal time: S * t_vanilla / t_method
        key = job.get('ratio_key') or {'ip': 'ip', 'sa': 'sa', 'reg': 'reg_L5_full'}[s.split(':')[1]]
        ratio = read_json(result_path(job.get('timing', 'timing')))['methods'][key]['ratio']
        return max(1, round(job.get('base_steps', a.max_steps) / ratio)), ratio
    return s, None


def train_job(job, a):
    """Train (or resume) the job's run, exactly `python train.py ARGV`; returns what its JSON records."""
    torch.set_num_threads(1)
    out = os.path.join(OUT, job['name'])
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'job.pid'), 'w') as f:
        f.write(str(os.getpid()))
    out = os.path.join(OUT, job.get('eval_of', job['name']))   # eval_of: only evaluate that run
    steps, ratio = steps_of(job, a)
    argv = ['--dataset', job['dataset'], '--seed', str(job['seed']), '--max-steps', str(steps),
            '--out-dir', out, '--log-every', '10' if job['kind'] == 'steps' else '250', '--save-every', '500',
            '--n-preview', str(min(256, a.n))] + job['flags']
    if job['dataset'] == 'mnist':
        argv += ['--sample-every', '0', '--n-preview', '64']
    ckpt = os.path.join(out, 'ckpt.pt')
    done = os.path.isfile(ckpt) and R.read_checkpoint(ckpt)['step'] >= steps
    t0 = time.time()
    if not done:   # exactly `python train.py ARGV`
        cmd = ['--out-dir', out, '--resume', '--max-steps', str(steps)] if os.path.isfile(ckpt) else argv
        print('python train.py ' + ' '.join(cmd), flush=True)
        subprocess.run([sys.executable, os.path.join(ROOT, 'train.py')] + cmd, check=True)
    with open(os.path.join(out, 'log.jsonl')) as f:
        log = [json.loads(line) for line in f]
    res = dict(job={k: v for k, v in job.items() if k != 'deps'}, steps=steps, eqtime_ratio=ratio,
               train_argv=argv, train_wall_s=time.time() - t0 if not done else None,
               loss_curve=[[r['step'], r['loss']] for r in log])
    if any('loss_reg' in r for r in log):
        res['reg_curve'] = [[r['step'], r['loss_reg']] for r in log if 'loss_reg' in r]
    return out, res


def job_run(job, a):
    out, res = train_job(job, a)
    model, diff, cfg = R.load_checkpoint(out, 'cpu', ema=True)
    res['config'] = cfg
    res.update(evaluate_run(model, diff, cfg, job, a))
    grid = os.path.join(out, f"samples_{res['steps']:07d}.png")   # train.py's end-of-run EMA preview
    if cfg['dataset'] == 'mnist' and 'eval_of' not in job and os.path.isfile(grid):
        os.makedirs(os.path.join(RES, 'samples'), exist_ok=True)
        shutil.copyfile(grid, os.path.join(RES, 'samples', job['name'] + '.png'))
    R.write_json(run_json(job['name']), res)


def job_steps(job, a):
    """The step-count protocol's run (sweep.py): train, then evaluate over S; --reg runs also get
    their regulariser's perfect-model floor, seed 0 the regulariser's gradient fraction."""
    out, res = train_job(job, a)
    model, diff, cfg = R.load_checkpoint(out, 'cpu', ema=True)
    res['config'] = cfg
    t0 = time.time()
    mnist = job['dataset'] == 'mnist'
    res.update(sweep.evaluate_steps(model, diff, cfg, n=a.mnist_n if mnist else a.n_true,
                                    n_select=a.mnist_n // 2 if mnist else min(500, a.n_true),
                                    es_max_steps=100, chunk=250 if mnist else None, n_ref=a.n_ref))
    if cfg['reg']:
        res['reg_floor'] = sweep.reg_floor(cfg)
    if job['seed'] == 0 and job['method'] in ('vanilla', 'reg', 'reg_S20', 'reg_l0.5', 'reg_l0.8'):
        tmp = result_path(job['name']) + '.reg_grad.json'
        subprocess.run([sys.executable, os.path.join(ROOT, 'bench.py'), '--what', 'reg-grad', '--threads', '1',
                        '--device', 'cpu', '--ckpt', out, '--json', tmp], check=True)
        res['reg_grad'] = read_json(tmp)['reg_grad']
        os.remove(tmp)
    res['eval_wall_s'] = time.time() - t0
    R.write_json(result_path(job['name']), res)


@torch.no_grad()
def evaluate_run(model, diff, cfg, job, a):
    """D_MMD(t) (unbiased U-statistic, N = M, three kernels) with evaluate.py's own function; for
    the toy sets also the unbiased MMD (gaussian) of --n-true fresh model samples against 2000
    fresh samples of the known distribution (data.sample_toy)."""
    n = job.get('n_eval', a.n)
    stride = job.get('t_stride', a.t_stride) if job['curve'] else diff.T   # t = T and 0 only
    x0 = D.random_examples(n, EVAL_SEED, cfg['dataset'], cfg['data_dir'], cfg['image_size'], cfg['toy_n'],
                           cfg['seed'])
    t0 = time.time()
    curve = errprop_curve(model, diff, x0, n, KERNELS, 'u', stride,
                          torch.Generator().manual_seed(EVAL_SEED), None if D.is_toy(cfg['dataset']) else 64)
    res = dict(curve=curve, t_stride=stride, n=n, m=n, estimator='u',
               d_t0={k: curve[k][-1] for k in KERNELS}, eval_wall_s=time.time() - t0)
    if D.is_toy(cfg['dataset']):
        s = diff.sample(model, (a.n_true, *cfg['data_shape']), generator=torch.Generator().manual_seed(SAMPLE_SEED))
        fresh = D.sample_toy(cfg['dataset'], 2000, torch.Generator().manual_seed(FRESH_SEED))
        res['mmd_true'] = signed_sqrt(float(mmd2(s, fresh, 'gaussian', 'u')))
    return res


@torch.no_grad()
def mode_spread(x):
    """How far 8gaussians samples (n, 2) lie from the nearest of the 8 modes (true std 0.1)."""
    ang = torch.round(torch.atan2(x[:, 1], x[:, 0]) / (math.pi / 4)) * (math.pi / 4)
    dist = (x - 2 * torch.stack([ang.cos(), ang.sin()], 1)).norm(dim=1)
    return dict(rms_dist_to_mode=float(dist.pow(2).mean().sqrt()),
                frac_farther_than_0_5=float((dist > 0.5).float().mean()))


def job_diagnostics(a, job):
    """(1) the regulariser's gradient against the eps-MSE gradient at the paper's lambdas on the
    trained vanilla seed-0 model (`python bench.py --what reg-grad`); (2) for 8gaussians, the
    spread of the main methods' samples around the modes."""
    run = job['deps'][0]
    tmp = result_path(job['name']) + '.reg_grad.json'
    subprocess.run([sys.executable, os.path.join(ROOT, 'bench.py'), '--what', 'reg-grad', '--threads', '1',
                    '--device', 'cpu', '--ckpt', os.path.join(OUT, run), '--json', tmp], check=True)
    out = {'reg_grad' + ('_mnist' if 'mnist' in run else ''): read_json(tmp)['reg_grad']}
    os.remove(tmp)
    if 'mnist' not in run:
        out['mode_spread_seed0'] = spread = {}
        for name in job['deps']:
            m, d, _ = R.load_checkpoint(os.path.join(OUT, name), ema=True)
            spread[name.split('_', 1)[1][:-3]] = mode_spread(
                d.sample(m, (1000, 2), generator=torch.Generator().manual_seed(SAMPLE_SEED)))
        spread['true distribution'] = mode_spread(
            D.sample_toy('8gaussians', 1000, torch.Generator().manual_seed(SAMPLE_SEED)))
    R.write_json(result_path(job['name']), out)


FEWSTEP_S = (10, 20, 50, 100, 1000)
FEWSTEP_GRID = (1.0, 1.005, 1.01, 1.02, 1.05, 1.1, 1.15, 1.2, 1.3)


@torch.no_grad()
def job_fewstep(a, job):
    """Final error against the number of sampling steps S, for the respaced ancestral chain and
    DDIM, with and without epsilon scaling: for each S, `python evaluate.py es-search` picks the
    scale on fresh true samples (seed 1); the error is then the MMD of --n-true samples against
    2000 OTHER fresh samples (FRESH_SEED, as mmd_true everywhere), so choice and score never share
    data."""
    run = os.path.join(OUT, job['deps'][0])
    model, diff, cfg = R.load_checkpoint(run)
    fresh = D.sample_toy(cfg['dataset'], 2000, torch.Generator().manual_seed(FRESH_SEED))
    rows = []
    for sampler in ('ddpm', 'ddim'):
        for S in FEWSTEP_S:
            tmp = result_path(job['name']) + f'.{sampler}{S}'
            subprocess.run([sys.executable, os.path.join(ROOT, 'evaluate.py'), 'es-search', '--ckpt', run,
                            '--sampler', sampler, '--steps', str(S), '--n', '1000', '--m', '1000', '--seed', '0',
                            '--grid', *map(str, FEWSTEP_GRID), '--device', 'cpu', '--out', tmp], check=True)
            best = read_json(tmp + '.json')['best']['eps_scale']
            os.remove(tmp + '.json')
            err = {}
            for name, b in (('plain', 1.0), ('eps_scaled', best)):
                lam = None if b == 1.0 else eps_scale_schedule(diff.T, b, 0.0, S)
                x = diff.sample(model, (a.n_true, *cfg['data_shape']), sampler=sampler, steps=S, eps_scale=lam,
                                generator=torch.Generator().manual_seed(SAMPLE_SEED))
                err[name] = signed_sqrt(float(mmd2(x, fresh, 'gaussian', 'u')))
            rows.append(dict(sampler=sampler, steps=S, best_eps_scale=best, **err))
            print(rows[-1], flush=True)
    R.write_json(result_path(job['name']), dict(
        run=job['deps'][0], rows=rows, metric=f'MMD (gaussian, unbiased, signed sqrt) of {a.n_true} samples vs '
        f'2000 fresh true samples (seed {FRESH_SEED}); eps scale chosen by evaluate.py es-search on 1000 '
        f'other fresh samples, grid {FEWSTEP_GRID}'))


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
    todo = [j for j in jobs if not os.path.isfile(result_path(j['name']))]
    print(f'{len(jobs)} jobs, {len(todo)} to run (S = {a.max_steps}, seeds {a.seeds}, t-stride {a.t_stride})', flush=True)
    os.makedirs(os.path.join(OUT, 'logs'), exist_ok=True)
    t_start, running, failed, started = time.time(), {}, set(), 0

    def finished(name):
        return os.path.isfile(result_path(name))

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
            started += 1
            print(f'[{(time.time() - t_start) / 60:6.1f} min] start {j["name"]}', flush=True)
        if over and not running:
            print(f'budget of {a.budget_min} min reached; not started: {[j["name"] for j in todo]}', flush=True)
            break
        time.sleep(2)
    print(f'all done in {(time.time() - t_start) / 60:.1f} min; failed: {sorted(failed) or "none"}', flush=True)
    return jobs, started


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--protocol', choices=('paper', 'steps'), default='paper',
                   help='paper: the 1000-step reproduction (report.py); steps: the step-count protocol (sweep.py)')
    p.add_argument('--max-steps', type=int, default=1000, help='S: training steps of every full run')
    p.add_argument('--seeds', type=int, nargs='+', help='default: 0 1 2 (paper), 0..4 (steps; MNIST: the first 3)')
    p.add_argument('--t-stride', type=int, default=20, help='errprop: measure every k-th t')
    p.add_argument('--n', type=int, default=1000, help='errprop: N = M')
    p.add_argument('--jobs', type=int, default=2, help='processes at a time')
    p.add_argument('--timing-reps', type=int, default=5)
    p.add_argument('--timing-iters', type=int, default=20, help='timed steps per method and repetition')
    p.add_argument('--n-true', type=int, default=1000, help='toy: model samples against the known distribution')
    p.add_argument('--n-ref', type=int, default=sweep.N_REF, help='steps protocol, toy: fresh true draws the samples are scored against')
    p.add_argument('--budget-min', type=float, default=0, help='start no new job after this many minutes')
    p.add_argument('--only', nargs='+', help='only jobs whose name contains one of these')
    p.add_argument('--long-steps', type=int, default=5000, help='extra vanilla/reg runs this long (0: none)')
    p.add_argument('--long-seeds', type=int, nargs='+', default=[0])
    p.add_argument('--mnist', action='store_true', help='also the MNIST runs (tiny U-Net; slow on CPU)')
    p.add_argument('--mnist-max-steps', type=int, default=2000)
    p.add_argument('--mnist-lr', type=float, default=5e-4)
    p.add_argument('--mnist-n', type=int, default=256, help='MNIST errprop: N = M')
    p.add_argument('--mnist-n-full', type=int, default=1000,
                   help='MNIST: evaluate mnist_vanilla_s0 once more with N = M this large (0: skip)')
    p.add_argument('--mnist-variants', nargs='+', default=['vanilla', 'reg', 'reg_eqtime', 'ip', 'sa'],
                   choices=['vanilla', 'reg', 'reg_eqtime', 'ip', 'sa', 'dtype'],
                   help='dtype: fp32 and bf16 autocast runs of seed 0 side by side')
    p.add_argument('--report', action='store_true', help='only aggregate and plot what exists')
    p.add_argument('--force-report', action='store_true',
                   help='rewrite summary and tables even when results/runs/ holds fewer runs than they list')
    p.add_argument('--job', help=argparse.SUPPRESS)
    a = p.parse_args()
    a.seeds = a.seeds or ([0, 1, 2, 3, 4] if a.protocol == 'steps' else [0, 1, 2])
    if len(a.seeds) < 1 or a.max_steps < 5 or a.t_stride < 1 or a.n < 2 or a.n_true < 2 or a.n_ref < 2:
        R.fail('need --seeds, --max-steps >= 5, --t-stride >= 1, --n, --n-true and --n-ref >= 2')
    a.passthrough = [x for x in sys.argv[1:] if x not in ('--report', '--force-report')]
    if a.job:
        a.only = None   # the child must find its job in the full list
        job = next((j for j in job_list(a) if j['name'] == a.job), None)
        if job is None:
            R.fail(f'no job {a.job}')
        dict(timing=job_timing, diagnostics=job_diagnostics, fewstep=job_fewstep,
             run=lambda a, j: job_run(j, a), steps=lambda a, j: job_steps(j, a))[job['kind']](a, job)
        return
    if not a.report:
        jobs, started = schedule(a)
        tables = os.path.join(RES, 'steps_tables.md' if a.protocol == 'steps' else 'tables.md')
        done = [result_path(j['name']) for j in jobs if os.path.isfile(result_path(j['name']))]
        if not started and os.path.isfile(tables) and all(os.path.getmtime(f) <= os.path.getmtime(tables) for f in done):
            print(f'nothing new since {tables} was written: report kept (--report rewrites it)')
            return
    (sweep_report.report_steps if a.protocol == 'steps' else report.report)(a)


if __name__ == '__main__':
    main()
