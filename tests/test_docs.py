"""The documentation holds together: every relative link of README.md and docs/*.md reaches a file
and, with an #anchor, a heading of that file; the README stays a front door; and bench/results.py
replaces one section of docs/results.md and nothing else."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+\1")


def prose_lines(text: str, blank_code_spans: bool = True):
    """(line number, line) outside fenced code blocks, inline code spans blanked out unless told."""
    inside = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            yield number, INLINE_CODE.sub(lambda m: " " * len(m.group(0)), line) if blank_code_spans else line


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: the rendered text lowercased, every character but letters, digits,
    spaces, '-' and '_' removed, spaces turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set:
    """Every heading's anchor; a repeated heading gets GitHub's -1, -2, ... suffixes."""
    seen, found = {}, set()
    for _, line in prose_lines(text, blank_code_spans=False):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        anchor = github_anchor(match.group(1))
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        found.add(anchor if count == 0 else f"{anchor}-{count}")
    return found


def broken_links(files) -> list:
    """``file:line: target (reason)`` for every relative link that reaches no file or no heading."""
    broken = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        for number, line in prose_lines(text):
            for target in LINK.findall(line):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                    continue
                file_part, _, anchor = target.partition("#")
                linked = (path.parent / file_part).resolve() if file_part else path
                where = f"{path.relative_to(REPO)}:{number}: {target}"
                if not linked.exists():
                    broken.append(f"{where} (no file {linked})")
                elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text(encoding="utf-8")):
                    broken.append(f"{where} (no heading with anchor #{anchor} in {linked.name})")
    return broken


def test_every_relative_link_reaches_a_file_and_a_heading():
    assert len(DOCS) > 5
    assert broken_links(DOCS) == []


def test_the_link_check_finds_a_missing_file_and_a_missing_anchor(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## Images: modes and sizes (`test_image_modes.py`)\n")
    page.write_text("# Page\n\n"
                    "[ok](other.md#images-modes-and-sizes-test_image_modespy) [ok](#page)\n"
                    "[gone](missing.md) [no heading](other.md#images) [web](https://example.org/x.md)\n"
                    "`[in code](nowhere.md)`\n\n```\n[in a block](nowhere.md)\n```\n")
    assert broken_links([page]) == [
        "page.md:4: missing.md (no file " + str(tmp_path / "missing.md") + ")",
        "page.md:4: other.md#images (no heading with anchor #images in other.md)",
    ]


@pytest.mark.parametrize("heading,anchor", [
    ("Images: modes and sizes (`test_image_modes.py`)", "images-modes-and-sizes-test_image_modespy"),
    ("bench/features.py --reads", "benchfeaturespy---reads"),
    ("Pipeline, experiments and the test suite", "pipeline-experiments-and-the-test-suite"),
    ("Published `.pkl` label files", "published-pkl-label-files"),
    ("Checkpoint files (`model.pretrained: /path/to/file`)", "checkpoint-files-modelpretrained-pathtofile"),
])
def test_anchors_follow_githubs_rule(heading, anchor):
    assert github_anchor(heading) == anchor


def test_repeated_headings_get_numbered_anchors():
    assert anchors("# A\n## Notes\n## Notes\n```\n# not a heading\n```\n") == {"a", "notes", "notes-1"}


def test_the_readme_is_a_front_door():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    for command in ("make setup run", "make test", "dvc exp run -S loss=bsm", "dvc metrics diff", "dvc exp show",
                    "dvc plots show"):
        assert command in readme
    linked = set(re.findall(r"\]\(docs/([\w.-]+\.md)", readme))
    pages = {path.name for path in (REPO / "docs").glob("*.md")}
    assert pages - linked == set(), "every docs page is linked from the README"


def load_results_writer():
    spec = importlib.util.spec_from_file_location("bench_results", REPO / "bench" / "results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RESULTS_FILE = """# Measured figures

Intro, with a trailing space\t
and Windows line end\r
## bench/datasets.py

<!-- BEGIN bench/datasets.py -->
Measured long ago.

| what | result |
|---|---|
| old | 1 s |
<!-- END bench/datasets.py -->

## bench/features.py --reads

<!-- BEGIN bench/features.py --reads -->
| reads | 2 ms |
<!-- END bench/features.py --reads -->

## bench/features.py

<!-- BEGIN bench/features.py -->
| extraction | 3 img/s |
<!-- END bench/features.py -->
tail text
"""


def test_recording_replaces_only_its_own_section(tmp_path):
    results = load_results_writer()
    path = tmp_path / "results.md"
    path.write_bytes(RESULTS_FILE.encode())
    results.record("bench/features.py", "python bench/features.py", [("extraction | naive", "354 vs 185 img/s")],
                   path=path)
    text = path.read_bytes().decode()
    begin, end = "<!-- BEGIN bench/features.py -->", "<!-- END bench/features.py -->"
    before, rest = RESULTS_FILE.split(begin)
    after = rest.split(end, 1)[1]
    assert text.startswith(before) and text.endswith(end + after)  # every other byte as it was
    block = text[len(before):len(text) - len(after)]
    assert block.startswith(begin + "\nMeasured ") and "with `python bench/features.py`; " in block
    assert " cores (" in block and ("no GPU" in block or "GPU: " in block)
    assert block.endswith("| what | result |\n|---|---|\n| extraction \\| naive | 354 vs 185 img/s |\n" + end)
    assert "| reads | 2 ms |" in text and "3 img/s" not in text  # the --reads section is another section


def test_recording_adds_a_missing_section_at_the_end(tmp_path):
    results = load_results_writer()
    path = tmp_path / "results.md"
    path.write_bytes(RESULTS_FILE.encode())
    results.record("bench/heads.py --part 2", "python bench/heads.py --part 2", [("cached", "0.11 s")], path=path)
    text = path.read_bytes().decode()
    assert text.startswith(RESULTS_FILE)
    added = text[len(RESULTS_FILE):]
    assert added.startswith("\n## bench/heads.py --part 2\n\n<!-- BEGIN bench/heads.py --part 2 -->\nMeasured ")
    assert added.endswith("| cached | 0.11 s |\n<!-- END bench/heads.py --part 2 -->\n")
    # Recording again replaces the section it added.
    results.record("bench/heads.py --part 2", "python bench/heads.py --part 2", [("cached", "0.12 s")], path=path)
    again = path.read_bytes().decode()
    assert again.startswith(RESULTS_FILE) and "0.11 s" not in again and again.count("bench/heads.py --part 2 -->") == 2


def test_a_section_without_its_end_marker_is_refused(tmp_path):
    results = load_results_writer()
    path = tmp_path / "results.md"
    path.write_text("<!-- BEGIN bench/cprfl.py -->\n| old |\n")
    with pytest.raises(ValueError, match="no matching <!-- END bench/cprfl.py -->"):
        results.record("bench/cprfl.py", "python bench/cprfl.py", [("x", "y")], path=path)
    assert path.read_text() == "<!-- BEGIN bench/cprfl.py -->\n| old |\n"


def test_every_bench_section_of_results_md_has_its_end_marker():
    text = (REPO / "docs" / "results.md").read_text(encoding="utf-8")
    begins = re.findall(r"<!-- BEGIN (bench/[^>]+?) -->", text)
    assert {"bench/datasets.py", "bench/features.py", "bench/fingerprint.py", "bench/cprfl.py", "bench/finetune.py",
            "bench/reliability.py"} <= set(begins)
    for key in begins:
        assert text.count(f"<!-- END {key} -->") == 1 and text.count(f"<!-- BEGIN {key} -->") == 1
        assert text.index(f"<!-- BEGIN {key} -->") < text.index(f"<!-- END {key} -->")


def test_no_bench_script_shadows_a_standard_module():
    """`python bench/<name>.py` puts bench/ first on sys.path: a bench/queue.py made torch's own
    `import queue` load it, and every bench script run that way failed at `import torch`."""
    shadowing = sorted(path.name for path in (REPO / "bench").glob("*.py") if path.stem in sys.stdlib_module_names)
    assert shadowing == []
