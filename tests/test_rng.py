"""Tests for mimo_titan.train.rng: per-rank stream seeds and the RNG tracker."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

from mimo_titan.train.rng import SEED_STREAMS, STREAM_COORDS, RNGTracker, module_seeds

# Written independently of the implementation: which inputs each stream's seed may depend on.
DEPENDS_ON = {
    "default": ("base", "module", "pp"),
    "tensor": ("base", "module", "pp", "tp"),
    "expert": ("base", "module", "pp", "ep", "etp"),
}


def _grid():
    """(base_seed, module_index, coords) over a grid that includes coordinates no stream uses."""
    dims = {
        "pp": range(2),
        "dp_replicate": range(2),
        "dp_shard": range(2),
        "cp": range(2),
        "tp": range(2),
        "edp": range(2),
        "ep": range(3),
        "etp": range(2),
    }
    for base, module in itertools.product((0, 1234), (0, 1)):
        for values in itertools.product(*dims.values()):
            yield base, module, dict(zip(dims, values))


# --------------------------------------------------------------------------------------
# module_seeds
# --------------------------------------------------------------------------------------


def test_module_seeds_streams_and_range():
    seeds = module_seeds(7, 1, {"pp": 0, "tp": 0, "ep": 0, "etp": 0})
    assert list(seeds) == list(SEED_STREAMS) == ["default", "tensor", "expert"]
    assert all(isinstance(s, int) and 0 <= s < 2**63 for s in seeds.values())
    assert {k: tuple(v) for k, v in STREAM_COORDS.items()} == {
        s: tuple(d for d in DEPENDS_ON[s] if d not in ("base", "module")) for s in DEPENDS_ON
    }
    # Two calls agree.
    assert seeds == module_seeds(7, 1, {"pp": 0, "tp": 0, "ep": 0, "etp": 0})


def test_module_seeds_equal_exactly_where_they_must_be():
    """For each stream: seeds are equal iff the inputs it depends on are equal."""
    for stream, deps in DEPENDS_ON.items():
        by_key: dict[tuple, set[int]] = {}
        for base, module, coords in _grid():
            inputs = {"base": base, "module": module, **coords}
            key = tuple(inputs[d] for d in deps)
            by_key.setdefault(key, set()).add(module_seeds(base, module, coords)[stream])
        # Equal across every coordinate the stream ignores (dp, cp, edp, and tp for "expert", ...).
        assert all(len(v) == 1 for v in by_key.values()), stream
        # Distinct across the coordinates it depends on.
        assert len({next(iter(v)) for v in by_key.values()}) == len(by_key), stream


def test_module_seeds_specific_cases():
    c = {"pp": 1, "tp": 0, "ep": 0, "etp": 0, "edp": 0, "dp_shard": 0}
    ref = module_seeds(3, 1, c)
    # Experts on different ep (or etp) ranks never share a stream; tensor/default seeds do.
    for change in ({"ep": 1}, {"ep": 2}, {"etp": 1}):
        other = module_seeds(3, 1, {**c, **change})
        assert other["expert"] != ref["expert"], change
        assert other["default"] == ref["default"] and other["tensor"] == ref["tensor"], change
    # Expert replicas over edp / dp agree.
    same = module_seeds(3, 1, {**c, "edp": 3, "dp_shard": 5})
    assert same == ref
    # tp ranks: tensor differs, default and expert equal.
    tp1 = module_seeds(3, 1, {**c, "tp": 1})
    assert tp1["tensor"] != ref["tensor"]
    assert tp1["default"] == ref["default"] and tp1["expert"] == ref["expert"]
    # pp stage, module and base seed change every stream.
    for other in (
        module_seeds(3, 1, {**c, "pp": 0}),
        module_seeds(3, 0, c),
        module_seeds(4, 1, c),
    ):
        assert all(other[s] != ref[s] for s in SEED_STREAMS)
    # The three streams of one rank differ from each other.
    assert len(set(ref.values())) == 3


def test_module_seeds_documented_derivation():
    """Recompute one seed from the formula in the docstring."""
    text = "mimo_titan.rng.v1|expert|base=5|module=1|pp=1|ep=2|etp=1"
    want = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") & (2**63 - 1)
    assert module_seeds(5, 1, {"pp": 1, "tp": 3, "ep": 2, "etp": 1})["expert"] == want
    text = "mimo_titan.rng.v1|tensor|base=-2|module=0|pp=0|tp=3"
    want = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") & (2**63 - 1)
    assert module_seeds(-2, 0, {"pp": 0, "tp": 3, "ep": 0, "etp": 0})["tensor"] == want


def test_module_seeds_stable_across_processes():
    cases = [(0, 0, {"pp": 0, "tp": 0, "ep": 0, "etp": 0}), (99, 1, {"pp": 3, "tp": 1, "ep": 7, "etp": 1})]
    code = (
        "import json, sys\n"
        "from mimo_titan.train.rng import module_seeds\n"
        "cases = json.loads(sys.argv[1])\n"
        "print(json.dumps([module_seeds(b, m, c) for b, m, c in cases]))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "4242"}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(cases)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
        cwd=repo,
    )
    assert json.loads(out.stdout) == [module_seeds(b, m, c) for b, m, c in cases]


def test_module_seeds_errors():
    ok = {"pp": 0, "tp": 0, "ep": 0, "etp": 0}
    with pytest.raises(ValueError, match=r"lack \['ep', 'etp'\].*role.expert_coordinates"):
        module_seeds(0, 0, {"pp": 0, "tp": 0})
    with pytest.raises(TypeError, match=r"base_seed=True must be an int"):
        module_seeds(True, 0, ok)
    with pytest.raises(ValueError, match=r"module_index=-1 must be >= 0"):
        module_seeds(0, -1, ok)
    with pytest.raises(ValueError, match=r"coords\['ep'\]=-1 must be >= 0"):
        module_seeds(0, 0, {**ok, "ep": -1})
    with pytest.raises(TypeError, match=r"coords\['tp'\]=1.0 must be an int"):
        module_seeds(0, 0, {**ok, "tp": 1.0})


# --------------------------------------------------------------------------------------
# RNGTracker
# --------------------------------------------------------------------------------------


def _tracker() -> RNGTracker:
    return RNGTracker({"tensor": 11, "expert": 22}, cuda=False)


def test_fork_restores_outer_state_and_draws_from_stream():
    tracker = _tracker()
    torch.manual_seed(123)
    outer = torch.get_rng_state()
    with tracker.fork("tensor"):
        a1 = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), outer)
    with tracker.fork("tensor"):
        a2 = torch.rand(4)
    # The stream continues where it left off: the two draws are one sequence of its generator.
    ref = torch.rand(8, generator=torch.Generator().manual_seed(11))
    assert torch.equal(torch.cat([a1, a2]), ref)
    # The outer (global) sequence is untouched by the forks.
    b = torch.rand(4)
    torch.manual_seed(123)
    assert torch.equal(b, torch.rand(4))


def test_fork_streams_independent_and_nested():
    tracker = _tracker()
    torch.manual_seed(0)
    outer = torch.get_rng_state()
    with tracker.fork("tensor"):
        t1 = torch.rand(3)
        with tracker.fork("expert"):
            e1 = torch.rand(3)
        t2 = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outer)
    assert torch.equal(torch.cat([t1, t2]), torch.rand(6, generator=torch.Generator().manual_seed(11)))
    assert torch.equal(e1, torch.rand(3, generator=torch.Generator().manual_seed(22)))
    with (
        pytest.raises(RuntimeError, match=r"RNG stream 'tensor' is already forked"),
        tracker.fork("tensor"),
        tracker.fork("tensor"),
    ):
        pass
    assert torch.equal(torch.get_rng_state(), outer)


def test_fork_restores_on_exception():
    tracker = _tracker()
    torch.manual_seed(5)
    outer = torch.get_rng_state()
    with pytest.raises(ZeroDivisionError), tracker.fork("expert"):
        torch.rand(2)
        raise ZeroDivisionError
    assert torch.equal(torch.get_rng_state(), outer)
    with tracker.fork("expert"):  # the consumed numbers stay consumed
        x = torch.rand(2)
    assert torch.equal(x, torch.rand(4, generator=torch.Generator().manual_seed(22))[2:])


def test_fork_dropout_uses_stream():
    tracker = _tracker()
    with tracker.fork("tensor"):
        m1 = torch.nn.functional.dropout(torch.ones(64), p=0.5)
    other = RNGTracker({"tensor": 11}, cuda=False)
    with other.fork("tensor"):
        m2 = torch.nn.functional.dropout(torch.ones(64), p=0.5)
    assert torch.equal(m1, m2)


def test_state_dict_round_trip():
    a = _tracker()
    with a.fork("tensor"):
        torch.rand(5)
    state = a.state_dict()
    assert state["seeds"] == {"tensor": 11, "expert": 22} and "cuda" not in state
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf)

    with a.fork("tensor"):
        want_t = torch.rand(4)
    with a.fork("expert"):
        want_e = torch.rand(4)
    # The state dict was a copy: advancing `a` did not change it.
    b = RNGTracker({"other": 1}, cuda=False)
    b.load_state_dict(loaded)
    assert b.names == ("tensor", "expert")
    assert b.seed("tensor") == 11
    with b.fork("tensor"):
        assert torch.equal(torch.rand(4), want_t)
    with b.fork("expert"):
        assert torch.equal(torch.rand(4), want_e)
    with pytest.raises(KeyError, match="unknown RNG stream 'other'"):
        b.seed("other")


def test_state_dict_errors():
    t = _tracker()
    with t.fork("tensor"), pytest.raises(RuntimeError, match=r"state_dict\(\) called inside fork\('tensor'\)"):
        t.state_dict()
    with pytest.raises(ValueError, match="has no 'cpu' entry"):
        t.load_state_dict({"seeds": {"x": 1}})
    with pytest.raises(ValueError, match="no CPU state for stream 'x'"):
        t.load_state_dict({"seeds": {"x": 1}, "cpu": {}})
    cuda_tracker = RNGTracker(cuda=True) if torch.cuda.is_available() else None
    if cuda_tracker is not None:
        with pytest.raises(ValueError, match="no CUDA state for stream 'tensor'"):
            cuda_tracker.load_state_dict(t.state_dict())


def test_tracker_add_errors():
    t = _tracker()
    with pytest.raises(ValueError, match="RNG stream 'tensor' already exists"):
        t.add("tensor", 5)
    with pytest.raises(ValueError, match="seed 22 of RNG stream 'x' is already used by stream 'expert'"):
        t.add("x", 22)
    with pytest.raises(KeyError, match=r"unknown RNG stream 'nope'"), t.fork("nope"):
        pass
    t.add("default", 33)
    assert t.names == ("tensor", "expert", "default")


def test_tracker_from_module_seeds():
    seeds = module_seeds(0, 1, {"pp": 0, "tp": 1, "ep": 2, "etp": 0})
    t = RNGTracker(seeds, cuda=False)
    assert t.names == SEED_STREAMS and not t.cuda
    assert all(t.seed(s) == seeds[s] for s in SEED_STREAMS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fork_cuda_state():
    t = RNGTracker({"tensor": 11, "expert": 22}, cuda=True)
    torch.cuda.manual_seed(3)
    outer = torch.cuda.get_rng_state()
    with t.fork("tensor"):
        a = torch.rand(8, device="cuda")
    assert torch.equal(torch.cuda.get_rng_state(), outer)
    ref = torch.rand(8, device="cuda", generator=torch.Generator(device="cuda").manual_seed(11))
    assert torch.equal(a, ref)
    state = t.state_dict()
    with t.fork("tensor"):
        want = torch.rand(4, device="cuda")
    t2 = RNGTracker(cuda=True)
    t2.load_state_dict(state)
    with t2.fork("tensor"):
        assert torch.equal(torch.rand(4, device="cuda"), want)
