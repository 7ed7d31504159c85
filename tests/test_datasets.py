from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, make_affine, save

from brainbag.errors import InputError, UsageError
from brainbag.image.io import load_image
from brainbag.image.preprocess import conform
from brainbag.train.datasets import (
    ImageRecord,
    centre_start,
    crop_range,
    discover,
    load_volume,
    random_split,
    read_split_source,
    splits_tsv,
)

REPO = Path(__file__).resolve().parents[1]


def _brain(path: Path, shape=(20, 22, 18), seed=0, affine=None) -> Path:
    rng = np.random.default_rng(seed)
    data = np.zeros(shape, np.float32)
    data[4:-4, 5:-5, 3:-3] = rng.uniform(50, 150, [n - k for n, k in zip(shape, (8, 10, 6),
                                                                           strict=True)])
    path.parent.mkdir(parents=True, exist_ok=True)
    return save(data, make_affine() if affine is None else affine, path)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_participants_table_paths_are_relative_to_the_table(tmp_path: Path) -> None:
    _brain(tmp_path / "d" / "img" / "a.nii.gz")
    _brain(tmp_path / "d" / "img" / "b.nii.gz")
    _brain(tmp_path / "d" / "img" / "b_mask.nii.gz")
    table = _write(tmp_path / "d" / "p.tsv",
                   "participant_id\tage\tsex\tt1w\tmask\n"
                   "A\t30.5\tF\timg/a.nii.gz\t\n"
                   "B\tn/a\tmale\timg/b.nii.gz\timg/b_mask.nii.gz\n")
    source = discover(table)
    a, b = source.records
    assert source.layout == "table" and source.split_source is None
    assert (a.participant_id, a.age, a.sex, a.mask) == ("A", 30.5, "F", None)
    assert a.t1w == tmp_path / "d" / "img" / "a.nii.gz"
    assert (b.age, b.sex, b.mask) == (None, "M", tmp_path / "d" / "img" / "b_mask.nii.gz")


def test_bad_labels_name_the_row(tmp_path: Path) -> None:
    table = _write(tmp_path / "p.tsv", "participant_id\tage\tsex\tt1w\nA\tforty\tF\ta.nii\n")
    with pytest.raises(InputError, match=r"p.tsv, row 2, column 'age': age 'forty' is not"):
        discover(table)
    table = _write(tmp_path / "q.tsv", "participant_id\tage\tsex\tt1w\nA\t40\tX\ta.nii\n")
    with pytest.raises(InputError, match=r"row 2, column 'sex': sex 'X'"):
        discover(table)
    table = _write(tmp_path / "r.tsv", "id\tage\nA\t40\n")
    with pytest.raises(InputError, match="participant_id"):
        discover(table)


def test_bids_folder_with_sessions_and_masks(tmp_path: Path) -> None:
    root = tmp_path / "bids"
    _write(root / "participants.tsv", "participant_id\tage\tsex\nsub-01\t25\tF\nsub-02\t70\tM\n"
                                      "sub-03\t50\tF\n")
    _write(root / "dataset_description.json", '{"Name": "Toy", "License": "CC0"}')
    _brain(root / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    _brain(root / "sub-01" / "anat" / "sub-01_desc-brain_mask.nii.gz")
    _brain(root / "sub-02" / "ses-1" / "anat" / "sub-02_ses-1_T1w.nii.gz")
    _brain(root / "sub-02" / "ses-2" / "anat" / "sub-02_ses-2_T1w.nii")
    source = discover(root)
    assert source.layout == "bids" and source.licence == "CC0"
    assert source.name.startswith("Toy") and "1 listed subjects without a T1w" in source.name
    ids = [(r.participant_id, r.session, r.t1w.name) for r in source.records]
    assert ids == [("sub-01", None, "sub-01_T1w.nii.gz"),
                   ("sub-02", "ses-1", "sub-02_ses-1_T1w.nii.gz"),
                   ("sub-02", "ses-2", "sub-02_ses-2_T1w.nii")]
    assert source.records[0].mask is not None and source.records[0].mask.name.endswith(
        "desc-brain_mask.nii.gz")
    assert source.records[1].age == 70 and source.records[1].sex == "M"


def test_camcan_layout_with_the_shipped_paper_split(tmp_path: Path) -> None:
    split = REPO / "brainbag" / "train" / "recipes" / "splits" / "camcan"
    counts = {name: len((split / f"{name}.csv").read_text().splitlines()) - 1
              for name in ("train", "val", "test")}
    assert counts == {"train": 456, "val": 65, "test": 131}
    assignment = read_split_source(split)
    assert len(assignment) == 652
    # a Cam-CAN folder in the published code's flat layout, holding a few of the subjects
    mini = tmp_path / "split"
    rows = {n: (split / f"{n}.csv").read_text().splitlines() for n in ("train", "val", "test")}
    for name, lines in rows.items():
        _write(mini / f"{name}.csv", "\n".join(lines[:3]) + "\n")
    images = tmp_path / "camcan"
    for lines in rows.values():
        for line in lines[1:3]:
            ccid = line.split(",")[0]
            _brain(images / f"sub-{ccid}_T1w_stripped.nii.gz")
            _brain(images / f"sub-{ccid}_T1w_brain_mask.nii.gz")
    source = discover(images, mini)
    assert source.layout == "camcan" and len(source.records) == 6
    assert source.counts() == {"train": 2, "val": 2, "test": 2}
    first = source.records[0]
    ccid, age, code = rows["train"][1].split(",")[:3]
    assert first.participant_id == ccid and first.age == float(age)
    assert first.sex == {"1": "M", "2": "F"}[code] and first.mask is not None
    (images / f"sub-{ccid}_T1w_stripped.nii.gz").unlink()
    with pytest.raises(InputError, match=f"1 subjects .* no image .*first: {ccid}"):
        discover(images, mini)


def test_camcan_subjects_in_a_bids_tree(tmp_path: Path) -> None:
    split = tmp_path / "split"
    _write(split / "train.csv", "Observations,age,gender_code\nCC110033,24,1\nCC110037,18,2\n")
    _write(split / "val.csv", "Observations,age,gender_code\nCC110045,24,2\n")
    images = tmp_path / "camcan"
    for ccid in ("CC110033", "CC110037", "CC110045"):
        anat = images / f"sub-{ccid}" / "anat"
        _brain(anat / f"sub-{ccid}_T1w.nii.gz")
        if ccid != "CC110037":
            _brain(anat / f"sub-{ccid}_desc-brain_mask.nii.gz")
    source = discover(images, split)
    assert source.layout == "camcan" and source.counts() == {"train": 2, "val": 1, "test": 0}
    by_id = {r.participant_id: r for r in source.records}
    assert by_id["CC110037"].t1w == images / "sub-CC110037" / "anat" / "sub-CC110037_T1w.nii.gz"
    assert by_id["CC110037"].mask is None
    assert by_id["CC110045"].mask == (images / "sub-CC110045" / "anat"
                                      / "sub-CC110045_desc-brain_mask.nii.gz")
    assert by_id["CC110045"].sex == "F" and by_id["CC110033"].age == 24.0


def test_a_subjects_images_stay_on_one_side(tmp_path: Path) -> None:
    records = [ImageRecord(f"s{i // 2}", Path(f"{i}.nii")) for i in range(40)]  # 2 per subject
    split = random_split(records, 0.2, 0.2, seed=3)
    sides: dict[str, set] = {}
    for r in split:
        sides.setdefault(r.participant_id, set()).add(r.split)
    assert all(len(s) == 1 for s in sides.values())
    per = {s: sum(1 for v in sides.values() if s in v) for s in ("train", "val", "test")}
    assert per == {"train": 12, "val": 4, "test": 4}
    assert split == random_split(records, 0.2, 0.2, seed=3)
    assert split != random_split(records, 0.2, 0.2, seed=4)
    with pytest.raises(UsageError):
        random_split(records, 0.6, 0.5, seed=0)


def test_split_files_refuse_a_subject_on_two_sides(tmp_path: Path) -> None:
    split = tmp_path / "split"
    _write(split / "train.csv", "Observations,age\nCC1,30\nCC2,40\n")
    _write(split / "val.csv", "Observations,age\nCC2,40\n")
    with pytest.raises(InputError, match="CC2 is in both train and val"):
        read_split_source(split)
    table = _write(tmp_path / "p.tsv", "participant_id\tage\tsex\tt1w\tsplit\n"
                                       "A\t30\tF\ta.nii\ttrain\nA\t30\tF\tb.nii\ttest\n")
    with pytest.raises(InputError, match="both train and test"):
        discover(table)


def test_splits_tsv_round_trips(tmp_path: Path) -> None:
    records = random_split([ImageRecord(f"sub-{i}", Path(f"/x/{i}.nii"), age=20.0 + i, sex="F")
                            for i in range(10)], 0.2, 0.2, seed=0)
    path = _write(tmp_path / "splits.tsv", splits_tsv(records))
    assignment = read_split_source(path)
    assert assignment == {r.group: r.split for r in records}


@pytest.mark.parametrize("n, size", [(182, 160), (160, 160), (100, 128), (9, 4)])
def test_crop_ranges_reach_every_start(n: int, size: int) -> None:
    lo, hi = crop_range(n, size)
    if n >= size:
        assert (lo, hi) == (0, n - size)  # the last start n - size is reachable; n == size works
    else:
        assert (lo, hi) == (n - size, 0)  # the volume may land anywhere inside the crop
    assert lo <= centre_start(n, size) <= hi


def test_volume_cache_rebuilds_any_view_exactly(tmp_path: Path) -> None:
    path = _brain(tmp_path / "a.nii.gz", shape=(24, 26, 20), affine=make_affine(flips=(-1, 1, 1)))
    record = ImageRecord("a", path)
    volume = load_volume(record)
    full = conform(load_image(path)).image.data
    assert volume.shape == full.shape and volume.data.shape[0] < full.shape[0]
    for start, size in [((0, 0, 0), full.shape), ((3, -2, 5), (16, 16, 16)),
                        ((-4, -4, -4), (32, 34, 28)), ((20, 20, 15), (8, 8, 8))]:
        got = volume.crop(start, size).numpy()
        padded = np.full([n + 2 * 8 for n in full.shape], volume.background, np.float32)
        padded[8:-8, 8:-8, 8:-8] = full
        s = [a + 8 for a in start]
        expected = padded[s[0]:s[0] + size[0], s[1]:s[1] + size[1], s[2]:s[2] + size[2]]
        np.testing.assert_array_equal(got, expected)
    assert volume.crop((0, 0, 0), (4, 4, 4)).dtype == torch.float32


def test_the_ixi_table_is_read_with_its_duplicate_subjects() -> None:
    table = SHARED_DATA / "ixi" / "participants.tsv"
    if not table.exists():
        pytest.skip(f"{table} not available (set BRAINBAG_SHARED_DATA)")
    source = discover(table)
    assert len(source.records) == 59 and len({r.group for r in source.records}) == 57
    assert all(r.t1w.exists() for r in source.records)
    assert sum(r.mask is not None for r in source.records) == 50
    split = random_split(source.records, 0.1, 0.2, seed=42)
    for pid in ("IXI296-HH-1970", "IXI329-HH-1908"):
        assert len({r.split for r in split if r.participant_id == pid}) == 1
