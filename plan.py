"""
JOWA's beam-search planner (REFERENCE B§7.2-7.3), one batched tensor program over (environments x beams), written on
model.py's KV-cache API (JOWA.forward with a KVCache, KVCache.select): plan.py runs no transformer block of its own.

Per environment the input is a token context that ends with the current observation's 36 tokens. Every beam node
proposes its top-K valid actions by the critic; the world model then plays one step for ALL candidates of all
environments at once (world_step: the action token, then 36 greedy obs tokens, by Jacobi iteration: the same tokens
as decoding them one by one); a candidate at depth d scores sum_i gamma^(i-1) r_i + gamma^d max_a Q(s_d, a) and the
best K per environment survive. The first action of the best depth-H path is returned. H = 0 is the greedy policy.

    planner = Planner(model)                              # model in eval mode; Planner(model, compile=True)
    out = planner(ctx, ctx_len, tasks, beam=2, horizon=2)
    out['action']                                         # (N,) full action ids
    out['actions'], out['rewards'], out['obs']            # the best path: (N, H), (N, H), (N, H, 36)

MCTS, the paper's Table 5 comparison, is in mcts.py, on the same world_step.
Imagination (at the end; B§7.5) turns the planner into training data: `imagine` rolls real segments on in the world
model (beam search, or epsilon-greedy w.r.t. the critic: Planner with beam 1 and epsilon), `data.Replay` is the FIFO of
the imagined segments. finetune.py and train.py --imagine both use them.

    seg = imagine(planner, tokenizer, batch, horizon=4, epsilon=0.1)       # or horizon=2, beam=2 (fine-tuning)
"""
import statistics
import time

import torch
import torch._dynamo

from model import KVCache


def make_context(obs, actions):
    """Interleave n blocks: obs tokens (B, n, 36), actions (B, n) -> context (B, n*37 - 1), the last action dropped
    (a context ends with the current observation)."""
    return torch.cat([obs, actions[..., None]], -1).flatten(1)[:, :-1]


def world_step(forward, model, cache, act, draft, pos, tasks, jacobi=True, max_passes=8, stats=None):
    """B§7.3 for M rows: the action token act (M,) at position pos (M,), then 36 greedy obs tokens, written into
    cache (M rows; the keys before pos already there). forward: model.forward or its compiled form. Returns obs (M,
    36), reward in {-1, 0, 1} (M,), end (M,) and the new state's Q (M, A).
    Token by token (jacobi False) this is 37 passes of one input. Jacobi decoding (Santilli et al. 2023) runs the
    inputs [action, draft] in one pass and replaces the draft by the predictions until they agree: the agreed tokens
    are then exactly the greedy ones (obs j is the argmax given the action and obs < j), and the first wrong guess is
    right after the next pass, so it ends within 37 passes. Consecutive Atari frames share most tokens, so a frame
    close to the last one (draft, e.g. the parent's) agrees in a few passes, each of which restarts at the first
    changed input (the keys before it are final). After max_passes (a bad draft: its worst case is 37 full passes)
    the rest is decoded token by token."""
    x = torch.cat([act[:, None], draft], 1)  # (M, 37) the block's inputs; x[:, j + 1] is obs token j
    s, passes, T = 0, 0, x.shape[1]  # inputs before s are settled (greedy) and their keys cached
    while s < T:
        w, W = s, T - s if jacobi and passes < max_passes else 1  # this pass: inputs w .. w + W - 1
        h = forward(x[:, w:w + W], tasks, cache=cache, pos=pos + w)  # (M, W, E)
        if w == 0:
            rew, end = model.head_rew(h[:, 0]).argmax(-1) - 1, model.head_end(h[:, 0]).argmax(-1)
        if w + W == T:
            hq = h[:, -1]  # after obs token 35: the new state's Q, once the tokens are final
        n = min(W, T - 1 - w)  # input j predicts obs token j (the last input predicts none)
        pred = model.head_obs(h[:, :n]).argmax(-1)  # (M, n)
        changed = (pred != x[:, w + 1:w + 1 + n]).any(0)  # (n,)
        x[:, w + 1:w + 1 + n] = pred
        passes += 1
        if W == 1:
            s = w + 1
        elif not changed.any():  # a host sync per pass
            break
        else:  # the first changed input is now right; recompute from there
            s = w + 1 + int(changed.int().argmax())
    if stats is not None:
        stats['blocks'], stats['passes'] = stats['blocks'] + 1, stats['passes'] + passes
    return x[:, 1:], rew, end, model.q_values(hq, tasks)


def prefill(forward, model, ctx, ctx_len, tasks, blocks, guess=None, reserve=True):
    """Prefill the contexts (as for Planner.__call__) into a new KVCache (compute dtype: autocast's, else the
    weights'); the contexts must leave room for `blocks` imagined blocks (else ValueError), which the cache holds
    too if reserve (else it holds the contexts alone, e.g. to be forked: KVCache.fork). Returns the cache, the root
    Q (N, A) at the last obs token and the first draft of the next frame (N, 36): the caller's guess (N, 36) where
    given (-1 rows: none), else the model's teacher-forced reading of the current frame (a one-block context: the
    frame itself). Why: a model imagines frames in its own style, so its next frame is closer to its reading of the
    current frame than to the real one, and Jacobi decoding agrees in fewer passes (the tokens never change)."""
    cfg, (N, n), dev = model.cfg, ctx.shape, ctx.device
    if n + cfg.tokens_per_block * blocks > cfg.max_tokens:
        raise ValueError(f"a context of {n} tokens leaves no room for {blocks} imagined blocks (at most "
                         f"{cfg.max_tokens - cfg.tokens_per_block * blocks} tokens: {cfg.max_blocks - blocks} blocks)")
    amp = torch.is_autocast_enabled(dev.type)
    dtype = torch.get_autocast_dtype(dev.type) if amp else model.pos_emb.weight.dtype
    cache = KVCache(cfg, N, dev, dtype, length=n + cfg.tokens_per_block * blocks * reserve)
    last = (ctx_len[:, None] - 37 + torch.arange(37, device=dev)).clamp(min=0)  # (N, 37): the last block's
    h = forward(ctx, tasks, cache=cache, rows=last)  # (N, 37, E); right padding is invisible to earlier positions
    read = model.head_obs(h[:, :36]).argmax(-1)  # (N, 36): positions -37..-2 predict the frame's tokens
    read = torch.where(ctx_len[:, None] > 36, read, ctx.gather(1, last[:, 1:]))
    draft = read if guess is None else torch.where(guess >= 0, guess, read)
    return cache, model.q_values(h[:, -1], tasks), draft


class Planner:
    """compile=True compiles the model's forward (dynamic shapes: one graph for every batch and window size, give or
    take those of size 1); freeze=True also folds the weights into the compiled code (inductor freezing), only for
    a model that no longer changes (evaluation, not fine-tuning). jacobi: Jacobi decoding (True), token by token
    (False), or whichever is faster (None), measured at run time per batch shape. Both give the same greedy tokens
    (world_step), so the choice changes the speed, not the plan. Why measured: a Jacobi pass runs 37 inputs per row,
    nearly free while a pass is bound by reading the weights (few rows, or a GPU) and up to 37x a token pass when it
    is bound by arithmetic (many rows on a CPU), and how many passes a block takes depends on how well the model's
    frames can be guessed."""

    def __init__(self, model, compile=False, freeze=False, jacobi=None, max_passes=8):
        self.model, self.jacobi, self.max_passes = model, jacobi, max_passes
        self.forward = torch.compile(model.forward, dynamic=True, fullgraph=True,
                                     options={'freezing': freeze}) if compile else model.forward
        if compile:  # one graph per call kind (prefill, greedy, passes) and size-1 specialisation: more than 8
            c = torch._dynamo.config
            name = 'recompile_limit' if hasattr(c, 'recompile_limit') else 'cache_size_limit'  # (torch < 2.6)
            setattr(c, name, max(getattr(c, name), 64))
        self.stats = dict(blocks=0, passes=0)  # world steps and their forward passes
        self.timing = {}  # jacobi None: batch shape -> its world steps, (token by token, Jacobi) times, credit (s)
        self.probe_share = 0.1  # jacobi None: timing the slower way again may cost up to a tenth of the time

    def step(self, cache, act, draft, pos, tasks, key=None):
        """world_step with this planner's forward and settings; key names the batch shape for jacobi=None (e.g.
        (depth, rows))."""
        run = lambda jacobi: world_step(self.forward, self.model, cache, act, draft, pos, tasks, jacobi,
                                        self.max_passes, self.stats)
        if self.jacobi is not None:
            return run(self.jacobi)
        # each way runs 4 times first, the first a warm-up (not counted); then the faster by the median of its last
        # 8 counted times (a Jacobi step's time depends on how well its frame was guessed: one hard frame must not
        # decide, nor one easy one). The slower way runs again once the time that costs (the difference of the
        # medians) is at most probe_share of the time run since its last timing, and that timing replaces its old
        # ones, taken on other frames: a choice made on a few hard (or easy) frames does not stay for long.
        t = self.timing.setdefault(key, dict(steps=0, times=([], []), credit=0.0))
        times, explore, probe = t['times'], t['steps'] < 8, False
        t['steps'] += 1
        if explore:
            jacobi = t['steps'] <= 4
        else:
            med = [statistics.median(v[1:]) for v in times]
            fast = med[1] < med[0]
            probe = t['credit'] > med[not fast] - med[fast]
            jacobi = fast != probe
        t0 = time.perf_counter()
        out = run(jacobi)
        if act.device.type == 'cuda':
            torch.cuda.synchronize(act.device)
        dt, v = time.perf_counter() - t0, times[jacobi]
        if probe:
            del v[1:]  # keep the warm-up slot
        t['credit'] = 0.0 if probe or explore else t['credit'] + self.probe_share * dt
        v.append(dt)
        del v[1:-8]  # the warm-up and the last 8
        return out

    @torch.no_grad()
    def __call__(self, ctx, ctx_len, tasks, beam=2, horizon=2, trace=False, guess=None, epsilon=0.0, noise=None,
                 lam=1.0):
        """ctx (N, T) long: right-padded contexts of ctx_len (N,) tokens (n*37 - 1 each, n may differ); tasks (N,);
        beam: int or (N,) widths K; horizon: H (static). guess: None or (N, 36) long, a guess of the first imagined
        frame for Jacobi decoding (e.g. the previous decision's obs[:, 0] when its action was taken; -1 rows: none);
        it changes how fast imagined blocks agree, never the plan. Returns a dict: action (N,), q (N, A) root Q and,
        for H > 0, the best path: value (N,) its score, actions (N, H), rewards (N, H), ends (N, H), obs (N, H, 36).
        trace=True adds 'trace': per depth a dict of every candidate's actions, rewards, ends, q, obs, score and
        valid, shaped (N, C, ...) in the official order (parents by descending score, each parent's actions by
        descending Q). epsilon > 0, beam 1: an epsilon-greedy rollout w.r.t. the critic instead of a search
        (pretraining imagination, see imagine; epsilon 0 with beam 1 is the greedy rollout): at depth d row n plays a
        random valid action, the argmax of noise[n, d-1, 1:] over its valid actions, where noise[n, d-1, 0] < epsilon,
        else its best by Q; noise (N, H, 1 + A) uniform in [0, 1) (None: drawn from torch's RNG). lam < 1 (option
        plan_lambda; 1 is the official score) scores a depth-d node by the lambda-return of its path, the blend
        (1 - lam) sum_{n<d} lam^n G_n + lam^d G_d of the n-step estimates G_n = sum_{i<=n} gamma^(i-1) r_i +
        gamma^n Q(s_n, a_(n+1)) and the official G_d (TD(lambda)): lam 0 is the greedy policy, and the critic's
        root estimate keeps its say where the imagined frames hardly depend on the action."""
        model, cfg = self.model, self.model.cfg
        N, dev, H, A, T = ctx.shape[0], ctx.device, horizon, cfg.num_actions, cfg.tokens_per_block
        K = torch.as_tensor(beam, device=dev).expand(N)
        ar = torch.arange(N, device=dev)
        if H == 0:  # greedy: one forward (right padding is invisible to earlier positions under causal attention)
            q = model.q_values(self.forward(ctx, tasks, rows=ctx_len[:, None] - 1)[:, 0], tasks)
            return dict(action=q.argmax(-1), q=q)
        if guess is not None and (guess.shape != (N, cfg.obs_tokens) or guess.is_floating_point()
                                  or bool((guess >= cfg.obs_vocab).any())):
            raise ValueError(f"guess: expected integer tokens below {cfg.obs_vocab} shaped ({N}, {cfg.obs_tokens}), "
                             f"got {tuple(guess.shape)} {guess.dtype}")
        if epsilon:
            if bool((K != 1).any()):
                raise ValueError("epsilon-greedy plays one action per step: beam must be 1")
            noise = torch.rand(N, H, 1 + A, device=dev) if noise is None else noise.to(dev)
        cache, q, draft = prefill(self.forward, model, ctx, ctx_len, tasks, H, guess, reserve=False)  # root Q (N,A)
        cache = cache.fork(ctx_len, T * H)  # the context's keys once per environment; candidates copy their own
        Kmax = min(int(K.max()), A)  # one static width for the batch; narrower environments mask their extra slots
        keff = torch.minimum(K, model.valid[tasks].sum(-1))  # B§7.2: K_eff = min(K, number of valid actions)
        slots = torch.arange(Kmax, device=dev)

        # beam state with P parents per environment (P = 1: the root), parent p of environment n in cache row rows[n, p]
        keep = lambda t, idx: t[ar[:, None], idx]  # (N, X, ...) rows idx (N, k) of every environment -> (N, k, ...)
        qs, alive, ret = q[:, None], torch.ones(N, 1, dtype=torch.bool, device=dev), torch.zeros(N, 1, device=dev)
        blend = torch.zeros(N, 1, device=dev)  # lam < 1: sum_{n<d} (1 - lam) lam^n G_n of each node's path
        path = dict(actions=ctx.new_zeros(N, 1, 0), rewards=q.new_zeros(N, 1, 0), ends=ctx.new_zeros(N, 1, 0),
                    obs=ctx.new_zeros(N, 1, 0, cfg.obs_tokens))
        rows, draft, traces = ar[:, None], draft[:, None], []
        for d in range(1, H + 1):
            P = qs.shape[1]
            C = P * Kmax
            acts = qs.topk(Kmax, -1).indices.view(N, C)  # each parent's best actions by descending Q
            if epsilon:  # epsilon-greedy (C = 1): a uniformly random valid action where the coin says so
                u = noise[:, d - 1]
                rand = u[:, 1:].masked_fill(~model.valid[tasks], -1).argmax(-1, keepdim=True)
                acts = torch.where(u[:, :1] < epsilon, rand, acts)
            ok = (alive[..., None] & (slots < keff[:, None, None])).view(N, C)
            # every candidate gets its parent's keys (cache rows environment-major: row n*C + c) and plays one step;
            # the guess of its new frame is its parent's frame (depth 1: the prefill's draft)
            cache = cache.select(rows.repeat_interleave(Kmax, 1).view(-1))
            obs, rew, end, qn = self.step(cache, acts.view(-1), draft.repeat_interleave(Kmax, 1).flatten(0, 1),
                                          (ctx_len + T * (d - 1)).repeat_interleave(C), tasks.repeat_interleave(C),
                                          key=(d, N * C))
            # score = sum_i gamma^(i-1) r_i + gamma^d max_a Q(s_d, a); invalid candidates -inf
            new = dict(actions=acts, rewards=rew.view(N, C).float(), ends=end.view(N, C), obs=obs.view(N, C, -1))
            ret_c = ret.repeat_interleave(Kmax, 1) + cfg.gamma ** (d - 1) * new['rewards']
            qn = qn.view(N, C, A)
            score = ret_c + cfg.gamma ** d * qn.max(-1).values
            if lam < 1:  # G_(d-1) = R_(d-1) + gamma^(d-1) Q(s_(d-1), a_d), the parent's Q of the action taken
                g = ret.repeat_interleave(Kmax, 1) + cfg.gamma ** (d - 1) * qs.gather(-1, acts.view(N, P, Kmax)).view(N, C)
                blend_c = blend.repeat_interleave(Kmax, 1) + (1 - lam) * lam ** (d - 1) * g
                score = blend_c + lam ** d * score
            score = score.masked_fill(~ok, float('-inf'))
            if trace:
                traces.append(dict(new, q=qn, score=score, valid=ok))
            # keep the best K children over all parents, sorted by descending score
            top, idx = score.topk(Kmax, -1)  # (N, Kmax)
            alive = (slots < K[:, None]) & (top > float('-inf'))
            path = {k: torch.cat([keep(v, idx // Kmax), keep(new[k], idx)[:, :, None]], 2) for k, v in path.items()}
            ret, qs, draft = keep(ret_c, idx), keep(qn, idx), keep(new['obs'], idx)
            blend = keep(blend_c, idx) if lam < 1 else blend
            rows = ar[:, None] * C + idx  # the survivors' cache rows: the next parents
        out = {k: v[:, 0] for k, v in path.items()}  # slot 0 holds the best leaf
        out.update(action=out['actions'][:, 0], q=q, value=top[:, 0])
        if trace:
            out['trace'] = traces
        return out


# -----------------------------------------------------------------------------
# imagination: synthetic segments for training (finetune.py; train.py --imagine), shared by both scripts


@torch.no_grad()
def imagine(planner, tokenizer, batch, horizon=2, beam=2, epsilon=None, generator=None):
    """B§7.5, aligned and normalised: roll every eligible segment of `batch` (its last T - H blocks real, the last
    step not terminal) H = `horizon` steps on from its last T - H real blocks; return the imagined segments, or None
    if none is eligible. The policy: beam search of width `beam` (epsilon None; fine-tuning), or epsilon-greedy
    w.r.t. the critic (epsilon a number; the paper's pretraining ablation, Table 6): a random valid action with
    probability epsilon (coins drawn from `generator`, a CPU torch.Generator, or torch's RNG), else the best by Q.
    Layout, from real steps O_0 .. O_{T-1} (actions A, rewards R), n = T - H, and the policy's path a_i r_i o_i with
    predicted terminations e_i (o_i decoded by the tokenizer onto the 8-bit grid):
        slot     0 .. n-2               n-1        n .. T-2           T-1
        frame    O_{T-n} .. O_{T-2}     O_{T-1}    o_1 .. o_{H-1}     o_H
        action   A_{T-n} .. A_{T-2}     a_1        a_2 .. a_H         a_H  (a dummy, the official choice)
        reward   R_{T-n} .. R_{T-2}     r_1        r_2 .. r_H         0
        end      0                      e_1        e_2 .. e_H         0    (beam: all 0, as officially)
    Epsilon-greedy, as officially: the slots after the first predicted end are padding (mask_padding False, zeroed
    like real padding); mask_padding True otherwise, real False. The TD pairs are the transitions O_{T-n} -> ... ->
    O_{T-1} -> o_1 -> ... -> o_H; the last slot has no successor in the window and gets no TD term. Observations stay
    in the batch's form: frames in [0, 1], or tokens (the imagined frames re-encoded)."""
    n = batch['actions'].shape[1] - horizon
    ok = batch['mask_padding'][:, -n:].all(1) & (batch['ends'][:, -1] == 0)
    if not ok.any():
        return None
    obs, act, rew = (batch[k][ok][:, -n:] for k in ('observations', 'actions', 'rewards'))
    tasks = batch['envs'][ok]
    frames = obs.is_floating_point()
    ctx = make_context(tokenizer.encode(obs) if frames else obs, act)  # (B, n*37-1): ends with O_{T-1}, A_{T-1} dropped
    kw = dict(beam=beam)
    if epsilon is not None:  # one candidate per environment; coins drawn on the CPU (the same on every device)
        A = planner.model.cfg.num_actions
        kw = dict(beam=1, epsilon=epsilon, noise=torch.rand(len(tasks), horizon, 1 + A, generator=generator))
    path = planner(ctx, torch.full_like(tasks, ctx.shape[1]), tasks, horizon=horizon, **kw)
    new = tokenizer.decode(path['obs']).float().mul(255).round().div(255)  # images on the 8-bit grid, as stored
    a, B = path['actions'], len(tasks)
    seg = dict(observations=torch.cat([obs, new if frames else tokenizer.encode(new)], 1),
               actions=torch.cat([act[:, :-1], a, a[:, -1:]], 1),  # (B, T)
               rewards=torch.cat([rew[:, :-1], path['rewards'].to(rew.dtype), rew.new_zeros(B, 1)], 1))
    seg['ends'] = torch.zeros_like(seg['actions'])
    seg['mask_padding'] = torch.ones_like(seg['actions'], dtype=torch.bool)
    if epsilon is not None:  # the world model's terminations: the episode ends at the first one
        seg['ends'][:, n - 1:-1] = path['ends']
        seg['mask_padding'] = seg['ends'].cumsum(1) - seg['ends'] == 0  # no end before the slot
        pad = ~seg['mask_padding']
        for k in ('observations', 'actions', 'rewards', 'ends'):
            v = seg[k]
            seg[k] = v.masked_fill(pad.view(*pad.shape, *[1] * (v.dim() - 2)), 0)
    return dict(seg, envs=tasks, real=torch.zeros_like(tasks, dtype=torch.bool))
