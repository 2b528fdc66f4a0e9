"""The `conveyor` command's options, and its one-line report of a failed start.

The engine options are `EngineConfig`'s fields (config.py): each field's name, type and default make
its option, its `option(...)` the help and what the type leaves open, and a nested Struct
(`RequestLimits`) a group of its own; one that may be None (`SpeculativeConfig`) takes a JSON object.

    int | float | str          --field-name VALUE
    Bytes                      --field-name SIZE: 4GiB, 512MiB or a number of bytes
    Literal[...]               --field-name {a,b,...}
    bool, True by default      --no-field-name (less any leading `enable_`)
    bool, False by default     --field-name
    bool | None                --field-name / --no-field-name
    Struct | None              --field-name JSON (an object of the Struct's fields)
    no default                 a positional argument, optional (MODEL: the default model)
"""

import argparse
import json
import logging
import os
import re
import sys
import types
import typing
from typing import Annotated, Any

import msgspec

from conveyor.config import Bytes, EngineConfig, GiB, literal_choices
from conveyor.frontend.errors import EngineStartupError
from conveyor.ipc.process import summarize_failure

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 16 << 20

SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
              "mib": 1 << 20, "g": GiB, "gb": GiB, "gib": GiB, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from '2GiB', '512MiB', '1.5G' or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"expected a size such as 2GiB, 512MiB or 1073741824, got {text!r}")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])


def parse_json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


PARSERS = {int: int, float: float, str: str, Bytes: parse_size}


def parse_lora_module(text: str) -> tuple[str, str]:
    """(name, path) from 'name=path'."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected a LoRA module as NAME=PATH, got {text!r}")
    return name, path


def unwrap(field_type) -> tuple[Any, msgspec.Meta | None]:
    """A field's type without its `Annotated` metadata and `| None`, and that metadata."""
    meta = None
    if typing.get_origin(field_type) is Annotated:
        field_type, meta = typing.get_args(field_type)[:2]
    if typing.get_origin(field_type) in (typing.Union, types.UnionType):
        field_type, = (arg for arg in typing.get_args(field_type) if arg is not type(None))
    return field_type, meta


def is_struct(field_type) -> bool:
    return isinstance(field_type, type) and issubclass(field_type, msgspec.Struct)


def is_option_group(field: msgspec.structs.FieldInfo) -> bool:
    """A nested Struct that is always there: each of its fields an option of its own."""
    return is_struct(unwrap(field.type)[0]) and field.default is not None


def cli_extra(field: msgspec.structs.FieldInfo) -> dict[str, str]:
    """The `option(**cli)` of a field: how the command line spells it where its type leaves it open."""
    _, meta = unwrap(field.type)
    return (meta.extra if meta is not None else None) or {}


def is_required(field: msgspec.structs.FieldInfo) -> bool:
    return field.default is msgspec.NODEFAULT and field.default_factory is msgspec.NODEFAULT


def add_field_option(group, field: msgspec.structs.FieldInfo, fallback_help: str | None = None) -> None:
    """The option (or positional argument) of one config field, as the module docstring spells it."""
    field_type, meta = unwrap(field.type)
    extra = cli_extra(field)
    help = meta.description.replace("%", "%%") if meta and meta.description else fallback_help
    name = field.name.replace("_", "-")
    if is_required(field):  # MODEL: optional on the command line, where the default model stands in
        group.add_argument(field.name, nargs="?", help=help)
        return
    default = os.environ.get(extra["env"]) if "env" in extra else field.default
    flags = [f"--{name}", *([extra["alias"]] if "alias" in extra else [])]
    if field_type is bool and default is True:
        group.add_argument(f"--no-{name.removeprefix('enable-')}", dest=field.name, action="store_false", help=help)
    elif field_type is bool and default is None:
        group.add_argument(*flags, action=argparse.BooleanOptionalAction, default=None, help=help)
    elif field_type is bool:
        group.add_argument(*flags, action="store_true", help=help)
    elif is_struct(field_type):
        group.add_argument(*flags, type=parse_json_object, default=default, help=help, metavar=extra.get("metavar"))
    elif choices := literal_choices(field_type):
        group.add_argument(*flags, default=default, choices=list(choices), help=help, metavar=extra.get("metavar"))
    else:
        group.add_argument(*flags, type=PARSERS[field_type], default=default, help=help,
                           metavar=extra.get("metavar"))


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """MODEL, --log-level, and the engine's options but those of one command (see add_server_args)."""
    fields = [f for f in msgspec.structs.fields(EngineConfig) if "command" not in cli_extra(f)]
    for field in fields:
        if is_required(field):
            add_field_option(parser, field)
    parser.add_argument("--log-level", type=str.lower, default=os.environ.get("CONVEYOR_LOG_LEVEL"),
                        choices=["debug", "info", "warning", "error"],
                        help="default: $CONVEYOR_LOG_LEVEL, else info for serve and warning for generate")
    engine = parser.add_argument_group("engine")
    for field in fields:
        field_type, meta = unwrap(field.type)
        if is_option_group(field):
            group = parser.add_argument_group(field.name.replace("_", " "), meta.description if meta else None)
            for sub in msgspec.structs.fields(field_type):
                add_field_option(group, sub, fallback_help=f"default {sub.default}")
        elif not is_required(field):
            add_field_option(engine, field)


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """`conveyor serve`'s own options: the HTTP server's, and those of several processes (the engine
    options that name `command="serve"` among them)."""
    s = parser.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", help="the model name clients send (default: MODEL as given)")
    s.add_argument("--api-key", default=os.environ.get("CONVEYOR_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: "
                        "$CONVEYOR_API_KEY)")
    s.add_argument("--public-metrics", action="store_true",
                   help="with --api-key, serve /metrics without the key (for scrapers that send none)")
    s.add_argument("--max-request-body", type=parse_size, default=DEFAULT_MAX_REQUEST_BYTES, metavar="SIZE",
                   help="largest request body accepted, e.g. 16MiB (the default); larger ones get 413")
    s.add_argument("--trust-request-chat-template", action="store_true",
                   help="render a chat template that a request brings (chat_template, or chat_template_kwargs"
                        "'s); a template is code, so this is for trusted clients only (it renders under a time limit)")
    s.add_argument("--allowed-logits-processors", nargs="+", default=[], metavar="PATH",
                   help="import paths ('pkg.module:fn') that requests may name in logits_processors; "
                        "they run in the engine's processes (default: none)")
    s.add_argument("--lora-modules", nargs="+", type=parse_lora_module, default=[], metavar="NAME=PATH",
                   help="LoRA adapters (PEFT directories) that requests name as their model (needs --enable-lora)")
    s.add_argument("--allow-lora-updates", action="store_true",
                   help="serve /v1/load_lora_adapter and /v1/unload_lora_adapter, which add and remove adapters "
                        "of this API server at run time")
    s.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGINT/SIGTERM, seconds in-flight requests get to finish before they are aborted")
    m = parser.add_argument_group("multi-process")
    m.add_argument("--api-server-count", type=int, default=1, metavar="K",
                   help="API-server processes sharing one engine core and the HTTP port (default 1)")
    m.add_argument("--headless", action="store_true",
                   help="run only the engine core and its workers, listening for API servers on "
                        "tcp://HOST:ENGINE_PORT (--host is then the interface to listen on)")
    m.add_argument("--engine-port", type=int, default=5570, help="the --headless core's port (default 5570)")
    m.add_argument("--engine-address", metavar="HOST:PORT",
                   help="run API servers for the --headless core there (its engine arguments apply; "
                        "MODEL still names the tokenizer to load)")
    for field in msgspec.structs.fields(EngineConfig):
        if cli_extra(field).get("command") == "serve":
            add_field_option(m, field)


def engine_args(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of `EngineConfig` (and `AsyncLLM`) that the command line gives: every
    field its command has and that is not None, a nested Struct built from its own fields."""
    kwargs = {}
    for field in msgspec.structs.fields(EngineConfig):
        field_type, _ = unwrap(field.type)
        if is_option_group(field):
            kwargs[field.name] = field_type(**{sub.name: getattr(args, sub.name)
                                               for sub in msgspec.structs.fields(field_type)
                                               if getattr(args, sub.name, None) is not None})
        elif getattr(args, field.name, None) is not None:
            kwargs[field.name] = getattr(args, field.name)
    return kwargs


def startup_failure(command: str, exc: Exception) -> int:
    """Report why the engine did not start in one line on stderr (the traceback goes to the log
    at DEBUG); the exit status: 1 when the engine failed, 2 for bad input (arguments, model files)."""
    logger.debug("conveyor %s failed to start", command, exc_info=exc)
    cause = summarize_failure(str(exc))
    if not isinstance(exc, EngineStartupError | ValueError | OSError):
        cause = f"failed to start: {type(exc).__name__}: {cause}"
    print(f"conveyor {command}: {cause}", file=sys.stderr)
    return 2 if isinstance(exc, ValueError | OSError) else 1
