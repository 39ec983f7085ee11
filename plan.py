"""
JOWA's beam-search planner (REFERENCE B§7.2-7.3) as one batched tensor program over (environments x beams).

Per environment the input is a token context that ends with the current observation's 36 tokens. Every beam
node proposes its top-K valid actions by the critic; the world model then plays one step for ALL candidates of
all environments at once (the action token, then 36 greedy obs tokens through KV caches: token by token, or by
Jacobi iteration from a guess when there are few candidates or the guesses prove good -- the same tokens, see
Planner.world_step and Planner.use_jacobi); a candidate at depth d scores sum_i gamma^(i-1) r_i + gamma^d
max_a Q(s_d, a) and the best K per environment survive. The first action of the best depth-H path is returned.
H = 0 is the greedy Q policy.

    planner = Planner(model)                              # model in eval mode; Planner(model, compile=True)
    out = planner(ctx, ctx_len, tasks, beam=2, horizon=2)
    out['action']                                         # (N,) full action ids
    out['actions'], out['rewards'], out['obs']            # the best path: (N, H), (N, H), (N, H, 36)

Keys/values are stored once per group of rows that share them: the context once per environment (prefilled), the
imagined blocks of a parent once for its K children, and only the block being decoded once per candidate.

MCTS (after Planner; the paper's Table 5 comparison) is MuZero-style tree search on the same world steps, batched
over environments: one world step per simulation for all of them.

    out = MCTS(model)(ctx, ctx_len, tasks, horizon=6, simulations=20, temperature=0.9)   # out['action'] (N,)

Imagination (at the end; B§7.5) turns the planner into training data: `imagine` rolls real segments on in the world
model (beam search, or epsilon-greedy w.r.t. the critic: Planner with beam 1 and epsilon), `Replay` is the FIFO of
the imagined segments. finetune.py and train.py --imagine both use them.

    seg = imagine(planner, tokenizer, batch, horizon=4, epsilon=0.1)       # or horizon=2, beam=2 (fine-tuning)
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
        self.mods += [model.head_obs[0], model.head_obs[2]] if hasattr(model, 'head_obs') else []  # not in MTBC
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


def decode(model, lin, tok, g, pos, tasks, groups, first, last):
    """W world-model tokens of the block being imagined for all M = N*C candidate rows (C per environment,
    environment-major). tok (M, W): the inputs at block indices g..g+W-1 (g an int, or a 0-dim tensor when compiled;
    index 0 is the action token, index j > 0 obs token j-1); pos (M,): the absolute position of tok[:, 0]. groups: the
    keys a row attends to, as (k, v, bias) groups (L, G, nh, n, hd), each stored once for the M/G rows that share it,
    bias None or (G, 1, 1, n') 0 / -inf over the first n' keys. The last group ends with this block's 37 keys (written
    here at indices g..g+W-1, attended causally), e.g. [context (G = N), parents' earlier imagined blocks (G = N*P),
    this block (G = M)], or one group of all keys per row (G = M: one attention call per layer). lin(module, x, act)
    runs the blocks' and the obs head's linear layers (`linear`, or `PackedLinears` on CPU). Returns (obs, rew, end,
    h): the greedy next obs token after each input (M, W) (index j predicts obs token j; without the last input when
    last), reward in {-1, 0, 1} and end (M,) from the action token when first (the window starts at index 0), else
    None, and the hidden state (M, E) after obs token 35 when last (the window ends at index 36), else None: the
    caller runs the Q head once the block is final, not on every Jacobi pass.
    Static shapes, no host syncs: one compiled graph per (M, W, first, last)."""
    cfg = model.cfg
    (M, W), nh, E = tok.shape, cfg.n_head, cfg.n_embd
    hd, dev, kv_dtype = E // nh, tok.device, groups[-1][0].dtype
    x = model.obs_emb(tok) + model.task_emb_obs(tasks)[:, None]  # (M, W, E)
    if first:  # index 0 is the action token
        x = torch.cat([model.act_emb(tok[:, :1]) + model.task_emb_act(tasks)[:, None], x[:, 1:]], 1)
    idx = g + torch.arange(W, device=dev)  # (W,) block indices of the inputs
    x = (x + model.pos_emb(pos[:, None] + idx - g)).view(M * W, E)  # no dropout: eval mode
    k_last, v_last, b_last = groups[-1]
    n_last = k_last.shape[3]
    causal = torch.zeros(W, 37, device=dev, dtype=kv_dtype).masked_fill(
        torch.arange(37, device=dev) > idx[:, None], float('-inf'))  # (W, 37) this block's keys up to each input
    G = k_last.shape[1]  # the last group's bias, (G, 1, W, n_last): its first keys', then the causal block
    b_last = causal.expand(G, 1, W, 37) if b_last is None else torch.cat(
        [b_last.expand(G, 1, W, n_last - 37), causal.expand(G, 1, W, 37)], -1)
    groups = groups[:-1] + [(k_last, v_last, b_last)]
    if len(groups) == 1 and kv_dtype == torch.bfloat16 and dev.type == 'cpu':  # the written-out attention's bias
        bias = b_last.expand(M, nh, W, n_last).reshape(M * nh, W, n_last)  # once, not per layer
    for l, block in enumerate(model.blocks):
        q, k, v = lin(block.attn.c_attn, block.ln1(x)).split(E, -1)
        for cache, t in ((k_last[l], k), (v_last[l], v)):
            t = t.view(M, W, nh, hd).transpose(1, 2)
            if isinstance(g, int):  # eager: a slice copy (2-3x faster than index_copy_ for these sizes)
                cache.narrow(2, n_last - 37 + g, W).copy_(t)
            else:
                cache.index_copy_(2, n_last - 37 + idx, t.to(kv_dtype))
        if len(groups) == 1:  # every row has all its keys: one attention call
            # q is in the compute dtype, which is the keys' dtype (the planner builds the caches in it)
            q, k, v, n = q.view(M, W, nh, hd).transpose(1, 2), k_last[l], v_last[l], n_last
            if kv_dtype == torch.bfloat16 and dev.type == 'cpu':  # 2-core CPU, 40M: ~1.8x faster than SDPA in bf16
                s = torch.baddbmm(bias, q.reshape(M * nh, W, hd), k.view(M * nh, n, hd).transpose(1, 2),
                                  alpha=hd ** -0.5)  # (M*nh, W, n)
                y = s.softmax(-1, dtype=torch.float32).to(q.dtype).view(M, nh, W, n) @ v
            else:  # FlashAttention kernel (faster in fp32)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=b_last)
            y = y.transpose(1, 2).reshape(M * W, E)  # (M, nh, W, hd) -> (M*W, E)
        else:  # scores against each group: its G rows form a (G, nh, M/G*W, keys) batch; one softmax over all
            q = q.view(M, W, nh, hd) * hd ** -0.5
            scores = []
            for gk, _, bias in groups:
                G, n = gk.shape[1], gk.shape[3]
                qg = q.view(G, M // G, W, nh, hd).permute(0, 3, 1, 2, 4).reshape(G, nh, M // G * W, hd)
                s = (qg @ gk[l].transpose(-1, -2)).view(G, nh, M // G, W, n)
                if bias is not None:  # (G, 1, 1 or W, n)
                    s = s + bias[:, :, None]
                scores.append(s.permute(0, 2, 3, 1, 4).reshape(M, W, nh, n))
            att = torch.cat(scores, -1).softmax(-1, dtype=torch.float32).to(q.dtype)  # (M, W, nh, all keys)
            y, i = 0, 0
            for gk, gv, _ in groups:
                G, n = gk.shape[1], gk.shape[3]
                a = att[..., i:i + n].reshape(G, M // G, W, nh, n).permute(0, 3, 1, 2, 4).reshape(G, nh, M // G * W, n)
                y = y + (a @ gv[l]).view(G, nh, M // G, W, hd).permute(0, 2, 3, 1, 4).reshape(M * W, E)
                i += n
        x = x + lin(block.attn.proj, y)
        x = x + lin(block.mlp[2], lin(block.mlp[0], block.ln2(x), 'gelu'))
    h = model.ln_f(x).view(M, W, E)
    n_obs = W - 1 if last else W
    obs = lin(model.head_obs[2], lin(model.head_obs[0], h[:, :n_obs].reshape(M * n_obs, E), 'relu'))
    obs = obs.argmax(-1).view(M, n_obs)
    rew, end = (model.head_rew(h[:, 0]).argmax(-1) - 1, model.head_end(h[:, 0]).argmax(-1)) if first else (None, None)
    return obs, rew, end, h[:, -1] if last else None


class Planner:
    """compile=True compiles `decode` (fixed shapes; batches are padded to a power of two so a run sees few
    shapes). freeze=True also folds the weights into the compiled code (inductor freezing: faster, e.g. no per-call
    bf16 casts under autocast) -- only for a model that no longer changes (evaluation, not fine-tuning).
    Eager decoding on CPU uses PackedLinears; on a 2-core CPU that was faster than compiled decoding (40M, one
    environment, H=2 K=2: 363 ms eager vs 677 ms compiled and frozen, fp32), so compile is meant for GPUs.

    jacobi: decode an imagined block by Jacobi iteration (True), token by token (False), or choose (None: Jacobi
    while a pass has at most jacobi_rows rows; larger batches while the guesses are good, see use_jacobi). Both give
    the same greedy tokens; see world_step."""

    def __init__(self, model, compile=False, freeze=False, jacobi=None):
        self.model, self.compiled, self.jacobi = model, compile, jacobi
        self.decode, self.lin, self.packed = decode, linear, None if compile else PackedLinears(model)
        # Why a size limit: a Jacobi pass runs 37 inputs per candidate. With few candidates a decode pass is bound by
        # reading the weights (2-core CPU, 40M fp32: 1 row 3.2 ms, 74 rows 13 ms), so ~2-3 passes of 37 beat 37
        # passes of 1; with many, the passes are compute-bound and Jacobi's extra rows cost more than they save.
        self.jacobi_rows = 160 if model.pos_emb.weight.device.type == 'cpu' else 8192  # GPU value: not measured
        self.max_passes = 8  # Jacobi passes before finishing a block token by token (a poor guess)
        # a pass over more inputs runs in chunks of whole environments (see decode_chunks)
        self.chunk_rows = 1200 if model.pos_emb.weight.device.type == 'cpu' else 1 << 30  # GPU: no chunks
        self.stats = dict(blocks=0, passes=0, fallbacks=0, inputs=0, rest=0)  # Jacobi world steps, their passes,
        # those that fell back, the inputs per row their passes ran (a full pass runs 37; rows that were not run count
        # 0) and the token passes after fallbacks
        # Larger batches (see use_jacobi): Jacobi while its recent blocks cost at most a + b / sqrt(M) full passes,
        # retried every probe_every-th world step of a batch size after it stopped paying
        self.jacobi_work, self.probe_every = (0.6, 11.5), 64
        self.guess = {}  # (depth, candidate rows M, guess given) -> [world steps, recent full passes per Jacobi block
        # or None]
        if compile:
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            self.decode = torch.compile(decode, dynamic=False, fullgraph=True, options={'freezing': freeze})

    def use_jacobi(self, d, M, few, given=False):
        """Whether the next world step at depth d with M candidate rows runs Jacobi decoding (given: the caller gave
        the guess of the first imagined frame, see first_guess). With few rows a pass is bound by reading the weights,
        so Jacobi always pays. With many, passes are compute-bound: a Jacobi pass of 37*M rows (in chunks, see
        decode_chunks) costs 0.18-0.20 ms per row in fp32 and 0.10-0.11 in bf16, against 9.6 / 21 / 58 ms (fp32) and
        6.7 / 15 / 36 ms (bf16) for a token pass of M = 16 / 64 / 256 rows (2-core CPU, 40M), so Jacobi pays while a
        block costs less than 3.0-4.0, 1.9-2.3 and 1.3-1.4 full passes (a pass after the first runs from the first
        changed input and only the environments still decoding: it counts the rows and inputs it ran): jacobi_work (a,
        b) puts the limit at a + b / sqrt(M). The guess quality is a property of the model, the game, the depth (the
        real frame or an imagined one) and whether the caller gave a guess, so the planner measures it per (depth, M,
        given): Jacobi on the first such world step and every probe_every-th after, kept while the recent cost (a
        mean over consecutive Jacobi steps, see note_guess) stays within the limit. 16 environments, bf16, H=2 K=2:
        a trained model whose blocks agree in 1.5 passes plans in 840 ms with Jacobi against 1,303 ms token by token;
        one at 6.7 passes would take 2,291 ms against 1,167. Deterministic: the choice depends on the sequence of
        world steps, not on timings."""
        if self.jacobi is not None or few:
            return few if self.jacobi is None else self.jacobi
        g = self.guess.setdefault((d, M, given), [0, None])
        n, w = g
        g[0] += 1
        return w is None or w <= self.jacobi_limit(M) or n % self.probe_every == 0

    def jacobi_limit(self, M):
        return self.jacobi_work[0] + self.jacobi_work[1] / M ** 0.5  # full passes per block (see use_jacobi)

    def note_guess(self, d, M, before, given=False):
        """Record the cost in full passes of the Jacobi world step (depth d, M rows, given) that ended with
        self.stats (before: the stats before it): the recent mean while Jacobi was kept, a fresh start after a probe.
        A token pass after a fallback counts 1/37 of a token-by-token block, which costs jacobi_limit(M) full passes
        (the break-even), however few rows it ran."""
        g, st = self.guess[d, M, given], self.stats
        work = (st['inputs'] - before['inputs'] + (st['rest'] - before['rest']) * self.jacobi_limit(M)) / 37
        kept = g[1] is not None and g[1] <= self.jacobi_limit(M)
        g[1] = (g[1] + work) / 2 if kept else work

    def first_guess(self, ctx, ctx_len, h, guess=None):
        """The guess of the first imagined frame (N, 36): the caller's guess (N, 36) where given (rows without one hold
        -1), else the model's teacher-forced prediction of the current frame from the prefill's hidden states h (N, 37,
        E) at the context's last 37 positions (the obs head at the action token before the frame and at its first 35
        tokens), or the real frame for a context of one block. Why: a model imagines frames in its own style (codes it
        favours where the real frame has rare ones), so its next frame is closer to its reading of the current frame
        than to the real one. 40M world models on held-out frames, H=2 K=2: the imagined frame differs from the real
        frame in 14.8 of 36 tokens and from this prediction in 4.7, and depth-1 blocks agree in 3.1 passes instead of
        4.2 (the other model: 1.0 instead of 1.5). Closer still is the frame the previous decision imagined for the
        current step (a caller planning consecutive steps passes it, as evaluate.py does): on consecutive held-out
        steps, depth-1 blocks of the first model agree in 1.6 passes instead of 3.2 (the other: 1.0 either way)."""
        model, N, dev = self.model, ctx.shape[0], ctx.device
        pos = ctx_len[:, None] - 37 + torch.arange(36, device=dev)  # (N, 36) the positions predicting its tokens
        hid = h[:, :36].flatten(0, 1)  # (N*36, E)
        pred = self.lin(model.head_obs[2], self.lin(model.head_obs[0], hid, 'relu')).argmax(-1).view(N, 36)
        pred = torch.where(ctx_len[:, None] > 36, pred, ctx.gather(1, pos + 1))  # token j sits at pos[j] + 1
        return pred if guess is None else torch.where(guess >= 0, guess, pred)

    def decode_chunks(self, tok, g, pos, tasks, groups, first, last):
        """decode, in chunks of whole key groups of the first group (environments) when a pass runs more than
        chunk_rows inputs (a Jacobi pass over many candidates). Why: the pass's scores and activations then stay in
        cache; 2-core CPU, 40M, 16 envs, H=2 K=4 (its depth-2 Jacobi pass runs 256 x 37 inputs): a planner call took
        3.4 s with whole passes and 2.7 s in chunks of ~1,200 inputs (fp32; bf16 2.1 and 1.7 s)."""
        (M, W), G0 = tok.shape, groups[0][0].shape[1]
        per = max(1, self.chunk_rows // (W * M // G0))  # first-group units per chunk
        if per >= G0:
            return self.decode(self.model, self.lin, tok, g, pos, tasks, groups, first, last)
        outs = []
        for a in range(0, G0, per):
            b = min(G0, a + per)
            rows = lambda t, G, dim: None if t is None else t.narrow(dim, a * G // G0, (b - a) * G // G0)
            part = [(rows(k, k.shape[1], 1), rows(v, k.shape[1], 1), rows(b_, k.shape[1], 0)) for k, v, b_ in groups]
            r = slice(a * M // G0, b * M // G0)
            outs.append(self.decode(self.model, self.lin, tok[r], g, pos[r], tasks[r], part, first, last))
        return tuple(None if o[0] is None else torch.cat(o) for o in zip(*outs))

    def world_step(self, act, draft, pos0, tasks, groups, jacobi):
        """B§7.3: the action token, then 36 greedy obs tokens. act (M,), draft (M, 36): a guess of the new obs (the
        parent's obs, see first_guess for depth 1); pos0 (M,): absolute position of the action token. Returns obs (M,
        36), reward (M,), end (M,) and the new state's Q (M, A).
        Token by token this is 37 passes of one input per row. Jacobi decoding (Santilli et al. 2023) runs all inputs
        [action, guess] in one pass and replaces the guess by the predictions until they agree: the agreed tokens are
        then exactly the greedy ones (obs j is the argmax given the action and obs < j), and the first wrong guess is
        right after the next pass, so it ends within 37 passes. Consecutive Atari frames share most tokens, so the
        parent's obs is a good guess: trained 40M models agreed after 1-2.6 passes. Inputs before the first change keep
        their cached keys/values, so a pass starts there, and with grouped keys (many candidates) a pass runs only the
        environments with a row that changed in the last one: a row whose predictions equal its inputs is final
        (eager; compiled passes run the whole block of every row: one shape). Why: the slowest of 32-64 candidates
        decides the passes; 16 environments, a trained model, H=2 K=2: depth-1 blocks took 3.2 full passes of every
        row, 1.5 counting only the environments still decoding, and its plans took 6-12% less time (2-core CPU). After
        max_passes the rest is decoded token by token."""
        M, dev = act.shape[0], act.device
        # block indices: compiled, as tensors (no recompiles)
        g = [torch.tensor(j, device=dev) for j in range(37)] if self.compiled else list(range(37))
        x = torch.cat([act[:, None], draft], 1)  # (M, 37) the block's inputs; x[:, j + 1] is obs token j
        U = groups[0][0].shape[1]  # environments (units of the first key group)
        drop = not self.compiled and len(groups) > 1  # passes may drop the environments whose rows agreed
        units, rows, part = torch.arange(U, device=dev), slice(None), groups  # those still decoding: environments,
        hq = None  # rows (all, or an index (n,)), their key groups; the hidden states after obs token 35 (M, E)

        def run(s, e):  # a pass over inputs s..e-1 of the rows still decoding -> obs (n, ...), reward, end
            nonlocal hq
            obs, r, end, h = self.decode_chunks(x[rows, s:e], g[s], pos0[rows] + s, tasks[rows], part, s == 0, e == 37)
            if part is not groups:  # the pass wrote this block's keys/values into part's copies
                for buf, sub in zip(groups[-1][:2], part[-1][:2]):
                    buf.index_copy_(1, rows, sub)
            if h is not None:
                hq = h.new_empty(M, h.shape[-1]) if hq is None else hq
                hq[rows] = h
            return obs, r, end

        s = 0  # inputs before s are settled (greedy) and their keys/values cached
        for p in range(self.max_passes if jacobi else 0):
            w = 0 if self.compiled else s
            obs, r, e = run(w, 37)  # obs (n, 36 - w): predictions for x[rows, w + 1:]
            if w == 0:  # the first pass, of every row
                rew, end = r, e
            diff = obs != x[rows, w + 1:]
            changed = diff.any(0)  # (36 - w,)
            self.stats['passes'] += 1
            self.stats['inputs'] += (37 - w) * len(obs) / M  # in full rows
            if not changed.any():  # a host sync per pass
                self.stats['blocks'] += 1
                return x[:, 1:], rew, end, self.model.q_values(hq, tasks)
            x[rows, w + 1:] = obs
            s = w + 1 + int(changed.int().argmax())  # the first changed input is now right; recompute from there
            keep = diff.view(len(units), -1).any(1) if drop else None  # environments with a changed row
            if drop and not keep.all():  # copy their key groups (G/U units per environment in a group of G)
                units = units[keep]
                pick = lambda G: (units[:, None] * (G // U) + torch.arange(G // U, device=dev)).view(-1)
                rows, idx = pick(M), [pick(k.shape[1]) for k, _, _ in groups]
                part = [(k.index_select(1, i), v.index_select(1, i), None if b is None else b.index_select(0, i))
                        for (k, v, b), i in zip(groups, idx)]
        if jacobi:
            self.stats['blocks'] += 1
            self.stats['fallbacks'] += 1
            self.stats['rest'] += 37 - s
        for j in range(s, 37):  # token by token: input j -> obs token j (or Q after the last)
            obs, r, e = run(j, j + 1)
            if j == 0:
                rew, end = r, e
            if j < 36:
                x[rows, j + 1] = obs[:, 0]
        return x[:, 1:], rew, end, self.model.q_values(hq, tasks)

    def linears(self, dev):
        """The compute dtype on device dev (autocast's, else the weights') and the linears for the model's forward
        (PackedLinears in eval mode where available, else None: its own); refreshes self.lin, decode's linears."""
        model = self.model
        amp = torch.is_autocast_enabled(dev.type)
        dtype = torch.get_autocast_dtype(dev.type) if amp else model.pos_emb.weight.dtype
        if self.packed is not None:
            self.lin = self.packed.refresh(dtype) if PackedLinears.available(dev, dtype) else linear
        return dtype, self.lin if self.lin is not linear and not model.training else None

    def prefill(self, ctx, ctx_len, tasks, blocks):
        """Prefill the contexts (as for __call__) into a KV cache in the compute dtype, leaving room for `blocks`
        imagined blocks (else ValueError). Causal attention from position 0; hidden states only at the last 37
        positions. Returns dtype, Tp (the context's key slots), h (N, 37, E) those hidden states (for first_guess),
        the root Q (N, A) at the last obs token and the context's key group (k, v, bias): the keys once per
        environment (L, N, nh, Tp, hd), imagined blocks are stored apart; bias (N, 1, 1, Tp) -inf on the padding."""
        model, cfg, N, dev = self.model, self.model.cfg, ctx.shape[0], ctx.device
        T, (dtype, lin) = cfg.tokens_per_block, self.linears(dev)
        Tp = cfg.max_tokens - T * blocks  # the context must leave room for the imagined blocks
        if ctx.shape[1] > Tp:
            raise ValueError(f"a context of {ctx.shape[1]} tokens leaves no room for {blocks} imagined blocks "
                             f"(at most {Tp} tokens: {cfg.max_blocks - blocks} blocks)")
        cache = KVCache(cfg, N, dev, dtype, length=Tp)
        last = (ctx_len[:, None] - T + torch.arange(T, device=dev)).clamp(min=0)  # (N, 37)
        h = model(ctx, tasks, cache=cache, lin=lin, rows=last)
        bias = torch.zeros(N, 1, 1, Tp, device=dev, dtype=dtype).masked_fill(
            (torch.arange(Tp, device=dev) >= ctx_len[:, None])[:, None, None], float('-inf'))
        return dtype, Tp, h, model.q_values(h[:, -1], tasks), (cache.k, cache.v, bias)

    @torch.no_grad()
    def __call__(self, ctx, ctx_len, tasks, beam=2, horizon=2, trace=False, guess=None, epsilon=0.0, noise=None):
        """ctx (N, T) long: right-padded contexts of ctx_len (N,) tokens (n*37 - 1 each, n may differ); tasks (N,);
        beam: int or (N,) widths K; horizon: H (static). guess: None or (N, 36) long, a guess of the first imagined
        frame for Jacobi decoding (e.g. the previous decision's obs[:, 0] when its action was taken; -1 rows: none,
        see first_guess); it changes how fast imagined blocks agree, never the plan. Returns a dict: action (N,), q
        (N, A) root Q and, for H > 0, the best path: value (N,) its score, actions (N, H), rewards (N, H), ends (N,
        H), obs (N, H, 36). trace=True adds 'trace': per depth a dict of every candidate's actions, rewards, ends, q,
        obs, score and valid, shaped (N, C, ...) in the official order (parents by descending score, each parent's
        actions by descending Q). epsilon > 0, beam 1: an epsilon-greedy rollout w.r.t. the critic instead of a search
        (pretraining imagination, see imagine; epsilon 0 with beam 1 is the greedy rollout): at depth d row n plays a
        random valid action, the argmax of noise[n, d-1, 1:] over its valid actions, where noise[n, d-1, 0] < epsilon,
        else its best by Q; noise (N, H, 1 + A) uniform in [0, 1) (None: drawn from torch's RNG)."""
        model, cfg = self.model, self.model.cfg
        N, dev, H, A, T = ctx.shape[0], ctx.device, horizon, cfg.num_actions, cfg.tokens_per_block
        K = torch.as_tensor(beam, device=dev).expand(N)
        ar = torch.arange(N, device=dev)
        if H == 0:  # greedy: one forward (right padding is invisible to earlier positions under causal attention)
            lin = self.linears(dev)[1]
            q = model.q_values(model(ctx, tasks, lin=lin, rows=ctx_len[:, None] - 1)[:, 0], tasks)
            return dict(action=q.argmax(-1), q=q)
        if guess is not None and (guess.shape != (N, cfg.obs_tokens) or guess.is_floating_point()
                                  or bool((guess >= cfg.obs_vocab).any())):
            raise ValueError(f"guess: expected integer tokens below {cfg.obs_vocab} shaped ({N}, {cfg.obs_tokens}), "
                             f"got {tuple(guess.shape)} {guess.dtype}")
        if epsilon:
            if bool((K != 1).any()):
                raise ValueError("epsilon-greedy plays one action per step: beam must be 1")
            noise = torch.rand(N, H, 1 + A, device=dev) if noise is None else noise.to(dev)
        if self.compiled and N & (N - 1):  # pad to a power of two (copies of row 0): few shapes to compile
            n2 = 1 << (N - 1).bit_length()
            pad = lambda t: None if t is None else torch.cat([t, t[:1].expand(n2 - N, *t.shape[1:])])
            out = self(pad(ctx), pad(ctx_len), pad(tasks), pad(K), H, trace, pad(guess), epsilon, pad(noise))
            cut = lambda v: v[:N] if torch.is_tensor(v) else [{k: t[:N] for k, t in d.items()} for d in v]
            return {k: cut(v) for k, v in out.items()}
        dtype, Tp, h, q, ctx_kv = self.prefill(ctx, ctx_len, tasks, H)  # root Q (N, A)
        has_guess = guess is not None and bool((guess >= 0).any())
        Kmax = min(int(K.max()), A)  # one static width for the batch; narrower environments mask their extra slots
        keff = torch.minimum(K, model.valid[tasks].sum(-1))  # B§7.2: K_eff = min(K, number of valid actions)
        slots, obs_idx = torch.arange(Kmax, device=dev), torch.arange(cfg.obs_tokens, device=dev)

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
            if epsilon:  # epsilon-greedy (C = 1): a uniformly random valid action where the coin says so
                u = noise[:, d - 1]
                rand = u[:, 1:].masked_fill(~model.valid[tasks], -1).argmax(-1, keepdim=True)
                acts = torch.where(u[:, :1] < epsilon, rand, acts)
            ok = (alive[..., None] & (slots < keff[:, None, None])).view(N, C)
            few = 37 * M <= self.jacobi_rows  # few candidates: Jacobi decoding, and every row gets all its keys
            n = Tp + (anc_kv[0].shape[3] if anc_kv else 0)  # keys before this block's
            shape = (cfg.n_layer, M, cfg.n_head, (n if few else 0) + T, cfg.n_embd // cfg.n_head)
            k, v = (torch.empty(shape, device=dev, dtype=dtype) for _ in range(2))
            for buf, c, a in zip((k, v), ctx_kv, anc_kv or [None, None]):
                buf[:, :, :, -T:].zero_()  # this block's keys, written as it is decoded
                if few:  # one group (L, M, nh, Tp + Ta + 37, hd): context, parent's imagined blocks, this block
                    buf[:, :, :, :Tp].unflatten(1, (N, C)).copy_(c[:, :, None])  # an environment's for its C rows
                    if a is not None:
                        buf[:, :, :, Tp:n].unflatten(1, (N * P, Kmax)).copy_(a[:, :, None])  # a parent's, its children
            if few:
                bias = F.pad(ctx_kv[2].repeat_interleave(C, 0), (0, n - Tp))  # (M, 1, 1, Tp + Ta): padding -inf
                groups, own_kv = [(k, v, bias)], (k[:, :, :, -T:], v[:, :, :, -T:])
            else:  # keys stored once per group of rows that share them
                groups, own_kv = [ctx_kv] + ([(*anc_kv, None)] if anc_kv else []) + [(k, v, None)], (k, v)
            given = d == 1 and has_guess
            jacobi, before = self.use_jacobi(d, M, few, given), dict(self.stats)
            # the guess of the new frame (M, 36), used by Jacobi decoding: each parent's frame; for the real frame
            # (depth 1), the caller's guess or the model's own reading of it
            draft = (path['obs'][:, :, -1] if d > 1 else self.first_guess(ctx, ctx_len, h, guess) if jacobi else
                     ctx[ar[:, None], ctx_len[:, None] - cfg.obs_tokens + obs_idx])
            draft = draft.view(N, -1, cfg.obs_tokens).repeat_interleave(C // P, 1).view(M, -1)
            obs, rew, end, qn = self.world_step(acts.view(M), draft, (ctx_len + T * (d - 1)).repeat_interleave(C),
                                                tasks.repeat_interleave(C), groups, jacobi)
            if jacobi and (d, M, given) in self.guess:
                self.note_guess(d, M, before, given)
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
        L, nh, hd = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head
        dtype, _, h, q, ctx_kv = self.prefill(ctx, ctx_len, tasks, D)  # root Q (N, A), -inf on invalid actions
        valid = model.valid[tasks]  # (N, A)

        # the trees: node 0 is the root, simulation s adds node s + 1 (or replays a node at the depth bound)
        n = S + 1
        t = dict(child=torch.full((N, n, A), -1, dtype=torch.long, device=dev),  # node of (node, action); -1: none
                 prior=torch.zeros(N, n, A, device=dev), visits=torch.zeros(N, n, device=dev),
                 vsum=torch.zeros(N, n, device=dev), reward=torch.zeros(N, n, device=dev),  # of the step into it
                 lo=torch.full((N,), float('inf'), device=dev), hi=torch.full((N,), float('-inf'), device=dev))
        t['prior'][:, 0] = (q.float() / temperature).softmax(-1)  # invalid actions: prior 0
        obs = ctx.new_zeros(N, n, cfg.obs_tokens)  # each node's frame: its children's Jacobi draft
        obs[:, 0] = self.first_guess(ctx, ctx_len, h, guess)
        node_kv = [torch.zeros(L, N, n, nh, T, hd, device=dev, dtype=dtype) for _ in range(2)]  # each node's block
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

            # one world step for all environments: keys = context, the parent's imagined blocks, this block
            groups = [ctx_kv]
            if D > 1:  # the leaf's ancestors at depths 1 .. depth - 1 (later slots masked)
                anc = path[:, 1:D].clamp(min=0)  # (N, D - 1)
                k, v = (kv[:, ar[:, None], anc].transpose(2, 3).flatten(3, 4) for kv in node_kv)  # (L, N, nh, ., hd)
                used = torch.arange(1, D, device=dev) < depth[:, None]  # (N, D - 1)
                bias = torch.zeros(N, 1, 1, D - 1, T, device=dev, dtype=dtype).masked_fill(
                    ~used[:, None, None, :, None], float('-inf')).flatten(3)  # (N, 1, 1, (D - 1) * 37)
                groups.append((k, v, bias))
            k_new, v_new = (torch.zeros(L, N, nh, T, hd, device=dev, dtype=dtype) for _ in range(2))
            groups.append((k_new, v_new, None))
            jacobi, before = self.use_jacobi('mcts', N, 37 * N <= self.jacobi_rows), dict(self.stats)
            o, r, _, qn = self.world_step(act, obs[ar, parent], ctx_len + T * (depth - 1), tasks, groups, jacobi)
            if jacobi and ('mcts', N, False) in self.guess:
                self.note_guess('mcts', N, before)

            # expand the leaf: its step's reward, frame, keys and priors
            t['child'][ar, parent, act] = leaf
            t['reward'][ar, leaf], obs[ar, leaf] = r.float(), o
            t['prior'][ar, leaf] = (qn.float() / temperature).softmax(-1)
            for kv, new in zip(node_kv, (k_new, v_new)):
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
