"""One self-contained HTML page from `ReportData`: inline CSS, an inline SVG chart, no script,
no external asset. Pure: data in, text out.

Every text from the CRM or the store goes through `html.escape` (a contact named
`<script>` is shown, never run), and a Content-Security-Policy meta tag allows nothing but
the page's own style sheet, by its hash: no script, no image, no font, no connection, no form,
so even a file altered afterwards cannot fetch or send anything. Numbers carry `data-key`
attributes and the chart's points `data-series`/`data-day`/`data-value`, so a reader's tools
(and the browser test) can compare them with the run report.
"""

from __future__ import annotations

import base64
import hashlib
import html
from collections.abc import Sequence
from datetime import datetime

from waconsent import __version__
from waconsent.reports.model import HEADLINE, SERIES, Day, Flagged, ReportData, Run, trend

FLAGGED_SHOWN = 1000  # rows of the flagged table; the heading always has the full count
_GAPS = {
    "opt_in_date": "the opt-in date",
    "opt_in_source": "the source",
    "opt_in_ip or a WhatsApp message id in opt_in_source": (
        "the IP address or a WhatsApp message id"
    ),
}
_COLOURS = {"revocations": "#b42318", "opt_ins": "#1f7a44", "proof_missing": "#9a6700"}
_DASHES = {"revocations": "", "opt_ins": "6 4", "proof_missing": "2 3"}
CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1b1f24;
margin:0 auto;max-width:980px;padding:24px}
h1{font-size:1.6em;margin:0 0 4px}h2{font-size:1.2em;margin:28px 0 8px;
border-bottom:1px solid #d0d7de;padding-bottom:4px}
.meta{color:#57606a;margin:0}
table{border-collapse:collapse;width:100%;margin:8px 0}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa;font-weight:600}
td.n{text-align:right;font-variant-numeric:tabular-nums}
table.numbers{width:auto}table.numbers th{font-weight:400;background:none}
.warn{background:#fff8c5;border:1px solid #d4a72c;padding:8px 12px;border-radius:6px}
.note{color:#57606a;font-size:.9em}
svg{max-width:100%;height:auto;display:block}
svg .axis{stroke:#8c959f;stroke-width:1}svg .grid{stroke:#d8dee4;stroke-width:1}
svg text{font:12px system-ui,sans-serif;fill:#57606a}
.legend span{display:inline-block;margin-right:16px}
.swatch{display:inline-block;width:18px;height:3px;vertical-align:middle;margin-right:6px}
.s-revocations{background:#b42318}.s-opt_ins{background:#1f7a44}
.s-proof_missing{background:#9a6700}
ul.masked{columns:4;font-family:ui-monospace,monospace}
@media print{body{padding:0}h2{break-after:avoid}}
""".strip()


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def content_security_policy(style: str = CSS) -> str:
    """Nothing but this page's own style sheet, allowed by its SHA-256."""
    digest = base64.b64encode(hashlib.sha256(style.encode("utf-8")).digest()).decode()
    return (
        f"default-src 'none'; style-src 'sha256-{digest}'; img-src 'none'; "
        "script-src 'none'; base-uri 'none'; form-action 'none'"
    )


def render(data: ReportData) -> str:
    """The whole page."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_e(content_security_policy())}">',
        '<meta name="referrer" content="no-referrer">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>WhatsApp consent report: {_e(data.crm)}</title>",
        f"<style>{CSS}</style></head><body>",
        "<header><h1>WhatsApp consent report</h1>",
        f'<p class="meta">CRM <b>{_e(data.crm)}</b> · generated {_when(data.generated_at)} · '
        f"runs of the last {data.days} days</p></header>",
        _last_run(data),
        _trend(data),
        _flagged(data.flagged, data.flagged_total),
        _conflicts(data.last),
        _unmatched(data.last),
        f'<footer><p class="note">Phone numbers are masked to their last three digits. Made '
        f"by waconsent {_e(__version__)}; it holds the names of contacts: keep it where the "
        "CRM's data may be kept.</p></footer>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _when(moment: datetime) -> str:
    return _e(moment.strftime("%Y-%m-%d %H:%M UTC"))


def _last_run(data: ReportData) -> str:
    out = ['<section id="last-run"><h2>Last run</h2>']
    failed = data.failed_since
    if failed is not None:
        out.append(
            f'<p class="warn" id="failed-run">The newest run, #{failed.id} '
            f"({_e(failed.mode)}, started {_when(failed.started_at)}), failed: "
            f"{_e(failed.error or 'no reason recorded')}. Nothing it queued is lost; "
            "the numbers below are from the last run that finished.</p>"
        )
    last = data.last
    if last is None:
        out.append(
            f"<p>No full or incremental run finished in the last {data.days} days. "
            "Run <code>waconsent sync --full</code>.</p></section>"
        )
        return "\n".join(out)
    out.append(
        f'<p class="meta" id="last-run-id" data-run="{last.id}">Run #{last.id}, '
        f"{_e(last.mode)}, {_e(last.status)}, started {_when(last.started_at)}</p>"
    )
    out.append('<table class="numbers">')
    for key, label in HEADLINE:
        out.append(
            f'<tr><th scope="row">{_e(label)}</th>'
            f'<td class="n" data-key="{key}">{last.count(key)}</td></tr>'
        )
    conflicts = last.listed("conflicts")
    shown = "not recorded" if conflicts is None else str(len(conflicts))
    out.append(
        f'<tr><th scope="row">conflicts (the CRM stands)</th>'
        f'<td class="n" data-key="conflicts">{_e(shown)}</td></tr></table></section>'
    )
    return "\n".join(out)


def _trend(data: ReportData) -> str:
    days = trend(data.runs)
    out = [
        '<section id="trend"><h2>Trend</h2>',
        '<p class="note">Per day (UTC): revocations and opt-ins written by every run; '
        "missing proof as the day's last full run counted it.</p>",
        _chart(days),
        '<p class="legend">'
        + "".join(
            f'<span><i class="swatch s-{key}"></i>{_e(label)}</span>' for key, label in SERIES
        )
        + "</p>",
        '<table id="trend-table"><thead><tr><th>day</th><th>runs</th><th>revocations</th>'
        "<th>opt-ins</th><th>missing proof</th></tr></thead><tbody>",
    ]
    for day in days:
        missing = "" if day.proof_missing is None else str(day.proof_missing)
        out.append(
            f'<tr data-day="{day.day.isoformat()}"><td>{day.day.isoformat()}</td>'
            f'<td class="n">{day.runs}</td>'
            f'<td class="n" data-key="revocations">{day.revocations}</td>'
            f'<td class="n" data-key="opt_ins">{day.opt_ins}</td>'
            f'<td class="n" data-key="proof_missing">{missing}</td></tr>'
        )
    out.append("</tbody></table></section>")
    return "\n".join(out)


def _nice_step(top: int) -> int:
    """The grid step: 1, 2 or 5 times a power of ten, four steps reaching `top`."""
    rough, scale = max(1, -(-top // 4)), 1
    while True:
        for factor in (1, 2, 5):
            if factor * scale >= rough:
                return factor * scale
        scale *= 10


def _chart(days: Sequence[Day], width: int = 720, height: int = 260) -> str:
    """An SVG line chart of the three series over the days, with its own title and text."""
    left, right, top, bottom = 52, 16, 14, 36
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max([1, *(getattr(d, key) or 0 for d in days for key, _ in SERIES)])
    step = _nice_step(peak)
    y_max = step * 4

    def x(index: int) -> float:
        return left + (plot_w / 2 if len(days) == 1 else plot_w * index / (len(days) - 1))

    def y(value: int) -> float:
        return top + plot_h - plot_h * value / y_max

    out = [
        f'<svg id="trend-chart" xmlns="http://www.w3.org/2000/svg" role="img" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        'aria-labelledby="chart-title chart-desc">',
        '<title id="chart-title">Revocations, opt-ins and missing proof per day</title>',
        f'<desc id="chart-desc">{len(days)} days with finished runs.</desc>',
    ]
    for tick in range(5):
        value = step * tick
        out.append(
            f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y(value):.1f}" '
            f'y2="{y(value):.1f}"/><text x="{left - 6}" y="{y(value) + 4:.1f}" '
            f'text-anchor="end">{value}</text>'
        )
    out.append(f'<line class="axis" x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}"/>')
    if not days:
        out.append(
            f'<text x="{left + plot_w / 2}" y="{top + plot_h / 2}" text-anchor="middle">'
            "no finished runs yet</text>"
        )
    labelled = sorted({0, len(days) // 2, len(days) - 1}) if days else []
    for index in labelled:
        out.append(
            f'<text x="{x(index):.1f}" y="{height - 12}" text-anchor="middle">'
            f"{days[index].day.isoformat()}</text>"
        )
    for key, label in SERIES:
        points = [
            (x(i), y(v), d, v) for i, d in enumerate(days) if (v := getattr(d, key)) is not None
        ]
        if not points:
            continue
        dash = f' stroke-dasharray="{_DASHES[key]}"' if _DASHES[key] else ""
        out.append(
            f'<polyline data-series="{key}" fill="none" stroke="{_COLOURS[key]}" '
            f'stroke-width="2"{dash} points="'
            + " ".join(f"{px:.1f},{py:.1f}" for px, py, _, _ in points)
            + '"/>'
        )
        for px, py, day, value in points:
            out.append(
                f'<circle data-series="{key}" data-day="{day.day.isoformat()}" '
                f'data-value="{value}" cx="{px:.1f}" cy="{py:.1f}" r="3" '
                f'fill="{_COLOURS[key]}"><title>{day.day.isoformat()}: {value} '
                f"{_e(label)}</title></circle>"
            )
    out.append("</svg>")
    return "\n".join(out)


def _flagged(flagged: Sequence[Flagged], total: int) -> str:
    out = [
        f'<section id="flagged"><h2>Opted in, proof missing '
        f'(<span data-key="flagged_total">{total}</span>)</h2>'
    ]
    if not flagged:
        out.append("<p>Every opted-in record has complete proof.</p></section>")
        return "\n".join(out)
    out.append(
        "<table><thead><tr><th>record</th><th>name</th><th>opt-in date</th>"
        "<th>source</th><th>missing</th></tr></thead><tbody>"
    )
    for row in flagged[:FLAGGED_SHOWN]:
        missing = "; ".join(_GAPS.get(gap, gap) for gap in row.missing)
        out.append(
            f'<tr data-record="{_e(row.record_id)}"><td>{_e(row.record_id)}</td>'
            f"<td>{_e(row.name)}</td><td>{_e(row.opt_in_date)}</td>"
            f"<td>{_e(row.opt_in_source)}</td><td>{_e(missing)}</td></tr>"
        )
    out.append("</tbody></table>")
    if total > FLAGGED_SHOWN:
        out.append(
            f'<p class="note">The first {FLAGGED_SHOWN} of {total}; '
            "<code>waconsent report missing-proof --format csv</code> lists all.</p>"
        )
    out.append("</section>")
    return "\n".join(out)


def _conflicts(last: Run | None) -> str:
    conflicts = last.listed("conflicts") if last else None
    out = [
        '<section id="conflicts"><h2>Conflicts</h2>',
        '<p class="note">A consent change in the CRM newer than a WhatsApp event: the CRM '
        "stands, and someone should look.</p>",
    ]
    if conflicts is None:
        out.append(
            "<p>Not recorded for this run (runs before this report kept only counts; "
            "<code>sync --report</code> has them).</p>"
        )
    elif not conflicts:
        out.append("<p>None in the last run.</p>")
    else:
        out.append("<table><thead><tr><th>record</th><th>what happened</th></tr></thead><tbody>")
        out += [
            f"<tr><td>{_e(c.get('record'))}</td><td>{_e(c.get('conflict'))}</td></tr>"
            for c in conflicts
            if isinstance(c, dict)
        ]
        out.append("</tbody></table>")
    out.append("</section>")
    return "\n".join(out)


def _unmatched(last: Run | None) -> str:
    listed = last.listed("unmatched") if last else None
    count = last.count("unmatched_numbers") if last else 0
    out = [
        f'<section id="unmatched"><h2>Numbers with activity but no record ({count})</h2>',
        '<p class="note">Counted and listed, never created in the CRM.</p>',
    ]
    if listed is None:
        out.append("<p>Not recorded for this run.</p>")
    elif listed:
        out.append(
            '<ul class="masked">' + "".join(f"<li>{_e(key)}</li>" for key in listed) + "</ul>"
        )
        if count > len(listed):
            out.append(f'<p class="note">{len(listed)} of {count} shown.</p>')
    out.append("</section>")
    return "\n".join(out)
