"""LiTS / KiTS converters on small release layouts built from the real CT in ../shared/data/ct."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_tpp.cli import main
from nnunet_tpp.data.converters import convert, label_values
from nnunet_tpp.data.nnunet_raw import DatasetError
from tests.conftest import CT_IMAGE, CT_LABELS, require


def _ct():
    return sitk.ReadImage(str(require(CT_IMAGE))), sitk.ReadImage(str(require(CT_LABELS)))


def _snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_lits_challenge_layout(tmp_path):
    image, labels = _ct()
    src = tmp_path / "LiTS" / "Training Batch 1"
    src.mkdir(parents=True)
    for n in (0, 3):
        sitk.WriteImage(image, str(src / f"volume-{n}.nii"))
        sitk.WriteImage(labels, str(src / f"segmentation-{n}.nii"))  # 1 liver, 2 (kidney) stands in for tumor
    before = _snapshot(tmp_path / "LiTS")
    folder = convert("lits", tmp_path / "LiTS", tmp_path / "raw", 3)
    info = json.loads((folder / "dataset.json").read_text())
    assert info["labels"] == {"background": 0, "liver": 1, "tumor": 2} and info["numTraining"] == 2
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == ["lits000_0000.nii.gz", "lits003_0000.nii.gz"]
    assert label_values(folder / "labelsTr" / "lits003.nii.gz") == [0, 1, 2]
    assert _snapshot(tmp_path / "LiTS") == before


def test_msd_task03_layout(tmp_path):
    image, labels = _ct()
    for sub in ("imagesTr", "labelsTr"):
        (tmp_path / "Task03_Liver" / sub).mkdir(parents=True)
    sitk.WriteImage(image, str(tmp_path / "Task03_Liver" / "imagesTr" / "liver_7.nii.gz"))
    sitk.WriteImage(labels, str(tmp_path / "Task03_Liver" / "labelsTr" / "liver_7.nii.gz"))
    folder = convert("lits", tmp_path / "Task03_Liver", tmp_path / "raw", 4, name="MSDLiver")
    assert folder.name == "Dataset004_MSDLiver"
    assert (folder / "labelsTr" / "liver007.nii.gz").exists()


def test_kits_layouts_with_cyst_and_bad_cases_reported_by_name(tmp_path):
    image, labels = _ct()
    arr = sitk.GetArrayFromImage(labels)
    with_cyst = sitk.GetImageFromArray(np.where(arr == 1, 3, arr).astype(np.uint8))  # liver voxels as "cyst"
    with_cyst.CopyInformation(labels)
    for n, seg_name, seg in ((0, "segmentation.nii.gz", labels), (1, "aggregated_MAJ_seg.nii.gz", with_cyst)):
        case = tmp_path / "kits" / f"case_{n:05d}"
        case.mkdir(parents=True)
        sitk.WriteImage(image, str(case / "imaging.nii.gz"))
        sitk.WriteImage(seg, str(case / seg_name))
    bad = tmp_path / "kits" / "case_00002"
    bad.mkdir()
    (bad / "imaging.nii.gz").write_bytes(b"corrupt")
    (bad / "segmentation.nii.gz").write_bytes(b"corrupt")
    small = tmp_path / "kits" / "case_00003"
    small.mkdir()
    sitk.WriteImage(image, str(small / "imaging.nii.gz"))
    sitk.WriteImage(labels[:, :, :50], str(small / "segmentation.nii.gz"))

    with pytest.raises(DatasetError) as err:
        convert("kits", tmp_path / "kits", tmp_path / "raw", 5)
    assert "kits00002" in str(err.value) and "kits00003" in str(err.value) and "does not match" in str(err.value)
    assert not (tmp_path / "raw").exists()

    assert main(["convert", "kits", str(tmp_path / "kits"), "-d", "5", "--raw", str(tmp_path / "raw"),
                 "--skip-invalid"]) == 0
    folder = tmp_path / "raw" / "Dataset005_KiTS"
    info = json.loads((folder / "dataset.json").read_text())
    assert info["labels"] == {"background": 0, "kidney": 1, "tumor": 2, "cyst": 3} and info["numTraining"] == 2
    assert set(json.loads((folder / "skipped_cases.json").read_text())) == {"kits00002", "kits00003"}


def test_empty_source_names_the_expected_layout(tmp_path):
    with pytest.raises(DatasetError, match="volume-N.nii"):
        convert("lits", tmp_path, tmp_path / "raw", 6)


# --- a dataset id is used once (issue 15) ------------------------------------------------------------------------

def _hashes(*folders):
    """Every file under the folders (and every folder) with a hash of its bytes."""
    import hashlib
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for f in folders for p in sorted(f.rglob("*"))}


@pytest.fixture
def lits_source(tmp_path):
    """A LiTS challenge layout of one case from the real CT."""
    image, labels = _ct()
    src = tmp_path / "LiTS"
    src.mkdir()
    sitk.WriteImage(image, str(src / "volume-1.nii"))
    sitk.WriteImage(labels, str(src / "segmentation-1.nii"))
    return src


def test_a_taken_dataset_id_is_refused_naming_the_folder(tmp_path, lits_source, capsys):
    raw = tmp_path / "raw"
    other = raw / "Dataset990_Other"
    (other / "imagesTr").mkdir(parents=True)
    (other / "dataset.json").write_text('{"name": "Other"}')
    (other / ".written_by_nnunet_tpp").touch()  # even one of ours: another name is another dataset
    before = _hashes(raw, lits_source)
    for extra in ([], ["--overwrite"]):
        assert main(["convert", "lits", str(lits_source), "-d", "990", "--raw", str(raw), *extra]) == 2
        err = capsys.readouterr().err
        assert "dataset id 990 is taken" in err and str(other) in err and "Pick a free id with -d" in err
        assert _hashes(raw, lits_source) == before


def test_a_taken_id_in_nnunet_preprocessed_counts_too(tmp_path, lits_source, monkeypatch, capsys):
    (tmp_path / "pre" / "Dataset991_Old").mkdir(parents=True)
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    assert main(["convert", "lits", str(lits_source), "-d", "991", "--raw", str(tmp_path / "raw")]) == 2
    assert "Dataset991_Old" in capsys.readouterr().err
    assert not (tmp_path / "raw").exists()


def test_overwrite_replaces_only_our_dataset_of_the_same_id_and_name(tmp_path, lits_source, capsys):
    raw = tmp_path / "raw"
    folder = convert("lits", lits_source, raw, 992)
    assert folder.name == "Dataset992_LiTS"
    before = _hashes(raw)
    with pytest.raises(DatasetError, match="exists; pass --overwrite"):
        convert("lits", lits_source, raw, 992)
    assert _hashes(raw) == before
    (folder / "notes.txt").write_text("stale")
    assert main(["convert", "lits", str(lits_source), "-d", "992", "--raw", str(raw), "--overwrite"]) == 0
    assert not (folder / "notes.txt").exists() and (folder / "labelsTr" / "lits001.nii.gz").exists()
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset992_LiTS"]  # no temporary folder left
    (folder / ".written_by_nnunet_tpp").unlink()  # now it looks like someone else's dataset
    before = _hashes(raw)
    assert main(["convert", "lits", str(lits_source), "-d", "992", "--raw", str(raw), "--overwrite"]) == 2
    assert "was not written by nnunet_tpp; refusing to overwrite it" in capsys.readouterr().err
    assert _hashes(raw) == before
