"""``nnunet-tpp tpp-probe --data DIR``: does the 3-D TPP pretext stage change the encoder's representation, and
does it carry over to cases the stage and the probe were not trained on? A linear probe across cases, with seeds.

The cases (``DIR/NAME.nii.gz`` + ``DIR/NAME_labels.nii.gz``, the demo layout; e.g. ``../shared/data/mri3d/chaos_t2``)
are resampled to ``spacing`` and z-scored per volume (nnU-Net's MRI normalisation). Per seed, the cases are shuffled
and split: ``test_share`` of them are *test cases*, the rest *training cases*. Views of ``view`` voxels are centred
on voxels of each label (background only inside the body: z-scored intensity above 0), ``per_class`` per label and
case; the label of a view is the structure at its centre. A logistic regression (standardised features, L2 strength
by 3-fold cross-validation) is trained on the views of the training cases and scored on those of the test cases.

The features are the pooled encoder stages the DINO head sees (:class:`~nnunet_tpp.pretext.stage.EncoderEmbedding`:
per-channel max and mean of ``feature_stages``). The arms, per seed:

* ``random init``: a randomly initialised STU-Net;
* ``pre-trained``: the pre-trained backbone (``backbone``: a published STU-Net checkpoint; without one a stand-in is
  made here: STU-Net trained for ``upstream_steps`` supervised steps on procedurally generated phantoms,
  :mod:`nnunet_tpp.data.phantom`, other images than the data);
* ``+ PEFT at init``: the pre-trained backbone with the PEFT method at its initialisation;
* ``+ TPP DINO`` / ``+ TPP masked``: after the pretext stage (``epochs`` x ``iterations``, batch ``batch``) on the
  training cases only, from that same initialisation;
* ``head-only control``: after the masked stage with the target parameters frozen (only its output layer trains):
  the encoder cannot change, so its row must equal ``+ PEFT at init`` (a check that the control touches nothing
  the probe sees).

What it shows: whether the features a TPP stage leaves separate the structures of unseen cases better or worse
than before the stage, and by how much against the spread over seeds. What it does not show: segmentation quality
after fine-tuning (the supervised stage trains the target parameters further, and the heads), or a published
backbone's behaviour (unless ``--backbone`` gives one).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_tpp import peft
from nnunet_tpp.pretext.probe_settings import ProbeConfig

POOLS = [[1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 1, 1]]  # divisor (4, 16, 16) along (z, y, x)
ARMS = ("random init", "pre-trained", "+ PEFT at init", "+ TPP DINO", "+ TPP masked", "head-only control")


class Cases:
    """Volumes standing in for nnU-Net's preprocessed dataset (``load_case``)."""

    def __init__(self, volumes: dict[str, np.ndarray]):
        self.volumes = volumes

    def load_case(self, identifier):
        return self.volumes[identifier], None, None, {}


def read_cases(folder: str, spacing, max_cases: int | None = None) -> tuple[dict, dict]:
    """``({name: (1, Z, Y, X) z-scored float32}, {name: (Z, Y, X) int labels})`` of the demo-layout folder,
    resampled to ``spacing`` (z, y, x; linear for images, nearest for labels) with SimpleITK."""
    import SimpleITK as sitk
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"tpp-probe: --data {folder!r} is not a folder")
    names = sorted(p.name[:-len("_labels.nii.gz")] for p in root.glob("*_labels.nii.gz")
                   if (root / p.name.replace("_labels.nii.gz", ".nii.gz")).is_file())
    if len(names) < 3:
        raise ValueError(f"tpp-probe: {folder} holds {len(names)} cases (NAME.nii.gz + NAME_labels.nii.gz); the "
                         f"probe needs at least 3 (training and test cases)")
    names = names[:max_cases] if max_cases else names
    images, labels = {}, {}
    for name in names:
        image, label = sitk.ReadImage(str(root / f"{name}.nii.gz")), sitk.ReadImage(str(root / f"{name}_labels.nii.gz"))
        image, label = _resample(image, spacing, sitk.sitkLinear), _resample(label, spacing, sitk.sitkNearestNeighbor)
        array = sitk.GetArrayFromImage(image).astype(np.float32)
        images[name] = ((array - array.mean()) / max(float(array.std()), 1e-6))[None]
        labels[name] = sitk.GetArrayFromImage(label).astype(np.int64)
    return images, labels


def _resample(image, spacing, interpolator):
    import SimpleITK as sitk
    new_spacing = [float(s) for s in reversed(spacing)]  # SimpleITK: (x, y, z)
    size = [max(1, int(round(n * o / s))) for n, o, s in zip(image.GetSize(), image.GetSpacing(), new_spacing)]
    return sitk.Resample(image, size, sitk.Transform(), interpolator, image.GetOrigin(), new_spacing,
                         image.GetDirection(), 0, image.GetPixelID())


def probe_views(labels: np.ndarray, image: np.ndarray, view, per_class: int, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray]:
    """Centres ``(N, 3)`` and labels ``(N,)``: up to ``per_class`` voxels of each label whose ``view`` fits the
    volume (background: inside the body, ``image`` > 0)."""
    half = [v // 2 for v in view]
    inner = np.zeros(labels.shape, dtype=bool)
    inner[tuple(slice(h, s - (v - h) + 1) for h, s, v in zip(half, labels.shape, view))] = True
    centres, ys = [], []
    for c in np.unique(labels):
        idx = np.argwhere((labels == c) & inner & ((image > 0) if c == 0 else True))
        if len(idx):
            centres.append(idx[rng.choice(len(idx), min(per_class, len(idx)), replace=False)])
            ys.append(np.full(len(centres[-1]), int(c)))
    if not centres:
        return np.zeros((0, 3), dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(centres), np.concatenate(ys)


@torch.no_grad()
def view_features(net, volume: np.ndarray, centres: np.ndarray, view, stages, batch: int = 8) -> np.ndarray:
    """Pooled encoder features (:class:`EncoderEmbedding`) of the views at ``centres``."""
    from nnunet_tpp.pretext.stage import EncoderEmbedding
    embedding = EncoderEmbedding(net, tuple(stages))
    net.eval()
    out = []
    for i in range(0, len(centres), batch):
        crops = [volume[(slice(None),) + tuple(slice(c - v // 2, c - v // 2 + v) for c, v in zip(centre, view))]
                 for centre in centres[i:i + batch]]
        out.append(embedding(torch.from_numpy(np.stack(crops)).float()).numpy())
    return np.concatenate(out)


def linear_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                 seed: int = 0) -> float:
    """Test accuracy of a logistic regression (standardised features, L2 strength by 3-fold cross-validation)."""
    import warnings
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    model = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=[1e-3, 1e-2, 1e-1, 1.0, 10.0], cv=3,
                                                                 max_iter=5000, random_state=seed))
    with warnings.catch_warnings():  # (scikit-learn's announcements of changed defaults)
        warnings.simplefilter("ignore", FutureWarning)
        model.fit(x_train, y_train)
    return float((model.predict(x_test) == y_test).mean())


def _stunet(cfg: ProbeConfig, seed: int):
    from nnunet_tpp.models.stunet import STUNet, build_stunet
    torch.manual_seed(seed)
    if cfg.dims:
        return STUNet(1, 4, [1] * 6, list(cfg.dims), POOLS, enable_deep_supervision=False)
    return build_stunet(cfg.size, 1, 4, POOLS, enable_deep_supervision=False)


def upstream_pretrain(cfg: ProbeConfig, path: Path, log: Callable[[str], None]) -> Path:
    """A small pre-trained STU-Net: ``upstream_steps`` supervised steps (Adam 1e-3, cross-entropy, batch 2,
    ``upstream_patch``^3 patches, half of them centred on an organ) on ``upstream_cases`` phantoms (labels
    background / liver / kidney / lesion, z-scored), saved as an nnU-Net v2 ``.pth`` (``network_weights``)."""
    from nnunet_tpp.data.phantom import make_phantom
    if path.exists():
        log(f"tpp-probe: reusing the upstream pre-trained backbone {path}")
        return path
    rng = np.random.default_rng(cfg.seed + 1000)
    cases = []
    for i in range(cfg.upstream_cases):
        image, label = make_phantom(10_000 + i, (80, 96, 96))
        cases.append((((image - image.mean()) / image.std())[None].astype(np.float32), label.astype(np.int64)))
    net = _stunet(cfg, cfg.seed + 1)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    p = cfg.upstream_patch
    started, losses = time.time(), []
    net.train()
    for step in range(cfg.upstream_steps):
        xs, ys = [], []
        for _ in range(2):
            image, label = cases[int(rng.integers(len(cases)))]
            if rng.random() < 0.5:
                centre = np.argwhere(label > 0)[int(rng.integers((label > 0).sum()))]
                start = [int(np.clip(c - p // 2, 0, s - p)) for c, s in zip(centre, label.shape)]
            else:
                start = [int(rng.integers(0, s - p + 1)) for s in label.shape]
            sl = tuple(slice(s, s + p) for s in start)
            xs.append(image[(slice(None),) + sl])
            ys.append(label[sl])
        loss = F.cross_entropy(net(torch.from_numpy(np.stack(xs))), torch.from_numpy(np.stack(ys)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, cfg.upstream_steps // 5) == 0:
            log(f"tpp-probe: upstream pre-training step {step + 1}/{cfg.upstream_steps}, cross-entropy "
                f"{np.mean(losses[-10:]):.3f} ({time.time() - started:.0f} s)")
    path.parent.mkdir(parents=True, exist_ok=True)
    peft.atomic_torch_save({"network_weights": {k: v.detach().clone() for k, v in net.state_dict().items()},
                            "trainer_name": "tpp-probe upstream (phantoms, supervised)"}, path)
    return path


def _pretrained(cfg: ProbeConfig, checkpoint: Path):
    net = _stunet(cfg, cfg.seed)
    if cfg.dims:  # (tests) an unpublished width: the checkpoint's own tensors, strictly
        from nnunet_tpp.models import file_kinds
        net.load_state_dict(file_kinds.load_torch_file(checkpoint, "an STU-Net checkpoint")["network_weights"])
    else:
        from nnunet_tpp.models.stunet_checkpoint import load_stunet_checkpoint
        load_stunet_checkpoint(net, checkpoint)
    return net


def check_config(cfg: ProbeConfig) -> None:
    """Refuses settings that cannot run, before anything is read or written."""
    from nnunet_tpp.pretext.crops3d import check_views
    from nnunet_tpp.pretext.dino import DINOConfig
    check_views(cfg.view, np.prod(np.array(POOLS), axis=0), None, cfg.batch)
    DINOConfig().validate(cfg.batch)
    if not 0 < cfg.test_share < 1 or cfg.seeds < 1 or cfg.per_class < 1:
        raise ValueError("tpp-probe: need 0 < test_share < 1, seeds >= 1 and per_class >= 1")


def run_probe(cfg: ProbeConfig, log: Callable[[str], None] = print) -> dict:
    """Runs the probe (module docstring). Returns ``{"accuracy": {arm: [per seed]}, "summary": {arm: {"mean",
    "std", "min", "max"}}, "cases", "views", "pretrained", "config"}`` and writes ``probe.json`` in ``cfg.out``."""
    from nnunet_tpp.pretext.crops3d import MultiCropConfig, MultiCropSampler
    from nnunet_tpp.pretext.dino import DINOConfig
    from nnunet_tpp.pretext.masked import MaskedConfig, run_masked_stage
    from nnunet_tpp.pretext.masked_views import MaskedViewSampler
    from nnunet_tpp.pretext.stage import PretextSchedule, run_dino_stage
    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    images, labels = read_cases(cfg.data, cfg.spacing, cfg.max_cases)
    small = [n for n, im in images.items() if any(s < v for s, v in zip(im.shape[1:], cfg.view))]
    if small:
        raise ValueError(f"tpp-probe: the view {list(cfg.view)} is larger than cases {small} at spacing "
                         f"{list(cfg.spacing)}; use a smaller --view")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(cfg.backbone) if cfg.backbone else upstream_pretrain(cfg, out / "upstream_stunet.pth", log)
    schedule = PretextSchedule(cfg.epochs, cfg.iterations, cfg.batch, tuple(cfg.feature_stages))
    divisor = [int(d) for d in np.prod(np.array(POOLS), axis=0)]
    names = sorted(images)
    accuracy = {arm: [] for arm in ARMS}
    splits = []
    for s in range(cfg.seeds):
        seed = cfg.seed + s
        rng = np.random.default_rng(seed)
        order = list(rng.permutation(names))
        n_test = min(len(names) - 2, max(1, int(round(cfg.test_share * len(names)))))
        test, train = sorted(order[:n_test]), sorted(order[n_test:])
        views = {n: probe_views(labels[n], images[n][0], cfg.view, cfg.per_class, rng) for n in names}
        ytr = np.concatenate([views[n][1] for n in train])
        yte = np.concatenate([views[n][1] for n in test])
        splits.append({"seed": seed, "train": train, "test": test, "train_views": int(len(ytr)),
                       "test_views": int(len(yte))})
        log(f"tpp-probe seed {seed}: {len(train)} training cases ({len(ytr)} views), {len(test)} test cases "
            f"({len(yte)} views); labels {np.unique(np.concatenate([ytr, yte])).tolist()}")

        def score(net, arm):
            xtr = np.concatenate([view_features(net, images[n], views[n][0], cfg.view, cfg.feature_stages)
                                  for n in train])
            xte = np.concatenate([view_features(net, images[n], views[n][0], cfg.view, cfg.feature_stages)
                                  for n in test])
            accuracy[arm].append(linear_probe(xtr, ytr, xte, yte, seed))
            log(f"tpp-probe seed {seed} [{arm}]: accuracy {accuracy[arm][-1]:.3f}")

        score(_stunet(cfg, seed), "random init")
        score(_pretrained(cfg, checkpoint), "pre-trained")
        work = out / f"seed_{seed}"
        work.mkdir(exist_ok=True)
        data = Cases({n: images[n] for n in train})
        for arm in ("+ PEFT at init", "+ TPP DINO", "+ TPP masked", "head-only control"):
            net = _pretrained(cfg, checkpoint)
            torch.manual_seed(seed + 7)  # the same initialisation of the target parameters in every arm
            peft.apply(net, cfg.method)
            peft.fingerprint_backbone(net)
            started = time.time()
            stage_log = lambda m, a=arm: log(f"[seed {seed} {a}] {m}")  # noqa: E731
            if arm == "+ TPP DINO":
                run_dino_stage(net, MultiCropSampler(data, train, cfg.view, divisor, MultiCropConfig(), seed=seed),
                               schedule, DINOConfig(), torch.device("cpu"), str(work / "dino.pth"),
                               log=stage_log, plot_file=str(work / "dino.png"))
            elif arm != "+ PEFT at init":
                masked = MaskedConfig()
                run_masked_stage(net, MaskedViewSampler(data, train, cfg.view, masked.block_size, masked.mask_ratio,
                                                        seed=seed), schedule, masked, torch.device("cpu"),
                                 str(work / f"{'masked' if arm == '+ TPP masked' else 'control'}.pth"), log=stage_log,
                                 train_targets=arm == "+ TPP masked")
            score(net, arm)
            if arm != "+ PEFT at init":
                log(f"tpp-probe seed {seed} [{arm}]: stage {time.time() - started:.0f} s")
    summary = {arm: {"mean": float(np.mean(v)), "std": float(np.std(v)), "min": float(np.min(v)),
                     "max": float(np.max(v))} for arm, v in accuracy.items()}
    result = {"accuracy": accuracy, "summary": summary, "splits": splits, "cases": names,
              "pretrained": str(checkpoint) if cfg.backbone else f"upstream on phantoms ({checkpoint})",
              "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}}
    with open(out / "probe.json", "w") as f:
        json.dump(result, f, indent=1)
    return result


def format_table(result: dict) -> str:
    """Per-arm accuracy over the seeds (mean, standard deviation, range) as a markdown table."""
    seeds = len(next(iter(result["accuracy"].values())))
    lines = [f"| arm | accuracy over held-out cases, mean ± sd ({seeds} seeds) | min - max |", "|---|---|---|"]
    for arm, s in result["summary"].items():
        lines.append(f"| {arm} | {s['mean']:.3f} ± {s['std']:.3f} | {s['min']:.3f} - {s['max']:.3f} |")
    return "\n".join(lines)


