"""poolkeeper: a systemd-native job daemon for Python."""

__version__ = "0.1.0"
