"""Device types the layout search plans for: peak compute, memory and link bandwidths per accelerator.

The figures are the vendors' datasheet numbers (dense, no sparsity) for SXM parts in 8-GPU nodes with one 400 Gb/s
NIC per GPU (NVIDIA DGX H100 / H200 / B200 and DGX A100 with 200 Gb/s HDR), times planning factors:

- ``mfu``: the fraction of peak that a large transformer matmul workload reaches end to end (model FLOPs
  utilisation). Defaults are typical published figures for dense 7-70 B training in bf16: about 40-55 %
  (Megatron-LM reports 41-48 % MFU on H100 for GPT 5B-462B; DistTrain, Zhang et al. 2024, 54.7 % on 1,172 GPUs;
  A100 runs commonly reach 50-55 %). A measured costs file (:mod:`mimo_titan.planning.profile`) replaces it per
  module.
- ``link_efficiency``: achieved over nominal bandwidth of a large NCCL collective or point-to-point transfer
  (nccl-tests bus bandwidth is about 80 % of the link rate).

``cpu`` is this project's CPU/gloo machine (two cores, 24 GiB shared by every rank, loopback TCP); its compute is
meaningful only with measured costs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from mimo_titan.errors import ConfigError

__all__ = ["DEVICES", "DeviceSpec", "device_spec"]

_GB = 1e9


@dataclass(frozen=True)
class DeviceSpec:
    """One device type.

    Attributes:
        name: ``"h100"``, ``"h200"``, ``"a100"``, ``"b200"`` or ``"cpu"``.
        peak_flops: dense bf16 FLOP/s of one device (fp32 for ``cpu``).
        mfu: planning fraction of ``peak_flops`` a transformer reaches (see the module docstring).
        memory_gib: memory of one device, GiB: the total ``nvidia-smi`` reports (MiB / 1024; ``cpu``: of the whole
            machine, shared by its ranks).
        memory_shared: the ranks of one node share ``memory_gib`` (processes on one CPU machine).
        usable_fraction: the part of ``memory_gib`` a plan may fill (the CUDA context, NCCL buffers and allocator
            fragmentation take the rest).
        hbm_bytes_per_s: memory bandwidth, bytes/s (the optimizer step is bound by it).
        intra_node_bytes_per_s: per-device, per-direction bandwidth to devices of the same node (NVLink), bytes/s.
        inter_node_bytes_per_s: per-device network bandwidth to other nodes, bytes/s.
        link_efficiency: achieved fraction of the nominal bandwidths.
        devices_per_node: devices that share the fast links.
        latency_s: fixed cost of one transfer or collective, seconds.
        cores: compute units one node's ranks share (``cpu``: the machine's cores; several ranks per core run
            slower in proportion); 0: every rank has a device of its own.
    """

    name: str
    peak_flops: float
    mfu: float
    memory_gib: float
    hbm_bytes_per_s: float
    intra_node_bytes_per_s: float
    inter_node_bytes_per_s: float
    devices_per_node: int = 8
    link_efficiency: float = 0.8
    usable_fraction: float = 0.9
    memory_shared: bool = False
    latency_s: float = 20e-6
    cores: int = 0

    def compute_share(self, ranks_per_node: int) -> float:
        """The fraction of one device's speed a rank gets when ``ranks_per_node`` ranks share a node's ``cores``."""
        if not self.cores or ranks_per_node <= self.cores:
            return 1.0
        return self.cores / ranks_per_node

    def bandwidth(self, *, inter_node: bool) -> float:
        """Achieved bytes/s of a link inside a node (``inter_node=False``) or across nodes."""
        nominal = self.inter_node_bytes_per_s if inter_node else self.intra_node_bytes_per_s
        return nominal * self.link_efficiency

    def memory_budget_gib(self, ranks_per_node: int) -> float:
        """GiB one rank may plan to use when ``ranks_per_node`` ranks run on one node."""
        per = self.memory_gib / max(1, ranks_per_node) if self.memory_shared else self.memory_gib
        return per * self.usable_fraction


#: the device types ``scripts/plan_layout.py --device`` accepts
DEVICES: dict[str, DeviceSpec] = {
    # H100 SXM5 80 GB: 989 TFLOP/s bf16 dense, 3.35 TB/s HBM3, NVLink 4 900 GB/s (450 per direction), 400 Gb/s NIC
    "h100": DeviceSpec("h100", 989e12, 0.45, 79.6, 3.35e12, 450 * _GB, 50 * _GB),
    # H200 SXM 141 GB: the H100's compute with 4.8 TB/s HBM3e (slightly higher MFU: less memory-bound time)
    "h200": DeviceSpec("h200", 989e12, 0.47, 139.8, 4.8e12, 450 * _GB, 50 * _GB),
    # A100 SXM4 80 GB: 312 TFLOP/s bf16, 2.0 TB/s, NVLink 3 600 GB/s (300 per direction), 200 Gb/s HDR NIC
    "a100": DeviceSpec("a100", 312e12, 0.52, 79.2, 2.0e12, 300 * _GB, 25 * _GB),
    # B200 (DGX B200, "180 GB": nvidia-smi's 183,359 MiB): 2.25 PFLOP/s bf16 dense, 7.7 TB/s, NVLink 5 1.8 TB/s (900
    # per direction), 400 Gb/s
    "b200": DeviceSpec("b200", 2250e12, 0.40, 179.0, 7.7e12, 900 * _GB, 50 * _GB),
    # this project's CPU machines: 2 cores (fp32), 24 GiB shared by every rank, gloo over loopback TCP
    "cpu": DeviceSpec(
        "cpu",
        50e9,
        0.5,
        24.0,
        10e9,
        2 * _GB,
        2 * _GB,
        devices_per_node=1 << 30,
        memory_shared=True,
        latency_s=1.5e-3,  # one gloo transfer over loopback: scripts/bench_schedule.py TRANSFER_S
        cores=os.cpu_count() or 1,
    ),
}


def device_spec(name: str) -> DeviceSpec:
    """The :class:`DeviceSpec` of ``name`` (case-insensitive).

    Raises:
        ConfigError: an unknown device, naming the known ones.
    """
    spec = DEVICES.get(name.lower())
    if spec is None:
        raise ConfigError(f"--device {name!r} is not a known device type; choose one of {', '.join(DEVICES)}")
    return spec
