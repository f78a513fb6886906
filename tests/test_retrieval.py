"""Image retrieval on Revisited Oxford/Paris (Tab.16): revisitop's mAP / mP@k on a hand-made ground truth
with junk and an empty query, the protocol split, the restricted unpickler, the layout check, the
official patch-grid cropping, the embedded set and the stage end to end (both sets in one job)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
import yaml

from downstream import retrieval
from helpers import run_stage
from ibot.stages import stage_defaults
from ibot.data.embedded import EmbeddedSizes, generate
from ibot.data.layouts import DatasetLayoutError, check_layout
from ibot.data.revisitop import DATASETS, UnsafePickleError, gnd_path, load_gnd
from ibot.metrics import read_metrics

# pycocotools 2.0.x under numpy 2 warns on every decode (the embedded drawing rasterises with it)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = stage_defaults("retrieval")
TINY = ["--arch", "vit_tiny", "--depth", "2", "--patch-size", "8"]
TINY_SPEC = {"arch": "vit_tiny", "patch_size": 8, "depth": 2}
SIZES = EmbeddedSizes(revisitop_landmarks=2, revisitop_per_landmark=4, revisitop_distractors=3, revisitop_queries=3,
                      revisitop_size=48)

# 6 database images, 3 queries; columns of RANKS = each query's ranking (database indices, best first)
GND = [{"bbx": [0, 0, 1, 1], "easy": [0], "hard": [1], "junk": [5]},
       {"bbx": [0, 0, 1, 1], "easy": [2], "hard": [], "junk": []},
       {"bbx": [0, 0, 1, 1], "easy": [], "hard": [4], "junk": [0, 1]}]
RANKS = np.array([[3, 0, 5, 1, 4, 2], [2, 0, 1, 3, 4, 5], [0, 1, 4, 2, 3, 5]]).T


@pytest.fixture(scope="module")
def revisitop_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("embedded"), seed=0, sets=["revisitop"], sizes=SIZES)["revisitop"]


# -- scoring ----------------------------------------------------------------------------------------
def test_compute_map_against_hand_computed_values() -> None:
    medium, hard = (retrieval.protocol_gnd(GND, p) for p in ("medium", "hard"))
    # medium, query 0: positives 0, 1; junk 5 between them is skipped -> positives at 2nd and 3rd of
    # [3, 0, 1, 4, 2]: AP = 1/2 * ((0 + 1/2) / 2 + (1/2 + 2/3) / 2) = 5/12. Query 2: the junk 0, 1 ranked
    # first are skipped, not negatives -> its positive is first: AP 1 (as a negative each: 1/6).
    mean_ap, aps, mean_pr, prs = retrieval.compute_map(RANKS, medium, [1, 5, 10])
    assert aps == pytest.approx([5 / 12, 1.0, 1.0])
    assert mean_ap == pytest.approx(29 / 36)
    # mP@k: query 0's positives are 2nd and 3rd -> P@1 0, P@5 = P@10 = 2/3 (revisitop's kq = min(max(pos), k) = 3)
    assert prs[0] == pytest.approx([0.0, 2 / 3, 2 / 3]) and mean_pr == pytest.approx([2 / 3, 8 / 9, 8 / 9])
    # hard, query 0: positive 1, junk 5 and (easy) 0 skipped -> [3, 1, 4, 2]: 2nd, AP (0 + 1/2) / 2 = 1/4;
    # query 1 has no hard positive: excluded from the mean (NaN), not a zero
    mean_ap, aps, mean_pr, prs = retrieval.compute_map(RANKS, hard, [1, 5])
    assert aps[0] == pytest.approx(0.25) and np.isnan(aps[1]) and aps[2] == pytest.approx(1.0)
    assert mean_ap == pytest.approx(0.625)
    assert prs[0] == pytest.approx([0.0, 0.5]) and np.isnan(prs[1]).all()
    assert mean_pr == pytest.approx([0.5, 0.75])
    metrics = retrieval.evaluate_ranks(RANKS, GND, "roxford5k")
    assert metrics["roxford5k_medium_map"] == pytest.approx(100 * 29 / 36)
    assert metrics["roxford5k_hard_map"] == pytest.approx(62.5) and metrics["roxford5k_hard_mp1"] == pytest.approx(50)
    with pytest.raises(ValueError, match="no query has a positive"):
        retrieval.compute_map(RANKS[:, 1:2], [{"ok": [], "junk": []}])


def test_ranking_evidence_intervals_over_queries_and_random_ranking_baseline() -> None:
    intervals, baselines = retrieval.ranking_evidence(RANKS, GND, "roxford5k")
    assert set(intervals) == set(baselines) == set(retrieval.evaluate_ranks(RANKS, GND, "roxford5k"))
    # medium APs 5/12, 1, 1: the worst resample draws query 0 thrice (1/27 > 2.5 %), the best never (8/27)
    medium = intervals["roxford5k_medium_map"]
    assert (medium["low"], medium["high"], medium["n"]) == (pytest.approx(100 * 5 / 12), 100.0, 3)
    hard = intervals["roxford5k_hard_map"]  # query 1 has no hard positive: 2 queries, APs 1/4 and 1
    assert (hard["low"], hard["high"], hard["n"]) == (pytest.approx(25.0), 100.0, 2)
    # a random ranking of 3 images with 1 positive puts it 1st, 2nd or 3rd: AP 1, 1/4 or 1/6 (mean 17/36);
    # P@1 1/3, P@5 = P@10 = 1/p at position p (kq = p): 1/3 * (1 + 1/2 + 1/3) = 11/18
    gnd = [{"easy": [], "hard": [2], "junk": []}] * 10
    _, baselines = retrieval.ranking_evidence(np.tile(np.arange(3)[:, None], (1, 10)), gnd, "x", rankings=1000)
    assert baselines["x_medium_map"]["value"] == pytest.approx(100 * 17 / 36, abs=1.5)
    assert baselines["x_medium_mp1"]["value"] == pytest.approx(100 / 3, abs=1.5)
    assert baselines["x_medium_mp5"]["value"] == pytest.approx(100 * 11 / 18, abs=1.5)
    assert "random ranking" in baselines["x_medium_map"]["kind"]


def test_protocols_and_ranking() -> None:
    medium, hard = (retrieval.protocol_gnd(GND, p) for p in ("medium", "hard"))
    assert sorted(medium[0]["ok"]) == [0, 1] and list(medium[0]["junk"]) == [5]
    assert list(hard[0]["ok"]) == [1] and sorted(hard[0]["junk"]) == [0, 5]
    assert len(hard[1]["ok"]) == 0 and list(medium[1]["ok"]) == [2]
    database = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    ranks = retrieval.rank_database(database, torch.tensor([[3.0, 0.1], [0.0, 1.0]]))
    assert ranks[:, 0].tolist() == [0, 2, 1] and ranks[:, 1].tolist() == [1, 2, 0]  # cosine, not dot product


def test_patch_crop_gives_the_official_patch_tokens() -> None:
    """The official stride-p patch convolution ignores the pixels past the last whole patch."""
    conv = torch.nn.Conv2d(3, 4, kernel_size=8, stride=8)
    images = torch.randn(1, 3, 29, 42)
    cropped = retrieval.patch_crop(images, 8)
    assert cropped.shape[-2:] == (24, 40)
    assert torch.equal(conv(cropped), conv(images))
    with pytest.raises(ValueError, match="smaller than one"):
        retrieval.patch_crop(torch.zeros(1, 3, 7, 40), 8)


def test_multiscale_feature_is_the_normalised_mean_over_scales() -> None:
    from downstream.engine.setup import build_eval_backbone
    torch.manual_seed(0)
    backbone = build_eval_backbone(TINY_SPEC, None, 32)
    images = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        ours = retrieval.retrieval_feature(backbone, images, multiscale=True)
        expected = sum(backbone(retrieval.patch_crop(torch.nn.functional.interpolate(
            images, scale_factor=s, mode="bilinear", align_corners=False) if s != 1 else images, 8))[:, 0]
            for s in (1, 2 ** -0.5, 0.5)) / 3
    assert torch.allclose(ours, expected / expected.norm(dim=-1, keepdim=True), atol=1e-6)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(2))


#: The official retrieval protocol of the paper (run.sh paris_oxford_reid + eval_image_retrieval.py):
#: key -> (value, source). tests/test_recipes.py holds the paper config to it.
OFFICIAL_RETRIEVAL = {
    "datasets": (["roxford5k", "rparis6k"], "run.sh:452-474 (both sets)"),
    "imsize": (512, "run.sh:460,471 --imsize 512"),
    "multiscale": (True, "run.sh:461,472 --multiscale 1"),
    "query_crop": (False, "eval_image_retrieval.py:57-68 (the whole query image)"),
    "batch_size_per_gpu": (1, "eval_image_retrieval.py:120,127"),
    "precision": ("fp32", "eval_image_retrieval.py (no autocast)"),
}


def test_defaults_follow_run_sh_and_schema() -> None:
    schema = yaml.safe_load((ROOT / "workflow/schemas/retrieval.schema.yaml").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(DEFAULTS, schema)
    assert {key: DEFAULTS[key] for key in OFFICIAL_RETRIEVAL} == \
        {key: value for key, (value, _) in OFFICIAL_RETRIEVAL.items()}
    assert retrieval.protocol_label(DEFAULTS) == "cls,thumbnail=512,multiscale,full-query"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**DEFAULTS, "datasets": ["oxford5k"]}, schema)


def test_the_paper_config_writes_the_paper_protocol_label() -> None:
    """config/paper.yaml's ViT-S/16 retrieval job joins Tab.16 (paper_protocols.csv), for iBOT and DINO."""
    import pandas as pd

    from ibot.config import load_yaml, stage_config, validate_config
    config = validate_config(load_yaml(ROOT / "config" / "paper.yaml"), base_dir=ROOT)
    rows = pd.read_csv(ROOT / "results/reference/paper_protocols.csv", dtype=str).query("stage == 'retrieval'")
    assert set(rows["paper_model"]) == {"ViT-S/16", "DINO ViT-S/16"}
    assert set(rows["dataset"]) == {"roxford5k+rparis6k"}
    assert set(rows["protocol"]) == {retrieval.protocol_label(stage_config(config, "retrieval", "vit_small"))}
    real = {"roxford5k": (4993, 70), "rparis6k": (6322, 70)}
    assert retrieval.dataset_name("/data/revisited_paris_oxford", real) == "roxford5k+rparis6k"


# -- data -------------------------------------------------------------------------------------------
def test_restricted_unpickler_refuses_code(tmp_path: Path) -> None:
    class Exploit:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "victim"),))

    (tmp_path / "victim").mkdir()
    path = tmp_path / "gnd.pkl"
    path.write_bytes(pickle.dumps({"imlist": ["a"], "qimlist": [], "gnd": [Exploit()]}))
    with pytest.raises(UnsafePickleError, match="shutil.rmtree"):
        load_gnd(path)
    assert (tmp_path / "victim").is_dir()
    arrays = {"imlist": ["a"], "qimlist": ["q"], "gnd": [{"bbx": np.array([0.0, 1.0, 2.0, 3.0]),
                                                         "easy": np.array([0]), "hard": [], "junk": []}]}
    for protocol in (2, 4, 5):  # numpy arrays (protocol 2: Python 2 era files) do load
        path.write_bytes(pickle.dumps(arrays, protocol=protocol))
        assert load_gnd(path)["gnd"][0]["bbx"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_embedded_set_is_the_revisitop_layout(revisitop_root: Path) -> None:
    check_layout("revisitop", revisitop_root)
    with pytest.raises(ValueError, match="revisitop_per_landmark"):  # every landmark needs an easy and a hard view
        EmbeddedSizes(revisitop_per_landmark=1)
    for name in DATASETS:
        cfg = load_gnd(gnd_path(revisitop_root, name))
        n_db = SIZES.revisitop_landmarks * SIZES.revisitop_per_landmark + SIZES.revisitop_distractors
        assert len(cfg["imlist"]) == n_db and len(cfg["qimlist"]) == SIZES.revisitop_queries
        assert not set(cfg["imlist"]) & set(cfg["qimlist"])  # queries are not in the database (revisitop)
        for entry in cfg["gnd"]:
            assert entry["easy"] and entry["hard"] and entry["junk"]  # 4 per landmark: 2 easy, 1 hard, 1 junk
            x0, y0, x1, y1 = entry["bbx"]
            assert 0 <= x0 < x1 and 0 <= y0 < y1
        from PIL import Image
        with Image.open(revisitop_root / name / "jpg" / f"{cfg['imlist'][0]}.jpg") as image:
            assert sorted(image.size) == [38, 48]  # 4:5, not square


def test_layout_check_names_the_missing_file(revisitop_root: Path, tmp_path: Path) -> None:
    broken = Path(shutil.copytree(revisitop_root, tmp_path / "revisitop"))
    cfg = load_gnd(gnd_path(broken, "rparis6k"))
    (broken / "rparis6k" / "jpg" / f"{cfg['imlist'][0]}.jpg").unlink()
    with pytest.raises(DatasetLayoutError, match=rf"data\.revisitop: .* has no 'rparis6k/jpg/{cfg['imlist'][0]}\.jpg'"):
        check_layout("revisitop", broken, config_key="data.revisitop")
    gnd_path(broken, "roxford5k").write_bytes(pickle.dumps({"imlist": ["x"], "qimlist": ["q"]}))
    with pytest.raises(DatasetLayoutError, match=r"unusable 'roxford5k/gnd_roxford5k\.pkl' .*\['gnd'\]"):
        check_layout("revisitop", broken, config_key="data.revisitop")
    gnd_path(broken, "roxford5k").write_bytes(b"cos\nsystem\n(S'true'\ntR.")  # a pickle that runs a command
    with pytest.raises(DatasetLayoutError, match=r"unusable 'roxford5k/gnd_roxford5k\.pkl' \(UnsafePickleError"):
        check_layout("revisitop", broken, config_key="data.revisitop")
    gnd_path(broken, "roxford5k").unlink()
    with pytest.raises(DatasetLayoutError, match=r"has no 'roxford5k/gnd_roxford5k\.pkl'"):
        check_layout("revisitop", broken, config_key="data.revisitop")


# -- stage ------------------------------------------------------------------------------------------
def test_stage_end_to_end_on_the_embedded_sets(revisitop_root: Path, tmp_path: Path) -> None:
    """One in-process job scores both sets; its numbers equal a batch-1 (official) recomputation."""
    out = tmp_path / "retrieval" / "metrics.json"
    config = {"imsize": 32, "batch_size_per_gpu": 8, "num_workers": 0}
    run_stage("retrieval", ["--data", str(revisitop_root), "--out", str(out), "--config", json.dumps(config),
                    "--resources", '{"cluster": "debug"}', "--model", "tiny", *TINY])
    record = read_metrics(out)
    assert record["stage"] == "retrieval" and record["dataset"] == "revisitop"
    assert record["protocol"] == "cls,thumbnail=32,multiscale,full-query"
    maps = {f"{name}_{p}_map" for name in DATASETS for p in ("medium", "hard")}
    assert maps <= set(record["metrics"]) and len(record["metrics"]) == 4 * 4  # + mP@1/5/10 each
    assert all(0.0 < record["metrics"][m] <= 100.0 for m in maps)
    assert set(record["intervals"]) == set(record["baselines"]) == set(record["metrics"])
    assert all(0.0 <= i["low"] <= i["high"] <= 100.0 and i["n"] >= 2 for i in record["intervals"].values())

    from downstream.engine.features import extract_features
    from downstream.engine.setup import build_eval_backbone
    torch.manual_seed(0)  # the stage seeds the random init with --seed 0
    backbone = build_eval_backbone(TINY_SPEC, None, 32)
    for name in DATASETS:
        cfg = load_gnd(gnd_path(revisitop_root, name))
        feats = {}
        for split in ("database", "query"):
            images = retrieval.RevisitopImages(revisitop_root, name, cfg, split, 32)
            feats[split], _ = extract_features(lambda x: retrieval.retrieval_feature(backbone, x, True),
                                               retrieval.image_loader(images, 1, 0), len(images),
                                               device=torch.device("cpu"))
        ranks = retrieval.rank_database(feats["database"], feats["query"])
        expected = retrieval.evaluate_ranks(ranks, cfg["gnd"], name)
        for key, value in expected.items():
            assert record["metrics"][key] == pytest.approx(value, abs=1e-6), key
