"""The teacher's attention, recorded at the op boundary of the rewritten graph.

Why at the op boundary: every rewritten site calls one ``attnopt::`` op with
``q, k, v, kv_mask, bias, scale, causal, ...`` in the layout stated in
:mod:`attnopt.kernels`. Running the optimized model under :class:`TeacherMode`
replaces each such call with exact softmax attention (attnopt's dense reference) on
the same inputs, so the whole forward is the original model's (the teacher's), and
records, per site, the op's inputs and the exact output. Training a site's variant
parameters then only needs its own op on the recorded inputs: sites are
independent and no backward through the model is needed (LoLCATs-style attention
transfer). Sites are recognised by their parameter tensors, which the rewritten
graph passes to the op as they are.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from attnopt._compat import OpOverload
from attnopt.kernels.dense.reference import dense_attention_reference

__all__ = ["SiteCapture", "TeacherMode", "dense_teacher_output"]


@dataclasses.dataclass
class SiteCapture:
    """One call of a site's op: ``op(*args)`` is the student, ``target`` the teacher.

    ``args`` holds the op's inputs detached, except the site's parameters, which are
    the live tensors (so ``op(*args)`` has gradients for them).
    """

    op: OpOverload
    args: tuple
    target: torch.Tensor  # [B, H, N, Dv]

    def student(self) -> torch.Tensor:
        return self.op(*self.args)


def _is_attention_op(func: Any, args: tuple) -> bool:
    # Every attnopt attention op takes (q, k, v, kv_mask, bias, scale, causal, ...);
    # the backward ops and grid variants (a list of causal flags) do not match.
    return (
        isinstance(func, OpOverload)
        and func.namespace == "attnopt"
        and not func.name().endswith("_backward")
        and len(args) >= 7
        and isinstance(args[5], float)
        and isinstance(args[6], bool)
    )


def dense_teacher_output(args: tuple) -> torch.Tensor:
    """Exact softmax attention for an attnopt op's ``(q, k, v, kv_mask, bias, scale, causal)``."""
    q, k, v, kv_mask, bias, scale, causal = args[:7]
    return dense_attention_reference(q, k, v, kv_mask, bias, scale=scale, causal=causal)


class TeacherMode(TorchFunctionMode):
    """Run an optimized model as its teacher, recording the trained sites' attention.

    Inside ``with TeacherMode(owners) as mode:``, every attnopt attention op returns
    exact softmax attention on its inputs; calls whose arguments include a parameter
    of ``owners`` (``{id(tensor): site_key}``) are recorded in ``mode.captures``
    (``site_key -> [SiteCapture, ...]`` in call order). ``record=False`` only swaps
    the outputs (the teacher's logits).
    """

    def __init__(self, owners: dict[int, str], *, record: bool = True) -> None:
        super().__init__()
        self.owners = owners
        self.record = record
        self.captures: dict[str, list[SiteCapture]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs or not _is_attention_op(func, args):
            return func(*args, **kwargs)
        with torch.no_grad():
            target = dense_teacher_output(args)
        if self.record:
            key = next(
                (
                    self.owners[id(a)]
                    for a in args
                    if isinstance(a, nn.Parameter) and id(a) in self.owners
                ),
                None,
            )
            if key is not None:
                kept = tuple(
                    a
                    if isinstance(a, nn.Parameter) or not isinstance(a, torch.Tensor)
                    else a.detach()
                    for a in args
                )
                self.captures.setdefault(key, []).append(SiteCapture(func, kept, target))
        return target
