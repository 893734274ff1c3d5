"""Caption scores (mimo_titan.evaluation, scripts/evaluate.py) against values computed by hand, and bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from mimo_titan.errors import DataError
from mimo_titan.evaluation import Sample, bleu4, cider_d, evaluate, exact_match, normalize, read_samples, wer

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_identical_texts_score_perfectly_up_to_case_and_whitespace():
    refs = ["A dog runs on the beach", "two cats sleep on a red sofa"]
    gens = ["a dog  runs on the BEACH\n", "two cats sleep on a red sofa"]
    assert normalize(gens[0]) == "a dog runs on the beach"
    assert exact_match(refs, gens) == 1.0
    assert wer(refs, gens) == 0.0
    assert bleu4(refs, refs)[0] == pytest.approx(100.0)
    # two different references of >= 4 words: every n-gram order matches, cosine 1 -> 10 per sample (COCO scale)
    assert cider_d(refs, gens) == pytest.approx(10.0)


def test_word_error_rate_counts_edits_over_reference_words():
    assert wer(["a b c d"], ["a x c d"]) == 0.25  # one substitution in 4 words
    # corpus level: (1 substitution + 1 deletion + 1 insertion) / (4 + 3 + 2) reference words
    assert wer(["a b c d", "e f g", "h i"], ["a b x d", "e g", "h i j"]) == pytest.approx(3 / 9)


def test_bleu4_matches_a_hand_computation():
    # clipped n-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths (brevity penalty 1); geometric mean x 100
    score, signature = bleu4(["the cat sat on a mat"], ["the cat sat on the mat"])
    assert score == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)
    assert "tok:13a" in signature and "nrefs:1" in signature
    # a shorter hypothesis pays the brevity penalty exp(1 - r / c): 5 of 6 words, all n-grams match
    short, _ = bleu4(["the cat sat on a mat"], ["the cat sat on a"])
    assert short == pytest.approx(100 * math.exp(1 - 6 / 5))


def test_cider_d_matches_a_hand_computation():
    """Two samples, so every n-gram's IDF is log(2 / 1) (an n-gram of no reference counts as in one): sample 1 is
    exact (10); sample 2 shares 3 of 4 unigrams, 2 of 3 bigrams, 1 of 2 trigrams and no 4-gram with its reference
    (equal lengths, no penalty): 10 * (3/4 + 2/3 + 1/2 + 0) / 4."""
    got = cider_d(["a b c d", "e f g h"], ["A B C D.", "e f g x"])  # case and punctuation do not count
    assert got == pytest.approx((10 + 10 * (3 / 4 + 2 / 3 + 1 / 2) / 4) / 2)
    assert cider_d(["a b c d"], ["a b c d"]) == 0.0  # one sample: every n-gram is in every reference, IDF 0


def test_evaluate_gives_every_score():
    samples = [Sample("1", "a b c d", "a b c d"), Sample("2", "e f g h", "e f g x")]
    out = evaluate(samples)
    assert out["samples"] == 2 and out["exact_match"] == 0.5 and out["wer"] == 1 / 8
    assert out["cider_d"] == pytest.approx(cider_d(["a b c d", "e f g h"], ["a b c d", "e f g x"]))
    assert out["bleu4"] == pytest.approx(bleu4(["a b c d", "e f g h"], ["a b c d", "e f g x"])[0])


def test_a_null_reference_is_counted_and_not_scored(tmp_path):
    """``scripts/generate.py`` writes ``"reference": null`` for a record without a caption: such a line is read,
    counted in ``no_reference`` and left out of every score (the file of the other lines scores the same)."""
    rows = [
        {"key": "1", "reference": "a b c d", "generated": "a b c d"},
        {"key": "2", "reference": None, "generated": "anything"},
        {"key": "3", "reference": "e f g h", "generated": "e f g x"},
    ]
    samples = read_samples(_write(tmp_path / "out.jsonl", rows))
    assert samples[1] == Sample("2", None, "anything")
    got = evaluate(samples)
    want = evaluate([Sample("1", "a b c d", "a b c d"), Sample("3", "e f g h", "e f g x")])
    assert got == {**want, "no_reference": 1} and want["no_reference"] == 0 and got["samples"] == 2


def test_evaluate_script_prints_and_writes_the_scores(tmp_path):
    rows = [
        {"key": "000001", "reference": "a b c d", "generated": "a b c d", "image": "ignored"},
        "",  # blank lines are skipped
        {"key": "000002", "reference": "e f g h", "generated": "e f g x"},
    ]
    src = _write(tmp_path / "out.jsonl", rows)
    proc = subprocess.run(
        [sys.executable, "scripts/evaluate.py", str(src), "--json", str(tmp_path / "r.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert printed == json.loads((tmp_path / "r.json").read_text())
    assert printed["samples"] == 2 and printed["exact_match"] == 0.5 and printed["wer"] == 0.125
    assert printed["cider_d"] == pytest.approx((10 + 10 * (3 / 4 + 2 / 3 + 1 / 2) / 4) / 2)


@pytest.mark.parametrize(
    "rows, message",
    [
        (None, r"missing\.jsonl does not exist"),
        ([], r"holds no sample"),
        (["", "   "], r"holds no sample"),
        ([{"key": 1, "reference": "a", "generated": "a"}, "{not json"], r"line 2: not valid JSON"),
        (["[1, 2]"], r"line 1: expected a JSON object"),
        ([{"key": 1, "reference": "a"}], r"line 1: missing key 'generated'"),
        ([{"generated": "a"}], r"line 1: missing keys 'key', 'reference'"),
        ([{"key": 1, "reference": "a", "generated": None}], r"line 1: 'generated' must be a string, got NoneType"),
        ([{"key": 1, "reference": " ", "generated": "a"}], r"line 1: 'reference' is empty"),
        ([{"key": 1, "reference": 3, "generated": "a"}], r"line 1: 'reference' must be a string or null, got int"),
        ([{"key": 1, "reference": None, "generated": "a"}] * 2, r"none of its 2 samples has a reference"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, rows, message):
    path = tmp_path / "missing.jsonl" if rows is None else _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=message):
        read_samples(path)


def test_evaluate_script_reports_bad_input_on_one_line_with_status_2(tmp_path):
    src = _write(tmp_path / "bad.jsonl", [{"key": "1", "reference": "a", "generated": "a"}, {"key": "2"}])
    proc = subprocess.run(
        [sys.executable, "scripts/evaluate.py", str(src)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"error: {src}, line 2: missing keys 'reference', 'generated'\n"
