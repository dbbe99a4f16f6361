"""The detail task: small coloured digits on a 6 x 6 grid, multi-token answers.

Each image is a 6 x 6 grid of 8-pixel cells holding 4 to 8 glyphs: digits
0-9 drawn in a 3 x 5 pixel font, each in one of four colours, every
(colour, digit) pair distinct. A glyph fills a fraction of its cell, so an
average over 2 x 2 cells (a coarse token) blurs its shape into its
neighbours' and loses where in the block it sits: the answers need the fine
tokens. Questions come in two kinds, answered in several tokens:

    where   where is the red 7 ?      -> row 3 column 5
    row     what is in row 3 ?        -> blue 2 red 7 green 0   (reading order)

Chance (the most common answer of each kind): about 3% exact match. Example
i of a split is a pure function of (seed, split, i), as in the default task.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from skipvision_jax.data.synthetic import CELL, COLOURS, GeneratedVQA, render_grid
from skipvision_jax.data.tokenizer import WordTokenizer

GRID = 6  # cells of synthetic.CELL pixels
IMAGE_SIZE = GRID * CELL
KINDS = ("where", "row")
DIGITS = tuple(str(d) for d in range(10))
MIN_GLYPHS, MAX_GLYPHS = 4, 8
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
WORDS = ("where is the what in row column ?".split()) + list(COLOURS) + list(DIGITS)


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
    count = int(rng.integers(MIN_GLYPHS, MAX_GLYPHS + 1))
    pairs = [(c, d) for c in COLOURS for d in DIGITS]
    chosen = rng.choice(len(pairs), size=count, replace=False)
    cells = np.sort(rng.choice(GRID * GRID, size=count, replace=False))
    return GlyphScene(
        tuple((pairs[p][0], pairs[p][1], int(cell) // GRID, int(cell) % GRID) for p, cell in zip(chosen, cells))
    )


def sample_glyph_question(scene: GlyphScene, rng: np.random.Generator) -> tuple[str, str, str]:
    """(kind, question, answer), the kinds equally likely; rows and columns count from 1."""
    kind = KINDS[int(rng.integers(len(KINDS)))]
    if kind == "where":
        colour, digit, row, col = scene.glyphs[int(rng.integers(len(scene.glyphs)))]
        return kind, f"where is the {colour} {digit} ?", f"row {row + 1} column {col + 1}"
    row = scene.glyphs[int(rng.integers(len(scene.glyphs)))][2]  # a row that holds a glyph
    in_row = [f"{colour} {digit}" for colour, digit, r, _ in scene.glyphs if r == row]
    return kind, f"what is in row {row + 1} ?", " ".join(in_row)


class DetailVQA(GeneratedVQA):
    tokenizer = WordTokenizer(WORDS)
    kinds = KINDS
    image_size = IMAGE_SIZE
    sample_scene = staticmethod(sample_glyph_scene)
    sample_question = staticmethod(sample_glyph_question)
