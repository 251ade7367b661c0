"""ImageNet as an ImageFolder decoded on access: order, labels, Cohen et al.'s preprocessing, certification."""
import numpy as np
import pytest
import torch
from PIL import Image

from ssmooth.data import SmoothingDataModule, load_split
from ssmooth.evaluate import CertifyConfig, certify_model
from ssmooth.models import create_model

pytestmark = pytest.mark.filterwarnings("ignore:.*class folders, not 1000:UserWarning")


def test_validation_images_are_indexed_in_sorted_order_and_preprocessed_like_cohen(tiny_imagenet):
    with pytest.warns(UserWarning, match="has 2 class folders, not 1000"):
        val = load_split("imagenet", "test", root=tiny_imagenet)
    assert val.labels.tolist() == [0, 0, 1, 1] and val.indices.tolist() == [0, 1, 2, 3]
    assert [p.split("/")[-1] for p in val.paths] == ["n01440764_0.png", "n01440764_1.png", "n01443537_0.png",
                                                     "n01443537_1.png"]
    x, y, index = val[2]
    # Resize the short side (40 px) to 256, keeping the aspect (50 px -> 320), then take the central 224x224.
    with Image.open(val.paths[2]) as image:
        resized = np.asarray(image.convert("RGB").resize((320, 256), Image.BILINEAR), dtype=np.float32) / 255
    expected = torch.from_numpy(resized[16:240, 48:272]).permute(2, 0, 1)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and (int(y), int(index)) == (1, 2)
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)


def test_training_images_are_random_resized_crops(tiny_imagenet):
    train = load_split("imagenet", "train", root=tiny_imagenet, augment=True)
    assert len(train) == 6 and train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    torch.manual_seed(0)
    first, second = train[0][0], train[0][0]
    assert first.shape == second.shape == (3, 224, 224) and not torch.equal(first, second)
    assert 0 <= float(first.min()) and float(first.max()) <= 1


def test_a_missing_or_inconsistent_folder_is_named(tiny_imagenet, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no folder .*val.*ImageFolder layout"):
        load_split("imagenet", "test", root=tmp_path / "nowhere")
    extra = tiny_imagenet / "val" / "n99999999"
    extra.mkdir()
    Image.new("RGB", (8, 8)).save(extra / "a.png")
    with pytest.raises(ValueError, match=r"class folders that .*train lacks: \['n99999999'\]"):
        load_split("imagenet", "test", root=tiny_imagenet)


def test_every_100th_style_subset_is_certified_from_files(tiny_imagenet, tmp_path):
    datamodule = SmoothingDataModule(name="imagenet", root=str(tiny_imagenet), batch_size=2, num_workers=0)
    points = datamodule.test_points(skip=2)
    assert points.indices.tolist() == [0, 2] and points.labels.tolist() == [0, 1]
    info = datamodule.info
    model = create_model("tiny", num_classes=info.num_classes, input_shape=info.input_shape, mean=info.mean,
                         std=info.std)
    cfg = CertifyConfig(n0=4, n=100, alpha=0.001, batch_size=50, progress=False)
    summary = certify_model(model, points, tmp_path, cfg, num_classes=info.num_classes, base_sigma=0.25,
                            dataset="imagenet")
    assert summary["points"]["count"] == 2
    rows = (tmp_path / "certify.tsv").read_text().splitlines()
    assert [int(r.split("\t")[0]) for r in rows[1:]] == [0, 2]
    batch = next(iter(datamodule.train_dataloader()))
    assert batch[0].shape == (2, 3, 224, 224) and sorted(batch[2].tolist())[0] >= 0
