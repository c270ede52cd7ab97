"""Built-in methods. Importing a module registers its config; this list is the only place to add one."""

from . import (  # noqa: F401
    adalora,
    adapter,
    bitfit,
    dora,
    dylora,
    goft,
    ia3,
    loha,
    lokr,
    lora,
    lora_fa,
    lora_plus,
    meft,
    parallel_adapter,
    prefix,
    prompt,
    s4,
    sparsity,
    vera,
)
