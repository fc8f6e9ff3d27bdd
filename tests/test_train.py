"""Training loop: schedule, parameter groups, run directory, resume, NaN stop, CNNs, image folders,
fine-tuning to new classes and sizes, and a short run on real Fashion-MNIST."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deit.config import DeiTConfig
from deit.model import DeiT
from deit.train.fashion_mnist import FASHION_MNIST_DIR
from deit.train.loop import _setup_logging, train
from deit.train.runconfig import TrainConfig, load_config
from deit.train.schedule import fit_to_time, lr_at, param_groups
from deit.train.state import State

from .conftest import free_port, idx_bytes

TINY = [
    "model.name=deit",
    "model.patch_size=7",
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=2",
    "data.batch_size=32",
    "schedule.epochs=2",
    "schedule.warmup_epochs=1",
    "run.progress=false",
    "run.log_every=2",
    "augment.repeated_aug=1",
]


@pytest.fixture(scope="module")
def fake_fmnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 256/128-image stand-in with the Fashion-MNIST file layout (class = brightness)."""
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 256), ("t10k", 128)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 40, (n, 28, 28)) + labels[:, None, None] * 20
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(idx_bytes(images, gz=True))
        (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(idx_bytes(labels, gz=True))
    return root


def _cfg(root: Path, *extra: str) -> TrainConfig:
    return load_config(None, [*TINY, f"data.path={root}", *extra])


def test_lr_schedule() -> None:
    cfg = load_config(None, ["schedule.epochs=10", "schedule.warmup_epochs=2"])
    assert lr_at(0, cfg, 1e-3) == pytest.approx(1e-6)
    assert lr_at(1, cfg, 1e-3) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    assert lr_at(2, cfg, 1e-3) == pytest.approx(1e-3)
    assert lr_at(6, cfg, 1e-3) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))  # cosine midpoint
    assert lr_at(10, cfg, 1e-3) == pytest.approx(1e-5)
    assert lr_at(4, cfg, 1e-3, epochs=6) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))


def test_time_limit_fits_the_schedule_and_ignores_one_slow_epoch() -> None:
    limit = ["schedule.epochs=30", "run.time_limit=3100"]
    cfg = load_config(None, [*limit, "schedule.fit_to_time=true"])
    st = State(None, None, None, None, total_epochs=30, epoch=12)  # type: ignore[arg-type]
    # 12 epochs of 100 s, the last one slowed to 190 s by another job: 18 more still fit.
    assert not fit_to_time(cfg, st, 1290, [100.0] * 11 + [190.0])
    assert st.total_epochs == 30
    # The machine stays slow: the cosine is shortened to what fits.
    st.epoch = 14
    assert not fit_to_time(cfg, st, 1670, [100.0] * 11 + [190.0] * 3)
    assert st.total_epochs == 14 + (3100 - 1670) // 190
    # Without fit_to_time the run stops once another epoch would pass the limit.
    cfg = load_config(None, limit)
    st = State(None, None, None, None, total_epochs=30, epoch=20)  # type: ignore[arg-type]
    assert fit_to_time(cfg, st, 3050, [100.0] * 20)
    assert not fit_to_time(cfg, st, 2900, [100.0] * 20)
    assert st.total_epochs == 30


def test_param_groups_skip_decay_on_1d_biases_and_tokens() -> None:
    from deit.config import DeiTConfig

    model = DeiT(DeiTConfig(img_size=28, patch_size=7, embed_dim=16, depth=1, num_heads=2))
    no_decay, decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"cls_token", "dist_token", "pos_embed", "blocks.0.norm1.weight", "head.bias"} <= skipped
    assert {names[id(p)] for p in decay["params"]} == {
        n for n, p in model.named_parameters() if p.ndim > 1 and n not in skipped
    }
    assert (no_decay["weight_decay"], decay["weight_decay"]) == (0.0, 0.05)


def test_train_log_receives_every_train_module_and_only_its_own_run(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    _setup_logging(first, rank=0)
    logging.getLogger("deit.train.finetune").info("one")
    _setup_logging(second, rank=0)  # a second run in the same process
    logging.getLogger("deit.train.exporting").info("two")
    _setup_logging(second, rank=1)  # other ranks add nothing
    logging.getLogger("deit.train.loop").info("three")

    def messages(run: Path) -> list[str]:
        return [line.split()[-1] for line in (run / "train.log").read_text().splitlines()]

    assert messages(first) == ["one"] and messages(second) == ["two", "three"]


def test_run_directory_and_export(fake_fmnist: Path, tmp_path: Path) -> None:
    from deit.checkpoints import load_model

    run = train(_cfg(fake_fmnist, "distill.kind=none"), out_dir=tmp_path / "run")
    assert {"config.json", "metrics.jsonl", "train.log", "last.pt", "model"} <= {
        p.name for p in run.iterdir()
    }
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2] and "val_dist_top1" in epochs[-1]
    assert any(r["kind"] == "train" for r in records)
    ckpt = torch.load(run / "last.pt", weights_only=True)  # only tensors and primitives
    assert ckpt["epoch"] == 2 and ckpt["config"]["model"]["patch_size"] == 7
    loaded = load_model(run / "model")
    assert loaded.config.in_chans == 1 and loaded.config.num_classes == 10
    assert loaded.labels[0] == "T-shirt/top" and loaded.preprocess.channels == 1
    assert loaded.preprocess.invert_light_background
    assert loaded.metadata["train_config"]["model"]["embed_dim"] == 32
    # the student's out-of-distribution statistics are fitted at the end (issue #26), so its
    # predictions carry a calibrated score
    from deit.inference import Classifier

    assert (run / "model" / "ood.safetensors").is_file()
    assert "out-of-distribution statistics (mahalanobis-layers" in (run / "train.log").read_text()
    clf = Classifier.from_pretrained(str(run / "model"), device="cpu")
    assert clf.ood_stats is not None and clf.calibration.method == "mahalanobis-layers"
    from deit.train.plot import plot_run

    assert plot_run(run).stat().st_size > 1000  # deit plot RUN_DIR -> RUN_DIR/curves.png


def test_resume_continues_exactly(fake_fmnist: Path, tmp_path: Path) -> None:
    """Mixup, cutmix, random erasing, drop path and crops all draw random numbers."""
    extra = [
        "augment.mixup=0.8",
        "augment.cutmix=1.0",
        "augment.random_erasing=0.5",
        "model.drop_path_rate=0.2",
        "augment.repeated_aug=2",
        "run.ema=true",
    ]
    straight = train(_cfg(fake_fmnist, *extra), out_dir=tmp_path / "a")
    steps_per_epoch = 256 // 32
    train(_cfg(fake_fmnist, *extra, f"run.max_steps={steps_per_epoch}"), out_dir=tmp_path / "b")
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["epoch"] == 1
    with pytest.raises(FileExistsError, match="--resume continues it"):
        train(_cfg(fake_fmnist, *extra), out_dir=tmp_path / "b")  # never overwrites a run
    resumed = train(_cfg(fake_fmnist, *extra), out_dir=tmp_path / "b", resume=True)
    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(resumed / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 2 * steps_per_epoch
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            torch.testing.assert_close(b[key][name], tensor, rtol=0, atol=0, msg=name)


def test_nan_loss_stops_with_epoch_and_step(
    fake_fmnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A zero std is now refused by the config check, so the loss itself is made NaN.
    from deit.train.losses import DistillationLoss

    forward = DistillationLoss.forward
    monkeypatch.setattr(
        DistillationLoss, "forward", lambda self, *a, **k: forward(self, *a, **k) * float("nan")
    )
    with pytest.raises(FloatingPointError, match=r"epoch 0, step 0"):
        train(_cfg(fake_fmnist), out_dir=tmp_path / "nan")


def test_cnn_teacher_then_hard_distilled_student(fake_fmnist: Path, tmp_path: Path) -> None:
    from deit.train.evaluate import evaluate

    teacher = train(
        _cfg(fake_fmnist, "model.name=fmnist_cnn", "schedule.epochs=1"),
        out_dir=tmp_path / "teacher",
    )
    assert json.loads((teacher / "model" / "config.json").read_text())["arch"] == "fmnist_cnn"
    student = train(
        _cfg(
            fake_fmnist,
            "distill.kind=hard",
            f"distill.teacher={teacher / 'model'}",
            "schedule.epochs=1",
            "augment.mixup=0.8",
        ),
        out_dir=tmp_path / "student",
    )
    report = evaluate(
        student / "model",
        "fashion-mnist:test",
        data_root=str(fake_fmnist),
        teacher=str(teacher / "model"),
    )
    assert report.num_samples == 128 and report.agreement is not None


def _image_folder(root: Path, classes: int, size: int, bad: bool = False) -> Path:
    rng = np.random.default_rng(1)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 60, (size + 5, size, 3)) + 60 * c
            Image.fromarray(pixels.astype(np.uint8)).save(root / f"class{c}" / f"{i}.png")
    if bad:
        (root / "class0" / "corrupt.png").write_bytes(b"\x89PNG broken")
    return root


def test_image_folder_with_a_corrupt_file(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "images", 2, 32, bad=True)
    cfg = load_config(
        None,
        [
            *TINY,
            "data.dataset=imagefolder",
            f"data.path={root}",
            "model.img_size=32",
            "model.patch_size=8",
            "data.batch_size=4",
            "data.num_workers=0",
            "schedule.epochs=1",
        ],
    )
    run = train(cfg, out_dir=tmp_path / "run")
    epoch = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert epoch["bad_samples"] >= 1
    assert "corrupt.png" in (run / "train.log").read_text()
    assert (run / "model" / "ood.safetensors").is_file()  # fitted on the folder's images


def test_finetune_to_new_classes_and_larger_input(
    fake_fmnist: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from deit.checkpoints import load_model

    base = train(
        _cfg(fake_fmnist, "model.patch_size=4", "schedule.epochs=1"), out_dir=tmp_path / "base"
    )
    root = _image_folder(tmp_path / "images", 3, 32)
    cfg = load_config(
        None,
        [
            *TINY,
            "data.dataset=imagefolder",
            f"data.path={root}",
            f"model.init={base / 'model'}",
            "model.img_size=32",
            "data.in_chans=1",
            "data.batch_size=6",
            "data.num_workers=0",
            "schedule.epochs=1",
        ],
    )
    with caplog.at_level(logging.INFO, logger="deit.train.loop"):
        run = train(cfg, out_dir=tmp_path / "ft")
    text = caplog.text
    assert "re-initialised head.weight" in text and "pos_embed resized (7, 7) -> (8, 8)" in text
    tuned = load_model(run / "model")
    assert tuned.config.num_classes == 3 and tuned.config.image_hw == (32, 32)
    assert tuned.labels == ["class0", "class1", "class2"]
    original = load_model(base / "model").model.state_dict()
    assert tuned.model.state_dict()["cls_token"].shape == original["cls_token"].shape


@pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="dataset-fashion-mnist not installed",
)
@pytest.mark.slow
def test_learns_real_fashion_mnist(tmp_path: Path) -> None:
    """About 1 minute on 2 shared cores: the small CNN on 6,000 real images, one epoch, scored on
    the 10,000 test images."""
    from deit.train.evaluate import evaluate

    cfg = load_config(
        None,
        [
            "model.name=fmnist_cnn_small",
            "data.train_subset=6000",
            "data.val_subset=500",
            "data.batch_size=100",
            "optim.lr=2e-3",
            "schedule.epochs=1",
            "schedule.warmup_epochs=0.1",
            "augment.mixup=0",
            "augment.cutmix=0",
            "augment.random_erasing=0",
            "augment.repeated_aug=1",
            "run.eval_every=0",
            "run.progress=false",
            "run.device=cpu",
        ],
    )
    run = train(cfg, out_dir=tmp_path / "real")
    report = evaluate(run / "model", "fashion-mnist:test", batch_size=500)
    assert report.num_samples == 10000
    assert report.top1 > 0.6, report.top1  # chance is 0.1
    assert math.isclose(sum(report.per_class.values()) / 10, report.top1, rel_tol=1e-6)


@pytest.mark.slow
def test_two_processes_match_one(fake_fmnist: Path, tmp_path: Path) -> None:
    """torchrun + DDP (gloo) with batch 16 per process == one process with batch 32."""
    common = [
        *TINY,
        f"data.path={fake_fmnist}",
        "schedule.epochs=1",
        "augment.crop_padding=0",
        "augment.hflip=0",
        "augment.random_erasing=0",
        "augment.mixup=0",
        "augment.cutmix=0",
        "model.drop_path_rate=0",
        "run.device=cpu",
    ]
    single = train(load_config(None, [*common, "data.batch_size=32"]), out_dir=tmp_path / "one")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "-m",
        "deit.train",
        "--out",
        str(tmp_path / "two"),
        *common,
        "data.batch_size=16",
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    a = torch.load(single / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 256 // 32
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    one = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()][-1]
    two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()][-1]
    assert one["val_top1"] == pytest.approx(two["val_top1"])


def test_small_gray_folder_from_scratch_gets_one_channel_and_enough_steps(tmp_path: Path) -> None:
    """The documented from-scratch command on a small grayscale folder: read as 1 channel, a
    batch that leaves >= 16 steps per epoch (at least 8 images), the small-data augmentation
    and rate, the best epoch exported, every choice noted."""
    from deit.train.finetune import SMALL_DATA_LR, resolve

    root = tmp_path / "gray"
    for c in ("even", "odd"):
        (root / c).mkdir(parents=True)
        for i in range(40):
            Image.fromarray(np.full((8, 8), 20 * i % 255, np.uint8), mode="L").save(
                root / c / f"{i}.png"
            )
    cfg = load_config(None, ["model.name=deit", "data.dataset=imagefolder", f"data.path={root}"])
    resolve(cfg)
    assert cfg.data.in_chans == 1 and cfg.data.batch_size == 8 and cfg.run.export == "best"
    assert any("all grayscale: 1 channel" in n for n in cfg.notes)
    # not DeiT's ImageNet regularisation (it leaves a small student at chance here), and a
    # rate that learns within the step budget
    a = cfg.augment
    assert (a.repeated_aug, a.mixup, a.cutmix, a.random_erasing, a.randaugment) == (1, 0, 0, 0, "")
    assert a.scale == [0.35, 1.0] and cfg.optim.lr == SMALL_DATA_LR
    assert any(n.startswith("augment.mixup = 0.0") for n in cfg.notes)
    # batch 8 (the floor): 300 epochs of 10 steps meet the from-scratch budget, no steps set
    assert cfg.schedule.steps is None and cfg.schedule.epochs == 300
    budget = load_config(
        None,
        ["model.name=deit", "data.dataset=imagefolder", f"data.path={root}", "schedule.steps=50"],
    )
    resolve(budget)
    assert budget.schedule.epochs == math.ceil(50 / 10)  # whole epochs of 80 / 8 steps
    args = ["model.name=deit", "data.dataset=imagefolder", f"data.path={root}"]
    own = load_config(None, [*args, "optim.base_lr=1e-4"])  # a base rate of one's own: scaled
    resolve(own)
    assert own.optim.lr is None and own.optim.base_lr == 1e-4
    assert any(n.startswith("schedule.epochs = 5") for n in budget.notes)


def test_head_lr_scale_puts_heads_in_their_own_groups() -> None:
    model = DeiT(DeiTConfig(img_size=28, patch_size=7, embed_dim=16, depth=2, num_heads=2))
    groups = param_groups(model, 0.05, layer_decay=0.5, head_lr_scale=10.0)
    names = {id(p): n for n, p in model.named_parameters()}
    scale = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    assert scale["head.weight"] == scale["head_dist.bias"] == 10.0
    assert scale["norm.weight"] == 1.0 and scale["blocks.0.mlp.fc1.weight"] == 0.25
