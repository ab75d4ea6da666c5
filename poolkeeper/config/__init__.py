"""The spec file -> a validated `Config` (poolkeeper.config.settings).

Here: the bounded file reader and the guarded YAML loader, durations and sizes, the pydantic
model of the file (model.py) with its cross-field and outside-world rules (rules.py), the
validation cache that lets a restart skip pydantic, and the JSON Schema.

May import: the standard library, PyYAML, pydantic (this is the only package that does, and
only model.py, rules.py and schema.py: a cached start never imports them), croniter and
zoneinfo for schedule checks, and `poolkeeper.scheduling`, `poolkeeper.printable`,
`poolkeeper.exitcodes`, `poolkeeper.kinds`. Nothing of `daemon`, `pool`, `state` or `service`.
"""
