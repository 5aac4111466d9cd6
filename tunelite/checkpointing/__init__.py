"""Reading and writing weights: HF model folders, peft adapters, atomic checkpoint folders."""

from tunelite.checkpointing.atomic import atomic_folder
from tunelite.checkpointing.hf import HFCheckpointer, load_hf_state_dict, save_hf_state_dict
from tunelite.checkpointing.peft import save_peft_adapter

__all__ = ["HFCheckpointer", "atomic_folder", "load_hf_state_dict", "save_hf_state_dict", "save_peft_adapter"]
