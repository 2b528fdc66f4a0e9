"""Structured-output constraints for tests, with the check that an output meets each: generated
JSON schemas (nested objects, arrays, enums, bounded integers, bounded strings, required fields),
regexes, choices and an EBNF grammar. Every one bounds its output's length, so a random-weight
model, whose free output is noise, still finishes within MAX_TOKENS (json_object bounds nothing:
its tests favour the closing brace with logit_bias)."""

import json
import random
import re

import jsonschema

from conveyor import StructuredOutputsParams

MAX_TOKENS = 160

REGEXES = [r"[0-9]{3}-[a-z]{2,4}", r"(yes|no)!", r"[A-Z][a-z]{1,5} [0-9]{1,2}"]
CHOICES = [["red", "green", "blue"], ['a "quoted" one', "back\\slash", "ünïcödé"]]
GRAMMAR = 'root ::= greeting " " name\ngreeting ::= "hello" | "hi"\nname ::= [a-z] [a-z]? [a-z]?'
GRAMMAR_REGEX = r"(hello|hi) [a-z]{1,3}"


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    kinds = ["integer", "boolean", "enum", "string"] + (["array", "object"] if depth < 2 else [])
    kind = "object" if depth == 0 else rng.choice(kinds)
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 300)}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["alpha", "beta", "gamma", "delta", "x y"], rng.randint(1, 3))}
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 6)}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "maxItems": rng.randint(1, 3)}
    names = [f"field_{i}" for i in range(rng.randint(1, 3))]
    return {"type": "object", "properties": {name: random_schema(rng, depth + 1) for name in names},
            "required": rng.sample(names, rng.randint(1, len(names)))}


def schemas(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [random_schema(rng) for _ in range(count)]


def all_kinds(num_schemas: int) -> list[StructuredOutputsParams]:
    """`num_schemas` JSON schemas, then every regex, choice list and the grammar."""
    return ([StructuredOutputsParams(json=schema) for schema in schemas(num_schemas)]
            + [StructuredOutputsParams(regex=regex) for regex in REGEXES]
            + [StructuredOutputsParams(choice=choice) for choice in CHOICES]
            + [StructuredOutputsParams(grammar=GRAMMAR)])


def assert_meets(constraint: StructuredOutputsParams, text: str) -> None:
    """`text` is what `constraint` allows."""
    if constraint.json is not None:
        jsonschema.validate(json.loads(text), constraint.json)
    elif constraint.json_object:
        assert isinstance(json.loads(text), dict), text
    elif constraint.regex is not None:
        assert re.fullmatch(constraint.regex, text), (constraint.regex, text)
    elif constraint.choice is not None:
        assert text in constraint.choice, text
    else:
        assert re.fullmatch(GRAMMAR_REGEX, text), text
