"""Every relative link in the docs, and every repository path named in docs and code, resolves; nothing
points at files outside the repository or at an issue tracker users cannot see."""
import re

from tests.util import ROOT

DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE = [p for d in ("normsurgeon", "tests", "benchmarks", "examples", "scripts") for p in (ROOT / d).rglob("*")
        if p.suffix in (".py", ".sh") and "__pycache__" not in p.parts]
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")
PATH = re.compile(r"(?<![\w./-])((?:normsurgeon|tests|benchmarks|examples|scripts|docs)/[\w./-]*\w\.(?:py|md|sh|png))")
FORBIDDEN = re.compile(r"METHODS(-NOTES)?\.md|PITFALLS\.md|ONNX-NOTES\.md|DESIGN\.md|\.\./shared|\(issue \d+\)|issue #\d+")


def test_relative_links_resolve():
    bad = []
    for doc in DOCS:
        for target, _ in LINK.findall(doc.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (doc.parent / target).exists():
                bad.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not bad, bad


def test_repository_paths_named_in_docs_and_code_exist():
    bad = []
    for f in DOCS + CODE:
        if f.name == "test_docs_links.py":
            continue
        for path in PATH.findall(f.read_text(errors="replace")):
            if not (ROOT / path).exists() and "*" not in path and "NAME" not in path:
                bad.append(f"{f.relative_to(ROOT)} -> {path}")
    assert not bad, bad


def test_no_pointers_outside_the_repository():
    bad = [f"{f.relative_to(ROOT)}: {m.group(0)}" for f in DOCS + CODE if f.name != "test_docs_links.py"
           for m in FORBIDDEN.finditer(f.read_text(errors="replace"))]
    assert not bad, bad


def test_the_link_checker_can_fail(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("see [a](missing.md) and normsurgeon/nothere.py")
    assert LINK.findall(doc.read_text())[0][0] == "missing.md" and not (tmp_path / "missing.md").exists()
    assert PATH.findall(doc.read_text()) == ["normsurgeon/nothere.py"]
