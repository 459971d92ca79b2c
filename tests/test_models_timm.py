"""Oracle test: fips_ref.models against timm itself (needs torch + timm; skipped without them).

Small timm models with random (non-init) weights are exported state_dict -> our checkpoint
format and compared on logits and on every block's MLP input (forward hooks on ``mlp``).
Tolerances: rtol 1e-3 / atol 1e-4 in float32 (timm tests/test_models.py), 1e-9 in float64;
the float64 check is what pins the LayerNorm eps (1e-6 vs 1e-5 moves outputs by ~1e-6).
Run:  python -m pytest tests/test_models_timm.py -q
"""
import numpy as np
import pytest

from fips_ref.checkpoint import Checkpoint, json_entry, load_checkpoint, save_npz_atomic
from fips_ref.models import forward

torch = pytest.importorskip("torch")
try:
    timm = pytest.importorskip("timm")
except pytest.skip.Exception:
    raise
except Exception as e:  # e.g. a torchvision built for another torch: RuntimeError on import
    pytest.skip(f"timm is not importable here: {type(e).__name__}: {e}", allow_module_level=True)
from timm.models.deit import VisionTransformerDistilled  # noqa: E402
from timm.models.swin_transformer import SwinTransformer  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

TOL = {np.float32: dict(rtol=1e-3, atol=1e-4), np.float64: dict(rtol=1e-9, atol=1e-10)}

# name -> (timm class, its kwargs, our config fields beyond those derived from the kwargs)
VIT_CASES = {
    # vit_tiny-like; norm_eps left out of the config: the ViT default must be 1e-6
    "vit": (VisionTransformer, dict(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                    num_heads=4, num_classes=10), {}),
    # non-square image and patch, no qkv bias, LayerScale
    "vit_rect_ls": (VisionTransformer, dict(img_size=(32, 24), patch_size=(8, 4), embed_dim=24,
                                            depth=2, num_heads=3, num_classes=7, qkv_bias=False,
                                            init_values=0.5, mlp_ratio=3.0), {"norm_eps": 1e-6}),
    "deit_distilled": (VisionTransformerDistilled, dict(img_size=32, patch_size=8, embed_dim=32,
                                                        depth=3, num_heads=2, num_classes=10),
                       {"distilled": True, "norm_eps": 1e-6}),
}
SWIN_CASES = {
    # swin_tiny-like; last stage 4x4 = window 4 (no shift); norm_eps default must be 1e-5
    "swin": dict(img_size=64, patch_size=4, embed_dim=16, depths=(2, 2, 2),
                 num_heads=(1, 2, 4), window_size=4, num_classes=10),
    # window 6: stage 0 12x12 shifted by 3, stage 1 6x6 = window, stage 2 3x3 clamps to 3
    "swin_clamp": dict(img_size=48, patch_size=4, embed_dim=8, depths=(2, 2, 2),
                       num_heads=(2, 2, 4), window_size=6, num_classes=5),
    # grid 10 not divisible by window 4 (padded windows), odd 5x5 stage (padded merging)
    "swin_pad": dict(img_size=40, patch_size=4, embed_dim=8, depths=(2, 2, 2),
                     num_heads=(1, 2, 2), window_size=4, num_classes=5),
    # non-square image: stage 1 is 4x6, so only the width shifts; [H, W] config fields
    "swin_rect": dict(img_size=(32, 48), patch_size=4, embed_dim=8, depths=(2, 4),
                      num_heads=(1, 2), window_size=4, num_classes=6),
    # non-square window [4, 2]: relative position index and mask per axis; stage 1 (4x4)
    # keeps the 4x2 window and shifts only along the width
    "swin_rect_window": dict(img_size=32, patch_size=4, embed_dim=8, depths=(2, 2),
                             num_heads=(1, 2), window_size=(4, 2), num_classes=4),
}


def randomize_(model, seed):
    """Replace timm's init (zero biases, unit norms) with O(1) random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            n = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if name.endswith("gamma"):
                p.copy_(0.5 + 0.1 * n)
            elif p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * n)
            elif p.ndim == 1:
                p.copy_(0.1 * n)
            elif name.endswith("weight"):
                p.copy_(n * p[0].numel() ** -0.5)
            else:  # cls/dist tokens, pos_embed, relative_position_bias_table
                p.copy_(0.5 * n)
    return model.eval()


def as_list(v):
    return list(v) if isinstance(v, tuple) else v


def export(model, config):
    """timm state_dict (PyTorch layout, timm keys) + config -> our Checkpoint."""
    tensors = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    return Checkpoint(path="<timm export>", config=config, tensors=tensors)


def vit_config(kw, extra):
    config = dict(arch="vit", img_size=as_list(kw["img_size"]),
                  patch_size=as_list(kw["patch_size"]), in_chans=3, embed_dim=kw["embed_dim"],
                  depth=kw["depth"], num_heads=kw["num_heads"],
                  mlp_ratio=kw.get("mlp_ratio", 4.0), qkv_bias=kw.get("qkv_bias", True),
                  class_token=True, distilled=False, num_classes=kw["num_classes"])
    return {**config, **extra}


def swin_config(kw):
    return dict(arch="swin", img_size=as_list(kw["img_size"]), patch_size=kw["patch_size"],
                in_chans=3, embed_dim=kw["embed_dim"], depths=list(kw["depths"]),
                num_heads=list(kw["num_heads"]), window_size=as_list(kw["window_size"]),
                mlp_ratio=4.0, qkv_bias=True, num_classes=kw["num_classes"])


def mlp_modules(model):
    """timm MLP modules in our global block order."""
    if hasattr(model, "layers"):
        return [blk.mlp for stage in model.layers for blk in stage.blocks]
    return [blk.mlp for blk in model.blocks]


def timm_run(model, images, dtype):
    """timm logits and the input of every block's MLP, as NumPy."""
    model = model.double() if dtype == np.float64 else model.float()
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
             for m in mlp_modules(model)]
    try:
        with torch.no_grad():
            logits = model(torch.from_numpy(images.astype(dtype))).numpy()
    finally:
        for h in hooks:
            h.remove()
    return logits, [s.reshape(s.shape[0], -1, s.shape[-1]).numpy() for s in seen]


def images_for(img_size, n=3, seed=0):
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    return np.random.default_rng(seed).standard_normal((n, 3, h, w)).astype(np.float32)


def compare(model, ckpt, images, dtype):
    ours, acts = forward(ckpt, images, batch_size=2, record_mlp_inputs=True, dtype=dtype)
    ref, ref_acts = timm_run(model, images, dtype)
    diff = np.abs(ours - ref).max()
    assert np.allclose(ours, ref, **TOL[dtype]), f"logits max |diff| {diff:.3g}"
    assert len(acts) == len(ref_acts)
    for i, r in enumerate(ref_acts):
        assert acts[i].shape == r.shape, (i, acts[i].shape, r.shape)
        d = np.abs(acts[i] - r).max()
        assert np.allclose(acts[i], r, **TOL[dtype]), f"block {i} MLP input max |diff| {d:.3g}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(VIT_CASES))
def test_vit_matches_timm(name, dtype):
    cls, kw, extra = VIT_CASES[name]
    model = randomize_(cls(**kw), seed=1)
    compare(model, export(model, vit_config(kw, extra)), images_for(kw["img_size"]), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(SWIN_CASES))
def test_swin_matches_timm(name, dtype):
    kw = SWIN_CASES[name]
    model = randomize_(SwinTransformer(**kw), seed=2)
    compare(model, export(model, swin_config(kw)), images_for(kw["img_size"]), dtype)


def test_saved_file_round_trip_matches_timm(tmp_path):
    """The same check through a real .npz file written and read by fips_ref.checkpoint."""
    kw = SWIN_CASES["swin_clamp"]
    model = randomize_(SwinTransformer(**kw), seed=3)
    tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    path = tmp_path / "swin.npz"
    save_npz_atomic(path, {**tensors, "config": json_entry(swin_config(kw))})
    images = images_for(kw["img_size"], n=2)
    ours = forward(str(path), images, dtype=np.float64)
    ref, _ = timm_run(model, images, np.float64)
    assert np.allclose(ours, ref, **TOL[np.float64]), np.abs(ours - ref).max()
    assert load_checkpoint(path).config["arch"] == "swin"
