"""Stage rules (spec §6.1, §6.4), packing, config checks, and a tiny 4-stage run on Ray Train + DeepSpeed."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from jobs.train import run as train_run
from jobs.train.packing import main_token_count, pack
from jobs.train.stage_rules import (
    freeze_for_stage,
    grow_mtp_modules,
    mtp_parameter_names,
    param_groups,
    warmup_cosine,
)
from actors.errors import InputError
from pipeline.llm import load_llm

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BACKBONE = ("model.embed_tokens.", "model.norm.", "lm_head.")


def backbone_keys(model) -> list[str]:
    NB = model.num_backbone_layers
    return [k for k in model.state_dict() if k.startswith(BACKBONE)
            or any(k.startswith(f"model.layers.{i}.") for i in range(NB))]


@pytest.fixture(scope="module")
def tiny_llm(tiny_models):
    return tiny_models / "llm"


def test_stage2_module_is_a_copy_of_the_last_backbone_layer_and_stage3_copies_stage2(tiny_llm):
    base = load_llm(tiny_llm, dtype=torch.float32)
    stage1 = grow_mtp_modules(base, 0)
    assert stage1.num_mtp_modules == 0 and stage1.num_backbone_layers == base.num_backbone_layers
    stage2 = grow_mtp_modules(stage1, 1)
    NB = stage2.num_backbone_layers
    sd2 = stage2.state_dict()
    for key, value in sd2.items():
        if key.startswith(f"model.layers.{NB - 1}."):
            torch.testing.assert_close(sd2[key.replace(f"layers.{NB - 1}.", f"layers.{NB}.", 1)], value, rtol=0, atol=0)
    assert torch.equal(stage2.mtp_embed_norms[0].weight, torch.ones_like(stage2.mtp_embed_norms[0].weight))
    for key in backbone_keys(stage1):
        assert torch.equal(sd2[key], stage1.state_dict()[key]), key
    with torch.no_grad():
        stage2.mtp_projs[0].weight.add_(1.0)  # "trained": stage 3 must copy stage 2's module, not the backbone's
    stage3 = grow_mtp_modules(stage2, 10)
    sd3 = stage3.state_dict()
    for k in range(10):
        for key, value in sd2.items():
            if key.startswith(f"model.layers.{NB}."):
                assert torch.equal(sd3[key.replace(f"layers.{NB}.", f"layers.{NB + k}.", 1)], value)
        assert torch.equal(stage3.mtp_projs[k].weight, stage2.mtp_projs[0].weight)
        assert torch.equal(stage3.mtp_hidden_norms[k].weight, stage2.mtp_hidden_norms[0].weight)


def test_freeze_rules_and_the_mtp_learning_rate_multiplier(tiny_llm):
    model = load_llm(tiny_llm, dtype=torch.float32)
    mtp = mtp_parameter_names(model)
    trainable = set(freeze_for_stage(model, language_model_frozen=True))
    assert trainable == mtp and not any(n.startswith(BACKBONE) for n in trainable)
    with pytest.raises(ValueError, match="MCTP module"):
        freeze_for_stage(grow_mtp_modules(model, 0), language_model_frozen=True)
    assert len(freeze_for_stage(model, language_model_frozen=False)) == len(list(model.parameters()))
    groups = param_groups(model, lr=5e-5, weight_decay=0.1, mtp_lr_mult=10.0)
    by_id = {id(p): g for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        g = by_id[id(p)]
        assert g["lr"] == pytest.approx(5e-4 if name in mtp else 5e-5), name
        assert g["weight_decay"] == (0.1 if p.dim() >= 2 and "norm" not in name else 0.0)


def test_warmup_then_cosine_to_ten_percent():
    total = 100
    factors = [warmup_cosine(s, total, 0.03, 0.1) for s in range(total + 1)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert all(a >= b for a, b in zip(factors[2:], factors[3:]))
    assert factors[-1] == pytest.approx(0.1)
    assert warmup_cosine(3 + 48, total, 0.03, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 48 / 97)))


def test_packing_restarts_position_ids_and_drops_overlong_samples():
    samples = [{"id": "a", "input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
               {"id": "b", "input_ids": [4, 5], "labels": [-100, 5]},
               {"id": "c", "input_ids": list(range(9)), "labels": list(range(9))},
               {"id": "d", "input_ids": [6, 7, 8, 9], "labels": [-100, -100, 8, 9]}]
    rows = pack(samples, max_length=6, pad_id=0)
    assert rows.dropped == 1 and rows.sample_ids == [["a", "b"], ["d"]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]]
    assert rows.input_ids.tolist() == [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 0, 0]]
    assert rows.labels[1].tolist() == [-100, -100, 8, 9, -100, -100]
    assert main_token_count(rows.labels) == 3 + 2


def test_grad_accumulation_normalises_by_the_window_token_count(tiny_llm):
    """Spec §6.4: the sum over a window of CE_sum(micro) / N_window equals one big batch's sum / N (here the
    window's rows as one batch), so gradients do not depend on how the window is split."""
    model = freeze_model = load_llm(tiny_llm, dtype=torch.float32).train()
    rng = np.random.RandomState(0)
    ids = torch.from_numpy(rng.randint(5, 120, size=(2, 12)))
    labels = ids.clone()
    labels[:, :3] = -100
    n = main_token_count(labels.numpy())
    total = sum(model(input_ids=ids[i:i + 1], labels=labels[i:i + 1], num_items_in_batch=n).loss for i in range(2))
    whole = model(input_ids=ids, labels=labels, num_items_in_batch=n).loss
    torch.testing.assert_close(total, whole, rtol=1e-5, atol=1e-5)
    assert freeze_model is model


def test_config_checks_refuse_before_any_worker(tmp_path, tiny_llm):
    plan = train_run.load_recipe("tiny", ["max_steps=3", "stage1.lr=3e-3"])
    assert plan[1].max_steps == 3 and plan[4].mtp_lr_mult == 10.0 and plan[1].lr == 3e-3
    assert plan[3].mtp_inference_mode == (1, 10, 4, 10) and plan[1].as_dict()["betas"] == [0.9, 0.95]
    with pytest.raises(train_run.TrainConfigError, match="no MCTP module"):
        train_run.load_recipe("tiny", ["stage2.num_mtp_modules=0"])
    with pytest.raises(train_run.TrainConfigError, match="zero_stage: 3"):
        train_run.check_stage(plan[1], 7 * 10**9, 2, 32 * 2**30)
    train_run.check_stage(plan[1], 7 * 10**9, 2, 80 * 2**30)
    with pytest.raises(train_run.TrainConfigError, match="no Parquet shards"):
        train_run.resolve_data(tmp_path)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["x"], "input_ids": [[1, 2]]}), tmp_path / "bad.parquet")
    with pytest.raises(train_run.TrainConfigError, match="lacks columns"):
        train_run.resolve_data(tmp_path)
    with pytest.raises(train_run.TrainConfigError, match="not found"):
        train_run.load_recipe("nope")
    assert issubclass(train_run.TrainConfigError, InputError)


def _recipe_file(tmp_path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


# recipe text (None: tiny) or overrides -> the one line refusing it
RECIPE_CASES = {
    "unknown stage": (None, ["stage9.lr=1"], "the recipe has no stage 9 (its stages: 1, 2, 3, 4"),
    "stage not a number": (None, ["stagex.lr=1"], "no stage x"),
    "unknown key, close match": (None, ["max_step=3"], "unknown key 'max_step' (did you mean 'max_steps'?"),
    "unknown key in one stage": (None, ["stage2.lrr=1"], "unknown key 'lrr'"),
    "lr nan": (None, ["lr=nan"], "lr=nan must be a finite number"),
    "lr inf": (None, ["stage2.lr=.inf"], "lr=inf must be a finite number"),
    "lr not a number": (None, ["lr=fast"], "lr='fast' must be a number"),
    "lr zero": (None, ["lr=0"], "lr=0.0 must be > 0"),
    "max_steps zero": (None, ["max_steps=0"], "max_steps=0 must be >= 1"),
    "max_steps fraction": (None, ["max_steps=2.5"], "max_steps=2.5 must be an integer"),
    "bool as int": (None, ["bf16=1"], "bf16=1 must be true or false"),
    "int as bool": (None, ["grad_accum=true"], "grad_accum=True must be an integer"),
    "zero stage": (None, ["zero_stage=4"], "zero_stage=4 must be 0, 1, 2 or 3"),
    "warmup ratio": (None, ["warmup_ratio=2"], "warmup_ratio=2.0 must be in [0, 1]"),
    "betas": (None, ["betas=[0.9]"], "betas=[0.9] must be two numbers in [0, 1)"),
    "mode": (None, ["stage3.mtp_inference_mode=[1,10,4]"], "must be pairs of integers"),
    "override without =": (None, ["max_steps"], "is not key=value"),
    "override not YAML": (None, ["lr=["], "not a YAML value (line 1"),
    "frozen without MCTP": (None, ["stage3.num_mtp_modules=0"], "set num_mtp_modules >= 1"),
    "deepspeed JSON missing": (None, ["deepspeed_config=/nonexistent/zero3.json"], "not a readable JSON file"),
    "not YAML": ("stages:\n  1: {lr: 1\n  2: [\n", [], "not valid YAML (line 3, column"),
    "not a mapping": ("- 1\n- 2\n", [], "expected a mapping with `stages:`"),
    "unknown top-level key": ("defaults: {}\nstage:\n  1: {}\n", [], "unknown top-level key 'stage'"),
    "stage number": ("stages:\n  one: {lr: 1}\n", [], "stage 'one': stage numbers are integers >= 1"),
    "missing required": ("stages:\n  1: {lr: 1.0e-3, max_steps: 2}\n", [], "the recipe lacks num_mtp_modules"),
    "unknown key in defaults": ("defaults: {bogus: 1}\nstages:\n  1: {}\n", [], "defaults: unknown key 'bogus'"),
}


@pytest.mark.parametrize("case", sorted(RECIPE_CASES))
def test_recipe_validation_refuses_in_one_line(case, tmp_path):
    text, overrides, message = RECIPE_CASES[case]
    recipe = "tiny" if text is None else _recipe_file(tmp_path, text)
    with pytest.raises(InputError) as err:
        train_run.load_recipe(recipe, overrides)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_every_shipped_recipe_loads():
    for path in sorted(train_run.RECIPES.glob("*.yaml")):
        stages = train_run.load_recipe(str(path))
        assert sorted(stages) == [1, 2, 3, 4], path
        assert [stages[n].num_mtp_modules for n in range(1, 5)] == [0, 1, 10, 10], path


def _fake_prepare_out(root, tokenizer):
    """A folder laid out as `vita-audio prepare` writes it: shards/, errors.parquet, manifest.json, and the
    internal .blocks/ whose error files do not have the sample columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_tiny_shard(root / "shards", tokenizer)
    (root / "shards" / "part-00000.parquet").rename(root / "shards" / "part-000000.parquet")
    (root / ".blocks").mkdir()
    errors = pa.table({"id": ["x/asr"], "source": ["x"], "path": ["x.flac"], "reason": ["empty"]})
    pq.write_table(errors, root / ".blocks" / "errors-000000.parquet")
    pq.write_table(errors, root / "errors.parquet")
    (root / "manifest.json").write_text(json.dumps({"schema_version": 1, "shards": ["part-000000.parquet"]}))
    return root


def test_data_is_the_prepare_folder_or_its_shards(tmp_path, tiny_llm):
    from transformers import AutoTokenizer

    out = _fake_prepare_out(tmp_path / "prepared", AutoTokenizer.from_pretrained(tiny_llm))
    shards = (out / "shards").resolve()
    assert train_run.resolve_data(out) == (shards, [str(shards / "part-000000.parquet")])
    assert train_run.resolve_data(out / "shards") == (shards, [str(out / "shards" / "part-000000.parquet")])
    stages, wanted = train_run.plan_run("tiny", str(out), str(tiny_llm), "1")
    assert wanted == [1] and stages[1].max_steps == 4
    (out / "manifest.json").unlink()  # a preparation still running (or killed): refused, not half read
    with pytest.raises(InputError, match="has not finished"):
        train_run.resolve_data(out)
    with pytest.raises(InputError, match="--data s3://bucket/prepared: s3:// locations are not supported"):
        train_run.resolve_data("s3://bucket/prepared")
    with pytest.raises(InputError, match="'whisper' model folder, not a Qwen2 LLM"):
        (tmp_path / "enc").mkdir()
        (tmp_path / "enc" / "config.json").write_text(json.dumps({"model_type": "whisper"}))
        train_run.check_init(tmp_path / "enc")


@pytest.fixture
def no_training(monkeypatch):
    """`run` up to its first output: the stages are not trained (the run folder is committed, as the first
    stage's start does); a failure before it is simulated with `no_training.fail = True`."""
    class Fake:
        fail = False
        calls = 0

    def fake(folder, *args):
        Fake.calls += 1
        if Fake.fail:
            raise RuntimeError("start-up failed")
        folder.commit()
        return {"stages": {}}

    monkeypatch.setattr(train_run, "_run_stages", fake)
    return Fake


def test_a_changed_train_rerun_is_refused_naming_the_setting(tmp_path, tiny_llm, no_training):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llm)
    data = _fake_prepare_out(tmp_path / "prepared", tokenizer)
    other = tmp_path / "other"
    write_tiny_shard(other, tokenizer, n=6)
    out = tmp_path / "run"
    train_run.run("tiny", str(data), str(tiny_llm), str(out), stages="1-2", overrides=["max_steps=2"])
    train_run.run("tiny", str(data / "shards"), str(tiny_llm), str(out), stages="1-2", overrides=["max_steps=2"])
    train_run.run("tiny", str(data), str(tiny_llm), str(out), stages="1-4", overrides=["max_steps=2"])  # extends
    assert no_training.calls == 3
    refusals = {
        "data": dict(data=str(other)),
        "stage1.max_steps": dict(overrides=["max_steps=3"]),
        "stage4.lr": dict(overrides=["max_steps=2", "stage4.lr=1e-4"]),
        "first_stage": dict(stages="2-4"),  # stage 1 is not done: stage 2 would start from --init
    }
    for setting, change in refusals.items():
        kwargs = dict(recipe="tiny", data=str(data), init=str(tiny_llm), out=str(out), stages="1-2",
                      overrides=["max_steps=2"]) | change
        with pytest.raises(InputError) as err:
            train_run.run(**kwargs)
        line = str(err.value)
        assert f"holds a train run with other settings: {setting} was" in line and "--restart" in line, line
        with pytest.raises(InputError, match=f"{setting} was"):  # the same refusal for the CLI, before Ray
            train_run.plan_run(kwargs["recipe"], kwargs["data"], kwargs["init"], kwargs["stages"],
                               overrides=kwargs["overrides"], out=kwargs["out"])
    assert no_training.calls == 3
    (out / "stage1").mkdir()  # a stage folder of the old run: a restart clears it
    train_run.run("tiny", str(other), str(tiny_llm), str(out), stages="1", overrides=["max_steps=3"], restart=True)
    assert not (out / "stage1").exists() and json.loads((out / "plan.json").read_text())["data"] == str(other.resolve())


def test_a_failed_start_leaves_the_folder_as_it_found_it(tmp_path, tiny_llm, no_training):
    from transformers import AutoTokenizer

    data = _fake_prepare_out(tmp_path / "prepared", AutoTokenizer.from_pretrained(tiny_llm))
    out = tmp_path / "new" / "run"
    no_training.fail = True
    with pytest.raises(RuntimeError, match="start-up failed"):
        train_run.run("tiny", str(data), str(tiny_llm), str(out), stages="1", overrides=["max_steps=2"])
    assert not (tmp_path / "new").exists()  # the folders it made are gone again
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="start-up failed"):
        train_run.run("tiny", str(data), str(tiny_llm), str(kept), stages="1", overrides=["max_steps=2"])
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]  # no plan.json, no .lock
    no_training.fail = False  # the next run, with other settings, is not refused by a run that never ran
    train_run.run("tiny", str(data), str(tiny_llm), str(kept), stages="1", overrides=["max_steps=3"])
    assert json.loads((kept / "plan.json").read_text())["stage1"]["max_steps"] == 3


@pytest.fixture(scope="module")
def prepare_out(ray_session, tiny_models, shared_dir, tmp_path_factory):
    """mini-speech's 40 LibriSpeech utterances as ASR training shards, made by the corpus-preparation job."""
    from jobs.pools import PoolConfig
    from jobs.prepare.job import PrepareConfig, run_prepare

    out = tmp_path_factory.mktemp("prepared")
    manifest = run_prepare(PrepareConfig(
        sources=[f"librispeech:{shared_dir / 'corpora' / 'mini-speech' / 'LibriSpeech'}"], out=str(out),
        tasks=("asr",), models=str(tiny_models), progress=False, encoder=PoolConfig(size=1, batch_size=8),
        block_size=16))
    assert manifest["counts"]["samples"] == 40
    return out  # the folder `vita-audio prepare` wrote (train reads its manifest's shards)


def write_tiny_shard(out_dir, tokenizer, n: int = 12) -> None:
    """A shard with the corpus-preparation columns from the tiny tokenizer (text only: the fast CLI checks)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    words = ["hello world", "good morning", "speech to text", "the cat sat", "a small model", "ray train"]
    rows = {c: [] for c in ("id", "source", "task", "input_ids", "labels", "audio_seconds")}
    for i in range(n):
        prompt = tokenizer("Convert the speech to text.\n")["input_ids"]
        answer = tokenizer(words[i % len(words)] + f" {i}")["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
        rows["id"].append(f"s{i:03d}")
        rows["source"].append("tiny")
        rows["task"].append("asr")
        rows["input_ids"].append(prompt + answer)
        rows["labels"].append([-100] * len(prompt) + answer)
        rows["audio_seconds"].append(0.0)
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), out_dir / "part-00000.parquet")


# Stage 1 as the killed-worker test trains it (a checkpoint every step, one micro-batch per step, steps left after
# the kill at step 2), stages 2-4 two steps each: the four-stage run is also that test's uninterrupted stage 1.
STEPS = {1: 4, 2: 2, 3: 2, 4: 2}
OVERRIDES = ["max_steps=2", "save_every=1", "max_length=128", f"stage1.max_steps={STEPS[1]}", "stage1.grad_accum=1"]


@pytest.fixture(scope="module")
def four_stages(prepare_out, tiny_llm, tmp_path_factory):
    """The tiny 4-stage run on Ray Train (2 workers), once for the module: its folder and manifest."""
    run_dir = tmp_path_factory.mktemp("four-stages") / "run"
    manifest = train_run.run("tiny", str(prepare_out), str(tiny_llm), str(run_dir), stages="1-4", workers=2,
                             overrides=OVERRIDES)
    return run_dir, manifest


@pytest.mark.slow
def test_tiny_four_stage_run_on_ray_train(four_stages, prepare_out, tiny_llm, capsys):
    from transformers import AutoModelForCausalLM

    from jobs.train.train_func import build_model

    run_dir, manifest = four_stages
    overrides = OVERRIDES
    stages = manifest["stages"]
    assert [stages[str(n)]["status"] for n in range(1, 5)] == ["done"] * 4
    assert json.loads((run_dir / "run.json").read_text())["stages"] == json.loads(json.dumps(stages))
    assert stages["1"]["init"] == str(tiny_llm.resolve())
    for n in (2, 3, 4):  # each stage starts from the folder the previous one wrote, as run.json records it
        assert stages[str(n)]["init"] == stages[str(n - 1)]["folder"] == str(run_dir / f"stage{n - 1}")
    models = {n: load_llm(run_dir / f"stage{n}", dtype=torch.float32) for n in range(1, 5)}
    assert [models[n].num_mtp_modules for n in range(1, 5)] == [0, 1, 10, 10]
    for n, mode in ((1, [1, 0]), (2, [1, 1]), (3, [1, 10, 4, 10]), (4, [1, 10, 4, 10])):
        assert json.loads((run_dir / f"stage{n}" / "generation_config.json").read_text())["mtp_inference_mode"] == mode
        assert (run_dir / f"stage{n}" / "model.safetensors").is_file()
        assert (run_dir / f"stage{n}" / "tokenizer.json").is_file()
        hf = AutoModelForCausalLM.from_pretrained(run_dir / f"stage{n}", dtype=torch.float32)
        for key, value in hf.state_dict().items():
            assert torch.equal(value, models[n].state_dict()[key]), (n, key)
    sd = {n: models[n].state_dict() for n in range(1, 5)}
    keys = backbone_keys(models[1])
    for n in (2, 3):  # the language model is frozen in stages 2-3: bit-identical
        for key in keys:
            assert torch.equal(sd[n][key], sd[1][key]), (n, key)
    assert any(not torch.equal(sd[4][k], sd[3][k]) for k in keys)  # stage 4 trains everything

    # how the workers started stages 2 and 3 (the same build from the config run.json recorded): stage 2's
    # module is the last backbone layer, stage 3's ten modules are stage 2's trained one (spec §6.1)
    NB = models[1].num_backbone_layers
    start2 = build_model(stages["2"]["config"]).state_dict()
    start3 = build_model(stages["3"]["config"]).state_dict()
    for key, value in sd[1].items():
        if key.startswith(f"model.layers.{NB - 1}."):
            assert torch.equal(start2[key.replace(f"layers.{NB - 1}.", f"layers.{NB}.", 1)], value), key
    for k in range(10):
        for key, value in sd[2].items():
            if key.startswith(f"model.layers.{NB}."):
                assert torch.equal(start3[key.replace(f"layers.{NB}.", f"layers.{NB + k}.", 1)], value), key
        assert torch.equal(start3[f"mtp_projs.{k}.weight"], sd[2]["mtp_projs.0.weight"])
    assert not torch.equal(sd[2][f"model.layers.{NB}.mlp.up_proj.weight"], start2[f"model.layers.{NB}.mlp.up_proj.weight"])

    for n in range(1, 5):
        metrics = [json.loads(line) for line in (run_dir / f"stage{n}.metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == list(range(1, STEPS[n] + 1))
        assert all(np.isfinite(m["loss"]) for m in metrics)
        assert all(m["tokens_per_s"] > 0 and m["lr"] > 0 for m in metrics)
        assert all(len(m["mtp_losses"]) == models[n].num_mtp_modules for m in metrics)

    # `vita-audio train` on the same run folder: finished stages are not rerun (their folders stay untouched)
    from cli.main import main

    stamp = (run_dir / "stage4" / "model.safetensors").stat().st_mtime_ns
    code = main(["train", "--recipe", "tiny", "--data", str(prepare_out), "--init", str(tiny_llm),
                 "--out", str(run_dir), "--stages", "1-4", "--workers", "2", *overrides, "--json"])
    out, err = capsys.readouterr()
    assert code == 0 and "stages [1, 2, 3, 4] done" in err, err
    again = json.loads(out.strip().splitlines()[-1])
    assert again["stages"]["4"]["finished"] == stages["4"]["finished"]
    assert (run_dir / "stage4" / "model.safetensors").stat().st_mtime_ns == stamp
    # the same run given the shards folder itself is the same run; other recipe values are refused, naming them
    train_run.run("tiny", str(prepare_out / "shards"), str(tiny_llm), str(run_dir), stages="1-4", workers=2,
                  overrides=overrides)
    with pytest.raises(InputError, match="stage1.max_steps was 4, now 3"):
        train_run.run("tiny", str(prepare_out), str(tiny_llm), str(run_dir), stages="1-4", workers=2,
                      overrides=[*overrides, "stage1.max_steps=3"])
    assert (run_dir / "stage4" / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory, tiny_llm):
    from transformers import AutoTokenizer

    data = tmp_path_factory.mktemp("train-shards")
    write_tiny_shard(data, AutoTokenizer.from_pretrained(tiny_llm))
    return data


def _refuse_ray(monkeypatch) -> list:
    """`ray.init` records and refuses (Ray also looks not started: another module's session Ray may be up)."""
    import ray

    calls: list = []
    monkeypatch.setattr(ray, "init", lambda *a, **k: calls.append(k) or (_ for _ in ()).throw(
        AssertionError("ray.init called before the checks finished")))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    return calls


def _bad_schema(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "bad").mkdir(exist_ok=True)
    pq.write_table(pa.table({"id": ["x"], "input_ids": [[1, 2]]}), tmp_path / "bad" / "part-0.parquet")
    return tmp_path / "bad"


CLI_CASES = {
    "stage 2 without an MCTP module": (lambda d, t: [], ["stage2.num_mtp_modules=0"], "num_mtp_modules >= 1"),
    "shard schema mismatch": (lambda d, t: ["--data", str(_bad_schema(t))], [], "lacks columns"),
    "ZeRO stage that does not fit": (lambda d, t: [], ["zero_stage=0"], None),
    "unknown override key": (lambda d, t: [], ["max_step=3"], "unknown key 'max_step'"),
    "override without =": (lambda d, t: [], ["max_steps"], "not key=value"),
    "stage range": (lambda d, t: ["--stages", "2-7"], [], "--stages '2-7'"),
    "stage range syntax": (lambda d, t: ["--stages", "one"], [], "use N or N-M"),
    "no shards": (lambda d, t: ["--data", str(t)], [], "vita-audio prepare"),
    "missing data folder": (lambda d, t: ["--data", str(t / "nope")], [], "not a folder"),
    "init not a model": (lambda d, t: ["--init", str(t)], [], "no config.json"),
    "unknown recipe": (lambda d, t: ["--recipe", "huge"], [], "recipe 'huge' not found"),
    "workers": (lambda d, t: ["--workers", "0"], [], "--workers must be >= 1"),
    "not a number": (lambda d, t: [], ["stage3.lr=fast"], "lr='fast' must be a number"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_train_cli_refuses_a_bad_config_in_one_line_before_ray(case, tiny_shards, tiny_llm, tmp_path, capsys,
                                                               monkeypatch):
    from cli.main import main

    calls = _refuse_ray(monkeypatch)
    extra, overrides, message = CLI_CASES[case]
    if case == "ZeRO stage that does not fit":  # a tiny model cannot fill a machine: pretend 1 MiB per worker
        monkeypatch.setattr(train_run, "_memory_per_worker", lambda workers, gpus: 2**20)
        message = "use zero_stage: 3"
    argv = ["train", "--data", str(tiny_shards), "--init", str(tiny_llm), "--out", str(tmp_path / "run"),
            *extra(tiny_shards, tmp_path), *overrides]
    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert message in lines[0], lines[0]
    assert calls == [] and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_worker_killed_mid_stage_resumes_from_its_last_checkpoint(four_stages, prepare_out, tiny_llm, tmp_path):
    """Rank 1 is SIGKILLed (by the PID it writes) once step 2's checkpoint is complete; Ray Train restarts the
    worker group (FailureConfig), the stage resumes from that checkpoint and ends with the same step count and
    weights as an uninterrupted run of the same stage (the module's four-stage run: the same stage 1 settings)."""
    import os
    import signal
    import threading
    import time

    killed: dict = {}
    run_dir = tmp_path / "killed"

    def kill_rank1_mid_stage():
        ckpts, deadline = run_dir / "checkpoints" / "stage1", time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            if (ckpts / "step2" / "complete.json").is_file() and (ckpts / "rank1.pid").is_file():
                pid = int((ckpts / "rank1.pid").read_text())
                os.kill(pid, signal.SIGKILL)
                killed.update(pid=pid, at=time.monotonic())
            time.sleep(0.05)

    killer = threading.Thread(target=kill_rank1_mid_stage, daemon=True)
    killer.start()
    resumed = train_run.run("tiny", str(prepare_out), str(tiny_llm), str(run_dir), stages="1", workers=2,
                            overrides=OVERRIDES, max_failures=1)
    killer.join(timeout=5)
    assert killed, "the stage finished before the worker could be killed"
    assert int((run_dir / "checkpoints" / "stage1" / "rank1.pid").read_text()) != killed["pid"]  # a new worker
    steps = [json.loads(line)["step"] for line in (run_dir / "stage1.metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4] and resumed["stages"]["1"]["metrics"]["step"] == 4

    plain_dir, plain = four_stages
    settings = lambda entry: {k: v for k, v in entry["config"].items() if not k.endswith(("_dir", "_root", "_path"))}
    assert settings(plain["stages"]["1"]) == settings(resumed["stages"]["1"])  # the same stage, uninterrupted
    a = load_llm(run_dir / "stage1", dtype=torch.float32).state_dict()
    b = load_llm(plain_dir / "stage1", dtype=torch.float32).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_the_originals_deepspeed_json_is_accepted(tmp_path, tiny_llm):
    """An HF-Trainer-style DeepSpeed JSON (the original's scripts/deepspeed/zero3.json shape, "auto" values):
    its ZeRO block decides the stage (also for the memory check), the recipe keeps batch shape and optimizer."""
    from jobs.train.train_func import deepspeed_config

    path = tmp_path / "zero3.json"
    path.write_text(json.dumps({
        "bf16": {"enabled": "auto"}, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
        "scheduler": {"type": "WarmupDecayLR"}, "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
        "zero_optimization": {"stage": 3, "overlap_comm": True, "reduce_bucket_size": "auto",
                              "stage3_gather_16bit_weights_on_model_save": True}}))
    plan = train_run.load_recipe("tiny", [f"deepspeed_config={path}"])
    train_run.check_stage(plan[1], 10**6, 2, 2**34)
    ds = deepspeed_config(plan[1].as_dict())
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True, "stage3_gather_16bit_weights_on_model_save": True}
    assert plan[1].zero_stage == 3 and "optimizer" not in ds and "scheduler" not in ds and "bf16" not in ds
    assert ds["gradient_accumulation_steps"] == plan[1].grad_accum and ds["gradient_clipping"] == 1.0
    assert deepspeed_config(plan[1].as_dict(), bf16=True)["bf16"] == {"enabled": True}
    with pytest.raises(train_run.TrainConfigError, match="not a readable JSON"):
        train_run.load_recipe("tiny", [f"deepspeed_config={tmp_path / 'nope.json'}"])


def test_progress_line_every_logging_interval(tmp_path, capsys):
    path = tmp_path / "stage2.metrics.jsonl"
    rows = [{"stage": 2, "step": s, "loss": 1.0 / s, "backbone_loss": 0.0, "mtp_losses": [0.5, 0.25], "lr": 1e-3,
             "tokens_per_s": 100.0} for s in range(1, 8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"stage": 2, "st')  # a line being written
    with train_run.Progress(path, log_every=3, total=7, interval_s=0.01):
        pass
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split()[3] for ln in lines] == ["3/7", "6/7", "7/7"]
    assert lines[0] == "[stage 2] step 3/7 loss 0.3333 backbone 0.0000 mtp 0.3750 lr 1.00e-03 100 tok/s"
