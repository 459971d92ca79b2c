"""Rank from a parameter budget, parameter counts and storage bits (paper §3, docs/authors-code.md §2 and §6).

Notation: D rows of the shared basis U (the model width for --concat long), L = 2n·F total
columns of the concatenated matrix C [D, L], r rank, p budget, s sparsity of V, δ = 1 − s density.
"""


def sparse_rank(n_blocks, d, budget, sparsity, n_fc=2, round_to=None, mlp_ratio=4):
    """Authors' ``compute_sparse_r`` (docs/authors-code.md §2): the largest r with D·r + δ·r·L ≤ p·D·L.

    Evaluated in exactly the authors' floating-point order, then truncated with int(); with
    ``round_to`` (the authors' LLM ``structured_sparsity`` rounding) r becomes a multiple of it.
    ``mlp_ratio`` (hidden width F = ratio·d) generalises the authors' hard-coded 4.
    """
    n_params = mlp_ratio * n_fc * n_blocks * d**2 * budget
    f_coeff = mlp_ratio * n_fc * n_blocks * d * (1 - sparsity) + d
    r = int(n_params / f_coeff)
    if round_to:
        r = round_to * (r // round_to)
    return r


def rank_for_shape(rows, cols, budget, sparsity):
    """Largest r with rows·r + δ·r·cols ≤ p·rows·cols, for a concatenation C [rows, cols]."""
    return int(budget * rows * cols / (rows + (1 - sparsity) * cols))


def storage_bits(rows, rank, cols, nnz, value_bits=16):
    """Paper §3 storage of one group: dense U and nnz values of V at value_bits, one mask bit per V entry."""
    return value_bits * (rows * rank + nnz) + rank * cols


def original_bits(rows, cols, value_bits=16):
    """Storage of the original concatenated weights C [rows, cols] at value_bits."""
    return value_bits * rows * cols


def storage_ratio(budget, rank, d):
    """Paper §3 closed form of storage_bits / original_bits at density exactly δ: p + r/(16d)."""
    return budget + rank / (16 * d)
