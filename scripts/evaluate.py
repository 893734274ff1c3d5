"""Score generated captions against their references: exact match, BLEU-4, CIDEr-D and word error rate.

    python scripts/evaluate.py OUT.jsonl [--json RESULT.json]

``OUT.jsonl`` holds one JSON object per line, ``{"key", "reference", "generated"}``, as ``scripts/generate.py``
writes it (a ``null`` reference, a record without a caption, is counted in ``no_reference`` and not scored). Prints
the scores as JSON, ``{"samples", "no_reference", "exact_match", "bleu4", "bleu4_signature", "cider_d", "wer"}``, and
writes the same object to ``--json``. Exact match and WER compare text after case-folding and whitespace
normalisation; BLEU-4 is sacreBLEU's (0-100), CIDEr-D the COCO evaluation's (``pycocoevalcap``), WER jiwer's. See
:mod:`mimo_titan.evaluation` for the definitions and their sources. A missing or malformed file is one line on
stderr naming the file and line, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Score definitions and sources: mimo_titan/evaluation.py.",
    )
    parser.add_argument("samples", metavar="OUT.jsonl", help="JSON lines of {key, reference, generated}")
    parser.add_argument("--json", default=None, metavar="RESULT.json", help="also write the scores to this file")
    args = parser.parse_args(argv)

    from mimo_titan.errors import UserError
    from mimo_titan.evaluation import evaluate, read_samples

    try:
        scores = evaluate(read_samples(args.samples))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(scores, indent=2)
    print(text)
    if args.json:
        try:
            with open(args.json, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
        except OSError as exc:
            print(f"error: cannot write --json {args.json}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
