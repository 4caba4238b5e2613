#!/usr/bin/env python3
"""Converts Firecracker's swagger document (YAML) into the JSON that tests/api_conformance.rs
reads (the test has no YAML parser). Usage:

    scripts/firecracker-swagger.py tests/data/firecracker-v1.16.1.yaml \
        > tests/data/firecracker-v1.16.1.json

The YAML is Firecracker's src/firecracker/swagger/firecracker.yaml at the release tag, as is.
"""
import json
import re
import sys

import yaml


class Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: `Off` (a log level) stays a string, as Firecracker's code reads it."""


Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def keys_to_str(v):
    if isinstance(v, dict):
        return {str(k): keys_to_str(x) for k, x in v.items()}
    if isinstance(v, list):
        return [keys_to_str(x) for x in v]
    return v


with open(sys.argv[1]) as f:
    doc = yaml.load(f, Loader=Loader)
json.dump(keys_to_str(doc), sys.stdout, indent=1, sort_keys=True)
sys.stdout.write("\n")
