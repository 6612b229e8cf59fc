"""The GPU path, proven: one command that runs every full-scale promise of this repository on one
CUDA device in about 20 minutes and writes what it measured to results/gpu.json and results/gpu.md.

    python -m experiments.gpu_check                                         # one GPU: ~20 minutes
    python -m experiments.gpu_check --device cpu --tiny --out-dir /tmp/g --results /tmp/g   # CPU smoke test

Steps (each a subprocess with its exact argv, wall time and return code recorded; a failing step
is recorded with the end of its stderr and the next one runs; the exit status is 1 if any failed):
  1. bench.py --what train: images/s, peak memory, FLOPs per image and MFU of the cifar10 net at
     batch 128 in fp32, bf16 autocast and with --compile;
  2. bench.py --what reg --reg-L 5 --k random: the regulariser's time and memory over vanilla;
  3. train.py on a CIFAR-10 subset (data_batch_1, copied into --data-dir so that it can travel with
     the repository) with --dtype bf16 --compile for --train-minutes, then sample.py's 64-image grid;
  4. torchrun --nproc_per_node=1 train.py --reg for a few steps;
  5. bench.py --what errprop: one D_MMD(t) chain step at N = M = 1000, and from it the projected
     time of Fig. 1 (T = 1000, three kernels) and of 50k FID samples at 1000 and 100 steps.
--tiny makes every step toy-sized (tiny net, batch 4, 8x8 images, T = 10, 2 steps), so that the
test suite runs the whole script on a CPU in seconds.
"""
import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time

import torch

import runtime as R

BATCH = 128
TARGETS = dict(mfu=0.35, reg_time=2.8, card_GB=80.0, fig1_min=5.0)   # what the GPU session checks
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository


def script(name):
    """A top-level script's path as the user would type it (train.py when run from the repository)."""
    return os.path.relpath(os.path.join(ROOT, name))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='auto', help='auto (cuda when present), cuda:N or cpu')
    p.add_argument('--tiny', action='store_true', help='toy-sized steps: the CPU smoke test')
    p.add_argument('--out-dir', default='out/gpu_check', help='run folders, logs and bench JSON go to '
                   'a new time-stamped folder here')
    p.add_argument('--results', default='results', help='folder for gpu.json, gpu.md, gpu_samples.png')
    p.add_argument('--data-dir', default='data-gpu', help='CIFAR-10 subset used by the training steps')
    p.add_argument('--source-data', default=os.path.join('..', 'shared', 'data'),
                   help='where to copy data_batch_1 from when --data-dir lacks it')
    p.add_argument('--train-minutes', type=float, default=8.0, help='budget of the CIFAR-10 run, turned '
                   'into steps with the measured bf16 + compile throughput')
    p.add_argument('--max-steps', type=int, help='steps of the CIFAR-10 run (overrides --train-minutes)')
    p.add_argument('--peak-tflops', type=float, nargs='+', help='BF16 [FP32] dense peak for the MFU '
                   "(default: bench.py's table by device name)")
    p.add_argument('--nproc', type=int, default=1, help='torchrun ranks (2+ on CPU runs real DDP over gloo)')
    p.add_argument('--channels-last', action='store_true', help='also time bench.py --channels-last '
                   '(a hook for the speed work; fails as a recorded step until bench.py has the flag)')
    a = p.parse_args(argv)
    if a.train_minutes <= 0 or (a.max_steps is not None and a.max_steps < 1) or a.nproc < 1:
        R.fail('--train-minutes must be > 0, --max-steps and --nproc >= 1')
    return a


def prepare_data(a):
    """data_batch_1 in --data-dir/cifar-10-batches-py (10,000 images, 31 MB: small enough to travel
    with the repository, where all five batches, 150 MB, are not). Returns (what was done as an argv,
    error message or None)."""
    dst = os.path.join(a.data_dir, 'cifar-10-batches-py', 'data_batch_1')
    src = os.path.join(a.source_data, 'cifar-10-batches-py', 'data_batch_1')
    if os.path.isfile(dst):
        return ['present', dst], None
    if not os.path.isfile(src):
        return ['missing', dst], (f'neither {dst} nor {src} exists: pass --source-data DIR holding '
                                  f'cifar-10-batches-py/, or put data_batch_1 into {os.path.dirname(dst)}')
    try:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(src, dst + '.tmp')
        os.replace(dst + '.tmp', dst)
    except OSError as e:
        return ['cp', src, dst], f'copying failed: {e}'
    return ['cp', src, dst], None


def environment(dev):
    env = dict(device=dev, torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
               cpu_cores=os.cpu_count(), host=platform.node(), command=shlex.join([sys.executable] + sys.argv))
    if dev.startswith('cuda'):
        env.update(name=torch.cuda.get_device_name(dev), cudnn=torch.backends.cudnn.version(),
                   memory_GB=torch.cuda.get_device_properties(dev).total_memory / 2 ** 30)
    else:
        env['name'] = platform.processor() or platform.machine()
    try:
        q = subprocess.run(['nvidia-smi', '--query-gpu=name,driver_version,memory.total',
                            '--format=csv,noheader'], capture_output=True, text=True, timeout=60)
        env['nvidia_smi'] = q.stdout.strip() or q.stderr.strip()
        env['driver'] = q.stdout.split(',')[1].strip() if q.returncode == 0 and ',' in q.stdout else None
    except (OSError, subprocess.SubprocessError):
        env['driver'] = None   # no nvidia-smi (a CPU machine)
    return env


class Steps:
    """Runs commands one after the other, recording argv, return code, wall time and, when one
    fails, the end of its stderr; stdout and stderr go to LOG_DIR/<name>.out / .err."""

    def __init__(self, log_dir, env):
        self.log_dir, self.env, self.records = log_dir, env, []

    def run(self, name, argv, timeout):
        out, err = (os.path.join(self.log_dir, f'{name}.{x}') for x in ('out', 'err'))
        print(f'[{name}] {shlex.join(argv)}  (log: {out})', flush=True)
        t0 = time.time()
        with open(out, 'w') as fo, open(err, 'w') as fe:
            # its own process group: a step past its limit (or a Ctrl-C here) ends with all of its
            # children, torchrun's workers included, and leaves nothing running on the device
            proc = subprocess.Popen(argv, stdout=fo, stderr=fe, env=self.env, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                rc = 124
                fe.write(f'\ngpu_check: killed after the {timeout:.0f} s limit of this step\n')
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        with open(err) as fe:
            tail = ''.join(fe.readlines()[-25:]) if rc else None
        return self.record(name, argv, rc, time.time() - t0, tail)

    def record(self, name, argv, rc, wall, tail=None):
        rec = dict(name=name, argv=argv, cmd=shlex.join(argv), rc=rc, wall_s=round(wall, 2))
        if tail:
            rec['stderr_tail'] = tail
        print(f'[{name}] rc {rc}, {wall:.1f} s' + (f'\n{tail}' if tail else ''), flush=True)
        self.records.append(rec)
        return rec

    def read(self, rec, fn):
        """fn() reads a step's results when its command succeeded; a result that cannot be read
        marks the step failed (rc 1) with the reason, and the script goes on."""
        if rec['rc'] == 0:
            try:
                return fn()
            except Exception as e:   # noqa: BLE001 -- any broken output is a recorded failure
                rec.update(rc=1, stderr_tail=f'gpu_check could not read its results: {type(e).__name__}: {e}')
                print(f"[{rec['name']}] {rec['stderr_tail']}", flush=True)
        return None


def load(path):
    with open(path) as f:
        return json.load(f)


def read_log(run_dir):
    with open(os.path.join(run_dir, 'log.jsonl')) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def pick(rows, **match):
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def judge(rep, gpu):
    """PASS/MISS of each target against what was measured (None: not measured, a MISS)."""
    tr, reg, ep = rep.get('throughput', {}), rep.get('reg', {}), rep.get('errprop', {})
    best = pick(tr.get('rows', []), dtype='bf16', compile=gpu) or {}
    full = next((r for r in reg.get('rows', []) if r['variant'].startswith('L=5 full')), {})
    state_MB = 5 * 4 * (best.get('params_M') or 0) * 1e6 / 2 ** 20   # weights, grads, Adam x2, EMA
    mem = full.get('peak_mem_MB') and (full['peak_mem_MB'] + state_MB) / 1024
    rows = [('MFU of bf16 + compile, cifar10 net at batch 128', '>= 35 %', best.get('mfu'), 'mfu', '{:.1%}'),
            ('regulariser L = 5, full gradients: step time / vanilla', '<= 2.8x', full.get('ratio'), 'reg_time',
             '{:.2f}x'),
            ('regulariser L = 5, full gradients: memory at batch 128 (step peak + model state)', '<= 80 GB',
             mem, 'card_GB', '{:.1f} GB'),
            ('projected Fig. 1 (released DDPM, T = 1000, N = M = 1000, 3 kernels, fp32)', '< 5 min',
             ep.get('fig1_min'), 'fig1_min', '{:.2f} min')]
    out = []
    for what, goal, val, key, fmt in rows:
        ok = val is not None and (val >= TARGETS[key] if key == 'mfu' else val <= TARGETS[key])
        out.append(dict(target=what, goal=goal, measured=val, shown=fmt.format(val) if val is not None else
                        'not measured', verdict='PASS' if ok else 'MISS'))
    return out


def markdown(rep):
    e, f = rep['env'], lambda v, s='{:.4g}': '-' if v is None else s.format(v)   # noqa: E731
    L = [f"# GPU check{' (--tiny: toy sizes, not the targets)' if rep['tiny'] else ''}", '',
         f"{e['name']} ({e['device']}), driver {e.get('driver')}, torch {e['torch']}, CUDA {e['cuda']}; "
         f"{rep['total_min']:.1f} min in all; {'all steps ran' if rep['ok'] else 'SOME STEPS FAILED'}.", '',
         '## Targets', '', '| target | goal | measured | verdict |', '|---|---|---|---|']
    L += [f"| {t['target']} | {t['goal']} | {t['shown']} | {t['verdict']} |" for t in rep['targets']]
    tr = rep.get('throughput', {})
    L += ['', f"## Training throughput (MFU against {(tr.get('peak') or {}).get('name', 'no known peak')})", '',
          '| model | batch | dtype | compile | img/s | peak mem (GB) | GFLOP/img fwd | fwd+bwd | TFLOP/s | MFU |',
          '|---|---|---|---|---|---|---|---|---|---|']
    L += [f"| {r['model']} | {r['batch']} | {r['dtype']} | {r['compile']} | {f(r['img_per_s'], '{:.1f}')} | "
          f"{f(r['peak_mem_MB'] / 1024, '{:.2f}')} | {f(r['gflop_fwd_img'])} | {f(r['gflop_fwdbwd_img'])} | "
          f"{f(r['tflop_s'])} | {f(r['mfu'], '{:.1%}')} |" for r in tr.get('rows', [])]
    L += ['', '## Regulariser cost (interleaved, ratios to vanilla)', '',
          '| variant | ms/step | time ratio | peak mem (GB) | memory ratio |', '|---|---|---|---|---|']
    L += [f"| {r['variant']} | {1e3 * r['s_per_step']:.1f} | {r['ratio']:.2f} | {r['peak_mem_MB'] / 1024:.2f} | "
          f"{r['mem_ratio']:.2f} |" for r in rep.get('reg', {}).get('rows', [])]
    t, d, ep = rep.get('train_run', {}), rep.get('torchrun', {}), rep.get('errprop', {})
    L += ['', '## Runs', '', f"- CIFAR-10 subset run: {t.get('steps')} steps, final loss {f(t.get('final_loss'))}, "
          f"{f(t.get('img_per_s'), '{:.0f}')} img/s in training; samples: {t.get('samples')}",
          f"- torchrun, {d.get('nproc')} rank(s), {d.get('backend')}: {d.get('steps')} steps in "
          f"{f(d.get('wall_s'), '{:.0f}')} s. {d.get('note', '')}",
          f"- D_MMD(t) chain step at N = M = {ep.get('N')}: network {f(ep.get('per_sample_net_ms'))} ms per "
          f"sample; Fig. 1 projected {f(ep.get('fig1_min'), '{:.2f}')} min "
          f"(bf16 {f(ep.get('fig1_min_bf16'), '{:.2f}')}); 50k FID samples "
          f"{f(ep.get('fid50k_1000_min'), '{:.1f}')} min at 1000 steps, "
          f"{f(ep.get('fid50k_100_min'), '{:.1f}')} min at 100", '', '## Commands', '',
          '| step | rc | wall (s) | command |', '|---|---|---|---|']
    L += [f"| {s['name']} | {s['rc']} | {s['wall_s']:.1f} | `{s['cmd']}` |" for s in rep['steps']]
    return '\n'.join(L) + '\n'


def main(argv=None):
    a = parse(argv)
    dev = R.setup_device(a.device, distributed=False)[0]
    gpu, tiny, py = dev.startswith('cuda'), a.tiny, sys.executable
    for name in ('gpu.json', 'gpu.md'):
        R.check_writable(os.path.join(a.results, name))
    work = os.path.abspath(os.path.join(a.out_dir, time.strftime('run-%Y%m%d-%H%M%S-') + str(os.getpid())))
    os.makedirs(os.path.join(work, 'logs'))
    env = dict(os.environ, OMP_NUM_THREADS='1') if tiny else dict(os.environ)   # toy sizes: no thread fights
    steps, t_start = Steps(os.path.join(work, 'logs'), env), time.time()
    rep = dict(tiny=tiny, env=environment(dev), work_dir=work)
    model, B = ('tiny', 4) if tiny else ('cifar10', BATCH)
    bench = [py, '-m', 'experiments.bench', '--model', model, '--batch-size', str(B), '--device', dev]
    bench += ['--iters', '2', '--warmup', '0', '--reps', '1', '--threads', '1'] if tiny else []
    bench += ['--peak-tflops', *map(str, a.peak_tflops)] if a.peak_tflops else []
    long = 120 if tiny else 1200   # per-step limits: a hung step costs minutes, not the session

    # 1. training throughput, FLOPs and MFU: fp32, bf16 (and both compiled, not on a CPU)
    j = os.path.join(work, 'bench_train.json')
    dtypes, comp = ['fp32', 'bf16'], '--compile' if gpu else '--no-compile'
    rec = steps.run('bench_train', bench + ['--what', 'train', '--dtype', *dtypes, comp, '--json', j], long)
    rep['throughput'] = steps.read(rec, lambda: dict(peak=load(j)['peak'], rows=load(j)['train']))
    if a.channels_last:   # the hook: bench.py gains --channels-last with the speed work
        j = os.path.join(work, 'bench_train_cl.json')
        rec = steps.run('bench_train_channels_last', bench + ['--what', 'train', '--dtype', 'bf16', comp,
                                                              '--channels-last', '--json', j], long)
        rep['throughput_channels_last'] = steps.read(rec, lambda: load(j)['train'])
    # 2. the regulariser at L = 5 against vanilla, interleaved, as in training (bf16, compile)
    j = os.path.join(work, 'bench_reg.json')
    reg_dtype = ['--dtype', 'bf16' if gpu else 'fp32', comp]
    rec = steps.run('bench_reg', bench + ['--what', 'reg', '--reg-L', '5', '--k', 'random', *reg_dtype,
                                          '--json', j], long)
    rep['reg'] = steps.read(rec, lambda: dict(rows=load(j)['reg']))
    # 3. a short real CIFAR-10 run (bf16, compile) on the carried subset, then a grid of its samples
    t0 = time.time()
    what, error = prepare_data(a)
    steps.record('data', what, int(error is not None), time.time() - t0, error)
    run_dir, n_steps = os.path.join(work, 'train'), a.max_steps
    if n_steps is None:   # the minute budget in steps, from the measured bf16 + compile throughput
        row = pick((rep['throughput'] or {}).get('rows', []), dtype='bf16', compile=gpu)
        n_steps = 2 if tiny else round(a.train_minutes * 60 * row['img_per_s'] / B) if row else 2000
    common = [script('train.py'), '--dataset', 'cifar10', '--data-dir', a.data_dir, '--model', model,
              '--batch-size', str(B), '--n-preview', '4']
    common += ['--image-size', '8', '--T', '10'] if tiny else []
    # EMA 0.999: the preset's 0.9999 would still be mostly the initial weights after a few thousand steps
    train_cmd = [py, *common, '--dtype', 'bf16', '--ema-decay', '0.999', '--max-steps', str(n_steps),
                 '--log-every', '1' if tiny else '50',
                 '--out-dir', run_dir, '--device', dev] + (['--compile'] if gpu else [])
    rec = steps.run('train', train_cmd, 120 if tiny else a.train_minutes * 60 * 2 + 600)
    log = steps.read(rec, lambda: read_log(run_dir))
    rep['train_run'] = None
    if log:
        rep['train_run'] = dict(steps=log[-1]['step'], final_loss=log[-1]['loss'], out_dir=run_dir,
                                img_per_s=log[-1]['img_per_s'], loss_curve=[[r['step'], r['loss']] for r in log])
        grid = os.path.join(a.results, 'gpu_samples.png')
        rec = steps.run('sample', [py, script('sample.py'), '--ckpt', run_dir, '--n', '4' if tiny else '64',
                                   '--grid', grid, '--device', dev], 120 if tiny else 600)
        rep['train_run']['samples'] = steps.read(rec, lambda: os.path.isfile(grid) and grid)
    # 4. torchrun: the launcher, the rank set-up and --reg under it (nccl on GPUs, gloo on CPUs)
    tr_dir = os.path.join(work, 'torchrun')
    tr_cmd = [py, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={a.nproc}', *common, '--reg',
              '--max-steps', '2' if tiny else '5', '--log-every', '1', '--out-dir', tr_dir,
              '--device', 'auto' if gpu else 'cpu']
    rec = steps.run('torchrun', tr_cmd, 120 if tiny else 600)
    rep['torchrun'] = dict(nproc=a.nproc, backend='nccl' if gpu else 'gloo', rc=rec['rc'], wall_s=rec['wall_s'],
                           steps=steps.read(rec, lambda: read_log(tr_dir)[-1]['step']))
    if a.nproc == 1:
        rep['torchrun']['note'] = ('Under torchrun runtime.setup_device joins the process group even with one '
                                   'rank and train.py wraps the model in DistributedDataParallel: the DDP '
                                   'path itself (nccl on a GPU, gloo on a CPU) with --reg.')
    # 5. one D_MMD(t) chain step at N = M = 1000, and the projections built on it
    j = os.path.join(work, 'bench_errprop.json')
    n = 8 if tiny else 1000
    rec = steps.run('errprop', bench + ['--what', 'errprop', '--n', str(n), '--dtype',
                                        *(dtypes if gpu else ['fp32']), '--json', j], long)

    def projections():
        rows = load(j)['errprop']
        fp, bf = pick(rows, dtype='fp32'), pick(rows, dtype='bf16') or {}
        per = fp['p_step_s'] / n   # the network's time per sample per step, batched at N
        return dict(N=n, rows=rows, per_sample_net_ms=1e3 * per, fig1_min=fp['T1000_total_min'],
                    fig1_min_bf16=bf.get('T1000_total_min'), fid50k_1000_min=50000 * 1000 * per / 60,
                    fid50k_100_min=50000 * 100 * per / 60)
    rep['errprop'] = steps.read(rec, projections)
    rep = {k: ({} if v is None else v) for k, v in rep.items()}   # a failed section: empty, still present
    rep['targets'] = judge(rep, gpu)
    rep['steps'], rep['ok'] = steps.records, all(s['rc'] == 0 for s in steps.records)
    rep['total_min'] = (time.time() - t_start) / 60
    R.write_json(os.path.join(a.results, 'gpu.json'), rep)
    R.atomic_write(os.path.join(a.results, 'gpu.md'), lambda f: f.write(markdown(rep)), binary=False)
    for t in rep['targets']:
        print(f"{t['verdict']}: {t['target']}: {t['shown']} (goal {t['goal']})")
    bad = [s['name'] for s in steps.records if s['rc']]
    print(f"wrote {a.results}/gpu.json and gpu.md in {rep['total_min']:.1f} min; "
          + (f'FAILED: {", ".join(bad)}' if bad else 'every step returned 0'))
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main())
