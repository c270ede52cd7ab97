"""peftlab: parameter-efficient fine-tuning for Hugging Face transformers.

    import peftlab
    model = peftlab.attach(model, peftlab.LoRAConfig(r=8))
    print(peftlab.report(model))
    peftlab.save(model, "my-adapter")
"""

from ._version import __version__
from .compose import ComposeConfig, compose
from .config import MethodConfig
from .core import (
    adapter_names,
    adapter_parts,
    attach,
    delete,
    disabled,
    get_adapter_config,
    merge,
    set_active,
    trainable_parameters,
    unload,
    unmerge,
)
from .errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    ConfigError,
    CorruptAdapterError,
    IncompatibleAdapterError,
    NotMergeableError,
    PeftlabError,
    TargetNotFoundError,
    UnknownMethodError,
    UnsupportedArchitectureError,
)
from .hooks import before_optimizer_step, before_training, checkpoint_eligible, on_train_step, training_loss
from .interop.peft_format import export_peft, import_peft
from .optim import param_groups
from .planner import plan
from .quant import quantize
from .registry import config_class, get_config, methods
from .report import report
from .serving.batch import batch_adapters
from .state import load, save
from .tuners.bitfit import BitFitConfig
from .tuners.dora import DoRAConfig
from .tuners.ia3 import IA3Config
from .tuners.lora import LoRAConfig

__all__ = [
    "AdapterExistsError", "AdapterNotFoundError", "BitFitConfig", "ComposeConfig", "ConfigError",
    "CorruptAdapterError", "DoRAConfig", "IA3Config", "IncompatibleAdapterError", "LoRAConfig", "MethodConfig",
    "NotMergeableError", "PeftlabError", "TargetNotFoundError", "UnknownMethodError",
    "UnsupportedArchitectureError", "__version__", "adapter_names", "adapter_parts", "attach", "batch_adapters",
    "before_optimizer_step", "before_training", "checkpoint_eligible", "compose", "config_class", "delete", "disabled",
    "export_peft", "get_adapter_config", "get_config", "import_peft", "load", "merge", "methods",
    "on_train_step", "param_groups", "plan", "quantize", "report", "save", "set_active", "trainable_parameters", "training_loss", "unload", "unmerge",
]


def __getattr__(name: str):
    """Config classes of methods registered later (``peftlab.GOFTConfig`` ...) by class name."""
    for cls in map(config_class, methods()):
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module 'peftlab' has no attribute {name!r}")
