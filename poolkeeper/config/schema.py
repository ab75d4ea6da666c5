"""`poolkeeper schema`: the JSON Schema of the job spec, from the same model that validates it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema

from poolkeeper.config import model
from poolkeeper.config.model import ConfigModel
from poolkeeper.config.schema_checks import add_checks


class _SchemaNames(GenerateJsonSchema):
    """Names each `$defs` entry by its model's title (JobSpec, Retry...), as the published
    schema always has, rather than by the Python class (JobModel, RetryModel...)."""

    def normalize_name(self, name: str) -> str:
        cls = getattr(model, name, None)
        if isinstance(cls, type) and issubclass(cls, BaseModel):
            name = cls.model_config.get("title") or name
        return super().normalize_name(name)


def json_schema() -> dict[str, Any]:
    """A draft 2020-12 schema for editors (yaml-language-server: completion, hover, checks)."""
    schema = add_checks(ConfigModel.model_json_schema(schema_generator=_SchemaNames))
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://poolkeeper.invalid/schema/v1.json",
        **schema,
    }
