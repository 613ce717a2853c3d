"""``nnunet-tpp tpp-probe``: does the 3-D TPP pretext stage change the encoder's representation, and for the
better? A linear probe on pooled encoder features of views of a real CT, before and after the stage.

Views (``view``^3 voxels, the image z-scored) are centred on voxels of each label of the label map (background
only inside the body, HU > -500), the same number per label; the label of a view is the organ at its centre. Views
whose centre lies in even z slabs (``view / 4`` thick) train the probe, those in odd slabs test it (views of both
splits overlap: with one CT the probe measures how linearly the features separate what a view is centred on, the
same for every backbone compared; it is not a benchmark).
The features are what the DINO head sees (:class:`~nnunet_tpp.pretext.stage.EncoderEmbedding`: per-channel max and
mean of the pooled encoder stages); the probe is a logistic regression (standardised features, its L2 strength
chosen by 3-fold cross-validation on the training views).

Two frozen backbones: a random initialisation, and a pre-trained one (``backbone``: a published STU-Net
checkpoint; without one, a small one is made here: STU-Net trained for ``upstream_steps`` supervised steps on
procedurally generated phantoms, :mod:`nnunet_tpp.demo.phantom`, labels liver / kidney / lesion: other images
than the CT, a stand-in for a published checkpoint, not one). For each, the probe runs on the plain backbone, on
the backbone with the PEFT method at its initialisation, and after the pretext stage (DINO on views of the same
CT, target parameters only, the stage's defaults unless given).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_tpp import peft

POOLS = [[2, 2, 2]] * 4 + [[1, 1, 1]]  # divisor 16 per axis


@dataclass
class ProbeConfig:
    """Settings of :func:`run_probe` (see the module docstring)."""

    image: str = ""
    labels: str = ""
    out: str = "tpp_probe"
    size: str = "S"
    method: str = "conv_adapter"
    backbone: str | None = None
    upstream_steps: int = 200
    upstream_patch: int = 32
    upstream_cases: int = 4
    view: int = 32
    per_class: int = 80
    epochs: int = 30
    iterations: int = 10
    batch: int = 4
    lr: float | None = None
    out_dim: int = 4096
    feature_stages: tuple[int, ...] = (4, 5)
    seed: int = 0
    threads: int | None = None
    dims: list[int] | None = field(default=None)  # (tests) custom STU-Net widths instead of ``size``


class _Volume:
    """One z-scored volume standing in for nnU-Net's preprocessed dataset (``load_case``)."""

    def __init__(self, data: np.ndarray):
        self.data = data

    def load_case(self, identifier):
        return self.data, None, None, {}


def load_ct(image: str, labels: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(volume (1, Z, Y, X) z-scored float32, labels (Z, Y, X) int, HU (Z, Y, X))`` read with SimpleITK."""
    import SimpleITK as sitk
    for path in (image, labels):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tpp-probe: {path!r} not found")
    hu = sitk.GetArrayFromImage(sitk.ReadImage(image)).astype(np.float32)
    lab = sitk.GetArrayFromImage(sitk.ReadImage(labels)).astype(np.int64)
    if hu.shape != lab.shape:
        raise ValueError(f"tpp-probe: image {hu.shape} and labels {lab.shape} differ in shape")
    return ((hu - hu.mean()) / max(float(hu.std()), 1e-6))[None], lab, hu


def probe_views(labels: np.ndarray, hu: np.ndarray, view: int, per_class: int, seed: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centres ``(N, 3)``, labels ``(N,)`` and train mask ``(N,)`` of the probe's views (module docstring)."""
    if any(s < view for s in labels.shape):
        raise ValueError(f"tpp-probe: view {view} is larger than the volume {labels.shape}")
    rng = np.random.default_rng(seed)
    half = view // 2
    inner = np.zeros(labels.shape, dtype=bool)
    inner[tuple(slice(half, s - (view - half) + 1) for s in labels.shape)] = True
    centres, ys = [], []
    for c in np.unique(labels):
        where = (labels == c) & inner & ((hu > -500) if c == 0 else True)
        idx = np.argwhere(where)
        if len(idx) == 0:
            continue
        pick = idx[rng.choice(len(idx), min(per_class, len(idx)), replace=False)]
        centres.append(pick)
        ys.append(np.full(len(pick), int(c)))
    centres, ys = np.concatenate(centres), np.concatenate(ys)
    train = (centres[:, 0] // max(1, view // 4)) % 2 == 0
    return centres, ys, train


@torch.no_grad()
def view_features(net, volume: np.ndarray, centres: np.ndarray, view: int, stages, batch: int = 8) -> np.ndarray:
    """Pooled encoder features (:class:`EncoderEmbedding`) of the views at ``centres``."""
    from nnunet_tpp.pretext.stage import EncoderEmbedding
    embedding = EncoderEmbedding(net, tuple(stages))
    net.eval()
    half, out = view // 2, []
    for i in range(0, len(centres), batch):
        crops = [volume[(slice(None),) + tuple(slice(c - half, c - half + view) for c in centre)]
                 for centre in centres[i:i + batch]]
        out.append(embedding(torch.from_numpy(np.stack(crops)).float()).numpy())
    return np.concatenate(out)


def linear_probe(x: np.ndarray, y: np.ndarray, train: np.ndarray, seed: int = 0) -> float:
    """Test accuracy of a logistic regression trained on the ``train`` views (standardised features, L2 strength
    by 3-fold cross-validation)."""
    import warnings
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    model = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=[1e-3, 1e-2, 1e-1, 1.0, 10.0], cv=3,
                                                                 max_iter=5000, random_state=seed))
    with warnings.catch_warnings():  # (scikit-learn's announcements of changed defaults)
        warnings.simplefilter("ignore", FutureWarning)
        model.fit(x[train], y[train])
    return float((model.predict(x[~train]) == y[~train]).mean())


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
    from nnunet_tpp.demo.phantom import make_phantom
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


def _backbone(cfg: ProbeConfig, kind: str, checkpoint: Path | None):
    net = _stunet(cfg, cfg.seed)
    if kind == "pre-trained":
        from nnunet_tpp.models.stunet_checkpoint import load_stunet_checkpoint
        if cfg.dims:  # (tests) an unpublished width: the checkpoint's own tensors, strictly
            from nnunet_tpp import file_kinds
            net.load_state_dict(file_kinds.load_torch_file(checkpoint, "an STU-Net checkpoint")["network_weights"])
        else:
            load_stunet_checkpoint(net, checkpoint)
    return net


def run_probe(cfg: ProbeConfig, log: Callable[[str], None] = print) -> dict:
    """Runs the probe (module docstring). Returns ``{"accuracy": {backbone: {"plain", "init", "after",
    "after_student"}},
    "diagnostics": {backbone: last epoch's}, "overlap", "views", "config"}`` and writes ``probe.json`` in
    ``cfg.out``."""
    from nnunet_tpp.pretext.crops3d import MultiCropConfig, MultiCropSampler, check_views
    from nnunet_tpp.pretext.dino import DINOConfig
    from nnunet_tpp.pretext.stage import PretextSchedule, run_dino_stage
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    volume, labels, hu = load_ct(cfg.image, cfg.labels)
    check_views((cfg.view,) * 3, (16, 16, 16), {"ct": volume.shape[1:]}, cfg.batch)
    dino = DINOConfig(out_dim=cfg.out_dim, warmup_epochs=1, **({"lr": cfg.lr} if cfg.lr is not None else {}))
    dino.validate(cfg.batch)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    centres, ys, train = probe_views(labels, hu, cfg.view, cfg.per_class, cfg.seed)
    log(f"tpp-probe: {len(ys)} views of {cfg.view}^3 ({np.bincount(ys).tolist()} per label), {int(train.sum())} "
        f"train / {int((~train).sum())} test (alternating z slabs)")
    checkpoint = Path(cfg.backbone) if cfg.backbone else upstream_pretrain(cfg, out / "upstream_stunet.pth", log)
    result = {"accuracy": {}, "diagnostics": {}, "views": {"total": int(len(ys)), "train": int(train.sum())},
              "pretrained": str(checkpoint) if cfg.backbone else f"upstream on phantoms ({checkpoint})",
              "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}}
    for kind in ("random init", "pre-trained"):
        net = _backbone(cfg, kind, checkpoint)
        acc = {"plain": linear_probe(view_features(net, volume, centres, cfg.view, cfg.feature_stages), ys, train)}
        torch.manual_seed(cfg.seed + 7)
        peft.apply(net, cfg.method)
        peft.fingerprint_backbone(net)
        acc["init"] = linear_probe(view_features(net, volume, centres, cfg.view, cfg.feature_stages), ys, train)
        work = out / kind.replace(" ", "_").replace("-", "_")
        work.mkdir(exist_ok=True)
        sampler = MultiCropSampler(_Volume(volume), ["ct"], (cfg.view,) * 3, (16, 16, 16), MultiCropConfig(),
                                   seed=cfg.seed)
        result["overlap"] = sampler.global_overlap()
        started = time.time()
        run_dino_stage(net, sampler.sample, PretextSchedule(cfg.epochs, cfg.iterations, cfg.batch,
                                                            tuple(cfg.feature_stages)),
                       dino, torch.device("cpu"), str(work / "tpp_state.pth"),
                       log=lambda m, k=kind: log(f"[{k}] {m}"), plot_file=str(work / "tpp_progress.png"),
                       diagnostics_file=str(work / "tpp_diagnostics.json"))
        acc["after"] = linear_probe(view_features(net, volume, centres, cfg.view, cfg.feature_stages), ys, train)
        acc["after_student"] = _student_accuracy(net, work / "tpp_state.pth", volume, centres, ys, train, cfg)
        with open(work / "tpp_diagnostics.json") as f:
            result["diagnostics"][kind] = json.load(f)[-1]
        result["accuracy"][kind] = acc
        log(f"tpp-probe [{kind}]: accuracy plain {acc['plain']:.3f}, {cfg.method} at init {acc['init']:.3f}, after "
            f"the pretext stage {acc['after']:.3f} (stage {time.time() - started:.0f} s)")
    with open(out / "probe.json", "w") as f:
        json.dump(result, f, indent=1)
    return result


def _student_accuracy(net, state_file: Path, volume, centres, ys, train, cfg: ProbeConfig) -> float:
    """The probe with the student's target parameters (the stage leaves the teacher's in ``net``; restored)."""
    from nnunet_tpp.pretext.stage import read_state
    prefix = "embedding.network."
    student = {k[len(prefix):]: v for k, v in read_state(str(state_file))["student"].items() if k.startswith(prefix)}
    targets = peft.target_parameters(net)
    kept = {n: p.detach().clone() for n, p in targets.items()}
    with torch.no_grad():
        for name, value in student.items():
            if name in targets:
                targets[name].copy_(value)
        accuracy = linear_probe(view_features(net, volume, centres, cfg.view, cfg.feature_stages), ys, train)
        for name, value in kept.items():
            targets[name].copy_(value)
    return accuracy


def format_table(result: dict) -> str:
    """The accuracies as a markdown table."""
    method = result["config"]["method"]
    lines = [f"| frozen backbone | plain | + {method} at init | + {method} after TPP (teacher: the result) | "
             f"(student) | teacher entropy / batch-mean entropy / log K (last epoch) |", "|---|---|---|---|---|---|"]
    for kind, acc in result["accuracy"].items():
        d = result["diagnostics"][kind]
        lines.append(f"| {kind} | {acc['plain']:.3f} | {acc['init']:.3f} | {acc['after']:.3f} | "
                     f"{acc['after_student']:.3f} | {d['teacher_entropy']:.2f} / {d['batch_mean_entropy']:.2f} / "
                     f"{d['log_k']:.2f} |")
    return "\n".join(lines)


def add_probe_parser(sub) -> None:
    """Registers ``nnunet-tpp tpp-probe``."""
    p = sub.add_parser("tpp-probe", help="linear probe of encoder features of a real CT before / after the TPP "
                                         "pretext stage (random-init and pre-trained backbones)")
    d = ProbeConfig()
    p.add_argument("--image", required=True, help="CT volume (e.g. ../shared/data/ct/abdomen_ct_001.nii.gz)")
    p.add_argument("--labels", required=True, help="its label map (the organ at a view's centre is its label)")
    p.add_argument("--out", default=d.out, help="work folder (upstream backbone, stage states, probe.json)")
    p.add_argument("--size", default=d.size, choices=["S", "B", "L", "H"])
    p.add_argument("--method", default=d.method)
    p.add_argument("--backbone", help="a pre-trained STU-Net checkpoint (default: pre-train one on phantoms)")
    p.add_argument("--upstream-steps", dest="upstream_steps", type=int, default=d.upstream_steps)
    p.add_argument("--view", type=int, default=d.view, help="view side in voxels (a multiple of 16)")
    p.add_argument("--per-class", dest="per_class", type=int, default=d.per_class)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--iterations", type=int, default=d.iterations, help="pretext iterations per epoch")
    p.add_argument("--batch", type=int, default=d.batch, help="pretext batch size")
    p.add_argument("--lr", type=float, help="pretext peak learning rate (default: the stage's)")
    p.add_argument("--out-dim", dest="out_dim", type=int, default=d.out_dim, help="DINO prototypes")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--json", help="also write the result here")
    p.set_defaults(func=probe_main)


def probe_main(args: argparse.Namespace) -> int:
    cfg = ProbeConfig(**{k: getattr(args, k) for k in ProbeConfig.__dataclass_fields__ if hasattr(args, k)})
    result = run_probe(cfg)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0
