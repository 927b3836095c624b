"""Install once, measure once: the orchestration both front doors run (the pytest plugin's fixtures and
`labbench measure`).

A `Bench` puts each payload on a board at most once per run (the drivers also skip bytes the board
already holds) and measures each (board, payload) once; every test or command that needs the result
shares it. Each board step goes through a `StepRunner`: the pytest plugin's runs it with bounded
recovery and quarantine, `labbench measure` plainly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from labbench.errors import LabbenchError

if TYPE_CHECKING:
    from labbench.board import Board
    from labbench.capabilities import DutIdentity, InstallRecord
    from labbench.measure.run import Outcome, RunSettings
    from labbench.payloads import Payload

T = TypeVar("T")


class StepRunner(Protocol):
    """Runs one board step `fn` named `step` (e.g. with recovery); returns what `fn` returns."""

    def __call__(self, board: Board, step: str, fn: Callable[[], T]) -> T: ...


def plainly(board: Board, step: str, fn: Callable[[], T]) -> T:
    """A StepRunner without recovery: the step once."""
    return fn()


class NotDeployable(LabbenchError):
    """The payload does not fit the board (the catalog's memory sizes): a skip, not a fault."""


def not_deployable(board: Board, payload: Payload) -> str | None:
    """Why `payload` cannot go on `board` (the catalog's sizes), or None when it fits."""
    from labbench.modelinfo import min_arena_bytes

    why = board.family.fits(payload.info.size_bytes, min_arena_bytes(payload.path))
    return f"{payload.name} is not deployable on {board.name}: {why}" if why else None


@dataclass
class Bench:
    """Each (board, payload) installed and measured once per run; `say` hears the progress."""

    settings: RunSettings
    build_dir: Path = Path("build")
    say: Callable[[str], None] = lambda line: None
    installed: dict[str, tuple[str, InstallRecord]] = field(
        default_factory=dict
    )  # board -> (payload, record)
    outcomes: dict[tuple[str, str], Outcome] = field(default_factory=dict)

    def install(self, board: Board, payload: Payload, run: StepRunner = plainly) -> InstallRecord:
        """Make `payload` what the board runs; NotDeployable when it cannot fit."""
        held = self.installed.get(board.name)
        if held is None or held[0] != payload.name:
            if why := not_deployable(board, payload):
                raise NotDeployable(why)
            self.say(f"  {board.name}: installing {payload.name}")
            record = run(
                board,
                f"install {payload.name}",
                lambda: board.install(payload.path, payload.dataset, self.build_dir),
            )
            self.installed[board.name] = (payload.name, record)
        return self.installed[board.name][1]

    def measure(self, board: Board, payload: Payload, run: StepRunner = plainly) -> Outcome:
        """`payload` installed on `board` and measured (labbench.measure.run.measure), once."""
        from labbench.measure.run import measure

        key = (board.name, payload.name)
        if key not in self.outcomes:
            record = self.install(board, payload, run)
            extra: dict[str, Any] = {"install": record.provenance()}
            self.outcomes[key] = run(
                board,
                f"measure {payload.name}",
                lambda: measure(
                    board,
                    payload,
                    self.settings,
                    firmware_sha256=record.firmware_sha256,
                    extra=extra,
                    progress=lambda step: self.say(f"  {board.name} / {payload.name}: {step}"),
                ),
            )
        return self.outcomes[key]

    def identify(self, board: Board, run: StepRunner = plainly) -> DutIdentity:
        return run(board, "identify", board.target.identify)
