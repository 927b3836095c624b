"""The DUT firmware core (firmware/core) built and tested on the host with the system compiler.

The C tests check the protocol byte for byte; this file runs them through make so that the
project's test command covers them, drives the core (on a pty, with its fake model) with the
bench's own DutSerial driver, reply CRCs on, checks that the core's table of MLPerf Tiny reference
models is labbench.modelinfo's, and that a model embedded the way the boards embed it
(firmware/tools/embed_model.py) is what the core hashes for `profile%`. The core against MLCommons'
runner format: tests/test_mlperf_interop.py.
"""

from __future__ import annotations

import hashlib
import os
import pty
import re
import select
import shutil
import subprocess
import time
import tty
from pathlib import Path

import numpy as np
import pytest

from labbench.drivers.dut_serial import DutReplyError, DutSerial
from labbench.modelinfo import MLPERF_TINY

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "firmware" / "core"
MLPERF_MODELS = ROOT.parent / "shared" / "workloads" / "mlperf_tiny"


def _first_on_path(*names: str) -> str | None:
    return next((name for name in names if shutil.which(name)), None)


def _make(target: str, build_dir: Path, *variables: str, need_cxx: bool = False):
    """Run `make -C firmware/core TARGET` with the compilers found on PATH, or skip."""
    cc = _first_on_path("cc", "gcc", "clang")
    cxx = _first_on_path("c++", "g++", "clang++")
    if shutil.which("make") is None or cc is None or (need_cxx and cxx is None):
        pytest.skip("no make and C" + ("/C++" if need_cxx else "") + " compiler on PATH")
    args = ["make", "-C", str(CORE), target, f"BUILD={build_dir}", f"CC={cc}", *variables]
    if cxx:
        args.append(f"CXX={cxx}")
    return subprocess.run(args, check=False, capture_output=True, text=True, timeout=120)


def test_core_host_tests_pass(tmp_path):
    run = _make("test", tmp_path)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    # Both suites ran and counted their checks (a target that ran nothing would not print these).
    counts = dict(re.findall(r"^(test_\w+): (\d+) checks, 0 failed$", run.stdout, re.MULTILINE))
    assert set(counts) == {"test_dut", "test_sha256"}, output
    assert int(counts["test_dut"]) > 100 and int(counts["test_sha256"]) >= 10, output


def test_the_cores_mlperf_table_is_modelinfos():
    source = (CORE / "src" / "lb_dut.c").read_text()
    rows = re.findall(r'\{"(\w+)", "([0-9a-f]{64})", (LB_INPUT_\w+),\s*(LB_RESULTS_\w+)\}', source)
    inputs = {
        "uint8-128": "LB_INPUT_U8_MINUS_128",
        "int8": "LB_INPUT_TENSOR",
        "float32": "LB_INPUT_F32_QUANTIZED",
    }
    results = {"outputs": "LB_RESULTS_OUTPUTS", "mse": "LB_RESULTS_MSE"}
    assert rows == [(m.id, m.sha256, inputs[m.input], results[m.output]) for m in MLPERF_TINY.values()]


@pytest.mark.parametrize("model_file", ["vww_96_int8.tflite", "kws_ref_model.tflite"])
def test_embedded_model_hashes_like_the_file(tmp_path, model_file):
    model = MLPERF_MODELS / model_file
    if not model.is_file():
        pytest.skip(f"{model} is not available (../shared absent)")
    run = _make("model-sha256", tmp_path, f"MODEL={model}", need_cxx=True)
    assert run.returncode == 0, run.stdout + run.stderr
    reported = re.search(r"^(\S+) (\d+) ([0-9a-f]{64}) (\d+)$", run.stdout, re.MULTILINE)
    assert reported, run.stdout
    name, size, sha256, misalignment = reported.groups()
    data = model.read_bytes()
    assert (name, int(size), sha256) == (model.stem, len(data), hashlib.sha256(data).hexdigest())
    assert misalignment == "0"  # TFLM reads weights in place: the array must be 16-byte aligned


def _read_until(fd: int, marker: bytes, timeout_s: float) -> bytes:
    data, deadline = b"", time.monotonic() + timeout_s
    while marker not in data:
        left = deadline - time.monotonic()
        assert left > 0 and select.select([fd], [], [], left)[0], (
            f"no {marker!r} within {timeout_s} s: {data!r}"
        )
        data += os.read(fd, 4096)
    return data


def test_bench_driver_runs_the_core_over_a_pty(tmp_path):
    """DutSerial (identify, run_timed, classify, an error reply) against the host build of the
    core: 64-byte input, fake model whose outputs are input bytes 0-3 / 4, runs of >= 500 us. The
    core offers the reply-CRC extension, so every reply after identify carries a checked CRC."""
    build = _make("host-dut", tmp_path)
    assert build.returncode == 0, build.stdout + build.stderr
    master, slave = pty.openpty()
    tty.setraw(slave)
    dut_process = subprocess.Popen([str(tmp_path / "host_dut"), "64", "500"], stdin=master, stdout=master)
    os.close(master)
    try:
        # Take the boot banner off the line first: a banner mid-reply means a reset to DutSerial.
        assert _read_until(slave, b"m-init-done\r\nm-ready\r\n", 10).startswith(
            b"m-timestamp-mode-performance\r\n"
        )
        log_path = tmp_path / "host-dut-serial.log"
        with DutSerial(os.ttyname(slave), board="host-dut", timeout_s=5.0, log_path=log_path) as dut:
            identity = dut.identify()
            assert (identity.name, identity.model, identity.firmware) == (
                "host_dut",
                "fake01",
                "ULPMark for tinyML Firmware V0.0.1",
            )
            assert identity.model_sha256 == hashlib.sha256(b"labbench host model").hexdigest()
            assert identity.extra == {"model_bytes": 19, "arena_bytes": 2256, "reply_crc32": True}

            sample = np.arange(-32, 32, dtype=np.int8)
            expected = sample[:4].view(np.uint8).astype(np.float32) / 4  # (224, 225, 226, 227) / 4
            timed = dut.run_timed(sample, count=5, warmup=2)
            assert timed.count == 5 and min(timed.latencies_us) >= 500 and timed.extra["reply_crc32"]
            np.testing.assert_array_equal(timed.outputs, expected)
            per_run = dut.run_timed(sample, count=3, warmup=0, per_inference=True)
            assert per_run.count == 3 and min(per_run.latencies_us) >= 500

            samples = np.stack([np.roll(sample, k) for k in range(3)])
            rows = dut.classify(samples)
            np.testing.assert_array_equal(rows, samples[:, :4].view(np.uint8).astype(np.float32) / 4)

            with pytest.raises(DutReplyError, match=r"e-\[Input is 10 bytes; the model expects 64\]"):
                dut.run_timed(np.zeros(10, np.int8), count=1, warmup=0)
            assert dut.identify().model == "fake01"  # the line is still in step after the error
        assert "-> b'crc32 on%'" in log_path.read_text()  # once: the core kept it on throughout
    finally:
        dut_process.kill()
        dut_process.wait()
        os.close(slave)
