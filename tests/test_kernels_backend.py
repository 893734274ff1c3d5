"""The kernel backend switch (``MIMO_TITAN_KERNELS`` / ``kernels.backend``) and the rule that every collective
output is waited on before a kernel reads it (the EP all-to-all bug)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from _launch import run_ranks
from _tiny import tiny_config_dict
from mimo_titan.config import config_from_dict
from mimo_titan.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
V = lambda off, n, **kw: dict(rank_offset=off, num_ranks=n, **kw)  # noqa: E731


def test_environment_wins_over_the_config_and_auto_picks_by_device(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    kernels.set_backend("torch")
    assert kernels.get_backend() == "torch"
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    assert kernels.get_backend() == "triton"  # env wins
    monkeypatch.setenv(kernels.ENV_VAR, "auto")
    assert kernels.check_backend("cpu") == "torch" and kernels.check_backend("cuda") == "triton"
    monkeypatch.setenv(kernels.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="environment variable MIMO_TITAN_KERNELS='cuda'; choose one of"):
        kernels.get_backend()
    with pytest.raises(ValueError, match=r"kernels\.backend='fast'"):
        kernels.set_backend("fast")


def test_process_wide_backend_reaches_every_op_and_is_counted(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    x = torch.randn(6, 4)
    ids = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2], [1, 0], [2, 1]])
    for backend, used in (("auto", "torch"), ("torch", "torch"), ("triton", "triton")):
        kernels.set_backend(backend)
        kernels.reset_dispatch_counts()
        permuted, _, row_map, counts = kernels.permute_tokens(x, ids, 3)
        kernels.unpermute_tokens(permuted, row_map)
        kernels.zigzag_shard(x, 3, 1, 0)
        assert kernels.dispatch_counts() == {used: 3, ({"torch", "triton"} - {used}).pop(): 0}, backend
        assert counts.tolist() == [4, 4, 4]


def test_a_kernel_refuses_an_unwaited_collective_output():
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    x = torch.randn(4, 8)
    pending = AsyncCollectiveTensor(x)  # what funcol returns before anyone waits on it: no storage of its own
    assert pending.data_ptr() == 0
    with pytest.raises(
        ValueError, match=r"got a AsyncCollectiveTensor, which has no storage .* wait on the collective"
    ):
        kernels.permute_tokens(pending, torch.zeros(4, 1, dtype=torch.long), 2, backend="triton")
    with pytest.raises(ValueError, match="AsyncCollectiveTensor"):
        kernels.sort_chunks_by_index(pending, [2, 2], [1, 0], backend="triton")


def test_config_backend_is_checked_before_any_process_group(monkeypatch):
    import torch.distributed as dist

    from mimo_titan.train.trainer import check_kernel_backend, validate_job

    monkeypatch.setenv(kernels.ENV_VAR, "gpu")
    cfg = config_from_dict(tiny_config_dict(V(0, 1), V(1, 1)))
    with pytest.raises(ConfigError, match="MIMO_TITAN_KERNELS='gpu'"):
        validate_job(cfg, 2)
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    cfg = config_from_dict(tiny_config_dict(V(0, 1), V(1, 1), kernels={"backend": "triton"}))
    assert check_kernel_backend(cfg) == "torch"  # the environment wins over kernels.backend
    monkeypatch.delenv(kernels.ENV_VAR)
    assert check_kernel_backend(cfg) == "triton"  # this process runs the interpreter (tests/conftest.py)
    assert not dist.is_initialized()


def _python(code: str, **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", kernels.ENV_VAR)}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=120
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
def test_forcing_triton_on_cpu_turns_the_interpreter_on_or_fails_clearly():
    forced = _python(
        "import kernels, os; print(kernels.interpreter_active(), os.environ.get('TRITON_INTERPRET'))",
        **{kernels.ENV_VAR: "triton"},
    )
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.split() == ["True", "1"]
    # kernels imported without the interpreter, then the config asks for Triton on CPU: a ConfigError that says how
    late = _python(
        "import sys; sys.path.insert(0, 'tests'); import kernels\n"
        "from _tiny import tiny_config_dict\nfrom mimo_titan.config import config_from_dict\n"
        "from mimo_titan.train.trainer import check_kernel_backend\n"
        "V = lambda off, n: dict(rank_offset=off, num_ranks=n)\n"
        "check_kernel_backend(config_from_dict(tiny_config_dict(V(0, 1), V(1, 1), kernels={'backend': 'triton'})))"
    )
    assert late.returncode != 0
    assert "ConfigError: the Triton kernels were asked for on cpu" in late.stderr
    assert "set TRITON_INTERPRET=1 (or MIMO_TITAN_KERNELS=triton)" in late.stderr


def _comm_worker(rank, world, device):
    import torch.distributed as dist

    from mimo_titan.parallel import comm

    g = dist.group.WORLD
    x = (torch.arange(12.0).view(6, 2) + 100 * rank).requires_grad_(True)
    splits = [[1, 5], [4, 2]]  # rank r sends splits[r][s] rows to rank s
    out_splits = [splits[s][rank] for s in range(world)]
    a2a = comm.all_to_all_single(x, out_splits, splits[rank], g)
    gathered = comm.all_gather(x, g)
    scattered = comm.reduce_scatter_sum(x, g)
    outs = (a2a, gathered, scattered)
    plain = [type(t) is torch.Tensor and t.data_ptr() != 0 for t in outs]
    w = [torch.arange(t.numel(), dtype=torch.float32).view_as(t) + 1 for t in outs]
    grads = [torch.autograd.grad((t * wi).sum(), x)[0] for t, wi in zip(outs, w)]
    return {"plain": plain, "values": [t.detach() for t in outs], "grads": grads}


@pytest.mark.multirank
def test_collective_outputs_are_plain_waited_tensors_with_correct_gradients():
    res = run_ranks(_comm_worker, 2)
    xs = [torch.arange(12.0).view(6, 2) + 100 * r for r in range(2)]
    splits = [[1, 5], [4, 2]]
    for rank, r in enumerate(res):
        assert r["plain"] == [True, True, True]
        # all-to-all: rows from rank 0 then rank 1, rank-major
        start = [sum(splits[s][:rank]) for s in range(2)]
        expect = torch.cat([xs[s][start[s] : start[s] + splits[s][rank]] for s in range(2)])
        torch.testing.assert_close(r["values"][0], expect)
        torch.testing.assert_close(r["values"][1], torch.cat(xs))
        torch.testing.assert_close(r["values"][2], (xs[0] + xs[1])[3 * rank : 3 * rank + 3])
    # gradients: the all-gather's is the sum over ranks of each rank's weight slice; the reduce-scatter's is the
    # all-gather of every rank's weights
    w_gather = torch.arange(24, dtype=torch.float32).view(12, 2) + 1
    w_scatter = torch.arange(6, dtype=torch.float32).view(3, 2) + 1
    for rank, r in enumerate(res):
        torch.testing.assert_close(r["grads"][1], 2 * w_gather[6 * rank : 6 * rank + 6])
        torch.testing.assert_close(r["grads"][2], torch.cat([w_scatter, w_scatter]))
    # the all-to-all's gradient returns each row's weight to the row's sender
    for rank in range(2):
        got = torch.zeros(6, 2)
        for dst in range(2):
            first = sum(splits[rank][:dst])
            n = splits[rank][dst]
            src_start = sum(splits[s][dst] for s in range(rank))  # where rank's rows start at dst
            wd = torch.arange(res[dst]["values"][0].numel(), dtype=torch.float32).view(-1, 2) + 1
            got[first : first + n] = wd[src_start : src_start + n]
        torch.testing.assert_close(res[rank]["grads"][0], got)


def test_functional_collectives_are_used_only_through_parallel_comm():
    """Every collective output is waited on before a kernel reads it: only ``mimo_titan/parallel/comm.py`` may call
    ``torch.distributed._functional_collectives``."""
    imports = re.compile(r"^\s*(from|import)\s+torch\.distributed.*_functional_collectives", re.M)
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "mimo_titan").rglob("*.py")
        if imports.search(p.read_text()) and p.name != "comm.py"
    ]
    assert imports.search((ROOT / "mimo_titan/parallel/comm.py").read_text())  # the pattern finds real imports
    assert offenders == []


def _dtensor_worker(rank, world, device):
    from torch.distributed.tensor import DTensor, Replicate, init_device_mesh

    from kernels import _backend

    d = DTensor.from_local(torch.randn(4, 3), init_device_mesh("cpu", (1,)), [Replicate()])
    refused = []
    for t in (d, torch.nn.Parameter(d)):  # an FSDP2-sharded parameter is a Parameter of a DTensor
        try:
            _backend.use_triton("triton", t)
        except ValueError as exc:
            refused.append("no storage of its own" in str(exc))
    return refused


@pytest.mark.multirank
def test_a_parameter_wrapping_a_dtensor_is_refused_like_a_dtensor():
    assert run_ranks(_dtensor_worker, 1) == [[True, True]]
