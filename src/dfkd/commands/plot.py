"""``dfkd plot RUN_DIR``: what a distillation run synthesises, seen through its teacher.

Rebuilds the run's teacher, student and method from ``RUN/config.yaml`` and a checkpoint, draws synthetic images the
way the method hands them to its student (:meth:`~dfkd.methods.Method.next_batch`), and writes into ``RUN/plots``:

* ``tsne.png``: a t-SNE of the teacher's penultimate features (the input of its classifier layer, captured with a
  forward hook) for real test images, coloured by their class, against the synthetic images, coloured by the
  teacher's class for them. Without a loadable test set (a run on data it cannot find, or with no registered
  dataset) the synthetic images alone, and the title says so.
* ``class_hist.png``: the teacher's predicted classes on the synthetic images.
* ``plot.json``: the numbers (counts per class, their entropy, how many images of each kind).

Where the images come from: a generator method draws fresh images from its saved generator (in its sampling mode);
a pool method draws augmented batches from its saved pool. No synthesis round is run (it would train the generator
further or cost a round of inversion steps), except when the method has no image to give yet (an empty pool): then
one round of :meth:`~dfkd.methods.Method.synthesize` comes first. Some methods update a memory as they hand out
batches (MB-DFKD, PRE-DFKD); nothing is saved back, so the run is unchanged.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from dfkd.config import build_config, read_yaml
from dfkd.data import DatasetInfo, dataset_info, load_split, to_float
from dfkd.data.datafree import FOLDER, NO_DATA, checkpoint_meta, is_data_free, load_image_folder, resolve_dataset_info
from dfkd.engine.common import build_model, freeze
from dfkd.engine.distill import CHECKPOINT_FORMAT, build_method, restore_method
from dfkd.engine.env import setup_env
from dfkd.engine.rundir import RunDir, load_state
from dfkd.engine.seed import seed_everything
from dfkd.errors import CheckpointError, ConfigError, DfkdError, writing_to
from dfkd.hooks import InputHook
from dfkd.images import figure, pyplot
from dfkd.losses import histogram_entropy
from dfkd.methods import Method, Progress
from dfkd.models import classifier_module
from dfkd.models.sources import is_external_arch

log = logging.getLogger("dfkd")

DEFAULT_REAL = 500
DEFAULT_SYNTHETIC = 500
MIN_TSNE_POINTS = 5  # t-SNE needs its perplexity (here at most (n - 1) / 3) to be at least 1
FEATURE_BATCH = 500


def plot_run(
    run_dir: str | Path,
    real: int = DEFAULT_REAL,
    synthetic: int = DEFAULT_SYNTHETIC,
    which: str = "last",
    teacher: nn.Module | None = None,
    trust_code: bool = False,
) -> dict:
    """Draw the t-SNE and the class histogram of a distillation run into ``RUN/plots``; returns plot.json's content.

    Args:
        run_dir: the directory of a ``dfkd distill`` run (its ``out``).
        real: real test images in the t-SNE (0 = none).
        synthetic: synthetic images to draw.
        which: the checkpoint: ``last`` or ``best``.
        teacher: the teacher module, for a run whose teacher was passed as a module (default: ``teacher.arch`` with
            ``teacher.weights`` from the run's config).
        trust_code: run the code that the run's ``teacher.arch``/``student.arch`` names (``py:``, ``hub:``,
            TorchScript): the run's config.yaml never grants it, so a run folder from anywhere asks again.

    Example:
        >>> from dfkd.commands.plot import plot_run
        >>> numbers = plot_run("runs/cudfkd", real=200, synthetic=200)
        >>> numbers["class_counts"]
    """
    path = Path(run_dir).expanduser()
    if real < 0 or synthetic < 1:
        raise ConfigError(f"--real {real} --synthetic {synthetic}: give --real >= 0 and --synthetic >= 1")
    if real + synthetic < MIN_TSNE_POINTS:
        raise ConfigError(f"a t-SNE needs at least {MIN_TSNE_POINTS} images: raise --synthetic or --real")
    if which not in ("last", "best"):
        raise ConfigError(f"--which {which}: give last or best")
    tsne_class = _tsne_class()
    cfg = _run_config(path)
    if teacher is None and not cfg.teacher.weights and not is_external_arch(cfg.teacher.arch):
        raise ConfigError(
            f"{path}/config.yaml names no teacher.weights (its teacher was passed as a module): call "
            "dfkd.commands.plot.plot_run(RUN_DIR, teacher=MODULE)"
        )
    run = RunDir(path)
    ckpt_path = run.last if which == "last" else run.best
    if not ckpt_path.is_file():
        raise CheckpointError(f"{ckpt_path} does not exist: the run has no {which} checkpoint yet (try --which last)")
    ckpt = load_state(ckpt_path)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{ckpt_path} is not a distillation checkpoint: dfkd plot draws a `dfkd distill` run")

    env = setup_env("auto", "fp32", False, cfg.engine.threads, False)
    seed_everything(cfg.engine.seed)
    # a run without a registered dataset recorded the classes, shape and mean/std it resolved in its checkpoint
    info = resolve_dataset_info(cfg.data, checkpoint_meta(ckpt_path)) if is_data_free(cfg.data.name) else None
    info = info or dataset_info(cfg.data.name)
    data_wins = is_data_free(cfg.data.name)  # the teacher at the size and normalisation of its run
    if teacher is None:
        net = build_model(cfg.teacher.arch, info, env, cfg.teacher.weights, "teacher", trust_code, data_wins=data_wins)
        net = freeze(net)
    else:
        net = freeze(build_model(teacher, info, env, None, "teacher", data_wins=data_wins))
    student = build_model(cfg.student.arch, info, env, None, "student", trust_code)
    # the live student is the one the method synthesised against (with train.ema_decay the average is beside it)
    student.net.load_state_dict(ckpt.get("live_state_dict", ckpt["state_dict"]))
    method = build_method(cfg, net, student, info, env)
    try:
        restore_method(method, ckpt)
        fake, synthesised = draw_synthetic(method, _progress(cfg, ckpt), synthetic)
    finally:
        method.close()
    fake_features, fake_classes = teacher_features(net, fake)

    real_images, why_no_real = _real_images(cfg, info, real)
    if real_images is not None:
        real_features, _ = teacher_features(net, to_float(real_images[0]).to(env.device))
        real_classes = real_images[1]
    else:
        real_features, real_classes = fake_features[:0], fake_classes[:0]

    out = path / "plots"
    with writing_to(out):
        out.mkdir(exist_ok=True)
    counts = torch.bincount(fake_classes, minlength=info.num_classes)
    names = list(info.classes) if len(info.classes) == info.num_classes else None
    features = torch.cat([real_features, fake_features]).numpy()
    embedded, perplexity = tsne(features, cfg.engine.seed, tsne_class)
    n_real = real_features.shape[0]
    title = f"{cfg.method.name}: {cfg.teacher.arch} -> {cfg.student.arch}, {which} checkpoint (epoch {ckpt['epoch']})"
    _draw_tsne(
        out / "tsne.png",
        embedded[:n_real],
        real_classes.numpy(),
        embedded[n_real:],
        fake_classes.numpy(),
        info.num_classes,
        names,
        title if real_images is not None else f"{title}\nsynthetic images only ({why_no_real})",
    )
    entropy = float(histogram_entropy(counts.double()))
    _draw_histogram(out / "class_hist.png", counts.tolist(), names, entropy, title)
    numbers = {
        "run_dir": str(path),
        "checkpoint": str(ckpt_path),
        "epoch": int(ckpt["epoch"]),
        "method": cfg.method.name,
        "synthetic_images": int(fake_classes.numel()),
        "synthesis_round_run": synthesised,
        "real_images": int(n_real),
        "real_source": f"{info.name} test split" if real_images is not None else None,
        "real_missing_reason": why_no_real,
        "num_classes": int(info.num_classes),
        "classes": names,
        "class_counts": counts.tolist(),
        "class_entropy": entropy,
        "class_entropy_max": math.log(info.num_classes),
        "tsne_perplexity": perplexity,
        "files": [str(out / name) for name in ("tsne.png", "class_hist.png", "plot.json")],
    }
    with writing_to(out / "plot.json"):
        (out / "plot.json").write_text(json.dumps(numbers, indent=2) + "\n")
    return numbers


def _tsne_class() -> type:
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise DfkdError("dfkd plot draws its t-SNE with scikit-learn: pip install 'dfkd[plot]'") from None
    return TSNE


def _run_config(path: Path):
    if not path.is_dir():
        raise DfkdError(f"{path} is not a directory: give the out=DIR of a `dfkd distill` run")
    saved = path / "config.yaml"
    if not saved.is_file():
        raise DfkdError(f"{path} holds no config.yaml: give the out=DIR of a `dfkd distill` run")
    data = read_yaml(saved)
    if "method" not in data:
        raise ConfigError(f"{path} is not a distillation run (its config has no method): dfkd plot draws those")
    return build_config("distill", data)


def _progress(cfg, ckpt: dict) -> Progress:
    """Where the checkpoint's run stood: in the last round of its last epoch, at its next student step."""
    t = cfg.train
    warmup = t.synthesis_warmup_epochs
    epoch = int(ckpt["epoch"]) - 1 - warmup
    return Progress(epoch, t.rounds_per_epoch - 1, int(ckpt["step"]), t.epochs, t.rounds_per_epoch, t.kd_steps, warmup)


def draw_synthetic(method: Method, prog: Progress, n: int) -> tuple[Tensor, bool]:
    """``n`` images in [0, 1] from ``method.next_batch`` (after one synthesis round when the method shows no image
    yet); returns them and whether a synthesis round ran."""
    synthesise = method.preview(1) is None
    if synthesise:
        log.info("%s holds no synthetic image yet: running one synthesis round first", method.name)
        method.synthesize(prog)
    batches, have = [], 0
    while have < n:
        x = method.next_batch(prog).x.detach().float()
        prog.step += 1
        batches.append(x)
        have += x.shape[0]
    return torch.cat(batches)[:n], synthesise


@torch.no_grad()
def teacher_features(teacher: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """The teacher's penultimate features (flattened, on the CPU) and predicted classes for ``images`` in [0, 1]."""
    hook = InputHook(classifier_module(teacher))
    features, classes = [], []
    try:
        for x in images.split(FEATURE_BATCH):
            logits = teacher(x)
            features.append(hook.pop().flatten(1).float().cpu())
            classes.append(logits.argmax(1).cpu())
    finally:
        hook.remove()
    return torch.cat(features), torch.cat(classes)


def _real_images(cfg, info: DatasetInfo, n: int) -> tuple[tuple[Tensor, Tensor] | None, str | None]:
    """``n`` test images (uint8) and labels drawn with the run's seed, or None and why not."""
    if n == 0:
        return None, "--real 0"
    if cfg.data.name == NO_DATA:
        return None, "a run without data (data.name=none)"
    try:
        if cfg.data.name == FOLDER:
            images, labels = load_image_folder(cfg.data.root, info)
        else:
            images, labels = load_split(info.name, "test", cfg.data.root)
    except DfkdError as exc:
        log.info("no real test images for the t-SNE (%s): plotting the synthetic images only", exc)
        return None, f"no test set of {info.name} could be loaded"
    pick = torch.randperm(len(labels), generator=torch.Generator().manual_seed(cfg.engine.seed))[:n]
    return (images[pick], labels[pick]), None


def tsne(features: np.ndarray, seed: int, tsne_class: type) -> tuple[np.ndarray, float]:
    """A 2-d t-SNE of ``features`` [n, d] (PCA to 50 dimensions first when wider); returns it and the perplexity,
    30 or less for small n (t-SNE needs it below n)."""
    n = features.shape[0]
    if features.shape[1] > 50 and n > 50:
        from sklearn.decomposition import PCA

        features = PCA(50, random_state=seed).fit_transform(features)
    perplexity = float(min(30.0, (n - 1) / 3))
    embedded = tsne_class(2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    return embedded.fit_transform(features.astype(np.float32)), perplexity


def _colours(num_classes: int) -> np.ndarray:
    plt = pyplot()
    cmap = plt.get_cmap("tab10" if num_classes <= 10 else "tab20" if num_classes <= 20 else "turbo")
    return np.array([cmap(i if num_classes <= 20 else i / max(1, num_classes - 1)) for i in range(num_classes)])


def _draw_tsne(
    path: Path,
    real: np.ndarray,
    real_classes: np.ndarray,
    fake: np.ndarray,
    fake_classes: np.ndarray,
    num_classes: int,
    names: list[str] | None,
    title: str,
) -> None:
    plt = pyplot()  # for its Line2D legend handles
    colours = _colours(num_classes)
    with figure(path, (7.5, 6.0)) as ax:
        if len(real):
            ax.scatter(*real.T, c=colours[real_classes], s=10, marker="o", alpha=0.5, linewidths=0)
        ax.scatter(*fake.T, c=colours[fake_classes], s=18, marker="x", linewidths=0.9)
        handles = [
            plt.Line2D([], [], color="gray", marker="o", linestyle="", label="real test image (its class)"),
            plt.Line2D([], [], color="gray", marker="x", linestyle="", label="synthetic image (teacher's class)"),
        ][0 if len(real) else 1 :]
        if num_classes <= 20:
            handles += [
                plt.Line2D([], [], color=colours[k], marker="s", linestyle="", label=names[k] if names else str(k))
                for k in range(num_classes)
            ]
        ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"t-SNE of the teacher's penultimate features\n{title}", fontsize=9)


def _draw_histogram(path: Path, counts: list[int], names: list[str] | None, entropy: float, title: str) -> None:
    k = len(counts)
    with figure(path, (max(6.0, 0.35 * k), 4.0)) as ax:
        ax.bar(range(k), counts, color=_colours(k))
        ax.set_xticks(range(k))
        ax.set_xticklabels(
            names if names else [str(i) for i in range(k)],
            rotation=45 if k > 10 or names else 0,
            ha="right" if k > 10 or names else "center",
            fontsize=8,
        )
        ax.set_ylabel("synthetic images")
        ax.set_xlabel("teacher's predicted class")
        ax.set_title(
            f"{title}\n{sum(counts)} synthetic images, class entropy {entropy:.3f} of {math.log(k):.3f} nats",
            fontsize=9,
        )
        ax.grid(axis="y", alpha=0.3)
