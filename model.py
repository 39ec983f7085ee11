"""
JOWA world-action model: one GPT-style transformer over interleaved (36 obs tokens, 1 action token) blocks,
trained jointly as a world model (next-token / reward-sign / termination cross-entropies) and as a
distributional critic (C51 TD + CQL) on the same backbone. Also home of the shared config dataclass, the
`--key=value` override parser, the 60-game table and the loader for our and the official checkpoints.

    python model.py            # prints the parameter counts of every preset
"""
import ast
import math
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass, fields, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer import Tokenizer, convert_official_tokenizer, strip_prefixes

# -----------------------------------------------------------------------------
# config


@dataclass
class JOWAConfig:
    # --- world-action transformer (paper §3, REFERENCE B§2)
    preset: str = '40M'        # name of the size preset these values came from
    n_layer: int = 4
    n_head: int = 8
    n_embd: int = 512
    q_hidden: int = 768        # Q-head MLP width D
    num_q: int = 1             # Q ensemble members (averaged in probability space)
    dropout: float = 0.1       # embedding / attention / residual dropout
    q_dropout: float = 0.01    # dropout after the first Q-head Linear
    obs_tokens: int = 36       # tokens per frame (6x6 latent grid)
    max_blocks: int = 8        # context length in (obs, action) blocks
    obs_vocab: int = 2048      # VQ codebook size
    num_actions: int = 18      # full ALE action set
    num_tasks: int = 60        # task-embedding table size (alphabetical game list)
    # --- VQ-VAE tokenizer (B§1)
    tok_ch: int = 64           # conv channels
    tok_embed_dim: int = 512   # codebook vector size = encoder z channels
    # --- C51 / CQL / loss weights (B§4)
    num_atoms: int = 51
    v_min: float = -10.0
    v_max: float = 30.0
    gamma: float = 0.99
    cql_weight: float = 0.1    # alpha of the CQL penalty (0 = no CQL ablation)
    q_penalty: str = 'cql'     # 'cql', 'combo' (data-action term on real rows only) or 'none' (B§4.4)
    objective: str = 'jowa'    # 'jowa', or 'bc': MTBC (paper App. E.1.2), no world heads, 18-way Q-head classifiers
    world_weight: float = 0.1  # lambda of Eq. 9 in stage 2 / fine-tuning (0 = no world-loss ablation)
    td_loss: str = 'c51'       # 'c51' or 'mse' (ablation: 0.5*MSE on the expected Q)
    detach_critic: bool = False  # ablation: TD/CQL gradients do not reach the backbone
    # --- training (B§5)
    batch_size: int = 512      # segments per optimizer step, summed over ranks and micro-steps
    micro_batch: int = 64      # segments per forward pass per rank (grad accumulation fills the rest)
    stage1_steps: int = 250_000    # tokenizer + world model
    stage2_steps: int = 1_500_000  # frozen tokenizer, joint world + critic loss
    tok_batch: int = 2048      # frames per tokenizer step, summed over ranks
    lr_tokenizer: float = 1e-4   # Adam
    tok_restart: int = 0       # stage-1 steps between restarts of unused codebook codes (0 = none, as official)
    tok_perceptual: float = 1.0  # weight of the LPIPS term (official 1; 0 skips LPIPS-VGG, most of a CPU step)
    tok_fg_weight: float = 0.0   # extra L1 weight of pixels off the frame's background grey (0 = official): with
                                 # sparse sprites on black, a short training otherwise learns black frames
    lr_world1: float = 1e-4      # AdamW, stage 1
    lr_world2: float = 5e-5      # AdamW, stage 2 and fine-tuning
    lr_critic: float = 5e-5      # AdamW, Q head
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    target_update: int = 1000  # hard copy of the online Q head into the target head every N steps
    seed: int = 0
    device: str = 'auto'       # 'auto' = cuda if available else cpu
    dtype: str = 'auto'        # 'auto' = bfloat16 on CUDA, float32 on CPU; or float32 / bfloat16
    compile: bool = False
    # --- planning / evaluation (B§7, B§8)
    horizon: int = 2           # beam-search depth H (0 = greedy Q policy); MCTS: max tree depth H - 1
    planner: str = 'beam'      # 'beam' (the paper's) or 'mcts' (its Table 5 comparison, mcts.MCTS)
    mcts_simulations: int = 20  # MCTS simulations per decision (official eval_MCTS.sh)
    mcts_temperature: float = 0.9  # MCTS priors softmax(Q / T) (official eval_MCTS.sh)
    plan_lambda: float = 1.0   # beam score: lambda-return of the path's n-step estimates (1 = official, 0 = greedy)
    beam: int = 0              # beam width K (0 = per-game official table)
    context: int = 0           # context blocks at decision time (0 = per-game official table)
    epsilon: float = 0.001     # probability of a random valid action at evaluation
    max_steps: int = 108_000   # agent-step cap per episode

    @property
    def tokens_per_block(self):
        return self.obs_tokens + 1

    @property
    def max_tokens(self):
        return self.tokens_per_block * self.max_blocks


# fields fixed once a model is built: a checkpoint's values win over the command line for these
ARCH_FIELDS = ('preset', 'n_layer', 'n_head', 'n_embd', 'q_hidden', 'num_q', 'dropout', 'q_dropout', 'obs_tokens',
               'max_blocks', 'obs_vocab', 'num_actions', 'num_tasks', 'tok_ch', 'tok_embed_dim', 'num_atoms',
               'v_min', 'v_max', 'objective')

# the official sizes (B§2.1); 'tiny' is for CPU tests and demos
PRESETS = {
    '40M': dict(n_layer=4, n_head=8, n_embd=512, q_hidden=768, num_q=1),
    '70M': dict(n_layer=6, n_head=12, n_embd=768, q_hidden=1024, num_q=1),
    '150M': dict(n_layer=12, n_head=12, n_embd=768, q_hidden=1792, num_q=3),
    'tiny': dict(n_layer=2, n_head=4, n_embd=64, q_hidden=32, num_q=2, tok_ch=32, tok_embed_dim=64, obs_vocab=512,
                 batch_size=16, micro_batch=16, tok_batch=64, stage1_steps=300, stage2_steps=300, target_update=100),
}


def device_setup(cfg, device=None):
    """The one resolution of cfg.device and cfg.dtype for every script: (device str, dtype name, autocast context).
    'auto' device: CUDA if there is one, else the CPU; 'auto' dtype: bfloat16 autocast on CUDA (the official
    recipe), float32 on the CPU. `device`: one already chosen (a DDP rank's, a model's) instead of cfg.device."""
    if device is None:
        device = ('cuda' if torch.cuda.is_available() else 'cpu') if cfg.device == 'auto' else cfg.device
    kind = torch.device(device).type
    dtype = ('bfloat16' if kind == 'cuda' else 'float32') if cfg.dtype == 'auto' else cfg.dtype
    amp = nullcontext() if dtype == 'float32' else torch.autocast(kind, dtype=getattr(torch, dtype))
    return str(device), dtype, amp


def merge_resumed(cfg, args, given, ckpt, fixed=ARCH_FIELDS):
    """The one resume rule of train.py, finetune.py and scaled_ql.py: the checkpoint's config and settings, except
    what this command line gives again (`given`: the keys it names; cfg, args: as parsed). A key of `fixed` given
    with another value than the saved one is an error: the weights fix the architecture, and a saved state may
    depend on a setting. Returns (cfg, args)."""
    now, saved = {**asdict(cfg), **args}, {**ckpt['config'], **ckpt['args']}
    for k in sorted(given & set(fixed)):
        if k in saved and now[k] != saved[k]:
            raise ValueError(f"--{k}={now[k]} differs from the checkpoint's {saved[k]!r} (fixed by it)")
    cfg = JOWAConfig(**{**ckpt['config'], **{k: v for k, v in asdict(cfg).items() if k in given}})
    once = {'resume', 'stop_at', 'init_from'}  # this command's own, never the saved run's
    return cfg, {**args, **{k: v for k, v in ckpt['args'].items() if k not in given | once}}


def make_config(preset='40M', **overrides):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return JOWAConfig(**{**PRESETS[preset], 'preset': preset, **overrides})


def parse_args(argv, extra=None, rules=None):
    """nanoGPT-style overrides: `--preset=70M --key=value ...` onto JOWAConfig, plus a script's own `extra`
    dict of settings (updated in place). Values are Python literals (or bare strings) and must match the
    default's type; `--flag` alone means True; unknown keys are an error. Then every config field and the extra
    settings named in `rules` ({key: rule of check_value}) are checked. Returns (cfg, extra)."""
    extra = {} if extra is None else extra
    kv = {}
    for arg in argv:
        if arg in ('-h', '--help'):
            names = [f'{f.name}={getattr(JOWAConfig, f.name)!r}' for f in fields(JOWAConfig)]
            print('options (--key=value):\n  ' + '\n  '.join(names + [f'{k}={v!r}' for k, v in extra.items()]))
            sys.exit(0)
        if not arg.startswith('--'):
            raise SystemExit(f"error: unexpected argument {arg!r} (use --key=value)")
        key, _, val = arg[2:].partition('=')
        kv[key.replace('-', '_')] = val if _ else 'True'
    preset = kv.pop('preset', '40M')
    if preset not in PRESETS:
        raise SystemExit(f"error: --preset={preset}: choose one of {', '.join(PRESETS)}")
    cfg = make_config(preset)
    types = {f.name: type(getattr(cfg, f.name)) for f in fields(cfg)}
    for key, val in kv.items():
        if key in types:
            default_type = types[key]
        elif key in extra:
            default_type = type(extra[key])
        else:
            raise SystemExit(f"error: unknown option --{key} (see --help)")
        try:
            v = ast.literal_eval(val)
        except (ValueError, SyntaxError):
            v = val  # a bare string
        if default_type is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if default_type is str and not isinstance(v, str):
            v = val
        if not isinstance(v, default_type) or (default_type is int and isinstance(v, bool)):
            raise SystemExit(f"error: --{key}={val} must be of type {default_type.__name__}")
        if key in types:
            setattr(cfg, key, v)
        else:
            extra[key] = v
    check_config(cfg)
    for key, rule in (rules or {}).items():
        check_value(key, extra[key], rule)
    return cfg, extra


# -----------------------------------------------------------------------------
# option checks, before any work: one line naming the option, its value and what is allowed

RULES = {'>0': (lambda v: v > 0, 'must be > 0'), '>=0': (lambda v: v >= 0, 'must be >= 0'),
         '[0,1)': (lambda v: 0 <= v < 1, 'must be in [0, 1)'), '[0,1]': (lambda v: 0 <= v <= 1, 'must be in [0, 1]'),
         '(0,1]': (lambda v: 0 < v <= 1, 'must be in (0, 1]'),
         'dir': (lambda v: writable(v, folder=True), 'must be a folder that can be created and written'),
         'file': (lambda v: not v or writable(v, folder=False), 'must be a file path that can be written')}
CONFIG_RULES = dict(
    n_layer='>0', n_head='>0', n_embd='>0', q_hidden='>0', num_q='>0', obs_tokens=(36,), max_blocks='>0',
    obs_vocab='>0', num_actions=(18,), num_tasks='>0', tok_ch='>0', tok_embed_dim='>0', num_atoms='>0',
    dropout='[0,1)', q_dropout='[0,1)', gamma='(0,1]', cql_weight='>=0', world_weight='>=0', td_loss=('c51', 'mse'),
    q_penalty=('cql', 'combo', 'none'), objective=('jowa', 'bc'),
    batch_size='>0', micro_batch='>0', stage1_steps='>=0', stage2_steps='>=0', tok_batch='>0', tok_restart='>=0',
    tok_perceptual='>=0', tok_fg_weight='>=0', lr_tokenizer='>0', lr_world1='>0', lr_world2='>0', lr_critic='>0',
    weight_decay='>=0', grad_clip='>0', target_update='>0', dtype=('auto', 'float32', 'bfloat16', 'float16'), horizon='>=0',
    beam='>=0', context='>=0', epsilon='[0,1]', max_steps='>0', planner=('beam', 'mcts'), mcts_simulations='>0',
    mcts_temperature='>0', plan_lambda='[0,1]')


def writable(path, folder):
    """Can `path` be created (or, existing, written) as a folder (folder=True) or a file, without touching it?"""
    path = os.path.abspath(path)
    if os.path.exists(path):
        return os.path.isdir(path) == folder and os.access(path if folder else os.path.dirname(path), os.W_OK)
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return os.path.isdir(parent) and os.access(parent, os.W_OK)


def check_value(key, v, rule):
    """rule: a name in RULES, or a tuple of the allowed values. Raises SystemExit with one line."""
    if isinstance(rule, tuple):
        if v not in rule:
            raise SystemExit(f"error: --{key}={v}: choose one of {', '.join(map(str, rule))}")
        return
    ok, allowed = RULES[rule]
    if isinstance(v, float) and not math.isfinite(v):
        raise SystemExit(f"error: --{key}={v} must be a finite number")
    if not ok(v):
        raise SystemExit(f"error: --{key}={v} {allowed}")


def check_config(cfg):
    """Every JOWAConfig field in its range, the fields consistent with each other, and the device and dtype ones
    this torch has."""
    for key, rule in CONFIG_RULES.items():
        check_value(key, getattr(cfg, key), rule)
    if cfg.n_embd % cfg.n_head:
        raise SystemExit(f"error: --n_embd={cfg.n_embd} must be a multiple of --n_head={cfg.n_head}")
    if cfg.v_min >= cfg.v_max:
        raise SystemExit(f"error: --v_min={cfg.v_min} must be below --v_max={cfg.v_max}")
    if cfg.horizon >= cfg.max_blocks:  # the root context needs a block (a longer context is cut to fit, B§7.2)
        raise SystemExit(f"error: --horizon={cfg.horizon} must be below the model's {cfg.max_blocks} blocks")
    if cfg.context > cfg.max_blocks:
        raise SystemExit(f"error: --context={cfg.context} must be at most the model's {cfg.max_blocks} blocks")
    dev = cfg.device
    if dev not in ('auto', 'cpu') and not dev.startswith(('cuda', 'mps')):
        raise SystemExit(f"error: --device={dev}: choose auto, cpu, cuda, cuda:<index> or mps")
    if dev.startswith('cuda'):
        n = torch.cuda.device_count()
        index = dev.partition(':')[2]
        if not n or (index and (not index.isdigit() or int(index) >= n)):
            raise SystemExit(f"error: --device={dev}: this torch {torch.__version__} sees {n} CUDA device(s)")
    if dev == 'mps' and not torch.backends.mps.is_available():
        raise SystemExit(f"error: --device=mps: not available in this torch {torch.__version__}")


# -----------------------------------------------------------------------------
# games (B§3.3, B§8.3)

GAMES = ('AirRaid Alien Amidar Assault Asterix Asteroids Atlantis BankHeist BattleZone BeamRider Berzerk Bowling '
         'Boxing Breakout Carnival Centipede ChopperCommand CrazyClimber DemonAttack DoubleDunk ElevatorAction Enduro '
         'FishingDerby Freeway Frostbite Gopher Gravitar Hero IceHockey Jamesbond JourneyEscape Kangaroo Krull '
         'KungFuMaster MontezumaRevenge MsPacman NameThisGame Phoenix Pitfall Pong Pooyan PrivateEye Qbert Riverraid '
         'RoadRunner Robotank Seaquest Skiing Solaris SpaceInvaders StarGunner Tennis TimePilot Tutankham UpNDown '
         'Venture VideoPinball WizardOfWor YarsRevenge Zaxxon').split()  # task id = index
ALL18 = tuple(range(18))
# valid full action ids per game; minimal (ALE / DQN-Replay) action i <-> the i-th id
VALID_ACTIONS = {
    'Phoenix': (0, 1, 3, 4, 5, 11, 12, 13), 'Centipede': ALL18, 'SpaceInvaders': (0, 1, 3, 4, 11, 12),
    'Carnival': (0, 1, 3, 4, 11, 12), 'NameThisGame': (0, 1, 3, 4, 11, 12), 'Assault': (0, 1, 2, 3, 4, 11, 12),
    'Atlantis': (0, 1, 11, 12), 'BeamRider': (0, 1, 2, 3, 4, 6, 7, 11, 12), 'Seaquest': ALL18,
    'TimePilot': (0, 1, 2, 3, 4, 5, 10, 11, 12, 13), 'Berzerk': ALL18, 'Zaxxon': ALL18,
    'DemonAttack': (0, 1, 3, 4, 11, 12), 'ChopperCommand': ALL18, 'StarGunner': ALL18,
    'Pong': (0, 1, 3, 4, 11, 12), 'Robotank': ALL18, 'YarsRevenge': ALL18, 'Gravitar': ALL18,
    'MsPacman': (0, 2, 3, 4, 5, 6, 7, 8, 9),
}
PRETRAIN_GAMES = ('Phoenix Centipede SpaceInvaders Carnival NameThisGame Assault Atlantis DemonAttack BeamRider '
                  'ChopperCommand Seaquest TimePilot StarGunner Berzerk Zaxxon').split()
HELDOUT_GAMES = ('Pong', 'Robotank', 'YarsRevenge', 'Gravitar', 'MsPacman')
# (random, human, DQN) scores used for HNS / DNS (B§8.3)
REF_SCORES = {
    'Assault': (222.4, 742.0, 1525.2), 'Atlantis': (12850.0, 29028.1, 853640.0),
    'BeamRider': (363.9, 16926.5, 5852.4), 'Berzerk': (123.7, 2630.4, 487.5), 'Carnival': (700.8, 3800.0, 4784.8),
    'Centipede': (2090.9, 12017.0, 2583.0), 'ChopperCommand': (811.0, 7387.8, 2690.6),
    'DemonAttack': (152.1, 1971.0, 6361.6), 'NameThisGame': (2292.3, 8049.0, 7278.6),
    'Phoenix': (761.4, 7242.6, 4996.6), 'Seaquest': (68.4, 42054.7, 1600.7),
    'SpaceInvaders': (148.0, 1668.7, 1794.2), 'StarGunner': (664.0, 10250.0, 42165.2),
    'TimePilot': (3568.0, 5229.2, 3654.4), 'Zaxxon': (32.5, 9173.3, 4538.6), 'Gravitar': (173.0, 3351.4, 330.1),
    'MsPacman': (307.3, 6951.6, 3402.4), 'Pong': (-20.7, 14.6, 16.6), 'Robotank': (2.2, 11.9, 59.8),
    'YarsRevenge': (3092.9, 54576.9, 23909.4),
}


def task_id(game):
    if game not in GAMES:
        raise ValueError(f"unknown game {game!r}; known games: {', '.join(GAMES)}")
    return GAMES.index(game)


def action_mask(game):
    """(18,) bool: True on the game's valid full action ids."""
    if game not in VALID_ACTIONS:
        raise ValueError(f"no action mask for game {game!r}; games with masks: {', '.join(VALID_ACTIONS)}")
    mask = torch.zeros(18, dtype=torch.bool)
    mask[list(VALID_ACTIONS[game])] = True
    return mask


def action_masks():
    """(60, 18) bool table indexed by task id; games without a known mask allow all 18 actions."""
    return torch.stack([action_mask(g) if g in VALID_ACTIONS else torch.ones(18, dtype=torch.bool) for g in GAMES])


def normalized_score(game, score, kind='human'):
    """HNS (kind='human') or DNS (kind='dqn'): (score - min(random, ref)) / |ref - random|."""
    rnd, human, dqn = REF_SCORES[game]
    ref = human if kind == 'human' else dqn
    return (score - min(rnd, ref)) / abs(ref - rnd)


# -----------------------------------------------------------------------------
# world-action transformer (B§2)

class KVCache:
    """Preallocated keys and values of every layer, each (n_layer, B, n_head, length, head_dim), length (default
    max_tokens) the positions held. Positions are per row (see JOWA.forward), so rows may hold contexts of different
    lengths. select copies rows (beam expansion and pruning); read/write move blocks of positions per row (a search
    tree that keeps each node's block apart, mcts.py); fork shares the keys of a context between the rows that go on
    from it (a beam's candidates)."""

    def __init__(self, cfg, batch, device='cpu', dtype=torch.float32, length=None):
        shape = (cfg.n_layer, batch, cfg.n_head, length or cfg.max_tokens, cfg.n_embd // cfg.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.prefix = self.base = None  # a forked cache's shared prefix (KVCache) and where each row's own part starts

    def fork(self, base, length):
        """A cache for rows that go on from this cache's G rows: this cache becomes their shared prefix, read by each
        row at positions < base (B,), and each row's positions base .. base + length - 1 are its own `length` slots.
        Rows are group-major: B = G x R, rows g*R .. g*R + R - 1 go on from prefix row g (fork itself: R = 1; select
        must keep that order). Why: a beam's candidates share their environment's context, whose keys are then
        stored and read once per environment, not copied to and read by every candidate (prefix_attention)."""
        L, G, nh, _, hd = self.k.shape
        new = KVCache.__new__(KVCache)
        new.k, new.v = (self.k.new_zeros(L, G, nh, length, hd) for _ in range(2))
        new.prefix, new.base = self, base
        return new

    def select(self, idx):
        """New cache holding rows idx (B',) of this one: beam expansion (repeat) and pruning (gather)."""
        new = KVCache.__new__(KVCache)
        new.k, new.v = self.k.index_select(1, idx), self.v.index_select(1, idx)
        new.prefix, new.base = self.prefix, None if self.base is None else self.base.index_select(0, idx)
        return new

    def _index(self, pos, n):  # rows (B, 1) and positions (B, n): pos (B,) .. pos + n - 1 of each row
        return torch.arange(len(pos), device=pos.device)[:, None], pos[:, None] + torch.arange(n, device=pos.device)

    # indexing, not gather/scatter_ along the position dimension (scatter_ into a bfloat16 cache is far slower on a
    # CPU: bench.py plan); cache[:, rows, :, slots] is (B, n, L, nh, hd), hence the permutes
    def read(self, pos, n):
        """Keys and values (L, B, nh, n, hd) at positions pos (B,) .. pos + n - 1 of each row."""
        rows, slots = self._index(pos, n)
        return (c[:, rows, :, slots].permute(2, 0, 3, 1, 4) for c in (self.k, self.v))

    def write(self, pos, k, v):
        """Store k, v (L, B, nh, n, hd) at positions pos (B,) .. pos + n - 1 of each row."""
        rows, slots = self._index(pos, k.shape[3])
        self.k[:, rows, :, slots], self.v[:, rows, :, slots] = k.permute(1, 3, 0, 2, 4), v.permute(1, 3, 0, 2, 4)


def dropout(x, p, training=True):
    """Inverted dropout. On CPU the mask comes from 16-bit slices of 64-bit random words: one generator call per four
    elements makes it ~3x faster than F.dropout there (whose per-element Bernoulli draws took a fifth of a bf16
    training step), and p is rounded to a multiple of 1/65536 (0.1 -> 0.100006). Other devices use F.dropout."""
    if not training or p == 0:
        return x
    if x.device.type != 'cpu':
        return F.dropout(x, p, True)
    n, drop = x.numel(), round(p * 65536)
    r = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2 ** 63, None)  # all 64 bits uniform
    keep = r.view(torch.int16)[:n].view(x.shape) >= drop - 32768  # P(keep) = 1 - drop / 65536
    scale = torch.tensor(65536 / (65536 - drop), dtype=x.dtype, device=x.device)
    return x * torch.where(keep, scale, 0)  # a mask in x's dtype: multiplying by a bool mask would cast it, twice


class Dropout(nn.Dropout):
    def forward(self, x):
        return dropout(x, self.p, self.training)


def prefix_attention(q, k, v, prefix_k, prefix_v, bias, prefix_bias):
    """Attention of queries q (B, nh, T, hs) over each row's own keys and values k, v (B, nh, S, hs), with additive
    bias (B, 1, T, S) (0 where allowed, -inf not), and over its group's shared prefix prefix_k, prefix_v (G, nh, n,
    hs) with prefix_bias (B, 1, 1, n) (a forked KVCache; rows group-major, B = G x R): one softmax over both parts,
    no dropout. The prefix is read once per group: the R rows' queries form one (R*T, hs) batch against it. The
    softmax is written out in place (exp of the scores less their joint max, over the joint sum): each score is
    written once."""
    B, nh, T, hs = q.shape
    G = prefix_k.shape[0]
    R = B // G
    group = lambda t: t.view(G, R, nh, T, -1).transpose(1, 2).reshape(G, nh, R * T, -1)  # (B,nh,T,X) -> (G,nh,RT,X)
    ungroup = lambda t: t.view(G, nh, R, T, -1).transpose(1, 2).reshape(B, nh, T, -1)
    q = q * hs ** -0.5
    s1 = ungroup(group(q) @ prefix_k.transpose(-2, -1)).add_(prefix_bias)  # (B, nh, T, n)
    s2 = (q @ k.transpose(-2, -1)).add_(bias)  # (B, nh, T, S)
    m = torch.maximum(s1.amax(-1, keepdim=True), s2.amax(-1, keepdim=True))  # (B, nh, T, 1): finite (a row sees
    s1, s2 = s1.sub_(m).exp_(), s2.sub_(m).exp_()  # at least its own key)
    # (the pointwise steps stay in the (B, ...) layout: fused with the group/ungroup reshapes, torch.compile with
    # dynamic shapes computed them wrong)
    return (ungroup(group(s1) @ prefix_v) + s2 @ v) / (s1.sum(-1, keepdim=True) + s2.sum(-1, keepdim=True))


class SelfAttention(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # official query, key, value stacked in that order
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_drop = Dropout(cfg.dropout)

    def forward(self, x, cache=None, layer=0, write_idx=None, mask=None, rows=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        p = self.dropout if self.training else 0.0
        if cache is not None and write_idx is None:  # prefill from position 0: keys/values go to [0, T)
            cache.k[layer, :, :, :T], cache.v[layer, :, :, :T] = k, v
        if rows is not None:  # queries only at positions rows (B, R) of a window from 0, each over the keys <= it
            q = q.gather(2, rows[:, None, :, None].expand(-1, self.n_head, -1, q.shape[-1]))  # (B, nh, R, hs)
            see = torch.arange(T, device=x.device) <= rows[..., None]  # (B, R, T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=see[:, None], dropout_p=p)
            return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, -1, C)))
        if cache is None and p > 0 and x.device.type == 'cpu':  # training on CPU: written out for the cheaper
            # dropout mask (SDPA's math path would draw it with F.dropout); scale and causal mask fused in the matmul
            causal = torch.full((T, T), float('-inf'), device=x.device).triu(1)  # (T, T) 0 / -inf
            hs = C // self.n_head
            att = torch.baddbmm(causal, q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2), alpha=hs ** -0.5)  # (B*nh,T,T)
            y = dropout(att.softmax(-1), p).view(B, self.n_head, T, T) @ v
        elif cache is None or write_idx is None:  # window from position 0: causal attention (FlashAttention on GPU)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            # write the new keys/values at their positions, attend over the whole preallocated cache with an
            # explicit mask: is_causal=True would align the mask top-left, wrong when T < cache length (B§2.3)
            rows = torch.arange(B, device=x.device)[:, None]  # (B, 1); [rows, :, write_idx] is (B, T, nh, hs)
            cache.k[layer][rows, :, write_idx] = k.transpose(1, 2).to(cache.k.dtype)
            cache.v[layer][rows, :, write_idx] = v.transpose(1, 2).to(cache.v.dtype)
            k, v = cache.k[layer].to(q.dtype), cache.v[layer].to(q.dtype)
            if cache.prefix is None:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
            else:  # a forked cache: mask = (own keys' bias, prefix keys' bias)
                pk, pv = (c[layer].to(q.dtype) for c in (cache.prefix.k, cache.prefix.v))
                y = prefix_attention(q, k, v, pk, pv, *mask)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    """Pre-LN transformer block with exact (erf) GELU (B§2.2)."""

    def __init__(self, cfg):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn = SelfAttention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd), Dropout(cfg.dropout))

    def forward(self, x, rows=None, **kw):
        """rows (B, R): the block's output only at those positions (B, R, E), see JOWA.forward."""
        a = self.attn(self.ln1(x), rows=rows, **kw)
        x = x + a if rows is None else x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1])) + a
        return x + self.mlp(self.ln2(x))


class QHead(nn.Module):
    """Ensemble of num_q MLPs (B§3.2): Linear -> Dropout -> LayerNorm -> Mish, Linear -> LayerNorm -> Mish,
    Linear to A*Z logits (action-major). Members are stacked tensors run as batched matmuls; each keeps
    PyTorch's default Linear init (the official N(0, 0.02) init never reached them)."""
    names = ('w0', 'b0', 'ln0_w', 'ln0_b', 'w1', 'b1', 'ln1_w', 'ln1_b', 'w2', 'b2')  # official params.0..9

    def __init__(self, cfg):
        super().__init__()
        atoms = 1 if cfg.objective == 'bc' else cfg.num_atoms  # MTBC: one logit per action
        M, E, D, O = cfg.num_q, cfg.n_embd, cfg.q_hidden, cfg.num_actions * atoms
        self.p, self.A = cfg.q_dropout, cfg.num_actions
        for i, (fan_in, fan_out) in enumerate([(E, D), (D, D), (D, O)]):
            bound = 1 / math.sqrt(fan_in)  # = kaiming_uniform(a=sqrt(5)) of nn.Linear
            setattr(self, f'w{i}', nn.Parameter(torch.empty(M, fan_out, fan_in).uniform_(-bound, bound)))
            setattr(self, f'b{i}', nn.Parameter(torch.empty(M, fan_out).uniform_(-bound, bound)))
        for i in range(2):
            setattr(self, f'ln{i}_w', nn.Parameter(torch.ones(M, D)))
            setattr(self, f'ln{i}_b', nn.Parameter(torch.zeros(M, D)))

    def forward(self, h):
        """h (..., E) -> logits (M, ..., A, Z)."""
        M, lead = self.w0.shape[0], h.shape[:-1]
        x = h.reshape(1, -1, h.shape[-1]).expand(M, -1, -1)  # (M, N, E)
        x = torch.baddbmm(self.b0[:, None], x, self.w0.transpose(1, 2))
        x = dropout(x, self.p, self.training)  # independent masks per member
        x = F.mish(F.layer_norm(x, x.shape[-1:]) * self.ln0_w[:, None] + self.ln0_b[:, None])
        x = torch.baddbmm(self.b1[:, None], x, self.w1.transpose(1, 2))
        x = F.mish(F.layer_norm(x, x.shape[-1:]) * self.ln1_w[:, None] + self.ln1_b[:, None])
        x = torch.baddbmm(self.b2[:, None], x, self.w2.transpose(1, 2))  # (M, N, A*Z)
        return x.view(M, *lead, self.A, -1)


def head(E, out):  # obs / reward / end heads: Linear -> ReLU -> Linear (B§3.1)
    return nn.Sequential(nn.Linear(E, E), nn.ReLU(), nn.Linear(E, out))


class JOWA(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        E = cfg.n_embd
        self.act_emb, self.obs_emb = nn.Embedding(cfg.num_actions, E), nn.Embedding(cfg.obs_vocab, E)
        self.task_emb_act, self.task_emb_obs = nn.Embedding(cfg.num_tasks, E), nn.Embedding(cfg.num_tasks, E)
        self.pos_emb = nn.Embedding(cfg.max_tokens, E)  # absolute position inside the current window
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(E)
        if cfg.objective != 'bc':  # MTBC removes the observation, reward and termination predictors
            self.head_obs, self.head_rew, self.head_end = head(E, cfg.obs_vocab), head(E, 3), head(E, 2)
        self.apply(self._init_weights)  # B§2.5; QHead holds raw tensors and keeps its default init
        self.head_q, self.head_q_target = QHead(cfg), QHead(cfg)
        self.head_q_target.load_state_dict(self.head_q.state_dict())
        self.head_q_target.requires_grad_(False)
        self.register_buffer('support', torch.linspace(cfg.v_min, cfg.v_max, cfg.num_atoms), persistent=False)
        self.register_buffer('valid', action_masks(), persistent=False)  # (60, 18) valid actions per task

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)

    def train(self, mode=True):
        super().train(mode)
        self.head_q_target.eval()  # the target head never uses dropout
        return self

    def forward(self, tokens, tasks, cache=None, pos=None, rows=None):
        """tokens (B, T) interleaved obs / action ids, tasks (B,) -> hidden states (B, T, E) after ln_f.
        Without a cache, or with a cache and pos None (prefill), the window starts at position 0. With a cache and
        pos (B,), the position of tokens[:, 0] in each row's window, keys/values are written there and each token
        attends to the cached positions <= its own (the planner's decoding, plan.py). rows (B, R), only with pos
        None: the hidden states (B, R, E) at those positions alone; the last block then runs its queries, attention
        output and MLP only there (greedy and prefill read 1 or 37 positions: the rest of that work is discarded)."""
        B, T = tokens.shape
        p = torch.arange(T, device=tokens.device) + (0 if pos is None else pos[:, None])  # (B, T) (or (T,)) positions
        is_act = (p % self.cfg.tokens_per_block) == self.cfg.obs_tokens  # (B, T) action-token positions
        tok = torch.where(is_act[..., None], self.act_emb(tokens * is_act), self.obs_emb(tokens * ~is_act))
        task = torch.where(is_act[..., None], self.task_emb_act(tasks)[:, None], self.task_emb_obs(tasks)[:, None])
        x = self.drop(tok + self.pos_emb(p) + task)
        kw = {} if cache is None else dict(cache=cache)
        if cache is not None and pos is not None:  # slots (B, T) of the new keys: positions, less a fork's base
            slot = p if cache.base is None else p - cache.base[:, None]
            keys = torch.arange(cache.k.shape[3], device=tokens.device)
            mask = (keys <= slot[..., None])[:, None]  # (B, 1, T, S)
            if cache.prefix is not None:  # and the prefix's keys before each row's base
                pre = torch.arange(cache.prefix.k.shape[3], device=tokens.device) < cache.base[:, None]  # (B, n)
                zero = torch.zeros((), device=tokens.device)  # additive biases: 0 where allowed, -inf not
                mask = (zero.masked_fill(~mask, float('-inf')),
                        zero.masked_fill(~pre, float('-inf'))[:, None, None])  # (B, 1, T, S), (B, 1, 1, n)
            kw = dict(cache=cache, write_idx=slot, mask=mask)
        if rows is not None and pos is not None:
            raise ValueError("rows: only for a window from position 0 (pos None)")
        for i, block in enumerate(self.blocks):
            x = block(x, layer=i, rows=rows if i == len(self.blocks) - 1 else None, **kw)
        return self.ln_f(x)

    def world_logits(self, h):
        """h (B, T, 37, E) -> logits of the obs tokens (B, T*36-1, V), where slot j predicts token j+1 of the
        flattened frames (the action token predicts the next frame's first token), and of the reward sign class
        (B, T, 3) and termination (B, T, 2), both read at the action tokens (B§3.1)."""
        K = self.cfg.obs_tokens
        obs_h = torch.cat([h[:, :, :K - 1], h[:, :, K:]], 2).flatten(1, 2)[:, :-1]  # (B, T*K-1, E)
        act_h = h[:, :, K]  # (B, T, E)
        return self.head_obs(obs_h), self.head_rew(act_h), self.head_end(act_h)

    def q_probs(self, h, target=False):
        """Ensemble-mean C51 probabilities (..., A, Z) from features h (..., E) (B§3.2)."""
        if target:
            with torch.no_grad():
                return self.head_q_target(h.detach()).float().softmax(-1).mean(0)
        return self.head_q(h).float().softmax(-1).mean(0)

    def q_values(self, h, tasks=None, target=False):
        """Expected Q (..., A); with tasks (B,) (h of shape (B, ..., E)) invalid actions are -inf. MTBC: the log of
        the ensemble-mean action probabilities over the valid actions (so argmax is its policy)."""
        if self.cfg.objective == 'bc':
            return self.bc_log_probs(h, tasks).exp().mean(0).log()
        q = (self.q_probs(h, target) * self.support).sum(-1)
        if tasks is not None:
            valid = self.valid[tasks].view(tasks.shape[0], *[1] * (q.dim() - 2), q.shape[-1])
            q = q.masked_fill(~valid, float('-inf'))
        return q

    def bc_log_probs(self, h, tasks=None):
        """MTBC: every ensemble member's action log-probabilities (M, ..., A), over the valid actions with tasks."""
        logits = self.head_q(h).squeeze(-1).float()  # (M, ..., A)
        if tasks is not None:
            valid = self.valid[tasks].view(1, tasks.shape[0], *[1] * (logits.dim() - 3), logits.shape[-1])
            logits = logits.masked_fill(~valid, float('-inf'))
        return logits.log_softmax(-1)

    @torch.no_grad()
    def update_target(self):
        self.head_q_target.load_state_dict(self.head_q.state_dict())

    # -------------------------------------------------------------------------
    # losses (B§4)

    def compute_loss(self, batch, tokenizer=None, stage=2):
        """batch: B§4.1 dict of (B, T) tensors; observations are tokens (B, T, K) or frames (B, T, 1, 84, 84)
        encoded here with the frozen tokenizer. Optional batch['real'] (B,) marks real (not imagined) rows:
        only those enter the world-model cross-entropies. Stage 1: world CE only. Stage 2 (Eq. 9):
        world_weight * world CE + C51 TD + CQL. Returns (loss, dict of detached terms)."""
        cfg = self.cfg
        obs, act, rew, ends, mask = (batch[k] for k in ('observations', 'actions', 'rewards', 'ends', 'mask_padding'))
        tasks = batch['envs']
        if obs.is_floating_point():
            with torch.no_grad():
                obs = tokenizer.encode(obs)
        B, T, K = obs.shape
        tokens = torch.cat([obs, act[..., None]], -1).view(B, T * (K + 1))
        h = self(tokens, tasks).view(B, T, K + 1, -1)  # (B, T, 37, E)
        if cfg.objective == 'bc':  # MTBC: the data action's cross-entropy over the game's valid actions, every stage
            logp = self.bc_log_probs(h[:, :, K - 1], tasks)  # (M, B, T, A), read where Q is (B§3.1)
            nll = -logp.gather(-1, act[None, ..., None].expand(logp.shape[0], -1, -1, 1)).squeeze(-1)  # (M, B, T)
            m = mask.float()
            bc = (nll * m).sum() / (m.sum() * nll.shape[0])
            acc = ((logp.exp().mean(0).argmax(-1) == act).float() * m).sum() / m.sum()
            return bc, dict(bc=bc.detach(), bc_acc=acc.detach())

        # world model: next obs token, reward sign class, termination (B§4.2)
        real = mask & batch['real'][:, None] if 'real' in batch else mask
        obs_logits, rew_logits, end_logits = self.world_logits(h)
        obs_labels = obs.masked_fill(~real[..., None], -100).flatten(1)[:, 1:]
        loss_obs = F.cross_entropy(obs_logits.flatten(0, 1).float(), obs_labels.flatten())
        rew_labels = (torch.sign(rew).long() + 1).masked_fill(~real, -100)
        loss_rew = F.cross_entropy(rew_logits.flatten(0, 1).float(), rew_labels.flatten())
        loss_end = F.cross_entropy(end_logits.flatten(0, 1).float(), ends.masked_fill(~real, -100).flatten())
        world = loss_obs + loss_rew + loss_end
        terms = dict(obs=loss_obs, rew=loss_rew, end=loss_end)
        if stage == 1:
            return world, {k: v.detach() for k, v in terms.items()}

        # critic at the last obs token of each block (B§3.1)
        q_h = h[:, :, K - 1]  # (B, T, E)
        q_h = q_h.detach() if cfg.detach_critic else q_h
        probs = self.q_probs(q_h)  # (B, T, A, Z)
        q = (probs * self.support).sum(-1)  # (B, T, A)
        p_data = probs.gather(2, act[:, :, None, None].expand(B, T, 1, cfg.num_atoms)).squeeze(2)  # (B, T, Z)
        q_data = q.gather(2, act[..., None]).squeeze(2)  # (B, T)
        with torch.no_grad():  # a* = argmax over the game's valid actions of the TARGET head's Q (no double Q)
            t_probs = self.q_probs(q_h, target=True)
            t_q = (t_probs * self.support).sum(-1).masked_fill(~self.valid[tasks][:, None], float('-inf'))
            a_star = t_q.argmax(-1)  # (B, T)
            next_probs = t_probs.gather(2, a_star[..., None, None].expand(B, T, 1, cfg.num_atoms)).squeeze(2)
        pair = (mask[:, :-1] & mask[:, 1:]).float()  # (B, T-1) step t has a real successor t+1 in the window
        term = (mask & (ends == 1)).float()  # (B, T) terminal steps: target = point mass at r_t
        n_td = (pair.sum() + term.sum()).clamp(min=1)
        if cfg.td_loss == 'c51':
            m_pair = c51_project(rew[:, :-1, None] + cfg.gamma * self.support, next_probs[:, 1:], self.support)
            m_term = c51_project(rew[..., None].expand(B, T, cfg.num_atoms), torch.full_like(p_data, 1 / cfg.num_atoms), self.support)
            log_p = torch.log(p_data + 1e-8)
            td = (-(m_pair * log_p[:, :-1]).sum(-1) * pair).sum() + (-(m_term * log_p).sum(-1) * term).sum()
        else:  # ablation: 0.5 * MSE between expected Q and the one-step target
            v_next = (next_probs * self.support).sum(-1)
            td = (0.5 * (q_data[:, :-1] - rew[:, :-1] - cfg.gamma * v_next[:, 1:]) ** 2 * pair).sum() \
                + (0.5 * (q_data - rew) ** 2 * term).sum()
        td = td / n_td
        # CQL (B§4.4): logsumexp over ALL actions minus Q of the data action, each a mean over valid steps; COMBO
        # takes the data-action term on real rows only (imagined actions are the planner's, not the data's)
        m = mask.float()
        lse = (torch.logsumexp(q, -1) * m).sum() / m.sum()
        m_pos = (mask & batch['real'][:, None]).float() if cfg.q_penalty == 'combo' and 'real' in batch else m
        q_pos = (q_data * m_pos).sum() / m_pos.sum().clamp(min=1)
        cql = cfg.cql_weight * (lse - q_pos) if cfg.q_penalty != 'none' else torch.zeros_like(lse)
        loss = cfg.world_weight * world + td + cql
        terms.update(td=td, cql=cql, lse=lse, q_data=q_pos)
        return loss, {k: v.detach() for k, v in terms.items()}


def c51_project(tz, probs, support):
    """Categorical projection, Eq. 7 of Bellemare et al. (2017), vectorised as in Dopamine:
    m_j = sum_i clamp(1 - |clip(Tz_i) - z_j| / dz, 0, 1) * p_i.  tz, probs (..., Z) -> (..., Z)."""
    dz = support[1] - support[0]
    tz = torch.minimum(torch.maximum(tz, support[0]), support[-1])  # clip to [v_min, v_max]
    w = (1 - (tz[..., None, :] - support[:, None]).abs() / dz).clamp(0, 1)  # (..., Z_j, Z_i)
    return (w * probs[..., None, :]).sum(-1)


def configure_optimizer(model, lr_world, lr_critic, weight_decay):
    """AdamW with three groups (B§5.2): Linear weights of backbone and world heads (decay), biases /
    LayerNorm / embeddings (no decay), and every online Q-head tensor (decay, critic lr)."""
    decay, no_decay, critic = [], [], []
    for mn, m in model.named_modules():
        for pn, p in m.named_parameters(recurse=False):
            if not p.requires_grad:
                continue  # the target Q head
            if mn.startswith('head_q'):
                critic.append(p)
            elif isinstance(m, nn.Linear) and pn == 'weight':
                decay.append(p)
            else:
                no_decay.append(p)
    groups = [dict(params=decay, lr=lr_world, weight_decay=weight_decay),
              dict(params=no_decay, lr=lr_world, weight_decay=0.0),
              dict(params=critic, lr=lr_critic, weight_decay=weight_decay)]
    return torch.optim.AdamW(groups, lr=lr_world)


# -----------------------------------------------------------------------------
# checkpoints: ours (one ckpt.pt dict) and the official tokenizer.pt + JOWA_<size>.pt pair (B§10.3)

_RENAMES = [  # official name pattern -> ours
    (r'^transformer\.blocks\.', 'blocks.'), (r'^transformer\.ln_f\.', 'ln_f.'),
    (r'^embedder\.embedding_tables\.0\.', 'act_emb.'), (r'^embedder\.embedding_tables\.1\.', 'obs_emb.'),
    (r'^task_emb\.embedding_tables\.0\.', 'task_emb_act.'), (r'^task_emb\.embedding_tables\.1\.', 'task_emb_obs.'),
    (r'^head_observations\.head_module\.', 'head_obs.'), (r'^head_rewards\.head_module\.', 'head_rew.'),
    (r'^head_ends\.head_module\.', 'head_end.'),
]


def convert_official_jowa(sd):
    """Official JOWA state dict -> ours: rename, stack query/key/value into c_attn, name the Q-ensemble tensors,
    drop the attention-mask and head-index buffers (not needed; absent from the released files)."""
    import re
    sd, out = strip_prefixes(sd), {}
    for k, v in sd.items():
        if k.endswith('attn.mask') or k.endswith('.indices') or re.search(r'attn\.(key|value)\.', k):
            continue
        m = re.match(r'^transformer\.blocks\.(\d+)\.attn\.query\.(weight|bias)$', k)
        if m:
            parts = [sd.get(k.replace('query', n)) for n in ('query', 'key', 'value')]
            if any(p is None for p in parts):
                raise ValueError(f"checkpoint has {k} but not the matching key/value tensors")
            out[f'blocks.{m[1]}.attn.c_attn.{m[2]}'] = torch.cat(parts, 0)
            continue
        m = re.match(r'^(head_q|head_q_target)\.head_module\.params\.(\d)$', k)
        if m:
            out[f'{m[1]}.{QHead.names[int(m[2])]}'] = v
            continue
        for pattern, repl in _RENAMES:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def config_from_official(sd, **overrides):
    """Match an official (converted) JOWA state dict to the preset of its shapes; clear error if none fits."""
    try:
        n_embd = sd['pos_emb.weight'].shape[1]
        n_layer = 1 + max(int(k.split('.')[1]) for k in sd if k.startswith('blocks.'))
        num_q, q_hidden = sd['head_q.w0'].shape[:2]
    except (KeyError, ValueError) as e:
        raise ValueError(f"not a JOWA checkpoint: missing {e}") from None
    for name, p in PRESETS.items():
        if name != 'tiny' and (p['n_embd'], p['n_layer'], p['q_hidden'], p['num_q']) == (n_embd, n_layer, q_hidden, num_q):
            return make_config(name, **overrides)
    raise ValueError(f"checkpoint (n_layer={n_layer}, n_embd={n_embd}, q_hidden={q_hidden}, num_q={num_q}) "
                     f"matches no preset of {', '.join(p for p in PRESETS if p != 'tiny')}")


def load_state(module, sd, what):
    """load_state_dict with a one-line error naming the first mismatching key or shape."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    bad = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or extra or bad:
        k = (missing or extra or bad)[0]
        why = ('missing key' if missing else 'unexpected key') if not bad else \
            f"shape {tuple(sd[k].shape)} where the model has {tuple(own[k].shape)} for key"
        raise ValueError(f"{what} does not fit the model: {why} {k} "
                         f"({len(missing)} missing, {len(extra)} unexpected, {len(bad)} mis-shaped)")
    module.load_state_dict(sd)


def _torch_load(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None


def load_official(tokenizer_sd, jowa_sd, cfg=None):
    """Official state dicts (any prefix) -> (cfg, model, tokenizer). cfg defaults to the matching preset."""
    sd = convert_official_jowa(jowa_sd)  # a no-op on an already converted dict
    cfg = cfg or config_from_official(sd)
    model = JOWA(cfg)
    load_state(model, sd, 'JOWA checkpoint')
    tokenizer = Tokenizer(cfg)
    tokenizer.load_state_dict(convert_official_tokenizer(tokenizer_sd, tokenizer), strict=False)
    return cfg, model, tokenizer


def load_checkpoint(path, cfg=None, **overrides):
    """Our ckpt.pt, or the official pair given as 'tokenizer.pt,JOWA_40M.pt' or a directory holding both.
    Returns (cfg, model, tokenizer) in eval mode on the CPU. overrides (plan / eval / loss fields) are applied
    before the model is built; cfg sizes an official pair that matches no preset (e.g. a test model)."""
    paths = path.split(',')
    if len(paths) == 1 and os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.startswith('JOWA_') and f.endswith('.pt'))
        if not files:
            raise FileNotFoundError(f"no JOWA_<size>.pt in directory {path}")
        paths = [os.path.join(path, 'tokenizer.pt'), os.path.join(path, files[-1])]
    if len(paths) == 2:
        tok_sd, jowa_sd = _torch_load(paths[0]), _torch_load(paths[1])
        is_jowa = lambda sd: isinstance(sd, dict) and any('pos_emb' in k or 'head_q' in k for k in sd)
        if is_jowa(tok_sd) and not is_jowa(jowa_sd):
            raise ValueError(f"{path}: the pair is swapped; give the tokenizer first: tokenizer.pt,JOWA_<size>.pt")
        if not is_jowa(jowa_sd):
            raise ValueError(f"{paths[1]} is not a JOWA state dict (no position embedding or Q head)")
        jowa_sd = convert_official_jowa(jowa_sd)
        cfg = JOWAConfig(**{**asdict(cfg), **overrides}) if cfg else config_from_official(jowa_sd, **overrides)
        try:
            cfg, model, tokenizer = load_official(tok_sd, jowa_sd, cfg)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    else:
        ckpt = read_checkpoint(path)
        known = {f.name for f in fields(JOWAConfig)}
        cfg = JOWAConfig(**{**{k: v for k, v in ckpt['config'].items() if k in known}, **overrides})
        model, tokenizer = JOWA(cfg), Tokenizer(cfg)
        load_state(model, ckpt['model'], f'{path} (model)')
        tokenizer.load_state_dict(ckpt['tokenizer'], strict=False)  # LPIPS weights may be absent
    return cfg, model.eval(), tokenizer.eval()


def read_checkpoint(path, script=None):
    """Our checkpoint as a dict, checked: a whole torch file, a JOWA checkpoint and, with script ('train' or
    'finetune'), one that this script wrote (and can resume). Every read of our checkpoints goes through here."""
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or not {'config', 'model', 'tokenizer'} <= set(ckpt):
        raise ValueError(f"{path} is not a JOWA checkpoint (expected keys config, model, tokenizer)")
    made = ckpt.get('script') or ('finetune' if 'replay' in ckpt else 'train' if 'samplers' in ckpt else None)
    if script and made != script:
        raise ValueError(f"{path} was not written by {script}.py" + (f" but by {made}.py" if made else
                         " (it holds weights only)") + f", so {script}.py cannot resume it")
    return ckpt


def save_checkpoint(obj, path):
    """Atomic torch.save: write a temp file in the same directory, then rename over the target."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    torch.save(obj, tmp)
    os.replace(tmp, path)


def remove_temp_files(folder):
    """Delete what a killed save_checkpoint left in folder (its temp files); run at the start of a run."""
    import re
    for f in os.listdir(folder) if os.path.isdir(folder) else []:
        if re.fullmatch(r'.+\.pt\.tmp\d+', f):
            os.remove(os.path.join(folder, f))
            print(f"removed {os.path.join(folder, f)}, left by an interrupted checkpoint write")


def check_same_sizes(cfg, other, what):
    """One line when the checkpoint `what` holds a model of other sizes than cfg (another preset)."""
    diff = [k for k in ARCH_FIELDS if k != 'preset' and getattr(cfg, k) != getattr(other, k)]
    if diff:
        sizes = lambda c: ', '.join(f'{k}={getattr(c, k)}' for k in diff[:4])
        raise ValueError(f"{what} holds a {other.preset} model ({sizes(other)}), this run builds {cfg.preset} "
                         f"({sizes(cfg)}): give --preset={other.preset} or matching sizes")


def average_over_ranks(tensors, extra, world_size):
    """DDP without the wrapper (CleanRL multigpu style): average `tensors` (e.g. gradients) in place and the 1-D
    `extra` (e.g. logged losses) over ranks with ONE all-reduce of a flat vector; returns the averaged extra."""
    import torch.distributed as dist
    flat = torch.cat([t.flatten() for t in tensors] + [extra])
    dist.all_reduce(flat)
    flat /= world_size
    i = 0
    for t in tensors:
        t.copy_(flat[i:i + t.numel()].view_as(t))
        i += t.numel()
    return flat[i:]


def num_params(model, target=False):
    return sum(p.numel() for n, p in model.named_parameters() if target or not n.startswith('head_q_target'))


if __name__ == '__main__':
    for name in PRESETS:
        m = JOWA(make_config(name))
        print(f"{name:>5}: {num_params(m):,} parameters without the target Q head ({num_params(m, True):,} with it)")
