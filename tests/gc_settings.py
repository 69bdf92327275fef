"""The garbage collector's thresholds of the test processes and of the children they start
(``tests/conftest.py``, ``tests/train_run.py``, ``tests/plan_run.py``).

Tracing and compiling allocate millions of short-lived objects, and at Python's default (a
young collection every 700 allocations) collections took 12 % of an in-process run of
test_models, test_export and test_losses_margin (18.4 of 151.6 s; 6.3 of 141.4 s with
these). What is collected is the same, later.
"""

THRESHOLDS = (50_000, 20, 100)
