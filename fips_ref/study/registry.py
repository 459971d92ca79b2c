"""The Study record every study module fills in, and the grid helper (default vs paper grid)."""
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Study:
    """One experiment of the paper as a command (docs/study.md)."""
    name: str
    section: str                  # e.g. '§2.1, Fig. 2a-b'
    paper: str                    # what the paper reports, one or two sentences
    measure: Callable             # (ctx, opts, log) -> list of row dicts
    summary: Callable             # rows -> one sentence on what was measured
    plot: Callable                # (rows, plt) -> matplotlib figure
    table: tuple                  # columns of the text table
    needs_training: bool = True   # False: weights and SVDs only, no local stage


def grid(opts, default, paper):
    """The paper's grid with --paper-grid, else the (smaller) default grid."""
    return paper if getattr(opts, "paper_grid", False) else default


def spearman(x, y):
    """Spearman rank correlation (Pearson of average ranks); nan with fewer than 3 points."""
    import numpy as np
    from scipy.stats import spearmanr
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y)[0])
