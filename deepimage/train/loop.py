"""Training: config -> distributed init -> data -> model -> optimizer and sync -> resume -> loop.

Exact resume is the contract. A checkpoint holds the weights, optimizer, schedule, position
within the epoch, partial epoch statistics and the RNG state; the data order and every
augmentation are pure functions of (seed, epoch, image), so a run killed at any instant and
resumed from its last checkpoint ends with weights bitwise identical to an uninterrupted run.

Under torchrun the same loop runs data-parallel: every global batch (``batch_size`` images,
the same sequence for any number of processes) is cut into equal contiguous slices, one per
rank; a gradient-sync strategy (:mod:`deepimage.parallel`) makes the update the mean over the
global batch; dropout masks are keyed by image, so the weights do not depend on the number
of processes. Checkpoints hold the full (unsharded) state and are written by rank 0 alone,
so a run resumes on any number of processes; torchrun restarts resume automatically.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from deepimage.allocator import retain_freed_memory
from deepimage.augment.pipeline import build_train_augment
from deepimage.config import ConfigError, TrainConfig, config_to_dict, save_config
from deepimage.data.cache import default_cache_dir, store_for
from deepimage.data.loader import (
    DeviceCache,
    decode_batches,
    eval_batches,
    input_path,
    iterate_batches,
    rank_rows,
    stratified_split,
    train_batches,
)
from deepimage.data.store import Store
from deepimage.data.transforms import center_crop, to_model_input
from deepimage.files import atomic_write_json, atomic_write_text
from deepimage.inference import evaluate_batches, resolve_device
from deepimage.metrics import ClassificationMeter
from deepimage.models import get_model
from deepimage.models.common import deferred_fc_init, init_from_data, needs_data_init
from deepimage.models.transfer import (
    FinetuneReport,
    SourceWeights,
    SourceWeightsError,
    TrainableError,
    prepare_model,
)
from deepimage.parallel import dist as pdist
from deepimage.parallel.base import broadcast_model
from deepimage.parallel.build import build_sync, strategy_class
from deepimage.parallel.head import HybridHead, shard_classifier
from deepimage.parallel.optim import set_lr
from deepimage.parallel.stop_vote import StopVote
from deepimage.parallel.sync_bn import convert_sync_batchnorm
from deepimage.precision import ExecutionChoice, needs_grad_scaler
from deepimage.precision import resolve as resolve_execution
from deepimage.rng import Stream, permutation, seed_global
from deepimage.runmeta import Preprocess, RunMeta
from deepimage.runs import (
    CHECKPOINT,
    FINETUNE_REPORT,
    CheckpointError,
    Run,
    load_latest_state,
    read_weights,
    save_state,
)
from deepimage.train.agree import check_same_state, open_data_everywhere
from deepimage.train.lookahead import Lookahead
from deepimage.train.schedule import LRSchedule
from deepimage.train.step import forward_backward

logger = logging.getLogger(__name__)


class RunExistsError(RuntimeError):
    """The output folder already holds a run and --resume was not given."""


@dataclass
class TrainData:
    """Where the training and validation images live (rows of prepared stores)."""

    train_store: Store
    train_rows: np.ndarray
    val_store: Store
    val_rows: np.ndarray

    @property
    def classes(self) -> list[str]:
        return list(self.train_store.classes)

    @property
    def skipped(self) -> list[dict[str, str]]:
        seen, out = set(), []
        for item in [*self.train_store.skipped, *self.val_store.skipped]:
            if item["path"] not in seen:
                seen.add(item["path"])
                out.append(item)
        return out


def prepare_data(cfg: TrainConfig) -> TrainData:
    """Open or prepare the stores, then split off validation rows if no --val was given."""
    if cfg.data is None:
        raise ValueError("config key 'data': no training data given (--data DIR)")
    store_kwargs = {
        "mode": cfg.resize_mode,
        "cache_dir": cfg.cache_dir,
        "max_pixels": cfg.max_pixels,
        "progress": cfg.progress,
        "class_names_file": cfg.class_names,
    }
    train_store = store_for(cfg.data, [cfg.size], **store_kwargs)
    if cfg.val is not None:
        val_store = store_for(cfg.val, [cfg.size], **store_kwargs)
        if list(val_store.classes) != list(train_store.classes):
            raise ValueError(
                f"validation classes of {cfg.val} differ from the training classes of {cfg.data}"
            )
        return TrainData(
            train_store, np.arange(len(train_store)), val_store, np.arange(len(val_store))
        )
    train_rows, val_rows = stratified_split(train_store.labels, cfg.val_split, cfg.seed)
    return TrainData(train_store, train_rows, train_store, val_rows)


def run_meta(
    cfg: TrainConfig, model: torch.nn.Module, classes: list[str], class_names: dict[str, str]
) -> RunMeta:
    """What predict, evaluate and serve need to rebuild the model and its preprocessing."""
    return RunMeta(
        model=cfg.model,
        classes=tuple(classes),
        preprocess=Preprocess(
            size=cfg.size,
            crop=cfg.crop,
            mean=tuple(float(m) for m in model.mean),
            std=tuple(float(s) for s in model.std),
            resize_mode=cfg.resize_mode,
            precision=cfg.precision,
            channels_last=bool(cfg.channels_last),
        ),
        model_kwargs={"width": cfg.width, "dropout": cfg.dropout},
        class_names=class_names,
        tta=tuple(cfg.tta),  # what `deepimage evaluate` applies unless told otherwise
    )


def start_model(model: torch.nn.Module, cfg: TrainConfig, classes: list[str]) -> FinetuneReport:
    """Apply ``init_from`` (the source run's weights) and ``trainable`` to a fresh model."""
    source = None
    if cfg.init_from is not None:
        tensors, meta = read_weights(cfg.init_from)
        source = SourceWeights(cfg.init_from, tensors, list(meta.classes), meta.model)
    try:
        return prepare_model(model, classes, cfg.trainable, source)
    except TrainableError as err:
        raise ConfigError(str(err)) from None
    except SourceWeightsError as err:
        raise CheckpointError(str(err)) from None


class _StopFlag:
    """Set by SIGINT/SIGTERM; the loop checkpoints at a step boundary and exits.

    Under torchrun the ranks agree through a :class:`StopVote`: all of them stop after the
    same step, a couple of steps after the first rank saw the signal."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("stop requested: saving a checkpoint at the end of a step")

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def restore_cuda_rng(saved: Any, device: torch.device) -> None:
    """Restore the saved CUDA generator state onto ``device`` alone.

    ``saved`` is one state (this format) or, from older checkpoints, rank 0's list over all
    of its GPUs, of which its own (the first) is taken: the host that resumes may have fewer
    GPUs, and each rank owns only its own generator.
    """
    if saved is None or device.type != "cuda":
        return
    if isinstance(saved, list | tuple):
        if not saved:
            return
        saved = saved[0]
    torch.cuda.set_rng_state(saved, device)


class Trainer:
    """Owns the model, optimizer, schedule and run folder of one training run."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg.validate()
        if cfg.out is None:
            raise ValueError("config key 'out': no run folder given (--out RUN)")
        self.run = Path(cfg.out)
        self.device = pdist.init_distributed(resolve_device(cfg.device), cfg.dist_timeout)
        self.rank, self.world = pdist.rank(), pdist.world_size()
        if cfg.batch_size % (self.world * cfg.accum_steps):
            raise ConfigError(
                f"config key 'batch_size': {cfg.batch_size} images per step cannot be split "
                f"evenly into {self.world} processes x {cfg.accum_steps} micro-batches"
            )
        self.local_batch = cfg.batch_size // self.world
        seed_global(cfg.seed)  # weight init; every other draw is keyed (deepimage.rng)
        self.data = open_data_everywhere(lambda: prepare_data(cfg), cfg.data)
        self.classes = self.data.classes
        self.num_classes = len(self.classes)
        finetune = cfg.init_from is not None or cfg.trainable != "all"
        sharded_fc = strategy_class(cfg).shards_fc_layers  # hybrid: never a whole FC layer
        with deferred_fc_init(sharded_fc and not finetune):
            self.model = get_model(
                cfg.model,
                num_classes=self.num_classes,
                image_size=cfg.crop,
                width=cfg.width,
                dropout=cfg.dropout,
            )
        self.finetune_report = None  # fine-tuning: start weights and frozen layers
        if finetune:
            self.finetune_report = start_model(self.model, cfg, self.classes)
        if sharded_fc:
            shard_classifier(self.model)  # this rank's rows of every FC layer, built alone
        self.model.to(self.device)
        self.execution = self._choose_execution()
        cfg = self.cfg = dataclasses.replace(
            cfg, precision=self.execution.precision, channels_last=self.execution.channels_last
        )
        self.meta = run_meta(cfg, self.model, self.classes, dict(self.data.train_store.class_names))
        self.preprocess = self.meta.preprocess  # validation sees what inference will
        if cfg.sync_bn and self.world > 1:
            if self.device.type == "cuda":  # NCCL: torch's fused kernels
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            else:  # torch's SyncBatchNorm refuses CPU tensors
                self.model = convert_sync_batchnorm(self.model)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        self.device_cache = self._device_cache()
        self.sync = build_sync(cfg, self.model)  # broadcast, split, optimizer, strategy
        self.optimizer = self.sync.optimizer
        self.scaler = None  # fp16: loss scaling, checkpointed with the rest
        if needs_grad_scaler(cfg.precision):
            self.scaler = torch.amp.GradScaler(self.device.type)
        self.train_model = self.sync.wrap()
        self.augment = build_train_augment(
            cfg.augment,
            size=cfg.size,
            crop=cfg.crop,
            seed=cfg.seed,
            mean=self.preprocess.mean,
            std=self.preprocess.std,
            stats=self.data.train_store.stats,
            device=self.device,
        )
        self.steps_per_epoch = len(self.data.train_rows) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"config key 'batch_size': {cfg.batch_size} exceeds the "
                f"{len(self.data.train_rows)} training images"
            )
        self.schedule = LRSchedule(cfg, self.steps_per_epoch)
        self.lookahead = None  # slow weights (airbench), checkpointed
        if cfg.lookahead_every:
            self.lookahead = Lookahead(
                self.model, cfg.lookahead_every, cfg.lookahead_decay, self.schedule.total_steps
            )
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.meter = ClassificationMeter(self.num_classes)
        self.loss_sum = 0.0
        self.epoch_images = 0
        self.history: list[dict[str, Any]] = []
        self.writer = None

    def _choose_execution(self) -> ExecutionChoice:
        """Resolve ``auto`` precision and layout; rank 0 decides (it may probe) for all."""
        cfg = self.cfg
        choice = None
        probe = self.model
        if isinstance(getattr(self.model, "classifier", None), HybridHead):  # collective head
            probe = torch.nn.Sequential(
                self.model.features, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(1)
            )
        if self.rank == 0:
            choice = resolve_execution(
                cfg.precision,
                cfg.channels_last,
                self.device,
                probe,
                f"{cfg.model}@{cfg.width:g}",
                cfg.crop,
                Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(),
                fp16_ok=strategy_class(cfg).supports_fp16_scaler,
            )
        choice = pdist.broadcast_object(choice, op="broadcast(precision choice)")
        if self.rank == 0:
            logger.info("%s", choice.describe())
        return choice

    def _device_cache(self) -> DeviceCache | None:
        """The training images in device memory when they fit ``device_cache_mb``."""
        budget = self.cfg.device_cache_mb * 2**20
        if budget <= 0:
            return None
        cfg, store = self.cfg, self.data.train_store
        lo, hi = self.rank * self.local_batch, (self.rank + 1) * self.local_batch
        rows = rank_rows(self.data.train_rows, cfg.batch_size, cfg.seed, range(cfg.epochs), lo, hi)
        need = DeviceCache.nbytes(store, cfg.size, rows)
        if need > budget:
            logger.info(
                "training images need %.0f MiB, over device_cache_mb %.0f: reading the store",
                need / 2**20,
                cfg.device_cache_mb,
            )
            return None
        logger.info(
            "holding %d training images (%s) in %s memory (%.0f MiB)",
            len(rows),
            store.encoding,
            self.device,
            need / 2**20,
        )
        return DeviceCache(store.path, cfg.size, rows, self.device)

    def _loader(self, todo: list[np.ndarray]):
        """The epoch's batches (this rank's slices) and whether they come augmented."""
        cfg, store = self.cfg, self.data.train_store
        path = input_path(self.device, store.encoding, self.device_cache is not None)
        if path == "cache":
            return self.device_cache.iterate(todo), False
        pin = self.device.type == "cuda"
        if path == "device-decode":
            blobs = iterate_batches(store.path, cfg.size, todo, cfg.workers, pin, encoded=True)
            return decode_batches(blobs, self.device), False
        if path == "worker-augment":
            transform = self.augment.for_epoch(self.epoch)
            return iterate_batches(
                store.path, cfg.size, todo, cfg.workers, transform=transform
            ), True
        return iterate_batches(store.path, cfg.size, todo, cfg.workers, pin_memory=pin), False

    # --- state -------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """The full training state, the same for any world size (collective under torchrun)."""
        self.sync.flush()
        optimizer = self.sync.state_dict()
        self._reduce_epoch_stats()
        meter, loss_sum, epoch_images = (
            self.meter.state_tensors(),
            self.loss_sum,
            self.epoch_images,
        )
        self._keep_stats_on_root()
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":  # this rank's GPU only: hosts differ in GPU count
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "version": 1,
            "model": self.sync.model_state_dict(),
            "optimizer": optimizer,
            "schedule": self.schedule.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "meter": meter,
            "loss_sum": loss_sum,
            "epoch_images": epoch_images,
            "rng": rng,
            "config": json.dumps(config_to_dict(self.cfg)),
            **({"grad_scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
            **({"lookahead": self.lookahead.state_dict()} if self.lookahead is not None else {}),
        }

    def load(self, state: dict[str, Any]) -> None:
        self.sync.load_model_state_dict(state["model"])
        self.sync.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.meter.load_state_tensors(list(state["meter"]))
        self.loss_sum = float(state["loss_sum"])
        self.epoch_images = int(state["epoch_images"])
        self._keep_stats_on_root()  # the saved statistics are global: count them once
        if self.scaler is not None:
            if "grad_scaler" not in state:
                raise CheckpointError(
                    f"{self.run / CHECKPOINT}: no gradient-scaler state for fp16 training"
                )
            self.scaler.load_state_dict(state["grad_scaler"])
        if self.lookahead is not None:
            if "lookahead" not in state:
                raise CheckpointError(f"{self.run / CHECKPOINT}: no lookahead state")
            self.lookahead.load_state_dict(state["lookahead"])
        torch.set_rng_state(state["rng"]["cpu"])
        restore_cuda_rng(state["rng"].get("cuda"), self.device)

    def save_checkpoint(self) -> None:
        state = self.state()  # sharded parts stream to rank 0, which writes
        save_state(self.run / CHECKPOINT, state, write=self.rank == 0)

    def _reduce_epoch_stats(self) -> None:
        """Sum the epoch's statistics over ranks; afterwards every rank holds the totals."""
        if self.world == 1:
            return
        pdist.all_reduce_meter(self.meter)
        loss_sum, images = pdist.all_reduce_scalars([self.loss_sum, self.epoch_images])
        self.loss_sum, self.epoch_images = loss_sum, int(round(images))

    def _keep_stats_on_root(self) -> None:
        """After a reduction, only rank 0 keeps the totals, so the next sum counts them once."""
        if self.rank != 0:
            self.meter = ClassificationMeter(self.num_classes)
            self.loss_sum, self.epoch_images = 0.0, 0

    # --- run folder ----------------------------------------------------------------------

    def _open_run(self, resume: bool) -> None:
        exists = None
        if self.rank == 0:  # rank 0's folder decides, so that every rank fails alike
            exists = Run(self.run).started()
        exists = pdist.broadcast_object(exists, op="broadcast(run exists)")
        if exists and not resume:
            raise RunExistsError(
                f"{self.run} already holds a run: pass --resume to continue it, "
                "or choose another --out"
            )
        if self.rank == 0:
            self.run.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run / "config.yaml", comment=self.execution.describe())
        lazy = self.sync.stored_lazily  # sharded tensors: each rank reads only its rows
        state = load_latest_state(self.run, lazy) if resume else None
        check_same_state(state, self.run)
        if state is not None:
            self.load(state)
            logger.info(
                "resumed %s at epoch %d, step %d of %d",
                self.run,
                self.epoch + 1,
                self.step_in_epoch,
                self.steps_per_epoch,
            )
        elif resume:
            logger.info("nothing to resume in %s: starting afresh", self.run)
        if state is None and needs_data_init(self.model) and self.cfg.init_from is None:
            self._init_from_data()
        if self.rank != 0:
            return
        pdist.mark_run_opened()  # a restart of this torchrun job resumes this run
        self.history = self._read_history(keep_before=self.epoch)
        self._write_history()
        if self.cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(
                    str(self.run / "tb"), purge_step=self.epoch + 1 if resume else None
                )
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                logger.warning("tensorboard is not installed: no TensorBoard logs")

    def _init_from_data(self) -> None:
        """Set the model's data-dependent first layer (patch whitening) from
        ``data_init_images`` training images, centre-cropped and normalised, chosen by
        (seed, :attr:`Stream.DATA_INIT`) alone; rank 0's result goes to every rank. Only a
        fresh run does this: a resumed one takes the weights from its checkpoint."""
        cfg, rows = self.cfg, self.data.train_rows
        n = min(cfg.data_init_images, len(rows))
        chosen = np.sort(rows[permutation(cfg.seed, 0, len(rows), Stream.DATA_INIT)[:n]])
        batches = iterate_batches(
            self.data.train_store.path, cfg.size, np.array_split(chosen, -(-n // 500)), 0
        )
        mean, std = self.preprocess.mean, self.preprocess.std
        cpu = torch.device("cpu")
        inputs = (to_model_input(center_crop(images, cfg.crop), mean, std, cpu, False)
                  for images, _labels, _rows in batches)  # fmt: skip
        init_from_data(self.model, inputs)
        broadcast_model(self.model)
        if self.lookahead is not None:
            self.lookahead.reset()
        logger.info("initialised the whitening layer from %d training images", n)

    def _read_history(self, keep_before: int) -> list[dict[str, Any]]:
        path = self.run / "metrics.jsonl"
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if row.get("epoch", 0) <= keep_before and not row.get("partial"):
                rows.append(row)
        return rows

    def _write_history(self) -> None:
        if self.rank != 0:
            return
        text = "".join(json.dumps(row) + "\n" for row in self.history)
        atomic_write_text(self.run / "metrics.jsonl", text)

    # --- the loop ------------------------------------------------------------------------

    def _train_step(
        self, images: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, augmented: bool
    ):
        cfg = self.cfg
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        x = images if augmented else self.augment(images, rows.numpy(), self.epoch)
        if not cfg.channels_last:
            x = x.contiguous()
        # the strategy's hooks exchange gradients inside backward: a lost peer surfaces here
        with pdist.guard("gradient exchange in forward/backward", backend_errors_only=True):
            loss_total, logits = forward_backward(
                self.train_model,
                x,
                labels,
                accum_steps=cfg.accum_steps,
                precision=cfg.precision,
                label_smoothing=cfg.label_smoothing,
                micro_step=self.sync.micro_step,
                dropout_key=(rows, cfg.seed, self.global_step),
                scaler=self.scaler,
            )
        if self.scaler is not None:  # fp16 (supports_fp16_scaler): unscale, skip on inf, adapt
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.sync.step()
        self.sync.zero_grad()
        if self.lookahead is not None:
            self.lookahead.after_step(self.global_step + 1)
        self.meter.update(logits.cpu(), labels.cpu())
        self.loss_sum += loss_total
        self.epoch_images += len(x)
        return loss_total / len(x)

    def validate(self) -> dict[str, float] | None:
        """Top-1/top-5 on the validation rows, each image counted once over all ranks."""
        if len(self.data.val_rows) == 0:
            return None
        self.sync.flush()
        shard = np.array_split(self.data.val_rows, self.world)[self.rank]  # no padding
        batches = eval_batches(shard, max(1, self.cfg.batch_size // self.world))
        if self.sync.collective_forward:  # e.g. hybrid's split head: equal batch counts
            batches = np.array_split(shard, -(-len(self.data.val_rows) // self.cfg.batch_size))
        meter, _ = evaluate_batches(
            self.model,
            iterate_batches(self.data.val_store.path, self.cfg.size, batches, self.cfg.workers),
            self.num_classes,
            self.preprocess,
            self.device,
            total=len(batches),
            progress=self.cfg.progress and self.rank == 0,
            desc="validate",
        )
        pdist.all_reduce_meter(meter)
        return meter.results()

    def _end_epoch(self, seconds: float, partial: bool) -> dict[str, Any]:
        self._reduce_epoch_stats()
        train = self.meter.results()
        val = self.validate()
        row = {
            "epoch": self.epoch + 1,
            "step": self.global_step,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": self.loss_sum / max(1, self.epoch_images),
            "train_top1": train["top1"],
            "train_top5": train["top5"],
            "val_top1": val["top1"] if val else None,
            "val_top5": val["top5"] if val else None,
            "images_per_s": self.epoch_images / seconds if seconds > 0 else None,
            "epoch_s": seconds,  # wall time of the epoch's steps, validation not included
            "train_s": seconds + (self.history[-1].get("train_s") or 0.0 if self.history else 0.0),
        }
        if partial:
            row["partial"] = True
        self._keep_stats_on_root()
        self.history.append(row)
        self._write_history()
        if self.writer is not None:
            for key, value in row.items():
                if key not in ("epoch", "partial") and value is not None:
                    self.writer.add_scalar(key, value, self.epoch + 1)
            self.writer.flush()
        logger.info(
            "epoch %d: loss %.4f  train top1 %.3f top5 %.3f  val top1 %s top5 %s  lr %.3g",
            row["epoch"],
            row["train_loss"],
            row["train_top1"],
            row["train_top5"],
            "-" if val is None else f"{val['top1']:.3f}",
            "-" if val is None else f"{val['top5']:.3f}",
            row["lr"],
        )
        return row

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train to the end (or to max_steps), writing everything into the run folder."""
        cfg = self.cfg
        self._open_run(resume)
        self.model.train()
        stopped = False
        vote = StopVote()  # ranks agree on a stop without a blocking collective per step
        with _StopFlag() as stop:
            while self.epoch < cfg.epochs and not self._done():
                batches = train_batches(self.data.train_rows, cfg.batch_size, cfg.seed, self.epoch)
                todo = batches[self.step_in_epoch :]
                if cfg.max_steps is not None:
                    todo = todo[: cfg.max_steps - self.global_step]
                lo, hi = self.rank * self.local_batch, (self.rank + 1) * self.local_batch
                todo = [batch[lo:hi] for batch in todo]  # this rank's slice of each batch
                loader, augmented = self._loader(todo)
                bar = tqdm(
                    loader,
                    total=len(todo),
                    initial=0,
                    desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                    disable=not cfg.progress or self.rank != 0,
                    dynamic_ncols=True,
                )
                start = time.perf_counter()
                halt = False
                for images, labels, rows in bar:
                    lr = self.schedule.lr_at(self.epoch, self.step_in_epoch)
                    set_lr(self.optimizer, lr, self.epoch)
                    loss = self._train_step(images, labels, rows, augmented)
                    self.step_in_epoch += 1
                    self.global_step += 1
                    elapsed = time.perf_counter() - start
                    images_s = self.epoch_images * self.world / elapsed
                    bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{images_s:.0f}")
                    if cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0:
                        self.save_checkpoint()
                    if vote.cast(stop.requested):
                        halt = True
                        break
                bar.close()
                halt = vote.settle() or halt  # the votes still in flight, the same on all ranks
                if halt:
                    stop.requested = True
                    self.save_checkpoint()
                    stopped = True
                    break
                self.sync.flush()  # the epoch's time includes its last deferred exchanges
                seconds = time.perf_counter() - start
                finished_epoch = self.step_in_epoch >= self.steps_per_epoch
                if not finished_epoch:  # max_steps reached inside the epoch
                    self._end_epoch(seconds, partial=True)
                    self.save_checkpoint()
                    break
                row = self._end_epoch(seconds, partial=False)
                self.schedule.end_epoch(
                    self.epoch,
                    row["val_top1"] if row["val_top1"] is not None else row["train_top1"],
                )
                self.epoch += 1
                self.step_in_epoch = 0
                self.meter = ClassificationMeter(self.num_classes)
                self.loss_sum, self.epoch_images = 0.0, 0
                self.save_checkpoint()
                self._draw_curves()
        if self.writer is not None:
            self.writer.close()
        if stopped:
            logger.warning("stopped at step %d; continue with --resume", self.global_step)
            return {"stopped": True, "global_step": self.global_step}
        return self._finish()

    def _done(self) -> bool:
        return self.cfg.max_steps is not None and self.global_step >= self.cfg.max_steps

    def _draw_curves(self) -> None:
        from deepimage.report import plot_curves, plot_time_to_accuracy, time_to_accuracy

        if self.rank != 0:
            return
        try:
            plot_curves(self.history, self.run / "curves.png")
            if time_to_accuracy(self.history)[0]:
                plot_time_to_accuracy(self.history, self.run / "time_to_accuracy.png")
        except Exception as err:  # a plot must never end a training run
            logger.warning("could not draw the curves: %s", err)

    def _finish(self) -> dict[str, Any]:
        self.sync.flush()
        weights = self.sync.model_state_dict()  # full, unsharded; sharded parts stream
        Run(self.run).save_weights(weights, self.meta, write=self.rank == 0)
        last = self.history[-1] if self.history else {}
        summary = {
            "model": self.cfg.model,
            "classes": self.classes,
            "class_names": dict(self.meta.class_names),
            "n_train_images": int(len(self.data.train_rows)),
            "n_val_images": int(len(self.data.val_rows)),
            "skipped": self.data.skipped,
            "epochs": self.epoch,
            "steps": self.global_step,
            "val_top1": last.get("val_top1"),
            "val_top5": last.get("val_top5"),
            "train_top1": last.get("train_top1"),
            "train_top5": last.get("train_top5"),
            "execution": self.execution.to_dict(),
        }
        if self.rank == 0:
            atomic_write_json(self.run / "summary.json", summary)
            self._draw_curves()
        pdist.barrier("barrier(finish)")
        return summary

    def close(self) -> None:
        """Remove the sync strategy's hooks."""
        self.sync.close()


def train(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train as configured; returns the run summary (also in ``RUN/summary.json``).

    Under torchrun, a restarted job (``--max-restarts``) resumes from the last checkpoint
    once an earlier attempt of the same job opened the run folder (agreed by all ranks).
    A fine-tuning run (``init_from`` or ``trainable``) also writes ``RUN/finetune.json``, and
    its summary holds the same report under ``"finetune"``.
    """
    retain_freed_memory()  # the same large tensors every step: keep their pages mapped
    trainer = Trainer(cfg)
    try:
        report = trainer.finetune_report  # fine-tuning: what was replaced and frozen
        folder = Run(cfg.out)
        if report is not None and trainer.rank == 0 and (resume or not folder.started()):
            folder.write_json(FINETUNE_REPORT, report.as_dict())
        summary = trainer.fit(resume=resume or pdist.job_restarted_after_open())
        if report is not None:
            summary = {**summary, "finetune": report.as_dict()}
        return summary
    finally:
        trainer.close()
        pdist.destroy()
