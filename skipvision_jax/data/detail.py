"""The detail task: small coloured digits on a 6 x 6 grid, multi-token answers.

Each image is a 6 x 6 grid of 8-pixel cells; each cell holds a glyph with
probability one half: a digit 0-9 drawn in a 3 x 5 pixel font, in one of four
colours. A glyph fills a fraction of its cell, so an average over 2 x 2 cells
(a coarse token) blurs its shape into its neighbours': the answers need the
fine tokens. Questions come in two kinds, equally likely, each answered with
one word per cell of a row, left to right, "-" for an empty cell:

    digits   what digits are in row 3 ?   -> 7 - - 2 9 -
    colours  what colors are in row 3 ?   -> red - - blue red -

Six answer tokens. Chance (the most common answer of each kind): 1.1 to 1.4%
exact match. A question naming one cell ("what is at row 3 column 5 ?") was
tried as a second kind and stayed at chance after 1,500 steps while reading a
row reached 74%: with rotary positions, a row is read at one fixed distance
from the answer token, a cell needs a distance built from two words. Example i
of a split is a pure function of (seed, split, i), as in the default task.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from skipvision_jax.data.synthetic import CELL, COLOURS, GeneratedVQA, choose_kind, render_grid
from skipvision_jax.data.tokenizer import WordTokenizer

GRID = 6  # cells of synthetic.CELL pixels
IMAGE_SIZE = GRID * CELL
KINDS = ("digits", "colours")
DIGITS = tuple(str(d) for d in range(10))
EMPTY = "-"
OCCUPIED = 0.5  # the chance that a cell holds a glyph
# 3 x 5 font, one string of three pixels per row.
FONT = {
    "0": ("111", "101", "101", "101", "111"),
    "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"),
    "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"),
    "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"),
    "7": ("111", "001", "010", "010", "010"),
    "8": ("111", "101", "111", "101", "111"),
    "9": ("111", "101", "111", "001", "111"),
}
WORDS = "what digits colors are in row ?".split() + [EMPTY] + list(COLOURS) + list(DIGITS)


def glyph_mask(digit: str) -> np.ndarray:
    """[CELL, CELL] bool: the digit's 3 x 5 pixels, placed at the cell's centre."""
    mask = np.zeros((CELL, CELL), bool)
    pixels = np.array([[c == "1" for c in row] for row in FONT[digit]])
    top, left = (CELL - 5) // 2, (CELL - 3) // 2
    mask[top : top + 5, left : left + 3] = pixels
    return mask


MASKS = {d: glyph_mask(d) for d in DIGITS}


@dataclasses.dataclass(frozen=True)
class GlyphScene:
    glyphs: tuple[tuple[str, str, int, int], ...]  # (colour, digit, row, col), in reading order

    def render(self, rng: np.random.Generator) -> np.ndarray:
        """[48, 48, 3] float in [0, 1] on the 8-bit grid: dark noisy background, flat-coloured digits."""
        return render_grid(
            ((colour, MASKS[digit], row, col) for colour, digit, row, col in self.glyphs), IMAGE_SIZE, rng
        )


def sample_glyph_scene(rng: np.random.Generator) -> GlyphScene:
    occupied = np.flatnonzero(rng.random(GRID * GRID) < OCCUPIED)
    colours = rng.integers(len(COLOURS), size=occupied.size)
    digits = rng.integers(len(DIGITS), size=occupied.size)
    names = list(COLOURS)
    return GlyphScene(
        tuple(
            (names[c], DIGITS[d], int(cell) // GRID, int(cell) % GRID) for cell, c, d in zip(occupied, colours, digits)
        )
    )


def sample_glyph_question(
    scene: GlyphScene, rng: np.random.Generator, kind_weights: dict[str, float] | None = None
) -> tuple[str, str, str]:
    """(kind, question, answer), the kind by `choose_kind`, the rows equally likely; rows count from 1."""
    kind = choose_kind(KINDS, rng, kind_weights)
    row = int(rng.integers(GRID))
    cells = [EMPTY] * GRID
    for colour, digit, r, col in scene.glyphs:
        if r == row:
            cells[col] = digit if kind == "digits" else colour
    noun = "digits" if kind == "digits" else "colors"
    return kind, f"what {noun} are in row {row + 1} ?", " ".join(cells)


class DetailVQA(GeneratedVQA):
    tokenizer = WordTokenizer(WORDS)
    text_len = 15  # <bos> + the question (7) + the answer (6) + <eos>
    kinds = KINDS
    image_size = IMAGE_SIZE
    sample_scene = staticmethod(sample_glyph_scene)
    sample_question = staticmethod(sample_glyph_question)
