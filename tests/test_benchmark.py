"""scripts/benchmark.py on the tiny model: settings and arms, the scripts' arguments, and one whole run whose
children time the project's steps, the bare loop and two stand-in "diffusers scripts" (one that trains, one that
fails), with FLOPs that must agree with what each loop computes."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from nbutils.runs import REPO_ROOT

spec = importlib.util.spec_from_file_location("benchmark", REPO_ROOT / "scripts" / "benchmark.py")
benchmark = importlib.util.module_from_spec(spec)
sys.modules["benchmark"] = benchmark  # its dataclasses look their module up
spec.loader.exec_module(benchmark)

TRAINS = """\
import torch
weight = torch.nn.Parameter(torch.ones(64, 64))
optimizer = torch.optim.SGD([weight], lr=1e-3)
for _ in range(10_000):
    optimizer.zero_grad()
    (weight @ weight).sum().backward()
    optimizer.step()
"""


def test_settings_are_switches_joined_by_plus():
    assert benchmark.parse_setting("base") == frozenset()
    assert benchmark.parse_setting("bf16+ckpt") == {"bf16", "ckpt"}
    with pytest.raises(ValueError, match=r"Unknown switch \['turbo'\] in setting 'bf16\+turbo'"):
        benchmark.parse_setting("bf16+turbo")
    with pytest.raises(ValueError, match="both bf16 and fp16"):
        benchmark.parse_setting("bf16+fp16")


def test_arms_pair_every_method_with_a_bare_loop_at_its_unet_batch():
    arms = benchmark.arms_for(["textual_inversion", "dreambooth"], ["base", "adam8bit", "uncached", "channels_last"],
                              batch=4, scripts=True)
    by_setting = {s: [(a.kind, a.method, a.unet_batch) for a in arms if a.setting == s]
                  for s in ("base", "adam8bit", "uncached", "channels_last")}
    assert by_setting["base"] == [("bare", "", 4), ("bare", "", 8), ("method", "textual_inversion", 4),
                                  ("method", "dreambooth", 8), ("script", "textual_inversion", 4),
                                  ("script", "dreambooth", 8)]  # prior preservation: instance + class batch
    assert by_setting["adam8bit"] == [("bare", "", 8), ("method", "dreambooth", 8), ("script", "dreambooth", 8)]
    assert by_setting["uncached"] == [("bare", "", 4)]  # a switch of the bare loop alone
    assert ("script", "textual_inversion", 4) not in by_setting["channels_last"]  # no such flag in the scripts


def test_implementation_switches_compare_with_the_script_as_it_ships():
    assert benchmark.script_setting("compile") == "base"
    assert benchmark.script_setting("ckpt+bf16+channels_last") == "bf16+ckpt"
    assert benchmark.script_setting("bf16+uncached") is None  # no script has that switch


def test_script_arguments_match_the_projects_step(tmp_path):
    spec = {"model": "tiny", "resolution": 32, "batch_size": 2, "warmup": 1, "steps": 3, "workdir": tmp_path,
            "instance_dir": "inst", "class_png_dir": "cls", "class_files": ["a.png", "b.png"],
            "class_prompt": "a photo of a person"}
    script, argv = benchmark.script_argv(benchmark.Arm("script", "dreambooth", 4, "bf16+ckpt"), spec, tmp_path)
    assert script == str(tmp_path / "train_dreambooth.py")
    flags = dict(zip(argv[::2], argv[1::2]))
    assert flags["--resolution"] == "32" and flags["--train_batch_size"] == "2"
    assert flags["--max_train_steps"] == "6"  # the clock stops the script after warmup + steps + 1 steps
    assert flags["--num_class_images"] == "2" and flags["--class_data_dir"] == "cls"
    assert "--with_prior_preservation" in argv and "--gradient_checkpointing" in argv
    assert argv[len(argv) - 1 - argv[::-1].index("--mixed_precision") + 1] == "bf16"  # the last one wins


def test_the_scripts_get_whole_batches_of_photos_and_class_images(tmp_path):
    """diffusers' DreamBooth scripts keep a short last batch: 5 photos at batch 4 would time steps of 4 and 1."""
    model = benchmark.prepare_model("tiny", torch.device("cpu"), tmp_path / "cache")
    for batch, photos in ((4, 8), (2, 6), (1, 5)):
        spec = benchmark.prepare_data(model, torch.device("cpu"), 32, batch, tmp_path / f"data-{batch}")
        assert len(list(Path(spec["instance_dir"]).glob("*.png"))) == photos
        assert len(spec["class_files"]) == len(list(Path(spec["class_png_dir"]).glob("*.png"))) == 2 * batch


def test_unknown_method_and_incomplete_examples_folder_are_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--methods", "lora,hypernetwork"])
    assert "unknown method(s) ['hypernetwork']" in capsys.readouterr().err
    (tmp_path / "textual_inversion.py").write_text("")
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--diffusers-examples", str(tmp_path)])
    assert "lacks ['train_dreambooth.py', 'train_dreambooth_lora.py']" in capsys.readouterr().err


def test_a_whole_run_on_the_tiny_model(tmp_path, monkeypatch, capsys):
    """Two rounds of LoRA and DreamBooth with prior preservation, their bare loops, a stand-in LoRA script that
    trains and a DreamBooth one that fails: every arm is timed (or reports its error), the ratios pair the rounds,
    and the FLOPs are those of the loops (DreamBooth trains every weight at twice the batch: the bare loop's FLOPs
    at that batch; LoRA computes no gradient of the frozen weights: fewer than the bare loop's)."""
    examples = tmp_path / "examples"
    examples.mkdir()
    (examples / "train_dreambooth_lora.py").write_text(TRAINS)
    (examples / "train_dreambooth.py").write_text("raise RuntimeError('needs a GPU, said the stand-in')\n")
    (examples / "textual_inversion.py").write_text(TRAINS)
    monkeypatch.setenv("PORTRAIT_STUDIO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench.json"
    result = benchmark.main(["--model", "tiny", "--methods", "lora,dreambooth", "--settings", "base", "--runs", "2",
                             "--warmup", "1", "--steps", "2", "--batch-size", "2", "--diffusers-examples",
                             str(examples), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = {row["arm"]: row for row in result["rows"]}
    assert list(rows) == ["bare loop (UNet batch 2)", "bare loop (UNet batch 4)", "lora", "dreambooth",
                          "train_dreambooth_lora.py (lora)", "train_dreambooth.py (dreambooth)"]
    for name in ("bare loop (UNet batch 2)", "bare loop (UNet batch 4)", "lora", "dreambooth",
                 "train_dreambooth_lora.py (lora)"):
        row = rows[name]
        assert not row["errors"], row["errors"]
        assert row["step_s"]["n"] == 2 and 0 < row["step_s"]["min"] <= row["step_s"]["median"] < 10, name
        assert row["peak_bytes"]["min"] > 0
    failed = rows["train_dreambooth.py (dreambooth)"]
    assert "step_s" not in failed and len(failed["errors"]) == 2
    assert failed["errors"][0]["error"] == "the child exited with code 1 before it timed a step"
    assert any("needs a GPU, said the stand-in" in line for line in failed["errors"][0]["log_tail"])
    lora, db = rows["lora"], rows["dreambooth"]
    assert lora["vs_bare"]["n"] == 2 and lora["vs_script"]["n"] == 2 and db["vs_script"] is None
    bare2, bare4 = rows["bare loop (UNet batch 2)"]["flops"], rows["bare loop (UNet batch 4)"]["flops"]
    assert bare4 <= db["flops"] < 1.05 * bare4 and 0 < lora["flops"] < bare2 < bare4  # + class captions' encoding
    assert 0 < lora["of_peak"] < 1
    assert "failed: " in capsys.readouterr().out  # the table names the arm that failed
