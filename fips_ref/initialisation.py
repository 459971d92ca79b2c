"""The start of the local stage: U per group, V slices and biases per layer (paper §3 "Shared initialisation").

The authors' start is the truncated SVD of each group's concatenation C (sharing.svd_init); the
paper's §5 ablations replace it by He-random factors, grow the rank differently past
min(rows, cols), or take the SVD of C with unit-norm columns and train the norms (ablations.py).
"""
import numpy as np

from .ablations import grow, he_init, m_key, normalise_columns
from .sharing import concat_group, split_v, svd_init, v_keys


def init_factors(weights, groups, *, xp, dtype, tau, init="svd", growth="hybrid", scaling_vectors=False,
                 seed=0):
    """U per group, V slices, biases per layer (paper §3 "Shared initialisation"; §5 ablations: ablations.py).

    ``init`` 'svd' (the authors') or 'random' (He); ``growth`` for ranks past min(rows, cols);
    ``scaling_vectors``: the SVD of C's column-normalised C_n and a magnitude 'm' per V slice.
    """
    params = {}
    rng = np.random.default_rng(seed)
    for g in groups:
        C = concat_group(weights, g)                                  # [rows, k·cols]
        m = None
        if scaling_vectors:
            C, m = normalise_columns(C)                               # C = C_n diag(m)
        if init == "random":
            U, V = he_init(C.shape[0], C.shape[1], g.rank, rng)
        else:
            U, V = svd_init(C, min(g.rank, min(C.shape)), tau)        # [rows, q'], [q', k·cols]
            U, V = grow(U, V, g.rank, growth, tau, rng)               # [rows, R], [R, k·cols]
        params[f"U.{g.index}"] = xp.asarray(U, dtype=dtype)
        for j, (vk, v) in enumerate(zip(v_keys(g), split_v(V, g))):
            params[vk] = xp.asarray(v, dtype=dtype)
            if m is not None:
                params[m_key(vk)] = xp.asarray(m[j * g.cols:(j + 1) * g.cols], dtype=dtype)
        for layer in g.layers:
            # a copy: AdamW updates params in place, and the caller's bias is also the target's
            params[f"{layer.key}.bias"] = xp.array(weights[f"{layer.key}.bias"], dtype=dtype)
    return params
