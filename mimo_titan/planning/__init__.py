"""Planning a MIMO job's layout before any GPU is touched.

- :mod:`~mimo_titan.planning.profile`: measure each module's forward / backward time on the present device
  (``scripts/profile_modules.py``);
- :mod:`~mimo_titan.planning.devices`: the device types planned for (peak FLOP/s, memory, link bandwidths);
- :mod:`~mimo_titan.planning.costs`: a module's microbatch costs on a layout, from FLOPs and bytes or measured;
- :mod:`~mimo_titan.planning.simulator`: one training step of a layout and schedule, played event by event;
- :mod:`~mimo_titan.planning.search`: the fastest layout that fits (``scripts/plan_layout.py``).

Importing this package loads nothing heavy.
"""
