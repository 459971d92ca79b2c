"""Sharing groups, the concatenated weight matrix C and its SVD initialisation (paper §3, docs/authors-code.md §1, §3).

Letters: D model width, F hidden width, n blocks in a group, R rank.

Strategy 'long' (the authors' code, concat_axis 1): every layer becomes a [D, F] block, fc1 as
x @ W (in×out) and fc2 transposed, and the 2n blocks are concatenated along the columns:
C = [W_fc1,b0 | W_fc2,b0ᵀ | W_fc1,b1 | …], shape [D, 2n·F]. U [D, R] is shared and acts on the
model-width side; V_j [R, F] is layer j's sparse slice; fc1 = U V_j, fc2 = (U V_j)ᵀ.

Strategy 'short' shares the basis on the hidden side instead: every layer becomes an [F, D]
block, C = [W_fc1,b0ᵀ | W_fc2,b0 | …] of shape [F, 2n·D], U [F, R], V_j [R, D]; fc1 = (U V_j)ᵀ,
fc2 = U V_j. Stacking the transposed blocks along the rows instead gives Cᵀ and C_sᵀ, the same
factorisations transposed.

The block-structured strategies II and III (paper App. A.1, Fig. 2c; our reading, docs/algorithm.md
"Strategies of concatenation") lay the [D, F] blocks out on a grid, so U splits into row blocks
and a V slice serves every layer in its column:
- 'by-type' (II): rows are the layer types, columns the blocks. C = [[W_fc1,b0 | W_fc1,b1 | …],
  [W_fc2,b0ᵀ | W_fc2,b1ᵀ | …]] of shape [2D, n·F]; U = [U_fc1; U_fc2] [2D, R], one V_b [R, F] per
  block shared by its fc1 and fc2: fc1_b = U_fc1 V_b, fc2_b = (U_fc2 V_b)ᵀ.
- 'by-block' (III): rows are the blocks, columns the layer types. C = [[W_fc1,b0 | W_fc2,b0ᵀ],
  [W_fc1,b1 | W_fc2,b1ᵀ], …] of shape [n·D, 2F]; U = [U_b0; U_b1; …] [n·D, R], one V per layer
  type shared by every block: fc1_b = U_b V_fc1, fc2_b = (U_b V_fc2)ᵀ.
A Layer says which rows of U it reads (``u_rows``) and which V it reads (``v_key``).
"""
import re
from dataclasses import dataclass

import numpy as np

from .budget import rank_for_shape, sparse_rank
from .checkpoint import InputError

STRATEGIES = ("long", "short", "by-type", "by-block")
STRATEGY_ALIASES = {"I": "long", "II": "by-type", "III": "by-block", "IV": "short"}   # paper Fig. 2c
GRID_STRATEGIES = ("by-type", "by-block")


def strategy_name(name):
    """'long', 'short', 'by-type', 'by-block', or the paper's numeral I-IV for one of them."""
    name = STRATEGY_ALIASES.get(name, name)
    if name not in STRATEGIES:
        raise InputError(f"--concat: unknown strategy {name!r} (choose from "
                         f"{', '.join(STRATEGIES)} or I-IV)")
    return name


@dataclass(frozen=True)
class Layer:
    """One compressed fc layer: its timm key prefix, block and orientation."""
    key: str            # e.g. 'blocks.3.mlp.fc1'
    block: int          # global block index
    basis_first: bool   # math weight [in, out] = U @ V (True) or (U @ V)ᵀ (False)
    u_rows: tuple = None    # (start, stop) rows of U this layer reads; None: all (long, short)
    v_key: str = None       # name of the V it reads, shared in by-type/by-block; None: its own key


@dataclass(frozen=True)
class Group:
    """A sharing group: one dense U [rows, rank] and one sparse V slice [rank, cols] per layer."""
    index: int
    blocks: tuple
    rows: int
    cols: int
    rank: int
    layers: tuple       # fc1_b0, fc2_b0, fc1_b1, fc2_b1, ... (docs/authors-code.md §1.2)
    strategy: str = "long"


# ----------------------------------------------------------------------------- groups
def default_groups(blocks, group_size):
    """Consecutive groups of ``group_size`` blocks inside each stage (paper §4: 4 for DeiT-B)."""
    groups = []
    for stage in sorted({b.stage for b in blocks}):
        ids = [b.index for b in blocks if b.stage == stage]
        if group_size < 1 or len(ids) % group_size:
            raise InputError(f"--group-size {group_size} does not divide the {len(ids)} blocks of "
                             f"stage {stage}; give uneven groups with --groups (or --groups paper)")
        groups += [ids[i:i + group_size] for i in range(0, len(ids), group_size)]
    return groups


PAPER_MAX_GROUP = {"vit": 4, "swin": 6}   # DeiT-B groups of 4; Swin-L's 18-block stage in 6s


def paper_groups(blocks, arch):
    """The paper's groupings (§4; docs/authors-code.md §1.1), generalised to any depth.

    Per stage, consecutive blocks; a stage of L blocks is split into ⌈L/m⌉ groups as even as
    possible (earlier groups one larger), m = 4 for a ViT and 6 for a Swin: DeiT-B 0-3, 4-7,
    8-11; Swin-L's 2-block stages alone and its 18-block stage as three groups of 6.
    """
    if arch not in PAPER_MAX_GROUP:
        raise InputError(f"--groups paper: no paper grouping for arch {arch!r} (vit or swin)")
    groups = []
    for stage in sorted({b.stage for b in blocks}):
        ids = [b.index for b in blocks if b.stage == stage]
        k = -(-len(ids) // PAPER_MAX_GROUP[arch])                # ⌈L/m⌉ groups
        size, extra = divmod(len(ids), k)
        start = 0
        for j in range(k):
            end = start + size + (j < extra)
            groups.append(ids[start:end])
            start = end
    return groups


def choose_groups(spec, group_size, blocks, arch):
    """(groups, how) from --groups / --group-size (docs/options.md "Groups").

    ``spec``: None, 'paper' or e.g. '0-3,4-7'. ``group_size``: None for the default, which is
    groups of 4 where 4 divides every stage, and the paper's groups otherwise (a Swin's 2-block
    stages).
    """
    if spec is not None and spec.strip() == "paper":
        return paper_groups(blocks, arch), "paper"
    if spec is not None:
        return parse_groups(spec), "explicit"
    if group_size is not None:
        return default_groups(blocks, group_size), f"group size {group_size}"
    sizes = [sum(b.stage == s for b in blocks) for s in {b.stage for b in blocks}]
    if all(n % 4 == 0 for n in sizes):
        return default_groups(blocks, 4), "group size 4"
    return paper_groups(blocks, arch), "paper"


def parse_groups(spec):
    """'0-3,4-7,8-11' -> [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]] ('5' is a one-block group)."""
    groups = []
    for item in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", item)
        if not m or (m.group(2) and int(m.group(2)) < int(m.group(1))):
            raise InputError(f"--groups: cannot parse {item.strip()!r} (expected e.g. 0-3,4-7)")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        groups.append(list(range(lo, hi + 1)))
    return groups


def check_groups(groups, blocks):
    """Every block in exactly one group; a group stays inside one stage and one width."""
    by_index = {b.index: b for b in blocks}
    seen = set()
    for g in groups:
        for i in g:
            if i not in by_index:
                raise InputError(f"--groups: block {i} does not exist (blocks 0-{len(blocks) - 1})")
            if i in seen:
                raise InputError(f"--groups: block {i} is in more than one group")
            seen.add(i)
        shapes = {(by_index[i].stage, by_index[i].d, by_index[i].hidden) for i in g}
        if len(shapes) > 1:
            raise InputError(f"--groups: group {g[0]}-{g[-1]} mixes stages or widths "
                             f"{sorted(shapes)}")
    missing = sorted(set(by_index) - seen)
    if missing:
        raise InputError(f"--groups: block {missing[0]} is in no group")


# ----------------------------------------------------------------------------- plan
def build_groups(blocks, groups, *, budget, sparsity, strategy="long", round_to=None):
    """Group descriptors with ranks from the budget (docs/authors-code.md §2; App. A.1 for II/III)."""
    strategy = strategy_name(strategy)
    by_index = {b.index: b for b in blocks}
    out = []
    for gi, ids in enumerate(groups):
        ids = sorted(ids)
        d, f, n = by_index[ids[0]].d, by_index[ids[0]].hidden, len(ids)
        if strategy == "long":
            rows, cols = d, f
            ratio = f // d if f % d == 0 else f / d
            rank = sparse_rank(n, d, budget, sparsity, round_to=round_to, mlp_ratio=ratio)
        else:
            rows, cols, c_shape = {"short": (f, d, (f, 2 * n * d)),
                                   "by-type": (2 * d, f, (2 * d, n * f)),
                                   "by-block": (n * d, f, (n * d, 2 * f))}[strategy]
            rank = rank_for_shape(*c_shape, budget, sparsity)
            rank = round_to * (rank // round_to) if round_to else rank
        if rank < 1:
            raise InputError(f"--budget {budget}: rank of group {gi} would be {rank}; raise the budget")
        layers = []
        for k, i in enumerate(ids):
            prefix = by_index[i].prefix
            for fc in ("fc1", "fc2"):
                key = f"{prefix}.mlp.{fc}"
                if strategy in ("long", "short"):
                    layers.append(Layer(key, i, (fc == "fc1") == (strategy == "long")))
                elif strategy == "by-type":     # rows: fc1 | fc2; V per block
                    t = fc == "fc2"
                    layers.append(Layer(key, i, fc == "fc1", (t * d, (t + 1) * d), f"{prefix}.mlp"))
                else:                           # by-block: rows: block k; V per layer type
                    layers.append(Layer(key, i, fc == "fc1", (k * d, (k + 1) * d), f"group{gi}.{fc}"))
        out.append(Group(gi, tuple(ids), rows, cols, rank, tuple(layers), strategy))
    return out


def v_param(layer):
    """The parameter key of the V slice a layer reads: '{layer}.V', or its shared V's."""
    return f"{layer.v_key or layer.key}.V"


def v_keys(group):  # -> ['….V', …] in the column order of C
    """The distinct V slices of a group, in column order (one per layer for long/short)."""
    return list(dict.fromkeys(v_param(l) for l in group.layers))


def layer_block(w_torch, layer):  # PyTorch [out, in] -> the layer's [rows, cols] block of C
    """The layer's block of C: its math weight Wᵀ_torch, transposed again when basis_first is False."""
    w_math = w_torch.T                               # [out, in] -> [in, out]
    return w_math if layer.basis_first else w_math.T


def concat_group(weights, group):  # -> [rows, k·cols], k V slices
    """C of a group (docs/authors-code.md §1.2; grid layouts App. A.1), float64 on the host.

    Layer l's block goes to rows ``u_rows`` and the column block of its V slice; ``weights[key]``
    are PyTorch-layout. For long and short this is the row [B_0 | B_1 | …] of the 2n blocks.
    """
    keys = v_keys(group)
    C = np.zeros((group.rows, len(keys) * group.cols))
    for l in group.layers:
        r0, r1 = l.u_rows or (0, group.rows)
        j = keys.index(v_param(l))
        C[r0:r1, j * group.cols:(j + 1) * group.cols] = layer_block(weights[f"{l.key}.weight"], l)
    return C


def layer_factors(U, V, layer):  # U [rows, R], V [R, cols] -> (A [in, R], B [R, out])
    """The layer's math weight as a product A @ B: (U_l, V), or (Vᵀ, U_lᵀ) for (U_l V)ᵀ; U_l = U[u_rows]."""
    if layer.u_rows is not None:
        U = U[layer.u_rows[0]:layer.u_rows[1]]
    return (U, V) if layer.basis_first else (V.T, U.T)


# ----------------------------------------------------------------------------- SVD init
def svd_init(C, rank, tau=32):  # [rows, cols] -> (U [rows, R], V [R, cols])
    """Truncated SVD with singular values folded into V, grown Net2Net-style when R > rows (docs/authors-code.md §3).

    U = U_full[:, :R], V = (diag(S) Vh)[:R]. When R exceeds q = min(rows, cols), U gets R − q
    zero columns and V gets the rows of diag(S) Vh, largest first, each divided by τ, cycled if
    R − q > q; so U V = C exactly at init. Signs are canonical: the largest-|·| entry of each
    U[:, i] is positive.
    """
    C = np.asarray(C, dtype=np.float64)
    U, S, Vh = np.linalg.svd(C, full_matrices=False)   # [rows, q], [q], [q, cols]
    U, Vh = _canonical_signs(U, Vh)
    V = S[:, None] * Vh                                 # [q, cols]
    q = S.shape[0]
    if rank <= q:
        return U[:, :rank].copy(), V[:rank].copy()
    k = rank - q
    grown = V[:min(k, q)] / tau                         # [min(k, q), cols]
    reps = -(-k // grown.shape[0])
    V = np.concatenate([V, np.tile(grown, (reps, 1))[:k]], axis=0)   # [R, cols]
    U = np.concatenate([U, np.zeros((U.shape[0], k))], axis=1)       # [rows, R]
    return U, V


def _canonical_signs(U, Vh):  # flip (U[:, i], Vh[i]) so U's largest-|.| entry per column is > 0
    idx = np.argmax(np.abs(U), axis=0)
    signs = np.sign(U[idx, np.arange(U.shape[1])])
    signs[signs == 0] = 1.0
    return U * signs, Vh * signs[:, None]


def split_v(V, group):  # [R, k·cols] -> [[R, cols]] * k
    """The V slices V[:, cols·j : cols·(j+1)], in v_keys order, as contiguous arrays (docs/authors-code.md §1.3)."""
    return [np.ascontiguousarray(V[:, j * group.cols:(j + 1) * group.cols])
            for j in range(len(v_keys(group)))]
