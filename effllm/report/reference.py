"""The reference figures published with the original exercise: Llama 3.2 1B on an NVIDIA P100 16 GB GPU.

They are labelled as such wherever they are shown, beside this run's own measurements.
"""

import pandas as pd

HARDWARE = "NVIDIA P100 16 GB, Llama 3.2 1B (reference)"
INFERENCE = pd.DataFrame(
    [
        (1, "on", 3.07, 0.37),
        (1, "off", 3.23, 0.41),
        (8, "on", 4.50, 0.52),
        (8, "off", 5.76, 1.80),
        (16, "on", 6.13, 0.63),
        (16, "off", 8.64, 4.25),
    ],
    columns=["batch", "cache", "peak_memory_gb", "runtime_s"],
)
STACK = [
    "Baseline (FP32)",
    "+ Mixed precision",
    "+ Checkpointing",
    "+ LoRA",
]  # the reference's stacked techniques
STACKED = [*STACK, "+ 4-bit base (QLoRA)"]  # 02_lora's: the reference's rows, then one of our own
FINETUNE = pd.DataFrame(
    [(STACK[0], 14800, 1.12), (STACK[1], 7800, 0.61), (STACK[2], 6200, 0.73), (STACK[3], 6100, 0.68)],
    columns=["technique", "peak_memory_mb", "runtime_per_step_s"],
)  # the reference's last row is "+ LoRA (PEFT)"


def beside(ours: pd.DataFrame, reference: pd.DataFrame, on: list[str]) -> pd.DataFrame:
    """This run's table and the reference side by side, under two column headings."""
    return pd.concat({"this run": ours, HARDWARE: reference.set_index(on)}, axis=1, sort=False)
