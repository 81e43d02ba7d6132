"""The decode-once image cache: the same tensors as open_clip's PIL preprocess, built once and reused, rebuilt
when the images or the transform change, written whole, and working from a read-only data root."""
import os

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import common
import data
import embedded


@pytest.fixture(scope="module")
def f30k(tmp_path_factory):
    """Generated 500x375 JPEGs in the Flickr30K Karpathy layout: 12 train, 3 dev and 3 test images."""
    root = tmp_path_factory.mktemp("f30k")
    embedded.write_f30k_like(root, {"train": 12, "dev": 3, "test": 3})
    return root


def _preprocess(size):
    # what create_model_and_transforms gives ViT-B-32 at 224
    return open_clip.image_transform(size, is_train=False)


@pytest.mark.parametrize("size", [224, 64])
def test_cached_and_decoded_images_equal_open_clips_preprocess(f30k, tmp_path, size):
    split = data.load_split("f30k", f30k, "train")
    preprocess = _preprocess(size)
    cached = data.Pixels(preprocess, tmp_path).images(split.paths)
    decoded = data.Pixels(preprocess).images(split.paths)
    for i in range(len(split.paths)):
        with Image.open(split.paths[i]) as im:
            want = preprocess(im.convert("RGB"))  # (3, size, size) float, open_clip's per-sample PIL path
        got = cached[i][0]
        assert got.dtype == torch.uint8 and got.shape == (3, size, size)
        assert torch.equal(decoded[i][0], got)
        assert torch.equal(data.Pixels(preprocess).normalize(got[None])[0], want)  # the same float operations


def test_the_cache_is_built_once_and_rebuilt_when_the_images_or_the_transform_change(f30k, tmp_path,
                                                                                      monkeypatch):
    paths = data.load_split("f30k", f30k, "train").paths
    builds = []
    build = data.build_cache
    monkeypatch.setattr(data, "build_cache", lambda *a: builds.append(a[0]) or build(*a))
    first = data.Pixels(_preprocess(224), tmp_path).images(paths)
    again = data.Pixels(_preprocess(224), tmp_path).images(paths)
    assert len(builds) == 1 and again.path == first.path == builds[0]
    assert torch.equal(again[5][0], first[5][0])
    fewer = data.Pixels(_preprocess(224), tmp_path).images(paths[:-1])  # another file list
    smaller = data.Pixels(_preprocess(96), tmp_path).images(paths)  # another input size
    assert len(builds) == 3 and len({first.path, fewer.path, smaller.path}) == 3
    assert len(fewer) == len(paths) - 1 and smaller[0][0].shape == (3, 96, 96)
    files = sorted(p.name for p in (tmp_path / "image-cache").iterdir())
    assert files == sorted(p.name for p in builds)  # no temp files


def test_an_image_changed_after_the_build_is_served_as_it_is_now(tmp_path):
    """The key covers each file's size and time: before, a repainted image kept its old cached pixels."""
    root = tmp_path / "f30k"
    embedded.write_f30k_like(root, {"train": 4, "dev": 1, "test": 1})
    paths = data.load_split("f30k", root, "train").paths
    before = data.Pixels(_preprocess(64), tmp_path).images(paths)[2][0]
    Image.new("RGB", (500, 375), (128, 128, 128)).save(paths[2], quality=90)  # painted grey
    now = data.Pixels(_preprocess(64), tmp_path).images(paths)[2][0]
    assert torch.equal(now, data.Pixels(_preprocess(64)).images(paths)[2][0]) and not torch.equal(now, before)


def test_a_failed_build_leaves_no_cache_file(f30k, tmp_path):
    paths = data.load_split("f30k", f30k, "train").paths
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(data.UserError, match="cannot read image .*bad.jpg"):
        data.Pixels(_preprocess(64), tmp_path / "cache").images([*paths[:3], str(bad)])
    assert list((tmp_path / "cache" / "image-cache").iterdir()) == []


def test_a_read_only_data_root_keeps_its_caches_elsewhere(embedded, tmp_path, monkeypatch):
    """Noise permutation and decoded images go to $NC_CACHE when the data root cannot be written; nothing
    is written under the root. (As root, permission bits do not stop writes: then os.access is made to
    read them.)"""
    root = tmp_path / "data"
    root.mkdir()
    (root / "images").symlink_to(embedded / "images")
    (root / "dataset_embedded.json").symlink_to(embedded / "dataset_embedded.json")
    before = sorted(os.listdir(root))
    root.chmod(0o555)
    if os.geteuid() == 0:
        access = os.access
        monkeypatch.setattr(data.os, "access",
                            lambda p, mode: access(p, mode) and os.stat(p).st_mode & 0o222 != 0)
    monkeypatch.setenv("NC_CACHE", str(tmp_path / "user-cache"))
    try:
        train, is_noisy = data.noisy_train("embedded", root, 0.4, 0)
        images = data.Pixels(_preprocess(64), data.cache_dir(root)).images(train.paths)
        assert sorted(os.listdir(root)) == before
    finally:
        root.chmod(0o755)
    assert data.cache_dir(embedded) == embedded  # a writable root is its own cache folder
    assert images.path.is_relative_to(tmp_path / "user-cache") and len(images) == len(train.paths)
    writable = data.noisy_train("embedded", embedded, 0.4, 0)[1]
    assert np.array_equal(is_noisy, writable)  # the same permutation, wherever it is cached


def test_features_are_the_same_with_and_without_the_cache(embedded, tmp_path):
    weights = str(embedded / "nc-tiny-pretrained.pt")
    model, preprocess, tokenizer = common.load_model("nc-tiny", weights, torch.device("cpu"),
                                                     log=lambda line: None)
    dev = data.load_split("embedded", embedded, "dev")
    cached = common.features(model, dev, data.Pixels(preprocess, tmp_path), tokenizer, torch.device("cpu"))
    decoded = common.features(model, dev, data.Pixels(preprocess), tokenizer, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(cached, decoded))


def test_building_the_cache_leaves_the_global_random_generator_alone(f30k, tmp_path):
    """embedded.pretrain_tiny builds its cache on first use, then shuffles: a build must not change
    what it draws."""
    paths = data.load_split("f30k", f30k, "dev").paths
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    data.Pixels(_preprocess(64), tmp_path).images(paths)
    assert torch.equal(torch.rand(3), want)


def test_a_truncated_cache_file_is_rebuilt_with_a_line(f30k, tmp_path, capsys):
    """Before: np.load's ValueError (mmap length is greater than file size) in the first batch."""
    paths = data.load_split("f30k", f30k, "train").paths
    first = data.Pixels(_preprocess(96), tmp_path).images(paths)
    want = first[len(paths) - 1][0]
    size = first.path.stat().st_size
    with open(first.path, "r+b") as f:
        f.truncate(size // 2)
    capsys.readouterr()
    again = data.Pixels(_preprocess(96), tmp_path).images(paths)
    assert "is damaged (truncated?): decoding the images again" in capsys.readouterr().out
    assert again.path.stat().st_size == size and torch.equal(again[len(paths) - 1][0], want)


def test_a_read_only_data_root_with_a_read_only_cache_is_one_line(tmp_path, monkeypatch):
    """Before: a PermissionError (or NotADirectoryError) traceback from mkdir."""
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setattr(data.os, "access", lambda path, mode: False)  # the root is read-only (as root, even)
    monkeypatch.setenv("NC_CACHE", str(tmp_path / "file" / "cache"))  # a cache that cannot be made
    with pytest.raises(data.UserError, match="is read-only and its caches cannot go to .* set \\$NC_CACHE"):
        data.cache_dir(tmp_path)
    monkeypatch.setenv("NC_CACHE", str(tmp_path / "cache"))  # one that exists, but is not writable either
    with pytest.raises(data.UserError, match="is read-only and so is .*: set \\$NC_CACHE"):
        data.cache_dir(tmp_path)
