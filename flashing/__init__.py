"""The device side of the provisioning station: everything that talks to a chip.

Firmware images and partition tables, the config partition, esptool sessions, the
serial console, and the virtual ESP device. It never imports `station`. Importing
it registers the `vesp://` pyserial URL scheme of the virtual device.
"""

import serial

if "flashing.virtual" not in serial.protocol_handler_packages:
    serial.protocol_handler_packages.append("flashing.virtual")
