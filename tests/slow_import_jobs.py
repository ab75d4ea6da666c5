"""A job module that takes a while to import: the daemon's start (validation imports it)
lasts long enough for a test to send signals during it."""

import time

time.sleep(1.0)


def ok() -> int:
    return 42
