"""Research tools run from a checkout (`python benchmarks/<name>.py`): benchmark, reproduction table, toy model
training and report. Not part of the installed package."""
