"""Revisited Oxford 5k / Paris 6k (revisitop) as the official retrieval evaluation reads them.

Layout (bytedance/ibot@da316d8 ``evaluation/eval_image_retrieval.py:29-76``, the DINO copy of
revisitop's ``configdataset``): ``<root>/<dataset>/gnd_<dataset>.pkl`` with ``imlist`` (database
image names), ``qimlist`` (query image names) and ``gnd`` (one dict per query: ``bbx`` = query box
``[x0, y0, x1, y1]`` in pixels, ``easy`` / ``hard`` / ``junk`` = indices into ``imlist``), and the
images ``<root>/<dataset>/jpg/<name>.jpg`` (queries and database alike).

The official script ``pickle.load``s the file; a pickle can run arbitrary code, so
:func:`load_gnd` uses a restricted unpickler that only rebuilds plain containers and numpy arrays
(what revisitop's files hold). This module imports no torch: the layout checks use it.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

__all__ = ["DATASETS", "GND_KEYS", "QUERY_KEYS", "UnsafePickleError", "RestrictedUnpickler", "gnd_path",
           "image_path", "load_gnd", "validate_gnd"]

#: The two datasets one retrieval job evaluates (eval_image_retrieval.py:31, :88).
DATASETS: tuple[str, ...] = ("roxford5k", "rparis6k")
#: Top-level keys of gnd_<dataset>.pkl the evaluation reads (eval_image_retrieval.py:43-44, :50, :201).
GND_KEYS: tuple[str, ...] = ("imlist", "qimlist", "gnd")
#: Keys of one query's ground truth (eval_image_retrieval.py:208-217; bbx: revisitop's query crop).
QUERY_KEYS: tuple[str, ...] = ("bbx", "easy", "hard", "junk")

# Globals a revisitop pickle may name: numpy array / scalar / dtype reconstruction (module moved to
# numpy._core in numpy 2), harmless builtin containers and the bytes codec. Anything else (os.system,
# eval, ...) is refused.
_ALLOWED: frozenset[tuple[str, str]] = frozenset(
    [(module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
     for name in ("_reconstruct", "scalar")]
    + [("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
       ("numpy._core.numeric", "_frombuffer")]
    + [("builtins", name) for name in ("set", "frozenset", "complex", "slice", "range", "bytearray")]
    + [("_codecs", "encode")]  # protocol <= 2 pickles rebuild bytes (array buffers) with it
)


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global outside the revisitop whitelist (it could run code)."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the whitelisted numpy/builtin globals (:data:`_ALLOWED`)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise UnsafePickleError(f"refusing to load global {module}.{name} (only numpy arrays and plain "
                                    f"containers are allowed in a revisitop ground-truth pickle)")
        return super().find_class(module, name)


def gnd_path(root: str | Path, dataset: str) -> Path:
    """``<root>/<dataset>/gnd_<dataset>.pkl`` (eval_image_retrieval.py:35)."""
    return Path(root) / dataset / f"gnd_{dataset}.pkl"


def image_path(root: str | Path, dataset: str, name: str) -> Path:
    """``<root>/<dataset>/jpg/<name>.jpg`` (eval_image_retrieval.py:42, :58)."""
    return Path(root) / dataset / "jpg" / f"{name}.jpg"


def load_gnd(path: str | Path) -> dict[str, Any]:
    """The ground-truth dict of ``gnd_<dataset>.pkl``, unpickled with :class:`RestrictedUnpickler`
    (``encoding="latin1"``: revisitop's files were written by Python 2)."""
    data = Path(path).read_bytes()
    cfg = RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a dict, got {type(cfg).__name__}")
    return cfg


def validate_gnd(cfg: dict[str, Any], where: str) -> None:
    """Raise ValueError unless ``cfg`` has the keys and index ranges the evaluation relies on."""
    missing = [key for key in GND_KEYS if key not in cfg]
    if missing:
        raise ValueError(f"{where} has no {missing} (expected keys {list(GND_KEYS)})")
    imlist, qimlist, gnd = cfg["imlist"], cfg["qimlist"], cfg["gnd"]
    if not len(imlist) or not len(qimlist):
        raise ValueError(f"{where} lists {len(imlist)} database and {len(qimlist)} query images")
    if len(gnd) != len(qimlist):
        raise ValueError(f"{where} has {len(gnd)} 'gnd' entries for {len(qimlist)} queries")
    for q, entry in enumerate(gnd):
        if not isinstance(entry, dict) or any(key not in entry for key in QUERY_KEYS):
            raise ValueError(f"{where}: gnd[{q}] lacks one of {list(QUERY_KEYS)}")
        for key in ("easy", "hard", "junk"):
            bad = [int(i) for i in entry[key] if not 0 <= int(i) < len(imlist)]
            if bad:
                raise ValueError(f"{where}: gnd[{q}]['{key}'] indexes {bad[:3]} outside imlist (0..{len(imlist) - 1})")
        if len(entry["bbx"]) != 4:
            raise ValueError(f"{where}: gnd[{q}]['bbx'] is not [x0, y0, x1, y1]: {entry['bbx']!r}")
