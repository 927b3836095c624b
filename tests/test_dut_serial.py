"""The MLPerf Tiny DUT driver against a scripted DUT: a real TCP server reached over socket://.

The script answers like MLPerf's reference firmware unless a test swaps in a fault (a garbled
line, an error reply, a missing m-ready, a boot banner, a malformed stamp or result), so every
failure path of the driver runs through a real socket and pyserial.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable

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
from labbench.errors import DutProtocolError
from labbench.inventory import BoardEntry, SerialConn

READY = b"m-ready\r\n"
HANG_UP = b"<hang up>"  # a reply that makes the scripted DUT close the connection


class ScriptedDut:
    """Answers each %-terminated command with `respond(command)`, like the reference firmware by default.

    `delay_s` holds each reply back (a busy DUT), so a pipelining client fills its window;
    `outstanding` records, per command, the bytes the client had sent but the DUT had not answered.
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
                    if reply:
                        conn.sendall(reply)

    def reference(self, command: str) -> bytes:
        words = command.split()
        if command == "name":
            return b"m-name-dut-[scripted]\r\n" + READY
        if command == "profile":
            return b"m-profile-[ULPMark for tinyML Firmware V0.0.1]\r\nm-model-[ic01]\r\n" + READY
        if command == "timestamp":
            return f"m-lap-us-{int((time.monotonic() - self.t0) * 1e6)}\r\n".encode() + READY
        if words[:2] == ["db", "load"]:
            self.expected, self.loaded = int(words[2]), 0
            return f"m-[Expecting {self.expected} bytes]\r\n".encode() + READY
        if words[0] == "db":
            self.loaded += len(words[1]) // 2
            return (b"m-load-done\r\n" if self.loaded >= self.expected else b"") + READY
        if words[0] == "infer":
            n, w = int(words[1]), int(words[2])
            start = int((time.monotonic() - self.t0) * 1e6)
            return (
                f"m-warmup-start-{w}\r\nm-warmup-done\r\nm-infer-start-{n}\r\nm-lap-us-{start}\r\n"
                f"m-lap-us-{start + 250 * n}\r\nm-infer-done\r\nm-results-[0.125,0.875]\r\n"
            ).encode() + READY
        if command == "results":
            return b"m-results-[0.125,0.875]\r\n" + READY
        return f"e-[Unknown command: {words[0] if words else ''}]\r\n".encode() + READY


def replacing(
    pattern: str, reply: bytes | Callable[[str], bytes | None]
) -> Callable[[ScriptedDut, str], bytes | None]:
    """The reference script, except commands matching `pattern` get `reply`."""

    def respond(dut: ScriptedDut, command: str) -> bytes | None:
        if re.fullmatch(pattern, command):
            return reply(command) if callable(reply) else reply
        return ScriptedDut.reference(dut, command)

    return respond


@pytest.fixture
def dut_with():
    made: list[tuple[ScriptedDut, DutSerial]] = []

    def make(respond=None, delay_s: float = 0.0, **kwargs) -> tuple[ScriptedDut, DutSerial]:
        dut = ScriptedDut(respond, delay_s)
        kwargs.setdefault("timeout_s", 0.5)
        driver = DutSerial(dut.url, board="board7", **kwargs)
        made.append((dut, driver))
        return dut, driver

    yield make
    for dut, driver in made:
        driver.close()
        dut.close()


SAMPLE = np.arange(-50, 50, dtype=np.int8)  # 100 bytes: 3 chunks


# -- well-formed exchanges -------------------------------------------------------------------------


def test_identify_reads_name_and_profile_of_reference_firmware(dut_with):
    _, d = dut_with()
    ident = d.identify()
    assert (ident.name, ident.model, ident.firmware) == (
        "scripted",
        "ic01",
        "ULPMark for tinyML Firmware V0.0.1",
    )
    assert ident.model_sha256 is None and ident.extra == {}


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
    with pytest.raises(DutProtocolError, match=r"results: no m-results line: \['m-infer-done'\]"):
        d.results()


def test_nonsense_requests_are_refused_before_any_byte_is_sent(dut_with):
    dut, d = dut_with()
    with pytest.raises(ValueError, match="count >= 1"):
        d.run_timed(SAMPLE, 0, 0)
    with pytest.raises(ValueError, match="nothing to upload"):
        d.upload(b"")
    assert dut.commands == []


def test_from_lab_takes_the_inventory_entry():
    entry = BoardEntry(
        name="esp32",
        family="esp32_devkitc",
        serial=SerialConn(url="rfc2217://127.0.0.1:14001", baud=921600, timeout_s=2.5),
    )
    d = DutSerial.from_lab(entry)
    assert (d.url, d.board, d.baud, d.timeout_s) == ("rfc2217://127.0.0.1:14001", "esp32", 921600, 2.5)


def test_float64_samples_are_refused():
    with pytest.raises(TypeError, match="float64"):
        tensor_bytes(np.zeros(4))


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
        r"then 'm-name-dut-\[scrip' without a line end",
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

    def name(command: str) -> bytes:  # the first reply is an earlier session's tail, then the real one
        names.append(command)
        stale = b"m-lap-us-5\r\nm-infer-done\r\nm-results-[1]\r\n" + READY if len(names) == 1 else b""
        return stale + b"m-name-dut-[scripted]\r\n" + READY

    dut, d = dut_with(replacing("name", name))
    ident = d.identify()
    assert (ident.name, ident.model, ident.extra) == ("scripted", "ic01", {"name_retries": 1})
    assert dut.commands == ["name", "name", "profile"]


def test_name_is_retried_after_a_swallowed_command(dut_with):
    names = []

    def name(command: str) -> bytes:
        names.append(command)
        return (
            b"e-[Unknown command: db0102name]\r\n" + READY
            if len(names) == 1
            else b"m-name-dut-[ok]\r\n" + READY
        )

    _, d = dut_with(replacing("name", name))
    ident = d.identify()
    assert ident.name == "ok" and ident.extra == {"name_retries": 1}


def test_name_retries_are_bounded(dut_with):
    dut, d = dut_with(replacing("name", b"e-[Unknown command: x]\r\n" + READY))
    with pytest.raises(DutReplyError, match=r"name: e-\[Unknown command: x\]"):
        d.identify()
    assert dut.commands == ["name"] * 3


def test_a_profile_without_model(dut_with):
    _, d = dut_with(replacing("profile", b"m-profile-[x]\r\n" + READY))
    with pytest.raises(DutProtocolError, match="profile: no m-profile"):
        d.identify()


@pytest.mark.parametrize(
    "reply, problem",
    [
        (
            b"m-warmup-start-0\r\nm-warmup-done\r\nm-infer-start-1\r\nm-lap-us-5\r\nm-infer-done\r\nm-results-[1]\r\n",
            "expected two m-lap-us-N stamps",
        ),
        (b"m-lap-us-5\r\nm-lap-us-x9\r\nm-results-[1]\r\n", "expected two m-lap-us-N stamps"),
        (b"m-lap-us-5\r\nm-lap-us-9\r\n", "expected two m-lap-us-N stamps and one m-results line"),
        (
            b"m-lap-us-5\r\nm-lap-us-9\r\nm-results-[0.5,abc]\r\n",
            r"malformed results line 'm-results-\[0.5,abc\]'",
        ),
    ],
)
def test_malformed_infer_replies(dut_with, reply, problem):
    _, d = dut_with(replacing(r"infer .*", reply + READY))
    d.upload(b"\x01")
    with pytest.raises(DutProtocolError, match=f"board7: infer 3 0: {problem}"):
        d.infer(3, 0)


def test_a_timestamp_reply_without_a_stamp(dut_with):
    _, d = dut_with(replacing("timestamp", READY))
    with pytest.raises(DutProtocolError, match="timestamp: expected one m-lap-us-N stamp"):
        d.sync_clock()


def test_the_last_chunk_must_complete_the_load(dut_with):
    _, d = dut_with(replacing(r"db [0-9a-f]+", READY))
    with pytest.raises(DutProtocolError, match=r"db .*: no m-load-done in the reply"):
        d.upload(bytes(10))


def test_a_bad_row_mid_classification_keeps_the_rows_before(dut_with):
    calls = []

    def infer(command: str) -> bytes:
        calls.append(command)
        results = b"m-results-[oops]" if len(calls) == 3 else b"m-results-[0.25,0.75]"
        return b"m-lap-us-1\r\nm-lap-us-2\r\n" + results + b"\r\n" + READY

    _, d = dut_with(replacing(r"infer .*", infer))
    with pytest.raises(DutProtocolError, match="malformed results") as err:
        d.classify(np.stack([SAMPLE] * 5))
    assert err.value.partial.tolist() == [[0.25, 0.75]] * 2
    assert d.identify().name == "scripted"  # the replies in flight were collected: the link is in step


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
    count = []

    def infer(command: str) -> bytes | None:
        count.append(1)
        if len(count) == 4:
            return b"e-[Inference iterations must be >0]\r\n" + READY
        return None

    def respond(dut: ScriptedDut, command: str) -> bytes:
        return (command.startswith("infer") and infer(command)) or ScriptedDut.reference(dut, command)

    _, d = dut_with(respond)
    with pytest.raises(DutReplyError, match=r"infer 1 0: e-\[Inference iterations must be >0\]") as err:
        d.classify(np.stack([SAMPLE] * 6))
    assert err.value.partial.shape == (3, 2)


def test_an_error_mid_timed_run_keeps_the_inferences_before(dut_with):
    count = []

    def respond(dut: ScriptedDut, command: str) -> bytes:
        if command.startswith("infer"):
            count.append(1)
            if len(count) == 3:
                return b"e-[No model: flash erased]\r\n" + READY
        return ScriptedDut.reference(dut, command)

    _, d = dut_with(respond)
    with pytest.raises(DutReplyError, match="No model") as err:
        d.run_timed(SAMPLE, 5, 0, per_inference=True)
    assert err.value.partial.latencies_us == (250.0, 250.0)


# -- resets and timeouts ---------------------------------------------------------------------------


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
        DutTimeout, match="infer 1 0: no reply within 0.3 s; last line seen: 'm-warmup-done'$"
    ):
        d.infer(1, 0)
    assert time.monotonic() - t0 < 2


def test_a_dut_that_drops_the_connection_mid_reply(dut_with):
    _, d = dut_with(replacing(r"infer .*", HANG_UP))
    d.upload(b"\x01")
    with pytest.raises(
        DutProtocolError, match=r"^board7: infer 1 0: connection lost \(.*\); last line seen: 'm-ready'"
    ):
        d.infer(1, 0)


def test_a_port_that_cannot_be_opened():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        d = DutSerial(f"socket://127.0.0.1:{port}", board="board7", timeout_s=0.5)
        with pytest.raises(DutProtocolError, match=f"^board7: open socket://127.0.0.1:{port}: "):
            d.identify()


def test_reset_over_a_port_without_modem_lines_times_out(dut_with):
    _, d = dut_with()
    with pytest.raises(DutTimeout, match="reset: no boot banner within 0.5 s"):
        d.reset()
