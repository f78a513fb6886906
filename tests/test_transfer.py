"""Transfer learning (Tab. 7): official recipe values, readers equal to the official ones, DeiT loop
details (repeated augmentation, per-epoch schedule, lr scaling), labels, CLI end to end and resume."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from downstream import transfer as common
from downstream.engine import finetune
from helpers import kill_at_second_evaluation, run_stage
from ibot.data.embedded import EmbeddedSizes, generate
from ibot.data.transfer_sets import TRANSFER_KINDS, read_transfer_set
from ibot.metrics import read_metrics
from ibot.stages import STAGES, section_defaults, stage_defaults
from test_knn import TINY, official_checkpoint

# pycocotools 2.0.x under numpy 2 warns on every decode (the embedded generator rasterises with it)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
SIZES = EmbeddedSizes(transfer_classes=3, transfer_train_per_class=4, transfer_val_per_class=2)
STAGE_OF = {kind: f"transfer_{kind}" for kind in TRANSFER_KINDS}

_EVAL = "evaluation/eval_cls.py"
#: eval_cls.py defaults that run.sh leaves alone (identical for every dataset and model), with their line.
_COMMON = {
    "warmup_epochs": (5, f"{_EVAL}:104 --warmup-epochs"),
    "batch_size": (96 * 8, "run.sh:234/254/273/292/311/331 --batch-size 96 per GPU x 8 GPUs "
                           "(evaluation/README.md:121)"),
    "min_lr": (1e-5, f"{_EVAL}:99 --min-lr"),
    "warmup_lr": (1e-6, f"{_EVAL}:97 --warmup-lr"),
    "weight_decay": (0.05, f"{_EVAL}:84 --weight-decay"),
    "opt": ("adamw", f"{_EVAL}:74 --opt"),
    "opt_eps": (1e-8, f"{_EVAL}:76 --opt-eps"),
    "opt_betas": ([0.9, 0.999], f"{_EVAL}:78 --opt-betas None: timm passes none, torch AdamW's"),
    "clip_grad": (None, f"{_EVAL}:80 --clip-grad"),
    "drop_path": (0.1, f"{_EVAL}:64 --drop-path"),
    "head_init_scale": (1.0, f"{_EVAL}:162 --init_scale; :626 head.apply(_init_weights) trunc_normal(0.02)"),
    "crop": (224, f"{_EVAL}:55 --input-size"),
    "train_interpolation": ("bicubic", f"{_EVAL}:120 --train-interpolation"),
    "color_jitter": (0.4, f"{_EVAL}:114 --color-jitter"),
    "auto_augment": ("rand-m9-mstd0.5-inc1", f"{_EVAL}:116 --aa"),
    "re_prob": (0.25, f"{_EVAL}:128 --reprob"),
    "re_mode": ("pixel", f"{_EVAL}:130 --remode"),
    "re_count": (1, f"{_EVAL}:132 --recount"),
    "repeated_aug": (True, f"{_EVAL}:123-125 repeated_aug defaults True; RASampler :559-562"),
    "mixup": (0.8, f"{_EVAL}:138 --mixup"),
    "cutmix": (1.0, f"{_EVAL}:140 --cutmix"),
    "mixup_prob": (1.0, f"{_EVAL}:144 --mixup-prob"),
    "mixup_switch_prob": (0.5, f"{_EVAL}:146 --mixup-switch-prob"),
    "mixup_mode": ("batch", f"{_EVAL}:148 --mixup-mode"),
    "smoothing": (0.1, f"{_EVAL}:119 --smoothing"),
    "precision": ("fp16", f"{_EVAL}:475 torch.cuda.amp.autocast(); :693 NativeScaler"),
    "val_freq": (1, f"{_EVAL}:769 evaluates after every epoch"),
    "num_workers": (10, f"{_EVAL}:183 --num_workers"),
}
#: bytedance/ibot (commit da316d8) transfer recipe of ViT-S/16, per dataset: run.sh's block for the
#: dataset (ViT-B/16 values) with the ViT-S/16 iNat lrs of evaluation/README.md:123.
OFFICIAL_TRANSFER_VIT_S: dict[str, dict[str, tuple[Any, str]]] = {
    "cifar10": {**_COMMON, "epochs": (1000, "run.sh:256 --epochs 1000"), "lr": (7.5e-6, "run.sh:255 --lr 7.5e-6")},
    "cifar100": {**_COMMON, "epochs": (1000, "run.sh:236 --epochs 1000"), "lr": (7.5e-6, "run.sh:235 --lr 7.5e-6")},
    "inat18": {**_COMMON, "epochs": (360, "run.sh:313 --epochs 360"), "re_prob": (0.1, "run.sh:314 --reprob 0.1"),
               "lr": (5e-5, "evaluation/README.md:123 ViT-S/16: --lr 5e-5 for INAT18 (run.sh:312 is ViT-B's)"),
               "category": ("name", f"{_EVAL}:169 --inat-category")},
    "inat19": {**_COMMON, "epochs": (360, "run.sh:333 --epochs 360"), "re_prob": (0.1, "run.sh:334 --reprob 0.1"),
               "lr": (2.5e-5, "evaluation/README.md:123 ViT-S/16: --lr 2.5e-5 for INAT19 (run.sh:332 is ViT-B's)"),
               "category": ("name", f"{_EVAL}:169 --inat-category")},
    "flowers": {**_COMMON, "epochs": (1000, "run.sh:294 --epochs 1000"), "lr": (7.5e-6, "run.sh:293 --lr 7.5e-6")},
    "cars": {**_COMMON, "epochs": (1000, "run.sh:275 --epochs 1000"), "lr": (7.5e-5, "run.sh:274 --lr 7.5e-5")},
}
#: What ViT-B/16 changes (config/paper/vit_base.yaml overrides.transfer): run.sh is its recipe
#: (evaluation/README.md:119-121); every other value equals ViT-S/16's.
OFFICIAL_TRANSFER_VIT_B_CHANGES = {
    "inat18": {"lr": (7.5e-6, "run.sh:312 --lr 7.5e-6 (evaluation/README.md:119-121: run.sh is ViT-B/16's)")},
    "inat19": {"lr": (7.5e-6, "run.sh:332 --lr 7.5e-6 (evaluation/README.md:119-121: run.sh is ViT-B/16's)")},
}


def test_defaults_equal_the_official_values() -> None:
    assert set(section_defaults("transfer")) == set(TRANSFER_KINDS)
    for kind, official in OFFICIAL_TRANSFER_VIT_S.items():
        ours = stage_defaults(STAGE_OF[kind])
        assert set(ours) == set(official), kind
        for key, (value, source) in official.items():
            assert ours[key] == value, f"transfer.{kind}.{key}: ours {ours[key]!r}, official {value!r} ({source})"


def test_registry_one_stage_per_dataset() -> None:
    for kind in TRANSFER_KINDS:
        stage = STAGES[STAGE_OF[kind]]
        assert (stage.section, stage.subsection, stage.datasets) == ("transfer", kind, (kind,))
        assert stage.entry == "downstream.transfer:run" and stage.resumable


def test_schema_is_closed() -> None:
    import jsonschema
    schema = yaml.safe_load((ROOT / "workflow/schemas/transfer.schema.yaml").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["additionalProperties"] is False
    for kind in TRANSFER_KINDS:
        assert schema["properties"][kind]["additionalProperties"] is False
    jsonschema.validate(section_defaults("transfer"), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"cars": {"layer_decay": 0.75}}, schema)


# -- the readers against the official classes -------------------------------------------------------------


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate(tmp_path_factory.mktemp("transfer"), seed=0, sets=list(TRANSFER_KINDS), sizes=SIZES)


def _official_readers():
    """evaluation/eval_cls.py:196-284 (bytedance/ibot da316d8), verbatim but for the base class
    (the official classes subclass ImageFolder without calling its __init__)."""
    import scipy.io as scio
    from torchvision.datasets.folder import default_loader

    class INatDataset:
        def __init__(self, root, train=True, year=2018, transform=None, target_transform=None,
                     category='name', loader=default_loader):
            self.transform = transform
            self.loader = loader
            self.target_transform = target_transform
            path_json = os.path.join(root, f'{"train" if train else "val"}{year}.json')
            with open(path_json) as json_file:
                data = json.load(json_file)
            with open(os.path.join(root, 'categories.json')) as json_file:
                data_catg = json.load(json_file)
            path_json_for_targeter = os.path.join(root, f"train{year}.json")
            with open(path_json_for_targeter) as json_file:
                data_for_targeter = json.load(json_file)
            targeter = {}
            indexer = 0
            for elem in data_for_targeter['annotations']:
                king = []
                king.append(data_catg[int(elem['category_id'])][category])
                if king[0] not in targeter.keys():
                    targeter[king[0]] = indexer
                    indexer += 1
            self.nb_classes = len(targeter)
            self.samples = []
            for elem in data['images']:
                cut = elem['file_name'].split('/')
                target_current = int(cut[2])
                path_current = os.path.join(root, cut[0], cut[1], cut[2], cut[3])
                categors = data_catg[target_current]
                target_current_true = targeter[categors[category]]
                self.samples.append((path_current, target_current_true))

    class CarsDataset:
        def __init__(self, root, train=True, transform=None, target_transform=None, loader=default_loader):
            data = scio.loadmat(os.path.join(root, 'cars_annos.mat'))['annotations'][0].tolist()
            data = [elem for elem in data if elem[-1].item() == int(not train)]
            targeter = {}
            indexer = 0
            for elem in data:
                catg = elem[4].item()
                if catg not in targeter.keys():
                    targeter[catg] = indexer
                    indexer += 1
            self.nb_classes = len(targeter)
            self.samples = []
            for elem in data:
                catg, path = elem[5].item(), elem[0].item()
                path = os.path.join(root, path)
                self.samples.append((path, catg))

    class FlwrsDataset:
        def __init__(self, root, train=True, transform=None, target_transform=None, loader=default_loader):
            data = np.array(sorted(os.listdir(os.path.join(root, 'jpg'))))
            labels = scio.loadmat(os.path.join(root, 'imagelabels.mat'))['labels'][0]
            ids = scio.loadmat(os.path.join(root, 'setid.mat'))
            ids = np.concatenate((ids['trnid'], ids['valid']), axis=1)[0] if train else ids['tstid'][0]
            labels -= 1
            ids -= 1
            targeter = {}
            indexer = 0
            for catg in labels[ids]:
                if catg not in targeter.keys():
                    targeter[catg] = indexer
                    indexer += 1
            self.nb_classes = len(targeter)
            self.samples = []
            for path, catg in zip(data[ids], labels[ids]):
                path = os.path.join(root, 'jpg', path)
                self.samples.append((path, catg))

    return INatDataset, CarsDataset, FlwrsDataset


@pytest.mark.parametrize("train", [True, False])
def test_readers_equal_the_official_ones(sets: dict[str, Path], train: bool) -> None:
    inat, cars, flowers = _official_readers()
    expected = {"inat18": inat(str(sets["inat18"]), train=train, year=2018),
                "flowers": flowers(str(sets["flowers"]), train)}
    for kind, official in expected.items():
        ours = read_transfer_set(kind, sets[kind], train=train)
        assert [(p, int(t)) for p, t in official.samples] == ours.samples, kind
        assert ours.num_classes == official.nb_classes == SIZES.transfer_classes
    # Cars: the same images in the same order; the official keeps the 1-based class as the label
    # (and counts bbox_y2 values as classes, a bug): ours is class - 1 over the 3 classes
    official, ours = cars(str(sets["cars"]), train), read_transfer_set("cars", sets["cars"], train=train)
    assert [(p, t - 1) for p, t in official.samples] == ours.samples and ours.num_classes == SIZES.transfer_classes
    # iNat 2019 ships no categories.json: the train json's categories stand in, same labels as with one
    inat19 = read_transfer_set("inat19", sets["inat19"], train=train)
    assert not (sets["inat19"] / "categories.json").exists() and inat19.num_classes == SIZES.transfer_classes
    first_seen = list(dict.fromkeys(a["category_id"] for a in
                                    json.loads((sets["inat19"] / "train2019.json").read_text())["annotations"]))
    assert [first_seen[t] for t in inat19.targets] == [int(p.split("/")[-2]) for p, _ in inat19.samples]


def test_cifar_is_read_by_torchvision(sets: dict[str, Path]) -> None:
    """The pickles are torchvision's format; only its md5 of the released archive is not checked."""
    from torchvision import datasets

    for kind, reference in (("cifar10", datasets.CIFAR10), ("cifar100", datasets.CIFAR100)):
        with pytest.raises(RuntimeError, match="corrupted"):
            reference(str(sets[kind]), train=True)
        ours = read_transfer_set(kind, sets[kind], train=False)
        image, label = ours[0]
        assert image.size == (32, 32) and ours.num_classes == SIZES.transfer_classes == len(ours.classes)
        assert len(ours) == SIZES.transfer_classes * SIZES.transfer_val_per_class and 0 <= label < ours.num_classes


# -- the DeiT loop ---------------------------------------------------------------------------------------------


def _deit_rasampler(n: int, num_replicas: int, rank: int, epoch: int) -> list[int]:
    """RASampler.__iter__ of evaluation/eval_cls.py:369-393 (num_samples/total_size/num_selected_samples)."""
    num_samples = int(math.ceil(n * 3.0 / num_replicas))
    total_size = num_samples * num_replicas
    num_selected_samples = int(math.floor(n // 256 * 256 / num_replicas))
    g = torch.Generator()
    g.manual_seed(epoch)
    indices = torch.randperm(n, generator=g).tolist()
    indices = [ele for ele in indices for i in range(3)]
    indices += indices[:(total_size - len(indices))]
    indices = indices[rank:total_size:num_replicas]
    return indices[:num_selected_samples]


def test_repeated_augmentation_is_deits_rasampler(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sampler transfer and semi-supervised fine-tuning share (downstream.engine.data.train_sampler)."""
    from downstream.engine import data

    dataset = list(range(600))
    for replicas in (1, 2):
        monkeypatch.setattr(data, "world_size", lambda: replicas)
        for rank in range(replicas):
            monkeypatch.setattr(data, "rank", lambda: rank)
            sampler = data.train_sampler(dataset, True, seed=0)
            for epoch in (0, 3):
                sampler.set_epoch(epoch)
                assert list(sampler) == _deit_rasampler(600, replicas, rank, epoch)
    monkeypatch.setattr(data, "world_size", lambda: 1)
    monkeypatch.setattr(data, "rank", lambda: 0)
    assert len(data.train_sampler(list(range(40)), True, seed=0)) == 40  # < 256: all, repeated


def test_per_epoch_schedule_matches_the_official_loop() -> None:
    """Official: scheduler built, then per epoch train (at the current lr) and ``step(epoch)``."""
    from ibot.config import scaled_lr
    from ibot.models.vision_transformer import build_backbone
    from downstream.engine.finetune import ViTClassifier, build_optimizer, epoch_scheduler

    config = {**stage_defaults("transfer_cars"), "epochs": 12, "warmup_epochs": 3, "lr": 7.5e-5}
    lr = scaled_lr("transfer", config["lr"], 768)
    assert lr == pytest.approx(7.5e-5 * 1.5)

    def lrs(official: bool) -> list[float]:
        backbone = build_backbone("vit_tiny", patch_size=8, img_size=32, depth=1, masked_im_modeling=False)
        net = ViTClassifier(backbone, 3, head_init_scale=1.0)
        optimizer = build_optimizer(net, {**config, "lr": lr, "layer_decay": 1.0})
        scheduler = epoch_scheduler(optimizer, config)
        seen = []
        for epoch in range(config["epochs"]):
            if not official and epoch > 0:  # downstream.engine.finetune.fit, per-epoch schedule
                scheduler.step(epoch - 1)
            seen.append(optimizer.param_groups[0]["lr"])
            if official:
                scheduler.step(epoch)
        return seen

    ours = lrs(official=False)
    assert ours == lrs(official=True)
    # epochs 0 and 1 at the warmup start; warmup not prefixed: the cosine over all 12 epochs takes over at 3
    assert ours[0] == ours[1] == pytest.approx(1e-6) and ours[2] == pytest.approx(1e-6 + (lr - 1e-6) / 3)
    assert ours[4] == pytest.approx(1e-5 + 0.5 * (lr - 1e-5) * (1 + math.cos(math.pi * 3 / 12)))
    assert ours[-1] > 1e-5 and all(a >= b for a, b in zip(ours[4:], ours[5:]))


def test_optimizer_has_no_layer_decay_and_official_weight_decay_groups() -> None:
    from ibot.models.vision_transformer import build_backbone
    from downstream.engine.finetune import ViTClassifier, build_optimizer

    backbone = build_backbone("vit_tiny", patch_size=8, img_size=32, depth=2, masked_im_modeling=False)
    net = ViTClassifier(backbone, 5, head_init_scale=1.0)
    assert float(net.head.weight.detach().std()) == pytest.approx(0.02, rel=0.3)
    optimizer = build_optimizer(net, {**stage_defaults("transfer_cifar10"), "lr": 1e-3, "layer_decay": 1.0})
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for name, param in net.named_parameters():
        group = group_of[id(param)]
        assert group.get("lr_scale", 1.0) == 1.0 and group["lr"] == 1e-3, name
        no_decay = param.ndim == 1 or name.endswith(("pos_embed", "cls_token"))
        assert group["weight_decay"] == (0.0 if no_decay else 0.05), name


def test_eval_transform_is_the_official_one() -> None:
    from PIL import Image

    big = common.eval_transform({"crop": 224})
    assert [type(t).__name__ for t in big.transforms] == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert big.transforms[0].size == 256 and big.transforms[0].interpolation.value == "bicubic"
    small = common.eval_transform({"crop": 32})  # eval_cls.py:316: no resize for 32 px inputs
    assert [type(t).__name__ for t in small.transforms] == ["ToTensor", "Normalize"]
    assert small(Image.new("RGB", (32, 32))).shape == (3, 32, 32)


def test_labels_say_what_ran() -> None:
    paper = stage_defaults("transfer_cifar10")
    assert common.protocol_label(paper) == "deit,1000ep,lr=7.5e-06,batch=768,re=0.25,mixup=0.8,cutmix=1,ra,cls,224px"
    inat = common.protocol_label(stage_defaults("transfer_inat18"))
    assert inat == "deit,360ep,lr=5e-05,batch=768,re=0.1,mixup=0.8,cutmix=1,ra,cls,224px,name"
    assert common.protocol_label(paper, global_batch=384) != common.protocol_label(paper)
    assert common.protocol_label({**paper, "epochs": 2}).startswith("deit,2ep,")
    assert common.dataset_label("cifar10", "/data/cifar", 10, 50_000, 10_000) == "cifar-10"
    assert common.dataset_label("cifar10", "/x/embedded/cifar10", 10, 40, 20) == "cifar10"


# -- end to end ---------------------------------------------------------------------------------------------

CONFIG = {"crop": 32, "epochs": 2, "warmup_epochs": 1, "batch_size": 6, "num_workers": 0, "lr": 5e-3}


def _argv(tmp_path: Path, kind: str, data: Path, name: str, ckpt: Path) -> list[str]:
    return ["--data", str(data), "--out", str(tmp_path / name / STAGE_OF[kind] / "metrics.json"), "--checkpoint",
            str(ckpt), "--config", json.dumps(CONFIG), "--resources", '{"cluster": "debug"}', *TINY]


def test_cli_end_to_end_two_datasets(sets: dict[str, Path], tmp_path: Path) -> None:
    ckpt = official_checkpoint(tmp_path / "checkpoint.pth")
    for kind in ("cifar100", "inat18"):
        run_stage(STAGE_OF[kind], _argv(tmp_path, kind, sets[kind], "full", ckpt))
        record = read_metrics(tmp_path / "full" / STAGE_OF[kind] / "metrics.json")
        assert (record["stage"], record["task"]) == (STAGE_OF[kind], "transfer")
        assert set(record["metrics"]) == {"top1"}  # 3 classes: no top-5
        assert record["dataset"] == sets[kind].name and record["protocol"].startswith("deit,2ep,lr=0.005,batch=6,")
        extra = record["extra"]
        assert [h["epoch"] for h in extra["history"]] == [1, 2] and extra["num_classes"] == SIZES.transfer_classes
        # 12 images < 256: all 12 per epoch (repeated), batches of 6 -> 2 steps; lr scaled by 6/512
        assert extra["samples_per_epoch"] == 12 and extra["steps_per_epoch"] == 2 and extra["global_batch"] == 6
        assert extra["lr_scaled"] == pytest.approx(5e-3 * 6 / 512)
        assert record["metrics"]["top1"] == max(h["top1"] for h in extra["history"])


def test_resume_after_kill_equals_the_uninterrupted_run(sets: dict[str, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = official_checkpoint(tmp_path / "checkpoint.pth")
    run_stage("transfer_cars", _argv(tmp_path, "cars", sets["cars"], "full", ckpt))
    full = read_metrics(tmp_path / "full" / "transfer_cars" / "metrics.json")["extra"]["history"]

    real_evaluate = finetune.evaluate
    kill_at_second_evaluation(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_stage("transfer_cars", _argv(tmp_path, "cars", sets["cars"], "killed", ckpt))
    state = torch.load(tmp_path / "killed" / "transfer_cars" / "work" / "checkpoint.pth", weights_only=True)
    assert state["epoch"] == 1
    monkeypatch.setattr(finetune, "evaluate", real_evaluate)
    run_stage("transfer_cars", _argv(tmp_path, "cars", sets["cars"], "killed", ckpt))
    resumed = read_metrics(tmp_path / "killed" / "transfer_cars" / "metrics.json")["extra"]["history"]
    assert len(resumed) == 2
    for got, want in zip(resumed, full):
        assert got == pytest.approx(want)
    from ibot.tensorboard import read_scalars  # live curves: each epoch once after the kill and resume
    curves = read_scalars(tmp_path / "killed" / "transfer_cars" / "tb")
    assert {"transfer_cars/train_loss", "transfer_cars/val_top1"} <= set(curves)
    assert [step for step, _ in curves["transfer_cars/val_top1"]] == [1, 2]
