"""One self-contained HTML file: plotly.js (from the plotly Python package) embedded, the
report content as one JSON block (id "report-data") that a small script draws from. Opens
offline; nothing is fetched at view time."""

from __future__ import annotations

import html
import json
import math
import os

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0 auto;
       max-width: 1300px; padding: 0 16px 40px; color: #222; }
h1 { font-size: 1.6em; margin: 18px 0 4px; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; margin-top: 28px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 8px; }
.plot { min-height: 380px; border: 1px solid #eee; }
table { border-collapse: collapse; font-size: 0.9em; margin: 8px 0; }
td, th { padding: 2px 10px; border-bottom: 1px solid #eee; text-align: right; }
td:first-child, th:first-child { text-align: left; }
.note { color: #555; font-size: 0.9em; }
.tables { display: flex; flex-wrap: wrap; gap: 0 48px; align-items: flex-start; }
"""

DRAW_SCRIPT = """
(function () {
  var content = JSON.parse(document.getElementById("report-data").textContent);
  content.sections.forEach(function (section) {
    section.plots.forEach(function (plot) {
      Plotly.newPlot(document.getElementById(plot.id), plot.data, plot.layout,
                     {responsive: true, displaylogo: false});
    });
  });
})();
"""


def plotly_js() -> str:
    """The minified plotly.js shipped inside the plotly Python package."""
    import plotly

    path = os.path.join(os.path.dirname(plotly.__file__), "package_data", "plotly.min.js")
    with open(path, encoding="utf-8") as f:
        return f.read()


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return ""
        if value != 0 and abs(value) < 0.01:  # small values (ΔCC½ in %) keep 3 digits
            return f"{value:.3g}"
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return html.escape(str(value))


def _table(table: dict) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table["columns"])
    rows = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>"
                   for row in table["rows"])
    return (f'<h3>{html.escape(table["title"])}</h3><table id="table-{table["id"]}">'
            f"<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")


def _json_for_script(content: dict) -> str:
    # NaN is not JSON; "</" would end the script element early
    text = json.dumps(content, allow_nan=False, separators=(",", ":"))
    return text.replace("</", "<\\/")


def render_report(content: dict) -> str:
    body = [f"<h1>{html.escape(content['title'])}</h1>",
            f'<p class="note">Merged with merging.method={html.escape(content["method"])}. '
            "Plots: drag to zoom, double-click to reset, hover for values.</p>"]
    body.append('<div class="tables">' + "".join(f"<div>{_table(t)}</div>"
                                                 for t in content["tables"]) + "</div>")
    for section in content["sections"]:
        body.append(f"<h2>{html.escape(section['title'])}</h2><div class=\"grid\">")
        body += [f'<div class="plot" id="{plot["id"]}"></div>' for plot in section["plots"]]
        body.append("</div>")
        if section.get("tables"):
            body.append('<div class="tables">' + "".join(f"<div>{_table(t)}</div>"
                                                         for t in section["tables"]) + "</div>")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(content['title'])}</title><style>{STYLE}</style>"
        f"<script>{plotly_js()}</script></head><body>\n" + "\n".join(body)
        + f'\n<script type="application/json" id="report-data">{_json_for_script(content)}'
        f"</script>\n<script>{DRAW_SCRIPT}</script>\n</body></html>\n"
    )


def report_html_path(params, default: str):
    """output.html: Auto (the default) gives `default`, None turns the report off."""
    from libtbx import Auto

    path = getattr(getattr(params, "output", None), "html", Auto)
    return default if path is Auto else path


def stage_report(report: dict, params, staged, program: str, log) -> None:
    """The program's HTML report (`<program>.html` unless output.html says otherwise),
    written among the `staged` outputs, and its line in the log."""
    html_path = report_html_path(params, f"{program}.html")
    if html_path:
        write_report(report, staged.path_for(html_path), program)
        log.info(f"Written report {html_path}")


def write_report(report: dict, path: str, program: str = "dials.vmerge") -> None:
    """Write the report of a program's JSON dict to `path` (the caller stages it)."""
    from .data import report_content

    text = render_report(report_content(report, program))
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
