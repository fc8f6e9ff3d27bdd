"""Teachers: built-in CNN, input adaptation, every source kind, class check; fine-tuning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from deit.checkpoints import load_model
from deit.config import DeiTConfig
from deit.model import DeiT, resize_pos_embed
from deit.train.classifiers import FashionCNN, build_classifier, load_classifier, save_classifier
from deit.train.data import InputSpec
from deit.train.student import finetune_state
from deit.train.teachers import Teacher, load_teacher

GRAY = InputSpec((0.3,), (0.4,), 28, 1)


def test_fashion_cnn_shape_and_size() -> None:
    model = FashionCNN(10, 1)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert 1.0e6 < sum(p.numel() for p in model.parameters()) < 1.3e6
    assert isinstance(build_classifier("fmnist_cnn", 4, 3), FashionCNN)
    with pytest.raises(ValueError, match="unknown classifier"):
        build_classifier("resnet", 10)


def test_adapter_renormalises_resizes_and_expands_channels() -> None:
    rgb = InputSpec((0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 32, 3)
    seen = []

    class Record(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x)
            return x.mean(dim=(2, 3))

    teacher = Teacher(Record(), GRAY, rgb)
    x = torch.randn(2, 1, 28, 28)
    teacher(x)
    pixels = (x * 0.4 + 0.3).expand(-1, 3, -1, -1)
    pixels = torch.nn.functional.interpolate(pixels, size=(32, 32), mode="bilinear", antialias=True)
    expected = (pixels - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor(
        [0.2, 0.25, 0.3]
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(seen[0], expected)
    same = Teacher(torch.nn.Identity(), GRAY, GRAY)
    assert same.adapt(x) is x


def test_teacher_is_frozen_and_stays_in_eval() -> None:
    teacher = Teacher(FashionCNN(10, 1), GRAY, GRAY)
    teacher.train()
    assert not teacher.model.training
    assert not any(p.requires_grad for p in teacher.parameters())
    out = teacher(torch.randn(2, 1, 28, 28))
    assert not out.requires_grad


def test_load_teacher_from_each_kind_of_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = FashionCNN(10, 1).eval()
    x = torch.randn(2, 1, 28, 28)
    ref = net(x)
    save_classifier(
        net,
        tmp_path / "cnn",
        arch="fmnist_cnn",
        num_classes=10,
        spec=GRAY,
        labels=[str(i) for i in range(10)],
    )
    torch.jit.save(torch.jit.trace(net, x), str(tmp_path / "cnn.pt"))
    torch.export.save(torch.export.export(net, (x,)), str(tmp_path / "cnn.pt2"))
    for source in ("cnn", "cnn.pt", "cnn.pt2"):
        teacher = load_teacher(
            str(tmp_path / source), student=GRAY, num_classes=10, trust_code=True
        )
        torch.testing.assert_close(teacher(x), ref, rtol=1e-4, atol=1e-4)
    model, config = load_classifier(tmp_path / "cnn")
    assert config["arch"] == "fmnist_cnn" and not model.training
    with pytest.raises(ValueError, match="fmnist_cnn classifier written by deit train"):
        load_model(tmp_path / "cnn")  # predict / export / serve take DeiTs only
    with pytest.raises(ValueError, match="predicts 10 classes but the student has 5"):
        load_teacher(str(tmp_path / "cnn"), student=GRAY, num_classes=5)
    with pytest.raises(FileNotFoundError):
        load_teacher(str(tmp_path / "nothing"), student=GRAY, num_classes=10)
    (tmp_path / "weights.pt").write_bytes(b"not torchscript")
    with pytest.raises(ValueError, match=r"weights\.pt is not a TorchScript file"):
        load_teacher(str(tmp_path / "weights.pt"), student=GRAY, num_classes=10)
    (tmp_path / "cnn" / "config.json").write_text('{"format": "deit-classifier"}')
    with pytest.raises(ValueError, match="not a classifier config"):
        load_teacher(str(tmp_path / "cnn"), student=GRAY, num_classes=10)


def test_timm_and_torchvision_classifiers_by_name() -> None:
    pytest.importorskip("timm")
    model = build_classifier("timm:resnet10t", 10, 1)
    assert model.eval()(torch.zeros(1, 1, 32, 32)).shape == (1, 10)
    model = build_classifier("torchvision:resnet18", 7, 3)
    assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 7)


def test_finetune_state_new_classes_size_channels_and_token() -> None:
    old = DeiTConfig(
        img_size=28,
        patch_size=4,
        in_chans=1,
        num_classes=10,
        embed_dim=16,
        depth=1,
        num_heads=2,
        distilled=False,
    )
    new = old.replace(img_size=32, in_chans=3, num_classes=4, distilled=True)
    state = DeiT(old).state_dict()
    adapted, notes = finetune_state(state, old, new)
    assert sorted(notes["reinit"]) == [
        "head.bias",
        "head.weight",
        "head_dist.bias",
        "head_dist.weight",
    ]
    model = DeiT(new)
    missing, unexpected = model.load_state_dict(adapted, strict=False)
    assert sorted(missing) == sorted(notes["reinit"]) and not unexpected
    assert adapted["pos_embed"].shape == (1, 2 + 64, 16)
    with_dist = torch.cat([state["pos_embed"][:, :1]] * 2 + [state["pos_embed"][:, 1:]], dim=1)
    torch.testing.assert_close(adapted["pos_embed"], resize_pos_embed(with_dist, 2, (7, 7), (8, 8)))
    w = state["patch_embed.proj.weight"]
    torch.testing.assert_close(adapted["patch_embed.proj.weight"], w.repeat(1, 3, 1, 1) / 3)
    torch.testing.assert_close(adapted["dist_token"], state["cls_token"])


def test_build_student_from_preset_and_fields() -> None:
    from deit.train.runconfig import load_config
    from deit.train.student import build_student

    cfg = load_config(
        None,
        [
            "model.name=deit",
            "model.patch_size=4",
            "model.embed_dim=32",
            "model.depth=2",
            "model.num_heads=2",
        ],
    )
    model, arch = build_student(cfg, 10, GRAY, logging.getLogger())
    assert arch == "deit" and model.config.in_chans == 1 and model.config.img_size == 28
    assert model.config.drop_path_rate == 0.1 and model.config.num_classes == 10
    cfg.model.name = "fmnist_cnn"
    model, arch = build_student(cfg, 10, GRAY, logging.getLogger())
    assert arch == "fmnist_cnn" and isinstance(model, FashionCNN)
