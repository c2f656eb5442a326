"""Text as pixels: the ``rgb_array`` frames of the text-generation envs.

A frame shows an episode's text so far, word-wrapped in Pillow's built-in font (no font file to download),
the prompt in one colour and the completion in another. Every frame has the same size, so video writers
(SB3's ``VecVideoRecorder``, Gymnasium's ``RecordVideo``) get constant-size frames; when the text outgrows
the frame, the oldest lines scroll off the top so the newest tokens stay visible.
"""

from __future__ import annotations

import functools
import re

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FRAME_WIDTH = 512
"""Default frame width in pixels (a multiple of 16, the macroblock size video encoders want)."""
FRAME_HEIGHT = 288
"""Default frame height in pixels (16:9 with the width)."""
FONT_SIZE = 14
"""Default font size in pixels: about 75 characters a line and 15 lines in the default frame."""

BACKGROUND = (24, 24, 27)
PROMPT_COLOUR = (165, 170, 180)
COMPLETION_COLOUR = (255, 196, 64)
"""RGB colours of the background, the prompt's text and the completion's text."""
MARGIN = 8
"""Blank border in pixels on every side of the text."""

_CHUNK = re.compile(r"\S*\s*")  # a word with the spaces after it (a leading run of spaces is a chunk of its own)


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def text_frame(
    prompt: str,
    completion: str,
    width: int = FRAME_WIDTH,
    height: int = FRAME_HEIGHT,
    font_size: int = FONT_SIZE,
) -> np.ndarray:
    """Draw ``prompt + completion`` as an RGB image of a fixed size.

    The text is word-wrapped to the frame's width (a word wider than a line is broken between characters),
    newlines start a new line, and the prompt and completion are drawn in different colours
    (``PROMPT_COLOUR``, ``COMPLETION_COLOUR``) even when the completion continues a word of the prompt.
    Lines that do not fit are dropped from the top: the frame always shows the end of the text.

    Args:
        prompt: the episode's prompt.
        completion: the text generated so far.
        width: frame width in pixels.
        height: frame height in pixels.
        font_size: size of Pillow's built-in font in pixels.

    Returns:
        A ``(height, width, 3)`` ``uint8`` array.
    """
    if width <= 2 * MARGIN or height <= 2 * MARGIN:
        raise ValueError(f"a frame needs more than {2 * MARGIN} pixels each way, got {width}x{height}")
    font = _font(font_size)
    prompt, completion = _plain(prompt), _plain(completion)
    text, boundary = prompt + completion, len(prompt)
    line_height = _line_height(font)
    n_lines = max(1, (height - 2 * MARGIN) // line_height)
    lines = _wrap(text, font_size, width - 2 * MARGIN)[-n_lines:]

    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for row, (start, end) in enumerate(lines):
        x, y = MARGIN, MARGIN + row * line_height
        split = min(max(boundary, start), end)
        if split > start:
            draw.text((x, y), text[start:split], font=font, fill=PROMPT_COLOUR)
            x += font.getlength(text[start:split])
        if end > split:
            draw.text((x, y), text[split:end], font=font, fill=COMPLETION_COLOUR)
    return np.asarray(image, dtype=np.uint8)


def _plain(text: str) -> str:
    """Every line break as ``\\n``, tabs as four spaces (the font has no tab stops)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")


def _line_height(font) -> int:
    if hasattr(font, "getmetrics"):
        ascent, descent = font.getmetrics()
        return ascent + descent
    return font.getbbox("Ag|")[3] + 2


def _wrap(text: str, size: int, max_width: float) -> list[tuple[int, int]]:
    """Greedy word wrap: ``(start, end)`` offsets into ``text`` of each line, newlines excluded.

    A line's width is taken as the sum of its words' widths (each measured once, then cached), which
    ignores kerning across word boundaries: a pixel or two, well inside ``MARGIN``.
    """
    lines: list[tuple[int, int]] = []
    offset = 0
    for paragraph in text.split("\n"):
        start = end = offset
        used = 0.0  # width of text[start:end]
        for match in _CHUNK.finditer(paragraph):
            chunk = match.group()
            if not chunk:
                continue
            word, chunk_start = chunk.rstrip(), offset + match.start()
            if end > start and used + _length(size, word) > max_width:  # the word goes on the next line
                lines.append((start, end))
                start, used = chunk_start, 0.0
            if used + _length(size, word) > max_width:  # wider than a line by itself: break it between characters
                for i, char in enumerate(word):
                    if end > start and used + _length(size, char) > max_width:
                        lines.append((start, end))
                        start, used = end, 0.0
                    end, used = chunk_start + i + 1, used + _length(size, char)
                used -= _length(size, word)  # the spaces after it come next
            end, used = chunk_start + len(chunk), used + _length(size, chunk)
        lines.append((start, end))
        offset += len(paragraph) + 1
    return lines


@functools.lru_cache(maxsize=1 << 16)
def _length(size: int, text: str) -> float:
    """Width in pixels of ``text`` in the built-in font of ``size`` (an episode's frames re-measure only new words)."""
    return _font(size).getlength(text)
