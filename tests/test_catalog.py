"""`python -m ltpipe list` and the methods reference it generates."""

import subprocess
import sys

import pytest

from ltpipe import catalog
from tests.conftest import REPO


def test_the_methods_reference_is_the_registries():
    # docs/methods.md's generated block is what the registries say now: a method added, renamed or
    # given an option without `python -m ltpipe list --markdown --write docs/methods.md` fails here.
    assert catalog.generated_block(REPO / "docs" / "methods.md") == catalog.markdown(list(catalog.KINDS))


def test_list_prints_every_name_with_its_options_and_defaults():
    out = subprocess.run([sys.executable, "-m", "ltpipe", "list", "losses", "heads"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    for kind in ("losses", "heads"):
        for entry in catalog.registry(kind).entries():
            assert f"  {entry.name} " in out, entry.name
    assert "s = 30.0  float or null (> 0): fixed scale of the cosine head; null: margins" in out  # ldam's option
    assert "tasks: multi" in out and "input: tokens" in out


def test_an_unknown_kind_is_one_clear_error():
    result = subprocess.run([sys.executable, "-m", "ltpipe", "list", "lossses"], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == ("ltpipe error: unknown kind 'lossses'; one of: heads, losses, samplers, stage2, "
                                     "datasets, finetune.")


def test_write_block_replaces_only_the_generated_part(tmp_path):
    doc = tmp_path / "m.md"
    doc.write_text(f"intro\n{catalog.BEGIN}\nold\n{catalog.END}\noutro\n")
    catalog.write_block(doc, "new\n")
    assert doc.read_text() == f"intro\n{catalog.BEGIN}\nnew\n{catalog.END}\noutro\n"
    (tmp_path / "plain.md").write_text("no markers\n")
    with pytest.raises(Exception, match="no .* block to fill"):
        catalog.write_block(tmp_path / "plain.md", "x")
