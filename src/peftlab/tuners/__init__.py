"""Built-in methods. Importing a module registers its config; this list is the only place to add one."""

from . import bitfit, dora, goft, ia3, lora  # noqa: F401
