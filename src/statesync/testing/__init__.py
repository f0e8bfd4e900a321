"""The harness tests and benchmarks use, shipped with the package as psutil ships
``psutil.tests``: a controllable dirty-page workload (:mod:`~statesync.testing.workloads`,
run as ``python -m statesync.testing.workloads``), third-party services as targets
(:mod:`~statesync.testing.services`), two "hosts" on one machine
(:mod:`~statesync.testing.testbed`) and downtime measured from outside
(:mod:`~statesync.testing.downtime`).
"""
