"""`raydc config show`: every config field with its default (or a config file's value) and the comment beside it
in the source, and a JSON schema of the config for editors.

The comments are read from the dataclasses' source rather than kept twice: the comment beside a field (or the
comment block right above it) is its documentation, so `config show` can never disagree with the code.
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import json
import textwrap
import tokenize
from functools import cache
from typing import Any, get_type_hints

import yaml

from raydc.config_loader import RESUMABLE, to_dict, type_name


@cache
def field_comments(cls: type) -> dict[str, str]:
    """{field: comment} of dataclass `cls`: the comment on the field's line, else the comment lines just above
    it (a blank line or other code in between ends such a block). Fields without a comment are absent."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # made at run time (the assembled Config): no source
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    comments = {tok.start[0]: tok.string.lstrip("#").strip()  # tokenize: a '#' inside a string is no comment
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    out: dict[str, str] = {}
    block: list[str] = []
    for lineno, line in enumerate(source.splitlines(), start=1):
        body = line.strip()
        name = body.split(":", 1)[0].strip() if ":" in body else ""
        if body.startswith("#"):
            block.append(comments.get(lineno, ""))
        elif line.startswith("    ") and not line.startswith("     ") and name in names and name.isidentifier():
            text = comments.get(lineno) or " ".join(block)
            if text:
                out[name] = text
            block = []
        else:
            block = []
    return out


def _scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix(" ...").strip()


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def show(cfg, *, method: str | None = None, width: int = 44) -> str:
    """The config as YAML (loadable as it is), each field with its comment, type and, where `cfg` differs
    from the default, the default. Sections of methods other than `method` (default: cfg's) are left out."""
    from raydc.methods import methods

    chosen = method or cfg.method
    other_sections = {c.section for name, c in methods().items() if c.section and name != chosen}
    lines: list[str] = []
    top = next(f for f in dataclasses.fields(cfg) if f.name == "method")
    lines.append(_line("method", chosen, top.default, type(cfg).__annotations__["method"]
                       if "method" in getattr(type(cfg), "__annotations__", {}) else None,
                       "which method trains (its section below)", "", width))
    for f in dataclasses.fields(cfg):
        if f.name == "method" or f.name in other_sections:
            continue
        section = getattr(cfg, f.name)
        cls = type(section)
        doc = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
        lines.append("")
        lines.append(f"{f.name}:" + (f"  # {doc}" if doc and not doc.startswith(cls.__name__ + "(") else ""))
        comments, hints = field_comments(cls), get_type_hints(cls)
        defaults = type(section)()
        for sf in dataclasses.fields(section):
            lines.append(_line(sf.name, to_dict(getattr(section, sf.name)), to_dict(getattr(defaults, sf.name)),
                               hints.get(sf.name), comments.get(sf.name, ""), "  ", width,
                               resumable=bool(sf.metadata.get(RESUMABLE))))
    return "\n".join(lines) + "\n"


def _line(name: str, value: Any, default: Any, tp: Any, comment: str, indent: str, width: int,
          resumable: bool = False) -> str:
    head = f"{indent}{name}: {_scalar(value)}"
    above = []
    if len(comment) > 60:  # a paragraph (a comment block in the source): above the field, as there
        above = [f"{indent}# {text}" for text in textwrap.wrap(comment, 116 - len(indent))]
        comment = ""
    notes = [comment] if comment else []
    if tp is not None:
        notes.append(f"[{type_name(tp)}]")
    if value != default:
        notes.append(f"(default: {_scalar(default)})")
    if resumable:
        notes.append("(may change on --resume)")
    return "\n".join(above + [f"{head.ljust(width)} # {' '.join(notes)}" if notes else head])


def json_schema() -> dict:
    """The config's JSON schema (pydantic's TypeAdapter, which Ray installs), with each field's comment as its
    description: editors with a YAML language server then complete and check config files."""
    from pydantic import TypeAdapter

    from raydc.config import Config

    schema = TypeAdapter(Config).json_schema()
    classes = {f.type.__name__ if isinstance(f.type, type) else None: f.type for f in dataclasses.fields(Config)}
    for name, sub in schema.get("$defs", {}).items():
        cls = classes.get(name)
        if cls is None:
            continue
        for field, text in field_comments(cls).items():
            prop = sub.get("properties", {}).get(field)
            if prop is not None:
                prop.setdefault("description", text)
    schema["title"] = "raydc config"
    return schema


def run_config_show(args) -> int:
    """`raydc config show [--config F] [--set K=V] [--method M] [--json-schema]`."""
    from raydc.config import Config, load_config
    from raydc.errors import ConfigError
    from raydc.methods import methods

    if args.json_schema:
        print(json.dumps(json_schema(), indent=2))
        return 0
    if args.method is not None and args.method not in methods():
        raise ConfigError("method", f"got {args.method!r}, expected one of {', '.join(methods())}")
    # The defaults alone are shown unchecked (data.shards has none); a file or --set is loaded and checked.
    cfg = load_config(args.config, args.overrides) if args.config or args.overrides else Config()
    print(show(cfg, method=args.method), end="")
    return 0


def version_line() -> str:
    """raydc's version and those of the libraries it runs on (what a bug report needs), without importing them."""
    from importlib.metadata import PackageNotFoundError, version

    import raydc

    parts = []
    for name in ("ray", "torch", "torchvision", "faiss-cpu", "faiss-gpu"):
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    return f"raydc {raydc.__version__} ({', '.join(parts)})"


def add_config_arguments(p) -> None:
    sub = p.add_subparsers(dest="config_command", required=True)
    s = sub.add_parser("show", help="every config field: its value (a file's, or the default), type and comment")
    s.add_argument("--config", help="YAML config whose values to show beside the defaults")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--method", help="show this method's section (default: the config's method)")
    s.add_argument("--json-schema", action="store_true", help="print the config's JSON schema instead")
