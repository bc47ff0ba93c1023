"""Ternary fine-tuning: turn an ordinary model into a usable BitNet b1.58 one.

Post-training absmean ternarization (``--method bitnet``) destroys a model that was not trained
ternary. Here the selected Linears become :class:`STEBitLinear` layers - float master weights,
ternarized (absmean per tensor) and their inputs quantized by BitLinear's int8 per-token rule on every
forward pass, both with straight-through estimators - and the model is trained for ``steps`` steps on
windows of the calibration text with the float model's logits as the teacher (KL(teacher || student)
at ``temperature``). ``quant_warmup`` steps blend float and quantized values linearly at the start
(``x + lambda * (q(x) - x)``, lambda 0 -> 1; the "lambda warm-up" of Hugging Face's 1.58-bit fine-tuning
write-up), so training starts from the float model rather than from the collapsed PTQ one. At the end
the master weights are ternarized with the same rule (``polyquant.methods.bitnet``) into ``QuantLinear``
layers, and the model can be saved as a BitNet checkpoint.

Checkpoints: every ``checkpoint_every`` steps one safetensors file (``state.safetensors`` in the
checkpoint folder, written atomically) holds the trainable parameters, the AdamW state and, in its
header, the step, the config and the loss history. A run with the same config resumes from it and
reaches the same weights, bit for bit, as an uninterrupted run (same thread count): the window of step
``i`` depends only on ``(seed, i)``, and nothing else is random.
"""
from __future__ import annotations

import copy
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

from polyquant.activations.bitnet import BitNetActivation
from polyquant.methods.base import check_choice, check_int
from polyquant.methods.bitnet import WEIGHT_FLOOR, BitNetConfig, LINEAR_CLASSES, bitnet_quantize
from polyquant.nn.quant_linear import QuantLinear
from polyquant.nn.quantize import QuantRecord, _untie_if_needed, get_record, replace_module
from polyquant.nn.select import select_linears

__all__ = ["TernaryFinetuneConfig", "STEBitLinear", "finetune_ternary", "to_bitnet", "STATE_FILE"]

STATE_FILE = "state.safetensors"


@dataclass
class TernaryFinetuneConfig:
    """Settings of a ternary fine-tuning run (validated on construction).

    Attributes:
        steps: optimizer steps in all.
        seq_len: tokens per window; ``batch_size`` windows per step.
        lr: AdamW peak learning rate (linear warm-up over ``lr_warmup`` steps, then cosine to 10 %).
        quant_warmup: steps over which the quantization is blended in (0: fully ternary from step 1).
        temperature: distillation temperature of the KL loss.
        weight_decay: AdamW weight decay.
        train_norms: also train the RMSNorm / LayerNorm weights (the embeddings and head stay frozen).
        seed: picks the windows (window of step ``i`` depends on ``(seed, i)`` only).
        checkpoint_every: steps between checkpoints (0: only at the end).
        include / exclude / quantize_lm_head: which Linears (as ``MethodConfig``).
        linear_class: the BitNet class the result is saved as.
    """

    steps: int = 200
    seq_len: int = 512
    batch_size: int = 1
    lr: float = 1e-4
    lr_warmup: int = 10
    quant_warmup: int = 50
    temperature: float = 1.0
    weight_decay: float = 0.0
    train_norms: bool = True
    seed: int = 0
    checkpoint_every: int = 25
    include: list[str] | None = None
    exclude: list[str] = dataclasses.field(default_factory=list)
    quantize_lm_head: bool = False
    linear_class: str = "autobitlinear"

    def __post_init__(self) -> None:
        check_int("steps", self.steps, 1)
        check_int("seq_len", self.seq_len, 2)
        check_int("batch_size", self.batch_size, 1)
        check_int("lr_warmup", self.lr_warmup, 0)
        check_int("quant_warmup", self.quant_warmup, 0)
        check_int("seed", self.seed, 0)
        check_int("checkpoint_every", self.checkpoint_every, 0)
        for name in ("lr", "temperature", "weight_decay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a non-negative finite number, got {v!r}")
        if self.lr <= 0 or self.temperature <= 0:
            raise ValueError(f"lr and temperature must be positive, got lr={self.lr}, temperature={self.temperature}")
        check_choice("linear_class", self.linear_class, LINEAR_CLASSES)
        if self.include is not None and not isinstance(self.include, list):
            raise ValueError(f"include must be a list of regexes, got {self.include!r}")
        if not isinstance(self.exclude, list):
            raise ValueError(f"exclude must be a list of regexes, got {self.exclude!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def lr_at(self, step: int) -> float:
        """Learning rate of step ``step`` (0-based)."""
        if self.lr_warmup and step < self.lr_warmup:
            return self.lr * (step + 1) / self.lr_warmup
        span = max(1, self.steps - self.lr_warmup)
        t = min(1.0, (step - self.lr_warmup) / span)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    def lam_at(self, step: int) -> float:
        """Quantization blend of step ``step`` (1 = fully ternary)."""
        return 1.0 if self.quant_warmup == 0 else min(1.0, (step + 1) / self.quant_warmup)


class STEBitLinear(nn.Module):
    """A Linear trained ternary: ``F.linear(q_x(x), q_w(W), b)`` with straight-through gradients.

    ``q_w`` is BitNet's absmean rule per tensor (as transformers' ``WeightQuant``), ``q_x`` BitLinear's
    int8 per-token rule; ``lam`` < 1 blends each with its float value (``v + lam * (q(v) - v)``)."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.weight = nn.Parameter(lin.weight.detach().clone().float())
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().clone().float(), requires_grad=False)
        self.rule = BitNetActivation()
        self.lam = 1.0

    @staticmethod
    def ternarize(w: torch.Tensor) -> torch.Tensor:
        s = 1.0 / w.abs().mean().clamp(min=WEIGHT_FLOOR)
        return (w * s).round().clamp(-1, 1) / s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        lam = self.lam
        wq = w + (lam * (self.ternarize(w.detach()) - w.detach()))
        xq = x + (lam * (self.rule(x.detach()) - x.detach()))
        return F.linear(xq, wq.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, ternary STE, lam={self.lam:g}"


# -- data -------------------------------------------------------------------------------------
def _window(tokens: torch.Tensor, cfg: TernaryFinetuneConfig, step: int) -> torch.Tensor:
    """The ``[batch, seq_len]`` ids of step ``step``: offsets drawn from a generator seeded by (seed, step)."""
    n = tokens.numel()
    if n < cfg.seq_len:
        raise ValueError(f"the training text has {n} tokens, fewer than seq_len={cfg.seq_len}")
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    offs = torch.randint(0, n - cfg.seq_len + 1, (cfg.batch_size,), generator=g)
    return torch.stack([tokens[o: o + cfg.seq_len] for o in offs.tolist()])


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return (p.exp() * (p - s)).sum(-1).mean() * (t * t)


# -- checkpoints ------------------------------------------------------------------------------
def _params(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _save_state(folder: Path, model: nn.Module, opt: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file
    params = _params(model)
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
    params = _params(model)
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
def _prepare(model: nn.Module, cfg: TernaryFinetuneConfig) -> tuple[nn.Module, list[str]]:
    student = copy.deepcopy(model)
    targets = select_linears(student, cfg.include, cfg.exclude, cfg.quantize_lm_head)
    if not targets:
        raise ValueError("no Linear layer matched the include/exclude patterns")
    names = [n for n, _ in targets]
    _untie_if_needed(student, names)
    for p in student.parameters():
        p.requires_grad_(False)
    for n, lin in targets:
        replace_module(student, n, STEBitLinear(lin))
    if cfg.train_norms:
        for mod in student.modules():
            if "norm" in type(mod).__name__.lower() and not isinstance(mod, STEBitLinear):
                for p in mod.parameters(recurse=False):
                    p.requires_grad_(True)
    return student, names


def finetune_ternary(model: nn.Module, tokens: torch.Tensor, config: TernaryFinetuneConfig, *,
                     checkpoint_dir: str | os.PathLike | None = None, stop_after: int | None = None,
                     show_progress: bool = True, log: Callable[[dict[str, Any]], None] | None = None,
                     ) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune a ternary copy of ``model`` (left untouched; it is the teacher) on ``tokens`` (1-D ids).

    Returns ``(student, info)``: the student with ``STEBitLinear`` layers (convert with :func:`to_bitnet`)
    and ``{"step", "done", "losses", "seconds", "resumed_from"}``. ``checkpoint_dir``: where the state
    is kept and resumed from (a config that differs from the stored one is refused). ``stop_after``:
    run at most this many steps in this call (then checkpoint and return, ``done`` False).
    ``log`` receives ``{"step", "loss", "lr", "lam", "seconds"}`` after each step.
    """
    from polyquant.progress import progress
    if get_record(model) is not None:
        raise ValueError("fine-tune a float model: this one is already quantized by polyquant")
    tokens = torch.as_tensor(tokens).reshape(-1).long()
    teacher = model.eval()
    student, names = _prepare(model, config)
    student.train()
    params = list(_params(student).values())
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
        return {"step": step, "config": config.to_dict(), "losses": losses, "seconds": seconds, "modules": names}

    bar = progress(range(start, end), desc="finetune-ternary", total=end - start, enabled=show_progress,
                   initial=0)
    for step in bar:
        t0 = time.perf_counter()
        lam = config.lam_at(step)
        for m in student.modules():
            if isinstance(m, STEBitLinear):
                m.lam = lam
        for g in opt.param_groups:
            g["lr"] = config.lr_at(step)
        ids = _window(tokens, config, step)
        with torch.no_grad():
            t_logits = teacher(input_ids=ids).logits
        s_logits = student(input_ids=ids).logits
        loss = _kl(s_logits, t_logits, config.temperature)
        del t_logits
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        v = float(loss.detach())
        if not math.isfinite(v):
            raise FloatingPointError(f"the loss became {v} at step {step + 1}; lower lr")
        losses.append(round(v, 6))
        seconds += time.perf_counter() - t0
        bar.set_postfix_str(f"loss {v:.4f} lam {lam:.2f}")
        if log is not None:
            log({"step": step + 1, "loss": v, "lr": config.lr_at(step), "lam": lam, "seconds": round(seconds, 2)})
        done_now = step + 1
        if folder is not None and ((config.checkpoint_every and done_now % config.checkpoint_every == 0)
                                   or done_now == end):
            _save_state(folder, student, opt, meta(done_now))
    step = max(start, end)
    student.eval()
    for m in student.modules():
        if isinstance(m, STEBitLinear):
            m.lam = 1.0
    info = {"step": step, "done": step >= config.steps, "losses": losses, "seconds": round(seconds, 2),
            "resumed_from": resumed, "modules": names}
    return student, info


def to_bitnet(student: nn.Module, config: TernaryFinetuneConfig, info: dict[str, Any] | None = None,
              kernel: str = "auto") -> nn.Module:
    """Replace every ``STEBitLinear`` by a ternary ``QuantLinear`` (absmean per tensor of its master
    weight, BitLinear's activation rule) in place; the model gets a ``bitnet`` record (saved as a BitNet
    checkpoint by ``polyquant.formats.save``)."""
    bcfg = BitNetConfig(include=config.include, exclude=list(config.exclude), quantize_lm_head=config.quantize_lm_head,
                        linear_class=config.linear_class)
    names = []
    for n, m in list(student.named_modules()):
        if isinstance(m, STEBitLinear):
            qw = bitnet_quantize(m.weight.detach(), bcfg)
            bias = None if m.bias is None else m.bias.detach()
            replace_module(student, n, QuantLinear(qw, bias, kernel=kernel, act_quant=BitNetActivation(), method="bitnet"))
            names.append(n)
    for p in student.parameters():
        p.requires_grad_(False)
    extra = {"finetune": {k: v for k, v in (info or {}).items() if k != "modules"} | {"config": config.to_dict()}}
    student.polyquant = QuantRecord("bitnet", bcfg.to_dict(), names, seconds=float((info or {}).get("seconds", 0.0)),
                                    extra=extra)
    return student
