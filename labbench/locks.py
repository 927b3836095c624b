"""Locks on the physical things a board is attached to, so no two sessions drive one board or one
instrument channel, whatever names their lab files give them.

A lock is keyed on what the name reaches, never on the board's name:

- a serial device by its real path (`/dev/serial/by-id/...` and the `/dev/ttyUSB0` it links to are
  one lock); `spy://` and `alt://` by the port they wrap;
- a network endpoint (`rfc2217://`, `socket://`, SSH, a VISA `TCPIP::...::SOCKET` or VXI-11 resource)
  by each address its host resolves to and the port: every loopback or unspecified address is
  `localhost` (`localhost`, `127.0.0.1` and `::1` are one host), an IPv4-mapped IPv6 address is its
  IPv4 one, the URL scheme and query options (`?ign_set_control`) are ignored. A host name that does
  not resolve within `RESOLVE_TIMEOUT_S` is keyed on its lowercased name, with a warning;
- any other VISA resource by its upper-cased text (`GPIB::12` is `GPIB0::12::INSTR`); a board's
  power instrument is locked per channel, so two channels of one analyzer may be used at once.

Locks are `flock`s on files in `lock_dir()` ($LABBENCH_LOCK_DIR, read at each call): the kernel drops
them when their process dies, so a file left behind is never stale. The holder writes who it is into
the file (JSON), and `BoardBusy` quotes it.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import getpass
import hashlib
import ipaddress
import json
import os
import re
import socket
import threading
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

from labbench.errors import BoardBusy

RESOLVE_TIMEOUT_S = 2.0
_VISA_CLASSES = {"INSTR", "SOCKET", "RAW", "INTFC", "BACKPLANE", "SERVANT", "MEMACC"}


@dataclass(frozen=True)
class Key:
    """What one lock stands for: `id` names the lock file, `address` is how messages show it."""

    id: str
    address: str


def lock_dir() -> Path:
    return Path(os.environ.get("LABBENCH_LOCK_DIR") or Path.home() / ".cache" / "labbench" / "locks")


def lock_file(key: Key) -> Path:
    """The lock file of `key`: a readable slug of the key and a digest of it."""
    slug = re.sub(r"[^A-Za-z0-9.-]+", "_", key.id).strip("_")[:60]
    return lock_dir() / f"{slug}-{hashlib.sha256(key.id.encode()).hexdigest()[:12]}.lock"


# --- keys --------------------------------------------------------------------------------------------


def serial_keys(url: str) -> list[Key]:
    """The keys of a pyserial port: a device path, `COMn`, or a URL."""
    if "://" not in url:
        if re.fullmatch(r"COM\d+", url, re.IGNORECASE):
            return [Key(f"serial:{url.upper()}", url.upper())]
        path = os.path.realpath(url)
        return [Key(f"serial:{path}", url if path == url else f"{url} (= {path})")]
    split = urlsplit(url)
    scheme = split.scheme.lower()
    if scheme in ("spy", "alt"):
        return serial_keys(url.split("://", 1)[1].split("?", 1)[0])
    try:
        port = split.port
    except ValueError:
        port = None
    if scheme in ("rfc2217", "socket") and split.hostname and port is not None:
        return network_keys(split.hostname, port, f"{scheme}://{host_text(split.hostname)}:{port}")
    bare = url.split("?", 1)[0]
    return [Key(f"serial:{bare}", bare)]


def network_keys(host: str, port: int | str, address: str) -> list[Key]:
    """One key per address `host` resolves to, at `port` (a TCP port, or a VXI-11 device name)."""
    return [Key(f"tcp:{a}:{port}", address) for a in host_ids(host)]


def instrument_keys(resource: str, channel: int) -> list[Key]:
    """The keys of one channel of the instrument at VISA `resource`."""
    return [Key(f"{k.id}#ch{channel}", f"channel {channel} of {k.address}") for k in resource_keys(resource)]


def resource_keys(resource: str) -> list[Key]:
    """The keys of a VISA resource: network ones by host (and port or device), serial ones by port."""
    first, *fields = resource.strip().split("::")
    cls = fields.pop().upper() if fields and fields[-1].upper() in _VISA_CLASSES else "INSTR"
    m = re.fullmatch(r"([A-Za-z-]+)(.*)", first)
    iface, board = (m.group(1).upper(), m.group(2)) if m else (first.upper(), "")
    if iface == "TCPIP" and fields:  # the board number picks a network card: the instrument is the same
        host = fields[0]
        port = fields[1] if len(fields) > 1 else "inst0"  # a SOCKET port or a VXI-11 device name
        shown = "::".join(["TCPIP", host_text(host), *fields[1:], cls])
        return network_keys(host, port.lower(), shown)
    if iface == "ASRL" and not fields:
        if board.startswith("/"):
            return serial_keys(board)
        return [Key(f"serial:ASRL{board}", f"ASRL{board}::{cls}")]
    canonical = "::".join([iface + (board or "0"), *fields, cls]).upper()
    return [Key(f"visa:{canonical}", canonical)]


def host_text(host: str) -> str:
    """`host` as written in a URL: lowercased, IPv6 literals in brackets."""
    host = host.strip("[]").lower()
    return f"[{host}]" if ":" in host else host


@lru_cache(maxsize=256)
def host_ids(host: str) -> tuple[str, ...]:
    """The canonical addresses `host` resolves to (see the module docstring), or its lowercased name
    with a warning when it does not resolve in time. Cached for the life of the process."""
    name = host.strip("[]").rstrip(".").lower()
    try:
        return (_canonical(ipaddress.ip_address(name)),)
    except ValueError:
        pass
    addresses, why = _resolve(name)
    ids = sorted({_canonical(ipaddress.ip_address(address)) for address in addresses or ()})
    if not ids:
        warnings.warn(
            f"labbench locks: cannot resolve host {name!r} ({why}): its locks are keyed on the name, "
            "so another name for the same host is not excluded",
            stacklevel=2,
        )
        return (name,)
    return tuple(ids)


def _canonical(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if ip.is_loopback or ip.is_unspecified:
        return "localhost"
    return f"[{ip.compressed}]" if ip.version == 6 else ip.compressed


def _resolve(name: str) -> tuple[list[str] | None, str]:
    """The addresses getaddrinfo gives for `name` (None when it fails) and why it failed, bounded by
    RESOLVE_TIMEOUT_S (a daemon thread: a hung resolver never holds up exit)."""
    out: list[tuple[list[str] | None, str]] = []

    def run() -> None:
        try:
            infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as e:
            out.append((None, str(e) or type(e).__name__))
            return
        out.append(([str(info[4][0]) for info in infos], ""))

    thread = threading.Thread(target=run, name=f"resolve {name}", daemon=True)
    thread.start()
    thread.join(RESOLVE_TIMEOUT_S)
    return out[0] if out else (None, f"no answer within {RESOLVE_TIMEOUT_S:g} s")


# --- taking and releasing ----------------------------------------------------------------------------


def acquire(keys: list[Key], board: str, lab: Path | str) -> list[int]:
    """Lock every key (non-blocking, all or none) for `board` of lab file `lab`; returns the open lock
    files for `release`. BoardBusy names the first key already held and its holder."""
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "user": _user(),
        "lab": str(lab),
        "board": board,
        "since": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    fds: list[int] = []
    try:
        for key in {k.id: k for k in keys}.values():  # in the caller's order: the board's link first
            path = lock_file(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(os.pread(fd, 4096, 0), key)
                os.close(fd)
                raise BoardBusy(
                    f"{board}: acquire: {key.address} is held by {holder} (lock file {path})"
                ) from None
            fds.append(fd)
            data = json.dumps({**record, "address": key.address}).encode()
            os.pwrite(fd, data, 0)  # then cut: a reader never sees an empty file
            os.ftruncate(fd, len(data))
    except BaseException:
        release(fds)
        raise
    return fds


def release(fds: list[int]) -> None:
    for fd in fds:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    fds.clear()


def _holder(data: bytes, key: Key) -> str:
    """Who holds a lock, from its file; a clear phrase when the file names no one."""
    text = data.decode(errors="replace").strip()
    try:
        h = json.loads(text)
        if not isinstance(h, dict) or "pid" not in h:
            raise ValueError
    except ValueError:
        seen = "is empty" if not text else f"names no holder ({text[:80]!r})"
        return f"another process (its lock file {seen})"
    as_ = f", as {h['address']}" if h.get("address", key.address) != key.address else ""
    return (
        f"pid {h['pid']} on host {h.get('host', '?')} (board {h.get('board', '?')} of {h.get('lab', '?')}{as_})"
        f" since {h.get('since', '?')}"
    )


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
