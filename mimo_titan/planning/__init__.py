"""Planning a MIMO job's layout: a simulator of one training step (:mod:`mimo_titan.planning.simulator`).

Pure Python, no torch: importing this package loads nothing heavy.
"""
