"""The corpus report: a static, self-contained HTML page (`OUT/report/index.html`) with the funnel, score
distributions, a paginated gallery, per-filter samples, near-duplicates, flagged captions and a throughput projection.
"""

from pipeline.report.build import PlanRequest, ReportResult, build_report

__all__ = ["PlanRequest", "ReportResult", "build_report"]
