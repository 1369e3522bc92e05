"""The trainer: runs a :mod:`bnnc.recipes` recipe, resumable, single-process or DDP.

``fit(recipe)`` trains every stage of a recipe (two-step recipes: step 1 with real-valued weights, step 2
initialised from step 1). Each epoch, and every ``save_every`` optimizer steps, it writes ``last.pt``
atomically with everything a bit-identical resume needs: model, optimizer, LR scheduler, RNG states
(torch, CUDA, NumPy, Python, per rank), the position in the epoch's sample order and the quantizers'
per-epoch schedule values. Per-epoch metrics go to ``metrics.csv`` / ``metrics.json`` (and TensorBoard
when ``torch.utils.tensorboard`` imports), per-step loss and LR to ``steps.csv``.

Under ``torchrun`` (``WORLD_SIZE`` > 1) it joins the process group (gloo on CPU, nccl on CUDA), wraps the
model in ``DistributedDataParallel``, shards the epoch's order with a ``DistributedSampler`` (per-rank
batch = global batch / world size) and writes files from rank 0 only.

``train(model, dataset, ...)`` is the short form for a zoo model and its registered ``Recipe``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import BnncError, ModelFormatError
from .quantizers import ActivationQuantizer, NotExportableError, WeightQuantizer
from .recipes import LossSpec, OptimizerSpec, ScheduleSpec, Stage, TrainRecipe, lr_factor
from .util import atomic_path

__all__ = ["train", "fit", "save_checkpoint", "load_checkpoint", "predict_torch", "distributional_loss",
           "classification_loss", "param_groups", "make_optimizer", "make_scheduler", "RealWeight",
           "use_real_weights", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "bnnc-checkpoint-1"


# ------------------------------------------------------------------------------------------ checkpoints


@torch.no_grad()
def predict_torch(model: torch.nn.Module, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Logits of a PyTorch model in eval mode, as float32 numpy."""
    model.eval()
    out = [model(torch.from_numpy(x[i:i + batch_size])).numpy() for i in range(0, len(x), batch_size)]
    return np.concatenate(out).astype(np.float32)


def save_checkpoint(model: torch.nn.Module, path, **meta) -> None:
    """Write ``{"format", "model", "state_dict", ...meta}`` atomically (temp file, then rename)."""
    meta.setdefault("model_kwargs", dict(getattr(model, "bnnc_kwargs", {})))
    payload = {"format": CHECKPOINT_FORMAT, "model": getattr(model, "bnnc_name", None),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **meta}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _read_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # truncated zip, pickle with code, wrong format
        raise ModelFormatError(f"{path}: not a loadable PyTorch checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ModelFormatError(f"{path}: not a bnnc checkpoint (no '{CHECKPOINT_FORMAT}' header); "
                               "published checkpoints of other repositories are imported with `bnnc import`")
    return payload


def load_checkpoint(path, model: torch.nn.Module | None = None) -> torch.nn.Module:
    """Load a bnnc checkpoint safely (``weights_only=True``) into ``model`` or a new registered model."""
    from . import models

    payload = _read_checkpoint(path)
    if model is None:
        name = payload.get("model")
        if not name:
            raise ModelFormatError(f"{path}: checkpoint does not name its model")
        model = models.create(name, **payload.get("model_kwargs", {}))
        if payload.get("real_weights"):
            use_real_weights(model)
    missing, unexpected = model.load_state_dict(payload["state_dict"], strict=False)
    if missing or unexpected:
        raise ModelFormatError(f"{path}: state dict does not match model: missing {missing}, unexpected {unexpected}")
    model.eval()
    return model


# ------------------------------------------------------------------------------------------ pieces


class RealWeight(WeightQuantizer):
    """Real-valued weights in a binary layer (its activations stay binary): step 1 of two-step training
    (ReActNet, Real-to-Binary; methods.md §4.4, §8)."""

    name = "real"

    def forward(self, w: torch.Tensor):
        return w, None, None

    def deploy(self, w: torch.Tensor):
        raise NotExportableError("real-valued weights (step 1 of two-step training) are not binary; "
                                 "export the model of the last stage")


def use_real_weights(model: nn.Module) -> nn.Module:
    """Give every binary layer real-valued weights (``RealWeight``), in place."""
    from .nn import BinaryConv2d

    for m in model.modules():
        if isinstance(m, BinaryConv2d):
            m.weight_quantizer = RealWeight()
    return model


def _quantizers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (ActivationQuantizer, WeightQuantizer))]


def _quantizer_state(model: nn.Module) -> dict:
    """The quantizers' plain-number attributes (schedule values t, k, n, α; RBNN's pending rotation update):
    not in the state dict, but part of where a run is."""
    return {n: {k: v for k, v in vars(m).items() if not k.startswith("_") and k != "training"
                and isinstance(v, (bool, int, float))} for n, m in _quantizers(model)}


def distributional_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                        temperature: float = 1.0) -> torch.Tensor:
    """ReActNet's distributional loss (methods.md §4.4): −(τ²/B) Σ_b Σ_c softmax(z_T/τ)_c · log softmax(z_S/τ)_c."""
    p_t = F.softmax(teacher_logits.float() / temperature, dim=1)
    return -(temperature ** 2) * (p_t * F.log_softmax(student_logits.float() / temperature, dim=1)).sum(1).mean()


def classification_loss(spec: LossSpec, logits: torch.Tensor, labels: torch.Tensor,
                        teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
    """The loss a recipe trains with (cross-entropy with label smoothing, or KD mixed with it)."""
    ce = None
    if spec.name == "cross_entropy" or spec.hard_label_weight > 0:
        ce = F.cross_entropy(logits.float(), labels, label_smoothing=spec.label_smoothing)
    if spec.name == "cross_entropy":
        return ce
    if teacher_logits is None:
        raise ValueError("the distributional loss needs the teacher's logits")
    kd = distributional_loss(logits, teacher_logits, spec.temperature)
    w = spec.hard_label_weight
    return kd if w == 0 else (1 - w) * kd + w * ce


_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def param_groups(model: nn.Module, spec: OptimizerSpec) -> list[dict]:
    """Parameter groups with the recipe's weight-decay rule (``OptimizerSpec``): [decayed, not decayed]."""
    norm = {id(p) for m in model.modules() if isinstance(m, _NORM_TYPES) for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if spec.weight_decay_rule == "all":
            keep = True
        elif spec.weight_decay_rule == "no_norm_bias":
            keep = not (id(p) in norm or name.endswith("bias") or p.ndim <= 1)
        else:  # reactnet: decay only 4-D parameters or those with "conv" in their name
            keep = p.ndim == 4 or "conv" in name
        (decay if keep else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": spec.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_optimizer(model: nn.Module, spec: OptimizerSpec) -> torch.optim.Optimizer:
    groups = param_groups(model, spec)
    if spec.name == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum, nesterov=spec.nesterov)
    cls = torch.optim.Adam if spec.name == "adam" else torch.optim.AdamW
    return cls(groups, lr=spec.lr, betas=spec.betas, eps=spec.eps)


def make_scheduler(opt: torch.optim.Optimizer, spec: ScheduleSpec, base_lr: float, steps_per_epoch: int,
                   epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepped once per optimizer step, following :func:`bnnc.recipes.lr_factor`."""

    def factor(step: int) -> float:  # a plain function: LambdaLR's state dict then holds only numbers
        return lr_factor(spec, base_lr, step, steps_per_epoch, epochs)

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ------------------------------------------------------------------------------------------ RNG


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------ distributed


@dataclasses.dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()


def _setup_distributed(device: str | None) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device != "cpu"
    if world <= 1:
        return _Dist(device=torch.device(device or ("cuda" if cuda else "cpu")))
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        owns = True
    return _Dist(rank=dist.get_rank(), world=dist.get_world_size(), device=dev, owns_group=owns)


class _EpochBatches(torch.utils.data.Sampler):
    """Batches of one rank for one epoch: a ``DistributedSampler`` order (seeded by (seed, epoch), the same
    for every world size) wrapped in ``bnnc.data.SeededSampler`` for per-sample augmentation seeds, cut in
    batches; the first ``skip`` batches are passed over without loading anything (mid-epoch resume)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world: int, shuffle: bool = True):
        from torch.utils.data import DistributedSampler

        from .data import SeededSampler

        self.order = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
        self.seeded = SeededSampler(n, shuffle=False, seed=seed, inner=self.order)
        self.batch_size, self.skip = batch_size, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.seeded.set_epoch(epoch)
        self.skip = skip

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch_size)

    def __iter__(self):
        batch, done = [], 0
        for key in self.seeded:
            batch.append(key)
            if len(batch) == self.batch_size:
                if done >= self.skip:
                    yield batch
                batch, done = [], done + 1
        if batch and done >= self.skip:
            yield batch


# ------------------------------------------------------------------------------------------ the run


class _StageRun:
    """One stage of a recipe on one rank."""

    def __init__(self, recipe: TrainRecipe, stage: Stage, *, dist: _Dist, out: Path | None, data, limit,
                 workers: int, amp: bool, seed: int, progress: bool, save_every: int | None, init_state,
                 teacher_checkpoint, model: nn.Module | None, step_hook):
        self.recipe, self.stage, self.dist, self.out, self.limit = recipe, stage, dist, out, limit
        self.workers, self.amp, self.seed, self.progress = workers, amp, seed, progress and dist.main
        self.save_every, self.step_hook = save_every, step_hook
        train_ds, test_ds = data
        self.train_ds, self.test_ds = train_ds, test_ds
        self.n_train = min(limit, len(train_ds)) if limit else len(train_ds)
        self.n_test = min(limit, len(test_ds)) if limit else len(test_ds)
        if stage.batch_size % dist.world:
            raise ValueError(f"batch size {stage.batch_size} is not divisible by the world size {dist.world}")
        self.local_batch = stage.batch_size // dist.world

        _seed_everything(seed)
        if model is None:
            from . import models

            model = models.create(recipe.model, **recipe.model_kwargs)
        if stage.real_weights:
            use_real_weights(model)
        model.to(dist.device)
        self._materialize(model)
        self.init_report = None
        if init_state is not None:
            self.init_report = _load_matching(model, init_state)
        if dist.world > 1 and recipe.sync_batchnorm and dist.device.type == "cuda":
            name = getattr(model, "bnnc_name", None)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            model.bnnc_name = name
        self.model = model
        self.teacher = _build_teacher(stage.loss, teacher_checkpoint, dist.device) \
            if stage.loss.name == "distributional" else None
        self.opt = make_optimizer(model, stage.optimizer)
        self.batches = _EpochBatches(self.n_train, self.local_batch, seed, dist.rank, dist.world)
        self.steps_per_epoch = len(self.batches)
        self.sched = make_scheduler(self.opt, stage.schedule, stage.optimizer.lr, self.steps_per_epoch, stage.epochs)
        if dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.type == "cuda"
                                               else None)
        else:
            self.net = model
        self.history: list[dict] = []
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.acc = [0.0, 0.0, 0.0]  # loss sum, correct, seen (this epoch, all ranks)
        self.best = -1.0
        self.qstate = None
        self.complete = False
        self.writer = None

    def _materialize(self, model: nn.Module) -> None:
        """One forward in eval mode, so quantizers size their lazy per-channel tensors before the optimizer
        and DDP see the parameters."""
        x = self.test_ds[0][0]  # the test split has no random transform: draws no random numbers
        was = model.training
        model.eval()
        with torch.no_grad():
            model(x.unsqueeze(0).to(self.dist.device))
        model.train(was)

    # -- checkpoints

    def _payload(self) -> dict:
        rng = _rng_state()
        if self.dist.world > 1:
            rngs = [None] * self.dist.world
            torch.distributed.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(), "rng": rngs,
                "world_size": self.dist.world, "accumulators": list(self.acc), "best": self.best,
                "quantizers": _quantizer_state(self.model), "history": self.history}

    def save(self, complete: bool = False) -> None:
        resume = self._payload()  # collective under DDP: every rank takes part
        if not (self.dist.main and self.out):
            return
        save_checkpoint(self.model, self.out / "last.pt", recipe=self.recipe.name, stage=self.stage.name,
                        model_kwargs=self.recipe.model_kwargs, real_weights=self.stage.real_weights,
                        epoch=self.epoch, history=self.history, complete=complete, resume=resume)

    def restore(self, path: Path) -> None:
        payload = _read_checkpoint(path)
        r = payload.get("resume")
        if r is None or payload.get("stage") != self.stage.name:
            raise ModelFormatError(f"{path}: not a resumable checkpoint of stage {self.stage.name!r}")
        if payload.get("model") != getattr(self.model, "bnnc_name", None):
            raise ModelFormatError(f"{path}: checkpoint of model {payload.get('model')!r}, the recipe trains "
                                   f"{getattr(self.model, 'bnnc_name', None)!r}")
        self.model.load_state_dict(payload["state_dict"])
        self.opt.load_state_dict(r["optimizer"])
        self.sched.load_state_dict(r["scheduler"])
        self.epoch, self.step_in_epoch, self.global_step = r["epoch"], r["step_in_epoch"], r["global_step"]
        self.acc, self.best, self.history = list(r["accumulators"]), r["best"], list(r["history"])
        self.qstate = r["quantizers"]
        self.complete = bool(payload.get("complete"))
        rngs = r["rng"]
        _set_rng_state(rngs[self.dist.rank] if len(rngs) == self.dist.world else rngs[0])
        if self.dist.main:
            where = "finished" if self.complete else f"epoch {self.epoch + 1}, step {self.step_in_epoch}"
            print(f"resuming {self.stage.name} from {path} ({where})", flush=True)

    # -- training

    def _loss(self, x, y):
        dev = self.dist.device.type
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.net(x)
            t_logits = None
            if self.teacher is not None:
                with torch.no_grad():
                    t_logits = self.teacher(x)
        return logits, classification_loss(self.stage.loss, logits, y, t_logits)

    def _loader(self, epoch: int):
        from . import data

        worker_init = getattr(data, "_worker_init", None)  # seeds NumPy / random in each worker
        self.batches.set_epoch(epoch, self.step_in_epoch)
        return torch.utils.data.DataLoader(
            self.train_ds, batch_sampler=self.batches, num_workers=self.workers,
            generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch),
            worker_init_fn=worker_init if self.workers else None, pin_memory=self.dist.device.type == "cuda")

    def run(self) -> dict:
        stage, epochs = self.stage, self.stage.epochs
        self._open_logs()
        try:
            while self.epoch < epochs and not self.complete:
                self._train_epoch()
            if not self.complete:
                self.complete = True
                self.save(complete=True)
        finally:
            if self.writer is not None:
                self.writer.close()
            if getattr(self, "_steps_file", None) is not None:
                self._steps_file.close()
        self.model.eval()
        last = self.history[-1] if self.history else {}
        return {"stage": stage.name, "history": self.history, "test_top1": last.get("test_top1"),
                "checkpoint": str(self.out / "last.pt") if self.out else None,
                "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()}}

    def _train_epoch(self) -> None:
        epoch, epochs = self.epoch, self.stage.epochs
        self.model.train()
        for _, m in _quantizers(self.model):  # EDE t/k, FDA n/α, RBNN T and rotations: once per epoch
            m.on_epoch(epoch, epochs)
        if self.qstate is not None and self.step_in_epoch > 0:  # resumed mid-epoch: where the run was
            for name, m in _quantizers(self.model):
                for k, v in self.qstate.get(name, {}).items():
                    setattr(m, k, v)
        self.qstate = None
        if self.step_in_epoch == 0:
            self.acc = [0.0, 0.0, 0.0]
        t0 = time.time()
        bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, desc=f"{self.stage.name} epoch "
                   f"{epoch + 1}/{epochs}", disable=not self.progress, leave=False)
        for x, y in self._loader(epoch):
            x, y = x.to(self.dist.device, non_blocking=True), y.to(self.dist.device, non_blocking=True)
            lr = self.opt.param_groups[0]["lr"]
            logits, loss = self._loss(x, y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
            self.step_in_epoch += 1
            self.global_step += 1
            correct = (logits.detach().argmax(1) == y).sum().item()
            batch_loss, batch_correct, batch_n = self.dist.all_sum([loss.item() * len(y), correct, len(y)])
            self.acc = [a + b for a, b in zip(self.acc, (batch_loss, batch_correct, batch_n))]
            self._log_step(epoch, lr, batch_loss / batch_n)
            bar.update(1)
            bar.set_postfix(loss=f"{self.acc[0] / self.acc[2]:.4f}")
            if self.save_every and self.global_step % self.save_every == 0 and \
                    self.step_in_epoch < self.steps_per_epoch:
                self.save()
            if self.step_hook is not None:
                self.step_hook(self.global_step)
        bar.close()
        test = _evaluate(self.model, self.test_ds, self.n_test, self.recipe.eval_batch_size, self.dist,
                         self.workers, self.amp)
        rec = {"epoch": epoch + 1, "train_loss": self.acc[0] / max(self.acc[2], 1),
               "train_top1": self.acc[1] / max(self.acc[2], 1), "test_top1": test["top1"],
               "test_top5": test["top5"], "test_loss": test["loss"], "lr": self.opt.param_groups[0]["lr"],
               "steps": self.global_step, "seconds": time.time() - t0}
        self.history.append(rec)
        self.epoch, self.step_in_epoch = epoch + 1, 0
        if self.progress:
            print(f"{self.stage.name} epoch {epoch + 1}/{epochs}: train loss {rec['train_loss']:.4f}, "
                  f"test top-1 {rec['test_top1']:.4f}, test loss {rec['test_loss']:.4f} ({rec['seconds']:.0f} s)",
                  flush=True)
        improved = rec["test_top1"] > self.best
        self.best = max(self.best, rec["test_top1"])
        if self.epoch == epochs:
            self.complete = True
        self.save(complete=self.complete)
        if self.dist.main and self.out:
            if improved:
                save_checkpoint(self.model, self.out / "best.pt", recipe=self.recipe.name, stage=self.stage.name,
                                model_kwargs=self.recipe.model_kwargs, real_weights=self.stage.real_weights,
                                epoch=self.epoch, test_top1=rec["test_top1"])
            self._write_metrics()
            if self.writer is not None:
                for k, v in rec.items():
                    if k != "epoch":
                        self.writer.add_scalar(f"{self.stage.name}/{k}", v, self.epoch)
                self.writer.flush()

    # -- logs (rank 0)

    def _open_logs(self) -> None:
        self._steps_file = None
        if not (self.dist.main and self.out):
            return
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "steps.csv"
        rows = []
        if self.global_step and path.is_file():  # keep the steps before the resume point
            with open(path, newline="") as f:
                rows = [r for r in csv.reader(f)][1:]
            rows = [r for r in rows if r and int(r[0]) <= self.global_step]
        with atomic_path(path) as tmp:
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows([["step", "epoch", "lr", "loss"], *rows])
        self._steps_file = open(path, "a", newline="")
        self._steps_csv = csv.writer(self._steps_file)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard not installed: no event files
            SummaryWriter = None
        if SummaryWriter is not None:
            self.writer = SummaryWriter(str(self.out / "tensorboard"))

    def _log_step(self, epoch: int, lr: float, loss: float) -> None:
        if self._steps_file is not None:
            self._steps_csv.writerow([self.global_step, epoch + 1, repr(lr), repr(loss)])
            if self.global_step % 50 == 0:
                self._steps_file.flush()
        if self.writer is not None:
            self.writer.add_scalar(f"{self.stage.name}/step_loss", loss, self.global_step)

    def _write_metrics(self) -> None:
        if self._steps_file is not None:
            self._steps_file.flush()
        keys = list(self.history[0])
        with atomic_path(self.out / "metrics.csv") as tmp:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=keys)
                w.writeheader()
                w.writerows(self.history)
        doc = {"recipe": self.recipe.name, "model": self.recipe.model, "dataset": self.recipe.dataset,
               "stage": self.stage.name, "epochs": self.stage.epochs, "batch_size": self.stage.batch_size,
               "world_size": self.dist.world, "history": self.history,
               "published": dataclasses.asdict(self.recipe.published) if self.recipe.published else None}
        with atomic_path(self.out / "metrics.json") as tmp:
            tmp.write_text(json.dumps(doc, indent=1))


@torch.no_grad()
def _evaluate(model: nn.Module, ds, n: int, batch_size: int, dist: _Dist, workers: int, amp: bool) -> dict:
    """Top-1, top-5 and loss over the first ``n`` items, sharded over the ranks and summed."""
    from .data import make_loader

    was = model.training
    model.eval()
    loader = make_loader(ds, batch_size, shuffle=False, sampler=list(range(dist.rank, n, dist.world)),
                         workers=workers)
    loss_sum = top1 = top5 = seen = 0.0
    for x, y in loader:
        x, y = x.to(dist.device), y.to(dist.device)
        with torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        top1 += (top[:, 0] == y).sum().item()
        top5 += (top == y[:, None]).any(1).sum().item()
        seen += len(y)
    loss_sum, top1, top5, seen = dist.all_sum([loss_sum, top1, top5, seen])
    model.train(was)
    seen = max(seen, 1)
    return {"top1": top1 / seen, "top5": top5 / seen, "loss": loss_sum / seen}


def _load_matching(model: nn.Module, state: dict) -> dict:
    """Load the entries of ``state`` whose name and shape match (two-step training: step 2 from step 1)."""
    own = model.state_dict()
    use = {k: v for k, v in state.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    model.load_state_dict(use, strict=False)
    return {"loaded": len(use), "not_in_checkpoint": sorted(set(own) - set(use)),
            "ignored": sorted(set(state) - set(use))}


def _build_teacher(loss: LossSpec, checkpoint_override, device) -> nn.Module:
    """The frozen real-valued teacher of a distillation loss (eval mode, no gradients)."""
    spec = loss.teacher
    ckpt = checkpoint_override or spec.checkpoint
    if spec.model.startswith("torchvision:"):
        arch = spec.model.split(":", 1)[1]
        if not ckpt:
            raise BnncError(f"teacher {spec.model} needs its weights: pass --teacher-checkpoint PATH (a torchvision "
                            f"state dict, e.g. {arch}-*.pth); nothing is downloaded")
        try:
            import torchvision
        except ImportError:
            raise BnncError(f"teacher {spec.model} needs torchvision (pip install torchvision)") from None
        teacher = getattr(torchvision.models, arch)(weights=None, **spec.model_kwargs)
        path = Path(ckpt)
        if not path.is_file():
            raise FileNotFoundError(f"teacher checkpoint {path} does not exist")
        state = torch.load(path, weights_only=True, map_location="cpu")
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        teacher.load_state_dict(state)
    else:
        from . import models

        if ckpt:
            teacher = load_checkpoint(ckpt, models.create(spec.model, **spec.model_kwargs))
        else:
            raise BnncError(f"teacher {spec.model!r} has no weights: set loss.teacher.checkpoint in the recipe or "
                            "pass --teacher-checkpoint PATH (a bnnc checkpoint)")
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _override_stage(stage: Stage, epochs, batch_size, lr) -> Stage:
    changes = {}
    if epochs is not None:
        if epochs < 1:
            raise ValueError("epochs must be ≥ 1")
        changes["epochs"] = epochs
        sch = stage.schedule
        if sch.warmup_epochs >= epochs:  # a short run (smoke test) keeps no warm-up longer than itself
            changes["schedule"] = dataclasses.replace(sch, warmup_epochs=0.0)
    if batch_size is not None:
        changes["batch_size"] = batch_size
    if lr is not None:
        changes["optimizer"] = dataclasses.replace(stage.optimizer, lr=lr)
    return dataclasses.replace(stage, **changes) if changes else stage


def fit(recipe: TrainRecipe, *, out=None, data_path=None, epochs: int | None = None, batch_size: int | None = None,
        lr: float | None = None, seed: int | None = None, limit: int | None = None, resume: bool = False,
        save_every: int | None = None, amp: bool | None = None, workers: int | None = None,
        teacher_checkpoint=None, progress: bool = True, device: str | None = None,
        model: nn.Module | None = None, step_hook=None) -> dict:
    """Train every stage of ``recipe``; return ``{"history", "checkpoint", "test_top1", "stages"}``.

    ``epochs``, ``batch_size``, ``lr`` override every stage; ``limit`` uses the first N images of each split;
    ``resume`` continues from ``OUT[/STAGE]/last.pt`` (finished stages are skipped); ``save_every`` also
    checkpoints every N optimizer steps; ``amp`` turns bf16 autocast on or off (default: the recipe's);
    ``model`` trains a given module instead of a new ``recipe.model`` (single-stage recipes);
    ``step_hook(global_step)`` is called after every optimizer step.
    """
    from .data import build_dataset

    if model is not None and len(recipe.stages) > 1:
        raise ValueError("fit(model=...) takes single-stage recipes only")
    dist = _setup_distributed(device)
    out = Path(out) if out else None
    try:
        data = (build_dataset(recipe.dataset, "train", data_path, augment=recipe.augment,
                              input_size=recipe.input_size, lighting=recipe.lighting),
                build_dataset(recipe.dataset, "test", data_path, augment=False, input_size=recipe.input_size))
        results, finals = {}, {}
        for stage in recipe.stages:
            stage = _override_stage(stage, epochs, batch_size, lr)
            stage_out = (out / stage.name if len(recipe.stages) > 1 else out) if out else None
            if stage_out and dist.main:
                stage_out.mkdir(parents=True, exist_ok=True)
            run = _StageRun(recipe, stage, dist=dist, out=stage_out, data=data, limit=limit,
                            workers=recipe.workers if workers is None else workers,
                            amp=recipe.amp if amp is None else amp,
                            seed=recipe.seed if seed is None else seed, progress=progress, save_every=save_every,
                            init_state=finals.get(stage.init_from) if stage.init_from else None,
                            teacher_checkpoint=teacher_checkpoint, model=model, step_hook=step_hook)
            if run.init_report and dist.main and progress:
                rep = run.init_report
                print(f"{stage.name}: initialised from {stage.init_from} ({rep['loaded']} tensors; fresh: "
                      f"{', '.join(rep['not_in_checkpoint'][:6]) or 'none'})", flush=True)
            if resume and stage_out and (stage_out / "last.pt").is_file():
                run.restore(stage_out / "last.pt")
            elif resume and dist.main and progress:
                print(f"{stage.name}: nothing to resume in {stage_out}, starting", flush=True)
            results[stage.name] = run.run()
            finals[stage.name] = results[stage.name].pop("state_dict")
        last = results[recipe.stages[-1].name]
        return {"history": last["history"], "checkpoint": last["checkpoint"], "test_top1": last["test_top1"],
                "stages": results}
    finally:
        if dist.owns_group:
            # every rank waits for the others (rank 0 still writes files and evaluates) before the group goes:
            # a rank tearing down gloo while a peer is mid-collective aborts the process
            try:
                torch.distributed.barrier()
            finally:
                torch.distributed.destroy_process_group()


def train(model: torch.nn.Module, dataset: str | None = None, *, epochs: int | None = None, out=None,
          batch_size: int | None = None, lr: float | None = None, data_path=None, seed: int = 0,
          limit: int | None = None, progress: bool = True) -> dict:
    """Train ``model`` with its registered ``Recipe`` (overridable) and return ``{"history", "checkpoint",
    "test_top1"}``. ``last.pt`` (every epoch) and ``best.pt`` are written atomically under ``out``;
    ``limit`` trains on the first N images only (smoke tests). Full recipes: :func:`fit`."""
    reg = getattr(model, "bnnc_recipe", None)
    dataset = dataset or (reg.dataset if reg else None)
    if dataset is None:
        raise ValueError("train: no dataset given and the model has no recipe")
    opt = OptimizerSpec(name=reg.optimizer if reg else "adam", lr=reg.lr if reg else 1e-3,
                        weight_decay=reg.weight_decay if reg else 0.0,
                        momentum=float(reg.extra.get("momentum", 0.9)) if reg else 0.9)
    if opt.name not in ("sgd", "adam", "adamw"):
        raise ValueError(f"unknown optimizer {opt.name!r} (sgd, adam, adamw)")
    sched_name = reg.schedule if reg else "cosine"
    if sched_name not in ("cosine", "linear", "constant"):
        raise ValueError(f"the registered recipe of {getattr(model, 'bnnc_name', 'this model')!r} uses a "
                         f"{sched_name!r} LR schedule: train it with `bnnc train --recipe NAME` "
                         "(`bnnc train --list-recipes`)")
    sched = ScheduleSpec(name=sched_name, interval="step")
    stage = Stage(name="train", epochs=reg.epochs if reg else 1, batch_size=reg.batch_size if reg else 128,
                  optimizer=opt, schedule=sched)
    name = getattr(model, "bnnc_name", None) or type(model).__name__
    recipe = TrainRecipe(name=name, model=name, dataset=dataset, stages=(stage,), seed=seed)
    return fit(recipe, out=out, data_path=data_path, epochs=epochs, batch_size=batch_size, lr=lr, limit=limit,
               progress=progress, model=model)
