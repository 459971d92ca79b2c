"""The global stage of FiPS: end-to-end fine-tuning of a compressed model (paper §3, Algorithm 1
"global error minimisation"; docs/authors-code.md §7).

One step (``global_step``), in the authors' order (docs/authors-code.md §4.3): forward and
backward of the whole model (models.vit/swin forward_train/backward) → RigL mask update on V
(sparsifiers.sparsifier_step, global) → AdamW on every trainable tensor → cosine learning rate.

V is held as sparsimony holds it (docs/authors-code.md §5.1): a dense "original" ``params[k]``
that AdamW updates (its gradient masked by the mask the forward used, its moments by the new
mask), and the array the forward reads, ``forward_v[k] = params[k] ⊙ mask``, refreshed after
every step. Entries dropped by RigL keep their value in the original and resume it if regrown
(B4); entries inactive in the loaded file have no stored value and start at 0.

Letters: B batch, K classes, R rank.
"""
from dataclasses import dataclass, field

from .adamw import AdamWState, adamw_init, adamw_step, cosine_lr
from .augment import kl_distill, soft_target_ce
from .codec import _mask_bits, fips_meta, group_factors
from .local_stage import FiPSConfig
from .models.train_mlps import dense_layer, factored_layer
from .sparsifiers import Schedule, rigl_gradients, sparsifier_step

AUTHORS_DELTA_T = 50          # docs/authors-code.md §7
AUTHORS_T_ACCEL = 0.25        # fixed at 0.25 · total steps (only GMP would read it)


@dataclass(frozen=True)
class GlobalConfig:
    """Hyper-parameters of the global stage; defaults docs/authors-code.md §7 unless noted."""
    lr: float = 1e-4
    eta_min: float = 1e-5
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 9.999e-9
    sparsifier: str = "rigl"            # rigl (authors) | static (ours: masks stay as loaded)
    sparsity: float = 0.75              # the compressed file's target sparsity by default
    rigl_drop_fraction: float = 0.05    # q of the transfer config
    delta_t: int = AUTHORS_DELTA_T
    t_end_coeff: float = 0.75
    global_pruning: bool = True
    loss_scale: float = 2.0             # the authors' loss is doubled before backward (B7)
    distill_weight: float = 0.0         # ours: weight of the KL to the original model
    distill_temperature: float = 1.0
    freeze_non_mlp: bool = False        # ours: train only the MLPs (U, V, biases)


@dataclass
class GlobalState:
    """Everything that changes during the run; arrays on the run's backend."""
    params: dict                   # key -> array the forward reads (math layout); V: the original
    forward_v: dict                # 'fips.V.{layer}' -> V ⊙ mask [R, cols], read by the forward
    masks: dict                    # 'fips.V.{layer}' -> bool [R, cols]
    trainable: tuple               # keys AdamW updates
    adam: AdamWState = field(default_factory=AdamWState, repr=False)
    rigl_sum: dict = field(default_factory=dict, repr=False)
    step: int = 0


def schedule(cfg, total_steps):
    """Step counts (docs/authors-code.md §7): t_end = int(0.75 · total), Δt 50, t_accel 0.25 · total."""
    return Schedule(total_steps, int(cfg.t_end_coeff * total_steps),
                    int(AUTHORS_T_ACCEL * total_steps), cfg.delta_t, 0.0)


def sparsifier_config(cfg):
    """The FiPSConfig fields sparsifiers.py reads (authors' variant: regrown entries resume)."""
    return FiPSConfig(sparsity=cfg.sparsity, sparsifier=cfg.sparsifier, variant="authors",
                      rigl_drop_fraction=cfg.rigl_drop_fraction, global_pruning=cfg.global_pruning)


def init_state(model, ckpt, cfg):
    """(GlobalState, {block: MLPLayer}) of a prepared Model and its compressed checkpoint.

    Like models.train_mlps.train_mlps, but the FiPS blocks read the state's own U, V ⊙ M and
    bias arrays, which AdamW updates in place (a wrapper: train_mlps builds private copies).
    """
    xp, dtype = model.xp, model.dtype
    params, forward_v, masks, mlps = dict(model.params), {}, {}, {}
    for g in fips_meta(ckpt)["groups"]:
        U, Vs, layers = group_factors(ckpt, g)
        params[f"fips.U.{g['index']}"] = U = xp.asarray(U, dtype=dtype)
        bits = _mask_bits(ckpt.tensors[f"fips.mask.{g['index']}"], v_entries(g)).reshape(
            len(layers), g["rank"], g["cols"])                          # [L, R, cols]
        per_block = {}
        for V, bit, layer in zip(Vs, bits, layers):
            key, bias = f"fips.V.{layer.key}", f"{layer.key}.bias"
            params[key] = xp.asarray(V, dtype=dtype)                    # [R, cols], 0 off the mask
            masks[key] = xp.asarray(bit)
            forward_v[key] = params[key].copy()
            params[bias] = xp.asarray(ckpt.tensors[bias], dtype=dtype)
            per_block.setdefault(layer.block, []).append((forward_v[key], params[bias], layer))
        for block, fcs in per_block.items():
            Vb, bb, lb = zip(*fcs)
            mlps[block] = factored_layer(U, Vb, bb, lb, g["index"])
    from .models import ARCHS
    for i, (prefix, _) in enumerate(ARCHS[model.arch].blocks(model.cfg)):
        if i not in mlps:
            mlps[i] = dense_layer(params, prefix)
    return GlobalState(params, forward_v, masks, ()), mlps


def v_entries(g):
    """Entries of a group's V slices together: layers · rank · cols."""
    return len(g["layers"]) * g["rank"] * g["cols"]


def _trains(key, cfg):
    """Every parameter trains (docs/authors-code.md §7); --freeze-non-mlp keeps only the MLPs."""
    return not cfg.freeze_non_mlp or key.startswith("fips.") or ".mlp." in key


def loss_and_dlogits(logits, target, cfg, teacher=None):  # [B, K] -> (loss, [B, K])
    """scale · (soft-target CE + w · T²·KL(teacher ‖ model)); the authors' scale is 2 (B7)."""
    loss, d = soft_target_ce(logits, target)
    if teacher is not None and cfg.distill_weight > 0:
        kl, dk = kl_distill(logits, teacher, cfg.distill_temperature)
        loss, d = loss + cfg.distill_weight * kl, d + cfg.distill_weight * dk
    return cfg.loss_scale * loss, cfg.loss_scale * d


def global_step(state, model, mlps, cfg, sched, x, target, teacher=None):
    """One training step (docs/authors-code.md §7, order of §4.3); updates ``state`` in place.

    x [B, C, H, W] and target [B, K] (soft) on the device; teacher [B, K] logits or None.
    Returns (loss as a 0-d device array, lr used, logits [B, K]).
    """
    from .models import ARCHS
    arch = ARCHS[model.arch]
    state.step += 1
    logits, cache = arch.forward_train(model.cfg, state.params, mlps, x)
    loss, dlogits = loss_and_dlogits(logits, target, cfg, teacher)
    grads = {}
    arch.backward(model.cfg, state.params, mlps, dlogits, cache, grads)
    del cache
    if not state.trainable:                 # AdamW's state, lazily as torch: every tensor with a grad
        state.trainable = tuple(k for k in grads if _trains(k, cfg))
        state.adam = adamw_init({k: state.params[k] for k in state.trainable})
    scfg = sparsifier_config(cfg)
    dense = rigl_gradients(scfg, sched, state.step, grads, state.masks, state.rigl_sum)
    old_masks = state.masks
    state.masks = sparsifier_step(scfg, sched, state.step, state.params, old_masks, dense)
    lr = cosine_lr(state.step - 1, lr=cfg.lr, eta_min=cfg.eta_min, t_max=sched.total_steps)
    keys = state.trainable
    adamw_step({k: state.params[k] for k in keys}, {k: grads[k] for k in keys}, state.adam, lr,
               betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay,
               grad_masks={k: m for k, m in old_masks.items() if k in keys},
               moment_masks={k: m for k, m in state.masks.items() if k in keys})
    refresh_forward_v(state)
    return loss, lr, logits


def refresh_forward_v(state):
    """forward_v ← V ⊙ mask, in place (the arrays the MLP closures read)."""
    for k, fv in state.forward_v.items():
        fv[...] = state.params[k] * state.masks[k]


def predict(model, mlps, params, x):  # [B, C, H, W] -> [B, K]
    """Logits of the current weights (no caches kept)."""
    from .models import ARCHS
    fwd = {i: (lambda h, m=m: m.forward(h)[0]) for i, m in mlps.items()}
    return ARCHS[model.arch].forward(model.cfg, params, fwd, x)
