"""Regenerate every CPU result of RESULTS.md from scratch: error propagation D_MMD(t) on toy data
(Fig. 1), vanilla vs ADM-IP vs SA-DPM vs the consistency regulariser at equal steps and at equal
wall-clock time (Fig. 3, Table 1), the paper's ablations (Table 2, Fig. 4), fine-tuning with
--reg, and the cost per step (against L).

    python reproduce.py                       # everything on the toy sets (2 processes at a time)
    python reproduce.py --report              # only re-aggregate results/ and redraw (report.py)
    python reproduce.py --mnist --only mnist  # the (expensive on CPU) MNIST runs, 14x14, tiny U-Net

Resumable: a finished run (results/runs/NAME.json) is skipped, an interrupted training continues
from its checkpoint. Raw runs live in out/repro/ (git-ignored); small artifacts in results/.
Every training run is exactly `python train.py ARGS` (train.main(ARGS), printed in the run's
log and stored in its JSON), every curve exactly `python evaluate.py errprop --ckpt RUN --n N --m N
--estimator u --t-stride K --seed 0` (the same function, mmd.errprop_curve, in process; N = 1000
on the toy sets, 256 on MNIST).
All processes run single-threaded (OMP_NUM_THREADS=1): the machine is a shared 2-core CPU.
"""
import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

os.environ.setdefault('OMP_NUM_THREADS', '1')
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
# where results (committed) and raw runs (git-ignored) go; the environment can redirect both
RES = os.environ.get('REPRO_RESULTS', os.path.join(ROOT, 'results'))
OUT = os.environ.get('REPRO_OUT', os.path.join(ROOT, 'out', 'repro'))
KERNELS = ('gaussian', 'laplace', 'imq')
EVAL_SEED, SAMPLE_SEED, FRESH_SEED = 0, 1, 99991
MNIST_DIR = os.path.join(ROOT, '..', 'shared', 'data')
# a CPU-sized MNIST: 14x14 (antialiased downsampling of the real digits), the 651 k-parameter
# 'tiny' U-Net, batch 64; one step costs ~0.36 s on one thread (28x28: ~1.2 s)
MNIST_FLAGS = ['--model', 'tiny', '--image-size', '14', '--batch-size', '64', '--data-dir', MNIST_DIR,
               '--warmup', '200', '--ema-decay', '0.995']

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


def result_path(name):
    """The file whose existence means job `name` is done."""
    return os.path.join(RES, name + '.json') if name.startswith('timing') else run_json(name)


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
    if a.mnist:   # real MNIST, downsampled to 14x14, tiny U-Net: Q1, vanilla vs reg (equal steps, equal
        jobs.append(dict(name='timing_mnist', kind='timing', dataset='mnist', deps=[]))   # time), IP, SA
        ev = dict(n_eval=a.mnist_n, t_stride=20, base_steps=a.mnist_steps, timing='timing_mnist')
        for v in ('vanilla', 'reg', 'reg_eqtime', 'ip', 'sa'):
            method, eq = v.split('_')[0], v.endswith('_eqtime')
            if v in a.mnist_variants:
                for seed in seeds:
                    run('mnist', v, seed, MAIN[method] + mnist_flags(a), 'eqtime:reg' if eq else a.mnist_steps,
                        deps=['timing_mnist'] if eq else (), extra=ev)
            if v == 'reg_eqtime':   # control: vanilla for the steps --reg gets at equal time (seed 0)
                run('mnist', 'vanilla_regsteps', 0, mnist_flags(a), 'eqtime:reg', deps=['timing_mnist'], extra=ev)
            if v == 'vanilla' and a.mnist_n_full:   # seed 0's curve again, at the paper's N = M
                run('mnist', f'vanilla_N{a.mnist_n_full}', 0, mnist_flags(a), a.mnist_steps, deps=['mnist_vanilla_s0'],
                    extra=dict(ev, n_eval=a.mnist_n_full, eval_of='mnist_vanilla_s0'))
    if a.only:
        jobs = [j for j in jobs if any(o in j['name'] for o in a.only)]
    return jobs


# ---- job: interleaved timing of one training step per method ---------------------------------
def job_timing(a, job):
    """Time train.py's step (compute_loss + backward + clip + Adam + EMA) for every method in ONE
    process, interleaved: each repetition runs every method for the same step indices, so a change
    of the machine's load hits all methods alike. Reports median seconds per step over repetitions
    and the median over repetitions of the per-repetition ratio to vanilla."""
    import copy
    import train
    from diffusion import Diffusion
    from model import build_model
    torch.set_num_threads(1)
    mnist = job.get('dataset') == 'mnist'
    base = ['--dataset', 'mnist'] + mnist_flags(a) if mnist else ['--dataset', '8gaussians']
    timed = {k: fl for k, fl in TIMED.items()
             if not mnist or k in ('vanilla', 'ip', 'sa', 'reg_L5_full', 'reg_L5_last')}
    cfgs = {k: train.parse_config(base + ['--seed', '0'] + fl)[0] for k, fl in timed.items()}
    data = train.training_set(cfgs['vanilla'])
    diff = Diffusion()
    torch.manual_seed(0)
    raw = build_model(cfgs['vanilla']['model'], tuple(data.shape[1:]))
    ema = copy.deepcopy(raw).requires_grad_(False)
    opt = torch.optim.Adam(raw.parameters(), lr=cfgs['vanilla']['lr'])

    def step(cfg, i):
        x0 = train.local_batch(data, cfg, i, 0, 1, 'cpu')
        loss, _ = train.compute_loss(raw, diff, x0, cfg, i)
        train.optimizer_step(loss, raw, opt, ema, cfg)

    for cfg in cfgs.values():   # warm-up
        for i in range(3):
            step(cfg, i)
    times = {k: [] for k in cfgs}
    reps, n_steps = a.timing_reps, (4 if mnist else a.timing_steps)
    for rep in range(reps):
        for k, cfg in cfgs.items():
            t0 = time.perf_counter()
            for i in range(n_steps):
                step(cfg, 1000 + rep * n_steps + i)   # same (r, k) seeds in every method
            times[k].append((time.perf_counter() - t0) / n_steps)
        print(f'timing rep {rep + 1}/{reps}: ' +
              ', '.join(f'{k} {1e3 * v[-1]:.1f} ms' for k, v in times.items()), flush=True)
    rows = {k: dict(flags=timed[k], s_per_step=statistics.median(v), all_s_per_step=v,
                    ratio=statistics.median(t / b for t, b in zip(v, times['vanilla'])))
            for k, v in times.items()}
    net = 'tiny U-Net (MNIST 14x14, batch 64' if mnist else 'toy MLP (8gaussians, batch 256'
    write_json(result_path(job['name']), dict(
        what=f'train step of the {net}, fp32, 1 thread): train.compute_loss + '
             'backward + clip + Adam + EMA; interleaved reps', reps=reps, steps_per_rep=n_steps,
        cpu=open('/proc/cpuinfo').read().split('model name')[1].split('\n')[0].strip(': '),
        torch=torch.__version__, note='shared 2-core CPU: absolute times are load-dependent; ratios are '
        'taken within each repetition', methods=rows))


# ---- job: train one run, then evaluate it ------------------------------------------------------
def steps_of(job, a):
    s = job['steps']
    if isinstance(s, str) and s.startswith('eqtime:'):   # equal time: S * t_vanilla / t_method
        ratio = read_json(result_path(job.get('timing', 'timing')))['methods'][
            {'ip': 'ip', 'sa': 'sa', 'reg': 'reg_L5_full'}[s.split(':')[1]]]['ratio']
        return max(1, round(job.get('base_steps', a.steps) / ratio)), ratio
    return s, None


def job_run(job, a):
    import train
    torch.set_num_threads(1)
    out = os.path.join(OUT, job['name'])
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'job.pid'), 'w') as f:
        f.write(str(os.getpid()))
    out = os.path.join(OUT, job.get('eval_of', job['name']))   # eval_of: only evaluate that run
    steps, ratio = steps_of(job, a)
    argv = ['--dataset', job['dataset'], '--seed', str(job['seed']), '--max-steps', str(steps),
            '--out-dir', out, '--log-every', '250', '--save-every', '500', '--n-preview', '256'] + job['flags']
    if job['dataset'] == 'mnist':
        argv += ['--sample-every', '0', '--n-preview', '64']
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
    grid = os.path.join(out, f'samples_{steps:07d}.png')   # train.py's end-of-run EMA preview
    if cfg['dataset'] == 'mnist' and 'eval_of' not in job and os.path.isfile(grid):
        os.makedirs(os.path.join(RES, 'samples'), exist_ok=True)
        shutil.copyfile(grid, os.path.join(RES, 'samples', job['name'] + '.png'))
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
    todo = [j for j in jobs if not os.path.isfile(result_path(j['name']))]
    print(f'{len(jobs)} jobs, {len(todo)} to run (S = {a.steps}, seeds {a.seeds}, t-stride {a.t_stride})', flush=True)
    os.makedirs(os.path.join(OUT, 'logs'), exist_ok=True)
    t_start, running, failed = time.time(), {}, set()

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
            print(f'[{(time.time() - t_start) / 60:6.1f} min] start {j["name"]}', flush=True)
        if over and not running:
            print(f'budget of {a.budget_min} min reached; not started: {[j["name"] for j in todo]}', flush=True)
            break
        time.sleep(2)
    print(f'all done in {(time.time() - t_start) / 60:.1f} min; failed: {sorted(failed) or "none"}', flush=True)


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
    p.add_argument('--mnist-steps', type=int, default=2000)
    p.add_argument('--mnist-lr', type=float, default=5e-4)
    p.add_argument('--mnist-n', type=int, default=256, help='MNIST errprop: N = M')
    p.add_argument('--mnist-n-full', type=int, default=1000,
                   help='MNIST: evaluate mnist_vanilla_s0 once more with N = M this large (0: skip)')
    p.add_argument('--mnist-variants', nargs='+', default=['vanilla', 'reg', 'reg_eqtime', 'ip', 'sa'],
                   choices=['vanilla', 'reg', 'reg_eqtime', 'ip', 'sa'])
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
        job_timing(a, job) if job['kind'] == 'timing' else job_run(job, a)
        return
    if not a.report:
        schedule(a)
    import report
    report.report(a)


if __name__ == '__main__':
    main()
