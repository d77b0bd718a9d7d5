"""Tuning: a registered model, tuned on train/dev/test data, becomes a new one.

* :mod:`llmos.tuning.data` reads and checks the splits (JSON Lines, CSV,
  TSV, inline rows);
* :mod:`llmos.tuning.jobs` is the job manager, ``kernel.jobs``: the queue in
  ``home/jobs.db``, the scheduler, cancelling, resuming after a crash, and
  registering the result as a model whose parent is the base;
* :mod:`llmos.tuning.worker` is the process each job runs in, and the
  parent's handle on it;
* :mod:`llmos.tuning.evaluation` scores a classifier on labelled rows;
* :mod:`llmos.tuning.commands` is ``llmos tune`` and ``llmos jobs``,
  :mod:`llmos.tuning.evaluate` is ``llmos eval``.

The methods themselves (LoRA and the other PEFT methods) are plugins:
``llmos_register_tuning_methods``. Nothing here imports torch; a method does,
in its worker process.
"""
