"""The parts of benchmarks/gpu_check.py (the device check a lent GPU runs once), one module each.

They are imported by gpu_check.py, which first puts this checkout's src/ and its root on sys.path
(lmserve from the repo, the test checkpoints of tests/support/family_checkpoints.py): run the script, not
these modules. `report` and `common` are what every part uses; `shapes` the model shapes and the
published numbers the parts measure against; `table` renders a report as gpu_check.md.
"""
