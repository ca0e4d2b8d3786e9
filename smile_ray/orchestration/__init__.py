"""Orchestration: everything that imports Ray or MLflow, as siblings over the core.

* ``cluster``   -- start or join Ray, fail fast on a bad address, resources
* ``ray_train`` -- the core's recipe on N Ray Train workers (DDP), fault tolerance
* ``trainable`` -- one Tune trial = one core run or one Ray Train run, reporting per evaluation
* ``spaces``    -- search-space and ablation files -> validated studies (plain Python)
* ``runner``    -- a set of trials under Ray Tune, tracked in MLflow, resumable
* ``tune``, ``ablate`` -- the studies a user runs
* ``tracking``  -- MLflow parent/child runs

Each calls the core and ``trainable``/``runner``; none reaches into another's internals.
"""
