"""Generated image–caption benchmarks: two visual domains with a small caption grammar each.

Each domain samples a *scene* (a small dataclass of attributes), renders it to an RGB
image and describes it with several paraphrased captions. Everything is seeded per item
(``numpy.random.default_rng([seed, split, index])``), so item ``i`` of a split is the
same whatever the split's size, and two runs give byte-identical files.

Domains:
    shapes    1–2 coloured shapes (kind, colour, size, position on a 3×3 grid) on a
              light or dark textured background; two-shape captions use spatial relations.
    patterns  a two-colour texture (stripes, checkerboard, dots, rings, grid, zigzag)
              at a fine or coarse scale, filling the whole image or one half of it.

On disk (the format the stage-2 loader and the evaluation read)::

    ROOT/train/000000.png ... + metadata.jsonl   {"file_name": "000000.png", "captions": [...]}
    ROOT/test/...                                 (same layout, disjoint seed stream)
    ROOT/corpus.txt                               captions only, one per line (stage-1 corpus)
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ..errors import InputError
from ..io import atomic_write_text

logger = logging.getLogger(__name__)

IMAGE_SIZE = 48
CAPTIONS_PER_IMAGE = 5
SPLITS = {"train": 0, "test": 1, "corpus": 2}  # split name -> seed stream
METADATA = "metadata.jsonl"
GENERATION_RECORD = "generation.json"  # what a folder was generated with (skip when it matches)
FORMAT_VERSION = 2  # bump when rendering or the grammar changes, so cached folders are regenerated

COLOURS = {
    "red": (215, 40, 40), "green": (40, 170, 60), "blue": (45, 85, 225), "yellow": (235, 215, 45),
    "purple": (140, 60, 190), "orange": (240, 135, 30), "white": (245, 245, 245),
}


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _paraphrases(rng: np.random.Generator, templates: list[str], count: int, **slots) -> list[str]:
    """``count`` distinct templates (in random order) filled with ``slots``."""
    chosen = rng.permutation(len(templates))[:count]
    return [" ".join(templates[i].format(**slots).split()) for i in chosen]


class Domain(ABC):
    """A family of generated scenes: sample attributes, render them, describe them."""

    name: str

    @abstractmethod
    def sample(self, rng: np.random.Generator):
        """Random scene attributes."""

    @abstractmethod
    def render(self, scene, rng: np.random.Generator) -> Image.Image:
        """The scene as an ``IMAGE_SIZE``² RGB image (``rng`` adds texture and jitter)."""

    @abstractmethod
    def describe(self, scene, rng: np.random.Generator, count: int) -> list[str]:
        """``count`` different paraphrased captions of the scene."""


# ---------------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------------
SHAPE_KINDS = ("circle", "square", "triangle", "diamond", "cross")
SIZES = {"small": 5, "large": 8}  # half-width in pixels
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
ROWS, COLUMNS = ("top", "middle", "bottom"), ("left", "center", "right")
BACKGROUNDS = {"dark": (45, 45, 55), "light": (190, 185, 175)}


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    row: int
    column: int

    @property
    def position(self) -> str:
        row, column = ROWS[self.row], COLUMNS[self.column]
        if row == "middle":
            return "center" if column == "center" else f"middle {column}"
        return row if column == "center" else f"{row} {column}"


@dataclass(frozen=True)
class ShapeScene:
    shapes: tuple[Shape, ...]
    background: str


class Shapes(Domain):
    name = "shapes"

    # Every paraphrase names every shape's size, colour, kind and where it is (position or
    # relation), so that retrieval is limited by the models rather than by vague captions.
    one = [
        "a {size} {colour} {kind} in the {position}",
        "{a_colour} {colour} {kind}, {size}, at the {position} of the picture",
        "there is a {size} {colour} {kind} in the {position}",
        "a {size} {colour} {kind} in the {position} on a {background} background",
        "{size} {colour} {kind}, {position}",
        "the {position} holds a {size} {colour} {kind}",
        "a picture of a {size} {colour} {kind} in the {position}",
        "a {size} {kind} coloured {colour} in the {position}, {background} background",
    ]
    two = [
        "a {first} {relation} a {second}",
        "a {second} {inverse} a {first}",
        "two shapes: a {first} {relation} a {second}",
        "there is a {first} {relation} a {second} on a {background} background",
        "a picture of a {second} {inverse} a {first}",
        "a {first} and a {second}",
        "{background} background with a {second} {inverse} a {first}",
    ]

    def sample(self, rng: np.random.Generator) -> ShapeScene:
        cells = rng.permutation(9)[: 1 + int(rng.integers(2))]
        shapes = tuple(Shape(_pick(rng, SHAPE_KINDS), _pick(rng, list(COLOURS)), _pick(rng, list(SIZES)),
                             int(cell) // 3, int(cell) % 3) for cell in cells)
        return ShapeScene(shapes, _pick(rng, list(BACKGROUNDS)))

    def render(self, scene: ShapeScene, rng: np.random.Generator) -> Image.Image:
        base = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
        canvas = base + rng.normal(0.0, 12.0, (IMAGE_SIZE, IMAGE_SIZE, 1)).astype(np.float32)
        gradient = np.linspace(-1.0, 1.0, IMAGE_SIZE, dtype=np.float32) * rng.uniform(-15, 15)
        canvas += gradient[:, None, None] if rng.integers(2) else gradient[None, :, None]
        image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        cell = IMAGE_SIZE // 3
        for shape in scene.shapes:
            half = SIZES[shape.size] + int(rng.integers(-1, 2))
            x, y = (min(max(index * cell + cell // 2 + int(rng.integers(-2, 3)), half), IMAGE_SIZE - 1 - half)
                    for index in (shape.column, shape.row))
            self._draw(draw, shape.kind, x, y, half, COLOURS[shape.colour])
        return image

    @staticmethod
    def _draw(draw: ImageDraw.ImageDraw, kind: str, x: int, y: int, half: int, colour) -> None:
        if kind == "circle":
            draw.ellipse((x - half, y - half, x + half, y + half), fill=colour)
        elif kind == "square":
            draw.rectangle((x - half, y - half, x + half, y + half), fill=colour)
        elif kind == "triangle":
            draw.polygon([(x, y - half), (x - half, y + half), (x + half, y + half)], fill=colour)
        elif kind == "diamond":
            draw.polygon([(x, y - half), (x + half, y), (x, y + half), (x - half, y)], fill=colour)
        else:  # cross
            arm = max(1, half // 3)
            draw.rectangle((x - half, y - arm, x + half, y + arm), fill=colour)
            draw.rectangle((x - arm, y - half, x + arm, y + half), fill=colour)

    def describe(self, scene: ShapeScene, rng: np.random.Generator, count: int) -> list[str]:
        if len(scene.shapes) == 1:
            shape = scene.shapes[0]
            return _paraphrases(rng, self.one, count, size=_pick(rng, SIZE_WORDS[shape.size]), colour=shape.colour,
                                a_colour=_article(shape.colour),
                                kind=shape.kind, position=shape.position, background=scene.background)
        first, second = scene.shapes
        relation, inverse = self._relation(first, second)
        words = [f"{_pick(rng, SIZE_WORDS[s.size])} {s.colour} {s.kind}" for s in (first, second)]
        return _paraphrases(rng, self.two, count, first=words[0], second=words[1], relation=relation,
                            inverse=inverse,
                            background=scene.background)

    @staticmethod
    def _relation(first: Shape, second: Shape) -> tuple[str, str]:
        """How ``first`` sits relative to ``second`` (and the inverse), by the larger grid offset."""
        rows, columns = second.row - first.row, second.column - first.column
        if abs(columns) >= abs(rows):
            return ("left of", "right of") if columns > 0 else ("right of", "left of")
        return ("above", "below") if rows > 0 else ("below", "above")


# ---------------------------------------------------------------------------------
# patterns
# ---------------------------------------------------------------------------------
PATTERN_KINDS = ("horizontal stripes", "vertical stripes", "diagonal stripes", "checkerboard", "dots", "rings",
                 "grid", "zigzag")
SCALES = {"fine": 6, "coarse": 12}  # period in pixels
SCALE_WORDS = {"fine": ("fine", "thin", "narrow"), "coarse": ("coarse", "wide", "thick")}
REGIONS = ("whole", "left half", "right half", "top half", "bottom half")


@dataclass(frozen=True)
class PatternScene:
    kind: str
    colour: str
    background: str
    scale: str
    region: str


class Patterns(Domain):
    name = "patterns"

    templates = [  # each names the kind, both colours, the scale and the region
        "{scale} {colour} {kind} on {background}, {where}",
        "{a_colour} {colour} and {background} texture of {scale} {kind} {where}",
        "{kind} in {colour} over {a_background} {background} ground, {scale}, {where}",
        "a {scale} pattern of {colour} {kind} on {background} {where}",
        "{where_cap}: {scale} {kind}, {colour} on {background}",
        "{a_background} {background} image with {scale} {colour} {kind} {where}",
        "{colour} {kind} {where}, {scale}, on {background}",
    ]

    def sample(self, rng: np.random.Generator) -> PatternScene:
        colour, background = (list(COLOURS)[i] for i in rng.permutation(len(COLOURS))[:2])
        return PatternScene(_pick(rng, PATTERN_KINDS), colour, background, _pick(rng, list(SCALES)),
                            _pick(rng, REGIONS))

    def render(self, scene: PatternScene, rng: np.random.Generator) -> Image.Image:
        period = SCALES[scene.scale] * rng.uniform(0.85, 1.15)
        y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + rng.uniform(0, period, 2)[:, None, None]
        phase = lambda value: (value / period) % 1.0  # noqa: E731  position within one period
        if scene.kind == "horizontal stripes":
            mask = phase(y) < 0.5
        elif scene.kind == "vertical stripes":
            mask = phase(x) < 0.5
        elif scene.kind == "diagonal stripes":
            mask = phase(x + y) < 0.5
        elif scene.kind == "checkerboard":
            mask = (phase(x) < 0.5) ^ (phase(y) < 0.5)
        elif scene.kind == "dots":
            mask = (phase(x) - 0.5) ** 2 + (phase(y) - 0.5) ** 2 < 0.09
        elif scene.kind == "rings":
            centre = IMAGE_SIZE / 2 + rng.uniform(-4, 4, 2)
            mask = phase(np.hypot(x - x[0, 0] - centre[0], y - y[0, 0] - centre[1])) < 0.5
        elif scene.kind == "grid":
            mask = (phase(x) < 0.25) | (phase(y) < 0.25)
        else:  # zigzag
            mask = phase(y + period * np.abs(phase(x) - 0.5)) < 0.5
        mask &= self._region_mask(scene.region)
        colours = np.where(mask[..., None], COLOURS[scene.colour], COLOURS[scene.background]).astype(np.float32)
        colours += rng.normal(0.0, 10.0, (IMAGE_SIZE, IMAGE_SIZE, 1)).astype(np.float32)
        return Image.fromarray(np.clip(colours, 0, 255).astype(np.uint8))

    @staticmethod
    def _region_mask(region: str) -> np.ndarray:
        y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
        half = IMAGE_SIZE // 2
        return {"whole": np.ones_like(x, dtype=bool), "left half": x < half, "right half": x >= half,
                "top half": y < half, "bottom half": y >= half}[region]

    def describe(self, scene: PatternScene, rng: np.random.Generator, count: int) -> list[str]:
        where = "everywhere" if scene.region == "whole" else f"in the {scene.region}"
        return _paraphrases(rng, self.templates, count, scale=_pick(rng, SCALE_WORDS[scene.scale]), kind=scene.kind,
                            colour=scene.colour, background=scene.background, a_colour=_article(scene.colour),
                            a_background=_article(scene.background),
                            where=where, where_cap=where.capitalize())


DOMAINS: dict[str, Domain] = {domain.name: domain for domain in (Shapes(), Patterns())}


# ---------------------------------------------------------------------------------
# in memory
# ---------------------------------------------------------------------------------
def get_domain(name: str) -> Domain:
    if name not in DOMAINS:
        raise InputError(f"Unknown scene domain {name!r}; choose one of {', '.join(DOMAINS)}.")
    return DOMAINS[name]


def _item_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS[split], index])


def generate(domain: str, count: int, seed: int = 0, split: str = "train",
             captions_per_image: int = CAPTIONS_PER_IMAGE) -> tuple[list[Image.Image], list[list[str]]]:
    """``count`` images of ``domain`` and, for each, ``captions_per_image`` paraphrased captions."""
    scenes = get_domain(domain)
    images, captions = [], []
    for index in range(count):
        rng = _item_rng(seed, split, index)
        scene = scenes.sample(rng)
        images.append(scenes.render(scene, rng))
        captions.append(scenes.describe(scene, rng, captions_per_image))
    return images, captions


def generate_captions(domain: str, count: int, seed: int = 0, per_scene: int = 3) -> list[str]:
    """A caption-only corpus: ``count`` captions of scenes that are never rendered."""
    scenes = get_domain(domain)
    corpus: list[str] = []
    for index in range((count + per_scene - 1) // per_scene):
        rng = _item_rng(seed, "corpus", index)
        corpus.extend(scenes.describe(scenes.sample(rng), rng, per_scene))
    return corpus[:count]


# ---------------------------------------------------------------------------------
# on disk
# ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchmarkConfig:
    """Sizes of one generated benchmark."""

    domain: str = "shapes"
    train_images: int = 4000
    test_images: int = 1000
    corpus_captions: int = 50000
    seed: int = 0


def _matches(folder: Path, record: dict) -> bool:
    path = folder / GENERATION_RECORD
    return path.is_file() and json.loads(path.read_text()) == record


def write_split(folder: str | Path, domain: str, count: int, seed: int = 0, split: str = "train") -> Path:
    """Write ``count`` PNG images and ``metadata.jsonl`` to ``folder``; skipped when already written alike.

    ``metadata.jsonl`` and the generation record are written last (atomically), so a
    folder interrupted half-way is regenerated rather than trusted.
    """
    folder = Path(folder)
    record = {"domain": domain, "count": count, "seed": seed, "split": split, "format": FORMAT_VERSION}
    if _matches(folder, record) and (folder / METADATA).is_file():
        logger.info("%s: already generated, skipping", folder)
        return folder
    (folder / GENERATION_RECORD).unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    scenes = get_domain(domain)
    lines = []
    for index in tqdm(range(count), desc=f"{domain} {split}", unit="image", disable=count < 2000):
        rng = _item_rng(seed, split, index)
        scene = scenes.sample(rng)
        file_name = f"{index:06d}.png"
        scenes.render(scene, rng).save(folder / file_name)
        lines.append(json.dumps({"file_name": file_name, "captions": scenes.describe(scene, rng, CAPTIONS_PER_IMAGE)}))
    atomic_write_text(folder / METADATA, "\n".join(lines) + "\n")
    atomic_write_text(folder / GENERATION_RECORD, json.dumps(record))
    return folder


def write_corpus(path: str | Path, domain: str, count: int, seed: int = 0) -> Path:
    """Write a caption-only corpus, one caption per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(generate_captions(domain, count, seed)) + "\n")
    return path


def write_benchmark(root: str | Path, config: BenchmarkConfig = BenchmarkConfig()) -> dict[str, Path]:
    """Train and test image folders plus the caption corpus under ``root``; returns their paths."""
    root = Path(root)
    paths = {
        "train": write_split(root / "train", config.domain, config.train_images, config.seed, "train"),
        "test": write_split(root / "test", config.domain, config.test_images, config.seed, "test"),
    }
    corpus_record = {**asdict(config), "format": FORMAT_VERSION}
    paths["corpus"] = root / "corpus.txt"
    if not (_matches(root, corpus_record) and paths["corpus"].is_file()):
        write_corpus(paths["corpus"], config.domain, config.corpus_captions, config.seed)
        atomic_write_text(root / GENERATION_RECORD, json.dumps(corpus_record))
    return paths


def read_split(folder: str | Path) -> tuple[list[Path], list[list[str]]]:
    """Image paths and caption lists of a folder written by :func:`write_split`."""
    folder = Path(folder)
    metadata = folder / METADATA
    if not metadata.is_file():
        raise InputError(f"{folder} has no {METADATA}; generate it with xbt.demo.scenes.write_split.")
    paths, captions = [], []
    for line in metadata.read_text().splitlines():
        item = json.loads(line)
        paths.append(folder / item["file_name"])
        captions.append(item["captions"])
    return paths, captions
