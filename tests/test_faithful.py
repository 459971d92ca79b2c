"""Issue 7: faithful to the authors at every run length, and to the paper where asked.

Oracles are the authors' formulas written out here (docs/authors-code.md §1.1, §5.3), closed
forms, and finite differences; not values fips_ref computed.
"""
import numpy as np
import pytest

from fips_ref.local_stage import FiPSConfig, resolve_schedule
from fips_ref.sparsity import cubic_sparsity


# ----------------------------------------------------------------------------- schedule lengths
def _authors_gmp_end(total_steps, initial=0.05, accel=0.5, final=0.75):
    """Sparsity the authors' AcceleratedCubicScheduler leaves after a run (docs/authors-code.md §5.3):
    t_end = int(0.75·steps), t_accel 240, Δt 50, value at the last update k ≤ t_end."""
    t_end, t_accel, delta_t = int(0.75 * total_steps), 240, 50
    value = initial
    for k in range(1, t_end + 1):
        if k % delta_t == 0:
            value = initial if k < t_accel else final + (accel - final) * (1 - (k - t_accel) / t_end) ** 3
    return value


def test_authors_gmp_end_matches_the_issue():
    assert round(_authors_gmp_end(600), 4) == 0.7121
    assert round(_authors_gmp_end(1200), 4) == 0.7453


@pytest.mark.parametrize("steps", [600, 601, 900, 1200, 3000])
def test_long_runs_keep_the_authors_absolute_lengths(steps):
    s = resolve_schedule(FiPSConfig(), steps)
    assert (s.t_accel, s.delta_t, s.t_end) == (240, 50, int(0.75 * steps))
    last = max(k for k in range(1, s.t_end + 1) if k % s.delta_t == 0)
    got = cubic_sparsity(last, t_end=s.t_end, delta_t=s.delta_t, t_accel=s.t_accel,
                         initial=s.gmp_initial, accelerated=0.5, final=0.75)
    assert got == pytest.approx(_authors_gmp_end(steps), abs=1e-12)


def test_1200_steps_end_at_the_authors_sparsity_not_the_scaled_one():
    s = resolve_schedule(FiPSConfig(), 1200)
    got = cubic_sparsity(900, t_end=s.t_end, delta_t=s.delta_t, t_accel=s.t_accel,
                         initial=0.05, accelerated=0.5, final=0.75)
    assert round(got, 4) == 0.7453                       # scaling t_accel to 480 would give 0.7121


def test_short_runs_still_scale():
    s = resolve_schedule(FiPSConfig(), 599)
    assert (s.t_accel, s.delta_t) == (599 * 240 // 600, 599 * 50 // 600)
    p = resolve_schedule(FiPSConfig(variant="paper"), 1200)
    assert (p.t_accel, p.delta_t, p.t_end) == (300, 50, 900)     # paper: the 25% mark
    e = resolve_schedule(FiPSConfig(t_accel=7, delta_t=3), 1200)
    assert (e.t_accel, e.delta_t) == (7, 3)
