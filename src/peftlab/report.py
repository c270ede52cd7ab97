"""Parameter report: trainable / total counts per adapter and per method."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .context import context_for
from .core import adapter_parameters, has_adapters, part_adapters, state
from .errors import PeftlabError
from .slot import adapter_key, display_key, resolve


@dataclass
class AdapterRow:
    name: str
    method: str
    active: bool
    params: int  # parameters owned by the adapter (all its parts)
    trainable: int  # of which currently trainable
    head: int  # parameters of the trained task head
    formula: int | None  # count predicted by the method's formula, where defined
    parts: list[str] = field(default_factory=list)  # a composite's parts: "default.lora", "default.adapter"
    entries: int | None = None  # entries actually trained where that differs from params (selective methods)


@dataclass
class Report:
    total: int
    base: int
    trainable: int
    adapters: list[AdapterRow] = field(default_factory=list)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / max(self.base, 1)

    def by_method(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.adapters:
            out[r.method] = out.get(r.method, 0) + r.params
        return out

    def to_dict(self) -> dict:
        return {
            "total": self.total,
            "base": self.base,
            "trainable": self.trainable,
            "trainable_percent": self.trainable_percent,
            "by_method": self.by_method(),
            "adapters": [r.__dict__ for r in self.adapters],
        }

    def __str__(self) -> str:
        head = f"{'adapter':<14}{'method':<12}{'active':<8}{'params':>12}{'trainable':>12}{'head':>10}{'formula':>12}"
        lines = [head, "-" * len(head)]
        for r in self.adapters:
            f = "-" if r.formula is None else f"{r.formula:,}"
            lines.append(
                f"{r.name:<14}{r.method:<12}{'yes' if r.active else 'no':<8}{r.params:>12,}{r.trainable:>12,}{r.head:>10,}{f:>12}"
            )
            if r.parts:
                lines.append(f"  parts: {', '.join(r.parts)}")
            if r.entries is not None:
                lines.append(f"  trained entries: {r.entries:,} (sparse: only these are stored)")
        lines.append("-" * len(head))
        lines.append(
            f"trainable {self.trainable:,} of {self.total:,} parameters "
            f"({self.trainable_percent:.4f}% of the {self.base:,} base parameters)"
        )
        return "\n".join(lines)


def _entries(model: nn.Module, name: str, parts) -> int | None:
    """Trained entries over the parts (a part's ``trainable_entries``, else its parameter count); None when
    no part counts entries differently from its parameters."""
    counts = [(part.trainable_entries(model, adapter_key(name, label)), adapter_key(name, label)) for label, part in parts]
    if all(c is None for c, _ in counts):
        return None
    return sum(c if c is not None else sum(p.numel() for _, a in part_adapters(model, key) for p in a.parameters())
               for c, key in counts)


def report(model: nn.Module) -> Report:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows: list[AdapterRow] = []
    adapter_total = 0
    if has_adapters(model):
        st = state(model)
        for name, cfg in st.configs.items():
            ps = list({id(p): p for p in adapter_parameters(model, name)}.values())
            n = sum(p.numel() for p in ps)
            adapter_total += n
            head = sum(p.numel() for h in st.heads.get(name, []) for p in resolve(model, h).parameters())
            try:
                counts = [part.formula_count(context_for(model, part, name, label)) for label, part in st.parts[name]]
                formula = None if any(c is None for c in counts) else sum(counts)
            except PeftlabError:  # a part's selection no longer matches (modules replaced since attach)
                formula = None
            parts = [display_key(adapter_key(name, label)) for label, _ in st.parts[name] if label is not None]
            rows.append(AdapterRow(name, cfg.method, name in st.active, n, sum(p.numel() for p in ps if p.requires_grad),
                                   head, formula, parts, _entries(model, name, st.parts[name])))
    return Report(total=total, base=total - adapter_total, trainable=trainable, adapters=rows)
