"""
Evaluate JOWA on Atari with the paper's protocol (REFERENCE B§8): many environments of several games in one
process, every decision batched through the beam-search planner (plan.py). Per-game beam widths and context
lengths default to the official tables; rollout i of a game is seeded with i.

    python evaluate.py --ckpt=out/ckpt.pt --games=Assault,Pong --episodes=16
    python evaluate.py --ckpt=checkpoints/tokenizer.pt,checkpoints/JOWA_150M.pt --games=pretrain --out=scores.json
    python evaluate.py --ckpt=out/ckpt.pt --games=Pong --no-plan --context=8   # greedy Q policy (H = 0)
    python evaluate.py --ckpt=out/ckpt.pt --games=Pong --planner=mcts   # MCTS (paper Table 5): H 6, T 0.9, 20 sims
    python evaluate.py --ckpt=out/scaled_ql/ckpt.pt --games=Pong   # a Scaled-QL baseline (scaled_ql.py), greedy
    python evaluate.py --compare=out/jowa/ckpt.pt,out/scaled_ql/ckpt.pt --games=Assault --no-plan   # one table
    python evaluate.py --ckpt=out/ckpt.pt --games=Pong --episodes=1 --video=pong.mp4
    python evaluate.py --ckpt=out/ckpt.pt --games=Pong --report=out/report --heldout=heldout  # evidence per stage

Options: --horizon/--beam/--context override the tables, --max_steps caps an episode (agent steps, default 108k),
--max_seconds caps the whole run, --batch bounds the environments per planner call, --vector=False steps a list of
gymnasium environments (data.make_env) instead of ale_py's C++ vector environment. --compare=a.pt,b.pt,... plays the
random policy, then each checkpoint (JOWA, MTBC or Scaled-QL; an official pair as the folder holding it) on the same
seeds with the same epsilon and step cap (--max_seconds caps each one's play) and prints one score table, a row per
agent and game (compare).
"""
import json
import os
import re
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from model import (HELDOUT_GAMES, KVCache, PRETRAIN_GAMES, REF_SCORES, VALID_ACTIONS, action_mask, device_setup,
                   load_checkpoint, normalized_score, parse_args, task_id)
from mcts import MCTS
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
             beam=None, context=None, batch=None, vector=True, video=None, verbose=False, freeze=False, policy='model'):
    """Play `episodes` rollouts (seeded 0..episodes-1) of every game, all environments in lockstep, decisions
    batched over environments (at most `batch` per planner call; default 16 on CPU, 64 on GPU). plan=False is the
    greedy Q policy (H = 0); horizon/beam/context override cfg and the tables. policy='random' plays uniformly
    random valid actions instead, drawn from the same per-rollout RNGs (the model is not run). Model and tokenizer
    in eval mode; cfg.dtype picks autocast, cfg.planner beam search or MCTS (mcts.MCTS: cfg.mcts_simulations and
    cfg.mcts_temperature, max depth H - 1), cfg.compile a compiled planner (freeze=True: with frozen weights, only for
    a model that will not change in this process). Returns ({game: [raw return of each episode]}, {game: [cut
    of each episode]}): an episode cut by max_steps (agent steps, default cfg.max_steps) or max_seconds (wall clock
    of the whole call) counts its return so far and has cut True."""
    check_games(games)
    if policy not in ('model', 'random'):
        raise ValueError(f"policy={policy!r}: choose 'model' or 'random'")
    if plan and cfg.objective == 'bc':
        raise ValueError("an MTBC model (objective bc) has no world model to plan with: evaluate it with plan=False")
    model_free = hasattr(model, 'act')  # Scaled-QL (scaled_ql.py): no tokenizer, no planner (model_free_actions)
    if plan and model_free:
        raise ValueError("a model-free agent (Scaled-QL) has no world model to plan with: evaluate it with plan=False")
    dev = next(model.parameters()).device
    amp = device_setup(cfg, dev)[2]
    max_steps, batch = max_steps or cfg.max_steps, batch or 64  # 64: bounds the planner's per-candidate KV caches
    if not model_free:
        mcts = cfg.planner == 'mcts'  # MCTS (paper Table 5) instead of beam search: the same call, its own settings
        planner = (MCTS if mcts else Planner)(model, compile=cfg.compile, freeze=freeze)
        search = dict(simulations=cfg.mcts_simulations, temperature=cfg.mcts_temperature) if mcts else \
            dict(lam=cfg.plan_lambda)
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
    stack = np.zeros((N, 4, 84, 84), dtype=np.uint8) if model_free else None  # model-free: each slot's last 4 frames
    ret, steps, done, cut = np.zeros(N), np.zeros(N, dtype=np.int64), np.zeros(N, dtype=bool), np.zeros(N, dtype=bool)
    video_frames, imagined, t0 = [], np.zeros_like(frames[0]), time.time()
    bar = tqdm(total=N, unit='episode', disable=not verbose, dynamic_ncols=True)
    # one autocast region for the whole evaluation: autocast keeps its casts of the weights within a region, so
    # they are cast once, not at every decision (the weights do not change here)
    with amp:
        while not done.all():
            act = np.flatnonzero(~done)  # active slots
            rows = torch.as_tensor(act, device=dev)
            if policy == 'random':
                actions = np.zeros(N, dtype=np.int64)
                actions[act] = [rngs[i].choice(valid[i]) for i in act]
            elif model_free:
                actions = model_free_actions(model, stack, frames, act, rngs, valid, cfg.epsilon, tasks, batch)
            else:
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
                    out = planner(ctx, nblk[r] * T - 1, tasks[r], beam=K[r], horizon=H, guess=guess[r], **search)
                    actions[chunk] = out['action'].cpu().numpy()
                    if H:
                        guess[r] = out['obs'][:, 0]
                mem[rows, nblk[rows] - 1, cfg.obs_tokens] = torch.as_tensor(actions[act], device=dev)
            if video and not done[0]:  # with planning: beside the real frame, the one the last plan imagined for it
                video_frames.append(np.concatenate([frames[0], imagined], 1) if H else frames[0].copy())
                if H:
                    imagined = np.zeros_like(frames[0]) if guess[0, 0] < 0 else \
                        (tokenizer.decode(guess[:1])[0, 0] * 255).round().byte().cpu().numpy()
            # step every game's environments
            for gi, e in enumerate(envs):
                s = np.flatnonzero(slot_game == gi)
                if done[s].all():
                    continue
                rew, term = e.step(actions[s], ~done[s])
                frames[s], ret[s], steps[s] = e.frames, ret[s] + rew * ~done[s], steps[s] + ~done[s]
                out_of_time = max_seconds is not None and time.time() - t0 > max_seconds
                for i in s[~done[s] & (term | (steps[s] >= max_steps) | out_of_time)]:
                    done[i], cut[i] = True, not term[i - s[0]]
                    why = 'game over' if term[i - s[0]] else ('step cap' if steps[i] >= max_steps else 'time cap')
                    if verbose:
                        tqdm.write(f"{games[gi]} episode {i % episodes}: return {ret[i]:.0f} in {steps[i]} steps "
                                   f"({why})")
                    bar.update(1)
                if done[s].all():
                    e.close()
            bar.set_postfix(step=int(steps.max()), done=int(done.sum()))
    bar.close()
    if video:
        save_video(video, video_frames)
    slots = {g: np.flatnonzero(slot_game == gi) for gi, g in enumerate(games)}
    return ({g: [float(ret[i]) for i in s] for g, s in slots.items()},
            {g: [bool(cut[i]) for i in s] for g, s in slots.items()})


def save_video(path, frames):
    """The first rollout's grey frames (84 x 84, or 84 x 168 with the imagined frame beside the real one): .npy
    array, else a video file through OpenCV (.mp4, .avi)."""
    frames = np.stack(frames)
    if path.endswith('.npy'):
        np.save(path, frames)
        return
    import cv2
    fourcc = cv2.VideoWriter_fourcc(*('MJPG' if path.endswith('.avi') else 'mp4v'))
    w = cv2.VideoWriter(path, fourcc, 15, frames.shape[2:0:-1], False)  # 15 agent steps per second, grey
    for f in frames:
        w.write(f)
    w.release()

# -----------------------------------------------------------------------------
# model-free agents (scaled_ql.py's Scaled-QL): a model with act(stacks, tasks), played greedily under the same
# protocol (environments, seeds, epsilon draws, caps, score table) without planning: it has no world model


def model_free_actions(model, stack, frames, act, rngs, valid, epsilon, tasks, batch):
    """Push the new frames of the active slots `act` into their 4-frame stacks (N, 4, 84, 84) uint8, zeros before an
    episode's first frame as in scaled_ql.py's training; then per decision one epsilon draw from the slot's RNG, as
    for JOWA, else model.act's greedy valid action, `batch` slots per call. Returns actions (N,) full ids."""
    stack[act] = np.concatenate([stack[act, 1:], frames[act, None]], 1)
    actions = np.zeros(len(stack), dtype=np.int64)
    eps = np.array([rngs[i].random() < epsilon for i in act])
    for i in act[eps]:
        actions[i] = rngs[i].choice(valid[i])
    need = act[~eps]
    for chunk in np.array_split(need, max(1, -(-len(need) // batch))) if len(need) else []:
        r = torch.as_tensor(chunk, device=tasks.device)
        actions[chunk] = model.act(torch.as_tensor(stack[chunk], device=tasks.device), tasks[r]).cpu().numpy()
    return actions


def play_model_free(model, cfg, games, args, device):
    """main() for a Scaled-QL checkpoint: the score table of the same evaluation, greedy, no planning."""
    if args['report']:
        raise SystemExit("error: --report needs a JOWA checkpoint (tokenizer and world model), not a Scaled-QL one")
    print(f"Scaled-QL {model.preset} ({sum(p.numel() for p in model.parameters()):,} parameters) on {device}, "
          f"{args['episodes']} episodes per game, greedy (no planning), epsilon {cfg.epsilon}")
    returns, cut = evaluate(model, None, cfg, games, args['episodes'], batch=args['batch'] or None,
                            vector=args['vector'], max_seconds=args['max_seconds'] or None, video=args['video'] or None,
                            verbose=True)
    table, summary = summarize(returns, cfg.preset, plan=False, cut=cut)
    print(table)
    if args['out']:
        with open(args['out'], 'w') as f:
            json.dump(dict(ckpt=args['ckpt'], agent='scaled_ql', preset=model.preset, plan=False, returns=returns,
                           cut=cut, summary=summary), f, indent=1)
        print(f"wrote {args['out']}")

# -----------------------------------------------------------------------------
# comparison (--compare=a.pt,b.pt): the random policy and several agents (JOWA, MTBC, Scaled-QL) on the same games
# and seeds in one call, under one protocol, in one score table with a row per agent


def recorded_games(path):
    """The games a train.py checkpoint at `path` was trained on; None where it records none (weights only, an
    official pair or folder, finetune.py's). A memory-mapped peek: reads almost nothing of the weights."""
    if ',' in path or os.path.isdir(path):
        return None
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception:  # load_checkpoint read it: a legacy (not zip) file, which mmap cannot read
        return None
    args = ckpt.get('args') if isinstance(ckpt, dict) and ckpt.get('script') == 'train' else None
    return args['games'].split(',') if isinstance(args, dict) and args.get('games') else None


def compare(paths, games, cli, args, overrides):
    """main() for --compare: every checkpoint loaded and checked first (a JOWA or Scaled-QL checkpoint that knows
    every game of --games: a head for it, or trained on it where the checkpoint records its games), then the random
    policy and each agent (JOWA planning, or greedy with --no-plan; MTBC and Scaled-QL greedy) play the same seeds
    with the command line's epsilon and step cap, and score_table prints one row per agent and game."""
    import scaled_ql
    if args['ckpt'] or args['report'] or args['video']:
        raise SystemExit("error: --compare plays one score table: give it without --ckpt, --report or --video")
    overrides = {**overrides, 'epsilon': cli.epsilon, 'max_steps': cli.max_steps}  # one protocol for every agent
    agents = []  # (row name, path, cfg, model, tokenizer or None, plan)
    try:
        check_games(games)
        for path in paths:
            sql = scaled_ql.load(path, games, **overrides)  # None: not a Scaled-QL checkpoint
            cfg, model, tok = (*sql, None) if sql else load_checkpoint(path, **overrides)
            trained = None if sql else recorded_games(path)  # a Scaled-QL model: load checked its heads
            missing = [g for g in games if g not in trained] if trained else []
            if missing:
                raise ValueError(f"{path} was trained on {', '.join(trained)}, not {missing[0]}")
            plan = not sql and not args['no_plan'] and cfg.objective != 'bc'
            how = ('mcts' if getattr(cfg, 'planner', 'beam') == 'mcts' else 'plan') if plan else 'greedy'
            kind = 'Scaled-QL' if sql else 'MTBC' if cfg.objective == 'bc' else 'JOWA'
            name = f"{kind} {cfg.preset}" + ('' if sql else f' {how}')
            name += f" #{len(agents) + 1}" if name in [a[0] for a in agents] else ''
            agents.append((name, path, cfg, model, tok, plan))
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: --compare: {e}")
    n = args['episodes']
    print(f"{len(games)} game(s) x {n} episodes (seeds 0..{n - 1}), epsilon {cli.epsilon}, step cap {cli.max_steps}: "
          f"random and " + ', '.join(f"{name} ({path})" for name, path, *_ in agents))
    rows = {}
    for name, _, cfg, model, tok, plan in [('random', *agents[0][1:5], False), *agents]:  # random: runs no model
        device = device_setup(cfg)[0]
        t0 = time.time()
        rows[name] = evaluate(model.to(device), tok if tok is None else tok.to(device), cfg, games, n, plan=plan,
                              batch=args['batch'] or None, vector=args['vector'],
                              max_seconds=args['max_seconds'] or None, verbose=True, freeze=True,
                              policy='random' if name == 'random' else 'model')
        print(f"played {name}: {n} episodes per game in {time.time() - t0:.0f}s", flush=True)
    table, stats, verdicts = score_table(rows)
    print(table + ''.join(f'\n{v}' for v in verdicts or ['no agent beats random (95% CIs overlap)']))
    summary = {name: summarize(returns, plan=False, cut=cut)[1] for name, (returns, cut) in rows.items()}
    for name, s in summary.items():  # the paper's aggregate, over the games whose episodes all ended at game over
        if 'iqm_hns' in s:
            lo, hi = s['ci95_iqm_hns']
            print(f"{name}: IQM HNS {s['iqm_hns']:.3f} (95% CI {lo:.3f}..{hi:.3f}) over {s['games']} games")
    if args['out']:
        info = {name: dict(ckpt=path, agent='scaled_ql' if tok is None else cfg.objective, preset=cfg.preset,
                           plan=plan) for name, path, cfg, _, tok, plan in agents}
        with open(args['out'], 'w') as f:
            json.dump(dict(compare=paths, games=games, episodes=n, epsilon=cli.epsilon, max_steps=cli.max_steps,
                           agents=info, rows=stats, summary=summary, verdicts=verdicts), f, indent=1)
        print(f"wrote {args['out']}")

# -----------------------------------------------------------------------------
# aggregation (B§8.2): per-game mean raw score -> HNS / DNS; IQM = mean of the middle 50% (scipy trim_mean(x, 0.25))


def iqm(x):
    x = np.sort(np.asarray(x, dtype=np.float64))
    cut = int(0.25 * len(x))
    return float(x[cut:len(x) - cut].mean())


def summarize(returns, preset='', plan=True, n_boot=2000, seed=0, cut=None):
    """(printable table, summary dict) of {game: returns}. The IQM's 95% CI bootstraps episodes within each game.
    cut {game: [bool]} marks episodes stopped by a step or time cap: such a game's mean is not a whole-episode
    score, so it gets no HNS / DNS and stays out of the aggregates."""
    cut = {g: sum(cut[g]) for g in cut} if cut else {}
    games = [g for g in returns if returns[g]]
    mean = {g: float(np.mean(returns[g])) for g in games}
    official = dict(zip(TABLE, OFFICIAL_MEAN.get(preset, ()))) if plan else {}
    scored = [g for g in games if g in REF_SCORES and not cut.get(g)]
    norm = lambda g, kind='human': f'{normalized_score(g, mean[g], kind):7.3f}' if g in scored else ' ' * 7
    lines = [f"{'game':>16} {'episodes':>8} {'mean':>10} {'HNS':>7} {'DNS':>7} {'official':>10}"]
    lines += [f"{g:>16} {len(returns[g]):>8} {mean[g]:>10.1f} {norm(g)} {norm(g, 'dqn')} "
              f"{official[g] if g in official else '':>10}" + (f"  ({cut[g]} cut by a cap)" if cut.get(g) else '')
              for g in games]
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


# -----------------------------------------------------------------------------
# evidence per stage, at the end of a run: numbers with their baselines, and pictures (PNG, through matplotlib when
# it is installed) in the run's folder, so a collapsed codebook, a world model that only copies the last frame or an
# agent no better than random shows at a glance


def bootstrap_ci(x, n_boot=2000, seed=0):
    """95% percentile-bootstrap interval of the mean of x (resampling episodes)."""
    x = np.asarray(x, dtype=np.float64)
    means = np.random.default_rng(seed).choice(x, (n_boot, len(x))).mean(1)
    return tuple(np.percentile(means, [2.5, 97.5]).tolist())


def score_table(rows):
    """rows {policy: (returns, cut)} as evaluate() gives them, every policy on the same games and seeds ->
    (printable table, {policy: {game: stats}}, verdict lines). A row's name is a policy ('random', 'greedy', 'plan')
    or an agent (compare: 'JOWA tiny greedy', 'Scaled-QL tiny'). A policy beats random on a game when its 95% CI lies
    wholly above the random row's; a mean over capped episodes is not a game score, so HNS is only printed for
    games whose episodes all ended at game over."""
    w = max([8, *map(len, rows)])  # the policy column fits the longest row name
    lines = [f"{'game':>14} {'policy':>{w}} {'episodes':>8} {'mean':>9} {'95% CI':>19} {'std':>8} {'HNS':>7}  note"]
    stats = {}
    for policy, (returns, cut) in rows.items():
        for g, r in returns.items():
            lo, hi = bootstrap_ci(r)
            n_cut = sum(cut[g])
            hns = normalized_score(g, np.mean(r)) if g in REF_SCORES and not n_cut else None
            stats.setdefault(policy, {})[g] = dict(mean=float(np.mean(r)), ci95=[lo, hi], std=float(np.std(r)),
                                                   episodes=len(r), cut=n_cut, hns=hns, returns=r)
    for g in next(iter(rows.values()))[0]:
        for policy in rows:
            st = stats[policy][g]
            hns = f"{st['hns']:7.3f}" if st['hns'] is not None else ' ' * 7
            note = f"{st['cut']} of {st['episodes']} cut by a step/time cap" if st['cut'] else ''
            lines.append(f"{g:>14} {policy:>{w}} {st['episodes']:>8} {st['mean']:>9.1f} "
                         f"{'(%.1f, %.1f)' % tuple(st['ci95']):>19} {st['std']:>8.1f} {hns}  {note}")
    verdicts = []
    if 'random' in rows:
        for policy in [p for p in rows if p != 'random']:
            for g, st in stats[policy].items():
                rnd = stats['random'][g]
                if st['ci95'][0] > rnd['ci95'][1]:
                    verdicts.append(f"{policy} beats random on {g}: CI {st['ci95'][0]:.1f}..{st['ci95'][1]:.1f} "
                                    f"above {rnd['ci95'][0]:.1f}..{rnd['ci95'][1]:.1f}")
    return '\n'.join(lines), stats, verdicts


def codebook_use(tokens, vocab):
    """tokens (any shape) -> (distinct codes used, perplexity = exp(entropy of the code frequencies)): all codes
    used equally give vocab, one code gives 1."""
    counts = torch.bincount(tokens.flatten().long(), minlength=vocab).double()
    p = counts[counts > 0] / counts.sum()
    return int((counts > 0).sum()), float(torch.exp(-(p * p.log()).sum()))


def next_frame_predictions(model, batch):
    """Teacher-forced predictions (B, T-1, 36) of the tokens of frames 1..T-1 of token segments (B§4.1 batch): each
    token from the real past, as the world-model loss scores them; also returns the logits (obs, reward, end)."""
    obs, act = batch['observations'], batch['actions']
    B, T, K = obs.shape
    h = model(torch.cat([obs, act[..., None]], -1).flatten(1), batch['envs']).view(B, T, K + 1, -1)
    logits = model.world_logits(h)
    return logits[0].argmax(-1)[:, K - 1:].view(B, T - 1, K), logits


def frame_accuracy(pred, obs, mask):
    """pred (B, T-1, K) tokens of frames 1..T-1, obs (B, T, K), mask (B, T) real steps -> (accuracy of pred, accuracy
    of copying the previous frame), over the frames with a real predecessor."""
    nxt = mask[:, 1:]
    return float((pred == obs[:, 1:])[nxt].float().mean()), float((obs[:, :-1] == obs[:, 1:])[nxt].float().mean())


def world_metrics(model, batch):
    """World-model accuracy on token segments, real steps only: next-frame tokens against copying the last frame,
    the reward sign against always predicting 0 (and on the non-zero rewards alone), termination."""
    pred, (_, rew_logits, end_logits) = next_frame_predictions(model, batch)
    rew, ends, mask = batch['rewards'], batch['ends'], batch['mask_padding']
    acc, copy = frame_accuracy(pred, batch['observations'], mask)
    rew_cls = torch.sign(rew).long() + 1
    hit = rew_logits.argmax(-1) == rew_cls
    return dict(next_frame_token_acc=acc, copy_last_frame_acc=copy, reward_sign_acc=float(hit[mask].float().mean()),
                reward_always_zero_acc=float((rew_cls == 1)[mask].float().mean()),
                reward_sign_acc_nonzero=float(hit[mask & (rew_cls != 1)].float().mean()),
                end_acc=float((end_logits.argmax(-1) == ends)[mask].float().mean()))


@torch.no_grad()
def imagine_frames(model, tokens, actions, tasks, context):
    """Open-loop imagination with the real actions: tokens (B, T, 36) and actions (B, T) of whole segments; the first
    `context` blocks are given, frames context..T-1 are decoded greedily token by token (KV cache), each followed by
    its real action. Returns (B, T - context, 36) imagined tokens."""
    B, T, K = tokens.shape
    ctx = torch.cat([tokens[:, :context], actions[:, :context, None]], -1).flatten(1)  # (B, context*37)
    cache = KVCache(model.cfg, B, tokens.device)
    last, pos, frames = model(ctx, tasks, cache=cache)[:, -1], ctx.shape[1], []
    for t in range(context, T):
        frame = []
        for j in range(K + 1):  # 36 obs tokens, then the real action
            tok = model.head_obs(last).argmax(-1) if j < K else actions[:, t]
            frame.append(tok)
            if t < T - 1 or j < K - 1:
                last = model(tok[:, None], tasks, cache=cache, pos=torch.full((B,), pos, device=tokens.device))[:, -1]
                pos += 1
        frames.append(torch.stack(frame[:K], 1))
    return torch.stack(frames, 1)


def save_grid(path, rows, title):
    """rows [(label, (n, 84, 84) frames in [0, 1])] -> one PNG, a row of frames per label. Returns the path, or
    None without matplotlib (the numbers are printed anyway)."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    n = max(len(f) for _, f in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n, 1.45 * len(rows) + 0.4), squeeze=False)
    for r, (label, frames) in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            if c < len(frames):
                ax.imshow(np.asarray(frames[c]), cmap='gray', vmin=0, vmax=1)
            else:
                ax.axis('off')
        axes[r, 0].set_ylabel(label, fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_curves(path, log):
    """log [{'step': s, term: value, ...}] (train.py's log.jsonl) -> one PNG with a panel per loss term."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = list(dict.fromkeys(k for row in log for k in row if k not in ('step', 'stage', 'ms')))
    if not keys:
        return None
    cols = min(4, len(keys))
    fig, axes = plt.subplots(-(-len(keys) // cols), cols, figsize=(3.2 * cols, 2.2 * -(-len(keys) // cols)),
                             squeeze=False)
    for ax, k in zip(axes.flat, keys):
        pts = [(row['step'], row[k]) for row in log if k in row]
        ax.plot(*zip(*pts), lw=1)
        ax.set_title(k, fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis('off')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@torch.no_grad()
def stage_evidence(model, tokenizer, cfg, d, segments=64, context=4):
    """One game's tokenizer and world-model numbers on `segments` segments of a processed game d (load_dataset),
    and the frames for the pictures: (tokenizer dict, world-model dict, tokenizer rows, world-model rows)."""
    import data
    dev, g = next(model.parameters()).device, d['game']
    batch = {k: v.to(dev) for k, v in data.Sampler([d], cfg.max_blocks, seed=cfg.seed).sample(segments).items()}
    x, mask = batch['observations'], batch['mask_padding']  # (B, T, 1, 84, 84) frames, (B, T) real steps
    tok = torch.cat([tokenizer.encode(c) for c in x.flatten(0, 1).split(256)]).view(*mask.shape, -1)
    rec = torch.cat([tokenizer.decode(c) for c in tok.flatten(0, 1).split(256)]).view_as(x)
    used, ppl = codebook_use(tok[mask], cfg.obs_vocab)
    tk = dict(l1=float((rec - x).abs()[mask].mean()), l1_mean_frame=float((x[mask] - x[mask].mean(0)).abs().mean()),
              codes_used=used, perplexity=ppl, frames=int(mask.sum()),
              tokens_changed_per_step=float((tok[:, 1:] != tok[:, :-1]).sum(-1)[mask[:, 1:]].float().mean()))
    every = max(1, int(mask.sum()) // 8)
    tok_rows = [(f'{g} real', x[mask][::every][:8, 0].cpu()), (f'{g} reconstructed', rec[mask][::every][:8, 0].cpu())]
    if cfg.objective == 'bc':  # MTBC has no world model
        return tk, {}, tok_rows, []
    wm = world_metrics(model, dict(batch, observations=tok))
    whole = mask.all(1).nonzero().flatten()[:1]  # one segment without padding, for the strip
    if not len(whole):
        return tk, wm, tok_rows, []
    t = int(whole[0])
    imagined = imagine_frames(model, tok[whole], batch['actions'][whole], batch['envs'][whole], context)[0]
    wm.update(imagined_token_acc=float((imagined == tok[t, context:]).float().mean()),
              imagined_copy_context_acc=float((tok[t, context - 1] == tok[t, context:]).float().mean()))
    wm_rows = [(f'{g} real', x[t, context - 1:, 0].cpu()),
               (f'{g} imagined', torch.cat([rec[t, context - 1:context], tokenizer.decode(imagined)])[:, 0].cpu())]
    return tk, wm, tok_rows, wm_rows


@torch.no_grad()
def report(model, tokenizer, cfg, games, out_dir, heldout, log=None, episodes=16, max_steps=None, max_seconds=None,
           policies=('random', 'greedy', 'plan'), segments=64, context=4, say=print):
    """Evidence per stage for a trained model, printed and written into out_dir (report.json and PNGs):
    tokenizer (held-out frames beside their reconstructions, L1 error, codebook use), world model (real next frames
    beside the frames it imagines from a held-out context with the real actions; token accuracies against copying
    the last frame; reward-sign accuracy), training curves (log), and the agent: a score table of `policies`
    ('random', 'greedy', 'plan') played on the same seeds in this call. heldout: a processed data folder of those
    games (data.py) whose episodes were not trained on."""
    import data
    os.makedirs(out_dir, exist_ok=True)
    model.eval(), tokenizer.eval()
    out, tok_rows, wm_rows = dict(tokenizer={}, world_model={}), [], []
    for d in data.load_dataset(heldout, games):
        g = d['game']
        tk, wm, rows_t, rows_w = stage_evidence(model, tokenizer, cfg, d, segments, context)
        out['tokenizer'][g], out['world_model'][g], tok_rows, wm_rows = tk, wm, tok_rows + rows_t, wm_rows + rows_w
        say(f"tokenizer   {g}: L1 {tk['l1']:.4f} (the mean frame: {tk['l1_mean_frame']:.4f}) on {tk['frames']} "
            f"held-out frames, {tk['codes_used']} of {cfg.obs_vocab} codes used, perplexity {tk['perplexity']:.1f}, "
            f"{tk['tokens_changed_per_step']:.1f} of 36 tokens change per step")
        if wm:
            say(f"world model {g}: next-frame tokens {wm['next_frame_token_acc']:.3f} (copying the last frame "
                f"{wm['copy_last_frame_acc']:.3f}), reward sign {wm['reward_sign_acc']:.3f} (always 0: "
                f"{wm['reward_always_zero_acc']:.3f}; on non-zero rewards {wm['reward_sign_acc_nonzero']:.3f})" +
                (f", {cfg.max_blocks - context} imagined steps {wm['imagined_token_acc']:.3f} (copying the context's "
                 f"last frame {wm['imagined_copy_context_acc']:.3f})" if 'imagined_token_acc' in wm else ''))
    title = ', '.join(f"{g} L1 {v['l1']:.3f}, perplexity {v['perplexity']:.0f}" for g, v in out['tokenizer'].items())
    pics = [save_grid(os.path.join(out_dir, 'tokenizer.png'), tok_rows, f'held-out frames, reconstructed: {title}'),
            wm_rows and save_grid(os.path.join(out_dir, 'world_model.png'), wm_rows, f'last context frame, then the '
                                  f'real next frames and the imagined ones ({context}-block context, real actions)'),
            log and save_curves(os.path.join(out_dir, 'curves.png'), log)]
    rows = {}
    for policy in [p for p in policies if p != 'plan' or cfg.objective != 'bc'] if episodes else ():  # MTBC: no plan
        t0 = time.time()
        rows[policy] = evaluate(model, tokenizer, cfg, games, episodes, plan=policy == 'plan', max_steps=max_steps,
                                max_seconds=max_seconds, policy='random' if policy == 'random' else 'model')
        say(f"played {policy}: {episodes} episodes per game in {time.time() - t0:.0f}s")
    if rows:
        table, out['agent'], out['verdicts'] = score_table(rows)
        say(table + ''.join(f'\n{v}' for v in out['verdicts'] or ['no policy beats random (95% CIs overlap)']))
    with open(os.path.join(out_dir, 'report.json'), 'w') as f:
        json.dump(out, f, indent=1)
    pics = [p for p in pics if p]
    say(f"wrote {os.path.join(out_dir, 'report.json')}" + (f" and {', '.join(pics)}" if pics else
                                                           " (pictures need matplotlib: pip install matplotlib)"))
    return out


def main(argv):
    """The command line (module docstring); bad input exits with one 'error: ...' line before any environment starts."""
    extra = dict(ckpt='', games='Assault,Pong', episodes=16, no_plan=False, batch=0, vector=True, max_seconds=0.0,
                 out='', video='', report='', heldout='', compare='')
    cli, args = parse_args(argv, extra, dict(episodes='>0', batch='>=0', max_seconds='>=0', out='file', video='file',
                                             report='dir'))
    if args['video'] and not args['video'].endswith(('.npy', '.mp4', '.avi')):
        raise SystemExit(f"error: --video={args['video']}: the file must end in .npy, .mp4 or .avi")
    given = {a[2:].partition('=')[0].replace('-', '_') for a in argv}
    overrides = {k: getattr(cli, k) for k in ('horizon', 'beam', 'context', 'epsilon', 'max_steps', 'dtype', 'device',
                                             'compile', 'planner', 'mcts_simulations', 'mcts_temperature',
                                             'plan_lambda') if k in given}  # onto the checkpoint's own config
    if cli.planner == 'mcts' and 'horizon' not in given:  # eval_MCTS.sh: H 6 (max depth 5), not the beam's 2
        overrides['horizon'] = 6
    groups = {'pretrain': list(PRETRAIN_GAMES), 'heldout': list(HELDOUT_GAMES)}
    games = groups.get(args['games'], args['games'].split(','))
    if args['compare']:  # the random policy and several agents in one score table (compare)
        return compare(args['compare'].split(','), games, cli, args, overrides)
    try:
        if not args['ckpt']:
            raise ValueError("--ckpt is required (our ckpt.pt, or tokenizer.pt,JOWA_<size>.pt, or a directory)")
        check_games(games)
        import scaled_ql
        agent = scaled_ql.load(args['ckpt'], games, **overrides)  # a Scaled-QL checkpoint (script 'scaled_ql')?
        cfg, model, tokenizer = (*agent, None) if agent else load_checkpoint(args['ckpt'], **overrides)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    device = device_setup(cfg)[0]
    if agent:  # model-free: greedy, the same protocol (section above)
        return play_model_free(model.to(device), cfg, games, args, device)
    model, tokenizer = model.to(device), tokenizer.to(device)
    if args['report']:  # evidence per stage instead of one score table (module docstring)
        if not args['heldout']:
            raise SystemExit("error: --report needs --heldout=<processed data folder> of the games (data.py process)")
        log = os.path.join(os.path.dirname(args['ckpt']), 'log.jsonl')  # train.py's, for the curves
        log = [json.loads(line) for line in open(log)] if os.path.isfile(log) else None
        import data
        try:
            data.load_dataset(args['heldout'], games)  # one line, before any work, for a game it lacks
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"error: --heldout={args['heldout']}: {e}")
        report(model.eval(), tokenizer.eval(), cfg, games, args['report'], args['heldout'], log, args['episodes'],
               cfg.max_steps, args['max_seconds'] or None)
        return
    plan = not args['no_plan'] and cfg.objective != 'bc'  # MTBC is a policy: no world model to plan with
    settings = {g: dict(zip(('beam', 'horizon', 'context'), game_settings(cfg, g, plan))) for g in games}
    mcts = f", MCTS {cfg.mcts_simulations} simulations T {cfg.mcts_temperature} max depth H - 1" if plan and \
        cfg.planner == 'mcts' else ''
    print(f"{cfg.preset} model on {device}, {args['episodes']} episodes per game{mcts}; " +
          ', '.join(f"{g} H={s['horizon']} K={s['beam']} context={s['context']}" for g, s in settings.items()))
    returns, cut = evaluate(model, tokenizer, cfg, games, args['episodes'], plan=plan, batch=args['batch'] or None,
                       vector=args['vector'], max_seconds=args['max_seconds'] or None, video=args['video'] or None,
                       verbose=True, freeze=True)
    table, summary = summarize(returns, cfg.preset, plan, cut=cut)
    print(table)
    if args['out']:
        with open(args['out'], 'w') as f:
            json.dump(dict(ckpt=args['ckpt'], preset=cfg.preset, plan=plan, planner=cfg.planner, settings=settings,
                           returns=returns, cut=cut, summary=summary), f, indent=1)
        print(f"wrote {args['out']}")


if __name__ == '__main__':
    main(sys.argv[1:])
