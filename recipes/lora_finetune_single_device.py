"""LoRA (and QLoRA) fine-tuning of a Llama model on one device: a GPU, or the CPU for the demo.

    tunelite run lora_finetune_single_device --config llama3_1/8B_lora_single_device
    tunelite run lora_finetune_single_device --config llama3_1/8B_qlora_single_device

What makes this LoRA: the base weights are frozen and only the adapters reach the optimizer;
checkpoints hold just the adapter (peft layout), and the last one adds the adapter merged into
a full Hugging Face checkpoint. QLoRA is the same recipe with a `qlora_*` model, whose frozen
base weights are stored in NF4 and dequantized layer by layer in the forward pass.
"""

from pathlib import Path

from omegaconf import DictConfig

from tunelite.checkpointing.peft import load_adapter_into, save_peft_adapter
from tunelite.config import instantiate, recipe_entry
from tunelite.modules.lora import merged_state_dict, set_trainable_params
from tunelite.training import StepLoop, build_loss, load_pretrained_model, optimizer_step, setup_run


def main(cfg: DictConfig) -> None:
    run = setup_run(cfg)
    checkpointer = instantiate(cfg.checkpointer)
    model = load_pretrained_model(cfg.model, checkpointer, run.device, run.dtype,
                                  cfg.enable_activation_checkpointing, cfg.compile)
    set_trainable_params(model)  # only lora_a / lora_b learn; the base stays as downloaded
    adapters = [p for p in model.parameters() if p.requires_grad]
    optimizer = instantiate(cfg.optimizer, adapters)
    loss_fn = build_loss(cfg.loss, cfg.compile)

    def write_adapter(folder: Path) -> None:
        save_peft_adapter(model, folder / "adapter", base_model_name_or_path=str(checkpointer.checkpoint_dir))
        if cfg.save_merged_model and loop.is_last_step:
            checkpointer.save(merged_state_dict(model), folder / "model")

    def restore_adapter(folder: Path) -> None:
        load_adapter_into(model, folder / "adapter")

    with StepLoop(cfg, run, model, loss_fn, optimizer, write_adapter, restore_adapter) as loop:
        for window, num_labels in loop.windows():
            loss, grad_norm = optimizer_step(model, loss_fn, window, num_labels, optimizer, cfg.clip_grad_norm)
            loop.step_done(loss, grad_norm)
    merged = f", {loop.last_checkpoint / 'model'} (merged, HF layout)" if cfg.save_merged_model else ""
    print(f"done: {loop.last_checkpoint / 'adapter'} (peft layout){merged}")


if __name__ == "__main__":
    recipe_entry(main)
