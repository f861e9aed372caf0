"""The one training loop of `svam train-teacher`, `svam distill` and `svam train-policy`.

The loop owns what every trainer needs: the accelerator (mixed precision, gradient accumulation,
DDP and multi-node under `accelerate launch` or `torchrun`, gloo on CPU-only machines), AdamW with a
diffusers LR schedule, gradient clipping, an optional EMA of the weights, logging through
accelerate's TensorBoard tracker, the log / validate / checkpoint cadence, checkpoints
(`svam.checkpoints`: written under a temporary name and renamed when complete, the newest
`checkpoints_total_limit` kept), exact resume and the atomic export. A stage brings what is its
own (`TrainingStage`): the module to train, its loss, its validation and its export.

Exact resume: a checkpoint holds the model, optimizer, LR schedule, EMA and RNG states (accelerate's
`save_state`), the loss history, the stage's own state and the number of micro-batches consumed;
the stage's stream starts after them without reading them again (`svam.data.streaming`), and
every random draw of a step is keyed by (run seed, process, micro step), so the resumed run goes
on exactly as the uninterrupted one would.

Non-finite steps: a step whose loss (on any micro-batch, on any process) or gradient norm is NaN
or Inf is skipped, every process agreeing: no update, no LR or EMA step, counted in
`train/skipped_steps`; `max_nonfinite_steps` of them in a row stop the stage with one line naming
the step and the last good checkpoint.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from torch import nn
from tqdm.auto import tqdm

from svam.atomic import removing_on_failure, replace_dir
from svam.checkpoints import CheckpointDir


@dataclass(frozen=True)
class LoopSettings:
    """The loop's settings, read from a stage's config section (same key names in every stage)."""

    steps: int
    learning_rate: float
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    use_ema: bool = False
    ema_decay: float = 0.999
    log_every: int = 10
    eval_every: int | None = None
    """Validate every this many steps (and after the last); None: only the export validates."""
    checkpoint_every: int = 100
    checkpoints_total_limit: int = 2
    resume: str | None = "latest"
    max_nonfinite_steps: int = 10
    """Optimizer steps in a row whose loss or gradient is NaN/Inf (each skipped: no update) after
    which the stage stops."""

    @classmethod
    def of(cls, section: Any, **changes: Any) -> LoopSettings:
        """The settings a config section holds (keys it lacks keep their defaults)."""
        values = {f.name: getattr(section, f.name) for f in fields(cls) if hasattr(section, f.name)}
        return cls(**{**values, **changes})


class TrainingStage:
    """What a stage brings to the loop. `loop` is set before `setup` is called; the loop's
    accelerator and device are then `self.loop.accelerator` and `self.loop.device`."""

    name: str
    """Shown on the progress bar and at the start of every message."""
    section: str
    """The stage's config section, named in messages (`<section>.resume=null`)."""
    error: type[Exception] = ValueError
    """Raised, with a one-line message, when a checkpoint cannot be resumed."""
    validate_at_start: bool = False
    """Validate before the first step (not on a resume)."""
    loop: TrainingLoop

    def setup(self) -> None:
        """Everything the model needs before it is built (frozen parts, data dims, statistics)."""

    def build(self) -> nn.Module:
        """The module to train, on the loop's device; every parameter that requires grad trains."""
        raise NotImplementedError

    def stream(self, consumed: int) -> Iterator[dict[str, Any]]:
        """The endless stream of training batches, after the first `consumed` micro-batches."""
        raise NotImplementedError

    def loss(
        self, model: nn.Module, batch: dict[str, Any], micro_step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one micro-batch and scalars to log (averaged over each log window)."""
        raise NotImplementedError

    def validate(self, model: nn.Module, step: int) -> dict[str, float]:
        """Validation scalars for the log, with the EMA weights in place if there are any."""
        return {}

    def resume_record(self) -> dict[str, Any]:
        """Settings a checkpoint must have been written with to be resumed (all compared)."""
        return {}

    def state(self) -> dict[str, Any]:
        """The stage's own state to checkpoint (JSON), given back by `load_state` on resume."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        pass

    def export(self, model: nn.Module, step: int, into: Path) -> None:
        """Write the stage's output into the empty directory `into` (main process; every process
        calls it); the loop then puts it in place of the output directory. `model` holds the
        EMA weights if there are any."""
        raise NotImplementedError


class TrainingLoop:
    """One run of a stage: `run()` trains to `settings.steps` (resuming from a checkpoint if
    `settings.resume` names one) and returns the output directory."""

    def __init__(
        self,
        stage: TrainingStage,
        settings: LoopSettings,
        *,
        work_dir: str | Path,
        output_dir: str | Path,
        tb_dir: str | Path | None = None,
    ):
        self.stage, self.settings = stage, settings
        self.work_dir, self.output_dir = Path(work_dir), Path(output_dir)
        self.tb_dir = Path(tb_dir) if tb_dir is not None else None
        self.checkpoints = CheckpointDir(
            self.work_dir / "checkpoints", settings.checkpoints_total_limit
        )
        if settings.resume not in (None, "latest") and not Path(settings.resume).is_dir():
            raise stage.error(f"{stage.section}.resume: no checkpoint directory {settings.resume}")
        self.history: list[float] = []
        """Mean training loss of every optimizer step, resumed steps included."""
        self.metrics: dict[str, dict[int, float]] = {}
        """Every logged scalar by name and step (main process; also in TensorBoard)."""
        self.timing: dict[str, float] = defaultdict(float)
        """Seconds waiting for batches ('data') and in micro steps ('step'); stages add parts."""
        self.ema = None
        self.skipped_steps = 0
        """Optimizer steps skipped for a non-finite loss or gradient (resumed ones included)."""
        self._window_finite = True
        self.last_good_checkpoint: Path | None = None
        """The newest checkpoint written after a step that updated the weights."""
        stage.loop = self

    # ------------------------------------------------------------------------------ the run

    def run(self) -> Path:
        settings, stage = self.settings, self.stage
        tracking = self.tb_dir is not None
        accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision=settings.mixed_precision,
            gradient_accumulation_steps=settings.gradient_accumulation_steps,
            log_with="tensorboard" if tracking else None,
            project_config=ProjectConfiguration(
                project_dir=str(self.tb_dir.parent if tracking else self.work_dir)
            ),
        )
        self.accelerator, self.device = accelerator, accelerator.device
        self.is_main = accelerator.is_main_process
        if self.is_main:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            self.checkpoints.remove_partial()
        if tracking:
            accelerator.init_trackers(self.tb_dir.name)
        stage.setup()
        model = stage.build()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=settings.learning_rate, weight_decay=settings.weight_decay
        )
        from diffusers.optimization import get_scheduler

        # accelerate steps a prepared LR scheduler once per process per optimizer step.
        lr_scheduler = get_scheduler(
            settings.lr_scheduler,
            optimizer,
            num_warmup_steps=settings.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=settings.steps * accelerator.num_processes,
        )
        if settings.use_ema:
            from diffusers.training_utils import EMAModel

            with _quiet():
                self.ema = EMAModel(
                    params, decay=settings.ema_decay, use_ema_warmup=True, power=2 / 3
                )
            self.ema.to(self.device)
            accelerator.register_for_checkpointing(self.ema)
        self.model, self.optimizer, self.lr_scheduler = accelerator.prepare(
            model, optimizer, lr_scheduler
        )
        self.params = params

        step, consumed = self._resume()
        if step == 0 and stage.validate_at_start:
            self._validate(0)
        stream = stage.stream(consumed)
        progress = tqdm(
            total=settings.steps,
            initial=step,
            desc=stage.name,
            unit="step",
            disable=not self.is_main,
        )
        window: dict[str, list[float]] = defaultdict(list)
        step_losses: list[float] = []
        in_a_row = 0
        tick, clips, waited = time.perf_counter(), 0, 0.0
        try:
            while step < settings.steps:
                start = time.perf_counter()
                batch = next(stream)
                waited += time.perf_counter() - start
                self.timing["data"] += time.perf_counter() - start
                loss, scalars = self._micro_step(batch, consumed)
                consumed += 1
                clips += len(batch["key"])
                step_losses.append(loss)
                for name, value in {"train/loss": loss, **scalars}.items():
                    window[name].append(value)
                if not accelerator.sync_gradients:
                    continue
                step += 1
                stepped = self._window_finite
                self._window_finite = True
                if stepped:
                    in_a_row = 0
                    if self.ema is not None:
                        self.ema.step(params)
                else:
                    self.skipped_steps += 1
                    in_a_row += 1
                    self._stop_if_diverged(step, in_a_row)
                window["train/skipped_steps"].append(self.skipped_steps)
                self.history.append(sum(step_losses) / len(step_losses))
                step_losses.clear()
                progress.update(1)
                progress.set_postfix(loss=f"{self.history[-1]:.4f}")
                last = step == settings.steps
                logged = step % settings.log_every == 0 or last
                if logged:
                    elapsed = time.perf_counter() - tick
                    self.log(
                        step,
                        {
                            **{name: sum(values) / len(values) for name, values in window.items()},
                            "train/lr": self.lr_scheduler.get_last_lr()[0],
                            "train/clips_per_s": clips * accelerator.num_processes / elapsed,
                            "train/data_wait_fraction": waited / elapsed,
                        },
                    )
                if settings.eval_every and (step % settings.eval_every == 0 or last):
                    self._validate(step)
                if step % settings.checkpoint_every == 0 or last:
                    saved = self.save_checkpoint(step, consumed)
                    if in_a_row == 0:
                        self.last_good_checkpoint = saved
                if logged:  # throughput windows leave validation and checkpoint time out
                    window.clear()
                    tick, clips, waited = time.perf_counter(), 0, 0.0
        finally:  # also when a stage stops the run
            progress.close()
        return self._export(step)

    def _micro_step(self, batch: dict[str, Any], micro_step: int) -> tuple[float, dict[str, float]]:
        """Forward/backward of one batch; the optimizer steps when accumulation is complete."""
        accelerator, start = self.accelerator, time.perf_counter()
        with accelerator.accumulate(self.model):
            loss, scalars = self.stage.loss(self.model, batch, micro_step)
            # Every process takes the same branch: DDP's gradient all-reduce needs all of them.
            finite = self._everywhere(torch.isfinite(loss.detach()))
            self._window_finite &= finite
            if finite:
                accelerator.backward(loss)
            if accelerator.sync_gradients and self._window_finite:
                norm = (
                    accelerator.clip_grad_norm_(self.params, self.settings.max_grad_norm)
                    if self.settings.max_grad_norm
                    else torch.stack(
                        [p.grad.detach().norm() for p in self.params if p.grad is not None]
                    ).norm()
                )
                self._window_finite &= self._everywhere(torch.isfinite(norm))
            if accelerator.sync_gradients and self._window_finite:
                self.optimizer.step()
                self.lr_scheduler.step()
            if accelerator.sync_gradients:
                self.optimizer.zero_grad(set_to_none=True)
        self.timing["step"] += time.perf_counter() - start
        return loss.detach().item(), scalars

    def _everywhere(self, flag: torch.Tensor) -> bool:
        """Whether `flag` (a bool tensor) holds on every process."""
        flag = flag.to(self.device, torch.float32).reshape(1)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum") / self.accelerator.num_processes
        return bool(flag.item() == 1.0)

    def _stop_if_diverged(self, step: int, in_a_row: int) -> None:
        if in_a_row < self.settings.max_nonfinite_steps:
            return
        good = self.last_good_checkpoint
        where = f"the last good checkpoint is {good}" if good else "no good checkpoint was written"
        raise self.stage.error(
            f"{self.stage.name}: {in_a_row} steps in a row with a non-finite loss or gradient, "
            f"the last at step {step} ({self.skipped_steps} skipped in all); {where}: lower "
            f"{self.stage.section}.learning_rate or set {self.stage.section}.max_grad_norm"
        )

    # ------------------------------------------------------------------ validation and logs

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """The EMA weights in the model for the duration (no-op without EMA)."""
        if self.ema is None:
            yield
            return
        params = list(self.unwrapped.parameters())
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    def _validate(self, step: int) -> None:
        with self.ema_weights():
            scalars = self.stage.validate(self.unwrapped, step)
        self.log(step, scalars)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Scalars to TensorBoard and `metrics` (main process)."""
        if not self.is_main or not scalars:
            return
        for name, value in scalars.items():
            self.metrics.setdefault(name, {})[step] = value
        if self.tb_dir is not None:
            self.accelerator.log(scalars, step=step)

    @property
    def tensorboard(self):
        """The TensorBoard SummaryWriter (main process, with a `tb_dir`), for images and curves."""
        if self.tb_dir is None or not self.is_main:
            return None
        return self.accelerator.get_tracker("tensorboard", unwrap=True)

    # ---------------------------------------------------------------- checkpoints and export

    def _record(self, step: int, consumed: int) -> dict[str, Any]:
        return {
            "step": step,
            "micro_step": consumed,
            "num_processes": self.accelerator.num_processes,
            **self.stage.resume_record(),
            "history": self.history,
            "skipped_steps": self.skipped_steps,
            "stage_state": self.stage.state(),
        }

    def save_checkpoint(self, step: int, consumed: int) -> Path:
        with _quiet():
            return self.checkpoints.save(self.accelerator, step, self._record(step, consumed))

    def _resume(self) -> tuple[int, int]:
        """Load the checkpoint `settings.resume` names; (step, micro-batches consumed)."""
        stage = self.stage
        try:
            found = self.checkpoints.to_resume(self.settings.resume)
        except FileNotFoundError as exc:
            raise stage.error(str(exc)) from exc
        if found is None:
            return 0, 0
        path, state = found
        expected = {"num_processes": self.accelerator.num_processes, **stage.resume_record()}
        for key, value in expected.items():
            if state.get(key) != value:
                shown, now = state.get(key), value
                if isinstance(value, dict | list):
                    shown, now = "a different config", "this one"
                raise stage.error(
                    f"{path}: written with {key}={shown}, this run has {now}; set "
                    f"{stage.section}.resume=null (or another output_dir) to start over"
                )
        with _quiet():
            self.accelerator.load_state(str(path))
        self.history = list(state.get("history", []))
        self.skipped_steps = state.get("skipped_steps", 0)
        stage.load_state(state.get("stage_state", state))
        self.last_good_checkpoint = path
        if self.is_main:
            tqdm.write(f"{stage.name}: resumed from {path} (step {state['step']})")
        return state["step"], state["micro_step"]

    def _export(self, step: int) -> Path:
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        model = self.unwrapped
        if self.ema is not None:
            self.ema.copy_to(model.parameters())
        tmp = self.output_dir.with_name(self.output_dir.name + ".tmp")
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        with removing_on_failure(self.output_dir, tmp):
            self.stage.export(model, step, tmp)
            if self.is_main:
                replace_dir(tmp, self.output_dir)
        for tracker in accelerator.trackers:  # not end_training: it ends the process group
            tracker.finish()
        accelerator.wait_for_everyone()
        return self.output_dir


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence accelerate's and diffusers' info chatter around checkpoint I/O and EMA set-up."""
    import warnings

    loggers = [logging.getLogger(name) for name in ("accelerate", "diffusers")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
