"""Orchestration: everything that imports Ray or MLflow, as siblings over the core.

* ``cluster``   -- start or join Ray, fail fast on a bad address, resources
* ``ray_train`` -- the core's recipe on N Ray Train workers (DDP), fault tolerance
* ``trainable`` -- one Tune trial = one core run or one Ray Train run, reporting per evaluation
* ``spaces``    -- the space, definitions and settings files -> validated studies (plain Python)
* ``study``     -- the scaffold every study shares: state file, --resume, storage, the MLflow parent
* ``runner``    -- one Tune experiment of a study, tracked in MLflow, resumable
* ``tune``, ``ablate``, ``compare`` -- the studies a user runs, each only its own logic
* ``tracking``  -- MLflow parent/child runs

Each calls the core and ``study``/``trainable``/``runner``; none reaches into another's internals.
"""
