"""Exit codes from sysexits(3), so shell scripts and systemd can tell failures apart."""

OK = 0
USAGE = 64  # EX_USAGE: the command line was wrong
NOINPUT = 66  # EX_NOINPUT: the config file is missing or unreadable
UNAVAILABLE = 69  # EX_UNAVAILABLE: the daemon is not running / control socket unreachable
SOFTWARE = 70  # EX_SOFTWARE: an internal error
CANTCREAT = 73  # EX_CANTCREAT: cannot create a state/runtime file
IOERR = 74  # EX_IOERR: `history`/`status` cannot read the state DB (corrupt, unreadable)
TEMPFAIL = 75  # EX_TEMPFAIL: another instance holds the lock
CONFIG = 78  # EX_CONFIG: the config is invalid
