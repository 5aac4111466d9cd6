"""Full fine-tuning of a Llama model on one device: every weight trains.

    tunelite run full_finetune_single_device --config llama3_1/8B_full_single_device

What makes this full, and what makes 8B fit a 24 GB card: every parameter reaches the
optimizer, so memory goes to weights, gradients and optimizer state. With `optimizer_in_bwd`
each parameter is stepped the moment its gradient is ready and the gradient freed, so the
15 GiB of bf16 gradients never exist at once; the optimizer state can be 8- or 4-bit (torchao
AdamW8bit/AdamW4bit) or live in host memory (`tunelite.training.optimizers.cpu_offload_optimizer`).
Checkpoints hold the whole model in the base checkpoint's Hugging Face layout.
"""

from omegaconf import DictConfig

from tunelite.config import instantiate, recipe_entry
from tunelite.errors import ConfigError
from tunelite.training import StepLoop, build_loss, load_pretrained_model, optimizer_step, restore_weights, setup_run
from tunelite.training.optimizers import OptimizerInBackward


def main(cfg: DictConfig) -> None:
    if cfg.optimizer_in_bwd and (cfg.clip_grad_norm or cfg.gradient_accumulation_steps > 1):
        raise ConfigError("optimizer_in_bwd: True steps each weight during backward, so it can neither clip the "
                          "total gradient norm nor accumulate gradients; set clip_grad_norm: null and "
                          "gradient_accumulation_steps: 1, or optimizer_in_bwd: False")
    run = setup_run(cfg)
    checkpointer = instantiate(cfg.checkpointer)
    model = load_pretrained_model(cfg.model, checkpointer, run.device, run.dtype,
                                  cfg.enable_activation_checkpointing, cfg.compile)
    if cfg.optimizer_in_bwd:
        # One optimizer per weight, stepped from its gradient hook; the loop's optimizer.step() is a no-op.
        optimizer = OptimizerInBackward(model.parameters(), lambda one: instantiate(cfg.optimizer, one))
    else:
        optimizer = instantiate(cfg.optimizer, model.parameters())
    loss_fn = build_loss(cfg.loss, cfg.compile)

    with StepLoop(
        cfg, run, model, loss_fn, optimizer,
        # In the training dtype, so that a resumed run continues from exactly these weights.
        write_weights=lambda folder: checkpointer.save(model.state_dict(), folder / "model", run.dtype),
        restore_weights=lambda folder: restore_weights(model, folder / "model"),
    ) as loop:
        for window, num_labels in loop.windows():
            loss, grad_norm = optimizer_step(model, loss_fn, window, num_labels, optimizer, cfg.clip_grad_norm)
            loop.step_done(loss, grad_norm)
    print(f"done: {loop.last_checkpoint / 'model'} holds the model in HF layout")


if __name__ == "__main__":
    recipe_entry(main)
