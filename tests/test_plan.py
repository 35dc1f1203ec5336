"""`vita-audio plan` and pipeline.capacity: the released models' parameter counts on the meta device (spec §1, §4,
§5), the planner's KV bytes per token against what the engine's pool allocates, the 1 x 80 GB and 8 x 80 GB plans
and their Serve configs through serve/config.yaml's loader, and refusals (12 GB names the LLM stage, exit 2)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import capacity

REPO = Path(__file__).resolve().parents[1]
GB = 2**30


def _cli(*argv: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_release_parameter_counts_on_meta_device():
    configs = capacity.size_configs("7B")
    llm = capacity.llm_counts(configs.llm)
    print("LLM", llm)
    assert llm["mtp_modules"] == 10 and llm["backbone_layers"] == 28
    assert llm["per_mtp_module"] == 258_755_072  # spec §1.3: layer 233,057,792 + proj 25,690,112 + 2 x 3584
    assert llm["mtp_total"] == 10 * 258_755_072
    assert abs(llm["total"] - 10.32e9) / 10.32e9 < 0.001, llm["total"]  # spec §1.3: ≈10.32 B
    assert llm["embed"] == llm["lm_head"] == 168072 * 3584
    encoder = capacity.encoder_params(configs.encoder)
    print("encoder", encoder)
    # spec §4.2: 16 Whisper-large layers + conv1 + conv2 + positions + codebook + positions2 ≈ 343.5 M (derived)
    assert abs(encoder - 343.5e6) / 343.5e6 < 0.001, encoder
    assert encoder == 343_599_360
    decoder = capacity.decoder_params(configs.decoder)
    print("decoder", decoder)
    assert decoder["flow"] > 100e6 and decoder["hift"] > 15e6  # spec §5 configs (no published count)


def _pool_bytes_per_token(engine) -> float:
    """Bytes the engine's KV pool holds per (slot, position): every entry's K and V over slots x capacity."""
    per_slot_position = 0.0
    for keys, values in zip(engine.kv.keys, engine.kv.values):
        assert keys is not None, "an entry of the pool was never written"
        _, slots, _, cap, _ = keys.shape
        per_slot_position += (keys.numel() * keys.element_size() + values.numel() * values.element_size()) / (slots * cap)
    return per_slot_position


@pytest.mark.parametrize("size", ["tiny", "bench"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_planner_kv_bytes_equal_the_engine_pool(size, dtype):
    from pipeline.engine.decode_engine import DecodeEngine
    from pipeline.engine.requests import GenerationRequest
    from pipeline.sizes import build_llm

    model = build_llm(size, vocab_size=20000 if size == "tiny" else 69632)
    engine = DecodeEngine(model, dtype=dtype, max_batch_size=2)
    for i in range(2):
        engine.add_request(GenerationRequest(prompt_ids=[1, 2, 3, 4 + i], mode="boost", max_new_tokens=12))
    while engine.has_unfinished():
        engine.step()
    measured = _pool_bytes_per_token(engine)
    planned = capacity.kv_bytes_per_token(model.config, dtype)
    same_config = capacity.size_configs(size).llm  # the planner's own config of the named size
    print(f"{size} {dtype}: engine pool {measured:.0f} B per token and stream, planner {planned['total']} B")
    assert measured == planned["total"]
    assert capacity.kv_bytes_per_token(same_config, dtype) == planned


def test_plans_for_1_and_8_gpus_load_as_serve_configs(tmp_path):
    from cli.serve import load_app_config
    from serve.app import Args

    configs = capacity.size_configs("7B")
    for gpus in (1, 8):
        placement = capacity.plan(configs, gpus, 80 * GB)
        config = capacity.serve_config(placement)
        path = tmp_path / f"plan-{gpus}.yaml"
        import yaml

        path.write_text(yaml.safe_dump(config, sort_keys=False))
        app = load_app_config(path)
        args = Args.model_validate(app["args"])
        used = sum(getattr(args, s).num_gpus * getattr(args, s).max_replicas for s in ("encoder", "llm", "decoder"))
        print(gpus, placement.replicas, placement.num_gpus, placement.streams_per_llm_replica, used)
        assert used <= gpus + 1e-9
        assert args.llm.max_ongoing_requests == placement.streams_per_llm_replica
        assert placement.streams_per_llm_replica >= 100  # 72 GiB - 19.2 GiB weights over 304 MiB per stream
        kv = placement.stages["llm"]["kv_bytes_per_stream"]
        assert kv == 77824 * 4096  # (28 + 10) x 2 x 4 KV heads x 128 x 2 bytes, 4096 tokens
        assert placement.stages["llm"]["weight_bytes"] == placement.stages["llm"]["params"] * 2
    eight = capacity.plan(configs, 8, 80 * GB)
    assert eight.replicas == {"encoder": 1, "llm": 7, "decoder": 3}


def test_cli_plan_writes_a_config_the_serve_loader_accepts(tmp_path):
    out = tmp_path / "serve-8.yaml"
    done = _cli("plan", "--size", "7B", "--gpus", "8", "--gpu-memory", "80GB", "--write-config", str(out), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["replicas"]["llm"] == 7 and result["total_streams"] == 7 * result["streams_per_llm_replica"]
    from cli.serve import load_app_config
    from serve.app import Args

    args = Args.model_validate(load_app_config(out)["args"])
    assert args.llm.max_replicas == 7 and args.decoder.num_gpus == 0.25
    table = _cli("plan", "--size", "7B", "--gpus", "1", "--gpu-memory", "80GB")
    assert table.returncode == 0, table.stderr
    assert "| llm | 10,317.9 M" in table.stdout and "streams per LLM replica" in table.stdout
    print(table.stdout)


def test_cli_plan_refuses_what_cannot_fit(tmp_path):
    done = _cli("plan", "--size", "7B", "--gpus", "1", "--gpu-memory", "12GB")
    assert done.returncode == 2
    assert "LLM stage" in done.stderr and "short by" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    print(done.stderr)


def test_cli_plan_checks_flags_first(tmp_path, capsys, monkeypatch):
    from cli import main as cli_main
    from pipeline import capacity as cap

    monkeypatch.setattr(cap, "stage_memory", lambda *a, **k: pytest.fail("a bad flag must be refused first"))
    for argv, needle in ((["--gpus", "0", "--gpu-memory", "80GB"], "--gpus"),
                         (["--gpus", "1", "--gpu-memory", "eighty"], "--gpu-memory"),
                         (["--gpus", "1", "--gpu-memory", "80GB", "--context", "0"], "--context"),
                         (["--gpus", "1", "--gpu-memory", "80GB", "--size", "70B"], "--size"),
                         (["--gpus", "1", "--gpu-memory", "80GB", "--models", str(tmp_path)], "lacks"),
                         (["--gpus", "1", "--gpu-memory", "80GB", "--write-config", str(tmp_path / "no" / "x.yaml")],
                          "--write-config")):
        assert cli_main.main(["plan", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_llm_stage_batch_size_from_free_memory(monkeypatch):
    """The LLM stage's start-up cap (`engine_batch_size`): the planner's KV bytes per stream over the free memory."""
    from pipeline.sizes import build_llm

    model = build_llm("tiny", vocab_size=20000)
    per_stream = capacity.kv_bytes_per_token(model.config, torch.bfloat16)["total"] * capacity.DEFAULT_CONTEXT
    assert capacity.engine_batch_size(model, 16, "cpu", torch.float32) == 16  # CPU: as configured
    total = 1000 * per_stream
    work = capacity.llm_work_bytes(model.config, torch.bfloat16, 16)
    for free, expected in ((total, 16), (0.1 * total + work + 5.5 * per_stream, 5)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, free=free: (int(free), int(total)))
        assert capacity.engine_batch_size(model, 16, "cuda", torch.bfloat16) == expected
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(0.1 * total), int(total)))
    with pytest.raises(RuntimeError, match="short by"):
        capacity.engine_batch_size(model, 16, "cuda", torch.bfloat16)


def test_plan_from_a_models_folder_reads_configs_only(tiny_models):
    configs = capacity.configs_from_models_dir(tiny_models)
    placement = capacity.plan(configs, 1, 8 * GB, context=1024, dtype=torch.float32)
    assert placement.streams_per_llm_replica > 0
    assert capacity.kv_bytes_per_token(configs.llm, torch.float32)["total"] == \
        placement.stages["llm"]["kv_bytes_per_token"]


def test_parse_bytes():
    assert capacity.parse_bytes("80GB") == 80 * GB == capacity.parse_bytes("80 GiB")
    assert capacity.parse_bytes("40960MB") == 40 * GB
    for bad in ("", "GB", "-1GB", "80XB", "0GB"):
        with pytest.raises(ValueError):
            capacity.parse_bytes(bad)
