"""The run report: one self-contained HTML file per run (or per comparison of runs): curves, metrics, confusion
matrices, a retrieval strip and the resolved config. `python eval/report_html.py RUN [EVAL_JSON...] -o report.html`.

Modules: runs (reading run dirs and result JSONs), charts (matplotlib -> PNG data URIs), strip (retrieval strip),
page (HTML), write (`write_run_report`, `write_report_after_training`).
"""

from clipkit.report.write import write_report_after_training, write_run_report

__all__ = ["write_run_report", "write_report_after_training"]
