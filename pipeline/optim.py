"""The optimiser and learning-rate schedule of stage two (and of the online baselines' side
networks): torch's AdamW arithmetic without importing ``torch.optim``, and linear warmup/decay."""

from __future__ import annotations

from typing import Any

import torch

from pipeline.errors import ConfigError


class AdamW:
    """``torch.optim.AdamW`` with its defaults (betas 0.9/0.999, eps 1e-8, no amsgrad), step for
    step the same arithmetic as the single-tensor path torch runs for CPU tensors, so results are
    bit-identical to it (``tests/pipeline/test_train.py``). Stage two uses this instead of
    ``torch.optim`` because any ``torch.optim.Optimizer`` imports ``torch._dynamo`` (and with it
    sympy) on first use: +71 MB resident, a third of a stage-two process's memory above an idle
    interpreter with torch. State per parameter: its step count and the two moments."""

    def __init__(self, params: Any, lr: float, weight_decay: float = 0.01,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):  # fmt: skip
        self.params: list[torch.Tensor] = list(params)
        self.base_lr, self.lr, self.weight_decay = lr, lr, weight_decay
        self.betas, self.eps = betas, eps
        self.steps: list[float] = [0.0] * len(self.params)
        self.moments: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient: tensor by tensor on the CPU (the
        arithmetic of torch's single-tensor AdamW, bit for bit), as one ``torch._foreach_*``
        kernel per operation over all of them on a GPU (the same operations, fewer launches)."""
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        for i in live:
            if self.moments[i] is None:
                like = self.params[i]
                keep = torch.preserve_format
                self.moments[i] = (torch.zeros_like(like, memory_format=keep),
                                   torch.zeros_like(like, memory_format=keep))  # fmt: skip
            self.steps[i] += 1.0
        if live and self.params[live[0]].is_cuda:
            self._step_foreach(live)
        else:
            for i in live:
                self._step_one(i)

    def _step_one(self, i: int) -> None:
        lr, wd, (beta1, beta2), eps = self.lr, self.weight_decay, self.betas, self.eps
        p, (exp_avg, exp_avg_sq), step = self.params[i], self._moments(i), self.steps[i]
        grad = p.grad
        assert grad is not None
        if wd != 0:
            p.mul_(1 - lr * wd)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1**step)
        denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
        p.addcdiv_(exp_avg, denom, value=-step_size)

    def _step_foreach(self, live: list[int]) -> None:
        lr, wd, (beta1, beta2), eps = self.lr, self.weight_decay, self.betas, self.eps
        params = [self.params[i] for i in live]
        grads = [p.grad for p in params if p.grad is not None]
        avg, avg_sq = zip(*(self._moments(i) for i in live), strict=True)
        steps = [self.steps[i] for i in live]
        if wd != 0:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_lerp_(avg, grads, 1 - beta1)
        torch._foreach_mul_(avg_sq, beta2)
        torch._foreach_addcmul_(avg_sq, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(avg_sq)
        torch._foreach_div_(denom, [(1 - beta2**s) ** 0.5 for s in steps])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, avg, denom, [-lr / (1 - beta1**s) for s in steps])

    def _moments(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        moments = self.moments[i]
        assert moments is not None
        return moments

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "steps": list(self.steps), "moments": list(self.moments)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "moments" not in state or len(state["moments"]) != len(self.params):
            raise ConfigError(
                "last.pt holds optimiser state of another format (torch.optim, from an older "
                "sidecache) or of another network; delete it to train from the start"
            )
        self.lr, self.steps = state["lr"], list(state["steps"])
        # checkpoints hold CPU tensors: the moments go where their parameters are
        self.moments = [
            None if m is None else (m[0].to(p.device), m[1].to(p.device))
            for p, m in zip(self.params, state["moments"], strict=True)
        ]


class WarmupDecay:
    """``torch.optim.lr_scheduler.LambdaLR(optim, schedule(total, warmup))`` for :class:`AdamW`:
    the learning rate is ``base_lr * factor(n)`` after ``n`` calls of :meth:`step`."""

    def __init__(self, optim: AdamW, factor: Any):
        self.optim, self.factor, self.last_epoch = optim, factor, 0
        optim.lr = optim.base_lr * factor(0)

    def step(self) -> None:
        self.last_epoch += 1
        self.optim.lr = self.optim.base_lr * self.factor(self.last_epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_epoch = int(state["last_epoch"])
        self.optim.lr = self.optim.base_lr * self.factor(self.last_epoch)


def schedule(total: int, warmup: float) -> Any:
    ramp = max(1, round(total * warmup))

    def factor(step: int) -> float:
        if step < ramp:
            return (step + 1) / ramp
        return max(0.0, (total - step) / max(1, total - ramp))

    return factor
