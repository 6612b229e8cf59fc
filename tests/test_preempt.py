"""Preemption: SIGTERM / SIGINT stop train.py after the current step with a checkpoint at that
step and exit 143 / 130, and --resume continues bit-exactly; one writer per run folder (a lock
the OS drops when its holder dies)."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = ['--dataset', '8gaussians', '--T', '50', '--dtype', 'fp32', '--batch-size', '16', '--sample-every', '0',
       '--log-every', '5', '--save-every', '100000', '--toy-n', '2000']


def start(out, *extra):
    return subprocess.Popen([sys.executable, 'train.py', *TOY, '--out-dir', str(out), *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS='1'))


def wait_for_steps(p):
    """Read the run's output until its first progress line: it is inside the training loop."""
    seen = []
    for line in p.stdout:
        seen.append(line)
        if line.startswith('step '):
            return seen
    raise AssertionError('the run ended before its first step: ' + ''.join(seen)[-2000:])


def run(out, *extra):
    return subprocess.run([sys.executable, 'train.py', *TOY, '--out-dir', str(out), *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))


def weights(out):
    ck = torch.load(os.path.join(out, 'ckpt.pt'), map_location='cpu', weights_only=False)
    return ck['step'], ck['model'], ck['ema'], ck['opt']['state']


@pytest.mark.parametrize('sig, code', [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_the_current_step_and_resume_is_bit_exact(tmp_path, sig, code):
    out, ref = tmp_path / 'run', tmp_path / 'ref'
    p = start(out, '--max-steps', '100000')
    wait_for_steps(p)
    p.send_signal(sig)
    rest, _ = p.communicate(timeout=120)
    assert p.returncode == code, rest[-2000:]
    last = rest.strip().splitlines()[-1]
    stopped, *_ = weights(out)
    assert last.startswith(f'stopped by {signal.Signals(sig).name} at step {stopped};') and '--resume' in last
    assert 5 <= stopped < 100000
    k = stopped + 7   # resume past where it stopped, against one uninterrupted run of k steps
    assert run(out, '--resume', '--max-steps', str(k)).returncode == 0
    assert run(ref, '--max-steps', str(k)).returncode == 0
    a, b = weights(out), weights(ref)
    assert a[0] == b[0] == k
    for x, y in ((a[1], b[1]), (a[2], b[2])):
        assert x.keys() == y.keys() and all(torch.equal(x[n], y[n]) for n in x)
    assert all(torch.equal(a[3][i]['exp_avg'], b[3][i]['exp_avg']) for i in a[3])


def test_second_writer_is_refused_and_a_killed_writers_lock_is_not_stale(tmp_path):
    out = tmp_path / 'run'
    first = start(out, '--max-steps', '100000')
    wait_for_steps(first)
    second = run(out, '--max-steps', '100000')
    assert second.returncode != 0
    msg = second.stderr.strip().splitlines()
    assert len(msg) == 1 and msg[0] == (f'error: {out} is in use by pid {first.pid} (another train.py writes it): '
                                        'wait for it to end, or pass another --out-dir'), second.stderr
    time.sleep(0.3)
    assert first.poll() is None   # the first runs on
    first.kill()   # -9: no handler, no clean-up; the OS drops the lock
    first.wait(timeout=60)
    p = start(out, '--max-steps', '100000', '--save-every', '5')   # a fresh run (the killed one saved nothing)
    wait_for_steps(p)
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=120)
    assert p.returncode == 143
