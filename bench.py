"""
Benchmarks on this machine (CPU or GPU). Ratios are taken within one run, times are medians over repeats, and
each section measures the machine's own matmul peak where it reports a fraction of it.

    python bench.py train [--before=DIR]   # one 40M training step (fwd + loss + bwd + AdamW), fp32 and bf16
    python bench.py train --preset=150M --batch=64 --device=cuda   # on a GPU: time, memory, the paper run's cost
    python bench.py ddp [--repeats=3]      # 40M training: 1 process vs 2-rank gloo DDP (scaling), peak RSS
    python bench.py dtype                  # 40M training in fresh processes: fp32 vs bf16 autocast
    python bench.py sampler                # segment sampler throughput and peak RSS on a ~2 GB dataset
    python bench.py scaled_ql [--pairs=tiny:tiny,40M:resnet18 --batch=16 --repeats=5]  # training samples/s beside JOWA's
    python bench.py plan [--compile --freeze --threads=1 --envs=1,16 --beams=0,2,4 --jacobi=auto|on|off --max_passes=8]
    python bench.py plan --ckpt=out/ckpt.pt --data=processed --games=Assault   # trained weights, real contexts
                                           # (--consecutive=False: no first guess from the previous step's plan)
    python bench.py plan --before=../before    # side by side with another checkout (git worktree add ../before HEAD~1)
    python bench.py mcts [--envs=1,16 --repeats=3 --mcts_simulations=20]   # greedy, beam H2 K2 and MCTS decisions/s
"""
import json
import os
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import data
from model import (JOWA, PRESETS, PRETRAIN_GAMES, average_over_ranks, configure_optimizer, device_setup, load_checkpoint,
                   make_config, num_params, parse_args, task_id)
from mcts import MCTS
from plan import Planner, make_context
from tokenizer import Tokenizer


def timeit(fn, repeats=5, warmup=1, stat=statistics.median):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return stat(times)


def other_checkout(path):
    """model.py and plan.py of another checkout of this repository (e.g. `git worktree add ../before HEAD~1`),
    imported as modules of their own: (its model module, its plan module). --before=<path> (train, plan) times
    them side by side with this checkout's, alternating, on the same weights and inputs."""
    if not os.path.isfile(os.path.join(path, 'plan.py')):
        raise SystemExit(f"error: --before={path}: no plan.py there (expected a checkout of this repository)")
    names = ('tokenizer', 'model', 'plan')
    ours = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    sys.path.insert(0, os.path.abspath(path))
    try:
        import plan as other_plan  # binds that checkout's model.py and tokenizer.py
        other_model = sys.modules['model']
    finally:
        sys.path.pop(0)
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(ours)
    return other_model, other_plan


def same_model(other, model):
    """The other checkout's JOWA with model's config, weights and mode."""
    known = {f.name for f in fields(other.JOWAConfig)}
    twin = other.JOWA(other.JOWAConfig(**{k: v for k, v in asdict(model.cfg).items() if k in known}))
    twin.load_state_dict(model.state_dict())
    return twin.train(model.training)


def matmul_peak(dtype, n=2048, repeats=10, device='cpu'):
    """The machine's own matmul throughput (FLOP/s) for a large square matmul in dtype: the fastest of the repeats
    (a peak; on a shared machine a median can read half of it when a neighbour is busy)."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == 'cuda' else (lambda: None)
    return 2 * n ** 3 / timeit(lambda: (a @ b, sync()), repeats, warmup=3, stat=min)


def forward_flops(cfg, B, T):
    """Matmul FLOPs of one forward of compute_loss on (B, T) token segments, counted from the shapes:
    the transformer (attention over the full T*37 x T*37 score matrix), the obs head on T*36-1 positions,
    reward/end heads on T positions, the online and target Q heads on T positions."""
    E, L, N = cfg.n_embd, cfg.n_layer, T * cfg.tokens_per_block
    per_row = L * (2 * N * 12 * E * E + 2 * 2 * N * N * E)
    per_row += (T * cfg.obs_tokens - 1) * (2 * E * E + 2 * E * cfg.obs_vocab) + T * (2 * E * E + 2 * E * 5) * 2
    D, M, O = cfg.q_hidden, cfg.num_q, cfg.num_actions * cfg.num_atoms
    q = T * M * 2 * (E * D + D * D + D * O)
    return B * per_row, B * q  # (trained parts, one Q head)


def token_batch(cfg, B, T, seed=0):
    """A random stage-2 batch of (B, T) token segments (B§4.1)."""
    g = torch.Generator().manual_seed(seed)
    return dict(observations=torch.randint(0, cfg.obs_vocab, (B, T, cfg.obs_tokens), generator=g),
                actions=torch.randint(0, 18, (B, T), generator=g), rewards=torch.randint(-1, 2, (B, T), generator=g).float(),
                ends=torch.zeros(B, T, dtype=torch.long), mask_padding=torch.ones(B, T, dtype=torch.bool),
                envs=torch.randint(0, 60, (B,), generator=g))


def bench_train(argv):
    """One training step (forward + loss + backward + clip + AdamW) on random stage-2 token batches of `batch`
    segments of max_blocks blocks, fp32 and bf16 autocast, on --device (auto: CUDA if there is one): time, peak memory
    and what the paper's run (1.75M steps of 512 segments) would take at that speed. With --before (another
    checkout), its step on the same weights and batch, the two alternating."""
    extra = dict(batch=16, repeats=5, before='', dtypes='float32,bfloat16')
    cfg, args = parse_args(['--preset=40M'] + argv, extra, rules=dict(batch='>0', repeats='>0'))
    bad = [d for d in args['dtypes'].split(',') if d not in ('float32', 'bfloat16')]
    if bad:
        raise SystemExit(f"error: --dtypes={args['dtypes']}: {bad[0]!r} is not float32 or bfloat16")
    device = device_setup(cfg)[0]
    cuda = torch.device(device).type == 'cuda'
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    models = {'now': JOWA(cfg).to(device).train()}
    if args['before']:
        models['before'] = same_model(other_checkout(args['before'])[0], models['now']).to(device)
    opts = {k: configure_optimizer(m, cfg.lr_world2, cfg.lr_critic, cfg.weight_decay) for k, m in models.items()}
    B, T = args['batch'], cfg.max_blocks
    batch = {k: v.to(device) for k, v in token_batch(cfg, B, T).items()}
    world, q = forward_flops(cfg, B, T)
    flops = 3 * (world + q) + q  # forward + backward (2x) of everything trained, plus the target head forward
    tokens = B * T * cfg.tokens_per_block
    name = torch.cuda.get_device_name(device) if cuda else f'CPU, {torch.get_num_threads()} threads'
    print(f"train step, {cfg.preset} preset ({num_params(models['now']) / 1e6:.1f}M parameters) on {device} ({name}), "
          f"batch {B} x {T} blocks = {tokens} tokens, {flops / 1e9:.1f} GFLOP counted, medians of {args['repeats']}"
          + (f"; before: {args['before']}, alternating" if args['before'] else ''))
    for dname in args['dtypes'].split(','):
        dtype = getattr(torch, dname)

        def step(k):
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
                loss, _ = models[k].compute_loss(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(models[k].parameters(), cfg.grad_clip)
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
            sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        times = {k: [] for k in models}
        for r in range(args['repeats'] + 1):  # the first round warms up
            for k in (list(models) if r % 2 else list(models)[::-1]):  # alternating which goes first
                t0 = time.perf_counter()
                step(k)
                if r:
                    times[k].append(time.perf_counter() - t0)
        t = statistics.median(times['now'])
        peak = matmul_peak(dtype, device=device)
        mem = (f"peak memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB" if cuda else
               f"peak RSS of the process {peak_rss_mb() / 1024:.2f} GiB")
        days = 1.75e6 * 512 / B * t / 86400
        print(f"  {dname}: {t * 1000:7.0f} ms/step  {tokens / t:9.0f} tokens/s  {flops / t / 1e9:8.1f} GFLOP/s  "
              f"= {100 * flops / t / peak:4.1f}% of the {peak / 1e9:.0f} GFLOP/s {dname} matmul peak; {mem}"
              + (" (both models)" if args['before'] else ''))
        print(f"    the paper's run (1.75M steps of 512 segments: {flops * 512 / B * 1.75e6 / 1e18:,.2f} EFLOP counted; the "
              f"tokenizer's steps of stage 1 not counted) at this speed: {days:,.1f} days on this device, "
              f"{days / 8:,.1f} on 8 like it if DDP scaled perfectly")
        if args['before']:
            tb = statistics.median(times['before'])
            print(f"  {dname} before: {tb * 1000:7.0f} ms/step  {tokens / tb:9.0f} tokens/s  -> now {tb / t:.2f}x")


# -----------------------------------------------------------------------------
# training: DDP scaling and dtype in fresh processes

DDP_B, DDP_T = 16, 8  # segments x blocks per process


def worker(rank, world, threads, dtype, repeats, port, out):
    torch.set_num_threads(threads)
    if world > 1:
        os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
        dist.init_process_group('gloo', rank=rank, world_size=world)
    torch.manual_seed(0)
    cfg = make_config('40M')
    model = JOWA(cfg).train()
    opt = configure_optimizer(model, cfg.lr_world2, cfg.lr_critic, cfg.weight_decay)
    params = list(model.parameters())
    batch = token_batch(cfg, DDP_B, DDP_T, seed=rank)
    ctx = torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == 'bf16')

    def step():
        with ctx:
            loss, _ = model.compute_loss(batch, stage=2)
        loss.backward()
        if world > 1:  # as train.py
            average_over_ranks([p.grad for p in params if p.grad is not None], torch.zeros(0), world)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for i in range(repeats + 1):  # the first step warms up (allocations, AdamW state)
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    with open(os.path.join(out, f'{rank}.json'), 'w') as f:
        json.dump(dict(t=statistics.median(times[1:]), rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20), f)
    if world > 1:
        dist.destroy_process_group()


def run(world, threads, dtype='fp32', repeats=3):
    """Fresh processes; returns (median step seconds of the slowest rank, peak RSS GiB per rank)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(worker, (world, threads, dtype, repeats, port, out), nprocs=world)
        res = [json.load(open(os.path.join(out, f'{r}.json'))) for r in range(world)]
    return max(r['t'] for r in res), [r['rss'] for r in res]


def report(name, world, t, rss):
    tokens = world * DDP_B * DDP_T * 37
    print(f"  {name:<34} {t * 1000:7.0f} ms/step  {tokens / t:7.0f} tokens/s  peak RSS "
          + ' + '.join(f'{r:.2f}' for r in rss) + ' GiB', flush=True)
    return tokens / t


def bench_ddp(which='ddp', repeats=3):
    """40M stage-2 step in fresh processes: one process vs 2-rank gloo DDP (one core each), fp32 vs bf16."""
    cores = os.cpu_count()
    print(f"40M stage-2 training step on CPU ({cores} cores), {DDP_B} x {DDP_T} blocks = {DDP_B * DDP_T * 37} tokens per process, "
          f"median of {repeats}")
    if which == 'ddp':
        one = report(f'1 process, {cores} threads', 1, *run(1, cores, repeats=repeats))
        one1 = report('1 process, 1 thread', 1, *run(1, 1, repeats=repeats))
        two = report('2-rank gloo DDP, 1 thread each', 2, *run(2, 1, repeats=repeats))
        print(f"  DDP / 1 process on the same {cores} cores: {two / one:.2f}x throughput;  "
              f"scaling efficiency DDP / (2 x 1-thread process): {two / (2 * one1):.0%}")
    if which == 'dtype':
        f32 = report(f'fp32, 1 process, {cores} threads', 1, *run(1, cores, 'fp32', repeats))
        bf16 = report(f'bf16 autocast, 1 process, {cores} threads', 1, *run(1, cores, 'bf16', repeats))
        print(f"  bf16 / fp32 throughput: {bf16 / f32:.2f}x")


# -----------------------------------------------------------------------------
# data: segment sampler

def tile(src, dst, reps):
    """Write `reps` back-to-back copies of processed game folder src as a valid processed folder dst. Frames are
    written with plain file writes (not a memory map) so building the dataset does not inflate this process's RSS."""
    os.makedirs(dst)
    with open(f'{src}/meta.json') as f:
        meta = json.load(f)
    N = meta['steps']
    shift = np.arange(reps) * N  # (reps,) offset of each copy
    for name in ('frames', 'tokens'):
        x = np.load(f'{src}/{name}.npy', mmap_mode='r')
        with open(f'{dst}/{name}.npy', 'wb') as f:
            np.lib.format.write_array_header_1_0(f, dict(descr=np.lib.format.dtype_to_descr(x.dtype), fortran_order=False,
                                                          shape=(N * reps, *x.shape[1:])))
            block = np.ascontiguousarray(x).tobytes()
            for _ in range(reps):
                f.write(block)
    for name in ('actions', 'rewards', 'terminals', 'sources'):
        np.save(f'{dst}/{name}.npy', np.concatenate([np.load(f'{src}/{name}.npy')] * reps))
    episodes, segments = np.load(f'{src}/episodes.npy'), np.load(f'{src}/segments.npy')
    np.save(f'{dst}/episodes.npy', np.concatenate([(episodes[:-1] + s) for s in shift] + [[N * reps]]))
    np.save(f'{dst}/segments.npy', np.concatenate([segments + s for s in shift]))
    with open(f'{src}/tokens.json') as f:
        marker = json.load(f)
    with open(f'{dst}/tokens.json', 'w') as f:
        json.dump(dict(marker, shape=[N * reps, marker['shape'][1]]), f)
    with open(f'{dst}/meta.json', 'w') as f:
        json.dump(dict(meta, steps=N * reps, episodes=meta['episodes'] * reps, segments=meta['segments'] * reps), f)


def peak_rss_mb():
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmHWM')) / 1024


def bench_sampler(gb=2.0, games=('SpaceInvaders', 'Berzerk'), steps=1500, batch_sizes=(16, 64), batches=20, repeats=5):
    """Returns {(tokens, batch_size): median segments/s} and prints them with the peak RSS while sampling."""
    tmp = tempfile.mkdtemp(prefix='bench_data_')
    try:
        for i, game in enumerate(games):
            data.collect(game, f'{tmp}/replay', steps=steps, run=1, ckpt_size=steps, seed=i)
            data.process_game(f'{tmp}/replay', f'{tmp}/small', game, [1], [0], fraction=1.0)
        # a cheap stand-in tokenizer (6x6 average pooling): the sampler reads a token memmap the same either way
        pool = torch.nn.Conv2d(1, 1, 14, stride=14, bias=False)
        pool.weight.data.fill_(2047 / 196)
        pool.encode = lambda x: pool(x.flatten(0, -4)).round().long().flatten(1).view(*x.shape[:-3], 36)
        data.build_token_cache(f'{tmp}/small', games, pool)
        frames_per_game = gb * 1e9 / (84 * 84) / len(games)
        for game in games:
            with open(f'{tmp}/small/{game}/meta.json') as f:
                reps = int(np.ceil(frames_per_game / json.load(f)['steps']))
            tile(f'{tmp}/small/{game}', f'{tmp}/big/{game}', reps)
        ds = data.load_dataset(f'{tmp}/big', games, tokens=True)
        size = sum(os.path.getsize(f"{d['dir']}/frames.npy") for d in ds) / 1e9
        print(f"dataset: {size:.2f} GB of frames, {sum(d['steps'] for d in ds):,} steps, "
              f"{sum(d['segments'] for d in ds):,} segments in {len(games)} games")
        rss_before, results = peak_rss_mb(), {}
        for tokens in (False, True):
            for B in batch_sizes:
                sampler = data.Sampler(ds, seed=0)
                sampler.sample(B, tokens)  # warm-up
                rates = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    for _ in range(batches):
                        sampler.sample(B, tokens)
                    rates.append(B * batches / (time.perf_counter() - t0))
                results[tokens, B] = float(np.median(rates))
                print(f"{'tokens' if tokens else 'frames'} B={B:>3}: {results[tokens, B]:8.0f} segments/s "
                      f"(median of {repeats} x {batches} batches)")
        print(f"peak RSS {peak_rss_mb():.0f} MB (before sampling {rss_before:.0f} MB) for {size:.2f} GB of frames; "
              f"goal >= 80 segments/s")
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -----------------------------------------------------------------------------
# Scaled-QL (scaled_ql.py) beside JOWA: training throughput at similar sizes

SQL_PAIRS = 'tiny:tiny,40M:resnet18,70M:resnet50,150M:resnet101'  # JOWA preset : Scaled-QL preset of similar size


def bench_scaled_ql(argv):
    """One training step (forward, loss, backward, clip, optimizer step) of JOWA's stage 2 on B token segments of
    T = 8 blocks (tokenizer frozen, frames encoded once into the token cache) and of Scaled-QL on B * T frame-stack
    transitions (the same environment steps per update; the target network's forward included), fp32, for each pair
    of presets of similar size. samples/s: segments/s for JOWA (each holds 8 steps), transitions/s for Scaled-QL.
    Medians over repeats, the pairs measured in one run on the same machine."""
    import scaled_ql
    cfg, args = parse_args(argv, dict(pairs=SQL_PAIRS, batch=16, repeats=5, threads=0),
                           dict(batch='>0', repeats='>0', threads='>=0'))
    if args['threads']:
        torch.set_num_threads(args['threads'])
    pairs = [p.split(':') for p in args['pairs'].split(',')]
    for pair in pairs:
        if len(pair) != 2 or pair[0] not in PRESETS or pair[1] not in scaled_ql.PRESETS:
            raise SystemExit(f"error: --pairs: {':'.join(pair)} is not <JOWA preset>:<Scaled-QL preset> "
                             f"({', '.join(PRESETS)} : {', '.join(scaled_ql.PRESETS)})")
    B, T, R = args['batch'], 8, args['repeats']
    print(f"training step, fp32, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}: JOWA "
          f"{B} segments x {T} blocks, Scaled-QL {B * T} transitions (15 games' heads), median of {R} repeats")
    games = list(PRETRAIN_GAMES)

    def measure(jowa_preset, sql_preset):  # one pair; its models are freed on return
        torch.manual_seed(0)
        jcfg = make_config(jowa_preset)
        jowa = JOWA(jcfg).train()
        jopt = configure_optimizer(jowa, jcfg.lr_world2, jcfg.lr_critic, jcfg.weight_decay)
        jbatch = token_batch(jcfg, B, T)

        def jowa_step():
            loss, _ = jowa.compute_loss(jbatch, stage=2)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(jowa.parameters(), jcfg.grad_clip)
            jopt.step()
            jopt.zero_grad(set_to_none=True)
        t_jowa = timeit(jowa_step, R)
        scfg, sargs, _ = scaled_ql.parse([f'--preset={sql_preset}'])
        sql = scaled_ql.ScaledQL(sargs, games, scfg).train()
        target = scaled_ql.ScaledQL(sargs, games, scfg).eval().requires_grad_(False)
        sopt = torch.optim.Adam(sql.parameters(), lr=sargs['lr'])
        g, n = torch.Generator().manual_seed(0), B * T
        head = torch.randint(0, len(games), (n,), generator=g)
        valid = sql.valid[head].float()  # (n, 18): a valid data action per row
        sbatch = dict(obs=torch.randint(0, 256, (n, 4, 84, 84), dtype=torch.uint8, generator=g),
                      next_obs=torch.randint(0, 256, (n, 4, 84, 84), dtype=torch.uint8, generator=g), head=head,
                      action=torch.multinomial(valid, 1, generator=g)[:, 0], ret=torch.zeros(n),
                      disc=torch.full((n,), scfg.gamma ** 3))

        def sql_step():
            loss, _ = scaled_ql.compute_loss(sql, target, sbatch, scfg)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(sql.parameters(), scfg.grad_clip)
            sopt.step()
            sopt.zero_grad(set_to_none=True)
        t_sql = timeit(sql_step, R)
        print(f"  JOWA {jowa_preset:>5} ({num_params(jowa) / 1e6:6.2f}M): {t_jowa * 1e3:7.0f} ms/step "
              f"{B / t_jowa:8.1f} segments/s = {B * T / t_jowa:8.1f} steps/s  |  Scaled-QL {sql_preset:>9} "
              f"({num_params(sql) / 1e6:6.2f}M): {t_sql * 1e3:7.0f} ms/step {n / t_sql:8.1f} transitions/s  |  "
              f"Scaled-QL / JOWA steps/s {n / t_sql / (B * T / t_jowa):.2f}x", flush=True)

    for jowa_preset, sql_preset in pairs:
        measure(jowa_preset, sql_preset)


# -----------------------------------------------------------------------------
# planner

OFFICIAL = {0: 12.1, 2: 1.09, 4: 0.75}  # official code, 1 env, fp32, on a 2-core machine like this one (decisions/s)


def read_bandwidth(n=64 * 2 ** 20, reps=5):
    x = torch.ones(n)  # 256 MB: far beyond the caches
    x.sum()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        ts.append(time.perf_counter() - t)
    return 4 * n / statistics.median(ts)


def planner_flops(cfg, N, ctx_len, K, H, n_valid=18):
    """Useful FLOPs of one planner call (matmuls only, causal attention over real keys, every executed candidate)."""
    L, E, V, D, Q = cfg.n_layer, cfg.n_embd, cfg.obs_vocab, cfg.q_hidden, cfg.num_q
    per_token = 24 * L * E * E  # qkv 3E^2, proj E^2, mlp 8E^2; x2 for multiply-add
    attn = lambda keys: 4 * L * E * keys  # q.k and att.v over `keys` keys
    q_head = 2 * Q * (E * D + D * D + D * cfg.num_actions * cfg.num_atoms)
    obs_head, small_heads = 2 * (E * E + E * V), 2 * (2 * E * E + 5 * E)
    # prefill + root Q; the last layer computes keys/values everywhere but its queries, projection and MLP only at
    # the positions read (the last one, or the last 37 for the first guess too)
    n_out = 1 if H == 0 else cfg.tokens_per_block
    f = N * (ctx_len * per_token * (L - 1) / L + sum(attn(t + 1) * (L - 1) / L for t in range(ctx_len)) + q_head)
    f += N * (ctx_len * 6 * E * E + sum(18 * E * E + attn(t + 1) / L for t in range(ctx_len - n_out, ctx_len)))
    rows, g = N, 0
    if H == 0:
        return f
    for d in range(1, H + 1):
        rows = rows * K if d == 1 else N * K * K  # candidates at this depth
        for j in range(37):
            head = obs_head + small_heads if j == 0 else (q_head if j == 36 else obs_head)
            f += rows * (per_token + attn(ctx_len + g + 1) + head)
            g += 1
    return f


def real_contexts(data_dir, games, tokenizer, n, n_ctx, steps=1, seed=0):
    """n contexts of n_ctx blocks at each of `steps` consecutive steps of an episode, (n, steps, n_ctx*37 - 1), and
    their tasks (n,), from processed games whose token cache this tokenizer made, games taking turns; segments
    without an episode end inside."""
    key, rng, ctx, tasks = data.tokenizer_key(tokenizer), np.random.default_rng(seed), [], []
    ds = data.load_dataset(data_dir, games, tokens=True)
    for d in ds:
        with open(os.path.join(d['dir'], 'tokens.json')) as f:
            if json.load(f).get('tokenizer') != key:
                raise ValueError(f"the token cache in {d['dir']} was made by another tokenizer than the checkpoint's "
                                 f"(run data.py tokens --data={data_dir} --ckpt=...)")
    while len(ctx) < n:
        d = ds[len(ctx) % len(ds)]
        seg = data.read_segments(d['dir'], rng.integers(0, d['segments'], 1), T=n_ctx + steps - 1, tokens=True)
        if seg['mask_padding'].all() and not seg['ends'].any():
            obs, act = (torch.from_numpy(seg[k].astype(np.int64)) for k in ('observations', 'actions'))
            ctx.append(torch.cat([make_context(obs[:, t:t + n_ctx], act[:, t:t + n_ctx]) for t in range(steps)]))
            tasks.append(d['task'])
    return torch.stack(ctx), torch.tensor(tasks)


def bench_plan(argv):
    """Planner decisions/s (40M, 6-block context, frame encode included): greedy and beam H=2, K=2/4, 1 and 16 envs.
    Random weights and random contexts by default; --ckpt (and --data, processed games with that checkpoint's token
    cache) plan with trained weights on real frames, which is what decides how many passes Jacobi decoding takes.
    With --data, each timed plan is the second of two consecutive steps of an episode and gets the frame that an
    untimed plan of the first step imagined as its first guess, as in evaluate.py (--consecutive=False: no guess;
    the episode's next frame follows the recorded action, not the plan's, so the guess is a little worse than
    there)."""
    extra = dict(threads=0, repeats=5, envs='1,16', dtypes='float32,bfloat16', beams='0,2,4', freeze=False, ckpt='',
                 data='', games='Carnival,Assault,SpaceInvaders', jacobi='auto', max_passes=8, consecutive=True,
                 before='')
    cfg, args = parse_args(['--preset=40M'] + argv, extra)
    if args['threads']:
        torch.set_num_threads(args['threads'])
    if args['jacobi'] not in ('auto', 'on', 'off'):
        raise SystemExit(f"error: --jacobi={args['jacobi']}: choose auto, on or off")
    if args['data'] and not args['ckpt']:
        raise SystemExit("error: --data needs --ckpt (the tokenizer that made its token cache)")
    torch.manual_seed(0)
    # the encode is timed with a tokenizer of the preset's size (a checkpoint's may be smaller), as evaluate.py runs it
    tokenizer = Tokenizer(cfg).eval().to(memory_format=torch.channels_last)
    model, tok_size = JOWA(cfg).eval(), f'{cfg.tok_ch}/{cfg.tok_embed_dim}'
    if args['ckpt']:
        try:
            cfg, model, ckpt_tokenizer = load_checkpoint(args['ckpt'], compile=cfg.compile)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"error: {e}")
    planner = Planner(model, compile=cfg.compile, freeze=args['freeze'], jacobi=dict(auto=None, on=True, off=False)[args['jacobi']],
                      max_passes=args['max_passes'])
    other = None  # --before: that checkout's planner on the same weights, timed beside ours on the same inputs
    if args['before']:
        other_model, other_plan = other_checkout(args['before'])
        other = other_plan.Planner(same_model(other_model, model), compile=cfg.compile,
                                   freeze=args['freeze'], jacobi=dict(auto=None, on=True, off=False)[args['jacobi']])
        other.max_passes = args['max_passes']
    n_ctx = 6  # blocks: the longest root context with H = 2
    L = n_ctx * 37 - 1
    consecutive = bool(args['data']) and args['consecutive']
    if args['data']:  # two consecutive steps of maxN * R episode segments
        n = max(int(n) for n in args['envs'].split(',')) * (args['repeats'] + 1)
        try:
            real = real_contexts(args['data'], args['games'].split(','), ckpt_tokenizer, n, n_ctx, steps=2)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"error: {e}")
    source = 'random tokens' if not args['data'] else f"real frames of {args['games']}, " + (
        'first guess from a plan of the previous step' if consecutive else 'no first guess given')
    # weights every single-token pass reads: the blocks and the obs head (embedding rows are looked up, not streamed)
    weights = sum(p.numel() for n, p in model.named_parameters() if n.startswith(('blocks.', 'ln_f.', 'head_obs.')))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} "
          f"(timings are only meaningful on an otherwise idle machine), compile={cfg.compile} freeze={args['freeze']}")
    print(f"{cfg.preset} preset ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, obs vocabulary "
          f"{cfg.obs_vocab}, {args['ckpt'] or 'random weights'}), encode timed with a {tok_size} "
          f"tokenizer, context {n_ctx} blocks "
          f"({source}); medians of {args['repeats']} "
          f"repeats; passes: forward passes per imagined block (token by token: 37)")
    peaks = {}
    for name in args['dtypes'].split(','):
        dtype = getattr(torch, name)
        peaks[name] = matmul_peak(dtype)
        print(f"matmul peak {name}: {peaks[name] / 1e9:.0f} GFLOP/s")
    print(f"{'dtype':>9} {'envs':>4} {'policy':>12} {'decisions/s':>12} {'vs official':>11} {'plan ms':>8} "
          f"{'encode ms':>9} {'GFLOP/s':>8} {'of peak':>7} {'passes':>10}" +
          (f" {'before d/s':>10} {'now/before':>10}" if other else ''))
    rows = []  # (dtype, envs, policy, counted FLOP/s)
    with torch.no_grad():
        for name in args['dtypes'].split(','):
            amp = nullcontext() if name == 'float32' else torch.autocast('cpu', dtype=getattr(torch, name))
            for N in [int(n) for n in args['envs'].split(',')]:
                # a new set of contexts for every repeat (how fast Jacobi decoding agrees depends on the context),
                # the same sets whichever sections run
                gen, R = torch.Generator().manual_seed(N), args['repeats'] + 1
                ctxs = torch.randint(0, cfg.obs_vocab, (R, N, L), generator=gen)
                ctxs[..., 36::37] = torch.randint(0, 7, (R, N, n_ctx - 1), generator=gen)  # action tokens of Assault
                lens, tasks_r = torch.full((N,), L), torch.full((R, N), task_id('Assault'))
                if args['data']:  # real contexts: the second step timed, the first for its guess
                    prev, ctxs = ([real[0][r * N:(r + 1) * N, t] for r in range(R)] for t in (0, 1))
                    tasks_r = [real[1][r * N:(r + 1) * N] for r in range(R)]
                frames = torch.rand(N, 1, 84, 84, generator=gen)
                for K in [int(k) for k in args['beams'].split(',')]:
                    H = 0 if K == 0 else 2
                    t_enc, t_plan, t_other = [], [], []
                    with amp:
                        # the first call warms up (and compiles); with jacobi=auto, more untimed calls on the same
                        # context let each planner time both ways at every depth first (8 world steps: plan.Planner.
                        # step), so the timed calls show the choice it then keeps, as in a long evaluation
                        warm = (3 if consecutive else 7) if args['jacobi'] == 'auto' and H else 0
                        for r in [0] * warm + list(range(R)):
                            ctx, tasks = ctxs[r], tasks_r[r]
                            if r == 1:
                                planner.stats = dict.fromkeys(planner.stats, 0)
                            guess = None
                            if consecutive and H:  # untimed: the previous step's plan, for the first guess
                                st = dict(planner.stats)
                                guess = planner(prev[r], lens, tasks, beam=K, horizon=H)['obs'][:, 0]
                                planner.stats = st
                            t0 = time.perf_counter()
                            tokenizer.encode(frames)
                            t_e = time.perf_counter() - t0
                            # with --before, the two alternate which goes first (a machine that speeds up or slows
                            # down during a pair favours neither)
                            for p in ([planner, other] if r % 2 else [other, planner]) if other else [planner]:
                                t0 = time.perf_counter()
                                p(ctx, lens, tasks, beam=max(K, 1), horizon=H, guess=guess)
                                if r:
                                    (t_plan if p is planner else t_other).append(time.perf_counter() - t0)
                            if r:
                                t_enc.append(t_e)
                    enc, pl = statistics.median(t_enc), statistics.median(t_plan)
                    dps = N / (enc + pl)
                    flops = planner_flops(cfg, N, L, K, H)
                    vs = f'{dps / OFFICIAL[K]:10.1f}x' if N == 1 and name == 'float32' else ''
                    policy = 'greedy' if K == 0 else f'beam H2 K{K}'
                    st = planner.stats
                    passes = f"{st['passes'] / st['blocks']:.2f}" if st['blocks'] else '-'
                    print(f"{name:>9} {N:>4} {policy:>12} {dps:>12.2f} {vs:>11} {pl * 1e3:>8.0f} {enc * 1e3:>9.0f} "
                          f"{flops / pl / 1e9:>8.1f} {flops / pl / peaks[name]:>7.0%} {passes:>10}" +
                          (f" {N / (enc + statistics.median(t_other)):>10.2f} "
                           f"{(enc + statistics.median(t_other)) / (enc + pl):>9.2f}x" if other else ''))
                    rows.append((name, N, policy, flops / pl))
    for name in peaks:  # the peak again: a reading taken while the machine was slow would flatter the table
        end = matmul_peak(getattr(torch, name))
        print(f"matmul peak {name} at the end: {end / 1e9:.0f} GFLOP/s (start {peaks[name] / 1e9:.0f})")
        if end > 1.1 * peaks[name]:
            print("  of the end peak: " + ', '.join(f"{N} env {policy} {f / end:.0%}" for n, N, policy, f in rows
                                                    if n == name))
    bw = read_bandwidth()
    gb = 74 * weights * 4 / 1e9
    print(f"one environment, beam H=2, token by token: 74 sequential single-token passes, each reads the blocks and the obs head "
          f"({weights / 1e6:.1f}M weights): {gb:.1f} GB per decision in fp32, {gb / 2:.1f} GB in bf16; memory read "
          f"bandwidth {bw / 1e9:.1f} GB/s -> at most {bw / 1e9 / gb:.1f} (fp32) / {2 * bw / 1e9 / gb:.1f} (bf16) "
          f"decisions/s unless the weights stay in cache; with Jacobi decoding each of the 2 imagined "
          f"blocks takes `passes` passes of up to 37 inputs per candidate instead of 37 single-token passes")



# -----------------------------------------------------------------------------
# planners side by side: greedy, beam search and MCTS (paper §5.6, Table 5: beam search ~10x faster than MCTS)

PAPER_DPS = {'greedy': 10.8, 'beam H2 K2': 1.26, 'MCTS': 0.12}  # paper App. F: 150M on a GPU, decisions/s


def bench_mcts(argv):
    """Decisions/s (frame encode included) of the greedy policy, beam search H=2 K=2 and MCTS with the official
    eval_MCTS.sh settings (H 6: max depth 5, T 0.9, 20 simulations; --mcts_simulations, --mcts_temperature), in one
    run on the same machine, each with the longest root context it allows (8 - H blocks: 8, 6 and 2). Random weights
    and random contexts, eager planners; medians of repeats after one warm-up call."""
    cfg, args = parse_args(['--preset=40M'] + argv, dict(envs='1', repeats=3, threads=0),
                           dict(repeats='>0', threads='>=0'))
    if args['threads']:
        torch.set_num_threads(args['threads'])
    dev, dtype, amp = device_setup(cfg)
    dev = torch.device(dev)
    sync = torch.cuda.synchronize if dev.type == 'cuda' else lambda: None
    torch.manual_seed(0)
    model, tokenizer = JOWA(cfg).eval().to(dev), Tokenizer(cfg).eval().to(dev).to(memory_format=torch.channels_last)
    S, T = cfg.mcts_simulations, cfg.mcts_temperature
    policies = [('greedy', Planner(model), dict(horizon=0)), ('beam H2 K2', Planner(model), dict(beam=2, horizon=2)),
                ('MCTS', MCTS(model), dict(horizon=6, simulations=S, temperature=T))]
    print(f"{cfg.preset} preset ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, random weights) "
          f"on {dev.type}, {dtype}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}; "
          f"MCTS: H 6 (max depth 5), T {T}, {S} simulations; medians of {args['repeats']} repeats")
    print(f"{'envs':>4} {'policy':>11} {'context':>7} {'decisions/s':>11} {'plan ms':>8} {'encode ms':>9} "
          f"{'vs greedy':>9} {'paper (150M, GPU)':>17}")
    with torch.no_grad(), amp:
        for N in [int(n) for n in args['envs'].split(',')]:
            gen = torch.Generator().manual_seed(N)
            frames = torch.rand(N, 1, 84, 84, generator=gen).to(dev)
            tasks = torch.full((N,), task_id('Assault'), device=dev)
            rate = {}
            for name, planner, kw in policies:
                n_ctx = cfg.max_blocks - kw['horizon']  # B§7.2 / B§7.4: the root context leaves room for H blocks
                L = n_ctx * 37 - 1
                ctx = torch.randint(0, cfg.obs_vocab, (N, L), generator=gen)
                ctx[:, 36::37] = torch.randint(0, 7, (N, n_ctx - 1), generator=gen)  # action tokens of Assault
                ctx, lens = ctx.to(dev), torch.full((N,), L, device=dev)
                t_enc, t_plan = [], []
                for r in range(args['repeats'] + 1):  # the first call warms up
                    sync()
                    t0 = time.perf_counter()
                    tokenizer.encode(frames)
                    sync()
                    t1 = time.perf_counter()
                    planner(ctx, lens, tasks, **kw)['action'].cpu()
                    t2 = time.perf_counter()
                    if r:
                        t_enc.append(t1 - t0)
                        t_plan.append(t2 - t1)
                enc, pl = statistics.median(t_enc), statistics.median(t_plan)
                rate[name] = N / (enc + pl)
                print(f"{N:>4} {name:>11} {n_ctx:>7} {rate[name]:>11.2f} {pl * 1e3:>8.0f} {enc * 1e3:>9.0f} "
                      f"{rate[name] / rate['greedy']:>8.3f}x {PAPER_DPS[name]:>9.2f} ({PAPER_DPS[name] / 10.8:.3f}x)",
                      flush=True)
            print(f"     beam / MCTS: {rate['beam H2 K2'] / rate['MCTS']:.1f}x here, "
                  f"{PAPER_DPS['beam H2 K2'] / PAPER_DPS['MCTS']:.1f}x in the paper")


if __name__ == '__main__':
    which, argv = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ('train', [])
    if which == 'train':
        bench_train(argv)
    elif which in ('ddp', 'dtype'):
        bench_ddp(which, int(next((a.split('=')[1] for a in argv if a.startswith('--repeats=')), 3)))
    elif which == 'sampler':
        bench_sampler()
    elif which == 'plan':
        bench_plan(argv)
    elif which == 'mcts':
        bench_mcts(argv)
    elif which == 'scaled_ql':
        bench_scaled_ql(argv)
    else:
        raise SystemExit(f"error: unknown section {which!r}; choose train, ddp, dtype, sampler, plan, mcts or "
                         f"scaled_ql")
