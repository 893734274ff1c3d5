"""A synthetic, learnable captioning dataset: coloured shapes captioned with their colour and shape.

Each sample is one RGB image of a single filled shape (circle, square or triangle) in one of a few colours, at a
random position and size on a random pale background with noise, captioned ``"a <colour> <shape>"``. A model that
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
COLOURS: dict[str, tuple[int, int, int]] = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220)}
#: shape names
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")


def shapes_caption(colour: str, shape: str) -> str:
    """The caption of a sample: ``"a <colour> <shape>"``."""
    return f"a {colour} {shape}"


def draw_shape(colour: str, shape: str, *, image_size: int, rng: random.Random):
    """One ``image_size`` × ``image_size`` RGB ``PIL.Image`` of a filled ``shape`` in ``colour`` (a key of
    :data:`COLOURS`, one of :data:`SHAPES`), 40-80 % of the side, at a random place on a pale, noisy background.

    Raises:
        ValueError: an unknown colour or shape, or ``image_size`` < 8 pixels.
    """
    from PIL import Image, ImageDraw

    if colour not in COLOURS or shape not in SHAPES:
        raise ValueError(f"colour {colour!r} / shape {shape!r}: choose from {list(COLOURS)} and {list(SHAPES)}")
    if image_size < 8:
        raise ValueError(f"image_size={image_size}: at least 8 pixels")
    background = tuple(rng.randint(190, 250) for _ in range(3))
    img = Image.new("RGB", (image_size, image_size), background)
    for _ in range(image_size * image_size // 8):  # light speckle noise
        x, y = rng.randrange(image_size), rng.randrange(image_size)
        img.putpixel((x, y), tuple(max(0, c - rng.randint(0, 40)) for c in background))
    side = rng.randint(int(0.4 * image_size), int(0.8 * image_size))
    x0, y0 = rng.randint(0, image_size - side), rng.randint(0, image_size - side)
    box = (x0, y0, x0 + side - 1, y0 + side - 1)
    draw = ImageDraw.Draw(img)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0 + side // 2, y0), (x0, y0 + side - 1), (x0 + side - 1, y0 + side - 1)], fill=fill)
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
        ValueError: ``num_samples`` < 1, an unknown colour or shape.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples}: write at least one sample")
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
