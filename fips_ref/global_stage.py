"""The global stage of FiPS: end-to-end fine-tuning of a compressed model (paper §3, Algorithm 1
"global error minimisation"; docs/authors-code.md §7).

One step (``global_step``), in the authors' order (docs/authors-code.md §4.3): forward and
backward of the whole model (models.model_vjp) → RigL mask update on V
(sparsifiers.sparsifier_step, global) → AdamW on every trainable tensor → cosine learning rate.
The structured sparsifiers (set, srigl, nm; docs/deployment.md §2) run exactly as in
local_stage.local_step: set/srigl on RigL's schedule per layer (set with SET's seeded rng), nm
re-selects its N:M masks by magnitude before every forward and trains with SR-STE gradients.

V is held as sparsimony holds it (docs/authors-code.md §5.1): a dense "original" ``params[k]``
that AdamW updates (its gradient masked by the mask the forward used, its moments by the new
mask), and the array the forward reads, ``forward_v[k] = params[k] ⊙ mask``, refreshed after
every step. Entries dropped by RigL keep their value in the original and resume it if regrown
(B4); entries inactive in the loaded file have no stored value and start at 0.

Letters: B batch, K classes, R rank.
"""
from dataclasses import dataclass, field
from types import SimpleNamespace

from .adamw import AdamWState, adamw_init, adamw_step, cosine_lr
from .augment import kl_distill, soft_target_ce
from .codec import fips_meta, group_factors, group_masks
from .local_stage import FiPSConfig
from .models.train_mlps import dense_layer, factored_layer
from .sharing import Layer
from .sparsity import keep_count
from .sparsifiers import (Schedule, constant_fan_in, nm_step_masks, rigl_gradients, set_rng,
                          sparsifier_masks, sparsifier_step, srste_grads)
from .structured import fan_in_axes, unit_view

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
    sparsifier: str = "rigl"            # rigl (authors) | static (ours: masks stay) | set | srigl | nm
    sparsity: float = 0.75              # the compressed file's target sparsity by default
    rigl_drop_fraction: float = 0.05    # q of the transfer config
    delta_t: int = AUTHORS_DELTA_T
    t_end_coeff: float = 0.75
    global_pruning: bool = True
    loss_scale: float = 2.0             # the authors' loss is doubled before backward (B7)
    distill_weight: float = 0.0         # ours: weight of the KL to the original model
    distill_temperature: float = 1.0
    freeze_non_mlp: bool = False        # ours: train only the MLPs (U, V, biases)
    fan_in: str = "any"                 # set: any | constant (docs/deployment.md §2)
    gamma_sal: float = 0.3              # srigl's ablation threshold; None: no ablation
    nm: tuple = (1, 4)                  # N:M of the nm sparsifier
    seed: int = 0                       # SET's regrowth stream (sparsifiers.set_rng)


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
    plan: tuple = ()               # sharing.Group-like entries: each layer's fan-in axis (structured)
    rng: object = field(default=None, repr=False)   # SET's np.random.Generator, made at step 1


def schedule(cfg, total_steps):
    """Step counts (docs/authors-code.md §7): t_end = int(0.75 · total), Δt 50, t_accel 0.25 · total."""
    return Schedule(total_steps, int(cfg.t_end_coeff * total_steps),
                    int(AUTHORS_T_ACCEL * total_steps), cfg.delta_t, 0.0)


def sparsifier_config(cfg):
    """The FiPSConfig fields sparsifiers.py reads (authors' variant: regrown entries resume)."""
    return FiPSConfig(sparsity=cfg.sparsity, sparsifier=cfg.sparsifier, variant="authors",
                      rigl_drop_fraction=cfg.rigl_drop_fraction, global_pruning=cfg.global_pruning,
                      fan_in=cfg.fan_in, gamma_sal=cfg.gamma_sal, nm=tuple(cfg.nm), seed=cfg.seed)


def file_plan(meta):
    """[group] of the file's metadata as sparsifiers.py reads a plan: rank, cols, layers (sharing.Layer)."""
    return tuple(SimpleNamespace(index=g["index"], rank=g["rank"], cols=g["cols"],
                                 layers=[Layer(l["key"], l["block"], l["basis_first"]) for l in g["layers"]])
                 for g in meta["groups"])


# sparsifiers.py keys V by '{layer}.V' (the local stage's names), this stage by 'fips.V.{layer}'
def _local(d):
    return {f"{k[len('fips.V.'):]}.V": v for k, v in d.items()}


def _global(d):
    return {f"fips.V.{k[:-len('.V')]}": v for k, v in d.items()}


def has_structure(cfg, masks, plan):
    """False only when set --fan-in constant / srigl is asked and some layer's masks are not what
    it keeps at cfg.sparsity: every active unit at k = fan_in_k (set: every unit active), or for
    srigl's ablation k = min(fan_in, keep_count(N, s) // active units); other sparsifiers take
    any loaded masks (nm re-selects before every forward)."""
    if not constant_fan_in(sparsifier_config(cfg)):
        return True
    axes = fan_in_axes(plan)
    for k, m in _local(masks).items():
        counts = unit_view(m, axes[k]).sum(axis=1)      # [units]
        units, fan_in = unit_view(m, axes[k]).shape
        active = counts[counts > 0]
        target = keep_count(m.size, cfg.sparsity)
        want = min(fan_in, target // max(int(active.size), 1)) if cfg.sparsifier == "srigl" else target // units
        if (cfg.sparsifier == "set" and active.size != units) or bool((active != want).any()) \
                or not active.size:
            return False
    return True


def structured_start(cfg, state):
    """prepare() of set --fan-in constant / srigl when the loaded masks are not theirs (a bitmask
    file, another sparsity): SRigL's constant fan-in init by magnitude of the loaded V
    (sparsifiers.sparsifier_masks; inactive entries are 0, so loaded active ones come first)."""
    if has_structure(cfg, state.masks, state.plan):
        return
    V = _local({k: state.params[k] for k in state.masks})
    state.masks = _global(sparsifier_masks(sparsifier_config(cfg), None, V, state.plan))
    refresh_forward_v(state)


def init_state(model, ckpt, cfg):
    """(GlobalState, {block: MLPLayer}) of a prepared Model and its compressed checkpoint.

    Like models.train_mlps.train_mlps, but the FiPS blocks read the state's own U, V ⊙ M and
    bias arrays, which AdamW updates in place (a wrapper: train_mlps builds private copies).
    """
    xp, dtype = model.xp, model.dtype
    params, forward_v, masks, mlps = dict(model.params), {}, {}, {}
    meta = fips_meta(ckpt)
    for g in meta["groups"]:
        U, Vs, layers = group_factors(ckpt, g)                          # either layout (codec)
        params[f"fips.U.{g['index']}"] = U = xp.asarray(U, dtype=dtype)
        bits = group_masks(ckpt, g)                                     # [L] x [R, cols] bool
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
    state = GlobalState(params, forward_v, masks, (), plan=file_plan(meta))
    structured_start(cfg, state)
    return state, mlps


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
    from .models import model_vjp
    state.step += 1
    scfg = sparsifier_config(cfg)
    if state.rng is None and cfg.sparsifier == "set":
        state.rng = set_rng(scfg)
    if cfg.sparsifier == "nm":                  # N:M by magnitude before every forward (SR-STE)
        state.masks = _global(nm_step_masks(scfg, _local({k: state.params[k] for k in state.masks}),
                                                   state.plan))
        refresh_forward_v(state)
    grads, out = {}, {}

    def dlogits(logits):                        # the loss between the forward and the backward
        out["loss"], d = loss_and_dlogits(logits, target, cfg, teacher)
        return d
    logits = model_vjp(model, mlps, x, dlogits, grads, params=state.params)
    loss = out["loss"]
    if not state.trainable:                 # AdamW's state, lazily as torch: every tensor with a grad
        state.trainable = tuple(k for k in grads if _trains(k, cfg))
        state.adam = adamw_init({k: state.params[k] for k in state.trainable})
    dense = rigl_gradients(scfg, sched, state.step, grads, state.masks, state.rigl_sum)
    old_masks = state.masks
    local = _local(old_masks)
    new = sparsifier_step(scfg, sched, state.step, _local({k: state.params[k] for k in old_masks}),
                          local, None if dense is None else _local(dense), plan=state.plan, rng=state.rng)
    state.masks = old_masks if new is local else _global(new)     # same object: unchanged
    keys = state.trainable
    grad_masks = {k: m for k, m in old_masks.items() if k in keys}
    moment_masks = {k: m for k, m in state.masks.items() if k in keys}
    if cfg.sparsifier == "nm":                  # SR-STE trains every entry (Zhou et al. 2021)
        srste_grads(grads, state.params, state.masks)
        grad_masks = moment_masks = None
    lr = cosine_lr(state.step - 1, lr=cfg.lr, eta_min=cfg.eta_min, t_max=sched.total_steps)
    adamw_step({k: state.params[k] for k in keys}, {k: grads[k] for k in keys}, state.adam, lr,
               betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay,
               grad_masks=grad_masks, moment_masks=moment_masks)
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
