"""Caption scores of generated text against references: exact match, BLEU-4, CIDEr-D and word error rate.

Input is a JSON-lines file, one sample per line, as ``scripts/generate.py`` writes it::

    {"key": "000042", "reference": "a dog runs on the beach", "generated": "a dog on a beach"}

Other fields of a line are ignored. A ``null`` reference (``scripts/generate.py`` writes one for a record without a
caption) marks a sample that cannot be scored: it is counted in ``no_reference`` and left out of every score.
:func:`read_samples` checks the file; :func:`evaluate` scores the samples. Every score is corpus-level (one number
for the whole file), each from a well-kept library rather than our own code:

========================  ===================================================================================
key                       meaning
========================  ===================================================================================
``exact_match``           fraction of samples whose generated text equals the reference after
                          :func:`normalize` (case-folding, runs of whitespace collapsed to one space, ends
                          stripped); in [0, 1]
``bleu4``                 corpus BLEU with 1- to 4-grams and the brevity penalty (Papineni et al. 2002, "BLEU:
                          a method for automatic evaluation of machine translation", ACL), computed by sacreBLEU
                          (Post 2018, "A call for clarity in reporting BLEU scores") with its defaults: 13a
                          tokenisation, case-sensitive, exponential smoothing; on sacreBLEU's 0-100 scale.
                          ``bleu4_signature`` is sacreBLEU's signature of those settings
``cider_d``               CIDEr-D (Vedantam, Zitnick and Parikh 2015, "CIDEr: Consensus-based image description
                          evaluation", CVPR): TF-IDF-weighted 1- to 4-gram cosine similarity with clipped counts
                          and a Gaussian length penalty (sigma 6), times 10, averaged over the samples, by the
                          COCO caption evaluation code (``pycocoevalcap.cider``, the metric authors' own). The
                          IDF weights come from the file's references, so the score depends on the whole
                          corpus: a file of one sample always scores 0 (every n-gram occurs in every
                          reference). Text is tokenised as :func:`cider_tokens` says
``wer``                   word error rate: word-level edit distance (substitutions + deletions + insertions)
                          summed over the samples, over the total number of reference words, by ``jiwer``;
                          on text after :func:`normalize` (so case does not count; punctuation does). May exceed 1
``samples``               number of samples (lines) scored
``no_reference``          number of lines with a ``null`` reference, not scored
========================  ===================================================================================

Bad input raises :class:`~mimo_titan.errors.DataError` naming the file, the line and the fix.
"""

from __future__ import annotations

import json
import os
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mimo_titan.errors import DataError

__all__ = ["Sample", "read_samples", "normalize", "cider_tokens", "exact_match", "bleu4", "cider_d", "wer", "evaluate"]

_FIELDS = ("key", "reference", "generated")


@dataclass(frozen=True)
class Sample:
    """One line of the file: the sample's key, its reference caption (None: the line has none, ``null``) and the
    model's text."""

    key: str
    reference: str | None
    generated: str


def read_samples(path: str | os.PathLike) -> list[Sample]:
    """Read a JSON-lines file of ``{"key", "reference", "generated"}`` objects (blank lines are skipped).

    Args:
        path: the file.

    Returns:
        The samples in file order.

    Raises:
        DataError: the file is missing or unreadable; it holds no sample, or no sample with a reference; a line is
            not a JSON object, lacks one of the three keys, or has a generated text that is not a string or a
            reference that is neither a string nor ``null``; a reference is empty (WER and CIDEr-D are undefined
            without one). The message names the line number (from 1).
    """
    name = os.fspath(path)
    if not os.path.isfile(name):
        what = "is a directory" if os.path.isdir(name) else "does not exist"
        raise DataError(f"{name} {what}; pass the JSON-lines file that scripts/generate.py wrote")
    samples: list[Sample] = []
    try:
        with open(name, encoding="utf-8") as fh:
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                samples.append(_parse_line(line, name, number))
    except UnicodeDecodeError as exc:
        raise DataError(f"{name} is not UTF-8 text ({exc.reason} at byte {exc.start}); write it as UTF-8") from None
    except OSError as exc:
        raise DataError(f"cannot read {name}: {exc.strerror or exc}") from None
    if not samples:
        raise DataError(
            f"{name} holds no sample; it should have one JSON object per line with keys {', '.join(_FIELDS)}"
        )
    if all(s.reference is None for s in samples):
        raise DataError(
            f"{name}: none of its {len(samples)} samples has a reference (every 'reference' is null: their records "
            "had no caption), so there is nothing to score; generate on a shard whose records carry <key>.txt captions"
        )
    return samples


def _parse_line(line: str, name: str, number: int) -> Sample:
    where = f"{name}, line {number}"
    try:
        obj: Any = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with keys {', '.join(_FIELDS)}, got {type(obj).__name__}")
    missing = [f for f in _FIELDS if f not in obj]
    if missing:
        raise DataError(f"{where}: missing key{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}")
    if not isinstance(obj["generated"], str):
        raise DataError(f"{where}: 'generated' must be a string, got {type(obj['generated']).__name__}")
    if obj["reference"] is None:  # a record without a caption: kept, not scored
        return Sample(key=str(obj["key"]), reference=None, generated=obj["generated"])
    if not isinstance(obj["reference"], str):
        raise DataError(f"{where}: 'reference' must be a string or null, got {type(obj['reference']).__name__}")
    if not obj["reference"].strip():
        raise DataError(f"{where}: 'reference' is empty; every sample needs its reference caption")
    return Sample(key=str(obj["key"]), reference=obj["reference"], generated=obj["generated"])


def normalize(text: str) -> str:
    """Case-fold ``text`` (``str.casefold``) and collapse every run of whitespace to one space, ends stripped."""
    return " ".join(text.casefold().split())


def cider_tokens(text: str) -> str:
    """The text CIDEr-D scores: case-folded, split by sacreBLEU's 13a tokeniser (punctuation becomes tokens of its
    own), tokens made only of ASCII punctuation dropped, joined by spaces.

    This stands in for the COCO evaluation's Stanford PTB tokeniser, which needs Java: that one also lower-cases
    and drops punctuation, but splits some words differently (``don't`` -> ``do n't``), so scores can differ
    slightly from the COCO server's.
    """
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    tokens = Tokenizer13a()(text.casefold()).split()
    return " ".join(t for t in tokens if not all(c in string.punctuation for c in t))


def _check_pairs(references: Sequence[str], generated: Sequence[str]) -> None:
    if len(references) != len(generated):
        raise ValueError(f"{len(references)} references but {len(generated)} generated texts; give one of each")
    if not references:
        raise ValueError("no samples to score")


def exact_match(references: Sequence[str], generated: Sequence[str]) -> float:
    """Fraction of pairs equal after :func:`normalize`, in [0, 1].

    Raises:
        ValueError: the sequences differ in length or are empty.
    """
    _check_pairs(references, generated)
    return sum(normalize(r) == normalize(g) for r, g in zip(references, generated)) / len(references)


def bleu4(references: Sequence[str], generated: Sequence[str]) -> tuple[float, str]:
    """Corpus BLEU-4 (Papineni et al. 2002) by sacreBLEU's ``corpus_bleu`` with its defaults (13a tokenisation,
    case-sensitive, exponential smoothing), one reference per sample.

    Returns:
        ``(score, signature)``: the score on 0-100 and sacreBLEU's signature of the settings (to report with it).

    Raises:
        ValueError: the sequences differ in length or are empty.
    """
    from sacrebleu.metrics import BLEU

    _check_pairs(references, generated)
    metric = BLEU()
    result = metric.corpus_score(list(generated), [list(references)])
    return float(result.score), str(metric.get_signature())


def cider_d(references: Sequence[str], generated: Sequence[str]) -> float:
    """Corpus CIDEr-D (Vedantam et al. 2015) by ``pycocoevalcap``'s ``Cider`` (n = 4, sigma = 6) on
    :func:`cider_tokens`; the mean of the per-sample scores (each on the COCO scale, 10 for a perfect match of a
    sample of at least 4 words in a corpus of at least 2 different references).

    Raises:
        ValueError: the sequences differ in length or are empty.
    """
    from pycocoevalcap.cider.cider import Cider

    _check_pairs(references, generated)
    refs = {i: [cider_tokens(r)] for i, r in enumerate(references)}
    hyps = {i: [cider_tokens(g)] for i, g in enumerate(generated)}
    score, _ = Cider().compute_score(refs, hyps)
    return float(score)


def wer(references: Sequence[str], generated: Sequence[str]) -> float:
    """Corpus word error rate by ``jiwer.wer`` on text after :func:`normalize`: the word edits (substitutions,
    deletions, insertions) of all samples over the reference words of all samples; >= 0, may exceed 1.

    Raises:
        ValueError: the sequences differ in length or are empty, or a reference is empty after normalising.
    """
    import jiwer

    _check_pairs(references, generated)
    refs = [normalize(r) for r in references]
    if not all(refs):
        raise ValueError("an empty reference has no word error rate; drop the sample or give its reference")
    return float(jiwer.wer(refs, [normalize(g) for g in generated]))


def evaluate(samples: Sequence[Sample]) -> dict[str, Any]:
    """Every score of the module docstring for the ``samples`` that have a reference (the others are counted in
    ``no_reference``).

    Returns:
        ``{"samples": int, "no_reference": int, "exact_match": float, "bleu4": float, "bleu4_signature": str,
        "cider_d": float, "wer": float}``.

    Raises:
        ValueError: no sample has a reference, or one holds an empty reference.
    """
    scored = [s for s in samples if s.reference is not None]
    refs = [s.reference for s in scored if s.reference is not None]
    gens = [s.generated for s in scored]
    bleu, signature = bleu4(refs, gens)
    return {
        "samples": len(scored),
        "no_reference": len(samples) - len(scored),
        "exact_match": exact_match(refs, gens),
        "bleu4": bleu,
        "bleu4_signature": signature,
        "cider_d": cider_d(refs, gens),
        "wer": wer(refs, gens),
    }
