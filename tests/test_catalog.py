"""The board catalog: every devices/ file validates, and its device models reproduce published numbers.

Published numbers used here:
- seed 004_8c3013ffb6da4f26.txt (Behera et al.): Table 4 (latency and energy of ResNet-8 and ResNet-56
  on CIFAR-10, int8), Table 7 (ResNet-8 on the Arduino Nano and ESP-32), Table 8 (Jetson FP32).
  Its energy is average power x latency (section 3.4.1), so energy = latency x active_w here.
- MLPerf Tiny v0.5 closed/reference: ResNet-8 (IC) on a NUCLEO-L4R5ZI Cortex-M4F at 120 MHz takes
  704 ms (../shared/reference/mlperf-tiny-dut-protocol.md section 4.3).
"""

from __future__ import annotations

import shutil
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
from pydantic import ValidationError

from labbench import catalog
from labbench.catalog import BoardFamily, DeviceModel, PowerProfile
from labbench.errors import CatalogError

FAMILIES = ["coral_dev_board_micro", "esp32_devkitc", "jetson_orin_nano", "nano33_ble_sense", "rpi4b"]
SHARED = Path(__file__).resolve().parents[2] / "shared"


def resnet_cifar_macs(blocks_per_stage: int, projection: bool) -> int:
    """MACs of the CIFAR-10 ResNet of He et al. (CVPR 2016, section 4.2): a 3x3 conv to 16 maps, three
    stages of `blocks_per_stage` two-conv basic blocks at 16/32/64 maps on 32/16/8 px, global pooling,
    a 10-way dense layer. `projection`: 1x1 stride-2 shortcuts where the stage changes (else zero-padding)."""
    macs = 32 * 32 * 16 * 3 * 3 * 3
    for stage, (size, maps) in enumerate([(32, 16), (16, 32), (8, 64)]):
        in_maps = maps if stage == 0 else maps // 2
        macs += size * size * maps * 9 * in_maps  # the first conv of the stage
        macs += size * size * maps * 9 * maps * (2 * blocks_per_stage - 1)
        if projection and stage:
            macs += size * size * maps * in_maps
    return macs + 64 * 10


# MLPerf Tiny's ResNet-8 (Banbury et al., NeurIPS 2021: "12.5 M MACs") is this network with n = 1
# and projection shortcuts; ResNet-56 (n = 9) as He et al. define it, 1.25E8 in Li et al. (ICLR 2017,
# Table 1). The paper trained its own ResNet-56, whose shortcut type it does not state; projections
# would add 0.2%.
RESNET8_MACS = resnet_cifar_macs(1, projection=True)
RESNET56_MACS = resnet_cifar_macs(9, projection=False)

# seed 004 Table 4: (family, power mode) -> {model: (latency_ms, energy_mj)}
TABLE4 = {
    ("coral_dev_board_micro", None): {"resnet8": (1.50, 2.14), "resnet56": (6.45, 9.86)},
    ("rpi4b", None): {"resnet8": (1.63, 6.22), "resnet56": (14.36, 55.59)},
    ("jetson_orin_nano", "15W"): {"resnet8": (0.17, 1.38), "resnet56": (0.64, 5.47)},
    ("jetson_orin_nano", "7W"): {"resnet8": (0.25, 1.72), "resnet56": (1.03, 7.12)},
}
MACS = {"resnet8": RESNET8_MACS, "resnet56": RESNET56_MACS}

MLPERF_M4_RESNET8_MS, MLPERF_M4_CLOCK_MHZ = 704.0, 120.0  # v0.5 closed/reference, NUCLEO-L4R5ZI
MLPERF_M4_CLASS_RESNET8_S = (0.17, 0.7)  # published Cortex-M4-class range (reference doc 4.3)
MLPERF_M4_CLASS_RESNET8_MJ = (5.0, 30.0)


def rel_error(got: float, want: float) -> float:
    return abs(got - want) / want


def test_mac_counts_match_the_published_ones():
    assert RESNET8_MACS == 12_501_632
    assert rel_error(RESNET8_MACS, 12.5e6) < 0.001
    assert rel_error(RESNET56_MACS, 1.25e8) < 0.004


def test_resnet8_macs_match_the_mlperf_tiny_model_file():
    path = SHARED / "workloads/mlperf_tiny/pretrainedResnet_quant.tflite"
    if not path.is_file():
        pytest.skip("../shared is absent")
    from labbench.modelinfo import ModelInfo

    assert ModelInfo.from_file(path).macs == RESNET8_MACS


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_validates(name):
    family = catalog.load_family(name)
    assert family.name == name
    model, power = family.profile()
    assert model.inference_us(RESNET8_MACS) > 0
    assert power.idle_w <= power.active_w
    assert family.cite("clock_mhz").startswith(family.sources["clock_mhz"])


def test_families_lists_the_devices_folder():
    assert sorted(catalog.families()) == FAMILIES
    assert catalog.default_devices_dir() == Path(__file__).resolve().parents[1] / "devices"


@pytest.mark.parametrize(
    "key, model",
    [(k, m) for k in TABLE4 for m in ("resnet8", "resnet56")],
    ids=lambda v: v if isinstance(v, str) else "-".join(p for p in v if p),
)
def test_table4_latency_and_energy_within_10_percent(key, model):
    name, mode = key
    device, power = catalog.load_family(name).profile(mode)
    latency_ms = device.inference_us(MACS[model]) / 1000
    energy_mj = latency_ms * power.active_w
    want_latency_ms, want_energy_mj = TABLE4[key][model]
    assert rel_error(latency_ms, want_latency_ms) < 0.10, (latency_ms, want_latency_ms)
    assert rel_error(energy_mj, want_energy_mj) < 0.10, (energy_mj, want_energy_mj)


@pytest.mark.parametrize("mode, resnet8_fp32_ms", [("15W", 0.212785), ("7W", 0.306191)])
def test_jetson_fp32_resnet8_held_out_from_the_fit(mode, resnet8_fp32_ms):
    """fp32 throughput is fitted to ResNet-56 only; seed 004 Table 8's ResNet-8 FP32 checks it."""
    device, _ = catalog.load_family("jetson_orin_nano").profile(mode)
    assert rel_error(device.inference_us(RESNET8_MACS, "fp32") / 1000, resnet8_fp32_ms) < 0.10


def test_jetson_15w_is_faster_and_spends_less_energy_than_7w():
    """The paper's observation (4.3): at 15 W the lower latency outweighs the higher power."""
    jetson = catalog.load_family("jetson_orin_nano")
    (fast, p15), (slow, p7) = jetson.profile("15W"), jetson.profile("7W")
    assert fast.inference_us(RESNET8_MACS) < slow.inference_us(RESNET8_MACS)
    assert fast.inference_us(RESNET8_MACS) * p15.active_w < slow.inference_us(RESNET8_MACS) * p7.active_w


def test_nano33_resnet8_against_the_mlperf_tiny_cortex_m4_reference():
    """Same core (Cortex-M4F), so the reference's 704 ms at 120 MHz scales by clock to 64 MHz."""
    nano = catalog.load_family("nano33_ble_sense")
    device, power = nano.profile()
    latency_ms = device.inference_us(RESNET8_MACS) / 1000
    assert rel_error(latency_ms, MLPERF_M4_RESNET8_MS * MLPERF_M4_CLOCK_MHZ / nano.clock_mhz) < 0.10
    assert rel_error(latency_ms, 1230.48) < 0.10  # seed 004 Table 7, Arduino Nano
    low, high = MLPERF_M4_CLASS_RESNET8_MJ
    assert low <= latency_ms * power.active_w <= high


def test_esp32_resnet8_against_the_paper_and_the_mlperf_tiny_m4_class_range():
    """The LX6 is not a Cortex-M4, so the reference is not scaled by clock; the ESP32 must fall in the
    published M4-class latency range and match seed 004 Table 7."""
    device, _ = catalog.load_family("esp32_devkitc").profile()
    latency_s = device.inference_us(RESNET8_MACS) / 1e6
    assert rel_error(latency_s, 0.60252) < 0.10
    low, high = MLPERF_M4_CLASS_RESNET8_S
    assert low <= latency_s <= high


def test_inference_time_is_overhead_plus_macs_over_throughput():
    device = DeviceModel(int8_macs_per_s=1e6, fp32_macs_per_s=5e5, overhead_us=10.0)
    assert device.inference_us(1000) == pytest.approx(1010.0)
    assert device.inference_us(1000, "fp32") == pytest.approx(2010.0)
    assert device.inference_us(1000, "float32") == pytest.approx(2010.0)


def test_fp32_without_a_published_figure_is_refused():
    device, _ = catalog.load_family("rpi4b").profile()
    with pytest.raises(CatalogError, match="no fp32 throughput in the catalog"):
        device.inference_us(RESNET8_MACS, "fp32")
    with pytest.raises(CatalogError, match='unknown dtype "int4"'):
        device.inference_us(RESNET8_MACS, "int4")


def test_unknown_power_mode_lists_the_modes():
    jetson = catalog.load_family("jetson_orin_nano")
    with pytest.raises(CatalogError) as exc:
        jetson.profile("25W")
    assert (
        str(exc.value) == 'jetson_orin_nano: unknown power mode "25W"; did you mean "15W"? (known: 15W, 7W)'
    )
    assert jetson.profile() == jetson.profile("15W")
    with pytest.raises(CatalogError, match=r"\(known: none\)"):
        catalog.load_family("rpi4b").profile("15W")


@pytest.mark.parametrize(
    "name, model_bytes, arena_bytes, message",
    [
        ("esp32_devkitc", 276_976, 40_000, None),
        ("esp32_devkitc", 276_976, 600_000, "arena 600,000 B exceeds SRAM 520 KiB"),
        (
            "esp32_devkitc",
            5_000_000,
            600_000,
            "model 5,000,000 B exceeds flash 4,096 KiB; arena 600,000 B exceeds SRAM 520 KiB",
        ),
        ("nano33_ble_sense", 98_496, 262_145, "arena 262,145 B exceeds SRAM 256 KiB"),
        ("nano33_ble_sense", 98_496, 262_144, None),
        (
            "coral_dev_board_micro",
            40_000_000,
            30_000_000,
            "model 40,000,000 B + arena 30,000,000 B exceeds RAM 64 MiB",
        ),
        ("rpi4b", 333_288, 1_000_000, None),
    ],
)
def test_fits(name, model_bytes, arena_bytes, message):
    assert catalog.load_family(name).fits(model_bytes, arena_bytes) == message


def test_unknown_family_suggests_the_closest_name():
    with pytest.raises(CatalogError) as exc:
        catalog.load_family("esp32_devkit")
    assert str(exc.value) == (
        'unknown board family "esp32_devkit"; did you mean "esp32_devkitc"? (known: '
        f"{', '.join(FAMILIES)}) in {catalog.default_devices_dir()}"
    )


# Malformed family files: an edit of devices/esp32_devkitc.yaml (or jetson_orin_nano.yaml) and the
# exact error it must give.
def _edit(old: str, new: str, family: str = "esp32_devkitc") -> tuple[str, str, str]:
    return family, old, new


MALFORMED = [
    (
        "misspelt-key",
        _edit("clock_mhz: 240", "clock_mz: 240"),
        (
            'devices/esp32_devkitc.yaml:6: clock_mz: unknown key; did you mean "clock_mhz"? (allowed: accelerator, '
            "clock_mhz, connectivity, cpu, default_power_mode, device_model, display_name, flash_kib, flasher, kind, "
            "links, power, power_modes, ram_mib, references, runtimes, serial_baud, simulator, sources, sram_kib, target)"
        ),
    ),
    (
        "misspelt-power-key",
        _edit("  idle_w: 0.099", "  idel_w: 0.099"),
        (
            'devices/esp32_devkitc.yaml:16: power.idel_w: unknown key; did you mean "idle_w"? '
            "(allowed: active_w, idle_w, radio_tx_w, upload_w)"
        ),
    ),
    (
        "wrong-type",
        _edit("sram_kib: 520", 'sram_kib: "520k"'),
        'devices/esp32_devkitc.yaml:7: sram_kib: expected an integer, got "520k"',
    ),
    (
        "float-for-int",
        _edit("sram_kib: 520", "sram_kib: 520.5"),
        "devices/esp32_devkitc.yaml:7: sram_kib: expected an integer, got 520.5",
    ),
    (
        "unknown-kind",
        _edit("kind: mcu", "kind: soc"),
        "devices/esp32_devkitc.yaml:4: kind: expected 'mcu' or 'linux', got \"soc\"",
    ),
    (
        "empty-flasher",
        _edit("flasher: esptool", 'flasher: ""'),
        "devices/esp32_devkitc.yaml:12: flasher: needs at least 1 character",
    ),
    (
        "target-not-a-name",
        _edit("flasher: esptool", "flasher: esptool\ntarget: [dut_serial]"),
        "devices/esp32_devkitc.yaml:13: target: expected a string, got a list",
    ),
    (
        "negative-throughput",
        _edit("int8_macs_per_s: 2.07e7", "int8_macs_per_s: -2.07e7"),
        (
            "devices/esp32_devkitc.yaml:22: device_model.int8_macs_per_s: input should be greater than 0, "
            "got -20700000.0"
        ),
    ),
    (
        "missing-power-figure",
        _edit("  radio_tx_w: 0.594\n", ""),
        "devices/esp32_devkitc.yaml:15: power.radio_tx_w: required key is missing",
    ),
    (
        "number-without-source",
        _edit("  serial_baud: mlperf_runner\n", ""),
        "devices/esp32_devkitc.yaml:13: serial_baud: no source: add it under sources:",
    ),
    (
        "source-for-no-key",
        _edit("  flash_kib: devkitc", "  flash_kb: devkitc"),
        (
            "devices/esp32_devkitc.yaml:8: flash_kib: no source: add it under sources:\n"
            'devices/esp32_devkitc.yaml:50: sources.flash_kb: unknown key "flash_kb"; did you mean "flash_kib"? '
            "(known: clock_mhz, device_model.fp32_macs_per_s, device_model.int8_macs_per_s, device_model.overhead_us, flash_kib, links.wifi.bandwidth_mbps, "
            "links.wifi.latency_ms, power.active_w, power.idle_w, power.radio_tx_w, power.upload_w, serial_baud, sram_kib)"
        ),
    ),
    (
        "unknown-reference",
        _edit("  flash_kib: devkitc", "  flash_kib: devkit"),
        (
            "devices/esp32_devkitc.yaml:50: sources.flash_kib: the citation must start with a reference: "
            'unknown reference "devkit"; did you mean "devkitc"? '
            "(known: devkitc, esp32_ds, macs, mlperf_runner, seed000, seed004, tflm)"
        ),
    ),
    (
        "mcu-without-sram",
        _edit("sram_kib: 520\n", ""),
        (
            "devices/esp32_devkitc.yaml:1: sram_kib: required when kind is mcu\n"
            'devices/esp32_devkitc.yaml:48: sources.sram_kib: unknown key "sram_kib" (known: clock_mhz, '
            "device_model.fp32_macs_per_s, device_model.int8_macs_per_s, device_model.overhead_us, flash_kib, links.wifi.bandwidth_mbps, links.wifi.latency_ms, "
            "power.active_w, power.idle_w, power.radio_tx_w, power.upload_w, serial_baud)"
        ),
    ),
    (
        "mcu-flashed-over-ssh",
        _edit("flasher: esptool", "flasher: ssh"),
        'devices/esp32_devkitc.yaml:12: flasher: "ssh" cannot flash a board of kind mcu',
    ),
    (
        "linux-flashed-by-esptool",
        _edit("flasher: ssh", "flasher: esptool", "rpi4b"),
        'devices/rpi4b.yaml:11: flasher: "esptool" cannot flash a board of kind linux',
    ),
    (
        "name-in-file",
        _edit("display_name: ESP32 DevKitC", "name: esp32\ndisplay_name: ESP32 DevKitC"),
        'devices/esp32_devkitc.yaml:3: name: unknown key; a family is named by its file name, "esp32_devkitc"',
    ),
    (
        "bad-yaml",
        _edit("and BLE]", "and BLE"),
        "devices/esp32_devkitc.yaml:11: not valid YAML: expected ',' or ']', but got ':'",
    ),
    (
        "unknown-default-mode",
        _edit("default_power_mode: 15W", "default_power_mode: 25W", "jetson_orin_nano"),
        (
            'devices/jetson_orin_nano.yaml:13: default_power_mode: unknown power mode "25W"; did you mean "15W"? '
            "(known: 15W, 7W)"
        ),
    ),
    (
        "modes-and-top-level-power",
        _edit("flasher: ssh\n", "flasher: ssh\npower: {}\n", "jetson_orin_nano"),
        "devices/jetson_orin_nano.yaml:13: power: not allowed with power_modes (each mode has its own)",
    ),
    (
        "misspelt-mode-key",
        _edit("      overhead_us: 162", "      overhead: 162", "jetson_orin_nano"),
        (
            "devices/jetson_orin_nano.yaml:35: power_modes.7W.device_model.overhead: unknown key; "
            'did you mean "overhead_us"? (allowed: fp32_macs_per_s, int8_macs_per_s, overhead_us)'
        ),
    ),
]


@pytest.mark.parametrize(
    "family, old, new, message", [(*c[1], c[2]) for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_malformed_family_file(tmp_path, family, old, new, message):
    devices = tmp_path / "devices"
    shutil.copytree(catalog.default_devices_dir(), devices)
    path = devices / f"{family}.yaml"
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))
    with pytest.raises(CatalogError) as exc:
        catalog.load_family(family, devices)
    assert str(exc.value) == message


def test_every_problem_of_a_file_is_reported(tmp_path):
    devices = tmp_path / "devices"
    devices.mkdir()
    source = (catalog.default_devices_dir() / "esp32_devkitc.yaml").read_text()
    (devices / "esp32_devkitc.yaml").write_text(
        source.replace("clock_mhz: 240", "clock_mhz: fast").replace("idle_w: 0.099", "idle_w: []")
    )
    with pytest.raises(CatalogError) as exc:
        catalog.load_family("esp32_devkitc", devices)
    assert str(exc.value).splitlines() == [
        'devices/esp32_devkitc.yaml:6: clock_mhz: expected a number, got "fast"',
        "devices/esp32_devkitc.yaml:16: power.idle_w: expected a number, got a list",
    ]


def test_models_are_frozen_and_strict():
    power = PowerProfile(idle_w=1.0, active_w=2.0, upload_w=1.5, radio_tx_w=3.0)
    with pytest.raises(ValidationError, match="frozen"):
        power.idle_w = 0.5
    with pytest.raises(ValidationError, match="valid number"):
        PowerProfile(idle_w="1", active_w=2.0, upload_w=1.5, radio_tx_w=3.0)
    assert "power_modes" in BoardFamily.model_fields


def test_a_family_names_its_target_and_simulator_or_gets_its_kinds():
    esp32, rpi4 = catalog.load_family("esp32_devkitc"), catalog.load_family("rpi4b")
    assert (
        (esp32.target, esp32.simulator)
        == ("dut_serial", "mcu")
        == tuple(catalog.KIND_DEFAULTS["mcu"].values())
    )
    assert (rpi4.target, rpi4.simulator) == ("ssh", "linux")


def package_of_families(root: Path, package: str, **families: str) -> EntryPoint:
    """A package `package` under `root` holding `families` (name -> YAML text), as a `labbench.devices`
    entry point names it."""
    (root / package).mkdir()
    (root / package / "__init__.py").write_text("")
    for name, text in families.items():
        (root / package / f"{name}.yaml").write_text(text)
    return EntryPoint(package, package, catalog.FAMILY_GROUP)


@pytest.fixture
def packages(monkeypatch, tmp_path):
    """Install packages of families (see package_of_families) for the test: `packages(name={...}, ...)`."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def install(**packages: dict[str, str]) -> None:
        found = [package_of_families(tmp_path, package, **families) for package, families in packages.items()]
        monkeypatch.setattr(
            catalog, "entry_points", lambda group: found if group == catalog.FAMILY_GROUP else []
        )

    return install


ESP32 = (Path(__file__).resolve().parents[1] / "devices" / "esp32_devkitc.yaml").read_text()


def test_installed_packages_add_families(packages):
    clone = ESP32.replace("flasher: esptool", "flasher: esptool\ntarget: clone_dut\nsimulator: clone_sim")
    packages(clone_families={"esp32_clone": clone})
    assert list(catalog.family_files()) == sorted([*FAMILIES, "esp32_clone"])
    family = catalog.load_family("esp32_clone")
    assert (family.name, family.target, family.simulator, family.flasher) == (
        "esp32_clone",
        "clone_dut",
        "clone_sim",
        "esptool",
    )


def test_the_labs_catalog_takes_precedence_over_a_package(packages, tmp_path):
    """The lab's catalog directory (by default the bench's own) wins over a package's family of that name."""
    packages(vendor_families={"esp32_devkitc": ESP32.replace("clock_mhz: 240", "clock_mhz: 160")})
    assert catalog.load_family("esp32_devkitc").clock_mhz == 240
    devices = tmp_path / "devices"
    devices.mkdir()
    (devices / "esp32_devkitc.yaml").write_text(ESP32.replace("clock_mhz: 240", "clock_mhz: 80"))
    assert catalog.load_family("esp32_devkitc", devices).clock_mhz == 80
    assert list(catalog.family_files(devices)) == ["esp32_devkitc"]


def test_a_family_two_packages_define_is_an_error(packages):
    packages(one={"esp32_clone": ESP32}, two={"esp32_clone": ESP32})
    with pytest.raises(
        CatalogError, match=r'board family "esp32_clone" is defined twice: in .*one.* and .*two'
    ):
        catalog.load_family("esp32_clone")
