"""The embedded default task: procedurally generated visual question answering.

Each image is a 4 x 4 grid of 8-pixel cells holding 1 to 4 objects, every one
of a distinct shape and a distinct colour. Questions come in four kinds:

    colour    what color is the ring ?                     -> red | green | blue | yellow
    shape     what shape is the red object ?               -> square | ring | dot | cross
    count     how many objects are there ?                 -> one | two | three | four
    position  which is further left , the red ring or the blue square ?  -> red | blue
              (or "which is higher")

The position question names the answer by its colour, so it reads the same
with its two objects swapped. Asked as "is the red ring left of the blue
square ? -> yes | no", the answer flips with the order of the two objects, so
a model that has not yet learnt to tell the first object from the second in
the question (any model at the start of training) gets no signal from it:
that form stayed at chance (51% after 2,500 steps, 54% after 7,000) while the
other kinds were learnt, although a linear probe reads each object's column
from the tower's tokens. This form is learnt: 100% after the default 7,000
steps.

12 distinct answers. Example i of a split is a pure function of (seed, split, i),
so the source is random-access (grain `MapDataset.source`) and needs no files.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np

from skipvision_jax.data.images import normalize
from skipvision_jax.data.tokenizer import WordTokenizer

COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.9, 0.1)}
SHAPES = ("square", "ring", "dot", "cross")
COUNTS = ("one", "two", "three", "four")
KINDS = ("colour", "shape", "count", "position")
GRID, CELL = 4, 8
IMAGE_SIZE = GRID * CELL
SPLITS = {"train": 0, "val": 1}
WORDS = (
    "what color is the shape object how many objects are there ? which further left higher , or".split()
    + list(COLOURS)
    + list(SHAPES)
    + list(COUNTS)
)


def shape_mask(shape: str) -> np.ndarray:
    """[CELL, CELL] bool footprint of a shape, with a 1-pixel margin."""
    y, x = np.abs(np.mgrid[0:CELL, 0:CELL] - (CELL - 1) / 2)
    if shape == "square":
        return (x <= 2.5) & (y <= 2.5)
    if shape == "ring":
        return (np.maximum(x, y) <= 2.5) & (np.maximum(x, y) >= 1.5)
    if shape == "dot":
        return (x <= 0.5) & (y <= 0.5)
    if shape == "cross":
        return (x <= 3) & (y <= 3) & ((x <= 0.5) | (y <= 0.5))
    raise ValueError(f"unknown shape {shape!r}")


MASKS = {s: shape_mask(s) for s in SHAPES}


@dataclasses.dataclass(frozen=True)
class Scene:
    objects: tuple[tuple[str, str, int, int], ...]  # (colour, shape, row, col)

    def render(self, rng: np.random.Generator) -> np.ndarray:
        """[32, 32, 3] float in [0, 1]: dark noisy background, flat-coloured shapes."""
        return render_grid(
            ((colour, MASKS[shape], row, col) for colour, shape, row, col in self.objects), IMAGE_SIZE, rng
        )


def render_grid(painted, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """[size, size, 3] in [0, 1]: a dark noisy background, and each
    (colour, [CELL, CELL] footprint, row, col) painted flat in its cell.

    Values sit on the 8-bit grid, so an exported PNG holds exactly the
    pixels the model trained and was validated on."""
    image = rng.uniform(0.0, 0.15, size=(image_size, image_size, 3)).astype(np.float32)
    for colour, footprint, row, col in painted:
        cell = image[row * CELL : (row + 1) * CELL, col * CELL : (col + 1) * CELL]
        cell[footprint] = COLOURS[colour]
    return np.round(image * 255) / 255


def sample_scene(rng: np.random.Generator) -> Scene:
    count = int(rng.integers(1, len(COUNTS) + 1))
    colours = rng.permutation(list(COLOURS))[:count]
    shapes = rng.permutation(list(SHAPES))[:count]
    cells = rng.choice(GRID * GRID, size=count, replace=False)
    return Scene(
        tuple((str(c), str(s), int(cell) // GRID, int(cell) % GRID) for c, s, cell in zip(colours, shapes, cells))
    )


def choose_kind(allowed: tuple[str, ...], rng: np.random.Generator, weights: dict[str, float] | None) -> str:
    """One of the kinds a scene allows: uniform (one integer draw, as the
    validation split always asks), or in proportion to `weights` (kind ->
    weight > 0, `data.train_kind_weights`) among the allowed ones."""
    if weights is None:
        return allowed[int(rng.integers(len(allowed)))]
    p = np.array([weights[kind] for kind in allowed], np.float64)
    return allowed[int(rng.choice(len(allowed), p=p / p.sum()))]


def sample_question(
    scene: Scene, rng: np.random.Generator, kind_weights: dict[str, float] | None = None
) -> tuple[str, str, str]:
    """(kind, question, answer), the kind chosen among those the scene allows (`choose_kind`)."""
    kind = choose_kind(KINDS if len(scene.objects) >= 2 else KINDS[:3], rng, kind_weights)
    target = scene.objects[int(rng.integers(len(scene.objects)))]
    if kind == "colour":
        return kind, f"what color is the {target[1]} ?", target[0]
    if kind == "shape":
        return kind, f"what shape is the {target[0]} object ?", target[1]
    if kind == "count":
        return kind, "how many objects are there ?", COUNTS[len(scene.objects) - 1]
    a, b = (scene.objects[i] for i in rng.choice(len(scene.objects), size=2, replace=False))
    relations = [("further left", 3)] if a[3] != b[3] else []
    relations += [("higher", 2)] if a[2] != b[2] else []
    relation, axis = relations[int(rng.integers(len(relations)))]
    answer = a[0] if a[axis] < b[axis] else b[0]
    return kind, f"which is {relation} , the {a[0]} {a[1]} or the {b[0]} {b[1]} ?", answer


class GeneratedVQA:
    """grain random-access source over a generated task: index -> example
    dict of fixed-shape arrays. Subclasses give the tokenizer, the question
    kinds and `sample_scene`, `sample_question` (the scene renders itself).

    Text layout: `<bos> question answer <eos> <pad>...`; the image goes after
    `<bos>` (layout.image_offset = 1); the loss covers the answer and `<eos>`.
    """

    tokenizer: WordTokenizer
    kinds: tuple[str, ...]
    image_size: int
    image_offset = 1
    text_len: int  # the longest example's tokens

    def __init__(self, split: str, size: int, seed: int = 0, text_len: int = 16, kind_weights: tuple[float, ...] = ()):
        """`kind_weights`: one weight > 0 per question kind (`kinds`), how often
        each is asked; empty asks every kind the scene allows equally often."""
        if split not in SPLITS:
            raise ValueError(f"data.split: unknown {split!r}, expected one of {tuple(SPLITS)}")
        if kind_weights and (
            len(kind_weights) != len(self.kinds) or not all(math.isfinite(w) and w > 0 for w in kind_weights)
        ):
            raise ValueError(
                f"data.train_kind_weights: expected {len(self.kinds)} weights > 0 (for {', '.join(self.kinds)}),"
                f" got {tuple(kind_weights)!r}"
            )
        self.split, self.size, self.seed, self.text_len = split, size, seed, text_len
        self.kind_weights = dict(zip(self.kinds, map(float, kind_weights))) if kind_weights else None

    def __len__(self) -> int:
        return self.size

    @staticmethod
    def sample_scene(rng: np.random.Generator):
        raise NotImplementedError

    @staticmethod
    def sample_question(scene, rng: np.random.Generator, kind_weights: dict[str, float] | None) -> tuple[str, str, str]:
        raise NotImplementedError

    def sample(self, index: int) -> tuple[object, str, str, str, np.random.Generator]:
        """(scene, kind, question, answer, rng); the rng then renders the scene."""
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
        scene = self.sample_scene(rng)
        kind, question, answer = self.sample_question(scene, rng, self.kind_weights)
        return scene, kind, question, answer, rng

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        scene, kind, question, answer, rng = self.sample(index)
        tok = self.tokenizer
        prompt = [tok.bos_id] + tok.encode(question)
        target = tok.encode(answer) + [tok.eos_id]
        ids = prompt + target
        if len(ids) > self.text_len:
            raise ValueError(f"data.text_len: {self.text_len} is shorter than example {index} ({len(ids)} tokens)")
        pad = self.text_len - len(ids)
        return {
            "pixels": normalize(scene.render(rng)),
            "input_ids": np.array(ids + [tok.pad_id] * pad, np.int32),
            "text_mask": np.array([True] * len(ids) + [False] * pad),
            "loss_mask": np.array([False] * len(prompt) + [True] * len(target) + [False] * pad),
            "kind": np.int32(self.kinds.index(kind)),
        }


class SyntheticVQA(GeneratedVQA):
    """The default task (see the module docstring)."""

    tokenizer = WordTokenizer(WORDS)
    kinds = KINDS
    image_size = IMAGE_SIZE
    text_len = 16  # <bos> + the position question (13) + the answer + <eos>
    sample_scene = staticmethod(sample_scene)
    sample_question = staticmethod(sample_question)


def chance_accuracy(source: GeneratedVQA) -> float:
    """Exact-match of always answering the most common answer of each question kind."""
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for i in range(len(source)):
        _, kind, _, answer, _ = source.sample(i)
        by_kind[kind][answer] += 1
    return sum(c.most_common(1)[0][1] for c in by_kind.values()) / len(source)


def as_typed(question: str) -> str:
    """The question as a person types it: "What color is the ring?"."""
    return question[0].upper() + question[1:].replace(" ?", "?")
