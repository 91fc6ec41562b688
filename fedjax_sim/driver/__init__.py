"""The impure driver: one round loop (``loop.run_loop``) built from small parts.

- ``cohorts.CohortSource``: sampling, packing, step buckets, device-resident examples.
- ``programs.SoloProgram`` / ``programs.VectorProgram``: the compiled round of one member or of
  a vectorized sweep group.
- ``evaluation.Evaluator``: members' global models on their test clients.
- ``loop.Resume``: checkpoints and the bookkeeping to resume bitwise.
- ``runlog.RunLog``: ``metrics.jsonl``, TensorBoard events, ``summary.json``.

``fs.simulate`` and ``fs.run_sweep`` only turn configs into these parts and call ``run_loop``.
"""

from fedjax_sim.driver.loop import Resume, TrainingDiverged, run_loop

__all__ = ["Resume", "TrainingDiverged", "run_loop"]
