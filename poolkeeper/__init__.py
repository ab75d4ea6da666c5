"""poolkeeper: a systemd-native job daemon for Python."""

from poolkeeper.pool.context import RunContext

__all__ = ["RunContext", "__version__"]
__version__ = "0.1.0"
