"""NCCL pairing of the bridge's point-to-point operations (checked on gloo by recording them).

NCCL ignores tags and, on one communicator, runs a rank's operations in the order it posts them; a send may
wait for its receive. Each rank here records every bridge operation in posting order (peer, send/recv, element
count, batch group) over a real training step, and the test checks (1) every pair of ranks posts the operations
between them in the same order with the same sizes, and (2) the strictest model, one in-order stream per rank
for all its bridge operations (a ``batch_isend_irecv`` group completes as a whole), never deadlocks.
"""

from __future__ import annotations

import pytest

from _launch import run_ranks
from _tiny import first_global_batch, tiny_config_dict

V = lambda off, n, **kw: dict(rank_offset=off, num_ranks=n, **kw)  # noqa: E731

CASES = {
    "streamed_fan_in_4to2_pp2_m4": (
        8,
        V(0, 4, dp_shard=4),
        V(4, 4, pp=2, dp_shard=2),
        {"training": {"global_batch_size": 16, "microbatches": 4}},
    ),
    "streamed_ratio_2to3_m4": (
        5,
        V(0, 2, dp_shard=2),
        V(2, 3, dp_shard=3),
        {"training": {"global_batch_size": 24, "microbatches": 4}, "data": {"max_images_per_sample": 2}},
    ),
    "streamed_vision_tp2_lm_pp2_cp2_tp2": (
        10,
        V(0, 2, tp=2),
        V(2, 8, pp=2, cp=2, tp=2),
        {"training": {"global_batch_size": 4, "microbatches": 4}, "data": {"max_images_per_sample": 2}},
    ),
    "streamed_lm_gpipe_pp2_fan_out": (
        5,
        V(0, 1),
        V(1, 4, pp=2, dp_shard=2),
        {"training": {"global_batch_size": 8, "microbatches": 4}, "parallelism": {"pipeline_schedule": "GPipe"}},
    ),
    "inline_fan_in_cp2": (
        4,
        V(0, 4, dp_shard=4),
        V(0, 4, dp_shard=2, cp=2),
        {"parallelism": {"colocated_encoders": "inline"}, "training": {"global_batch_size": 8}},
    ),
    "colocated_batch_pp2": (
        4,
        V(0, 4, dp_shard=4),
        V(0, 4, pp=2, dp_shard=2),
        {"training": {"global_batch_size": 8}},
    ),
    # encoder stages pass activations and gradients between themselves (also through Bridge.post)
    "streamed_encoder_pp2_dp2_lm_pp2_m4": (
        6,
        V(0, 4, pp=2, dp_shard=2),
        V(4, 2, pp=2),
        {"training": {"global_batch_size": 8, "microbatches": 4}},
    ),
    "colocated_batch_encoder_pp2_lm_pp2": (
        4,
        V(0, 4, pp=2, dp_shard=2),
        V(0, 4, pp=2, dp_shard=2),
        {"training": {"global_batch_size": 8, "microbatches": 2}},
    ),
}


def _record_worker(rank, world, device, cfg_dict):
    import torch.distributed as dist

    from mimo_titan.config import config_from_dict
    from mimo_titan.pipeline import bridge as bridge_mod
    from mimo_titan.train.trainer import build_job, train_step

    log: list[tuple] = []
    orig = bridge_mod.Bridge.post

    def post(self, *items, batch=False):
        group = len(log)
        for item in items:
            ops = (
                item.ops
                if isinstance(item, bridge_mod.Pending) and item.works is None
                else ([] if isinstance(item, bridge_mod.Pending) else item)
            )
            for op in ops:
                kind = "send" if op.op is dist.isend else "recv"
                log.append((op.peer, kind, op.tensor.numel(), group if batch else None))
        return orig(self, *items, batch=batch)

    bridge_mod.Bridge.post = post
    cfg = config_from_dict(cfg_dict)
    job = build_job(cfg, device)
    batch = first_global_batch(cfg, job.processor)
    for _ in range(2):
        train_step(job, batch)
    return log


def _check(logs):
    world = len(logs)
    # (1) pairwise: same order, opposite kinds, same sizes
    for a in range(world):
        for b in range(a + 1, world):
            ab = [(k, n) for p, k, n, _ in logs[a] if p == b]
            ba = [("send" if k == "recv" else "recv", n) for p, k, n, _ in logs[b] if p == a]
            assert ab == ba, f"ranks {a} and {b} post their bridge operations in different orders:\n{ab}\n{ba}"
    # (2) one in-order stream per rank; a batch group is one unit that completes when every op in it is matched
    units = []
    for r, log in enumerate(logs):
        us, i = [], 0
        while i < len(log):
            g = log[i][3]
            j = i + 1
            while g is not None and j < len(log) and log[j][3] == g:
                j += 1
            us.append([(r, *op[:3]) for op in log[i:j]])
            i = j
        units.append(us)
    pos = [0] * world
    done = [set() for _ in range(world)]  # indices of matched ops in the current unit

    def head(r):
        return units[r][pos[r]] if pos[r] < len(units[r]) else None

    progressed = True
    while progressed:
        progressed = False
        for a in range(world):
            ua = head(a)
            if ua is None:
                continue
            for i, (_, peer, kind, n) in enumerate(ua):
                if i in done[a]:
                    continue
                ub = head(peer)
                if ub is None:
                    continue
                want = "recv" if kind == "send" else "send"
                for j, (_, p2, k2, n2) in enumerate(ub):
                    if j not in done[peer] and p2 == a and k2 == want:
                        # the first unmatched op towards a in the peer's unit (in-order per pair)
                        assert n2 == n, f"size mismatch {a}->{peer}: {n} vs {n2}"
                        done[a].add(i)
                        done[peer].add(j)
                        progressed = True
                        break
            for r in range(world):
                while head(r) is not None and len(done[r]) == len(head(r)):
                    pos[r] += 1
                    done[r] = set()
                    progressed = True
    stuck = {r: head(r)[0] for r in range(world) if head(r) is not None}
    assert not stuck, f"in-order stream model deadlocks; each rank's next op: {stuck}"


@pytest.mark.multirank
@pytest.mark.parametrize("case", list(CASES))
def test_bridge_operations_pair_in_order(case):
    world, vision, language, extra = CASES[case]
    logs = run_ranks(_record_worker, world, tiny_config_dict(vision, language, **extra))
    assert sum(len(x) for x in logs) > 0
    _check(logs)


def test_the_pairing_check_catches_a_crossed_pair_and_a_three_rank_cycle():
    """The checker itself: two ranks that both send first, and a cycle over three ranks (each pair consistent)."""
    with pytest.raises(AssertionError, match="different orders"):
        _check([[(1, "send", 4, None), (1, "recv", 4, None)], [(0, "send", 4, None), (0, "recv", 4, None)]])
    cycle = [
        [(1, "send", 1, None), (2, "recv", 1, None)],
        [(2, "send", 1, None), (0, "recv", 1, None)],
        [(0, "send", 1, None), (1, "recv", 1, None)],
    ]
    with pytest.raises(AssertionError, match="deadlocks"):
        _check(cycle)
    # the same ops in one batch group per rank complete
    _check([[(p, k, n, 0) for p, k, n, _ in log] for log in cycle])
