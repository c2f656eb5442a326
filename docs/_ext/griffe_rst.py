"""Griffe extension for the docs site: render textrl's reST-flavoured docstrings as Markdown.

The docstrings are Google style (``Args:``/``Returns:`` sections, which mkdocstrings parses) written with a
few reStructuredText habits that Markdown reads differently. This rewrites each docstring's text, for the
site only (the source is untouched):

- doctest blocks (``>>>`` lines, run by ``pytest --doctest-modules``) become fenced ``pycon`` code blocks,
  instead of nested block quotes whose ``[...]`` output lines Markdown would take for reference links;
- roles (``:class:`TextGenEnv```, ``:func:`~textrl.lm.load_lm```) become code spans;
- a paragraph ending in ``::`` before an indented literal block ends in ``:`` (the block is Markdown code);
- simple reST tables (``===  ===`` rules) become Markdown tables;
- a ``-`` list that follows a paragraph line directly gets the blank line Markdown needs to see a list;
- an ``Args:`` entry that documents several parameters at once (``ids, mask: ...``, numpydoc's grouping)
  becomes one entry per parameter with the same description, as the Google-style parser expects.

Fenced and indented code is left alone. Loaded by ``mkdocs.yml`` (mkdocstrings' ``extensions`` option).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(
    r":(?:py:)?(?:class|func|meth|mod|attr|data|obj|exc|const|term|ref):`(~?)([^`<]*?)(?:\s*<([^>`]+)>)?`"
)
RULE = re.compile(r"^(\s*)(=+)((?:\s+=+)+)\s*$")
ARGS = ("Args:", "Arguments:", "Parameters:", "Params:", "Keyword Args:", "Keyword Arguments:", "Other Parameters:")
GROUPED = re.compile(r"^(\s*)(\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)+)(\s*\([^)]*\))?:(\s.*|)$")


def _role(match: re.Match) -> str:
    tilde, text, target = match.groups()
    name = (text or target or "").strip()
    if tilde and not target:
        name = name.rsplit(".", 1)[-1]
    return f"`{name}`"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _table(lines: list[str], start: int) -> tuple[list[str], int] | None:
    """Convert the simple table whose first rule is ``lines[start]``; return (new lines, index after it)."""
    rule = RULE.match(lines[start])
    if rule is None:
        return None
    indent = rule.group(1)
    spans = [(m.start(), m.end()) for m in re.finditer(r"=+", lines[start])]
    rules, rows, i = [start], [], start + 1
    while i < len(lines) and lines[i].strip():
        if RULE.match(lines[i]):
            rules.append(i)
        else:
            rows.append(lines[i])
        i += 1
    if len(rules) < 2 or not rows:
        return None
    header_rows = 1 if len(rules) == 3 and rules[1] == start + 2 else 0

    def cells(row: str) -> list[str]:
        parts = re.split(r"\s{2,}", row.strip())
        if len(parts) == len(spans):
            return parts
        out, begin = [], 0
        for _, end in spans[:-1]:  # column ends, moved right to the next space when text overflows a column
            cut = end if end >= len(row) or row[end] == " " else row.find(" ", end)
            cut = len(row) if cut == -1 else cut
            out.append(row[begin:cut].strip())
            begin = cut
        out.append(row[begin:].strip())
        return out

    table = [cells(r) for r in rows]
    header = table[:header_rows] or [[""] * len(spans)]
    body = table[header_rows:]
    out = [indent + "| " + " | ".join(header[0]) + " |", indent + "|" + "---|" * len(spans)]
    out += [indent + "| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in body]
    if i < len(lines):
        out.append("")
    return out, i


def _ungroup(lines: list[str]) -> list[str]:
    """Split the grouped entries (``a, b: text``) of ``Args:``-like sections into one entry per name."""
    out: list[str] = []
    section = None  # indentation of the current Args-like section's header
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip():
            if line.strip() in ARGS:
                section = _indent(line)
            elif section is not None and _indent(line) <= section:
                section = None
        grouped = GROUPED.match(line) if section is not None and _indent(line) > section else None
        if grouped is None:
            out.append(line)
            i += 1
            continue
        indent, names, kind, rest = grouped.groups()
        body = [rest]
        i += 1
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > len(indent)):
            if not lines[i].strip() and (i + 1 >= len(lines) or _indent(lines[i + 1]) <= len(indent)):
                break
            body.append("\n" + lines[i])
            i += 1
        for name in re.split(r"\s*,\s*", names):
            out.extend((f"{indent}{name}{kind or ''}:{''.join(body)}").split("\n"))
    return out


def to_markdown(text: str) -> str:
    """The Markdown rendering of one docstring (see the module docstring)."""
    lines = _ungroup(text.split("\n"))
    out: list[str] = []
    i, fence = 0, None
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if fence is not None:  # inside a fenced block: copy
            out.append(line)
            if stripped.startswith(fence):
                fence = None
            i += 1
            continue
        if stripped.startswith(("```", "~~~")):
            fence = stripped[:3]
            out.append(line)
            i += 1
            continue
        if stripped.startswith(">>>"):  # a doctest block runs to the next blank line
            indent = " " * _indent(line)
            if out and out[-1].strip():
                out.append("")
            out.append(indent + "```pycon")
            while i < len(lines) and lines[i].strip():
                out.append(lines[i])
                i += 1
            out.append(indent + "```")
            continue
        if RULE.match(line):
            converted = _table(lines, i)
            if converted is not None:
                if out and out[-1].strip():
                    out.append("")
                out.extend(ROLE.sub(_role, row) for row in converted[0])
                i = converted[1]
                continue
        if stripped.endswith("::") and not stripped.startswith("::"):
            nxt = next((n for n in lines[i + 1 :] if n.strip()), "")
            if _indent(nxt) > _indent(line):  # a literal block follows: Markdown's indented code
                line = line[: line.rstrip().rfind("::")] + ":"
        if (
            stripped.startswith("- ")
            and out
            and out[-1].strip()
            and not out[-1].lstrip().startswith("- ")
            and _indent(out[-1]) == _indent(line)
        ):
            out.append("")
        out.append(ROLE.sub(_role, line))
        i += 1
    return "\n".join(out)


class RstToMarkdown(griffe.Extension):
    """Rewrite every docstring of the loaded packages with :func:`to_markdown`."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        seen: set[int] = set()

        def walk(obj: griffe.Object) -> None:
            if id(obj) in seen:
                return
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = to_markdown(obj.docstring.value)
            for member in obj.members.values():
                if not member.is_alias:
                    walk(member)

        walk(pkg)
