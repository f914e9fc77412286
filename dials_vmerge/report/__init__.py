"""The HTML report (dials.vmerge.html): plot series assembled from the program's JSON dict
(data.py), rendered into one self-contained file with plotly.js embedded (html.py)."""

from .data import report_content
from .html import render_report, report_html_path, stage_report, write_report

__all__ = ["report_content", "render_report", "report_html_path", "stage_report", "write_report"]
