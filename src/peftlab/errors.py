"""Exceptions raised by peftlab. All derive from :class:`PeftlabError`."""


class PeftlabError(Exception):
    """Base class of every peftlab error."""


class UnknownMethodError(PeftlabError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ConfigError(PeftlabError, ValueError, TypeError):
    """A config field has a wrong type or an out-of-range value (the message names the field).

    A ValueError and a TypeError, so callers written against the plain exceptions keep working."""


class TargetNotFoundError(PeftlabError, ValueError):
    """No module of the model matched the target selection."""


class UnsupportedArchitectureError(PeftlabError, ValueError):
    """The method does not apply to this architecture."""


class AdapterExistsError(PeftlabError, ValueError):
    pass


class AdapterNotFoundError(PeftlabError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class NotMergeableError(PeftlabError, RuntimeError):
    """The adapter's update cannot be folded into the base weights."""


class IncompatibleAdapterError(PeftlabError, ValueError):
    """A saved adapter does not fit the model it is loaded onto."""


class CorruptAdapterError(PeftlabError, ValueError):
    """A saved adapter file is unreadable, truncated, malformed or fails its checksum."""


class DataError(PeftlabError, ValueError):
    """A data file cannot be read as the task needs: names the file and the row/line."""


class ModelLoadError(PeftlabError, OSError):
    """A backbone or tokenizer cannot be loaded from the given name or folder."""


class RunLockedError(PeftlabError, RuntimeError):
    """Another process holds the run directory's lock."""


class ResumeMismatchError(PeftlabError, ValueError):
    """``--resume`` with a configuration that differs from the run's in a key that changes its results."""


class UnsafePathError(PeftlabError, ValueError):
    """A path to delete or write lies outside the directory it must stay in."""
