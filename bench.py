"""
Benchmarks (CPU or GPU). Each section prints its numbers; ratios are taken within one run, medians over repeats.

    python bench.py train      # one 40M training step (fwd + loss + bwd + AdamW), fp32 and bf16, vs matmul peak
    python bench.py all        # every section
"""
import statistics
import sys
import time

import torch

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


if __name__ == '__main__':
    which = sys.argv[1] if len(sys.argv) > 1 else 'all'
    if which in ('train', 'all'):
        bench_train()
