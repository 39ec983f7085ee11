"""
Benchmarks (CPU or GPU). Each section prints its numbers; ratios are taken within one run, medians over repeats.

    python bench.py train      # one 40M training step (fwd + loss + bwd + AdamW), fp32 and bf16, vs matmul peak
    python bench.py sampler    # segment sampler throughput and peak RSS on a ~2 GB processed dataset
    python bench.py all        # every section
"""
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

import data

from model import JOWA, configure_optimizer, make_config


def timeit(fn, repeats=5, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak(dtype, n=2048, repeats=10):
    """The machine's own matmul throughput (FLOP/s) for a large square matmul in dtype."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n ** 3 / timeit(lambda: a @ b, repeats, warmup=3)


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


def bench_train(preset='40M', B=16, T=8, repeats=5):
    torch.manual_seed(0)
    cfg = make_config(preset)
    model = JOWA(cfg).train()
    opt = configure_optimizer(model, cfg.lr_world2, cfg.lr_critic, cfg.weight_decay)
    g = torch.Generator().manual_seed(0)
    batch = dict(observations=torch.randint(0, cfg.obs_vocab, (B, T, cfg.obs_tokens), generator=g),
                 actions=torch.randint(0, 18, (B, T), generator=g), rewards=torch.randint(-1, 2, (B, T), generator=g).float(),
                 ends=torch.zeros(B, T, dtype=torch.long), mask_padding=torch.ones(B, T, dtype=torch.bool),
                 envs=torch.randint(0, 60, (B,), generator=g))
    world, q = forward_flops(cfg, B, T)
    flops = 3 * (world + q) + q  # forward + backward (2x) of everything trained, plus the target head forward
    tokens = B * T * cfg.tokens_per_block
    print(f"train step, {preset} preset, batch {B} x {T} blocks = {tokens} tokens, {flops / 1e9:.1f} GFLOP counted")
    for name, dtype in (('fp32', torch.float32), ('bf16', torch.bfloat16)):
        def step():
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
                loss, _ = model.compute_loss(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        t = timeit(step, repeats)
        peak = matmul_peak(dtype)
        print(f"  {name}: {t * 1000:7.0f} ms/step  {tokens / t:7.0f} tokens/s  {flops / t / 1e9:6.1f} GFLOP/s  "
              f"= {100 * flops / t / peak:4.1f}% of the {peak / 1e9:.0f} GFLOP/s {name} matmul peak")


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


if __name__ == '__main__':
    which = sys.argv[1] if len(sys.argv) > 1 else 'all'
    if which in ('train', 'all'):
        bench_train()
    if which in ('sampler', 'all'):
        bench_sampler()
