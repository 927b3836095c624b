"""Per-test report content for pytest-html: the measurement table, verdicts, plots, the timeline of
the test's steps, and the infrastructure attempts and quarantines of the test's board."""

from __future__ import annotations

import base64
import html

from labbench.budgets import Judgement, Verdict
from labbench.measure.record import Event, Measurement, Uncertainty
from labbench.steps import Step

_COLOURS = {Verdict.PASS: "#2a7", Verdict.MARGINAL: "#d90", Verdict.FAIL: "#c33", Verdict.MISSING: "#888"}


def measurement_table(m: Measurement) -> str:
    """An HTML table of every number in the measurement, each with its unit and how it was obtained;
    a partial record is headed as such, with the error that cut it short."""
    rows: list[tuple[str, str, str]] = []
    if m.status == "partial":
        kept = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in m.extra.get("partial", {}).items())
        rows.append(("PARTIAL: never judged", m.error or "", kept))
    if m.latency:
        lat = m.latency
        rows += [
            (
                "latency p50",
                f"{lat.p50_ms:.4g} ms",
                f"95% CI {lat.p50_ci95_ms[0]:.4g}..{lat.p50_ci95_ms[1]:.4g} ms; {lat.method}",
            ),
            ("latency p90", f"{lat.p90_ms:.4g} ms", f"{len(lat.samples_ms)} samples"),
            (
                "latency p99",
                f"{lat.p99_ms:.4g} ms",
                f"95% CI {lat.p99_ci95_ms[0]:.4g}..{lat.p99_ci95_ms[1]:.4g} ms",
            ),
            ("latency mean", f"{lat.mean_ms:.4g} ms", ""),
        ]
        if lat.median_window_ms is not None:
            rows.append(
                (
                    "latency (MLPerf: 1000/median throughput)",
                    f"{lat.median_window_ms:.4g} ms",
                    f"{len(lat.throughput_windows_ms)} windows",
                )
            )
    if m.energy:
        e = m.energy
        u = e.uncertainties
        rows += [
            (
                "energy per inference",
                _pm(e.per_inference_mj, e.uncertainty_mj, "mJ"),
                _how(u.get("per_inference_mj"), "mJ", e.method),
            ),
            (
                "  power x latency",
                _pm(e.power_x_latency_mj, _total(u, "power_x_latency_mj"), "mJ"),
                _how(u.get("power_x_latency_mj"), "mJ", ""),
            ),
            (
                "  integrated / count",
                "-" if e.integrated_mj is None else _pm(e.integrated_mj, _total(u, "integrated_mj"), "mJ"),
                _how(
                    u.get("integrated_mj"),
                    "mJ",
                    f"{e.inferences} inferences over {e.window_s:.3g} s x {e.windows} windows",
                ),
            ),
            (
                "  dynamic (above idle)",
                _pm(e.dynamic_mj, _total(u, "dynamic_mj"), "mJ"),
                _how(u.get("dynamic_mj"), "mJ", ""),
            ),
            (
                "  active power",
                _pm(e.active_power_w, _total(u, "active_power_w"), "W"),
                _how(u.get("active_power_w"), "W", ""),
            ),
            (
                "  idle power",
                _pm(e.idle_power_w, _total(u, "idle_power_w"), "W"),
                _how(u.get("idle_power_w"), "W", ""),
            ),
        ]
        if e.current_range_a is not None or e.ranges:
            held = " / ".join(
                f"{v:g} {unit}"
                for v, unit in ((e.voltage_range_v, "V"), (e.current_range_a, "A"))
                if v is not None
            )
            rows.append(("  analyzer ranges held", held or "-", e.ranges or ""))
        for note in e.remeasured:
            rows.append(("  re-measured", "", note))
    if m.accuracy is not None:
        rows.append(("top-1 accuracy", f"{m.accuracy:.4f}", f"{m.accuracy_n} samples"))
    if m.cold_start_ms is not None:
        parts = ", ".join(f"{k} {v:.3g} ms" for k, v in m.cold_start_breakdown_ms.items())
        rows.append(("cold start", f"{m.cold_start_ms:.4g} ms", parts))
    mem = m.memory
    for label, value, unit in (
        ("model in flash", mem.flash_bytes, "B"),
        ("TFLM arena", mem.arena_bytes, "B"),
        ("peak RSS", mem.peak_rss_kib, "KiB"),
    ):
        if value is not None:
            rows.append((label, f"{value:,} {unit}", ""))
    p = m.provenance
    rows.append(
        (
            "provenance",
            f"{p.source} / {p.board} ({p.family})",
            (
                f"model {p.model_sha256[:12]}, firmware {(p.firmware_sha256 or '-')[:12]}, "
                f"instrument {p.instrument or '-'}, bench {p.bench_git_rev}, lab {p.lab_sha256[:12]}"
            ),
        )
    )
    body = "".join(
        f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td><td>{html.escape(c)}</td></tr>"
        for a, b, c in rows
    )
    return (
        f"<h4>{html.escape(m.board)} / {html.escape(m.model)}</h4><table class='labbench'>"
        f"<tr><th>quantity</th><th>value</th><th>how</th></tr>{body}</table>"
    )


def _pm(value: float, uncertainty: float | None, unit: str) -> str:
    return f"{value:.4g} {unit}" if uncertainty is None else f"{value:.4g} ± {uncertainty:.2g} {unit}"


def _total(uncertainties: dict[str, Uncertainty], figure: str) -> float | None:
    u = uncertainties.get(figure)
    return u.total if u else None


def _how(u: Uncertainty | None, unit: str, method: str) -> str:
    """The uncertainty's components, then how the figure was obtained."""
    if u is None:
        return method
    parts = f"± = accuracy {u.accuracy:.2g} + rounding {u.rounding:.2g} + edges {u.edges:.2g}"
    parts += f" + spread {u.spread:.2g} {unit}" if u.spread else f" {unit}"
    return f"{parts}; {method}" if method else parts


def verdict_table(judgements: list[Judgement]) -> str:
    rows = "".join(
        f"<tr><td style='color:{_COLOURS[j.verdict]}'><b>{j.verdict.value}</b></td>"
        f"<td>{html.escape(str(j))}</td></tr>"
        for j in judgements
    )
    return f"<table class='labbench'><tr><th>verdict</th><th>budget</th></tr>{rows}</table>"


def attempt_html(e: Event) -> str:
    """One attempt at a board step: its error and the recovery made, or that it passed."""
    colour, outcome = ("#c33", e.error) if e.error else ("#2a7", "passed")
    then = f"; then {e.recovery}" if e.recovery else ""
    return (
        f"<p class='labbench-attempt'>{html.escape(e.board)} / {html.escape(e.step)}: attempt "
        f"{e.attempt} of {e.attempts}: <span style='color:{colour}'>{html.escape(outcome or '')}</span>"
        f"{html.escape(then)}</p>"
    )


def timeline_html(taken: list[Step]) -> str:
    """A test's steps: when each began (seconds from the first), how long it took, and how it ended."""
    t0 = taken[0].start_s
    colours = {"ok": "#2a7", "error": "#c33", "running": "#888"}
    rows = "".join(
        f"<tr><td>{s.start_s - t0:.3f}</td><td>{'-' if s.duration_s is None else f'{s.duration_s:.3f}'}</td>"
        f"<td>{html.escape(s.board)}</td><td style='padding-left:{0.3 + 1.2 * s.depth:.1f}em'>"
        f"{html.escape(s.name)} <small>{html.escape(s.detail)}</small></td>"
        f"<td style='color:{colours[s.status]}'>{s.status}{': ' + html.escape(s.error) if s.error else ''}</td></tr>"
        for s in taken
    )
    return (
        "<details class='labbench-timeline'><summary>steps (host monotonic clock, s)</summary>"
        "<table class='labbench'><tr><th>at</th><th>took</th><th>board</th><th>step</th><th>outcome</th></tr>"
        f"{rows}</table></details>"
    )


def quarantine_html(reason: str) -> str:
    return f"<p class='labbench-quarantine' style='color:#c33'><b>{html.escape(reason)}</b></p>"


def png_html(png: bytes, alt: str) -> str:
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
