"""The README and docs/ stay true to the tree: short README, the CI test command verbatim, no headings named
by issue number, and every module, file and link they name exists. Text only: no model, no torch import."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
ARCHITECTURE = DOCS / "architecture.md"

README_MAX_LINES = 250
TEST_COMMAND = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q'
SUBPACKAGES = ("cli", "model", "compress", "methods", "studies", "evaluation", "hf")

# romcomp/x/y.py, calib/x.py, tools/x.py, tests/x.py, or a path relative to romcomp/ (compress/fit.py);
# not when it continues a longer path (~/.cache/romcomp/..., <out>/.romcomp/...)
_SUB = "|".join(SUBPACKAGES)
_PATH = re.compile(
    rf"(?<![\w./~-])((?:romcomp|calib|tools|tests)/[\w/]*\w\.py|(?:{_SUB})/[\w/]*\w\.py|(?:romcomp|calib)/[\w/]+/)"
)
_DOTTED = re.compile(r"(?<![\w./~-])romcomp(?:\.\w+)+")
_BARE_PY = re.compile(r"(?<![\w./~-])(\w+\.py)\b")
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^(```|~~~)")


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("**/*.md"))]


def prose_lines(text: str) -> list[str]:
    """Lines outside fenced code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def code_blocks(text: str, lang: str) -> list[list[str]]:
    """The lines of every fenced block opened with ```lang."""
    blocks, current = [], None
    for line in text.splitlines():
        stripped = line.strip()
        if current is None and stripped == f"```{lang}":
            current = []
        elif current is not None and stripped == "```":
            blocks.append(current)
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def headings(text: str) -> list[str]:
    return [line for line in prose_lines(text) if re.match(r"#{1,6}\s", line)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"^#{1,6}\s+", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for h in headings(text):
        base = slug(h)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def resolve_path(name: str) -> Path:
    """A path as written, or relative to romcomp/ when it starts with a subpackage name."""
    if name.split("/")[0] in SUBPACKAGES:
        return REPO / "romcomp" / name
    return REPO / name


def defines(module: Path, name: str) -> bool:
    """Whether ``module`` binds ``name`` at top level (def, class, assignment, import) or exports it in
    ``__all__``."""
    tree = ast.parse(module.read_text())
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        targets: list[ast.AST] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            if any((a.asname or a.name.split(".")[0]) == name for a in node.names):
                return True
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return True
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets) and isinstance(
            node.value, (ast.List, ast.Tuple)
        ):  # exported lazily (a module ``__getattr__``): ``romcomp.compress``
            if any(isinstance(e, ast.Constant) and e.value == name for e in node.value.elts):
                return True
    return False


def resolves(dotted: str) -> bool:
    """``romcomp.a.b`` is a package or module of the tree, or a name defined at the top of one (the parts
    after that name, attributes of it, are not checked)."""
    parts = dotted.split(".")
    here = REPO / parts[0]
    for part in parts[1:]:
        if here.is_dir():
            if (here / f"{part}.py").is_file():
                here = here / f"{part}.py"
            elif (here / part / "__init__.py").is_file():
                here = here / part
            else:
                init = here / "__init__.py"
                return init.is_file() and defines(init, part)
        else:
            return defines(here, part)
    return here.exists()


def missing_names(text: str, bare: bool = False) -> list[str]:
    """Every path and dotted module named in ``text`` (prose and code) that the tree does not have."""
    missing = [m for m in _PATH.findall(text) if not resolve_path(m).exists()]
    missing += [m for m in _DOTTED.findall(text) if not resolves(m)]
    if bare:
        known = {p.name for root in ("romcomp", "calib") for p in (REPO / root).rglob("*.py")}
        missing += [m for m in _BARE_PY.findall(text) if m not in known]
    return sorted(set(missing))


def broken_links(path: Path) -> list[str]:
    """Relative links (and their #anchors) in ``path`` that lead nowhere."""
    text = path.read_text()
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            broken.append(target)
    return broken


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; keep it to {README_MAX_LINES} (details: docs/)"


def test_readme_has_the_ci_test_command_verbatim():
    blocks = code_blocks(README.read_text(), "bash")
    assert any(TEST_COMMAND in (line.strip() for line in block) for block in blocks), (
        f"README.md needs this exact line in a ```bash block (CI runs it): {TEST_COMMAND}"
    )


def test_readme_headings_are_not_issue_numbers():
    bad = [h for h in headings(README.read_text()) if re.search(r"issue\s*\d+", h, re.I)]
    assert not bad, f"README headings named by issue number: {bad}"


def test_architecture_names_exist():
    missing = missing_names(ARCHITECTURE.read_text(), bare=True)
    assert not missing, f"docs/architecture.md names what the tree does not have: {missing}"


@pytest.mark.parametrize("path", [p for p in markdown_files() if p != ARCHITECTURE], ids=lambda p: p.name)
def test_doc_paths_exist(path: Path):
    missing = missing_names(path.read_text())
    assert not missing, f"{path.relative_to(REPO)} names what the tree does not have: {missing}"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.name)
def test_doc_links_resolve(path: Path):
    broken = broken_links(path)
    assert not broken, f"{path.relative_to(REPO)} has links that lead nowhere: {broken}"
