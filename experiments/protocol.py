"""The step-count protocol of RESULTS.md (issue 16): where error propagation shows, and what each
cure buys there. Every trained cure (the paper's regulariser at three lambdas, its few-step and
released variants, ADM-IP, SA-DPM) and the training-free one (epsilon scaling, on top of every
model) side by side, at S in {10, 20, 50, 100, 1000} sampling steps, for models trained with
T = 1000 and with short chains (T = 50).

    python -m experiments.reproduce              # toy sets, 5 seeds (resumable, 2 jobs at a time)
    python -m experiments.reproduce --mnist      # + MNIST 14x14, 3 seeds (slow on CPU)
    python -m experiments.reproduce --report     # only aggregate results/steps/*.json

This module holds the job list (experiments/reproduce.py runs the jobs: training is
`python train.py ...`) and the evaluation of one trained model over S (evaluate_steps);
experiments/report.py aggregates.
Per run and per S, for the respaced ancestral chain and DDIM (eta 0):
  final metric  toy: MMD (gaussian kernel, unbiased, signed sqrt) of 1000 samples against 2000
                (--n-ref) fresh draws of the true distribution; MNIST: Frechet distance and KID in the
                features of the project's MNIST classifier (fid.py) against the training set;
  +ES           the same after epsilon scaling (S <= 100), its factor picked on a grid with OTHER
                samples against OTHER reference data (no sharing between choice and score);
  D_MMD(t)      along the ancestral chains of S = 20 and S = 1000 (mmd.errprop_curve);
  A(t)          amplification of an isotropic error (RMS 0.1) injected at t0 = 0.9 T, 0.5 T, 0.1 T
                (mmd.fault_tolerance, 250 pairs of chains), at S = 20 and S = 1000 (MNIST: S = 20).
For --reg runs, the regulariser's logged value against its perfect-model floor (reg_floor), and
for seed 0 its gradient as a fraction of the eps-MSE gradient (experiments/bench.py --what reg-grad).
"""
import json
import os

import numpy as np
import torch

import data as D
import runtime as R
from diffusion import adm_times, eps_scale_schedule
from mmd import errprop_curve, fault_tolerance, mmd, mmd2, mmd2_many, signed_sqrt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository
# where results (committed) and raw runs (git-ignored) go; the environment can redirect both
RES = os.environ.get('REPRO_RESULTS', os.path.join(ROOT, 'results'))
OUT = os.environ.get('REPRO_OUT', os.path.join(ROOT, 'out', 'repro'))
# the CPU-sized MNIST preset (runtime.py), with the data folder beside the repository
MNIST_FLAGS = [*R.MNIST14_FLAGS[:6], '--data-dir', os.path.join(ROOT, '..', 'shared', 'data'), *R.MNIST14_FLAGS[6:]]

STEPS = (10, 20, 50, 100, 1000)
CURVE_STEPS = (20, 1000)
ES_GRID = (1.0, 1.005, 1.01, 1.02, 1.05, 1.1, 1.2, 1.3, 1.5)   # brackets the best B at every S on the toy sets
T0_FRACTIONS = (0.9, 0.5, 0.1)
STREAMS = ('legacy', 'independent')   # evaluation randomness: see evaluate_steps
N_REF = 2000   # toy: fresh true draws the samples are scored against (--n-ref)
SAMPLE_SEED, SELECT_SEED, FRESH_SEED, SELECT_FRESH_SEED, EVAL_SEED = 1, 3, 99991, 2, 0
REGIMES = {'T1000': ['--T', '1000'], 'T50': ['--T', '50']}
METHODS = {   # name -> train.py flags, in the order of the tables
    'vanilla': [], 'ip': ['--loss', 'ip'], 'sa': ['--loss', 'sa'],
    # every arm here compares the halves of the training batch (--reg-halves): how results/steps
    # was trained, before Algorithm 1's second batch became the default
    'reg': ['--reg', '--reg-halves'],   # the paper's lambda_reg = 0.2, lambda_nll = 0.8
    'reg_l0.5': ['--reg', '--reg-halves', '--lambda-reg', '0.5', '--lambda-nll', '0.5'],
    'reg_l0.8': ['--reg', '--reg-halves', '--lambda-reg', '0.8', '--lambda-nll', '0.2'],
    'reg_S20': ['--reg', '--reg-halves', '--reg-steps', '20'],   # the regulariser on the 20-step chain (T = 1000 only)
    'reg_released': ['--reg', '--reg-halves', '--reg-stat', 'mmd2', '--lambda-nll', '1', '--lambda-reg', '1',
                     '--reg-weight', 'uniform'],   # close to the authors' released code (README)
}
TOY_SETS = ('8gaussians', 'swissroll')
# the strength sweep (--sweep): weight of the regulariser relative to Algorithm 1's literal sum_t w_t = 1
# (sum1, lambda_reg 0.2), which mean1 multiplies by T; every arm draws Algorithm 1's second batch
SWEEP = {'lit': ['--reg', '--reg-norm', 'sum1'],   # = mean1 at lambda_reg 0.2 / T
         'm0.002': ['--reg', '--lambda-reg', '0.002'], 'm0.02': ['--reg', '--lambda-reg', '0.02'],
         'm0.2': ['--reg'],   # the paper's lambda_reg under mean1 (results/steps' reg, but a second batch)
         'released': ['--reg', '--reg-stat', 'mmd2', '--lambda-nll', '1', '--lambda-reg', '1', '--reg-weight', 'uniform']}
TOY_DTYPE = ['--dtype', 'fp32']   # how results/steps' toy models were trained, before --dtype auto


def mnist_flags(a):
    return MNIST_FLAGS + ['--lr', str(a.mnist_lr)]


def read_json(path):
    with open(path) as f:
        return json.load(f)


def result_path(name):
    """The file whose existence means job `name` is done (dtype_* / sweep_* / ...: results/dtype|sweep|.../)."""
    family = name.split('_')[0]
    return os.path.join(RES, family if family in ('dtype', 'sweep', 'resolution', 'fair', 'fairx', 'table1') else 'steps', name + '.json')


def job_list(a):
    """Ordered by priority: whatever --budget-min cuts off is the least needed. Names start with
    'steps_' (their results go to results/steps/)."""
    jobs = []

    def run(ds, regime, method, seed, steps, flags=(), deps=(), **extra):
        jobs.append(dict(name=f'steps_{ds}_{regime}_{method}_s{seed}', kind='steps', dataset=ds, regime=regime,
                         variant=f'{regime}_{method}', method=method, seed=seed, steps=steps, deps=list(deps),
                         flags=REGIMES[regime] + METHODS[method.replace('_eqtime', '')] + list(flags)
                         + (TOY_DTYPE if ds in TOY_SETS else []), **extra))

    for ds in TOY_SETS:
        jobs.append(dict(name=f'steps_timing_{ds}', kind='timing', dataset=ds, deps=[], timed={
            m: METHODS[m] + TOY_DTYPE for m in ('vanilla', 'ip', 'sa', 'reg', 'reg_S20', 'reg_released')}))
    main = [('8gaussians', 'T1000', m) for m in ('vanilla', 'reg', 'ip', 'sa', 'reg_S20')]
    main += [('8gaussians', 'T50', m) for m in ('vanilla', 'reg', 'ip', 'sa')]
    more = [('8gaussians', 'T50', m) for m in ('reg_l0.5', 'reg_l0.8', 'reg_released')]
    more += [('8gaussians', 'T1000', m) for m in ('reg_l0.5', 'reg_l0.8', 'reg_released')]
    second = [('swissroll', rg, m) for rg in ('T50', 'T1000') for m in ('vanilla', 'reg', 'ip', 'sa')]
    for group in (main, more):
        for seed in a.seeds:
            for ds, rg, m in group:
                run(ds, rg, m, seed, a.max_steps)
    for ds in TOY_SETS:   # equal wall-clock time: vanilla's steps times t_vanilla / t_method
        for seed in a.seeds:
            for m in ('reg', 'sa'):
                run(ds, 'T50', m + '_eqtime', seed, f'eqtime:{m}', deps=[f'steps_timing_{ds}'])
        if ds == '8gaussians':
            for seed in a.seeds:
                for ds2, rg, m in second:
                    run(ds2, rg, m, seed, a.max_steps)
    if getattr(a, 'dtype_check', False):   # --dtype auto's proof: vanilla toy models trained and evaluated
        for ds in TOY_SETS:                  # in bf16, paired by seed with the fp32 runs above
            for rg in REGIMES:
                for seed in a.seeds:
                    jobs.append(dict(name=f'dtype_{ds}_{rg}_vanilla_bf16_s{seed}', kind='steps', dataset=ds,
                                     regime=rg, variant=f'{rg}_vanilla', method='vanilla', seed=seed,
                                     steps=a.max_steps, deps=[], eval_dtype='bf16',
                                     flags=REGIMES[rg] + ['--dtype', 'bf16'], pair=f'steps_{ds}_{rg}_vanilla_s{seed}'))
        if a.mnist:   # MNIST's protocol runs train in bf16: fp32-trained twins, evaluated as they were
            for seed in a.seeds[:3]:
                jobs.append(dict(name=f'dtype_mnist_T50_vanilla_fp32_s{seed}', kind='steps', dataset='mnist',
                                 regime='T50', variant='T50_vanilla', method='vanilla', seed=seed,
                                 steps=a.mnist_max_steps, deps=[], reference_is_bf16=True,
                                 flags=REGIMES['T50'] + mnist_flags(a) + ['--dtype', 'fp32'],
                                 pair=f'steps_mnist_T50_vanilla_s{seed}'))
    if getattr(a, 'sweep', False):   # issue 28: the regulariser's strength over four decades, Algorithm 1's
        for rg in REGIMES:             # second batch, paired by seed with the vanilla runs above
            for seed in a.seeds:
                for arm, fl in SWEEP.items():
                    jobs.append(dict(name=f'sweep_8gaussians_{rg}_{arm}_s{seed}', kind='steps', dataset='8gaussians',
                                     regime=rg, variant=f'{rg}_{arm}', method=arm, seed=seed, steps=a.max_steps,
                                     deps=[], flags=REGIMES[rg] + fl + TOY_DTYPE,
                                     pair=f'steps_8gaussians_{rg}_vanilla_s{seed}'))
    if getattr(a, 'resolution', False):   # issue 27: results/steps' toy vanilla and reg models (the same flags
        for ds in TOY_SETS:                  # and seeds retrain them), scored with a metric of resolution
            for rg in REGIMES:
                for seed in a.seeds:
                    for m in ('vanilla', 'reg'):
                        jobs.append(dict(name=f'resolution_{ds}_{rg}_{m}_s{seed}', kind='resolution', deps=[],
                                         dataset=ds, regime=rg, method=m, seed=seed, steps=a.max_steps,
                                         flags=REGIMES[rg] + METHODS[m] + TOY_DTYPE))
    if a.mnist:   # T = 50 first: where the toy sets show the regulariser doing something
        fl = mnist_flags(a) + ['--dtype', 'bf16']   # bf16 trains as well as fp32 (results/paper1000/runs/mnist_dtype_*)
        for group in ((('T50', 'vanilla'), ('T50', 'reg')), (('T50', 'ip'), ('T50', 'sa'))):
            for seed in a.seeds[:3]:
                for rg, m in group:
                    run('mnist', rg, m, seed, a.mnist_max_steps, fl)
        # equal time at T = 50; the step's cost does not depend on T (one network call per chain step)
        jobs.append(dict(name='steps_timing_mnist', kind='timing', dataset='mnist', deps=[], timed={
            m: REGIMES['T50'] + METHODS[m] + ['--dtype', 'bf16'] for m in ('vanilla', 'ip', 'sa', 'reg')}))
        for seed in a.seeds[:3]:
            for m in ('reg', 'sa'):
                run('mnist', 'T50', m + '_eqtime', seed, f'eqtime:{m}', fl, deps=['steps_timing_mnist'],
                    base_steps=a.mnist_max_steps)
        for seed in a.seeds[:3]:   # T = 1000: the chain the paper trains on (expensive to evaluate at S = 1000)
            for m in ('vanilla', 'reg', 'ip', 'sa'):
                run('mnist', 'T1000', m, seed, a.mnist_max_steps, fl)
    for j in jobs:   # timing jobs: the steps of an equal-time run come from its data set's timing
        if j['kind'] == 'steps':
            j['timing'] = f"steps_timing_{j['dataset']}"
            j['ratio_key'] = j['method'].replace('_eqtime', '')
    return jobs


# ---- evaluation of one trained model over the step counts ---------------------------------------
class ToyMetric:
    """MMD (gaussian, unbiased, signed sqrt) against n_ref fresh draws of the known distribution."""
    def __init__(self, ds, seed_ref, n_ref=N_REF):
        self.ref = D.sample_toy(ds, n_ref, torch.Generator().manual_seed(seed_ref))

    def __call__(self, x):
        return dict(mmd=signed_sqrt(float(mmd2(x, self.ref, 'gaussian', 'u'))))


class ClassifierMetric:
    """Frechet distance and KID in the MNIST classifier's features against the training set."""
    def __init__(self, cfg, device='cpu'):
        from metrics import fid as F
        self.F = F
        self.net, self.info = F.mnist_classifier(cfg['data_dir'], cfg['image_size'], device)
        x = D.load_data('mnist', cfg['data_dir'], cfg['image_size'])
        self.ref = F.classifier_features(self.net, x, 1000, device)

    def __call__(self, x):
        s = self.F.classifier_scores(self.net, D.to_uint8(x), self.ref)
        return dict(mmd=None, fd=s['fd'], kid=s['kid'])


def chain_samples(model, diff, n, shape, sampler, S, b, seed, chunk=None, streams='legacy'):
    """n samples (n, *shape) of the S-step chain with eps / b. Chunks (image memory) get their own
    streams: legacy, one per chunk for x_T and then z (in turn, never the same tensor);
    independent, runtime.eval_rngs' 'x_T' and 'chain' streams of the chunk."""
    lam = None if b == 1.0 else eps_scale_schedule(diff.T, b, 0.0, S)
    out = []
    for i, m in enumerate(range(0, n, chunk or n)):
        size = (min(chunk or n, n - m), *shape)
        if streams == 'legacy':
            g = torch.Generator().manual_seed(R.seed_of(seed, 'steps-sample', i))
            out.append(diff.sample(model, size, sampler=sampler, steps=S, eps_scale=lam, generator=g))
        else:
            g = R.eval_rngs(R.seed_of(seed, 'steps-sample', i))
            out.append(diff.sample_chain(model, torch.randn(size, generator=g['x_T']), diff.T, 0, sampler, S,
                                         g['chain'], eps_scale=lam))
    return torch.cat(out)


def es_search(score, grid):
    """The scale of the grid (sorted) with the smallest score(b): a discrete golden-section search
    over the grid's indices (score taken unimodal in b), plus the grid's first point (b = 1, no
    scaling, the commonest pick). On the 1070 grids of results/steps it picks the full grid's
    argmin in 1067, the others within 0.011 (toy MMD) / 0.93 (MNIST FD), at 5.1 of 9 scores on
    average (experiments/bench.py --what es-search). Returns (best, {b: score} of the visited b)."""
    seen = {}

    def f(i):
        if grid[i] not in seen:
            seen[grid[i]] = score(grid[i])
        return seen[grid[i]]
    lo, hi = 0, len(grid) - 1
    while hi - lo > 2:
        d = round(0.382 * (hi - lo))
        m1, m2 = lo + d, max(hi - d, lo + d + 1)
        if f(m1) <= f(m2):
            hi = m2
        else:
            lo = m1
    for i in (0, *range(lo, hi + 1)):
        f(i)
    return min(seen, key=seen.get), seen


def faulttol_start(n, shape, streams='legacy'):
    """A(t)'s common x_T (n, *shape): EVAL_SEED's 'x_T' stream (runtime.eval_rngs)."""
    return torch.randn((n, *shape), generator=R.eval_rngs(EVAL_SEED, streams == 'legacy')['x_T'])


def faulttol_rngs(streams='legacy'):
    """A(t)'s chain and perturbation streams, fresh for every t0 (the same z at every t0)."""
    return R.eval_rngs(EVAL_SEED, streams == 'legacy')


@torch.no_grad()
def evaluate_steps(model, diff, cfg, n=1000, n_select=500, es_max_steps=100, chunk=None, curves=True,
                   n_ref=N_REF, fast=True, streams='legacy'):
    """The final metric at every S <= T for both samplers, plain and with epsilon scaling; D_MMD(t)
    and A(t) at CURVE_STEPS. Returns a dict for results/steps/NAME.json.
    fast (the default): the ES scale by es_search (5 of 9 grid scores), the ancestral chain of a
    curve at S > es_max_steps also gives that S's plain final metric, and A(t)'s three t0 fork from
    one unperturbed chain; fast=False: how results/steps was evaluated (the whole grid, separate
    chains for the final metric, one chain pair per t0).
    streams (STREAMS): 'legacy', the evaluation randomness results/steps was computed with (kept
    so that its runs, paired by seed, stay reproducible bit for bit and resumable; in A(t) the
    first step's z IS x_T); 'independent', every stream from runtime.eval_rngs(seed), apart."""
    if streams not in STREAMS:
        raise ValueError(f'streams must be one of {STREAMS}, got {streams!r}')
    legacy = streams == 'legacy'
    toy = D.is_toy(cfg['dataset'])
    shape = tuple(cfg['data_shape'])
    score = ToyMetric(cfg['dataset'], FRESH_SEED, n_ref) if toy else ClassifierMetric(cfg)
    select = ToyMetric(cfg['dataset'], SELECT_FRESH_SEED, n_ref) if toy else score
    key = 'mmd' if toy else 'fd'
    out = dict(metric=f'toy: MMD (gaussian, unbiased, signed sqrt) vs {n_ref} fresh true draws' if toy
               else 'MNIST: classifier-feature FD and KID vs the training set', n=n, n_select=n_select,
               es_grid=ES_GRID, eval='fast' if fast else 'grid', **({'n_ref': n_ref} if toy else {}),
               **({} if legacy else {'eval_streams': streams}))
    if not toy:
        out['classifier'] = score.info
    shared = {}   # S -> the final samples of that S's D_MMD(t) chain, where they serve as the plain ones
    with torch.inference_mode():
        if curves:
            x0 = D.random_examples(n, EVAL_SEED, cfg['dataset'], cfg['data_dir'], cfg['image_size'], cfg['toy_n'],
                                   cfg['seed'])
            out['curves'], out['faulttol'] = {}, {}
            for S in [s for s in CURVE_STEPS if s <= diff.T]:
                g = R.eval_rngs(EVAL_SEED, legacy)   # legacy: one generator for x_T, z and the forward samples
                out['curves'][S], x = errprop_curve(
                    model, diff, x0, n, ('gaussian', 'laplace'), 'u', None if S <= 100 else S // 10, g['chain'], chunk,
                    steps=S, x_T=None if legacy else torch.randn((n, *shape), generator=g['x_T']),
                    ref_generator=None if legacy else g['ref'], return_samples=True)
                if fast and S > es_max_steps:
                    shared[S] = x
                out['faulttol'][S] = {}
                if not toy and S > 100:   # images: 3 x 2 x 250 chains of 1000 steps would cost ~40 min on a CPU
                    continue
                ts = diff.times(diff.T, 0, S)
                x_T = faulttol_start(min(n, 250), shape, streams)
                t0s = [min(ts, key=lambda t: abs(t - f * diff.T)) for f in T0_FRACTIONS]
                fts = (fault_tolerance(model, diff, x_T, t0s, 0.1, steps=S, kernels=(), batch_size=chunk,
                                       generators=faulttol_rngs(streams)) if fast else
                       [fault_tolerance(model, diff, x_T, t0, 0.1, steps=S, kernels=(), batch_size=chunk,
                                        generators=faulttol_rngs(streams)) for t0 in t0s])
                out['faulttol'][S] = {f: dict(t=ft['t'], amp=ft['amp'], t0=ft['t0']) for f, ft in zip(T0_FRACTIONS, fts)}
        rows = []
        for sampler in ('ddpm', 'ddim'):
            for S in [s for s in STEPS if s <= diff.T]:
                x = shared.get(S) if sampler == 'ddpm' else None
                plain = score(x if x is not None else
                              chain_samples(model, diff, n, shape, sampler, S, 1.0, SAMPLE_SEED, chunk, streams))
                row = dict(sampler=sampler, steps=S, **plain)
                if S <= es_max_steps:   # pick the scale on other samples and other reference data
                    def sel(b):
                        return select(chain_samples(model, diff, n_select, shape, sampler, S, b, SELECT_SEED, chunk,
                                                    streams))[key]
                    grid = es_search(sel, ES_GRID)[1] if fast else {b: sel(b) for b in ES_GRID}
                    best = min(grid, key=grid.get)
                    es = plain if best == 1.0 else score(chain_samples(model, diff, n, shape, sampler, S, best,
                                                                       SAMPLE_SEED, chunk, streams))
                    row.update(es_scale=best, es_grid=[grid.get(b) for b in ES_GRID],
                               **{k + '_es': v for k, v in es.items()})
                rows.append(row)
                print(row, flush=True)
    out['rows'] = rows
    return out


@torch.no_grad()
def resolution_scores(model, diff, ds, seed, n=5000, steps=STEPS, eval_seeds=(0,), spacing='trailing', floor=True, **chain):
    """The toy metric with resolution: the unbiased MMD^2 itself (not its signed root) of n chain
    samples (ancestral, S steps) against n fresh true draws, gaussian and laplace kernels, and the
    perfect-model floor: the same statistic between two fresh sets of n true draws. Every stream
    is drawn from (seed, eval seed, purpose, S): independent per training seed and per purpose;
    eval seeds beyond the first repeat the evaluation of this one model (its own spread). spacing
    'adm': ADM's S-step grid (diffusion.adm_times); chain: more of sample_chain's settings (time_shift).
    The streams do not depend on either, so a grid or a sampler is compared on the same draws.
    floor False: no floor (it depends on (seed, e, S) alone: a second call would repeat it)."""
    out = {}
    for e in eval_seeds:
        for S in (S for S in steps if S <= diff.T):
            g = {p: R.rng(seed, 'resolution-' + p, e, S) for p in ('sample', 'ref', 'floor')}
            with torch.inference_mode():
                grid = adm_times(diff.T, S) if spacing == 'adm' else S
                x = diff.sample(model, (n, *D.sample_toy(ds, 1, torch.Generator()).shape[1:]), steps=grid, generator=g['sample'],
                                **chain)
            ref, a, b = (D.sample_toy(ds, n, g[p]) for p in ('ref', 'floor', 'floor'))
            kerns = ('gaussian', 'laplace')   # one distance matrix and median for both kernels
            m, f = mmd2_many(x, ref, kerns, 'u'), (mmd2_many(a, b, kerns, 'u') if floor else {})
            for kern in kerns:
                out.setdefault(f'e{e}', {}).setdefault(kern, {})[S] = dict(
                    model=float(m[kern]), **({'floor': float(f[kern])} if floor else {}))
    return out


def reg_floor(cfg, draws=200, device='cpu'):
    """What the regulariser's logged value (consistency_reg, before w_r) would be for a perfect
    chain: its statistic between two independent sets of forward samples x_r ~ q(x_r) of the
    same sizes (mmd.consistency_reg's kernel, stat and V-statistic), averaged over r ~ U as in
    training. A logged value at this level carries no
    signal the regulariser could act on."""
    data = D.to_model_space(D.load_data(cfg['dataset'], cfg['data_dir'], cfg['image_size'], cfg['toy_n'],
                                        cfg['seed'])).to(device)
    diff = R.make_diffusion(cfg, device)
    g = torch.Generator().manual_seed(12345)
    # the regulariser's two sets: the halves of the batch (--reg-halves), or the batch and the second batch
    na, nb = ((cfg['batch_size'] // 2,) * 2 if cfg.get('reg_halves', True)
              else (cfg['batch_size'], cfg.get('reg_batch') or cfg['batch_size']))
    vals = []
    for _ in range(draws):
        idx = torch.randperm(len(data), generator=g)[:na + nb]
        S = cfg.get('reg_steps')
        r = int(torch.randint(0, S or diff.T, (1,), generator=g))
        r_t = r if S is None else diff.times(diff.T, 0, S)[::-1][r]
        a, b = data[idx[:na]], data[idx[na:]]
        xa = diff.q_sample(a, r_t, torch.randn(a.shape, generator=g)) if r_t > 0 else a
        xb = diff.q_sample(b, r_t, torch.randn(b.shape, generator=g)) if r_t > 0 else b
        stat = mmd if cfg['reg_stat'] == 'mmd' else mmd2   # as consistency_reg (estimator 'v')
        vals.append(float(stat(xa, xb, cfg['reg_kernel'], 'v')))
    return dict(mean=float(np.mean(vals)), std=float(np.std(vals)), draws=draws)


def flat_metrics(res):
    """{(group, where): value} of every metric evaluate_steps reports: the final metric rows (plain
    and +ES, and the chosen scale), D_MMD(t) per kernel, and A(t)."""
    out = {}
    for r in res['rows']:
        for k in ('mmd', 'fd', 'kid', 'mmd_es', 'fd_es', 'kid_es', 'es_scale'):
            if r.get(k) is not None:
                out[(k, r['sampler'], r['steps'])] = r[k]
    for S, c in res.get('curves', {}).items():
        for kern in ('gaussian', 'laplace'):
            out.update({(f'D_MMD_{kern}', int(S), i): v for i, v in enumerate(c[kern])})
    for S, ft in res.get('faulttol', {}).items():
        for f, v in ft.items():
            out.update({('A', int(S), float(f), i): x for i, x in enumerate(v['amp'])})
    return out


def dtype_summary(family='dtype'):
    """results/{family}_toy.json (and _mnist.json): per data set and regime (sweep: and arm), the
    bf16 runs (--dtype-check) or the strength sweep's arms (--sweep) against the vanilla fp32 runs
    of the same seed (MNIST's protocol runs are the bf16 ones, their fp32 twins the new runs), as
    difference bf16 - fp32 (sweep: arm - vanilla; and m0.2 - results/steps' reg, the second batch against the
    batch halves, key *_m0.2_vs_halves): per reported metric the largest |mean paired difference| over its
    cells, the fp32 seed std there, how many cells' 95 % paired t interval excludes 0, and how many
    stay at Holm-adjusted p < 0.05 over that metric's cells (metrics/stats.py)."""
    from metrics import stats as ST
    out = {}
    for f in sorted(os.listdir(os.path.join(RES, family))):
        r = read_json(os.path.join(RES, family, f))
        j, pairs = r['job'], [('', r['job']['pair'])]
        if family == 'sweep' and j['method'] == 'm0.2':   # Algorithm 1's second batch against results/steps' halves
            pairs.append(('_vs_halves', f"steps_{j['dataset']}_{j['regime']}_reg_s{j['seed']}"))
        for suffix, name in pairs:
            if os.path.isfile(result_path(name)):
                key = f"{j['dataset']}_{j['regime']}" + ('' if family == 'dtype' else f"_{j['method']}") + suffix
                new, ref = flat_metrics(r), flat_metrics(read_json(result_path(name)))
                out.setdefault(key, []).append((ref, new) if j.get('reference_is_bf16') else (new, ref))
    summary = {}
    for key, pairs in out.items():
        groups, tests = {}, {}
        for cell in pairs[0][1]:
            d = [b[cell] - a[cell] for b, a in pairs if cell in b]
            if len(d) < 2:
                continue
            t, std32 = ST.paired(d), float(np.std([a[cell] for _, a in pairs], ddof=1))
            g = groups.setdefault(cell[0], dict(cells=0, ci_excludes_0=0, holm_below_0_05=0, max_abs_mean_diff=0.0))
            g['cells'] += 1
            g['ci_excludes_0'] += int(t['ci'][0] > 0 or t['ci'][1] < 0)
            tests.setdefault(cell[0], []).append(t['p'])
            if abs(t['mean']) >= g['max_abs_mean_diff']:
                g.update(max_abs_mean_diff=float(abs(t['mean'])), mean_diff=float(t['mean']), at=str(cell[1:]),
                         fp32_seed_std_there=std32)
        for name, ps in tests.items():
            groups[name]['holm_below_0_05'] = sum(q < 0.05 for q in ST.holm(ps))
        summary[key] = dict(seeds=len(pairs), metrics=groups)
    for kind, keys in (('toy', [k for k in summary if not k.startswith('mnist')]),
                       ('mnist', [k for k in summary if k.startswith('mnist')])):
        if keys:
            R.write_json(os.path.join(RES, f'{family}_{kind}.json'), {k: summary[k] for k in keys})
    return summary
