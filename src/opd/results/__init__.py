"""Turning finished runs into shipped results, one small command each (``python -m opd.results.<name>``).

- :mod:`~opd.results.table1`: the mini Table 1 from the runs' evaluations and training logs;
- :mod:`~opd.results.teacher_cards`: the mini teachers' model cards and their results page;
- :mod:`~opd.results.pick_teachers`: each skill's teacher among candidates (scored on training
  prompts), its adapter installed and the Hydra overrides that use it printed;
- :mod:`~opd.results.pick_base`: the mini base among pre-training snapshots
  (:mod:`opd.evaluation.choose`'s rule on the headline metrics);
- :mod:`~opd.results.compare`: several runs' logged curves overlaid;
- :mod:`~opd.results.pack`: a folder of runs packed into tarballs, without what is large and
  reproducible;
- :mod:`~opd.results.ship_adapter`: an adapter shipped as fp16, with how far its velocity moved.

The headline metric of every task is read from ``conf/eval_tasks/<suite>.yaml`` (:mod:`~opd.results.
metrics`), training logs from ``<run>/csv/version_*/metrics.csv`` (:mod:`~opd.results.logs`). The
ordered chains of runs behind these results are Make targets (``make mini-table1``, ``make mini-teachers``).
"""
