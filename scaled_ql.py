r"""
Scaled-QL (Kumar et al., ICLR 2023), the offline Q-learning baseline of JOWA's Table 2 (App. E.1.5), on JOWA's data
(data.py's processed games) and evaluation protocol (evaluate.py): a ResNet with GroupNorm over the last 4 frames, a
learned spatial embedding of its last feature map, a 3-layer MLP, x/||x||, then one C51 head per game over that
game's valid actions; trained with 3-step C51 TD against a target network plus CQL (alpha 0.05), Adam 2e-4.

    python scaled_ql.py --params                                    # parameter counts of the presets
    python scaled_ql.py --preset=tiny --data_dir=processed --games=Pong,Assault --steps=2000    # CPU
    torchrun --standalone --nproc_per_node=8 scaled_ql.py --preset=resnet101 --micro_batch=64   # the paper's 80M
    python scaled_ql.py --out_dir=out/scaled_ql --resume            # continue exactly (flags given again win)
    python evaluate.py --ckpt=out/scaled_ql/ckpt.pt --games=Pong    # greedy, the same protocol as JOWA

JOWA against Scaled-QL in one command (README "Scaled-QL baseline"; a few minutes on CPU): both trained on the same
data and games, then the random policy and both agents on the same seeds in one evaluate.py call, one score table

    python train.py --preset=tiny --data_dir=data/processed --games=Assault --out_dir=out/cmp/jowa --report=False \
        --stage1_steps=100 --stage2_steps=400 --batch_size=8 --micro_batch=8 --tok_batch=16 --tok_ch=16 \
        --tok_perceptual=0 --lr_tokenizer=1e-3 --tok_restart=20 && \
    python scaled_ql.py --preset=tiny --data_dir=data/processed --games=Assault --out_dir=out/cmp/scaled_ql \
        --steps=1000 && \
    python evaluate.py --compare=out/cmp/jowa/ckpt.pt,out/cmp/scaled_ql/ckpt.pt --games=Assault --episodes=8 \
        --max_steps=1000 --no-plan

and at the paper's scale (JOWA-70M against Scaled-QL-80M on the 15 pretraining games, both scripts' default)

    torchrun --standalone --nproc_per_node=8 train.py --preset=70M --data_dir=data/processed --out_dir=out/jowa \
        --report=False && \
    torchrun --standalone --nproc_per_node=8 scaled_ql.py --preset=resnet101 --data_dir=data/processed \
        --micro_batch=64 --out_dir=out/scaled_ql && \
    python evaluate.py --compare=out/jowa/ckpt.pt,out/scaled_ql/ckpt.pt --games=pretrain --episodes=16 --no-plan
"""
import copy
import math
import os
import sys
import time
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data
from model import (GAMES, PRETRAIN_GAMES, VALID_ACTIONS, JOWAConfig, action_mask, average_over_ranks, c51_project,
                   device_setup, load_state, merge_resumed, num_params, parse_args, read_checkpoint, remove_temp_files,
                   save_checkpoint, task_id)

# -----------------------------------------------------------------------------
# settings: --key=value through model.parse_args (typed, checked, one `error:` line before any work)

DEFAULTS = dict(
    preset='resnet101',    # PRESETS: the paper's model unless told otherwise (tiny for CPUs)
    blocks=(3, 4, 23, 3),  # residual blocks per stage (channels width * 2^stage, x4 out with bottleneck blocks)
    width=64,              # channels of the first stage
    bottleneck=True,       # 1x1-3x3-1x1 blocks (ResNet-50/101), else two 3x3 convs (ResNet-18/34)
    groups=32,             # GroupNorm groups (at most the channels)
    features=8,            # learned spatial embeddings per channel of the last feature map
    hidden=1024,           # MLP width
    n_step=3, lr=2e-4, steps=1_750_000,
    data_dir='processed', games=','.join(PRETRAIN_GAMES), out_dir='out/scaled_ql', resume=False,
    stop_at=0,             # stop with a checkpoint after this step, as if preempted (0 = run to the end)
    log_interval=100, ckpt_interval=5000,
    params=False,          # print the presets' parameter counts (with the heads of --games) and exit
)
ARCH = ('blocks', 'width', 'bottleneck', 'groups', 'features', 'hidden')  # with num_atoms, v_min, v_max and the games
PRESETS = {  # depth / width; --params prints their sizes
    'tiny': dict(blocks=(1, 1, 1, 1), width=8, bottleneck=False, groups=4, features=2, hidden=64, batch_size=32,
                 micro_batch=32, target_update=100),
    'resnet18': dict(blocks=(2, 2, 2, 2), bottleneck=False),
    'resnet34': dict(blocks=(3, 4, 6, 3), bottleneck=False),
    'resnet50': dict(blocks=(3, 4, 6, 3)),
    'resnet101': dict(),  # the paper's Scaled-QL-80M
}
# the JOWAConfig fields Scaled-QL uses, with its values where they differ from JOWA's (JOWA App. E.1.5)
SHARED = ('gamma', 'num_atoms', 'v_min', 'v_max', 'cql_weight', 'batch_size', 'micro_batch', 'grad_clip',
          'target_update', 'seed', 'device', 'dtype', 'compile', 'epsilon', 'max_steps')
SQL_CONFIG = dict(v_min=-20.0, v_max=20.0, cql_weight=0.05, target_update=2000, micro_batch=128)
RULES = dict(width='>0', groups='>0', features='>0', hidden='>0', n_step='>0', lr='>0', steps='>0', stop_at='>=0',
             log_interval='>0', ckpt_interval='>=0', out_dir='dir')


def parse(argv):
    """argv -> (cfg: JOWAConfig with the SHARED fields, args: the settings above, keys given on the command line)."""
    preset = next((a.partition('=')[2] for a in argv if a.startswith('--preset=')), DEFAULTS['preset'])
    if preset not in PRESETS:
        raise SystemExit(f"error: --preset={preset}: choose one of {', '.join(PRESETS)}")
    flags = [f'--{k}={v}' for k, v in {**SQL_CONFIG, **PRESETS[preset]}.items()]
    if {'-h', '--help'} & set(argv):
        cfg, args = parse_args(flags, dict(DEFAULTS))
        print('options (--key=value):\n  ' + '\n  '.join(f'{k}={v!r}' for k, v in
                                                         [(k, getattr(cfg, k)) for k in SHARED] + list(args.items())))
        sys.exit(0)
    given = {a[2:].partition('=')[0].replace('-', '_') for a in argv if a.startswith('--')}
    jowa_only = sorted(given & {f.name for f in fields(JOWAConfig)} - {*SHARED, 'preset'})
    if jowa_only:
        raise SystemExit(f"error: --{jowa_only[0]} is a JOWA option, not one of Scaled-QL's (see --help)")
    cfg, args = parse_args(flags + [a for a in argv if not a.startswith('--preset=')], dict(DEFAULTS), RULES)
    cfg.preset = args['preset'] = preset
    b = args['blocks']
    if not isinstance(b, tuple) or not b or not all(isinstance(n, int) and n > 0 for n in b):
        raise SystemExit(f"error: --blocks={b} must be a tuple of positive block counts per stage, e.g. 3,4,23,3")
    if args['width'] % min(args['groups'], args['width']):
        raise SystemExit(f"error: --width={args['width']} must be a multiple of --groups={args['groups']}")
    return cfg, args, given

# -----------------------------------------------------------------------------
# model: ResNet (GroupNorm) -> learned spatial embedding -> 3-layer MLP -> x/||x|| -> per-game C51 heads


class Block(nn.Module):
    """Residual block with GroupNorm instead of BatchNorm: basic (two 3x3 convs) or bottleneck (1x1, 3x3, 1x1 to 4x
    the channels); the stride sits on the 3x3 conv, a 1x1 conv projects the shortcut when the shape changes."""

    def __init__(self, c_in, c, stride, bottleneck, groups):
        super().__init__()
        c_out = 4 * c if bottleneck else c
        convs = [(c_in, c, 1, 1), (c, c, 3, stride), (c, c_out, 1, 1)] if bottleneck else \
            [(c_in, c, 3, stride), (c, c_out, 3, 1)]
        self.convs = nn.ModuleList(nn.Conv2d(i, o, k, s, k // 2, bias=False) for i, o, k, s in convs)
        self.norms = nn.ModuleList(nn.GroupNorm(min(groups, o), o) for _, o, _, _ in convs)
        self.skip = None if stride == 1 and c_in == c_out else \
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.GroupNorm(min(groups, c_out), c_out))

    def forward(self, x):
        y = x
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            y = norm(conv(y))
            y = F.relu(y) if i < len(self.convs) - 1 else y
        return F.relu(y + (x if self.skip is None else self.skip(x)))


class ScaledQL(nn.Module):
    """The Scaled-QL network (JOWA App. E.1.5): one shared representation of 4 stacked frames and a C51 head per
    game of `games`, each over that game's valid actions only (args: the architecture settings, cfg: the atoms)."""

    def __init__(self, args, games, cfg):
        super().__init__()
        self.games, self.preset = list(games), args['preset']
        w, groups, Z = args['width'], args['groups'], cfg.num_atoms
        self.stem = nn.Sequential(nn.Conv2d(4, w, 7, 2, 3, bias=False), nn.GroupNorm(min(groups, w), w), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        blocks, c_in = [], w
        for i, n in enumerate(args['blocks']):
            for j in range(n):
                blocks.append(Block(c_in, w * 2 ** i, 2 if i and not j else 1, args['bottleneck'], groups))
                c_in = blocks[-1].norms[-1].num_channels
        self.blocks = nn.Sequential(*blocks)
        side = 84
        for _ in range(1 + len(args['blocks'])):  # stem conv, max-pool and every later stage halve it (84 -> 3)
            side = (side - 1) // 2 + 1
        # instead of global mean pooling: F learned weightings of the (side x side) positions per channel
        self.spatial = nn.Parameter(torch.randn(c_in, side, side, args['features']) / side)
        D = args['hidden']
        self.mlp = nn.Sequential(nn.Linear(c_in * args['features'], D), nn.ReLU(), nn.Linear(D, D), nn.ReLU(),
                                 nn.Linear(D, D), nn.ReLU())
        # all per-game heads as one matrix: game g's block holds Z logits for each of its valid actions only
        n_valid = [len(VALID_ACTIONS[g]) for g in self.games]
        self.heads = nn.Linear(D, sum(n_valid) * Z)
        cols, valid = torch.zeros(len(games), 18, dtype=torch.long), torch.zeros(len(games), 18, dtype=torch.bool)
        for h, g in enumerate(self.games):
            cols[h, list(VALID_ACTIONS[g])] = sum(n_valid[:h]) + torch.arange(n_valid[h])
            valid[h, list(VALID_ACTIONS[g])] = True
        head_of_task = torch.full((len(GAMES),), -1, dtype=torch.long)  # task id -> head (-1: no head)
        head_of_task[[task_id(g) for g in self.games]] = torch.arange(len(games))
        self.register_buffer('cols', cols, persistent=False)  # (G, 18) head block of each (game, full action id)
        self.register_buffer('valid', valid, persistent=False)  # (G, 18)
        self.register_buffer('head_of_task', head_of_task, persistent=False)
        self.register_buffer('support', torch.linspace(cfg.v_min, cfg.v_max, Z), persistent=False)

    def forward(self, obs, head):
        """obs (B, 4, 84, 84) uint8 stacks, head (B,) head ids -> C51 logits (B, 18, Z) on the full action ids; an
        invalid action's row repeats a valid one (its head has no output for it): mask with self.valid[head]."""
        x = self.blocks(self.stem(obs.float() / 255))  # (B, C, side, side)
        x = torch.einsum('bchw,chwf->bcf', x, self.spatial).flatten(1)  # (B, C * F)
        x = F.normalize(self.mlp(x), dim=-1)  # x / ||x||: feature normalisation before the output layer
        # every game's head for every row, then each row's own: one matmul instead of a ragged loop over games
        # (the 15 pretraining games' 170 actions x 51 atoms: under 1% of ResNet-101's FLOPs at 84 x 84)
        logits = self.heads(x).view(len(x), -1, self.support.numel())  # (B, sum of valid actions, Z)
        return logits.gather(1, self.cols[head][..., None].expand(-1, -1, logits.shape[-1]))

    def q_values(self, logits, head):
        """Expected Q (B, 18) of logits (B, 18, Z); -inf on the game's invalid actions."""
        q = (logits.float().softmax(-1) * self.support).sum(-1)
        return q.masked_fill(~self.valid[head], float('-inf'))

    @torch.no_grad()
    def act(self, stacks, tasks):
        """The greedy policy evaluate.py plays: stacks (n, 4, 84, 84) uint8 of the last 4 frames (zeros before the
        episode's first, as frame_stacks), tasks (n,) task ids of games with a head (load() checks) -> full ids (n,)."""
        head = self.head_of_task[tasks]
        return self.q_values(self(stacks, head), head).argmax(-1)

# -----------------------------------------------------------------------------
# data: n-step transitions with 4-frame stacks, from data.py's processed games


def nstep(rewards, terminals, t, end, n, gamma):
    """n-step targets of steps t (b,) whose episodes end at `end` (b,) (exclusive), from a game's rewards and terminals
    (N,): ret = sum_j gamma^j r_{t+j} over the k <= n steps up to and including the first terminal or the episode's last
    step; bootstrap factor gamma^k from state t+k, 0 when the window holds a terminal (never bootstrap past it) or
    reaches the episode's end (every processed episode ends on a terminal, data.split_episodes). Returns (ret, disc,
    t+k clipped into the episode: the next state, whose value a zero factor ignores)."""
    j = np.arange(n)
    idx = t[:, None] + j  # (b, n)
    inside = idx < end[:, None]
    idx = np.minimum(idx, end[:, None] - 1)
    term = terminals[idx].astype(bool) & inside
    keep = inside & (np.cumsum(term, 1) - term == 0)  # steps before or at the first terminal
    ret = (rewards[idx] * gamma ** j * keep).sum(1).astype(np.float32)
    k = keep.sum(1)
    disc = np.where(term.any(1) | (t + k >= end), 0.0, gamma ** k).astype(np.float32)
    return ret, disc, np.minimum(t + k, end - 1)


def frame_stacks(frames, t, start, k=4):
    """frames (N, 84, 84) of a game, steps t (b,), their episodes' starts (b,) -> (b, k, 84, 84) uint8: frames t-k+1..t,
    never across an episode start. Frames before the start are zeros, as DQN (Nature code) and Dopamine, which wrote
    DQN-Replay and on which Scaled-QL's code builds, pad a new episode (gym's FrameStack repeats the first frame)."""
    idx = t[:, None] + np.arange(1 - k, 1)  # (b, k)
    x = frames[np.maximum(idx, start[:, None])]
    x[idx < start[:, None]] = 0
    return x


class Transitions(data.Sampler):
    """Random n-step transitions, uniform over every step of every loaded game (data.load_dataset), drawn as
    data.Sampler draws segments (its draw, over steps here). Reproducible from (seed, rank); state_dict() resumes
    exactly."""

    def __init__(self, ds, games, n=3, gamma=0.99, seed=0, rank=0):  # not Sampler's: it pools segments, this steps
        self.ds, self.n, self.gamma = ds, n, gamma
        self.cum = np.cumsum([0] + [d['steps'] for d in ds])  # step id ranges per game
        self.heads = np.array([games.index(d['game']) for d in ds])
        self.rng = np.random.default_rng([seed, rank])

    def read(self, d, t):
        """Steps t (b,) of processed game d -> numpy dict of obs, next_obs (b, 4, 84, 84), action, ret, disc (b,)."""
        episodes = data._open(d['dir'], 'episodes')  # (E+1,) episode start offsets
        ep = np.searchsorted(episodes, t, side='right') - 1
        start, end = episodes[ep], episodes[ep + 1]
        ret, disc, nxt = nstep(data._open(d['dir'], 'rewards'), data._open(d['dir'], 'terminals'), t, end, self.n,
                               self.gamma)
        frames = data._open(d['dir'], 'frames')
        return dict(obs=frame_stacks(frames, t, start), next_obs=frame_stacks(frames, nxt, start),
                    action=data._open(d['dir'], 'actions')[t].astype(np.int64), ret=ret, disc=disc)

    def sample(self, batch_size):
        b, game = self.draw(batch_size, self.read)
        b['head'] = torch.from_numpy(self.heads[game])
        return b

# -----------------------------------------------------------------------------
# loss: C51 TD on n-step returns against the target network, plus CQL


def c51_target(next_logits, valid, ret, disc, support):
    """Target distribution (B, Z): the target net's next-state distribution of its greedy valid action (C51 as in
    Dopamine: the target net selects and evaluates), moved to ret + disc * z and projected (model.c51_project, Eq. 7
    of Bellemare et al.); disc = 0 (a terminal in the window) gives the point mass at ret."""
    p = next_logits.float().softmax(-1)  # (B, 18, Z)
    q = (p * support).sum(-1).masked_fill(~valid, float('-inf'))
    p_next = p[torch.arange(len(p)), q.argmax(-1)]  # (B, Z)
    return c51_project(ret[:, None] + disc[:, None] * support, p_next, support)


def compute_loss(model, target, batch, cfg):
    """C51 TD + cfg.cql_weight * CQL on a batch of Transitions.sample -> (loss, dict of detached terms)."""
    head, action = batch['head'], batch['action']
    rows, valid = torch.arange(len(head), device=head.device), model.valid[head]  # (B,), (B, 18)
    with torch.no_grad():
        m = c51_target(target(batch['next_obs'], head), valid, batch['ret'], batch['disc'], model.support)
    logp = model(batch['obs'], head).float().log_softmax(-1)  # (B, 18, Z)
    td = -(m * logp[rows, action]).sum(-1).mean()
    q = (logp.exp() * model.support).sum(-1)  # (B, 18)
    # CQL's logsumexp runs over the game's VALID actions only: a per-game head has outputs for those alone (an
    # invalid action has no Q to push down, and is never taken). JOWA (model.py, as the official code) runs it over
    # all 18 of its shared head. On a flat Q the term is cql_weight * log(#valid actions).
    lse = q.masked_fill(~valid, float('-inf')).logsumexp(-1)
    cql = cfg.cql_weight * (lse - q[rows, action]).mean()
    return td + cql, dict(td=td.detach(), cql=cql.detach(), q=q[rows, action].mean().detach())

# -----------------------------------------------------------------------------
# checkpoints


def load(path, games=(), **overrides):
    """A scaled_ql.py checkpoint -> (cfg, model in eval mode on the CPU); None for any other path (another script's
    checkpoint, the official pair, a missing file: model.load_checkpoint then names the problem). overrides: JOWAConfig
    evaluation fields (epsilon, max_steps, device, dtype). ValueError when a game of `games` has no head."""
    try:  # memory-mapped: a peek at the `script` key reads almost nothing of another checkpoint
        ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception:
        return None
    if not isinstance(ckpt, dict) or ckpt.get('script') != 'scaled_ql':
        return None
    known = {f.name for f in fields(JOWAConfig)}
    cfg = JOWAConfig(**{**{k: v for k, v in ckpt['config'].items() if k in known}, **overrides})
    model = ScaledQL(ckpt['args'], ckpt['games'], cfg)
    load_state(model, ckpt['model'], f'{path} (Scaled-QL model)')
    missing = [g for g in games if g not in model.games]
    if missing:
        raise ValueError(f"{path}: the Scaled-QL model has heads for {', '.join(model.games)} only, not {missing[0]}")
    return cfg, model.eval()


def print_params(cfg, games):
    for name, p in PRESETS.items():
        with torch.device('meta'):  # shapes only: no memory, no init time
            m = ScaledQL({**DEFAULTS, **p, 'preset': name}, games, cfg)
        heads = m.heads.weight.numel() + m.heads.bias.numel()
        print(f"{name:>9}: {num_params(m):>11,} parameters ({heads:,} in the heads of {len(games)} games)")

# -----------------------------------------------------------------------------
# training


def train(argv):
    cfg, args, given = parse(argv)
    games = args['games'].split(',')
    try:  # every name, file and checkpoint checked before any work
        for g in games:
            task_id(g), action_mask(g)
    except ValueError as e:
        raise SystemExit(f"error: --games: {e}")
    if args['params']:
        return print_params(cfg, games)
    ckpt_path = os.path.join(args['out_dir'], 'ckpt.pt')
    ckpt = None
    if args['resume']:
        try:
            ckpt = read_checkpoint(ckpt_path, 'scaled_ql')
            ckpt['args']['games'] = ','.join(ckpt['games'])  # as given on a command line
            cfg, args = merge_resumed(cfg, args, given, ckpt, {*ARCH, 'num_atoms', 'v_min', 'v_max', 'games', 'preset'})
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"error: --resume: {e}")
        games = ckpt['games']
    try:
        dataset = data.load_dataset(args['data_dir'], games)
        data.check_apart(('out_dir', args['out_dir']), [('data_dir', args['data_dir'])])
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")

    # DDP (gloo on CPU), device, dtype: as train.py
    ddp = int(os.environ.get('RANK', -1)) != -1
    if ddp:
        rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
        cuda = torch.cuda.is_available() and cfg.device != 'cpu'
        dist.init_process_group('nccl' if cuda else 'gloo')
        device = f"cuda:{os.environ['LOCAL_RANK']}" if cuda else 'cpu'
        if cuda:
            torch.cuda.set_device(device)
    else:
        rank, world, device = 0, 1, None  # cfg.device
    device, dtype, ctx = device_setup(cfg, device)
    master = rank == 0
    accum = cfg.batch_size // (cfg.micro_batch * world)
    if accum < 1 or accum * cfg.micro_batch * world != cfg.batch_size:
        raise SystemExit(f"error: batch_size={cfg.batch_size} must be a multiple of micro_batch={cfg.micro_batch} x "
                         f"{world} ranks")
    if master:
        remove_temp_files(args['out_dir'])
    # one data stream per (rank, micro-step): the global batch does not depend on how it is split
    samplers = [Transitions(dataset, games, args['n_step'], cfg.gamma, cfg.seed, rank * accum + i) for i in range(accum)]

    # model, target network, optimizer (same seed on every rank: identical replicas)
    torch.manual_seed(cfg.seed)
    model = ScaledQL(args, games, cfg)
    target = copy.deepcopy(model).requires_grad_(False)
    if ckpt:
        model.load_state_dict(ckpt['model'])
        target.load_state_dict(ckpt['target'])
    model.to(device).train()
    target.to(device).eval()
    if ddp:
        for t in [*model.state_dict().values(), *target.state_dict().values()]:
            dist.broadcast(t, 0)
    params = list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=args['lr'])
    step = 0
    if ckpt:
        optimizer.load_state_dict(ckpt['optimizer'])
        optimizer.param_groups[0]['lr'] = args['lr']  # the config's learning rate wins over the saved one
        step = ckpt['step']
        if len(ckpt['samplers']) == world * accum and len(ckpt['rng']) == world:
            for i, s in enumerate(samplers):
                s.load_state_dict(ckpt['samplers'][rank * accum + i])
            torch.set_rng_state(ckpt['rng'][rank])
        elif master:
            print(f"note: the checkpoint has other ranks/micro-steps, the data streams restart from seed {cfg.seed}")
    if cfg.compile:
        model.compile(), target.compile()
    if master:
        print(f"Scaled-QL {args['preset']}: {num_params(model):,} parameters, {len(games)} games, {world} rank(s) on "
              f"{device} ({dtype}), {accum} micro-step(s) of {cfg.micro_batch}: batch {cfg.batch_size}, step {step}")

    def gather(obj):  # every rank's obj, in rank order
        out = [obj] * world
        if ddp:
            dist.all_gather_object(out, obj)
        return out

    def save():
        streams, rngs = sum(gather([s.state_dict() for s in samplers]), []), gather(torch.get_rng_state())
        if master:  # tokenizer=None: read_checkpoint's key check (a model-free agent has none)
            save_checkpoint(dict(script='scaled_ql', config=asdict(cfg), args=args, games=games, step=step,
                                 model=model.state_dict(), target=target.state_dict(), optimizer=optimizer.state_dict(),
                                 samplers=streams, rng=rngs, tokenizer=None), ckpt_path)

    start, t0, t_step = step, time.time(), step
    while True:
        end = step == args['steps'] or step == args['stop_at'] > 0
        if step > start and (end or args['ckpt_interval'] and step % args['ckpt_interval'] == 0):
            save()
        if end:
            break
        stats = 0
        for sampler in samplers:
            batch = {k: v.to(device, non_blocking=True) for k, v in sampler.sample(cfg.micro_batch).items()}
            with ctx:
                loss, terms = compute_loss(model, target, batch, cfg)
            (loss / accum).backward()
            stats = stats + torch.stack([loss.detach(), *terms.values()]) / accum
        if ddp:  # gradients and logged terms averaged over ranks with one all-reduce (model.average_over_ranks)
            stats = average_over_ranks([p.grad for p in params], stats, world)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % cfg.target_update == 0:
            target.load_state_dict(model.state_dict())
        if step % args['log_interval'] == 0 or step == args['steps']:
            logs = dict(zip(['loss', *terms], stats.tolist()))  # .tolist(): the one CPU-GPU sync per log line
            if not all(map(math.isfinite, logs.values())):
                raise SystemExit(f"error: non-finite loss at step {step}; the last checkpoint is kept")
            dt, t0, t_step = (time.time() - t0) / (step - t_step), time.time(), step
            if master:
                print(f"step {step} | " + ' '.join(f'{k} {v:.4f}' for k, v in logs.items()) +
                      f" | lr {args['lr']:.1e} | {dt * 1000:.0f} ms | {cfg.batch_size / dt:,.0f} samples/s", flush=True)
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == '__main__':
    train(sys.argv[1:])
