"""The two objectives of the local stage and their gradients, block by block.

Letters: M tokens in a batch, D model width, F hidden width.

- ``block_loss_and_grads``: the authors' code (docs/authors-code.md §4.3, ``--loss mlp``), the MSE
  of the block's MLP output, scaled by LayerScale γ; fc2 sees the compressed fc1's output.
- ``fc_loss_and_grads``: the paper's Eq. (1) (``--loss fc``), each fc layer's MSE on its own
  original input; fc2 sees the original GELU(fc1(h)).

They differ (docs/differences.md D1); derivations in docs/derivations.md.
"""
from typing import NamedTuple

from .mlp import gelu, lowrank_fc_backward, lowrank_fc_forward, lowrank_mlp_backward, lowrank_mlp_forward


def block_loss_and_grads(h, y_ref, gamma, fc1, fc2):  # h, y_ref [M, D]
    """mean((γ ⊙ (mlp_c(h) − y_ref))²) and its gradients w.r.t. fc1, fc2 factors (docs/authors-code.md §4.3)."""
    y, cache = lowrank_mlp_forward(h, fc1, fc2)                  # [M, D]
    e = y
    e -= y_ref                                                   # Δy, in place: y is ours
    if gamma is not None:
        e *= gamma                                               # e = γ ⊙ Δy
    loss = (e * e).sum() / e.size
    e *= 2.0 / e.size                                            # dL/dy = 2 γ ⊙ e / n
    if gamma is not None:
        e *= gamma
    return loss, lowrank_mlp_backward(e, cache, fc1, fc2)


class FCTarget(NamedTuple):
    """Original per-layer signals of a batch for the paper's Eq. (1) loss."""
    z: object        # [M, F] fc1_o(h) = h W1 + b1
    a: object        # [M, F] GELU(z): fc2's original input
    y: object        # [M, D] fc2_o(a), the original MLP output


def fc_target(dense, block, h, y_ref):  # [M, D], [M, D] -> FCTarget
    """fc1's original output and fc2's original input for ``h``; ``y_ref`` is the MLP output."""
    W1, b1 = dense[block][:2]
    z = h @ W1                                                   # [M, D] -> [M, F]
    z += b1
    return FCTarget(z, gelu(z), y_ref)


def fc_loss_and_grads(h, target, fc1, fc2):  # h [M, D], target FCTarget
    """Paper Eq. (1): mean((fc1_c(h) − z)²) + mean((fc2_c(a) − y)²) and its gradients (docs/derivations.md)."""
    (z, y), cache = lowrank_fc_forward(h, target.a, fc1, fc2)     # [M, F], [M, D]
    z -= target.z                                                 # in place: both are ours
    y -= target.y
    loss = (z * z).sum() / z.size + (y * y).sum() / y.size
    z *= 2.0 / z.size                                             # dL/dz_c
    y *= 2.0 / y.size                                             # dL/dy_c
    return loss, lowrank_fc_backward(z, y, cache, fc1, fc2)
