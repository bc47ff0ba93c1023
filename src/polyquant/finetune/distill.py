"""The one distillation loop every fine-tuning mode runs.

A *student* (a copy of the model whose trainable parameters a mode chose: ternary master weights,
AQLM code books and scales, norms) is trained for ``steps`` AdamW steps on windows of a token stream
with the float *teacher*'s logits as the target: KL(teacher || student) at ``temperature``. The
learning rate warms up linearly over ``lr_warmup`` steps, then follows a cosine to 10 %.

Checkpoints: every ``checkpoint_every`` steps one safetensors file (``state.safetensors`` in the
checkpoint folder, written atomically) holds the trainable parameters, the AdamW state and, in its
header, the step, the config and the loss history. A run with the same config resumes from it and
reaches the same weights, bit for bit, as an uninterrupted run (same thread count): the window of step
``i`` depends only on ``(seed, i)``, and nothing else is random.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from polyquant.methods.base import check_int

__all__ = ["DistillConfig", "distill", "set_norms_trainable", "STATE_FILE"]

STATE_FILE = "state.safetensors"


@dataclass
class DistillConfig:
    """The schedule of a distillation run (validated on construction; modes extend it).

    Attributes:
        steps: optimizer steps in all.
        seq_len: tokens per window; ``batch_size`` windows per step.
        lr: AdamW peak learning rate (linear warm-up over ``lr_warmup`` steps, then cosine to 10 %).
        temperature: distillation temperature of the KL loss.
        weight_decay: AdamW weight decay.
        train_norms: also train the RMSNorm / LayerNorm weights (the embeddings and head stay frozen).
        seed: picks the windows (window of step ``i`` depends on ``(seed, i)`` only).
        checkpoint_every: steps between checkpoints (0: only at the end).
    """

    steps: int = 200
    seq_len: int = 512
    batch_size: int = 1
    lr: float = 1e-4
    lr_warmup: int = 10
    temperature: float = 1.0
    weight_decay: float = 0.0
    train_norms: bool = True
    seed: int = 0
    checkpoint_every: int = 25

    def __post_init__(self) -> None:
        check_int("steps", self.steps, 1)
        check_int("seq_len", self.seq_len, 2)
        check_int("batch_size", self.batch_size, 1)
        check_int("lr_warmup", self.lr_warmup, 0)
        check_int("seed", self.seed, 0)
        check_int("checkpoint_every", self.checkpoint_every, 0)
        for name in ("lr", "temperature", "weight_decay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a non-negative finite number, got {v!r}")
        if self.lr <= 0 or self.temperature <= 0:
            raise ValueError(f"lr and temperature must be positive, got lr={self.lr}, temperature={self.temperature}")
        if not isinstance(self.train_norms, bool):
            raise ValueError(f"train_norms must be true or false, got {self.train_norms!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def lr_at(self, step: int) -> float:
        """Learning rate of step ``step`` (0-based)."""
        if self.lr_warmup and step < self.lr_warmup:
            return self.lr * (step + 1) / self.lr_warmup
        span = max(1, self.steps - self.lr_warmup)
        t = min(1.0, (step - self.lr_warmup) / span)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def set_norms_trainable(model: nn.Module, skip: tuple[type, ...] = ()) -> int:
    """Make the own parameters of every norm module (class name containing "norm") trainable;
    returns how many tensors."""
    n = 0
    for mod in model.modules():
        if "norm" in type(mod).__name__.lower() and not isinstance(mod, skip):
            for p in mod.parameters(recurse=False):
                p.requires_grad_(True)
                n += 1
    return n


# -- data -------------------------------------------------------------------------------------
def window(tokens: torch.Tensor, cfg: DistillConfig, step: int) -> torch.Tensor:
    """The ``[batch, seq_len]`` ids of step ``step``: offsets drawn from a generator seeded by (seed, step)."""
    n = tokens.numel()
    if n < cfg.seq_len:
        raise ValueError(f"the training text has {n} tokens, fewer than seq_len={cfg.seq_len}")
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    offs = torch.randint(0, n - cfg.seq_len + 1, (cfg.batch_size,), generator=g)
    return torch.stack([tokens[o: o + cfg.seq_len] for o in offs.tolist()])


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    """KL(teacher || student) per token, averaged, times ``t**2`` (Hinton's scaling)."""
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return (p.exp() * (p - s)).sum(-1).mean() * (t * t)


# -- checkpoints ------------------------------------------------------------------------------
def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _save_state(folder: Path, model: nn.Module, opt: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file
    params = trainable(model)
    tensors = {f"param.{n}": p.detach().contiguous() for n, p in params.items()}
    index = {id(p): n for n, p in params.items()}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            for k, v in st.items():
                tensors[f"opt.{index[id(p)]}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{STATE_FILE}.tmp{os.getpid()}"
    save_file(tensors, str(tmp), metadata={"polyquant_finetune": json.dumps(meta)})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, folder / STATE_FILE)


def _load_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    path = folder / STATE_FILE
    if not path.is_file():
        return None
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["polyquant_finetune"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # a torn or foreign file: say so, never guess
        raise ValueError(f"{path}: not a readable fine-tuning checkpoint ({type(e).__name__}: {e}); "
                         "delete it to start again") from None
    return tensors, meta


def _restore(model: nn.Module, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], path: Path) -> None:
    params = trainable(model)
    names = {f"param.{n}" for n in params}
    have = {k for k in tensors if k.startswith("param.")}
    if names != have:
        raise ValueError(f"{path}: its parameters do not match this model ({len(have)} stored, {len(names)} here)")
    with torch.no_grad():
        for n, p in params.items():
            t = tensors[f"param.{n}"]
            if t.shape != p.shape:
                raise ValueError(f"{path}: parameter {n!r} has shape {list(t.shape)}, the model {list(p.shape)}")
            p.copy_(t)
    for n, p in params.items():
        st = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"opt.{n}.")
              and k[len(f"opt.{n}."):].count(".") == 0}
        if st:
            opt.state[p] = {k: v.clone() for k, v in st.items()}


# -- the run ----------------------------------------------------------------------------------
def distill(teacher: nn.Module, student: nn.Module, tokens: torch.Tensor, config: DistillConfig, *,
            checkpoint_dir: str | os.PathLike | None = None, stop_after: int | None = None,
            show_progress: bool = True, log: Callable[[dict[str, Any]], None] | None = None,
            desc: str = "finetune", before_step: Callable[[int], dict[str, Any]] | None = None,
            meta_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``student``'s trainable parameters (``requires_grad``) against ``teacher`` on ``tokens``
    (1-D ids); ``teacher`` is only run, never changed.

    ``before_step(step)`` (0-based) runs before each step and returns fields added to the log line
    (e.g. a quantization blend). ``checkpoint_dir``: where the state is kept and resumed from (a
    config that differs from the stored one is refused). ``stop_after``: run at most this many steps
    in this call (then checkpoint and return, ``done`` False). ``log`` receives ``{"step", "loss",
    "lr", "seconds", ...}`` after each step. Returns ``{"step", "done", "losses", "seconds",
    "resumed_from"}``; the student is left in eval mode.
    """
    from polyquant.progress import progress
    tokens = torch.as_tensor(tokens).reshape(-1).long()
    teacher.eval()
    student.train()
    params = list(trainable(student).values())
    if not params:
        raise ValueError("the student has no trainable parameter")
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, foreach=False)
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    start, losses, seconds, resumed = 0, [], 0.0, None
    if folder is not None:
        loaded = _load_state(folder)
        if loaded is not None:
            tensors, meta = loaded
            if meta.get("config") != config.to_dict():
                raise ValueError(f"{folder / STATE_FILE} was written with another fine-tuning config "
                                 f"({meta.get('config')}); use another checkpoint folder or delete it")
            _restore(student, opt, tensors, folder / STATE_FILE)
            start, losses, seconds = int(meta["step"]), list(meta["losses"]), float(meta["seconds"])
            resumed = start
    end = config.steps if stop_after is None else min(config.steps, start + int(stop_after))

    def meta(step: int) -> dict[str, Any]:
        return {"step": step, "config": config.to_dict(), "losses": losses, "seconds": seconds} | (meta_extra or {})

    bar = progress(range(start, end), desc=desc, total=end - start, enabled=show_progress, initial=0)
    for step in bar:
        t0 = time.perf_counter()
        fields = before_step(step) if before_step is not None else {}
        for g in opt.param_groups:
            g["lr"] = config.lr_at(step)
        ids = window(tokens, config, step)
        with torch.no_grad():
            t_logits = teacher(input_ids=ids).logits
        s_logits = student(input_ids=ids).logits
        loss = kl_loss(s_logits, t_logits, config.temperature)
        del t_logits
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        v = float(loss.detach())
        if not math.isfinite(v):
            raise FloatingPointError(f"the loss became {v} at step {step + 1}; lower lr")
        losses.append(round(v, 6))
        seconds += time.perf_counter() - t0
        bar.set_postfix_str(" ".join([f"loss {v:.4f}"] + [f"{k} {x:.2f}" for k, x in fields.items()]))
        if log is not None:
            log({"step": step + 1, "loss": v, "lr": config.lr_at(step)} | fields | {"seconds": round(seconds, 2)})
        done_now = step + 1
        if folder is not None and ((config.checkpoint_every and done_now % config.checkpoint_every == 0)
                                   or done_now == end):
            _save_state(folder, student, opt, meta(done_now))
    step = max(start, end)
    student.eval()
    return {"step": step, "done": step >= config.steps, "losses": losses, "seconds": round(seconds, 2),
            "resumed_from": resumed}
