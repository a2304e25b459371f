"""labelwise.load / Predictor / evaluate / predict_files for every kind of model folder, checked
against direct computations (the module's own forward, numpy confusion counts, scipy's Hungarian
solver)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.utils.data import Dataset

import labelwise
from labelwise.config import EvalConfig
from labelwise.data import ClassMap
from labelwise.errors import ConfigError
from labelwise.eval.crf import CRFParams, dense_crf
from labelwise.inference import Predictor, evaluate, predict_files
from labelwise.models import create
from labelwise.models.artifact import Artifact, cluster_class_map
from labelwise.models.export import export_model

CLASSES = ClassMap.from_names(["a", "b", "c"])


class Coded(Dataset):
    """Images whose red channel encodes the class of each pixel (class / 4), masks with those
    classes and a few ignored pixels."""

    class_map = CLASSES

    def __init__(self, count: int = 3, size=(20, 27), seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.masks = [torch.randint(0, 3, size, generator=g) for _ in range(count)]
        for mask in self.masks:
            mask[0, :3] = 255

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, index: int) -> dict:
        mask = self.masks[index]
        image = torch.zeros(3, *mask.shape)
        image[0] = mask.clamp(max=2).float() / 4
        return {"image": image, "mask": mask, "name": f"img{index}"}


class ColorClusters(nn.Module):
    """Scores peaking at cluster ``k`` where the red channel is ``order[k] / 4``."""

    def __init__(self, order: list[int]) -> None:
        super().__init__()
        self.register_buffer("levels", torch.tensor(order, dtype=torch.float32) / 4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return -(images[:, :1] - self.levels.view(1, -1, 1, 1)).abs() * 10


def _cluster_predictor(order: list[int]) -> Predictor:
    names = cluster_class_map(len(order))
    artifact = Artifact(folder=__import__("pathlib").Path("memory"), kind="clusters",
                        module=ColorClusters(order), class_map=names, info={"eval": {}})
    return Predictor(artifact, device="cpu", precision="fp32")


@pytest.fixture()
def unet_folder(tmp_path):
    torch.manual_seed(0)
    model = create("unet", num_classes=3, width=8, depth=2).eval()
    export_model(tmp_path / "run", model, CLASSES, EvalConfig())
    return model, tmp_path / "run"


def test_load_predicts_the_argmax_of_the_module_forward(unet_folder):
    model, folder = unet_folder
    predictor = labelwise.load(folder, device="cpu", precision="fp32")
    images = torch.rand(2, 3, 33, 41, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(images).argmax(1)
        flipped = (0.5 * (model(images) + model(images.flip(-1)).flip(-1))).argmax(1)
    assert torch.equal(predictor.predict(images), expected)
    assert torch.equal(predictor.predict(images, predictor.options(flip=True)), flipped)
    # a window covering the image is the whole-image prediction
    assert torch.equal(predictor.predict(images, predictor.options(window=64)), expected)
    assert predictor.class_map.names == CLASSES.names and predictor.kind == "segmenter"


def test_evaluate_matches_numpy_counts_and_refuses_other_classes(unet_folder):
    model, folder = unet_folder
    predictor = labelwise.load(folder, device="cpu", precision="fp32")
    data = Coded()
    result = evaluate(predictor, data)
    intersection, union = np.zeros(3), np.zeros(3)
    for index in range(len(data)):
        sample = data[index]
        with torch.no_grad():
            pred = model(sample["image"][None]).argmax(1)[0].numpy()
        mask = sample["mask"].numpy()
        keep = mask != 255
        for c in range(3):
            intersection[c] += np.sum((pred == c) & (mask == c) & keep)
            union[c] += np.sum(((pred == c) | (mask == c)) & keep)
    present = union > 0
    assert result["miou"] == pytest.approx(float(np.mean(intersection[present] / union[present])), abs=1e-6)

    class Other(Coded):
        class_map = ClassMap.from_names(["x", "y", "z"])

    with pytest.raises(ConfigError, match="predicts classes"):
        evaluate(predictor, Other())


def test_clusters_are_scored_under_scipy_hungarian_matching_and_match_recovers_the_order():
    order = [2, 0, 1]  # cluster k fires on class order[k]
    predictor = _cluster_predictor(order)
    data = Coded(seed=3)
    result = evaluate(predictor, data)
    counts = np.zeros((3, 3))
    for index in range(len(data)):
        sample = data[index]
        clusters = ColorClusters(order)(sample["image"][None]).argmax(1)[0].numpy()
        mask = sample["mask"].numpy()
        keep = mask != 255
        np.add.at(counts, (mask[keep], clusters[keep]), 1)
    rows, cols = linear_sum_assignment(-counts)
    assert sorted(zip(cols.tolist(), rows.tolist())) == sorted(enumerate(order))
    assert result["mapping"] == order and result["miou"] == pytest.approx(1.0)
    mapping = predictor.match(data)
    assert mapping.tolist() == order and predictor.class_map.names == CLASSES.names
    sample = data[0]
    ids = predictor.predict(sample["image"][None])[0]
    keep = sample["mask"] != 255
    assert torch.equal(ids[keep], sample["mask"][keep])


def test_set_mapping_is_checked():
    predictor = _cluster_predictor([0, 1, 2])
    with pytest.raises(ConfigError, match="3 entries needed"):
        predictor.set_mapping([0, 1], CLASSES)
    with pytest.raises(ConfigError, match=r"class ids must lie in \[0, 3\)"):
        predictor.set_mapping([0, 1, 5], CLASSES)


def test_crf_refines_the_softmax_like_dense_crf_does(unet_folder):
    model, folder = unet_folder
    predictor = labelwise.load(folder, device="cpu", precision="fp32")
    image = torch.rand(1, 3, 24, 30, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        probabilities = torch.softmax(model(image), 1)[0].numpy()
    picture = np.ascontiguousarray((image[0].permute(1, 2, 0) * 255 + 0.5).byte().numpy())
    expected = dense_crf(picture, probabilities, CRFParams()).argmax(0)
    assert np.array_equal(predictor.predict(image, crf=True)[0].numpy(), expected)


def test_predict_files_writes_ids_that_equal_predict(unet_folder, tmp_path):
    _, folder = unet_folder
    predictor = labelwise.load(folder, device="cpu", precision="fp32")
    picture = (np.random.default_rng(0).random((21, 34, 3)) * 255).astype(np.uint8)
    Image.fromarray(picture).save(tmp_path / "photo.png")
    written = predict_files(predictor, [tmp_path / "photo.png"], tmp_path / "out")
    ids = np.asarray(Image.open(written[0]))
    expected = predictor.predict(torch.from_numpy(picture).permute(2, 0, 1)[None].float() / 255)[0].numpy()
    assert np.array_equal(ids, expected)
    assert (tmp_path / "out" / "color" / "photo.png").is_file() and (tmp_path / "out" / "overlay" / "photo.png").is_file()


def test_cluster_predictions_keep_the_raw_cluster_ids(tmp_path):
    predictor = _cluster_predictor([1, 2, 0])
    picture = np.zeros((8, 9, 3), np.uint8)
    picture[:, :4, 0] = 128  # red 0.5 -> class 2 -> cluster 1
    Image.fromarray(picture).save(tmp_path / "p.png")
    predict_files(predictor, [tmp_path], tmp_path / "out")
    clusters = np.asarray(Image.open(tmp_path / "out" / "clusters" / "p.png"))
    assert set(np.unique(clusters[:, :4])) == {1} and set(np.unique(clusters[:, 5:])) == {2}
