"""Shared fixtures: paths to the real test data in ../shared, small STU-Nets, published-style STU-Net checkpoints,
the left-atrium MRI planned and preprocessed by nnU-Net once per test session, and the initial network of a
seeded nnU-Net run."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

# nnU-Net reads its pool sizes when first imported: the validation pool of in-process trainers (and of the nnU-Net
# commands the tests start) gets this machine's cores, not nnU-Net's default of 8 spawned processes
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: each worker gets its share of the cores
    _SHARE = str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "nnUNet_def_n_proc"):
        os.environ.setdefault(_variable, _SHARE)
os.environ.setdefault("nnUNet_def_n_proc", str(min(8, os.cpu_count() or 1)))

import pytest  # noqa: E402  (after the thread settings, which torch reads when imported)
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NNUNET_TPP_SHARED", REPO.parent / "shared"))
CT_IMAGE = SHARED / "data" / "ct" / "abdomen_ct_001.nii.gz"
CT_LABELS = SHARED / "data" / "ct" / "abdomen_ct_001_labels.nii.gz"
REFERENCE = SHARED / "reference"
PNEUMONIA = SHARED / "data" / "2d" / "pneumoniamnist_balanced.npz"
LA2018 = SHARED / "data" / "mri3d" / "la2018"


def require(path: Path) -> Path:
    """The path, or a test failure that says where the shared data was expected."""
    if not path.exists():
        pytest.fail(f"test data missing: {path} (set NNUNET_TPP_SHARED to the shared/ folder)")
    return path


def balanced_pneumonia_subset(out: Path, sizes: dict[str, int]) -> Path:
    """Writes ``out`` (.npz): the first ``sizes[split]`` images of each split of the shared PneumoniaMNIST file,
    half of each class (the file is sorted by class); returns ``out``."""
    import numpy as np
    data = np.load(require(PNEUMONIA))
    arrays = {}
    for split, n in sizes.items():
        labels = data[f"{split}_labels"].reshape(-1)
        keep = np.concatenate([np.flatnonzero(labels == c)[:n // 2] for c in (0, 1)])
        arrays.update({f"{split}_images": data[f"{split}_images"][keep], f"{split}_labels": labels[keep]})
    np.savez(out, **arrays)
    return out


@pytest.fixture
def tiny_stunet():
    """A factory for small STU-Nets (size S widths, 2 classes) with a fixed seed."""
    from nnunet_tpp.models.stunet import build_stunet

    def make(size: str = "S", channels: int = 1, classes: int = 3, seed: int = 0):
        torch.manual_seed(seed)
        return build_stunet(size, channels, classes)
    return make


@pytest.fixture
def micro_stunet():
    """A factory for very small STU-Nets (the published layout: 6 stages, 5 poolings, depth 1 or 2) for tests that
    train: a step at 16^3 takes milliseconds."""
    from nnunet_tpp.models.stunet import STUNet

    def make(classes: int = 3, seed: int = 0, depth: int = 1, channels: int = 1):
        torch.manual_seed(seed)
        return STUNet(channels, classes, [depth] * 6, [8, 16, 16, 16, 16, 16], [[2, 2, 2]] * 4 + [[1, 1, 1]],
                      size_name="micro")
    return make


def write_v1_checkpoint(path: Path, size: str = "S", seed: int = 0) -> dict:
    """Writes a published-style nnU-Net v1 ``.model`` file of random STU-Net weights (105 classes, DDP prefix,
    numpy scalars in ``plot_stuff``) to ``path``; returns its backbone tensors (heads left out) by our key names."""
    import numpy as np
    from nnunet_tpp.models.stunet import build_stunet
    torch.manual_seed(seed)
    net = build_stunet(size, 1, 105)
    torch.save({"epoch": 1000, "state_dict": {"module." + k: v for k, v in net.state_dict().items()},
                "optimizer_state_dict": None, "plot_stuff": ([np.float64(1.0)], [np.float64(0.9)], [], [])}, path)
    return {k: v for k, v in net.state_dict().items() if not k.startswith("seg_outputs")}


LA_DATASET = 701
LA_LABELS = {"background": 0, "left_atrium": 1}


@dataclass
class LAWorkspace:
    """nnU-Net folders holding the LA 2018 MRI subset planned and preprocessed (``Dataset701_LA``).

    Attributes:
        folders: the nnU-Net raw / preprocessed / results folders (tests give each run its own results folder).
        env: the environment of the nnU-Net commands (folders set; one data-augmentation process).
        test_images, test_labels: the held-out cases (never trained on): ``imagesTs`` and their label maps.
        log: the commands' log file.
    """

    folders: object
    env: dict
    test_images: Path
    test_labels: Path
    log: Path

    def results_env(self, results: Path, **extra: str) -> dict:
        """The environment with its own ``nnUNet_results`` folder (so that tests never share a model folder)."""
        return dict(self.env, nnUNet_results=str(results), **extra)


@pytest.fixture(scope="session")
def la_nnunet(tmp_path_factory) -> LAWorkspace:
    """:func:`make_la_workspace`, once per test session: under pytest-xdist the first worker that needs it builds it
    in the session's shared temporary folder (under a file lock) and the others read it (the tests only read it)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return make_la_workspace(tmp_path_factory.mktemp("la2018"))
    from filelock import FileLock
    root = tmp_path_factory.getbasetemp().parent / "la2018"  # basetemp is <session>/popen-gwN
    with FileLock(f"{root}.lock"):
        if (root / "built").exists():
            return make_la_workspace(root, build=False)
        if root.exists():  # a worker that died while building
            import shutil
            shutil.rmtree(root)
        root.mkdir()
        workspace = make_la_workspace(root)
        (root / "built").touch()
        return workspace


def make_la_workspace(root: Path, build: bool = True) -> LAWorkspace:
    """The left atrium (LA 2018, real MRI, 1.25 mm) in nnU-Net: 12 training cases and 6 held-out test cases,
    ``nnUNetv2_plan_and_preprocess`` at 2.5 mm (``-overwrite_target_spacing``), in the folder ``root``.

    The plan's 3d_fullres configuration is then edited to a 32^3 patch with four 2x2x2 poolings (nnU-Net planned
    24 x 40 x 48 with three, leaving STU-Net's two deepest stages unpooled at 256-512 channels): STU-Net reads its
    pool sizes from the plan, and a step of STU-Net-S on 2 CPU cores takes about a second. The cases are cropped
    around the atrium (about 22 x 36 x 48 voxels at 2.5 mm), so the patch covers most of a case. ``build=False``:
    the workspace an earlier call built in ``root``, nothing run."""
    from nnunet_tpp.data.nnunet_raw import Case, write_raw_dataset
    from nnunet_tpp.nnunet_commands import NNUNetFolders, run_nnunet
    folders = NNUNetFolders(root)
    if not build:
        return LAWorkspace(folders, folders.env(), folders.raw / f"Dataset{LA_DATASET}_LA" / "imagesTs",
                           root / "test_labels", root / "log.txt")
    folders.make()
    names = sorted(p.name[:-len(".nii.gz")] for p in require(LA2018).glob("la_*.nii.gz")
                   if not p.name.endswith("_labels.nii.gz"))
    cases = [Case(n, LA2018 / f"{n}.nii.gz", LA2018 / f"{n}_labels.nii.gz") for n in names]
    train, test = cases[:12], cases[-6:]
    raw = write_raw_dataset(folders.raw, LA_DATASET, "LA", train, LA_LABELS, channel_name="MRI",
                            test=[Case(c.name, c.image) for c in test])
    test_labels = root / "test_labels"
    test_labels.mkdir()
    for case in test:
        sitk_copy_label(case.label, test_labels / f"{case.name}.nii.gz")
    env = folders.env()
    log = root / "log.txt"
    run_nnunet(["nnUNetv2_plan_and_preprocess", "-d", LA_DATASET, "-c", "3d_fullres", "-np", "1", "-npfp", "1",
                "-overwrite_target_spacing", "2.5", "2.5", "2.5"], env, log, echo=lambda _: None)
    plans_file = next(folders.preprocessed.rglob("nnUNetPlans.json"))
    plans = json.loads(plans_file.read_text())
    config = plans["configurations"]["3d_fullres"]
    stages = 5
    config["patch_size"] = [32, 32, 32]
    config["architecture"]["arch_kwargs"].update(
        n_stages=stages, features_per_stage=[32, 64, 128, 256, 320], kernel_sizes=[[3, 3, 3]] * stages,
        strides=[[1, 1, 1]] + [[2, 2, 2]] * (stages - 1), n_conv_per_stage=[2] * stages,
        n_conv_per_stage_decoder=[2] * (stages - 1))
    plans_file.write_text(json.dumps(plans, indent=2))
    return LAWorkspace(folders, env, raw / "imagesTs", test_labels, log)


def sitk_copy_label(src: Path, dst: Path) -> None:
    """Copies a label map as uint8 NIfTI (the way the raw dataset's labels are written)."""
    import SimpleITK as sitk
    sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(src)), sitk.sitkUInt8), str(dst), useCompression=True)


def assert_pretext_moved_its_target_parameters(result: dict, model_folder, trainer_name: str, seed: int) -> None:
    """The pretext stage's target parameters (``result``, a target-parameter file's content) against their initial
    values in the run (``NNUNET_TPP_SEED=seed``, rebuilt by :func:`nnunet_tpp.trainers.restore.initial_network`):
    every tensor
    the DINO loss reaches (encoder stages up to the deepest pooled one) moved by more than float32 rounding of its
    values (4 eps); every other one is bit for bit its initial value (which shows the rebuilt values are the run's)."""
    from nnunet_tpp.peft import target_parameters
    from nnunet_tpp.pretext.stage import EncoderEmbedding
    from nnunet_tpp.trainers.recipe import TrainerRecipe
    from nnunet_tpp.trainers.restore import initial_network
    initial = initial_network(model_folder, trainer_name, seed)
    start = {name: p.detach() for name, p in target_parameters(initial).items()}
    assert set(result["target_parameters"]) == set(start)
    reached = EncoderEmbedding(initial, tuple(TrainerRecipe().pretext_feature_stages)).reached(start)
    assert reached and reached != set(start)
    for name, value in result["target_parameters"].items():
        if name in reached:
            change = (value - start[name]).abs().max().item()
            # 4 float32 eps of the values: DINO keeps the EMA teacher (momentum 0.996), which moves by about
            # (1 - 0.996) x lr = 2e-6 per Adam step of the student (measured 3.5e-6 after two steps)
            assert change > 4 * torch.finfo(torch.float32).eps * start[name].abs().max().item(), (name, change)
        else:
            assert torch.equal(value, start[name]), name
