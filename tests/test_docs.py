"""Tests that every citation in the repository resolves inside it (issue 12).

The repository must explain itself: a comment, docstring, `--help` text, test or doc page may cite
the paper (section, equation, figure, table) or a file of this repository, never a document a
reader does not have. The scanned files are everything under fips_ref/, tests/, docs/, bench/,
weights/ plus README.md. The checks are:

(a) every path-like document name (`docs/x.md`, `x.md`) names a file that exists, resolved from
    the citing file's folder or from the repository root, and no text names the private
    specification the project was built from;
(b) every `x.md §N` / `x.md §N.M` cites a numbered section that x.md has (a heading or an
    `<a id="sN-M">` anchor);
(c) every markdown link `[..](path#anchor)` in a .md file reaches an existing file and anchor
    (an explicit `id` or GitHub's slug of a heading);
(d) every bug or difference label (B1, D3, ...) is defined, in docs/authors-code.md §8 (`b1`)
    or docs/differences.md (`d1`);
(e) every `module.function` and test name the docs mention exists, and the guided tour
    docs/README.md names every module of the package;
(f) the tables of docs/authors-code.md (ranks, storage, learning rates, GMP and RigL schedules,
    numbers of the authors' code) are what fips_ref's functions compute, so a typo there fails.

Each checker is a function from (text, path) to a list of problems, so the tests at the end can
plant bad citations in small strings and see them caught.
"""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED_DIRS = ("fips_ref", "tests", "docs", "bench", "weights")
SCANNED_FILES = ("README.md",)
TEXT_SUFFIXES = (".py", ".md", ".txt")

URL = re.compile(r"[a-z][a-z0-9+.-]*://\S+")
# A document name: an optional relative folder path, then name.md.
DOC_NAME = re.compile(r"(?<![\w/.-])((?:\.{1,2}/|[\w.-]+/)*[\w.-]+\.md)(?![\w/-])")
# Names of the specification the project was written from, which readers don't have (spelled in
# pieces, so that this file does not name it either).
SPEC = "fips" + "-spec"
OUTSIDE = re.compile(SPEC + r"|\.\./shared\b|/work/shared\b|\bthe spec\b|\bspec(?:'s)?\s+(?:§|table)")
SECTION_NUM = r"§\s?\d+(?:\.\d+)*"
SECTION_CITE = re.compile(r"([\w./-]+\.md)\s*(" + SECTION_NUM
                          + r"(?:\s*(?:,|and|–|-)\s*(?:§\s?)?\d+(?:\.\d+)*)*)")
MD_LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
EXPLICIT_ID = re.compile(r"""\bid=["']([^"']+)["']""")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.M)
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
LABEL = re.compile(r"(?<![\w/.-])([BD])(\d{1,2})(?![\w])")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
FILE_SUFFIXES = {"py", "md", "npz", "npy", "json", "txt", "yaml", "safetensors", "pth"}


# ----------------------------------------------------------------------------- the repository
def scanned_files(root=ROOT):
    """Every text file whose citations must resolve (not this one: its planted examples are bad on purpose)."""
    files = [root / f for f in SCANNED_FILES if (root / f).exists()]
    for d in SCANNED_DIRS:
        files += sorted(p for p in (root / d).rglob("*")
                        if p.suffix in TEXT_SUFFIXES and p.is_file() and "__pycache__" not in p.parts)
    return [p for p in files if p.resolve() != Path(__file__).resolve()]


def rel(path, root=ROOT):
    return str(Path(path).relative_to(root)) if Path(path).is_absolute() else str(path)


def without_urls(text):
    """The text with every URL blanked (same length, so offsets and lines stay)."""
    return URL.sub(lambda m: " " * len(m.group(0)), text)


def line_of(text, pos):
    return text.count("\n", 0, pos) + 1


def resolve_doc(name, path, root=ROOT):
    """The file a cited document name refers to: from the citing file's folder, else the root."""
    for base in ((root / path).parent, root):
        target = (base / name).resolve()
        if target.is_file() and root in target.parents:
            return target
    return None


def github_slug(heading):
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces → '-'."""
    text = re.sub(r"<[^>]+>", "", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text).replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(md_text):
    """Every anchor a link may target in a markdown text: explicit ids and heading slugs."""
    found = set(EXPLICIT_ID.findall(md_text))
    counts = {}
    for _, title in HEADING.findall(FENCE.sub("", md_text)):
        slug = github_slug(title)
        n = counts.get(slug, 0)
        found.add(slug if n == 0 else f"{slug}-{n}")
        counts[slug] = n + 1
    return found


def numbered_sections(md_text):
    """Section numbers of a page: from headings "## 5.3 ..." and anchors id="s5-3"."""
    nums = {m.group(1) for m in re.finditer(r"^#{1,6}\s+§?(\d+(?:\.\d+)*)\b", md_text, re.M)}
    nums |= {a[1:].replace("-", ".") for a in EXPLICIT_ID.findall(md_text) if re.fullmatch(r"s\d+(-\d+)*", a)}
    return nums


# ----------------------------------------------------------------------------- checkers
def is_code_string(text, m):
    """A name that is a whole string literal ("readme.md") is a file the code uses, not a citation."""
    before, after = text[m.start() - 1:m.start()], text[m.end():m.end() + 1]
    return before in ("'", '"') and after == before


def is_placeholder(name):
    """A name in capitals (NAME.md, DIR/NAME.md) stands for a file the user's run writes."""
    return all(part.isupper() for part in name[:-3].split("/"))


def check_documents(text, path, root=ROOT):
    """(a) Document names resolve to files of the repository; nothing names the private spec."""
    problems = []
    text = without_urls(text)
    for m in OUTSIDE.finditer(text):
        problems.append(f"{rel(path)}:{line_of(text, m.start())}: names a document outside the "
                        f"repository ({m.group(0)!r}); cite docs/authors-code.md §N or the paper")
    for m in DOC_NAME.finditer(text):
        if str(path).endswith(".py") and is_code_string(text, m):
            continue
        if is_placeholder(m.group(1)):
            continue
        if resolve_doc(m.group(1), path, root) is None:
            problems.append(f"{rel(path)}:{line_of(text, m.start())}: cites {m.group(1)}, "
                            "which is not in the repository")
    return problems


def check_sections(text, path, root=ROOT):
    """(b) Every "x.md §N" cites a numbered section x.md has."""
    problems = []
    for m in SECTION_CITE.finditer(without_urls(text)):
        target = resolve_doc(m.group(1), path, root)
        if target is None:
            continue                                 # reported by check_documents
        have = numbered_sections(target.read_text(encoding="utf-8"))
        for num in re.findall(r"\d+(?:\.\d+)*", m.group(2)):
            if num not in have:
                problems.append(f"{rel(path)}:{line_of(text, m.start())}: cites {m.group(1)} §{num}, "
                                f"which has no section {num}")
    return problems


def check_links(text, path, root=ROOT):
    """(c) Every markdown link between repository files reaches its file and anchor."""
    problems = []
    for m in MD_LINK.finditer(FENCE.sub("", text)):
        href = m.group(1)
        if re.match(r"[a-z][a-z0-9+.-]*:", href):
            continue                                 # http:, https:, mailto:
        file_part, _, anchor = href.partition("#")
        target = (root / path) if not file_part else ((root / path).parent / file_part).resolve()
        where = f"{rel(path)}: link ({href})"
        if not target.exists() or root not in target.parents:
            problems.append(f"{where}: {file_part} is not in the repository")
        elif anchor and (target.suffix != ".md" or anchor not in anchors(target.read_text(encoding="utf-8"))):
            problems.append(f"{where}: {rel(target)} has no anchor #{anchor}")
    return problems


def defined_labels(root=ROOT):
    """Bug labels anchored in docs/authors-code.md (b1 …), difference labels in docs/differences.md (d1 …)."""
    labels = set()
    for page, letter in (("docs/authors-code.md", "b"), ("docs/differences.md", "d")):
        p = root / page
        if p.exists():
            labels |= {a.upper() for a in EXPLICIT_ID.findall(p.read_text(encoding="utf-8"))
                       if re.fullmatch(letter + r"\d+", a)}
    return labels


def check_labels(text, path, labels):
    """(d) Every B<n> / D<n> label is one the docs define."""
    return [f"{rel(path)}:{line_of(text, m.start())}: label {m.group(0)} is defined neither in "
            "docs/authors-code.md §8 nor in docs/differences.md"
            for m in LABEL.finditer(text) if m.group(0) not in labels]


def package_names(root=ROOT):
    """{module: top-level names, imports included} for every module of fips_ref (``models``: its __init__)."""
    names = {}
    for p in sorted((root / "fips_ref").rglob("*.py")):
        mod = p.parent.name if p.name == "__init__.py" else p.stem
        if mod == "fips_ref":
            continue
        tree = ast.parse(p.read_text(encoding="utf-8"))
        top = set()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                top.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                top |= {t.id for t in targets if isinstance(t, ast.Name)}
            elif isinstance(node, (ast.Import, ast.ImportFrom)):      # re-exports count
                top |= {(a.asname or a.name).split(".")[0] for a in node.names}
        names.setdefault(mod, set()).update(top)
    return names


def collect_test_names(root=ROOT):
    """Every test function and test file of tests/."""
    funcs, files = set(), set()
    for p in (root / "tests").glob("test_*.py"):
        files.add(p.name)
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                funcs.add(node.name)
    return funcs, files


def check_code_names(text, path, modules, tests):
    """(e) `module.function` spans name real functions of fips_ref; test names name real tests."""
    funcs, files = tests
    problems = []
    for m in CODE_SPAN.finditer(text):
        span = m.group(1).strip()
        where = f"{rel(path)}:{line_of(text, m.start())}"
        name = re.fullmatch(r"(?:fips_ref\.)?(?:models\.(?=\w+\.))?([A-Za-z_]\w*)\.([A-Za-z_]\w*)(?:\(.*\))?",
                            span)
        if name and name.group(1) in modules and name.group(2) not in FILE_SUFFIXES:
            if name.group(2) not in modules[name.group(1)]:
                problems.append(f"{where}: `{span}`: fips_ref.{name.group(1)} has no {name.group(2)}")
        for t in re.findall(r"\b(test_\w+)\b(?!\.py)", span):
            if t not in funcs:
                problems.append(f"{where}: `{span}`: no test named {t} in tests/")
        for f in re.findall(r"\b(test_\w+\.py)\b", span):
            if f not in files:
                problems.append(f"{where}: `{span}`: no tests/{f}")
    return problems


# ----------------------------------------------------------------------------- the repository's files
def _problems(check, *args):
    out = []
    for p in scanned_files():
        out += check(p.read_text(encoding="utf-8"), p.relative_to(ROOT), *args)
    return out


def test_cited_documents_exist():
    problems = _problems(check_documents)
    assert not problems, "\n".join(problems)


def test_cited_sections_exist():
    problems = _problems(check_sections)
    assert not problems, "\n".join(problems)


def test_markdown_links_resolve():
    problems = [q for p in scanned_files() if p.suffix == ".md"
                for q in check_links(p.read_text(encoding="utf-8"), p.relative_to(ROOT))]
    assert not problems, "\n".join(problems)


def test_labels_are_defined():
    labels = defined_labels()
    assert {f"B{i}" for i in range(1, 13)} <= labels and {f"D{i}" for i in range(1, 7)} <= labels
    problems = _problems(check_labels, labels)
    assert not problems, "\n".join(problems)


def test_functions_and_tests_named_in_docs_exist():
    modules, tests = package_names(), collect_test_names()
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    problems = [q for p in pages for q in check_code_names(p.read_text(encoding="utf-8"),
                                                           p.relative_to(ROOT), modules, tests)]
    assert not problems, "\n".join(problems)


def test_tour_covers_every_module_and_page():
    """docs/README.md names every module of fips_ref and links every page of docs/."""
    tour = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    missing = [m for m in package_names() if not re.search(rf"\b{m}(\.\w|\.py\b|/)", tour)]
    assert not missing, f"docs/README.md: add the module(s) {missing} to the tour"
    linked = {Path(h.partition("#")[0]).name for h in MD_LINK.findall(tour)}
    unlinked = [p.name for p in (ROOT / "docs").glob("*.md") if p.name not in linked | {"README.md"}]
    assert not unlinked, f"docs/README.md: add the page(s) {unlinked} to its index"
    assert "docs/README.md" in (ROOT / "README.md").read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- the checkers themselves
@pytest.mark.parametrize("text, path, found", [
    ("see docs/nowhere.md for details", "fips_ref/x.py", "docs/nowhere.md"),
    (f"({SPEC} §4.3)", "fips_ref/x.py", SPEC),
    ("from " + ".." + "/shared" + "/docs/style.md", "docs/x.md", ".." + "/shared"),
    ("the spec's table", "weights/README.md", "the spec"),
    ("as in spec §5.3", "docs/x.md", "spec §"),
    ("format of checkpoint-format.md", "tests/test_x.py", "checkpoint-format.md"),  # not beside tests/
])
def test_check_documents_catches_planted_citations(text, path, found):
    problems = check_documents(text, path)
    assert problems and found in problems[0], problems


@pytest.mark.parametrize("text, path", [
    ("see docs/options.md and weights/README.md", "fips_ref/compress.py"),
    ("the format of checkpoint-format.md", "docs/models.md"),       # beside the citing page
    ("(tmp_path / 'readme.md').write_text('x')", "tests/test_x.py"),  # a file name in code
    ("https://github.com/cemuyuk/FiPS/blob/main/README_x.md", "docs/x.md"),
    ("docs/authors-code.md §4.1 and the paper §3", "fips_ref/x.py"),
])
def test_check_documents_accepts_real_citations(text, path):
    assert check_documents(text, path) == []


@pytest.mark.parametrize("text, bad", [
    ("docs/authors-code.md §9", "§9"),
    ("docs/authors-code.md §5.7", "§5.7"),
    ("docs/authors-code.md §4.4, §5.9)", "§5.9"),
    ("docs/authors-code.md §5.2–5.8", "§5.8"),
    ("docs/options.md §1", "§1"),                     # a page without numbered sections
])
def test_check_sections_catches_missing_sections(text, bad):
    problems = check_sections(text, "fips_ref/x.py")
    assert len(problems) == 1 and bad in problems[0], problems


def test_check_sections_accepts_every_form():
    text = ("docs/authors-code.md §5.2–5.5; docs/authors-code.md §1-§3; docs/authors-code.md §2 and §6;"
            " docs/authors-code.md §4.4, §5.1; docs/authors-code.md §8, B3")
    assert check_sections(text, "fips_ref/x.py") == []


@pytest.mark.parametrize("text, bad", [
    ("[x](nowhere.md)", "nowhere.md"),
    ("[x](authors-code.md#s9-9)", "#s9-9"),
    ("[x](options.md#no-such-heading)", "#no-such-heading"),
    ("[x](#nowhere)", "#nowhere"),
    ("[x](../../outside.md)", "outside.md"),
])
def test_check_links_catches_broken_links(text, bad):
    problems = check_links(text, "docs/x.md")
    assert len(problems) == 1 and bad in problems[0], problems


def test_check_links_accepts_ids_headings_urls_and_code():
    text = ("[a](authors-code.md#s5-3) [b](options.md#learning-rate-not-published-for-deit) "
            "[c](differences.md#d3) [d](../README.md) [e](https://arxiv.org/abs/2411.09816)\n"
            "```\n[not a link](nowhere.md)\n```\n")
    assert check_links(text, "docs/x.md") == []


def test_github_slug_and_duplicate_headings():
    assert github_slug("Calibration augmentation (`fips_ref.images.train_transform`)") == \
        "calibration-augmentation-fips_refimagestrain_transform"
    assert anchors("# A b\n## A b\n<a id='x1'></a>\n```\n# fenced\n```\n") == {"a-b", "a-b-1", "x1"}
    assert numbered_sections("## 2 Rank\n### 5.3 GMP\n<a id=\"s4-1\"></a>") == {"2", "5.3", "4.1"}


def test_check_labels_catches_undefined_labels():
    labels = defined_labels()
    assert [p.split("label ")[1][:3] for p in check_labels("B13: x; (D7); B3 ok", "f.py", labels)] \
        == ["B13", "D7 "]
    assert check_labels("ViT-B16 and x.D7 and AB12", "f.py", labels) == []


def test_check_code_names_catches_missing_names():
    modules, tests = package_names(), collect_test_names()
    text = ("`sparsity.no_such_function` `fips_ref.budget.sparse_rank` `mlp.py` "
            "`test_no_such_test` `test_budget.py` `tests/test_nothing.py` `sharing.svd_init(C, r)` "
            "`models.vit.forward` `models.forward` `models.swin.nothing`")
    problems = check_code_names(text, "docs/x.md", modules, tests)
    assert len(problems) == 4, problems
    assert "no_such_function" in problems[0] and "test_no_such_test" in problems[1]
    assert "test_nothing.py" in problems[2] and "swin has no nothing" in problems[3]



# ----------------------------------------------------------------------------- the numbers on docs/authors-code.md
AUTHORS_CODE = ROOT / "docs" / "authors-code.md"
DEIT_GROUPS = [(768, 4)] * 3                                   # (d, n) per group, §1.1
SWIN_GROUPS = [(192, 2), (384, 2)] + [(768, 6)] * 3 + [(1536, 2)]


def md_tables(md, anchor, first_header):
    """Tables (header, rows; cells stripped, bold removed) of section ``anchor`` whose header starts so."""
    start = md.index(f'id="{anchor}"')
    nxt = md.find('<a id="', start + 1)
    tables, current = [], []
    for line in md[start:nxt if nxt > 0 else len(md)].splitlines() + [""]:
        if line.strip().startswith("|"):
            cells = [c.strip().replace("*", "") for c in line.strip().strip("|").split("|")]
            if not set("".join(cells)) <= set("-: "):           # not the |---| line
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    found = [(t[0], t[1:]) for t in tables if t[0][0] == first_header]
    assert found, f"docs/authors-code.md #{anchor}: no table headed {first_header!r}"
    return found


def assert_printed(cell, value, where):
    """The page's number equals fips_ref's, rounded to the decimals printed (or to 4 digits)."""
    if "." in cell and "e" not in cell:
        assert round(value, len(cell.split(".")[1])) == pytest.approx(float(cell), abs=1e-12), \
            f"{where}: page {cell}, fips_ref {value}"
    else:
        assert value == pytest.approx(float(cell), rel=5e-4), f"{where}: page {cell}, fips_ref {value}"


def test_authors_code_rank_and_storage_tables_are_what_fips_ref_computes():
    """§2's ranks, grown rows and achieved budgets and §6's storage ratios (the authors' numbers)
    are what budget.sparse_rank and budget.storage_bits give, so a typo on the page fails."""
    from fips_ref.budget import original_bits, sparse_rank, storage_bits
    md = AUTHORS_CODE.read_text(encoding="utf-8")
    (_, deit), (swin_header, swin) = md_tables(md, "s2", "p")
    assert len(deit) == len(swin) == 5
    d, L = 768, 8 * 4 * 768
    for p, r, grows, grown, achieved in deit:
        rank = sparse_rank(4, d, float(p), 0.75)
        assert int(r) == rank and grows.startswith("yes" if rank > d else "no"), (p, r, rank)
        assert grown.split()[0] == (str(rank - d) if rank > d else "—"), (p, grown)
        assert_printed(achieved, (d * rank + int(0.25 * rank * L)) / (d * L), f"§2 DeiT-B p={p}")
    shapes = [tuple(int(x) for x in re.findall(r"\d+", h))[-2:] for h in swin_header[1:]]
    assert shapes == [(192, 2), (384, 2), (768, 6), (1536, 2)], swin_header
    for p, *ranks in swin:
        assert [int(x) for x in ranks] == [sparse_rank(n, d, float(p), 0.75) for d, n in shapes], (p, ranks)

    def storage_ratio(groups, p, s=0.75):
        bits = orig = 0
        for d, n in groups:
            r, L = sparse_rank(n, d, p, s), 8 * n * d
            bits, orig = bits + storage_bits(d, r, L, int((1 - s) * r * L)), orig + original_bits(d, L)
        return bits / orig

    [(_, storage)] = md_tables(md, "s6", "p")
    assert len(storage) == 5
    for p, deit_ratio, swin_ratio in storage:
        assert_printed(deit_ratio, storage_ratio(DEIT_GROUPS, float(p)), f"§6 DeiT-B p={p}")
        assert_printed(swin_ratio, storage_ratio(SWIN_GROUPS, float(p)), f"§6 Swin-L p={p}")


def test_authors_code_schedule_tables_are_what_fips_ref_computes():
    """§4.4's learning rates, §5.3's GMP sparsities and §5.5's RigL drop fractions are fips_ref's."""
    from fips_ref.adamw import cosine_lr
    from fips_ref.sparsity import cubic_sparsity, rigl_drop_fraction
    md = AUTHORS_CODE.read_text(encoding="utf-8")
    [(ks, [lrs])] = md_tables(md, "s4-4", "k")
    assert len(ks) == len(lrs) == 6
    for k, cell in zip(ks[1:], lrs[1:]):
        assert_printed(cell, cosine_lr(int(k), lr=1e-3, eta_min=1e-6, t_max=600), f"§4.4 lr_{k}")

    def gmp(k, t_accel, t_end, levels):
        initial, accel, final = (float(x) for x in levels.split("→"))
        return cubic_sparsity(k, t_end=t_end, delta_t=50, t_accel=t_accel, initial=initial,
                              accelerated=accel, final=final)

    [(_, ends)] = md_tables(md, "s5-3", "setting")
    assert len(ends) == 4
    levels = {}
    for setting, t_accel, t_end, lv, at_end in ends:
        levels[setting.split(",")[0].split(" (")[0]] = (int(t_accel), int(t_end), lv)
        assert_printed(at_end, gmp(int(t_end), int(t_accel), int(t_end), lv), f"§5.3 {setting}")
    [(ks, rows)] = md_tables(md, "s5-3", "k")
    assert [r[0] for r in rows] == ["swin_large yaml", "paper reading"]
    for name, *cells in rows:
        key = {"swin_large yaml": "swin_large yaml", "paper reading": "paper A.2.2 read literally"}[name]
        for k, cell in zip(ks[1:], cells):
            assert_printed(cell, gmp(int(k), *levels[key]), f"§5.3 {name} k={k}")

    [(ks, [rho])] = md_tables(md, "s5-5", "k")
    assert len(ks) == len(rho) == 10
    for k, cell in zip(ks[1:], rho[1:]):
        assert_printed(cell, rigl_drop_fraction(int(k), q=0.1, t_end=450, delta_t=50), f"§5.5 ρ_{k}")
