"""The local (block-wise) error minimisation of FiPS (paper §3 "Local error minimisation", docs/authors-code.md §4).

Letters: M tokens in a batch, D model width, F hidden width, R rank.

For every block b the compressed MLP is trained to reproduce the original MLP on that block's
recorded MLP inputs h_b (the norm2 output). The loss (``loss="mlp"``, the authors' code) is

    L = Σ_b mean((γ_b ⊙ (mlp_c(h_b) − mlp_o(h_b)))²)

with γ_b the block's LayerScale ls2.gamma (1 without LayerScale). For a pre-norm block with
frozen attention and teacher-forced inputs this equals the authors' whole-block output MSE
(docs/authors-code.md §4.3). ``loss="fc"`` is the paper's Eq. (1) instead, each fc layer on its
own original input: L = Σ_b mean((fc1_c(h_b) − fc1_o(h_b))²) + mean((fc2_c(a_b) − fc2_o(a_b))²)
with a_b = GELU(fc1_o(h_b)). One step is: backward → mask update → AdamW step → LR step.

Entry point for users and cross-checks: ``run_local_stage``.
"""
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .adamw import AdamWState, adamw_init, adamw_step, cosine_lr
from .backend import get_xp
from .checkpoint import InputError
from .losses import FCTarget, block_loss_and_grads, fc_loss_and_grads, fc_target  # noqa: F401
from .mlp import dense_mlp, lowrank_mlp
from .ablations import check_ablation_options, expand_grid, fold_scaling, m_key, scaled_v, scaling_grads
from .initialisation import init_factors
from .sharing import GRID_STRATEGIES, build_groups, layer_factors, v_param
from .sparsifiers import (Schedule, check_gmp_levels, check_structured, nm_step_masks,  # noqa: F401
                          resolve_schedule, rigl_gradients, set_rng, sparsifier_masks,
                          sparsifier_step, srste_grads)
from .sparsity import SPARSIFIERS, density

LOSSES = ("mlp", "fc")       # authors' code (block/MLP output) | paper Eq. (1) (each fc layer)


@dataclass(frozen=True)
class FiPSConfig:
    """Every hyper-parameter of the local stage; defaults are the authors' unless noted (docs/options.md)."""
    budget: float = 0.5
    sparsity: float = 0.75
    sparsifier: str = "gmp"            # dense | static | gmp | rigl | set | srigl | nm
    strategy: str = "long"             # long (authors) | short | by-type (II) | by-block (III)
    tau: float = 32.0
    round_to: int = 0                  # 0: no rounding of the rank (vision configs)
    epochs: int = 20
    batch_size: int = 128
    lr: float = 3e-4                   # not published for DeiT; chosen by measurement (docs/options.md)
    eta_min: float = 1e-6              # swin_large_config.yaml
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 9.999e-9
    gmp_initial: float = None          # None: 0.05 (authors' configs) or 0.25 (paper A.2.2)
    gmp_accelerated: float = 0.5
    t_accel: int = None                # None: 240 (authors; 240/600 of a shorter run) or 25% (paper)
    t_end_coeff: float = 0.75
    delta_t: int = None                # None: 50 (50/600 of a run under 600 steps, at least 1)
    rigl_drop_fraction: float = 0.1
    global_pruning: bool = True
    variant: str = "authors"           # authors | paper
    loss: str = "mlp"                  # mlp (authors' code) | fc (paper Eq. 1); docs/differences.md D1
    seed: int = 0
    init: str = "svd"                  # svd (authors) | random (paper §5) | whitened (docs/closed-form.md §6)
    solver: str = "adam"               # adam (authors) | als | als+adam (docs/closed-form.md §5)
    als_rounds: int = 3                # pruning rounds of --solver als (not the authors')
    als_sweeps: int = 1                # most ALS sweeps per pruning round (docs/closed-form.md §5)
    als_tol: float = 0.0               # a round's sweeps stop once one lowers Eq. (1) by less
    als_iters: int = 10                # CG iterations per ALS solve (warm-started)
    # paper §5 ablations (fips_ref/ablations.py): DoRA-style magnitudes; rank growth beyond the width
    scaling_vectors: bool = False      # paper §5 "scaling vectors"; authors: off
    growth: str = "hybrid"             # hybrid (authors' code) | random | split (paper §5)
    # issue 11 (docs/deployment.md): structured sparsifiers on V; srigl, nm need global_pruning False
    fan_in: str = "any"                # any | constant (set; srigl is always constant)
    gamma_sal: float = 0.3             # SRigL neuron-ablation threshold γ_sal; None: no ablation
    nm: tuple = (1, 4)                 # N:M groups of the nm sparsifier


@dataclass
class LocalResult:
    """Everything the local stage produces; arrays live on the run's backend."""
    groups: list
    params: dict                   # 'U.{g}' [rows, R]; '{layer}.V' [R, cols]; '{layer}.bias'
    masks: dict                    # '{layer}.V' -> bool [R, cols]; empty for the dense sparsifier
    schedule: Schedule
    history: dict = field(default_factory=dict)   # loss, lr, sparsity per step
    error_init: dict = field(default_factory=dict)
    error_final: dict = field(default_factory=dict)
    seconds: float = 0.0


# ----------------------------------------------------------------------------- initialisation
def plan_groups(cfg, blocks, groups):
    """The groups with their ranks from the budget (docs/authors-code.md §2); InputError if a rank is < 1."""
    check_ablation_options(cfg)                  # option combinations, before any work (ablations.py)
    rank_sparsity = 0.0 if cfg.sparsifier == "dense" else cfg.sparsity   # B12: dense keeps the budget
    plan = build_groups(blocks, groups, budget=cfg.budget, sparsity=rank_sparsity,
                       strategy=cfg.strategy, round_to=cfg.round_to or None)
    check_structured(cfg, plan)                  # srigl / nm / set constant (docs/deployment.md §6)
    return plan


def dense_weights(weights, blocks, *, xp, dtype):
    """Original MLPs in math layout: {block: (W1 [D, F], b1, W2 [F, D], b2, γ or None)}."""
    out = {}
    for b in blocks:
        w = [xp.asarray(weights[b.key(k)], dtype=dtype) for k in
             ("mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")]
        gamma = weights.get(b.key("ls2.gamma"))
        out[b.index] = (w[0].T, w[1], w[2].T, w[3],
                        None if gamma is None else xp.asarray(gamma, dtype=dtype))
    return out


# ----------------------------------------------------------------------------- loss and gradient
def compressed_layers(params, masks, group, block):
    """((A1, B1, b1), (A2, B2, b2)) of a block's fc1 and fc2, masks and magnitudes applied (W = A @ B)."""
    U = params[f"U.{group.index}"]
    out = []
    for layer in (l for l in group.layers if l.block == block):
        vk = v_param(layer)
        mask = masks.get(vk)
        V = params[vk] if mask is None else params[vk] * mask     # V ⊙ M
        V = scaled_v(V, params.get(m_key(vk)))                    # (V ⊙ M) diag(m), scaling vectors
        out.append((*layer_factors(U, V, layer), params[f"{layer.key}.bias"]))
    return out


def factor_grads(dA, dB, layer):  # -> (dU [rows, R], dV [R, cols])
    """Map dA, dB of W = A @ B back to the layer's U and V (transposes undone)."""
    return (dA, dB) if layer.basis_first else (dB.T, dA.T)


def loss_and_grads(params, masks, groups, inputs, targets, gammas, loss="mlp"):
    """Σ_b block loss and dense gradients (dV w.r.t. V ⊙ M, not yet masked) of every parameter.

    ``loss`` 'mlp': targets[b] is the MLP output [M, D]; 'fc': an FCTarget (paper Eq. 1).
    A layer reading rows of U (by-type, by-block) adds to those rows; a V shared by several
    layers, and its magnitudes 'm', sum their gradients.
    """
    xp = get_xp(*params.values())
    total, grads = 0.0, {}
    for g in groups:
        dU = xp.zeros_like(params[f"U.{g.index}"])
        for b in g.blocks:
            fc = compressed_layers(params, masks, g, b)
            if loss == "fc":
                block_loss, layer_grads = fc_loss_and_grads(inputs[b], targets[b], *fc)
            else:
                block_loss, layer_grads = block_loss_and_grads(inputs[b], targets[b], gammas[b], *fc)
            total = total + block_loss
            for layer, (dA, dB, db) in zip((l for l in g.layers if l.block == b), layer_grads):
                dU_l, dV = factor_grads(dA, dB, layer)
                r0, r1 = layer.u_rows or (0, dU.shape[0])
                dU[r0:r1] += dU_l                                # shared U: Σ over its 2n layers
                vk = v_param(layer)
                m = params.get(m_key(vk))
                if m is not None:
                    mask = masks.get(vk)
                    dV, dm = scaling_grads(dV, params[vk] if mask is None else params[vk] * mask, m)
                    _accumulate(grads, m_key(vk), dm)
                _accumulate(grads, vk, dV)
                grads[f"{layer.key}.bias"] = db
        grads[f"U.{g.index}"] = dU
    return total, grads


def _accumulate(grads, key, g):  # grads[key] += g, creating it
    grads[key] = g if key not in grads else grads[key] + g


# ----------------------------------------------------------------------------- batches
def epoch_batches(n, batch_size, epochs, seed):
    """Authors' order: a fresh permutation per epoch, n // batch_size full batches (docs/authors-code.md §4.3)."""
    rng = np.random.default_rng(seed)
    return [[perm[i * batch_size:(i + 1) * batch_size] for i in range(n // batch_size)]
            for perm in (rng.permutation(n) for _ in range(epochs))]


def gather(a, idx, *, xp, dtype):  # [N, T, D] or [N, D] -> [len(idx)·T, D]
    """Rows ``idx`` of an activation array (NumPy, memmap or device) as a 2-D backend array."""
    rows = a[xp.asarray(idx)] if get_xp(a) is not np else a[idx]
    return xp.asarray(rows, dtype=dtype).reshape(-1, a.shape[-1])


def reference_outputs(dense, block, h):  # [M, D] -> [M, D]
    """Original MLP output of a block (the target)."""
    W1, b1, W2, b2, _ = dense[block]
    return dense_mlp(h, W1, b1, W2, b2)


def cached_targets(dense, acts, *, xp, dtype, chunk=64):
    """Original MLP output of every calibration sample, computed once (the targets never change).

    {block: [N, ..., D]} like ``acts``, as new ``xp`` arrays of ``dtype``.
    """
    out = {}
    for b, a in acts.items():
        out[b] = xp.empty(a.shape, dtype=dtype)
        for s in range(0, a.shape[0], chunk):
            idx = np.arange(s, min(s + chunk, a.shape[0]))
            y = reference_outputs(dense, b, gather(a, idx, xp=xp, dtype=dtype))   # [len·T, D]
            out[b][s:s + len(idx)] = y.reshape((len(idx),) + a.shape[1:])
    return out


def relative_errors(params, masks, groups, dense, acts, *, xp, dtype, targets=None, chunk=64):
    """Per block ‖γ⊙(mlp_c − mlp_o)‖² / ‖γ⊙mlp_o‖² over every calibration sample.

    mlp_o comes from ``targets`` (cached_targets) when given, else it is recomputed.
    """
    out = {}
    for g in groups:
        for b in g.blocks:
            fc1, fc2 = compressed_layers(params, masks, g, b)
            gamma = dense[b][4]
            num = den = 0.0
            for s in range(0, acts[b].shape[0], chunk):
                idx = np.arange(s, min(s + chunk, acts[b].shape[0]))
                h = gather(acts[b], idx, xp=xp, dtype=dtype)
                y_ref = (reference_outputs(dense, b, h) if targets is None
                         else gather(targets[b], idx, xp=xp, dtype=dtype))
                diff = lowrank_mlp(h, fc1, fc2) - y_ref
                if gamma is not None:
                    diff, y_ref = diff * gamma, y_ref * gamma
                num, den = num + (diff * diff).sum(), den + (y_ref * y_ref).sum()
            out[b] = float(num) / max(float(den), 1e-300)
    return out


# ----------------------------------------------------------------------------- one step
@dataclass
class TrainState:
    """Everything one step changes: parameters, masks, AdamW moments, RigL's gradient sum, SET's rng."""
    params: dict                   # 'U.{g}' [rows, R]; '{layer}.V' [R, cols]; '{layer}.bias'
    masks: dict                    # '{layer}.V' -> bool [R, cols]; empty for the dense sparsifier
    adam: AdamWState
    rigl_sum: dict = field(default_factory=dict, repr=False)
    step: int = 0                  # steps taken
    rng: object = field(default=None, repr=False)   # SET's np.random.Generator (set_rng), made at step 1


def local_step(state, cfg, sched, plan, inputs, targets, gammas):
    """One step of the local stage (docs/authors-code.md §4.3): backward → mask update → AdamW → LR.

    ``inputs``, ``targets``: {block: [M, D]} of this step's samples. Updates ``state`` in place
    and returns (loss, lr used); the loss stays on the backend (no device sync).
    """
    state.step += 1
    if state.rng is None and cfg.sparsifier == "set":
        state.rng = set_rng(cfg)
    if cfg.sparsifier == "nm":                   # N:M by magnitude before every forward (SR-STE)
        state.masks = nm_step_masks(cfg, state.params, plan)
    loss, grads = loss_and_grads(state.params, state.masks, plan, inputs, targets, gammas, cfg.loss)
    dense_grads = rigl_gradients(cfg, sched, state.step, grads, state.masks, state.rigl_sum)
    old_masks = state.masks
    state.masks = sparsifier_step(cfg, sched, state.step, state.params, old_masks, dense_grads,
                                  plan=plan, rng=state.rng)
    grad_masks, moment_masks = old_masks, state.masks
    if cfg.sparsifier == "nm":                   # SR-STE trains every entry (Zhou et al. 2021)
        srste_grads(grads, state.params, state.masks)
        grad_masks = moment_masks = None
    lr = cosine_lr(state.step - 1, lr=cfg.lr, eta_min=cfg.eta_min, t_max=sched.total_steps)
    adamw_step(state.params, grads, state.adam, lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
               weight_decay=cfg.weight_decay, grad_masks=grad_masks, moment_masks=moment_masks)
    return loss, lr


# ----------------------------------------------------------------------------- the run
def run_local_stage(weights, acts, groups, cfg=FiPSConfig(), *, blocks, batch_order=None,
                    xp=np, dtype=np.float32, targets="cache", log=None, log_every=10, errors=True,
                    callback=None):
    """Run the whole local stage of FiPS on in-memory weights and recorded MLP inputs.

    Parameters
    ----------
    weights : dict
        timm-named tensors in PyTorch layout: ``{prefix}.mlp.fc1.weight`` [F, D], ``.bias`` [F],
        ``{prefix}.mlp.fc2.weight`` [D, F], ``.bias`` [D], optional ``{prefix}.ls2.gamma`` [D].
    acts : dict
        ``{block index: array [N, T, D] or [N, D]}``, each block's recorded MLP inputs; batches
        are drawn from the first axis (NumPy, calib.DiskArray, or backend arrays).
    groups : list of list of int
        Block indices of each sharing group.
    cfg : FiPSConfig
    blocks : list of checkpoint.MLPBlock
        Where each block's MLP lives (``checkpoint.find_mlp_blocks``).
    batch_order : list of list of index arrays, optional
        Per epoch, the sample indices of each step; replaces the seeded permutations so another
        implementation can be replayed step for step.
    targets : 'cache', 'recompute' or dict
        The original MLP outputs: computed once into ``xp`` arrays (default), recomputed from
        the batch every step (less memory, 4·M·D·F more FLOPs per block and step), or given
        ``{block: array like acts}`` (see ``cached_targets``).
    log : callable, optional
        ``log(step, total_steps, epoch, loss, sparsity)`` every ``log_every`` steps.
    callback : callable, optional
        ``callback(state, loss, lr)`` after every step, to compare another implementation step
        by step: ``state`` is the live TrainState after the step (``params``, ``masks`` after
        this step's mask update, ``adam.m``/``adam.v``/``adam.step`` AdamW moments, ``step``
        steps taken), ``loss`` the step's loss (before its update, on the backend) and ``lr``
        the learning rate the step used. Arrays are updated in place later: copy what you keep.

    Returns
    -------
    LocalResult
        Final factors and biases (``params``), bool ``masks``, resolved ``schedule``, ``history``
        with per-step ``loss``, ``lr`` and ``sparsity``, and per-block relative errors. With
        scaling vectors or a by-type/by-block strategy, ``groups``/``params``/``masks`` are the
        exported form (ablations.expand_grid, fold_scaling); the callback sees the trained one.
    """
    t0 = time.perf_counter()
    if cfg.sparsifier not in SPARSIFIERS:
        raise InputError(f"--sparsifier: unknown {cfg.sparsifier!r} (choose from {', '.join(SPARSIFIERS)})")
    if cfg.loss not in LOSSES:
        raise InputError(f"--loss: unknown {cfg.loss!r} (choose from {', '.join(LOSSES)})")
    n = _sample_count(acts, blocks)
    order = batch_order if batch_order is not None else epoch_batches(n, cfg.batch_size, cfg.epochs, cfg.seed)
    if batch_order is None and not sum(len(e) for e in order):   # (an explicit [] evaluates the init)
        raise InputError(f"--batch-size {cfg.batch_size}: more than the {n} calibration samples, "
                         "so no step would be taken")
    sched = resolve_schedule(cfg, sum(len(e) for e in order))
    check_gmp_levels(cfg, sched)
    plan = plan_groups(cfg, blocks, groups)
    params = init_factors(weights, plan, xp=xp, dtype=dtype, tau=cfg.tau, init=cfg.init, growth=cfg.growth,
                          scaling_vectors=cfg.scaling_vectors, seed=cfg.seed)
    masks = sparsifier_masks(cfg, sched, {k: v for k, v in params.items() if k.endswith(".V")}, plan)
    closed_form = cfg.init == "whitened" or cfg.solver != "adam"  # issue-10 options, off by default
    if closed_form:
        from .als import closed_form_start
        params, masks, order = closed_form_start(cfg, sched, plan, weights, acts, blocks, params, masks,
                                                 order, xp=xp, dtype=dtype)
        sched = resolve_schedule(cfg, sum(len(e) for e in order))
    dense = dense_weights(weights, blocks, xp=xp, dtype=dtype)
    gammas = {b: dense[b][4] for b in dense}
    if targets == "cache":                           # (no step and no error to measure: nothing to cache)
        use = errors or sum(map(len, order))
        targets = cached_targets(dense, acts, xp=xp, dtype=dtype) if use else "recompute"
    elif targets != "recompute" and not isinstance(targets, dict):
        raise ValueError(f"targets must be 'cache', 'recompute' or a dict, got {targets!r}")
    cached = targets if isinstance(targets, dict) else None
    result = LocalResult(plan, params, masks, sched)
    if errors:
        result.error_init = relative_errors(params, masks, plan, dense, acts, xp=xp, dtype=dtype,
                                            targets=cached)
    state = TrainState(params, masks, adamw_init(params))
    hist = {"loss": [], "lr": [], "sparsity": []}
    sparsity_now = 1.0 - density(masks) if masks else 0.0
    for epoch, batches in enumerate(order):
        for idx in batches:
            inputs = {b: gather(acts[b], idx, xp=xp, dtype=dtype) for b in dense}
            if targets == "recompute":
                y_ref = {b: reference_outputs(dense, b, inputs[b]) for b in dense}
            else:
                y_ref = {b: gather(targets[b], idx, xp=xp, dtype=dtype) for b in dense}
            if cfg.loss == "fc":                             # + fc1's output, fc2's input
                y_ref = {b: fc_target(dense, b, inputs[b], y_ref[b]) for b in dense}
            masks_before = state.masks
            loss, lr = local_step(state, cfg, sched, plan, inputs, y_ref, gammas)
            if callback is not None:
                callback(state, loss, lr)
            if state.masks is not masks_before:
                sparsity_now = 1.0 - density(state.masks)
            hist["loss"].append(loss)
            hist["lr"].append(lr)
            hist["sparsity"].append(sparsity_now)
            if log is not None and (state.step % log_every == 0 or state.step == sched.total_steps):
                log(state.step, sched.total_steps, epoch, float(loss), sparsity_now)
    hist["loss"] = [float(x) for x in hist["loss"]]                # one sync, at the end
    bad = next((k for k, x in enumerate(hist["loss"], 1) if not np.isfinite(x)), None)
    if bad is not None:
        raise InputError(f"the run diverged: the loss is {hist['loss'][bad - 1]} at step {bad} "
                         f"(lower --lr, raise --eps)")
    if closed_form:                                                # exactly the target budget
        from .als import exact_budget
        state.masks = exact_budget(cfg, params, state.masks)
    result.masks, result.history = state.masks, hist
    if errors:
        result.error_final = relative_errors(params, state.masks, plan, dense, acts, xp=xp,
                                             dtype=dtype, targets=cached)
    if cfg.scaling_vectors or cfg.strategy in GRID_STRATEGIES:   # the form the file stores (ablations.py)
        result.groups, result.params, result.masks = expand_grid(plan, fold_scaling(params), state.masks, xp)
    result.seconds = time.perf_counter() - t0
    return result


def _sample_count(acts, blocks):
    missing = [b.index for b in blocks if b.index not in acts]
    if missing:
        raise InputError(f"calibration activations: block {missing[0]} has none")
    sizes = {acts[b.index].shape[0] for b in blocks}
    if len(sizes) != 1:
        raise InputError(f"calibration activations: blocks have different sample counts {sorted(sizes)}")
    return sizes.pop()


def config_dict(cfg):
    """The config as a plain dict (for reports and the compressed file's metadata)."""
    return asdict(cfg)
