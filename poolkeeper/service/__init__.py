"""poolkeeper's faces to systemd and to its clients: sd_notify (notify.py), logging to the
journal or stderr (logs.py), the unit files (unit.py), and the control socket's transport,
server and client (control.py).

May import: the standard library, python-systemd or sdnotify, `poolkeeper.state` (where a
config's socket lives), `poolkeeper.config.yamlload` (to find it without validating),
`poolkeeper.printable`, `poolkeeper.exitcodes`, `poolkeeper.outcomes`.
"""
