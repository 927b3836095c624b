"""The MLPerf Tiny DUT driver: its checks of every exchange, its timeouts and the reply-CRC extension.

Two kinds of DUT, both behind real sockets and pyserial:
- a scripted DUT (a TCP server reached over socket://) that answers like MLPerf's reference firmware
  unless a test swaps in a fault (a garbled line, an error reply, a missing m-ready, a boot banner,
  a malformed stamp or result), so every failure path of the driver runs;
- the simulated ESP32 (labbench.sim.mcu) over RFC 2217, reached through `LossyLink`, a byte-level
  TCP proxy on loopback that drops a targeted byte of a command or a reply line, as a flaky USB
  cable or a byte-dropping serial proxy does.
"""

from __future__ import annotations

import ast
import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from labbench.drivers.dut_serial import (
    CHUNK_BYTES,
    DutReplyError,
    DutResetError,
    DutSerial,
    DutTimeout,
    tensor_bytes,
)
from labbench.errors import DutProtocolError, RunAborted
from labbench.inventory import BoardEntry, SerialConn
from labbench.modelinfo import ModelInfo, quantize_input
from labbench.sim.mcu import SimMcuBoard

READY = b"m-ready\r\n"
HANG_UP = b"<hang up>"  # a reply that makes the scripted DUT close the connection
REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "fixtures" / "models" / "digits_mlp_int8.tflite"


class ScriptedDut:
    """Answers each %-terminated command with `respond(dut, command)`, like the reference firmware by
    default; its microsecond clock is the host's monotonic clock since `t0`, and an infer takes 250 µs
    per inference.

    `delay_s` holds each reply back (a busy DUT), so a pipelining client fills its window;
    `outstanding` records, per command, the bytes the client had sent but the DUT had not answered.
    A reply given as a tuple is sent part by part, a number in it being a pause in seconds.
    """

    def __init__(
        self, respond: Callable[[ScriptedDut, str], bytes | None] | None = None, delay_s: float = 0.0
    ):
        self.respond = respond or ScriptedDut.reference
        self.delay_s = delay_s
        self.commands: list[str] = []
        self.outstanding: list[int] = []
        self.expected = self.loaded = 0
        self.t0 = time.monotonic()
        self._server = socket.create_server(("127.0.0.1", 0))
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"socket://127.0.0.1:{self._server.getsockname()[1]}"

    def close(self) -> None:
        self._server.close()

    def now_us(self) -> int:
        return int((time.monotonic() - self.t0) * 1e6)

    def _serve(self) -> None:
        try:
            conn, _ = self._server.accept()
        except OSError:
            return
        buf = b""
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
                while b"%" in buf:
                    raw, buf = buf.split(b"%", 1)
                    command = raw.decode()
                    self.commands.append(command)
                    time.sleep(self.delay_s)
                    try:
                        buf += conn.recv(65536, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        pass
                    self.outstanding.append(len(raw) + 1 + len(buf))
                    reply = self.respond(self, command)
                    if reply == HANG_UP:
                        return
                    for part in reply if isinstance(reply, tuple) else (reply or b"",):
                        if isinstance(part, float):
                            time.sleep(part)
                        else:
                            conn.sendall(part)

    def infer_reply(self, n: int, w: int, results: bytes = b"m-results-[0.125,0.875]") -> bytes:
        """The reference's reply to `infer n w`, after the n inferences' time has passed."""
        start = self.now_us()
        time.sleep(250e-6 * n)
        return (
            (
                f"m-warmup-start-{w}\r\nm-warmup-done\r\nm-infer-start-{n}\r\nm-lap-us-{start}\r\n"
                f"m-lap-us-{start + 250 * n}\r\nm-infer-done\r\n"
            ).encode()
            + results
            + b"\r\n"
            + READY
        )

    def reference(self, command: str) -> bytes:
        words = command.split()
        if command == "name":
            return b"m-name-dut-[scripted]\r\n" + READY
        if command == "profile":
            return b"m-profile-[ULPMark for tinyML Firmware V0.0.1]\r\nm-model-[ic01]\r\n" + READY
        if command == "timestamp":
            return f"m-lap-us-{self.now_us()}\r\n".encode() + READY
        if words[:2] == ["db", "load"]:
            self.expected, self.loaded = int(words[2]), 0
            return f"m-[Expecting {self.expected} bytes]\r\n".encode() + READY
        if words[0] == "db":
            self.loaded += len(words[1]) // 2
            return (b"m-load-done\r\n" if self.loaded >= self.expected else b"") + READY
        if words[0] == "infer":
            return self.infer_reply(int(words[1]), int(words[2]))
        if command == "results":
            return b"m-results-[0.125,0.875]\r\n" + READY
        return f"e-[Unknown command: {words[0] if words else ''}]\r\n".encode() + READY


def replacing(
    pattern: str, reply: bytes | Callable[[ScriptedDut, str], bytes | None]
) -> Callable[[ScriptedDut, str], bytes | None]:
    """The reference script, except commands matching `pattern` get `reply` (None: the reference's)."""

    def respond(dut: ScriptedDut, command: str) -> bytes | None:
        if re.fullmatch(pattern, command):
            answer = reply(dut, command) if callable(reply) else reply
            if answer is not None:
                return answer
        return ScriptedDut.reference(dut, command)

    return respond


def nth_call(
    n: int, reply: bytes | Callable[[ScriptedDut, str], bytes]
) -> Callable[[ScriptedDut, str], bytes | None]:
    """`reply` on the n-th call (1-based), the reference's answer on the others."""
    calls = []

    def respond(dut: ScriptedDut, command: str) -> bytes | None:
        calls.append(command)
        if len(calls) != n:
            return None
        return reply(dut, command) if callable(reply) else reply

    return respond


@pytest.fixture
def dut_with(tmp_path):
    made: list[tuple[ScriptedDut, DutSerial]] = []

    def make(respond=None, delay_s: float = 0.0, **kwargs) -> tuple[ScriptedDut, DutSerial]:
        dut = ScriptedDut(respond, delay_s)
        kwargs.setdefault("timeout_s", 0.5)
        driver = DutSerial(dut.url, board="board7", log_path=tmp_path / "board7-serial.log", **kwargs)
        made.append((dut, driver))
        return dut, driver

    yield make
    for dut, driver in made:
        driver.close()
        dut.close()


SAMPLE = np.arange(-50, 50, dtype=np.int8)  # 100 bytes: 3 chunks
LOG = r" \(full log: .*board7-serial\.log\)$"


# -- well-formed exchanges -------------------------------------------------------------------------


def test_identify_reads_name_and_profile_of_reference_firmware(dut_with):
    dut, d = dut_with()
    ident = d.identify()
    assert (ident.name, ident.model, ident.firmware) == (
        "scripted",
        "ic01",
        "ULPMark for tinyML Firmware V0.0.1",
    )
    assert ident.model_sha256 is None and ident.extra == {}
    assert dut.commands == ["name", "profile"]  # no crc32: the profile did not offer it


def test_identify_takes_the_optional_profile_lines(dut_with):
    profile = (
        b"m-profile-[ULPMark for tinyML Firmware V0.0.1]\r\nm-model-[kws01]\r\nm-model-sha256-[ab12]\r\n"
        b"m-arena-bytes-[24272]\r\nm-latency-us-[180.5]\r\n" + READY
    )
    _, d = dut_with(replacing("profile", profile))
    ident = d.identify()
    assert ident.model_sha256 == "ab12"
    assert ident.extra == {"arena_bytes": 24272, "latency_us": 180.5}


def test_upload_sends_38_byte_chunks_of_hex_and_nothing_else(dut_with):
    dut, d = dut_with()
    d.upload(tensor_bytes(SAMPLE))
    data = SAMPLE.tobytes()
    assert dut.commands == ["db load 100"] + [f"db {data[i : i + CHUNK_BYTES].hex()}" for i in (0, 38, 76)]
    assert max(len(c) for c in dut.commands) == 79  # the reference's command buffer holds 80


def test_pipelining_keeps_the_dut_buffer_bound(dut_with):
    dut, d = dut_with(delay_s=0.01, max_inflight_bytes=160)
    d.upload(bytes(range(256)) * 2)
    assert max(dut.outstanding) <= 160
    assert max(dut.outstanding) > 80  # a second chunk was on its way while the first was answered


def test_stop_and_wait_when_the_window_is_one_command(dut_with):
    dut, d = dut_with(delay_s=0.005, max_inflight_bytes=0)
    d.upload(bytes(200))
    assert dut.outstanding == [len(c) + 1 for c in dut.commands]


def test_run_timed_window_mode(dut_with):
    dut, d = dut_with()
    run = d.run_timed(SAMPLE, 40, 3)
    assert dut.commands[-2:] == ["timestamp", "infer 40 3"]
    assert run.latencies_us == (250.0,) * 40
    assert run.extra["latency_basis"] == "window_mean" and run.extra["warmup"] == 3
    assert run.extra["reply_crc32"] is False
    assert run.host_end - run.host_start == pytest.approx(40 * 250e-6)
    assert np.array_equal(run.outputs, np.array([0.125, 0.875], np.float32))
    assert run.extra["bytes_to_dut"] == sum(len(c) + 1 for c in dut.commands)


def test_run_timed_per_inference_mode(dut_with):
    dut, d = dut_with()
    run = d.run_timed(SAMPLE, 5, 2, per_inference=True)
    assert dut.commands[-5:] == ["infer 1 2"] + ["infer 1 0"] * 4
    assert run.latencies_us == (250.0,) * 5 and run.extra["latency_basis"] == "per_inference"
    assert run.host_start < run.host_end


def test_the_dut_clock_maps_onto_the_host_clock(dut_with):
    dut, d = dut_with()
    sync = d.sync_clock()
    # the scripted DUT's counter is host monotonic time since dut.t0
    assert sync.host_time(sync.dut_us) - sync.dut_us / 1e6 == pytest.approx(
        dut.t0, abs=2 * sync.uncertainty_s + 1e-3
    )


def test_stamps_are_unwrapped_across_the_32_bit_timer(dut_with):
    wrap = (
        b"m-warmup-start-0\r\nm-warmup-done\r\nm-infer-start-2\r\nm-lap-us-4294967000\r\nm-lap-us-200\r\n"
        b"m-infer-done\r\nm-results-[1.0]\r\n" + READY
    )
    _, d = dut_with(replacing(r"infer .*", wrap))
    d.upload(b"\x01")
    assert d.infer(2, 0).elapsed_us == 496


def test_classify_pipelines_upload_and_infer_per_sample(dut_with):
    dut, d = dut_with()
    out = d.classify(np.stack([SAMPLE, SAMPLE, SAMPLE]))
    assert out.shape == (3, 2)
    assert dut.commands.count("infer 1 0") == 3 and "results" not in dut.commands


def test_results_command(dut_with):
    _, d = dut_with()
    assert d.results().tolist() == [0.125, 0.875]


def test_a_results_reply_without_results(dut_with):
    _, d = dut_with(replacing("results", b"m-infer-done\r\n" + READY))
    with pytest.raises(DutProtocolError, match=r"results: malformed results line 'm-infer-done'" + LOG):
        d.results()


def test_nonsense_requests_are_refused_before_any_byte_is_sent(dut_with):
    dut, d = dut_with()
    with pytest.raises(ValueError, match="count >= 1"):
        d.run_timed(SAMPLE, 0, 0)
    with pytest.raises(ValueError, match="nothing to upload"):
        d.upload(b"")
    assert dut.commands == []


def test_from_lab_takes_the_inventory_entry(tmp_path):
    entry = BoardEntry(
        name="esp32",
        family="esp32_devkitc",
        serial=SerialConn(url="rfc2217://127.0.0.1:14001", baud=921600, timeout_s=2.5),
    )
    d = DutSerial.from_lab(entry)
    assert (d.url, d.board, d.baud, d.timeout_s) == ("rfc2217://127.0.0.1:14001", "esp32", 921600, 2.5)
    assert d.log_path == Path.cwd().resolve() / "reports" / "logs" / "esp32-serial.log"
    assert DutSerial.from_lab(entry, log_dir=tmp_path).log_path == tmp_path / "esp32-serial.log"


def test_float64_samples_are_refused():
    with pytest.raises(TypeError, match="float64"):
        tensor_bytes(np.zeros(4))


def test_the_serial_log_has_every_byte_both_ways_with_host_times(dut_with):
    _, d = dut_with()
    t0 = time.monotonic()
    d.run_timed(SAMPLE, 4, 1)
    d.close()
    lines = d.log_path.read_text().splitlines()
    assert re.fullmatch(r"[\d.]+ -- open socket://127\.0\.0\.1:\d+ at 115200 baud; host time \S+", lines[0])
    sent = [line.split(" -> ")[1] for line in lines if " -> " in line]
    assert sent[-2:] == ["b'timestamp%'", "b'infer 4 1%'"]
    received = b"".join(ast.literal_eval(line.split(" <- ")[1]) for line in lines if " <- " in line)
    assert received.endswith(b"m-infer-done\r\nm-results-[0.125,0.875]\r\nm-ready\r\n")
    stamps = [float(line.split()[0]) for line in lines]
    assert stamps == sorted(stamps) and t0 <= stamps[1] <= time.monotonic()


# -- checks of each exchange -----------------------------------------------------------------------


def test_an_echoed_count_that_is_not_the_one_sent(dut_with):
    # what a byte lost on the way to the DUT does: `infer 8742 0` arrives as `infer 742 0`
    _, d = dut_with(replacing(r"infer .*", lambda dut, command: dut.infer_reply(742, 0)))
    with pytest.raises(
        DutProtocolError,
        match=r"^board7: infer 8742 0: expected 'm-infer-start-8742' \(line 3 of the reply\), "
        r"got 'm-infer-start-742'" + LOG,
    ) as err:
        d.run_timed(SAMPLE, 8742, 0)
    assert err.value.partial is None


def test_infer_1_0_arriving_as_infer_10(dut_with):
    _, d = dut_with(replacing(r"infer .*", nth_call(3, lambda dut, command: dut.infer_reply(10, 10))))
    with pytest.raises(
        DutProtocolError,
        match=r"infer 1 0: expected 'm-warmup-start-0' \(line 1 of the reply\), got "
        r"'m-warmup-start-10'",
    ) as err:
        d.run_timed(SAMPLE, 5, 0, per_inference=True)
    assert err.value.partial.latencies_us == (250.0, 250.0)


def test_a_db_load_echo_that_is_not_the_size_sent(dut_with):
    _, d = dut_with(replacing(r"db load .*", b"m-[Expecting 10 bytes]\r\n" + READY))
    with pytest.raises(
        DutProtocolError, match=r"db load 100: expected \['m-\[Expecting 100 bytes\]'\], got "
    ):
        d.upload(tensor_bytes(SAMPLE))


def infer_lines(*lines: str) -> bytes:
    return "".join(f"{line}\r\n" for line in lines).encode()


WELL_FORMED = (
    "m-warmup-start-0",
    "m-warmup-done",
    "m-infer-start-3",
    "m-lap-us-5",
    "m-lap-us-9",
    "m-infer-done",
    "m-results-[1]",
)


def changed(index: int, line: str) -> bytes:
    """The well-formed reply to `infer 3 0` with line `index` replaced."""
    return infer_lines(*WELL_FORMED[:index], line, *WELL_FORMED[index + 1 :])


@pytest.mark.parametrize(
    "reply, problem",
    [
        (
            infer_lines(*WELL_FORMED[:4], *WELL_FORMED[5:]),
            (
                r"expected the lines \['m-warmup-start-0', 'm-warmup-done', 'm-infer-start-3', "
                r"'m-lap-us-T0', 'm-lap-us-T1', 'm-infer-done', 'm-results-\[...\]'\], "
                r"got \['m-warmup-start-0'"
            ),
        ),
        (infer_lines("m-lap-us-5", "m-lap-us-9", "m-results-[1]"), "expected the lines"),
        (
            changed(4, "m-lap-us-x9"),
            r"expected m-lap-us-N \(N < 2\^32, no leading zeros\), got 'm-lap-us-x9'",
        ),
        (changed(4, "m-lap-us-09"), "expected m-lap-us-N .*, got 'm-lap-us-09'"),
        (changed(4, "m-lap-us-4294967296"), "expected m-lap-us-N .*, got 'm-lap-us-4294967296'"),
        (
            changed(0, "m-warmup-start-00"),
            r"expected 'm-warmup-start-0' \(line 1 of the reply\), got 'm-warmup-start-00'",
        ),
        (
            changed(6, "m-results-[0.5,abc]"),
            (
                r"malformed results line 'm-results-\[0.5,abc\]': 'abc' is not a number as the firmware "
                r"prints one"
            ),
        ),
    ],
)
def test_malformed_infer_replies(dut_with, reply, problem):
    _, d = dut_with(replacing(r"infer .*", reply + READY))
    d.upload(b"\x01")
    with pytest.raises(DutProtocolError, match=f"^board7: infer 3 0: {problem}"):
        d.infer(3, 0)


@pytest.mark.parametrize(
    "values, problem",
    [
        ("0967,0.033", "'0967' is not a number"),  # the '.' of 0.967 lost
        (".967,0.033", "'.967' is not a number"),
        ("0.967,", "'' is not a number"),
        ("0.967,nan", "'nan' is not a number"),
        ("", "'' is not a number"),
        ("0.967,1e39", "not finite in float32"),
        ("0.967,0.033,0", r"expected 2 result values \(the model's outputs\), got 3"),
    ],
)
def test_malformed_results(dut_with, values, problem):
    _, d = dut_with(replacing("results", f"m-results-[{values}]\r\n".encode() + READY), output_count=2)
    with pytest.raises(DutProtocolError, match=problem):
        d.results()


def test_the_reference_firmwares_trailing_comma_is_taken_from_an_mlperf_dut_only(dut_with):
    """The reference VWW firmware prints `m-results-[0.123,0.877,]`; from a DUT that reports no MLPerf
    model the same line stays malformed (a lost value must not pass as a format)."""
    line = b"m-results-[0.123,0.877,]\r\n"
    _, d = dut_with(replacing("results", line + READY), output_count=2)
    with pytest.raises(DutProtocolError, match="'' is not a number"):
        d.results()
    _, d = dut_with(replacing("results", line + READY), output_count=2)
    assert d.identify().model == "ic01"
    assert d.results().tolist() == pytest.approx([0.123, 0.877])


def test_numbers_as_firmware_prints_them_are_taken(dut_with):
    line = b"m-results-[0,-0,1,0.5,-2.25,0.000,1.5e-05,2E+3,12]\r\n"
    _, d = dut_with(replacing("results", line + READY))
    assert d.results().tolist() == pytest.approx([0, 0, 1, 0.5, -2.25, 0, 1.5e-05, 2000, 12])


@pytest.mark.parametrize("which", ["T0", "T1"])
def test_a_stamp_that_disagrees_with_the_host_clock(dut_with, which):
    def infer(dut: ScriptedDut, command: str) -> bytes:
        now = dut.now_us()
        t0, t1 = (now // 10, now + 1000) if which == "T0" else (now, now + 5_000_000)
        return (
            f"m-warmup-start-0\r\nm-warmup-done\r\nm-infer-start-4\r\nm-lap-us-{t0}\r\nm-lap-us-{t1}\r\n"
            "m-infer-done\r\nm-results-[0.125,0.875]\r\n"
        ).encode() + READY

    _, d = dut_with(replacing(r"infer .*", infer))
    with pytest.raises(
        DutProtocolError,
        match=r"infer 4 0: stamp \d+ comes [\d.]+ s after the stamp before it "
        r"\(\d+\), but only [\d.e-]+ s passed on the host .*a stamp is wrong or went backwards",
    ):
        d.run_timed(SAMPLE, 4, 0)


def test_a_window_shorter_than_the_host_saw(dut_with):
    def infer(dut: ScriptedDut, command: str) -> tuple:
        start = dut.now_us()  # stamps 0.1 s apart, sent 0.4 s apart
        return (
            f"m-warmup-start-0\r\nm-warmup-done\r\nm-infer-start-9\r\nm-lap-us-{start}\r\n".encode(),
            0.4,
            f"m-lap-us-{start + 100_000}\r\nm-infer-done\r\nm-results-[0.125,0.875]\r\n".encode() + READY,
        )

    _, d = dut_with(replacing(r"infer .*", infer), link_latency_s=0.2)
    with pytest.raises(
        DutProtocolError,
        match=r"infer 9 0: the stamps \d+ and \d+ span 0.1 s, but their "
        r"lines arrived 0.[34]\d* s apart \(link latency allowed: 0.2 s\): a stamp is wrong",
    ):
        d.run_timed(SAMPLE, 9, 0)


def test_a_window_shorter_than_earlier_runs_make_it(dut_with):
    dut, d = dut_with()
    d.run_timed(SAMPLE, 400, 0)  # 0.1 s: 250 µs per inference
    assert d.inference_s == pytest.approx(250e-6)

    def short(dut: ScriptedDut, command: str) -> bytes:
        start = dut.now_us()
        time.sleep(0.01)
        return (
            f"m-warmup-start-0\r\nm-warmup-done\r\nm-infer-start-400\r\nm-lap-us-{start}\r\n"
            f"m-lap-us-{start + 10_000}\r\nm-infer-done\r\nm-results-[0.125,0.875]\r\n"
        ).encode() + READY

    dut.respond = replacing(r"infer .*", short)
    with pytest.raises(
        DutProtocolError,
        match=r"infer 400 0: 400 inferences took 0.01 s by the stamps \d+ and "
        r"\d+; at the 0.245 ms or more per inference known before, they take at least 0.049 s",
    ):
        d.run_timed(SAMPLE, 400, 0)


# -- malformed lines -------------------------------------------------------------------------------


def test_a_garbled_line_names_board_command_and_line(dut_with):
    _, d = dut_with(replacing("name", b"m-name-dut-[scripted]\r\n\x8f\x13garbage\r\n" + READY))
    with pytest.raises(DutProtocolError, match=r"^board7: name: unexpected line '\ufffd\\x13garbage'"):
        d.identify()


def test_an_unprefixed_firmware_message_is_an_error(dut_with):
    _, d = dut_with(replacing(r"db load .*", b"Supplied buffer size 100 exceeds maximum of 64\n" + READY))
    with pytest.raises(
        DutProtocolError, match="db load 100: unexpected line 'Supplied buffer size 100 exceeds"
    ):
        d.upload(bytes(100))


def test_a_line_cut_off_without_its_end_times_out_showing_it(dut_with):
    dut, d = dut_with(replacing("name", b"m-name-dut-[scrip"))
    with pytest.raises(
        DutTimeout,
        match=r"name: no reply within 0.5 s; last line seen: '\(none\)', "
        r"then 'm-name-dut-\[scrip' without a line end" + LOG,
    ):
        d.identify()
    assert dut.commands == ["name"]  # a silent DUT is not retried


def test_a_reply_without_name_line(dut_with):
    dut, d = dut_with(replacing("name", b"m-dut-ok\r\n" + READY))
    with pytest.raises(DutProtocolError, match=r"name: no m-name-...-\[...\] line"):
        d.identify()
    assert dut.commands == ["name"] * 3


def test_identify_realigns_after_a_stale_reply(dut_with):
    names = []

    def name(dut: ScriptedDut, command: str) -> bytes:  # the first reply is an earlier session's tail
        names.append(command)
        stale = b"m-lap-us-5\r\nm-infer-done\r\nm-results-[1]\r\n" + READY if len(names) == 1 else b""
        return stale + b"m-name-dut-[scripted]\r\n" + READY

    dut, d = dut_with(replacing("name", name))
    ident = d.identify()
    assert (ident.name, ident.model, ident.extra) == ("scripted", "ic01", {"name_retries": 1})
    assert dut.commands == ["name", "name", "profile"]


def test_name_is_retried_after_a_swallowed_command(dut_with):
    _, d = dut_with(replacing("name", nth_call(1, b"e-[Unknown command: db0102name]\r\n" + READY)))
    ident = d.identify()
    assert ident.name == "scripted" and ident.extra == {"name_retries": 1}


def test_name_retries_are_bounded(dut_with):
    dut, d = dut_with(replacing("name", b"e-[Unknown command: x]\r\n" + READY))
    with pytest.raises(DutReplyError, match=r"name: e-\[Unknown command: x\]"):
        d.identify()
    assert dut.commands == ["name"] * 3


def test_a_profile_without_model(dut_with):
    _, d = dut_with(replacing("profile", b"m-profile-[x]\r\n" + READY))
    with pytest.raises(DutProtocolError, match="profile: no m-profile"):
        d.identify()


def test_a_timestamp_reply_without_a_stamp(dut_with):
    _, d = dut_with(replacing("timestamp", READY))
    with pytest.raises(DutProtocolError, match="timestamp: expected one m-lap-us-N stamp"):
        d.sync_clock()


def test_the_last_chunk_must_complete_the_load(dut_with):
    _, d = dut_with(replacing(r"db [0-9a-f]+", READY))
    with pytest.raises(DutProtocolError, match=r"db .*: expected \['m-load-done'\], got \[\]"):
        d.upload(bytes(10))


def test_a_chunk_other_than_the_last_must_not_complete_the_load(dut_with):
    _, d = dut_with(replacing(r"db [0-9a-f]+", b"m-load-done\r\n" + READY))
    with pytest.raises(DutProtocolError, match=r"db .*: expected \[\], got \['m-load-done'\]"):
        d.upload(bytes(100))


def test_a_bad_row_mid_classification_keeps_the_rows_before(dut_with):
    _, d = dut_with(
        replacing(r"infer .*", nth_call(3, lambda dut, c: dut.infer_reply(1, 0, b"m-results-[oops]")))
    )
    with pytest.raises(DutProtocolError, match="malformed results") as err:
        d.classify(np.stack([SAMPLE] * 5))
    assert err.value.partial.tolist() == [[0.125, 0.875]] * 2
    assert d.identify().name == "scripted"  # the replies in flight were collected: the link is in step


def test_a_row_of_another_length_mid_classification_stays_a_typed_error(dut_with):
    _, d = dut_with(
        replacing(
            r"infer .*", nth_call(3, lambda dut, c: dut.infer_reply(1, 0, b"m-results-[0.5,0.25,0.25]"))
        )
    )
    with pytest.raises(
        DutProtocolError, match=r"expected 2 result values \(the model's outputs\), got 3"
    ) as err:
        d.classify(np.stack([SAMPLE] * 5))
    assert err.value.partial.shape == (2, 2)


# -- error replies ---------------------------------------------------------------------------------


def test_an_error_reply_names_the_command(dut_with):
    _, d = dut_with(
        replacing("profile", b"e-[model vww does not fit: arena 103,680 B exceeds SRAM 64 KiB]\r\n" + READY)
    )
    with pytest.raises(DutReplyError, match=r"^board7: profile: e-\[model vww does not fit: arena 103,680 B"):
        d.identify()


def test_an_error_mid_upload_drains_the_pipeline(dut_with):
    _, d = dut_with(replacing(r"db 1.*", b"e-[Invalid hex digit 'zz']\r\n" + READY), delay_s=0.002)
    with pytest.raises(DutReplyError, match=r"db 1.*: e-\[Invalid hex digit 'zz'\]"):
        d.upload(bytes(38) + b"\x11" * 38 + bytes(38 * 3))
    assert d.identify().model == "ic01"  # no stale reply left behind


def test_an_error_mid_classification_keeps_the_rows_before(dut_with):
    _, d = dut_with(replacing(r"infer .*", nth_call(4, b"e-[Inference iterations must be >0]\r\n" + READY)))
    with pytest.raises(DutReplyError, match=r"infer 1 0: e-\[Inference iterations must be >0\]") as err:
        d.classify(np.stack([SAMPLE] * 6))
    assert err.value.partial.shape == (3, 2)


def test_an_error_mid_timed_run_keeps_the_inferences_before(dut_with):
    _, d = dut_with(replacing(r"infer .*", nth_call(3, b"e-[No model: flash erased]\r\n" + READY)))
    with pytest.raises(DutReplyError, match="No model") as err:
        d.run_timed(SAMPLE, 5, 0, per_inference=True)
    assert err.value.partial.latencies_us == (250.0, 250.0)


# -- resets, timeouts, stops -----------------------------------------------------------------------


BANNER = b"m-timestamp-mode-performance\r\nm-lap-us-0\r\nm-init-done\r\nm-ready\r\n"


def test_a_boot_banner_in_a_reply_is_a_reset(dut_with):
    _, d = dut_with(replacing(r"infer .*", b"m-warmup-start-10\r\n" + BANNER))
    d.upload(b"\x01")
    with pytest.raises(
        DutResetError, match="infer 1 10: the DUT reset: boot banner line 'm-timestamp-mode-performance'"
    ):
        d.infer(1, 10)


def test_a_reset_while_idle_shows_at_the_next_command(dut_with):
    _, d = dut_with(replacing("results", BANNER))
    with pytest.raises(DutResetError):
        d.results()
    assert d.identify().model == "ic01"


def test_a_silent_dut_times_out_with_the_last_line(dut_with):
    _, d = dut_with(replacing(r"infer .*", b"m-warmup-start-0\r\nm-warmup-done\r\n"), infer_timeout_s=0.3)
    d.upload(b"\x01")
    t0 = time.monotonic()
    with pytest.raises(
        DutTimeout, match=r"infer 1 0: no reply within 0.3 s; last line seen: 'm-warmup-done'" + LOG
    ):
        d.infer(1, 0)
    assert time.monotonic() - t0 < 2


def test_a_dut_silent_mid_run_keeps_the_inferences_before(dut_with):
    infers = []

    def respond(dut: ScriptedDut, command: str) -> bytes:  # silent from the middle of the 4th infer on
        infers.extend(command.split()[:1] if command.startswith("infer") else [])
        if len(infers) < 4:
            return dut.reference(command)
        return b"m-warmup-start-0\r\n" if len(infers) == 4 and command.startswith("infer") else b""

    _, d = dut_with(respond)
    d.run_timed(SAMPLE, 400, 0)  # the time per inference: 250 µs, so an `infer 1 0` gets 5 s
    assert d.expected_s(1, 0) < 0.05
    t0 = time.monotonic()
    with pytest.raises(
        DutTimeout,
        match=r"infer 1 0: no reply within 5.0\d* s \(it should take [\d.e-]+ s\); "
        r"last line seen: 'm-warmup-start-0'",
    ) as err:
        d.run_timed(SAMPLE, 5, 0, per_inference=True)
    assert 5 <= time.monotonic() - t0 < 6.5
    assert err.value.partial.latencies_us == (250.0,) * 2


def test_the_time_limit_of_an_infer_follows_what_it_should_take(dut_with):
    _, d = dut_with(infer_timeout_s=120)
    assert d.expected_s(40_000, 0) is None  # unknown until a run is timed: infer_timeout_s
    d.run_timed(SAMPLE, 400, 0)
    window_s = d.expected_s(40_000, 0)
    assert 10.2 <= window_s < 10.25  # 40,000 x (250 µs + 2 ms / 400) + the reply's wire time
    assert d._timeout(d._infer_command(40_000, 0))[0] == pytest.approx(2 * window_s)  # max(2 E, E + 5 s)
    assert d._timeout(d._infer_command(400, 0))[0] == pytest.approx(d.expected_s(400, 0) + 5)


def test_a_dut_that_drops_the_connection_mid_reply(dut_with):
    _, d = dut_with(replacing(r"infer .*", HANG_UP))
    d.upload(b"\x01")
    with pytest.raises(
        DutProtocolError, match=r"^board7: infer 1 0: connection lost \(.*\); last line seen: 'm-ready'"
    ):
        d.infer(1, 0)


def test_a_port_that_cannot_be_opened(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        d = DutSerial(
            f"socket://127.0.0.1:{port}", board="board7", timeout_s=0.5, log_path=tmp_path / "x.log"
        )
        with pytest.raises(DutProtocolError, match=f"^board7: open socket://127.0.0.1:{port}: "):
            d.identify()


def test_reset_over_a_port_without_modem_lines_times_out(dut_with):
    _, d = dut_with()
    with pytest.raises(DutTimeout, match=r"reset: no boot banner within 0\.5 s"):
        d.reset()


def test_a_stop_ends_the_wait_and_the_next_exchange_collects_the_reply(dut_with):
    dut, d = dut_with()
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    t0 = time.monotonic()
    with pytest.raises(RunAborted, match=r"^board7: infer 4000 0: stopped from outside after") as err:
        d.run_timed(SAMPLE, 4000, 0, stop=stop)  # a 1 s window
    assert 0.3 <= time.monotonic() - t0 < 0.45
    assert err.value.partial is None and err.value.log == str(d.log_path)
    assert d.results().tolist() == [0.125, 0.875]  # after the window's reply: in step
    assert dut.commands[-2:] == ["infer 4000 0", "results"]


# -- input formats and cold start ------------------------------------------------------------------


def profile_reporting(model: str) -> Callable[[ScriptedDut, str], bytes | None]:
    profile = f"m-profile-[ULPMark for tinyML Firmware V0.0.1]\r\nm-model-[{model}]\r\n"
    return replacing("profile", profile.encode() + READY)


def uploaded(dut: ScriptedDut) -> bytes:
    """The bytes of the last upload the scripted DUT received."""
    start = max(i for i, c in enumerate(dut.commands) if c.startswith("db load "))
    return bytes.fromhex("".join(c[3:] for c in dut.commands[start + 1 :] if c.startswith("db ")))


def test_a_dut_reporting_ic01_gets_the_runners_uint8_images(dut_with):
    dut, d = dut_with()  # the scripted DUT reports ic01, as MLPerf's reference firmware
    x = np.array([-128, -1, 0, 127], np.int8)
    d.run_timed(x, 1, 0)
    assert uploaded(dut) == x.tobytes()  # before identify the model is unknown: the tensor's bytes
    assert d.identify().model == "ic01" and d.reported_model == "ic01"
    d.run_timed(x, 1, 0)
    assert uploaded(dut) == bytes([0, 127, 128, 255])  # the firmware subtracts 128 again
    d.classify(np.array([[0, 127, 128, 255]], np.uint8))  # the runner's own format passes as it is
    assert uploaded(dut) == bytes([0, 127, 128, 255])
    assert d.input_bytes(x) == bytes([0, 127, 128, 255])
    with pytest.raises(TypeError, match=r"ic01 takes uint8 values .* or int8 input tensor values, got float"):
        d.run_timed(np.zeros(4, np.float32), 1, 0)


def test_a_dut_reporting_ad01_gets_float32_features(dut_with):
    dut, d = dut_with(profile_reporting("ad01"))
    d.identify()
    features = np.array([0.5, -1.25, 3.0], np.float32)
    d.run_timed(features, 1, 0)
    assert uploaded(dut) == features.astype("<f4").tobytes()
    q = np.array([89, 90, -128], np.int8)  # ad01's input: scale 0.391..., zero point 89
    d.classify(q[None])
    scale = np.float32(0.3910152316093445)
    assert np.frombuffer(uploaded(dut), "<f4").tolist() == [0.0, scale, scale * np.float32(-217)]


def test_other_models_get_their_input_tensor_bytes(dut_with):
    dut, d = dut_with(profile_reporting("digits_mlp_int8"))
    d.identify()
    d.classify(SAMPLE[None])
    assert uploaded(dut) == SAMPLE.tobytes()


def test_a_banner_without_a_stamp_gives_the_host_clock_cold_start_alone(dut_with):
    _, d = dut_with()
    wire_s = len("m-init-done\r\n") * 10 / 115200
    cold = d._cold_start(["m-timestamp-mode-energy", "m-init-done", "m-ready"], [0.9, 1.0, 1.01], (0.2, 0.3))
    assert cold == {
        "cold_start_ms": pytest.approx((1.0 - wire_s - 0.25) * 1e3),
        "cold_start_uncertainty_ms": pytest.approx(50.0),
    }


# -- the reply-CRC extension with a scripted DUT ---------------------------------------------------


def test_a_dut_that_offers_crc_but_answers_without_it(dut_with):
    profile = b"m-profile-[x]\r\nm-model-[ic01]\r\nm-ext-[crc32]\r\n" + READY
    crc_on = b"m-crc32-[on] *628A0723\r\nm-ready *22889601\r\n"
    dut, d = dut_with(lambda dut, c: {"profile": profile, "crc32 on": crc_on}.get(c) or dut.reference(c))
    assert d.identify().extra == {"reply_crc32": True}
    with pytest.raises(
        DutProtocolError,
        match=r"results: expected a line ending ' \*' and its CRC-32, got "
        r"'m-results-\[0.125,0.875\]'",
    ):
        d.results()
    assert dut.commands == ["name", "profile", "crc32 on", "results"]


# -- the simulated ESP32 behind a byte-dropping link -----------------------------------------------


IAC, SB, SE, WILL, DONT = 255, 250, 240, 251, 254
TO_DUT, TO_HOST = "to DUT", "to host"


class _TelnetSplitter:
    """Separates the data of one direction of an RFC 2217 (Telnet) stream from its option
    negotiation, so a fault touches the serial bytes only."""

    def __init__(self) -> None:
        self.state, self.seq = "data", bytearray()

    def feed(self, chunk: bytes) -> tuple[bytes, bytes]:
        """(serial data, Telnet sequences) of `chunk`."""
        data, control = bytearray(), bytearray()
        for b in chunk:
            if self.state == "data":
                if b == IAC:
                    self.state, self.seq = "iac", bytearray([b])
                else:
                    data.append(b)
            elif self.state == "iac":
                if b == IAC:
                    data.append(IAC)
                    self.state = "data"
                elif b == SB or WILL <= b <= DONT:
                    self.seq.append(b)
                    self.state = "sb" if b == SB else "option"
                else:
                    control += self.seq + bytes([b])
                    self.state = "data"
            elif self.state == "option":
                control += self.seq + bytes([b])
                self.state = "data"
            else:  # inside a subnegotiation, up to IAC SE
                self.seq.append(b)
                if self.state == "sb_iac" and b == SE:
                    control += self.seq
                    self.state = "data"
                else:
                    self.state = "sb_iac" if self.state == "sb" and b == IAC else "sb"
        return bytes(data), bytes(control)


class LossyLink:
    """A TCP proxy on loopback between a client and a simulated board's RFC 2217 port. Serial data
    passes as units (a command up to its '%', a reply line up to its '\\n'), each through `faults`:
    callables (direction, unit) -> unit."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.faults: list[Callable[[str, bytes], bytes]] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"rfc2217://127.0.0.1:{self._server.getsockname()[1]}"

    def close(self) -> None:
        self._server.close()
        for s in self._sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            board = socket.create_connection(("127.0.0.1", self.upstream_port))
            for s in (client, board):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sockets += [client, board]
            threading.Thread(target=self._pump, args=(client, board, TO_DUT, b"%"), daemon=True).start()
            threading.Thread(target=self._pump, args=(board, client, TO_HOST, b"\n"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str, end: bytes) -> None:
        splitter, held = _TelnetSplitter(), b""
        try:
            while chunk := src.recv(65536):
                data, out = splitter.feed(chunk)
                held += data
                while (i := held.find(end)) >= 0:
                    unit, held = held[: i + 1], held[i + 1 :]
                    for fault in self.faults:
                        unit = fault(direction, unit)
                    out += unit.replace(b"\xff", b"\xff\xff")
                if out:
                    dst.sendall(out)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Drop:
    """Drops one byte, once: of the `nth` unit going `direction` that `pattern` finds, the byte at
    `index` (negative: from the end) or at index(unit)."""

    def __init__(self, direction: str, pattern: bytes, index: int | Callable[[bytes], int], nth: int = 1):
        self.direction, self.pattern, self.index, self.nth = direction, re.compile(pattern), index, nth
        self.seen = 0
        self.byte = b""
        self.dropped: tuple[bytes, bytes] | None = None  # (unit, what went on)

    def __call__(self, direction: str, unit: bytes) -> bytes:
        if self.dropped or direction != self.direction or not self.pattern.search(unit):
            return unit
        self.seen += 1
        if self.seen < self.nth:
            return unit
        i = self.index(unit) if callable(self.index) else self.index % len(unit)
        self.byte = unit[i : i + 1]
        self.dropped = (unit, unit[:i] + unit[i + 1 :])
        return self.dropped[1]


class Silence:
    """The DUT goes silent: nothing reaches the host from the first reply line `pattern` finds."""

    def __init__(self, pattern: bytes):
        self.pattern, self.since = re.compile(pattern), None

    def __call__(self, direction: str, unit: bytes) -> bytes:
        if direction == TO_HOST and self.since is None and self.pattern.search(unit):
            self.since = time.monotonic()
        return b"" if direction == TO_HOST and self.since is not None else unit


def digits_samples() -> np.ndarray:
    with np.load(REPO / "fixtures" / "datasets" / "digits.npz") as npz:
        x = npz["x_test"][:8]
    return quantize_input(ModelInfo.from_file(DIGITS), x.reshape(-1, 1, 64))[:, 0]


X = digits_samples()


@pytest.fixture(scope="module", params=["crc", "reference"])
def sim(request):
    """The simulated ESP32 (digits model, exactly 114 µs per inference: no jitter, 921600 baud) with the
    project's reply-CRC extension, or without it as MLPerf's reference firmware."""
    board = SimMcuBoard(
        f"esp32-{request.param}",
        family="esp32_devkitc",
        model_path=DIGITS,
        baud=921600,
        reply_crc=request.param == "crc",
        jitter_pct=0,
    )
    board.start()
    yield board
    board.stop()


@pytest.fixture(scope="module")
def proxied(sim, tmp_path_factory):
    proxy = LossyLink(sim.uart.port)
    d = DutSerial(
        proxy.url,
        board=sim.name,
        baud=921600,
        timeout_s=1.0,
        infer_timeout_s=1.0,
        log_path=tmp_path_factory.mktemp("logs") / f"{sim.name}-serial.log",
    )
    yield proxy, d
    d.close()
    proxy.close()


@pytest.fixture
def link(proxied, sim):
    """(proxy, driver) to the simulated board, no faults armed; the driver has just identified the DUT
    (which turned the CRC on where it is offered), so each test starts a session."""
    proxy, d = proxied
    proxy.faults = []
    assert d.identify().extra.get("reply_crc32", False) == sim.reply_crc
    return proxy, d


def test_both_firmwares_run_and_classify(link, sim):
    _, d = link
    run = d.run_timed(X[0], 100, 2)
    assert run.latencies_us[0] == pytest.approx(114.396, abs=0.01)
    assert run.extra["reply_crc32"] == sim.reply_crc
    rows = d.classify(X[:4])
    assert rows.shape == (4, 10) and np.array_equal(rows[0], run.outputs)
    assert ("crc32" in d.log_path.read_text()) == sim.reply_crc  # never sent to the reference firmware


def test_the_crc_comes_back_on_after_a_reset(link, sim):
    _, d = link
    if not sim.reply_crc:
        pytest.skip("the reference firmware has no CRC extension")
    turned_on = d.log_path.read_text().count("b'crc32 on%'")
    d.reset()
    assert d.run_timed(X[1], 10, 0).extra["reply_crc32"] is True
    assert d.log_path.read_text().count("b'crc32 on%'") == turned_on + 1


def test_a_digit_lost_on_the_way_to_the_dut_from_the_infer_count(link):
    proxy, d = link
    proxy.faults = [drop := Drop(TO_DUT, rb"^infer 8742 0%$", 6)]
    with pytest.raises(
        DutProtocolError,
        match=r"infer 8742 0: expected 'm-infer-start-8742' \(line 3 of the "
        r"reply\), got 'm-infer-start-742' \(full log: ",
    ):
        d.run_timed(X[0], 8742, 0)
    assert drop.dropped[1] == b"infer 742 0%"


def test_infer_1_0_arriving_as_infer_10_mid_run(link):
    proxy, d = link
    proxy.faults = [Drop(TO_DUT, rb"^infer 1 0%$", 7, nth=4)]
    with pytest.raises(
        DutProtocolError,
        match=r"infer 1 0: expected 'm-warmup-start-0' \(line 1 of the reply\), "
        r"got 'm-warmup-start-10'",
    ) as err:
        d.run_timed(X[0], 20, 0, per_inference=True)
    assert len(err.value.partial.latencies_us) == 3
    assert all(t == pytest.approx(114.4, abs=1) for t in err.value.partial.latencies_us)


@pytest.mark.parametrize("nth, stamp", [(1, "the clock sync's"), (2, "T0"), (3, "T1")])
@pytest.mark.parametrize("digit", [0, -1])
def test_a_digit_lost_from_a_stamp(link, sim, nth, stamp, digit):
    proxy, d = link
    start = len(b"m-lap-us-")

    def index(unit: bytes) -> int:
        digits = len(re.match(rb"m-lap-us-(\d+)", unit).group(1))
        return start + digit % digits

    proxy.faults = [drop := Drop(TO_HOST, rb"^m-lap-us-", index, nth=nth)]
    with pytest.raises(DutProtocolError) as err:
        d.run_timed(X[0], 1000, 0)
    assert drop.dropped is not None
    message = str(err.value)
    if sim.reply_crc:
        assert "expected a line ending ' *' and its CRC-32" in message
    else:
        assert re.search(r"a stamp is wrong|no leading zeros", message), message


def test_a_lost_point_in_a_results_line(link, sim):
    proxy, d = link
    proxy.faults = [Drop(TO_HOST, rb"^m-results-", lambda unit: unit.index(b"."))]
    with pytest.raises(DutProtocolError) as err:
        d.run_timed(X[2], 10, 0)
    assert ("CRC-32" if sim.reply_crc else "is not a number as the firmware prints one") in str(err.value)


def test_a_lost_digit_after_the_point_needs_the_crc(link, sim):
    """The limitation of the reference firmware: `0.25` that arrives as `0.2` is a well-formed number."""
    proxy, d = link
    truth = d.run_timed(X[2], 10, 0).outputs
    proxy.faults = [
        drop := Drop(TO_HOST, rb"^m-results-", lambda unit: re.search(rb"\.\d\d+", unit).end() - 1)
    ]
    if sim.reply_crc:
        with pytest.raises(DutProtocolError, match="CRC-32"):
            d.run_timed(X[2], 10, 0)
    else:
        wrong = d.run_timed(X[2], 10, 0).outputs
        assert drop.dropped is not None and not np.array_equal(wrong, truth)


def test_any_lost_byte_of_an_infer_reply_is_an_error_or_changes_nothing(link, sim):
    """Each byte of an `infer 1 0` reply's lines lost in turn: the run is a DutProtocolError, or (a lost
    '\\r') exactly what the clean run gave. Not swept: the results line's '\\n', whose loss joins it to
    m-ready, so the reply never ends (a DutTimeout, as for a silent DUT); and, without the CRC, the
    results line's digits (test_a_lost_digit_after_the_point_needs_the_crc)."""
    proxy, d = link
    d.upload(tensor_bytes(X[3]))
    seen: list[bytes] = []
    proxy.faults = [lambda direction, unit: seen.append(unit) or unit if direction == TO_HOST else unit]
    truth = d.infer(1, 0)
    reply = [u for u in seen if not u.startswith(b"m-ready")]
    assert [u[:9] for u in reply] == [
        b"m-warmup-",
        b"m-warmup-",
        b"m-infer-s",
        b"m-lap-us-",
        b"m-lap-us-",
        b"m-infer-d",
        b"m-results",
    ]
    positions = []  # (pattern, nth, index: from the end for a stamp's digits and after)
    for k, unit in enumerate(reply):
        pattern = rb"^m-lap-us-" if k in (3, 4) else b"^" + re.escape(unit) + b"$"
        nth = 2 if k == 4 else 1
        last = len(unit) - 1 if unit.startswith(b"m-results") else len(unit)
        for i in range(last):
            if unit.startswith(b"m-results") and not sim.reply_crc and unit[i : i + 1].isdigit():
                continue
            positions.append(
                (pattern, nth, i if i < 9 or not unit.startswith(b"m-lap-us-") else i - len(unit))
            )
    assert len(positions) >= 100
    outcomes = {"caught": 0, "unchanged": 0}
    for pattern, nth, index in positions:
        proxy.faults = [drop := Drop(TO_HOST, pattern, index, nth=nth)]
        try:
            run = d.infer(1, 0)
        except DutProtocolError:
            outcomes["caught"] += 1
        else:
            assert drop.byte == b"\r", f"{drop.dropped} was taken"
            assert np.array_equal(run.outputs, truth.outputs) and abs(run.elapsed_us - truth.elapsed_us) <= 1
            outcomes["unchanged"] += 1
        assert drop.dropped is not None
    assert outcomes == {"caught": len(positions) - 7, "unchanged": 7}  # the seven lines' '\\r'


def test_a_classification_that_loses_a_command_end_is_a_typed_error(link, sim):
    if sim.reply_crc:
        pytest.skip(
            "commands carry no CRC: the firmwares are alike here; once is enough (the unanswered "
            "command waits out its 5 s bound)"
        )
    proxy, d = link
    truth = d.classify(X[:5])
    proxy.faults = [Drop(TO_DUT, rb"^infer 1 0%$", 9, nth=3)]  # joins `infer 1 0` to the next `db load 64`
    with pytest.raises(DutProtocolError) as err:
        d.classify(X[:5])
    assert isinstance(err.value.partial, np.ndarray) and len(err.value.partial) < 5
    assert np.array_equal(err.value.partial, truth[: len(err.value.partial)])


def test_a_stop_mid_window_aborts_at_once_and_the_link_stays_in_step(link):
    _, d = link
    d.run_timed(X[0], 1000, 0)
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    t0 = time.monotonic()
    with pytest.raises(RunAborted, match="infer 8742 0: stopped from outside"):
        d.run_timed(X[0], 8742, 0, stop=stop)  # a 1 s window
    assert time.monotonic() - t0 < 0.45
    assert d.run_timed(X[1], 100, 0).latencies_us[0] == pytest.approx(114.396, abs=0.01)


def test_a_dut_silent_inside_a_10_s_window_is_reported_within_25_s(link, sim):
    if not sim.reply_crc:
        pytest.skip("the bound does not depend on the firmware; once is enough")
    proxy, d = link
    d.run_timed(X[0], 1000, 0)  # times 0.114 s: the time per inference is known
    count = int(10 / d.inference_s)
    proxy.faults = [silence := Silence(rb"^m-infer-start-")]
    t0 = time.monotonic()
    with pytest.raises(
        DutTimeout,
        match=rf"infer {count} 0: no reply within 20.\d+ s \(it should take 10.\d+ s\); "
        r"last line seen: 'm-warmup-done'",
    ) as err:
        d.run_timed(X[0], count, 0)
    assert 20 <= time.monotonic() - silence.since < 21 and time.monotonic() - t0 < 25
    assert err.value.partial is None
