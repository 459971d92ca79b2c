"""timm side of the model oracle: build a case's timm model with random weights and run it.

Needs torch and timm; imported only through model_fixtures.import_timm_reference (tests) and by
the maintainer script weights/make_timm_fixtures.py. Case definitions: model_fixtures.py.

timm imports torchvision at import time (FrozenBatchNorm2d, transforms) but its ViT and Swin
never call it. Where torchvision is missing or broken (PyPI's torchvision 0.28.0 next to
torch 2.13.0+cpu fails with "operator torchvision::nms does not exist"), a stub that only
provides those names is installed first (``stub_torchvision``).
"""
import importlib.abc
import importlib.machinery
import sys
import types

import numpy as np
import torch


class _Placeholder(type):
    def __getattr__(cls, name):            # e.g. InterpolationMode.BICUBIC, used as dict keys
        if name.startswith("__"):
            raise AttributeError(name)
        return f"{cls.__name__}.{name}"


class _StubModule(types.ModuleType):
    def __getattr__(self, name):           # every name is a placeholder class
        if name.startswith("__"):
            raise AttributeError(name)
        cls = _Placeholder(name, (torch.nn.Module,), {})
        setattr(self, name, cls)
        return cls


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def stub_torchvision():
    """Make ``import torchvision.*`` return placeholder modules, unless torchvision works."""
    try:
        import torchvision  # noqa: F401
        return False
    except Exception:       # missing, or built for another torch (RuntimeError)
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.meta_path.insert(0, _StubFinder())
        return True


STUBBED_TORCHVISION = stub_torchvision()
from timm.models.deit import VisionTransformerDistilled  # noqa: E402
from timm.models.swin_transformer import SwinTransformer  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from fips_ref.checkpoint import Checkpoint  # noqa: E402
from model_fixtures import TIMM_SWIN_CASES, TIMM_VIT_CASES, timm_case_config

SEEDS = {"vit": 1, "swin": 2}      # randomize_ seed of every ViT/DeiT case and every Swin case


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


def build_timm_model(name, seed=None):
    """The timm model of a TIMM_VIT_CASES / TIMM_SWIN_CASES entry, randomized, in eval mode."""
    if name in TIMM_VIT_CASES:
        distilled, kw, _ = TIMM_VIT_CASES[name]
        cls = VisionTransformerDistilled if distilled else VisionTransformer
        return randomize_(cls(**kw), SEEDS["vit"] if seed is None else seed)
    return randomize_(SwinTransformer(**TIMM_SWIN_CASES[name]), SEEDS["swin"] if seed is None else seed)


def export(model, config):
    """timm state_dict (PyTorch layout, timm keys) + config -> our Checkpoint."""
    tensors = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    return Checkpoint(path="<timm export>", config=config, tensors=tensors)


def export_case(name, model):
    return export(model, timm_case_config(name))


def mlp_modules(model):
    """timm MLP modules in our global block order."""
    if hasattr(model, "layers"):
        return [blk.mlp for stage in model.layers for blk in stage.blocks]
    return [blk.mlp for blk in model.blocks]


def timm_run(model, images, dtype):
    """timm logits and the input of every block's MLP ([n, tokens, D]), as NumPy."""
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
