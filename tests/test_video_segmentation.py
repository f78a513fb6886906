"""DAVIS-2017 video object segmentation (Tab.16): the J/F port against hand-computed masks, label
propagation on synthetic features whose answer is known, the official frame sizing and defaults, the
layout check, the embedded set end to end through the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from downstream import video_segmentation as vs
from helpers import run_stage
from ibot.stages import stage_defaults
from downstream.davis_metrics import (boundary_f_measure, evaluate_sequence, region_similarity, seg2bmap, summarize,
                                      summary_evidence)
from ibot.data.layouts import DatasetLayoutError, check_layout
from ibot.metrics import read_metrics
from test_knn import TINY

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = stage_defaults("video_segmentation")
# pycocotools 2.0.x under numpy 2 warns on every decode (the embedded shapes are rasterised with it)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def square(shape: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[rows[0]:rows[1], cols[0]:cols[1]] = True
    return mask


# -- metrics ------------------------------------------------------------------------------------------
def test_region_similarity_of_a_shifted_square() -> None:
    gt = square((40, 40), (10, 20), (10, 20))
    pred = square((40, 40), (10, 20), (15, 25))  # shifted 5 px: 50 shared of 150 pixels
    assert region_similarity(gt, pred) == pytest.approx(50 / 150)
    assert region_similarity(gt, gt) == 1.0 and region_similarity(gt, ~gt) == 0.0
    assert region_similarity(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0  # both empty: 1 (db_eval_iou)


def test_seg2bmap_is_the_outline_offset_towards_the_origin() -> None:
    bmap = seg2bmap(square((40, 40), (10, 20), (10, 20)))
    outline = square((40, 40), (9, 20), (9, 20)) & ~square((40, 40), (10, 19), (10, 19))  # 11x11 box, 1 px wide
    assert np.array_equal(bmap, outline) and bmap.sum() == 40


def test_boundary_f_measure_by_hand() -> None:
    """40x60 image: tolerance ceil(0.008 * 72.1) = 1 px, a plus-shaped disk. gt 10x10, pred the same square
    extended 10 px to the right: 33 of pred's 60 boundary pixels lie within 1 px of gt's boundary
    (P = 0.55) and 33 of gt's 40 within 1 px of pred's (R = 0.825): F = 2PR / (P + R) = 0.66."""
    gt = square((40, 60), (10, 20), (10, 20))
    pred = square((40, 60), (10, 20), (10, 30))
    assert boundary_f_measure(gt, pred) == pytest.approx(0.66)
    assert boundary_f_measure(gt, gt) == 1.0
    assert boundary_f_measure(gt, square((40, 60), (10, 20), (11, 21))) == 1.0  # 1 px off: within tolerance
    assert boundary_f_measure(gt, square((40, 60), (25, 35), (40, 50))) == 0.0  # far away: P = R = 0
    assert boundary_f_measure(gt, np.zeros_like(gt)) == 0.0  # empty prediction: P = 1, R = 0
    assert boundary_f_measure(np.zeros_like(gt), np.zeros_like(gt)) == 1.0
    assert boundary_f_measure(gt, pred, bound_th=20) == 1.0  # >= 1: pixels


def test_sequence_evaluation_leaves_out_first_and_last_frame() -> None:
    gt = [np.zeros((40, 60), np.uint8) for _ in range(4)]
    for frame in gt:
        frame[square((40, 60), (10, 20), (10, 20))] = 1
        frame[square((40, 60), (25, 35), (40, 50))] = 2
    pred = [g.copy() for g in gt]
    pred[0][:], pred[-1][:] = 0, 0  # ignored frames
    pred[2][pred[2] == 2] = 0  # object 2 lost in frame 2 of the evaluated 1..2
    j, f = evaluate_sequence(gt, pred)
    assert j.tolist() == [1.0, 0.5] and f.tolist() == [1.0, 0.5]
    assert summarize({"a_1": (1.0, 1.0), "a_2": (0.5, 0.5)}) == {"jf_mean": 75.0, "j_mean": 75.0, "f_mean": 75.0}
    with pytest.raises(ValueError, match="object id 3"):
        evaluate_sequence(gt, [g + (g > 0) for g in gt])
    with pytest.raises(ValueError, match="at least 3"):
        evaluate_sequence(gt[:2], pred[:2])


def test_first_frame_copy_baseline_and_interval_over_objects() -> None:
    static = [np.zeros((40, 60), np.uint8) for _ in range(5)]
    for frame in static:
        frame[square((40, 60), (10, 20), (10, 20))] = 1
    moving = [f.copy() for f in static]  # object 1 still, object 2 moves 5 px right per frame
    for t, frame in enumerate(moving):
        frame[square((40, 60), (25, 35), (20 + 5 * t, 30 + 5 * t))] = 2
    copied = {}
    for name, gt in (("still", static), ("moving", moving)):
        j, f = evaluate_sequence(gt, [gt[0]] * len(gt))
        copied.update({f"{name}_{k + 1}": (j[k], f[k]) for k in range(len(j))})
    # a static video is its first frame: J = F = 1; the moving square overlaps its first position by
    # 50, 0, 0 of 150, 200, 200 pixels in the evaluated frames 1..3 -> J = (1/3 + 0 + 0) / 3
    assert copied["still_1"] == (1.0, 1.0) and copied["moving_1"] == (1.0, 1.0)
    assert copied["moving_2"][0] == pytest.approx(1 / 9)
    per_object = {"a_1": (1.0, 1.0), "a_2": (0.0, 0.0), "b_1": (1.0, 0.5)}
    intervals, baselines = summary_evidence(per_object, copied)
    assert set(intervals) == set(baselines) == {"jf_mean", "j_mean", "f_mean"}
    assert {k: b["value"] for k, b in baselines.items()} == pytest.approx(summarize(copied))
    assert baselines["j_mean"]["value"] == pytest.approx(100 * (2 + 1 / 9) / 3)  # still_1, moving_1, moving_2
    assert "first-frame mask" in baselines["j_mean"]["kind"]
    # 3 objects: all-zero resamples (1/27 > 2.5 %) give 0, all-perfect ones (1/27) 100 J
    assert (intervals["j_mean"]["low"], intervals["j_mean"]["high"], intervals["j_mean"]["n"]) == (0.0, 100.0, 3)
    assert intervals["f_mean"]["high"] == 100.0 and intervals["jf_mean"]["low"] == 0.0


# -- propagation --------------------------------------------------------------------------------------
def _shifted_scene(h: int, w: int, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source features = one-hot of the patch position; the target is the scene moved ``shift`` columns right
    (entering columns get a feature of their own, dimension h*w)."""
    source = torch.eye(h * w, h * w + 1)
    target = torch.zeros(h * w, h * w + 1)
    for i in range(h):
        for j in range(w):
            target[i * w + j] = source[i * w + j - shift] if j >= shift else torch.eye(h * w + 1)[h * w]
    return source, target


def test_labels_move_with_the_features() -> None:
    h, w, shift = 5, 6, 2
    source, target = _shifted_scene(h, w, shift)
    labels = torch.zeros(h, w, dtype=torch.long)
    labels[1:3, 0:3], labels[3:5, 3:4] = 1, 2
    one_hot = torch.nn.functional.one_hot(labels, 3).permute(2, 0, 1).float()[None]
    soft = vs.label_propagation(target, [source], [one_hot], h, w, topk=5, temperature=0.1,
                                mask=vs.neighborhood_mask(h, w, 12))
    moved = torch.zeros_like(labels)
    moved[:, shift:] = labels[:, :-shift]
    assert torch.equal(soft[0].argmax(0)[:, shift:], moved[:, shift:])
    assert torch.allclose(soft.sum(1), torch.ones(1, h, w))  # per-target weights are normalised
    # the neighbourhood restriction: 1 patch cannot reach a source 2 columns away
    restricted = vs.label_propagation(target, [source], [one_hot], h, w, topk=5, temperature=0.1,
                                      mask=vs.neighborhood_mask(h, w, 1))
    assert not torch.equal(restricted[0].argmax(0)[:, shift:], moved[:, shift:])


def test_context_frames_pool_their_top_k() -> None:
    """Two context frames: the target's exact match is in the second one; topk=1 takes only it."""
    h, w = 2, 3
    target = torch.eye(h * w, 2 * h * w)
    first = torch.roll(target, h * w, dims=1)  # orthogonal to every target patch
    seg_a = torch.zeros(1, 2, h, w)
    seg_a[:, 0] = 1
    seg_b = torch.zeros(1, 2, h, w)
    seg_b[:, 1] = 1
    soft = vs.label_propagation(target, [first, target], [seg_a, seg_b], h, w, topk=1, temperature=0.1, mask=None)
    assert torch.equal(soft, seg_b)


def test_neighborhood_mask_equals_the_official_loops() -> None:
    h, w, size = 4, 5, 1
    official = torch.zeros(h, w, h, w)  # restrict_neighborhood, eval_video_segmentation.py:76-90
    for i in range(h):
        for j in range(w):
            for p in range(2 * size + 1):
                for q in range(2 * size + 1):
                    if 0 <= i - size + p < h and 0 <= j - size + q < w:
                        official[i, j, i - size + p, j - size + q] = 1
    assert torch.equal(vs.neighborhood_mask(h, w, size), official.reshape(h * w, h * w))


def test_labels_to_mask_upsamples_to_the_frame() -> None:
    soft = torch.zeros(1, 2, 2, 3)
    soft[0, 0] = 1.0
    soft[0, 1, 0, 0], soft[0, 0, 0, 0] = 1.0, 0.0
    labels = vs.labels_to_mask(soft, 8, (20, 30))
    assert labels.shape == (20, 30) and labels.dtype == np.uint8
    assert labels[0, 0] == 1 and labels[-1, -1] == 0


def official_norm_mask_argmax(soft: torch.Tensor) -> torch.Tensor:
    """eval_video_segmentation.py:68-69 with norm_mask (:93-101), verbatim but for names."""
    mask = soft.clone()
    for cnt in range(mask.shape[0]):
        channel = mask[cnt, :, :]
        if channel.max() > 0:
            channel = channel - channel.min()
            channel = channel / channel.max()
            mask[cnt, :, :] = channel
    return torch.max(mask, dim=0)[1]


@pytest.mark.parametrize("case", ["random", "constant-positive", "two-constant", "non-positive"])
def test_labels_to_mask_is_the_official_norm_mask(case: str) -> None:
    generator = torch.Generator().manual_seed(0)
    soft = torch.rand(1, 4, 3, 5, generator=generator)
    soft = soft / soft.sum(dim=1, keepdim=True)
    if case == "constant-positive":  # 0/0 in norm_mask: NaN, which wins torch.max everywhere
        soft[0, 2] = 0.3
    elif case == "two-constant":  # the first NaN channel wins
        soft[0, 1], soft[0, 3] = 0.25, 0.5
    elif case == "non-positive":  # left unnormalised
        soft[0, 0] = -0.5
    up = torch.nn.functional.interpolate(soft, scale_factor=4, mode="bilinear", align_corners=False,
                                         recompute_scale_factor=False)[0]
    expected = official_norm_mask_argmax(up).to(torch.uint8).numpy()
    labels = vs.labels_to_mask(soft, 4, (12, 20))
    assert np.array_equal(labels, expected)
    if case != "random":
        assert len(np.unique(labels)) == 1 if case != "non-positive" else (labels != 0).all()


def test_predicted_void_is_background_and_other_extra_ids_raise() -> None:
    gt = [np.zeros((20, 20), dtype=np.uint8) for _ in range(3)]
    for frame in gt:
        frame[5:15, 5:15] = 1
    pred = [frame.copy() for frame in gt]
    pred[1][0:3, 0:3] = 255  # propagated void, away from the object
    j, f = evaluate_sequence(gt, pred)
    assert j.tolist() == [1.0] and f.tolist() == [1.0]
    pred[1][0, 0] = 2
    with pytest.raises(ValueError, match="object id 2 > the 1 objects"):
        evaluate_sequence(gt, pred)


#: The official DAVIS protocol (eval_video_segmentation.py, davis2017-evaluation): key -> (value, source).
#: tests/test_recipes.py holds the paper config to it.
OFFICIAL_VIDEO_SEGMENTATION = {
    "scale_size": (480, "eval_video_segmentation.py:188,215 scale_size=[480]"),
    "n_last_frames": (7, "eval_video_segmentation.py:253 --n_last_frames 7"),
    "size_mask_neighborhood": (12, "eval_video_segmentation.py:254 --size_mask_neighborhood 12"),
    "topk": (5, "eval_video_segmentation.py:256 --topk 5"),
    "temperature": (0.1, "eval_video_segmentation.py:120 exp(aff / 0.1)"),
    "bound_th": (0.008, "davis2017-evaluation metrics.py db_eval_boundary bound_th=0.008"),
}


def test_frame_sizing_and_defaults_are_official() -> None:
    import jsonschema
    assert vs.target_size(480, 854, 480) == (480, 832)  # DAVIS 480p: 854 floored to a multiple of 64
    assert vs.target_size(854, 480, 480) == (832, 480)
    official = {**{key: value for key, (value, _) in OFFICIAL_VIDEO_SEGMENTATION.items()}, "precision": "fp32",
                "save_masks": True}
    assert DEFAULTS == official
    assert vs.protocol_label(DEFAULTS) == "label-propagation,last-layer,480px,n_last_frames=7,nbhd=12,topk=5,T=0.1"
    schema = yaml.safe_load((ROOT / "workflow/schemas/video_segmentation.schema.yaml").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**DEFAULTS, "n_last_frames": 0}, schema)  # Queue(0) is unbounded officially


# -- data and end to end ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def davis_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ibot.data.embedded.base import EmbeddedSizes
    from ibot.data.embedded.sets import generate
    sizes = EmbeddedSizes(davis_videos=2, davis_frames=4, davis_size=64)
    return generate(tmp_path_factory.mktemp("embedded"), seed=0, sets=["davis"], sizes=sizes)["davis"]


def test_embedded_set_has_the_davis_layout(davis_root: Path) -> None:
    check_layout("davis", davis_root, config_key="data.davis")
    assert vs.video_list(davis_root) == ["video00", "video01"]
    first = Image.open(davis_root / "Annotations" / "480p" / "video01" / "00000.png")
    assert first.mode == "P" and first.size == (64, 38)
    assert sorted(np.unique(np.asarray(first)).tolist()) == [0, 1, 2]  # 2 objects, palette indices = ids
    assert len(list((davis_root / "JPEGImages" / "480p" / "video00").glob("*.jpg"))) == 4


def test_layout_check_names_the_missing_path(davis_root: Path, tmp_path: Path) -> None:
    broken = tmp_path / "davis"
    shutil.copytree(davis_root, broken)
    (broken / "Annotations" / "480p" / "video01" / "00000.png").unlink()
    with pytest.raises(DatasetLayoutError, match=r"data\.davis: .* 'Annotations/480p/video01/00000\.png'"):
        check_layout("davis", broken, config_key="data.davis")
    shutil.rmtree(broken / "JPEGImages" / "480p" / "video00")
    with pytest.raises(DatasetLayoutError, match=r"'JPEGImages/480p/video00/'"):
        check_layout("davis", broken, config_key="data.davis")
    (broken / "ImageSets" / "2017" / "val.txt").unlink()
    with pytest.raises(DatasetLayoutError, match=r"'ImageSets/2017/val\.txt'"):
        check_layout("davis", broken, config_key="data.davis")


def test_cli_end_to_end_on_the_embedded_set(davis_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # video01's first annotation gets a void (255) border, as DAVIS annotations may have
    davis_root = shutil.copytree(davis_root, tmp_path / "davis")
    first = davis_root / "Annotations" / "480p" / "video01" / "00000.png"
    image = Image.open(first)
    labels = np.asarray(image).copy()
    labels[:2], labels[:, :2] = 255, 255
    voided = Image.fromarray(labels)
    voided.putpalette(image.getpalette())  # L -> P
    voided.save(first)
    out = tmp_path / "video_segmentation" / "metrics.json"
    config = {"scale_size": 64, "size_mask_neighborhood": 2}
    run_stage("video_segmentation", ["--data", str(davis_root), "--out", str(out), "--config", json.dumps(config),
             "--resources", '{"cluster": "debug"}', "--model", "tiny", *TINY])
    record = read_metrics(out)  # schema-validated
    assert record["stage"] == "video_segmentation" and record["task"] == "video_seg" and record["dataset"] == "davis"
    assert record["protocol"] == "label-propagation,last-layer,64px,n_last_frames=7,nbhd=2,topk=5,T=0.1"
    metrics = record["metrics"]
    assert set(metrics) == {"jf_mean", "j_mean", "f_mean"}
    assert metrics["jf_mean"] == pytest.approx((metrics["j_mean"] + metrics["f_mean"]) / 2)
    assert record["extra"]["num_objects"] == 3 and set(record["extra"]["per_object"]) == {
        "video00_1", "video01_1", "video01_2"}
    # the written masks are the scored ones: rescore them from disk
    per_object, copied = {}, {}
    for video in ("video00", "video01"):
        annotations = sorted((davis_root / "Annotations" / "480p" / video).glob("*.png"))
        written = [Image.open(out.parent / "segmentations" / video / a.name) for a in annotations]
        assert all(image.mode == "P" for image in written)
        gt = [np.asarray(Image.open(a)) for a in annotations]
        j, f = evaluate_sequence(gt, [np.asarray(w) for w in written])
        per_object.update({f"{video}_{k + 1}": (j[k], f[k]) for k in range(len(j))})
        j, f = evaluate_sequence(gt, [np.where(gt[0] == 255, 0, gt[0])] * len(gt))  # void read as background
        copied.update({f"{video}_{k + 1}": (j[k], f[k]) for k in range(len(j))})
    assert summarize(per_object) == pytest.approx(metrics)
    assert record["extra"]["first_frame_copy"] == pytest.approx(summarize(copied))
    assert {k: b["value"] for k, b in record["baselines"].items()} == pytest.approx(summarize(copied))
    assert set(record["intervals"]) == set(metrics) and all(
        i["n"] == 3 and 0.0 <= i["low"] <= i["high"] <= 100.0 for i in record["intervals"].values())

    import pdb
    monkeypatch.setattr(pdb, "post_mortem", lambda *a, **k: None)  # submitit's debug executor opens pdb
    with pytest.raises(DatasetLayoutError, match=r"data\.davis: .*ImageSets/2017/val\.txt"):  # checked first
        run_stage("video_segmentation", ["--data", str(tmp_path), "--out", str(tmp_path / "bad" / "metrics.json"),
                 "--resources", '{"cluster": "debug"}', *TINY])
