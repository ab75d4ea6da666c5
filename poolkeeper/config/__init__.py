"""The spec file -> a validated `Config` (poolkeeper.config.settings).

Here: the bounded file reader (readfile.py) and the guarded YAML loader (yamlload.py),
durations and sizes, `load_config` (loader.py), the pydantic model of the file (model.py), its
cross-field and outside-world rules (rules.py), the wording and placing of errors
(messages.py), the validation cache that lets a restart skip pydantic, the JSON Schema, and
the few values the forkserver needs before the validation (hints.py, no pydantic).

May import: the standard library, PyYAML, pydantic (this is the only package that does: in
model.py, messages.py, loader.py and schema.py; a cached start imports none of them, nor
rules.py), croniter and zoneinfo for schedule checks, and `poolkeeper.scheduling`,
`poolkeeper.printable`, `poolkeeper.exitcodes`, `poolkeeper.kinds`. Of the other packages, only
`poolkeeper.pool.context` (the rule of how a job receives `ctx`, which the worker applies and
rules.py checks; a small module that imports nothing of poolkeeper). Nothing of `daemon`,
`state` or `service`.
"""
