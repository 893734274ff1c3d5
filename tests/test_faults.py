"""Faults of a real multi-rank job, launched as a user launches it (torchrun + ``scripts/train.py``, gloo on CPU).

- kill -9 of a rank mid-step: the job ends in < 60 s;
- kill -9 of a rank mid-save: the previous checkpoint stays the newest complete one, and a resume from it is
  bit-exact (full-precision losses and gradient norms equal an uninterrupted run's);
- SIGTERM to every rank (what a scheduler does): the current step finishes, a checkpoint is written, every rank
  exits 0, and the resume is bit-exact; Ctrl-C (SIGINT to torchrun and its ranks) does the same quickly;
- a forced NaN: that step is skipped on every rank (weights unchanged), the run goes on, no checkpoint holds a
  non-finite value; a diverging run (``optimizer.lr=1e6``) stops with one clean error;
- a stopped rank (kill -STOP): the watchdog ends the job within 2x ``training.collective_timeout_s`` and names the
  rank and its module;
- a truncated shard (in the forced-NaN run): counted and reported at every log step, the run goes on;
- a config mistake: printed once, without a traceback, every rank exits non-zero.

Faults are injected by ``tests/_fault_train.py`` (the train script plus one patched function), never by the package.
The jobs that only resume an interrupted one, or give it an uninterrupted reference, run on ranks forked from the
tests' forkserver (:func:`forked_run`): a torchrun launch costs seconds of interpreter start-up per rank.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _launch import run_ranks
from _tiny import SHARED

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.multirank

COLOCATED = ["--config", "train_configs/debug_colocated.toml"]  # 2 ranks, both modules on each
CONSTANT_LR = ["--lr_schedule.decay=constant", "--lr_schedule.warmup_steps=0"]  # the LR does not depend on steps
# 3 ranks, non-colocated: the encoder on rank 0, the language model's two pipeline stages on ranks 1 and 2
NONCOLOCATED = [
    *COLOCATED,
    "--parallelism.vision.num_ranks=1",
    "--parallelism.vision.dp_shard=1",
    "--parallelism.language.rank_offset=1",
    "--parallelism.language.dp_shard=1",
    "--parallelism.language.pp=2",
]


class Job:
    """A torchrun job in its own process group; output in a file; helpers to wait, signal and inspect it."""

    def __init__(self, tmp_path: Path, nproc: int, args: list[str], *, fault: str = "", name: str = "job"):
        self.log_path = tmp_path / f"{name}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - open for the job's lifetime, closed in close()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MIMO_TITAN_TEST_FAULT": fault}
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "tests/_fault_train.py",
            *args,
        ]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.started = time.monotonic()

    def output(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, pattern: str, timeout: float = 240) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.output())
            if m:
                return m
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"job ended (rc {self.proc.returncode}) before {pattern!r}:\n{self.output()[-4000:]}"
                )
            time.sleep(0.1)
        raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.output()[-4000:]}")

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"job still running after {timeout} s:\n{self.output()[-4000:]}") from None

    def ranks(self) -> dict[int, int]:
        """``{rank: pid}`` of the worker processes (children of torchrun)."""
        out = {}
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        for pid in map(int, children):
            env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
            if "RANK" in env:
                out[int(env["RANK"])] = pid
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.log.close()


@pytest.fixture
def jobs():
    started: list[Job] = []
    yield lambda *a, **kw: started.append(Job(*a, **kw)) or started[-1]
    for job in started:
        job.close()


def steps(text: str) -> dict[int, dict]:
    """The full-precision ``STEP`` records of rank 0 (tests/_fault_train.py), by step."""
    return {r["step"]: r for r in (json.loads(line[5:]) for line in text.splitlines() if line.startswith("STEP "))}


def _forked_worker(rank, world, device, argv):
    """A rank of ``scripts/train.py ARGV`` without a fault: its config parsing and ``train``; returns the records as
    :func:`steps` reads them from a job's output and rank 0's log lines."""
    import logging

    from mimo_titan.config import parse_args
    from mimo_titan.train.trainer import train

    os.chdir(ROOT)  # the configs' data paths are relative to the repository root, as for the jobs
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("mimo_titan").addHandler(handler)
    logging.getLogger("mimo_titan").setLevel(logging.INFO)
    records = {r["step"]: {k: r[k] for k in ("step", "loss", "grad_norm", "skipped")} for r in train(parse_args(argv))}
    return records, "\n".join(lines)


def forked_run(argv: list[str], nproc: int = 2) -> tuple[dict[int, dict], str]:
    """``torchrun --nproc_per_node=NPROC scripts/train.py ARGV`` without a fault, as the jobs that resume an interrupted
    one or give the uninterrupted reference: the records :func:`steps` reads, by step, and rank 0's log. It runs on
    ranks forked from the tests' forkserver (the same config parsing and training code, new processes; no launcher and
    no interpreters that import torch again: a torchrun job costs seconds of start-up per rank)."""
    return run_ranks(_forked_worker, nproc, argv, timeout=300)[0]


def our_error_lines(text: str) -> list[str]:
    """Lines our ranks print for an error (``[rankN] SomethingError: ...`` or a ``[rankN] Traceback``)."""
    return [line for line in text.splitlines() if re.match(r"\[rank\d+\] (\w+Error|Traceback|watchdog)", line)]


def complete_steps(folder: Path) -> list[int]:
    from mimo_titan.checkpoint import complete_steps as complete

    return complete(str(folder))


def model_state(folder: Path, step: int) -> dict[str, torch.Tensor]:
    from mimo_titan.checkpoint.state import load_full_model_state
    from mimo_titan.config import load_config

    return load_full_model_state(str(folder / f"step-{step}"), load_config(ROOT / "train_configs/debug_colocated.toml"))


# ------------------------------------------------------------------------------------------------------ kill -9
@pytest.mark.parametrize("victim,where", [(1, "language pp 0")])  # rank 0 as the victim: the same code path
def test_kill_9_of_a_rank_mid_step_ends_the_job_within_60_s_and_names_it(tmp_path, jobs, victim, where):
    job = jobs(tmp_path, 3, [*NONCOLOCATED, "--training.steps=1000", f"--job.output_dir={tmp_path}"])
    job.wait_for(r"step +3 \|")
    os.kill(job.ranks()[victim], signal.SIGKILL)  # in the middle of a step
    killed = time.monotonic()
    rc = job.wait(timeout=60)
    assert rc != 0 and time.monotonic() - killed < 60
    out = job.output()
    reports = our_error_lines(out)
    assert len(reports) == 1, out[-4000:]  # one traceback for the job, from the lowest surviving rank
    assert reports[0].startswith(f"[rank{1 if victim == 0 else 0}] Traceback")
    assert f"this failure follows from a rank that is gone: rank {victim} ({where}, pid " in out


def test_kill_9_during_a_save_keeps_the_last_checkpoint_and_the_resume_is_bit_exact(tmp_path, jobs):
    ckpt = ["--checkpoint.enable=true", "--checkpoint.interval=2", "--training.steps=6", *CONSTANT_LR]
    folder = tmp_path / "run" / "checkpoint"
    died = jobs(
        tmp_path,
        2,
        COLOCATED + ckpt + [f"--job.output_dir={tmp_path / 'run'}"],
        fault="kill_during_save:4:1",
        name="died",
    )
    assert died.wait() != 0
    assert sorted(steps(died.output())) == [1, 2, 3, 4]
    assert complete_steps(folder) == [2]
    assert not (folder / "step-4.partial" / ".metadata").exists()

    # the run that died trained steps 1-4 without a break (it died after step 4's record, in that step's save): its
    # steps 3 and 4 are the uninterrupted run's. Step 3 checks the resumed weights and data position, step 4 also
    # the AdamW moments and step count (constant LR: a run of 4 steps has the same steps as one of 6).
    resumed, log = forked_run([*COLOCATED, *ckpt, "--training.steps=4", f"--job.output_dir={tmp_path / 'run'}"])
    assert "checkpoint: resumed step 2" in log
    expect = {s: r for s, r in steps(died.output()).items() if s > 2}
    assert resumed == expect and sorted(expect) == [3, 4]  # exact floats
    assert complete_steps(folder) == [2, 4]  # step 4 saved over the dead save's step-4.partial


# ------------------------------------------------------------------------------------------------------ signals
def test_sigterm_finishes_the_step_saves_and_the_resume_is_bit_exact(tmp_path, jobs):
    ckpt = ["--checkpoint.enable=true", "--checkpoint.interval=1000", *CONSTANT_LR]
    run = jobs(
        tmp_path, 2, COLOCATED + ckpt + ["--training.steps=1000", f"--job.output_dir={tmp_path / 'run'}"], name="run"
    )
    run.wait_for(r"step +3 \|")
    for pid in run.ranks().values():  # a scheduler's preemption signals every task
        os.kill(pid, signal.SIGTERM)
    signalled = time.monotonic()
    assert run.wait(timeout=60) == 0, run.output()[-3000:]
    stopped = int(re.search(r"stopped after step (\d+) on a signal \(SIGTERM\); checkpoint saved", run.output())[1])
    assert time.monotonic() - signalled < 30
    assert stopped >= 3 and sorted(steps(run.output())) == list(range(1, stopped + 1))
    assert complete_steps(tmp_path / "run" / "checkpoint") == [stopped]

    end = [f"--training.steps={stopped + 2}"]
    resumed, log = forked_run(COLOCATED + ckpt + end + [f"--job.output_dir={tmp_path / 'run'}"])
    assert f"checkpoint: resumed step {stopped}" in log
    straight, _ = forked_run(COLOCATED + ckpt + end + [f"--job.output_dir={tmp_path / 'straight'}"])
    expect = {s: r for s, r in straight.items() if s > stopped}
    assert resumed == expect and len(expect) == 2


def test_ctrl_c_stops_the_job_quickly_with_a_checkpoint(tmp_path, jobs):
    run = jobs(
        tmp_path,
        2,
        [
            *COLOCATED,
            "--checkpoint.enable=true",
            "--checkpoint.interval=1000",
            "--training.steps=1000",
            f"--job.output_dir={tmp_path}",
        ],
    )
    run.wait_for(r"step +2 \|")
    os.killpg(
        run.proc.pid, signal.SIGINT
    )  # the terminal's Ctrl-C reaches torchrun and its ranks (torchrun forwards it too)
    signalled = time.monotonic()
    run.wait(timeout=60)
    took = time.monotonic() - signalled
    stopped = int(re.search(r"stopped after step (\d+) on a signal \(SIGINT\); checkpoint saved", run.output())[1])
    assert complete_steps(tmp_path / "checkpoint") == [stopped]
    assert took < 15, f"Ctrl-C took {took:.1f} s"
    assert our_error_lines(run.output()) == []


# ------------------------------------------------------------------------------------------- NaN guard, bad data
def test_a_nan_step_is_skipped_on_every_rank_and_a_truncated_shard_is_counted_at_every_log_step(tmp_path, jobs):
    """One run for two faults that do not interact (one launch less in the suite): a forced NaN at step 3 is skipped
    on every rank and never checkpointed; the data (a whole shard and one cut in the middle of a member) are counted
    and reported at every log step, and the run goes on."""
    data = tmp_path / "data"
    data.mkdir()
    shard = SHARED / "cc12m" / "cc12m-train-0000.tar"
    shutil.copy(shard, data / "a.tar")
    blob = shard.read_bytes()
    (data / "b.tar").write_bytes(blob[: len(blob) // 2 + 100])  # cut in the middle of a member
    run = jobs(
        tmp_path,
        2,
        COLOCATED
        + CONSTANT_LR
        + ["--checkpoint.enable=true", "--checkpoint.interval=1", "--training.steps=5", f"--job.output_dir={tmp_path}"]
        # 5 steps of 8 samples stay in the first epoch of the 46 readable records
        + [f"--data.path={data}", "--training.global_batch_size=8"],
        fault="nan_batch:3",
    )
    assert run.wait() == 0, run.output()[-3000:]
    out = run.output()
    recs = steps(out)
    assert [s for s, r in recs.items() if r["skipped"]] == [3]
    assert all(torch.isfinite(torch.tensor(recs[s]["loss"])) for s in (1, 2, 4, 5))
    skipped = re.findall(r"step (\d+): non-finite loss/grad_norm .* step skipped \((\d+) in a row\)", out)
    assert skipped == [("3", "1")]  # once for the whole job, not once per rank
    folder = tmp_path / "checkpoint"
    assert complete_steps(folder) == [1, 2, 3, 4, 5]
    after2, after3, after4 = model_state(folder, 2), model_state(folder, 3), model_state(folder, 4)
    assert all(torch.equal(after2[k], after3[k]) for k in after2)  # the skipped step left every weight unchanged
    assert any(not torch.equal(after3[k], after4[k]) for k in after3)  # and the next step trained again
    assert all(bool(torch.isfinite(v).all()) for s in (1, 2, 3, 4, 5) for v in model_state(folder, s).values())
    # the truncated shard
    assert len(re.findall(r"step +\d+ \|", out)) == 5
    summaries = re.findall(r"data: (\d+) records read.*1 of 2 shards damaged", out)
    assert len(summaries) == 5  # every log step (the end of the run adds none after a logged step)
    assert 32 < int(summaries[0]) < 64
    assert "b.tar" in out  # the warning names the shard


def test_a_diverging_run_stops_with_one_clean_error_and_no_nonfinite_checkpoint(tmp_path, jobs):
    run = jobs(
        tmp_path,
        2,
        [
            *COLOCATED,
            "--optimizer.lr=1e6",
            "--checkpoint.enable=true",
            "--checkpoint.interval=1",
            f"--job.output_dir={tmp_path}",
        ],
    )
    assert run.wait() == 1
    out = run.output()
    errors = our_error_lines(out)
    assert len(errors) == 1 and errors[0].startswith("[rank0] TrainingError: steps "), out[-4000:]
    assert "training.max_skipped_steps=3" in errors[0] and "Lower optimizer.lr (now 1e+06)" in errors[0]
    recs = steps(out)
    last = max(recs)  # the third skipped step raised before its record was printed
    assert [recs[s]["skipped"] for s in (last - 1, last)] == [True, True] and not recs[last - 2]["skipped"]
    assert f"steps {last - 1}-{last + 1}: the loss or the gradient norm was non-finite" in errors[0]
    saved = complete_steps(tmp_path / "checkpoint")
    assert saved and all(
        bool(torch.isfinite(v).all()) for s in saved for v in model_state(tmp_path / "checkpoint", s).values()
    )


# ------------------------------------------------------------------------------------------------------ watchdog
def test_a_stopped_rank_ends_the_job_and_is_named(tmp_path, jobs):
    timeout_s = 10
    job = jobs(
        tmp_path,
        3,
        [
            *NONCOLOCATED,
            "--training.steps=1000",
            f"--training.collective_timeout_s={timeout_s}",
            f"--job.output_dir={tmp_path}",
        ],
    )
    job.wait_for(r"step +3 \|")
    victim = job.ranks()[2]  # the last language pipeline stage
    os.kill(victim, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        rc = job.wait(timeout=4 * timeout_s)
        took = time.monotonic() - stopped
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
    assert rc != 0 and took < 2 * timeout_s, f"ended after {took:.1f} s"
    lines = [line for line in job.output().splitlines() if "watchdog:" in line]
    assert len(lines) == 1, job.output()[-4000:]
    assert "rank 2 (language pp 1) stopped responding" in lines[0]
    assert "training.collective_timeout_s=10" in lines[0]


def test_a_rank_hung_inside_its_step_shows_where_it_hangs(tmp_path, jobs):
    """A hung rank whose heartbeat goes on (a hung kernel, a livelock) is in the same phase as the ranks waiting for
    it, so the heartbeats cannot name it: the verdict says so once, and each stalled rank prints where its main
    thread is, which shows the hung one."""
    timeout_s = 10
    job = jobs(
        tmp_path,
        3,
        [
            *NONCOLOCATED,
            "--training.steps=1000",
            f"--training.collective_timeout_s={timeout_s}",
            f"--job.output_dir={tmp_path}",
        ],
        fault="hang_in_step:3:2",
    )
    job.wait_for(r"step +2 \|")
    started = time.monotonic()
    rc = job.wait(timeout=4 * timeout_s)
    assert rc != 0 and time.monotonic() - started < 2 * timeout_s + 5
    out = job.output()
    verdicts = [
        line for line in out.splitlines() if re.match(r"\[rank\d\] watchdog: all 3 ranks made no progress", line)
    ]
    assert len(verdicts) == 1, out[-4000:]
    stack = out.split("watchdog: main thread of rank 2 at the verdict:", 1)
    assert len(stack) == 2 and "time.sleep(0.1)" in stack[1].split("[rank", 1)[0], out[-4000:]  # the hung frame


# ------------------------------------------------------------------------------------------------------ one error
@pytest.mark.parametrize(
    "override,error",
    [
        ("--data.path=/nonexistent/shards", "DataError"),
        # a LayoutError / ConfigError takes the same path (raised alike before any process group: test_train)
    ],
)
def test_a_user_error_is_printed_once_without_a_traceback(tmp_path, jobs, override, error):
    run = jobs(
        tmp_path,
        4,
        [
            "--config",
            "train_configs/debug_colocated.toml",
            "--parallelism.vision.num_ranks=4",
            "--parallelism.vision.dp_shard=4",
            "--parallelism.language.num_ranks=4",
            "--parallelism.language.dp_shard=4",
            "--training.global_batch_size=16",
            override,
        ],
    )
    assert run.wait() != 0
    out = run.output()
    assert our_error_lines(out) == [line for line in out.splitlines() if line.startswith(f"[rank0] {error}: ")]
    assert len(our_error_lines(out)) == 1, out
    ours = [f'File "{ROOT / d}' for d in ("mimo_titan", "kernels", "scripts", "tests")]
    assert not any(frame in out for frame in ours)  # no frame of ours: the only traceback is torchrun's summary
