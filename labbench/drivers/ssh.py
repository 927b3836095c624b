"""Linux boards over SSH (paramiko): deploy a model and the runner, run it, stream the results back.

Connection: ~/.ssh/config is honoured for the board's host as `ssh <host>` would: HostName,
IdentityFile, ProxyCommand, and UserKnownHostsFile, Port and User where the caller leaves them unset
(a lab.yaml entry always gives both: port defaults to 22, user to the local account name). Keys come
from lab.yaml, the config, ~/.ssh/id_* and the agent.
`command_timeout_s` bounds a remote command's silence: no output for that long ends it (a streamed
run may last longer, as long as inferences keep coming).

Host keys are verified against `known_hosts` (lab.yaml's, else the config's, else
~/.ssh/known_hosts): an unknown or changed key is a RemoteError with its SHA256 fingerprint and the
command that trusts it. Trust on first use happens only where lab.yaml says so, and appends the key
to known_hosts; a changed key is refused even then.

Remote commands are argument lists joined with shlex.quote; file transfer is SFTP (no shell).
Deployment goes to `<home>/<remote_dir>/` on the board (one directory per lab):

    runner.py  models/<model file>  datasets/<dataset file>  deployment.json

Results stream back one JSON line per inference (see labbench/remote/runner.py), so a run that
breaks off raises RemoteRunError carrying the inferences that did complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import pwd
import re
import shlex
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Self

import numpy as np
import paramiko

from labbench.capabilities import DutIdentity, TimedRun
from labbench.errors import RemoteError

RUNNER = resources.files("labbench.remote") / "runner.py"
DEPLOYMENT_FILE = "deployment.json"
KEEPALIVE_S = 10
_TIMED_LINE = re.compile(rb'\{"type":"inference","i":(\d+),"latency_ns":(\d+)\}')  # runner.timed()'s lines
_POLL_S = 0.2


class RemoteRunError(RemoteError):
    """A remote run broke off: `completed` of `expected` inferences came back, kept in `partial`
    (a TimedRun for run_timed, the output rows for classify)."""

    def __init__(self, target: str, action: str, seen: str, completed: int, expected: int, partial: Any):
        super().__init__(target, action, seen)
        self.completed, self.expected, self.partial = completed, expected, partial


@dataclass(frozen=True)
class CommandResult:
    exit_status: int
    stdout: bytes
    stderr: bytes


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _array_digest(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    return hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + a.tobytes()).hexdigest()


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(a), allow_pickle=False)
    return buf.getvalue()


def _keyscan_type(key: paramiko.PKey) -> str:
    name = key.get_name()
    return "ecdsa" if name.startswith("ecdsa") else name.removeprefix("ssh-")


class _HostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Refuses an unknown host key with its fingerprint, or (trust on first use) records it."""

    def __init__(self, owner: SshBoard, known_hosts: Path, trust_on_first_use: bool):
        self.owner, self.known_hosts, self.trust = owner, known_hosts, trust_on_first_use

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        if not self.trust:
            raise RemoteError(self.owner.board, f"verify host key of {hostname}", (
                f"unknown host key {key.get_name()} {key.fingerprint} (not in {self.known_hosts}). "
                f"If that is the board's key, trust it with: {self.owner.keyscan_command(key)} "
                f"(or set trust_on_first_use: true for this board in lab.yaml)"))
        self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        with open(self.known_hosts, "a") as f:
            f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        client.get_host_keys().add(hostname, key.get_name(), key)


class _Stream:
    """One remote command whose stdout is read line by line as it arrives.

    Iteration stops at end of output or when nothing arrived for `stall_s`; afterwards
    `exit_status` (None when none came) and `why()` say how it ended.
    """

    def __init__(self, chan: paramiko.Channel, stall_s: float):
        self.chan, self.stall_s = chan, stall_s
        self.stderr = bytearray()
        self.stalled = self.lost = False
        self.exit_status: int | None = None
        self.garbage: bytes | None = None  # a line that was not a runner record, if the reader saw one
        self.tail = b""  # output after the last newline (a line still in flight)

    def __iter__(self) -> Iterator[tuple[bytes, float]]:
        chan, pending = self.chan, b""
        chan.settimeout(_POLL_S)
        last = time.monotonic()
        try:
            while True:
                while chan.recv_stderr_ready():
                    self.stderr += chan.recv_stderr(65536)
                try:
                    data = chan.recv(65536)
                except TimeoutError:
                    if time.monotonic() - last > self.stall_s:
                        self.stalled = True
                        break
                    continue
                except (EOFError, OSError, paramiko.SSHException):  # the connection broke under recv
                    self.lost = True
                    break
                if not data:
                    break
                last = time.monotonic()
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:
                    yield line, last
            self.tail = pending
            self._finish()
        finally:  # also when the reader stops early: the remote command gets EOF/SIGPIPE
            try:
                chan.close()
            except (EOFError, OSError, paramiko.SSHException):
                pass  # the connection went first; the channel is gone with it

    def _finish(self) -> None:
        if not (self.stalled or self.lost) and self.chan.status_event.wait(self.stall_s):
            while self.chan.recv_stderr_ready():
                self.stderr += self.chan.recv_stderr(65536)
            status = self.chan.exit_status
            self.exit_status = None if status == -1 else status
        self.lost = self.lost or not self.chan.get_transport().is_active()

    def why(self) -> str:
        if self.garbage is not None:
            return f"runner printed {self.garbage[:200]!r}"
        if self.stalled:
            return f"no output for {self.stall_s:g} s (command timeout)"
        if self.lost or self.exit_status is None:
            return "connection lost"
        tail = self.stderr.decode(errors="replace").strip().splitlines()[-5:]
        return f"exit status {self.exit_status}" + (": " + " | ".join(tail) if tail else "")


class SshBoard:
    """A Linux board reached over SSH: Deployer and InferenceTarget."""

    def __init__(self, board: str, host: str, port: int | None = None, user: str | None = None,
                 key: Path | None = None, known_hosts: Path | None = None, trust_on_first_use: bool = False,
                 connect_timeout_s: float = 10.0, command_timeout_s: float = 120.0,
                 power_mode: str | None = None, remote_dir: str = "labbench/default",
                 python: str = "python3", ssh_config: Path | None = Path("~/.ssh/config"),
                 family: str | None = None):
        self.board, self.family, self.power_mode = board, family, power_mode
        self.remote_dir, self.python = remote_dir, python
        self.connect_timeout_s, self.command_timeout_s = connect_timeout_s, command_timeout_s
        config = self._ssh_config(host, ssh_config)
        self.host = config.get("hostname", host)
        self.port = int(port or config.get("port", 22))
        self.user = user or config.get("user") or pwd.getpwuid(os.getuid()).pw_name  # as ssh: not $USER
        candidates = ([key] if key else []) + config.get("identityfile", [])
        self.keys = [str(Path(k).expanduser()) for k in candidates if Path(k).expanduser().exists()]
        default_known = config.get("userknownhostsfile", "~/.ssh/known_hosts").split()[0]
        self.known_hosts = Path(known_hosts or default_known).expanduser()
        self.trust_on_first_use = trust_on_first_use
        self.proxy_command = config.get("proxycommand")
        self._client: paramiko.SSHClient | None = None
        self._home: str | None = None
        self._deployment: dict[str, Any] | None = None
        self._datasets: dict[str, tuple[str, str]] = {}

    @classmethod
    def from_lab(cls, entry: Any, family: Any = None, *, lab: str = "default") -> SshBoard:
        """From a lab.yaml board entry (`entry.ssh`, `entry.power_mode`); files go to ~/labbench/<lab>/."""
        s = entry.ssh
        return cls(entry.name, s.host, s.port, s.user, s.key, s.known_hosts, s.trust_on_first_use,
                   s.connect_timeout_s, s.command_timeout_s, power_mode=entry.power_mode,
                   remote_dir=posixpath.join("labbench", lab), family=getattr(family, "name", entry.family))

    def __repr__(self) -> str:
        return f"SshBoard({self.board!r}, {self.user}@{self.host}:{self.port})"

    @staticmethod
    def _ssh_config(host: str, path: Path | None) -> dict[str, Any]:
        if path is None or not Path(path).expanduser().exists():
            return {}
        return dict(paramiko.SSHConfig.from_path(str(Path(path).expanduser())).lookup(host))

    def keyscan_command(self, key: paramiko.PKey) -> str:
        return (f"ssh-keyscan -p {self.port} -t {_keyscan_type(key)} {shlex.quote(self.host)} "
                f">> {shlex.quote(str(self.known_hosts))}")

    # ------------------------------------------------------------------ connection

    def connect(self) -> paramiko.SSHClient:
        """The open connection, (re)connecting when there is none; bounded by connect_timeout_s."""
        transport = self._client.get_transport() if self._client is not None else None
        if transport is not None and transport.is_active():
            return self._client
        self.close()
        client = paramiko.SSHClient()
        if self.known_hosts.exists():
            client.load_host_keys(str(self.known_hosts))
        client.set_missing_host_key_policy(_HostKeyPolicy(self, self.known_hosts, self.trust_on_first_use))
        where = f"connect to {self.user}@{self.host}:{self.port}"
        t = self.connect_timeout_s
        try:
            client.connect(self.host, self.port, self.user, key_filename=self.keys or None, timeout=t,
                           banner_timeout=t, auth_timeout=t, channel_timeout=t,
                           sock=paramiko.ProxyCommand(self.proxy_command) if self.proxy_command else None)
        except paramiko.BadHostKeyException as exc:
            client.close()
            known = f"[{self.host}]:{self.port}" if self.port != 22 else self.host
            raise RemoteError(self.board, where, (
                f"HOST KEY CHANGED: {self.known_hosts} has {exc.expected_key.get_name()} "
                f"{exc.expected_key.fingerprint}, the board offered "
                f"{exc.key.get_name()} {exc.key.fingerprint}. "
                f"If the board was reinstalled, forget the old key with: ssh-keygen -f "
                f"{shlex.quote(str(self.known_hosts))} -R {shlex.quote(known)} and trust the new one with: "
                f"{self.keyscan_command(exc.key)}")) from None
        except RemoteError:
            client.close()
            raise
        except paramiko.AuthenticationException as exc:
            client.close()
            raise RemoteError(self.board, where, f"{exc} ({self._credentials()})") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            client.close()
            seen = f"{type(exc).__name__}: {exc}"
            if "authentication methods" in str(exc):
                seen += f" ({self._credentials()})"
            raise RemoteError(self.board, where, seen) from None
        client.get_transport().set_keepalive(KEEPALIVE_S)
        self._client = client
        return client

    def _credentials(self) -> str:
        keys = ", ".join(self.keys) or "none in lab.yaml or ~/.ssh/config"
        agent = "the agent at $SSH_AUTH_SOCK" if os.environ.get("SSH_AUTH_SOCK") else "no agent (unset)"
        return f"keys tried: {keys}, ~/.ssh/id_*; {agent}"

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> Self:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _channel(self, action: str) -> paramiko.Channel:
        """A new session. A connection found dead (a dropped link, a rebooted board) is re-established
        once: the transport may not have noticed yet."""
        def open_session() -> paramiko.Channel:
            return self.connect().get_transport().open_session(timeout=self.connect_timeout_s)

        try:
            return open_session()
        except (paramiko.SSHException, OSError, EOFError):
            self.close()
        try:
            return open_session()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            seen = f"cannot open a session: {type(exc).__name__}: {exc}"
            raise RemoteError(self.board, action, seen) from None

    def _open(self, command: str, stdin: bytes | None, action: str) -> _Stream:
        chan = self._channel(action)
        try:
            chan.exec_command(command)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise RemoteError(self.board, action, f"cannot start {command!r}: {type(exc).__name__}: {exc}") \
                from None
        if stdin is not None:
            try:
                chan.sendall(stdin)
                chan.shutdown_write()
            except OSError:
                pass  # the command ended before reading its input; its exit status says why
        return _Stream(chan, self.command_timeout_s)

    def execute(self, argv: list[str], stdin: bytes | None = None) -> CommandResult:
        """Run one command (arguments quoted, never interpreted by the remote shell)."""
        return self._shell(shlex.join(argv), stdin, f"run {argv[0]}")

    def _shell(self, command: str, stdin: bytes | None, action: str) -> CommandResult:
        stream = self._open(command, stdin, action)
        out = b"".join(line + b"\n" for line, _ in stream) + stream.tail
        if stream.exit_status is None:
            raise RemoteError(self.board, action, stream.why())
        return CommandResult(stream.exit_status, out, bytes(stream.stderr))

    # ------------------------------------------------------------------ deploy

    @property
    def home(self) -> str:
        """The login directory on the board (where SFTP starts)."""
        if self._home is None:
            with self._sftp("find home") as sftp:
                self._home = sftp.normalize(".")
        return self._home

    @property
    def lab_dir(self) -> str:
        return posixpath.join(self.home, self.remote_dir)

    def _sftp(self, action: str) -> paramiko.SFTPClient:
        chan = self._channel(action)
        try:
            chan.invoke_subsystem("sftp")
            return paramiko.SFTPClient(chan)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise RemoteError(self.board, action, f"SFTP: {type(exc).__name__}: {exc}") from None

    def remote_sha256(self, paths: list[str]) -> list[str | None]:
        """sha256 of each remote file (None where it is missing), in one round trip."""
        loop = " ".join(shlex.quote(p) for p in paths)
        result = self._shell(f'for f in {loop}; do sha256sum 2>/dev/null < "$f" || echo -; done', None,
                             "hash deployed files")
        digests = [line.split()[0].decode() for line in result.stdout.splitlines() if line.strip()]
        if result.exit_status != 0 or len(digests) != len(paths):
            raise RemoteError(self.board, "hash deployed files", f"sha256sum gave {result.stdout!r} "
                              f"{result.stderr.decode(errors='replace').strip()}")
        return [None if d == "-" else d for d in digests]

    def deploy(self, model: str | Path, dataset: str | Path | None = None) -> dict[str, Any]:
        """Put the runner, the model and its dataset into the lab directory, skipping files whose
        sha256 already matches; returns (and stores on the board as deployment.json) what is there."""
        t0 = time.monotonic()
        local = {"runner": Path(str(RUNNER)), "model": Path(model)}
        if dataset is not None:
            local["dataset"] = Path(dataset)
        subdir = {"runner": "", "model": "models", "dataset": "datasets"}
        remote = {role: posixpath.join(self.lab_dir, subdir[role], p.name) for role, p in local.items()}
        wanted = {role: sha256_file(p) for role, p in local.items()}
        present = dict(zip(remote, self.remote_sha256(list(remote.values()))))
        files: dict[str, dict[str, Any]] = {}
        with self._sftp("deploy") as sftp:
            for role, path in local.items():
                skipped = present[role] == wanted[role]
                if not skipped:
                    self._upload(sftp, path, remote[role])
                files[role] = {"local": str(path), "remote": remote[role], "sha256": wanted[role],
                               "bytes": path.stat().st_size, "skipped": skipped}
            record = {"board": self.board, "host": f"{self.user}@{self.host}:{self.port}",
                      "dir": self.lab_dir, "model": Path(model).stem, "files": files,
                      "skipped": all(f["skipped"] for f in files.values()),
                      "deployed_at": time.time(), "seconds": round(time.monotonic() - t0, 3)}
            with sftp.open(posixpath.join(self.lab_dir, DEPLOYMENT_FILE), "w") as f:
                f.write(json.dumps(record, indent=1))
        self._deployment = record
        self._datasets = self._dataset_arrays(local.get("dataset"), remote.get("dataset"))
        return record

    def _upload(self, sftp: paramiko.SFTPClient, path: Path, remote: str) -> None:
        """Write beside the target, then rename over it, so a broken upload never looks deployed."""
        self._mkdirs(sftp, posixpath.dirname(remote))
        part = remote + ".part"
        try:
            sftp.put(str(path), part)
            sftp.posix_rename(part, remote)
        except (OSError, paramiko.SSHException) as exc:
            raise RemoteError(self.board, f"deploy {path.name}", f"SFTP upload to {remote}: {exc}") from None

    @staticmethod
    def _mkdirs(sftp: paramiko.SFTPClient, path: str) -> None:
        parts = path.split("/")
        for i in range(2, len(parts) + 1):
            prefix = "/".join(parts[:i])
            try:
                sftp.stat(prefix)
            except FileNotFoundError:
                sftp.mkdir(prefix)

    @staticmethod
    def _dataset_arrays(local: Path | None, remote: str | None) -> dict[str, tuple[str, str]]:
        """Digest of each array in the deployed dataset -> (remote file, key): classify() sends
        no samples the board already holds."""
        if local is None:
            return {}
        with np.load(local, allow_pickle=False) as data:
            return {_array_digest(data[k]): (remote, k) for k in data.files}

    def deployment(self) -> dict[str, Any]:
        """What was last deployed (read back from the board when this process has not deployed)."""
        if self._deployment is None:
            try:
                with self._sftp("read deployment") as sftp, sftp.open(
                        posixpath.join(self.lab_dir, DEPLOYMENT_FILE)) as f:
                    self._deployment = json.loads(f.read())
            except FileNotFoundError:
                raise RemoteError(self.board, "find deployed model",
                                  f"nothing deployed in {self.lab_dir}; deploy a model first") from None
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
            raise RemoteError(self.board, "identify", f"runner exit status {result.exit_status}: "
                              f"{result.stderr.decode(errors='replace').strip()[-500:]}")
        info = json.loads(result.stdout.splitlines()[-1])
        return DutIdentity(name=info["hostname"], model=self.deployment()["model"],
                           model_sha256=info["model_sha256"], firmware=f"runner protocol {info['protocol']}",
                           extra={k: info[k] for k in ("board_model", "machine", "python", "runtime",
                                                       "runtime_version")}
                           | {"board": self.board, "family": self.family, "power_mode": self.power_mode})

    def _extras(self, start: dict | None, end: dict | None) -> dict[str, Any]:
        start, end = start or {}, end or {}
        return {"board": self.board, "family": self.family, "power_mode": self.power_mode,
                "model": self.deployment()["model"], "model_sha256": start.get("model_sha256"),
                "runtime": start.get("runtime"), "runtime_version": start.get("runtime_version"),
                "cold_start_ms": start.get("cold_start_ms"), "load_ms": start.get("load_ms"),
                "peak_rss_kib": end.get("peak_rss_kib")}

    def _run(self, action: str, argv: list[str], stdin: bytes | None, expected: int,
             build: Callable[[dict | None, list[tuple[dict, float]], dict | None], Any]) -> Any:
        """Run the runner, collecting its lines as they come; anything short of a complete run is a
        RemoteRunError carrying `build(start, rows, None)` for the inferences that completed."""
        start = end = None
        rows: list[tuple[dict, float]] = []
        stream = self._open(shlex.join(argv), stdin, action)
        for line, t in stream:
            timed = _TIMED_LINE.fullmatch(line)
            if timed:  # the bulk of a timed run: read without the JSON parser, which costs 5x more
                rows.append(({"i": int(timed[1]), "latency_ns": int(timed[2])}, t))
                continue
            try:
                record = json.loads(line)
            except ValueError:
                stream.garbage = line
                break
            kind = record.get("type")
            if kind == "inference":
                rows.append((record, t))
            elif kind == "start":
                start = record
            elif kind == "end":
                end = record
        if end is None or stream.garbage is not None or stream.exit_status != 0 or len(rows) != expected:
            raise RemoteRunError(self.board, action, (
                f"broke off after {len(rows)} of {expected} inferences completed: {stream.why()}"),
                completed=len(rows), expected=expected, partial=build(start, rows, None))
        return build(start, rows, end)

    def run_timed(self, sample: np.ndarray, count: int, warmup: int, *,
                  per_inference: bool = False) -> TimedRun:
        """`count` back-to-back inferences of `sample` after `warmup`, each timed on the board
        (so `per_inference` changes nothing here)."""
        if count < 1 or warmup < 0:
            raise ValueError(f"count must be >= 1 and warmup >= 0, got {count}, {warmup}")

        def build(start: dict | None, rows: list[tuple[dict, float]], end: dict | None) -> TimedRun:
            latencies_us = tuple(r["latency_ns"] / 1000 for r, _ in rows)
            host_start = rows[0][1] - latencies_us[0] / 1e6 if rows else time.monotonic()
            host_end = rows[-1][1] if rows else host_start
            outputs = np.asarray(end["output"], dtype=np.float32) if end else None
            return TimedRun(latencies_us, host_start, host_end, outputs,
                            extra=self._extras(start, end) | {"warmup": warmup})

        argv = self._runner_argv("timed", "--count", str(count), "--warmup", str(warmup))
        return self._run(f"run {count} timed inferences", argv, _npy(sample), count, build)

    def classify(self, samples: np.ndarray) -> np.ndarray:
        """One row of float32 scores per sample; samples the board already holds are not sent again."""
        samples = np.asarray(samples)
        if len(samples) == 0:
            raise ValueError("classify needs at least one sample")
        self.deployment()
        held = self._datasets.get(_array_digest(samples))
        extra = ["--dataset", held[0], "--key", held[1]] if held else []
        argv = self._runner_argv("classify", *extra)

        def build(start: dict | None, rows: list[tuple[dict, float]], end: dict | None) -> np.ndarray:
            return np.asarray([r["output"] for r, _ in rows], dtype=np.float32)

        return self._run(f"classify {len(samples)} samples", argv, None if held else _npy(samples),
                         len(samples), build)
