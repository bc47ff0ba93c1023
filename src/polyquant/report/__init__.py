"""Reports: sweeps over methods and settings (``compare``) and the results store they write."""
from polyquant.report.compare import DEFAULT_OUT, Run, default_runs, run_compare, summary_rows
from polyquant.report.store import ResultsStore

__all__ = ["DEFAULT_OUT", "ResultsStore", "Run", "default_runs", "run_compare", "summary_rows"]
