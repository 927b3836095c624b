"""`labbench strategies`: the Table 5 analogue, its tables, figures and records, and the command's
errors. The journal's strategy records are made by hand here: this tests the report, not the
measurement that would produce them."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from labbench import cli
from labbench.measure.record import Measurement, Provenance
from labbench.results import Journal
from labbench.strategies import report
from labbench.strategies.qos import QoS, Requirement, Selection, Strategy, StrategyKind, table5_row
from labbench.strategies.record import KEY, Figure, Figures, StrategyResult

LABBENCH = Path(sys.executable).parent / "labbench"
K = StrategyKind
MODELS = {
    K.ON_DEVICE_SMALL: "resnet8",
    K.ON_DEVICE_LARGE: "resnet56",
    K.HI: "resnet8",
    K.EE_HI: "resnet8-ee",
    K.REMOTE: None,
}
#: (board, dataset) -> kind -> (accuracy, LPI ms, EPI mJ, offloaded share): Coral is slow (remote pays
#: off for the large model), Jetson fast (on device pays off)
FIGURES = {
    ("coral", "cifar10"): {
        K.ON_DEVICE_SMALL: (0.87, 40.0, 9.0, 0.0),
        K.ON_DEVICE_LARGE: (0.93, 900.0, 200.0, 0.0),
        K.HI: (0.92, 48.0, 11.0, 0.15),
        K.EE_HI: (0.915, 35.0, 8.0, 0.17),
        K.REMOTE: (0.95, 120.0, 30.0, 1.0),
    },
    ("coral", "imagenet"): {
        K.ON_DEVICE_SMALL: (0.70, 800.0, 190.0, 0.0),
        K.ON_DEVICE_LARGE: (0.76, 2500.0, 600.0, 0.0),
        K.HI: (0.81, 900.0, 210.0, 0.3),
        K.EE_HI: (0.80, 850.0, 200.0, 0.32),
        K.REMOTE: (0.82, 300.0, 60.0, 1.0),
    },
    ("jetson", "cifar10"): {
        K.ON_DEVICE_SMALL: (0.87, 1.7, 7.0, 0.0),
        K.ON_DEVICE_LARGE: (0.93, 5.6, 16.0, 0.0),
        K.HI: (0.92, 2.6, 9.0, 0.15),
        K.EE_HI: (0.915, 2.9, 9.5, 0.17),
        K.REMOTE: (0.95, 16.0, 36.0, 1.0),
    },
    ("jetson", "imagenet"): {
        K.ON_DEVICE_SMALL: (0.70, 4.6, 20.0, 0.0),
        K.ON_DEVICE_LARGE: (0.76, 8.4, 40.0, 0.0),
        K.HI: (0.81, 6.0, 28.0, 0.3),
        K.EE_HI: (0.80, 6.5, 30.0, 0.32),
        K.REMOTE: (0.82, 20.0, 80.0, 1.0),
    },
}
SOTA = {"cifar10": 1.0, "imagenet": 0.9}


def result(
    kind: StrategyKind, dataset: str, figures: tuple[float, ...], synthetic: bool = False
) -> StrategyResult:
    acc, lpi, epi, off = figures
    hi = kind in (K.HI, K.EE_HI)
    measured = Figures(
        accuracy=None if synthetic else Figure(value=acc, uncertainty=0.01),
        lpi_ms=Figure(value=lpi, uncertainty=lpi * 0.02),
        epi_mj=Figure(value=epi, uncertainty=epi * 0.03),
        offloaded_fraction=Figure(value=off, uncertainty=0.02 if hi else 0.0),
        false_negatives=Figure(value=0.04, uncertainty=0.01) if hi else None,
        source="measured",
    )
    predicted = measured.model_copy(update={"lpi_ms": Figure(value=lpi * 0.95, uncertainty=lpi * 0.05)})
    return StrategyResult(
        strategy=kind,
        dataset=dataset,
        synthetic=synthetic,
        samples=1000,
        local_model=MODELS[kind],
        server_model="resnet110" if kind in (K.HI, K.EE_HI, K.REMOTE) else None,
        decision_f1=0.86 if hi else None,
        measured=measured,
        predicted=predicted if hi else None,
        difference_pct={"lpi_ms": 5.26, "epi_mj": 0.0} if hi else {},
    )


def record(board: str, r: StrategyResult, time: str = "2026-12-01T10:00:00+00:00") -> Measurement:
    return Measurement(
        board=board,
        model=r.local_model or r.server_model or "?",
        config=r.strategy.value,
        accuracy=r.measured.accuracy.value if r.measured.accuracy else None,
        time_utc=time,
        test=f"tests_hil/test_strategies.py::test_strategy[{board}-{r.dataset}-{r.strategy.value}]",
        provenance=Provenance(
            board=board, family=board, source="sim", model_sha256="ab" * 32, lab_sha256="cd" * 32
        ),
        extra={KEY: r.model_dump(mode="json")},
    )


def write(path: Path, records: list[Measurement]) -> Path:
    journal = Journal(path)
    for m in records:
        journal.append(m)
    return path


@pytest.fixture
def journal(tmp_path: Path) -> tuple[Path, list[Measurement]]:
    records = [
        record(board, result(kind, dataset, figures))
        for (board, dataset), by_kind in FIGURES.items()
        for kind, figures in by_kind.items()
    ]
    return write(tmp_path / "journal.jsonl", records), records


def policy() -> report.QosPolicy:
    return report.QosPolicy(sota_accuracy=SOTA)


def expected(board: str, dataset: str) -> tuple[QoS, dict[Requirement, Selection]]:
    """`qos.table5_row` straight from the hand-made figures, QoS by §3.3."""
    candidates = {}
    for kind, (acc, lpi, epi, off) in FIGURES[board, dataset].items():
        figures = result(kind, dataset, (acc, lpi, epi, off)).measured.figures()
        candidates[Strategy(kind, MODELS[kind] or "resnet110")] = figures
    _, remote_lpi, remote_epi, _ = FIGURES[board, dataset][K.REMOTE]
    qos = QoS.relative_to(SOTA[dataset], remote_lpi, remote_epi)
    return qos, dict(table5_row(candidates, qos))


def test_table5_cells_are_table5_row(journal: tuple[Path, list[Measurement]]) -> None:
    rows = report.rows(report.load([journal[0]]), policy())
    assert [(r.dataset, r.board) for r in rows] == sorted((d, b) for b, d in FIGURES)
    table = report.table5(rows)
    for i, row in enumerate(rows):
        qos, selections = expected(row.board, row.dataset)
        assert row.qos == qos
        assert row.selections == selections
        for requirement, heading in report.HEADINGS.items():
            assert table.loc[i, heading] == report.cell(row.selections[requirement])
    by_row = {(r.dataset, r.board): r.selections[Requirement.ACCURACY] for r in rows}
    assert by_row["cifar10", "coral"] is not None and by_row["cifar10", "coral"].preferred.kind is K.EE_HI
    assert by_row["imagenet", "coral"] is not None and by_row["imagenet", "coral"].preferred.kind is K.REMOTE


def test_newest_record_wins(tmp_path: Path) -> None:
    figures = FIGURES["coral", "cifar10"]
    base = [record("coral", result(kind, "cifar10", f)) for kind, f in figures.items()]
    newer = record("coral", result(K.HI, "cifar10", (0.5, 10.0, 2.0, 0.1)), "2026-12-02T10:00:00+00:00")
    older = record("coral", result(K.HI, "cifar10", (0.6, 11.0, 3.0, 0.1)), "2026-11-30T10:00:00+00:00")
    path = write(tmp_path / "j.jsonl", [*base, newer, older])  # the oldest last in the file
    read = report.load([path])
    (hi,) = [e for e in read.entries if e.result.strategy is K.HI]
    assert hi.record.id == newer.id
    assert {(e.record.id, by) for e, by in read.superseded} == {
        (older.id, base[2].id),
        (base[2].id, newer.id),
    }
    page = report.to_html(read, report.rows(read, policy()), policy())
    assert f"superseded by {newer.id}" in page and "newest wins" in page


def test_synthetic_inputs_take_no_part_in_the_accuracy_requirement(tmp_path: Path) -> None:
    figures = FIGURES["coral", "cifar10"]
    records = [record("coral", result(k, "cifar10", f, synthetic=k is K.EE_HI)) for k, f in figures.items()]
    (row,) = report.rows(report.load([write(tmp_path / "j.jsonl", records)]), policy())
    accuracy = row.selections[Requirement.ACCURACY]
    assert accuracy is not None and accuracy.preferred.kind is K.HI
    assert all(s.kind is not K.EE_HI for s in accuracy.meeting)
    assert report.SYNTHETIC in set(report.strategy_table(row)["accuracy (%)"])


def test_all_synthetic_and_given_qos(tmp_path: Path) -> None:
    records = [
        record("coral", result(k, "cifar10", f, synthetic=True))
        for k, f in FIGURES["coral", "cifar10"].items()
    ]
    given = report.parse_qos("accuracy=0.8,lpi_ms=100,epi_mj=20")
    (row,) = report.rows(report.load([write(tmp_path / "j.jsonl", records)]), report.QosPolicy(given=given))
    assert row.qos == QoS(0.8, 100.0, 20.0)
    assert row.selections[Requirement.ACCURACY] is None
    assert report.table5([row]).loc[0, report.HEADINGS[Requirement.ACCURACY]] == report.SYNTHETIC


def test_no_remote_strategy_and_no_limits_given(tmp_path: Path) -> None:
    figures = FIGURES["jetson", "cifar10"]
    records = [record("jetson", result(k, "cifar10", f)) for k, f in figures.items() if k is not K.REMOTE]
    (row,) = report.rows(report.load([write(tmp_path / "j.jsonl", records)]), policy())
    assert row.qos is None and "give --qos" in row.qos_origin
    assert set(report.table5([row]).loc[0, list(report.HEADINGS.values())]) == {"-"}


def test_command_writes_html_markdown_and_json(
    journal: tuple[Path, list[Measurement]], tmp_path: Path
) -> None:
    path, records = journal
    out = tmp_path / "out" / "strategies.html"
    proc = subprocess.run(
        [str(LABBENCH), "strategies", str(path), "--sota-accuracy", "imagenet=0.9", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "strategies report:" in proc.stdout
    page = out.read_text()
    assert page.count('src="data:image/png;base64,') == 1 + 2  # Fig. 3, and Figs. 4-5 per dataset
    assert all(m.id in page for m in records)
    assert "Remote Inference" in page and "resnet8 + HI" in page
    md = out.with_suffix(".md").read_text()
    assert "| Dataset | Board |" in md and all(m.id in md for m in records)
    data = json.loads(out.with_suffix(".json").read_text())
    rows = {(r["dataset"], r["board"]): r for r in data["rows"]}
    qos, selections = expected("coral", "imagenet")
    assert rows["imagenet", "coral"]["qos"]["max_lpi_ms"] == qos.max_lpi_ms
    assert (
        rows["imagenet", "coral"]["selections"]["latency"]["preferred"]
        == selections[Requirement.LATENCY].preferred.label
    )
    assert {r["record"] for r in data["records"]} == {m.id for m in records}


def test_command_error_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(LABBENCH), "strategies", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "s.html")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr == f"error: {tmp_path / 'missing.jsonl'}: no such journal\n"


def empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    return path


def damaged(tmp_path: Path) -> Path:
    path = tmp_path / "damaged.jsonl"
    path.write_bytes(b"\x00\xff garbage\n{not json\n")
    return path


def plain(tmp_path: Path) -> Path:
    """A journal of a measurement without a strategy result."""
    m = record("coral", result(K.HI, "cifar10", FIGURES["coral", "cifar10"][K.HI]))
    return write(tmp_path / "plain.jsonl", [m.model_copy(update={"extra": {}})])


@pytest.mark.parametrize(
    ("journal_of", "args", "message"),
    [
        pytest.param(empty, [], "empty journal", id="empty"),
        pytest.param(damaged, [], "damaged: none of its 2 lines", id="damaged"),
        pytest.param(plain, [], "no strategy records", id="no strategy records"),
        pytest.param(None, ["--qos", "accuracy=1.5"], "bad --qos accuracy '1.5'", id="qos out of range"),
        pytest.param(None, ["--qos", "speed=3"], "bad --qos 'speed=3'", id="qos unknown key"),
        pytest.param(None, ["--qos", "lpi_ms=fast"], "not a number", id="qos not a number"),
        pytest.param(None, ["--qos", "lpi_ms=0"], "positive latency", id="qos zero limit"),
        pytest.param(None, ["--margin", "x"], "bad --margin 'x'", id="margin"),
        pytest.param(None, ["--sota-accuracy", "=0.9"], "bad --sota-accuracy", id="sota"),
    ],
)
def test_bad_input_is_a_one_line_error(
    journal_of: Callable[[Path], Path] | None,
    args: list[str],
    message: str,
    journal: tuple[Path, list[Measurement]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = journal[0] if journal_of is None else journal_of(tmp_path)
    assert cli.main(["strategies", str(path), *args, "--out", str(tmp_path / "s.html")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "s.html").exists()


def test_damaged_lines_partial_and_invalid_records_are_skipped_with_a_warning(
    journal: tuple[Path, list[Measurement]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, records = journal
    partial = records[0].model_copy(update={"id": "p" * 32, "status": "partial", "error": "link down"})
    invalid = records[1].model_copy(update={"id": "i" * 32, "extra": {KEY: {"strategy": "teleport"}}})
    write(path, [partial, invalid])
    with path.open("ab") as f:
        f.write(b"{torn\n")
    out = tmp_path / "s.html"
    assert cli.main(["strategies", str(path), "--out", str(out)]) == 0
    err, page = capsys.readouterr().err, out.read_text()
    for skipped in (
        f"{path}:23: skipped",
        f"record {partial.id}: partial",
        f"record {invalid.id}: extra.strategy",
    ):
        assert skipped in err and skipped in page
