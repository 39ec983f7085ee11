"""
Pretrain JOWA (REFERENCE B§5). Stage 1 trains the VQ-VAE tokenizer (Adam) and the world part of the transformer
(world cross-entropies, AdamW) side by side on the same batches, the tokenizer on real (never padding) frames of
them. Stage 2 freezes the tokenizer, encodes the dataset once into a token cache and trains world model and critic
jointly (Eq. 9: world_weight * world CE + C51 TD + CQL) with a fresh AdamW (world lr 5e-5, critic lr 5e-5).
One optimizer step = cfg.batch_size segments summed over ranks and gradient-accumulation micro-steps; DDP averages
the gradients of all ranks with one all-reduce per step, so every replica holds the same weights.

    python train.py --demo                                       # CPU demo: collect 3 real games, train tiny, evaluate
    python train.py --preset=40M --data_dir=processed            # one GPU (or CPU); data from `data.py process`
    torchrun --standalone --nproc_per_node=8 train.py --preset=150M --micro_batch=32
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 train.py ...
    python train.py --out_dir=out --resume                       # continue out/ckpt.pt exactly (config from the file)
    python train.py --imagine=True --q_penalty=combo ...         # paper Table 6: half real, half imagined, COMBO

--imagine (off by default, as in the paper): in stage 2 every step also rolls real segments on in the world model
(plan.imagine, the code finetune.py uses; the paper's ablation: 4 real blocks + 4 epsilon-greedy steps), keeps them
in a FIFO and trains on half real, half imagined segments (batch['real'] marks the real rows: world CE and COMBO).
"""
import json
import os
import random
import sys
import time
from dataclasses import asdict
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

import data
import evaluate  # imported now: a long run's final report uses the code the run started with
from model import (JOWA, PRETRAIN_GAMES, action_mask, average_over_ranks, check_same_sizes, configure_optimizer,
                   device_setup, load_checkpoint, merge_resumed, num_params, parse_args, read_checkpoint,
                   remove_temp_files, save_checkpoint, task_id)
from data import Replay
from plan import Planner, imagine
from tokenizer import Tokenizer, load_lpips_weights

# -----------------------------------------------------------------------------
# config: every JOWAConfig field (model.py) and these script settings, as --key=value
args = dict(
    data_dir='processed',         # output of `python data.py process`, one folder per game
    games=','.join(PRETRAIN_GAMES),
    out_dir='out',                # ckpt.pt goes here
    resume=False,                 # continue from out_dir/ckpt.pt; flags given again override the saved ones
    init_from='',                 # start from these weights (our ckpt.pt or tokenizer.pt,JOWA_40M.pt), step 0
    stop_at=0,                    # stop with a checkpoint after this step, as if preempted (0 = run to the end)
    log_interval=100,
    ckpt_interval=5000,
    eval_interval=0,              # steps between evaluations without planning, rank 0 (0 = never)
    eval_games='Assault',         # the official training-time evaluation game (B§5.9)
    eval_episodes=1,
    eval_max_steps=108_000,
    eval_max_seconds=180.0,
    wandb=False,
    wandb_project='jowa',
    wandb_run='',
    heldout_dir='',               # processed episodes of the same games never trained on, for the final report
    report=True,                  # at the end: evidence per stage and a random / greedy / planning score table
    demo='',                      # 'short' (or --demo alone) or 'long': DEMOS' flags, then the given ones
    demo_steps=2000,              # random-policy agent steps the demo collects per game (and 2,000 held out)
    # synthetic segments in stage 2 (paper Table 6 last column with --q_penalty=combo; B§7.5); off, as in the paper
    imagine=False,                # train on half real, half imagined segments (batch['real'] tells them apart)
    imagine_after=0,              # stage-2 steps before imagination starts
    imagine_horizon=4,            # steps rolled on from the last max_blocks - H real blocks (the paper: 4 + 4)
    imagine_policy='egreedy',     # 'egreedy' w.r.t. the critic (the paper's ablation) or 'beam' (as finetune.py)
    imagine_epsilon=0.1,          # egreedy: probability of a random valid action (the official schedule's final one)
    imagine_beam=2,               # beam: width K
    imagine_batch=0,              # segments rolled per step, summed over ranks and micro-steps (0 = batch_size)
    replay_factor=10,             # imagined-segment FIFO capacity, in dataset segments (official)
)
# the demos: collect real ALE play of 3 games with a random policy, train the tiny preset on 2 CPU cores, report.
# CPU-budget choices (all options, the official recipe is the default): codebook restarts (tok_restart) keep a short
# tokenizer training from collapsing onto a few codes; 16 tokenizer channels and no LPIPS-VGG term make a tokenizer
# step ~8x cheaper (LPIPS alone took ~1.4 s of a 16-frame step), so it trains on ~20x more frames, at a 10x lr; the
# foreground weight (tok_fg_weight) keeps plain L1 from settling on black frames (sprites are a few % of the pixels,
# and L1's optimum without LPIPS is the per-pixel median: the background). Stage 2: the official lrs and target
# update (5e-5, every 1,000 steps) barely move the C51 critic off its initial uniform distribution in 10k steps
# (every Q ~11.7, the support's middle, whatever the state), so the tiny model takes 6-10x lrs and a copy every 25.
# Planning: the demo's world models hardly react to the action (the imagined frames of a node's candidates differ in
# 0-0.2 of 36 tokens), so the paper's score, the leaf's max Q, ranks candidates by noise; plan_lambda 0.7 keeps the
# critic's root estimate in the score (the lambda-return of the path, plan.py).
DEMO = ['--preset=tiny', '--games=Carnival,Assault,SpaceInvaders', '--batch_size=8', '--micro_batch=8',
        '--tok_ch=16', '--tok_perceptual=0', '--tok_fg_weight=5', '--lr_tokenizer=1e-3', '--tok_batch=16',
        '--tok_restart=20', '--lr_world2=3e-4', '--lr_critic=5e-4', '--target_update=25', '--plan_lambda=0.7',
        '--log_interval=100', '--eval_games=Carnival,Assault,SpaceInvaders']
DEMOS = dict(
    short=DEMO + ['--data_dir=data_cache/demo/processed', '--heldout_dir=data_cache/demo/heldout', '--out_dir=out/demo',
                  '--stage1_steps=600', '--stage2_steps=2400', '--ckpt_interval=1000', '--eval_episodes=4',
                  '--eval_max_steps=2000', '--eval_max_seconds=60.0'],  # ~15 min
    long=DEMO + ['--data_dir=data_cache/long/processed', '--heldout_dir=data_cache/long/heldout', '--out_dir=out/long',
                 '--demo_steps=10000', '--stage1_steps=2000', '--stage2_steps=10000', '--ckpt_interval=2000',
                 '--eval_episodes=16', '--eval_max_steps=27000', '--eval_max_seconds=900.0'],  # ~60 min
)
argv = sys.argv[1:]
demo = next((a.partition('=')[2] or 'short' for a in argv if a.split('=')[0] == '--demo'), '')
demo = 'short' if demo == 'True' else demo
if demo and demo not in DEMOS:
    raise SystemExit(f"error: --demo={demo}: choose --demo (short) or --demo=long")
argv = DEMOS[demo] + [a for a in argv if a.split('=')[0] != '--demo'] + [f'--demo={demo}'] if demo else argv
RULES = dict(out_dir='dir', stop_at='>=0', log_interval='>0', ckpt_interval='>=0', eval_interval='>=0',
             eval_episodes='>=0', eval_max_steps='>0', eval_max_seconds='>0', demo_steps='>0', imagine_after='>=0',
             imagine_horizon='>0', imagine_policy=('beam', 'egreedy'), imagine_epsilon='[0,1]', imagine_beam='>0',
             imagine_batch='>=0', replay_factor='>0')
cfg, args = parse_args(argv, args, RULES)
given = {a[2:].partition('=')[0].replace('-', '_') for a in argv}
ckpt_path = os.path.join(args['out_dir'], 'ckpt.pt')
if args['resume'] and not os.path.exists(ckpt_path):
    raise SystemExit(f"error: --resume: no checkpoint {ckpt_path}")
try:  # every name and file checked before any work
    for g in {*args['games'].split(','), *args['eval_games'].split(',')}:
        task_id(g), action_mask(g)
    ckpt = read_checkpoint(ckpt_path, 'train') if args['resume'] else None
    if ckpt:  # the saved config and settings, except what this command line gives again
        cfg, args = merge_resumed(cfg, args, given, ckpt)
    init = load_checkpoint(args['init_from']) if args['init_from'] and not ckpt else None
    if init:
        check_same_sizes(cfg, init[0], f"--init_from={args['init_from']}")
except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}")
try:  # the folders, as resumed
    for d in ('data_dir', 'heldout_dir'):  # (a demo collects its own)
        if args[d] and not args['demo'] and not os.path.isdir(args[d]):
            raise ValueError(f"--{d}={args[d]} is not a folder (make one with data.py process)")
    data.check_apart(('out_dir', args['out_dir']), [(k, args[k]) for k in ('data_dir', 'heldout_dir')])
except ValueError as e:
    raise SystemExit(f"error: {e}")
if args['imagine']:  # against the model, as resumed
    if not args['imagine_horizon'] < cfg.max_blocks:
        raise SystemExit(f"error: --imagine_horizon={args['imagine_horizon']} must be in 1..{cfg.max_blocks - 1} "
                         f"(the model's {cfg.max_blocks} blocks keep one real block to imagine from)")
    if cfg.objective == 'bc':
        raise SystemExit("error: --imagine needs a world model to imagine with: not with --objective=bc")
    if cfg.micro_batch < 2:
        raise SystemExit(f"error: --imagine needs --micro_batch >= 2 (half real, half imagined), got {cfg.micro_batch}")

# -----------------------------------------------------------------------------
# DDP, device, dtype, seeds
ddp = int(os.environ.get('RANK', -1)) != -1  # launched by torchrun?
if ddp:
    rank, local_rank, world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    local_world = int(os.environ.get('LOCAL_WORLD_SIZE', world_size))
    cuda = torch.cuda.is_available() and cfg.device != 'cpu'
    # a long timeout: the others wait while rank 0 evaluates and each node builds its token cache
    dist.init_process_group('nccl' if cuda else 'gloo', timeout=timedelta(hours=2))
    device = f'cuda:{local_rank}' if cuda else 'cpu'
    if cuda:
        torch.cuda.set_device(device)
else:
    rank, local_rank, world_size, local_world = 0, 0, 1, 1
    device = None  # cfg.device
device, dtype, ctx = device_setup(cfg, device)
master = rank == 0  # logs, evaluates and writes the checkpoint
if master:
    remove_temp_files(args['out_dir'])
device_type = torch.device(device).type
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
accum = cfg.batch_size // (cfg.micro_batch * world_size)  # gradient-accumulation micro-steps per optimizer step
if accum < 1 or accum * cfg.micro_batch * world_size != cfg.batch_size:
    raise SystemExit(f"error: batch_size={cfg.batch_size} must be a multiple of micro_batch={cfg.micro_batch} x "
                     f"{world_size} ranks")
n_workers = world_size * accum  # one data stream per (rank, micro-step): the global batch ignores how it is split
if cfg.tok_batch % n_workers:
    raise SystemExit(f"error: tok_batch={cfg.tok_batch} must be a multiple of {world_size} ranks x {accum} micro-steps")
tok_micro = cfg.tok_batch // n_workers  # tokenizer frames per micro-step
imagine_micro = (args['imagine_batch'] or cfg.batch_size) // n_workers  # segments each data stream rolls on per step
if args['imagine'] and imagine_micro * n_workers != (args['imagine_batch'] or cfg.batch_size):
    raise SystemExit(f"error: imagine_batch={args['imagine_batch']} must be a multiple of {world_size} ranks x "
                     f"{accum} micro-steps")
total_steps = cfg.stage1_steps + cfg.stage2_steps
if master:
    print(f"{world_size} rank(s) on {device} ({dtype}), {accum} micro-step(s) of {cfg.micro_batch} segments per rank: "
          f"{cfg.batch_size} segments = {cfg.batch_size * cfg.max_tokens:,} tokens per step, {total_steps:,} steps")

# -----------------------------------------------------------------------------
# data: segments of the processed games; the demo collects real ALE play first (data.py)
games = args['games'].split(',')
if args['demo'] and master:  # training episodes, and held-out ones (another seed: other episodes)
    for dest, n, seed in ((args['data_dir'], args['demo_steps'], cfg.seed), (args['heldout_dir'], 2000, cfg.seed + 1)):
        raw = dest + '_replay'
        for g in games:
            if not os.path.exists(os.path.join(dest, g, 'meta.json')):
                data.collect(g, raw, n, run=1, ckpt_size=1000, seed=seed)
                data.process_game(raw, dest, g, [1], list(range(-(-n // 1000))), fraction=1.0)
if ddp:
    dist.barrier()
try:
    dataset = data.load_dataset(args['data_dir'], games)
except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}")
samplers = [data.Sampler(dataset, cfg.max_blocks, cfg.seed, rank * accum + i) for i in range(accum)]
# --imagine: per data stream a second sampler (the segments to roll on) and a generator (epsilon coins, replay rows);
# the FIFO of imagined segments is the same on every rank (see imagine_step)
isamplers = [data.Sampler(dataset, cfg.max_blocks, cfg.seed + 1, rank * accum + i) for i in range(accum)]
igens = [torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, rank * accum + i]).generate_state(1)[0]))
         for i in range(accum)]
replay = Replay(args['replay_factor'] * sum(d['segments'] for d in dataset)) if args['imagine'] else None
if replay is not None and ckpt and ckpt.get('replay') and ckpt['replay']['capacity'] != replay.capacity:
    raise SystemExit(f"error: the checkpoint's imagined-segment FIFO holds {ckpt['replay']['capacity']} segments, "
                     f"this run's {replay.capacity}: resume with its --replay_factor and data")

# -----------------------------------------------------------------------------
# models (same seed on every rank: identical replicas), optimizers, compile
torch.manual_seed(cfg.seed)
model, tokenizer = JOWA(cfg), Tokenizer(cfg)
if init:
    model.load_state_dict(init[1].state_dict())
    tokenizer.load_state_dict(init[2].state_dict())
if ckpt:
    model.load_state_dict(ckpt['model'])
    tokenizer.load_state_dict(ckpt['tokenizer'])
step = ckpt['step'] if ckpt else 0
stage = 1 if step < cfg.stage1_steps else 2
if stage == 1 and cfg.tok_perceptual:
    load_lpips_weights(tokenizer)  # perceptual loss weights (a no-op when the checkpoint holds them)
model.to(device).train()
tokenizer.to(device).train(stage == 1)
if ddp:  # guarantee identical starting replicas, as DDP's constructor does
    for t in [*model.state_dict().values(), *tokenizer.state_dict().values()]:
        dist.broadcast(t, 0)
params, tok_params = list(model.parameters()), tokenizer.trainable_parameters()
optimizer = configure_optimizer(model, cfg.lr_world1 if stage == 1 else cfg.lr_world2, cfg.lr_critic, cfg.weight_decay)
tok_optimizer = torch.optim.Adam(tok_params, lr=cfg.lr_tokenizer)  # Adam, no weight decay (B§1.10)
if ckpt:
    tok_optimizer.load_state_dict(ckpt['tok_optimizer'])
    if ckpt['stage'] == stage:  # a checkpoint taken right at the stage switch holds the stage-1 AdamW: start afresh
        optimizer.load_state_dict(ckpt['optimizer'])
for g, lr in zip(optimizer.param_groups, (cfg.lr_world1 if stage == 1 else cfg.lr_world2,) * 2 + (cfg.lr_critic,)):
    g['lr'] = lr  # the config's learning rates win over the saved ones
if cfg.compile:  # in place: state-dict names stay clean, and compute_loss's call of the model hits the compiled code
    for m in (model, tokenizer.encoder, tokenizer.decoder):
        m.compile()
# imagination decodes by Jacobi iteration always: jacobi=None picks the faster way by timings, which a resumed run
# would not repeat (both decode the same greedy tokens, in other floating-point order)
planner = Planner(model, compile=cfg.compile, jacobi=True) if args['imagine'] else None
if master:
    print(f"JOWA {cfg.preset}: {num_params(model):,} parameters; tokenizer {sum(p.numel() for p in tok_params):,}" +
          (f"; imagination from stage-2 step {args['imagine_after']}: {args['imagine_policy']}, H "
           f"{args['imagine_horizon']}, FIFO of {replay.capacity} segments" if replay is not None else ''))

# -----------------------------------------------------------------------------
# helpers


def rng_state():
    s = np.random.get_state()
    return dict(python=random.getstate(), numpy=(s[0], torch.from_numpy(s[1].astype(np.int64)), *s[2:]),
                torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state() if device_type == 'cuda' else None)


def set_rng_state(s):
    random.setstate(s['python'])
    n = s['numpy']
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    torch.set_rng_state(s['torch'])
    if s['cuda'] is not None and device_type == 'cuda':
        torch.cuda.set_rng_state(s['cuda'])


def gather(obj):
    """obj of every rank, in rank order, on every rank."""
    if not ddp:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def sync_grads(stats):
    """Average the gradients (and the logged loss terms `stats`) over ranks with one all-reduce of a flat vector
    (CleanRL multigpu style). Parameters without a gradient (the Q head in stage 1, the tokenizer in stage 2) are
    skipped; every rank has the same set. Returns the averaged stats."""
    if not ddp:
        return stats
    return average_over_ranks([p.grad for p in params + tok_params if p.grad is not None], stats, world_size)


def healthy():
    """No non-finite loss so far and every parameter finite (one sync: called at log and checkpoint time)."""
    return bool(torch.stack([torch.isfinite(p).all() for p in params + tok_params]).all() & ~nonfinite)


def stop_nonfinite():
    msg = (f"error: non-finite loss or parameters detected at step {step} (stage {stage}; fine at step {last_ok}); "
           f"training stopped. " + (f"The last good checkpoint {ckpt_path} (step {saved}) is kept."
                                    if saved is not None else "No checkpoint was written."))
    if master:
        print(msg, flush=True)
    cleanup()
    raise SystemExit(1)


def cleanup():
    if ddp:
        dist.barrier()  # leave together: a rank tearing gloo down while another still writes can abort
        dist.destroy_process_group()


def save():
    global saved
    if not healthy():
        stop_nonfinite()
    # per-rank states, gathered; the parameter checksums prove the replicas never drifted apart (B§5.3)
    rngs, streams = gather(rng_state()), sum(gather([s.state_dict() for s in samplers]), [])
    uses = gather(tokenizer.uses.cpu())  # per rank: the codebook uses since the last restart
    sums = gather(torch.stack([p.detach().double().sum() for p in params + tok_params]).cpu())
    if any(not torch.equal(s, sums[0]) for s in sums):
        raise RuntimeError(f"DDP replicas differ at step {step}: gradients were not synchronised")
    imag = {}
    if replay is not None:  # the imagination streams of every rank; the FIFO is the same on every rank: rank 0's
        imag = dict(isamplers=sum(gather([s.state_dict() for s in isamplers]), []),
                    igens=sum(gather([g.get_state() for g in igens]), []), replay=master and replay.state_dict())
    if master:
        save_checkpoint(dict(script='train', config=asdict(cfg), args=args, step=step, stage=stage,
                             model=model.state_dict(), tokenizer=tokenizer.state_dict(),
                             optimizer=optimizer.state_dict(), tok_optimizer=tok_optimizer.state_dict(),
                             samplers=streams, rng=rngs, tok_uses=uses, replica_checksums=sums, **imag), ckpt_path)
    saved = step


def enter_stage2():
    """Freeze the tokenizer and encode every frame once (ranks of a node share the games; a cache made by this
    tokenizer is kept), so stage-2 batches carry tokens."""
    tokenizer.eval().requires_grad_(False)
    with ctx:
        data.build_token_cache(args['data_dir'], games[local_rank::local_world], tokenizer)
    if ddp:
        dist.barrier()
    data.load_dataset(args['data_dir'], games, tokens=True)  # checks every game's cache


def imagine_step():
    """Every data stream of this rank rolls imagine_micro segments on (plan.imagine), then every rank's go into the
    FIFO. Synchronised: the imagined segments are all-gathered (rank, then micro-step order), so every rank's FIFO
    holds the same segments in the same order (the official code gathers them too), imagined with the same weights
    (averaged gradients). Not synchronised: each (rank, micro-step) stream draws its own source segments, epsilon
    coins and replay rows, so the global batch does not depend on how it is split over ranks."""
    model.eval()  # no dropout while imagining
    new = []
    for isampler, gen in zip(isamplers, igens):
        b = {k: v.to(device) for k, v in isampler.sample(imagine_micro, tokens=True).items()}
        with ctx:
            seg = imagine(planner, tokenizer, b, args['imagine_horizon'], args['imagine_beam'],
                          args['imagine_epsilon'] if args['imagine_policy'] == 'egreedy' else None, gen)
        new.append(None if seg is None else {k: v.cpu() for k, v in seg.items()})
    model.train()
    for seg in sum(gather(new), []):
        if seg is not None:
            replay.push(seg)


def evaluate_now():
    """Q-greedy evaluation without planning (B§5.9) on a fresh uncompiled copy; training RNG streams untouched."""
    state = rng_state()
    copy = JOWA(cfg).to(device)
    copy.load_state_dict(model.state_dict())
    returns, cut = evaluate.evaluate(copy.eval(), tokenizer.eval(), cfg, args['eval_games'].split(','),
                                     args['eval_episodes'], plan=False, max_steps=args['eval_max_steps'],
                                     max_seconds=args['eval_max_seconds'])
    tokenizer.train(stage == 1)
    set_rng_state(state)
    table = evaluate.summarize(returns, cfg.preset, plan=False, cut=cut)[0]
    print(f"evaluation at step {step}, no planning:\n{table}", flush=True)
    return {f'eval/{g}': float(np.mean(r)) for g, r in returns.items() if r}


# -----------------------------------------------------------------------------
# resume the exact streams: data samplers and RNGs of every rank
if ckpt and len(ckpt['samplers']) == n_workers and len(ckpt['rng']) == world_size:
    for i, s in enumerate(samplers):
        s.load_state_dict(ckpt['samplers'][rank * accum + i])
    set_rng_state(ckpt['rng'][rank])
    if 'tok_uses' in ckpt:
        tokenizer.uses.copy_(ckpt['tok_uses'][rank])
    if replay is not None and 'isamplers' in ckpt:
        for i, (s, g) in enumerate(zip(isamplers, igens)):
            s.load_state_dict(ckpt['isamplers'][rank * accum + i])
            g.set_state(ckpt['igens'][rank * accum + i])
else:
    if ckpt and master:
        print(f"note: the checkpoint has other ranks/micro-steps, the data streams restart from seed {cfg.seed}")
    torch.manual_seed(cfg.seed + rank + step)  # dropout masks differ between ranks
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
if replay is not None and ckpt and ckpt.get('replay'):
    replay.load_state_dict(ckpt['replay'])
if stage == 2:
    enter_stage2()
if args['wandb'] and master:
    import wandb
    wandb.init(project=args['wandb_project'], name=args['wandb_run'] or None, config={**asdict(cfg), **args})

# the training log (log.jsonl, one line per log_interval): curves for the report; a resumed run keeps its past
log_path, log = os.path.join(args['out_dir'], 'log.jsonl'), []
if master:
    if ckpt and os.path.exists(log_path):
        with open(log_path) as f:
            log = [r for r in map(json.loads, f) if r['step'] <= step]
    os.makedirs(args['out_dir'], exist_ok=True)
    with open(log_path, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in log)

# -----------------------------------------------------------------------------
# training loop
start, saved, last_ok, t_step = step, (step if ckpt else None), step, step
nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # any non-finite loss since the last check (no sync)
t0 = time.time()
while True:
    end = step == total_steps or step == args['stop_at'] > 0
    if step > start and (end or args['ckpt_interval'] and step % args['ckpt_interval'] == 0):
        save()
    if master and args['eval_interval'] and step > start and (step % args['eval_interval'] == 0 or step == total_steps):
        scores = evaluate_now()
        if args['wandb']:
            wandb.log(scores, step=step)
    if end:
        break
    if step == cfg.stage1_steps and stage == 1:  # stage switch: fresh AdamW with the stage-2 lrs (B§5.1, fixed)
        stage = 2
        optimizer = configure_optimizer(model, cfg.lr_world2, cfg.lr_critic, cfg.weight_decay)
        enter_stage2()
        if master:
            print(f"step {step}: stage 2, tokenizer frozen, token cache ready")

    imagining = replay is not None and stage == 2 and step >= cfg.stage1_steps + args['imagine_after']
    if imagining:
        imagine_step()
    stats = {}
    for sampler, gen in zip(samplers, igens):  # one micro-step per data stream of this rank
        n_real = cfg.micro_batch // 2 if imagining else cfg.micro_batch
        batch = sampler.sample(n_real, tokens=stage == 2)
        if imagining:  # half real, half imagined rows (none yet while the FIFO is empty); 'real' tells them apart
            parts = [dict(batch, real=torch.ones(n_real, dtype=torch.bool))]
            parts += [replay.sample(cfg.micro_batch - n_real, gen)] if replay.size else []
            batch = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with ctx:
            loss, terms = model.compute_loss(batch, tokenizer, stage)
        (loss / accum).backward()
        terms = dict(loss=loss.detach(), **terms)
        if stage == 1:  # the tokenizer trains on real frames of this batch, drawn with replacement (B§1.10)
            frames = batch['observations'][batch['mask_padding']]  # (n, 1, 84, 84), never a padding frame
            if len(frames) > tok_micro:
                frames = frames[torch.from_numpy(sampler.rng.integers(0, len(frames), tok_micro)).to(device)]
            with ctx:
                tok_loss, tok_terms = tokenizer(frames)
            (tok_loss / accum).backward()
            terms.update(tok=tok_loss.detach(), **{f'tok_{k[:6]}': v for k, v in tok_terms.items()})
        stats = {k: stats.get(k, 0) + v.float() / accum for k, v in terms.items()}
    avg = sync_grads(torch.stack(list(stats.values())))  # the same averaged loss terms on every rank
    nonfinite |= ~torch.isfinite(avg).all()
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if stage == 1:
        torch.nn.utils.clip_grad_norm_(tok_params, cfg.grad_clip)
        tok_optimizer.step()
        tok_optimizer.zero_grad(set_to_none=True)
        if cfg.tok_restart and step % cfg.tok_restart == 0:  # step 0 too: the codebook starts from encoder outputs
            if ddp:  # every rank's uses count; rank 0's new codes are everyone's
                dist.all_reduce(tokenizer.uses)
            tokenizer.restart_dead_codes(frames)
            if ddp:
                dist.broadcast(tokenizer.embedding.weight.data, 0)
    step += 1
    if step % cfg.target_update == 0:  # counted over both stages, as the official code does
        model.update_target()

    if step % args['log_interval'] == 0 or step == total_steps:
        if not healthy():  # the same verdict on every rank: the loss terms were all-reduced
            stop_nonfinite()
        last_ok = step
        dt, t0, t_step = (time.time() - t0) / (step - t_step), time.time(), step  # per step since the last line
        if master:
            logs = {k: v.item() for k, v in zip(stats, avg)}  # .item() only here: a CPU-GPU sync
            mem = f" | {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device_type == 'cuda' else ''
            print(f"step {step} | stage {stage} | " + ' '.join(f'{k} {v:.4f}' for k, v in logs.items()) +
                  f" | lr {optimizer.param_groups[0]['lr']:.1e} | {dt * 1000:.0f} ms | "
                  f"{cfg.batch_size * cfg.max_tokens / dt:,.0f} tok/s{mem}" +
                  (f" | imagined FIFO {replay.size}" if imagining else ''), flush=True)
            log.append(dict(step=step, stage=stage, **logs))
            with open(log_path, 'a') as f:
                f.write(json.dumps(log[-1]) + '\n')
            if args['wandb']:
                wandb.log({**logs, 'stage': stage, 'ms_per_step': dt * 1000}, step=step)

if master and args['report'] and step == total_steps:  # evidence per stage (evaluate.report), rank 0
    heldout = args['heldout_dir'] or args['data_dir']
    if not args['heldout_dir']:
        print(f"note: no --heldout_dir, so the report's frames come from the training data {heldout}")
    evaluate.report(model.eval(), tokenizer.eval(), cfg, games, args['out_dir'], heldout, log, args['eval_episodes'],
           args['eval_max_steps'], args['eval_max_seconds'])
cleanup()
