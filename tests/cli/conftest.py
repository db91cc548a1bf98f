"""The station's own processes: `python -m station …` run as an operator or a script would."""

from tests.station.conftest import station_env  # noqa: F401  (the same temp station.toml and profile)
