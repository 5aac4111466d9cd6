import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, write_hf_checkpoint
from tunelite.checkpointing.atomic import atomic_folder
from tunelite.checkpointing.hf import HFCheckpointer, load_hf_state_dict, save_hf_state_dict
from tunelite.errors import CheckpointError


@pytest.mark.parametrize("shards", [1, 3])
def test_checkpoint_round_trip_keeps_tensors_names_and_sharding(tmp_path, shards):
    source = tmp_path / "source"
    model = write_hf_checkpoint(source, shards=shards)
    loaded = load_hf_state_dict(source)
    assert loaded.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded[key], value)

    out = tmp_path / "out"
    save_hf_state_dict(loaded, out, source_dir=source)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in source.iterdir())
    for f in source.glob("*.safetensors"):
        theirs, ours = load_file(f), load_file(out / f.name)
        assert theirs.keys() == ours.keys()
        assert all(torch.equal(theirs[k], ours[k]) for k in theirs)


def test_tied_model_writes_no_lm_head(tmp_path):
    from dataclasses import replace

    args = replace(TINY, tie_word_embeddings=True)
    write_hf_checkpoint(tmp_path / "tied", args)
    assert not any(k.startswith("lm_head") for k in load_file(tmp_path / "tied" / "model.safetensors"))
    assert "output.weight" not in load_hf_state_dict(tmp_path / "tied")


def test_wrong_model_for_checkpoint_names_the_differing_sizes(tmp_path):
    from dataclasses import replace

    write_hf_checkpoint(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="num_layers: model 3 vs checkpoint 2"):
        HFCheckpointer(str(tmp_path / "ckpt")).load(replace(TINY, num_layers=3))


def test_pickled_weights_are_refused_with_the_fix(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({}))
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*never unpickles"):
        load_hf_state_dict(folder)


def test_truncated_safetensors_file_is_named(tmp_path):
    folder = tmp_path / "ckpt"
    write_hf_checkpoint(folder)
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated or corrupt"):
        load_hf_state_dict(folder)


def test_atomic_folder_leaves_nothing_when_writing_fails(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "step_1") as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []
