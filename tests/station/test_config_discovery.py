"""Which station.toml a command uses: --config, $STATION_CONFIG, ./station.toml, the user's config folder, defaults."""

from __future__ import annotations

import os

import pytest

from station.config import ConfigError, StationConfig, find_config, user_config_dir, user_data_dir
from tests.station.conftest import run_station


def _toml(path, station_id):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'station_id = "{station_id}"\ndatabase = "db/station.db"\n')
    return path


@pytest.fixture
def places(tmp_path, monkeypatch):
    """A station.toml in each of the four places, and a working folder outside any checkout."""
    cwd = tmp_path / "work"
    files = {"--config": _toml(tmp_path / "given/station.toml", "given"),
             "$STATION_CONFIG": _toml(tmp_path / "env/station.toml", "env"),
             "the current directory": _toml(cwd / "station.toml", "cwd"),
             "the user's config folder": _toml(user_config_dir() / "station.toml", "user")}
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("STATION_CONFIG", str(files["$STATION_CONFIG"]))
    yield files
    files["the user's config folder"].unlink(missing_ok=True)  # the user folder is the whole run's


def test_the_order_is_config_env_cwd_user_folder_defaults(places, monkeypatch):
    found = find_config(places["--config"])
    assert (found.path, found.how) == (places["--config"], "--config")
    assert StationConfig.load(places["--config"]).station_id == "given"
    for how, station_id in (("$STATION_CONFIG", "env"), ("the current directory", "cwd"),
                            ("the user's config folder", "user")):
        found = find_config()
        assert found.how == how and found.path.resolve() == places[how].resolve()
        config = StationConfig.load()
        assert config.station_id == station_id
        assert config.database.resolve() == places[how].parent.resolve() / "db/station.db"  # beside the file
        assert found.describe() == f"station.toml: {places[how].resolve()} (from {how})"
        if how == "$STATION_CONFIG":
            monkeypatch.delenv("STATION_CONFIG")
        else:
            places[how].unlink()
    found = find_config()
    assert found.path is None and found.home == user_data_dir()
    assert found.describe() == f"station.toml: none found, using defaults (files under {user_data_dir()})"


def test_defaults_outside_a_checkout_keep_files_under_the_users_data_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("STATION_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    config = StationConfig.load()
    assert config.source is None
    for path in (config.database, config.key_file, config.signing_key, config.secrets_file, config.profiles_dir):
        assert path.is_relative_to(user_data_dir()), path
    assert os.listdir(tmp_path) == []


def test_a_named_file_that_does_not_exist_is_an_error_not_the_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("STATION_CONFIG", str(tmp_path / "statoin.toml"))
    with pytest.raises(ConfigError, match=r"statoin.toml: \(file\): station configuration not found \(given by "
                                          r"\$STATION_CONFIG\)"):
        StationConfig.load()
    with pytest.raises(ConfigError, match="given by --config"):
        find_config(tmp_path / "nowhere.toml")


def test_every_command_names_its_station_toml_once(station_env, capsys, tmp_path, monkeypatch):
    cfg = station_env / "station.toml"
    for args in (["profile", "list"], ["profile", "check", "relay"], ["db", "verify"], ["keys", "list"]):
        rc, out, err = run_station(capsys, *args)
        lines = [line for line in err.splitlines() if line.startswith("station.toml:")]
        assert lines == [f"station.toml: {cfg.resolve()} (from $STATION_CONFIG)"], (args, err)
    monkeypatch.delenv("STATION_CONFIG")
    monkeypatch.chdir(tmp_path / "profiles")  # no station.toml here or above it
    rc, _, err = run_station(capsys, "profile", "list")
    assert rc == 0 and f"station.toml: none found, using defaults (files under {user_data_dir()})" in err
    # commands that read no configuration say nothing about it
    rc, _, err = run_station(capsys, "virtual-ctl", "--control", str(tmp_path / "no.sock"), "list")
    assert "station.toml" not in err
