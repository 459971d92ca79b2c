"""Closed-form steps on the paper's Eq. (1): U-step, masked V-step, whitened init, ALS (docs/closed-form.md).

Letters: D model width, F hidden width, R rank; a layer's block of C is [rows, cols] (sharing.py).

Every term of Eq. (1) is written in the concatenation's own layout: layer l contributes

    e_l(U, V_l) = tr(E_lᵀ P_l E_l Q_l),   E_l = C_l − U (V_l ⊙ M_l)          (docs/closed-form.md §2)

with P_l [rows, rows] and Q_l [cols, cols] the metrics of its two sides: the layer's input moment
on its input side, and on its output side γ² (fc2 with LayerScale) or the identity. A metric is
None (identity), a vector (diagonal) or a matrix. Solves run in the arrays' dtype, by
preconditioned conjugate gradients warm-started at the current factors: each CG iterate lowers
the quadratic, so an ALS sweep never raises Eq. (1), even when a solve is cut short.
"""
from dataclasses import dataclass

import numpy as np

from .backend import get_xp
from .sharing import layer_block
from .stats import mean, metric

CG_TOL = 1e-10        # relative residual of a solve
CG_ITERS = 200        # per solve; warm starts make later solves short


@dataclass(frozen=True)
class LayerTerm:
    """One layer's term of Eq. (1): its original block C and the metrics of its two sides."""
    key: str        # e.g. 'blocks.3.mlp.fc1'
    C: object       # [rows, cols] the layer's block of the concatenation (original weight)
    P: object       # None | [rows] | [rows, rows] metric on the rows side (U's side)
    Q: object       # None | [cols] | [cols, cols] metric on the cols side (V's side)
    mu_in: object   # [in] mean of the layer's input (for the bias re-fit), or None


# ----------------------------------------------------------------------------- metrics
def _lm(P, X):  # P · X for P None | [n] | [n, n]
    return X if P is None else (P[:, None] * X if P.ndim == 1 else P @ X)


def _rm(X, Q):  # X · Q
    return X if Q is None else (X * Q if Q.ndim == 1 else X @ Q)


def _full(P, n, xp, dtype):  # -> [n, n]
    return xp.eye(n, dtype=dtype) if P is None else (xp.diag(P) if P.ndim == 1 else P)


def _diag(P, n, xp, dtype):  # -> [n]
    return xp.ones(n, dtype=dtype) if P is None else (P if P.ndim == 1 else xp.diagonal(P))


def group_terms(weights, group, stats, gammas, *, xp, dtype=np.float64, centered=True):
    """The LayerTerms of a group (Eq. (1) with the blocks' statistics, docs/closed-form.md §1–2)."""
    terms = []
    for layer in group.layers:
        fc1 = layer.key.endswith("fc1")
        mom = stats[layer.block].x if fc1 else stats[layer.block].h
        gamma = None if fc1 else gammas.get(layer.block)
        s_in = xp.asarray(metric(mom, centered), dtype=dtype)                  # [in, in]
        s_out = None if gamma is None else xp.asarray(gamma, dtype=dtype) ** 2
        P, Q = (s_in, s_out) if layer.basis_first else (s_out, s_in)
        C = xp.asarray(layer_block(weights[f"{layer.key}.weight"], layer), dtype=dtype)
        terms.append(LayerTerm(layer.key, C, P, Q,
                               xp.asarray(mean(mom), dtype=dtype) if centered else None))
    return terms


# ----------------------------------------------------------------------------- Eq. (1)
def objective(U, Vs, terms):  # U [rows, R], Vs [[R, cols]] (masked) -> scalar
    """Eq. (1): Σ_l tr(E_lᵀ P_l E_l Q_l), E_l = C_l − U V_l (docs/closed-form.md §2)."""
    total = 0.0
    for V, t in zip(Vs, terms):
        E = t.C - U @ V                                       # [rows, cols]
        total = total + (E * _rm(_lm(t.P, E), t.Q)).sum()
    return total


def objective_grads(U, Vs, terms):  # -> (dU [rows, R], [dV_l [R, cols]])
    """Gradients of Eq. (1): dU = −2 Σ_l P E Q V_lᵀ, dV_l = −2 Uᵀ P E Q (dense, before masking)."""
    xp = get_xp(U)
    dU, dVs = xp.zeros_like(U), []
    for V, t in zip(Vs, terms):
        G = _rm(_lm(t.P, t.C - U @ V), t.Q)                   # P E Q [rows, cols]
        dU -= 2.0 * (G @ V.T)
        dVs.append(-2.0 * (U.T @ G))
    return dU, dVs


# ----------------------------------------------------------------------------- CG
def _dot(a, b):
    return float((a * b).sum())


def pcg(apply_a, b, x0, precond, tol=CG_TOL, maxiter=CG_ITERS):
    """Preconditioned CG for A x = b, A SPD, from x0; every iterate lowers ½xᵀAx − bᵀx."""
    x = x0.copy()
    r = b - apply_a(x)
    z = precond(r)
    p, rz = z.copy(), _dot(r, z)
    stop = tol * max(_dot(b, b), 1e-300) ** 0.5
    for _ in range(maxiter):
        if _dot(r, r) ** 0.5 <= stop or rz <= 0:
            break
        ap = apply_a(p)
        pap = _dot(p, ap)
        if pap <= 0:
            break
        alpha = rz / pap
        x += alpha * p
        r -= alpha * ap
        z = precond(r)
        rz, rz_old = _dot(r, z), rz
        p = z + (rz / rz_old) * p
    return x


# ----------------------------------------------------------------------------- U-step
def u_step(U, Vs, terms, tol=CG_TOL, maxiter=CG_ITERS):  # -> U [rows, R]
    """Minimise Eq. (1) over U: Σ_l P_l U (V_l Q_l V_lᵀ) = Σ_l P_l C_l Q_l V_lᵀ (docs/closed-form.md §3)."""
    Ms = [_rm(V, t.Q) @ V.T for V, t in zip(Vs, terms)]                        # V Q Vᵀ [R, R]
    rhs = sum(_lm(t.P, _rm(t.C, t.Q)) @ V.T for V, t in zip(Vs, terms))           # [rows, R]
    apply_a = lambda X: sum(_lm(t.P, X @ M) for M, t in zip(Ms, terms))           # noqa: E731
    return pcg(apply_a, rhs, U, _u_preconditioner(U, Ms, terms), tol, maxiter)


def _u_preconditioner(U, Ms, terms):
    """Exact inverse of the two-term operator X1 U Y1 + X2 U Y2 that averages the layers' metrics.

    X1 = mean of the full left metrics (weighted by tr M_l), Y1 = Σ their M_l; X2, Y2 the same for
    the identity / diagonal ones. Exact when a group's full metrics are equal (one block).
    """
    xp = get_xp(U)
    rows, R = U.shape
    X1, Y1, w1 = xp.zeros((rows, rows), U.dtype), xp.zeros((R, R), U.dtype), 0.0
    X2, Y2, w2 = xp.zeros(rows, U.dtype), xp.zeros((R, R), U.dtype), 0.0
    for M, t in zip(Ms, terms):
        w = float(xp.trace(M)) + 1e-300
        if t.P is not None and t.P.ndim == 2:
            X1, Y1, w1 = X1 + w * t.P, Y1 + M, w1 + w
        else:
            X2, Y2, w2 = X2 + w * _diag(t.P, rows, xp, U.dtype), Y2 + M, w2 + w
    X1 = X1 / max(w1, 1e-300)
    X2 = xp.diag(X2 / w2) if w2 > 0 else xp.eye(rows, dtype=U.dtype)
    return two_term_solver(X1, Y1, X2, Y2)


def _rel_floor(dtype, base):  # a relative ridge/floor well above the dtype's rounding
    return max(base, 100.0 * float(np.finfo(dtype).eps))


def _inv_sqrt(A):  # SPD [n, n] -> A^{-1/2}
    xp = get_xp(A)
    a, W = xp.linalg.eigh(A)
    a = xp.maximum(a, a.max() * _rel_floor(A.dtype, 1e-12) + 1e-300)
    return (W / xp.sqrt(a)) @ W.T


def _congruence(A, B):  # -> (T, λ) with Tᵀ B T = I, Tᵀ A T = diag(λ)
    xp = get_xp(A)
    n = A.shape[0]
    ridge = _rel_floor(A.dtype, 1e-9) * (float(xp.trace(A)) + float(xp.trace(B))) / n + 1e-300
    Bi = _inv_sqrt(B + ridge * xp.eye(n, dtype=B.dtype))
    lam, Z = xp.linalg.eigh(Bi @ A @ Bi)
    return Bi @ Z, xp.maximum(lam, 0)


def two_term_solver(X1, Y1, X2, Y2):
    """R ↦ U solving X1 U Y1 + X2 U Y2 = R (X2, Y2 positive definite; a small ridge keeps them so).

    With X1 T = X2 T Λ, Y1 S = Y2 S Μ (congruences), U = T ((Tᵀ R S) / (λ_i μ_j + 1)) Sᵀ.
    """
    T, lam = _congruence(X1, X2)
    S, mu = _congruence(Y1, Y2)
    denom = lam[:, None] * mu[None, :] + 1.0
    return lambda R: T @ ((T.T @ R @ S) / denom) @ S.T


# ----------------------------------------------------------------------------- V-step
def v_step(U, V, mask, term, tol=CG_TOL, maxiter=CG_ITERS):  # -> V [R, cols], zero off the mask
    """Minimise the layer's term over the entries of V in ``mask``: M ⊙ (G V Q) = M ⊙ (Uᵀ P C Q), G = Uᵀ P U.

    Jacobi-preconditioned CG on the masked entries (docs/closed-form.md §4).
    """
    xp = get_xp(U)
    G = U.T @ _lm(term.P, U)                                          # [R, R]
    m = xp.ones(V.shape, dtype=U.dtype) if mask is None else mask.astype(U.dtype)
    rhs = m * (U.T @ _lm(term.P, _rm(term.C, term.Q)))                # [R, cols]
    apply_a = lambda X: m * _rm(G @ X, term.Q)                        # noqa: E731
    d = xp.diagonal(G)[:, None] * _diag(term.Q, V.shape[1], xp, U.dtype)[None, :]
    d = xp.where(d > 0, d, 1.0)
    return pcg(apply_a, rhs, V * m, lambda r: r / d, tol, maxiter)


def removal_cost(U, V, term):  # -> [R, cols]
    """Increase of the layer's term when V_ij alone is zeroed: V_ij² (Uᵀ P U)_ii Q_jj (docs/closed-form.md §5)."""
    xp = get_xp(U)
    g = xp.sum(U * _lm(term.P, U), axis=0)                            # diag(Uᵀ P U) [R]
    return (V * V) * g[:, None] * _diag(term.Q, V.shape[1], xp, U.dtype)[None, :]


# ----------------------------------------------------------------------------- whitened init
def whitened_init(terms, rank, tau=32.0):  # -> (U [rows, R], [V_l [R, cols]])
    """Activation-aware shared initialisation (docs/closed-form.md §6).

    U: the top generalized eigenvectors of A u = λ B u, A = Σ_l P_l C_l Q_l C_lᵀ P_l / c_l,
    B = mean_l P_l / c_l (c_l = tr P_l / rows); V_l: the exact dense V-step given U. With identity
    metrics this is sharing.svd_init (same signs, same τ-growth when R exceeds min(rows, cols)).
    """
    xp = get_xp(terms[0].C)
    dt = terms[0].C.dtype
    rows = terms[0].C.shape[0]
    A, B = xp.zeros((rows, rows), dt), xp.zeros((rows, rows), dt)
    for t in terms:
        Pf = _full(t.P, rows, xp, dt)
        c = float(xp.trace(Pf)) / rows
        PC = Pf @ t.C                                                  # [rows, cols]
        A += _rm(PC, t.Q) @ PC.T / c
        B += Pf / (c * len(terms))
    T, lam = _congruence(A, B)
    q = min(rows, sum(t.C.shape[1] for t in terms), rank)
    U = T[:, ::-1][:, :q]                                              # largest λ first
    U = _canonical_signs(U)
    Vs = [xp.linalg.solve(U.T @ _lm(t.P, U), U.T @ _lm(t.P, t.C)) for t in terms]   # [q, cols]
    return _grow(U, Vs, rank, tau)


def _canonical_signs(U):  # largest-|·| entry of each column positive (as sharing._canonical_signs)
    xp = get_xp(U)
    idx = xp.argmax(xp.abs(U), axis=0)
    s = xp.sign(U[idx, xp.arange(U.shape[1])])
    return U * xp.where(s == 0, 1.0, s)


def _grow(U, Vs, rank, tau):  # Net2Net growth of sharing.svd_init (paper §3) when rank > q
    xp = get_xp(U)
    q = U.shape[1]
    if rank <= q:
        return U, Vs
    V = xp.concatenate(Vs, axis=1)                                     # [q, 2n·cols]
    k = rank - q
    grown = V[:min(k, q)] / tau
    reps = -(-k // grown.shape[0])
    V = xp.concatenate([V, xp.concatenate([grown] * reps, axis=0)[:k]], axis=0)   # [R, 2n·cols]
    U = xp.concatenate([U, xp.zeros((U.shape[0], k), U.dtype)], axis=1)           # [rows, R]
    cols = Vs[0].shape[1]
    return U, [V[:, j * cols:(j + 1) * cols].copy() for j in range(len(Vs))]


# ----------------------------------------------------------------------------- biases
def refit_bias(b, W, W_hat, mu):  # [out] -> [out]
    """b̂ = b + μᵀ (W − Ŵ) (math layout W [in, out]): the bias that Eq. (1)'s centering assumes (§2)."""
    return b + mu @ (W - W_hat)
