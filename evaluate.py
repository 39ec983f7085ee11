"""
Evaluate JOWA on Atari with the paper's protocol (REFERENCE B§8): many environments of several games in one
process, every decision batched through the beam-search planner (plan.py). Per-game beam widths and context
lengths default to the official tables; rollout i of a game is seeded with i.

    python evaluate.py --ckpt=out/ckpt.pt --games=Assault,Pong --episodes=16
    python evaluate.py --ckpt=checkpoints/tokenizer.pt,checkpoints/JOWA_150M.pt --games=pretrain --out=scores.json
    python evaluate.py --ckpt=out/ckpt.pt --games=Pong --no-plan --context=8   # greedy Q policy (H = 0)
    python evaluate.py --ckpt=out/ckpt.pt --games=Pong --episodes=1 --video=pong.mp4

Options: --horizon/--beam/--context override the tables, --max_steps caps an episode (agent steps, default 108k),
--max_seconds caps the whole run, --batch bounds the environments per planner call, --vector=False steps a list of
gymnasium environments (data.make_env) instead of ale_py's C++ vector environment.
"""
import json
import re
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
from tqdm import tqdm

from model import (HELDOUT_GAMES, PRETRAIN_GAMES, REF_SCORES, VALID_ACTIONS, action_mask, load_checkpoint,
                   normalized_score, parse_args, task_id)
from plan import Planner

# -----------------------------------------------------------------------------
# official per-game settings (B§8.4): beam width K (all sizes), context blocks per model size, mean raw scores

TABLE = 'Assault Atlantis BeamRider Berzerk Carnival Centipede ChopperCommand DemonAttack NameThisGame Phoenix ' \
        'Seaquest SpaceInvaders StarGunner TimePilot Zaxxon'.split()
BEAM = dict(zip(TABLE, (2, 3, 2, 4, 2, 4, 4, 2, 2, 2, 4, 2, 3, 4, 4)))
CONTEXT = {'150M': dict(zip(TABLE, (4, 2, 6, 1, 4, 6, 2, 3, 3, 2, 6, 2, 2, 2, 2))),
           '70M': dict(zip(TABLE, (5, 2, 2, 1, 5, 1, 4, 3, 2, 1, 6, 3, 6, 6, 6))),
           '40M': dict(zip(TABLE, (3, 4, 5, 6, 2, 1, 1, 3, 2, 2, 2, 2, 1, 6, 2)))}
OFFICIAL_MEAN = {  # official mean raw scores with planning (16 episodes)
    '150M': (1458.6, 2841262.5, 2927.0, 496.9, 4910.0, 7117.0, 3925.0, 9296.6, 9380.0, 5230.0, 1413.8, 1036.9, 53237.5,
             3975.0, 331.2),
    '70M': (1594.6, 1975912.5, 2536.8, 486.9, 4378.8, 5873.5, 2306.2, 7399.4, 8228.1, 4456.2, 1425.0, 1063.4, 29862.5,
            4287.5, 0.0),
    '40M': (1397.9, 52987.5, 965.0, 455.6, 5428.8, 4482.8, 3700.0, 3166.2, 11364.4, 4457.5, 884.4, 805.6, 6825.0,
            4262.5, 0.0)}


def game_settings(cfg, game, plan, horizon=None, beam=None, context=None):
    """(K, H, context blocks) for one game: CLI/cfg overrides, else the official tables. Games outside them get the
    paper's rule K = 2 below 10 valid actions, else 3, and the longest context that fits."""
    H = (cfg.horizon if horizon is None else horizon) if plan else 0
    K = beam or cfg.beam or BEAM.get(game, 2 if len(VALID_ACTIONS[game]) < 10 else 3)
    table = CONTEXT.get(cfg.preset, CONTEXT['40M'])
    n = context or cfg.context or table.get(game, cfg.max_blocks)
    return K, H, min(n, cfg.max_blocks - H)  # B§7.2: the root context leaves room for H imagined blocks


def check_games(games):
    """Fail with one clear line before any emulator starts: unknown game, no action mask, no ROM."""
    import ale_py.roms
    for g in games:
        task_id(g), action_mask(g)
        if ale_py.roms.get_rom_path(rom_name(g)) is None:
            raise ValueError(f"no ALE ROM for game {g!r} (ale-py {ale_py.__version__})")

# -----------------------------------------------------------------------------
# environments: ale_py's C++ vector environment set to the B§8.1 protocol, or a list of data.make_env


def rom_name(game):
    return re.sub(r'(?<!^)(?=[A-Z])', '_', game).lower()  # 'MsPacman' -> 'ms_pacman'


class Envs:
    """n environments of one game: .frames (n, 84, 84) uint8 after reset(seed i) and after every step(actions) with
    full action ids (n,), which returns rewards (n,) and game-over flags (n,). The vector environment's own defaults
    (reward clipping, fire reset, no-op starts, frame stacking, 108k-frame truncation) are all switched off; its
    frames equal data.make_env's. The list of gymnasium environments steps only the `active` ones."""

    def __init__(self, game, seeds, vector=True):
        import ale_py
        self.vector = vector
        if vector:
            self.env = ale_py.AtariVectorEnv(
                rom_name(game), len(seeds), max_num_frames_per_episode=2 ** 31 - 1, repeat_action_probability=0.0,
                full_action_space=False, frameskip=4, maxpool=True, grayscale=True, img_height=84, img_width=84,
                stack_num=1, noop_max=0, episodic_life=False, reward_clipping=False, use_fire_reset=False)
            valid = [a.value for a in self.env.ale.get_action_set()]
            self.frames = self.env.reset(seed=np.array(seeds))[0][:, 0]
        else:
            from data import make_env
            self.envs = [make_env(game) for _ in seeds]
            valid = list(self.envs[0].valid_actions)
            self.frames = np.stack([e.reset(seed=int(s))[0] for e, s in zip(self.envs, seeds)])
        if valid != list(VALID_ACTIONS[game]):
            raise ValueError(f"ALE's minimal action set of {game} is {valid}, the model's mask {VALID_ACTIONS[game]}")
        self.to_minimal = np.zeros(18, dtype=np.int32)
        self.to_minimal[valid] = np.arange(len(valid))

    def step(self, actions, active):
        if self.vector:  # steps all of them
            frames, rew, term, _, _ = self.env.step(self.to_minimal[actions])
            self.frames = frames[:, 0]
            return rew.astype(np.float64), term
        rew, term = np.zeros(len(actions)), np.zeros(len(actions), dtype=bool)
        for i in np.flatnonzero(active):
            self.frames[i], rew[i], term[i], _, _ = self.envs[i].step(int(actions[i]))
        return rew, term

    def close(self):
        for e in [self.env] if self.vector else self.envs:
            e.close()

# -----------------------------------------------------------------------------
# the agent loop


@torch.no_grad()
def evaluate(model, tokenizer, cfg, games, episodes, plan=False, max_steps=None, max_seconds=None, horizon=None,
             beam=None, context=None, batch=None, vector=True, video=None, verbose=False, freeze=False):
    """Play `episodes` rollouts (seeded 0..episodes-1) of every game, all environments in lockstep, decisions
    batched over environments (at most `batch` per planner call; default 16 on CPU, 64 on GPU). plan=False is the
    greedy Q policy (H = 0); horizon/beam/context override cfg and the tables. Model and tokenizer in eval mode;
    cfg.dtype picks autocast, cfg.compile a compiled planner (freeze=True: with frozen weights, only for a model
    that will not change in this process). Returns {game: [raw return of each episode]}; episodes cut by max_steps
    (agent steps, default cfg.max_steps) or max_seconds (wall clock of the whole call) count their return so far."""
    check_games(games)
    dev = next(model.parameters()).device
    dtype = ('bfloat16' if dev.type == 'cuda' else 'float32') if cfg.dtype == 'auto' else cfg.dtype
    amp = nullcontext() if dtype == 'float32' else torch.autocast(dev.type, dtype=getattr(torch, dtype))
    max_steps, batch = max_steps or cfg.max_steps, batch or (64 if dev.type == 'cuda' else 16)
    planner = Planner(model, compile=cfg.compile, freeze=freeze)
    tokenizer.to(memory_format=torch.channels_last)  # in place (same values): NHWC convolutions encode ~20% faster
    sets = {g: game_settings(cfg, g, plan, horizon, beam, context) for g in games}
    H = sets[games[0]][1]
    # one slot per (game, rollout): task, beam width, context capacity (blocks), epsilon RNG seeded with the rollout
    slot_game = np.repeat(np.arange(len(games)), episodes)
    N, T = len(slot_game), cfg.tokens_per_block
    tasks = torch.tensor([task_id(games[i]) for i in slot_game], device=dev)
    K = torch.tensor([sets[games[i]][0] for i in slot_game], device=dev)
    cap = torch.tensor([sets[games[i]][2] for i in slot_game], device=dev)
    valid = [np.array(VALID_ACTIONS[games[i]]) for i in slot_game]
    rngs = [np.random.default_rng(i % episodes) for i in range(N)]
    envs = [Envs(g, list(range(episodes)), vector) for g in games]
    frames = np.concatenate([e.frames for e in envs])  # (N, 84, 84)
    mem = torch.zeros(N, int(cap.max()), T, dtype=torch.long, device=dev)  # token memory: blocks of (36 obs, 1 action)
    nblk = torch.zeros(N, dtype=torch.long, device=dev)
    # the frame the last plan imagined after its action: the planner's first guess for the next plan (-1: none)
    guess = torch.full((N, cfg.obs_tokens), -1, dtype=torch.long, device=dev)
    ret, steps, done = np.zeros(N), np.zeros(N, dtype=np.int64), np.zeros(N, dtype=bool)
    video_frames, t0 = [], time.time()
    bar = tqdm(total=N, unit='episode', disable=not verbose, dynamic_ncols=True)
    while not done.all():
        act = np.flatnonzero(~done)  # active slots
        rows = torch.as_tensor(act, device=dev)
        with amp:
            # B§7.1: encode the new frame, append its tokens (sliding window of whole blocks)
            x = torch.as_tensor(frames[act], device=dev).float().div(255)[:, None]  # (n, 1, 84, 84)
            tok = torch.cat([tokenizer.encode(c) for c in x.split(256)])  # (n, 36)
            full = (nblk[rows] == cap[rows])[:, None, None]
            mem[rows] = torch.where(full, mem[rows].roll(-1, 1), mem[rows])
            nblk[rows] = torch.minimum(nblk[rows] + 1, cap[rows])
            mem[rows, nblk[rows] - 1, :cfg.obs_tokens] = tok
            # epsilon-greedy over valid actions (one draw per decision), else the planner, by chunks of similar K
            actions = np.zeros(N, dtype=np.int64)
            eps = np.array([rngs[i].random() < cfg.epsilon for i in act])
            for i in act[eps]:
                actions[i] = rngs[i].choice(valid[i])
            guess[torch.as_tensor(act[eps], dtype=torch.long, device=dev)] = -1  # no plan this step
            need = act[~eps][np.argsort(K[act[~eps]].cpu().numpy(), kind='stable')]
            for chunk in np.array_split(need, max(1, -(-len(need) // batch))) if len(need) else []:
                r = torch.as_tensor(chunk, device=dev)
                nb = int(nblk[r].max())
                ctx = mem[r, :nb].flatten(1)[:, :-1]  # (n, nb*37 - 1), right-padded
                out = planner(ctx, nblk[r] * T - 1, tasks[r], beam=K[r], horizon=H, guess=guess[r])
                actions[chunk] = out['action'].cpu().numpy()
                if H:
                    guess[r] = out['obs'][:, 0]
            mem[rows, nblk[rows] - 1, cfg.obs_tokens] = torch.as_tensor(actions[act], device=dev)
        if video and not done[0]:
            video_frames.append(frames[0].copy())
        # step every game's environments
        for gi, e in enumerate(envs):
            s = np.flatnonzero(slot_game == gi)
            if done[s].all():
                continue
            rew, term = e.step(actions[s], ~done[s])
            frames[s], ret[s], steps[s] = e.frames, ret[s] + rew * ~done[s], steps[s] + ~done[s]
            out_of_time = max_seconds is not None and time.time() - t0 > max_seconds
            for i in s[~done[s] & (term | (steps[s] >= max_steps) | out_of_time)]:
                done[i] = True
                why = 'game over' if term[i - s[0]] else ('step cap' if steps[i] >= max_steps else 'time cap')
                if verbose:
                    tqdm.write(f"{games[gi]} episode {i % episodes}: return {ret[i]:.0f} in {steps[i]} steps ({why})")
                bar.update(1)
            if done[s].all():
                e.close()
        bar.set_postfix(step=int(steps.max()), done=int(done.sum()))
    bar.close()
    if video:
        save_video(video, video_frames)
    return {g: [float(ret[i]) for i in np.flatnonzero(slot_game == gi)] for gi, g in enumerate(games)}


def save_video(path, frames):
    """The first rollout's 84x84 grey frames: .npy array, else a video file through OpenCV (e.g. .mp4, .avi)."""
    frames = np.stack(frames)
    if path.endswith('.npy'):
        np.save(path, frames)
        return
    import cv2
    fourcc = cv2.VideoWriter_fourcc(*('MJPG' if path.endswith('.avi') else 'mp4v'))
    w = cv2.VideoWriter(path, fourcc, 15, (84, 84), False)  # 15 agent steps per second, grey
    for f in frames:
        w.write(f)
    w.release()

# -----------------------------------------------------------------------------
# aggregation (B§8.2): per-game mean raw score -> HNS / DNS; IQM = mean of the middle 50% (scipy trim_mean(x, 0.25))


def iqm(x):
    x = np.sort(np.asarray(x, dtype=np.float64))
    cut = int(0.25 * len(x))
    return float(x[cut:len(x) - cut].mean())


def summarize(returns, preset='', plan=True, n_boot=2000, seed=0):
    """(printable table, summary dict) of {game: returns}. The IQM's 95% CI bootstraps episodes within each game."""
    games = [g for g in returns if returns[g]]
    mean = {g: float(np.mean(returns[g])) for g in games}
    official = dict(zip(TABLE, OFFICIAL_MEAN.get(preset, ()))) if plan else {}
    norm = lambda g, kind='human': f'{normalized_score(g, mean[g], kind):7.3f}' if g in REF_SCORES else ' ' * 7
    lines = [f"{'game':>16} {'episodes':>8} {'mean':>10} {'HNS':>7} {'DNS':>7} {'official':>10}"]
    lines += [f"{g:>16} {len(returns[g]):>8} {mean[g]:>10.1f} {norm(g)} {norm(g, 'dqn')} "
              f"{official[g] if g in official else '':>10}" for g in games]
    scored = [g for g in games if g in REF_SCORES]
    summary = dict(mean=mean)
    if scored:
        hns = np.array([normalized_score(g, mean[g]) for g in scored])
        rng = np.random.default_rng(seed)
        boot = [iqm([normalized_score(g, rng.choice(returns[g], len(returns[g])).mean()) for g in scored])
                for _ in range(n_boot)]
        s = summary
        s.update(hns=dict(zip(scored, hns.tolist())), iqm_hns=iqm(hns), median_hns=float(np.median(hns)),
                 mean_hns=float(hns.mean()), iqm_dns=iqm([normalized_score(g, mean[g], 'dqn') for g in scored]),
                 ci95_iqm_hns=np.percentile(boot, [2.5, 97.5]).tolist(), games=len(scored),
                 superhuman=sum(mean[g] > REF_SCORES[g][1] for g in scored))
        lines.append(f"{len(scored)} games: IQM HNS {s['iqm_hns']:.3f} (95% CI {s['ci95_iqm_hns'][0]:.3f}.."
                     f"{s['ci95_iqm_hns'][1]:.3f}), median {s['median_hns']:.3f}, mean {s['mean_hns']:.3f}, "
                     f"IQM DNS {s['iqm_dns']:.3f}, superhuman {s['superhuman']}")
    return '\n'.join(lines), summary


def main(argv):
    """The command line (module docstring); bad input exits with one 'error: ...' line before any environment starts."""
    extra = dict(ckpt='', games='Assault,Pong', episodes=16, no_plan=False, batch=0, vector=True, max_seconds=0.0,
                 out='', video='')
    cli, args = parse_args(argv, extra)
    given = {a[2:].partition('=')[0].replace('-', '_') for a in argv}
    overrides = {k: getattr(cli, k) for k in ('horizon', 'beam', 'context', 'epsilon', 'max_steps', 'dtype', 'device',
                                             'compile') if k in given}  # onto the checkpoint's own config
    groups = {'pretrain': list(PRETRAIN_GAMES), 'heldout': list(HELDOUT_GAMES)}
    games = groups.get(args['games'], args['games'].split(','))
    try:
        if not args['ckpt']:
            raise ValueError("--ckpt is required (our ckpt.pt, or tokenizer.pt,JOWA_<size>.pt, or a directory)")
        check_games(games)
        cfg, model, tokenizer = load_checkpoint(args['ckpt'], **overrides)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    device = ('cuda' if torch.cuda.is_available() else 'cpu') if cfg.device == 'auto' else cfg.device
    model, tokenizer = model.to(device), tokenizer.to(device)
    plan = not args['no_plan']
    settings = {g: dict(zip(('beam', 'horizon', 'context'), game_settings(cfg, g, plan))) for g in games}
    print(f"{cfg.preset} model on {device}, {args['episodes']} episodes per game; " +
          ', '.join(f"{g} H={s['horizon']} K={s['beam']} context={s['context']}" for g, s in settings.items()))
    returns = evaluate(model, tokenizer, cfg, games, args['episodes'], plan=plan, batch=args['batch'] or None,
                       vector=args['vector'], max_seconds=args['max_seconds'] or None, video=args['video'] or None,
                       verbose=True, freeze=True)
    table, summary = summarize(returns, cfg.preset, plan)
    print(table)
    if args['out']:
        with open(args['out'], 'w') as f:
            json.dump(dict(ckpt=args['ckpt'], preset=cfg.preset, plan=plan, settings=settings, returns=returns,
                           summary=summary), f, indent=1)
        print(f"wrote {args['out']}")


if __name__ == '__main__':
    main(sys.argv[1:])
