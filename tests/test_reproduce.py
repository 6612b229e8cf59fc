"""reproduce.py end to end on a miniature protocol: the scheduler, a run job, the timing job,
the report, and resuming (a finished protocol starts nothing)."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--max-steps', '5', '--seeds', '0', '--t-stride', '500', '--n', '64', '--n-true', '64',
        '--timing-reps', '1', '--timing-iters', '1', '--long-steps', '0', '--only', 'timing', '8gaussians_vanilla_s0',
        '8gaussians_reg_eqtime_s0']


def run(tmp_path, *args):
    env = dict(os.environ, REPRO_RESULTS=str(tmp_path / 'results'), REPRO_OUT=str(tmp_path / 'out'),
               OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, 'reproduce.py', *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_miniature_protocol_runs_reports_and_resumes(tmp_path):
    p = run(tmp_path, *TINY)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert 'failed: none' in p.stdout
    res = tmp_path / 'results'
    van = json.loads((res / 'runs' / '8gaussians_vanilla_s0.json').read_text())
    assert van['steps'] == 5 and van['curve']['t'] == [1000, 500, 0]
    assert set(van['d_t0']) == {'gaussian', 'laplace', 'imq'} and van['mmd_true'] is not None
    # equal time: steps = S / (measured cost ratio of --reg), ratio taken from the timing job
    eq = json.loads((res / 'runs' / '8gaussians_reg_eqtime_s0.json').read_text())
    ratio = json.loads((res / 'timing.json').read_text())['methods']['reg_L5_full']['ratio']
    assert eq['eqtime_ratio'] == ratio and eq['steps'] == max(1, round(5 / ratio))
    summary = json.loads((res / 'summary.json').read_text())
    assert summary['runs']['8gaussians/vanilla']['seeds'] == [0]
    tables = (res / 'tables.md').read_text()
    assert '| vanilla | 5 |' in tables and 'reg_eqtime' in tables
    assert (res / 'errprop_8gaussians.png').is_file() and (res / 'time_vs_L.png').is_file()
    again = run(tmp_path, *TINY)
    assert again.returncode == 0 and '3 jobs, 0 to run' in again.stdout


def test_bad_settings_fail_with_one_line(tmp_path):
    p = run(tmp_path, '--max-steps', '2')
    assert p.returncode != 0 and p.stderr.strip().splitlines()[-1].startswith('error: ')
    assert not (tmp_path / 'results').exists()
