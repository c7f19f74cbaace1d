"""Research tools run from a checkout (`python lab/<name>.py`): benchmark, reproduction table, toy model
training and report. Not part of the installed package."""
