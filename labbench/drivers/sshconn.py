"""One SSH connection to a board (paramiko): host keys checked, commands and SFTP transfers bounded
in time, and everything logged.

Connection: ~/.ssh/config is honoured for the board's host as `ssh <host>` would: HostName,
IdentityFile, ProxyCommand, and UserKnownHostsFile, Port and User where the caller leaves them unset
(a lab.yaml entry always gives both: port defaults to 22, user to the local account name). Keys come
from lab.yaml, the config, ~/.ssh/id_* and the agent. A connection found dead is re-established at
the next call.

Host keys are verified against `known_hosts` (lab.yaml's, else the config's, else
~/.ssh/known_hosts): an unknown or changed key is a RemoteError with its SHA256 fingerprint and the
command that trusts it. Trust on first use happens only where lab.yaml says so, and appends the key
to known_hosts; a changed key is refused even then.

Remote commands are argument lists joined with shlex.quote; file transfer is SFTP (no shell). A
command's output is read as a `Stream` of lines, each with its host arrival time, which ends at the
end of the output, at `stop`, or after a silence longer than the bound its reader gives (by default
`command_timeout_s`). A transfer (an SFTP session, a command's start and its stdin) that moves no
byte for `transfer_stall_s`, or lasts over `transfer_timeout_s`, is a RemoteError naming the file
and the bytes sent: the connection is closed under it (a send blocked on a full socket wakes no
other way) and the next call reconnects.

Log. Appended to `log_path` (default `reports/logs/<board>-ssh.log` under the working directory)
with host time.monotonic() stamps: `<time> -> ...` what was sent (commands, SFTP puts),
`<time> <- b'...'` a stdout line (the first and the last LOG_LINES of a command; a long run's lines
in between are counted), `<time> <2 b'...'` a stderr line, `<time> -- ...` events (connections,
exit statuses, errors). Every error names the board, the action, what was seen, and the log.
"""

from __future__ import annotations

import os
import posixpath
import pwd
import shlex
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Self, TypeVar, cast

import paramiko

from labbench.errors import HardwareError, RemoteError
from labbench.steps import step

KEEPALIVE_S = 10
POLL_S = 0.1  # how often a wait looks at its bound and at `stop`
LOG_LINES = 1000  # stdout lines logged of each command: the first and the last this many
_CHUNK = 32768

_E = TypeVar("_E", bound=HardwareError)
Bound = Callable[[], tuple[float, str]]  # how long a stream may be silent now, and what that bound is
LogLines = Callable[[str, Sequence[bytes | str], float], None]


@dataclass(frozen=True)
class CommandResult:
    exit_status: int
    stdout: bytes
    stderr: bytes


def _keyscan_type(key: paramiko.PKey) -> str:
    name = key.get_name()
    return "ecdsa" if name.startswith("ecdsa") else name.removeprefix("ssh-")


def _transport(client: paramiko.SSHClient) -> paramiko.Transport:
    """The client's transport; a client without one is a closed connection."""
    transport = client.get_transport()
    if transport is None:
        raise paramiko.SSHException("the connection is closed")
    return transport


class _HostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Refuses an unknown host key with its fingerprint, or (trust on first use) records it."""

    def __init__(self, owner: SshConnection, known_hosts: Path, trust_on_first_use: bool):
        self.owner, self.known_hosts, self.trust = owner, known_hosts, trust_on_first_use

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        if not self.trust:
            raise self.owner.error(
                f"verify host key of {hostname}",
                (
                    f"unknown host key {key.get_name()} {key.fingerprint} (not in {self.known_hosts}). "
                    f"If that is the board's key, trust it with: {self.owner.keyscan_command(key)} "
                    f"(or set trust_on_first_use: true for this board in lab.yaml)"
                ),
            )
        self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        with open(self.known_hosts, "a") as f:
            f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        client.get_host_keys().add(hostname, key.get_name(), key)
        self.owner.event(f"trusted {hostname} {key.get_name()} {key.fingerprint} on first use")


class Watchdog:
    """Watches a transfer from its own thread: when no byte moved for `stall_s`, or the whole took
    over `limit_s`, it closes the connection under the transfer (the only way to wake a send blocked
    on a full socket) and says so in `tripped`."""

    def __init__(self, transport: paramiko.Transport, stall_s: float, limit_s: float, what: str):
        self.transport, self.stall_s, self.limit_s = transport, stall_s, limit_s
        self.what, self.done = what, 0
        self.total: int | None = None
        self.tripped: str | None = None
        self._t0 = self._last = time.monotonic()
        self._over = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="ssh-transfer-watchdog", daemon=True)
        self._thread.start()

    def task(self, what: str, total: int | None) -> None:
        self.what, self.done, self.total = what, 0, total
        self._last = time.monotonic()

    def moved(self, n: int) -> None:
        if n:
            self._last = time.monotonic()

    def sent(self, done: int) -> None:
        self.done = done
        self._last = time.monotonic()

    def _watch(self) -> None:
        while not self._over.wait(POLL_S):
            now = time.monotonic()
            if now - self._last > self.stall_s:
                self.tripped = f"no progress for {self.stall_s:g} s"
            elif now - self._t0 > self.limit_s:
                self.tripped = f"not done within {self.limit_s:g} s"
            else:
                continue
            self.transport.close()
            return

    def stop(self) -> None:
        self._over.set()
        self._thread.join()

    def describe(self, exc: BaseException) -> str:
        cause = self.tripped or f"{type(exc).__name__}: {exc}"
        sent = f" ({self.done} of {self.total} bytes sent)" if self.total is not None else ""
        return f"{self.what}: {cause}{sent}"


class _Counted:
    """A channel that tells a watchdog each time bytes move (an SFTP session's progress, acks included)."""

    def __init__(self, chan: paramiko.Channel, moved: Callable[[int], None]):
        self._chan, self._moved = chan, moved

    def recv(self, n: int) -> bytes:
        data = self._chan.recv(n)
        self._moved(len(data))
        return data

    def send(self, data: bytes) -> int:
        n = self._chan.send(data)
        self._moved(n)
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._chan, name)


class Stream:
    """One remote command whose stdout is read line by line as it arrives; its first and last
    LOG_LINES lines and all of its stderr are logged.

    Iteration stops at the end of the output, when `stop` is set, or when nothing arrived for
    `limit()[0]` seconds (asked again at each wait, so the reader may change it as it learns; [1] says
    what the bound is); afterwards `exit_status` (None when none came) and `why()` say how it ended.
    """

    def __init__(
        self,
        chan: paramiko.Channel,
        sent_s: float,
        limit: Bound,
        log: LogLines,
        stop: threading.Event | None = None,
    ):
        self.chan, self.sent_s, self.limit, self.log, self.stop = chan, sent_s, limit, log, stop
        self.stderr = bytearray()
        self.stalled: str | None = None  # the bound that ran out
        self.lost = self.stopped = False
        self.exit_status: int | None = None
        self.tail = b""  # output after the last newline (a line still in flight)
        self._stderr_line = b""
        self._logged = self._unlogged = 0
        self._last_lines: deque[tuple[bytes, float]] = deque(maxlen=LOG_LINES)

    def __iter__(self) -> Generator[tuple[bytes, float], None, None]:
        chan, pending = self.chan, b""
        chan.settimeout(POLL_S)
        last = time.monotonic()
        try:
            while True:
                self._read_stderr()
                if self.stop is not None and self.stop.is_set():
                    self.stopped = True
                    break
                try:
                    data = chan.recv(65536)
                except TimeoutError:
                    limit_s, bound = self.limit()
                    if time.monotonic() - last > limit_s:
                        self.stalled = bound
                        break
                    continue
                except (EOFError, OSError, paramiko.SSHException):  # the connection broke under recv
                    self.lost = True
                    break
                if not data:
                    break
                last = time.monotonic()
                *lines, pending = (pending + data).split(b"\n")
                self._log_lines(lines, last)
                for line in lines:
                    yield line, last
            self.tail = pending
            self._log_lines([pending] if pending else [], last)
            self._finish()
        finally:  # also when the reader stops early: the remote command gets EOF/SIGPIPE
            try:
                chan.close()
            except (EOFError, OSError, paramiko.SSHException):
                pass  # the connection went first; the channel is gone with it
            if self._unlogged:
                self.log("--", [f"{self._unlogged - len(self._last_lines)} lines not logged"], last)
            for line, t in self._last_lines:
                self.log("<-", [line], t)

    def _log_lines(self, lines: list[bytes], t: float) -> None:
        room = LOG_LINES - self._logged
        if room > 0:
            self.log("<-", lines[:room], t)
            self._logged += min(room, len(lines))
        if len(lines) > room:
            later = lines[max(room, 0) :]
            self._unlogged += len(later)
            self._last_lines.extend((line, t) for line in later)

    def _read_stderr(self) -> None:
        while self.chan.recv_stderr_ready():
            data = self.chan.recv_stderr(65536)
            self.stderr += data
            *lines, self._stderr_line = (self._stderr_line + data).split(b"\n")
            if lines:
                self.log("<2", lines, time.monotonic())

    def _finish(self) -> None:
        if not (self.stalled or self.lost or self.stopped) and self.chan.status_event.wait(self.limit()[0]):
            self._read_stderr()
            status = self.chan.exit_status
            self.exit_status = None if status == -1 else status
        if self._stderr_line:
            self.log("<2", [self._stderr_line], time.monotonic())
        self.lost = self.lost or not self.chan.get_transport().is_active()

    def why(self) -> str:
        if self.stalled:
            return self.stalled
        if self.lost or self.exit_status is None:
            return "connection lost"
        tail = self.stderr.decode(errors="replace").strip().splitlines()[-5:]
        return f"exit status {self.exit_status}" + (": " + " | ".join(tail) if tail else "")


class SshConnection:
    """An SSH connection to `board`, opened at the first call (see the module docstring)."""

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
        ssh_config: Path | None = Path("~/.ssh/config"),
        log_path: str | Path | None = None,
        transfer_stall_s: float = 15.0,
        transfer_timeout_s: float = 600.0,
    ):
        self.board = board
        self.connect_timeout_s, self.command_timeout_s = connect_timeout_s, command_timeout_s
        self.transfer_stall_s, self.transfer_timeout_s = transfer_stall_s, transfer_timeout_s
        self.log_path = Path(log_path or Path("reports") / "logs" / f"{board}-ssh.log").resolve()
        config = self._ssh_config(host, ssh_config)
        self.host: str = config.get("hostname", host)
        self.port = int(port or config.get("port", 22))
        self.user: str = user or config.get("user") or pwd.getpwuid(os.getuid()).pw_name  # as ssh: not $USER
        candidates = ([key] if key else []) + config.get("identityfile", [])
        self.keys = [str(Path(k).expanduser()) for k in candidates if Path(k).expanduser().exists()]
        default_known = config.get("userknownhostsfile", "~/.ssh/known_hosts").split()[0]
        self.known_hosts = Path(known_hosts or default_known).expanduser()
        self.trust_on_first_use = trust_on_first_use
        self.proxy_command: str | None = config.get("proxycommand")
        self._client: paramiko.SSHClient | None = None
        self._log: IO[str] | None = None
        self._home: str | None = None

    @staticmethod
    def _ssh_config(host: str, path: Path | None) -> dict[str, Any]:
        if path is None or not Path(path).expanduser().exists():
            return {}
        return dict(paramiko.SSHConfig.from_path(str(Path(path).expanduser())).lookup(host))

    def keyscan_command(self, key: paramiko.PKey) -> str:
        return (
            f"ssh-keyscan -p {self.port} -t {_keyscan_type(key)} {shlex.quote(self.host)} "
            f">> {shlex.quote(str(self.known_hosts))}"
        )

    # ------------------------------------------------------------------ log and errors

    def _logfile(self) -> IO[str]:
        if self._log is None:
            try:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                self._log = open(self.log_path, "a")  # noqa: SIM115 (kept open until close())
            except OSError as exc:
                raise RemoteError(self.board, f"open log {self.log_path}", str(exc)) from None
            self._log.write(f"{time.monotonic():.6f} -- log opened; host time {datetime.now().isoformat()}\n")
        return self._log

    def event(self, what: str, mark: str = "--") -> None:
        """One line in the log: `mark` is `->` for what was sent, `--` for an event."""
        self._logfile().write(f"{time.monotonic():.6f} {mark} {what}\n")

    def log_lines(self, mark: str, lines: Sequence[bytes | str], t: float) -> None:
        """Lines that came back (bytes, logged as their repr) or notes about them (str), arrived at `t`."""
        self._logfile().write(
            "".join(
                f"{t:.6f} {mark} {line!r}\n" if isinstance(line, bytes) else f"{t:.6f} {mark} {line}\n"
                for line in lines
            )
        )

    def flush_log(self) -> None:
        self._logfile().flush()

    def fail(self, exc: _E) -> _E:
        """`exc` (which names the log), logged."""
        self.event(f"error: {exc.action}: {exc.seen}")
        self.flush_log()
        return exc

    def error(self, action: str, seen: str) -> RemoteError:
        return self.fail(RemoteError(self.board, action, seen, log=str(self.log_path)))

    # ------------------------------------------------------------------ connection

    def connect(self) -> paramiko.SSHClient:
        """The open connection, (re)connecting when there is none; bounded by connect_timeout_s."""
        client = self._client
        if client is not None and (transport := client.get_transport()) is not None and transport.is_active():
            return client
        self._drop()
        where = f"connect to {self.user}@{self.host}:{self.port}"
        self.event(where)
        with step(self.board, "connect", f"{self.user}@{self.host}:{self.port}"):
            return self._connect(where)

    def _connect(self, where: str) -> paramiko.SSHClient:
        """A new connection, its host key checked (see `connect`)."""
        client = paramiko.SSHClient()
        if self.known_hosts.exists():
            client.load_host_keys(str(self.known_hosts))
        client.set_missing_host_key_policy(_HostKeyPolicy(self, self.known_hosts, self.trust_on_first_use))
        t = self.connect_timeout_s
        try:  # key_filename: paramiko takes a list of files too, where its stubs say str
            client.connect(
                self.host,
                self.port,
                self.user,
                key_filename=self.keys or None,  # type: ignore[arg-type]
                timeout=t,
                banner_timeout=t,
                auth_timeout=t,
                channel_timeout=t,
                sock=paramiko.ProxyCommand(self.proxy_command) if self.proxy_command else None,
            )
            transport = _transport(client)
        except paramiko.BadHostKeyException as exc:
            client.close()
            known = f"[{self.host}]:{self.port}" if self.port != 22 else self.host
            raise self.error(
                where,
                (
                    f"HOST KEY CHANGED: {self.known_hosts} has {exc.expected_key.get_name()} "
                    f"{exc.expected_key.fingerprint}, the board offered "
                    f"{exc.key.get_name()} {exc.key.fingerprint}. "
                    f"If the board was reinstalled, forget the old key with: ssh-keygen -f "
                    f"{shlex.quote(str(self.known_hosts))} -R {shlex.quote(known)} and trust the new one with: "
                    f"{self.keyscan_command(exc.key)}"
                ),
            ) from None
        except RemoteError:
            client.close()
            raise
        except paramiko.AuthenticationException as exc:
            client.close()
            raise self.error(where, f"{exc} ({self._credentials()})") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            client.close()
            seen = f"{type(exc).__name__}: {exc}"
            if "authentication methods" in str(exc):
                seen += f" ({self._credentials()})"
            raise self.error(where, seen) from None
        transport.set_keepalive(KEEPALIVE_S)
        self._client = client
        self.event("connected")
        return client

    def _credentials(self) -> str:
        keys = ", ".join(self.keys) or "none in lab.yaml or ~/.ssh/config"
        agent = "the agent at $SSH_AUTH_SOCK" if os.environ.get("SSH_AUTH_SOCK") else "no agent (unset)"
        return f"keys tried: {keys}, ~/.ssh/id_*; {agent}"

    def _drop(self) -> None:
        """Close the connection (the next call reconnects)."""
        if self._client is not None:
            self._client.close()
            self._client = None
            self.event("connection closed")

    def close(self) -> None:
        self._drop()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _channel(self, action: str) -> paramiko.Channel:
        """A new session. A connection found dead (a dropped link, a rebooted board) is re-established
        once: the transport may not have noticed yet."""

        def open_session() -> paramiko.Channel:
            return _transport(self.connect()).open_session(timeout=self.connect_timeout_s)

        try:
            return open_session()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            self.event(f"session refused ({type(exc).__name__}: {exc}); reconnecting")
            self._drop()
        try:
            return open_session()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise self.error(action, f"cannot open a session: {type(exc).__name__}: {exc}") from None

    @contextmanager
    def _guard(self, action: str, chan: paramiko.Channel, what: str) -> Iterator[Watchdog]:
        """A transfer on `chan`'s connection under a watchdog: a stall, an overrun or a broken link is a
        RemoteError naming what was moving and the bytes sent. A missing remote file is the caller's."""
        dog = Watchdog(chan.get_transport(), self.transfer_stall_s, self.transfer_timeout_s, what)
        try:
            yield dog
        except (EOFError, OSError, paramiko.SSHException) as exc:
            if dog.tripped is None and isinstance(exc, FileNotFoundError):
                raise
            raise self.error(action, dog.describe(exc)) from None
        finally:
            dog.stop()

    # ------------------------------------------------------------------ commands

    def stream(
        self,
        command: str,
        stdin: bytes | None,
        action: str,
        stop: threading.Event | None = None,
        limit: Bound | None = None,
    ) -> Stream:
        """Start `command`, send it `stdin` (then EOF), and return its output stream."""
        chan = self._channel(action)
        self.event(command + (f"  < {len(stdin)} bytes" if stdin is not None else ""), "->")
        sent_s = time.monotonic()
        with self._guard(action, chan, f"start {command!r}") as dog:
            chan.exec_command(command)
            if stdin is not None:
                dog.task("its input", len(stdin))
                try:
                    for pos in range(0, len(stdin), _CHUNK):
                        chan.sendall(stdin[pos : pos + _CHUNK])
                        dog.sent(min(pos + _CHUNK, len(stdin)))
                    chan.shutdown_write()
                except OSError:
                    if dog.tripped:
                        raise
                    # else the command ended before reading its input; its exit status says why
        default = (self.command_timeout_s, f"no output for {self.command_timeout_s:g} s (command timeout)")
        return Stream(chan, sent_s, limit or (lambda: default), self.log_lines, stop)

    def execute(self, argv: list[str], stdin: bytes | None = None) -> CommandResult:
        """Run one command (arguments quoted, never interpreted by the remote shell)."""
        return self.shell(shlex.join(argv), stdin, f"run {argv[0]}")

    def shell(self, command: str, stdin: bytes | None, action: str) -> CommandResult:
        """Run `command` through the remote shell to its end."""
        stream = self.stream(command, stdin, action)
        out = b"".join(line + b"\n" for line, _ in stream) + stream.tail
        if stream.exit_status is None:
            raise self.error(action, stream.why())
        self.event(f"exit status {stream.exit_status}")
        self.flush_log()
        return CommandResult(stream.exit_status, out, bytes(stream.stderr))

    def remote_sha256(self, paths: list[str]) -> list[str | None]:
        """sha256 of each remote file (None where it is missing), in one round trip."""
        loop = " ".join(shlex.quote(p) for p in paths)
        result = self.shell(
            f'for f in {loop}; do sha256sum 2>/dev/null < "$f" || echo -; done', None, "hash deployed files"
        )
        digests = [line.split()[0].decode() for line in result.stdout.splitlines() if line.strip()]
        if result.exit_status != 0 or len(digests) != len(paths):
            raise self.error(
                "hash deployed files",
                f"sha256sum gave {result.stdout!r} {result.stderr.decode(errors='replace').strip()}",
            )
        return [None if d == "-" else d for d in digests]

    # ------------------------------------------------------------------ files

    @property
    def home(self) -> str:
        """The login directory on the board (where SFTP starts)."""
        if self._home is None:
            with self.sftp("find home") as (sftp, _):
                self._home = sftp.normalize(".")
        return self._home

    @contextmanager
    def sftp(self, action: str) -> Iterator[tuple[paramiko.SFTPClient, Watchdog]]:
        """An SFTP session under a watchdog (see `_guard`)."""
        chan = self._channel(action)
        self.event(f"sftp session ({action})", "->")
        with self._guard(action, chan, "SFTP session") as dog:
            chan.invoke_subsystem("sftp")
            # _Counted passes for the Channel it wraps (SFTPClient only sends and receives on it)
            with paramiko.SFTPClient(cast(paramiko.Channel, _Counted(chan, dog.moved))) as sftp:
                yield sftp, dog
        self.flush_log()

    def upload(self, sftp: paramiko.SFTPClient, dog: Watchdog, path: Path, remote: str) -> None:
        """Write beside the target, then rename over it, so a broken upload never looks deployed."""
        with step(self.board, "upload", f"{path.name} ({path.stat().st_size} bytes)"):
            self._upload_file(sftp, dog, path, remote)

    def _upload_file(self, sftp: paramiko.SFTPClient, dog: Watchdog, path: Path, remote: str) -> None:
        self._mkdirs(sftp, posixpath.dirname(remote))
        part, size = remote + ".part", path.stat().st_size
        self.event(f"sftp put {path} -> {part} ({size} bytes)", "->")
        dog.task(f"upload of {path.name} to {remote}", size)
        sftp.put(str(path), part, callback=lambda done, _: dog.sent(done))
        sftp.posix_rename(part, remote)
        self.event(f"uploaded {remote}")

    @staticmethod
    def _mkdirs(sftp: paramiko.SFTPClient, path: str) -> None:
        parts = path.split("/")
        for i in range(2, len(parts) + 1):
            prefix = "/".join(parts[:i])
            try:
                sftp.stat(prefix)
            except FileNotFoundError:
                sftp.mkdir(prefix)
