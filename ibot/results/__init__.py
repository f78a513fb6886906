"""Results: one tidy summary per run, paper-style tables, plots, run comparison, DVC sharing.

- :mod:`ibot.results.aggregate` — every ``metrics.json`` of a run -> ``summary.csv`` (long table,
  joined with the paper's numbers through ``results/reference/metric_map.csv``, only for runs of the
  paper's experiment: ``results/reference/paper_protocols.csv``), runs/seeds -> mean ± std (n);
- :mod:`ibot.results.tables` — classification / dense / robustness tables (Markdown, CSV, LaTeX, HTML);
- :mod:`ibot.results.plots` and :mod:`ibot.results.attention` — matplotlib figures (Agg);
- :mod:`ibot.results.compare` — run vs run, run vs paper;
- :mod:`ibot.results.readme` — a run's figures written into README.md between markers;
- :mod:`ibot.results.dvc_tools` — DVC tracking of the pretraining outputs, push/pull, and the
  post-pull ``snakemake --touch`` that keeps a pulled checkpoint from triggering a rerun.

CLI: ``python -m ibot.results {summary,coverage,plan,tables,plots,attention,readme,compare,dvc-track,dvc-push,
dvc-pull}``.
"""
