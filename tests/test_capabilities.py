"""Every driver and instrument registered as an entry point implements the capability it is used for,
with the Protocol's signatures, and a board advertises only capabilities something implements."""

from __future__ import annotations

import inspect
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from labbench import board as board_module
from labbench import inventory
from labbench.board import Board
from labbench.capabilities import CAPABILITIES, Deployer, Flasher, InferenceTarget, PowerMeter
from labbench.errors import UsageError
from labbench.inventory import DRIVER_GROUP, INSTRUMENT_GROUP, registered

ROOT = Path(__file__).resolve().parents[1]
PROTOCOLS = (Flasher, Deployer, InferenceTarget, PowerMeter)


def protocol_methods(protocol: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for name, member in vars(protocol).items()
        if callable(member) and not name.startswith("_")
    }


def conforms(cls: type, protocol: type) -> list[str]:
    """What `cls` lacks of `protocol`: missing methods, or parameters its methods do not take."""
    problems = []
    for name, wanted in protocol_methods(protocol).items():
        method = getattr(cls, name, None)
        if method is None:
            problems.append(f"no {name}()")
            continue
        have = inspect.signature(method).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in have.values())
        missing = [p for p in wanted.parameters if p != "self" and p not in have and not takes_any]
        if missing:
            problems.append(f"{name}() does not take {missing}")
    return problems


@pytest.mark.parametrize("group", [DRIVER_GROUP, INSTRUMENT_GROUP])
def test_every_registered_entry_point_implements_a_capability_with_its_signatures(group):
    plugins = registered(group)
    assert plugins, f"nothing registered in {group}: is the package installed?"
    for name, entry_point in plugins.items():
        cls = entry_point.load()
        fits = {p.__name__: conforms(cls, p) for p in PROTOCOLS}
        assert any(not problems for problems in fits.values()), f"{group} {name}: {fits}"
        assert callable(getattr(cls, "from_lab", None)), f"{group} {name}: no from_lab()"


@pytest.mark.parametrize("name", list(inventory.load(ROOT / "lab.yaml").boards))
def test_each_advertised_capability_of_the_default_boards_is_served(name):
    board = Board(inventory.load(ROOT / "lab.yaml"), name)
    assert board.capabilities <= set(CAPABILITIES)
    served = {"inference": board.target}
    if "flash" in board.capabilities:
        served["flash"] = board.flasher
    if "deploy" in board.capabilities:
        served["deploy"] = board.deployer
    if "power" in board.capabilities:
        served["power"] = board.power_meter
    if "hi" in board.capabilities:  # its target offloads (hierarchical inference)
        served["hi"] = board.target
    assert set(served) == board.capabilities
    for capability, driver in served.items():
        assert isinstance(driver, CAPABILITIES[capability]), (capability, driver)
        assert not conforms(type(driver), CAPABILITIES[capability]), (capability, driver)


class NotAFlasher:
    """Registered as a flasher, but has no flash()."""

    @classmethod
    def from_lab(cls, entry, family=None):
        return cls()


def test_a_plugin_that_does_not_implement_its_capability_is_a_usage_error(monkeypatch):
    # The entry point is real but not installed: `registered` is the one thing swapped, as installing
    # a package for one test would cost seconds.
    lab = inventory.load(ROOT / "lab.yaml")
    fake = EntryPoint("esptool", f"{__name__}:NotAFlasher", DRIVER_GROUP)
    real = board_module.registered
    monkeypatch.setattr(
        board_module,
        "registered",
        lambda group: {**real(group), "esptool": fake} if group == DRIVER_GROUP else real(group),
    )
    with pytest.raises(UsageError, match=r"'esptool' \(NotAFlasher\) is not a Flasher"):
        _ = Board(lab, "esp32").flasher
