"""Idle and active power stay within the family's power profile."""

import pytest


@pytest.mark.requires("power", "inference")
def test_idle_and_active_power_within_profile(board, default_outcome):
    energy = default_outcome.measurement.energy
    _, profile = board.family.profile(board.entry.power_mode)
    # idle sits at the profile's idle figure; active between idle and the profile's active figure
    # (a model too small to keep the core busy between serial replies draws less than active_w)
    tolerance = 0.15
    assert energy.idle_power_w == pytest.approx(profile.idle_w, rel=tolerance), (
        f"{board.name}: idle {energy.idle_power_w:.4g} W, profile {profile.idle_w:.4g} W ±{tolerance:.0%}"
    )
    assert profile.idle_w * (1 - tolerance) <= energy.active_power_w <= profile.active_w * (1 + tolerance), (
        f"{board.name}: active {energy.active_power_w:.4g} W outside {profile.idle_w:.4g}..{profile.active_w:.4g} W"
    )
