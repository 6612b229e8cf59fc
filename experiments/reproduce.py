"""Regenerate the step-count protocol of RESULTS.md from scratch: every trained cure and epsilon
scaling at S in {10, 20, 50, 100, 1000} sampling steps, for models trained with T = 1000 and T = 50
(the job list and the evaluation of one model: experiments/protocol.py; the tables and figures:
experiments/report.py).

    python -m experiments.reproduce                  # the toy sets, 5 seeds, 2 processes at a time
    python -m experiments.reproduce --mnist          # + MNIST 14x14, 3 seeds (slow on CPU)
    python -m experiments.reproduce --report         # only re-aggregate results/steps/ and redraw

Resumable: a finished job (results/steps/NAME.json) is skipped, an interrupted training continues
from its checkpoint. Raw runs live in out/repro/ (git-ignored); small artifacts in results/.
Every training run is exactly `python train.py ARGS` (printed in the job's log and stored in its
JSON), every timing `python -m experiments.bench --what methods ...`. All processes run
single-threaded (OMP_NUM_THREADS=1): the machine is a shared 2-core CPU.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

os.environ.setdefault('OMP_NUM_THREADS', '1')
import torch  # noqa: E402

import runtime as R  # noqa: E402
from experiments import fair as F  # noqa: E402
from experiments.check import check_results, sync_tables  # noqa: E402
from experiments import protocol as P  # noqa: E402
from experiments import table1 as T1  # noqa: E402
from experiments.protocol import OUT, RES, ROOT, mnist_flags, read_json, result_path  # noqa: E402


def job_list(a):
    """Ordered by priority (what RESULTS.md needs most comes first); --only keeps a subset."""
    if getattr(a, 'table1', False):
        jobs = T1.job_list(a)
    else:
        jobs = (F.extra_jobs(a) if a.extra else F.job_list(a)) if getattr(a, 'fair', False) else P.job_list(a)
    return [j for j in jobs if any(o in j['name'] for o in a.only)] if a.only else jobs


def bench(*args):
    """`python -m experiments.bench ARGS`, one thread, on the CPU."""
    cmd = [sys.executable, '-m', 'experiments.bench', *args, '--threads', '1', '--device', 'cpu']
    print(' '.join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


# ---- job: interleaved timing of one training step per method ----------------------------------
def job_timing(a, job):
    """train.py's step for every method in ONE process, interleaved (each repetition runs every
    method for the same step indices), 1 thread."""
    mnist = job.get('dataset') == 'mnist'
    base = ['--dataset', 'mnist'] + mnist_flags(a) if mnist else ['--dataset', job.get('dataset', '8gaussians')]
    bench('--what', 'methods', '--reps', str(a.timing_reps), '--iters', str(4 if mnist else a.timing_iters),
          '--warmup', '3', '--verbose', '--flags', ' '.join(base + ['--seed', '0']),
          '--json', result_path(job['name']), '--variant', *[f"{k}={' '.join(fl)}" for k, fl in job['timed'].items()])


# ---- job: train one run, then evaluate it over S ------------------------------------------------
def steps_of(job, a):
    s = job['steps']
    if isinstance(s, str) and s.startswith('eqtime:'):   # equal time: S * t_vanilla / t_method
        ratio = read_json(result_path(job['timing']))['methods'][job['ratio_key']]['ratio']
        return max(1, round(job.get('base_steps', a.max_steps) / ratio)), ratio
    return s, None


def train_job(job, a):
    """Train (or resume) the job's run, exactly `python train.py ARGV`; returns what its JSON records."""
    torch.set_num_threads(1)
    out = os.path.join(OUT, job['name'])
    os.makedirs(out, exist_ok=True)
    R.atomic_write(os.path.join(out, 'job.pid'), lambda f: f.write(str(os.getpid())), binary=False)
    steps, ratio = steps_of(job, a)
    argv = ['--dataset', job['dataset'], '--seed', str(job['seed']), '--max-steps', str(steps),
            '--out-dir', out, '--log-every', '10', '--save-every', '500', '--n-preview', str(min(256, a.n_true))]
    argv += job['flags'] + (['--sample-every', '0', '--n-preview', '64'] if job['dataset'] == 'mnist' else [])
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


def job_steps(a, job):
    """Train, then evaluate over S; --reg runs also get their regulariser's perfect-model floor,
    seed 0 the regulariser's gradient fraction."""
    out, res = train_job(job, a)
    compile = getattr(a, 'compile', False)
    model, diff, cfg = R.load_checkpoint(out, 'cpu', ema=True, dtype=job.get('eval_dtype', 'fp32'), compile=compile)
    res['config'], res['eval_dtype'] = cfg, diff.net_dtype
    if compile:
        res['eval_compile'] = True
    t0 = time.time()
    mnist = job['dataset'] == 'mnist'
    res.update(P.evaluate_steps(model, diff, cfg, n=a.mnist_n if mnist else a.n_true,
                                n_select=a.mnist_n // 2 if mnist else min(500, a.n_true),
                                es_max_steps=100, chunk=250 if mnist else None, n_ref=a.n_ref,
                                fast=a.eval == 'fast', streams=a.eval_streams))
    if cfg['reg']:
        res['reg_floor'] = P.reg_floor(cfg)
    if job['seed'] == 0 and not job['name'].startswith('dtype_') and job['method'] in ('vanilla', 'reg', 'reg_S20', 'reg_l0.5', 'reg_l0.8', *P.SWEEP):
        tmp = result_path(job['name']) + '.reg_grad.json'
        bench('--what', 'reg-grad', '--ckpt', out, '--json', tmp)
        res['reg_grad'] = read_json(tmp)['reg_grad']
        os.remove(tmp)
    res['eval_wall_s'] = time.time() - t0
    R.write_json(result_path(job['name']), res)


def job_resolution(a, job):
    """Retrain one of results/steps' toy models (its flags and seed), then score it with
    protocol.resolution_scores; seed 0 also repeats the evaluation under 5 evaluation seeds."""
    out, res = train_job(job, a)
    model, diff, cfg = R.load_checkpoint(out, 'cpu', ema=True, dtype='fp32')
    t0 = time.time()
    res['scores'] = P.resolution_scores(model, diff, job['dataset'], job['seed'], n=a.resolution_n,
                                        eval_seeds=range(5) if job['seed'] == 0 else (0,))
    res.update(n=a.resolution_n, eval_wall_s=time.time() - t0, config=cfg)
    R.write_json(result_path(job['name']), res)


def reg_grad(out, name):
    """bench --what reg-grad on run `out` (40 batches: 20 independent pairs for the cosines)."""
    tmp = result_path(name) + '.reg_grad.json'
    bench('--what', 'reg-grad', '--ckpt', out, '--batches', '40', '--json', tmp)
    g = read_json(tmp)['reg_grad']
    os.remove(tmp)
    return {k: v for k, v in g.items() if k != 'rows'}


def job_fair_base(a, job):
    """Issue 28's base: vanilla trained to --fair-base-steps in stages (resumes), each stage scored
    with PLATEAU_N samples at S = 20 and S = T under its own evaluation seed (the stage's step, so
    never the final score's streams); then the final model scored as every arm is, and measured
    with bench --what reg-grad."""
    plateau, wall = [], 0.0
    for stage in F.stages(job['steps']):
        out, res = train_job({**job, 'steps': stage}, a)
        wall += res['train_wall_s'] or 0.0
        model, diff, cfg = R.load_checkpoint(out, 'cpu', ema=True, dtype='fp32')
        steps = [S or diff.T for S in F.PLATEAU_STEPS]
        plateau.append(dict(step=stage, scores=P.resolution_scores(model, diff, F.DS, job['seed'], n=F.PLATEAU_N,
                                                                    steps=steps, eval_seeds=(stage,))))
    t0 = time.time()
    res.update(plateau=plateau, train_wall_s=wall, config=cfg, n=a.resolution_n,
               scores=P.resolution_scores(model, diff, F.DS, job['seed'], n=a.resolution_n), reg_grad=reg_grad(out, job['name']))
    res['eval_wall_s'] = time.time() - t0
    R.write_json(result_path(job['name']), res)


def job_fair_arm(a, job):
    """Issue 28's arm: --init-from its base, job['steps'] steps of fine-tuning, scored and measured
    as the base."""
    job = {**job, 'flags': job['flags'] + ['--init-from', os.path.join(OUT, job['deps'][0])]}
    out, res = train_job(job, a)
    model, diff, cfg = R.load_checkpoint(out, 'cpu', ema=True, dtype='fp32')
    t0 = time.time()
    res.update(config=cfg, n=a.resolution_n, scores=P.resolution_scores(model, diff, F.DS, job['seed'], n=a.resolution_n))
    if cfg['reg'] or job['method'] == 'control':
        res['reg_grad'] = reg_grad(out, job['name'])
    res['eval_wall_s'] = time.time() - t0
    R.write_json(result_path(job['name']), res)


def job_fair_extra(a, job):
    """ADM's grid and the Time-Shift Sampler on a finished fair_* run (fair.extra_scores)."""
    model, diff, cfg = R.load_checkpoint(os.path.join(OUT, job['run']), 'cpu', ema=True, dtype='fp32')
    t0 = time.time()
    res = dict(job={k: v for k, v in job.items() if k != 'deps'}, n=a.resolution_n,
               scores=F.extra_scores(model, diff, job['seed'], a.resolution_n, P.resolution_scores,
                                     curves=job['method'] in F.CURVE_ARMS))
    res['eval_wall_s'] = time.time() - t0
    R.write_json(result_path(job['name']), res)


def job_t1_base(a, job):
    """Table 1's base: vanilla MNIST trained to --t1-base-steps in stages (resumes), each stage scored
    at table1.PLATEAU_EVAL with PLATEAU_N samples under the stage's own streams (seed + 1000 * step)."""
    plateau, wall, ev, metric = [], 0.0, 0.0, None
    for stage in T1.stages(job['steps']):
        out, res = train_job({**job, 'steps': stage}, a)
        wall += res['train_wall_s'] or 0.0
        t0 = time.time()
        model, diff, cfg = R.load_checkpoint(out, 'cpu', ema=True, dtype='auto')   # bf16 here: results/dtype_mnist.json
        metric = metric or P.ClassifierMetric(cfg)
        sc, _ = T1.scores(model, diff, cfg, job['seed'] + 1000 * stage, T1.PLATEAU_N, T1.PLATEAU_EVAL, metric)
        plateau.append(dict(step=stage, scores={k: v for k, v in sc.items() if k != 'floor'}, floor=sc['floor']))
        ev += time.time() - t0
    res.update(plateau=plateau, train_wall_s=wall, eval_wall_s=ev, config=cfg, eval_dtype=diff.net_dtype)
    R.write_json(P.result_path(job['name']), res)


def job_t1_arm(a, job):
    """Table 1's arm: --init-from its base, job['steps'] steps of fine-tuning, then table1.scores
    (seed 0 also keeps its first samples for the grid); the control and the regulariser arm are also
    measured by bench --what reg-grad."""
    job = {**job, 'flags': job['flags'] + ['--init-from', os.path.join(OUT, job['deps'][0])]}
    out, res = train_job(job, a)
    model, diff, cfg = R.load_checkpoint(out, 'cpu', ema=True, dtype='auto')   # bf16 here: results/dtype_mnist.json
    t0 = time.time()
    sc, grids = T1.scores(model, diff, cfg, job['seed'], a.t1_n, keep=T1.GRID_AT if job['seed'] == 0 else (), es=T1.ES_AT)
    res.update(config=cfg, eval_dtype=diff.net_dtype, n=a.t1_n, scores=sc, grids=grids)
    if cfg['reg'] or job['method'] == 'control':   # the regulariser's effective weight and signal-to-noise
        res['reg_grad'] = reg_grad(out, job['name'])
    res['eval_wall_s'] = time.time() - t0
    R.write_json(P.result_path(job['name']), res)


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
    print(f'{len(jobs)} jobs, {len(todo)} to run (S = {a.max_steps}, seeds {a.seeds})', flush=True)
    os.makedirs(os.path.join(OUT, 'logs'), exist_ok=True)
    t_start, running, failed, started = time.time(), {}, set(), 0
    bar = R.progress_bar(len(todo), 'protocol', 'job')   # a terminal's one line; the log lines below it

    def say(msg):
        bar.write(f'[{(time.time() - t_start) / 60:6.1f} min] {msg}', sys.stdout)
        sys.stdout.flush()

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

    stop = {}   # SIGTERM / SIGINT: stop the running jobs (their train.py saves where it is), start no more
    old = {sig: signal.signal(sig, lambda signum, frame: stop.setdefault('signum', signum))
           for sig in (signal.SIGTERM, signal.SIGINT)}
    while todo or running:
        if stop:
            halt(running, stop['signum'], t_start)
        for name, (p, t0) in list(running.items()):
            if p.poll() is not None:
                del running[name]
                ok = p.returncode == 0 and finished(name)
                failed |= set() if ok else {name}
                bar.update()
                say(f'{"done" if ok else "FAILED"} {name} ({time.time() - t0:.0f} s)')
        over = a.budget_min and (time.time() - t_start) / 60 > a.budget_min
        for j in list(todo):
            if len(running) >= a.jobs or over:
                break
            if any(d in failed for d in j['deps']):
                todo.remove(j)
                failed.add(j['name'])
                bar.update()
                continue
            if not all(finished(d) for d in j['deps']):
                continue
            todo.remove(j)
            if alive_elsewhere(j['name']):   # started by an earlier scheduler: wait for it
                running[j['name']] = (Waiter(j['name'], alive_elsewhere), time.time())
                say(f'waiting for running {j["name"]}')
                continue
            cmd = [sys.executable, '-m', 'experiments.reproduce', '--job', j['name']] + a.passthrough
            log = open(os.path.join(OUT, 'logs', j['name'] + '.log'), 'a')
            running[j['name']] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                                   env=dict(os.environ, OMP_NUM_THREADS='1'),
                                                   start_new_session=True), time.time())   # (own group: halt)
            started += 1
            say(f'start {j["name"]}')
        if over and not running:
            print(f'budget of {a.budget_min} min reached; not started: {[j["name"] for j in todo]}', flush=True)
            break
        time.sleep(2)
    bar.close()
    for sig, h in old.items():
        signal.signal(sig, h)
    print(f'all done in {(time.time() - t_start) / 60:.1f} min; failed: {sorted(failed) or "none"}', flush=True)
    return jobs, started


def halt(running, signum, t_start):
    """Pass the signal on to each running job's process group (its train.py saves at the current
    step and exits 143; an evaluation in flight ends without its result file, so the job counts as
    not done) and exit 128 + signum: rerunning the same command resumes every unfinished job."""
    for name, (p, _) in running.items():
        if isinstance(p, subprocess.Popen) and p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for name, (p, _) in running.items():
        if isinstance(p, subprocess.Popen):
            p.wait()
    print(f'[{(time.time() - t_start) / 60:6.1f} min] stopped by {signal.Signals(signum).name}: finished results '
          f'kept, unfinished jobs {sorted(running) or "none"}; rerun the same command to resume them', flush=True)
    raise SystemExit(128 + signum)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--max-steps', type=int, default=1000, help='training steps of every toy run')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2, 3, 4], help='MNIST: the first 3')
    p.add_argument('--jobs', type=int, default=2, help='processes at a time')
    p.add_argument('--timing-reps', type=int, default=5)
    p.add_argument('--timing-iters', type=int, default=20, help='timed steps per method and repetition')
    p.add_argument('--n-true', type=int, default=1000, help='toy: model samples against the known distribution')
    p.add_argument('--n-ref', type=int, default=P.N_REF, help='toy: fresh true draws the samples are scored against')
    p.add_argument('--budget-min', type=float, default=0, help='start no new job after this many minutes')
    p.add_argument('--only', nargs='+', help='only jobs whose name contains one of these')
    p.add_argument('--mnist', action='store_true', help='also the MNIST runs (tiny U-Net; slow on CPU)')
    p.add_argument('--mnist-max-steps', type=int, default=2000)
    p.add_argument('--mnist-lr', type=float, default=5e-4)
    p.add_argument('--mnist-n', type=int, default=256, help='MNIST: samples per evaluation')
    p.add_argument('--dtype-check', action='store_true', help='also vanilla toy runs trained and evaluated in bf16 '
                   '(results/dtype/), paired by seed with the fp32 ones: what --dtype auto changes (with --mnist: '
                   "fp32-trained twins of MNIST's bf16 T = 50 vanilla runs)")
    p.add_argument('--eval', choices=('grid', 'fast'), default='grid',
                   help="grid: how results/steps was evaluated (its tables pair runs on it); fast: the ES "
                        "scale by golden-section search and shared chains (protocol.evaluate_steps), for new tables")
    p.add_argument('--compile', action='store_true', help='torch.compile the evaluated network of the step-count jobs '
                   '(a trace per batch shape; pays on MNIST, bf16 rounding differs slightly: docs/performance.md)')
    p.add_argument('--eval-streams', choices=P.STREAMS, default='legacy',
                   help="evaluation randomness: legacy (how results/steps was evaluated; A(t)'s first z is its x_T), "
                        'independent (x_T, chain noise, perturbation, reference draws from separate streams; use a '
                        'fresh REPRO_RESULTS: runs are paired by seed only within one setting)')
    p.add_argument('--sweep', action='store_true', help="only the regulariser's strength sweep on 8gaussians "
                   '(results/sweep/, summary results/sweep_toy.json), paired by seed with the vanilla runs')
    p.add_argument('--resolution', action='store_true', help='only the toy metric with resolution: results/steps\' '
                   'toy vanilla and reg models retrained and scored by the unbiased MMD^2 of --resolution-n '
                   'samples, two kernels, with its floor (results/resolution/, summary results/resolution_toy.json)')
    p.add_argument('--resolution-n', type=int, default=5000, help='samples and fresh true draws per score')
    p.add_argument('--fair', action='store_true', help="only issue 28's fair test (experiments/fair.py): vanilla "
                   '8gaussians bases trained to their plateau, then equal fine-tuning arms (results/fair/, summary '
                   'results/fair_toy.md/.json/.png); with --report only the summary')
    p.add_argument('--extra', action='store_true', help="--fair: ADM's grid and the Time-Shift Sampler on every "
                   'fair run, each as soon as the run is done (results/fairx/)')
    p.add_argument('--fair-base-steps', type=int, default=F.BASE_STEPS, help='--fair: training steps of the bases')
    p.add_argument('--fair-ft-steps', type=int, default=F.FT_STEPS, help='--fair: fine-tuning steps of every arm')
    p.add_argument('--table1', action='store_true', help="only issue 28's Table 1 analogue on MNIST (experiments/table1.py): "
                   'vanilla bases, then control / literal regulariser / ADM-IP / SA-DPM arms, FD and KID at S = 1000, 100, 20 '
                   '(results/table1/, summary results/table1_mnist.md/.json/.png); with --report only the summary')
    p.add_argument('--t1-base-steps', type=int, default=T1.BASE_STEPS, help='--table1: training steps of the bases')
    p.add_argument('--t1-ft-steps', type=int, default=T1.FT_STEPS, help='--table1: fine-tuning steps of every arm')
    p.add_argument('--t1-n', type=int, default=T1.N, help='--table1: samples per score')
    p.add_argument('--report', action='store_true', help='only aggregate and plot what exists')
    p.add_argument('--check', action='store_true', help='only check RESULTS.md against results/ (exit 1 on any '
                   'disagreement: a missing file, a copied table or resolution row that differs, a stale figure)')
    p.add_argument('--sync-tables', action='store_true', help="rewrite RESULTS.md's tables copied from a report "
                   '(steps_tables.md, fair_toy.md) with the report\'s tables now, then --check')
    p.add_argument('--job', help=argparse.SUPPRESS)
    a = p.parse_args()
    if len(a.seeds) < 1 or a.max_steps < 5 or a.n_true < 2 or a.n_ref < 2 or a.jobs < 1:
        R.fail('need --seeds, --max-steps >= 5, --jobs >= 1, --n-true and --n-ref >= 2')
    a.passthrough = [x for x in sys.argv[1:] if x != '--report']
    if a.job:
        a.only = None   # the child must find its job in the full list
        job = next((j for j in job_list(a) if j['name'] == a.job), None)
        if job is None:
            R.fail(f'no job {a.job}')
        dict(timing=job_timing, steps=job_steps, resolution=job_resolution, fair_base=job_fair_base,
             fair_arm=job_fair_arm, fair_extra=job_fair_extra, t1_base=job_t1_base, t1_arm=job_t1_arm)[job['kind']](a, job)
        return
    if a.sync_tables:
        print('\n'.join(f'rewrote "{h}"' for h in sync_tables()) or 'every copied table already equals its report')
    if a.check or a.sync_tables:
        bad = check_results()
        print('\n'.join(bad) or 'RESULTS.md agrees with results/')
        raise SystemExit(1 if bad else 0)
    if a.table1:
        if not a.report:
            schedule(a)
        print(T1.summary())
        return
    if a.fair:
        if not a.report:
            schedule(a)
        print(F.summary())
        return
    if a.resolution:
        a.only = ['resolution_']
        schedule(a)
        from experiments.report import resolution_summary
        print(resolution_summary())
        return
    if a.dtype_check or a.sweep:   # only these pairs: the step-count tables stay as they are
        family = 'dtype' if a.dtype_check else 'sweep'
        a.only = [family + '_']
        schedule(a)
        print(json.dumps(P.dtype_summary(family), indent=1))
        return
    from experiments.report import report_steps   # matplotlib only where a report is drawn
    if not a.report:
        jobs, started = schedule(a)
        tables = os.path.join(RES, 'steps_tables.md')
        done = [result_path(j['name']) for j in jobs if os.path.isfile(result_path(j['name']))]
        if not started and os.path.isfile(tables) and all(os.path.getmtime(f) <= os.path.getmtime(tables) for f in done):
            print(f'nothing new since {tables} was written: report kept (--report rewrites it)')
            return
    report_steps(a)


if __name__ == '__main__':
    main()
