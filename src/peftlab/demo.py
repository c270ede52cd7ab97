"""``peftlab demo``: attach LoRA to the packaged MiniLM and print the parameter report.

(The training demo replaces this once the training loop exists.)
"""

from __future__ import annotations


def main(args) -> int:
    import peftlab
    from peftlab.backbones import load_model

    model = load_model("minilm")
    peftlab.attach(model, peftlab.LoRAConfig(r=8, targets=["q", "v"]))
    print(peftlab.report(model))
    return 0
