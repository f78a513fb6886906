"""The stage context: everything one stage's job is given, built once from its registry entry.

``python -m downstream <stage>`` (:mod:`ibot.run.cli`) builds a :class:`StageContext` in the waiting
process (no torch there) and the launcher runs :func:`run_stage` with it in the job (a local
subprocess or SLURM tasks). :func:`run_stage` joins the process group, prepares the fingerprinted
work directory exactly when the entry says ``resumable`` and calls the entry's ``run(ctx)``. A stage
function then only computes: its config is resolved and complete, its model a :class:`ModelSpec`, its
data roots keyed by the entry's ``datasets``, its checkpoint read once (:class:`BackboneCheckpoint`),
and :meth:`StageContext.write_metrics` fills in the run, model, stage, config, checkpoint, wall time
and work fingerprint of the record.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from ibot.checkpoint import BackboneCheckpoint
from ibot.models.specs import ModelSpec
from ibot.stages import Stage, get_stage
from ibot.workdir import WorkDir

__all__ = ["StageContext", "run_stage"]


@dataclass(frozen=True)
class StageContext:
    """One stage x model of one run, as its job sees it (see the module docstring)."""

    stage: str                                       # registry name
    config: Mapping[str, Any]                        # resolved once (ibot.config), complete
    model: ModelSpec
    out: Path                                        # its metrics.json; every other output goes beside it
    data: Mapping[str, Path]                         # dataset kind -> root, kinds of the entry's `datasets`
    checkpoint: BackboneCheckpoint | None = None     # the evaluated weights (None: random init)
    inputs: Mapping[str, Path] = field(default_factory=dict)  # files of other stages (entry `needs`) by flag: head
    run: str = "standalone"
    model_name: str = ""                             # results/<run>/<model_name>/ (default: the arch)
    seed: int = 0
    work: WorkDir | None = None                      # prepared in the job iff the entry is resumable
    fresh: str | None = None                         # token of a requested fresh recompute (ibot.workdir)
    started: float | None = None                     # set in the job: the wall time of the record starts here

    @property
    def entry(self) -> Stage:
        return get_stage(self.stage)

    @property
    def name(self) -> str:
        """The model's name in results (``models.<name>``), the arch when run standalone."""
        return self.model_name or self.model.arch

    @property
    def dir(self) -> Path:
        return self.out.parent

    @property
    def tb_dir(self) -> Path:
        return self.dir / "tb"

    @property
    def data_root(self) -> Path:
        """The root of the dataset it reads (the first of its kinds that is given)."""
        return next(iter(self.data.values()))

    def fingerprint(self) -> dict[str, Any]:
        """Everything that determines its result (:func:`ibot.workdir.stage_fingerprint`), the content of
        the input files its config names (entry ``file_keys`` that are set) included, with the ``heads.pth``
        our pretraining exports beside a backbone (a frozen MIM tokenizer reads both)."""
        from ibot.checkpoint import locate_heads, sha256_file
        from ibot.code_identity import code_identity
        from ibot.distributed import world_size
        from ibot.workdir import stage_fingerprint

        files = {}
        for key in self.entry.file_keys:
            value: Any = self.config
            for part in key.split("."):
                value = value.get(part) if isinstance(value, Mapping) else None
            if value:
                files[key] = sha256_file(value)
                heads = locate_heads(None, value)
                if heads != Path(value):
                    files[f"{key}:heads"] = sha256_file(heads)
        return stage_fingerprint(
            stage=self.stage, config=self.config, model_spec=self.model.as_dict(),
            checkpoint_sha256=self.checkpoint.sha256 if self.checkpoint else None, data=self.data, seed=self.seed,
            world_size=world_size(), operational_keys=self.entry.operational_keys, files=files,
            code=code_identity(self.entry.entry))

    def write_metrics(self, *, task: str, dataset: str, protocol: str, metrics: Mapping[str, float | None],
                      extra: Mapping[str, Any] | None = None, null_reasons: Mapping[str, str] | None = None,
                      intervals: Mapping[str, Any] | None = None, baselines: Mapping[str, Any] | None = None,
                      ) -> dict[str, Any] | None:
        """Write its ``metrics.json`` (main process only; others get None): the record of
        :func:`ibot.metrics.write_metrics` with everything the context knows filled in, and the work
        fingerprint in ``extra['fingerprint']`` when it keeps a work directory; ``intervals`` and ``baselines``
        as :mod:`ibot.uncertainty` builds them."""
        from ibot.distributed import is_main
        from ibot.metrics import write_metrics

        if not is_main():
            return None
        extra = {**(extra or {}), **({"fingerprint": self.work.digest} if self.work else {})}
        record = write_metrics(self.out, run=self.run, model=self.name, stage=self.stage, task=task, dataset=dataset,
                               protocol=protocol, metrics=metrics, config=self.config,
                               wall_time_s=time.time() - (self.started or time.time()), checkpoint=self.checkpoint,
                               extra=extra, null_reasons=null_reasons, intervals=intervals, baselines=baselines)
        print(f"[{self.stage}] wrote {self.out}", flush=True)
        return record


def run_stage(ctx: StageContext) -> Any:
    """The job: join the process group, prepare ``work/`` if the entry is resumable, run ``entry(ctx)``."""
    from ibot.distributed import barrier, init_distributed
    from ibot.run.launcher import resolve_entry
    from ibot.workdir import prepare_work_dir

    init_distributed()
    ctx = replace(ctx, started=time.time())
    if ctx.entry.resumable:
        ctx = replace(ctx, work=prepare_work_dir(ctx.dir / "work", ctx.fingerprint(), fresh=ctx.fresh))
    result = resolve_entry(ctx.entry.entry)(ctx)
    barrier()  # every process leaves once the main one has written the record
    return result
