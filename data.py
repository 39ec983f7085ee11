"""
Data for JOWA: the Atari environment shared by collection and evaluation (REFERENCE B§8.1), the DQN-Replay reader
and down-sampler (B§6.1-6.2), the segment sampler that builds training batches (B§6.3, B§4.1), the stage-2 token
cache (B§6.4), and a collector that writes real ALE play in DQN-Replay's on-disk format, so the whole pipeline
runs without the 50 GB-per-game dataset.

    python data.py collect --game=Pong --out=replay --steps=5000 --run=1 --ckpt_size=1000 [--policy=random|ckpt.pt]
    python data.py process --src=replay --out=processed --games=Pong,Assault --runs=1,2 --ckpts=1-50 [--fraction=0.1]
    python data.py process --src=replay --out=finetune --games=Pong --runs=1 --ckpts=41-50 --transitions=5000 --stride=1
    python data.py tokens --data=processed --ckpt=out/ckpt.pt [--games=Pong] [--batch=1024]

Processed form, one folder per game, read through memory maps: frames.npy (N,84,84) uint8, actions.npy (N,) uint8
full action ids, rewards.npy (N,) float32, terminals.npy (N,) uint8, episodes.npy (E+1,) episode start offsets,
segments.npy (S,2) [start, episode end), sources.npy (E,3) (run, ckpt, start in that file), meta.json (written
last); after `tokens`, tokens.npy (N,36) int16 and tokens.json naming the tokenizer that made them.
"""
import gzip
import hashlib
import json
import math
import os
import shutil
import sys
import zlib

import ale_py
import gymnasium as gym
import numpy as np
import torch
from gymnasium.wrappers import AtariPreprocessing, TransformAction
from tqdm import tqdm

from model import PRETRAIN_GAMES, action_mask, device_setup, load_checkpoint, parse_args, task_id

gym.register_envs(ale_py)
NAMES = ('observation', 'action', 'reward', 'terminal')  # the four arrays of a DQN-Replay checkpoint
BAD_GZ = (OSError, EOFError, ValueError, zlib.error)  # what reading a corrupt or truncated .gz raises

# -----------------------------------------------------------------------------
# environment (B§8.1)


def make_env(game, sticky=0.0, seed=None):
    """Dopamine-style Atari: minimal action set, frame skip 4 summing rewards, max-pool of the last two raw frames,
    grey 84x84 INTER_AREA uint8 observations, episode ends at game over only; no no-op starts, fire reset, frame
    stacking, reward clipping or time limit (the 108k-step cap is the caller's). sticky = 0 for evaluation, 0.25 to
    collect like DQN-Replay. step() takes FULL action ids (0..17); env.valid_actions lists the game's ones."""
    task_id(game)  # an unknown game fails here, before any emulator starts
    # max_num_frames_per_episode=0 removes ALE v5's 108k-frame truncation; gym.make adds no TimeLimit here
    env = gym.make(f'ALE/{game}-v5', obs_type='grayscale', frameskip=1, repeat_action_probability=sticky,
                   full_action_space=False, max_num_frames_per_episode=0, disable_env_checker=True)
    env = AtariPreprocessing(env, noop_max=0, frame_skip=4, screen_size=84, terminal_on_life_loss=False)
    valid = tuple(a.value for a in env.unwrapped.ale.getMinimalActionSet())  # full id of each minimal index

    def to_minimal(a):
        if int(a) not in valid:
            raise ValueError(f"action {a} is not valid in {game}; valid full action ids: {valid}")
        return valid.index(int(a))
    env = TransformAction(env, to_minimal, gym.spaces.Discrete(18))
    env.valid_actions = valid
    if seed is not None:
        env.reset(seed=seed)  # seeds ALE's RNG (sticky actions); the caller's reset() starts the episode
    return env

# -----------------------------------------------------------------------------
# DQN-Replay files (B§6.1): <src>/<Game>/<run>/replay_logs/$store$_<name>_ckpt.<N>.gz, each a gzipped .npy


def replay_path(src, game, run, ckpt, name):
    return os.path.join(src, game, str(run), 'replay_logs', f'$store$_{name}_ckpt.{ckpt}.gz')


def open_npy(path):
    """Open a gzipped .npy and read its header: (stream at the first data byte, shape, dtype)."""
    f = gzip.open(path, 'rb')
    try:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
    except BAD_GZ as e:
        f.close()
        raise ValueError(f"corrupt or truncated file {path} ({e})") from None
    return f, shape, dtype


def read_rows(f, path, shape, dtype, start, n, data_start):
    """Rows [start, start+n) of the array behind stream f. Forward seeks decompress and skip, so reading episodes
    in file order streams a 7 GB observation file with one episode in memory."""
    row = dtype.itemsize * math.prod(shape[1:])
    try:
        f.seek(data_start + start * row)
        buf = f.read(n * row)
    except BAD_GZ as e:
        raise ValueError(f"corrupt or truncated file {path} ({e})") from None
    if len(buf) != n * row:
        raise ValueError(f"truncated file {path}: expected {shape[0]} rows")
    return np.frombuffer(buf, dtype).reshape(n, *shape[1:])


def load_gz(path):
    f, shape, dtype = open_npy(path)
    with f:
        return read_rows(f, path, shape, dtype, 0, shape[0], f.tell())


def split_episodes(terminal):
    """(starts, ends) of one file's episodes. An episode ends at a terminal step; the file's first episode starts
    at index 0 even if it began in the previous file; the steps after the last terminal (an episode cut by the end
    of the file) are dropped, as the official down-sampler counts episodes by terminals (B§6.2)."""
    ends = np.flatnonzero(terminal) + 1
    return np.concatenate([[0], ends])[:-1].astype(np.int64), ends.astype(np.int64)


def check_files(src, game, files):
    """Every file of the (run, ckpt) checkpoints exists (checked before any work starts)."""
    missing = [p for run, ckpt in files for k in NAMES if not os.path.exists(p := replay_path(src, game, run, ckpt, k))]
    if missing:
        raise FileNotFoundError(f"missing file {missing[0]}" + (f" and {len(missing) - 1} more" if missing[1:] else ''))


def scan(src, game, files):
    """Check every (run, ckpt) checkpoint and split it into episodes, reading only headers and terminals.
    Returns ([(starts, ends)] per file, total steps)."""
    check_files(src, game, files)
    bounds, total = [], 0
    for run, ckpt in tqdm(files, desc=f'{game} scan'):
        heads = {}  # name -> (shape, dtype)
        for name in NAMES:
            f, *heads[name] = open_npy(replay_path(src, game, run, ckpt, name))
            f.close()
        obs_shape, obs_dtype = heads['observation']
        if len({shape[0] for shape, _ in heads.values()}) > 1 or obs_shape[1:] != (84, 84) or obs_dtype != np.uint8:
            raise ValueError(f"{replay_path(src, game, run, ckpt, '*')}: arrays disagree or frames are not uint8 "
                             f"(N, 84, 84): {heads}")
        bounds.append(split_episodes(load_gz(replay_path(src, game, run, ckpt, 'terminal'))))
        total += heads['terminal'][0][0]
    return bounds, total


def process_game(src, out, game, runs, ckpts, fraction=0.1, transitions=0, stride=4, seed=0):
    """Down-sample one game's DQN-Replay checkpoints into <out>/<game>/ with the official rule (B§6.2): number the
    episodes of all files in run-then-ckpt order, draw ceil(target / mean episode length) ids uniformly WITH
    replacement from np.random.RandomState(seed) (the official code reseeds 0 for every game), sorted; target =
    fraction * total steps, or `transitions` (fine-tuning subsets, B§9); mean length = total steps / terminals.
    Segments start every `stride` steps of each drawn episode (B§6.3). Everything is written into a temp folder
    renamed at the end, meta.json last, so a crash leaves nothing load_dataset accepts."""
    full_ids = np.flatnonzero(action_mask(game).numpy()).astype(np.uint8)  # minimal index i -> i-th valid id (B§3.3)
    files = [(run, ckpt) for run in runs for ckpt in ckpts]
    bounds, total_steps = scan(src, game, files)
    per_file = np.array([len(s) for s, _ in bounds])  # complete episodes per file
    if per_file.sum() == 0:
        raise ValueError(f"no complete episode (no terminal) in {game} runs {runs} ckpts {ckpts} under {src}")
    n = math.ceil((transitions or fraction * total_steps) / (total_steps / per_file.sum()))
    if n <= 0:
        raise ValueError(f"empty subsample for {game}: fraction={fraction}, transitions={transitions}")
    drawn = np.sort(np.random.RandomState(seed).randint(0, per_file.sum(), n))
    fi = np.searchsorted(np.cumsum(per_file), drawn, side='right')  # (n,) file of each drawn episode
    local = drawn - (np.cumsum(per_file) - per_file)[fi]  # (n,) its index inside that file
    starts, ends = (np.array([bounds[i][b][j] for i, j in zip(fi, local)]) for b in (0, 1))
    offsets = np.concatenate([[0], np.cumsum(ends - starts)])  # (n+1,) episode starts in the processed arrays
    N = int(offsets[-1])

    final, tmp = os.path.join(out, game), os.path.join(out, f'.{game}.tmp{os.getpid()}')
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        spec = dict(frames=(np.uint8, (N, 84, 84)), actions=(np.uint8, (N,)), rewards=(np.float32, (N,)),
                    terminals=(np.uint8, (N,)))
        arr = {k: np.lib.format.open_memmap(os.path.join(tmp, f'{k}.npy'), 'w+', d, s) for k, (d, s) in spec.items()}
        for i in tqdm(np.unique(fi), desc=f'{game} copy'):
            paths = {k: replay_path(src, game, *files[i], k) for k in NAMES}
            act, rew, term = (load_gz(paths[k]) for k in NAMES[1:])
            if act.min() < 0 or act.max() >= len(full_ids):
                raise ValueError(f"{paths['action']}: action index outside {game}'s {len(full_ids)} minimal actions")
            f, shape, dtype = open_npy(paths['observation'])
            with f:
                data_start, last = f.tell(), None
                for j in np.flatnonzero(fi == i):  # sorted, so the stream only moves forward
                    s, e, o = starts[j], ends[j], offsets[j]
                    if (s, e) != last:  # a repeated draw reuses the frames just read
                        frames, last = read_rows(f, paths['observation'], shape, dtype, s, e - s, data_start), (s, e)
                    arr['frames'][o:o + e - s] = frames
                    arr['actions'][o:o + e - s] = full_ids[act[s:e]]
                    arr['rewards'][o:o + e - s] = rew[s:e]
                    arr['terminals'][o:o + e - s] = np.clip(term[s:e], 0, 1)
        for a in arr.values():
            a.flush()
        seg_starts = np.concatenate([np.arange(a, b, stride) for a, b in zip(offsets[:-1], offsets[1:])])
        seg_ends = offsets[np.searchsorted(offsets, seg_starts, side='right')]  # end of each start's episode
        np.save(os.path.join(tmp, 'segments.npy'), np.stack([seg_starts, seg_ends], 1))  # (S, 2)
        np.save(os.path.join(tmp, 'episodes.npy'), offsets)
        np.save(os.path.join(tmp, 'sources.npy'), np.concatenate([np.array(files)[fi], starts[:, None]], 1))  # (n, 3)
        meta = dict(game=game, steps=N, episodes=n, segments=len(seg_starts), stride=stride,
                    source=dict(runs=list(runs), ckpts=list(ckpts), seed=seed, fraction=fraction,
                                transitions=transitions, total_steps=total_steps, total_episodes=int(per_file.sum())))
        with open(os.path.join(tmp, 'meta.json'), 'w') as f:
            json.dump(meta, f)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return meta

# -----------------------------------------------------------------------------
# processed dataset and segment sampler (B§6.3, B§4.1)


def _open(d, name):
    return np.load(os.path.join(d, f'{name}.npy'), mmap_mode='r')


def load_dataset(processed_dir, games, tokens=False):
    """Check the processed games and describe them: a list of {game, task, dir, steps, segments}. Arrays stay on
    disk (the sampler maps them per batch), so memory does not grow with the dataset. tokens=True also requires
    the token cache (build it with build_token_cache, which also rebuilds a stale one)."""
    ds = []
    for game in games:
        task, d = task_id(game), os.path.join(processed_dir, game)
        if not os.path.exists(os.path.join(d, 'meta.json')):
            raise FileNotFoundError(f"no processed dataset for {game}: {d}/meta.json is missing (run data.py process)")
        with open(os.path.join(d, 'meta.json')) as f:
            meta = json.load(f)
        N, E, S = meta['steps'], meta['episodes'], meta['segments']
        expect = dict(frames=(N, 84, 84), actions=(N,), rewards=(N,), terminals=(N,), episodes=(E + 1,), segments=(S, 2))
        if tokens:
            if not os.path.exists(os.path.join(d, 'tokens.json')):
                raise FileNotFoundError(f"no token cache for {game} in {d} (run data.py tokens)")
            with open(os.path.join(d, 'tokens.json')) as f:
                expect['tokens'] = tuple(json.load(f)['shape'])
        for name, shape in expect.items():
            try:
                got = _open(d, name).shape
            except ValueError as e:  # e.g. a file shorter than its header says
                raise ValueError(f"unreadable {d}/{name}.npy ({e})") from None
            if got != shape:
                raise ValueError(f"{d}/{name}.npy has shape {got}, meta.json says {shape}")
        ds.append(dict(game=game, task=task, dir=d, steps=N, segments=S))
    return ds


def to_unit(frames):
    """uint8 frames -> float32 tensor in [0, 1] (B§6.3), computed by numpy on the CPU so the token cache and the
    sampler feed the tokenizer bit-identical inputs (and torch's threaded kernels stall on a busy CPU)."""
    return torch.from_numpy(frames.astype(np.float32) / 255)


def read_segments(d, ids, T=8, tokens=False):
    """Segments `ids` (b,) of one processed game -> numpy arrays (b, T, ...): steps [start, start+T) of one episode,
    right-padded past its end with obs 0, action 0, reward 0, end 0 and mask_padding False (B§6.3)."""
    seg = _open(d, 'segments')[ids]  # (b, 2) [start, episode end)
    idx = seg[:, :1] + np.arange(T)  # (b, T) step indices
    mask = idx < seg[:, 1:]  # (b, T) True = real step
    idx = np.where(mask, idx, seg[:, :1])  # padded steps read a real row, zeroed below
    out = dict(mask_padding=mask)
    for key, name in (('observations', 'tokens' if tokens else 'frames'), ('actions', 'actions'),
                      ('rewards', 'rewards'), ('ends', 'terminals')):
        x = _open(d, name)[idx]  # fresh memory maps per call: pages read are released, RSS stays flat (nanoGPT)
        x[~mask] = 0
        out[key] = x
    return out


class Sampler:
    """Random right-padded segments, uniform over all segments of all loaded games (the official pooled shuffle,
    B§5.3). Reproducible from (seed, rank); each DDP rank draws its own stream; state_dict() resumes exactly."""

    def __init__(self, ds, T=8, seed=0, rank=0):
        self.ds, self.T = ds, T
        self.cum = np.cumsum([0] + [d['segments'] for d in ds])  # segment id ranges per game
        self.tasks = np.array([d['task'] for d in ds])
        self.rng = np.random.default_rng([seed, rank])

    def draw(self, batch_size, read):
        """batch_size ids drawn uniformly over the pooled id ranges self.cum of all games, read one game at a time by
        read(d, ids within game d) -> {key: numpy array}; returns ({key: tensor (B, ...)} in drawn order, (B,) game
        index into ds). Sampler draws segments; scaled_ql.Transitions draws steps through it."""
        ids = self.rng.integers(0, self.cum[-1], batch_size)
        game = np.searchsorted(self.cum, ids, side='right') - 1  # (B,) index into ds
        groups = np.unique(game)
        rows = [np.flatnonzero(game == g) for g in groups]
        parts = [read(self.ds[g], ids[r] - self.cum[g]) for g, r in zip(groups, rows)]
        back = np.argsort(np.concatenate(rows))  # grouped by game -> drawn order
        return {k: torch.from_numpy(np.concatenate([p[k] for p in parts])[back]) for k in parts[0]}, game

    def sample(self, batch_size, tokens=False):
        """B§4.1 batch: observations float (B,T,1,84,84) in [0,1] or tokens long (B,T,36); actions long (B,T) full
        ids; rewards float (B,T); ends long (B,T); mask_padding bool (B,T); envs long (B,) task ids."""
        b, game = self.draw(batch_size, lambda d, ids: read_segments(d['dir'], ids, self.T, tokens))
        obs = b['observations']
        b['observations'] = obs.long() if tokens else to_unit(obs.numpy()).unsqueeze(2)
        b['actions'], b['ends'] = b['actions'].long(), b['ends'].long()
        b['envs'] = torch.from_numpy(self.tasks[game])
        return b

    def state_dict(self):
        return {'rng': self.rng.bit_generator.state}

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state['rng']

class Replay:
    """FIFO of imagined segments on the CPU (B§7.5): tokens, or frames as uint8 (divided by 255 again when drawn).
    sample draws with the replay's generator, or a caller's (train.py: one per data stream)."""

    def __init__(self, capacity, seed=0):
        self.capacity, self.data, self.next, self.size = capacity, None, 0, 0
        self.gen = torch.Generator().manual_seed(seed)

    def push(self, seg):
        seg = {k: v[-self.capacity:].cpu() for k, v in seg.items()}
        if seg['observations'].is_floating_point():
            seg['observations'] = seg['observations'].mul(255).round().to(torch.uint8)
        if self.data is None:  # torch.empty: memory pages are only touched as the FIFO fills
            self.data = {k: torch.empty(self.capacity, *v.shape[1:], dtype=v.dtype) for k, v in seg.items()}
        idx = (self.next + torch.arange(len(seg['envs']))) % self.capacity
        for k, v in seg.items():
            self.data[k][idx] = v
        self.next, self.size = int(idx[-1] + 1) % self.capacity, min(self.size + len(idx), self.capacity)

    def sample(self, n, generator=None):
        idx = torch.randint(self.size, (n,), generator=self.gen if generator is None else generator)
        b = {k: v[idx] for k, v in self.data.items()}
        obs = b['observations']
        return dict(b, observations=obs.float().div(255) if obs.dtype == torch.uint8 else obs)

    def state_dict(self):
        return dict(data=self.data and {k: v[:self.size].clone() for k, v in self.data.items()}, next=self.next,
                    size=self.size, capacity=self.capacity, gen=self.gen.get_state())

    def load_state_dict(self, s):
        self.next, self.size, self.data = 0, 0, None
        if s['data'] is not None:
            self.push(s['data'])  # rows 0..size-1, already uint8 frames or tokens
        self.next, self.size = s['next'], s['size']
        self.gen.set_state(s['gen'])


# -----------------------------------------------------------------------------
# token cache (B§6.4)


def tokenizer_key(tokenizer):
    """sha1 of the weights that decide the tokens (LPIPS only enters the tokenizer's training loss)."""
    h = hashlib.sha1()
    for k, v in sorted(tokenizer.state_dict().items()):
        if not k.startswith('lpips.'):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


@torch.no_grad()
def build_token_cache(processed_dir, games, tokenizer, batch=256):
    """Encode every frame once with the frozen tokenizer into tokens.npy (N, 36) int16 next to frames.npy, under
    the caller's autocast (bf16 in the official code). A cache whose tokens.json names this tokenizer is kept;
    otherwise it is rebuilt in a temp file and renamed, then tokens.json is written (last)."""
    key, device = tokenizer_key(tokenizer), next(tokenizer.parameters()).device
    tokenizer.to(memory_format=torch.channels_last)  # in place, same values (and key): NHWC convolutions are faster
    for d in load_dataset(processed_dir, games):
        marker = os.path.join(d['dir'], 'tokens.json')
        if os.path.exists(marker):
            with open(marker) as f:
                if json.load(f)['tokenizer'] == key:
                    print(f"{d['game']}: token cache up to date")
                    continue
            os.remove(marker)  # stale: the cache is invalid until rebuilt
        frames, tmp, out = _open(d['dir'], 'frames'), os.path.join(d['dir'], f'.tokens.tmp{os.getpid()}.npy'), None
        for i in tqdm(range(0, len(frames), batch), desc=f"{d['game']} tokens"):
            x = to_unit(frames[i:i + batch]).unsqueeze(1).to(device, memory_format=torch.channels_last)  # (b,1,84,84)
            tok = tokenizer.encode(x).cpu().numpy()  # (b, 36); the 2048-code vocabulary fits int16
            if out is None:
                out = np.lib.format.open_memmap(tmp, 'w+', np.int16, (len(frames), tok.shape[1]))
            out[i:i + len(tok)] = tok
        out.flush()
        os.replace(tmp, os.path.join(d['dir'], 'tokens.npy'))
        with open(marker + '.tmp', 'w') as f:
            json.dump(dict(tokenizer=key, shape=out.shape), f)
        os.replace(marker + '.tmp', marker)

# -----------------------------------------------------------------------------
# collector: real ALE play written as DQN-Replay files


def make_policy(policy, game, valid, seed):
    """'random' (uniform over the valid actions), 'action:<full id>' (always that action: a scripted policy, e.g.
    for behaviour cloning) or a checkpoint's greedy Q policy on a one-frame context, with a random valid action with
    probability cfg.epsilon (B§8.1). Returns obs (84, 84) uint8 -> full action id."""
    rng = np.random.default_rng(seed)
    if policy == 'random':
        return lambda obs: int(rng.choice(valid))
    if policy.startswith('action:'):
        a = policy.partition(':')[2]
        if not a.isdigit() or int(a) not in valid:
            raise ValueError(f"--policy={policy}: {game}'s valid full action ids are {valid}")
        return lambda obs: int(a)
    cfg, model, tokenizer = load_checkpoint(policy)
    task = torch.tensor([task_id(game)])

    @torch.no_grad()
    def greedy(obs):
        if rng.random() < cfg.epsilon:
            return int(rng.choice(valid))
        h = model(tokenizer.encode(torch.from_numpy(obs).float().div(255)[None, None]), task)  # (1, 36, E)
        return int(model.q_values(h[:, -1], task).argmax())  # Q is read at the last obs token (B§3.1)
    return greedy


def collect(game, out, steps, run=1, ckpt_size=1000, policy='random', seed=0, replace=False):
    """Play `steps` agent steps with sticky actions 0.25 and write DQN-Replay files, one checkpoint per ckpt_size
    steps, rows as Dopamine's replay buffer stores them: the frame the action was chosen on, the action's minimal
    index (int32), the reward clipped to [-1, 1] (float32), terminal 1 on an episode's last step (uint8). Episodes
    run on across checkpoint files, as in the real data; Dopamine's 27,000-step episode cap ends one as terminal."""
    logs = os.path.join(out, game, str(run), 'replay_logs')
    if os.path.isdir(logs) and os.listdir(logs):  # never a mix of two collections
        if not replace:
            raise ValueError(f"{logs} already holds a collection: choose another --out or --run, or --replace=True "
                             f"to delete it first")
        shutil.rmtree(os.path.dirname(logs))
    env = make_env(game, sticky=0.25, seed=seed)
    act = make_policy(policy, game, env.valid_actions, seed)
    os.makedirs(logs, exist_ok=True)
    obs, _ = env.reset()
    rows, ckpt, t, ret, returns = [], 0, 0, 0.0, []
    for i in tqdm(range(steps), desc=f'collect {game}'):
        a = act(obs)
        nxt, r, term, _, _ = env.step(a)
        t, ret = t + 1, ret + r
        done = term or t == 27_000
        rows.append((obs, env.valid_actions.index(a), np.clip(r, -1, 1), done))
        obs = nxt
        if done:
            returns.append(ret)
            (obs, _), t, ret = env.reset(), 0, 0.0
        if len(rows) == ckpt_size or i == steps - 1:
            o, a_, r_, d_ = zip(*rows)
            for name, x in (('observation', np.stack(o)), ('action', np.array(a_, np.int32)),
                            ('reward', np.array(r_, np.float32)), ('terminal', np.array(d_, np.uint8))):
                with gzip.open(replay_path(out, game, run, ckpt, name), 'wb') as f:
                    np.save(f, x, allow_pickle=False)
            rows, ckpt = [], ckpt + 1
    mean = f'{np.mean(returns):.1f}' if returns else 'n/a'
    print(f"{game}: {steps} steps in {ckpt} checkpoint files, {len(returns)} finished episodes, mean return {mean}")


def check_apart(out, inputs):
    """out (option, folder) and inputs [(option, folder)]: refuse an output folder that is, contains or lies inside
    an input, where writing could delete or mix the input's data."""
    (oname, o), real = out, lambda p: os.path.realpath(p) + os.sep
    for iname, i in inputs:
        if i and (real(o).startswith(real(i)) or real(i).startswith(real(o))):
            raise ValueError(f"--{oname}={o} overlaps --{iname}={i}: the output folder must lie outside the input")


def int_list(s):
    """'1,2' or '0-49' or '1,3-5' -> list of ints."""
    out = []
    for part in str(s).split(','):
        a, _, b = part.partition('-')
        if not (a.isdigit() and (b.isdigit() or not _)):
            raise ValueError(f"{s!r} is not a list of numbers such as 1,3-5")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


if __name__ == '__main__':
    opts = dict(collect=dict(game='Pong', out='replay', steps=5000, run=1, ckpt_size=1000, policy='random',
                             replace=False),
                process=dict(src='replay', out='processed', games=','.join(PRETRAIN_GAMES), runs='1,2', ckpts='1-50',
                             fraction=0.1, transitions=0, stride=4),
                tokens=dict(data='processed', ckpt='', games='', batch=1024))
    rules = dict(collect=dict(out='dir', steps='>0', run='>=0', ckpt_size='>0'),
                 process=dict(out='dir', fraction='(0,1]', transitions='>=0', stride='>0'), tokens=dict(batch='>0'))
    cmd = sys.argv[1] if len(sys.argv) > 1 else ''
    if cmd not in opts:
        raise SystemExit(f"usage: python data.py {'|'.join(opts)} --key=value ... (see the docstring)")
    cfg, args = parse_args(sys.argv[2:], opts[cmd], rules[cmd])
    try:
        if cmd == 'collect':
            collect(args['game'], args['out'], args['steps'], args['run'], args['ckpt_size'], args['policy'], cfg.seed,
                    args['replace'])
        elif cmd == 'process':
            games = args['games'].split(',')
            check_apart(('out', args['out']), [('src', args['src'])])
            runs, ckpts = int_list(args['runs']), int_list(args['ckpts'])
            for game in games:  # every name and file is checked before any work starts
                task_id(game), action_mask(game)
                check_files(args['src'], game, [(r, c) for r in runs for c in ckpts])
            for game in games:
                meta = process_game(args['src'], args['out'], game, runs, ckpts, args['fraction'],
                                    args['transitions'], args['stride'], cfg.seed)
                print(f"{game}: {meta['episodes']} episodes, {meta['steps']} steps, {meta['segments']} segments "
                      f"(from {meta['source']['total_episodes']} episodes, {meta['source']['total_steps']} steps)")
        else:
            if not args['ckpt']:
                raise ValueError("--ckpt=<checkpoint> is required: the tokenizer to encode with")
            games = args['games'].split(',') if args['games'] else sorted(
                g for g in os.listdir(args['data']) if os.path.exists(os.path.join(args['data'], g, 'meta.json')))
            _, _, tokenizer = load_checkpoint(args['ckpt'])
            device, _, amp = device_setup(cfg)
            with amp:
                build_token_cache(args['data'], games, tokenizer.to(device), args['batch'])
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
