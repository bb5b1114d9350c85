"""The training loop: one detector, optionally distilled from a frozen teacher, on one or many processes.

    ssimkd train --config configs/synthetic-retinanet.toml --set kd.mode=ssim kd.teacher=runs/t/model.pt
    torchrun --nproc_per_node 2 -m ssimkd_kernels train --config ...      # DDP: gloo on CPU, nccl on GPU

Each step: loss = detection loss + kd.weight * feature loss, SGD with linear warm-up and step decay,
optional gradient clipping and AMP (GPU only). Every train.checkpoint_every steps, checkpoint.pt is
replaced atomically; `--resume` continues from it exactly (same weights and logged losses as a run
that was never interrupted). Outputs in train.out: config.toml, metrics.jsonl, loss_curve.png,
checkpoint.pt, model.pt.
"""

from __future__ import annotations

import bisect
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import atomic_save, capture_rng, restore_rng, save_detector, seed_everything
from .config import Config, apply_overrides, from_dict, save_config, to_dict, validate
from .data import build_dataset, steps_per_epoch, train_loader
from .kd import Distiller, build_feature_loss
from .models import build_detector, freeze, load_detector
from .runtime import Runtime, amp_dtype, init_runtime
from .synthetic import ensure_dataset


def lr_factor(step: int, config) -> float:
    """Multiplier of train.lr at a step: linear warm-up from warmup_factor, times lr_gamma per passed lr_step."""
    warm = 1.0
    if step < config.warmup_steps:
        warm = config.warmup_factor + (1.0 - config.warmup_factor) * step / config.warmup_steps
    return warm * config.lr_gamma ** bisect.bisect_right(config.lr_steps, step)


def _move_targets(targets, device):
    return [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]


class MetricsLog:
    """metrics.jsonl of the main process; on resume, records after the checkpoint's step are dropped."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.exists():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line and json.loads(line).get("step", 0) <= resume_step
            ]
            path.write_text("".join(line + "\n" for line in kept))
        elif enabled and resume_step is None:
            path.write_text("")

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class _Window:
    """Sums of the logged values since the last record (tensors, so logging does not sync every step)."""

    def __init__(self):
        self.sums: dict = {}
        self.counts: dict = {}

    def add(self, values: dict) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + (value.detach().float() if torch.is_tensor(value) else value)
            self.counts[key] = self.counts.get(key, 0) + 1

    def means(self, runtime: Runtime) -> dict:
        """Window means; tensor values (losses) are also averaged over processes, timings are rank 0's."""
        keys = sorted(k for k, v in self.sums.items() if torch.is_tensor(v))
        result = {k: v / self.counts[k] for k, v in self.sums.items() if not torch.is_tensor(v)}
        if keys:
            packed = torch.stack([self.sums[k].reshape(()) / self.counts[k] for k in keys])
            if runtime.world_size > 1:
                dist.all_reduce(packed)
                packed /= runtime.world_size
            result.update(zip(keys, packed.cpu().tolist()))
        self.sums, self.counts = {}, {}
        return result


def _build(config: Config, runtime: Runtime, categories: list[dict]):
    """Student, teacher and feature loss, wrapped in a Distiller (and DDP when distributed)."""
    num_classes = len(categories) + 1
    seed_everything(config.train.seed)  # the student's initialisation depends on the seed only
    student = build_detector(config.model, num_classes, min_size=config.data.min_size, max_size=config.data.max_size)
    teacher = feature_loss = None
    if config.kd.mode != "none":
        teacher, _ = load_detector(config.kd.teacher)
        freeze(teacher)
        levels = len(config.model.anchor_sizes)
        feature_loss = build_feature_loss(
            config.kd,
            student_channels=student.backbone.out_channels,
            teacher_channels=teacher.backbone.out_channels,
            num_levels=levels,
        )
    distiller = Distiller(student, feature_loss, teacher).to(runtime.device)
    if teacher is not None:
        teacher.to(runtime.device)
    model = distiller
    if runtime.world_size > 1:
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        model = DistributedDataParallel(distiller, device_ids=device_ids)
    return distiller, model


def _checkpoint_state(
    step, distiller, optimizer, scheduler, scaler, config, categories, runtime, rng: dict | None = None
) -> dict | None:
    """The full training state (on the main process; None elsewhere). RNG states of all processes are
    gathered: this process's current ones, or rng when given."""
    rng = rng if rng is not None else capture_rng()
    if runtime.world_size > 1:
        gathered = [None] * runtime.world_size
        dist.all_gather_object(gathered, rng)
        rng = gathered
    else:
        rng = [rng]
    if not runtime.is_main:
        return None
    return {
        "step": step,
        "model": distiller.student.state_dict(),
        "config": to_dict(config),
        "categories": categories,
        "feature_loss": distiller.feature_loss.state_dict() if distiller.feature_loss is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng,
        "world_size": runtime.world_size,
    }


def _memory_mb(device: torch.device) -> dict:
    """This process's resident memory (and the CUDA allocator's peak on GPUs), in MiB: a long run's
    log shows whether memory grows."""
    memory = {}
    try:
        with open("/proc/self/statm") as f:
            memory["mem_rss_mb"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):  # not Linux
        pass
    if device.type == "cuda":
        memory["mem_cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return memory


def _finite_everywhere(loss: torch.Tensor, runtime: Runtime) -> bool:
    """Whether the loss is finite on every process (all of them must stop together, or DDP hangs)."""
    finite = torch.isfinite(loss.detach()).to(torch.int32)
    if runtime.world_size > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)


def train(config: Config, *, resume=None) -> dict:
    """Train a detector as config says (from scratch, or continuing a checkpoint).

    Args:
        config: the validated Config.
        resume: a checkpoint.pt to continue from (its step, weights, optimizer and RNG states).

    Returns:
        A summary: out folder, steps, final window's losses, mean step time, timings of the teacher
        and the feature loss, and the val metrics when eval ran (main process; others get {}).
    """
    validate(config)
    runtime = init_runtime(config.train.device)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    out = Path(config.train.out)
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        files = ensure_dataset(config.data, progress=config.train.progress)
    runtime.barrier()  # rank 0 generated the synthetic data; the others now find it
    if not runtime.is_main:
        files = ensure_dataset(config.data)
    dataset = build_dataset(files, "train", config.data, seed=config.train.seed)
    distiller, model = _build(config, runtime, dataset.categories)
    params = [p for p in distiller.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=config.train.lr, momentum=config.train.momentum, weight_decay=config.train.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config.train))
    dtype = amp_dtype(config.train.amp, runtime.device)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=dtype == torch.float16)

    step = 0
    # The training stream (Faster R-CNN's RoI sampling, the transform's draws) restarts from the seed and
    # rank here, so it does not depend on how many numbers building the models consumed.
    seed_everything(config.train.seed * 1000 + 1 + runtime.rank)
    if resume is not None:
        state = torch.load(resume, map_location="cpu", weights_only=True)
        if state.get("world_size", 1) != runtime.world_size:
            raise ValueError(
                f"{resume} was written by {state.get('world_size')} processes; resuming with "
                f"{runtime.world_size} would change the data order"
            )
        distiller.student.load_state_dict(state["model"])
        if distiller.feature_loss is not None and state["feature_loss"] is not None:
            distiller.feature_loss.load_state_dict(state["feature_loss"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"][runtime.rank])
        step = int(state["step"])
    first_step = step
    if runtime.is_main:
        save_config(config, out / "config.toml")
    log = MetricsLog(out / "metrics.jsonl", runtime.is_main, step if resume is not None else None)

    loader = train_loader(
        dataset,
        batch_size=config.train.batch_size,
        num_workers=config.data.num_workers,
        num_replicas=runtime.world_size,
        rank=runtime.rank,
        seed=config.train.seed,
    )
    per_epoch = steps_per_epoch(loader)
    end = config.train.steps if not config.train.stop_at else min(config.train.stop_at, config.train.steps)
    bar = None
    if runtime.is_main and config.train.progress:
        from tqdm import tqdm

        bar = tqdm(total=config.train.steps, initial=step, desc=out.name, unit="step", dynamic_ncols=True)
    window, last, step_times = _Window(), {}, []
    distiller.student.train()
    # A forward changes BatchNorm's running statistics before its loss can be checked: each step starts
    # from a copy of them, so a non-finite step can be undone completely.
    buffers = list(distiller.student.buffers())
    buffers_before = [b.clone() for b in buffers]
    while step < end:
        epoch, offset = divmod(step, per_epoch)
        loader.sampler.set_position(epoch, offset * config.train.batch_size)
        tick = time.perf_counter()
        for images, targets in loader:
            distiller.measure = (step + 1) % config.train.log_every == 0
            images = [image.to(runtime.device, non_blocking=True) for image in images]
            targets = _move_targets(targets, runtime.device)
            if buffers:
                torch._foreach_copy_(buffers_before, buffers)
            rng_before = capture_rng()
            with torch.autocast(runtime.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                det_losses, feature_loss = model(images, targets)
            det_loss = sum(det_losses.values())
            loss = det_loss if feature_loss is None else det_loss + config.kd.weight * feature_loss
            if not _finite_everywhere(loss, runtime):
                # Undo the step's forward; weights and optimizer are untouched: save the state after the last good step.
                if buffers:
                    torch._foreach_copy_(buffers, buffers_before)
                state = _checkpoint_state(
                    step, distiller, optimizer, scheduler, scaler, config, dataset.categories, runtime, rng=rng_before
                )
                if state is not None:
                    atomic_save(state, out / "checkpoint.pt")
                raise FloatingPointError(
                    f"loss is {loss.item()} at step {step + 1} (detection {det_loss.item():.4g}"
                    f"{'' if feature_loss is None else f', feature {feature_loss.item():.4g}'}) "
                    f"on rank {runtime.rank} or another; the last good state (step {step}) is in "
                    f"{out / 'checkpoint.pt'}. Try a lower train.lr or a longer warm-up"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            grad_norm = None
            if config.train.grad_clip > 0:
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, config.train.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            step += 1

            # torchvision names RetinaNet's parts "classification", "bbox_regression": log them as loss_*.
            values = {"loss": loss, "loss_det": det_loss}
            values.update({k if k.startswith("loss") else f"loss_{k}": v for k, v in det_losses.items()})
            if feature_loss is not None:
                values["loss_feat"] = feature_loss
            if grad_norm is not None:
                values["grad_norm"] = grad_norm
            if runtime.device.type == "cuda" and distiller.measure:
                torch.cuda.synchronize(runtime.device)
            elapsed = time.perf_counter() - tick
            step_times.append(elapsed)
            values["time_step"] = elapsed
            if distiller.measure or runtime.device.type == "cpu":  # GPU timings are only true when synchronised
                values.update({f"time_{key}": seconds for key, seconds in distiller.timings.items()})
            window.add(values)
            checkpoint_now = config.train.checkpoint_every and step % config.train.checkpoint_every == 0
            stopping = step >= end
            # A record at every checkpoint, too: a resumed run's windows then line up with an uninterrupted one's.
            if step % config.train.log_every == 0 or checkpoint_now or step == config.train.steps:
                last = {"step": step, "epoch": epoch, "lr": lr, **window.means(runtime)}
                last["images_per_s"] = config.train.batch_size * runtime.world_size / max(last["time_step"], 1e-9)
                last.update(_memory_mb(runtime.device))
                log.write(last)
                if bar is not None:
                    shown = {k: f"{last[k]:.3f}" for k in ("loss", "loss_det", "loss_feat") if k in last}
                    bar.set_postfix(shown, refresh=False)
            if checkpoint_now or stopping:
                state = _checkpoint_state(
                    step, distiller, optimizer, scheduler, scaler, config, dataset.categories, runtime
                )
                if state is not None:
                    atomic_save(state, out / "checkpoint.pt")
            if bar is not None:
                bar.update(1)
            if stopping:
                break
            tick = time.perf_counter()
    if bar is not None:
        bar.close()

    summary = {}
    if step >= config.train.steps and runtime.is_main:
        save_detector(out / "model.pt", distiller.student, config, dataset.categories, step=step)
        summary = _finish(config, distiller, out, last, step_times, runtime)
        summary["resumed_from"] = first_step if resume is not None else None
    runtime.barrier()
    return summary


def _finish(config: Config, distiller: Distiller, out: Path, last: dict, step_times: list, runtime: Runtime) -> dict:
    """After the last step (main process): loss curve, evaluation, summary.json."""
    from .evaluate import evaluate_detector
    from .plots import plot_loss_curve

    plot_loss_curve(out / "metrics.jsonl", out / "loss_curve.png", title=out.name)
    # Mean step time without the first steps, which include warm-up of allocators and kernels.
    settled = step_times[min(len(step_times) // 5, 10) :] or step_times
    summary = {
        "out": str(out),
        "steps": config.train.steps,
        "kd_mode": config.kd.mode,
        "last": last,
        "time_step": sum(settled) / max(len(settled), 1),
    }
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    for key in ("time_teacher", "time_feat_fwd"):
        seen = [r[key] for r in records if key in r]
        if seen:
            summary[key] = sum(seen) / len(seen)
    if config.eval.after_train:
        files = ensure_dataset(config.data)
        val = build_dataset(files, "val", config.data)
        metrics = evaluate_detector(
            distiller.student,
            val,
            batch_size=config.eval.batch_size,
            max_images=config.eval.max_images,
            device=runtime.device,
            amp_dtype=amp_dtype(config.train.amp, runtime.device),
            num_workers=config.data.num_workers,
            progress=config.train.progress,
        )
        summary["eval"] = metrics
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": config.train.steps, "eval": metrics}) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def run_train(config_path=None, overrides=(), *, resume=None) -> dict:
    """`ssimkd train`: load the config (or the checkpoint's, when resuming), then train.

    Args:
        config_path: a TOML file or preset name; ignored when resuming (the checkpoint holds its config).
        overrides: `section.field=value` strings, applied last.
        resume: True for train.out/checkpoint.pt, or a path to a checkpoint.pt.

    Returns:
        train()'s summary.
    """
    from .config import load_config

    if resume:
        if resume is True:
            base = load_config(config_path, overrides)
            resume = Path(base.train.out) / "checkpoint.pt"
        if not Path(resume).exists():
            raise FileNotFoundError(f"no checkpoint to resume: {resume} does not exist")
        saved = torch.load(resume, map_location="cpu", weights_only=True)
        config = apply_overrides(from_dict(saved["config"]), overrides)
        if config.train.stop_at and config.train.stop_at <= int(saved["step"]):
            config = apply_overrides(config, [("train.stop_at", 0)])
        validate(config)
        return train(config, resume=resume)
    return train(load_config(config_path, overrides))
