"""The embedded sets by dataset kind, and :func:`generate` (all or some of them, serially or on a pool).

:data:`BUILDERS` has one builder per kind of :data:`ibot.data.kinds.DATASET_KINDS` marked
``embedded`` (verified at import); each set lands in the kind's ``embedded_root`` folder.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Iterator, Sequence
from pathlib import Path

from ibot.data.embedded import ade20k, coco, imagenet, imagenet_9, imagenet_a, imagenet_c
from ibot.data.embedded import cars, cifar, flowers, inat
from ibot.data.embedded import davis
from ibot.data.embedded import revisitop
from ibot.data.embedded.base import EmbeddedSizes, Mapper, SetBuilder
from ibot.data.embedded.manifest import materialise
from ibot.data.kinds import DATASET_KINDS, EMBEDDED_KINDS, check_coverage

__all__ = ["BUILDERS", "SETS", "ROOT_NAMES", "generate"]

BUILDERS: dict[str, SetBuilder] = {
    "imagenet": imagenet.BUILDER,
    "coco": coco.BUILDER,
    "ade20k": ade20k.BUILDER,
    "imagenet_c": imagenet_c.BUILDER,
    "imagenet_a": imagenet_a.BUILDER,
    "imagenet_9": imagenet_9.BUILDER,
    "cifar10": cifar.CIFAR10_BUILDER,
    "cifar100": cifar.CIFAR100_BUILDER,
    "inat18": inat.INAT18_BUILDER,
    "inat19": inat.INAT19_BUILDER,
    "flowers": flowers.BUILDER,
    "cars": cars.BUILDER,
    "davis": davis.BUILDER,
    "revisitop": revisitop.BUILDER,
}
check_coverage("ibot.data.embedded.sets.BUILDERS", BUILDERS, EMBEDDED_KINDS)

#: The embedded sets, in DATASET_KINDS order.
SETS: tuple[str, ...] = EMBEDDED_KINDS
#: Set -> its folder under the output directory.
ROOT_NAMES: dict[str, str] = {name: str(DATASET_KINDS[name].embedded_root) for name in SETS}


@contextlib.contextmanager
def _mapper(workers: int) -> Iterator[Mapper]:
    """Ordered map of a task function over argument tuples, in-process or on a pool."""
    if workers <= 1:
        yield lambda fn, tasks: (fn(*task) for task in tasks)
        return
    with multiprocessing.Pool(workers) as pool:
        yield lambda fn, tasks: pool.starmap(fn, tasks, chunksize=max(1, len(tasks) // (8 * workers)))


def generate(
    out_dir: str | Path,
    seed: int = 0,
    sets: Sequence[str] | None = None,
    sizes: EmbeddedSizes | None = None,
    *,
    workers: int = 1,
) -> dict[str, Path]:
    """Write the requested sets (default: all of ``SETS``) under ``out_dir``.

    Returns the root of each set.  Existing complete sets with the same seed and
    sizes are reused; conflicting ones raise FileExistsError.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    sets = list(SETS if sets is None else sets)
    unknown = sorted(set(sets) - set(SETS))
    if unknown:
        raise ValueError(f"unknown sets {unknown}; choose from {list(SETS)}")
    sizes = sizes or EmbeddedSizes()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _mapper(workers) as run:
        return {name: materialise(name, out / ROOT_NAMES[name], seed, sizes, BUILDERS[name], run) for name in sets}
