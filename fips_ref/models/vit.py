"""ViT / DeiT forward and backward in timm naming (``VisionTransformer``,
``VisionTransformerDistilled``); each ``*_forward`` has its ``*_backward`` next to it
(derivations: docs/backward.md).

Letters: B batch, C channels, N tokens (prefix + patches), D embed, H heads, F MLP hidden,
K classes, P patch area (C·ph·pw).

    tokens = [cls, (dist), patches] + pos_embed
    x = x + ls1 · proj(attn(norm1(x)))          (ls absent = 1)
    x = x + ls2 · mlp(norm2(x))
    logits = head(norm(x)[:, 0])
    distilled DeiT (eval): (head(norm(x)[:, 0]) + head_dist(norm(x)[:, 1])) / 2
"""
from dataclasses import dataclass
from typing import NamedTuple

from ..backend import get_xp
from ..checkpoint import InputError
from .layers import check_heads, config_pair, config_positive, config_value, patch_grid
from .ops import (add_grad, attention_backward, attention_forward, layer_norm_backward,
                  layer_norm_forward, layer_scale, layer_scale_backward, linear, linear_backward,
                  no_cache, patch_embed, patch_embed_backward,  # noqa: F401 (patch_embed:
                  patch_embed_forward)                           # the inference name, kept)

NORM_EPS = 1e-6  # timm ViT/DeiT norm_layer = partial(nn.LayerNorm, eps=1e-6)

REFUSED = (  # timm ViT options that change the forward but are not implemented here
    ("reg_token", "register tokens"),
    ("norm_pre.", "pre-norm before the blocks"),
    ("fc_norm.", "global average pooling with fc_norm"),
    ("q_norm.", "qk-norm"),
    ("k_norm.", "qk-norm"),
    (".attn.norm.", "attention scale-norm"),
    (".mlp.norm.", "MLP scale-norm"),
)


@dataclass(frozen=True)
class ViTConfig:
    """The config fields the ViT forward reads (timm names; see docs/models.md)."""
    img_size: tuple      # (H, W) pixels
    patch_size: tuple    # (ph, pw)
    grid: tuple          # (gh, gw) patches
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    num_classes: int
    qkv_bias: bool
    norm_eps: float
    distilled: bool

    @property
    def num_prefix(self):
        """Prefix tokens before the patches: cls, plus dist for distilled DeiT."""
        return 2 if self.distilled else 1


def parse_config(path, config):
    """ViTConfig from a checkpoint config; InputError naming the file and the field."""
    img = config_pair(path, config, "img_size")
    patch = config_pair(path, config, "patch_size")
    dim = config_positive(path, config, "embed_dim")
    heads = config_positive(path, config, "num_heads")
    check_heads(path, "num_heads", dim, heads)
    if not config_value(path, config, "class_token", (bool,), True, required=False):
        raise InputError(f"{path}: config field 'class_token' is false; only class-token "
                         "pooling (head on token 0) is supported")
    return ViTConfig(
        img_size=img, patch_size=patch, grid=patch_grid(path, img, patch),
        in_chans=config_positive(path, config, "in_chans", required=False, default=3),
        embed_dim=dim, depth=config_positive(path, config, "depth"), num_heads=heads,
        num_classes=config_positive(path, config, "num_classes"),
        qkv_bias=config_value(path, config, "qkv_bias", (bool,), True, required=False),
        norm_eps=float(config_value(path, config, "norm_eps", (int, float), NORM_EPS,
                                    required=False)),
        distilled=config_value(path, config, "distilled", (bool,), False, required=False))


def blocks(cfg):
    """[(prefix, D)] of every block in forward order; global block index = position."""
    return [(f"blocks.{i}", cfg.embed_dim) for i in range(cfg.depth)]


def mlp_token_shapes(cfg):
    """[(T, D)] of each block's MLP input: every token, prefix included."""
    n = cfg.num_prefix + cfg.grid[0] * cfg.grid[1]
    return [(n, cfg.embed_dim)] * cfg.depth


def param_shapes(cfg):
    """({key: PyTorch shape} of every non-MLP tensor, optional keys); MLPs are checked per block."""
    D, K, (ph, pw) = cfg.embed_dim, cfg.num_classes, cfg.patch_size
    n = cfg.num_prefix + cfg.grid[0] * cfg.grid[1]
    heads = ("head", "head_dist") if cfg.distilled else ("head",)
    shapes = {"patch_embed.proj.weight": (D, cfg.in_chans, ph, pw),
              "patch_embed.proj.bias": (D,), "cls_token": (1, 1, D), "pos_embed": (1, n, D),
              "norm.weight": (D,), "norm.bias": (D,)}
    if cfg.distilled:
        shapes["dist_token"] = (1, 1, D)
    for h in heads:
        shapes.update({f"{h}.weight": (K, D), f"{h}.bias": (K,)})
    optional = []
    for prefix, _ in blocks(cfg):
        shapes.update({f"{prefix}.{k}": s for k, s in (
            ("norm1.weight", (D,)), ("norm1.bias", (D,)), ("attn.qkv.weight", (3 * D, D)),
            ("attn.proj.weight", (D, D)), ("attn.proj.bias", (D,)),
            ("norm2.weight", (D,)), ("norm2.bias", (D,)),
            ("ls1.gamma", (D,)), ("ls2.gamma", (D,)))})
        if cfg.qkv_bias:
            shapes[f"{prefix}.attn.qkv.bias"] = (3 * D,)
        optional += [f"{prefix}.ls1.gamma", f"{prefix}.ls2.gamma"]
    return shapes, tuple(optional)


def check_pos_embed(path, tensors, cfg):
    """timm's no_embed_class layout (DeiT-III: pos_embed for the patches only) is not implemented."""
    pe = tensors.get("pos_embed")
    patches = cfg.grid[0] * cfg.grid[1]
    if pe is not None and cfg.num_prefix and pe.ndim == 3 and pe.shape[1] == patches:
        raise InputError(f"{path}: key 'pos_embed' has {patches} rows, one per patch and none for "
                         f"the class token: timm's no_embed_class layout (DeiT-III), not supported")


# ----------------------------------------------------------------------------- forward / backward
# Each *_forward returns (out, cache); its *_backward takes d(out) and the cache, adds parameter
# gradients (math layout, timm keys) to ``grads`` and returns d(input). ``mlps[i]`` is block i's
# MLP as h -> (y, cache) (ops.no_cache for inference), its backward a train_mlps.MLPLayer's.
def embed_forward(x, p, cfg):  # [B, C, Hi, Wi] -> [B, N, D]
    """timm _pos_embed (no_embed_class=False): concat [cls, (dist), patches], then + pos_embed."""
    xp = get_xp(x)
    B, D = x.shape[0], cfg.embed_dim
    t, patches = patch_embed_forward(x, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"],
                                     cfg.patch_size)          # -> [B, gh, gw, D]
    t = t.reshape(B, -1, D)                                   # -> [B, gh·gw, D] row-major
    prefix = [xp.broadcast_to(p[n], (B, 1, D)) for n in _prefix_tokens(cfg)]  # [B, 1, D] each
    t = xp.concatenate(prefix + [t], axis=1)                  # -> [B, N, D]
    return t + p["pos_embed"], patches


def embed_backward(dt, patches, p, cfg, grads):  # [B, N, D] -> None (the image is an input)
    """pos_embed and prefix tokens get the batch sums of their rows; patches the conv backward."""
    add_grad(grads, "pos_embed", dt.sum(axis=0, keepdims=True))         # -> [1, N, D]
    for j, name in enumerate(_prefix_tokens(cfg)):
        add_grad(grads, name, dt[:, j:j + 1].sum(axis=0, keepdims=True))  # -> [1, 1, D]
    dpatch = dt[:, cfg.num_prefix:].reshape(patches.shape[:3] + (dt.shape[-1],))  # [B, gh, gw, D]
    dW, db = patch_embed_backward(dpatch, patches, p["patch_embed.proj.weight"])
    add_grad(grads, "patch_embed.proj.weight", dW)
    add_grad(grads, "patch_embed.proj.bias", db)


def _prefix_tokens(cfg):
    return ("cls_token", "dist_token") if cfg.distilled else ("cls_token",)


class BlockCache(NamedTuple):
    norm1: object
    attn: object
    a: object      # [B, N, D] attention branch before ls1
    norm2: object
    mlp: object
    m: object      # [B, N, D] MLP branch before ls2


def block_forward(x, p, prefix, cfg, mlp):  # [B, N, D] -> [B, N, D]
    """timm Block (pre-norm): x + ls1·attn(norm1(x)), then x + ls2·mlp(norm2(x))."""
    eps = cfg.norm_eps
    h, n1 = layer_norm_forward(x, p[f"{prefix}.norm1.weight"], p[f"{prefix}.norm1.bias"], eps)
    a, ca = attention_forward(h, p[f"{prefix}.attn.qkv.weight"], p.get(f"{prefix}.attn.qkv.bias"),
                              p[f"{prefix}.attn.proj.weight"], p[f"{prefix}.attn.proj.bias"],
                              cfg.num_heads)
    x = x + layer_scale(a, p.get(f"{prefix}.ls1.gamma"))
    h, n2 = layer_norm_forward(x, p[f"{prefix}.norm2.weight"], p[f"{prefix}.norm2.bias"], eps)
    m, cm = mlp(h)
    return x + layer_scale(m, p.get(f"{prefix}.ls2.gamma")), BlockCache(n1, ca, a, n2, cm, m)


def block_backward(dy, c, p, prefix, mlp_backward, grads):  # [B, N, D] -> [B, N, D]
    """Residuals pass dy through; each branch adds its LayerScale, sublayer and norm backward."""
    dm, dg2 = layer_scale_backward(dy, c.m, p.get(f"{prefix}.ls2.gamma"))
    dh = mlp_backward(dm, c.mlp, grads)
    dx2, dw2, db2 = layer_norm_backward(dh, c.norm2)
    dx = dy + dx2
    da, dg1 = layer_scale_backward(dx, c.a, p.get(f"{prefix}.ls1.gamma"))
    dh, attn_grads, _ = attention_backward(da, c.attn, p[f"{prefix}.attn.qkv.weight"],
                                           p[f"{prefix}.attn.proj.weight"],
                                           f"{prefix}.attn.qkv.bias" in p)
    dx1, dw1, db1 = layer_norm_backward(dh, c.norm1)
    names = ("ls2.gamma", "norm2.weight", "norm2.bias", "ls1.gamma", "attn.qkv.weight",
             "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "norm1.weight", "norm1.bias")
    for name, g in zip(names, (dg2, dw2, db2, dg1) + attn_grads + (dw1, db1)):
        add_grad(grads, f"{prefix}.{name}", g)
    return dx + dx1


def head_forward(t, p, cfg):  # [B, N, D] -> [B, K]
    """timm forward_head: head(token 0); distilled DeiT in eval: (head(t0) + head_dist(t1)) / 2."""
    logits = linear(t[:, 0], p["head.weight"], p["head.bias"])  # [B, D] -> [B, K]
    if not cfg.distilled:
        return logits, t
    dist = linear(t[:, 1], p["head_dist.weight"], p["head_dist.bias"])  # [B, D] -> [B, K]
    return (logits + dist) / 2, t


def head_backward(dlogits, t, p, cfg, grads):  # [B, K] -> [B, N, D], zero off the head tokens
    """Each head sees dlogits (halved for the distilled mean); only tokens 0 (and 1) get a grad."""
    xp = get_xp(dlogits)
    heads = ("head", "head_dist") if cfg.distilled else ("head",)
    d = dlogits / 2 if cfg.distilled else dlogits
    dt = xp.zeros_like(t)
    for j, name in enumerate(heads):
        dt[:, j], dW, db = linear_backward(d, t[:, j], p[f"{name}.weight"])
        add_grad(grads, f"{name}.weight", dW)
        add_grad(grads, f"{name}.bias", db)
    return dt


def features_forward(cfg, p, mlps, x, keep=True):  # [B, C, Hi, Wi] -> [B, N, D]
    """timm forward_features: embed, blocks, final norm over ALL tokens. keep=False: no caches."""
    t, patches = embed_forward(x, p, cfg)
    caches = []
    for i, (prefix, _) in enumerate(blocks(cfg)):
        t, c = block_forward(t, p, prefix, cfg, mlps[i])
        caches.append(c if keep else None)
        del c                                                 # inference: free it now
    t, nc = layer_norm_forward(t, p["norm.weight"], p["norm.bias"], cfg.norm_eps)
    return t, (patches, caches, nc)


def features_backward(dt, cache, p, cfg, mlp_backwards, grads):  # [B, N, D] -> None
    """Backward of features_forward, blocks in reverse order."""
    patches, caches, nc = cache
    dt, dw, db = layer_norm_backward(dt, nc)
    add_grad(grads, "norm.weight", dw)
    add_grad(grads, "norm.bias", db)
    for i in reversed(range(len(caches))):
        dt = block_backward(dt, caches[i], p, f"blocks.{i}", mlp_backwards[i], grads)
    embed_backward(dt, patches, p, cfg, grads)


# ----------------------------------------------------------------------------- inference
# The same functions with the caches dropped; ``mlp`` / ``mlps[i]`` are plain callables here.
def embed(x, p, cfg):  # [B, C, Hi, Wi] -> [B, N, D]
    return embed_forward(x, p, cfg)[0]


def block(x, p, prefix, cfg, mlp):  # [B, N, D] -> [B, N, D]
    return block_forward(x, p, prefix, cfg, no_cache(mlp))[0]


def features(cfg, p, mlps, x):  # [B, C, Hi, Wi] -> [B, N, D]
    return features_forward(cfg, p, {i: no_cache(f) for i, f in mlps.items()}, x, keep=False)[0]


def head(t, p, cfg):  # [B, N, D] -> [B, K]
    return head_forward(t, p, cfg)[0]


def forward(cfg, p, mlps, x):  # [B, C, Hi, Wi] -> [B, K]
    """Logits of a ViT/DeiT; ``mlps[i]`` is block i's MLP callable [..., D] -> [..., D]."""
    return head(features(cfg, p, mlps, x), p, cfg)
