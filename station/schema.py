"""Reading the station's files (station.toml, profile.toml, flasher_args.json) into typed values.

The tables themselves are declared once, as frozen pydantic dataclasses with unknown keys
forbidden (`station/config.py`, `station/profile.py`); this module holds what they share:
the strict field types, the file reader that never lets a malformed file through as a
traceback, and the translation of pydantic's errors into `Problem`s in words of the line
(the file, the dotted key, what is wrong and what is allowed).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, TypeVar, Union

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, Strict, TypeAdapter, ValidationError

T = TypeVar("T")

# every table refuses keys it does not declare: a typo is an error, not a silent default;
# a field's docstring is its description (the README's key reference is made from them)
SCHEMA = ConfigDict(extra="forbid", use_attribute_docstrings=True)
MAX_FILE_BYTES = 1 << 20  # a profile or station.toml is a few kilobytes; a bigger file is a mistake

# a field the station sets, not a key of the file (the file naming it is an unknown key)
NOT_IN_FILE = {"in_file": False}

# TOML has strings, integers, floats and booleans: a field takes only its own kind
Text = Annotated[str, Strict()]
Flag = Annotated[bool, Strict()]
Seconds = Annotated[float, Strict(), Field(ge=0, le=3600, allow_inf_nan=False)]
Name = Annotated[str, Strict(), Field(min_length=1, max_length=200)]
def _no_nul(path: T) -> T:
    if "\0" in str(path):
        raise ValueError("a file name cannot hold a NUL character (\\u0000)")
    return path


FilePath = Annotated[Path, Field(strict=False), AfterValidator(_no_nul)]  # relative to the file's folder
FileName = Annotated[str, Strict(), Field(min_length=1, max_length=4096), AfterValidator(_no_nul)]
SHA256_PATTERN = r"^[0-9a-fA-F]{64}$"
Sha256 = Annotated[str, Strict(), Field(pattern=SHA256_PATTERN)]


@dataclasses.dataclass(frozen=True)
class Problem:
    file: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.field}: {self.message}"


class ConfigError(Exception):
    """A configuration or profile problem: nothing is flashed.

    Built from a sentence or from a list of `Problem`s (kept in `.problems`).
    """

    def __init__(self, message: str | list[Problem]):
        self.problems: list[Problem] = list(message) if isinstance(message, list) else []
        super().__init__("; ".join(map(str, self.problems)) if self.problems else message)


def parse_offset(value: object) -> object:
    """A flash offset: an integer or a string such as "0x10000" (pydantic checks the range)."""
    if isinstance(value, str):
        try:
            return int(value, 0)
        except ValueError:
            raise ValueError(f"{describe(value)} is not an offset: write it like \"0x10000\"") from None
    return value


def whole_number(value: object) -> object:
    """Refuse what lax validation would turn into an int (1.0, true) before a Literal of numbers sees it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a whole number, got {describe(value)}")
    return value


Offset = Annotated[int, BeforeValidator(parse_offset), Strict(), Field(ge=0, lt=1 << 32)]


# -- reading files -----------------------------------------------------------------------

def read_text(path: Path, what: str) -> str:
    """The file's text, or ConfigError naming the file and what is wrong with it."""
    def refuse(message: str) -> ConfigError:
        return ConfigError([Problem(str(path), "(file)", message)])

    try:
        size = path.stat().st_size
        if path.is_dir():
            raise refuse(f"is a folder; the {what} is a file")
        if not path.is_file():  # a FIFO or a device could block or never end
            raise refuse(f"is not a regular file; the {what} is a file")
        if size > MAX_FILE_BYTES:
            raise refuse(f"is {size / 1e6:.1f} MB; a {what} is a few kilobytes (files over "
                         f"{MAX_FILE_BYTES >> 20} MiB are refused)")
        raw = path.read_bytes()[: MAX_FILE_BYTES + 1]  # a file that grows while read stays bounded
    except OSError as exc:
        raise refuse(f"cannot read the {what}: {exc.strerror or exc}") from None
    except ValueError:  # a NUL in the name: no such file can exist
        raise refuse(f"cannot read the {what}: the name holds a NUL character") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise refuse(f"is not UTF-8 text: byte 0x{raw[exc.start]:02x} on line {line}; "
                     f"save the {what} as UTF-8") from None
    if not text.strip():  # a truncated or never-written file, not a choice of every default
        raise refuse("is empty")
    return text


def read_toml(path: Path, what: str) -> dict[str, Any]:
    return parse_toml(read_text(path, what), path)


def parse_toml(text: str, path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except RecursionError:
        problem = "arrays or tables nested too deeply to read"
    except ValueError as exc:  # TOMLDecodeError, and integers too long to convert
        problem = str(exc).split("; use sys.set_int_max_str_digits")[0]
    raise ConfigError([Problem(str(path), "(file)", f"not valid TOML: {problem}")])


def read_json(path: Path, what: str) -> Any:
    text = read_text(path, what)

    def no_constant(name: str) -> None:
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(text, parse_constant=no_constant)
    except RecursionError:
        problem = "arrays or objects nested too deeply to read"
    except ValueError as exc:  # JSONDecodeError and the constants above
        problem = str(exc).split("; use sys.set_int_max_str_digits")[0]
    raise ConfigError([Problem(str(path), "(file)", f"not valid JSON: {problem}")])


# -- validating ----------------------------------------------------------------------------

_ADAPTERS: dict[Any, TypeAdapter] = {}


def validate(schema: type[T], data: Any, file: str, prefix: str = "") -> tuple[T | None, list[Problem]]:
    """The value, or None and every problem pydantic found (in one pass), in words of the line.

    `data` is what a TOML or JSON reader gave (a JSON object is called a table, as in TOML).
    """
    adapter = _ADAPTERS.get(schema) or _ADAPTERS.setdefault(schema, TypeAdapter(schema))
    outside = [f.name for f in dataclasses.fields(schema) if f.metadata == NOT_IN_FILE]  # type: ignore[arg-type]
    if isinstance(data, dict) and any(k in data for k in outside):  # pydantic would take them: refuse here
        found = [Problem(file, dotted(prefix, (k,)), _message(schema, {"type": "extra_forbidden", "loc": (k,)}))
                 for k in outside if k in data]
        _, more = validate(schema, {k: v for k, v in data.items() if k not in outside}, file, prefix)
        return None, found + more
    try:
        return adapter.validate_python(data), []
    except ValidationError as exc:
        return None, [Problem(file, dotted(prefix, err["loc"]), _message(schema, err))
                      for err in exc.errors(include_url=False, include_context=True)]
    except RecursionError:  # pydantic's own guard normally answers first
        return None, [Problem(file, prefix or "(file)", "nested too deeply to read")]


def dotted(prefix: str, loc: tuple) -> str:
    """A pydantic location as the key a person finds in the file: checks.smoke, config.keys[2].unit."""
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            continue  # a table's key was wrong: the key itself is already named
        else:
            bare = part and all(c.isascii() and (c.isalnum() or c in "-_") for c in part)
            name = part if bare else describe(part)
            out += f".{name}" if out else name
    return out or "(top level)"


def describe(value: Any) -> str:
    """A value as TOML shows it, short (never the whole of a large or deeply nested value)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if value.bit_length() < 64:
            return str(value)
        digits = len(str(abs(value))) if value.bit_length() < 14000 else int(value.bit_length() * 0.30103) + 1
        return f"a {digits}-digit number"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("-" if value < 0 else "") + "inf" if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value if len(value) <= 40 else value[:37] + "...", ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} item{'s' * (len(value) != 1)}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, (datetime.date, datetime.time)):
        return f"the date/time {value.isoformat()}"
    return type(value).__name__


_KIND = {
    "string_type": "text in quotes", "int_type": "a whole number", "float_type": "a number",
    "bool_type": "true or false", "path_type": "a path in quotes", "list_type": "a list [ ... ]",
    "tuple_type": "a list [ ... ]", "dict_type": "a table { ... }",
    "dataclass_type": "a table { ... }", "model_type": "a table { ... }", "literal_error": "", "finite_number": "a finite number (not nan or inf)",
}


def _message(schema: type, err: dict) -> str:
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    if kind in ("missing", "missing_argument"):
        return "missing: this key is required"
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        allowed = allowed_keys(schema, err["loc"][:-1])
        return "unknown key" + (f"; allowed here: {', '.join(allowed)}" if allowed else "")
    if kind == "literal_error":
        return f"{describe(value)} is not allowed: use {str(ctx.get('expected', '')).replace(chr(39), chr(34))}"
    if kind in _KIND:
        return f"expected {_KIND[kind]}, got {describe(value)}"
    bounds = {"greater_than_equal": "at least {ge}", "greater_than": "more than {gt}",
              "less_than_equal": "at most {le}", "less_than": "less than {lt}"}
    if kind in bounds:
        limit = bounds[kind].format(**{k: describe(v) for k, v in ctx.items()})
        return f"{describe(value)} is out of range: it must be {limit}"
    if kind in ("string_too_short", "too_short"):
        return "is empty" if not value else f"{describe(value)} is too short"
    if kind in ("string_too_long", "too_long"):
        return f"{describe(value)} is too long (at most {ctx.get('max_length')})"
    if kind == "string_pattern_mismatch":
        return f"{describe(value)} is not {_PATTERN_WORDS.get(ctx.get('pattern'), 'in the expected form')}"
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", err["msg"]))
    return f"{err['msg'][:1].lower()}{err['msg'][1:]} (got {describe(value)})"


_PATTERN_WORDS = {SHA256_PATTERN: "a SHA-256 (64 hex digits)"}


def allowed_keys(schema: Any, loc: tuple) -> list[str]:
    """The keys the table at `loc` declares (walking the schema's types as the location does)."""
    t = schema
    for part in loc:
        t = _unwrap(t)
        if dataclasses.is_dataclass(t):
            t = typing.get_type_hints(t, include_extras=True).get(part)
        elif typing.get_origin(t) in (list, tuple) and isinstance(part, int):
            t = typing.get_args(t)[0]
        elif typing.get_origin(t) is dict:
            t = typing.get_args(t)[1]
        else:
            return []
    t = _unwrap(t)
    if not dataclasses.is_dataclass(t):
        return []
    return [f.name for f in dataclasses.fields(t) if f.init and f.metadata != NOT_IN_FILE]


def _unwrap(t: Any) -> Any:
    while True:
        origin = typing.get_origin(t)
        if origin is Annotated:
            t = typing.get_args(t)[0]
        elif origin in (Union, types.UnionType):  # `X | None`: the table, if one of them is
            t = next((a for a in typing.get_args(t) if a is not type(None)), t)
            if typing.get_origin(t) in (Union, types.UnionType):
                return t
        else:
            return t


# -- the key reference (README) -------------------------------------------------------------

REFERENCE_BEGIN = "<!-- profile keys: made by `python -m station.schema README.md` from station/profile.py; do not edit -->"
REFERENCE_END = "<!-- end of profile keys -->"


def _type_words(t: Any) -> str:
    """A field's type as a person writes it in TOML."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_words(a) for a in args if a is not type(None))
    if origin is typing.Literal:
        return ", ".join(describe(a) for a in args)
    if origin in (list, tuple):
        inner = _unwrap(args[0])
        return "list of tables" if dataclasses.is_dataclass(inner) else f"list of {_type_words(args[0])}"
    if origin is dict:
        inner = _unwrap(args[1])
        return "a table per name" if dataclasses.is_dataclass(inner) else f"table: name = {_type_words(args[1])}"
    if dataclasses.is_dataclass(t):
        return "table"
    if origin is Annotated:
        base, meta = args[0], args[1:]
        if typing.get_origin(base) is typing.Literal:
            return _type_words(base)
        if any(getattr(m, "func", None) is parse_offset for m in meta):
            return 'offset ("0x10000")'
        limits = {k: getattr(x, k) for m in meta for x in (m, *getattr(m, "metadata", ()))  # Field(...) nests them
                  for k in ("ge", "le", "max_length", "pattern") if getattr(x, k, None) is not None}
        if limits.get("pattern") == SHA256_PATTERN:
            return "SHA-256 (64 hex digits)"
        if base is float:
            return f"seconds ({limits.get('ge', 0):g} to {limits.get('le')})"
        if base is int:
            return f"whole number ({limits.get('ge')} to {limits.get('le')})"
        if base is str and any(getattr(m, "func", None) is _no_nul for m in meta):
            return "file path"
        return _type_words(base) + (" (not empty)" if base is str and "max_length" in limits else "")
    if t is str:
        return "text"
    if t is bool:
        return "true or false"
    if t is int:
        return "whole number"
    return getattr(t, "__name__", str(t))


def _default_words(f: dataclasses.Field) -> str:
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return "required"
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if value is None or value == () or value == {} or dataclasses.is_dataclass(value):
        return ""
    return describe(value)


def reference_rows(schema: Any, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) of every key of the file `schema` declares, tables' keys after the table.

    ValueError names a field without a docstring: every key the file takes is described.
    """
    hints = typing.get_type_hints(schema, include_extras=True)
    described = getattr(schema, "__pydantic_fields__", {})
    rows = []
    for f in dataclasses.fields(schema):
        if not f.init or f.metadata == NOT_IN_FILE:
            continue
        key, t = prefix + f.name, hints[f.name]
        doc = described[f.name].description if f.name in described else None
        if not doc:
            raise ValueError(f"{schema.__name__}.{f.name} ({key}) has no docstring: the key reference needs one")
        rows.append((key, _type_words(t), _default_words(f), doc))
        inner = _unwrap(t)
        origin = typing.get_origin(inner)
        if dataclasses.is_dataclass(inner):
            rows += reference_rows(inner, key + ".")
        elif origin in (list, tuple) and dataclasses.is_dataclass(_unwrap(typing.get_args(inner)[0])):
            rows += reference_rows(_unwrap(typing.get_args(inner)[0]), key + "[].")
        elif origin is dict and dataclasses.is_dataclass(_unwrap(typing.get_args(inner)[1])):
            rows += reference_rows(_unwrap(typing.get_args(inner)[1]), key + ".NAME.")
    return rows


def reference_table(schema: Any) -> str:
    """The Markdown table of every key, between the markers the README keeps it in."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [REFERENCE_BEGIN, "", "| Key | Type | Default | Meaning |", "|---|---|---|---|"]
    lines += [f"| `{k}` | {cell(t)} | {cell(d)} | {cell(m)} |" for k, t, d, m in reference_rows(schema)]
    return "\n".join(lines + ["", REFERENCE_END])


def readme_with_reference(readme: str, table: str) -> str:
    """The README's text with the table between its markers replaced (ValueError: the markers are missing)."""
    start, end = readme.find(REFERENCE_BEGIN), readme.find(REFERENCE_END)
    if start < 0 or end < start:
        raise ValueError(f"the README has no {REFERENCE_BEGIN!r} ... {REFERENCE_END!r} block")
    return readme[:start] + table + readme[end + len(REFERENCE_END):]


if __name__ == "__main__":  # python -m station.schema README.md: rewrite the README's profile key reference
    import sys

    from station import schema  # this file runs as __main__: its types are the imported module's
    from station.profile import ProfileFile

    target = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    target.write_text(schema.readme_with_reference(target.read_text(), schema.reference_table(ProfileFile)))
    print(f"{target}: profile key reference rewritten")
