"""offload_embeddings: the frozen embedding table in host memory, looked up in place. On the CPU the
same module runs over the table itself; the GPU's mapped read is checked by
benchmarks/host_embedding_check.py (and by the module's own check of three rows when it is built)."""

import dataclasses
import json

import pytest
import torch
import torch.utils.dlpack
from conftest import TINY, random_model
from test_training_recipes import ROW, run_recipe

from tunelite.checkpointing.hf import load_hf_state_dict
from tunelite.errors import ConfigError
from tunelite.models.llama import LoRAArgs, lora_llama
from tunelite.modules.host_embedding import HostEmbedding, dlpack_device_fields, offload_embeddings
from tunelite.modules.lora import set_trainable_params
from tunelite.modules.memory_policy import set_memory_policy

CPU = torch.device("cpu")


def lora_model(args=TINY) -> torch.nn.Module:  # noqa: ANN001
    torch.manual_seed(0)
    model = lora_llama(args, LoRAArgs(lora_attn_modules=("q_proj", "v_proj")))
    set_trainable_params(model)
    return model


def test_the_host_table_looks_up_the_same_rows_under_the_same_name():
    model = lora_model()
    tokens = torch.randint(0, TINY.vocab_size, (2, 9))
    before, state = model(tokens), {k: v.clone() for k, v in model.state_dict().items()}
    assert offload_embeddings(model, CPU) == 0  # on the CPU the table was in host memory already
    assert isinstance(model.tok_embeddings, HostEmbedding) and not model.tok_embeddings.weight.requires_grad
    assert torch.equal(model(tokens), before)
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)
    assert offload_embeddings(model, CPU) == 0 and isinstance(model.tok_embeddings, HostEmbedding)  # once


def test_the_dlpack_capsule_has_the_layout_the_gpu_view_relabels():
    """device_view relabels a pinned table's DLPack capsule as the GPU's: the device fields must be
    where dlpack.h puts them, which a CPU tensor's capsule shows (kDLCPU = 1, index 0)."""
    table = torch.randn(5, 3, dtype=torch.bfloat16)
    capsule = torch.utils.dlpack.to_dlpack(table)
    kind, index = dlpack_device_fields(capsule)
    assert (kind.value, index.value) == (1, 0)
    kind.value = 1  # written in place, as for the GPU (2); the tensor made from it is the table's memory
    view = torch.from_dlpack(capsule)
    assert view.data_ptr() == table.data_ptr() and torch.equal(view, table)


def test_a_table_that_trains_or_is_the_output_projection_stays(capsys):
    with pytest.raises(ConfigError, match="offload_embeddings: the embedding table trains"):
        offload_embeddings(random_model(), CPU)  # the full fine-tune trains every weight
    with pytest.raises(ConfigError, match="offload_embeddings: .*tied embeddings"):
        offload_embeddings(lora_model(dataclasses.replace(TINY, tie_word_embeddings=True)), CPU)
    with pytest.raises(ConfigError, match="offload_embeddings: needs a CUDA GPU"):
        offload_embeddings(lora_model(), torch.device("meta"))


def test_the_lora_recipe_trains_and_exports_the_same_with_the_table_offloaded(tmp_path):
    data = tmp_path / "rows.json"
    data.write_text(json.dumps([ROW] * 8))
    runs = {}
    for offloaded in (False, True):
        out = tmp_path / f"out_{offloaded}"
        rows = run_recipe("lora_finetune_single_device", "tiny/lora_cpu", out, f"dataset.source={data}",
                          "epochs=3", f"+offload_embeddings={offloaded}")
        runs[offloaded] = [r["loss"] for r in rows if "loss" in r], load_hf_state_dict(out / "step_3" / "model")
    (losses, merged), (offloaded_losses, offloaded_merged) = runs[False], runs[True]
    assert offloaded_losses == losses and len(losses) == 3
    assert merged.keys() == offloaded_merged.keys() and all(torch.equal(merged[k], offloaded_merged[k]) for k in merged)


def test_the_model_computes_where_its_layers_are_not_where_its_table_is():
    """Wherever the table sits (on a GPU run, in host memory), the model's device, and so the
    offloader's, the KV caches' and evaluation's, is where the layers compute."""
    model = lora_model()
    model.tok_embeddings.to("meta")  # a table elsewhere than the layers
    assert model.device == CPU
    set_memory_policy(model, ("recompute+offload",) * TINY.num_layers)
    assert model.memory_policy.offloader.device == CPU
    model.setup_caches(1, 8)
    assert model.layers[0].attn.kv_cache.k.device == CPU
