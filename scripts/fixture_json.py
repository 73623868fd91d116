"""Shared by the reference-fixture scripts (``dp-reference.py``, ``skellam-reference.py``):
their JSON layout, and writing the fixture or checking it against a fresh run."""

import argparse
import json
import pathlib
import sys
from typing import Callable


def render(data: dict) -> str:
    """JSON with one line per scalar key, per list of numbers and per case."""
    lines = []
    for key, value in data.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            items = ",\n".join("  " + json.dumps(item) for item in value)
            lines.append(f" {json.dumps(key)}: [\n{items}\n ]")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def write_or_check(description: str, out: pathlib.Path, build: Callable[[], dict]) -> dict:
    """Parses ``--check``; writes ``out`` from ``build()``, or with ``--check`` exits with an
    error if the committed file differs from a fresh run. Returns the data."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--check", action="store_true", help="compare with the committed file")
    args = parser.parse_args()
    text = render(build())
    if args.check:
        if out.read_text() != text:
            sys.exit(f"{out} differs from a fresh run")
        print(f"{out} is up to date")
    else:
        out.write_text(text)
    return json.loads(text)
