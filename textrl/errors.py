"""Turn an exception into the one line the ``textrl`` command prints, pointing into the user's own code.

An error raised in the user's files (an env factory, a reward function defined there) reaches the command
wrapped in textrl's own errors (e.g. a :class:`textrl.rewards.RewardError` ``from`` the original). The
useful place is the innermost frame in the user's code: :func:`user_frame` walks the exception's chain of
causes and finds it, skipping textrl's packages, site-packages and the standard library.
"""

from __future__ import annotations

import os
import site
import sysconfig
import traceback
from functools import cache
from pathlib import Path


@cache
def _library_roots() -> tuple[str, ...]:
    """Folders whose files are never the user's: textrl's packages, site-packages and the standard library."""
    import importlib.util

    roots = set()
    for package in ("textrl", "envs", "agents"):  # located without importing envs/agents (layers point down)
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            roots |= {str(Path(folder).resolve()) for folder in spec.submodule_search_locations}
    paths = [sysconfig.get_paths().get(key) for key in ("stdlib", "platstdlib", "purelib", "platlib")]
    paths += [*site.getsitepackages(), site.getusersitepackages()]
    roots |= {str(Path(path).resolve()) for path in paths if path}
    return tuple(sorted(roots))


def is_user_file(filename: str) -> bool:
    """Whether a traceback frame's file is the user's own (not textrl, a library, the stdlib or ``<string>``)."""
    if not filename or filename.startswith("<"):
        return False
    path = Path(filename).resolve()
    if {"site-packages", "dist-packages"} & set(path.parts):
        return False
    text = str(path)
    return not any(text == root or text.startswith(root + os.sep) for root in _library_roots())


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions behind it (``__cause__``, else the shown ``__context__``), outermost first."""
    chain: list[BaseException] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        chain.append(current)
        seen.add(id(current))
        if current.__cause__ is not None:
            current = current.__cause__
        elif not current.__suppress_context__:
            current = current.__context__
        else:
            current = None
    return chain


def user_frame(exc: BaseException) -> tuple[str, int] | None:
    """``(file, line)`` of the innermost frame in the user's code behind ``exc``, or None.

    The deepest exception of the chain that passed through user code wins (the original error, not the
    wrapper); within it, the innermost such frame. A ``SyntaxError`` in a user file counts as a frame.
    """
    for error in reversed(_chain(exc)):
        if isinstance(error, SyntaxError) and error.filename and is_user_file(error.filename):
            return error.filename, error.lineno or 0
        frames = [f for f in traceback.extract_tb(error.__traceback__) if is_user_file(f.filename)]
        if frames:
            return frames[-1].filename, frames[-1].lineno or 0
    return None


def _short(filename: str) -> str:
    """The path relative to the working directory when it lies below it, else as it is."""
    try:
        relative = os.path.relpath(filename)
    except ValueError:  # another drive on Windows
        return filename
    return filename if relative.startswith("..") else relative


def one_line(exc: BaseException, expected: tuple[type[BaseException], ...] = ()) -> str:
    """The error message of ``exc`` on one line, with its place in the user's code when there is one.

    Args:
        exc: the error.
        expected: error types whose message is written for users; any other type is named in the line,
            with a hint that ``--debug`` shows the traceback.

    Returns:
        e.g. ``"reward 'mine' raised ZeroDivisionError: division by zero on ... (my_env.py, line 12)"``.
    """
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    if not isinstance(exc, expected):
        text = f"{type(exc).__name__}: {text}"
    where = user_frame(exc)
    if where is not None:
        place = f"{_short(where[0])}, line {where[1]}"
        if place not in text and f"{Path(where[0]).name}, line {where[1]}" not in text:
            text = f"{text} ({place})"
    if not isinstance(exc, expected):
        text += " (--debug shows the traceback)"
    return text
