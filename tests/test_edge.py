"""The edge server, its client and the link emulator, on loopback: real sockets, the real LiteRT model."""

from __future__ import annotations

import os
import signal
import socket
import socketserver
import statistics
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter
from pydantic import ValidationError

from labbench.edge.client import EdgeClient
from labbench.edge.link import Link, Shape, preset
from labbench.edge.server import REPLY_HEAD, REQUEST, EdgeServer, Status, reply_bytes, request_bytes
from labbench.errors import EdgeError, UsageError

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "fixtures" / "models"
SERVER_MODEL = MODELS / "mnist5k_mlp_fp32.tflite"  # the largest fixture model, until a server model is built
PAPER_SERVER_MS = 6.95  # seed 004 §4.1: the A100's time per CIFAR-10 request


@pytest.fixture(scope="module")
def samples() -> np.ndarray:
    with np.load(REPO / "fixtures" / "datasets" / "mnist5k.npz") as data:
        x: np.ndarray = data["x_test"][:200]
    return x


def run_in_process(model: Path, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Classes and top-1 probabilities from LiteRT run here, for comparison."""
    it = Interpreter(model_path=str(model))
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    scale, zero_point = out["quantization"]
    probabilities = []
    for x in inputs:
        it.set_tensor(inp["index"], x.reshape(inp["shape"]))
        it.invoke()
        y = it.get_tensor(out["index"]).reshape(-1)
        probabilities.append(scale * (y.astype(np.int32) - zero_point) if scale else y)
    p = np.array(probabilities)
    return p.argmax(axis=1), p.max(axis=1)


def quantize(model: Path, samples: np.ndarray) -> np.ndarray:
    """Inputs as the model takes them: int8 models get the quantized sample."""
    inp = Interpreter(model_path=str(model)).get_input_details()[0]
    scale, zero_point = inp["quantization"]
    x = samples if not scale else np.clip(np.round(samples / scale) + zero_point, -128, 127)
    return x.astype(inp["dtype"])


@pytest.fixture(scope="module")
def server() -> Iterator[EdgeServer]:
    with EdgeServer(SERVER_MODEL) as srv:
        yield srv


def exchange_raw(sock: socket.socket, request: bytes) -> tuple[tuple[object, ...], bytes]:
    """Send one request on a raw socket and return the reply's header fields and message."""
    sock.sendall(request)
    head = recv_exact(sock, REPLY_HEAD.size + 4)
    fields = REPLY_HEAD.unpack_from(head)
    return fields, recv_exact(sock, fields[-1])


def recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"connection closed after {len(data)} of {size} bytes"
        data += chunk
    return data


# -- the server and its client -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mnist5k_mlp_fp32", "mnist5k_mlp_int8"])
def test_classes_match_the_model_run_in_process(name: str, samples: np.ndarray) -> None:
    model = MODELS / f"{name}.tflite"
    inputs = quantize(model, samples)
    classes, probabilities = run_in_process(model, inputs)
    with EdgeServer(model) as srv, EdgeClient(*srv.address) as client:
        replies = [client.infer(x.tobytes()) for x in inputs]
    assert [r.class_index for r in replies] == classes.tolist()
    assert np.allclose([r.top1_probability for r in replies], probabilities, atol=1e-6)
    assert [r.request_id for r in replies] == list(range(1, len(inputs) + 1))
    for r in replies:
        assert 0 < r.server_us < r.rtt_s * 1e6 and r.network_s > 0


def test_concurrent_clients_each_get_their_own_classes(server: EdgeServer, samples: np.ndarray) -> None:
    classes, _ = run_in_process(SERVER_MODEL, samples)

    def work(worker: int) -> list[int]:
        with EdgeClient(*server.address) as client:
            return [client.infer(samples[i].tobytes()).class_index for i in range(worker, 200, 4)]

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(work, range(4))) == [classes[w::4].tolist() for w in range(4)]


def test_a_short_payload_is_refused_naming_the_input_the_model_needs(
    server: EdgeServer, samples: np.ndarray
) -> None:
    with EdgeClient(*server.address) as client:
        with pytest.raises(
            EdgeError,
            match=r"bad_length\): payload of 400 bytes, the model's input is "
            r"float32\[1, 784\] \(3136 bytes\)",
        ) as caught:
            client.infer(samples[0][:100].tobytes())
        assert f"edge server 127.0.0.1:{server.port}" in str(caught.value)
        assert "400-byte payload, CRC-32" in str(caught.value)  # what was sent
        assert client.infer(samples[0].tobytes()).class_index >= 0  # a new connection, and the server is fine


def test_a_bad_crc_is_refused_and_the_connection_stays_usable(
    server: EdgeServer, samples: np.ndarray
) -> None:
    payload = samples[0].tobytes()
    damaged = bytearray(request_bytes(7, payload))
    damaged[REQUEST.size + 100] ^= 0x01
    with socket.create_connection(server.address) as sock:
        (_, rid, status, cls, _, _, _), message = exchange_raw(sock, bytes(damaged))
        assert (rid, status, cls) == (7, Status.BAD_CRC, -1)
        assert message.decode() == (
            f"payload CRC-32 {zlib.crc32(damaged[REQUEST.size :]):08X}, "
            f"the header says {zlib.crc32(payload):08X}"
        )
        (_, rid, status, cls, _, _, _), _ = exchange_raw(sock, request_bytes(8, payload))
        assert (rid, status) == (8, Status.OK) and cls == run_in_process(SERVER_MODEL, samples[:1])[0][0]
    with EdgeClient(*server.address) as client, pytest.raises(EdgeError, match=r"refused \(bad_crc\)"):
        client.exchange(bytes(damaged), 7)


def test_a_wrong_magic_is_refused_and_the_reply_survives_the_close(server: EdgeServer) -> None:
    garbage = b"GET / HTTP/1.1\r\n" + bytes(
        100_000
    )  # far more than the server reads: no reset may eat the reply
    with (
        EdgeClient(*server.address) as client,
        pytest.raises(EdgeError, match=r"refused \(bad_magic\): magic b'GET ', expected b'LBQ1'"),
    ):
        client.exchange(garbage, int.from_bytes(b"/ HT"))  # the "request id" the server reads and echoes


def test_a_non_finite_input_gets_an_error_not_a_class(server: EdgeServer) -> None:
    with (
        EdgeClient(*server.address) as client,
        pytest.raises(EdgeError, match=r"inference_failed.*not finite"),
    ):
        client.infer(np.full(784, np.nan, dtype=np.float32).tobytes())


class _FakeServer(socketserver.ThreadingTCPServer):
    """Answers every request with the bytes `reply(request_id)` makes (None: never answers)."""

    daemon_threads = True

    def __init__(self, reply: Callable[[int], bytes | None]):
        fake = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                head = self.rfile.read(REQUEST.size)
                _, request_id, length, _ = REQUEST.unpack(head)
                self.rfile.read(length)
                if (answer := fake.reply(request_id)) is not None:
                    self.wfile.write(answer)
                    self.request.shutdown(socket.SHUT_WR)
                self.rfile.read()  # until the client goes

        self.reply = reply
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, args=(0.02,), daemon=True).start()


def _flip_class(request_id: int) -> bytes:
    reply = bytearray(reply_bytes(request_id, Status.OK, 3, 0.9, 100))
    reply[9 + 3] ^= 0x04  # class 3 -> 7, CRC unchanged
    return bytes(reply)


@pytest.mark.parametrize(
    "reply, seen",
    [
        (_flip_class, r"reply CRC-32 [0-9A-F]{8}, its header says"),
        (lambda rid: reply_bytes(rid + 1, Status.OK, 3, 0.9, 100), r"a reply to request 2"),
        (lambda rid: b"HTTP/1.1 400 Bad Request\r\n\r\n", r"reply magic b'HTTP', expected b'LBR1'"),
        (
            lambda rid: reply_bytes(rid, Status.OK)[:10],
            r"connection closed by the server after 10 of 27 reply bytes",
        ),
        (lambda rid: None, r"no answer within the 0.3 s timeout"),
    ],
)
def test_a_garbled_or_missing_reply_is_an_edge_error_never_a_class(
    reply: Callable[[int], bytes | None], seen: str
) -> None:
    fake = _FakeServer(reply)
    try:
        with EdgeClient("127.0.0.1", fake.server_address[1], timeout_s=0.3) as client:
            started = time.monotonic()
            with pytest.raises(EdgeError, match=seen):
                client.infer(bytes(16))
            assert time.monotonic() - started < 1.0
    finally:
        fake.shutdown()
        fake.server_close()


def test_a_server_stopped_mid_run_gives_a_typed_error_naming_it(samples: np.ndarray) -> None:
    classes, _ = run_in_process(SERVER_MODEL, samples)
    srv = EdgeServer(SERVER_MODEL).start()
    answered: list[int] = []
    failure: list[EdgeError] = []

    def run() -> None:
        with EdgeClient(*srv.address, timeout_s=2.0) as client:
            try:
                for i in range(100_000):
                    answered.append(client.infer(samples[i % 200].tobytes()).class_index)
            except EdgeError as exc:
                failure.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    while len(answered) < 20:
        time.sleep(0.01)
    srv.stop()
    worker.join(timeout=3.0)
    assert not worker.is_alive() and len(failure) == 1
    assert f"edge server 127.0.0.1:{srv.port}" in str(failure[0])
    assert answered == [classes[i % 200] for i in range(len(answered))]  # every answer before it was right


def test_a_server_stopped_with_a_request_in_flight(samples: np.ndarray) -> None:
    srv = EdgeServer(SERVER_MODEL).start()
    with Link(srv.address, "wifi") as link, EdgeClient(*link.address, timeout_s=2.0) as client:
        client.infer(samples[0].tobytes())
        link.set("up", latency_s=0.3)
        stopping = threading.Timer(0.1, srv.stop)
        stopping.start()
        started = time.monotonic()
        with pytest.raises(
            EdgeError, match=rf"edge server 127.0.0.1:{link.port}: request 2 .*closed by the server"
        ):
            client.infer(samples[1].tobytes())
        assert time.monotonic() - started < 1.0
        stopping.join()
    with pytest.raises(
        EdgeError, match=rf"edge server 127.0.0.1:{srv.port}: connect: ConnectionRefusedError"
    ):
        EdgeClient(*srv.address).infer(samples[0].tobytes())


def test_the_command_line_serves_until_interrupted(samples: np.ndarray) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "labbench.cli", "edge-server", "--model", str(SERVER_MODEL)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("edge server on 127.0.0.1:") and "float32[1, 784] (3136 bytes)" in line, line
        port = int(line.split(":")[1])
        with EdgeClient("127.0.0.1", port) as client:
            assert (
                client.infer(samples[0].tobytes()).class_index
                == run_in_process(SERVER_MODEL, samples[:1])[0][0]
            )
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.communicate()


# -- the link emulator -------------------------------------------------------------------------------


class _Echo(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                while data := self.request.recv(65536):
                    self.request.sendall(data)

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, args=(0.02,), daemon=True).start()


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    server = _Echo()
    yield "127.0.0.1", server.server_address[1]
    server.shutdown()
    server.server_close()


def round_trip_s(sock: socket.socket, size: int) -> float:
    started = time.monotonic()
    sock.sendall(bytes(size))
    recv_exact(sock, size)
    return time.monotonic() - started


def test_latency_is_added_each_way_and_can_change_at_run_time(echo: tuple[str, int]) -> None:
    with Link(echo) as link, socket.create_connection(link.address) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link.set(latency_s=0.02)
        both = statistics.median(round_trip_s(sock, 100) for _ in range(5))
        link.set("up", latency_s=0.0)
        down_only = statistics.median(round_trip_s(sock, 100) for _ in range(5))
    assert 0.040 <= both < 0.040 + 0.015
    assert 0.020 <= down_only < 0.020 + 0.015


def test_bandwidth_paces_the_bytes_and_is_booked_as_busy_time(echo: tuple[str, int]) -> None:
    size = 300_000
    with Link(echo) as link, socket.create_connection(link.address) as sock:
        link.set("up", bandwidth_bps=8e6)  # 1 MB/s: 0.3 s for the lot
        elapsed = round_trip_s(sock, size)
        (stats,) = link.connections()
    assert 0.3 <= elapsed < 0.3 * 1.3 + 0.05
    assert stats.up.delivered_bytes == stats.down.delivered_bytes == size
    assert stats.up.busy_s == pytest.approx(0.3) and stats.down.busy_s == 0
    assert stats.open and stats.up.retransmissions == 0


def test_loss_adds_delay_never_corruption(server: EdgeServer, samples: np.ndarray) -> None:
    classes, _ = run_in_process(SERVER_MODEL, samples[:20])
    with Link(server.address, seed=4) as link, EdgeClient(*link.address) as client:
        clean = [client.infer(samples[i].tobytes()).rtt_s for i in range(20)]
        link.set(loss=0.3, rto_s=0.02)
        replies = [client.infer(samples[i].tobytes()) for i in range(20)]
        (stats,) = link.connections()
    assert [r.class_index for r in replies] == classes.tolist()
    retransmissions = stats.up.retransmissions + stats.down.retransmissions
    assert retransmissions > 0
    assert sum(r.rtt_s for r in replies) >= sum(clean) + retransmissions * 0.02
    assert stats.up.delivered_bytes == 40 * (REQUEST.size + 3136)
    assert stats.down.delivered_bytes == 40 * (REPLY_HEAD.size + 4)


def test_settings_are_validated_and_presets_named() -> None:
    with pytest.raises(UsageError, match=r"unknown link preset 'lte' \(known: wifi, ble, ethernet\)"):
        Link(("127.0.0.1", 9), "lte")
    with Link(("127.0.0.1", 9), "wifi") as link:
        with pytest.raises(ValidationError, match="latncy_s"):
            link.set(latncy_s=0.1)  # a typo
        with pytest.raises(ValidationError, match="loss"):
            link.set(loss=1.0)
        assert link.shape("up") == preset("wifi").up


def test_an_upstream_that_is_down_closes_the_client(samples: np.ndarray) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nobody = s.getsockname()  # bound, not listening: connections are refused
        with (
            Link(nobody) as link,
            pytest.raises(EdgeError, match=rf"edge server 127.0.0.1:{link.port}: request 1"),
        ):
            EdgeClient(*link.address, timeout_s=1.0).infer(samples[0].tobytes())


def paper_exchange_s(preset: str, count: int, image_bytes: int = 3072, answer_bytes: int = 2) -> float:
    """The paper's offload (§4.2.2) through a `preset` link to a server that answers at once: the raw image
    sent, a 2-byte class back. The median round trip over `count` exchanges on one connection."""
    server = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(count):
                recv_exact(conn, image_bytes)
                conn.sendall(bytes(answer_bytes))

    threading.Thread(target=answer, daemon=True).start()
    with server, Link(server.getsockname(), preset) as link, socket.create_connection(link.address) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for _ in range(count):
            started = time.monotonic()
            sock.sendall(bytes(image_bytes))
            recv_exact(sock, answer_bytes)
            times.append(time.monotonic() - started)
    return statistics.median(times)


def test_wifi_reproduces_the_papers_cifar10_offload(server: EdgeServer, samples: np.ndarray) -> None:
    """Seed 004 Table 3: 9.68 ms for a CIFAR-10 image on the Raspberry Pi, 6.95 ms of it the server's."""
    network_ms = paper_exchange_s("wifi", count=30) * 1e3
    assert network_ms + PAPER_SERVER_MS == pytest.approx(9.68, rel=0.10)
    with (
        Link(server.address, "wifi") as link,
        EdgeClient(*link.address) as client,
    ):  # the bench's own protocol
        network_ms = statistics.median(client.infer(samples[i].tobytes()).network_s for i in range(30)) * 1e3
    assert network_ms + PAPER_SERVER_MS == pytest.approx(9.68, rel=0.10)


def test_ble_reproduces_the_papers_transmission_time() -> None:
    """Seed 004 §4.2.1: 177.13 ms over BLE for the CIFAR-10 image and its 2-byte answer (Wi-Fi: 2.65 ms)."""
    assert paper_exchange_s("ble", count=2) * 1e3 == pytest.approx(177.13, rel=0.10)


def test_the_presets_reproduce_the_papers_figures_on_paper() -> None:
    """The arithmetic of the derivation (labbench.edge.link), with no timing noise."""

    def offload_ms(shape: Shape, image_bytes: int, server_ms: float) -> float:
        return (2 * shape.latency_s + shape.serialisation_s(image_bytes + 2)) * 1e3 + server_ms

    wifi, ble = preset("wifi").up, preset("ble").up
    assert offload_ms(wifi, 3072, 6.95) == pytest.approx(9.68, rel=0.005)  # Table 3, CIFAR-10
    assert offload_ms(wifi, 224 * 224 * 3, 5.08) == pytest.approx(28.74, rel=0.005)  # Table 3, ImageNet-1K
    assert offload_ms(ble, 3072, 0) == pytest.approx(177.13, rel=0.005)  # §4.2.1
