"""Training data for distillation: token streams packed into fixed-length sequences.

Distillation needs many sequences of the context length the student will run at, not
documents: every source (text files, a directory of them, tensors of token ids) is
turned into one stream of token ids, cut into windows of ``seq_len + 1`` tokens with
stride ``seq_len`` (inputs ``w[:-1]``, next-token targets ``w[1:]``, so every token
after the first is a target exactly once), and the last windows are held out for
perplexity. Batches are addressed by step (:meth:`PackedData.batch_indices`), so a
run resumed at step ``s`` reads exactly what an uninterrupted run reads there.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["DataSource", "PackedData", "pack_tokens", "prepare_data", "tokenize_text"]

DataSource = str | os.PathLike | torch.Tensor | Sequence[Any]

_BYTES = "bytes"
# Documents from files are joined by this when the tokenizer has no end-of-text token
# (the byte-level tiny LM of examples/train_tiny_lm.py was trained on files joined so).
_BYTE_SEPARATOR = b"\n\n"


@dataclasses.dataclass
class PackedData:
    """Packed sequences: ``train [n, seq_len + 1]`` and ``heldout [m, seq_len + 1]``, int64."""

    train: torch.Tensor
    heldout: torch.Tensor
    seq_len: int

    def batch_indices(self, step: int, batch_size: int, seed: int) -> torch.Tensor:
        """Rows of :attr:`train` for global batch ``step`` (``[batch_size]``).

        Sequence ``p = step·batch_size + i`` of the run is row ``perm_e[p mod n]`` of
        epoch ``e = p // n``, ``perm_e`` a permutation drawn from ``(seed, e)``: a pure
        function of the step, so resuming needs no data-loader state.
        """
        n = len(self.train)
        positions = range(step * batch_size, (step + 1) * batch_size)
        perms: dict[int, torch.Tensor] = {}
        rows = []
        for p in positions:
            epoch = p // n
            if epoch not in perms:
                gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
                perms[epoch] = torch.randperm(n, generator=gen)
            rows.append(int(perms[epoch][p % n]))
        return torch.tensor(rows, dtype=torch.long)

    def to_dict(self) -> dict[str, int]:
        return {
            "seq_len": self.seq_len,
            "train_sequences": len(self.train),
            "heldout_sequences": len(self.heldout),
        }


def _files_of(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = [
            p
            for p in sorted(path.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        ]
        return files
    raise FileNotFoundError(f"data: {str(path)!r} is neither a file nor a directory")


def tokenize_text(text: str | bytes, tokenizer: Any) -> list[int] | torch.Tensor:
    """Token ids of ``text``: bytes for ``tokenizer=None`` / ``"bytes"``; otherwise a
    transformers tokenizer (``.encode``) or any callable ``str -> list[int]``."""
    if tokenizer is None or tokenizer == _BYTES:
        raw = text if isinstance(text, bytes) else text.encode("utf-8")
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long() if raw else []
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if hasattr(tokenizer, "encode"):
        try:
            return list(tokenizer.encode(text, add_special_tokens=False))
        except TypeError:  # a plain tokenizer object without add_special_tokens
            return list(tokenizer.encode(text))
    if callable(tokenizer):
        return list(tokenizer(text))
    raise TypeError(
        f"tokenizer must be None or 'bytes' (bytes are the tokens), a transformers "
        f"tokenizer, or a callable str -> list[int]; got {type(tokenizer).__name__}"
    )


def _separator(tokenizer: Any) -> list[int]:
    if tokenizer is None or tokenizer == _BYTES:
        return list(_BYTE_SEPARATOR)
    eos = getattr(tokenizer, "eos_token_id", None)
    return [int(eos)] if isinstance(eos, int) else []


def _streams(data: Any, tokenizer: Any) -> list[torch.Tensor]:
    """One 1-D int64 tensor per document."""
    if isinstance(data, torch.Tensor):
        if data.dtype.is_floating_point or data.dtype.is_complex or data.dtype == torch.bool:
            raise TypeError(f"data: a tensor of token ids must be integer, got dtype {data.dtype}")
        return [data.reshape(-1).long()]
    if isinstance(data, (str, os.PathLike)):
        files = _files_of(Path(data))
        sep = torch.tensor(_separator(tokenizer), dtype=torch.long)
        docs = []
        for f in files:
            ids = torch.as_tensor(tokenize_text(f.read_bytes(), tokenizer), dtype=torch.long)
            if ids.numel():
                docs.append(torch.cat([ids, sep]))
        return docs
    if isinstance(data, Sequence) and not isinstance(data, (bytes, bytearray)):
        out: list[torch.Tensor] = []
        for item in data:
            out.extend(_streams(item, tokenizer))
        return out
    raise TypeError(
        f"data must be a path to a text file or a directory of them, a tensor of token ids, "
        f"or a list of those; got {type(data).__name__}"
    )


def pack_tokens(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Windows of ``seq_len + 1`` tokens with stride ``seq_len``: ``[n, seq_len + 1]``.

    Example:
        >>> pack_tokens(torch.arange(10), 3).tolist()
        [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    """
    n = (stream.numel() - 1) // seq_len
    if n <= 0:
        return stream.new_empty(0, seq_len + 1)
    return stream[: n * seq_len + 1].unfold(0, seq_len + 1, seq_len).contiguous()


def prepare_data(
    data: DataSource | PackedData,
    *,
    seq_len: int,
    tokenizer: Any = None,
    heldout_fraction: float = 0.05,
    vocab_size: int | None = None,
    max_heldout: int | None = None,
) -> PackedData:
    """Tokenize (if needed), pack and split ``data``.

    Args:
        data: a text file, a directory (every non-hidden file under it, sorted), a
            tensor of token ids (any shape; flattened into one stream), or a list of
            those. Documents are joined by the tokenizer's end-of-text token (bytes:
            a blank line).
        seq_len: tokens per training input (each window holds ``seq_len + 1``).
        tokenizer: ``None`` or ``"bytes"`` (bytes are the tokens, as for the
            byte-level tiny LM), a transformers tokenizer, or ``str -> list[int]``.
        heldout_fraction: fraction of windows (the last ones) kept for evaluation,
            in ``[0, 1)``; at least one when positive.
        vocab_size: when given, every id must lie in ``[0, vocab_size)``.
        max_heldout: keep at most this many held-out windows (evenly spaced).

    Example:
        >>> d = prepare_data(torch.arange(200) % 50, seq_len=16, heldout_fraction=0.2)
        >>> d.train.shape, d.heldout.shape
        (torch.Size([10, 17]), torch.Size([2, 17]))
    """
    if isinstance(data, PackedData):
        return data
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if not isinstance(heldout_fraction, (int, float)) or not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction!r}")
    docs = _streams(data, tokenizer)
    stream = torch.cat(docs) if docs else torch.empty(0, dtype=torch.long)
    if stream.numel() == 0:
        raise ValueError(
            f"data {_describe(data)} holds no tokens: give a non-empty text file, directory "
            f"or tensor of token ids"
        )
    if vocab_size is not None and (int(stream.min()) < 0 or int(stream.max()) >= vocab_size):
        raise ValueError(
            f"data: token ids must lie in [0, {vocab_size}) (the model's vocab_size), got "
            f"ids in [{int(stream.min())}, {int(stream.max())}]; pass the model's tokenizer"
        )
    windows = pack_tokens(stream, seq_len)
    n = len(windows)
    held = math.ceil(heldout_fraction * n) if heldout_fraction > 0 else 0
    if n == 0 or n - held < 1:
        raise ValueError(
            f"data {_describe(data)} has {stream.numel()} tokens, {n} sequence(s) of "
            f"seq_len={seq_len} (+1): too few for training with heldout_fraction="
            f"{heldout_fraction}; give more data or a smaller seq_len"
        )
    train, heldout = windows[: n - held], windows[n - held :]
    if max_heldout is not None and len(heldout) > max_heldout:
        keep = torch.linspace(0, len(heldout) - 1, max_heldout).round().long()
        heldout = heldout[keep]
    return PackedData(train=train, heldout=heldout, seq_len=seq_len)


def _describe(data: Any) -> str:
    if isinstance(data, torch.Tensor):
        return f"(a tensor of shape {tuple(data.shape)})"
    if isinstance(data, (str, os.PathLike)):
        return repr(str(data))
    return f"(a {type(data).__name__})"
