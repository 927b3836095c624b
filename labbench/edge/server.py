"""The edge server: remote inference with a .tflite model on the host (LiteRT), over TCP.

It follows the seed paper's offload (§4.2.2): the device sends its input as raw bytes over TCP and
gets back a small reply with the class. Around that, a fixed header makes every request and reply
checkable, so that a damaged or misframed request gets an error reply naming what was wrong, never a
class computed from the wrong bytes.

Wire protocol, version 1. Integers are big-endian; CRCs are zlib.crc32 (CRC-32/ISO-HDLC).

    request = header (16 bytes, struct ">4sIII") + payload
        magic            4 bytes  b"LBQ1"
        request_id       u32      the client's, echoed in the reply
        payload_bytes    u32      length of the payload
        payload_crc32    u32      CRC of the payload
        payload          the model's input tensor as raw bytes, C order, little-endian: exactly the
                         input's size (float32[1, 784]: 3136 bytes; a CIFAR-10 uint8 image: 3072)

    reply = header (27 bytes, struct ">4sIBifIH" then ">I") + message
        magic            4 bytes  b"LBR1"
        request_id       u32      the request's, as the server read it
        status           u8       0 ok, 1 bad magic, 2 bad length, 3 bad CRC, 4 inference failed
        class_index      i32      the top-1 class; -1 unless ok
        top1_probability f32      the model's probability of that class; NaN unless ok
        server_us        u32      the server's time for the request, from its payload received in
                                  full to its reply (waiting for the model and the server's
                                  least service time, if it has one, included);
                                  0 for a request refused before inference
        message_bytes    u16      length of the message
        crc32            u32      CRC of the 23 header bytes before it followed by the message
        message          UTF-8; empty when ok, else what was wrong: what was seen, what was expected

A connection carries any number of requests, answered one at a time in order. After a bad magic or a
bad length the server cannot know where the next request starts: it replies, stops reading and closes
the connection (after a lingering close, as HTTP servers do, so that the reply is not lost to a reset).
After a bad CRC or a failed inference the connection stays usable.

Connections are served by a thread each (socketserver); one interpreter runs the inferences, one at a
time. The model must end in SOFTMAX, so that its output is a probability.
"""

from __future__ import annotations

import enum
import math
import socket
import socketserver
import struct
import threading
import time
import zlib
from contextlib import suppress
from pathlib import Path
from typing import Self

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from labbench.edge.timing import Waker
from labbench.modelinfo import ModelError, ModelInfo, TensorInfo

REQUEST = struct.Struct(">4sIII")
REPLY_HEAD = struct.Struct(">4sIBifIH")  # the reply's header up to its CRC
CRC32 = struct.Struct(">I")
REQUEST_MAGIC = b"LBQ1"
REPLY_MAGIC = b"LBR1"
LINGER_S = 1.0  # how long a connection closed for a framing error still drains what the client sends


class Status(enum.IntEnum):
    OK = 0
    BAD_MAGIC = 1
    BAD_LENGTH = 2
    BAD_CRC = 3
    INFERENCE_FAILED = 4


def request_bytes(request_id: int, payload: bytes) -> bytes:
    """A whole request: header and payload."""
    return REQUEST.pack(REQUEST_MAGIC, request_id, len(payload), zlib.crc32(payload)) + payload


def reply_bytes(
    request_id: int,
    status: Status,
    class_index: int = -1,
    top1_probability: float = math.nan,
    server_us: int = 0,
    message: str = "",
) -> bytes:
    """A whole reply: header (with its CRC) and message."""
    text = message.encode()[:0xFFFF]
    head = REPLY_HEAD.pack(
        REPLY_MAGIC, request_id, status, class_index, top1_probability, server_us, len(text)
    )
    return head + CRC32.pack(zlib.crc32(head + text)) + text


class EdgeModel:
    """A .tflite classifier on the LiteRT interpreter: input bytes -> (class, probability)."""

    def __init__(self, path: str | Path):
        self.info = ModelInfo.from_file(path)
        if len(self.info.inputs) != 1 or len(self.info.outputs) != 1:
            raise ModelError(
                f"{path}: an edge model has one input and one output, not "
                f"{len(self.info.inputs)} and {len(self.info.outputs)}"
            )
        if not self.info.ops or self.info.ops[-1] != "SOFTMAX":
            raise ModelError(
                f"{path}: an edge model ends in SOFTMAX (its output is a probability); "
                f"this one ends in {self.info.ops[-1] if self.info.ops else 'nothing'}"
            )
        self.input: TensorInfo = self.info.inputs[0]
        self._output = self.info.outputs[0]
        self._interpreter = Interpreter(model_path=str(path))
        self._interpreter.allocate_tensors()
        self._input_index = self._interpreter.get_input_details()[0]["index"]
        self._output_index = self._interpreter.get_output_details()[0]["index"]
        self._lock = threading.Lock()

    @property
    def input_bytes(self) -> int:
        return self.input.size_bytes

    def describe_input(self) -> str:
        """`float32[1, 784] (3136 bytes)`."""
        return f"{self.input.dtype}{list(self.input.shape)} ({self.input_bytes} bytes)"

    def classify(self, payload: bytes) -> tuple[int, float]:
        """The top-1 class of one input and its probability; ValueError if the output is not finite."""
        dtype = np.dtype(self.input.dtype)
        x = np.frombuffer(payload, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(self.input.shape)
        with self._lock:
            self._interpreter.set_tensor(self._input_index, x)
            self._interpreter.invoke()
            y = np.asarray(self._interpreter.get_tensor(self._output_index)).reshape(-1)
        if self._output.scale is not None:
            y = np.float32(self._output.scale) * (y.astype(np.int32) - (self._output.zero_point or 0))
        if not np.all(np.isfinite(y)):
            raise ValueError("the model's output is not finite (NaN or infinite inputs?)")
        k = int(np.argmax(y))
        return k, float(y[k])


class _TcpServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], model: EdgeModel, service_s: float):
        self.model, self.service_s = model, service_s
        self.waker = Waker(time.perf_counter)
        self.live: set[socket.socket] = set()
        self.live_lock = threading.Lock()
        super().__init__(address, _Handler)


class _Handler(socketserver.StreamRequestHandler):
    server: _TcpServer
    disable_nagle_algorithm = True

    def setup(self) -> None:
        super().setup()
        with self.server.live_lock:
            self.server.live.add(self.request)

    def finish(self) -> None:
        with self.server.live_lock:
            self.server.live.discard(self.request)
        super().finish()

    def handle(self) -> None:
        with suppress(OSError):
            while self._serve_one():
                pass

    def _serve_one(self) -> bool:
        """Read one request and reply to it; False when the connection is done."""
        header = self.rfile.read(REQUEST.size)
        if len(header) < REQUEST.size:
            return False  # closed by the client (between requests, or mid-header: nothing to answer)
        magic, request_id, length, crc = REQUEST.unpack(header)
        model = self.server.model
        if magic != REQUEST_MAGIC:
            return self._refuse(request_id, Status.BAD_MAGIC, f"magic {magic!r}, expected {REQUEST_MAGIC!r}")
        if length != model.input_bytes:
            return self._refuse(
                request_id,
                Status.BAD_LENGTH,
                f"payload of {length} bytes, the model's input is {model.describe_input()}",
            )
        payload = self.rfile.read(length)
        if len(payload) < length:
            return False  # closed by the client mid-payload
        received = time.perf_counter_ns()
        if zlib.crc32(payload) != crc:
            self.wfile.write(
                reply_bytes(
                    request_id,
                    Status.BAD_CRC,
                    message=(f"payload CRC-32 {zlib.crc32(payload):08X}, the header says {crc:08X}"),
                )
            )
            return True
        try:
            class_index, probability = model.classify(payload)
        except ValueError as exc:
            self.wfile.write(
                reply_bytes(
                    request_id, Status.INFERENCE_FAILED, server_us=_us_since(received), message=str(exc)
                )
            )
            return True
        if self.server.service_s:
            self.server.waker.until(received / 1e9 + self.server.service_s)
        self.wfile.write(reply_bytes(request_id, Status.OK, class_index, probability, _us_since(received)))
        return True

    def _refuse(self, request_id: int, status: Status, message: str) -> bool:
        """Reply to a request whose framing is lost, then close the connection without a reset."""
        self.wfile.write(reply_bytes(request_id, status, message=message))
        self.request.shutdown(socket.SHUT_WR)
        self.request.settimeout(LINGER_S)
        with suppress(TimeoutError):
            while self.rfile.read1(65536):
                pass
        return False


def _us_since(start_ns: int) -> int:
    return min((time.perf_counter_ns() - start_ns) // 1000, 0xFFFFFFFF)


class EdgeServer:
    """An edge server bound to host:port (0 picks a free port) serving one model.

    `start()` serves from a background thread, `serve_forever()` from the caller's; `stop()` stops
    accepting, cuts the open connections (their clients see the connection close) and waits for
    their threads. `service_s` is the least time a request takes, from its payload received to its
    reply (a slower server's, such as the seed paper's, §4.1); the reply's server_us includes it."""

    def __init__(
        self, model_path: str | Path, host: str = "127.0.0.1", port: int = 0, *, service_s: float = 0.0
    ):
        if service_s < 0:
            raise ValueError(f"a service time is >= 0, not {service_s}")
        self.model = EdgeModel(model_path)
        self._server = _TcpServer((host, port), self.model, service_s)
        self._serving = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def port(self) -> int:
        return self.address[1]

    def serve_forever(self) -> None:
        self._serving.set()
        self._server.serve_forever(poll_interval=0.1)

    def start(self) -> Self:
        self._serving.set()  # before the thread runs: a stop() right after start() still stops it
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.1,), name=f"edge-server:{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._serving.is_set():
            self._server.shutdown()
        with self._server.live_lock:
            for sock in self._server.live:
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
