"""Label hierarchies: which class nests in which (ISCO sub-major ``24`` is inside major ``2``).

Data contract: labels are strings. With ``hierarchy: auto`` a label set of digit codes of one length ≥ 2 nests
by prefix (the parent of ``241`` is ``24``, of ``24`` is ``2``); a label that is not such a code (a merged
``other`` class) has no parent and stays its own. Any other label set (Jobnet's 22 named areas, codes of mixed
lengths) is flat, and the report says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from jobembed.sections import HierarchyMode


@dataclass(frozen=True)
class Hierarchy:
    """``parents``: class -> parent class (empty when flat); ``note``: one line for the report."""

    parents: dict[str, str] = field(default_factory=dict)
    note: str = ""

    @property
    def flat(self) -> bool:
        return not self.parents

    def parent_of(self, labels: Sequence[str] | np.ndarray) -> np.ndarray:
        """``(n,)`` parent labels; a label without a parent is its own."""
        return np.asarray([self.parents.get(str(x), str(x)) for x in labels], dtype=str)


def find_hierarchy(labels: Sequence[str], *, mode: HierarchyMode | str = HierarchyMode.auto) -> Hierarchy:
    """The parent of every label, by code prefix (see the module docstring)."""
    labels = sorted({str(x) for x in labels})
    if HierarchyMode(mode) == HierarchyMode.off:
        return Hierarchy(note="hierarchy off (report.hierarchy: off): every system is flat")
    codes = [x for x in labels if x.isdigit()]
    lengths = {len(x) for x in codes}
    if not codes or len(lengths) != 1 or lengths == {1} or len(codes) < len(labels) / 2:
        return Hierarchy(note="the labels are not nested codes of one length: flat (no parent level)")
    parents = {x: x[:-1] for x in codes}
    orphans = [x for x in labels if x not in parents]
    note = f"parents by code prefix: {len(codes)} classes in {len(set(parents.values()))} parent groups"
    if orphans:
        note += f"; {', '.join(repr(x) for x in orphans)} has no parent and stays its own"
    return Hierarchy(parents=parents, note=note)
