"""``scripts/train.py`` with one injected fault, for ``tests/test_faults.py`` (run under torchrun like the real script).

``MIMO_TITAN_TEST_FAULT`` selects the fault:

- ``kill_during_save:<step>:<rank>``: that rank kills itself with SIGKILL in the middle of the save of
  ``step-<step>``: the save's planning is done and the other ranks write their files, this rank writes none, and
  ``.metadata`` is never written;
- ``nan_batch:<step>``: the global batch of that step gets NaN pixel values (a forced non-finite loss);
- ``hang_in_step:<step>:<rank>``: that rank hangs inside the step's forward-backward (a hung kernel or a livelock:
  the process and its watchdog thread stay alive, the training loop makes no progress).

Every rank also prints ``STEP {"step", "loss", "grad_norm", "skipped"}`` with full precision after each step (the log
line rounds to 4 decimals), so a test can compare two runs exactly.
"""

import json
import os
import runpy
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
fault = os.environ.get("MIMO_TITAN_TEST_FAULT", "")
rank = int(os.environ.get("RANK", 0))

import mimo_titan.train.trainer as trainer  # noqa: E402

_train_step = trainer.train_step


def _reported_step(job, global_batch, **kwargs):
    if fault.startswith("nan_batch:") and job.step + 1 == int(fault.split(":")[1]):
        global_batch.pixel_values.fill_(float("nan"))
    rec = _train_step(job, global_batch, **kwargs)
    if rank == 0:
        print("STEP " + json.dumps({k: rec[k] for k in ("step", "loss", "grad_norm", "skipped")}), flush=True)
    return rec


trainer.train_step = _reported_step

if fault.startswith("kill_during_save:"):
    from torch.distributed.checkpoint import filesystem

    _, step, victim = fault.split(":")
    _write_data = filesystem.FileSystemWriter.write_data

    def _write_data_then_die(self, plan, planner):
        if rank == int(victim) and str(self.path).endswith(f"step-{step}.partial"):
            os.kill(os.getpid(), signal.SIGKILL)
        return _write_data(self, plan, planner)

    filesystem.FileSystemWriter.write_data = _write_data_then_die

if fault.startswith("hang_in_step:"):
    import time

    from mimo_titan.pipeline.schedule import MimoSchedule

    _, hang_step, hang_rank = fault.split(":")
    _schedule_step = MimoSchedule.step
    _calls = [0]

    def _hanging_step(self, *args, **kwargs):
        _calls[0] += 1
        if rank == int(hang_rank) and _calls[0] == int(hang_step):
            while True:  # the GIL stays free: the heartbeat thread goes on
                time.sleep(0.1)
        return _schedule_step(self, *args, **kwargs)

    MimoSchedule.step = _hanging_step

sys.argv[0] = str(ROOT / "scripts" / "train.py")
runpy.run_path(sys.argv[0], run_name="__main__")
