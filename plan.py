"""
JOWA's beam-search planner (REFERENCE B§7.2-7.3) as one batched tensor program over (environments x beams).

Per environment the input is a token context that ends with the current observation's 36 tokens. Every beam
node proposes its top-K valid actions by the critic; the world model then plays one step for ALL candidates of
all environments at once (the action token, then 36 greedy obs tokens: 37 single-token passes through KV caches);
a candidate at depth d scores sum_i gamma^(i-1) r_i + gamma^d max_a Q(s_d, a) and the best K per environment
survive. The first action of the best depth-H path is returned. H = 0 is the greedy Q policy.

    planner = Planner(model)                              # model in eval mode; Planner(model, compile=True)
    out = planner(ctx, ctx_len, tasks, beam=2, horizon=2)
    out['action']                                         # (N,) full action ids
    out['actions'], out['rewards'], out['obs']            # the best path: (N, H), (N, H), (N, H, 36)

Keys/values are stored once per group of rows that share them: the context once per environment (prefilled), the
imagined blocks of a parent once for its K children, and only the block being decoded once per candidate.
"""
import torch
import torch._dynamo
import torch.nn.functional as F

from model import KVCache


def make_context(obs, actions):
    """Interleave n blocks: obs tokens (B, n, 36), actions (B, n) -> context (B, n*37 - 1), the last action dropped
    (a context ends with the current observation)."""
    return torch.cat([obs, actions[..., None]], -1).flatten(1)[:, :-1]


def linear(mod, x, act=None):
    """A linear layer of the decode pass, then act: None, 'gelu' (exact) or 'relu'."""
    y = mod(x)
    return F.gelu(y) if act == 'gelu' else F.relu(y) if act == 'relu' else y


class PackedLinears:
    """The same linear layers with weights prepacked by oneDNN in the compute dtype (CPU, eager decoding).
    Why: a decode pass multiplies only 2-64 rows by every weight matrix, so its time is the time to read the weights
    (56 MB in fp32 for the 40M preset, more than a typical L3 cache). On a 2-core EPYC, F.linear reads them at about
    8 GB/s for 2-4 rows (one MKL matrix-vector product per row) and oneDNN's packed kernel at about 26 GB/s.
    Packing in the compute dtype also drops autocast's per-call weight casts, and GELU/ReLU run inside the matmul.
    The weights are repacked whenever a parameter has changed (fine-tuning plans with a model it is training)."""

    def __init__(self, model):
        self.mods = [m for b in model.blocks for m in (b.attn.c_attn, b.attn.proj, b.mlp[0], b.mlp[2])]
        self.mods += [model.head_obs[0], model.head_obs[2]]
        self.key, self.w = None, {}

    @staticmethod
    def available(device, dtype):
        onednn = torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
        return device.type == 'cpu' and onednn and (
            dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()))

    def refresh(self, dtype):
        key = (dtype, *[(id(p), p._version) for m in self.mods for p in (m.weight, m.bias)])
        if key != self.key:
            self.w = {m: (torch.ops.mkldnn._reorder_linear_weight(m.weight.detach().to(dtype)),
                          m.bias.detach().to(dtype)) for m in self.mods}
            self.key = key
        return self

    def __call__(self, mod, x, act=None):
        w, b = self.w[mod]
        return torch.ops.mkldnn._linear_pointwise(x.to(b.dtype), w, b, act or 'none', [], 'none' if act else '')


def decode_token(model, lin, tok, kind, g, pos, tasks, ctx_kv, anc_kv, own_kv):
    """One world-model token for all M = N*C candidate rows (C per environment, environment-major).
    tok (M,) input ids of kind 0: action -> (obs token 0, reward, end); 1: obs token -> next obs token;
    2: last obs token -> masked expected Q (M, A). pos (M,): absolute positions in the window. A row attends to
    three key groups, each stored once for the rows that share it: ctx_kv = (k, v, bias), the contexts
    (L, N, nh, Tp, hd) with bias (N, 1, 1, Tp) 0 / -inf on real / padded positions; anc_kv = (k, v) or None, the
    parent's earlier imagined blocks (L, N*P, nh, Ta, hd), shared by its children; own_kv = (k, v), this step's
    block (L, M, nh, 37, hd), written here at index g (0-dim tensor), causal. lin(module, x, act) runs the blocks'
    and the obs head's linear layers (`linear`, or `PackedLinears` on CPU). Static shapes, no host syncs: one
    compiled graph per (kind, M)."""
    cfg = model.cfg
    M, nh, E = tok.shape[0], cfg.n_head, cfg.n_embd
    hd = E // nh
    emb, task_emb = (model.act_emb, model.task_emb_act) if kind == 0 else (model.obs_emb, model.task_emb_obs)
    x = emb(tok) + task_emb(tasks) + model.pos_emb(pos)  # (M, E); no dropout: eval mode
    T = own_kv[0].shape[3]
    own_bias = torch.zeros(T, device=tok.device, dtype=own_kv[0].dtype).masked_fill(
        torch.arange(T, device=tok.device) > g, float('-inf'))  # (T,) this block's keys up to the token
    groups = [ctx_kv] + ([(*anc_kv, None)] if anc_kv else []) + [(*own_kv, own_bias)]  # (k, v, bias) per group
    for l, block in enumerate(model.blocks):
        q, k, v = lin(block.attn.c_attn, block.ln1(x)).split(E, -1)
        q = q.view(M, nh, hd) * hd ** -0.5
        own_kv[0][l].index_copy_(2, g.view(1), k.view(M, nh, 1, hd).to(own_kv[0].dtype))
        own_kv[1][l].index_copy_(2, g.view(1), v.view(M, nh, 1, hd).to(own_kv[1].dtype))
        # scores against each group: the G rows that share a group's keys form a (G, nh, M/G, keys) batch
        scores = []
        for gk, _, bias in groups:
            G, n = gk.shape[1], gk.shape[3]
            s = q.view(G, M // G, nh, hd).transpose(1, 2) @ gk[l].transpose(-1, -2)  # (G, nh, M/G, n)
            scores.append((s if bias is None else s + bias).transpose(1, 2).reshape(M, nh, n))
        att = torch.cat(scores, -1).softmax(-1, dtype=torch.float32).to(q.dtype)  # (M, nh, all keys)
        y, i = 0, 0
        for gk, gv, _ in groups:
            G, n = gk.shape[1], gk.shape[3]
            a = att[..., i:i + n].reshape(G, M // G, nh, n).transpose(1, 2)  # (G, nh, M/G, n)
            y, i = y + (a @ gv[l]).transpose(1, 2).reshape(M, E), i + n
        x = x + lin(block.attn.proj, y)
        x = x + lin(block.mlp[2], lin(block.mlp[0], block.ln2(x), 'gelu'))
    h = model.ln_f(x)  # (M, E)
    if kind == 2:
        return model.q_values(h, tasks)
    obs = lin(model.head_obs[2], lin(model.head_obs[0], h, 'relu')).argmax(-1)
    if kind == 0:
        return obs, model.head_rew(h).argmax(-1) - 1, model.head_end(h).argmax(-1)
    return obs


class Planner:
    """compile=True compiles decode_token (fixed shapes; batches are padded to a power of two so a run sees few
    shapes). freeze=True also folds the weights into the compiled code (inductor freezing: faster, e.g. no per-call
    bf16 casts under autocast) -- only for a model that no longer changes (evaluation, not fine-tuning).
    Eager decoding on CPU uses PackedLinears; on a 2-core CPU that was faster than compiled decoding (40M, one
    environment, H=2 K=2: 363 ms eager vs 677 ms compiled and frozen, fp32), so compile is meant for GPUs."""

    def __init__(self, model, compile=False, freeze=False):
        self.model, self.compiled = model, compile
        self.decode, self.lin, self.packed = decode_token, linear, None if compile else PackedLinears(model)
        if compile:
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            self.decode = torch.compile(decode_token, dynamic=False, fullgraph=True, options={'freezing': freeze})

    def world_step(self, act, pos0, tasks, ctx_kv, anc_kv, own_kv):
        """B§7.3: the action token, then 36 greedy obs tokens. act (M,) -> obs (M, 36), reward (M,), end (M,) and the
        new state's Q (M, A). pos0 (M,): absolute position of the action token."""
        g = [torch.tensor(j, device=act.device) for j in range(37)]  # token indices as tensors: no recompiles
        args = (tasks, ctx_kv, anc_kv, own_kv)
        obs0, rew, end = self.decode(self.model, self.lin, act, 0, g[0], pos0, *args)
        obs = [obs0]
        for j in range(1, 36):  # input obs token j-1 -> obs token j
            obs.append(self.decode(self.model, self.lin, obs[-1], 1, g[j], pos0 + j, *args))
        q = self.decode(self.model, self.lin, obs[-1], 2, g[36], pos0 + 36, *args)
        return torch.stack(obs, 1), rew, end, q

    @torch.no_grad()
    def __call__(self, ctx, ctx_len, tasks, beam=2, horizon=2, trace=False):
        """ctx (N, T) long: right-padded contexts of ctx_len (N,) tokens (n*37 - 1 each, n may differ); tasks (N,);
        beam: int or (N,) widths K; horizon: H (static). Returns a dict: action (N,), q (N, A) root Q and, for H > 0,
        the best path: value (N,) its score, actions (N, H), rewards (N, H), ends (N, H), obs (N, H, 36). trace=True
        adds 'trace': per depth a dict of every candidate's actions, rewards, ends, q, obs, score and valid, shaped
        (N, C, ...) in the official order (parents by descending score, each parent's actions by descending Q)."""
        model, cfg = self.model, self.model.cfg
        N, dev, H, A, T = ctx.shape[0], ctx.device, horizon, cfg.num_actions, cfg.tokens_per_block
        K = torch.as_tensor(beam, device=dev).expand(N)
        ar = torch.arange(N, device=dev)
        if H == 0:  # greedy: one forward (right padding is invisible to earlier positions under causal attention)
            q = model.q_values(model(ctx, tasks)[ar, ctx_len - 1], tasks)
            return dict(action=q.argmax(-1), q=q)
        if self.compiled and N & (N - 1):  # pad to a power of two (copies of row 0): few shapes to compile
            n2 = 1 << (N - 1).bit_length()
            pad = lambda t: torch.cat([t, t[:1].expand(n2 - N, *t.shape[1:])])
            out = self(pad(ctx), pad(ctx_len), pad(tasks), pad(K), H, trace)
            cut = lambda v: v[:N] if torch.is_tensor(v) else [{k: t[:N] for k, t in d.items()} for d in v]
            return {k: cut(v) for k, v in out.items()}
        Tp = cfg.max_tokens - T * H  # the context must leave room for H imagined blocks
        if ctx.shape[1] > Tp:
            raise ValueError(f"a context of {ctx.shape[1]} tokens leaves no room for {H} imagined blocks "
                             f"(at most {Tp} tokens: {cfg.max_blocks - H} blocks)")
        Kmax = min(int(K.max()), A)  # one static width for the batch; narrower environments mask their extra slots
        keff = torch.minimum(K, model.valid[tasks].sum(-1))  # B§7.2: K_eff = min(K, number of valid actions)
        slots = torch.arange(Kmax, device=dev)

        # prefill the contexts into a KV cache in the compute dtype; root Q at the last obs token
        amp = torch.is_autocast_enabled(dev.type)
        dtype = torch.get_autocast_dtype(dev.type) if amp else model.pos_emb.weight.dtype
        if self.packed is not None:
            self.lin = self.packed.refresh(dtype) if PackedLinears.available(dev, dtype) else linear
        cache = KVCache(cfg, N, dev, dtype)
        h = model(ctx, tasks, cache=cache)  # prefill: causal attention from position 0
        q = model.q_values(h[ar, ctx_len - 1], tasks)  # (N, A)
        ctx_kv = (cache.k[:, :, :, :Tp].contiguous(), cache.v[:, :, :, :Tp].contiguous(),  # (L, N, nh, Tp, hd)
                  torch.zeros(N, 1, 1, Tp, device=dev, dtype=dtype).masked_fill(
                      (torch.arange(Tp, device=dev) >= ctx_len[:, None])[:, None, None], float('-inf')))

        # beam state with P parents per environment (P = 1: the root)
        keep = lambda t, idx: t[ar[:, None], idx]  # (N, X, ...) rows idx (N, k) of every environment -> (N, k, ...)
        qs, alive, ret = q[:, None], torch.ones(N, 1, dtype=torch.bool, device=dev), torch.zeros(N, 1, device=dev)
        path = dict(actions=ctx.new_zeros(N, 1, 0), rewards=q.new_zeros(N, 1, 0), ends=ctx.new_zeros(N, 1, 0),
                    obs=ctx.new_zeros(N, 1, 0, cfg.obs_tokens))
        anc_kv, traces = None, []
        for d in range(1, H + 1):
            P = qs.shape[1]
            C, M = P * Kmax, N * P * Kmax
            acts = qs.topk(Kmax, -1).indices.view(N, C)  # each parent's best actions by descending Q
            ok = (alive[..., None] & (slots < keff[:, None, None])).view(N, C)
            own_kv = [torch.zeros(cfg.n_layer, M, cfg.n_head, T, cfg.n_embd // cfg.n_head, device=dev, dtype=dtype)
                      for _ in range(2)]
            obs, rew, end, qn = self.world_step(acts.view(M), (ctx_len + T * (d - 1)).repeat_interleave(C),
                                                tasks.repeat_interleave(C), ctx_kv, anc_kv, own_kv)
            # score = sum_i gamma^(i-1) r_i + gamma^d max_a Q(s_d, a); invalid candidates -inf
            new = dict(actions=acts, rewards=rew.view(N, C).float(), ends=end.view(N, C), obs=obs.view(N, C, -1))
            ret_c = ret.repeat_interleave(Kmax, 1) + cfg.gamma ** (d - 1) * new['rewards']
            qn = qn.view(N, C, A)
            score = (ret_c + cfg.gamma ** d * qn.max(-1).values).masked_fill(~ok, float('-inf'))
            if trace:
                traces.append(dict(new, q=qn, score=score, valid=ok))
            # keep the best K children over all parents, sorted by descending score
            top, idx = score.topk(Kmax, -1)  # (N, Kmax)
            alive = (slots < K[:, None]) & (top > float('-inf'))
            path = {k: torch.cat([keep(v, idx // Kmax), keep(new[k], idx)[:, :, None]], 2) for k, v in path.items()}
            ret, qs = keep(ret_c, idx), keep(qn, idx)
            if d < H:  # the survivors' imagined blocks become the next parents' keys
                rows, prow = (ar[:, None] * C + idx).view(-1), (ar[:, None] * P + idx // Kmax).view(-1)
                anc_kv = [t[:, rows] if a is None else torch.cat([a[:, prow], t[:, rows]], 3)
                          for a, t in zip(anc_kv or [None, None], own_kv)]
        out = {k: v[:, 0] for k, v in path.items()}  # slot 0 holds the best leaf
        out.update(action=out['actions'][:, 0], q=q, value=top[:, 0])
        if trace:
            out['trace'] = traces
        return out
