"""Image decoding, caption tokenisation and the multimodal token layout.

A sample with ``k`` image-caption pairs is laid out as::

    [BOS] ( <|begin_of_image|> <|image|> * image_tokens_per_image <|end_of_image|> caption ) * k [EOS]

The ``<|image|>`` placeholders are where the model scatters the vision encoder's
output embeddings, so their count per sample must always be exactly
``k * image_tokens_per_image``; truncation therefore only ever removes caption tokens
(and the EOS), never placeholders.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Sequence

import torch
from PIL import Image
from tokenizers import Tokenizer

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CorruptSampleError",
    "ImageTextProcessor",
]

#: Per-channel RGB mean used to normalise pixels (OpenAI CLIP).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
#: Per-channel RGB standard deviation used to normalise pixels (OpenAI CLIP).
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

_CONFIG_KEY = "data.tokenizer"

# (attribute, tokenizer_config.json key, default token text)
_SPECIAL_TOKENS: tuple[tuple[str, str, str], ...] = (
    ("image_token_id", "img_token", "<|image|>"),
    ("begin_image_id", "boi_token", "<|begin_of_image|>"),
    ("end_image_id", "eoi_token", "<|end_of_image|>"),
    ("pad_id", "pad_token", "<|pad|>"),
    ("bos_id", "bos_token", "<|begin_of_text|>"),
    ("eos_id", "eos_token", "<|end_of_text|>"),
)


class CorruptSampleError(ValueError):
    """Raised when a sample's bytes cannot be decoded (e.g. a broken JPEG)."""


def _resolve_tokenizer_file(tokenizer_path: str | os.PathLike[str]) -> str:
    p = os.fspath(tokenizer_path)
    candidate = os.path.join(p, "tokenizer.json") if os.path.isdir(p) else p
    if not os.path.isfile(candidate):
        raise FileNotFoundError(
            f"{_CONFIG_KEY}={p!r}: no tokenizer.json found; set {_CONFIG_KEY} to a "
            f"directory containing a HF `tokenizers` tokenizer.json, or to the file itself"
        )
    return candidate


def _special_token_text(config: dict, key: str, default: str) -> str:
    value = config.get(key, default)
    if isinstance(value, dict):  # {"content": "<|pad|>", ...} form
        value = value.get("content", default)
    return value if isinstance(value, str) and value else default


class ImageTextProcessor:
    """Turns raw image bytes and caption text into model inputs.

    Special-token texts are read from ``tokenizer_config.json`` next to
    ``tokenizer.json`` when present (keys ``img_token``, ``boi_token``, ``eoi_token``,
    ``pad_token``, ``bos_token``, ``eos_token``), else the defaults ``<|image|>``,
    ``<|begin_of_image|>``, ``<|end_of_image|>``, ``<|pad|>``, ``<|begin_of_text|>``,
    ``<|end_of_text|>`` are used.

    Args:
        tokenizer_path: Directory containing ``tokenizer.json`` (HF ``tokenizers``
            format), or the path of that file (config key ``data.tokenizer``).
        image_size: Side length in pixels of the square images produced.
        image_tokens_per_image: Number of ``<|image|>`` placeholder tokens per image,
            i.e. the number of embeddings the vision encoder emits per image.

    Raises:
        FileNotFoundError: No tokenizer file at ``tokenizer_path``.
        ValueError: The tokenizer file cannot be parsed or lacks a special token, or
            ``image_size`` / ``image_tokens_per_image`` is not positive.
    """

    def __init__(
        self,
        tokenizer_path: str | os.PathLike[str],
        image_size: int,
        image_tokens_per_image: int,
    ) -> None:
        if int(image_size) <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if int(image_tokens_per_image) <= 0:
            raise ValueError(
                f"image_tokens_per_image must be positive, got {image_tokens_per_image}"
            )
        self.image_size = int(image_size)
        self.image_tokens_per_image = int(image_tokens_per_image)

        tokenizer_file = _resolve_tokenizer_file(tokenizer_path)
        try:
            self._tokenizer = Tokenizer.from_file(tokenizer_file)
        except Exception as exc:  # the Rust side raises a generic Exception
            raise ValueError(
                f"{_CONFIG_KEY}: cannot load {tokenizer_file!r} as a HF `tokenizers` "
                f"tokenizer.json: {exc}"
            ) from exc

        config: dict = {}
        config_file = os.path.join(os.path.dirname(tokenizer_file), "tokenizer_config.json")
        if os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)

        self._special_ids: dict[str, int] = {}
        for attr, key, default in _SPECIAL_TOKENS:
            text = _special_token_text(config, key, default)
            token_id = self._tokenizer.token_to_id(text)
            if token_id is None:
                raise ValueError(
                    f"{_CONFIG_KEY}: tokenizer {tokenizer_file!r} has no token {text!r} "
                    f"(needed as {attr}); use a tokenizer whose vocabulary contains it"
                )
            self._special_ids[attr] = int(token_id)
        self._reserved_ids = frozenset(self._special_ids.values())
        self._mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)

    # ------------------------------------------------------------------ ids
    @property
    def image_token_id(self) -> int:
        """Id of the ``<|image|>`` placeholder token."""
        return self._special_ids["image_token_id"]

    @property
    def begin_image_id(self) -> int:
        """Id of ``<|begin_of_image|>``."""
        return self._special_ids["begin_image_id"]

    @property
    def end_image_id(self) -> int:
        """Id of ``<|end_of_image|>``."""
        return self._special_ids["end_image_id"]

    @property
    def pad_id(self) -> int:
        """Id of ``<|pad|>``, used to right-pad ``input_ids``."""
        return self._special_ids["pad_id"]

    @property
    def bos_id(self) -> int:
        """Id of ``<|begin_of_text|>``."""
        return self._special_ids["bos_id"]

    @property
    def eos_id(self) -> int:
        """Id of ``<|end_of_text|>``."""
        return self._special_ids["eos_id"]

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (every id is ``< vocab_size``)."""
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    # --------------------------------------------------------------- images
    def load_image(self, data: bytes) -> torch.Tensor:
        """Decode and normalise one encoded image.

        The image is converted to RGB, resized to ``image_size x image_size`` with
        bicubic resampling (aspect ratio is not kept), scaled to ``[0, 1]`` and
        normalised per channel with :data:`CLIP_MEAN` / :data:`CLIP_STD`.

        Args:
            data: Encoded image bytes (any format PIL can read, e.g. JPEG).

        Returns:
            Tensor of shape ``[3, image_size, image_size]``, dtype ``float32``.

        Raises:
            CorruptSampleError: The bytes cannot be decoded as an image.
        """
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # EXIF / palette / bomb warnings
                with Image.open(io.BytesIO(data)) as img:
                    img.load()
                    rgb = img.convert("RGB")
                rgb = rgb.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError) as exc:
            raise CorruptSampleError(f"cannot decode image: {exc}") from exc
        pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        pixels = pixels.view(self.image_size, self.image_size, 3).permute(2, 0, 1)
        return (pixels.to(torch.float32) / 255.0 - self._mean) / self._std

    # ---------------------------------------------------------------- text
    def tokenize(self, caption: str) -> list[int]:
        """Tokenise a caption without adding any special tokens.

        Ids of the structural special tokens (image placeholder, begin/end of image,
        pad, BOS, EOS) are removed from the result, so that caption text can never
        inject an ``<|image|>`` placeholder and break the image-token count.

        Args:
            caption: Caption text.

        Returns:
            Token ids (possibly empty).
        """
        ids = self._tokenizer.encode(caption, add_special_tokens=False).ids
        return [i for i in ids if i not in self._reserved_ids]

    # -------------------------------------------------------------- layout
    def min_sequence_tokens(self, num_images: int) -> int:
        """Tokens needed by ``num_images`` image blocks plus BOS (captions/EOS excluded).

        Args:
            num_images: Number of images in the sample.

        Returns:
            ``1 + num_images * (image_tokens_per_image + 2)``.
        """
        return 1 + num_images * (self.image_tokens_per_image + 2)

    def build_sequence(
        self, caption_tokens: Sequence[Sequence[int]], max_tokens: int
    ) -> list[int]:
        """Lay out one sample's tokens, truncating captions to fit ``max_tokens``.

        Produces ``[BOS] (<|begin_of_image|> <|image|>*T <|end_of_image|> caption)*k [EOS]``
        with ``k = len(caption_tokens)``. If this is longer than ``max_tokens``, the EOS
        is dropped (the text is cut, so it does not end) and caption tokens are
        removed from the end: the last pair's caption first, then the previous one.
        Image blocks are never shortened.

        Args:
            caption_tokens: One token list per image, in image order (``k >= 1``).
            max_tokens: Maximum length of the result (``seq_len + 1`` for training).

        Returns:
            The token ids, ``len <= max_tokens``.

        Raises:
            ValueError: ``caption_tokens`` is empty, or the image blocks plus BOS alone
                need more than ``max_tokens`` tokens (message names
                ``training.seq_len``).
        """
        k = len(caption_tokens)
        if k == 0:
            raise ValueError("a sample needs at least one image-caption pair")
        fixed = self.min_sequence_tokens(k)
        if fixed > max_tokens:
            raise ValueError(
                f"training.seq_len is too small: {k} image(s) with "
                f"{self.image_tokens_per_image} tokens each need {fixed} tokens "
                f"(BOS + begin/end-of-image markers) but only {max_tokens} "
                f"(seq_len + 1) fit; set training.seq_len >= {fixed - 1}"
            )
        total = fixed + sum(len(c) for c in caption_tokens) + 1
        add_eos = total <= max_tokens
        budget = max_tokens - fixed  # caption tokens we may keep when truncating
        block = [self.begin_image_id] + [self.image_token_id] * self.image_tokens_per_image
        out = [self.bos_id]
        for caption in caption_tokens:
            out.extend(block)
            out.append(self.end_image_id)
            if add_eos:
                out.extend(caption)
            else:
                kept = list(caption[: max(budget, 0)])
                budget -= len(kept)
                out.extend(kept)
        if add_eos:
            out.append(self.eos_id)
        return out
