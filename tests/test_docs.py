"""The repository documents itself: no file points at documents that are not in it, and every
relative link of every markdown file leads to a path that exists (docs/README.md is the index)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Built from pieces so that this file does not match its own search.
MISSING_DOCUMENTS = ("DESIGN" + ".md", "ALGORITHMS" + ".md", "conf/" + "README.md")
CITATION = re.compile("|".join(re.escape(name) for name in MISSING_DOCUMENTS))
#: conf/ and the top-level README.md are checked as their own case (another change owns them)
CONF_AND_README = "conf_and_readme"

FENCED_BLOCK = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = ("http://", "https://", "mailto:")


def repo_files() -> list[Path]:
    """Tracked files plus untracked ones git does not ignore (new files count before their commit);
    files deleted from the work tree are left out."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the file list comes from git ls-files")
    names = sorted({name for name in out.decode().split("\0") if name})
    return [ROOT / name for name in names if (ROOT / name).is_file()]


def text_of(path: Path) -> str | None:
    """The file's text, or None for a binary file (a NUL byte or not UTF-8)."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def in_conf_or_readme(path: Path) -> bool:
    rel = path.relative_to(ROOT).as_posix()
    return rel.startswith("conf/") or rel == "README.md"


@pytest.mark.parametrize("part", ["code_and_docs", CONF_AND_README])
def test_no_file_cites_documents_missing_from_the_repository(part: str) -> None:
    """The developer notes once cited here are not shipped; docs/method.md, docs/algorithms.md,
    docs/mini_world.md and docs/configuration.md replace them. ``conf_and_readme`` covers conf/ and
    the top-level README.md, ``code_and_docs`` every other file."""
    hits = []
    for path in repo_files():
        if in_conf_or_readme(path) != (part == CONF_AND_README):
            continue
        text = text_of(path)
        if text is None:
            continue
        hits += [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
                 for number, line in enumerate(text.splitlines(), 1) if CITATION.search(line)]
    assert not hits, ("these lines cite documents that are not in the repository; point them at the "
                      "docs/ page that covers the topic (docs/README.md lists them):\n" + "\n".join(hits))


def relative_links(markdown: str) -> list[str]:
    """Targets of ``[text](target)`` links outside code, without external links and pure anchors."""
    prose = INLINE_CODE.sub("", FENCED_BLOCK.sub("", markdown))
    return [t for t in LINK.findall(prose) if not t.startswith(EXTERNAL) and not t.startswith("#")]


def test_relative_links_parse_as_expected() -> None:
    text = ('[a](docs/x.md#part) ![img](pic.png "title") [web](https://example.org) [top](#here)\n'
            "`[not](code.md)`\n```\n[nor](block.md)\n```\n")
    assert relative_links(text) == ["docs/x.md#part", "pic.png"]


def test_every_relative_markdown_link_resolves() -> None:
    """A link resolves from its file's folder (from the repository root when it starts with ``/``);
    the anchor and query are dropped. Folders count, as they render on code hosts."""
    broken = []
    for path in repo_files():
        if path.suffix.lower() != ".md":
            continue
        text = text_of(path)
        if text is None:
            continue
        for target in relative_links(text):
            plain = unquote(target.split("#", 1)[0].split("?", 1)[0])
            if not plain:
                continue
            resolved = ROOT / plain.lstrip("/") if plain.startswith("/") else path.parent / plain
            if not resolved.exists():
                broken.append(f"{path.relative_to(ROOT)}: ({target})")
    assert not broken, "broken relative links:\n" + "\n".join(broken)
