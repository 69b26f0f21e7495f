"""Which phase-1 tokens feed the decoder: a `TokenSource` (the first k tokens of the chosen modalities, among the
registers of the chosen groups) and the k grid of the captions (`prefix_grid`)."""
from __future__ import annotations

from dataclasses import dataclass

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
