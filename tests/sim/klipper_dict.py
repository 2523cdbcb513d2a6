"""Realistic Klipper data dictionaries for the MCU simulators.

build() produces what a real Klipper build embeds in its firmware: compact
JSON (sort_keys, no spaces) with app, version, build_versions, license,
config constants of the chip family, the command/response format strings
of a typical build (~120 commands, ~35 responses), output and enumerations
(pin ranges, bus names, shutdown strings), plus its level-9 compression:
zlib as Klipper does, or bzip2 as Kalico does (protocols.md §15.5).  A newer
build also carries its build config ("kconfig", savedefconfig text).  Message ids are assigned like a build does and stored in the
dictionary's signed "encoded id" form (protocols.md §1.3), so ids 96..127
appear as -32..-1.

The format strings follow Klipper's naming and parameter types; the set is
representative, not an exact copy of any particular build.  Nothing here
talks to a device.
"""

import bz2
import json
import re
import zlib

try:
    from . import klipper_proto
except ImportError:
    import klipper_proto

DEFAULT_BUILD_VERSIONS = "gcc: (15:12.2.rel1-1) 12.2.1 20221205 binutils: (2.40-2+18+b1) 2.40"
LINUX_BUILD_VERSIONS = "gcc: (Debian 12.2.0-14) 12.2.0 binutils: (GNU Binutils for Debian) 2.40"

# Commands every build has (basecmd, gpio, stepper, endstops, buses, sensors).
_COMMON_COMMANDS = [
    "allocate_oids count=%c",
    "buttons_ack oid=%c count=%c",
    "buttons_add oid=%c pos=%c pin=%u pull_up=%c",
    "buttons_query oid=%c clock=%u rest_ticks=%u retransmit_count=%c invert=%c",
    "clear_shutdown",
    "config_ads1220 oid=%c spi_oid=%c data_ready_pin=%u",
    "config_adxl345 oid=%c spi_oid=%c",
    "config_analog_in oid=%c pin=%u",
    "config_buttons oid=%c button_count=%c",
    "config_counter oid=%c pin=%u pull_up=%c",
    "config_digital_out oid=%c pin=%u value=%c default_value=%c max_duration=%u",
    "config_endstop oid=%c pin=%c pull_up=%c",
    "config_hd44780 oid=%c rs_pin=%u e_pin=%u d4_pin=%u d5_pin=%u d6_pin=%u d7_pin=%u delay_ticks=%u",
    "config_hx71x oid=%c gain_channel=%c dout_pin=%u sclk_pin=%u",
    "config_i2c oid=%c",
    "config_icm20948 oid=%c i2c_oid=%c",
    "config_ldc1612 oid=%c i2c_oid=%c",
    "config_ldc1612_with_intb oid=%c i2c_oid=%c intb_pin=%c",
    "config_lis2dw oid=%c bus_oid=%c bus_oid_type=%c lis_chip_type=%c",
    "config_load_cell_probe oid=%c sos_filter_oid=%c",
    "config_mpu9250 oid=%c i2c_oid=%c",
    "config_neopixel oid=%c pin=%u data_size=%hu bit_max_ticks=%u reset_min_ticks=%u",
    "config_pwm_out oid=%c pin=%u cycle_ticks=%u value=%hu default_value=%hu max_duration=%u",
    "config_reset",
    "config_sos_filter oid=%c max_sections=%u",
    "config_spi oid=%c pin=%u cs_active_high=%c",
    "config_spi_angle oid=%c spi_oid=%c spi_angle_type=%c",
    "config_spi_shutdown oid=%c spi_oid=%c shutdown_msg=%*s",
    "config_spi_without_cs oid=%c",
    "config_st7920 oid=%c cs_pin=%u sclk_pin=%u sid_pin=%u sync_delay_ticks=%u cmd_delay_ticks=%u",
    "config_stepper oid=%c step_pin=%c dir_pin=%c invert_step=%c step_pulse_ticks=%u",
    "config_thermocouple oid=%c spi_oid=%c thermocouple_type=%c",
    "config_tmcuart oid=%c rx_pin=%u pull_up=%c tx_pin=%u bit_time=%u",
    "config_trsync oid=%c",
    "debug_nop",
    "debug_ping data=%*s",
    "debug_read order=%c addr=%u",
    "debug_write order=%c addr=%u val=%u",
    "emergency_stop",
    "endstop_home oid=%c clock=%u sample_ticks=%u sample_count=%c rest_ticks=%u pin_value=%c"
    " trsync_oid=%c trigger_reason=%c",
    "endstop_query_state oid=%c",
    "finalize_config crc=%u",
    "get_clock",
    "get_config",
    "get_uptime",
    "hd44780_send_cmds oid=%c cmds=%*s",
    "hd44780_send_data oid=%c data=%*s",
    "i2c_modify_bits oid=%c reg=%*s clear_set_bits=%*s",
    "i2c_read oid=%c reg=%*s read_len=%u",
    "i2c_set_bus oid=%c i2c_bus=%u rate=%u address=%u",
    "i2c_set_software_bus oid=%c scl_pin=%u sda_pin=%u rate=%u address=%u",
    "i2c_write oid=%c data=%*s",
    "ldc1612_setup_home oid=%c clock=%u threshold=%u trsync_oid=%c trigger_reason=%c error_reason=%c",
    "load_cell_probe_home oid=%c trsync_oid=%c trigger_reason=%c error_reason=%c clock=%u"
    " rest_ticks=%u timeout=%u",
    "load_cell_probe_query_state oid=%c",
    "load_cell_probe_set_range oid=%c safety_counts_min=%i safety_counts_max=%i tare_counts=%i"
    " trigger_grams=%u grams_per_count=%i",
    "neopixel_send oid=%c",
    "neopixel_update oid=%c pos=%hu data=%*s",
    "query_ads1220 oid=%c rest_ticks=%u",
    "query_ads1220_status oid=%c",
    "query_adxl345 oid=%c rest_ticks=%u",
    "query_adxl345_status oid=%c",
    "query_analog_in oid=%c clock=%u sample_ticks=%u sample_count=%c rest_ticks=%u"
    " min_value=%hu max_value=%hu range_check_count=%c",
    "query_counter oid=%c clock=%u poll_ticks=%u sample_ticks=%u",
    "query_hx71x oid=%c rest_ticks=%u",
    "query_hx71x_status oid=%c",
    "query_icm20948 oid=%c rest_ticks=%u",
    "query_icm20948_status oid=%c",
    "query_ldc1612 oid=%c rest_ticks=%u",
    "query_lis2dw oid=%c rest_ticks=%u",
    "query_lis2dw_status oid=%c",
    "query_mpu9250 oid=%c rest_ticks=%u",
    "query_mpu9250_status oid=%c",
    "query_spi_angle oid=%c clock=%u rest_ticks=%u time_shift=%c",
    "query_status_ldc1612 oid=%c",
    "query_thermocouple oid=%c clock=%u rest_ticks=%u min_value=%u max_value=%u max_invalid_count=%c",
    "queue_digital_out oid=%c clock=%u on_ticks=%u",
    "queue_pwm_out oid=%c clock=%u value=%hu",
    "queue_step oid=%c interval=%u count=%hu add=%hi",
    "reset_step_clock oid=%c clock=%u",
    "set_digital_out pin=%u value=%c",
    "set_digital_out_pwm_cycle oid=%c cycle_ticks=%u",
    "set_next_step_dir oid=%c dir=%c",
    "set_pwm_out pin=%u cycle_ticks=%u value=%hu",
    "sos_filter_set_active oid=%c n_sections=%c coeff_int_bits=%c",
    "sos_filter_set_section oid=%c section_idx=%c sos0=%i sos1=%i sos2=%i sos3=%i sos4=%i",
    "sos_filter_set_state oid=%c section_idx=%c state0=%i state1=%i",
    "spi_angle_transfer oid=%c data=%*s",
    "spi_send oid=%c data=%*s",
    "spi_set_bus oid=%c spi_bus=%u mode=%u rate=%u",
    "spi_set_software_bus oid=%c miso_pin=%u mosi_pin=%u sclk_pin=%u mode=%u rate=%u",
    "spi_transfer oid=%c data=%*s",
    "st7920_send_cmds oid=%c cmds=%*s",
    "st7920_send_data oid=%c data=%*s",
    "stepper_get_position oid=%c",
    "stepper_stop_on_trigger oid=%c trsync_oid=%c",
    "tmcuart_send oid=%c write=%*s read=%c",
    "trsync_set_timeout oid=%c clock=%u",
    "trsync_start oid=%c report_clock=%u report_ticks=%u expire_reason=%c",
    "trsync_trigger oid=%c reason=%c",
    "update_digital_out oid=%c value=%c",
]

# Commands only microcontroller builds have (hardware reset, bootloader).
_MCU_COMMANDS = [
    "reset",
]

# STM32F2/F4/F7/H7 builds with the SDIO driver (SD card on the board).
_SDIO_COMMANDS = [
    "config_sdio oid=%c blocksize=%u",
    "sdio_read_data oid=%c cmd=%c argument=%u",
    "sdio_read_data_buffer oid=%c offset=%u len=%c",
    "sdio_send_command oid=%c cmd=%c argument=%u wait=%c",
    "sdio_set_bus oid=%c sdio_bus=%u",
    "sdio_set_speed oid=%c speed=%u",
    "sdio_write_data oid=%c cmd=%c argument=%u",
    "sdio_write_data_buffer oid=%c offset=%u data=%*s",
]

_SDIO_RESPONSES = [
    "sdio_cmd_response oid=%c error=%c response=%*s",
    "sdio_read_data_buffer_response oid=%c data=%*s",
    "sdio_read_data_response oid=%c error=%c read=%u",
    "sdio_write_data_response oid=%c error=%c write=%u",
]

_LINUX_COMMANDS = [
    "config_ds18b20 oid=%c serial=%*s max_error_count=%c",
    "query_ds18b20 oid=%c clock=%u rest_ticks=%u min_value=%i max_value=%i",
    "config_pca9685 oid=%c bus=%u addr=%c channel=%c cycle_ticks=%u value=%hu default_value=%hu"
    " max_duration=%u",
    "queue_pca9685_out oid=%c clock=%u value=%hu",
    "set_pca9685_out bus=%u addr=%c channel=%c cycle_ticks=%u value=%hu",
]

_CAN_COMMANDS = [
    "get_canbus_id",
]

_CANBRIDGE_COMMANDS = [
    "get_canbus_status",
]

_COMMON_RESPONSES = [
    "ads1220_data oid=%c sequence=%hu data=%*s",
    "ads1220_status oid=%c clock=%u query_ticks=%u next_sequence=%hu buffered=%c fifo=%c"
    " limit_count=%hu",
    "adxl345_data oid=%c sequence=%hu data=%*s",
    "adxl345_status oid=%c clock=%u query_ticks=%u next_sequence=%hu buffered=%c fifo=%c"
    " limit_count=%hu",
    "analog_in_state oid=%c next_clock=%u value=%hu",
    "buttons_state oid=%c ack_count=%c state=%*s",
    "clock clock=%u",
    "config is_config=%c crc=%u is_shutdown=%c move_count=%hu",
    "counter_state oid=%c next_clock=%u count=%u count_clock=%u",
    "debug_result val=%u",
    "endstop_state oid=%c homing=%c next_clock=%u pin_value=%c",
    "hx71x_data oid=%c sequence=%hu data=%*s",
    "hx71x_status oid=%c clock=%u query_ticks=%u next_sequence=%hu buffered=%c fifo=%c"
    " limit_count=%hu",
    "i2c_read_response oid=%c i2c_bus_status=%c response=%*s",
    "i2c_response oid=%c i2c_bus_status=%c",
    "icm20948_data oid=%c sequence=%hu data=%*s",
    "icm20948_status oid=%c clock=%u query_ticks=%u next_sequence=%hu buffered=%c fifo=%u"
    " limit_count=%hu",
    "is_shutdown static_string_id=%hu",
    "ldc1612_data oid=%c sequence=%hu data=%*s",
    "ldc1612_status oid=%c clock=%u query_ticks=%u next_sequence=%hu buffered=%c fifo=%c"
    " limit_count=%hu",
    "lis2dw_data oid=%c sequence=%hu data=%*s",
    "lis2dw_status oid=%c clock=%u query_ticks=%u next_sequence=%hu buffered=%c fifo=%c"
    " limit_count=%hu",
    "load_cell_probe_state oid=%c is_homing_trigger=%c trigger_ticks=%u",
    "mpu9250_data oid=%c sequence=%hu data=%*s",
    "mpu9250_status oid=%c clock=%u query_ticks=%u next_sequence=%hu buffered=%c fifo=%u"
    " limit_count=%hu",
    "neopixel_result oid=%c success=%c",
    "pong data=%*s",
    "shutdown clock=%u static_string_id=%hu",
    "spi_angle_data oid=%c sequence=%hu data=%*s",
    "spi_angle_transfer_response oid=%c clock=%u response=%*s",
    "spi_transfer_response oid=%c response=%*s",
    "stats count=%u sum=%u sumsq=%u",
    "stepper_position oid=%c pos=%i",
    "thermocouple_result oid=%c next_clock=%u value=%u fault=%c",
    "tmcuart_response oid=%c read=%*s",
    "trsync_state oid=%c can_trigger=%c trigger_reason=%c clock=%u",
    "uptime high=%u clock=%u",
]

_LINUX_RESPONSES = [
    "ds18b20_result oid=%c next_clock=%u value=%i fault=%u",
]

_CAN_RESPONSES = [
    "canbus_id canbus_uuid=%.*s canbus_nodeid=%u",
]

_CANBRIDGE_RESPONSES = [
    "canbus_status rx_error=%u tx_error=%u tx_retries=%u canbus_bus_state=%u",
]

_STATIC_STRINGS = [
    "ADC out of range",
    "ADS1220 sensor_bulk buffer overflow",
    "Can not update ldc1612 while homing",
    "Can't schedule when already scheduled",
    "Expected trsync oid",
    "Invalid button count",
    "Invalid buttons retransmit count",
    "Invalid load cell probe safety range",
    "Invalid neopixel data_size",
    "Invalid neopixel update command",
    "Invalid number of sos sections",
    "Invalid sos filter section index",
    "Invalid spi_angle chip type",
    "Invalid thermocouple chip type",
    "Invalid tmcuart_send size",
    "Load cell probe tare overflow",
    "Max of 8 buttons",
    "Set button past maximum button count",
    "Unsupported i2c bus",
    "Unsupported spi bus",
    "Unsupported thermocouple type",
    "hx71x sensor_bulk buffer overflow",
    "ldc1612 home without trsync",
    "spi_angle fifo overrun",
    "Already finalized",
    "Can not set soft pwm cycle ticks while updates pending",
    "Can't add stepper while in homing",
    "Can't assign oid",
    "Can't reset time when stepper active",
    "Command parser error",
    "Command request",
    "Invalid buffer length",
    "Invalid count parameter",
    "Invalid command",
    "Invalid i2c_bus",
    "Invalid move request size",
    "Invalid oid type",
    "Invalid spi config",
    "Invalid spi_bus parameter",
    "Invalid step_pulse_ticks",
    "Message encode error",
    "Missed scheduling of next digital out event",
    "Missed scheduling of next pin event",
    "Move queue overflow",
    "No next step",
    "Not a valid ADC pin",
    "Not a valid input pin",
    "Not a valid pin",
    "Rescheduled timer in the past",
    "Scheduled digital out event will exceed max_duration",
    "Scheduled pwm event will exceed max_duration",
    "Shutdown cleared when not shutdown",
    "Stepper too far in past",
    "Thermocouple ADC out of range",
    "Timer too close",
    "alloc_chunk failed",
    "alloc_chunks failed",
    "i2c timeout",
    "oids already allocated",
    "sentinel timer called",
    "tmcuart_send invalid size",
]

_STM32_STATIC_STRINGS = [
    "Failed to send sdio command",
    "Invalid sdio bus",
    "Not a valid PWM pin",
    "Unsupported USB endpoint type",
    "usb_cdc endpoint stall",
]

_LINUX_STATIC_STRINGS = [
    "Unable to open adc device",
    "Unable to open in GPIO chip line",
    "Unable to open out GPIO chip line",
    "Unable to open pwm device",
    "Unable to open spi device",
    "Unable to open i2c device",
    "Unable to read adc device",
]

_COMMON_ENUMERATIONS = {
    "bus_oid_type": {"i2c": 1, "spi": 0},
    "lis_chip_type": {"LIS2DW": 0, "LIS3DH": 1},
    "spi_angle_type": {"a1333": 0, "as5047d": 1, "mt6816": 3, "mt6826s": 4, "tle5012b": 2},
    "thermocouple_type": {"MAX31855": 0, "MAX31856": 1, "MAX31865": 2, "MAX6675": 3},
}

# Chip families: clock, GPIO ports (letters, pins per port), buses.
_STM32_FAMILIES = {
    "stm32f103xe": dict(clock=72000000, ports="ABCDEFG", crystal="PD0,PD1"),
    "stm32f407xx": dict(clock=168000000, ports="ABCDEFGHI", crystal="PH0,PH1"),
    "stm32f429xx": dict(clock=180000000, ports="ABCDEFGHI", crystal="PH0,PH1"),
    "stm32f446xx": dict(clock=180000000, ports="ABCDEFGH", crystal="PH0,PH1"),
    "stm32g0b1xx": dict(clock=64000000, ports="ABCDEF", crystal="PF0,PF1"),
    "stm32h723xx": dict(clock=400000000, ports="ABCDEFGH", crystal="PH0,PH1"),
}

_STM32_SPI = {"spi1": "PA6,PA7,PA5", "spi1a": "PB4,PB5,PB3", "spi2": "PB14,PB15,PB13",
              "spi2a": "PC2,PC3,PB10", "spi3": "PB4,PB5,PB3", "spi3a": "PC11,PC12,PC10",
              "spi4": "PE13,PE14,PE12"}
_STM32_I2C = {"i2c1": "PB6,PB7", "i2c1a": "PB8,PB9", "i2c2": "PB10,PB11", "i2c2a": "PH4,PH5",
              "i2c3": "PA8,PC9"}


def _stm32(mcu, link):
    fam = _STM32_FAMILIES.get(mcu, dict(clock=72000000, ports="ABCDE", crystal="PD0,PD1"))
    config = {"ADC_MAX": 4095, "CLOCK_FREQ": fam["clock"], "PWM_MAX": 255,
              "STEPPER_STEP_BOTH_EDGE": 1}
    for name, pins in sorted(_STM32_SPI.items()):
        config["BUS_PINS_" + name] = pins
    for name, pins in sorted(_STM32_I2C.items()):
        config["BUS_PINS_" + name] = pins
    config["RESERVE_PINS_crystal"] = fam["crystal"]
    if link == "usb":
        config["RESERVE_PINS_USB"] = "PA11,PA12"
    elif link == "serial":
        config["RESERVE_PINS_serial"] = "PA10,PA9"
        config["SERIAL_BAUD"] = 250000
    elif link in ("can", "canbridge"):
        config["RESERVE_PINS_CAN"] = "PB8,PB9" if link == "can" else "PD0,PD1"
        config["CANBUS_FREQUENCY"] = 1000000
        if link == "canbridge":
            config["RESERVE_PINS_USB"] = "PA11,PA12"
    pins = {"P%s0" % letter: [i * 16, 16] for i, letter in enumerate(fam["ports"])}
    enums = {
        "pin": pins,
        "spi_bus": {name: i for i, name in enumerate(sorted(_STM32_SPI))},
        "i2c_bus": {name: i for i, name in enumerate(sorted(_STM32_I2C))},
    }
    return config, enums


def _rp2040(mcu, link):
    config = {"ADC_MAX": 4095, "CLOCK_FREQ": 12000000, "PWM_MAX": 255,
              "STEPPER_STEP_BOTH_EDGE": 1}
    spi = {}
    i2c = {}
    for bus in (0, 1):
        for n, first in enumerate(range(bus * 8, 30 - 3, 16)):
            spi["spi%d_gpio%d_gpio%d_gpio%d" % (bus, first, first + 3, first + 2)] = \
                "gpio%d,gpio%d,gpio%d" % (first, first + 3, first + 2)
        for first in range(bus * 2, 28, 4):
            i2c["i2c%d_gpio%d_gpio%d" % (bus, first, first + 1)] = \
                "gpio%d,gpio%d" % (first, first + 1)
    for name, pins in sorted(spi.items()):
        config["BUS_PINS_" + name] = pins
    for name, pins in sorted(i2c.items()):
        config["BUS_PINS_" + name] = pins
    if link == "serial":
        config["RESERVE_PINS_serial"] = "gpio1,gpio0"
        config["SERIAL_BAUD"] = 250000
    elif link in ("can", "canbridge"):
        config["RESERVE_PINS_CAN"] = "gpio4,gpio5"
        config["CANBUS_FREQUENCY"] = 1000000
    enums = {
        "pin": {"gpio0": [0, 30]},
        "spi_bus": {name: i for i, name in enumerate(sorted(spi))},
        "i2c_bus": {name: i for i, name in enumerate(sorted(i2c))},
    }
    return config, enums


def _linux(mcu, link):
    config = {"ADC_MAX": 4095, "CLOCK_FREQ": 50000000, "PCA9685_MAX": 4096, "PWM_MAX": 32768}
    pins = {"gpiochip%d/gpio0" % chip: [chip * 64, 64] for chip in range(8)}
    pins["analog0"] = [8 * 64, 8]
    for chip in range(4):
        pins["pwmchip%d/pwm0" % chip] = [8 * 64 + 8 + chip * 16, 16]
    enums = {
        "pin": pins,
        "spi_bus": {"spidev%d.%d" % (b, c): b * 4 + c for b in range(4) for c in range(4)},
        "i2c_bus": {"i2c.%d" % b: b for b in range(8)},
    }
    return config, enums


# "app" of the firmware families that speak Klipper's protocol.
APPS = ("Klipper", "Kalico")
COMPRESSIONS = ("zlib", "bzip2")
_BZIP2_STREAM = re.compile(rb"BZh[1-9]1AY&SY")


class DictionaryText(str):
    """The JSON text of a dictionary that remembers how its firmware
    compresses it: .compression is "zlib" or "bzip2"."""

    def __new__(cls, text, compression="zlib"):
        if compression not in COMPRESSIONS:
            raise ValueError("unknown compression %r" % compression)
        self = super().__new__(cls, text)
        self.compression = compression
        return self


def compress(text, compression=None):
    """The identify data of @text: level 9 @compression (default: the one
    @text remembers, else zlib)."""
    if compression is None:
        compression = getattr(text, "compression", "zlib")
    data = str(text).encode()
    if compression == "zlib":
        return zlib.compress(data, 9)
    if compression == "bzip2":
        return bz2.compress(data, 9)
    raise ValueError("unknown compression %r" % compression)


def decompress(data):
    """DictionaryText of identify data, zlib or bzip2 told apart by the
    magic bytes as the daemon does.  Raises ValueError."""
    data = bytes(data)
    try:
        if data[:1] == b"\x78":
            return DictionaryText(zlib.decompress(data).decode(), "zlib")
        if data[:3] == b"BZh":
            return DictionaryText(bz2.decompress(data).decode(), "bzip2")
    except (zlib.error, OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError("corrupt dictionary: %s" % e)
    raise ValueError("neither zlib nor bzip2")


def find_dictionary(image):
    """DictionaryText of the first Klipper (or Kalico) data dictionary in a
    flat image (§15.2: every "78 DA" or bzip2 stream header that decompresses
    to JSON with a Klipper-kin app, or with version and commands), or None."""
    image = bytes(image)
    starts = []
    pos = image.find(b"\x78\xda")
    while pos >= 0:
        starts.append(pos)
        pos = image.find(b"\x78\xda", pos + 1)
    starts += [m.start() for m in _BZIP2_STREAM.finditer(image)]
    for pos in sorted(starts):
        try:
            if image[pos] == 0x78:
                text, compression = zlib.decompressobj().decompress(image[pos:]).decode(), "zlib"
            else:
                text, compression = bz2.BZ2Decompressor().decompress(image[pos:]).decode(), "bzip2"
            parsed = json.loads(text)
        except (zlib.error, OSError, EOFError, UnicodeDecodeError, ValueError):
            continue
        if isinstance(parsed, dict) and (parsed.get("app") in APPS or
                                         ("version" in parsed and "commands" in parsed)):
            return DictionaryText(text, compression)
    return None


def family(mcu):
    if mcu == "linux":
        return "linux"
    if mcu.startswith("rp2"):
        return "rp2040"
    return "stm32"


def build(version, mcu, build_versions=None, link="usb", extra_config=None, app="Klipper",
          kconfig=None, compression="zlib"):
    """Build a data dictionary.

    version: firmware version string (e.g. "v0.13.0-46-g8c72b4a5")
    mcu: CONFIG_MCU, e.g. "stm32f429xx", "rp2040", "linux"
    link: "usb", "serial", "can" or "canbridge" (selects link constants and
          the CAN commands)
    app: "Klipper" or "Kalico" (or anything else, for foreign firmware)
    kconfig: the embedded build config of a newer build: savedefconfig text
          (a str), or a dict for the early {"defconfig": text} shape; None
          for an older build without one
    compression: "zlib" (Klipper) or "bzip2" (Kalico)
    Returns (DictionaryText, compressed bytes).
    """
    fam = family(mcu)
    if fam == "linux":
        config, enums = _linux(mcu, link)
        commands = _COMMON_COMMANDS + _LINUX_COMMANDS
        responses = _COMMON_RESPONSES + _LINUX_RESPONSES
        static_strings = _STATIC_STRINGS + _LINUX_STATIC_STRINGS
        if build_versions is None:
            build_versions = LINUX_BUILD_VERSIONS
    else:
        config, enums = (_rp2040 if fam == "rp2040" else _stm32)(mcu, link)
        commands = _COMMON_COMMANDS + _MCU_COMMANDS
        responses = list(_COMMON_RESPONSES)
        static_strings = list(_STATIC_STRINGS)
        if fam == "stm32" and mcu[5:7] in ("f2", "f4", "f7", "h7"):
            commands += _SDIO_COMMANDS
            responses += _SDIO_RESPONSES
        if fam == "stm32":
            static_strings += _STM32_STATIC_STRINGS
    if link in ("can", "canbridge"):
        commands = commands + _CAN_COMMANDS
        responses = responses + _CAN_RESPONSES
    if link == "canbridge":
        commands = commands + _CANBRIDGE_COMMANDS
        responses = responses + _CANBRIDGE_RESPONSES
    if build_versions is None:
        build_versions = DEFAULT_BUILD_VERSIONS
    config.update({"MCU": mcu, "RECEIVE_WINDOW": 192, "STATS_SUMSQ_BASE": 256})
    if extra_config:
        config.update(extra_config)
    enums.update(_COMMON_ENUMERATIONS)
    enums["static_string_id"] = {s: i for i, s in enumerate(sorted(static_strings))}

    # Ids: 0 and 1 are fixed; the rest are numbered in order of appearance
    # (responses, then commands, then output), as a build does.
    output_formats = ["Got stats %u %u"]
    next_internal = 2
    ids = {}
    for fmt in sorted(responses) + sorted(commands) + output_formats:
        ids[fmt] = klipper_proto.internal_to_dict_id(next_internal)
        next_internal += 1
    dictionary = {
        "app": app,
        "build_versions": build_versions,
        "commands": {klipper_proto.IDENTIFY_FORMAT: klipper_proto.MSGID_IDENTIFY},
        "config": config,
        "enumerations": enums,
        "license": "GNU GPLv3",
        "output": {fmt: ids[fmt] for fmt in output_formats},
        "responses": {klipper_proto.IDENTIFY_RESPONSE_FORMAT: klipper_proto.MSGID_IDENTIFY_RESPONSE},
        "version": version,
    }
    for fmt in commands:
        dictionary["commands"][fmt] = ids[fmt]
    for fmt in responses:
        dictionary["responses"][fmt] = ids[fmt]
    if kconfig is not None:
        dictionary["kconfig"] = kconfig
    text = DictionaryText(json.dumps(dictionary, separators=(",", ":"), sort_keys=True), compression)
    return text, compress(text)


if __name__ == "__main__":
    import sys
    text, data = build(sys.argv[1] if len(sys.argv) > 1 else "v0.13.0-46-g8c72b4a5",
                       sys.argv[2] if len(sys.argv) > 2 else "stm32f429xx")
    print(text)
    print("json %d bytes, compressed %d bytes" % (len(text), len(data)), file=sys.stderr)
