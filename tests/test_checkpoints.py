"""pytorch_model.bin folders (single, sharded + index) load like safetensors ones, with the same strict checks."""
from __future__ import annotations

import json
import pickle

import pytest
import torch

from cli.main import main
from pipeline.checkpoints import CheckpointError, convert_to_bin, tensor_shapes, weight_files


@pytest.fixture(scope="module")
def bin_set(tmp_path_factory, tiny_models):
    out = tmp_path_factory.mktemp("bin") / "models"
    assert main(["tiny", str(out), "--format", "bin", "--json"]) == 0
    return out


def test_tiny_bin_set_has_the_hub_layout(bin_set):
    assert not list(bin_set.rglob("*.safetensors"))
    assert [p.name for p in weight_files(bin_set / "llm")] == ["pytorch_model-00001-of-00002.bin",
                                                              "pytorch_model-00002-of-00002.bin"]
    index = json.loads((bin_set / "llm" / "pytorch_model.bin.index.json").read_text())
    assert set(index["weight_map"]) == set(tensor_shapes(bin_set / "llm"))
    assert [p.name for p in weight_files(bin_set / "encoder")] == ["pytorch_model.bin"]


def test_bin_llm_equals_the_safetensors_llm(bin_set, tiny_models):
    from pipeline.llm import load_llm

    ids = torch.tensor([[1, 5, 9, 30, 2]])
    with torch.no_grad():
        a = load_llm(tiny_models / "llm", dtype=torch.float32)(ids).logits
        b = load_llm(bin_set / "llm", dtype=torch.float32)(ids).logits
    assert torch.equal(a, b)


def test_bin_encoder_equals_the_safetensors_encoder(bin_set, tiny_models):
    import numpy as np

    from pipeline.encoder.speech_encoder import load_encoder

    t = np.arange(32000) / 16000
    wave = (0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32)
    assert (load_encoder(bin_set / "encoder").encode(wave, sample_rate=16000)
            == load_encoder(tiny_models / "encoder").encode(wave, sample_rate=16000))


def test_force_switches_formats_and_keeps_refusing_foreign_files(bin_set, tmp_path):
    assert main(["tiny", str(bin_set), "--force"]) == 0
    assert (bin_set / "llm" / "model.safetensors").is_file() and not list(bin_set.rglob("*.bin"))
    assert main(["tiny", str(bin_set), "--force", "--format", "bin"]) == 0
    (bin_set / "llm" / "notes.txt").write_text("mine")
    assert main(["tiny", str(bin_set), "--force"]) == 2
    assert (bin_set / "llm" / "notes.txt").read_text() == "mine"
    (bin_set / "llm" / "notes.txt").unlink()


def test_bad_bin_files_are_named(bin_set, tmp_path):
    import shutil

    from pipeline.llm import load_llm

    llm = tmp_path / "llm"
    shutil.copytree(bin_set / "llm", llm)
    first = llm / "pytorch_model-00001-of-00002.bin"
    state = torch.load(first, weights_only=True)
    key = sorted(state)[0]
    torch.save(dict(state, **{key: torch.zeros(2, 2)}), first)
    with pytest.raises(CheckpointError, match=rf"wrong shape.*{key}"):
        load_llm(llm)
    first.write_bytes(b"\x00" * 64)  # truncated / not a torch file
    with pytest.raises(CheckpointError, match="pytorch_model-00001-of-00002.bin"):
        load_llm(llm)
    first.write_bytes(pickle.dumps({key: object()}))  # pickled objects other than tensors: weights_only refuses
    with pytest.raises(CheckpointError, match="cannot read"):
        load_llm(llm)
    (llm / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match="does not hold"):
        load_llm(llm)


def test_convert_refuses_a_folder_without_weights(tmp_path):
    with pytest.raises(CheckpointError, match="no weights"):
        convert_to_bin(tmp_path)
