"""What ``optimize`` did, site by site, and how far the output moved."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch

from attnopt.passes.rewrite_attention import SiteResult

__all__ = ["OptimizationReport", "OutputError", "compare_outputs"]


@dataclasses.dataclass(frozen=True)
class OutputError:
    """Deviation of the optimized model's outputs from the original's.

    ``max_abs``: largest absolute difference over every floating-point output
    tensor. ``max_rel``: ``max_abs`` divided by the largest absolute original value.
    """

    max_abs: float
    max_rel: float

    def __str__(self) -> str:
        return f"max abs diff {self.max_abs:.3e} (relative {self.max_rel:.3e})"


def compare_outputs(reference: Any, actual: Any) -> OutputError:
    from attnopt._compat import pytree

    ref_leaves = [t for t in pytree.tree_leaves(reference) if isinstance(t, torch.Tensor)]
    act_leaves = [t for t in pytree.tree_leaves(actual) if isinstance(t, torch.Tensor)]
    if len(ref_leaves) != len(act_leaves):
        raise ValueError(
            f"outputs differ in structure: {len(ref_leaves)} tensors vs {len(act_leaves)}"
        )
    max_abs = 0.0
    scale = 0.0
    for r, a in zip(ref_leaves, act_leaves):
        if not r.is_floating_point() or r.numel() == 0:
            continue
        r, a = r.detach().double(), a.detach().double()
        max_abs = max(max_abs, float((r - a).abs().max()))
        scale = max(scale, float(r.abs().max()))
    return OutputError(max_abs, max_abs / scale if scale > 0 else 0.0)


@dataclasses.dataclass
class OptimizationReport:
    """Every attention site found, what was applied to it, and the output error.

    ``str(report)`` renders a table; ``report.to_dict()`` is JSON-ready.
    """

    sites: list[SiteResult]
    output_error: OutputError | None = None

    @property
    def applied(self) -> list[SiteResult]:
        return [s for s in self.sites if s.applied]

    @property
    def skipped(self) -> list[SiteResult]:
        return [s for s in self.sites if not s.applied]

    def __len__(self) -> int:
        return len(self.sites)

    def __iter__(self):
        return iter(self.sites)

    def __getitem__(self, name: str) -> SiteResult:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"no site named {name!r}; sites: {[s.name for s in self.sites]}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "sites": [s.to_dict() for s in self.sites],
            "output_error": dataclasses.asdict(self.output_error) if self.output_error else None,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def __str__(self) -> str:
        header = ("site", "mask", "heads", "variant", "applied", "reason")
        rows = [
            (
                s.name,
                s.site.mask_description,
                f"{s.site.num_heads}/{s.site.num_kv_heads}",
                s.variant,
                "yes" if s.applied else "no",
                s.reason,
            )
            for s in self.sites
        ]
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
        lines = ["  ".join(str(x).ljust(w) for x, w in zip(header, widths)).rstrip()]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip() for r in rows]
        summary = f"{len(self.applied)} of {len(self.sites)} attention sites rewritten"
        if self.output_error is not None:
            summary += f"; on the example inputs: {self.output_error}"
        lines.append(summary)
        return "\n".join(lines)
