"""Planning a migration: KPI targets and the cost model (:mod:`~statesync.planning.kpi`),
pluggable schedulers (:mod:`~statesync.planning.scheduler`), the scenario simulator
(:mod:`~statesync.planning.sim`) and CRIU's switch-over cost calibration
(:mod:`~statesync.planning.costs`). Pure computation: nothing here touches a process.
"""
