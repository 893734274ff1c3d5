"""A synthetic, learnable captioning dataset: coloured shapes captioned with their colour and shape.

Each sample is one RGB image of a single filled shape (a dot, a bar or a large square) in one of three colours, at a
random position and size on a random grey background, captioned ``"a <colour> <shape>"``. A model that
learned to see gets the caption right; one that did not is right by chance (1 / (colours × shapes)). Used by the
learnability test, the first-run guide (``scripts/make_shapes_data.py``) and ``train_configs/shapes_tiny.toml``.

Written as WebDataset shards (``<key>.png`` + ``<key>.txt``, see :mod:`mimo_titan.data.webdataset`), so it goes
through the same loader as real data. Deterministic: the same ``seed`` gives the same bytes.
"""

from __future__ import annotations

import io
import os
import random
import tarfile
from collections.abc import Sequence

__all__ = ["COLOURS", "SHAPES", "draw_shape", "shapes_caption", "write_shapes_shard"]

#: colour name -> RGB (0-255)
COLOURS: dict[str, tuple[int, int, int]] = {"red": (215, 35, 35), "green": (35, 165, 55), "blue": (35, 75, 215)}
#: shape names (see :func:`draw_shape`)
SHAPES: tuple[str, ...] = ("dot", "bar", "square")


def shapes_caption(colour: str, shape: str) -> str:
    """The caption of a sample: ``"a <colour> <shape>"``."""
    return f"a {colour} {shape}"


def draw_shape(colour: str, shape: str, *, image_size: int, rng: random.Random):
    """One ``image_size`` × ``image_size`` RGB ``PIL.Image``: a random grey background with a little per-channel
    tint, and one filled ``shape`` in ``colour`` (a key of :data:`COLOURS`, one of :data:`SHAPES`) at a random place:
    a ``dot`` (a disc of radius 12-19 % of the side), a ``bar`` (19-25 % of the side high, the whole width) or a
    ``square`` (69-88 % of the side, at most ``image_size - 3`` pixels). Every shape keeps a 1-pixel margin. The three
    shapes differ in extent, which a tiny ViT learns within tens of steps (circles, squares and triangles of one size
    hang on a few edge pixels and are learned far more slowly).

    Raises:
        ValueError: an unknown colour or shape, or ``image_size`` < 16 pixels.
    """
    from PIL import Image, ImageDraw

    if colour not in COLOURS or shape not in SHAPES:
        raise ValueError(f"colour {colour!r} / shape {shape!r}: choose from {list(COLOURS)} and {list(SHAPES)}")
    if image_size < 16:
        raise ValueError(f"image_size={image_size}: at least 16 pixels")
    n = image_size
    grey = rng.randint(90, 200)
    img = Image.new("RGB", (n, n), tuple(min(255, max(0, grey + rng.randint(-20, 20))) for _ in range(3)))
    draw, fill = ImageDraw.Draw(img), COLOURS[colour]
    if shape == "dot":
        r = rng.randint(max(2, n * 4 // 32), max(2, n * 6 // 32))
        x, y = rng.randint(r + 1, n - r - 2), rng.randint(r + 1, n - r - 2)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "bar":
        h = rng.randint(n * 6 // 32, n * 8 // 32)
        y = rng.randint(1, n - h - 2)
        draw.rectangle([1, y, n - 2, y + h], fill=fill)
    else:
        side = rng.randint(n * 22 // 32, min(n * 28 // 32, n - 3))  # a 1-pixel margin (the bound bites at 16 only)
        x, y = rng.randint(1, n - side - 2), rng.randint(1, n - side - 2)
        draw.rectangle([x, y, x + side, y + side], fill=fill)
    return img


def write_shapes_shard(
    path: str | os.PathLike[str],
    *,
    num_samples: int,
    seed: int,
    image_size: int = 32,
    colours: Sequence[str] = tuple(COLOURS),
    shapes: Sequence[str] = SHAPES,
) -> list[tuple[str, str]]:
    """Write a WebDataset shard of ``num_samples`` coloured-shape images (PNG) and their captions.

    The classes cycle through every (colour, shape) pair in a seeded random order, so any ``num_samples`` >= the
    number of pairs holds every class, in near-equal counts.

    Args:
        path: the ``.tar`` file to write (its directory must exist).
        num_samples: samples to write (>= 1).
        seed: seed of every random choice (classes, positions, sizes, backgrounds).
        image_size: image side in pixels.
        colours: colour names (keys of :data:`COLOURS`).
        shapes: shape names (of :data:`SHAPES`).

    Returns:
        ``[(key, caption)]`` in shard order.

    Raises:
        ValueError: ``num_samples`` < 1, ``image_size`` < 16, an unknown colour or shape (before the file is opened).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples}: write at least one sample")
    unknown = [c for c in colours if c not in COLOURS] + [x for x in shapes if x not in SHAPES]
    if unknown or not colours or not shapes:
        raise ValueError(f"colours {list(colours)} / shapes {list(shapes)}: choose from {list(COLOURS)} and {SHAPES}")
    if image_size < 16:
        raise ValueError(f"image_size={image_size}: at least 16 pixels")
    rng = random.Random(seed)
    classes = [(c, s) for c in colours for s in shapes]
    out = []
    with tarfile.open(path, "w") as tar:
        order: list[tuple[str, str]] = []
        for i in range(num_samples):
            if not order:
                order = rng.sample(classes, len(classes))
            colour, shape = order.pop()
            key = f"{seed:04d}{i:06d}"
            buf = io.BytesIO()
            draw_shape(colour, shape, image_size=image_size, rng=rng).save(buf, format="PNG")
            caption = shapes_caption(colour, shape)
            for name, data in ((f"{key}.png", buf.getvalue()), (f"{key}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            out.append((key, caption))
    return out
