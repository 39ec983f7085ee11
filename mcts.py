"""
MuZero-style Monte-Carlo tree search on JOWA's world model: the paper's Table 5 comparison with beam search (plan.py),
REFERENCE B§7.4. Batched over environments: every simulation plays one plan.world_step for all of them.

    out = MCTS(model)(ctx, ctx_len, tasks, horizon=6, simulations=20, temperature=0.9)   # out['action'] (N,)

evaluate.py --planner=mcts plays it (--mcts_simulations, --mcts_temperature).
"""
import torch

from plan import Planner, prefill


class MCTS(Planner):
    """MuZero-style Monte-Carlo tree search on the same world model (paper §5.6 and App. F; REFERENCE B§7.4, the
    official src/MCTS.py), batched over environments: every simulation descends each environment's tree by pUCT and
    plays the chosen leaf with ONE world_step for all N environments (simulations are sequential, environments are
    not). Priors softmax(Q/T) over the valid actions, leaf value V = max_a Q(s, a), pUCT on min-max normalised
    values, max depth D = H - 1 (eval_MCTS.sh: H 6, T 0.9, 20 simulations).

        out = MCTS(model)(ctx, ctx_len, tasks, horizon=6, simulations=20, temperature=0.9)
        out['action']                          # (N,) full action ids; out['visits'], out['values']: root children

    Departures from the official code (its bugs, REFERENCE B§10.2, or choices that make it ignore its inputs):
    V is always the max (its use_mean averages -inf Q of invalid actions); UCB ties go to the higher prior, then the
    lower action id (the official takes the larger id, so its first simulation, where sqrt(N_root) = 0 zeroes every
    prior term, picks the largest valid id whatever Q says; here it picks the greedy action); the final action is
    chosen among visited valid root children by r + gamma * value (the official compares value alone, dropping the
    first reward, and scores unvisited children 0, so it can return an untried or invalid action)."""
    pb_c_base, pb_c_init = 19652, 1.25  # MuZero's pUCT constants (the official defaults)

    def ucb(self, t, node, valid):
        """pUCT scores (N, A) of the children of node (N,) in tree t; -inf on invalid actions (prior 0)."""
        ar, gamma = torch.arange(len(node), device=node.device), self.model.cfg.gamma
        n_parent, ids = t['visits'][ar, node], t['child'][ar, node]  # (N,), (N, A)
        n, r, vsum = (t[k].gather(1, ids.clamp(min=0)) for k in ('visits', 'reward', 'vsum'))  # (N, A) each
        n = n * (ids >= 0)
        q = r + gamma * vsum / n.clamp(min=1)  # the child's r + gamma * mean backed-up value
        lo, hi = t['lo'][:, None], t['hi'][:, None]
        q = torch.where(hi > lo, (q - lo) / (hi - lo), q)  # min-max normalised (raw while the bounds are equal)
        c = torch.log((n_parent + self.pb_c_base + 1) / self.pb_c_base) + self.pb_c_init
        prior = t['prior'][ar, node]
        score = (n_parent.sqrt() * c)[:, None] * prior / (n + 1) + torch.where(n > 0, q, 0)
        return score.masked_fill(~valid, float('-inf')), prior

    @torch.no_grad()
    def __call__(self, ctx, ctx_len, tasks, beam=None, horizon=6, guess=None, simulations=20, temperature=0.9):
        """ctx (N, T) long: right-padded contexts of ctx_len (N,) tokens; tasks (N,); horizon H: max depth H - 1 (at
        least 1, as in the official code, whose depth check follows the first step; H = 0 is the greedy policy); beam
        is ignored (the same call as Planner); guess: as for Planner (Jacobi's first draft only). Returns a dict:
        action (N,), q (N, A) root Q, visits and values (N, A) of the root children (values r + gamma * mean value,
        -inf where unvisited), value (N,) the chosen child's, and its step: actions (N, 1), rewards (N, 1), obs (N, 1,
        36) (evaluate.py's next first guess)."""
        if horizon == 0:
            return super().__call__(ctx, ctx_len, tasks, horizon=0)
        model, cfg = self.model, self.model.cfg
        N, dev, A, T, S = ctx.shape[0], ctx.device, cfg.num_actions, cfg.tokens_per_block, simulations
        D, gamma, ar = max(horizon - 1, 1), cfg.gamma, torch.arange(N, device=dev)
        cache, q, draft = prefill(self.forward, model, ctx, ctx_len, tasks, D, guess)  # root Q (N, A), -inf invalid
        valid = model.valid[tasks]  # (N, A)

        # the trees: node 0 is the root, simulation s adds node s + 1 (or replays a node at the depth bound)
        n = S + 1
        t = dict(child=torch.full((N, n, A), -1, dtype=torch.long, device=dev),  # node of (node, action); -1: none
                 prior=torch.zeros(N, n, A, device=dev), visits=torch.zeros(N, n, device=dev),
                 vsum=torch.zeros(N, n, device=dev), reward=torch.zeros(N, n, device=dev),  # of the step into it
                 lo=torch.full((N,), float('inf'), device=dev), hi=torch.full((N,), float('-inf'), device=dev))
        t['prior'][:, 0] = (q.float() / temperature).softmax(-1)  # invalid actions: prior 0
        obs = ctx.new_zeros(N, n, cfg.obs_tokens)  # each node's frame: its children's Jacobi draft
        obs[:, 0] = draft
        node_kv = [c.new_zeros(c.shape[0], N, n, *c.shape[2:3], T, c.shape[4]) for c in (cache.k, cache.v)]  # each
        # node's block (L, N, n, nh, 37, hd); an environment's cache row holds the path of the simulation's leaf
        for s in range(S):
            # selection: from the root by pUCT while the chosen child exists, at most D steps
            node, go = torch.zeros_like(ar), torch.ones(N, dtype=torch.bool, device=dev)
            parent, act, depth = torch.zeros_like(ar), torch.zeros_like(ar), torch.zeros_like(ar)
            path = torch.full((N, D + 1), -1, dtype=torch.long, device=dev)  # node ids root .. leaf, then -1
            path[:, 0] = 0
            for d in range(1, D + 1):
                score, prior = self.ucb(t, node, valid)
                best = score == score.max(-1, keepdim=True).values
                a = torch.where(best, prior, -1).argmax(-1)  # ties: the higher prior, then the lower id
                ch = t['child'][ar, node, a]
                parent, act = torch.where(go, node, parent), torch.where(go, a, act)
                depth = torch.where(go, d, depth)
                path[:, d] = torch.where(go, ch, -1)
                go = go & (ch >= 0)  # a new leaf stops the descent
                node = torch.where(go, ch, node)
            leaf = t['child'][ar, parent, act]
            leaf = torch.where(leaf >= 0, leaf, s + 1)  # a new node, or the one replayed at the depth bound
            path[ar, depth] = leaf

            # one world step for all environments: the leaf's ancestors' blocks into the cache at their positions
            # (those at or past the leaf's depth are overwritten by its block or lie after it: masked), then its own
            for d in range(1, D):
                cache.write(ctx_len + T * (d - 1), *(kv[:, ar, path[:, d].clamp(min=0)] for kv in node_kv))
            pos = ctx_len + T * (depth - 1)
            o, r, _, qn = self.step(cache, act, obs[ar, parent], pos, tasks, key=('mcts', N))

            # expand the leaf: its step's reward, frame, keys and priors
            t['child'][ar, parent, act] = leaf
            t['reward'][ar, leaf], obs[ar, leaf] = r.float(), o
            t['prior'][ar, leaf] = (qn.float() / temperature).softmax(-1)
            for kv, new in zip(node_kv, cache.read(pos, T)):
                kv[:, ar, leaf] = new

            # backup V = max_a Q(leaf, a) from the leaf to the root: value_sum += V, visits += 1, min-max bounds
            # updated with the node's mean value, then V <- r_node + gamma * V (MuZero's backpropagate)
            value = qn.float().max(-1).values  # (N,)
            for d in range(D, -1, -1):
                on, i = d <= depth, path[:, d].clamp(min=0)
                t['vsum'][ar, i] += torch.where(on, value, 0)
                t['visits'][ar, i] += on.float()
                mean = t['vsum'][ar, i] / t['visits'][ar, i].clamp(min=1)
                t['lo'] = torch.where(on, torch.minimum(t['lo'], mean), t['lo'])
                t['hi'] = torch.where(on, torch.maximum(t['hi'], mean), t['hi'])
                value = torch.where(on, t['reward'][ar, i] + gamma * value, value)

        # the final action: the best root child by value (the official use_count=False; visit count is MuZero's
        # other choice), here r + gamma * mean value over the visited children (invalid ones are never visited)
        ids = t['child'][:, 0]  # (N, A)
        visits, r, vsum = (t[k].gather(1, ids.clamp(min=0)) * (ids >= 0) for k in ('visits', 'reward', 'vsum'))
        values = (r + gamma * vsum / visits.clamp(min=1)).masked_fill(visits == 0, float('-inf'))
        action = values.argmax(-1)
        pick = ids[ar, action]
        return dict(action=action, q=q, visits=visits.long(), values=values, value=values[ar, action],
                    actions=action[:, None], rewards=t['reward'][ar, pick][:, None], obs=obs[ar, pick][:, None])
