"""The out-of-distribution score (issue 26): fit and score math against a NumPy reference,
the layers' standardised sum, the taps, the 95% threshold, AUROC/FPR, the stored file and its
refusal of lying headers, the
uncalibrated fallback, predict's text and JSON, ONNX/OpenVINO parity, calibrate, eval --ood."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deit.checkpoints import load_model
from deit.cli import main
from deit.errors import CheckpointError
from deit.inference import Classifier
from deit.model import DeiT
from deit.ood import (
    MAHALANOBIS,
    MSP_UNCALIBRATED,
    VERSION,
    LayerStats,
    OODStats,
    Taps,
    auroc,
    fit_features,
    fit_mahalanobis,
    fit_ood,
    fpr_at_tpr,
    layer_features,
    tapped_blocks,
    threshold_at,
)
from deit.ood_file import load_ood

from .deploy_helpers import LABELS, save_tiny_model


def _reference_scores(
    feats: np.ndarray, labels: np.ndarray, queries: np.ndarray, shrinkage: float
) -> np.ndarray:
    """Class means, one shared covariance (+ ridge), squared distance to the nearest mean / D,
    written independently with NumPy."""
    classes = np.unique(labels)
    means = np.stack([feats[labels == c].mean(0) for c in classes])
    centered = feats - means[np.searchsorted(classes, labels)]
    cov = centered.T @ centered / len(feats)
    cov += np.eye(len(cov)) * shrinkage * np.trace(cov) / len(cov)
    prec = np.linalg.inv(cov)
    diffs = queries[:, None, :] - means[None]  # (Q, C, D)
    d2 = np.einsum("qcd,de,qce->qc", diffs, prec, diffs)
    return d2.min(1) / feats.shape[1]


def test_mahalanobis_matches_a_numpy_reference() -> None:
    rng = np.random.default_rng(0)
    d, n = 6, 300
    mix = rng.normal(size=(d, d))
    labels = rng.integers(0, 3, size=n)
    feats = rng.normal(size=(n, d)) @ mix + labels[:, None] * 2.0
    queries = rng.normal(size=(40, d)) * 3
    for shrinkage in (1e-4, 0.1):
        center, whiten, means = fit_mahalanobis(
            torch.from_numpy(feats),
            torch.from_numpy(labels),
            4,
            shrinkage,  # class 3 absent
        )
        assert means.shape == (3, d)
        got = LayerStats(center, whiten, means).scorer()(torch.from_numpy(queries).float())
        got = got.double().numpy()
        want = _reference_scores(feats, labels, queries, shrinkage)
        np.testing.assert_allclose(got, want, rtol=2e-4)


def test_layers_are_standardised_by_their_training_scores_and_summed() -> None:
    rng = np.random.default_rng(1)
    n, d = 400, 5
    labels = rng.integers(0, 3, size=n)
    layers = [rng.normal(size=(n, d)) * s + labels[:, None] for s in (1.0, 4.0)]
    val = rng.normal(size=(50, 2 * d))
    stats = fit_features(
        torch.from_numpy(np.concatenate(layers, 1)),
        torch.from_numpy(labels),
        torch.from_numpy(val),
        3,
        Taps(1, (0, 1)),
    )
    want = np.zeros(len(val))
    for i, feats in enumerate(layers):
        train = _reference_scores(feats, labels, feats, 1e-4)
        query = _reference_scores(feats, labels, val[:, i * d : (i + 1) * d], 1e-4)
        want += (query - train.mean()) / train.std(ddof=1)
    got = stats.scorer()(torch.from_numpy(val).float()).double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    assert stats.threshold == pytest.approx(np.sort(want)[47], rel=1e-3)  # 48th of 50: 95%


def test_taps_are_an_early_block_and_the_last() -> None:
    assert tapped_blocks(1) == (0,) and tapped_blocks(2) == (0, 1) and tapped_blocks(3) == (0, 2)
    assert tapped_blocks(6) == (1, 5) and tapped_blocks(12) == (3, 11)
    assert tapped_blocks(24) == (6, 23)


def test_the_taps_read_each_block_and_the_final_norm(tmp_path: Path) -> None:
    model = load_model(save_tiny_model(tmp_path / "m")).model
    assert isinstance(model, DeiT)
    taps = Taps.of(model)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = taps.features(model(x, output_blocks=taps.blocks))
        tokens = model._pos_embed(model.patch_embed(x), (4, 4), False)
        first = model.blocks[0](tokens)[0]
        final = model.forward_features(x)[0]

    def by_hand(t: torch.Tensor) -> torch.Tensor:  # the two tokens' mean, the patches' moments
        parts = [(t[:, 0] + t[:, 1]) / 2, t[:, 2:].mean(1), t[:, 2:].square().mean(1)]
        return torch.cat([torch.nn.functional.normalize(v, dim=-1) for v in parts], 1)

    assert features.shape == (3, 2 * 3 * 64)
    torch.testing.assert_close(features, torch.cat([by_hand(first), by_hand(final)], 1))
    torch.testing.assert_close(layer_features([first], 2), by_hand(first))
    # both tokens count: neither alone is the first feature, and the patches' mean differs
    for token in (0, 1):
        alone = torch.nn.functional.normalize(final[:, token], dim=-1)
        assert not torch.allclose(features[:, 192:256], alone, atol=1e-3)
    assert not torch.allclose(features[:, 256:320], features[:, 192:256], atol=1e-3)
    assert not torch.allclose(features[:, 320:], features[:, 256:320], atol=1e-3)
    # a model without a distillation token reads its class token alone
    patches = first[:, 1:]
    alone = (first[:, 0], patches.mean(1), patches.square().mean(1))
    torch.testing.assert_close(
        layer_features([first], 1),
        torch.cat([torch.nn.functional.normalize(v, dim=-1) for v in alone], 1),
    )
    with pytest.raises(RuntimeError, match="output_blocks"):
        taps.features(model(x))


def test_threshold_accepts_95_percent() -> None:
    scores = torch.randperm(100).float()
    t = threshold_at(scores)
    assert t == 94.0 and int((scores <= t).sum()) == 95
    many = torch.rand(1013, generator=torch.Generator().manual_seed(1))
    accepted = float((many <= threshold_at(many)).float().mean())
    assert 0.95 <= accepted < 0.95 + 1 / 1013 + 1e-9


def test_auroc_and_fpr_match_their_definitions() -> None:
    rng = np.random.default_rng(2)
    a = rng.integers(0, 20, size=57).astype(float)  # ties on purpose
    b = rng.integers(5, 30, size=43).astype(float)
    pairs = (b[None, :] > a[:, None]).mean() + 0.5 * (b[None, :] == a[:, None]).mean()
    assert auroc(a, b) == pytest.approx(pairs)
    assert auroc(a, a) == pytest.approx(0.5)
    cut = max(t for t in np.unique(b) if (b >= t).mean() >= 0.95)
    assert fpr_at_tpr(a, b) == pytest.approx((a >= cut).mean())
    assert fpr_at_tpr(np.zeros(5), np.ones(5)) == 0.0


def _gray_images(folder: Path, per_class: int = 6, classes: int = 10) -> Path:
    """Class folders named like LABELS; each class a different stripe pattern plus noise."""
    rng = np.random.default_rng(3)
    for c in range(classes):
        sub = folder / LABELS[c]
        sub.mkdir(parents=True)
        for i in range(per_class):
            base = np.zeros((32, 32, 3), dtype=np.float64)
            base[:, c * 3 : c * 3 + 4] = 200
            img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(sub / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny distilled model with statistics fitted by `deit calibrate` on an image folder."""
    root = tmp_path_factory.mktemp("ood")
    model = save_tiny_model(root / "model")
    data = _gray_images(root / "data")
    assert main(["calibrate", "--model", str(model), "--data", str(data), "--device", "cpu"]) == 0
    return model, data


def test_calibrate_writes_statistics_the_classifier_uses(
    calibrated: tuple[Path, Path], sample_images: list[Path]
) -> None:
    model, _ = calibrated
    stats = load_ood(model)
    assert stats.taps == Taps(2, (0, 1)) and stats.layer_dim == 3 * 64 and stats.classes == 10
    assert stats.info["val_samples"] == 6 and stats.info["train_samples"] == 54
    clf = Classifier.from_pretrained(model, device="cpu")
    results = clf.predict([str(p) for p in sample_images[:3]])
    loaded = load_model(model)
    x = torch.stack(_pixels(clf, sample_images[:3]))
    with torch.no_grad():
        want = stats.scorer()(stats.taps.features(loaded.model(x, output_blocks=stats.taps.blocks)))
    for r, w in zip(results, want.tolist(), strict=True):
        assert r.ood.method == MAHALANOBIS
        assert r.ood.score == pytest.approx(w, rel=1e-5)
        assert r.ood.unusual == (w > stats.threshold)


def _pixels(clf: Classifier, paths: list[Path]) -> list[torch.Tensor]:
    from deit.images import load_image
    from deit.transforms import preprocess_image

    return [preprocess_image(load_image(str(p)), clf.loaded.preprocess) for p in paths]


def test_models_without_statistics_get_the_uncalibrated_max_softmax(
    tmp_path: Path, sample_images: list[Path]
) -> None:
    clf = Classifier.from_pretrained(save_tiny_model(tmp_path / "m"), device="cpu")
    for r in clf.predict([str(p) for p in sample_images[:3]]):
        assert r.ood.method == MSP_UNCALIBRATED
        assert r.ood.score == pytest.approx(1 - r[0].score, abs=1e-6)
        assert r.ood.unusual == (r[0].score < 0.5)


def test_predict_text_and_json_carry_the_verdict(
    calibrated: tuple[Path, Path], tmp_path: Path, sample_images: list[Path], capsys
) -> None:
    model, _ = calibrated
    strict = tmp_path / "strict"
    strict.mkdir()
    for f in model.iterdir():
        (strict / f.name).write_bytes(f.read_bytes())
    stats = load_ood(model)
    stats.threshold = -1.0  # every image is unusual
    stats.save(strict)
    photo = str(sample_images[0])
    assert main(["predict", "-m", str(strict), photo, "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "unusual: this image is unlike the model's training data" in text
    assert main(["predict", "-m", str(strict), photo, "--device", "cpu", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert set(record["ood"]) == {"score", "unusual", "method"}
    assert record["ood"]["unusual"] is True and record["ood"]["method"] == MAHALANOBIS
    stats.threshold = 1e9  # none is
    stats.save(strict)
    assert main(["predict", "-m", str(strict), photo, "--device", "cpu"]) == 0
    assert "unusual" not in capsys.readouterr().out


def test_statistics_round_trip(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    shapes = ((6,), (6, 6), (3, 6))
    layers = [LayerStats(*(torch.randn(s, generator=g) for s in shapes)) for _ in range(2)]
    stats = OODStats(
        layers,
        torch.tensor([0.5, 1.0]),
        torch.tensor([2.0, 0.25]),
        threshold=1.25,
        taps=Taps(1, (0, 3)),
        info={"data": "x"},
    )
    back = load_ood(stats.save(tmp_path))
    assert back.threshold == 1.25 and back.taps == Taps(1, (0, 3)) and back.info == {"data": "x"}
    for name, tensor in stats.tensors().items():
        assert torch.equal(back.tensors()[name], tensor)
    q = torch.randn(5, 12, generator=g)
    assert torch.equal(back.scorer()(q), stats.scorer()(q))


def _write_raw(path: Path, header: dict, data: bytes = b"") -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def _honest_header(dim: int = 4, classes: int = 2) -> dict:
    """One layer (block 0): 1 + 1 + 4 + 16 + 8 = 30 floats."""
    meta = {
        "format": "deit-ood",
        "version": VERSION,
        "method": MAHALANOBIS,
        "threshold": 1.0,
        "num_prefix": 1,
        "blocks": [0],
        "dim": dim,
        "classes": classes,
        "info": {},
    }
    header: dict = {"__metadata__": {"deit.ood": json.dumps(meta)}}
    offset = 0
    shapes = (
        ("offset", [1]),
        ("scale", [1]),
        ("center.0", [dim]),
        ("whiten.0", [dim, dim]),
        ("means.0", [classes, dim]),
    )
    for name, shape in shapes:
        size = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    return header


def _with_meta(header: dict, **changes: object) -> dict:
    """A copy of ``header`` whose deit.ood JSON block has ``changes``."""
    out = json.loads(json.dumps(header))
    meta = json.loads(out["__metadata__"]["deit.ood"])
    out["__metadata__"]["deit.ood"] = json.dumps({**meta, **changes})
    return out


def test_lying_files_are_refused_before_allocating(tmp_path: Path) -> None:
    honest = _honest_header()
    body = np.ones(30, dtype=np.float32).tobytes()
    assert load_ood(_write_raw(tmp_path / "ok.safetensors", honest, body)).dim == 4

    huge = _honest_header(dim=1 << 20)  # 4 TiB of whitening matrix claimed by a tiny file
    with pytest.raises(CheckpointError, match=r"does not fit the file|too large|dim must be"):
        load_ood(_write_raw(tmp_path / "huge.safetensors", huge, body))
    big_tensor = json.loads(json.dumps(honest))
    big_tensor["whiten.0"]["shape"] = [1 << 16, 1 << 16]
    with pytest.raises(CheckpointError, match="its header says"):
        load_ood(_write_raw(tmp_path / "big.safetensors", big_tensor, body))
    with pytest.raises(CheckpointError, match="does not fit the file"):
        load_ood(_write_raw(tmp_path / "short.safetensors", honest, body[:-4]))
    (tmp_path / "len.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(CheckpointError, match="header of"):
        load_ood(tmp_path / "len.safetensors")
    with pytest.raises(CheckpointError, match="its header says"):
        load_ood(_write_raw(tmp_path / "mis.safetensors", _with_meta(honest, classes=3), body))
    nan = np.ones(30, dtype=np.float32)
    nan[5] = np.nan
    with pytest.raises(CheckpointError, match="non-finite"):
        load_ood(_write_raw(tmp_path / "nan.safetensors", honest, nan.tobytes()))
    zero_scale = np.ones(30, dtype=np.float32)
    zero_scale[1] = 0.0
    with pytest.raises(CheckpointError, match="scales must be positive"):
        load_ood(_write_raw(tmp_path / "zero.safetensors", honest, zero_scale.tobytes()))
    many = _with_meta(honest, blocks=list(range(100)))  # more layers than any score taps
    with pytest.raises(CheckpointError, match="blocks must be"):
        load_ood(_write_raw(tmp_path / "many.safetensors", many, body))
    with pytest.raises(CheckpointError, match="refit them with deit calibrate"):
        load_ood(_write_raw(tmp_path / "v1.safetensors", _with_meta(honest, version=1), body))


def test_statistics_of_another_model_are_refused(calibrated: tuple[Path, Path], tmp_path) -> None:
    model, _ = calibrated
    other = save_tiny_model(tmp_path / "plain", distilled=False)  # one token: 64 features
    load_ood(model).save(other)
    with pytest.raises(CheckpointError, match="do not fit this model"):
        Classifier.from_pretrained(other, device="cpu")


def test_statistics_fitted_on_other_blocks_are_read_where_they_say(
    calibrated: tuple[Path, Path], tmp_path: Path, sample_images: list[Path]
) -> None:
    """A file fitted on other blocks than today's default (here the last alone) keeps
    working; one that does not end with the model's last block is refused."""
    folder = tmp_path / "m"
    shutil.copytree(calibrated[0], folder)
    loaded = load_model(folder)
    x = torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for taps, fits in ((Taps(2, (1,)), True), (Taps(2, (0,)), False)):
        with torch.no_grad():
            feats = taps.features(loaded.model(x, output_blocks=taps.blocks))
        stats = fit_features(feats, torch.arange(40) % 10, feats, 10, taps)
        stats.save(folder)
        if not fits:
            with pytest.raises(CheckpointError, match="do not fit this model"):
                Classifier.from_pretrained(folder, device="cpu")
            continue
        clf = Classifier.from_pretrained(folder, device="cpu")
        assert clf.ood_stats is not None and clf.ood_stats.taps == taps
        pixels = torch.stack(_pixels(clf, sample_images[:2]))
        with torch.no_grad():
            want = stats.scorer()(taps.features(loaded.model(pixels, output_blocks=taps.blocks)))
        got = [r.ood.score for r in clf.predict([str(p) for p in sample_images[:2]])]
        assert got == pytest.approx(want.tolist(), rel=1e-5)


def test_fit_ood_from_loaders_matches_calibrate_math(calibrated: tuple[Path, Path]) -> None:
    """The API `deit train` calls: fit on one set of batches, threshold on another."""
    loaded = load_model(calibrated[0])
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 3, 32, 32, generator=g), torch.arange(60) % 10
    stats = fit_ood(loaded.model, [(x[:30], y[:30]), (x[30:50], y[30:50])], [(x[50:], y[50:])])
    assert stats.info["train_samples"] == 50 and stats.info["val_samples"] == 10
    with torch.no_grad():
        val = stats.scorer()(
            stats.taps.features(loaded.model(x[50:], output_blocks=stats.taps.blocks))
        )
    assert int((val <= stats.threshold).sum()) >= 9.5  # 95% of 10, rounded up


def test_exports_give_the_eager_score(
    calibrated: tuple[Path, Path], tmp_path: Path, sample_images: list[Path]
) -> None:
    pytest.importorskip("onnxruntime")
    model, _ = calibrated
    paths = [str(p) for p in sample_images]
    eager = Classifier.from_pretrained(model, device="cpu").predict(paths)
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", "-m", str(model), str(onnx_path), "--dynamic-batch"]) == 0
    import onnx

    outputs = [o.name for o in onnx.load(str(onnx_path)).graph.output]
    assert outputs == ["logits", "ood_score"]
    exported = [Classifier.from_pretrained(onnx_path).predict(paths)]
    fused = tmp_path / "fused.onnx"
    assert main(["export", "-m", str(model), str(fused), "--dynamic-batch", "--ort-fused"]) == 0
    assert [o.name for o in onnx.load(str(fused)).graph.output] == ["logits", "ood_score"]
    exported.append(Classifier.from_pretrained(fused).predict(paths))
    if __import__("importlib").util.find_spec("openvino") is not None:
        from deit.deploy.openvino import export_openvino

        xml = export_openvino(load_model(model), tmp_path / "m.xml")
        exported.append(Classifier.from_pretrained(xml).predict(paths))
        fast = Classifier.from_pretrained(model, device="cpu", fast=True)
        exported.append(fast.predict(paths))
    for results in exported:
        for e, r in zip(eager, results, strict=True):
            assert r.ood.method == MAHALANOBIS
            assert r.ood.score == pytest.approx(e.ood.score, rel=1e-4, abs=1e-5)
            assert r.ood.unusual == e.ood.unusual
            assert r[0].index == e[0].index


def test_files_exported_with_earlier_statistics_keep_their_score(
    calibrated: tuple[Path, Path], tmp_path: Path, sample_images: list[Path]
) -> None:
    """An exported graph computes the score it was fitted for: a file that declares the
    previous statistics version still loads with its threshold; an older one is refused
    with a one-line reason."""
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    model, _ = calibrated
    path = tmp_path / "m.onnx"
    assert main(["export", "-m", str(model), str(path)]) == 0
    photo = str(sample_images[0])
    current = Classifier.from_pretrained(path).predict(photo)[0]
    for version in (3, 2):
        proto = onnx.load(str(path))
        (entry,) = [p for p in proto.metadata_props if p.key == "deit.ood"]
        entry.value = json.dumps({**json.loads(entry.value), "version": version})
        old = tmp_path / f"v{version}.onnx"
        onnx.save(proto, str(old))
        if version == 3:
            result = Classifier.from_pretrained(old).predict(photo)[0]
            assert result.ood == current.ood
        else:
            with pytest.raises(CheckpointError, match=r"version 2.*refit them with deit calibrate"):
                Classifier.from_pretrained(old)


def test_int8_files_keep_a_float_score(
    calibrated: tuple[Path, Path], tmp_path: Path, sample_images: list[Path]
) -> None:
    """deit quantize (fused and portable graphs): the score's own products stay float, so the
    int8 file is calibrated and scores close to the eager model (its features pass int8
    blocks)."""
    pytest.importorskip("onnxruntime")
    import onnx

    from deit.deploy.quantize import score_only_nodes

    model, _ = calibrated
    paths = [str(p) for p in sample_images]
    eager = Classifier.from_pretrained(model, device="cpu").predict(paths)
    for flags in ([], ["--portable"]):
        out = tmp_path / f"int8{len(flags)}.onnx"
        args = ["quantize", "-m", str(model), str(out), "--bench-runs", "0", *flags]
        assert main(args) == 0
        graph = onnx.load(str(out))
        float_products = [n for n in graph.graph.node if n.op_type == "MatMul"]
        assert any(n.name in score_only_nodes(graph) for n in float_products)
        results = Classifier.from_pretrained(out).predict(paths)
        for e, r in zip(eager, results, strict=True):
            assert r.ood.method == MAHALANOBIS
            assert r.ood.score == pytest.approx(e.ood.score, rel=0.05, abs=0.5)


def test_eval_ood_reports_auroc_and_fpr(
    calibrated: tuple[Path, Path], sample_images: list[Path], capsys
) -> None:
    model, data = calibrated
    photos = str(sample_images[0].parent)
    args = ["eval", "--model", str(model), "--data", str(data), "--ood", photos, "--device", "cpu"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "AUROC" in text and "FPR at 95% TPR" in text and "max softmax" in text
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_in"] == 60 and report["num_out"] == len(sample_images)
    assert report["method"] == MAHALANOBIS and 0.0 <= report["auroc"] <= 1.0
