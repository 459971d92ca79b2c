"""A study's three files: NAME.csv (tidy rows), NAME.png (matplotlib, optional extra 'plots')
and NAME.md (the paper's finding next to the measured one, with the exact command)."""
import csv
import io
import os
import sys

_SAID = []      # the "no matplotlib" notice is printed once per process


def load_pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend, or None when it is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def say_no_matplotlib(stream=None):
    """Print once per process that PNGs need the 'plots' extra."""
    stream = stream or sys.stderr
    if not _SAID:
        print("matplotlib is not installed: writing CSV, Markdown and a text table only "
              "(pip install -e \".[plots]\" for PNGs)", file=stream)
        _SAID.append(True)


def columns(rows):
    """Every key of every row, in first-seen order."""
    cols = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols


def fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def write_csv(path, rows):
    """Tidy CSV: one row per measured point, every parameter a column (empty where absent)."""
    cols = columns(rows)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow([fmt(r.get(c)) for c in cols])


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def text_table(rows, cols=None, max_rows=40):
    """A fixed-width text table of ``cols`` (default: every column) for the terminal."""
    cols = cols or columns(rows)
    cells = [[fmt(r.get(c)) for c in cols] for r in rows[:max_rows]]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    out = io.StringIO()
    out.write("  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip() + "\n")
    for row in cells:
        out.write("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() + "\n")
    if len(rows) > max_rows:
        out.write(f"... {len(rows) - max_rows} more rows in the CSV\n")
    return out.getvalue()


def write_markdown(path, study, paper, measured, command, png=None):
    """NAME.md: what the paper reports, what was measured, the command that measured it."""
    lines = [f"# {study.name} ({study.section})", "",
             f"**Paper:** {paper}", "", f"**Measured:** {measured}", "",
             "Command:", "", f"    {command}", ""]
    if png:
        lines += [f"![{study.name}]({os.path.basename(png)})", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def save_figure(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
