"""Tests for mimo_titan.data.packing (THD sequence packing for context parallelism)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from _tiny import BASE, tiny_config_dict
from kernels import zigzag_shard_thd, zigzag_unshard_thd
from mimo_titan.config import ConfigError, config_from_dict
from mimo_titan.data import IGNORE_INDEX, ImageTextProcessor, MimoDataLoader, Sample, collate, local_batch
from mimo_titan.data.packing import PackedBatch, concat_packed_batches, pack

DATA = Path(BASE["data"]["path"])
TOKENIZER = Path(BASE["data"]["tokenizer"])
IMAGE_SIZE = BASE["model"]["vision"]["image_size"]
TPI = (IMAGE_SIZE // BASE["model"]["vision"]["patch_size"]) ** 2  # image tokens per image, as build_processor

pytestmark = pytest.mark.skipif(
    not (DATA.exists() and (TOKENIZER / "tokenizer.json").exists()),
    reason="shared CC12M shard / tokenizer not available",
)


@pytest.fixture(scope="module")
def proc() -> ImageTextProcessor:
    return ImageTextProcessor(TOKENIZER, IMAGE_SIZE, TPI)


@pytest.fixture(scope="module")
def real_samples(proc) -> list[Sample]:
    """16 samples of 1-2 images exactly as the training loader builds them (seq_len 48: <= 49 tokens each)."""
    loader = MimoDataLoader(
        str(DATA),
        proc,
        global_batch_size=4,
        seq_len=48,
        max_images_per_sample=2,
        shuffle=False,
        seed=BASE["job"]["seed"],
    )
    samples = [loader._next_sample() for _ in range(16)]
    assert {s.num_images for s in samples} == {1, 2}
    return samples


def make_sample(proc, sample_id: int, caption_lens: list[int], fill: float | None = None) -> Sample:
    """A hand-made sample in the processor's layout with distinct captions and constant images."""
    caps = [[100 + 10 * sample_id + j for j in range(n)] for n in caption_lens]
    tokens = proc.build_sequence(caps, 10_000) if caps else [proc.bos_id, 7, 8, proc.eos_id]
    value = float(sample_id) if fill is None else fill
    pixels = torch.full((len(caps), 3, IMAGE_SIZE, IMAGE_SIZE), value)
    return Sample(tokens, pixels, sample_id, proc.image_token_id, TPI)


def do_pack(proc, samples, seq_len, multiple=1) -> PackedBatch:
    return pack(samples, seq_len, proc.pad_id, proc.image_token_id, multiple=multiple)


def documents(pb: PackedBatch):
    """(row, doc index, start, real length, padded end) of every real document."""
    for r in range(len(pb)):
        cu, real = pb.cu_seqlens[r].tolist(), pb.cu_seqlens_unpadded[r].tolist()
        for d in range(len(pb.sample_ids[r])):
            yield r, d, cu[d], real[d + 1] - real[d], cu[d + 1]


def check_invariants(pb: PackedBatch, proc, samples: list[Sample], multiple: int) -> None:
    """Everything that must hold for any packed batch of ``samples``."""
    R, S = pb.input_ids.shape
    by_id = {s.sample_id: s for s in samples}
    assert sorted(i for ids in pb.sample_ids for i in ids) == sorted(by_id)
    for t in (pb.input_ids, pb.labels, pb.position_ids, pb.doc_ids):
        assert t.dtype == torch.int64 and t.shape == (R, S)
    assert pb.images_per_row.dtype == torch.int64 and pb.images_per_row.shape == (R,)
    assert pb.pixel_values.dtype == torch.float32
    offsets = [0, *torch.cumsum(pb.images_per_row, 0).tolist()]
    for r in range(R):
        cu = pb.cu_seqlens[r]
        assert cu.dtype == torch.int32 and pb.cu_seqlens_unpadded[r].dtype == torch.int32
        assert cu[0] == 0 and cu[-1] == S
        assert ((cu[1:] - cu[:-1]) % multiple == 0).all()
        # doc_ids are the cu_seqlens segments
        seg = torch.repeat_interleave(torch.arange(cu.numel() - 1), (cu[1:] - cu[:-1]).long())
        assert torch.equal(pb.doc_ids[r], seg)
        # images follow their documents, in document order
        row_images = pb.pixel_values[offsets[r] : offsets[r + 1]]
        assert torch.equal(row_images, torch.cat([by_id[i].pixel_values for i in pb.sample_ids[r]]))
        assert int((pb.input_ids[r] == proc.image_token_id).sum()) == int(pb.images_per_row[r]) * TPI
    real = pb.real_token_mask()
    for r, d, start, n, end in documents(pb):
        seq = list(by_id[pb.sample_ids[r][d]].tokens)
        assert pb.input_ids[r, start : start + n].tolist() == seq[:n]
        assert pb.position_ids[r, start : start + n].tolist() == list(range(n))
        # padding of the document: pad_id, ignored, positions continuing the document's, same document
        assert (pb.input_ids[r, start + n : end] == proc.pad_id).all()
        assert (pb.labels[r, start + n : end] == IGNORE_INDEX).all()
        assert pb.position_ids[r, start + n : end].tolist() == list(range(n, end - start))
        assert real[r, start : start + n].all() and not real[r, start + n : end].any()
    # tail padding document (if any): only padding
    for r in range(R):
        if pb.cu_seqlens[r].numel() - 1 > len(pb.sample_ids[r]):
            tail = int(pb.cu_seqlens[r][-2])
            assert (pb.input_ids[r, tail:] == proc.pad_id).all() and (pb.labels[r, tail:] == IGNORE_INDEX).all()
            assert pb.position_ids[r, tail:].tolist() == list(range(S - tail)) and not real[r, tail:].any()
    # labels never cross documents: every target is the next token of the same document
    r_idx, t_idx = torch.nonzero(pb.labels != IGNORE_INDEX, as_tuple=True)
    inner = t_idx < S - 1  # a document truncated to S tokens keeps a target beyond the row
    assert torch.equal(pb.doc_ids[r_idx[inner], t_idx[inner]], pb.doc_ids[r_idx[inner], t_idx[inner] + 1])
    assert torch.equal(pb.labels[r_idx[inner], t_idx[inner]], pb.input_ids[r_idx[inner], t_idx[inner] + 1])
    assert real[r_idx, t_idx].all()
    assert (pb.labels != proc.image_token_id).all()


# ------------------------------------------------------------------------------------------------ tests
def test_first_fit_order_and_cu_seqlens(proc):
    # lengths: 8 + caption (1 image of TPI=4 tokens + BOS/BOI/EOI/EOS); a text-only sample of 4
    lens = {0: 10, 1: 16, 2: 12, 3: 8, 4: 14, 5: 4}
    samples = [make_sample(proc, i, [n - 8] if n >= 8 else []) for i, n in lens.items()]
    assert [len(s.tokens) for s in samples] == list(lens.values())
    pb = do_pack(proc, samples, seq_len=24)
    # first fit in sample order: 0 -> row0, 1 -> row1, 2 -> row0 (22), 3 -> row1 (24), 4 -> row2, 5 -> row2
    assert pb.sample_ids == [[0, 2], [1, 3], [4, 5]]
    assert [c.tolist() for c in pb.cu_seqlens] == [[0, 10, 22, 24], [0, 16, 24], [0, 14, 18, 24]]
    assert [c.tolist() for c in pb.cu_seqlens_unpadded] == [[0, 10, 22, 22], [0, 16, 24], [0, 14, 18, 18]]
    assert pb.images_per_row.tolist() == [2, 2, 1]
    assert pb.doc_ids[0].tolist() == [0] * 10 + [1] * 12 + [2] * 2
    assert pb.position_ids[2].tolist() == list(range(14)) + list(range(4)) + list(range(6))  # tail: 0..5
    assert pb.input_ids[0].tolist() == list(samples[0].tokens) + list(samples[2].tokens) + [proc.pad_id] * 2
    # labels: next token within the document; image targets, document ends and padding ignored
    expected = []
    for s in (samples[0], samples[2]):
        t = list(s.tokens)
        expected += [IGNORE_INDEX if x == proc.image_token_id else x for x in t[1:]] + [IGNORE_INDEX]
    assert pb.labels[0].tolist() == expected + [IGNORE_INDEX] * 2
    assert pb.pixel_values[:, 0, 0, 0].tolist() == [0.0, 2.0, 1.0, 3.0, 4.0]  # row-major document order
    check_invariants(pb, proc, samples, 1)
    # deterministic
    again = do_pack(proc, samples, seq_len=24)
    assert torch.equal(again.input_ids, pb.input_ids) and again.sample_ids == pb.sample_ids


def test_real_samples_labels_positions_loss_tokens(proc, real_samples):
    pb = do_pack(proc, real_samples, seq_len=128)
    assert len(pb) < len(real_samples)  # several documents per row
    assert max(len(ids) for ids in pb.sample_ids) >= 2
    check_invariants(pb, proc, real_samples, 1)
    # every document is laid out exactly as collate lays the sample out alone (tokens, labels)
    by_id = {s.sample_id: s for s in real_samples}
    for r, d, start, n, _ in documents(pb):
        alone = collate([by_id[pb.sample_ids[r][d]]], n, proc.pad_id)
        assert torch.equal(pb.input_ids[r, start : start + n], alone.input_ids[0])
        assert torch.equal(pb.labels[r, start : start + n], alone.labels[0])
        assert pb.labels[r, start + n - 1] == IGNORE_INDEX  # no prediction across documents
        assert pb.position_ids[r, start] == 0
    # loss tokens: the sum over documents of their own
    own = sum(collate([s], 128, proc.pad_id).num_loss_tokens() for s in real_samples)
    assert pb.num_loss_tokens() == own == collate(real_samples, 128, proc.pad_id).num_loss_tokens()


def test_one_document_per_row_equals_collate(proc, real_samples):
    # at S = 48 no two loader samples (>= 33 tokens) share a row; 49-token samples are truncated like collate
    pb = do_pack(proc, real_samples, seq_len=48)
    ref = collate(real_samples, 48, proc.pad_id)
    assert len(pb) == len(real_samples) and pb.sample_ids == [[s.sample_id] for s in real_samples]
    assert any(len(s.tokens) == 49 for s in real_samples)
    assert torch.equal(pb.input_ids, ref.input_ids)
    assert torch.equal(pb.labels, ref.labels)
    assert torch.equal(pb.pixel_values, ref.pixel_values)
    assert torch.equal(pb.images_per_row, ref.images_per_sample)
    assert pb.num_loss_tokens() == ref.num_loss_tokens()
    check_invariants(pb, proc, real_samples, 1)


@pytest.mark.parametrize("multiple", [2, 4, 8])
def test_padding_to_multiple_and_zigzag(proc, real_samples, multiple):
    pb = do_pack(proc, real_samples, seq_len=128, multiple=multiple)
    check_invariants(pb, proc, real_samples, multiple)
    assert any(n % multiple for _, _, _, n, _ in documents(pb))  # some documents really were padded
    unpadded = do_pack(proc, real_samples, seq_len=128)
    assert pb.num_loss_tokens() == unpadded.num_loss_tokens()
    cp = multiple // 2
    for r in range(len(pb)):
        x = torch.stack([pb.input_ids[r], pb.labels[r], pb.position_ids[r]], dim=1)  # [S, 3]
        shards = []
        for rank in range(cp):
            local, local_cu = zigzag_shard_thd(x, pb.cu_seqlens[r], cp, rank, backend="torch")
            assert local.shape == (128 // cp, 3) and torch.equal(local_cu, pb.cu_seqlens[r] // cp)
            shards.append(local)
        assert torch.equal(zigzag_unshard_thd(torch.cat(shards), pb.cu_seqlens[r], cp, backend="torch"), x)
    # without the padding, zigzag rejects the rows (some document length is not a multiple of 2 * cp)
    bad = next(r for r in range(len(unpadded)) if (unpadded.cu_seqlens[r].diff() % multiple).any())
    with pytest.raises(ValueError, match="pad_cu_seqlens"):
        zigzag_shard_thd(unpadded.input_ids[bad], unpadded.cu_seqlens[bad], cp, 0, backend="torch")


def test_block_diagonal_attention_equals_per_document(proc, real_samples):
    """Packed attention with the document mask == attention of each document alone (real tokens)."""
    pb = do_pack(proc, real_samples[:6], seq_len=128, multiple=4)
    R, S = pb.input_ids.shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(R, 2, S, 8, generator=g) for _ in range(3))
    mask = pb.attention_mask()
    assert mask.shape == (R, S, S) and mask.dtype == torch.bool
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1))
    real = pb.real_token_mask()
    assert not (mask & ~real.unsqueeze(1) & real.unsqueeze(2)).any()  # real queries never see padding
    for r, _, start, n, _ in documents(pb):
        sl = slice(start, start + n)
        alone = F.scaled_dot_product_attention(
            q[r : r + 1, :, sl], k[r : r + 1, :, sl], v[r : r + 1, :, sl], is_causal=True
        )
        torch.testing.assert_close(out[r : r + 1, :, sl], alone)


def test_truncation(proc):
    long = make_sample(proc, 0, [30])  # 38 tokens
    short = make_sample(proc, 1, [2])  # 10 tokens
    pb = do_pack(proc, [long, short], seq_len=16)
    seq = list(long.tokens)
    assert pb.sample_ids == [[0], [1]]
    assert pb.input_ids[0].tolist() == seq[:16]
    assert pb.labels[0, -1] == seq[16]  # the first dropped token stays the target, as in collate
    cut = Sample(seq[:17], long.pixel_values, 0, proc.image_token_id, TPI)  # collate takes <= seq_len + 1 tokens
    assert torch.equal(pb.labels[0], collate([cut], 16, proc.pad_id).labels[0])
    check_invariants(pb, proc, [long, short], 1)
    # truncation never cuts <|image|> placeholders: it raises instead
    two = make_sample(proc, 2, [3, 3])  # BOS + 2 * (BOI + 4 + EOI + 3) + EOS = 20 tokens
    with pytest.raises(ValueError, match=r"would cut 4 <\|image\|> placeholder"):
        do_pack(proc, [two], seq_len=10)
    with pytest.raises(ValueError, match=r"would cut 3 <\|image\|> placeholder"):
        do_pack(proc, [two], seq_len=12)
    # a sample laid out for the row length (as the loader does: build_sequence(..., seq_len + 1)) fits
    fitted = Sample(proc.build_sequence([[120, 121, 122]] * 2, 13), two.pixel_values, 2, proc.image_token_id, TPI)
    pb = do_pack(proc, [fitted], seq_len=12)
    assert pb.input_ids[0].tolist() == list(fitted.tokens)[:12]
    assert torch.equal(pb.labels, collate([fitted], 12, proc.pad_id).labels)


def test_slice(proc, real_samples):
    pb = do_pack(proc, real_samples, seq_len=128, multiple=4)
    assert len(pb) >= 3
    offsets = [0, *torch.cumsum(pb.images_per_row, 0).tolist()]
    part = pb.slice(1, 3)
    assert len(part) == 2
    assert torch.equal(part.input_ids, pb.input_ids[1:3]) and torch.equal(part.labels, pb.labels[1:3])
    assert torch.equal(part.position_ids, pb.position_ids[1:3]) and torch.equal(part.doc_ids, pb.doc_ids[1:3])
    assert part.cu_seqlens == pb.cu_seqlens[1:3] and part.sample_ids == pb.sample_ids[1:3]
    assert torch.equal(part.pixel_values, pb.pixel_values[offsets[1] : offsets[3]])
    assert torch.equal(part.images_per_row, pb.images_per_row[1:3])
    ids = {i for row in part.sample_ids for i in row}
    check_invariants(part, proc, [s for s in real_samples if s.sample_id in ids], 4)
    assert sum(pb.slice(i, i + 1).num_loss_tokens() for i in range(len(pb))) == pb.num_loss_tokens()
    empty = pb.slice(2, 2)
    assert len(empty) == 0 and empty.pixel_values.shape[0] == 0 and empty.num_loss_tokens() == 0
    assert pb.slice(0, len(pb)).sample_ids == pb.sample_ids
    for bad in ((-1, 1), (2, 1), (0, len(pb) + 1)):
        with pytest.raises(ValueError, match="invalid row range"):
            pb.slice(*bad)
    moved = pb.to("cpu")
    assert torch.equal(moved.input_ids, pb.input_ids) and moved.cu_seqlens[0].dtype == torch.int32


def test_errors(proc):
    s0, s1 = make_sample(proc, 0, [2]), make_sample(proc, 1, [3])
    with pytest.raises(ValueError, match="at least one sample"):
        do_pack(proc, [], 16)
    with pytest.raises(ValueError, match=r"training.seq_len=18 must be a multiple of 4"):
        do_pack(proc, [s0], 18, multiple=4)
    with pytest.raises(ValueError, match=r"training\.seq_len must be positive"):
        do_pack(proc, [s0], 0)
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="multiple must be a positive int"):
            do_pack(proc, [s0], 16, multiple=bad)
    with pytest.raises(ValueError, match="image_token_id"):
        pack([s0, s1], 16, proc.pad_id, proc.image_token_id + 1)
    other_tpi = Sample(s1.tokens, s1.pixel_values, 1, proc.image_token_id, TPI + 1)
    with pytest.raises(ValueError, match="image_tokens_per_image"):
        do_pack(proc, [s0, other_tpi], 16)
    wrong_count = Sample(s0.tokens, torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE), 5, proc.image_token_id, TPI)
    with pytest.raises(ValueError, match=r"sample 5: 4 <\|image\|> tokens but 2 image\(s\) x 4 = 8"):
        do_pack(proc, [wrong_count], 16)
    small = Sample(s1.tokens, torch.zeros(1, 3, 16, 16), 6, proc.image_token_id, TPI)
    with pytest.raises(ValueError, match="same shape"):
        do_pack(proc, [s0, small], 16)
    with pytest.raises(ValueError, match="sample 7 has no tokens"):
        do_pack(proc, [Sample([], torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE), 7, proc.image_token_id, TPI)], 16)


# ------------------------------------------------------------------------- positions and the mask
def text_sample(proc, sample_id: int, n: int) -> Sample:
    """A text-only sample of ``n`` tokens (BOS, ``n - 2`` caption tokens, EOS), no images."""
    tokens = [proc.bos_id] + [100 + 10 * sample_id + j for j in range(n - 2)] + [proc.eos_id]
    return Sample(tokens, torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE), sample_id, proc.image_token_id, TPI)


def test_module_docstring_example(proc):
    """The layout table of the module docstring: documents of 6 and 3 tokens, multiple 4, S = 16."""
    a, b = text_sample(proc, 0, 6), text_sample(proc, 1, 3)
    pb = do_pack(proc, [a, b], seq_len=16, multiple=4)
    assert [c.tolist() for c in pb.cu_seqlens] == [[0, 8, 12, 16]]
    assert [c.tolist() for c in pb.cu_seqlens_unpadded] == [[0, 6, 9, 9]]
    assert pb.doc_ids[0].tolist() == [0] * 8 + [1] * 4 + [2] * 4
    assert pb.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 0, 1, 2, 3]
    P = proc.pad_id
    assert pb.input_ids[0].tolist() == list(a.tokens) + [P, P] + list(b.tokens) + [P] + [P] * 4
    assert pb.labels[0].tolist() == list(a.tokens[1:]) + [IGNORE_INDEX] * 3 + list(b.tokens[1:]) + [IGNORE_INDEX] * 6
    check_invariants(pb, proc, [a, b], 4)


def position_mask(doc: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """bool ``[S, S]``: the order-free mask ``doc_q == doc_k and pos_k <= pos_q`` (as context parallelism builds it)."""
    return (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])


@pytest.mark.parametrize("multiple", [1, 4, 8])
def test_positions_increase_per_document_and_give_the_mask(proc, real_samples, multiple):
    pb = do_pack(proc, real_samples, seq_len=128, multiple=multiple)
    padded_docs = sum(1 for _, _, _, n, end_minus in documents(pb) if n % multiple)
    assert multiple == 1 or padded_docs > 0  # in-document padding really occurs
    assert any(c.numel() - 1 > len(ids) for c, ids in zip(pb.cu_seqlens, pb.sample_ids))  # and tail padding
    mask = pb.attention_mask()
    g = torch.Generator().manual_seed(multiple)
    for r in range(len(pb)):
        doc, pos = pb.doc_ids[r], pb.position_ids[r]
        for d in doc.unique().tolist():
            p = pos[doc == d]
            assert p[0] == 0 and (p.diff() > 0).all(), (r, d, p.tolist())
        assert torch.equal(position_mask(doc, pos), mask[r])
        # the mask depends on (doc, pos) only, not on the order of the tokens (CP reorders them)
        perm = torch.randperm(pb.seq_len, generator=g)
        assert torch.equal(position_mask(doc[perm], pos[perm]), mask[r][perm][:, perm])


# ------------------------------------------------------------------------- PackedBatch as a Batch
def assert_packed_equal(a: PackedBatch, b: PackedBatch) -> None:
    for f in ("input_ids", "labels", "position_ids", "doc_ids", "pixel_values", "images_per_row"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    for f in ("cu_seqlens", "cu_seqlens_unpadded"):
        x, y = getattr(a, f), getattr(b, f)
        assert len(x) == len(y) and all(torch.equal(u, v) for u, v in zip(x, y)), f
    assert a.sample_ids == b.sample_ids


def test_images_per_sample_alias_and_local_batch(proc, real_samples):
    pb = do_pack(proc, real_samples, seq_len=128, multiple=4)
    assert len(pb) == 8 and len(set(pb.images_per_row.tolist())) > 1  # rows with different image counts
    assert max(len(ids) for ids in pb.sample_ids) >= 2
    assert pb.images_per_sample is pb.images_per_row
    with pytest.raises(AttributeError):
        pb.images_per_sample = pb.images_per_row
    offsets = [0, *torch.cumsum(pb.images_per_row, 0).tolist()]
    # 2 microbatches of 4 rows, 2 dp ranks of 2 rows each per microbatch
    expected_rows = {0: [0, 1, 4, 5], 1: [2, 3, 6, 7]}
    parts = {}
    for rank, rows in expected_rows.items():
        lb = local_batch(pb, microbatches=2, dp_rank=rank, dp_size=2)
        parts[rank] = lb
        assert isinstance(lb, PackedBatch) and len(lb) == 4
        assert lb.sample_ids == [pb.sample_ids[i] for i in rows]
        assert torch.equal(lb.input_ids, pb.input_ids[rows]) and torch.equal(lb.position_ids, pb.position_ids[rows])
        assert all(torch.equal(c, pb.cu_seqlens[i]) for c, i in zip(lb.cu_seqlens, rows))
        assert torch.equal(lb.images_per_sample, pb.images_per_row[rows])
        img_rows = [j for i in rows for j in range(offsets[i], offsets[i + 1])]
        assert torch.equal(lb.pixel_values, pb.pixel_values[img_rows])
        ids = {i for row in lb.sample_ids for i in row}
        check_invariants(lb, proc, [s for s in real_samples if s.sample_id in ids], 4)
    # chunk m of every rank, concatenated over ranks and then over m, is the global batch
    rebuilt = concat_packed_batches([parts[r].slice(2 * m, 2 * m + 2) for m in range(2) for r in range(2)])
    assert_packed_equal(rebuilt, pb)
    assert_packed_equal(local_batch(pb, 1, 0, 1), pb)
    with pytest.raises(ValueError, match="different row lengths"):
        concat_packed_batches([pb, do_pack(proc, real_samples[:2], seq_len=64)])
    with pytest.raises(ValueError, match="at least one"):
        concat_packed_batches([])


# ------------------------------------------------------------------------- the packing loader
def packed_loader(proc, **kw) -> MimoDataLoader:
    args = {
        "global_batch_size": 4,
        "seq_len": 128,
        "max_images_per_sample": 2,
        "shuffle": True,
        "seed": BASE["job"]["seed"],
        "packing": True,
    }
    args.update(kw)
    return MimoDataLoader(str(DATA), proc, **args)


def sample_stream(proc, n: int, **kw) -> list[Sample]:
    """The first ``n`` samples of the stream of ``packed_loader(proc, **kw)``, one at a time."""
    loader = packed_loader(proc, **kw)
    return [loader._next_sample() for _ in range(n)]


@pytest.mark.parametrize("multiple", [1, 4])
def test_packed_loader_batches(proc, multiple):
    B, S, steps = 4, 128, 12
    loader = packed_loader(proc, global_batch_size=B, seq_len=S, pack_multiple=multiple)
    batches = [next(loader) for _ in range(steps)]
    total = loader.state_dict()["samples_produced"]
    stream = sample_stream(proc, total + 1, pack_multiple=multiple)
    ids = [i for pb in batches for row in pb.sample_ids for i in sorted(row)]
    assert sorted(ids) == list(range(total))  # every sample exactly once, none skipped
    assert total > B * steps and max(len(row) for pb in batches for row in pb.sample_ids) >= 3  # rows are shared
    assert loader.epoch >= 2  # the stream crossed epoch boundaries
    start = 0
    for pb in batches:
        assert len(pb) == B and pb.input_ids.shape == (B, S) and pb.position_ids.shape == (B, S)
        batch_ids = sorted(i for row in pb.sample_ids for i in row)
        assert batch_ids == list(range(start, start + len(batch_ids)))  # consecutive, following the last batch
        end = start + len(batch_ids)
        # exactly pack() of those stream samples, and maximal: the next sample would need row B + 1
        assert_packed_equal(pb, pack(stream[start:end], S, proc.pad_id, proc.image_token_id, multiple))
        assert len(pack(stream[start : end + 1], S, proc.pad_id, proc.image_token_id, multiple)) == B + 1
        check_invariants(pb, proc, stream[start:end], multiple)
        for r in range(B):  # every row's images match its placeholders
            assert int((pb.input_ids[r] == proc.image_token_id).sum()) == int(pb.images_per_row[r]) * TPI
            assert ((pb.cu_seqlens[r].diff() % multiple) == 0).all()
        assert pb.pixel_values.shape[0] == int(pb.images_per_row.sum())
        start = end
    if multiple > 1:  # documents really were padded to the multiple
        assert any(n % multiple for pb in batches for _, _, _, n, _ in documents(pb))


def test_packed_loader_resume(proc):
    a = packed_loader(proc, pack_multiple=2)
    for _ in range(6):
        next(a)
    state = a.state_dict()
    assert state["packing"] is True and state["pack_multiple"] == 2
    expected = [next(a) for _ in range(3)]
    # the state points at the first sample of the next batch
    assert state["samples_produced"] == min(i for row in expected[0].sample_ids for i in row)
    b = packed_loader(proc, pack_multiple=2)
    b.load_state_dict(state)
    for x in expected:
        assert_packed_equal(x, next(b))
    assert b.state_dict() == a.state_dict()
    # a resumed loader with another batch size continues the same sample stream
    c = packed_loader(proc, pack_multiple=2, global_batch_size=2)
    c.load_state_dict(state)
    assert min(i for row in next(c).sample_ids for i in row) == state["samples_produced"]
    with pytest.raises(ValueError, match="packing"):
        packed_loader(proc, packing=False, pack_multiple=2).load_state_dict(state)
    with pytest.raises(ValueError, match="pack_multiple"):
        packed_loader(proc, pack_multiple=4).load_state_dict(state)


def test_packed_loader_errors(proc):
    with pytest.raises(ValueError, match=r"training.seq_len=50 must be a multiple of 4"):
        packed_loader(proc, seq_len=50, pack_multiple=4)
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="pack_multiple must be a positive int"):
            packed_loader(proc, pack_multiple=bad)
    unpacked = packed_loader(proc, seq_len=50, pack_multiple=4, packing=False)  # the multiple only matters when packing
    assert len(next(unpacked)) == 4 and not unpacked.state_dict()["packing"]


def test_data_packing_config_key():
    one_rank = {"rank_offset": 0, "num_ranks": 1}
    d = tiny_config_dict(one_rank, one_rank)
    assert config_from_dict(d).data.packing is False
    assert config_from_dict(d, ["--data.packing=true"]).data.packing is True
    with pytest.raises(ConfigError, match=r"data\.packing"):
        config_from_dict(tiny_config_dict(one_rank, one_rank, data={"packing": "yes"}))
