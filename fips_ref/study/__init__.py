"""The paper's own study (§2 and §5) as commands: ``python -m fips_ref.study NAME`` (docs/study.md).

Each study measures one claim of the paper on any checkpoint fips_ref reads and writes
NAME.csv (tidy rows), NAME.png (with matplotlib) and NAME.md (the paper's finding next to the
measured one).
"""
from .training import (ABLATIONS_STUDY, CALIBRATION, DENSITY, GROUP_SIZE, GROWTH_STUDY,
                       SPARSIFIERS_STUDY, SPARSITY)
from .weights import CONCAT, PAIRS, SPARSE_FACTOR

STUDIES = {s.name: s for s in (SPARSE_FACTOR, CONCAT, PAIRS, GROUP_SIZE, SPARSIFIERS_STUDY, SPARSITY,
                               ABLATIONS_STUDY, GROWTH_STUDY, DENSITY, CALIBRATION)}
