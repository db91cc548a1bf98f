"""`station profile new --from-idf`, `profile list`, `profile show`, and the README's profile key reference."""

from __future__ import annotations

import hashlib
import json
import shutil
import tomllib

from flashing.firmware import build_firmware, twosmart_manifest
from flashing.images import Partition
from flashing.nvs import read_partition
from flashing.virtual.bench import VirtualBench
from station.profile import ProfileFile, load_profile
from station.record import Record
from station.schema import REFERENCE_BEGIN, REFERENCE_END, reference_table
from tests.station.conftest import REPO, TOKEN, run_station

VALVE = "fixtures/idf-builds/esp32-valve-controller"
VALVE_TOKEN = "valve-tk7"


def _copy_build(shared_dir, tmp_path):
    build = tmp_path / "valve-build"
    shutil.copytree(shared_dir / VALVE, build)
    for f in build.rglob("*"):
        f.chmod(0o700 if f.is_dir() else 0o600)  # the shared fixture is read-only; the copy is removed later
    build.chmod(0o700)
    return build


def test_profile_new_from_a_real_idf_build_provisions_with_the_boot_check(station_env, shared_dir, tmp_path,
                                                                          capsys, monkeypatch):
    build = _copy_build(shared_dir, tmp_path)
    rc, out, err = run_station(capsys, "profile", "new", "valve", "--from-idf", str(build),
                               "--config-partition", "nvs", "--i-know")
    assert rc == 0, err
    folder = station_env / "profiles" / "valve"
    spec = tomllib.loads((folder / "profile.toml").read_text())
    assert spec["chip"] == "esp32" and spec["flash_size"] == "2MB" and spec["config"]["partition"] == "nvs"
    assert spec["checks"]["boot"] is True
    pins = {r["offset"]: r["sha256"] for r in spec["firmware"]["regions"]}
    for offset, rel in json.loads((build / "flasher_args.json").read_text())["flash_files"].items():
        digest = hashlib.sha256((build / rel).read_bytes()).hexdigest()
        assert pins[offset] == digest and digest in out  # pinned and printed
    assert "COPIED" in out and "VALVE_VENDOR_TOKEN" in out and "2MB" in out
    shutil.rmtree(build)  # the profile holds its own copies: the build folder may go

    monkeypatch.setenv("VALVE_VENDOR_TOKEN", VALVE_TOKEN)
    rc, out, err = run_station(capsys, "profile", "check", "valve")
    assert rc == 0, err
    profile = load_profile("valve", station_env / "profiles")
    assert profile.board_flash_bytes() == 2 << 20  # a virtual board of the module's size
    with VirtualBench(1, "esp32", profile.board_flash_bytes(), run_dir=station_env / "run") as bench:
        rc, out, err = run_station(capsys, "flash", "--profile", "valve", "--port", bench[0].url)
        assert rc == 0, err
        dev = bench[0].device
        assert dev.state()["app"]["project_name"] == "valve_controller"
        slot = profile.config_slot()
        values = read_partition(dev.flash.read(slot.offset, slot.size))["2smart"]
        unit = Record(station_env / "station.db").unit_by_mac(dev.mac_text)
    assert values["token"] == VALVE_TOKEN and values["serial"] == unit["serial"]
    assert unit["serial"].startswith("VAL-")
    (attempt,) = Record(station_env / "station.db").attempts()
    assert attempt["outcome"] == "passed" and "boot" in json.loads(attempt["durations"])  # the boot check ran


def test_profile_new_refuses_the_apps_own_nvs_without_i_know(station_env, shared_dir, capsys):
    for extra in ([], ["--config-partition", "nvs"]):
        rc, out, err = run_station(capsys, "profile", "new", "valve", "--from-idf", str(shared_dir / VALVE), *extra)
        assert rc == 2, (extra, err)
        assert "app's own NVS" in err and "--config-partition nvs --i-know" in err and "nothing was written" in err
        assert not (station_env / "profiles" / "valve").exists()
    rc, _, err = run_station(capsys, "profile", "new", "valve", "--from-idf", str(shared_dir / VALVE),
                             "--config-partition", "phy_init", "--i-know")
    assert rc == 2 and "not data/nvs" in err


def _fake_build(tmp_path, chip="esp32c3", flash_size="16MB", parts=None, manifest=None):
    """A build folder as `idf.py build` leaves it, from generated images (a dedicated `config` NVS partition)."""
    fw = build_firmware(chip, project="valve", version="3.0.1", app_size=200_000, flash_size=flash_size,
                        partitions=parts, manifest=manifest)
    build = tmp_path / f"build-{chip}"
    (build / "bootloader").mkdir(parents=True)
    (build / "partition_table").mkdir()
    (build / "bootloader/bootloader.bin").write_bytes(fw.bootloader)
    (build / "partition_table/partition-table.bin").write_bytes(fw.partition_table)
    (build / "valve.bin").write_bytes(fw.app)
    files = {f"0x{fw.bootloader_offset:x}": "bootloader/bootloader.bin", "0x8000": "partition_table/partition-table.bin",
             f"0x{fw.app_offset:x}": "valve.bin"}
    (build / "flasher_args.json").write_text(json.dumps({
        "flash_settings": {"flash_mode": "dio", "flash_size": flash_size, "flash_freq": "80m"},
        "flash_files": files, "app": {"offset": f"0x{fw.app_offset:x}", "file": "valve.bin"},
        "extra_esptool_args": {"chip": chip}}))
    (build / "project_description.json").write_text(json.dumps({"project_name": "valve", "project_version": "3.0.1",
                                                                 "target": chip}))
    return build


def test_profile_new_proposes_the_dedicated_partition_and_reads_chip_and_flash_size(station_env, tmp_path, capsys,
                                                                                    monkeypatch):
    build = _fake_build(tmp_path)
    rc, _, err = run_station(capsys, "profile", "new", "v2", "--from-idf", str(build), "--chip", "esp32")
    assert rc == 2 and "esp32c3" in err  # the build says its chip: --chip may not contradict it
    rc, out, err = run_station(capsys, "profile", "new", "v2", "--from-idf", str(build / "flasher_args.json"))
    assert rc == 0, err
    profile = load_profile("v2", station_env / "profiles")
    assert (profile.chip, profile.flash_size, profile.config_partition) == ("esp32c3", "16MB", "config")
    assert profile.title == "valve 3.0.1" and profile.board_flash_bytes() == 16 << 20
    assert "16MB" in out and "--flash-size 16MB" in out  # says what board the profile needs
    monkeypatch.setenv("V2_VENDOR_TOKEN", "v2-tok")
    assert run_station(capsys, "profile", "check", "v2")[0] == 0
    rc, _, err = run_station(capsys, "profile", "new", "v2", "--from-idf", str(build))
    assert rc == 2 and "already exists" in err  # never over an existing profile


PARTS = [Partition("nvs", 1, 2, 0x9000, 0x5000), Partition("factory", 0, 0, 0x10000, 0x100000),
         Partition("calib", 1, 2, 0x110000, 0x4000), Partition("settings", 1, 2, 0x114000, 0x4000)]


def test_profile_new_takes_the_partition_the_firmware_declares(station_env, tmp_path, capsys):
    build = _fake_build(tmp_path, "esp32", "4MB", PARTS, twosmart_manifest(partition="settings"))
    rc, out, err = run_station(capsys, "profile", "new", "v4", "--from-idf", str(build))
    assert rc == 0, err
    assert load_profile("v4", station_env / "profiles").config_partition == "settings"


def test_profile_new_asks_which_of_several_nvs_partitions(station_env, tmp_path, capsys):
    build = _fake_build(tmp_path, "esp32", "4MB", PARTS, {"sdk": "none"})  # a firmware that declares nothing
    rc, _, err = run_station(capsys, "profile", "new", "v3", "--from-idf", str(build))
    assert rc == 2 and "calib" in err and "settings" in err and "--config-partition NAME" in err
    rc, out, err = run_station(capsys, "profile", "new", "v3", "--from-idf", str(build), "--config-partition",
                               "settings")
    assert rc == 0, err
    assert load_profile("v3", station_env / "profiles").config_partition == "settings"


def test_profile_list_and_show_name_where_from_and_never_a_secret(station_env, capsys):
    rc, out, err = run_station(capsys, "profile", "list")
    assert rc == 0, err
    mine, example = [line for line in out.splitlines() if line.startswith("relay ")]
    assert "2Smart Relay" in mine and "esp32" in mine and "1.4.2" in mine and "profiles_dir" in mine
    assert "packaged example" in example and "hidden by the profiles_dir one" in example  # the name finds mine

    rc, out, err = run_station(capsys, "profile", "show", "relay")
    assert rc == 0, err
    profile = load_profile("relay", station_env / "profiles")
    for r in profile.regions:
        assert f"0x{r.offset:x}" in out and r.sha256 in out and str(r.file.stat().st_size) in out
    assert "secret vendor_token (env RELAY_VENDOR_TOKEN; value not shown)" in out
    assert "config" in out and "<- config" in out and "RLY-{yymmdd}-{seq:05}" in out
    assert TOKEN not in out + err  # set in the environment, shown only by name


def test_a_profile_name_falls_back_to_the_packaged_example(station_env, capsys):
    shutil.rmtree(station_env / "profiles" / "relay")
    rc, out, err = run_station(capsys, "profile", "show", "relay")
    assert rc == 0, err
    assert "(packaged example)" in out and str(REPO / "profiles" / "relay") in out
    rc, _, err = run_station(capsys, "profile", "show", "no-such-product")
    assert rc == 2 and "station profile list" in err


def test_the_readme_profile_key_table_is_the_schemas():
    readme = (REPO / "README.md").read_text()
    start, end = readme.find(REFERENCE_BEGIN), readme.find(REFERENCE_END)
    assert 0 <= start < end, "README.md has lost its profile key reference markers"
    assert readme[start:end + len(REFERENCE_END)] == reference_table(ProfileFile), (
        "README.md's profile key table differs from station/profile.py; regenerate it: "
        ".venv/bin/python -m station.schema README.md")


def test_the_reference_names_every_key_the_example_profile_uses():
    table = reference_table(ProfileFile)

    def keys(value, prefix=""):
        for k, v in value.items():
            name = prefix + k
            yield name
            if name == "secrets":  # one table per secret: the reference calls its name NAME
                for secret in v.values():
                    yield from keys(secret, "secrets.NAME.")
            elif isinstance(v, dict):
                yield from keys(v, name + ".")
            elif isinstance(v, list) and v and isinstance(v[0], dict):
                for item in v:
                    yield from keys(item, name + "[].")

    used = set(keys(tomllib.loads((REPO / "profiles/relay/profile.toml").read_text())))
    assert {"firmware.regions[].sha256", "config.keys[].unit", "secrets.NAME.env", "checks.smoke"} <= used
    assert [k for k in sorted(used) if f"| `{k}` |" not in table] == []


def test_profile_new_says_what_is_wrong_with_a_build_and_writes_nothing(station_env, tmp_path, capsys):
    rc, _, err = run_station(capsys, "profile", "new", "v5", "--from-idf", str(tmp_path))
    assert rc == 2 and "give an ESP-IDF build folder" in err
    build = _fake_build(tmp_path, "esp32", "4MB")
    args = json.loads((build / "flasher_args.json").read_text())
    del args["extra_esptool_args"]
    (build / "flasher_args.json").write_text(json.dumps(args))
    (build / "project_description.json").unlink()
    rc, _, err = run_station(capsys, "profile", "new", "v5", "--from-idf", str(build))
    assert rc == 2 and "does not say its chip: give --chip" in err
    (build / "valve.bin").unlink()
    rc, _, err = run_station(capsys, "profile", "new", "v5", "--from-idf", str(build), "--chip", "esp32")
    assert rc == 2 and "valve.bin" in err and "is the build complete?" in err
    rc, _, err = run_station(capsys, "profile", "new", "../v5", "--from-idf", str(build))
    assert rc == 2 and "not a profile name" in err
    assert not (station_env / "profiles" / "v5").exists() and not (station_env / "v5").exists()
