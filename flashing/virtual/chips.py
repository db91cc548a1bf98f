"""Chip models of the virtual device: what each ESP32-family ROM shows to esptool.

Each model carries the facts esptool reads from a real chip: the chip id or magic
register used for detection, the eFuse words that hold the MAC and revision, the
SPI register block used for raw flash commands, and the ROM's boot banner.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

# ESP32 ROM-calibrated clock: 8M clock eFuse byte and RTC calibration chosen so the
# ROM's crystal estimate is exactly 40 MHz (cali * 15625 * ck8m / 40 == 40e6).
ESP32_CK8M = 160
ESP32_RTC_CALI = 640
XTAL_HZ = 40_000_000


@dataclass(frozen=True)
class SpiRegisters:
    base: int
    usr: int
    usr1: int
    usr2: int
    mosi_dlen: int
    miso_dlen: int
    w0: int
    addr_msb: bool  # ESP32 left-aligns the address in SPI_ADDR_REG

    @property
    def cmd(self) -> int:
        return self.base

    @property
    def addr(self) -> int:
        return self.base + 0x04


@dataclass(frozen=True)
class RtcWatchdog:
    """The RTC watchdog's registers (esptool's targets/esp32c3.py, esp32s3.py)."""

    config0: int
    config1: int
    wprotect: int
    wkey: int = 0x50D83AA1
    slow_clock_hz: int = 136_000  # RC_SLOW_CLK: config1 counts its cycles

    @property
    def registers(self) -> tuple[int, int, int]:
        return self.config0, self.config1, self.wprotect


@dataclass(frozen=True)
class ChipModel:
    key: str  # esptool's --chip name
    name: str  # esptool's CHIP_NAME
    image_chip_id: int
    magic_value: int  # value of the word at 0x40001000
    rom_has_security_info: bool  # ROM implements GET_SECURITY_INFO (not ESP32)
    supports_secure_download: bool
    spi: SpiRegisters
    bootloader_offset: int
    uart_clkdiv_reg: int
    mac_oui: bytes
    rom_banner: str  # first line(s) the ROM prints after reset
    download_boot: str  # "boot:0x.. (...)" text in download mode
    flash_boot: str  # "boot:0x.. (...)" text for SPI boot
    poweron_reset: str
    wdt_reset: str
    sw_reset: str
    idf_target: str
    extra_registers: dict[int, int] = field(default_factory=dict)
    usb_reset: str | None = None  # reset cause after the USB-Serial/JTAG controller reset the chip
    rtc_wdt: RtcWatchdog | None = None  # the RTC watchdog esptool's --after watchdog-reset arms
    unattached_flash_id: int = 0xFFFFFF  # what a SPI command reads before SPI_ATTACH

    @property
    def has_usb_serial_jtag(self) -> bool:
        return self.usb_reset is not None

    def factory_efuses(self, mac: bytes) -> dict[int, dict[int, int]]:
        """What the factory burns into a new chip's eFuses: {block: {word: bits}} (MAC, package, revision).

        Word positions are espefuse's field table for the chip (MAC, MAC_CRC, CHIP_VER_REV1/2,
        CK8M_FREQ on ESP32; MAC, WAFER_VERSION_MINOR_LO on BLOCK1 of ESP32-C3/S3).
        """
        if self.key == "esp32":
            word1 = struct.unpack(">I", mac[2:6])[0]
            word2 = (_esp_crc8(mac) << 16) | struct.unpack(">H", mac[0:2])[0]
            word3 = (1 << 9) | (1 << 15)  # package D0WD, revision bit 0
            word5 = 1 << 20  # revision bit 1 -> with APB_CTL_DATE bit: v3.0
            return {0: {1: word1, 2: word2, 3: word3, 4: ESP32_CK8M, 5: word5}}
        mac0 = struct.unpack(">I", mac[2:6])[0]
        mac1 = struct.unpack(">H", mac[0:2])[0]
        minor = 4 if self.key == "esp32c3" else 2
        return {1: {0: mac0, 1: mac1, 3: (minor & 0x7) << 18}}  # package 0, major revision 0

    def registers(self, mac: bytes) -> dict[int, int]:
        """The chip's non-eFuse registers esptool reads (the eFuses live in `efuse.EfuseArray`)."""
        regs = {0x40001000: self.magic_value}
        regs.update(self.extra_registers)
        return regs

    def banner(self, reset: str, boot: str) -> str:
        return f"{self.rom_banner}rst:{reset},boot:{boot}\n"


ESP32 = ChipModel(
    key="esp32",
    name="ESP32",
    image_chip_id=0,
    magic_value=0x00F01D83,
    rom_has_security_info=False,
    supports_secure_download=False,
    spi=SpiRegisters(0x3FF42000, 0x1C, 0x20, 0x24, 0x28, 0x2C, 0x80, True),
    bootloader_offset=0x1000,
    uart_clkdiv_reg=0x3FF40014,
    mac_oui=bytes.fromhex("240ac4"),
    rom_banner="ets Jun  8 2016 00:22:57\n\n",
    download_boot="0x3 (DOWNLOAD_BOOT(UART0/UART1/SDIO_REI_REO_V2))",
    flash_boot="0x13 (SPI_FAST_FLASH_BOOT)",
    poweron_reset="0x1 (POWERON_RESET)",
    wdt_reset="0x10 (RTCWDT_RTC_RESET)",
    sw_reset="0xc (SW_CPU_RESET)",
    idf_target="esp32",
    extra_registers={
        0x3FF6607C: 1 << 31,  # APB_CTL_DATE: revision bit 2
        0x3FF5F06C: ESP32_RTC_CALI << 7,  # RTCCALICFG1
    },
)

ESP32C3 = ChipModel(
    key="esp32c3",
    name="ESP32-C3",
    image_chip_id=5,
    magic_value=0x1B31506F,
    rom_has_security_info=True,
    supports_secure_download=True,
    spi=SpiRegisters(0x60002000, 0x18, 0x1C, 0x20, 0x24, 0x28, 0x58, False),
    bootloader_offset=0x0,
    uart_clkdiv_reg=0x60000014,
    mac_oui=bytes.fromhex("348518"),
    rom_banner="ESP-ROM:esp32c3-api1-20210207\nBuild:Feb  7 2021\n",
    download_boot="0x4 (DOWNLOAD(USB/UART0/1))",
    flash_boot="0xc (SPI_FAST_FLASH_BOOT)",
    poweron_reset="0x1 (POWERON)",
    wdt_reset="0x10 (RTCWDT_RTC_RST)",
    sw_reset="0x3 (RTC_SW_SYS_RST)",
    idf_target="esp32c3",
    usb_reset="0x15 (USB_UART_CHIP_RESET)",
    rtc_wdt=RtcWatchdog(0x60008090, 0x60008094, 0x600080A8),
    unattached_flash_id=0x000000,
)

ESP32S3 = ChipModel(
    key="esp32s3",
    name="ESP32-S3",
    image_chip_id=9,
    magic_value=0x00000009,
    rom_has_security_info=True,
    supports_secure_download=True,
    spi=SpiRegisters(0x60002000, 0x18, 0x1C, 0x20, 0x24, 0x28, 0x58, False),
    bootloader_offset=0x0,
    uart_clkdiv_reg=0x60000014,
    mac_oui=bytes.fromhex("f412fa"),
    rom_banner="ESP-ROM:esp32s3-20210327\nBuild:Mar 27 2021\n",
    download_boot="0x0 (DOWNLOAD(USB/UART0))",
    flash_boot="0x8 (SPI_FAST_FLASH_BOOT)",
    poweron_reset="0x1 (POWERON)",
    wdt_reset="0x10 (RTCWDT_RTC_RST)",
    sw_reset="0x3 (RTC_SW_SYS_RST)",
    idf_target="esp32s3",
    usb_reset="0x15 (USB_UART_CHIP_RESET)",
    rtc_wdt=RtcWatchdog(0x60008098, 0x6000809C, 0x600080B0),
    unattached_flash_id=0x000000,
)

def _esp_crc8(mac: bytes) -> int:
    """The ESP32 ROM's esp_crc8 over the MAC (CRC-8, reflected polynomial 0x8C), as MAC_CRC holds it."""
    crc = 0
    for b in mac:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8C if crc & 1 else crc >> 1
    return crc


CHIPS: dict[str, ChipModel] = {c.key: c for c in (ESP32, ESP32C3, ESP32S3)}


def chip_by_name(name: str) -> ChipModel:
    key = name.lower().replace("-", "")
    try:
        return CHIPS[key]
    except KeyError:
        raise ValueError(
            f"unknown chip {name!r}: the virtual device models {', '.join(CHIPS)}"
        ) from None
