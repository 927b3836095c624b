"""The simulated MCU boards, driven over rfc2217:// on loopback by the bench's DUT driver, by raw
pyserial (to check the firmware against the MLPerf Tiny reference) and by esptool's reset code."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import serial
from ai_edge_litert.interpreter import Interpreter, OpResolverType
from esptool.reset import ClassicReset, HardReset

from labbench import firmware_image
from labbench.catalog import load_family
from labbench.drivers.dut_serial import DutReplyError, DutResetError, DutSerial, DutTimeout, tensor_bytes
from labbench.errors import DutProtocolError, LabConfigError
from labbench.modelinfo import (
    MLPERF_TINY,
    ModelInfo,
    dequantize_output,
    min_arena_bytes,
    mlperf_model,
    quantize_input,
)
from labbench.sim.mcu import SimBoardError, SimMcuBoard
from labbench.sim.powerbus import PowerBus

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "fixtures" / "models" / "digits_mlp_int8.tflite"
MNIST = REPO / "fixtures" / "models" / "mnist5k_mlp_int8.tflite"
MLPERF_DIR = REPO.parent / "shared" / "workloads" / "mlperf_tiny"
MLPERF = ["pretrainedResnet_quant.tflite", "kws_ref_model.tflite", "vww_96_int8.tflite", "ad01_int8.tflite"]
RESNET8 = MLPERF_DIR / MLPERF[0]
FAMILIES = ["esp32_devkitc", "nano33_ble_sense", "coral_dev_board_micro"]
needs_mlperf = pytest.mark.skipif(not MLPERF_DIR.is_dir(), reason="../shared/workloads/mlperf_tiny is absent")


def litert(model: Path, x: np.ndarray) -> np.ndarray:
    """LiteRT's outputs for one input, dequantized (reference kernels, as TFLM: no XNNPACK)."""
    it = Interpreter(
        model_path=str(model), experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    )
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x.reshape(it.get_input_details()[0]["shape"]))
    it.invoke()
    return dequantize_output(
        ModelInfo.from_file(model), it.get_tensor(it.get_output_details()[0]["index"])
    ).ravel()


def tflm(model: Path, x: np.ndarray) -> np.ndarray:
    """TensorFlow Lite Micro's outputs for one input, dequantized, run here in the test process."""
    from tflite_micro import runtime

    it = runtime.Interpreter.from_file(str(model), arena_size=1 << 20)
    it.set_input(x.reshape(it.get_input_details(0)["shape"]), 0)
    it.invoke()
    return dequantize_output(ModelInfo.from_file(model), it.get_output(0)).ravel()


def digits_test_set() -> tuple[np.ndarray, np.ndarray]:
    info = ModelInfo.from_file(DIGITS)
    with np.load(REPO / "fixtures" / "datasets" / "digits.npz") as npz:
        x, y = npz["x_test"], npz["y_test"]
    return quantize_input(info, x.reshape(-1, 1, 64))[:, 0], y


def start(**kwargs) -> SimMcuBoard:
    """A board with the device model's exact timing and power levels: these tests are about the firmware
    and its plumbing (tests/test_sim_jitter.py covers the jitter and noise)."""
    kwargs.setdefault("model_path", DIGITS)
    kwargs.setdefault("jitter_pct", 0)
    kwargs.setdefault("power_noise_pct", 0)
    board = SimMcuBoard(kwargs.pop("name", "sim"), **kwargs)
    board.start()
    return board


@pytest.fixture(scope="module")
def bus() -> PowerBus:
    return PowerBus()


@pytest.fixture(scope="module", params=FAMILIES)
def mcu(request, bus):
    """Each family at the lab's 115200 baud, with the driver connected."""
    b = start(
        name=f"sim-{request.param}", family=request.param, bus_channel=bus.channel(f"{request.param}:1")
    )
    d = DutSerial(b.url, board=b.name)
    yield b, d
    d.close()
    b.stop()


@pytest.fixture(scope="module", params=FAMILIES)
def fast_mcu(request):
    """Each family at 921600 baud (MLPerf's anomaly-detection rate), for whole datasets and big inputs."""
    b = start(name=f"fast-{request.param}", family=request.param, baud=921600)
    d = DutSerial(b.url, board=b.name, baud=921600)
    yield b, d
    d.close()
    b.stop()


@pytest.fixture(scope="module")
def raw_port():
    b = start(name="raw")
    port = serial.serial_for_url(b.url, baudrate=115200, timeout=0.05)
    yield b, port
    port.close()
    b.stop()


@pytest.fixture
def raw(raw_port):
    """A freshly reset board and a plain pyserial RFC 2217 port on it; `ask(command)` returns the
    reply's lines."""
    b, port = raw_port

    def ask(command: bytes, until: bytes = b"m-ready\r\n", timeout_s: float = 3.0) -> list[str]:
        port.write(command)
        buf, deadline = b"", time.monotonic() + timeout_s
        while not buf.endswith(until) and time.monotonic() < deadline:
            buf += port.read(max(1, port.in_waiting))
        return buf.decode().split("\r\n")[:-1]

    b.reset(wait=True)
    assert ask(b"", until=b"m-init-done\r\nm-ready\r\n")[-1] == "m-ready"  # the banner
    return b, port, ask


# -- each family through the driver ----------------------------------------------------------------


def test_identify_reports_the_model_and_its_arena(mcu):
    b, d = mcu
    ident = d.identify()
    info = ModelInfo.from_file(DIGITS)
    assert ident.name == b.family.name
    assert ident.model == "digits_mlp_int8" and ident.model_sha256 == info.sha256
    assert ident.extra["arena_bytes"] == min_arena_bytes(DIGITS)
    assert ident.extra["model_bytes"] == info.size_bytes


def test_infer_100_10_takes_the_device_model_time_and_gives_litert_outputs(mcu):
    b, d = mcu
    x, _ = digits_test_set()
    info = ModelInfo.from_file(DIGITS)
    d.upload(tensor_bytes(x[7]))
    run = d.infer(100, 10)
    latency_us = b.family.device_model.inference_us(info.macs, "int8")
    assert abs(run.elapsed_us - 100 * latency_us) <= 1
    assert np.array_equal(run.outputs, litert(DIGITS, x[7]))
    assert np.array_equal(d.results(), run.outputs)


def test_power_states_follow_the_inferences(mcu, bus):
    b, d = mcu
    x, _ = digits_test_set()
    channel, power = bus.channel(f"{b.family.name}:1"), b.family.power
    latency_us = b.family.device_model.inference_us(ModelInfo.from_file(DIGITS).macs, "int8")
    run = d.run_timed(x[0], int(0.3e6 / latency_us), 5)  # a 0.3 s window: long next to the clock's slack
    slack = 2 * run.extra["clock_uncertainty_s"] + 1e-4
    assert slack < 0.05
    window = run.host_end - run.host_start
    assert channel.mean_power_w(run.host_start + slack, run.host_end - slack) == pytest.approx(power.active_w)
    assert channel.energy_j(run.host_start, run.host_end) == pytest.approx(
        power.active_w * window, abs=2 * slack * (power.active_w - power.idle_w) + 1e-12
    )
    assert channel.power_w(run.host_end + slack) == power.idle_w
    warmup_start = run.host_start - 5 * run.latencies_us[0] / 1e6
    assert channel.power_w(warmup_start + slack) == power.active_w
    assert channel.power_w(warmup_start - slack) == power.idle_w


def test_per_inference_latencies_on_the_device_clock(mcu):
    b, d = mcu
    x, _ = digits_test_set()
    run = d.run_timed(x[1], 20, 2, per_inference=True)
    latency_us = b.family.device_model.inference_us(ModelInfo.from_file(DIGITS).macs, "int8")
    assert len(run.latencies_us) == 20
    assert all(abs(t - latency_us) <= 1 for t in run.latencies_us)


def test_accuracy_on_the_digits_test_set_equals_litert_output_for_output(fast_mcu):
    _, d = fast_mcu
    x, y = digits_test_set()
    outputs = d.classify(x)
    expected = np.stack([litert(DIGITS, xi) for xi in x])
    assert np.array_equal(outputs, expected)
    assert (outputs.argmax(1) == y).mean() == pytest.approx(0.9694, abs=1e-4)  # fixtures/manifest.json


# -- MLPerf Tiny reference models ------------------------------------------------------------------


@needs_mlperf
def test_mlperf_models_load_where_they_fit(fast_mcu):
    b, d = fast_mcu
    try:
        for name in MLPERF:
            model = (MLPERF_DIR / name).read_bytes()
            booted = b.load_firmware(model)
            assert (
                booted["refused"] is None
                and b.family.fits(len(model), min_arena_bytes(MLPERF_DIR / name)) is None
            )
            ident = d.identify()
            assert ident.model == booted["model"] == mlperf_model(ModelInfo.from_bytes(model).sha256).id
            assert ident.model_sha256 == booted["model_sha256"] == ModelInfo.from_bytes(model).sha256
            assert ident.extra["arena_bytes"] == min_arena_bytes(MLPERF_DIR / name)
    finally:
        b.load_firmware(DIGITS.read_bytes(), "digits_mlp_int8")


@needs_mlperf
def test_resnet8_latency_is_the_catalog_device_model(fast_mcu):
    b, d = fast_mcu
    info = ModelInfo.from_file(RESNET8)
    x = np.random.default_rng(8).integers(-128, 128, size=(32, 32, 3), dtype=np.int8)
    try:
        b.load_firmware(RESNET8.read_bytes(), RESNET8.stem)
        assert d.identify().model == "ic01"  # flashing reset the board: start a session
        d.upload(MLPERF_TINY["ic01"].encode(x))  # the reference format: uint8, the firmware subtracts 128
        run = d.infer(1, 0)
    finally:
        b.load_firmware(DIGITS.read_bytes(), "digits_mlp_int8")
    assert abs(run.elapsed_us - b.family.device_model.inference_us(info.macs, "int8")) <= 1
    # TFLM's own outputs: LiteRT's reference kernels differ from TFLM's on ResNet-8 (up to tens of LSB)
    assert np.array_equal(run.outputs, tflm(RESNET8, x))


def test_a_model_named_by_an_mlperf_id_takes_that_ids_input(fast_mcu):
    """A firmware built with another model that declares itself ic01 takes ic01's uint8 input."""
    b, d = fast_mcu
    x, _ = digits_test_set()
    try:
        assert b.load_firmware(DIGITS.read_bytes(), "ic01")["model"] == "ic01"
        assert d.identify().model == "ic01"
        d.upload(tensor_bytes(x[3]))  # int8 bytes taken for uint8: shifted by 128, other outputs
        assert not np.array_equal(d.infer(1, 0).outputs, litert(DIGITS, x[3]))
        rows = d.classify(x[:4])  # the driver sends what the DUT reporting ic01 expects
        assert np.array_equal(rows, np.stack([litert(DIGITS, xi) for xi in x[:4]]))
        fp32 = REPO / "fixtures" / "models" / "digits_mlp_fp32.tflite"
        refused = b.load_firmware(fp32.read_bytes(), "ic01")["refused"]
        assert refused == "model ic01 does not have the ic01 reference model's I/O"
    finally:
        b.load_firmware(DIGITS.read_bytes(), "digits_mlp_int8")


@needs_mlperf
def test_mlperf_models_are_refused_with_sizes_where_they_do_not_fit():
    # An nRF52810 (192 KiB flash, 24 KiB SRAM): a smaller part of the Nano 33 BLE's nRF52 family.
    small = load_family("nano33_ble_sense").model_copy(
        update={"name": "nrf52810", "sram_kib": 24, "flash_kib": 192}
    )
    kws, resnet = MLPERF_DIR / "kws_ref_model.tflite", RESNET8
    b = start(name="nrf52810", family=small, model_path=kws)
    d = DutSerial(b.url, board=b.name)
    try:
        assert d.identify().model_sha256 == ModelInfo.from_file(kws).sha256  # 53,936 B, arena 24,272 B: fits
        for name, size in (("ad01_int8.tflite", "276,976"), ("vww_96_int8.tflite", "333,288")):
            with pytest.raises(
                SimBoardError, match=f"^nrf52810: cannot flash a {size} B image: it exceeds flash 192 KiB$"
            ):
                b.load_firmware((MLPERF_DIR / name).read_bytes())
        b.load_firmware(
            resnet.read_bytes(), resnet.stem
        )  # 98 KB fits the flash, its 55,984 B arena not the SRAM
        problem = "model ic01 does not fit nrf52810: arena 55,984 B exceeds SRAM 24 KiB"
        assert (
            small.fits(resnet.stat().st_size, min_arena_bytes(resnet)) == "arena 55,984 B exceeds SRAM 24 KiB"
        )
        with pytest.raises(DutReplyError, match=f"^nrf52810: profile: e-\\[{problem}\\] \\(full log: .*\\)$"):
            d.identify()
        banner = d.reset()
        assert banner[2] == f"e-[{problem}]" and banner[-2:] == ["m-init-done", "m-ready"]
        d.upload(bytes(1))
        with pytest.raises(DutReplyError, match=f"infer 1 0: e-\\[No model: {problem}\\]"):
            d.infer(1, 0)
    finally:
        d.close()
        b.stop()


# -- the firmware against the MLPerf Tiny reference ------------------------------------------------


@pytest.mark.parametrize(
    "command, reply",
    [
        (b"bogus%", ["e-[Unknown command: bogus]"]),
        (b"%", ["e-[Unknown command: ]"]),
        (b"db%", ["e-[Command 'db' requires a subcommand]"]),
        (b"db load%", ["e-[Command 'db load' requires the # of bytes]"]),
        (b"db load 0%", ["e-[Command 'db load' must be >0 bytes]"]),
        (b"db abc%", ["e-[Insufficent number of hex digits]"]),
        # ee_hexdec takes hex digits only: no sign (Python's int() would), no "0x"
        (b"db -1%", ["e-[Invalid hex digit '-1']"]),
        (b"db +f%", ["e-[Invalid hex digit '+f']"]),
        (b"db 0x%", ["e-[Invalid hex digit '0x']"]),
        (b"db 00%", ["e-[db data beyond the 0 bytes loaded; send 'db load N' first]"]),
        (b"infer 0%", ["e-[Inference iterations must be >0]"]),
        (b"infer x%", ["e-[Inference iterations must be >0]"]),
        (b"infer 1 -1%", ["e-[Inference warmup must be >=0]"]),
        (b"infer 1 0%", ["e-[Input needs 64 bytes; 0 loaded]"]),
        (b"name%", ["m-name-dut-[esp32_devkitc]"]),
        (b"  name%", ["m-name-dut-[esp32_devkitc]"]),
        (b"\nname%", ["e-[Unknown command: \nname]"]),  # the reference does not strip line ends
    ],
)
def test_replies_match_the_reference_firmware(raw, command, reply):
    _, _, ask = raw
    assert ask(command) == reply + ["m-ready"]


def test_the_command_buffer_keeps_80_characters(raw):
    _, _, ask = raw
    assert ask(b"db load 64%") == ["m-[Expecting 64 bytes]", "m-ready"]
    assert ask(b"db " + b"ab" * 39 + b"%") == ["e-[Insufficent number of hex digits]", "m-ready"]  # 81 -> 80
    assert ask(b"db " + b"ab" * 38 + b"%") == ["m-ready"]


def test_db_load_beyond_the_maximum_prints_the_unprefixed_message(raw):
    _, port, ask = raw
    port.write(b"db load 30000%")
    time.sleep(0.05)
    assert ask(b"") == ["Supplied buffer size 30000 exceeds maximum of 64\nm-ready"]
    # atoi's -5 is a size_t near 2^32 there, printed back with %d; the chip keeps running
    assert ask(b"db load -5%") == ["Supplied buffer size -5 exceeds maximum of 64\nm-ready"]
    assert ask(b"db 00%") == ["m-ready"]
    assert ask(b"name%") == ["m-name-dut-[esp32_devkitc]", "m-ready"]


def test_upload_in_pieces_then_invalid_hex_keeps_the_bytes_before(raw):
    _, _, ask = raw
    ask(b"db load 4%")
    assert ask(b"db 0102zz03%") == ["e-[Invalid hex digit 'zz']", "m-ready"]
    assert ask(b"db print%") == ["m-buffer-01-02", "m-ready"]
    assert ask(b"db 0304ff%") == ["m-load-done", "m-ready"]  # the digits after completion are ignored
    assert ask(b"db print%") == ["m-buffer-01-02-03-04", "m-ready"]


def test_infer_defaults_to_one_inference_after_ten_warmups(raw):
    _, _, ask = raw
    ask(b"db load 64%")
    ask(b"db " + b"00" * 38 + b"%")
    ask(b"db " + b"00" * 26 + b"%")
    lines = ask(b"infer%")
    assert lines[:3] == ["m-warmup-start-10", "m-warmup-done", "m-infer-start-1"]
    assert lines[-3] == "m-infer-done" and lines[-2].startswith("m-results-[") and lines[-1] == "m-ready"


def test_help_lists_the_commands(raw):
    _, _, ask = raw
    lines = ask(b"help%")
    assert lines[0] == "ULPMark for tinyML Firmware V0.0.1" and any(
        line.startswith("infer N") for line in lines
    )
    assert any(line.startswith("crc32 on|off") for line in lines) and any(
        line.startswith("boot ") for line in lines
    )


def test_boot_reports_the_stamps_of_the_banner_and_m_init_done(raw):
    """The boot extension (firmware/core/src/lb_dut.h), announced in `profile`: the counter in the
    banner's stamp and at m-init-done, kept until the next reset."""
    b, _, ask = raw
    assert "m-ext-[boot]" in ask(b"profile%")
    truth = b.last_boot
    (line,) = ask(b"boot%")[:-1]
    banner_us, done_us = map(int, line.removeprefix("m-boot-us-[").removesuffix("]").split(","))
    assert banner_us == pytest.approx((truth.banner_s - truth.app_s) * 1e6, abs=2)
    assert done_us == pytest.approx((truth.init_done_s - truth.app_s) * 1e6, abs=1000)
    assert done_us - banner_us >= b.model_init_ms * 1e3
    time.sleep(0.01)
    assert ask(b"boot%")[0] == line


def test_a_board_without_the_extensions_answers_as_the_reference():
    b = start(name="plain", reply_crc=False, boot_report=False)
    port = serial.serial_for_url(b.url, baudrate=115200, timeout=0.05)
    try:
        port.write(b"profile%boot%crc32 on%")
        buf, deadline = b"", time.monotonic() + 3
        while buf.count(b"m-ready") < 3 and time.monotonic() < deadline:
            buf += port.read(max(1, port.in_waiting))
        lines = buf.decode().split("\r\n")
        assert not any(line.startswith("m-ext-") for line in lines)
        assert "e-[Unknown command: boot]" in lines and "e-[Unknown command: crc32]" in lines
    finally:
        port.close()
        b.stop()


# -- the serial line -------------------------------------------------------------------------------


def test_bytes_move_no_faster_than_the_baud_rate():
    b = start(name="slow", baud=9600)
    d = DutSerial(b.url, board=b.name, baud=9600)
    try:
        d.identify()
        tx0, rx0, t0 = d.bytes_tx, d.bytes_rx, time.monotonic()
        d.upload(bytes(64))
        elapsed = time.monotonic() - t0
        assert elapsed >= (d.bytes_tx - tx0) * 10 / 9600  # host -> DUT direction alone
        assert elapsed >= (d.bytes_rx - rx0) * 10 / 9600
    finally:
        d.close()
        b.stop()


def test_a_client_at_the_wrong_baud_sees_garbage():
    b = start(name="baud")
    d = DutSerial(b.url, board=b.name, baud=9600, timeout_s=0.5)
    try:
        with pytest.raises(DutTimeout, match=r"baud: name: no reply within 0\.5 s"):
            d.identify()
    finally:
        d.close()
        b.stop()


def test_pipelining_past_the_dut_receive_buffer_loses_bytes():
    # The next sample's upload queues up while the DUT infers (57 ms); its 64-byte FIFO overflows.
    b = start(name="fifo", rx_fifo_bytes=64, speed_factor=500)
    x = digits_test_set()[0][:3]
    greedy = DutSerial(b.url, board=b.name, max_inflight_bytes=4096, timeout_s=0.5)
    try:
        with pytest.raises(DutProtocolError):
            greedy.classify(x)
        assert b.uart.rx_dropped_bytes > 0
    finally:
        greedy.close()
    careful = DutSerial(b.url, board=b.name, max_inflight_bytes=80)
    try:
        careful.identify()
        dropped = b.uart.rx_dropped_bytes
        assert careful.classify(x).shape == (3, 10)
        assert b.uart.rx_dropped_bytes == dropped
    finally:
        careful.close()
        b.stop()


# -- resets, boot and flash ------------------------------------------------------------------------


def test_reset_through_dtr_rts_reboots_with_an_empty_buffer(mcu):
    b, d = mcu
    d.upload(bytes(64))
    banner = d.reset()
    start = banner.index("m-timestamp-mode-performance")  # the ESP32's ROM speaks first
    assert banner[start + 1].startswith("m-lap-us-") and banner[-2:] == ["m-init-done", "m-ready"]
    assert (start > 0) == (b.boot_rom is not None)
    with pytest.raises(DutReplyError, match=r"infer 1 0: e-\[Input needs 64 bytes; 0 loaded\]"):
        d.infer(1, 0)


def test_a_reset_mid_run_is_reported_with_the_inferences_before():
    b = start(name="resets", speed_factor=200)  # ~23 ms per inference
    d = DutSerial(b.url, board=b.name)
    try:
        x, _ = digits_test_set()
        threading.Timer(0.6, b.reset).start()
        with pytest.raises(DutResetError, match="resets: infer 1 0: the DUT reset") as err:
            d.run_timed(x[0], 1000, 0, per_inference=True)
        assert 0 < len(err.value.partial.latencies_us) < 1000
        assert d.identify().model == "digits_mlp_int8"  # the link is usable again
    finally:
        d.close()
        b.stop()


def test_a_session_that_left_mid_inference_does_not_confuse_the_next():
    b = start(name="leaver", speed_factor=20000)  # 2.3 s per inference
    port = serial.serial_for_url(b.url, baudrate=115200, timeout=0.05)
    port.write(b"db load 64%db " + b"00" * 38 + b"%db " + b"00" * 26 + b"%infer 1 0%")
    time.sleep(0.2)
    port.close()  # gone while the DUT infers; the rest of its reply comes after the next session opens
    d = DutSerial(b.url, board=b.name)
    try:
        ident = d.identify()
        assert ident.model == "digits_mlp_int8" and ident.extra["name_retries"] == 1
        assert d.results().shape == (10,)  # in step: the next reply is this command's
    finally:
        d.close()
        b.stop()


def test_a_dut_slower_than_the_timeout():
    b = start(name="slowdut", speed_factor=20000)  # 2.3 s per inference
    d = DutSerial(b.url, board=b.name, infer_timeout_s=0.4)
    try:
        d.upload(bytes(64))
        with pytest.raises(
            DutTimeout,
            match=r"infer 1 0: no reply within 0.4 s; last line seen: 'm-lap-us-\d+' \(full log: .*\)$",
        ):
            d.infer(1, 0)
    finally:
        d.close()
        b.stop()


def test_the_timer_wraps_at_32_bits():
    b = start(name="wrap", timer_start_us=(1 << 32) - 600_000, speed_factor=100)
    d = DutSerial(b.url, board=b.name)
    try:
        d.identify()  # opening takes ~0.4 s: the counter wraps during the window below
        run = d.run_timed(digits_test_set()[0][0], 40, 0)
        assert run.host_end - run.host_start == pytest.approx(40 * run.latencies_us[0] / 1e6)
        assert run.latencies_us[0] == pytest.approx(
            100 * b.family.device_model.inference_us(2368, "int8"), abs=0.05
        )
    finally:
        d.close()
        b.stop()


def test_a_reset_measures_the_cold_start_of_the_boot_timeline(mcu):
    """DutSerial's cold start against the simulator's ground truth: strap delay, boot ROM (the
    ESP32's), boot_ms, then model_init_ms to m-init-done. Every part within the uncertainty the
    driver states (host scheduling may add up to a millisecond)."""
    b, d = mcu
    banner = d.reset()
    truth, cold = b.last_boot, d.cold_start
    tolerance = cold["cold_start_uncertainty_ms"] + 1.0
    # RFC 2217 on loopback: the link latency is small, but on the ESP32 m-init-done queues behind
    # the boot ROM's log; then only the banner's stamp bounds when it was written
    assert cold["cold_start_uncertainty_ms"] < (5 if b.boot_rom is None else 2 * b.model_init_ms)
    assert abs(cold["cold_start_ms"] - truth.cold_start_ms) <= tolerance
    assert abs(cold["cold_start_boot_ms"] - (truth.banner_s - truth.reset_s) * 1e3) <= tolerance
    assert abs(cold["cold_start_init_ms"] - b.model_init_ms) <= tolerance
    # the DUT's counter starts with the application (after the strap delay and any boot ROM)
    assert abs(cold["cold_start_dut_ms"] - (truth.init_done_s - truth.app_s) * 1e3) <= tolerance
    stamp = int(next(line for line in banner if line.startswith("m-lap-us-"))[len("m-lap-us-") :])
    assert stamp == pytest.approx(b.boot_ms * 1e3, abs=1)
    assert cold["cold_start_boot_ms"] >= b.strap_delay_s * 1e3 + b.boot_ms - tolerance
    assert cold["cold_start_basis"] == "host_and_dut"  # the reset edge and the banner on both clocks
    extra = d.identify().extra
    assert {k: v for k, v in extra.items() if k.startswith("cold_start")} == cold


def test_the_boot_timeline_follows_the_settings():
    b = start(name="slowboot", family="nano33_ble_sense", boot_ms=120, model_init_ms=300, strap_delay_s=0)
    d = DutSerial(b.url, board=b.name)
    try:
        d.reset()
        cold, truth = d.cold_start, b.last_boot
        # the device's timeline, within what a loaded host adds to the simulator's sleeps
        assert (truth.banner_s - truth.app_s, truth.init_done_s - truth.banner_s) == (
            pytest.approx(0.120, abs=5e-3),
            pytest.approx(0.300, abs=5e-3),
        )
        assert abs(cold["cold_start_ms"] - truth.cold_start_ms) <= cold["cold_start_uncertainty_ms"] + 1
        with pytest.raises(LabConfigError, match="boot_ms"):
            SimMcuBoard("bad", boot_ms=-1)
    finally:
        d.close()
        b.stop()


def test_esptool_resets_select_the_rom_loader_or_the_application():
    b = start(name="esp")
    port = serial.serial_for_url(b.url, baudrate=115200, timeout=0.05)
    try:
        ClassicReset(port)()  # esptool's --before default-reset: EN pulse with IO0 held low
        buf, deadline = b"", time.monotonic() + 3
        while b"waiting for download\r\n" not in buf and time.monotonic() < deadline:
            buf += port.read(64)
        assert b"DOWNLOAD_BOOT" in buf
        HardReset(port)()  # esptool's --after hard-reset: EN pulse, IO0 high: the application boots
        while b"m-init-done\r\nm-ready\r\n" not in buf and time.monotonic() < deadline:
            buf += port.read(64)
        assert b"SPI_FAST_FLASH_BOOT" in buf and b"m-timestamp-mode-performance" in buf
    finally:
        port.close()
        b.stop()


def test_the_application_boots_what_was_written_to_flash(mcu):
    b, d = mcu
    try:
        model = MNIST.read_bytes()
        if b.family.flasher == "esptool":  # what esptool writes: the partition table and the app image
            b.flash.erase()
            b.flash.write(firmware_image.PARTITION_TABLE_OFFSET, firmware_image.partition_table_bin())
            b.flash.write(firmware_image.APP_OFFSET, firmware_image.build_app_image(model, "mnist5k"))
        else:
            b.flash.erase()
            b.flash.write(0, model)
        d.reset()
        ident = d.identify()
        assert ident.model_sha256 == ModelInfo.from_bytes(model).sha256
        # the ESP32 image records a name; a raw .tflite has only what the model says of itself
        assert ident.model == (
            "mnist5k" if b.family.flasher == "esptool" else ModelInfo.from_bytes(model).name
        )
    finally:
        b.load_firmware(DIGITS.read_bytes(), "digits_mlp_int8")


def test_a_flash_without_a_model_boots_and_says_so(mcu):
    b, d = mcu
    try:
        report = b.load_firmware(b"\x00" * 4096)
        if b.boot_rom is not None:  # the ESP32's ROM finds no app image and loops on "invalid header"
            assert report["refused"].startswith("the boot ROM did not start the application: ets Jun  8 2016")
            assert "invalid header: 0x" in report["refused"]
            assert "waiting for download" not in report["refused"]  # the loader does not run
        else:
            assert report["refused"].startswith("no runnable model in flash")
            with pytest.raises(DutReplyError, match=r"profile: e-\[no runnable model in flash: "):
                d.identify()
    finally:
        b.load_firmware(DIGITS.read_bytes(), "digits_mlp_int8")
    assert d.identify().model == "digits_mlp_int8"


def test_speed_factor_slows_the_device_model():
    b = start(name="slower", family="coral_dev_board_micro", speed_factor=3.0)
    d = DutSerial(b.url, board=b.name)
    try:
        d.upload(bytes(64))
        expected = 3.0 * b.family.device_model.inference_us(2368, "int8")
        assert abs(d.infer(10, 0).elapsed_us - 10 * expected) <= 1
    finally:
        d.close()
        b.stop()
