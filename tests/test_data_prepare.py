"""`leaflens data prepare` on a raw folder built here from real sample photos plus every kind of bad input."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from conftest import SAMPLE_DIR, compose, data_overrides
from leaflens.data.dataset import ManifestDataset
from leaflens.data.dedup import near_duplicate_pairs, parse_series, series_runs
from leaflens.data.download import download
from leaflens.data.prepare import load_manifest, prepare, write_cache
from leaflens.data.scan import scan_class_folders
from leaflens.data.split import group_kfold, split_groups, training_folds
from leaflens.data.taxonomy import load_classes
from leaflens.images import decode_image

CLASSES = ["Apple___Apple_scab", "Grape___Black_rot", "Tomato___healthy", "Potato___Late_blight"]
UUID = "0e1f2a3b-0000-4000-8000-{:012d}"


def _sample_files(label: str) -> list[Path]:
    return sorted(p for p in (SAMPLE_DIR / label).iterdir() if p.suffix.upper() == ".JPG")


def _save(rgb: np.ndarray, path: Path, fmt: str = "JPEG", **kwargs: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, fmt, **kwargs)


def build_raw(root: Path) -> dict[str, Path]:
    """Real photos of four classes, plus planted problems; returns the planted files by role."""
    for label in CLASSES:
        (root / label).mkdir(parents=True)
        for path in _sample_files(label):
            shutil.copy2(path, root / label / path.name)
    scab = _sample_files("Apple___Apple_scab")
    grape = _sample_files("Grape___Black_rot")
    photo = decode_image(scab[0])
    planted = {
        "corrupt": root / "Apple___Apple_scab" / "corrupt.JPG",
        "truncated": root / "Apple___Apple_scab" / "truncated.JPG",
        "non_image": root / "Apple___Apple_scab" / "notes.txt",
        "tiny": root / "Grape___Black_rot" / "tiny.png",
        "grayscale": root / "Tomato___healthy" / "gray.png",
        "rgba": root / "Tomato___healthy" / "rgba.png",
        "exact_copy": root / "Apple___Apple_scab" / "zz_copy_of_first.JPG",
        "near_copy": root / "Apple___Apple_scab" / "zz_reencoded.jpg",
        "conflict_a": root / "Grape___Black_rot" / "conflict.JPG",
        "conflict_b": root / "Tomato___healthy" / "conflict.JPG",
        "series_a": root / "Potato___Late_blight" / f"{UUID.format(1)}___TEST_Series 100.JPG",
        "series_b": root / "Potato___Late_blight" / f"{UUID.format(2)}___TEST_Series 102.JPG",
        "series_far": root / "Potato___Late_blight" / f"{UUID.format(3)}___TEST_Series 140.JPG",
        "extra": root / "Mango___healthy" / "mango.JPG",
    }
    planted["corrupt"].write_bytes(np.random.default_rng(0).integers(0, 255, 4000, dtype=np.uint8).tobytes())
    planted["truncated"].write_bytes(scab[1].read_bytes()[:3000])
    planted["non_image"].write_text("field notes, not a photo")
    _save(np.full((20, 20, 3), 120, np.uint8), planted["tiny"], "PNG")
    _save(decode_image(grape[0])[:, :, 1], planted["grayscale"], "PNG")
    rgba = np.dstack([decode_image(grape[1]), np.full((256, 256), 200, np.uint8)])
    _save(rgba, planted["rgba"], "PNG")
    shutil.copy2(scab[0], planted["exact_copy"])
    # Near-duplicate: the same photo slightly shrunk and re-encoded at another quality.
    _save(
        np.asarray(Image.fromarray(photo).resize((240, 240), Image.BILINEAR)),
        planted["near_copy"],
        quality=70,
    )
    shutil.copy2(grape[2], planted["conflict_a"])
    shutil.copy2(grape[2], planted["conflict_b"])
    # A series: three different leaves, the first two shot two numbers apart, the third far away.
    for key, source in zip(("series_a", "series_b", "series_far"), grape[3:6], strict=True):
        _save(np.ascontiguousarray(decode_image(source)[::-1]), planted[key], quality=92)
    for i, source in enumerate(grape[6:8]):
        _save(np.ascontiguousarray(decode_image(source)[:, ::-1]), root / "Mango___healthy" / f"mango{i}.JPG")
    shutil.copy2(scab[2], planted["extra"])
    (root / "Squash___Powdery_mildew").mkdir()  # empty class folder
    return planted


@pytest.fixture(scope="module")
def base_cfg() -> DictConfig:
    return compose(*data_overrides(Path("/unused")), task_name="data")


def _cfg(base: DictConfig, source: Path, root: Path, **data: object) -> DictConfig:
    cfg = OmegaConf.create(OmegaConf.to_container(base))
    cfg.data.source = str(source)
    cfg.data.raw_dir = str(root / "raw")
    cfg.data.processed_dir = str(root / "processed")
    for key, value in data.items():
        OmegaConf.update(cfg.data, key, value)
    return cfg


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, base_cfg: DictConfig) -> dict:
    root = tmp_path_factory.mktemp("prepare")
    planted = build_raw(root / "source")
    cfg = _cfg(base_cfg, root / "source", root)
    download(cfg)
    processed = prepare(cfg)
    raw = Path(cfg.data.raw_dir).resolve()
    by_role = {k: (raw / v.relative_to(root / "source")).resolve() for k, v in planted.items()}
    return {"cfg": cfg, "root": root, "processed": processed, "raw": raw, "planted": by_role}


def _rejections(processed: Path) -> dict[str, str]:
    return {r["path"]: r["reason"] for r in json.loads((processed / "rejected.json").read_text())}


def test_bad_files_are_rejected_with_reasons(built: dict) -> None:
    rejected = _rejections(built["processed"])
    rel = {k: v.relative_to(built["raw"]).as_posix() for k, v in built["planted"].items()}
    assert rejected[rel["corrupt"]] == "not_an_image"
    assert rejected[rel["truncated"]] == "corrupt"
    assert rejected[rel["non_image"]] == "not_an_image"
    assert rejected[rel["tiny"]] == "too_small"
    assert rejected[rel["exact_copy"]] == "duplicate"
    assert rejected[rel["conflict_a"]] == rejected[rel["conflict_b"]] == "conflicting_labels"
    assert rejected["Squash___Powdery_mildew"] == "empty_class_folder"
    # Every rejection is also in stats.json and in the readable report.
    stats = json.loads((built["processed"] / "stats.json").read_text())
    report = (built["processed"] / "report.md").read_text()
    assert stats["rejected"]["total"] == len(rejected)
    assert all(f"`{path}`" in report for path in rejected)


def test_manifest_accounts_for_every_file(built: dict) -> None:
    manifest = load_manifest(built["processed"])
    files = [p for p in built["raw"].rglob("*") if p.is_file() and not p.name.startswith(".")]
    rejected = _rejections(built["processed"])
    assert len(manifest) + sum(1 for r in rejected.values() if r != "empty_class_folder") == len(files)
    assert set(manifest.columns) >= {
        "path",
        "label",
        "label_id",
        "split",
        "sha256",
        "group",
        "width",
        "height",
    }
    assert all(Path(p).is_file() for p in manifest["path"])
    # Grayscale and RGBA are converted, not rejected.
    kept = set(manifest["path"])
    assert {str(built["planted"]["grayscale"]), str(built["planted"]["rgba"])} <= kept
    gray = manifest[manifest["path"] == str(built["planted"]["grayscale"])].iloc[0]
    assert (gray["width"], gray["height"]) == (256, 256)


def test_no_hash_or_group_straddles_splits(built: dict) -> None:
    manifest = load_manifest(built["processed"])
    assert manifest["sha256"].is_unique
    assert (manifest.groupby("group")["split"].nunique() == 1).all()
    group = dict(zip(manifest["path"], manifest["group"], strict=True))
    planted = {k: str(v) for k, v in built["planted"].items()}
    first = str(built["raw"] / "Apple___Apple_scab" / _sample_files("Apple___Apple_scab")[0].name)
    assert group[planted["near_copy"]] == group[first], "re-encoded copy must join the original's group"
    assert group[planted["series_a"]] == group[planted["series_b"]], "series neighbours must be one leaf"
    assert group[planted["series_far"]] != group[planted["series_a"]]
    stats = json.loads((built["processed"] / "stats.json").read_text())
    assert stats["dedup"]["near_duplicate_pairs"] >= 1
    assert stats["dedup"]["exact_duplicates_removed"] == 1


def test_classes_json_declares_the_whole_taxonomy(built: dict) -> None:
    classes = load_classes(built["processed"])
    taxonomy = list(built["cfg"].data.taxonomy)
    assert len(taxonomy) == 38
    assert [c["name"] for c in classes[:38]] == taxonomy
    assert [c["name"] for c in classes[38:]] == ["Mango___healthy"]  # outside the taxonomy: appended
    assert [c["id"] for c in classes] == list(range(39))
    manifest = load_manifest(built["processed"])
    counts = Counter(manifest["label"])
    assert all(c["count"] == counts.get(c["name"], 0) for c in classes)
    assert (manifest["label_id"] == manifest["label"].map({c["name"]: c["id"] for c in classes})).all()
    scab = classes[0]
    assert scab | {"count": 0} == {
        "id": 0, "name": "Apple___Apple_scab", "crop": "Apple", "disease": "Apple scab",
        "healthy": False, "display_name": "Apple — Apple scab", "count": 0,
    }  # fmt: skip
    assert classes[taxonomy.index("Tomato___healthy")]["healthy"] is True


def test_train_mean_std_match_the_train_pixels(built: dict) -> None:
    manifest = load_manifest(built["processed"])
    train = np.concatenate(
        [decode_image(p).reshape(-1, 3) for p in manifest[manifest["split"] == "train"]["path"]]
    )
    stats = json.loads((built["processed"] / "stats.json").read_text())
    np.testing.assert_allclose(stats["mean"], train.mean(axis=0) / 255.0, atol=1e-5)
    np.testing.assert_allclose(stats["std"], train.std(axis=0) / 255.0, atol=1e-5)
    split_counts = Counter(manifest["split"])
    assert stats["splits"] == {s: split_counts[s] for s in ("train", "val", "test")}


def test_same_seed_same_split_other_seed_other_split(built: dict, base_cfg: DictConfig) -> None:
    root = built["root"]
    same = prepare(_cfg(base_cfg, root / "source", root, processed_dir=str(root / "same")))
    other = prepare(
        _cfg(base_cfg, root / "source", root, processed_dir=str(root / "other"), **{"split.seed": 7})
    )
    first = pd.read_csv(built["processed"] / "manifest.csv")
    assert first.equals(pd.read_csv(same / "manifest.csv"))
    second = pd.read_csv(other / "manifest.csv")
    assert (first["path"] == second["path"]).all()
    assert (first["split"] != second["split"]).any()


def test_every_class_gets_its_stratified_share() -> None:
    rng = np.random.default_rng(0)
    labels, groups = [], []
    for c, n_groups in enumerate([40, 90, 200, 3]):
        for g in range(n_groups):
            size = int(rng.choice([1, 1, 1, 2, 3]))
            labels += [f"c{c}"] * size
            groups += [f"c{c}-g{g}"] * size
    splits = split_groups(labels, groups, val=0.15, test=0.15, seed=3)
    table = pd.crosstab(pd.Series(labels, name="label"), pd.Series(splits, name="split"))
    shares = table.div(table.sum(axis=1), axis=0)
    for label in ("c0", "c1", "c2"):
        assert shares.loc[label, "val"] == pytest.approx(0.15, abs=0.04)
        assert shares.loc[label, "test"] == pytest.approx(0.15, abs=0.04)
    assert (table.loc["c3"] > 0).all(), "a class of three groups still reaches every split"
    leaks = pd.DataFrame({"g": groups, "s": splits}).groupby("g")["s"].nunique()
    assert (leaks == 1).all()


def test_every_split_gets_the_same_mix_of_single_and_multi_photo_leaves() -> None:
    # Half the leaves have one photo, half have four (20 % of the images are single photos). Filling the split
    # with the largest shortfall sent the four-photo leaves to train: 9 % single photos there, 47 % in val and
    # test (harder, so their scores would not represent the data). Relative fill keeps every split at 20 %.
    labels, groups = [], []
    for c in range(3):
        for g in range(120):
            size = 1 if g % 2 else 4
            labels += [f"c{c}"] * size
            groups += [f"c{c}-g{g}"] * size
    sizes = pd.Series(groups).map(pd.Series(groups).value_counts())
    splits = pd.Series(split_groups(labels, groups, val=0.15, test=0.15, seed=0))
    overall = (sizes == 1).mean()
    for split in ("train", "val", "test"):
        assert (sizes[splits == split] == 1).mean() == pytest.approx(overall, abs=0.05), split


def test_group_kfold_scores_every_item_once_without_splitting_a_leaf() -> None:
    rng = np.random.default_rng(1)
    labels, groups = [], []
    for c, n_groups in enumerate([40, 90, 60]):
        for g in range(n_groups):
            size = int(rng.choice([1, 1, 2, 4]))
            labels += [f"c{c}"] * size
            groups += [f"c{c}-g{g}"] * size
    folds = group_kfold(labels, groups, folds=5, seed=0)
    frame = pd.DataFrame({"label": labels, "group": groups, "fold": folds})
    assert sorted(frame["fold"].unique()) == [0, 1, 2, 3, 4]
    assert (frame.groupby("group")["fold"].nunique() == 1).all()
    shares = pd.crosstab(frame["label"], frame["fold"], normalize="index")
    assert ((shares - 0.2).abs() < 0.06).all().all()
    assert group_kfold(labels, groups, folds=5, seed=0) == folds
    with pytest.raises(ValueError, match="folds must be between 2"):
        group_kfold(labels, groups, folds=1, seed=0)


def test_training_folds_of_a_learning_curve_use_each_fold_equally_and_never_the_held_out_one() -> None:
    assert training_folds(2, 5) == [3, 4, 0, 1]
    for count in (1, 2, 3, 4):
        chosen = [training_folds(held_out, 5, count) for held_out in range(5)]
        assert all(len(c) == len(set(c)) == count and h not in c for h, c in enumerate(chosen))
        # Every fold trains `count` of the 5 models, so no fold's leaves weigh more in the curve.
        assert sorted(f for c in chosen for f in c) == sorted(list(range(5)) * count)
    with pytest.raises(ValueError, match="count must be between 1 and 4"):
        training_folds(0, 5, 5)
    with pytest.raises(ValueError, match="held_out must be between 0 and 4"):
        training_folds(5, 5)


def test_prepared_sample_has_every_class_in_every_split(prepared_root: Path) -> None:
    manifest = load_manifest(prepared_root / "processed")
    assert len(manifest) == 272 and manifest["label"].nunique() == 34
    assert (manifest.groupby("label")["split"].nunique() == 3).all()
    assert (manifest.groupby("group")["split"].nunique() == 1).all()
    assert len(load_classes(prepared_root / "processed")) == 38


def test_scan_picks_the_colour_variant(tmp_path: Path) -> None:
    for variant in ("color", "grayscale", "segmented"):
        for label in CLASSES[:2]:
            (tmp_path / "pv" / variant / label).mkdir(parents=True)
    found = scan_class_folders(tmp_path, variant="color")
    assert [name for _, name in found] == sorted(CLASSES[:2])
    assert all(path.parent.name == "color" for path, _ in found)
    assert {p.parent.name for p, _ in scan_class_folders(tmp_path, "segmented")} == {"segmented"}
    with pytest.raises(ValueError, match="no 'infrared'"):
        scan_class_folders(tmp_path, variant="infrared")
    with pytest.raises(ValueError, match="no Crop___Disease"):
        scan_class_folders(tmp_path / "pv" / "color" / CLASSES[0])


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("65c52553-6152-46d4-a576-3ef4984a6ad4___FREC_Scab 3524.JPG", ("frec_scab", 3524)),
        ("x___RS_NLB 3787 copy.jpg", ("rs_nlb", 3787)),
        ("x___R.S_HL 7942 copy 2.jpg", ("r.s_hl", 7942)),
        ("x___GH_HL Leaf 308.1.JPG", ("gh_hl leaf", 308)),
        ("black_rot1001.jpg", ("black_rot", 1001)),
        ("x___UF.GRC_YLCV_Lab 09617.JPG", ("uf.grc_ylcv_lab", 9617)),
        ("leaf photo.png", None),
    ],
)
def test_parse_series(name: str, expected: tuple[str, int] | None) -> None:
    assert parse_series(name) == expected


def test_series_runs_are_anchored_not_chained() -> None:
    # 10, 11, 12, 13, 14 with window 3: a chain would join all five; anchored runs stop at 13.
    assert series_runs([(n, n) for n in (10, 11, 12, 13, 14, 30)], window=3) == [[10, 11, 12, 13], [14], [30]]


def test_near_duplicate_pairs_match_brute_force() -> None:
    rng = np.random.default_rng(1)
    hashes = rng.integers(0, 2**63, 300, dtype=np.uint64)
    hashes[50] = hashes[7] ^ np.uint64(0b1011)  # 3 bits apart
    hashes[120] = hashes[7] ^ np.uint64(0xFF)  # 8 bits apart
    expected = {
        (i, j)
        for i in range(300)
        for j in range(i + 1, 300)
        if bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= 6
    }
    assert set(near_duplicate_pairs(hashes, 6)) == expected
    assert (7, 50) in expected and (7, 120) not in expected


def test_missing_raw_dir_is_a_clear_error(base_cfg: DictConfig, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="leaflens data download"):
        prepare(_cfg(base_cfg, tmp_path, tmp_path))


def test_resized_cache_is_written_once_and_read_by_the_dataset(built: dict, tmp_path: Path) -> None:
    rows = load_manifest(built["processed"]).head(6)
    paths, hashes = [Path(p) for p in rows["path"]], rows["sha256"].tolist()
    assert write_cache(paths, hashes, tmp_path, size=128) == 6
    assert write_cache(paths, hashes, tmp_path, size=128) == 0  # already cached
    dataset = ManifestDataset(
        rows["path"].tolist(),
        rows["label_id"].tolist(),
        transform=lambda image: {"image": image},
        sha256s=hashes,
        cache_dir=tmp_path,
    )
    for index, path in enumerate(paths):
        image, label = dataset[index]
        original = decode_image(path)
        # The dataset hands back a tensor (uint8 here: the identity transform does not normalise).
        assert image.dtype == torch.uint8 and min(image.shape[:2]) == 128 < min(original.shape[:2])
        assert label == rows["label_id"][index]
