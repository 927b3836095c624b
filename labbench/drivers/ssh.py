"""Linux boards over SSH: deploy a model and the runner, run it, stream the results back.

The connection (host keys, bounded commands and transfers, the per-board log) is
labbench.drivers.sshconn's; this module is the runner target on top of it. Deployment goes to
`<home>/<remote_dir>/` on the board (one directory per lab):

    runner.py  models/<model file>  datasets/<dataset file>  deployment.json

Stream. The runner (labbench/remote/runner.py has the format) writes one record per line, each
ending in ` *XXXXXXXX`, the zlib CRC-32 of its JSON text in upper-case hex. No record is believed
before it passed every check:
- its tag matches; its fields are exactly those of its type, integers where integers belong;
- the start record has the runner's PROTOCOL, the deployed model's sha256, the input's sha256 (of
  dtype, shape and bytes: classify runs exactly the samples sent), the count and warmup asked for,
  and an output length equal to the model's (read from the .tflite on the host at deploy);
- inferences are numbered 0, 1, ... without gaps or repeats, exactly `count` of them come before the
  end record, nothing after it; latencies are positive, and each inference fits between the stamp
  before it and its own (t_ns - latency_ns >= the previous stamp, for the first the start record's),
  so stamps are monotonic and a window is at least as long as its inferences;
- outputs (each classify row, timed's last) are the model's output length of finite numbers;
- the board's clock agrees with the host's: no stamp lies further after the runner's first stamp
  than the host time since it sent the command x (1 + clock_tolerance_ppm) + CLOCK_SLACK_S (the
  board cannot see more time pass than the host); and the host's wall time of the command exceeds the
  board's by at most `link_overhead_s` (session and interpreter start, line latency, host delays)
  plus the bytes sent and received at `link_min_bytes_per_s` (a slow link delays the stream).
A record that fails is a RemoteStreamError; the records that passed before it are its `.partial`.
SSH's own MAC already turns bytes changed on the link into a dropped connection: these checks catch a
board, a runtime or a runner that misbehaves.

Host times. Each record's arrival bounds the clocks' offset (arrival - stamp >= the true offset); the
smallest bound puts a TimedRun's `host_start`/`host_end` (the board's window) on time.monotonic().

Timeouts. The start record is due within `command_timeout_s` of silence (interpreter, model load,
cold start). After it, each record is due within max(2 x E, E + EXPECTED_SLACK_S) of the last, E
being the board's time per inference (this run's so far, else the last run's of this deployment,
else the cold start's inference) x the inferences it covers (the warmup too for the first timed
one); later silence is a RemoteTimeout carrying the completed inferences. Other commands may be
silent for `command_timeout_s`; transfers are bounded as sshconn says.

Hierarchical inference (HiTarget). `hi_configure(decision, server)` checks and keeps the decision's
device form and the edge server's (host, port) as the board reaches it; `hi_run(samples)` runs the
runner's `hi` (samples sent as classify sends them) and checks each record besides the above: the
start record echoes the decision and the server; samples are numbered 0, 1, ...; 0 <= p2 <= p1 <= 1;
`accept` is the decision recomputed on the host from the record's p1 and p2 (the same float
arithmetic); local is a class of the model's (-1, with p1 = p2 = 0 and no local time, in remote
mode), final one too and equal to local when accepted; t_off_ns is 0 exactly when accepted,
server_us 0 when accepted and within t_off_ns when not. An error record (the runner's offload failed)
is an EdgeError naming the board, the server's host:port and the sample; the runner gives up on a
silent server after the configured timeout, and the host allows each record that much more time.

Stopping. `run_timed`, `classify` and `hi_run` take `stop` (a threading.Event): once it is set, the
run ends within sshconn.POLL_S with RunAborted carrying `.partial`. The channel is closed, which ends the
runner at its next write.

Log. The connection's (`log_path`, default `reports/logs/<board>-ssh.log`; `from_lab(log_dir=...)`
puts it elsewhere): commands, SFTP puts, the runner's output lines and events.

Errors name the board, the command, what was expected and what was seen, and the log:
RemoteStreamError (a record failed a check), RemoteTimeout (silence past its bound), RemoteRunError
(their base; also a lost connection or the runner's exit status with its stderr), each with
`completed`/`expected` and the inferences that passed as `.partial`; RunAborted (`stop`), with
`.partial`; RemoteError for the rest (connection, host key, transfers).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import posixpath
import re
import shlex
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from labbench.capabilities import DutIdentity, HiRun, InstallRecord, TimedRun
from labbench.drivers.sshconn import SshConnection
from labbench.errors import EdgeError, RemoteError, RunAborted, UsageError
from labbench.modelinfo import ModelInfo
from labbench.steps import step

if TYPE_CHECKING:
    from labbench.catalog import BoardFamily
    from labbench.inventory import BoardEntry

RUNNER = resources.files("labbench.remote") / "runner.py"
DEPLOYMENT_FILE = "deployment.json"
EXPECTED_SLACK_S = 5.0  # a record is due within max(2 x expected, expected + 5 s)
CLOCK_SLACK_S = 0.001  # float rounding of host and board stamps
OFFLOAD_TIMEOUT_S = 5.0  # the runner's default bound on one offload, its reconnection included
# The device forms of labbench.strategies.decision (not imported: it brings scikit-learn along).
DECISION_FIELDS = {"logistic": ("w1", "w2", "b"), "threshold": ("theta",), "remote": ()}
_TAG = re.compile(rb"(.*) \*([0-9A-F]{8})", re.DOTALL)
_TIMED = re.compile(
    rb'\{"type":"inference","i":(0|[1-9][0-9]*),"t_ns":(0|[1-9][0-9]*),"latency_ns":(0|[1-9][0-9]*)\}'
)

_T = TypeVar("_T")


def _runner_protocol() -> int:
    """The runner's stream format (its `PROTOCOL = N` line), read without importing it."""
    m = re.search(r"^PROTOCOL = (\d+)", RUNNER.read_text(), re.MULTILINE)
    if m is None:
        raise ImportError(f"{RUNNER} has no PROTOCOL line")
    return int(m[1])


PROTOCOL = _runner_protocol()


class RemoteRunError(RemoteError):
    """A remote run broke off: `completed` of `expected` inferences came back, kept in `partial`
    (a TimedRun for run_timed, the output rows for classify)."""

    def __init__(
        self,
        target: str,
        action: str,
        seen: str,
        completed: int,
        expected: int,
        partial: object,
        log: str | None = None,
    ):
        super().__init__(target, action, seen, log)
        self.completed, self.expected, self.partial = completed, expected, partial


class RemoteStreamError(RemoteRunError):
    """A runner record failed a check: malformed, out of sequence, or at odds with the host's clock."""


class RemoteTimeout(RemoteRunError):
    """The runner fell silent for longer than its bound."""


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _array_digest(a: np.ndarray) -> str:
    """The runner's `input_sha256`: sha256 of the dtype string, the shape and the C-order bytes."""
    a = np.ascontiguousarray(a)
    return hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + a.tobytes()).hexdigest()


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(a), allow_pickle=False)
    return buf.getvalue()


def _output_length(model: Path) -> int | None:
    """Values in the model's output as the host reads the file (.tflite); None for other formats."""
    if model.suffix != ".tflite":
        return None
    return int(np.prod(ModelInfo.from_file(model).outputs[0].shape))


def _show(data: object, limit: int = 200) -> str:
    text = repr(data)
    return text if len(text) <= limit else text[:limit] + "..."


class _Mismatch(Exception):
    """A record that is not what the run calls for."""

    def __init__(self, expected: str, seen: str):
        super().__init__(expected, seen)
        self.expected, self.seen = expected, seen


@dataclass(frozen=True)
class _Want:
    """What a run must bring back."""

    mode: str  # "timed", "classify" or "hi"
    count: int
    warmup: int
    input_sha256: str
    model_sha256: str
    outputs: int | None  # the model's output length as the host read it, if it could
    decision: dict[str, Any] | None = None  # hi's
    server: str | None = None  # hi's, "host:port"
    offload_timeout_s: float = 0.0  # hi's: the runner may wait this long for the server


class _OffloadFailed(Exception):
    """The runner's error record: an offload failed."""

    def __init__(self, record: dict[str, Any]):
        super().__init__(record)
        self.record = record


_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "int": (lambda v: type(v) is int and v >= 0, "an integer >= 0"),
    "positive": (lambda v: type(v) is int and v > 0, "an integer > 0"),
    "ms": (lambda v: type(v) in (int, float) and math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "text": (lambda v: type(v) is str, "a string"),
    "list": (lambda v: type(v) is list, "a list"),
    "dict": (lambda v: type(v) is dict, "an object"),
    "bool": (lambda v: type(v) is bool, "true or false"),
    "class": (lambda v: type(v) is int and v >= -1, "an integer >= -1"),
    "p": (lambda v: type(v) in (int, float) and 0 <= v <= 1, "a number in [0, 1]"),
}
_START = {
    "protocol": "int",
    "t0_ns": "int",
    "t_ns": "int",
    "count": "int",
    "warmup": "int",
    "outputs": "positive",
    "model_sha256": "text",
    "input_sha256": "text",
    "runtime": "text",
    "runtime_version": "text",
    "load_ms": "ms",
    "cold_start_ms": "ms",
    "first_latency_ns": "positive",
}
_INFERENCE = {"i": "int", "t_ns": "int", "latency_ns": "int"}
_END = {"count": "int", "t_ns": "int", "peak_rss_kib": "int"}
_INFO = {
    "protocol": "int",
    "hostname": "text",
    "board_model": "text",
    "machine": "text",
    "python": "text",
    "runtime": "text",
    "runtime_version": "text",
    "model_sha256": "text",
}
_OUTPUT = {"output": "list"}
_HI_START = {"decision": "dict", "server": "text"}
_HI = {
    "i": "int",
    "p1": "p",
    "p2": "p",
    "accept": "bool",
    "local": "class",
    "final": "int",
    "t_inf_ns": "int",
    "t_dec_ns": "int",
    "t_off_ns": "int",
    "server_us": "int",
    "t_ns": "int",
}
_ERROR = {"i": "int", "server": "text", "what": "text"}
_PROGRESS = {"i": "int", "t_ns": "int"}
HEARTBEAT_S = 1.0  # the runner's hi pass writes a progress record at least this often


def _record(line: bytes, kinds: dict[str, dict[str, str]], what: str) -> dict[str, Any]:
    """A tagged line -> its record, of one of the types in `kinds`, after the tag and the fields were
    checked."""
    m = _TAG.fullmatch(line)
    if m is None or zlib.crc32(m[1]) != int(m[2], 16):
        raise _Mismatch("a record ending in its CRC-32 tag ` *XXXXXXXX`", _show(line))
    try:
        record = json.loads(m[1])
    except ValueError:
        record = None
    if not isinstance(record, dict):
        raise _Mismatch(f"{what} (a JSON object)", _show(m[1]))
    kind = record.get("type")
    if kind not in kinds:
        raise _Mismatch(what, f"a {kind!r} record: {_show(m[1])}")
    fields = kinds[kind]
    if set(record) != {"type", *fields}:
        raise _Mismatch(f"{what} with the fields type, {', '.join(fields)}", _show(m[1]))
    for key, kind_of in fields.items():
        ok, text = _KINDS[kind_of]
        if not ok(record[key]):
            raise _Mismatch(f"{what}: {key} {text}", _show(record[key]))
    return record


def _accepts(decision: dict[str, Any], p1: float, p2: float) -> bool:
    """The decision on p1 >= p2, computed as the runner does (the same float operations in order)."""
    if decision["kind"] == "logistic":
        return bool(decision["w1"] * p1 + decision["w2"] * p2 + decision["b"] >= 0)
    return bool(decision["kind"] == "threshold" and p1 >= decision["theta"])


def _device_decision(decision: dict[str, Any]) -> dict[str, Any]:
    """A decision's device form with its coefficients as floats; ValueError if it is not one."""
    fields = DECISION_FIELDS.get(str(decision.get("kind")))
    if fields is None or set(decision) != {"kind", *fields}:
        raise ValueError(
            f"a decision is {{'kind': 'logistic', 'w1', 'w2', 'b'}}, {{'kind': 'threshold', 'theta'}} "
            f"or {{'kind': 'remote'}}: got {decision}"
        )
    values = [decision[f] for f in fields]
    if not all(type(v) in (int, float) and math.isfinite(v) for v in values):
        raise ValueError(f"decision coefficients must be finite numbers: got {decision}")
    return {"kind": decision["kind"]} | {f: float(v) for f, v in zip(fields, values, strict=True)}


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _values(values: list[Any], n: int, what: str) -> None:
    if len(values) != n:
        raise _Mismatch(f"{what}: {n} output values (the model's output length)", f"{len(values)} values")
    for j, v in enumerate(values):
        if type(v) not in (int, float) or not math.isfinite(v):
            raise _Mismatch(f"{what}: output {j} a finite number", _show(v))


class _Records:
    """A runner's stream, checked record by record as it arrives (see the module docstring)."""

    def __init__(
        self,
        want: _Want,
        sent_s: float,
        tolerance: float,
        overhead_s: float,
        min_bytes_per_s: float,
        prior_s: float | None,
        bytes_sent: int,
    ):
        self.want, self.sent_s, self.tolerance = want, sent_s, tolerance
        self.overhead_s, self.min_bytes_per_s, self.prior_s = overhead_s, min_bytes_per_s, prior_s
        self.start: dict[str, Any] | None = None
        self.end: dict[str, Any] | None = None
        self.lines = 0
        self.bytes = bytes_sent
        self.t_ns: list[int] = []
        self.latency_ns: list[int] = []
        self.outputs: list[list[float]] = []  # classify's rows
        self.samples: list[dict[str, Any]] = []  # hi's records
        self._done = 0  # hi: samples the last progress record said were done
        self.offset_s = math.inf  # least (host arrival - board stamp) seen: the clocks' offset, bounded
        self._t0_ns = self._prev_ns = 0
        self._start_ns = self._first_latency_ns = self._outputs = 0  # from the start record

    def feed(self, line: bytes, arrived: float) -> None:
        self.lines += 1
        self.bytes += len(line) + 1
        if self.start is not None and self.end is None and self.want.mode == "timed":
            m = _TAG.fullmatch(line)  # the bulk of a timed run, checked without the JSON parser
            fast = _TIMED.fullmatch(m[1]) if m else None
            if m and fast and zlib.crc32(m[1]) == int(m[2], 16):
                self._inference(int(fast[1]), int(fast[2]), int(fast[3]), arrived)
                return
        if self.end is not None:
            raise _Mismatch("nothing after the end record", _show(line))
        timed, hi, n = self.want.mode == "timed", self.want.mode == "hi", len(self.t_ns)
        if self.start is None:
            start = _START | (_HI_START if hi else {})
            self._start(_record(line, {"start": start}, "the start record"), arrived)
        elif n == self.want.count:
            self._end(_record(line, {"end": _END | (_OUTPUT if timed else {})}, "the end record"), arrived)
        elif hi:
            r = _record(line, {"hi": _HI, "error": _ERROR, "progress": _PROGRESS}, f"sample {n}")
            self._progress(r, arrived) if r["type"] == "progress" else self._sample(r, arrived)
        else:
            r = _record(line, {"inference": _INFERENCE | ({} if timed else _OUTPUT)}, f"inference {n}")
            self._inference(r["i"], r["t_ns"], r["latency_ns"], arrived, r.get("output"))

    def _start(self, r: dict[str, Any], arrived: float) -> None:
        w = self.want
        wanted = {
            "protocol": PROTOCOL,
            "model_sha256": w.model_sha256,
            "input_sha256": w.input_sha256,
            "count": w.count,
            "warmup": w.warmup,
        }
        wanted |= {"outputs": w.outputs} if w.outputs else {}
        wanted |= {"decision": w.decision, "server": w.server} if w.mode == "hi" else {}
        for key, value in wanted.items():
            if r[key] != value:
                raise _Mismatch(f"the start record: {key} {value!r}", _show(r[key]))
        if r["t_ns"] < r["t0_ns"]:
            raise _Mismatch(f"the start record: t_ns >= t0_ns ({r['t0_ns']})", str(r["t_ns"]))
        self.start, self._t0_ns, self._prev_ns = r, r["t0_ns"], r["t_ns"]
        self._start_ns, self._first_latency_ns, self._outputs = r["t_ns"], r["first_latency_ns"], r["outputs"]
        self._clock(r["t_ns"] + r["first_latency_ns"], arrived, "the start record's first inference")

    def _inference(
        self, i: int, t_ns: int, latency_ns: int, arrived: float, output: list[Any] | None = None
    ) -> None:
        n = len(self.t_ns)
        if n == self.want.count:
            raise _Mismatch(f"the end record after {n} inferences", f"inference {i}")
        if i != n:
            raise _Mismatch(f"inference {n}", f"inference {i} ({'a repeat' if i < n else 'a gap'})")
        if latency_ns <= 0:
            raise _Mismatch(f"inference {i}: latency_ns > 0", str(latency_ns))
        if t_ns - latency_ns < self._prev_ns:
            raise _Mismatch(
                f"inference {i} to start at or after the stamp before it ({self._prev_ns} ns)",
                f"t_ns {t_ns} - latency_ns {latency_ns} = {t_ns - latency_ns}",
            )
        self._clock(t_ns, arrived, f"inference {i}")
        if output is not None:
            _values(output, self._outputs, f"inference {i}")
            self.outputs.append(output)
        self.t_ns.append(t_ns)
        self.latency_ns.append(latency_ns)
        self._prev_ns = t_ns

    def _progress(self, r: dict[str, Any], arrived: float) -> None:
        """A hi pass's sign of life: the samples it has done, before it reports them."""
        if n := len(self.t_ns):
            raise _Mismatch(f"sample {n}", f"a progress record after the samples' records began: {r}")
        if not self._done <= r["i"] <= self.want.count:
            raise _Mismatch(f"progress at {self._done} to {self.want.count} samples done", str(r["i"]))
        self._clock(r["t_ns"], arrived, f"progress at sample {r['i']}")
        self._done = r["i"]

    def _sample(self, r: dict[str, Any], arrived: float) -> None:
        """One hi record (see the module docstring); an error record for this sample is _OffloadFailed."""
        n, decision = len(self.t_ns), self.want.decision or {}
        if r["i"] != n:
            raise _Mismatch(f"sample {n}", f"sample {r['i']} ({'a repeat' if r['i'] < n else 'a gap'})")
        if r["type"] == "error":
            if r["server"] != self.want.server:
                raise _Mismatch(f"sample {n}: the error record from server {self.want.server}", r["server"])
            raise _OffloadFailed(r)
        for expected, ok in self._sample_checks(
            r, decision.get("kind") == "remote", _accepts(decision, r["p1"], r["p2"])
        ):
            if not ok:
                raise _Mismatch(f"sample {n}: {expected}", _show({k: v for k, v in r.items() if k != "type"}))
        span = r["t_inf_ns"] + r["t_dec_ns"] + r["t_off_ns"]
        self._inference(n, r["t_ns"], span, arrived)
        self.samples.append(r)

    def _sample_checks(self, r: dict[str, Any], remote: bool, accept: bool) -> list[tuple[str, bool]]:
        """(what a hi record must be, whether it is), in order."""
        classes = self._outputs
        offloaded = not r["accept"]
        server_s, offload_s = r["server_us"] / 1e6, r["t_off_ns"] / 1e9
        local = (
            [
                (
                    "p1 = p2 = 0, local -1, no local time (remote mode)",
                    r["p1"] == r["p2"] == 0 and r["local"] == -1 and r["t_inf_ns"] == r["t_dec_ns"] == 0,
                )
            ]
            if remote
            else [
                (f"local a class in [0, {classes})", 0 <= r["local"] < classes),
                ("t_inf_ns > 0", r["t_inf_ns"] > 0),
            ]
        )
        return [
            ("p1 >= p2", r["p1"] >= r["p2"]),
            (f"accept {accept} (the decision on its p1 and p2)", r["accept"] == accept),
            *local,
            (f"final a class in [0, {classes})", 0 <= r["final"] < classes),
            ("final = local when accepted", offloaded or r["final"] == r["local"]),
            ("t_off_ns > 0 exactly when offloaded", (r["t_off_ns"] > 0) == offloaded),
            ("server_us 0 when accepted", offloaded or r["server_us"] == 0),
            (
                "the server's time within the offload's",
                server_s <= offload_s * (1 + self.tolerance) + CLOCK_SLACK_S,
            ),
        ]

    def host_window(self) -> tuple[float, float] | None:
        """The board's span from the first inference's (sample's) start to the last's end, on the host
        clock; None before any."""
        if not self.t_ns:
            return None
        start = (self.t_ns[0] - self.latency_ns[0]) / 1e9 + self.offset_s
        return start, self.t_ns[-1] / 1e9 + self.offset_s

    def _end(self, r: dict[str, Any], arrived: float) -> None:
        if r["count"] != self.want.count:
            raise _Mismatch(f"the end record: count {self.want.count}", str(r["count"]))
        if r["t_ns"] < self._prev_ns:
            raise _Mismatch(f"the end record: t_ns >= the last inference's ({self._prev_ns})", str(r["t_ns"]))
        self._clock(r["t_ns"], arrived, "the end record")
        if "output" in r:
            _values(r["output"], self._outputs, "the end record")
        host_s, board_s = arrived - self.sent_s, (r["t_ns"] - self._t0_ns) / 1e9
        allowed_s = board_s * (1 + self.tolerance) + self.overhead_s + self.bytes / self.min_bytes_per_s
        if host_s > allowed_s:
            raise _Mismatch(
                f"the command to take at most {allowed_s:.3f} s of host time (the board's "
                f"{board_s:.3f} s + the link's overhead for {self.bytes} bytes)",
                f"{host_s:.3f} s",
            )
        self.end = r

    def _clock(self, t_ns: int, arrived: float, what: str) -> None:
        """The board cannot see more time pass since its runner started than the host since it sent
        the command."""
        board_s, host_s = (t_ns - self._t0_ns) / 1e9, arrived - self.sent_s
        if board_s > host_s * (1 + self.tolerance) + CLOCK_SLACK_S:
            raise _Mismatch(
                f"{what} at most {host_s:.6f} s after the runner's first stamp (the host's "
                f"time since it sent the command, x (1 + tolerance) + {CLOCK_SLACK_S:g} s)",
                f"{board_s:.6f} s on the board's clock",
            )
        self.offset_s = min(self.offset_s, arrived - t_ns / 1e9)

    def per_inference_s(self) -> float:
        """The board's time per inference: this run's so far, else the prior, else the cold start's."""
        n = len(self.t_ns)
        if n:
            done = n + (self.want.warmup + 1 if self.want.mode == "timed" else 0)
            return (self.t_ns[-1] - self._start_ns) / 1e9 / done
        return self.prior_s or self._first_latency_ns / 1e9

    def due_s(self) -> float | None:
        """Board seconds the next record should take after the last; None before the start record."""
        if self.start is None:
            return None
        n = len(self.t_ns)
        if n == self.want.count:
            return 0.0
        if self.want.mode == "hi" and n == 0:
            return HEARTBEAT_S  # a pass holds its records until done, and says it is alive meanwhile
        ahead = 1 + (self.want.warmup if n == 0 and self.want.mode == "timed" else 0)
        return ahead * self.per_inference_s()


class SshBoard(SshConnection):
    """A Linux board reached over SSH: Deployer and InferenceTarget (see the module docstring)."""

    def __init__(
        self,
        board: str,
        host: str,
        port: int | None = None,
        user: str | None = None,
        key: Path | None = None,
        known_hosts: Path | None = None,
        trust_on_first_use: bool = False,
        connect_timeout_s: float = 10.0,
        command_timeout_s: float = 120.0,
        power_mode: str | None = None,
        remote_dir: str = "labbench/default",
        python: str = "python3",
        ssh_config: Path | None = Path("~/.ssh/config"),
        family: str | None = None,
        log_path: str | Path | None = None,
        transfer_stall_s: float = 15.0,
        transfer_timeout_s: float = 600.0,
        clock_tolerance_ppm: float = 1000.0,
        link_overhead_s: float = 10.0,
        link_min_bytes_per_s: float = 10_000.0,
    ):
        """`clock_tolerance_ppm` bounds how far the board's and the host's clocks may disagree in rate
        (NTP slews CLOCK_MONOTONIC by up to 500 ppm)."""
        super().__init__(
            board,
            host,
            port,
            user,
            key,
            known_hosts,
            trust_on_first_use,
            connect_timeout_s,
            command_timeout_s,
            ssh_config=ssh_config,
            log_path=log_path,
            transfer_stall_s=transfer_stall_s,
            transfer_timeout_s=transfer_timeout_s,
        )
        self.family, self.power_mode = family, power_mode
        self.remote_dir, self.python = remote_dir, python
        self.clock_tolerance = clock_tolerance_ppm * 1e-6
        self.link_overhead_s, self.link_min_bytes_per_s = link_overhead_s, link_min_bytes_per_s
        self._deployment: dict[str, Any] | None = None
        self._datasets: dict[str, tuple[str, str]] = {}
        self._per_inference_s: dict[str, float] = {}  # by mode, from the last complete run of this deployment
        self._hi: tuple[dict[str, Any], tuple[str, int], float] | None = None  # hi_configure's
        self._hi_settle_s = 0.0

    @classmethod
    def from_lab(
        cls,
        entry: BoardEntry,
        family: BoardFamily | None = None,
        *,
        lab: str = "default",
        log_dir: str | Path | None = None,
    ) -> SshBoard:
        """From a lab.yaml board entry (`entry.ssh`, `entry.power_mode`); files go to ~/labbench/<lab>/
        on the board, the log to `log_dir`/<board>-ssh.log (default reports/logs/)."""
        s = entry.ssh
        if s is None:
            raise UsageError(f"board {entry.name} has no ssh: link in lab.yaml")
        log_path = Path(log_dir) / f"{entry.name}-ssh.log" if log_dir is not None else None
        return cls(
            entry.name,
            s.host,
            s.port,
            s.user,
            s.key,
            s.known_hosts,
            s.trust_on_first_use,
            s.connect_timeout_s,
            s.command_timeout_s,
            power_mode=entry.power_mode,
            remote_dir=posixpath.join("labbench", lab),
            family=family.name if family is not None else entry.family,
            log_path=log_path,
        )

    def __repr__(self) -> str:
        return f"SshBoard({self.board!r}, {self.user}@{self.host}:{self.port})"

    # ------------------------------------------------------------------ deploy

    @property
    def lab_dir(self) -> str:
        return posixpath.join(self.home, self.remote_dir)

    def deploy(self, model: str | Path, dataset: str | Path | None = None) -> InstallRecord:
        """Put the runner, the model and its dataset into the lab directory, skipping files whose
        sha256 already matches; stores what is there on the board as deployment.json (the record's
        detail)."""
        t0 = time.monotonic()
        local = {"runner": Path(str(RUNNER)), "model": Path(model)}
        if dataset is not None:
            local["dataset"] = Path(dataset)
        subdir = {"runner": "", "model": "models", "dataset": "datasets"}
        remote = {role: posixpath.join(self.lab_dir, subdir[role], p.name) for role, p in local.items()}
        wanted = {role: sha256_file(p) for role, p in local.items()}
        present = dict(zip(remote, self.remote_sha256(list(remote.values())), strict=True))
        files: dict[str, dict[str, Any]] = {}
        with self.sftp("deploy") as (sftp, dog):
            for role, path in local.items():
                skipped = present[role] == wanted[role]
                if not skipped:
                    self.upload(sftp, dog, path, remote[role])
                files[role] = {
                    "local": str(path),
                    "remote": remote[role],
                    "sha256": wanted[role],
                    "bytes": path.stat().st_size,
                    "skipped": skipped,
                }
            record: dict[str, Any] = {
                "board": self.board,
                "host": f"{self.user}@{self.host}:{self.port}",
                "dir": self.lab_dir,
                "model": Path(model).stem,
                "outputs": _output_length(Path(model)),
                "files": files,
                "skipped": all(f["skipped"] for f in files.values()),
                "deployed_at": time.time(),
                "seconds": round(time.monotonic() - t0, 3),
            }
            dog.task(f"write of {DEPLOYMENT_FILE}", None)
            with sftp.open(posixpath.join(self.lab_dir, DEPLOYMENT_FILE), "w") as f:
                f.write(json.dumps(record, indent=1))
        self._deployment = record
        self._datasets = self._dataset_arrays(local.get("dataset"), remote.get("dataset"))
        self._per_inference_s = {}
        return InstallRecord(
            self.board,
            "ssh",
            firmware_sha256=wanted["runner"],
            model_sha256=wanted["model"],
            skipped=record["skipped"],
            seconds=record["seconds"],
            detail={k: v for k, v in record.items() if k not in ("board", "skipped", "seconds")},
        )

    @staticmethod
    def _dataset_arrays(local: Path | None, remote: str | None) -> dict[str, tuple[str, str]]:
        """Digest of each array in the deployed dataset -> (remote file, key): classify() sends
        no samples the board already holds."""
        if local is None or remote is None:
            return {}
        with np.load(local, allow_pickle=False) as data:
            return {_array_digest(data[k]): (remote, k) for k in data.files}

    def deployment(self) -> dict[str, Any]:
        """What was last deployed (read back from the board when this process has not deployed)."""
        if self._deployment is None:
            try:
                with (
                    self.sftp("read deployment") as (sftp, _),
                    sftp.open(posixpath.join(self.lab_dir, DEPLOYMENT_FILE)) as f,
                ):
                    self._deployment = json.loads(f.read())
            except FileNotFoundError:
                raise self.error(
                    "find deployed model", f"nothing deployed in {self.lab_dir}; deploy a model first"
                ) from None
            self._datasets = {}
        return self._deployment

    # ------------------------------------------------------------------ run

    def _runner_argv(self, *args: str) -> list[str]:
        files = self.deployment()["files"]
        return [self.python, files["runner"]["remote"], args[0], files["model"]["remote"], *args[1:]]

    def identify(self) -> DutIdentity:
        argv = self._runner_argv("info")
        result = self.execute(argv)
        if result.exit_status != 0:
            raise self.error(
                "identify",
                f"runner exit status {result.exit_status}: "
                f"{result.stderr.decode(errors='replace').strip()[-500:]}",
            )
        try:
            info = _record(
                result.stdout.rstrip(b"\n").rpartition(b"\n")[2], {"info": _INFO}, "the info record"
            )
            if info["protocol"] != PROTOCOL:
                raise _Mismatch(f"the info record: protocol {PROTOCOL}", str(info["protocol"]))
        except _Mismatch as m:
            raise self.error("identify", f"expected {m.expected}, saw {m.seen}") from None
        return DutIdentity(
            name=info["hostname"],
            model=self.deployment()["model"],
            model_sha256=info["model_sha256"],
            firmware=f"runner protocol {info['protocol']}",
            extra={k: info[k] for k in ("board_model", "machine", "python", "runtime", "runtime_version")}
            | {"board": self.board, "family": self.family, "power_mode": self.power_mode},
        )

    def _extras(self, start: dict[str, Any] | None, end: dict[str, Any] | None) -> dict[str, Any]:
        start, end = start or {}, end or {}
        return {
            "board": self.board,
            "family": self.family,
            "power_mode": self.power_mode,
            "model": self.deployment()["model"],
            "model_sha256": start.get("model_sha256"),
            "runtime": start.get("runtime"),
            "runtime_version": start.get("runtime_version"),
            "cold_start_ms": start.get("cold_start_ms"),
            "load_ms": start.get("load_ms"),
            "peak_rss_kib": end.get("peak_rss_kib"),
        }

    def _want(self, mode: str, count: int, warmup: int, inputs: np.ndarray) -> _Want:
        deployed = self.deployment()
        return _Want(
            mode,
            count,
            warmup,
            _array_digest(inputs),
            deployed["files"]["model"]["sha256"],
            deployed.get("outputs"),
        )

    def _bound(self, records: _Records) -> tuple[float, str]:
        """How long the runner may be silent now, and what that bound is (see Timeouts)."""
        due = records.due_s()
        if due is None:
            return (
                self.command_timeout_s,
                f"no start record within {self.command_timeout_s:g} s (command timeout)",
            )
        limit = max(2 * due, due + EXPECTED_SLACK_S)
        offload_s = records.want.offload_timeout_s
        limit += offload_s
        return limit, (
            f"no record for {limit:.3g} s (the next was due {due:.3g} s after the last; "
            f"bound max(2 x due, due + {EXPECTED_SLACK_S:g} s)"
            + (f" + the offload timeout {offload_s:g} s)" if offload_s else ")")
        )

    def _run(
        self,
        action: str,
        argv: list[str],
        stdin: bytes | None,
        want: _Want,
        stop: threading.Event | None,
        build: Callable[[_Records], _T],
    ) -> _T:
        """Run the runner, checking its records as they come; anything short of a complete, consistent
        run is an error carrying `build(records)` of the inferences that passed."""
        with step(self.board, action, f"{want.count} inferences"):
            return self._checked_run(action, argv, stdin, want, stop, build)

    def _checked_run(
        self,
        action: str,
        argv: list[str],
        stdin: bytes | None,
        want: _Want,
        stop: threading.Event | None,
        build: Callable[[_Records], _T],
    ) -> _T:
        if stop is not None and stop.is_set():
            raise self.fail(RunAborted(self.board, action, "stopped before it was sent", str(self.log_path)))
        stream = self.stream(shlex.join(argv), stdin, action, stop)
        records = _Records(
            want,
            stream.sent_s,
            self.clock_tolerance,
            self.link_overhead_s,
            self.link_min_bytes_per_s,
            self._per_inference_s.get(want.mode),
            len(stdin or b""),
        )
        stream.limit = lambda: self._bound(records)
        mismatch, failed = None, None
        lines = iter(stream)
        try:
            for line, t in lines:
                records.feed(line, t)
        except _Mismatch as exc:
            mismatch = exc
        except _OffloadFailed as exc:
            failed = exc.record
        finally:
            lines.close()
        n, partial = len(records.t_ns), build(records)
        if stream.stopped:
            aborted = RunAborted(
                self.board,
                action,
                f"stopped from outside after {n} of {want.count} inferences",
                str(self.log_path),
            )
            aborted.partial = partial
            raise self.fail(aborted)
        if failed is not None:
            edge = EdgeError(
                self.board,
                f"offload sample {failed['i']} to edge server {failed['server']}",
                f"{failed['what']} (after {n} of {want.count} samples)",
                str(self.log_path),
            )
            edge.partial = partial
            raise self.fail(edge)
        cls: type[RemoteRunError]
        if mismatch is not None:
            cls, why = (
                RemoteStreamError,
                f"line {records.lines}: expected {mismatch.expected}, saw {mismatch.seen}",
            )
        elif stream.stalled:
            cls, why = RemoteTimeout, stream.stalled
        elif stream.lost or stream.exit_status != 0:
            cls, why = RemoteRunError, stream.why()
        elif stream.tail:
            cls, why = (
                RemoteStreamError,
                f"line {records.lines + 1}: expected a whole line, saw {_show(stream.tail)}",
            )
        elif records.end is None:
            cls, why = (
                RemoteStreamError,
                f"expected the end record, saw the end of the output (line {records.lines})",
            )
        else:
            self._per_inference_s[want.mode] = records.per_inference_s()
            self.event("exit status 0")
            self.flush_log()
            return partial
        raise self.fail(
            cls(
                self.board,
                action,
                f"broke off after {n} of {want.count} inferences completed: {why}",
                completed=n,
                expected=want.count,
                partial=partial,
                log=str(self.log_path),
            )
        )

    def run_timed(
        self,
        sample: np.ndarray,
        count: int,
        warmup: int,
        *,
        per_inference: bool = False,
        stop: threading.Event | None = None,
    ) -> TimedRun:
        """`count` back-to-back inferences of `sample` after `warmup`, each timed on the board
        (so `per_inference` changes nothing here). `stop` ends the run early (RunAborted)."""
        if count < 1 or warmup < 0:
            raise ValueError(f"count must be >= 1 and warmup >= 0, got {count}, {warmup}")
        sample = np.asarray(sample)

        def build(records: _Records) -> TimedRun:
            latencies_us = tuple(lat / 1000 for lat in records.latency_ns)
            now = time.monotonic()
            host_start, host_end = records.host_window() or (now, now)
            end = records.end
            outputs = np.asarray(end["output"], dtype=np.float32) if end else None
            return TimedRun(
                latencies_us,
                host_start,
                host_end,
                outputs,
                extra=self._extras(records.start, end) | {"warmup": warmup},
            )

        argv = self._runner_argv("timed", "--count", str(count), "--warmup", str(warmup))
        return self._run(
            f"run {count} timed inferences",
            argv,
            _npy(sample),
            self._want("timed", count, warmup, sample),
            stop,
            build,
        )

    def classify(self, samples: np.ndarray, *, stop: threading.Event | None = None) -> np.ndarray:
        """One row of float32 scores per sample; samples the board already holds are not sent again.
        `stop` ends the run early (RunAborted)."""
        samples = np.asarray(samples)
        if len(samples) == 0:
            raise ValueError("classify needs at least one sample")
        self.deployment()
        held = self._datasets.get(_array_digest(samples))
        extra = ["--dataset", held[0], "--key", held[1]] if held else []
        argv = self._runner_argv("classify", *extra)

        def build(records: _Records) -> np.ndarray:
            return np.asarray(records.outputs, dtype=np.float32)

        return self._run(
            f"classify {len(samples)} samples",
            argv,
            None if held else _npy(samples),
            self._want("classify", len(samples), 0, samples),
            stop,
            build,
        )

    # ------------------------------------------------------------------ hierarchical inference

    def hi_configure(
        self,
        decision: dict[str, str | float],
        server: tuple[str, int],
        *,
        settle_s: float = 0.0,
        timeout_s: float = OFFLOAD_TIMEOUT_S,
    ) -> None:
        """Keep the decision (its device form) and the edge server's (host, port) as the board reaches
        it for `hi_run`; `timeout_s` bounds each offload on the board, its reconnection included; the
        runner idles `settle_s` before the first sample and after the last. ValueError for a
        decision, server or time that is not one."""
        if not (math.isfinite(settle_s) and settle_s >= 0):
            raise ValueError(f"settle_s must be a time >= 0: got {settle_s}")
        self._hi_settle_s = float(settle_s)
        checked = _device_decision(dict(decision))
        host, port = server
        if not isinstance(host, str) or not host or any(c.isspace() for c in host):
            raise ValueError(f"edge server host must be a host name or address: got {host!r}")
        if type(port) is not int or not 0 < port < 65536:
            raise ValueError(f"edge server port must be in 1..65535: got {port!r}")
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"offload timeout must be a positive number of seconds: got {timeout_s}")
        self._hi = (checked, (host, port), float(timeout_s))

    def hi_run(self, samples: np.ndarray, *, stop: threading.Event | None = None) -> HiRun:
        """Hierarchical inference of `samples` on the board, offloading to the configured server: one
        window, the first sample's start to the last's end on the host clock. An offload that failed is
        an EdgeError (`.partial`: the samples before it); `stop` ends the run early (RunAborted)."""
        if self._hi is None:
            raise UsageError(f"{self.board}: hi_run before hi_configure: no decision or edge server set")
        decision, (host, port), timeout_s = self._hi
        server = _host_port(host, port)
        samples = np.asarray(samples)
        if len(samples) == 0:
            raise ValueError("hi_run needs at least one sample")
        self.deployment()
        held = self._datasets.get(_array_digest(samples))
        argv = self._runner_argv(
            "hi",
            "--server",
            server,
            "--decision",
            json.dumps(decision, separators=(",", ":")),
            "--timeout",
            repr(timeout_s),
            "--settle",
            repr(self._hi_settle_s),
            *(["--dataset", held[0], "--key", held[1]] if held else []),
        )

        def build(records: _Records) -> HiRun:
            rows = records.samples

            def column(key: str, dtype: type) -> np.ndarray:
                return np.asarray([r[key] for r in rows], dtype=dtype)

            window = records.host_window()
            return HiRun(
                p1=column("p1", np.float64),
                p2=column("p2", np.float64),
                accepted=column("accept", np.bool_),
                local_class=column("local", np.int64),
                final_class=column("final", np.int64),
                t_inf_us=column("t_inf_ns", np.int64) / 1000,
                t_dec_us=column("t_dec_ns", np.int64) / 1000,
                t_off_us=column("t_off_ns", np.int64) / 1000,
                windows=((*window, len(rows)),) if window else (),
                extra=self._extras(records.start, records.end)
                | {"decision": decision, "server": server, "server_us": column("server_us", np.int64)},
            )

        want = self._want("hi", len(samples), 0, samples)
        return self._run(
            f"run hierarchical inference on {len(samples)} samples",
            argv,
            None if held else _npy(samples),
            replace(want, decision=decision, server=server, offload_timeout_s=timeout_s),
            stop,
            build,
        )
