"""python -m fips_ref.plot REPORT.json [--out FILE.png] — the figures of one compress run.

Four panels from the JSON report of ``python -m fips_ref.compress --report`` (docs/report.md):
the loss and learning rate per step, the sparsity of V per step with the mask-update steps
marked (paper §3 "Sparsity": every Δt steps up to t_end), the relative output error of every
block at initialisation and after the local stage, and the final density of every layer's V.
Needs matplotlib (the optional extra 'plots': pip install -e ".[plots]").
"""
import json
import os
import sys

from .checkpoint import InputError, error_line

REQUIRED = ("history", "blocks", "layer_density", "schedule")


def load_report(path):
    """The report dict; InputError naming the file when it is missing, not JSON or lacks a field."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such report")
    try:
        with open(path) as f:
            report = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a JSON report ({e})") from None
    if not isinstance(report, dict):
        raise InputError(f"{path}: not a JSON report (expected an object)")
    missing = [k for k in REQUIRED if k not in report]
    if missing:
        raise InputError(f"{path}: not a fips_ref.compress report (no '{missing[0]}')")
    hist = report["history"]
    if not all(isinstance(hist.get(k), list) for k in ("loss", "lr", "sparsity")):
        raise InputError(f"{path}: 'history' needs lists 'loss', 'lr' and 'sparsity'")
    return report


def schedule_steps(report):
    """The mask-update grid of the schedule: multiples of Δt up to t_end (docs/authors-code.md §5)."""
    sched = report["schedule"]
    dt, t_end = sched.get("delta_t") or 0, sched.get("t_end") or 0
    if report.get("config", {}).get("sparsifier") in (None, "dense", "static") or dt < 1:
        return []
    return list(range(dt, t_end + 1, dt))


def figure(report, plt):
    """The four-panel figure of a report."""
    hist = report["history"]
    steps = list(range(1, len(hist["loss"]) + 1))
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    (a, b), (c, d) = axes
    a.plot(steps, hist["loss"], color="C0")
    a.set(xlabel="step", ylabel="loss (Σ over blocks)", yscale="log", title="loss and learning rate")
    a2 = a.twinx()
    a2.plot(steps, hist["lr"], color="C1", ls="--")
    a2.set_ylabel("learning rate", color="C1")
    b.plot(steps, hist["sparsity"], color="C2", label="sparsity of V")
    marks = schedule_steps(report)
    for k, t in enumerate(marks):
        b.axvline(t, color="gray", lw=0.6, ls=":", label="mask update" if k == 0 else None)
    b.set(xlabel="step", ylabel="sparsity of V", title="sparsity per step")
    b.legend(fontsize=8)
    blocks = report["blocks"]
    idx = [bl["index"] for bl in blocks]
    pos = range(len(idx))
    init = [bl.get("rel_error_init") or float("nan") for bl in blocks]
    final = [bl.get("rel_error_final") or float("nan") for bl in blocks]
    c.bar([p - 0.2 for p in pos], init, width=0.4, label="at init")
    c.bar([p + 0.2 for p in pos], final, width=0.4, label="after")
    c.set(xticks=list(pos), xticklabels=idx, xlabel="block", ylabel="relative MLP output error",
          yscale="log", title="error per block")
    c.legend(fontsize=8)
    dens = report["layer_density"]
    d.bar(range(len(dens)), list(dens.values()))
    d.set(xticks=list(range(len(dens))), xlabel="layer", ylabel="final density of V",
          title="density per layer")
    d.set_xticklabels([k.replace(".mlp.", " ").replace(".V", "") for k in dens], rotation=90, fontsize=7)
    return fig


def text_summary(report):
    """A few lines for the terminal (also what is printed without matplotlib)."""
    h = report["history"]
    lines = [f"{len(h['loss'])} steps; loss {h['loss'][0]:.4e} -> {h['loss'][-1]:.4e}" if h["loss"] else "0 steps",
             f"mask updates at steps {schedule_steps(report)}"]
    for bl in report["blocks"]:
        lines.append(f"block {bl['index']}: error {bl.get('rel_error_init')} at init, {bl.get('rel_error_final')} after")
    return "\n".join(lines)


def build_parser():
    from .compress import OneLineParser     # shared CLI plumbing (moves to fips_ref/cli.py)
    p = OneLineParser(prog="python -m fips_ref.plot", description=__doc__.splitlines()[0])
    p.add_argument("report", help="JSON report of python -m fips_ref.compress --report")
    p.add_argument("--out", help="PNG to write (default: beside the report, NAME.png)")
    return p


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return e.code
    out = args.out or os.path.splitext(args.report)[0] + ".png"
    try:
        report = load_report(args.report)
        if os.path.abspath(out) == os.path.abspath(args.report):
            raise InputError(f"--out {out}: would overwrite the report")
        if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
            raise InputError(f"--out {out}: no such folder")
        if os.path.isdir(out):
            raise InputError(f"--out {out}: is a folder, expected a file name")
        from .study.output import load_pyplot
        plt = load_pyplot()
        if plt is None:
            print(text_summary(report))
            raise InputError('matplotlib is not installed, so no PNG: pip install -e ".[plots]"')
        fig = figure(report, plt)
        fig.tight_layout()
        fig.savefig(out, dpi=90)
        plt.close(fig)
    except (InputError, OSError) as e:
        print(error_line(e, out), file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
