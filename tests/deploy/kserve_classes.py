"""Builds manifests (a JSON list on stdin) into the kserve package's model class named by the
first argument, and each nested object into its own class (kserve's or the Kubernetes client's, by
the classes' openapi_types); prints them back as JSON, from the built objects. A field no class
declares, or a required one missing, exits 1 with the message.

Run by tests/deploy/test_k8s.py with the Python of the tools venv (Makefile), where kserve lives
apart from the project's dependencies.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import kserve.models as kserve_models
import kubernetes.client.models as kubernetes_models


def build(value: Any, type_name: str, where: str) -> Any:
    if type_name.startswith("list["):
        return [build(v, type_name[5:-1], f"{where}[{i}]") for i, v in enumerate(value)]
    if type_name.startswith("dict("):
        item_type = type_name[5:-1].split(", ", 1)[1]
        return {k: build(v, item_type, f"{where}.{k}") for k, v in value.items()}
    cls = getattr(kserve_models, type_name, None) or getattr(kubernetes_models, type_name, None)
    if cls is None:  # a primitive: str, int, bool, object
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{where}: {type_name} is an object, got {value!r}")
    attributes = {json_name: attr for attr, json_name in cls.attribute_map.items()}
    unknown = sorted(set(value) - set(attributes))
    if unknown:
        raise ValueError(f"{where}: {type_name} has no field {unknown[0]!r}")
    try:
        return cls(
            **{
                attributes[key]: build(item, cls.openapi_types[attributes[key]], f"{where}.{key}")
                for key, item in value.items()
            }
        )
    except ValueError as exc:  # the class's own checks: required fields, allowed values
        raise ValueError(f"{where}: {exc}") from None


def dump(value: Any) -> Any:
    """Built objects back to JSON names, unset fields left out."""
    if isinstance(value, list):
        return [dump(item) for item in value]
    if isinstance(value, dict):
        return {key: dump(item) for key, item in value.items()}
    if hasattr(value, "attribute_map"):
        fields = {name: getattr(value, attr) for attr, name in value.attribute_map.items()}
        return {name: dump(item) for name, item in fields.items() if item is not None}
    return value


def main() -> int:
    documents = json.load(sys.stdin)
    try:
        built = [build(document, sys.argv[1], document["kind"]) for document in documents]
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(json.dumps(dump(built)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
