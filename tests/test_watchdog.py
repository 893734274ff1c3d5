"""Units of the fault handling, in one process: the watchdog's judgement, the one-report protocol between ranks,
and the graceful-stop signal handler. (tests/test_faults.py runs them in real multi-rank jobs.)"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import threading
import time

import pytest
import torch.distributed as dist

from mimo_titan.errors import ConfigError
from mimo_titan.train import report
from mimo_titan.train.stop import GracefulStop
from mimo_titan.train.watchdog import Watchdog, heartbeat_interval, process_group_timeout


def _store():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    master = dist.TCPStore(
        "127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=5)
    )
    return master, lambda: dist.PrefixStore(
        "job/",
        dist.TCPStore(
            "127.0.0.1", port, is_master=False, wait_for_workers=False, timeout=datetime.timedelta(seconds=5)
        ),
    )


def _rec(beat_age, seq, *, now=1000.0, done=False, step=7, phase="forward-backward", pid=None):
    return {
        "wall": now - beat_age,
        "pid": pid or 1,
        "host": socket.gethostname(),
        "done": done,
        "phase": phase,
        "step": step,
        "seq": seq,
        "progress_wall": now - 58,
    }


def _watchdog(rank=0, world=4, timeout_s=60.0):
    return Watchdog(rank=rank, world_size=world, timeout_s=timeout_s, describe=lambda r: f"module of {r}")


def test_intervals_and_process_group_timeout_follow_the_watchdog_timeout():
    assert heartbeat_interval(600) == 10 and heartbeat_interval(20) == 1 and heartbeat_interval(1) == 0.2
    assert process_group_timeout(600) == 750 and process_group_timeout(10) == 40


def test_judge_names_a_stopped_rank_first():
    wd = _watchdog()
    records = {0: _rec(1, 10), 1: _rec(1, 10), 2: _rec(45, 9, pid=4242), 3: _rec(1, 10)}
    message, culprits = wd.judge(records, now=1000.0, stalled_s=58)
    assert [r for r, _ in culprits] == [2]
    assert "rank 2 (module of 2) stopped responding 45 s ago" in message
    assert "last progress: step 7, forward-backward; pid 4242" in message
    assert "training.collective_timeout_s=60" in message
    # a rank that never sent a heartbeat is stopped too; a finished rank never is
    records = {0: _rec(1, 10), 1: None, 2: _rec(500, 9, done=True), 3: _rec(1, 10)}
    message, culprits = wd.judge(records, now=1000.0, stalled_s=58)
    assert [r for r, _ in culprits] == [1] and "rank 1 (module of 1) never sent a heartbeat" in message


def test_judge_names_the_rank_the_others_wait_for_or_a_deadlock():
    wd = _watchdog()
    live = {0: _rec(1, 12), 1: _rec(1, 11, phase="loading the batch"), 2: _rec(1, 12), 3: _rec(1, 12)}
    message, culprits = wd.judge(live, now=1000.0, stalled_s=58)
    assert [r for r, _ in culprits] == [1]
    assert "rank 1 (module of 1) made no progress for 58 s (last: step 7, loading the batch" in message
    same = {r: _rec(1, 12) for r in range(4)}
    message, culprits = wd.judge(same, now=1000.0, stalled_s=58)
    assert culprits == [] and "all 4 ranks made no progress for 58 s" in message and "deadlock" in message
    # progress younger than the timeout: nobody is blamed yet
    fresh = {r: {**_rec(1, 12), "progress_wall": 1000.0 - 5} for r in range(4)}
    assert wd.judge(fresh, now=1000.0, stalled_s=58) == (None, [])


def test_a_stalled_watchdog_reports_once_through_the_store():
    _master, client = _store()  # the server lives as long as its reference
    verdicts = []
    wds = [
        Watchdog(
            rank=r, world_size=2, timeout_s=2.0, describe=lambda r: f"m{r}", store=client(), on_verdict=verdicts.append
        )
        for r in range(2)
    ]
    wds[0].start()  # rank 1 never starts: it never sends a heartbeat
    t0 = time.monotonic()
    while not verdicts and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    wds[0].stop()
    assert verdicts and "rank 1 (m1) never sent a heartbeat" in verdicts[0]
    assert 1.4 <= time.monotonic() - t0 < 4  # about timeout_s - 2 intervals after the last progress
    # the verdict is the job's report: a later failure of another rank stays silent
    assert client().get("error_reporter") == b"0"
    assert not report.claim_job_report(client(), 1)


def test_the_lowest_failing_rank_reports_and_the_others_stay_silent(monkeypatch, capsys):
    _master, client = _store()  # the server lives as long as its reference
    monkeypatch.setattr(report, "job_store", lambda timeout_s: client())
    monkeypatch.setattr(report, "DEFER_S", 2.0)
    printed = {}

    def fail(rank, delay):
        time.sleep(delay)
        printed[rank] = report.report_failure(ConfigError(f"bad key on rank {rank}"), rank=rank, world_size=4)

    threads = [threading.Thread(target=fail, args=(r, d)) for r, d in ((3, 0.0), (1, 0.5), (2, 0.1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert printed == {3: False, 1: True, 2: False}  # rank 3 failed first but waited for the lower ranks
    err = capsys.readouterr().err
    assert err == "[rank1] ConfigError: bad key on rank 1\n"  # one line, no traceback


def test_without_a_store_every_failing_rank_reports_and_unexpected_errors_keep_the_traceback(monkeypatch, capsys):
    monkeypatch.setattr(report, "job_store", lambda timeout_s: None)
    try:
        raise KeyError("boom")
    except KeyError as exc:
        assert report.report_failure(exc, rank=2, world_size=4)
    err = capsys.readouterr().err
    assert err.startswith("[rank2] Traceback (most recent call last):") and "KeyError: 'boom'" in err
    assert report.run_main(lambda: (_ for _ in ()).throw(ConfigError("x"))) == report.EXIT_FAILURE
    assert report.run_main(lambda: None) == 0


def test_graceful_stop_records_the_first_signal_and_ignores_quick_repeats():
    stop = GracefulStop(grace_s=30)
    previous = signal.getsignal(signal.SIGTERM)
    with stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # torchrun's forwarded copy, within the grace period
        time.sleep(0.05)
        assert stop.requested and stop.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored


def test_a_late_repeat_ends_the_process_at_once():
    stop = GracefulStop(grace_s=0.0)
    with stop, pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)  # insists: the default handler raises KeyboardInterrupt
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------- a stopped store host
@pytest.fixture
def stopped_store_host():
    """A TCPStore server in a child process (rank 0 of a plain env:// launch); the test stops it with SIGSTOP. The
    kernel still accepts connections, nothing answers: the store client's own timeout does not end such calls."""
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "import datetime, time, torch.distributed as dist\n"
        f"s = dist.TCPStore('127.0.0.1', {port}, is_master=True, wait_for_workers=False, "
        "timeout=datetime.timedelta(seconds=5))\nprint('up', flush=True)\ntime.sleep(600)\n"
    )
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert server.stdout.readline().strip() == b"up"
        yield port, server
    finally:
        server.kill()
        server.wait()


def _client(port):
    return dist.PrefixStore(
        "job/",
        dist.TCPStore(
            "127.0.0.1", port, is_master=False, wait_for_workers=False, timeout=datetime.timedelta(seconds=3)
        ),
    )


def test_a_stopped_store_host_ends_the_job_and_nothing_blocks_on_it(stopped_store_host, monkeypatch, capsys):
    port, server = stopped_store_host
    verdicts: list[str] = []
    wd = Watchdog(rank=1, world_size=2, timeout_s=5.0, describe=str, store=_client(port), on_verdict=verdicts.append)
    wd.start()
    server.send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    assert wd.lost_ranks() == [] and time.monotonic() - t0 < 5  # bounded: the store cannot say, so no one is named
    while not verdicts and time.monotonic() - t0 < 30:
        time.sleep(0.1)
    wd.stop(done=False)
    assert verdicts and "the job's store has not answered rank 1" in verdicts[0]
    assert time.monotonic() - t0 < 15
    # the error report does not hang on it either: it prints locally
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("WORLD_SIZE", "2")
    t0 = time.monotonic()
    assert report.report_failure(ConfigError("bad key"), rank=1, world_size=2)
    assert time.monotonic() - t0 < 20 and "[rank1] ConfigError: bad key" in capsys.readouterr().err


def _subgroup_rank(rank: int, port: int, queue) -> None:
    """A rank of a 2-rank gloo job (forked from the tests' forkserver: torch is imported already) whose module group
    has the collective timeout 2 s: rank 0 all-reduces in it and puts what happened on ``queue``; rank 1 never joins
    (a stuck peer)."""
    import torch

    from mimo_titan.train.trainer import init_distributed, set_group_timeouts

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    init_distributed("cpu", timeout_s=60)
    sub = dist.new_group([0, 1])  # what DeviceMesh does for every module mesh: torch's default timeout (30 min, gloo)
    set_group_timeouts(2.0)
    dist.barrier()
    if rank == 0:
        t0 = time.monotonic()
        try:
            dist.all_reduce(torch.ones(1), group=sub)
            queue.put("returned")
        except Exception:  # noqa: BLE001 - gloo's timeout error
            queue.put(f"TIMEOUT after {time.monotonic() - t0:.0f} s")
        queue.close()
        queue.join_thread()  # the message is written before the process ends (os._exit runs no cleanup)
    else:
        time.sleep(40)
    os._exit(0)


def test_every_module_group_gets_the_collective_timeout():
    from _launch import _CTX

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = _CTX.Queue()
    procs = [_CTX.Process(target=_subgroup_rank, args=(r, port, queue), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        out = queue.get(timeout=90)
    finally:
        for p in procs:
            p.kill()
            p.join(5)
    assert out.startswith("TIMEOUT after") and int(out.split()[2]) < 10, out
