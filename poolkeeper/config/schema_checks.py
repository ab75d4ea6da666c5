"""What `poolkeeper check` refuses beyond single fields, written into the JSON Schema where a
schema can say it, so that editors flag it as it is typed: one schedule per job (none when
`defaults:` holds exactly one), a schedule key with a value, no zero duration where one must
be positive, no key that does not apply to the job's own kind (rules.ONLY_FOR), max_concurrent
only with overlap: allow, no 'ctx' in kwargs, and the shape of a cron expression (five fields,
or an @alias other than @reboot), of an `at:` datetime, of a job name and of an environment
variable name. And it accepts what `check` accepts beyond the model: a section left empty
(`state:` with every key commented out) is null in YAML, and means the section's defaults.

The model (model.py) cannot state these: pydantic describes each field on its own, and the
rules that span fields live in rules.py, whose tables are used here so both stay one rule.
What a schema cannot see stays with `check`: imports and calls, what croniter and zoneinfo
judge, sums and comparisons (pool room, 3650d, retry max >= initial), and a job's kind or
settings that only `defaults:` give it. tests/test_schema_checks.py holds the two together.
"""

from __future__ import annotations

from typing import Any

from poolkeeper.config.durations import DURATION_PATTERN
from poolkeeper.config.loader import _SECTIONS  # the sections that may be left empty
from poolkeeper.config.rules import KINDS, ONLY_FOR

# A duration with a non-zero digit somewhere is more than zero: '0s', '0.0m', '0h0m' are not.
POSITIVE_DURATION_PATTERN = "^(?=[^1-9]*[1-9])" + DURATION_PATTERN.removeprefix("^")
ENV_NAME_PATTERN = "^[^=\\u0000]+$"
# Five fields (Python's str.split() and \s split alike), or an @alias, which croniter judges.
CRON_PATTERN = r"^\s*(?:@(?!reboot\s*$).*|[^\s@]\S*(?:\s+\S+){4}\s*)$"
AT_DATETIME_PATTERN = "^[0-9]{4}"  # every form datetime.fromisoformat reads starts with the year
# loader.JOB_NAME_PATTERN (`^[^\W_][\w.@-]{0,63}$`) is Unicode-aware through Python's \w, which
# an editor's ECMAScript regex is not: refuse only the ASCII characters it refuses (a space, a
# slash, a leading '-'...), and leave letters beyond ASCII and the length to `check`.
JOB_NAME_SCHEMA_PATTERN = (
    "^[^\\u0000-\\u002F\\u003A-\\u0040\\u005B-\\u0060\\u007B-\\u007F]"
    "[^\\u0000-\\u002C\\u002F\\u003A-\\u003F\\u005B-\\u005E\\u0060\\u007B-\\u007F]*$"
)


def add_checks(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` (ConfigModel's, as generated) with the rules above added; changed in place."""
    _positive_durations(schema)
    defs = schema["$defs"]
    _one_schedule_at_most(defs["JobSpec"])
    for model in (defs["JobSpec"], defs["JobDefaults"]):
        props = model["properties"]
        props["env"]["propertyNames"] = {"pattern": ENV_NAME_PATTERN}
        props["kwargs"]["propertyNames"] = {"not": {"const": "ctx"}}  # reserved: the run's ctx
        _string_form(props["cron"])["pattern"] = CRON_PATTERN
        _string_form(props["at"], without={"const": "startup"})["pattern"] = AT_DATETIME_PATTERN
    schema["properties"]["jobs"]["propertyNames"] = {"pattern": JOB_NAME_SCHEMA_PATTERN}
    for section in _SECTIONS:
        _may_be_empty(schema["properties"][section])
    # A job sets a schedule unless `defaults:` holds exactly one (two there apply together).
    defaults_give_one = {
        "required": ["defaults"],
        "properties": {"defaults": _exactly_one_schedule()},
    }
    # max_concurrent needs overlap: allow, from the job (below) or else from `defaults:`.
    defaults_allow = {
        "required": ["defaults"],
        "properties": {
            "defaults": {"required": ["overlap"], "properties": {"overlap": {"const": "allow"}}}
        },
    }
    needs_overlap = {"if": {"required": ["max_concurrent"]}, "then": {"required": ["overlap"]}}
    schema.setdefault("allOf", []).extend(
        [
            {"if": defaults_give_one, "else": _each_job({"anyOf": _each_schedule()})},
            {"if": defaults_allow, "else": _each_job(needs_overlap)},
        ]
    )
    return schema


def _may_be_empty(prop: dict[str, Any]) -> None:
    """`prop` also takes null; its description stays at the top, for editors' hover."""
    shown = ("title", "description")
    value = {key: prop.pop(key) for key in list(prop) if key not in shown}
    prop["anyOf"] = [value, {"type": "null"}]


def _each_job(rule: dict[str, Any]) -> dict[str, Any]:
    return {"properties": {"jobs": {"additionalProperties": rule}}}


def _string_form(prop: dict[str, Any], without: dict[str, Any] | None = None) -> dict[str, Any]:
    """The alternative of `prop` that is a string (other than `without`), or `prop` itself."""
    alts: list[dict[str, Any]] = [
        alt for alt in prop.get("anyOf", [prop]) if alt.get("type") == "string"
    ]
    (alt,) = [alt for alt in alts if alt != without] if without else alts
    return alt


def _each_schedule() -> list[dict[str, Any]]:
    return [{"required": [kind]} for kind in KINDS]


def _exactly_one_schedule() -> dict[str, Any]:
    return {"oneOf": _each_schedule()}


def _one_schedule_at_most(job: dict[str, Any]) -> None:
    """JobSpec: one of loop/every/cron/at, or none (then `defaults:` must give one, above); the
    one set has a value; the keys of the other kinds are refused (rules.ONLY_FOR)."""
    props = job["properties"]
    for kind in KINDS:  # `every:` left empty is null: "has no value" to check
        prop = props[kind]
        prop["anyOf"] = [alt for alt in prop["anyOf"] if alt != {"type": "null"}]
        prop.pop("default", None)
    none_set = {"not": {"anyOf": _each_schedule()}}
    rules: list[dict[str, Any]] = [{"oneOf": [*_each_schedule(), none_set]}]
    for kind in KINDS:
        refused = sorted(key for key, kinds in ONLY_FOR.items() if kind not in kinds)
        rules.append(
            {"if": {"required": [kind]}, "then": {"properties": dict.fromkeys(refused, False)}}
        )
    startup = {"const": "startup"}
    rules.append(
        {
            "if": {"required": ["at"], "properties": {"at": {"not": startup}}},
            "then": {"properties": {"before_ready": False}},
        }
    )
    rules.append(
        {
            "if": {"required": ["at"], "properties": {"at": startup}},
            "then": {"properties": {"catchup": False}},
        }
    )
    rules.append(
        {
            "if": {"required": ["max_concurrent", "overlap"]},
            "then": {"properties": {"overlap": {"const": "allow"}}},
        }
    )
    job.setdefault("allOf", []).extend(rules)


def _positive_durations(node: Any) -> None:
    """Every duration pattern, except a DurationOrZero's ({"anyOf": [{"const": 0}, ...]}),
    refuses a zero duration as check does ("must be positive")."""
    if isinstance(node, list):
        for item in node:
            _positive_durations(item)
    elif isinstance(node, dict):
        if {"const": 0} in node.get("anyOf", ()):
            return
        if node.get("pattern") == DURATION_PATTERN:
            node["pattern"] = POSITIVE_DURATION_PATTERN
        for value in node.values():
            _positive_durations(value)
