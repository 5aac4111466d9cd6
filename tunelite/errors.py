"""Errors a user can cause, each carrying a message that names the file, key or row and the fix.

Recipes and the CLI catch `TuneliteError` and print its message without a traceback, so a
typo in a config or a bad data row never surfaces as a stack trace from deep inside torch.
"""


class TuneliteError(Exception):
    """Base class for problems with a user's input (config, data, checkpoint, command line)."""


class ConfigError(TuneliteError):
    """A config file or override is wrong: unknown key, bad value, unresolvable component."""


class DataError(TuneliteError):
    """A dataset file or row cannot be used as given."""


class CheckpointError(TuneliteError):
    """A checkpoint folder is missing, incomplete, or does not match the model."""


class ResourceError(TuneliteError):
    """The machine ran short (GPU memory, disk space) for what the config asks, or its output
    folder cannot be written (read-only, no permission)."""


class NonFiniteError(TuneliteError):
    """A step's loss or gradient norm is NaN or infinite (too high a learning rate, a bad row):
    the run stops rather than train on, or checkpoint, weights it would poison."""


class DivergenceError(TuneliteError):
    """A step's loss is far above the run's recent losses (too high a learning rate, a bad row): the
    run stops before the optimizer steps, rather than train on, or checkpoint, weights blown up."""
