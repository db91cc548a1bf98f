"""Property-based fuzzing: no profile.toml or station.toml, however malformed, crashes the station.

Each example either loads (and then `check_profile` returns problems or none without
raising) or is refused with ConfigError/ProfileError whose problems each name the file and
a key in plain words. Examples are derived from the valid documents (keys dropped,
replaced, retyped, renamed, nested wrongly, unknown keys added) and from random TOML.
Derandomized and without an example database, so a run never fails by chance.
"""

from __future__ import annotations

import json
import math
import shutil
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from station.config import ConfigError, StationConfig
from station.profile import Problem, ProfileError, check_profile, load_profile
from tests.station.conftest import REPO

FUZZ = settings(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
ENV = {"RELAY_VENDOR_TOKEN": "tok-1234"}
RELAY = tomllib.loads((REPO / "profiles/relay/profile.toml").read_text())
STATION = {
    "station_id": "line-1-station-1", "database": "var/station.db", "spool": "var/station.db.spool",
    "min_free_mb": 64, "profiles_dir": "profiles", "default_profile": "relay", "slots": 4, "operator": "",
    "lot": "L1", "admin_password_sha256": "", "key_file": "var/station.key", "signing_key": "var/k.pem",
    "secrets_file": "var/secrets.enc", "ports": {"usb": ["10c4:ea60", "303a:1001"]},
    "smoke": {"timeout_s": 10, "reach": "direct", "url": "", "port": 80, "broker_host": "127.0.0.1",
              "broker_port": 1883, "test_email": "t@example.com"},
}
PYDANTIC_WORDS = ("pydantic", "Traceback", "For further information", "input_value", "errors.pydantic.dev")


# -- TOML out of Python values (inline tables: any nesting is one line) --------------------

def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)} = {toml_value(x)}" for k, x in v.items()) + "}"


def toml_doc(doc: dict) -> str:
    return "".join(f"{json.dumps(k, ensure_ascii=False)} = {toml_value(v)}\n" for k, v in doc.items())


# -- strategies -----------------------------------------------------------------------

texts = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
keys = st.one_of(st.sampled_from(["name", "chip", "regions", "keys", "value", "file", "offset", "pattern",
                                  "smoke", "usb", "database", "spool", "min_free_mb", "x", ""]), texts)
scalars = st.one_of(
    texts, st.sampled_from(["esp32", "0x1000", "0xZZ", "RLY-{seq:05}", "{", "}", "{seq", "4MB", "pair", "../", "a\0b",
                     "/dev/zero", "/", ".", "firmware", "firmware/relay.bin", "\x7f", "\ud7ff\U0010ffff"]),
    st.integers(), st.integers(min_value=-(2**80), max_value=2**80), st.sampled_from([0, -1, 2**63, 10**100]),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans())
toml_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)), max_leaves=12)


def paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every location in a document: table keys and list items, at any depth."""
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += paths(v, prefix + (i,))
    return out


def get(doc: Any, path: tuple) -> Any:
    for p in path:
        doc = doc[p]
    return doc


@st.composite
def mutated(draw, original: dict) -> dict:
    doc = json.loads(json.dumps(original))  # a deep copy (TOML's values are JSON's, here)
    for _ in range(draw(st.integers(1, 4))):
        where = paths(doc)
        if not where:
            break
        path = draw(st.sampled_from(where))
        parent, last = get(doc, path[:-1]), path[-1]
        op = draw(st.sampled_from(["drop", "replace", "retype", "unknown", "wrap-list", "wrap-table",
                                   "rename", "table-to-list", "empty"]))
        old = parent[last]
        if op == "drop":
            del parent[last]
        elif op == "replace":
            parent[last] = draw(toml_values)
        elif op == "retype":  # the same value as another TOML kind
            parent[last] = draw(st.sampled_from([str(old), [old], {"value": old}, 0, 1.5, True, -1, 2**64,
                                                 float("nan"), float("inf"), ""]))
        elif op == "unknown":
            target = old if isinstance(old, dict) else parent if isinstance(parent, dict) else doc
            target[draw(keys)] = draw(toml_values)
        elif op == "wrap-list":
            parent[last] = [old]
        elif op == "wrap-table":
            parent[last] = {draw(keys): old}
        elif op == "rename" and isinstance(parent, dict):
            parent[draw(keys)] = parent.pop(last)
        elif op == "table-to-list" and isinstance(old, dict):
            parent[last] = [old]
        elif op == "empty":
            parent[last] = type(old)() if isinstance(old, (dict, list, str)) else 0
    return doc


def random_documents(sample_keys: list[str]) -> st.SearchStrategy[dict]:
    return st.dictionaries(st.one_of(st.sampled_from(sample_keys), keys), toml_values, max_size=8)


# -- the property ---------------------------------------------------------------------

def assert_named(problems: list[Problem]) -> None:
    assert problems
    for p in problems:
        assert isinstance(p, Problem) and p.file and p.field and p.message, p
        assert not any(w in str(p) for w in PYDANTIC_WORDS), p


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzz") / "relay"
    shutil.copytree(REPO / "profiles/relay", d)
    return d


def load_and_check(profile_dir: Path, text: str | bytes) -> None:
    path = profile_dir / "profile.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    try:
        profile = load_profile(path)
    except ProfileError as exc:
        assert_named(exc.problems)
        event("refused when read")
        return
    problems = check_profile(profile, env=ENV, store_path=profile_dir / "no-secrets.enc")
    event("checked: ready" if not problems else "checked: not ready")
    assert all(isinstance(p, Problem) for p in problems)
    assert not any(w in str(p) for p in problems for w in PYDANTIC_WORDS)


@settings(FUZZ, max_examples=450)
@given(doc=mutated(RELAY))
def test_mutated_profiles_never_crash(profile_dir, doc):
    load_and_check(profile_dir, toml_doc(doc))


@settings(FUZZ, max_examples=100)
@given(doc=random_documents(list(RELAY)))
def test_random_toml_profiles_never_crash(profile_dir, doc):
    load_and_check(profile_dir, toml_doc(doc))


@settings(FUZZ, max_examples=50)
@given(raw=st.one_of(st.binary(max_size=200), texts.map(str.encode),
                     st.sampled_from([b"", b" \n", b"[", b"a = [" * 2000, b'chip = "esp32"\n\xff\xfe',
                                      b"firmware = 1\nfirmware = 2\n", b"chip = nan"])))
def test_random_bytes_as_a_profile_never_crash(profile_dir, raw):
    load_and_check(profile_dir, raw)


def load_station(tmp: Path, text: str) -> None:
    path = tmp / "station.toml"
    path.write_text(text)
    try:
        config = StationConfig.load(path)
    except ConfigError as exc:
        assert_named(exc.problems)
        event("refused")
        return
    event("loaded")
    assert isinstance(config.spool_path, Path) and config.min_free_mb >= 0 and 1 <= config.slots <= 64


@settings(FUZZ, max_examples=200)
@given(doc=mutated(STATION))
def test_mutated_station_toml_never_crashes(profile_dir, doc):
    load_station(profile_dir.parent, toml_doc(doc))


@settings(FUZZ, max_examples=60)
@given(doc=random_documents(list(STATION)))
def test_random_station_toml_never_crashes(profile_dir, doc):
    load_station(profile_dir.parent, toml_doc(doc))
