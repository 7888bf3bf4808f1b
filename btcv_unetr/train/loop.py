"""The training loop, as torchvision's reference segmentation lays it out: ``fit`` at the end of this module.

    micro_batch_size crops per forward/backward pass, per device and precision
    train_step       one optimiser step over a batch, gradients accumulated over micro-batches
    train_one_epoch  one pass over the training crops (autocast, non-finite losses skipped)
    validate         sliding-window Dice per organ over the validation cases (blended as test.py does)
    Run              what the loop carries from epoch to epoch; start_run builds it (resume, precision, model,
                     data, loss)
    fit              per epoch: seed, train_one_epoch, validate when due (model.pt, --keep_best files), the hooks
                     (the time budget: budget.TimeBudget), model_final.pt; the checkpoint dict is written there
    run_training     start_run, then fit with the budget's hook where one is asked for; see command.py for the CLI
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from monai.data import DataLoader, MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import Randomizable
from monai.utils import set_determinism
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler, Subset
from tqdm import tqdm

from ..config.schema import Config, FastConfig
from ..data.checks import check_config_data
from ..data.datalist import class_names, load_config_split, make_dataset, with_annotated_classes
from ..data.transforms import train_transforms, val_transforms
from ..distributed import Context, all_true, broadcast_object, gather_objects
from ..errors import UserError
from ..inference.evaluate import format_summary
from ..inference.sliding_window import auto_sw_batch_size, window_settings
from ..io.checkpoint import load_checkpoint, write_checkpoint
from ..logs import RunLog
from ..metrics import nan_mean, overlap_scores, pixel_accuracy
from ..model.build import build_model, describe_model_size
from ..model.speed import compile_if_asked, network_bf16_speedup, prepare_model
from ..model.ssl import load_ssl_encoder
from ..model.torchscript import load_torchscript_weights
from ..model.weights import load_pretrained, load_weights
from ..runtime.precision import Precision, resolve_precision
from .budget import TimeBudget, budgeted_epochs
from .card import data_facts, model_card
from .loss import DeepSupervisionLoss, build_loss, unannotated_as_background
from .optim import build_optimizer, build_scheduler
from .run_folder import keep_best_plan


def micro_batch_size(fast: FastConfig, device: torch.device, crops: int, precision: str) -> int:
    """Crops per forward/backward pass for a batch of ``crops`` crops.

    ``fast.micro_batch`` 0 means automatic. On the CPU, per precision: bfloat16 one crop at a time
    (faster per crop than a batch of 4 on a Zen 5), float32 two (7% faster per step than one for
    UNETR-B in the channels-last layout where bfloat16 is not native; four were no faster and
    need twice the memory). On a GPU the whole batch.
    """
    if fast.micro_batch > 0:
        return min(fast.micro_batch, crops)
    if device.type != "cpu":
        return crops
    return min(2 if precision == "fp32" else 1, crops)


def plain(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The tensor without MONAI metadata, on ``device``: MetaTensor dispatch costs ~10% of a CPU step."""
    if isinstance(tensor, MetaTensor):
        tensor = tensor.as_tensor()
    return tensor.to(device, non_blocking=True)


def train_step(model: nn.Module, image: torch.Tensor, label: torch.Tensor, loss_fn: nn.Module,
               optimizer: torch.optim.Optimizer, precision: Precision, context: Context, micro_batch: int,
               annotated: torch.Tensor | None = None) -> float | None:
    """One optimiser step over a batch of crops ``(B, C, X, Y, Z)``, ``micro_batch`` crops per forward/backward.

    ``annotated``: ``(B, classes)`` booleans of partly annotated data, given to the loss (a ``MarginalLoss``).

    Each micro-batch's loss is weighted by its share of the batch, so the accumulated gradient is the
    gradient of the whole batch's loss (DiceCE averages over crops) and the step is the one a single
    batch would take. Under DDP only the last micro-batch synchronises gradients. Returns the batch
    loss, or None when a non-finite loss on any rank skipped the step on every rank (no update).
    """
    optimizer.zero_grad(set_to_none=True)
    crops, total = image.shape[0], 0.0
    for start in range(0, crops, micro_batch):
        stop = min(start + micro_batch, crops)
        accumulate = isinstance(model, DistributedDataParallel) and stop < crops
        with model.no_sync() if accumulate else contextlib.nullcontext():
            with precision.autocast(context.device):
                logits = model(image[start:stop])
            targets = (label[start:stop],) if annotated is None else (label[start:stop], annotated[start:stop])
            logits = logits.float() if isinstance(logits, torch.Tensor) else logits  # deep supervision: a list
            loss = loss_fn(logits, *targets) * ((stop - start) / crops)
            if not all_true(bool(torch.isfinite(loss)), context):
                optimizer.zero_grad(set_to_none=True)
                return None
            precision.scaler.scale(loss).backward()
        total += float(loss.detach())
    precision.scaler.step(optimizer)
    precision.scaler.update()
    return total


def train_one_epoch(model: nn.Module, loader: DataLoader, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                    precision: Precision, context: Context, epoch: int, max_steps: int | None,
                    global_step: int, fast: FastConfig | None = None,
                    memory_format: torch.memory_format = torch.contiguous_format) -> tuple[float, int]:
    """One epoch; returns (mean loss over the steps taken, global step after the epoch).

    A non-finite loss on any rank is reported with its step and skipped on every rank (no update),
    so no rank trains on it and DDP's collectives stay in step.
    """
    model.train()
    fast = fast or FastConfig()
    total, steps = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", disable=not context.is_main, leave=False, dynamic_ncols=True)
    for batch in bar:
        if max_steps is not None and global_step >= max_steps:
            break
        image = plain(batch["image"], context.device).contiguous(memory_format=memory_format)
        label = plain(batch["label"], context.device)
        annotated = batch["annotated"].to(context.device) if "annotated" in batch else None
        loss = train_step(model, image, label, loss_fn, optimizer, precision, context,
                          micro_batch_size(fast, context.device, image.shape[0], precision.name), annotated)
        global_step += 1
        if loss is None:
            if context.is_main:
                print(f"warning: non-finite loss at step {global_step} (epoch {epoch + 1}); step skipped",
                      file=sys.stderr)
            continue
        total += loss
        steps += 1
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    return (total / steps if steps else math.nan), global_step


@dataclass
class Validation:
    """Per-class means over the validation cases (classes 1..N-1; a class absent from a case's label is
    left out of that class's mean) and the mean pixel (voxel) accuracy, background included."""

    organ_dice: list[float]
    organ_iou: list[float]
    accuracy: float
    cases: int

    @property
    def mean_dice(self) -> float:
        return nan_mean(self.organ_dice)

    @property
    def mean_iou(self) -> float:
        return nan_mean(self.organ_iou)

    def summary(self, names: list[str]) -> dict:
        """In the layout of ``evaluate.summarise``, so the table printed is that of ``test.py`` and ``evaluate``."""
        organs = {name: {"dice": dice, "iou": iou} for name, dice, iou in zip(names, self.organ_dice, self.organ_iou)}
        return {"cases": self.cases, "organs": organs, "mean_organ_dice": self.mean_dice, "mean_iou": self.mean_iou,
                "accuracy": self.accuracy}


def case_scores(predicted: torch.Tensor, label: torch.Tensor, classes: int,
                annotated: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dice and IoU per case and class 1..classes-1, ``(B, classes - 1)`` (NaN where the label lacks the class),
    and voxel accuracy ``(B,)``, of class maps ``predicted`` and ``label`` ``(B, 1, *spatial)``: ``btcv_unetr.metrics``,
    as ``evaluate`` scores masks.

    ``annotated`` ``(B, classes)`` booleans (partly annotated cases): a class a case does not annotate scores
    NaN (left out of the means), and voxels of it, predicted or labelled, count as background.
    """
    predicted, label = predicted.long(), label.long()
    if annotated is not None:
        annotated = annotated.to(label.device)
        predicted, label = unannotated_as_background(predicted, annotated), unannotated_as_background(label, annotated)
    dice, iou = overlap_scores(predicted, label, classes)
    if annotated is not None:
        dice, iou = (torch.where(annotated[:, 1:], score, torch.nan) for score in (dice, iou))
    return dice.cpu(), iou.cpu(), pixel_accuracy(predicted, label).cpu()


@torch.no_grad()
def validate(model: nn.Module, loader: DataLoader, config: Config, precision: Precision,
             context: Context) -> Validation:
    """Per-class Dice and IoU (MONAI's metrics) and pixel accuracy over all validation cases.

    Each rank evaluates its own share of the cases (no padding), the per-case rows are gathered, so
    every case counts exactly once.
    """
    model.eval()
    classes = config.model.out_channels

    def predictor(window: torch.Tensor) -> torch.Tensor:
        with precision.autocast(context.device):
            return model(window).float()

    sw_batch_size = auto_sw_batch_size(config.infer.sw_batch_size, context.device, config.model.roi_size,
                                       config.model.feature_size, precision.name)
    rows = []
    for batch in tqdm(loader, desc="validation", disable=not context.is_main, leave=False, dynamic_ncols=True):
        image, label = plain(batch["image"], context.device), plain(batch["label"], context.device)
        logits = sliding_window_inference(image, sw_batch_size=sw_batch_size, predictor=predictor,
                                          **window_settings(config))
        rows.append(case_scores(logits.argmax(1, keepdim=True), label, classes, batch.get("annotated")))
    rows = [row for rank_rows in gather_objects(rows, context) for row in rank_rows]
    if not rows:
        return Validation([math.nan] * (classes - 1), [math.nan] * (classes - 1), math.nan, 0)
    dice, iou, accuracy = (torch.cat(column).double() for column in zip(*rows))  # (cases, classes), NaN if absent
    return Validation(torch.nanmean(dice, dim=0).tolist(), torch.nanmean(iou, dim=0).tolist(),
                      float(accuracy.mean()), int(dice.shape[0]))


def check_training_data(config: Config, context: Context) -> None:
    """Rank 0 reads every file of the datalist; every rank refuses to start on any problem."""
    problems = [str(p) for p in check_config_data(config)[0]] if context.is_main else None
    problems = broadcast_object(problems, context)
    if len(problems or []) == 1:
        raise UserError(f"{problems[0]} (training data)")
    if problems:
        if context.is_main:
            print("\n".join(problems), file=sys.stderr)
        raise UserError(f"training data has {len(problems)} problem(s), listed above: fix them "
                        "(btcv-unetr check-data lists them again)")


def build_loaders(config: Config, context: Context) -> tuple[DataLoader, DataLoader, DistributedSampler | None]:
    classes = config.model.out_channels
    train_items = with_annotated_classes(load_config_split(config.data, "training"), classes)
    val_items = with_annotated_classes(load_config_split(config.data, "validation"), classes)
    train_ds = make_dataset(train_items, train_transforms(config), config.data)
    # Each rank validates a disjoint share of the cases: no sampler padding, no double counting.
    val_ds = make_dataset(val_items[context.rank::context.world_size], val_transforms(config), config.data)
    sampler = DistributedSampler(train_ds, shuffle=True, seed=config.train.seed or 0) if context.distributed else None
    pin = context.device.type == "cuda"
    train_loader = DataLoader(train_ds, batch_size=config.train.batch_size, shuffle=sampler is None, sampler=sampler,
                              num_workers=config.data.workers, pin_memory=pin)
    val_loader = DataLoader(val_ds, batch_size=1, shuffle=False, num_workers=config.data.workers, pin_memory=pin)
    return train_loader, val_loader, sampler


def build_trainable_model(config: Config, context: Context) -> nn.Module:
    model = build_model(config.model, config.data.pixdim)
    pretrained = Path(config.train.pretrained_dir) / config.train.pretrained_model_name
    if config.train.resume_jit:
        load_torchscript_weights(model, config.model, pretrained, warn=context.is_main)
    elif config.train.resume_ckpt:
        load_pretrained(model, pretrained)
    if context.is_main and (config.train.resume_jit or config.train.resume_ckpt):
        print(f"loaded pretrained weights from {pretrained}")
    if config.train.use_ssl_pretrained and not config.train.checkpoint:  # a resumed run restores its own weights
        summary = load_ssl_encoder(model, config)
        if context.is_main:
            print(summary)
    return model.to(context.device)


def run_precision(config: Config, context: Context) -> Precision:
    """The run's precision: rank 0 resolves it (the probe times this machine), every rank uses it."""
    if config.train.resume_jit:  # as the reference: finetuning from TorchScript weights runs without autocast
        choice = ("fp32", "finetuning from TorchScript weights (--resume_jit) runs without autocast")
    elif context.is_main:
        resolved = resolve_precision(config.train.precision, context.device, config.model,
                                     network_probe=network_bf16_speedup)
        choice = (resolved.name, resolved.reason)
    else:
        choice = None
    name, reason = broadcast_object(choice, context)
    return Precision(name, reason, context.device.type)


def load_training_state(path: str, config: Config) -> dict[str, Any]:
    """A training checkpoint (our dict, any version) that fits this run, or a one-line error."""
    state: Any = load_checkpoint(path)
    required = ("state_dict", "optimizer", "scheduler", "epoch")
    if not isinstance(state, dict) or any(key not in state for key in required):
        raise UserError(f"{path}: not a training checkpoint (needs {', '.join(required)}); "
                        "to finetune from bare weights use --resume_ckpt")
    saved = state.get("config", {}).get("train", {}).get("optim_name")
    if saved is not None and saved != config.train.optim_name:
        raise UserError(f"{path}: saved with --optim_name {saved}, this run asks for {config.train.optim_name}: "
                        f"resume with --optim_name {saved}, or finetune its weights with --resume_ckpt")
    return state


def restore(state: dict[str, Any], path: str, model: nn.Module, optimizer, scheduler,
            precision: Precision) -> tuple[int, int, float]:
    """Load a training checkpoint into the objects in place; returns (epoch, global_step, best_acc)."""
    load_weights(model, state["state_dict"], path)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as exc:
        raise UserError(f"{path}: optimiser state does not fit (--optim_name changed?): {exc}") from None
    scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler") and precision.scaler.is_enabled():
        precision.scaler.load_state_dict(state["scaler"])
    return int(state["epoch"]), int(state.get("global_step", 0)), float(state.get("best_acc", -1.0))


def checkpoint_card(facts: dict[str, Any], precision: Precision, validation: Validation | None, names: list[str],
                    which: str, validation_epoch: int | None, epoch: int, steps: int) -> dict[str, Any]:
    """The model card of a checkpoint written now: ``which`` validation it reports (best, last, top-k)."""
    dice = dict(zip(names, validation.organ_dice)) if validation is not None else None
    return model_card(facts, precision.name, dice, which, validation_epoch, epoch, steps)


@dataclass
class Run:
    """What the epoch loop carries from one epoch to the next; a checkpoint saves (and resume restores) its state."""

    config: Config
    logdir: Path
    model: nn.Module  # what checkpoints save: never wrapped
    net: nn.Module  # what trains: DDP and torch.compile wrappers around ``model``
    memory_format: torch.memory_format
    optimizer: torch.optim.Optimizer
    scheduler: Any
    precision: Precision
    loss_fn: nn.Module
    train_loader: DataLoader
    val_loader: DataLoader
    sampler: DistributedSampler | None
    log: RunLog
    facts: dict[str, Any]  # what the datalist says about the data (rank 0): the model card's
    epoch: int = 0
    global_step: int = 0
    best_acc: float = -1.0
    last_validation: Validation | None = None
    validated_epoch: int | None = None
    epochs_fixed: bool = False  # resumed with the epoch count its time budget fixed: no re-planning


def start_run(context: Context, config: Config, logdir: Path) -> Run:
    """Resume state, precision, model, optimiser, schedule, data and loss of a run, ready for its first epoch (or
    the epoch after the checkpoint it resumes)."""
    state = load_training_state(config.train.checkpoint, config) if config.train.checkpoint else None
    fixed_epochs = budgeted_epochs(state, config)
    if fixed_epochs is not None:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, max_epochs=fixed_epochs))
    precision = run_precision(config, context)
    model, memory_format = prepare_model(build_trainable_model(config, context), config.fast, context.device,
                                         precision.name, training=True)
    optimizer = build_optimizer(model, config.train, fused=config.fast.fused_optimizer)
    scheduler = build_scheduler(optimizer, config.train)
    progress = (0, 0, -1.0)
    if state is not None:
        progress = restore(state, config.train.checkpoint, model, optimizer, scheduler, precision)
        if context.is_main:
            print(f"resumed {config.train.checkpoint}: epoch {progress[0]}, step {progress[1]}, best {progress[2]:.4f}"
                  + (f"; {fixed_epochs} epochs, as its time budget fixed them" if fixed_epochs else ""))
    train_loader, val_loader, sampler = build_loaders(config, context)
    net = DistributedDataParallel(model, device_ids=[context.device.index] if context.device.type == "cuda" else None) \
        if context.distributed else model
    loss_fn, class_weights = build_run_loss(config, context)
    run = Run(config, logdir, model, compile_if_asked(net, config.fast), memory_format, optimizer, scheduler, precision,
              loss_fn, train_loader, val_loader, sampler,
              RunLog(logdir, context.is_main, class_names(config.data, config.model.out_channels)),
              data_facts(config) if context.is_main else {}, *progress, epochs_fixed=fixed_epochs is not None)
    if context.is_main:
        announce(run, context, class_weights)
    return run


def build_run_loss(config: Config, context: Context) -> tuple[nn.Module, list[float] | None]:
    """The loss of the run and its class weights (None without), from the training cases' labels."""
    train_items = with_annotated_classes(load_config_split(config.data, "training"), config.model.out_channels)
    annotated = [item["annotated"] for item in train_items] if "annotated" in train_items[0] else None
    loss, weights = build_loss(config.train, config.model.out_channels, [item["label"] for item in train_items],
                               context.device, annotated)
    if config.model.deep_supervision:
        loss = DeepSupervisionLoss(loss, config.model.spatial_dims)
    return loss, weights


def announce(run: Run, context: Context, class_weights: list[float] | None) -> None:
    """Rank 0: the resolved config (printed and saved in the run folder), precision, model size and layout."""
    config = run.config
    print(config.to_yaml(), end="")
    config.save(run.logdir / "config.yaml", f"{run.precision.describe()} (resolved on this machine)")
    print(run.precision.describe())
    if class_weights is not None:
        print("Dice class weights: " + " ".join(f"{w:.2f}" for w in class_weights))
    crops = micro_batch_size(config.fast, context.device, config.data.num_samples * config.train.batch_size,
                             run.precision.name)
    layout = "channels-last" if run.memory_format == torch.channels_last_3d else "contiguous"
    print(describe_model_size(config.model, config.data.pixdim))
    print(f"training on {context.device} x{context.world_size}, {crops} crop(s) per forward pass, {layout} layout")


def seed_epoch(dataset: Dataset, seed: int, epoch: int) -> None:
    """Seed torch, numpy, Python and the random transforms of ``dataset`` (through ``Subset`` wrappers: a datalist
    that names a case twice gives one) as a function of (seed, epoch): resuming replays the same crops."""
    epoch_seed = seed * 100_003 + epoch
    set_determinism(epoch_seed)
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    transform = getattr(dataset, "transform", None)
    if isinstance(transform, Randomizable):
        transform.set_random_state(seed=epoch_seed % 2**32)


def report_epoch(run: Run, context: Context, loss: float, lr: float, epoch_s: float) -> None:
    """Rank 0: the epoch's line and its scalars in the run's log."""
    if context.is_main:
        print(f"epoch {run.epoch}/{run.config.train.max_epochs}  loss {loss:.4f}  lr {lr:.3g}  step {run.global_step}  "
              f"{epoch_s:.1f}s")
        run.log.scalars(run.epoch, {"train/loss": loss, "train/lr": lr})


def record_validation(run: Run, context: Context, validation: Validation) -> bool:
    """Keep ``validation`` as the run's last and its best score; rank 0 prints and logs it. Returns whether it is a
    new best."""
    run.last_validation, run.validated_epoch = validation, run.epoch
    mean_dice = validation.mean_dice
    improved = mean_dice > run.best_acc
    run.best_acc = max(run.best_acc, mean_dice) if not math.isnan(mean_dice) else run.best_acc
    if context.is_main:
        print(f"validation epoch {run.epoch}: mean organ Dice {mean_dice:.4f}"
              f"{' (new best)' if improved else f'  (best {run.best_acc:.4f})'}")
        run.log.validation(run.epoch, run.global_step, validation.organ_dice, mean_dice)
    return improved


def finish(run: Run, context: Context) -> None:
    run.log.close()
    if context.is_main and run.last_validation is not None:
        print("the validation cases at the last validation:\n"
              + format_summary(run.last_validation.summary(run.log.organs)))
    if context.is_main:
        print(f"done: best mean organ Dice {run.best_acc:.4f}; run folder {run.logdir}")


class EpochHook(Protocol):
    """Something the epoch loop calls after each epoch (the time budget, :class:`~.budget.TimeBudget`)."""

    def validation_wanted(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (1-based) must be validated even where ``val_every`` would not."""

    def after_epoch(self, run: Run, context: Context, epoch_s: float, validation_s: float | None,
                    stop: bool) -> None:
        """After the epoch and its validation, before the resumable state is written; may change ``run.config``
        and ``run.scheduler``."""


def validation_due(run: Run, stop: bool, hooks: Sequence[EpochHook]) -> bool:
    t = run.config.train
    return (run.epoch % t.val_every == 0 or run.epoch == t.max_epochs or stop
            or any(hook.validation_wanted(run.epoch) for hook in hooks))


def final_save_due(run: Run, stop: bool) -> bool:
    t = run.config.train
    return t.save_checkpoint and (run.epoch % t.save_every == 0 or run.epoch >= t.max_epochs or stop)


def fit(run: Run, context: Context, hooks: Sequence[EpochHook] = ()) -> None:
    """The epoch loop: train an epoch, validate when due (``model.pt`` on a new best, the ``--keep_best`` files),
    the hooks (the time budget may change the epoch count), then the resumable state (``model_final.pt``)."""

    def checkpoint(which: str, validation_epoch: int | None) -> dict[str, Any]:
        """Everything that resumes the run, and the card of the validation it reports (best, last, top-k)."""
        return {"epoch": run.epoch, "global_step": run.global_step, "best_acc": float(run.best_acc),
                "state_dict": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(), "scaler": run.precision.scaler.state_dict(),
                "config": run.config.to_dict(), "precision": run.precision.as_dict(),
                "model_card": checkpoint_card(run.facts, run.precision, run.last_validation, run.log.organs, which,
                                              validation_epoch, run.epoch, run.global_step)}

    while run.epoch < run.config.train.max_epochs:
        t = run.config.train  # a hook may have changed the epoch count, never these settings
        if t.seed is not None:
            seed_epoch(run.train_loader.dataset, t.seed, run.epoch)
        if run.sampler is not None:
            run.sampler.set_epoch(run.epoch)
        started = time.time()
        loss, run.global_step = train_one_epoch(run.net, run.train_loader, run.loss_fn, run.optimizer, run.precision,
                                                context, run.epoch, t.max_steps, run.global_step, run.config.fast,
                                                run.memory_format)
        epoch_s, lr = time.time() - started, run.optimizer.param_groups[0]["lr"]
        run.scheduler.step()
        run.epoch += 1
        report_epoch(run, context, loss, lr, epoch_s)
        stop = t.max_steps is not None and run.global_step >= t.max_steps

        validation_s = None
        if validation_due(run, stop, hooks):
            started = time.time()
            validation = validate(run.model, run.val_loader, run.config, run.precision, context)
            validation_s = time.time() - started
            improved = record_validation(run, context, validation)
            if context.is_main and t.save_checkpoint and improved:
                write_checkpoint(run.logdir / "model.pt", checkpoint("best", run.epoch))
            if context.is_main and t.save_checkpoint and t.keep_best:
                new, dropped = keep_best_plan(run.logdir, t.keep_best, run.epoch, run.last_validation.mean_dice)
                if new is not None:  # written before the dropped files go: a crash leaves K + 1, never fewer
                    write_checkpoint(new, checkpoint("top-k", run.epoch))
                for path in dropped:
                    path.unlink(missing_ok=True)

        for hook in hooks:
            hook.after_epoch(run, context, epoch_s, validation_s, stop)
        if context.is_main and final_save_due(run, stop):
            write_checkpoint(run.logdir / "model_final.pt", checkpoint("last", run.validated_epoch))
        if stop:
            break
    finish(run, context)


def run_training(context: Context, config: Config, logdir: Path) -> None:
    """Everything after the checks: resume, model, data, the epoch loop, checkpoints (the folder is locked); with
    ``--time_budget_min`` the budget's hook (unless the run resumed fixed its epochs)."""
    run = start_run(context, config, logdir)
    budgeted = run.config.train.time_budget_min is not None and not run.epochs_fixed
    fit(run, context, [TimeBudget.of(run.config)] if budgeted else [])
