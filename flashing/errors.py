"""The one error a unit's run can end with: what happened, what to do, and the evidence.

Every failure the station reports about a unit carries a message in words of the line,
the remedy the operator sees, and optional detail (esptool's or the board's own text).
`station_fault` says whose fault it is: the board's (the unit FAILED) or the station's
(database, disk, a bug: the unit ends in ERROR and is never charged to the board).
"""

from __future__ import annotations


class UnitError(Exception):
    station_fault = False

    def __init__(self, message: str, remedy: str, detail: str | None = None):
        super().__init__(message)
        self.message = message
        self.remedy = remedy
        self.detail = detail
