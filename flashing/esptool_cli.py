"""Run the unmodified esptool CLI with the virtual board's `vesp://` scheme registered.

    python -m flashing.esptool_cli --port vesp:///path/board-0.sock write-flash 0x0 app.bin

Any port esptool accepts works too; this only adds the URL scheme to pyserial.
"""

import sys

import flashing  # noqa: F401  (registers vesp://)


def main() -> None:
    import esptool

    sys.argv[0] = "esptool"
    esptool._main()


if __name__ == "__main__":
    main()
