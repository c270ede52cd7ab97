"""peftlab: parameter-efficient fine-tuning for Hugging Face transformers.

    import peftlab
    model = peftlab.attach(model, peftlab.LoRAConfig(r=8))
    print(peftlab.report(model))
    peftlab.save(model, "my-adapter")
"""

__version__ = "0.1.0"

from .config import MethodConfig  # noqa: E402
from .core import (  # noqa: E402
    adapter_names,
    attach,
    before_optimizer_step,
    checkpoint_eligible,
    delete,
    disabled,
    get_adapter_config,
    merge,
    on_train_step,
    set_active,
    trainable_parameters,
    training_loss,
    unload,
    unmerge,
)
from .errors import (  # noqa: E402
    AdapterExistsError,
    AdapterNotFoundError,
    CorruptAdapterError,
    IncompatibleAdapterError,
    NotMergeableError,
    PeftlabError,
    TargetNotFoundError,
    UnknownMethodError,
    UnsupportedArchitectureError,
)
from .interop.peft_format import export_peft, import_peft  # noqa: E402
from .optim import param_groups  # noqa: E402
from .registry import config_class, get_config, methods  # noqa: E402
from .report import report  # noqa: E402
from .state import load, save  # noqa: E402
from .tuners.bitfit import BitFitConfig  # noqa: E402
from .tuners.dora import DoRAConfig  # noqa: E402
from .tuners.ia3 import IA3Config  # noqa: E402
from .tuners.lora import LoRAConfig  # noqa: E402

__all__ = [
    "AdapterExistsError", "AdapterNotFoundError", "BitFitConfig", "CorruptAdapterError", "DoRAConfig",
    "IA3Config", "IncompatibleAdapterError", "LoRAConfig", "MethodConfig", "NotMergeableError",
    "PeftlabError", "TargetNotFoundError", "UnknownMethodError", "UnsupportedArchitectureError",
    "adapter_names", "attach", "before_optimizer_step", "export_peft", "import_peft", "checkpoint_eligible", "on_train_step", "config_class", "delete", "disabled", "get_adapter_config", "get_config",
    "load", "merge", "methods", "param_groups", "report", "save", "set_active", "trainable_parameters", "training_loss",
    "unload", "unmerge",
]


def __getattr__(name: str):
    """Config classes of methods registered later (``peftlab.GOFTConfig`` ...) by class name."""
    from .registry import _REGISTRY, _ensure_loaded

    _ensure_loaded()
    for cls in _REGISTRY.values():
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module 'peftlab' has no attribute {name!r}")
