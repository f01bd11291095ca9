"""Turn a CustomResourceDefinition into the strict JSON schema kubeconform would check it with.

    python tests/unit/data/k8s/crd_schema.py CRD.yaml VERSION > KIND-GROUP-VERSION.json

As kubeconform's openapi2jsonschema.py with strict mode: the version's openAPIV3Schema, every
object that lists its properties closed to others (unless it preserves unknown fields), and
`description` texts dropped (they are most of the file and validate nothing).
"""

import json
import sys
from typing import Any

import yaml


def strict(node: Any) -> Any:
    if isinstance(node, list):
        return [strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: strict(value) for key, value in node.items() if key != "description"}
    if "properties" in node and isinstance(node["properties"], dict):
        out["properties"] = {name: strict(value) for name, value in node["properties"].items()}
        if "additionalProperties" not in node and not node.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    return out


def main() -> None:
    crd = yaml.safe_load(open(sys.argv[1]))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == sys.argv[2]]
    schema = strict(version["schema"]["openAPIV3Schema"])
    schema["$schema"] = "http://json-schema.org/draft-07/schema#"
    json.dump(schema, sys.stdout, sort_keys=True, separators=(",", ":"))


if __name__ == "__main__":
    main()
