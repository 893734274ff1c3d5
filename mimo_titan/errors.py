"""The user errors of mimo_titan: a bad config, layout, data set or checkpoint.

Every error that a user can fix by changing their input is a :class:`UserError`. Its message is complete on its
own (it names the config key or path, the value, and the fix), so the training entry point prints it once, as
one message without a traceback, and exits non-zero on every rank (:mod:`mimo_titan.train.report`). Any other
exception is a bug or a fault of the machine and keeps its traceback.

The classes derive from ``ValueError`` so that code catching ``ValueError`` keeps working.

==================  ===========================================================================================
class               raised for
==================  ===========================================================================================
:class:`ConfigError`      a TOML file, key, value or override (:mod:`mimo_titan.config`), or settings that
                          contradict each other (``validate_job``)
:class:`LayoutError`      per-module rank layouts (:mod:`mimo_titan.topology`)
:class:`DataError`        ``data.path`` / ``data.tokenizer``: missing files, no valid record; a malformed
                          file of generated captions (:mod:`mimo_titan.evaluation`)
:class:`CheckpointError`  ``checkpoint.*``: folders that cannot be written, a checkpoint that does not fit the
                          model, a missing step
:class:`TrainingError`    a run that diverged: ``training.max_skipped_steps`` consecutive non-finite steps
==================  ===========================================================================================
"""

from __future__ import annotations

__all__ = ["UserError", "ConfigError", "LayoutError", "DataError", "CheckpointError", "TrainingError"]


class UserError(ValueError):
    """An error in the user's input; the message names the key or path, the value and the fix."""


class ConfigError(UserError):
    """Raised for any invalid configuration file, key, value or override.

    The message always names the offending dotted key (or override) and the config source, and says how to fix
    the problem.
    """


class LayoutError(UserError):
    """A module layout (or a set of them) is inconsistent.

    Raised by :func:`mimo_titan.topology.validate_layouts` (and everything that calls it) before any process
    group is created. The message names the module, the offending field and a suggested fix.
    """


class DataError(UserError):
    """The data set or the tokenizer cannot be used (missing path, no valid record, unreadable tokenizer)."""


class CheckpointError(UserError):
    """A checkpoint cannot be written or read: an unwritable folder, too little disk space, a missing step, or a
    checkpoint whose tensors do not fit the configured model."""


class TrainingError(UserError):
    """The run diverged: its loss or gradient norm stayed non-finite for ``training.max_skipped_steps``
    consecutive steps (lower ``optimizer.lr``, raise ``lr_schedule.warmup_steps`` or set
    ``training.max_grad_norm``)."""
