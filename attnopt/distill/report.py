"""What a distillation run did: per-site attention error and perplexity, before and after."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

__all__ = ["DistillReport", "SiteDistill"]


@dataclasses.dataclass
class SiteDistill:
    """One rewritten site: relative L2 error of its attention output against exact
    softmax attention on the held-out data (``‖student − teacher‖ / ‖teacher‖``)."""

    name: str
    variant: str
    trained: bool
    error_before: float | None = None
    error_after: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class DistillReport:
    """Result of :func:`attnopt.distill.distill`.

    Attributes:
        stages: the stages run, in order (``"attention"``, ``"finetune"``).
        sites: per-site :class:`SiteDistill`.
        perplexity_original: held-out perplexity of the original (exact) model.
        perplexity_before / perplexity_after: of the optimized model before / after.
        steps: optimizer steps per stage.
        losses: per stage, the training loss of every step (this process's slice).
        seconds: wall time of the run (this process; a resumed run counts its own).
        resumed_from: ``(stage, step)`` of the checkpoint the run resumed from.
        world_size: number of data-parallel processes.
        data: sequence counts and length.
    """

    stages: list[str]
    sites: list[SiteDistill]
    perplexity_original: float | None = None
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    steps: dict[str, int] = dataclasses.field(default_factory=dict)
    losses: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    resumed_from: tuple[str, int] | None = None
    world_size: int = 1
    data: dict[str, int] = dataclasses.field(default_factory=dict)

    def __getitem__(self, name: str) -> SiteDistill:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"no site {name!r}; sites: {[s.name for s in self.sites]}")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["sites"] = [s.to_dict() for s in self.sites]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        def fmt(x: float | None) -> str:
            return "-" if x is None else f"{x:.4f}"

        rows = [
            (
                s.name,
                s.variant,
                "yes" if s.trained else "no",
                fmt(s.error_before),
                fmt(s.error_after),
            )
            for s in self.sites
        ]
        head = ("site", "variant", "trained", "attn error before", "attn error after")
        widths = [
            max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)
        ]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        lines = [line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)]
        steps = ", ".join(f"{k} {v} steps" for k, v in self.steps.items()) or "no steps"
        lines.append(
            f"{steps} in {self.seconds:.1f}s on {self.world_size} process(es)"
            + (
                f", resumed from {self.resumed_from[0]} step {self.resumed_from[1]}"
                if self.resumed_from
                else ""
            )
        )
        if self.perplexity_after is not None:
            orig = self.perplexity_original
            rel = f" ({100 * (self.perplexity_after / orig - 1):+.1f}% vs original)" if orig else ""
            lines.append(
                f"held-out perplexity: original {fmt(orig)}, before {fmt(self.perplexity_before)}"
                f", after {fmt(self.perplexity_after)}{rel}"
            )
        return "\n".join(lines)
