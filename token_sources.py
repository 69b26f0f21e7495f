"""Which phase-1 tokens feed the decoder: a `TokenSource` (the first k tokens of the chosen modalities, among the
registers of the chosen groups), the k grid of the captions (`prefix_grid`), and the keep masks that pick a source's
tokens out of a model's registers (`RegisterChoice`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

import registers


IMAGE_MODALITIES = ("vision", "touch")  # what a caption is written from; text is the target
REGISTER_GROUPS = ("shared", "private")  # registers [0:n_shared] and [n_shared:]


@dataclass(frozen=True)
class TokenSource:
    """The first `k` tokens of each chosen modality, counted among the registers of `groups`.

    groups ("shared", "private") = registers 0..R-1 in order, so k is the prefix length of phase 1
    (k <= n_shared: shared tokens only); ("private",) = registers n_shared..R-1. k=None: all of them;
    k=0: no prefix at all, the control (a caption can then only come from the decoder's prior).
    modalities=None: every image modality of the model.
    """
    modalities: tuple[str, ...] | None = None
    k: int | None = None
    groups: tuple[str, ...] = REGISTER_GROUPS

    def __post_init__(self):
        if self.modalities is not None:
            object.__setattr__(self, "modalities", tuple(self.modalities))
        object.__setattr__(self, "groups", tuple(self.groups))
        if not self.groups or set(self.groups) - set(REGISTER_GROUPS):
            raise ValueError(f"groups {self.groups} must be a non-empty subset of {REGISTER_GROUPS}")
        if self.k is not None and (int(self.k) != self.k or self.k < 0):
            raise ValueError(f"k must be a non-negative integer or None (all tokens), got {self.k!r}")

    @property
    def name(self) -> str:
        if self.k == 0:
            return "none"
        return "+".join(self.modalities or ("all",)) + (f" k={self.k}" if self.k is not None else "")


def prefix_grid(n_tokens: int) -> list[int]:
    """The k values trained and evaluated: 0 (no prefix), 1, 2, 4, ... and n_tokens."""
    return [0] + registers.doubling_grid(n_tokens)


@dataclass(frozen=True)
class RegisterChoice:
    """A phase-1 model's registers as a captioner reads them: its image `modalities`, `n_registers` tokens each, the
    first `n_shared` of them shared; which of them a `TokenSource` picks, and the keep masks that pick them."""
    modalities: tuple[str, ...]
    n_registers: int
    n_shared: int

    def register_index(self, groups) -> list[int]:
        shared, private = list(range(self.n_shared)), list(range(self.n_shared, self.n_registers))
        index = (shared if "shared" in groups else []) + (private if "private" in groups else [])
        if not index:
            raise ValueError(f"this phase-1 model has no {'/'.join(groups)} tokens "
                             f"({self.n_registers} registers, {self.n_shared} shared)")
        return index

    def resolve(self, source: TokenSource) -> TokenSource:
        """The source with its defaults filled in, checked against this model."""
        modalities = source.modalities or self.modalities
        unknown = [m for m in modalities if m not in self.modalities]
        if unknown:
            raise ValueError(f"token source asks for {unknown}, but this model captions from {self.modalities}")
        n = len(self.register_index(source.groups))
        if source.k is not None and source.k > n:
            raise ValueError(f"k={source.k} but the chosen groups {source.groups} hold only {n} tokens per modality")
        return TokenSource(tuple(modalities), n if source.k is None else source.k, source.groups)

    def keep_masks(self, source: TokenSource, batch: int) -> dict[str, torch.Tensor]:
        """B×n bool per modality: True on the first k chosen tokens of the source's modalities."""
        n = len(self.register_index(source.groups))
        first_k = torch.arange(n) < source.k
        return {m: (first_k & (m in source.modalities)).expand(batch, n) for m in self.modalities}

    def training_keep_masks(self, source: TokenSource, mix_sources: bool, batch: int,
                            generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Per sample: one modality or all of them, and k from prefix_grid (see LLMConfig.mix_sources)."""
        if not mix_sources:
            return self.keep_masks(source, batch)
        n = len(self.register_index(source.groups))
        subsets = [source.modalities] + ([(m,) for m in source.modalities] if len(source.modalities) > 1 else [])
        grid = torch.tensor([k for k in prefix_grid(n) if k <= source.k])
        subset = torch.randint(len(subsets), (batch,), generator=generator)
        first_k = torch.arange(n)[None, :] < grid[torch.randint(len(grid), (batch,), generator=generator)][:, None]
        uses = torch.tensor([[m in s for m in self.modalities] for s in subsets])[subset]  # B×modalities
        return {m: first_k & uses[:, i, None] for i, m in enumerate(self.modalities)}
