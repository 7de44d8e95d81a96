"""The run report: one self-contained HTML page (data, pairs, training, recall, gallery) and metrics.json."""

from moon.report.build import build_report, print_location, report_path

__all__ = ["build_report", "print_location", "report_path"]
