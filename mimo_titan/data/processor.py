"""Image decoding, caption tokenisation and the multimodal token layout.

A sample with ``k`` image-caption pairs is laid out as::

    [BOS] ( <|begin_of_image|> <|image|> * image_tokens_per_image <|end_of_image|> [audio] caption ) * k [EOS]

where ``[audio]`` is ``<|begin_of_audio|> <|audio|> * R <|end_of_audio|>`` for a record that carries a clip
(only when the model has an audio encoder; ``R`` is the number of LM tokens the audio encoder makes of the clip).
The ``<|image|>`` / ``<|audio|>`` placeholders are where the model scatters the encoders' output embeddings, so
their count per sample must always be exactly what the encoders produce; truncation therefore only ever removes
caption tokens (and the EOS), never placeholders.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import warnings
from collections.abc import Callable, Sequence

import torch
from PIL import Image
from tokenizers import Tokenizer

from mimo_titan.config import IMAGE_NORMALIZATION
from mimo_titan.errors import ConfigError, DataError

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CorruptSampleError",
    "ImageTextProcessor",
]

#: Per-channel RGB mean and standard deviation of OpenAI CLIP's image processor: the default normalisation
#: (``model.<vision>.image_mean`` / ``image_std``; SigLIP's are 0.5 / 0.5, see ``config.IMAGE_NORMALIZATION``).
CLIP_MEAN, CLIP_STD = IMAGE_NORMALIZATION["clip"]

_CONFIG_KEY = "data.tokenizer"

logger = logging.getLogger(__name__)

# (attribute, tokenizer_config.json key, default token text)
_SPECIAL_TOKENS: tuple[tuple[str, str, str], ...] = (
    ("image_token_id", "img_token", "<|image|>"),
    ("begin_image_id", "boi_token", "<|begin_of_image|>"),
    ("end_image_id", "eoi_token", "<|end_of_image|>"),
    ("pad_id", "pad_token", "<|pad|>"),
    ("bos_id", "bos_token", "<|begin_of_text|>"),
    ("eos_id", "eos_token", "<|end_of_text|>"),
)


#: Audio special tokens (attribute, token text), added to the tokenizer at load when it lacks them.
_AUDIO_TOKENS: tuple[tuple[str, str], ...] = (
    ("audio_token_id", "<|audio|>"),
    ("begin_audio_id", "<|begin_of_audio|>"),
    ("end_audio_id", "<|end_of_audio|>"),
)


class CorruptSampleError(ValueError):
    """Raised when a sample's bytes cannot be decoded (e.g. a broken JPEG or wav)."""


def _resolve_tokenizer_file(tokenizer_path: str | os.PathLike[str]) -> str:
    p = os.fspath(tokenizer_path)
    candidate = os.path.join(p, "tokenizer.json") if os.path.isdir(p) else p
    if not os.path.isfile(candidate):
        raise DataError(
            f"{_CONFIG_KEY}={p!r}: no tokenizer.json found; set {_CONFIG_KEY} to a "
            f"directory containing a HF `tokenizers` tokenizer.json, or to the file itself"
        )
    return candidate


def _special_token_text(config: dict, key: str, default: str) -> str:
    value = config.get(key, default)
    if isinstance(value, dict):  # {"content": "<|pad|>", ...} form
        value = value.get("content", default)
    return value if isinstance(value, str) and value else default


# ------------------------------------------------------------ tokenizer repair
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: a printable character for each of the 256 bytes.

    Printable latin-1 bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for
    themselves; the other 68 bytes (controls, space, DEL, NBSP, soft hyphen, ...) are
    mapped in increasing byte order to ``chr(256)``, ``chr(257)``, ... (so the space
    ``0x20`` becomes ``Ġ`` and ``\\n`` becomes ``Ċ``). This is the alphabet that the
    ``ByteLevel`` pre-tokenizer/decoder of HF ``tokenizers`` use.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


_BYTE_TO_UNICODE: dict[int, str] = _bytes_to_unicode()
_BYTE_LEVEL_ALPHABET: frozenset[str] = frozenset(_BYTE_TO_UNICODE.values())
_ESCAPED_BYTE = re.compile(r"\\x([0-9a-f]{2})")


def _to_byte_level(data: bytes) -> str:
    return "".join(_BYTE_TO_UNICODE[b] for b in data)


def _raw_key_bytes(key: str, token_id: int) -> bytes:
    """Bytes meant by one vocabulary key of a naively exported ranked BPE."""
    if token_id < 128 and len(key) == 1 and ord(key) < 256:
        return key.encode("latin-1")  # raw single character == that byte
    escaped = _ESCAPED_BYTE.fullmatch(key)
    if escaped is not None:  # the 4-character text '\\x80' == the single byte 0x80
        return bytes([int(escaped.group(1), 16)])
    return key.encode("utf-8")


def _needs_ranked_bpe_repair(spec: dict, special_texts: frozenset[str]) -> bool:
    """True for a BPE tokenizer.json with no merges and a vocab outside the byte alphabet."""
    model = spec.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE" or model.get("merges"):
        return False
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        return False
    return any(not set(key) <= _BYTE_LEVEL_ALPHABET for key in vocab if key not in special_texts)


def _repair_ranked_bpe(spec: dict, special_texts: frozenset[str], source: str) -> dict:
    """Return a copy of ``spec`` whose BPE model is a proper byte-level BPE.

    See :class:`ImageTextProcessor` for what is repaired and why. Tokens whose text is
    in ``special_texts`` keep their key and id verbatim and take part in no merge.

    Raises:
        DataError: The vocabulary cannot be read as a ranked byte BPE (two keys mean
            the same bytes, or a single byte has no token); names ``data.tokenizer``.
    """
    vocab: dict[str, int] = spec["model"]["vocab"]
    ranks: dict[bytes, int] = {}  # token bytes -> id (== merge rank)
    new_vocab: dict[str, int] = {}
    for key, token_id in vocab.items():
        token_id = int(token_id)
        if key in special_texts:
            new_vocab[key] = token_id
            continue
        data = _raw_key_bytes(key, token_id)
        if not data or data in ranks:
            other = [k for k, i in vocab.items() if i == ranks.get(data)]
            raise DataError(
                f"{_CONFIG_KEY}: cannot repair {source!r} as a ranked byte-level BPE: "
                f"token {key!r} (id {token_id}) means the same bytes {data!r} as "
                f"{other[0] if other else 'an empty token'!r}"
            )
        ranks[data] = token_id
        new_vocab[_to_byte_level(data)] = token_id
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise DataError(
            f"{_CONFIG_KEY}: cannot repair {source!r} as a ranked byte-level BPE: no "
            f"token for the single byte(s) {[hex(b) for b in missing[:8]]}"
            f"{' ...' if len(missing) > 8 else ''}; every byte needs its own token"
        )
    if len(new_vocab) != len(vocab):  # a special key equal to a converted key
        raise DataError(
            f"{_CONFIG_KEY}: cannot repair {source!r}: a special token collides with a byte-level token text"
        )

    # Merges from ranks: a token of rank r is the merge of any split (left, right)
    # into two ranked tokens of lower rank; the merge priority is r (ties: the
    # halves' ranks), which makes HF's "lowest merge rank first" BPE equal to
    # tiktoken's "merge the adjacent pair whose concatenation has the lowest rank".
    candidates: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            left_rank, right_rank = ranks.get(left), ranks.get(right)
            if left_rank is None or right_rank is None:
                continue
            if left_rank < rank and right_rank < rank:
                candidates.append((rank, left_rank, right_rank, left, right))
    candidates.sort()
    # "left right" strings: byte-level text never contains a plain space.
    merges = [f"{_to_byte_level(a)} {_to_byte_level(b)}" for _, _, _, a, b in candidates]

    repaired = json.loads(json.dumps(spec))  # deep copy, the caller's dict stays as is
    repaired["model"].update(
        vocab=new_vocab,
        merges=merges,
        unk_token=None,
        continuing_subword_prefix=None,
        end_of_word_suffix=None,
        fuse_unk=False,
        byte_fallback=False,
        ignore_merges=False,
        dropout=None,
    )
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    pre = spec.get("pre_tokenizer")
    if isinstance(pre, dict) and pre.get("type") == "ByteLevel":
        byte_level.update({k: pre[k] for k in ("trim_offsets", "use_regex") if k in pre})
    repaired["pre_tokenizer"] = {"type": "ByteLevel", **byte_level}
    repaired["decoder"] = {"type": "ByteLevel", **byte_level}
    # "added_tokens", normalizer, post-processor: kept as shipped.
    return repaired


def _load_tokenizer(tokenizer_file: str, special_texts: frozenset[str]) -> tuple[Tokenizer, bool]:
    """Load ``tokenizer_file``, repairing a naive ranked-BPE export in memory.

    Returns:
        The tokenizer and whether it was repaired. The file is never modified.

    Raises:
        DataError: The file cannot be read or parsed, or cannot be repaired (names
            ``data.tokenizer`` and the file).
    """
    try:
        with open(tokenizer_file, encoding="utf-8") as f:
            text = f.read()
        spec = json.loads(text)
        added = spec.get("added_tokens") or []
        specials = special_texts | {t["content"] for t in added if isinstance(t, dict) and "content" in t}
        if not _needs_ranked_bpe_repair(spec, specials):
            return Tokenizer.from_str(text), False
        repaired = _repair_ranked_bpe(spec, specials, tokenizer_file)
        tokenizer = Tokenizer.from_str(json.dumps(repaired))
    except DataError:
        raise
    except ValueError as exc:
        raise DataError(
            f"{_CONFIG_KEY}: cannot load {tokenizer_file!r} as a HF `tokenizers` tokenizer.json: {exc}"
        ) from exc
    except Exception as exc:  # the Rust side raises a generic Exception; OSError for the file
        raise DataError(
            f"{_CONFIG_KEY}: cannot load {tokenizer_file!r} as a HF `tokenizers` tokenizer.json: {exc}"
        ) from exc
    logger.info(
        "%s: %s is a ranked byte BPE exported without merges; repaired in memory "
        "(%d tokens kept with their ids, %d merges derived from the ranks)",
        _CONFIG_KEY,
        tokenizer_file,
        len(repaired["model"]["vocab"]),
        len(repaired["model"]["merges"]),
    )
    return tokenizer, True


class ImageTextProcessor:
    """Turns raw image bytes and caption text into model inputs.

    Special-token texts are read from ``tokenizer_config.json`` next to
    ``tokenizer.json`` when present (keys ``img_token``, ``boi_token``, ``eoi_token``,
    ``pad_token``, ``bos_token``, ``eos_token``), else the defaults ``<|image|>``,
    ``<|begin_of_image|>``, ``<|end_of_image|>``, ``<|pad|>``, ``<|begin_of_text|>``,
    ``<|end_of_text|>`` are used.

    Tokenizer repair (ranked byte BPE exported without merges):
        Some ``tokenizer.json`` files (the project's shared one among them) are a
        naive export of a tiktoken-style *ranked* byte BPE: ids 0..127 are raw single
        characters, ids 128..255 the literal 4-character texts ``'\\\\x80'``..
        ``'\\\\xff'`` (meaning the bytes 0x80..0xff), higher ids are merged tokens
        written as plain text (``' the'``, ``'?\\n'``) whose id is their merge rank,
        ``model.merges`` is empty and the pre-tokenizer/decoder are ``ByteLevel``.
        Loaded as is, the ``ByteLevel`` pre-tokenizer produces GPT-2 byte-alphabet
        symbols (``'Ġ'`` for a space, ``'Ċ'`` for a newline, ...) that are not in the
        vocabulary and, with no unknown token, are silently dropped
        (``"Red Square"`` decodes to ``"RedSquare"``); and without merges every
        character is its own token.

        Such a file is detected (a BPE model with no merges whose non-special
        vocabulary keys are not all in the GPT-2 byte-level alphabet) and repaired in
        memory, the file itself is never written:

        1. every key is turned into the bytes it means (raw character below id 128,
           ``\\xNN`` escape, else the UTF-8 bytes of the text) and then into the
           GPT-2 byte-level alphabet (``bytes_to_unicode``: printable latin-1 bytes
           stand for themselves, the other bytes for ``chr(256 + n)``); ids are kept;
        2. merges are derived from the ranks as Hugging Face's tiktoken converter
           does: every split of a token of rank ``r`` into two vocabulary tokens of
           rank ``< r`` is a merge, ordered by ``r`` (ties by the halves' ranks), so
           that HF's BPE gives the ids of tiktoken's ranked BPE (repeatedly merge the
           adjacent pair whose concatenation has the lowest rank);
        3. the tokenizer is rebuilt with a ``ByteLevel`` pre-tokenizer (GPT-2 split
           regex, ``add_prefix_space=False``) and ``ByteLevel`` decoder; special tokens
           (``added_tokens``, ``tokenizer_config.json``'s ``added_tokens_decoder`` and
           the six layout tokens above) keep their text and id and take part in no
           merge, so caption text never produces them.

        A well-formed byte-level ``tokenizer.json`` (merges present, or keys already
        in the byte alphabet) is loaded untouched. :attr:`tokenizer_repaired` tells
        which case applied. References: GPT-2 byte-level BPE (Radford et al. 2019,
        ``bytes_to_unicode`` in openai/gpt-2 ``encoder.py``); tiktoken ranked BPE and
        the ``TikTokenConverter`` of Hugging Face ``transformers``.

    Attributes:
        tokenizer_repaired: Whether the tokenizer file was repaired on load (see
            above).

    Args:
        tokenizer_path: Directory containing ``tokenizer.json`` (HF ``tokenizers``
            format), or the path of that file (config key ``data.tokenizer``).
        image_size: Side length in pixels of the square images produced.
        image_tokens_per_image: Number of ``<|image|>`` placeholder tokens per image,
            i.e. the number of embeddings the vision encoder emits per image.
        audio_tokens: For a model with an audio encoder: the number of LM tokens the
            encoder makes of a clip of ``F`` log-mel frames (``F -> int``,
            :func:`mimo_titan.models.audio.audio_tokens`); ``None`` (no audio) ignores
            audio fields. With it, ``<|audio|>``, ``<|begin_of_audio|>`` and
            ``<|end_of_audio|>`` are added to the tokenizer as special tokens when it
            lacks them (after its last id, so existing ids do not move).
        num_mel_bins: Log-mel bins of the audio features (80 for Whisper).
        audio_max_frames: The longest clip the audio encoder takes, in log-mel frames (``2 ·
            max_source_positions``); the loader refuses a data set with a longer clip before training.
        audio_key: The audio encoder's config table, for messages (``"model.audio"``).
        image_mean: Per-channel RGB mean of the ``[0, 1]`` pixels (``model.<vision>.image_mean``), CLIP's
            by default; SigLIP uses ``(0.5, 0.5, 0.5)``.
        image_std: Per-channel RGB standard deviation (``model.<vision>.image_std``), CLIP's by default;
            SigLIP uses ``(0.5, 0.5, 0.5)``.

    Raises:
        DataError: No tokenizer file at ``tokenizer_path``; the tokenizer file or its
            ``tokenizer_config.json`` cannot be read or parsed, or it lacks a special
            token (messages name ``data.tokenizer``).
        ValueError: ``image_size`` / ``image_tokens_per_image`` is not positive; ``image_mean`` / ``image_std``
            not three values, or a std that is not positive.
    """

    def __init__(
        self,
        tokenizer_path: str | os.PathLike[str],
        image_size: int,
        image_tokens_per_image: int,
        *,
        audio_tokens: Callable[[int], int] | None = None,
        num_mel_bins: int = 80,
        audio_max_frames: int | None = None,
        audio_key: str = "model.audio",
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
    ) -> None:
        if int(image_size) <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if len(image_mean) != 3 or len(image_std) != 3 or min(image_std) <= 0:
            raise ValueError(
                f"image_mean={list(image_mean)} / image_std={list(image_std)}: give three RGB values each, "
                "every std > 0"
            )
        if int(image_tokens_per_image) <= 0:
            raise ValueError(f"image_tokens_per_image must be positive, got {image_tokens_per_image}")
        self.image_size = int(image_size)
        self.image_tokens_per_image = int(image_tokens_per_image)

        tokenizer_file = _resolve_tokenizer_file(tokenizer_path)
        config: dict = {}
        config_file = os.path.join(os.path.dirname(tokenizer_file), "tokenizer_config.json")
        if os.path.isfile(config_file):
            try:
                with open(config_file, encoding="utf-8") as f:
                    config = json.load(f)
            except (OSError, ValueError) as exc:
                raise DataError(
                    f"{_CONFIG_KEY}: cannot read {config_file!r} as JSON: {exc}; fix or "
                    f"remove that file (the default special tokens are used without it)"
                ) from exc
            if not isinstance(config, dict):
                raise DataError(
                    f"{_CONFIG_KEY}: {config_file!r} holds a JSON {type(config).__name__}, "
                    f"not an object; fix or remove that file"
                )
        special_texts = {_special_token_text(config, key, default) for _, key, default in _SPECIAL_TOKENS}
        declared = config.get("added_tokens_decoder")
        if isinstance(declared, dict):
            special_texts.update(
                t["content"] for t in declared.values() if isinstance(t, dict) and isinstance(t.get("content"), str)
            )
        self._tokenizer, self.tokenizer_repaired = _load_tokenizer(tokenizer_file, frozenset(special_texts))

        self._special_ids: dict[str, int] = {}
        for attr, key, default in _SPECIAL_TOKENS:
            text = _special_token_text(config, key, default)
            token_id = self._tokenizer.token_to_id(text)
            if token_id is None:
                raise DataError(
                    f"{_CONFIG_KEY}: tokenizer {tokenizer_file!r} has no token {text!r} "
                    f"(needed as {attr}); use a tokenizer whose vocabulary contains it"
                )
            self._special_ids[attr] = int(token_id)
        self.audio_tokens = audio_tokens
        self.num_mel_bins = int(num_mel_bins)
        self.audio_max_frames, self.audio_key = audio_max_frames, audio_key
        self.added_tokens: list[str] = []  # special tokens this processor added to the tokenizer
        if audio_tokens is not None:
            missing = [text for _, text in _AUDIO_TOKENS if self._tokenizer.token_to_id(text) is None]
            if missing:
                self._tokenizer.add_special_tokens(missing)
                self.added_tokens = missing
                logger.info("%s: added the special tokens %s to the tokenizer", _CONFIG_KEY, missing)
            for attr, text in _AUDIO_TOKENS:
                token_id = self._tokenizer.token_to_id(text)
                assert token_id is not None, f"{text} was just added to the tokenizer"
                self._special_ids[attr] = int(token_id)
        self._reserved_ids = frozenset(self._special_ids.values())
        self.image_mean = tuple(float(m) for m in image_mean)
        self.image_std = tuple(float(s) for s in image_std)
        self._mean = torch.tensor(self.image_mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(self.image_std, dtype=torch.float32).view(3, 1, 1)

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
    def audio_token_id(self) -> int:
        """Id of the ``<|audio|>`` placeholder (a processor built with ``audio_tokens`` only).

        Raises:
            AttributeError: this processor reads no audio.
        """
        if "audio_token_id" not in self._special_ids:
            raise AttributeError("this processor has no audio tokens; build it with audio_tokens=...")
        return self._special_ids["audio_token_id"]

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
    def layout_token_ids(self) -> frozenset[int]:
        """Ids of every token of the layout (placeholders, begin / end markers, pad, BOS, EOS): never caption text."""
        return self._reserved_ids

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (every id is ``< vocab_size``)."""
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    # --------------------------------------------------------------- images
    def load_image(self, data: bytes) -> torch.Tensor:
        """Decode and normalise one encoded image.

        The image is converted to RGB, resized to ``image_size x image_size`` with
        bicubic resampling (aspect ratio is not kept), scaled to ``[0, 1]`` and
        normalised per channel, ``(x - image_mean) / image_std`` (CLIP's :data:`CLIP_MEAN` /
        :data:`CLIP_STD` unless the processor was given others).

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
            reason = re.sub(r" <_io.BytesIO object at 0x[0-9a-f]+>", "", str(exc))  # the in-memory file: noise
            raise CorruptSampleError(f"cannot decode image: {reason}") from exc
        pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        pixels = pixels.view(self.image_size, self.image_size, 3).permute(2, 0, 1)
        return (pixels.to(torch.float32) / 255.0 - self._mean) / self._std

    # ---------------------------------------------------------------- audio
    def load_audio(self, data: bytes, ext: str, source: str | None = None) -> torch.Tensor:
        """Decode one clip and compute its Whisper log-mel features.

        Args:
            data: The bytes of a ``.wav`` (or ``.flac``, with ``soundfile`` installed) file.
            ext: ``"wav"`` or ``"flac"``.
            source: Where the bytes come from, for messages.

        Returns:
            ``[num_mel_bins, F]`` float32, one frame per 10 ms (:func:`mimo_titan.data.audio.log_mel`).

        Raises:
            CorruptSampleError: the bytes do not decode, or the clip is empty.
            MissingAudioPackage: (a ``DataError``) flac without ``soundfile``, or another rate than 16 kHz
                without ``scipy``.
        """
        from mimo_titan.data.audio import MissingAudioPackage, decode_audio, log_mel

        try:
            wave = decode_audio(data, ext, source)
        except MissingAudioPackage:
            raise  # the environment lacks a decoder: every such file would be dropped, so say so
        except DataError as exc:
            raise CorruptSampleError(str(exc)) from exc
        if wave.numel() < 160:
            raise CorruptSampleError(f"{source or 'an audio clip'} is shorter than one 10-ms frame")
        return log_mel(wave, self.num_mel_bins)

    # ---------------------------------------------------------------- text
    def save_tokenizer(self, path: str | os.PathLike[str]) -> None:
        """Write the tokenizer as this processor uses it (repaired merges, added audio tokens) to ``path``
        (a ``tokenizer.json``)."""
        self._tokenizer.save(os.fspath(path))

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

    def decode(self, ids: Sequence[int]) -> str:
        """The text of token ids (the inverse of :meth:`tokenize`): the layout's special tokens (placeholders,
        begin / end markers, pad, BOS, EOS) and ids the tokenizer lacks are left out.

        Args:
            ids: Token ids.

        Returns:
            The decoded text.
        """
        kept = [int(i) for i in ids if int(i) not in self._reserved_ids and 0 <= int(i) < self.vocab_size]
        return self._tokenizer.decode(kept, skip_special_tokens=True)

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
        self,
        caption_tokens: Sequence[Sequence[int]],
        max_tokens: int,
        audio_tokens: Sequence[int | None] | None = None,
    ) -> list[int]:
        """Lay out one sample's tokens, truncating captions to fit ``max_tokens``.

        Produces ``[BOS] (<|begin_of_image|> <|image|>*T <|end_of_image|> [audio] caption)*k [EOS]``
        with ``k = len(caption_tokens)``; ``[audio]`` is ``<|begin_of_audio|> <|audio|>*R
        <|end_of_audio|>`` for pair ``i`` when ``audio_tokens[i] = R`` is not None. If this is
        longer than ``max_tokens``, the EOS is dropped (the text is cut, so it does not end) and caption tokens are
        removed from the end: the last pair's caption first, then the previous one.
        Image blocks are never shortened.

        Args:
            caption_tokens: One token list per image, in image order (``k >= 1``).
            max_tokens: Maximum length of the result (``seq_len + 1`` for training).

        Returns:
            The token ids, ``len <= max_tokens``.

        The number of caption tokens removed is :meth:`caption_tokens_cut`.

        Raises:
            ValueError: ``caption_tokens`` is empty.
            ConfigError: The image blocks plus BOS alone need more than ``max_tokens``
                tokens (message names ``training.seq_len`` and its minimum).
        """
        k = len(caption_tokens)
        if k == 0:
            raise ValueError("a sample needs at least one image-caption pair")
        audio = list(audio_tokens) if audio_tokens is not None else [None] * k
        if len(audio) != k:
            raise ValueError(f"{len(audio)} audio token counts for {k} image-caption pairs")
        audio_fixed = sum(r + 2 for r in audio if r is not None)
        fixed = self.min_sequence_tokens(k) + audio_fixed
        if fixed > max_tokens:
            clips = f" and audio clips of {[r for r in audio if r is not None]} tokens" if audio_fixed else ""
            raise ConfigError(
                f"training.seq_len is too small: {k} image(s) with "
                f"{self.image_tokens_per_image} tokens each{clips} need {fixed} tokens "
                f"(BOS + begin/end markers) but only {max_tokens} "
                f"(seq_len + 1) fit; set training.seq_len >= {fixed - 1}"
            )
        total = fixed + sum(len(c) for c in caption_tokens) + 1
        add_eos = total <= max_tokens
        budget = max_tokens - fixed  # caption tokens we may keep when truncating
        block = [self.begin_image_id] + [self.image_token_id] * self.image_tokens_per_image
        out = [self.bos_id]
        for caption, clip in zip(caption_tokens, audio):
            out.extend(block)
            out.append(self.end_image_id)
            if clip is not None:
                ids = self._special_ids
                out.extend([ids["begin_audio_id"], *[ids["audio_token_id"]] * clip, ids["end_audio_id"]])
            if add_eos:
                out.extend(caption)
            else:
                kept = list(caption[: max(budget, 0)])
                budget -= len(kept)
                out.extend(kept)
        if add_eos:
            out.append(self.eos_id)
        return out

    def caption_tokens_cut(self, caption_lengths: Sequence[int], max_tokens: int, audio_fixed: int = 0) -> int:
        """Caption tokens that :meth:`build_sequence` removes to fit ``max_tokens``.

        Only caption tokens count: a sample whose captions all fit but whose EOS does
        not (``len == max_tokens + 1`` before truncation) loses its EOS and counts 0.

        Args:
            caption_lengths: Caption length in tokens of each image-caption pair.
            max_tokens: As for :meth:`build_sequence` (``seq_len + 1`` in training).
            audio_fixed: Tokens of the sample's audio blocks (``R + 2`` per clip).

        Returns:
            ``max(0, sum(caption_lengths) - (max_tokens - min_sequence_tokens(k)))``,
            the tokens dropped from the end of the captions (``0`` if nothing is cut).
        """
        budget = max_tokens - self.min_sequence_tokens(len(caption_lengths)) - audio_fixed
        return max(0, sum(caption_lengths) - max(budget, 0))
