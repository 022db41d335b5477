"""User-facing errors: one readable message, no traceback (see `rlt.train.main`)."""


class RltError(Exception):
    """Base class for errors caused by the user's config, data or environment (not by a bug in rlt)."""


class ConfigError(RltError):
    """A config key is unknown, has the wrong type, or an impossible / inconsistent value."""


class DataError(RltError):
    """A dataset is missing, empty, or lacks the columns the config declares."""


class ModelError(RltError):
    """A model or tokenizer cannot be resolved or loaded as configured."""


class MissingExtraError(RltError, ImportError):
    """An optional dependency is not installed; the message names the pip extra that provides it."""


class DependencyError(RltError):
    """An installed dependency is not the version rlt is built against, or lacks an internal rlt patches."""


class RunEnvironmentError(RltError):
    """The machine or process environment stops the run (e.g. no free TCP port); the message names what to set."""
