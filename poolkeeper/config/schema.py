"""`poolkeeper schema`: the JSON Schema of the job spec, from the same model that validates it."""

from __future__ import annotations

from typing import Any

from poolkeeper.config.model import ConfigFile


def json_schema() -> dict[str, Any]:
    """A draft 2020-12 schema for editors (yaml-language-server: completion, hover, checks)."""
    schema = ConfigFile.model_json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://poolkeeper.invalid/schema/v1.json",
        **schema,
    }
