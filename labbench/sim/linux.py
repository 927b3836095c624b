"""A simulated Linux board (Raspberry Pi 4B, Jetson Orin Nano): a real OpenSSH sshd on loopback.

`start()` runs `/usr/sbin/sshd -D -f <own config> -e` as the invoking user, with a host key,
authorized_keys (the public half of the lab's client key, generated if missing) and a home
directory of its own, all under `state_dir`; it writes the host key into the lab's known_hosts, so
strict host-key checking works out of the box. `ssh`, `scp`, `sftp` and paramiko all work.

The board's home: sshd takes the login directory from the passwd database, and without root it
cannot chroot or switch users. It is therefore started with nss_wrapper (Debian's libnss-wrapper,
the cwrap library made for testing servers without root) preloaded and pointed at a passwd file of
its own, in which the board's account (named as lab.yaml's `user`, so `pi@` works whoever runs the
lab; by default the invoking user's account name, as ssh uses) has the invoking user's uid and
`state_dir/home` as its home. sshd then does what it does on a real board: chdir to that home, set
HOME, and start SFTP there; no ForceCommand or shell wrapper.
Every value written into passwd, sshd_config or the `python3` wrapper is checked or quoted: the
board's name is a lab NAME, the host a host name or address and the user an account name (USER_NAME);
the state directory holds no `:` (passwd's and PATH's separator) nor a control character; sshd_config
arguments are double-quoted as sshd reads them (`%` doubled where sshd expands tokens), and the
interpreter's path is shell-quoted.
The preload stays inside sshd: sessions get sshd's fresh environment, in which PATH starts with
`state_dir/bin`, holding the board's `python3` (a wrapper around the interpreter given, by default
the one running the lab, which has numpy and ai-edge-litert). When the invoking user is root, sshd
insists on privilege separation, so start() also creates /run/sshd (the distribution's standard
empty directory; left in place, as the system sshd uses it too) and lists the `sshd` account.

Power: a thread reads the CPU time of sshd's whole process tree from /proc every `sample_period_s`
(times of exited processes stay counted through their parents' cutime/cstime) and posts
idle_w + (active_w - idle_w) x utilisation to the bus channel, timestamped on time.monotonic().
Utilisation is CPU seconds per second, capped at 1: the family's active_w is the board running
inferences back to back, which is what one busy core of the runner does (CPU time a period shows
beyond its length, tick rounding mostly, is carried into the next). The value posted at t is the
mean over the period that ended at t (the bus is never rewritten after the fact), so the draw lags
the load by one period: 20 ms by default, short beside the bench's windows and guards (the runner's
start-up, the bulk of a run's CPU outside it, spills that much into a window that follows it). While
one of the board's offloads is in flight (its `radio`), the board draws its link's power instead of
idle (sim/radio.py), for the share of the period it was. Every level posted
carries powerbus.LevelNoise of `power_noise_pct` % (default POWER_NOISE_PCT; 0: exact levels), drawn
from `seed` (default: the board's name), as the simulated MCU boards' do.
"""

from __future__ import annotations

import fcntl
import glob
import grp
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from labbench.errors import HardwareError
from labbench.inventory import NAME, USER_NAME, host_problem
from labbench.sim.powerbus import POWER_NOISE_PCT, LevelNoise, derive_seed

if TYPE_CHECKING:
    from labbench.sim.radio import Radio

SSHD = "/usr/sbin/sshd"
NSS_WRAPPER_GLOBS = (
    "/usr/lib/*/libnss_wrapper.so*",
    "/usr/lib/libnss_wrapper.so*",
    "/usr/lib64/libnss_wrapper.so*",
    "/usr/local/lib/libnss_wrapper.so*",
)
PRIVSEP_DIR = Path("/run/sshd")
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class SimBoardError(HardwareError):
    """A simulated board could not be started or stopped."""


def find_nss_wrapper() -> str:
    for pattern in NSS_WRAPPER_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    raise FileNotFoundError("libnss_wrapper.so not found (install Debian's libnss-wrapper)")


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on `directory` (created if missing), for files several boards share."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure_client_key(key: Path) -> str:
    """The public half of `key` (an OpenSSH ed25519 key pair, generated if missing)."""
    with _locked(key.parent):
        if not key.exists():
            key.parent.chmod(0o700)
            subprocess.run(
                [
                    "ssh-keygen",
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    "labbench simulated lab",
                    "-f",
                    str(key),
                ],
                check=True,
                capture_output=True,
            )
        pub = key.with_name(key.name + ".pub")
        if not pub.exists():
            pub.write_bytes(
                subprocess.run(["ssh-keygen", "-y", "-f", str(key)], check=True, capture_output=True).stdout
            )
        return pub.read_text().strip()


def known_hosts_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def set_known_host(known_hosts: Path, name: str, line: str | None) -> None:
    """Replace the lines for host `name` in known_hosts with `line` (None: just remove them)."""
    with _locked(known_hosts.parent):
        old = known_hosts.read_text().splitlines() if known_hosts.exists() else []
        kept = [entry for entry in old if name not in entry.split(" ", 1)[0].split(",")]
        known_hosts.write_text("".join(f"{entry}\n" for entry in kept + ([line] if line else [])))


def cpu_times_s(root: int) -> tuple[float, list[int]]:
    """CPU seconds of `root`'s process tree (exited members included) and its pids, root first.

    The tree is walked from `root` through each process's main-thread `children` file (Linux 3.5+
    with CONFIG_PROC_CHILDREN, as Debian's kernels have; sshd, the shells and the runner fork from
    their main threads), so a sample reads a handful of files, not all of
    /proc (which took ~2 ms per sample and held the lab daemon's interpreter, stretching the other
    simulators' timing); without those files, it scans /proc."""
    if not Path(f"/proc/{root}/task/{root}/children").exists():
        return _cpu_times_scan(root)
    tree, total, i = [root], 0.0, 0
    while i < len(tree):
        pid = tree[i]
        i += 1
        try:
            total += _stat(pid)[1]
            tree += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except (OSError, ValueError):
            continue  # exited while walking: its time is in its parent's cutime/cstime once reaped
    return total, tree


def _stat(pid: int) -> tuple[int, float]:
    """(parent pid, CPU seconds of itself and its reaped children) from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rfind(")") + 2 :].split()
    return int(fields[1]), sum(int(v) for v in fields[11:15]) / _CLK_TCK


def _cpu_times_scan(root: int) -> tuple[float, list[int]]:
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stats[int(entry)] = _stat(int(entry))
        except OSError:
            continue  # exited while listing
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    tree, i = ([root] if root in stats else []), 0
    while i < len(tree):
        tree += children.get(tree[i], [])
        i += 1
    return sum(stats[p][1] for p in tree), tree


class SimLinuxBoard:
    """One simulated Linux board: its own sshd on host:port, and its power on a bus channel."""

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        family: Any,
        bus_channel: Any,
        user: str | None = None,
        key: Path | None = None,
        known_hosts: Path | None = None,
        power_mode: str | None = None,
        state_dir: Path | None = None,
        python: str = sys.executable,
        sample_period_s: float = 0.02,
        seed: int | str | None = None,
        power_noise_pct: float = POWER_NOISE_PCT,
        radio: Radio | None = None,
    ):
        if not NAME.fullmatch(name):  # it names the state directory and is written into passwd
            raise SimBoardError(repr(name), "create the board", "not a board name (letters, digits, _ or -)")
        if problem := host_problem(host, ssh=True):
            raise SimBoardError(name, "listen", problem)
        self.name, self.host, self.port, self.family = name, host, port, family
        self.channel, self.power_mode = bus_channel, power_mode
        _, self.power = family.profile(power_mode)
        self.user = user or pwd.getpwuid(os.getuid()).pw_name
        if not USER_NAME.fullmatch(self.user):  # it is written into passwd and sshd_config
            raise SimBoardError(name, "create its account", f"{self.user!r} is not a valid user name")
        self.key = Path(key) if key else None
        self.known_hosts = Path(known_hosts) if known_hosts else None
        self.state_dir = _checked_state_dir(name, Path(state_dir).absolute()) if state_dir else None
        self.python, self.sample_period_s, self.radio = python, sample_period_s, radio
        self.power_noise = LevelNoise(power_noise_pct, derive_seed(name if seed is None else seed, "power"))
        self._proc: subprocess.Popen | None = None
        self._sampler: threading.Thread | None = None
        self._stopping = threading.Event()

    def __repr__(self) -> str:
        return f"SimLinuxBoard({self.name!r}, {self.user}@{self.host}:{self.port})"

    @property
    def home(self) -> Path:
        return self._state_dir / "home"

    @property
    def _state_dir(self) -> Path:
        """`state_dir`, which start() creates when it was not given."""
        assert self.state_dir is not None, f"{self.name}: no state directory before start()"
        return self.state_dir

    @property
    def _sshd(self) -> subprocess.Popen:
        """The sshd listener, from start() until stop()."""
        assert self._proc is not None, f"{self.name}: sshd is not running"
        return self._proc

    def pids(self) -> list[int]:
        """The sshd listener (the root of every process the board runs)."""
        return [self._proc.pid] if self._proc and self._proc.poll() is None else []

    def session_pids(self) -> list[int]:
        """The sshd processes serving connections right now (children of the listener's tree)."""
        listener = self.pids()
        if not listener:
            return []
        _, tree = cpu_times_s(listener[0])
        return [p for p in tree[1:] if _comm(p) == "sshd"]

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        if self.state_dir is None:
            self.state_dir = Path(tempfile.mkdtemp(prefix=f"labbench-{self.name}-"))
            _checked_state_dir(self.name, self.state_dir)
        elif self.state_dir.exists():
            shutil.rmtree(self.state_dir)
        etc = self.state_dir / "etc"
        for d in (etc, self.home, self.state_dir / "bin"):
            d.mkdir(parents=True, exist_ok=True)
        try:
            env = self._prepare(etc)
            with open(self.state_dir / "sshd.log", "wb") as log:
                self._proc = subprocess.Popen(
                    [SSHD, "-D", "-f", str(etc / "sshd_config"), "-e"],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            self._wait_listening()
        except BaseException:
            self._halt()  # state_dir stays, with sshd.log, until the next start or stop
            raise
        self.channel.set_power(self.power.idle_w, noise=self.power_noise)
        self._stopping.clear()
        self._sampler = threading.Thread(target=self._sample, name=f"{self.name}-power", daemon=True)
        self._sampler.start()

    def _prepare(self, etc: Path) -> dict[str, str]:
        """Keys, account files, config and the board's python3; returns sshd's environment."""
        try:
            nss_wrapper = find_nss_wrapper()
        except FileNotFoundError as exc:
            raise SimBoardError(self.name, "start sshd", str(exc)) from None
        if not os.access(SSHD, os.X_OK):
            raise SimBoardError(self.name, "start sshd", f"no {SSHD} (install Debian's openssh-server)")
        host_key = etc / "ssh_host_ed25519_key"
        subprocess.run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                f"{self.name} (simulated)",
                "-f",
                str(host_key),
            ],
            check=True,
            capture_output=True,
        )
        authorized = ensure_client_key(self.key) if self.key else ""
        (etc / "authorized_keys").write_text(authorized + "\n")
        self._write_accounts(etc)
        python3 = self._state_dir / "bin" / "python3"
        python3.write_text(f'#!/bin/sh\nexec {shlex.quote(self.python)} "$@"\n')
        python3.chmod(0o755)
        (etc / "sshd_config").write_text(self._config(etc))
        if self.known_hosts:
            public = (etc / "ssh_host_ed25519_key.pub").read_text().split()
            name = known_hosts_name(self.host, self.port)
            set_known_host(self.known_hosts, name, f"{name} {public[0]} {public[1]}")
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "LD_PRELOAD": nss_wrapper,
            "NSS_WRAPPER_PASSWD": str(etc / "passwd"),
            "NSS_WRAPPER_GROUP": str(etc / "group"),
        }

    def _write_accounts(self, etc: Path) -> None:
        """passwd/group as sshd sees them: the board's account (the invoking uid, our home) and, when
        sshd runs as root, its privilege-separation account."""
        me = pwd.getpwuid(os.getuid())
        shell = me.pw_shell if not me.pw_shell.endswith(("nologin", "false")) else "/bin/sh"
        passwd = [f"{self.user}:x:{me.pw_uid}:{me.pw_gid}:{self.name} (simulated):{self.home}:{shell}"]
        group = [f"{_group_name(me.pw_gid)}:x:{me.pw_gid}:"]
        if os.getuid() == 0:
            PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
            sshd = pwd.getpwnam("sshd")
            passwd.append(f"sshd:x:{sshd.pw_uid}:{sshd.pw_gid}::{PRIVSEP_DIR}:/usr/sbin/nologin")
            if sshd.pw_gid != me.pw_gid:
                group.append(f"{_group_name(sshd.pw_gid)}:x:{sshd.pw_gid}:")
        (etc / "passwd").write_text("\n".join(passwd) + "\n")
        (etc / "group").write_text("\n".join(group) + "\n")

    def _config(self, etc: Path) -> str:
        path = f"{self._state_dir / 'bin'}:/usr/local/bin:/usr/bin:/bin"
        family = _CONTROL.sub(" ", self.family.display_name)  # in a comment: a line break would end it
        authorized = str(etc / "authorized_keys").replace("%", "%%")  # sshd expands %h, %u there
        return "\n".join(
            [
                f"# {self.name}: simulated {family} (labbench)",
                f"Port {int(self.port)}",
                f"ListenAddress {sshd_quote(self.host)}",
                f"HostKey {sshd_quote(etc / 'ssh_host_ed25519_key')}",
                f"PidFile {sshd_quote(self._state_dir / 'sshd.pid')}",
                f"AuthorizedKeysFile {sshd_quote(authorized)}",
                f"AllowUsers {sshd_quote(self.user)}",
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "StrictModes no",  # the state directory may sit under a world-writable /tmp
                "UseDNS no",
                "PrintMotd no",
                "PrintLastLog no",
                "X11Forwarding no",
                f"SetEnv {sshd_quote(f'PATH={path}')}",
                "Subsystem sftp internal-sftp",
                "",
            ]
        )

    def _wait_listening(self, timeout_s: float = 10.0) -> None:
        log = self._state_dir / "sshd.log"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            if "Server listening on" in text:
                return
            if self._sshd.poll() is not None:
                raise SimBoardError(
                    self.name,
                    f"start sshd on {self.host}:{self.port}",
                    f"exited with status {self._sshd.returncode}: {text.strip()[-600:]}",
                    str(log),
                )
            time.sleep(0.02)
        raise SimBoardError(
            self.name,
            f"start sshd on {self.host}:{self.port}",
            f"not listening after {timeout_s:g} s",
            str(log),
        )

    # ------------------------------------------------------------------ power

    def _sample(self) -> None:
        idle_w, active_w = self.power.idle_w, self.power.active_w
        prev_cpu_s, _ = cpu_times_s(self._sshd.pid)
        prev_t, carry_s = time.monotonic(), 0.0
        while not self._stopping.wait(self.sample_period_s):
            cpu_s, tree = cpu_times_s(self._sshd.pid)
            t = time.monotonic()
            if not tree:
                return
            busy_s = max(0.0, cpu_s - prev_cpu_s) + carry_s
            utilisation = min(1.0, busy_s / (t - prev_t))
            # CPU time is counted in clock ticks: what a period shows beyond its length is carried into
            # the next (at most one period's worth), so energy follows CPU time without the cap eating it
            carry_s = min(busy_s - utilisation * (t - prev_t), self.sample_period_s)
            power_w = idle_w + (active_w - idle_w) * utilisation
            if self.radio is not None:  # an offload in flight: the whole board draws the link's power
                power_w += (self.radio.power_w - idle_w) * self.radio.in_flight_s(prev_t, t) / (t - prev_t)
            self.channel.set_power(power_w, t, noise=self.power_noise)
            prev_cpu_s, prev_t = cpu_s, t

    # ------------------------------------------------------------------ stop

    def stop(self) -> None:
        """Kill sshd and everything it started, drop the known_hosts line, remove state_dir."""
        self._halt()
        if self.state_dir is not None and self.state_dir.exists():
            shutil.rmtree(self.state_dir)

    def _halt(self) -> None:
        self._stopping.set()
        if self._sampler is not None:
            self._sampler.join()
            self._sampler = None
            self.channel.set_power(0.0)
        if self._proc is not None:
            _, tree = cpu_times_s(self._proc.pid)
            for pid in reversed(tree[1:]):
                _kill(pid, signal.SIGKILL)
            _kill(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self.known_hosts:
            set_known_host(self.known_hosts, known_hosts_name(self.host, self.port), None)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def sshd_quote(value: str | Path) -> str:
    """`value` as one sshd_config argument: double-quoted, `\\` and `"` escaped, as sshd splits a line.
    A control character, which no quoting carries, is a ValueError."""
    text = str(value)
    if _CONTROL.search(text):
        raise ValueError(f"{text!r} has a control character: it cannot be written into sshd_config")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _checked_state_dir(board: str, path: Path) -> Path:
    """`path`, refused when it cannot be written into passwd (a home) and PATH: a `:` or a control
    character."""
    if ":" in str(path) or _CONTROL.search(str(path)):
        raise SimBoardError(
            board,
            "create its state directory",
            f"{str(path)!r} has a ':' or a control character, which passwd and PATH cannot "
            "hold: put the lab in a directory without them",
        )
    return path


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"g{gid}"


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
