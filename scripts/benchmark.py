"""Training-step benchmark: seconds per optimizer step, peak memory, model FLOPs and the share of the device's peak
for every method, each against a bare loop measured in the same run, and side by side with diffusers' example
training scripts when they are at hand.

    python scripts/benchmark.py    # CUDA: SD1.5's shape with random weights, 512 px, batch 1; CPU: the toy model
    python scripts/benchmark.py --settings base --runs 10 --diffusers-examples /tmp/diffusers_examples \\
        --examples-python /tmp/scripts-venv/bin/python                # + diffusers' scripts, same settings

An *arm* is one loop: a method's training step (``nbutils.train.train`` on the method as ``nbutils.recipes.build``
makes it), the bare loop, or a diffusers script. A *setting* is a set of switches (``SWITCHES``; ``base``: float32,
SDPA attention, cached latents and text embeddings, AdamW, nothing else), e.g. ``bf16+ckpt``. Every arm of every
setting runs ``--runs`` times, each time in a fresh child process with ``--threads`` threads; a round runs every
arm once, in the opposite order every other round, so the slow drift of a shared machine falls on all arms alike.

How a step is timed, the same way in every arm: the child reads the clock at each ``optimizer.zero_grad()`` call,
which each of these loops makes once per optimizer step, so the interval between two calls is one whole step
(batch, text encoding, image encoding where a loop does it, UNet forward and backward, clipping, optimizer,
logging, progress bar). Start-up (imports, loading, caching latents, the scripts' accelerate set-up) comes before
the first call and is not timed; the first ``--warmup`` intervals are dropped, the next ``--steps`` kept, and the
child then exits (no final save). A run's time is its median interval; an arm's, the median over runs, with the
range. Peak memory, from the first call to the last: CUDA's ``max_memory_allocated``; on the CPU the process's
resident high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` at the first call).

The bare loop: cached latents and text embeddings, ``nbutils.train.diffusion_loss`` (UNet forward and MSE),
backward, AdamW over every UNet weight (``nbutils.train.make_adamw``: torch's fused kernel where it has one;
full fine-tuning and nothing else), at the UNet batch of the method it is
compared with (twice the batch for DreamBooth with prior preservation). ``x bare``: a method's step over the bare
step of the same round and setting (median and range over rounds); ``x script``: likewise over the diffusers
script's step, at the same setting without the switches that only change how the project computes
(``IMPLEMENTATION``: ``compile`` is compared with the script as it ships). FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one loss and backward (matmuls,
convolutions, attention; recomputation under gradient checkpointing counted; the optimizer's element-wise work
not). ``of peak``: FLOPs / seconds per step / the device's peak, taken as the best rate of a dense matmul in the
setting's compute dtype measured in the same run on the same threads.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import runpy
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SWITCHES = {
    "classic": "the classic attention processor (softmax(QK^T)V written out, diffusers' AttnProcessor), not SDPA",
    "bf16": "autocast to bfloat16 (weights and optimizer states stay float32)",
    "fp16": "autocast to float16 with a gradient scaler",
    "ckpt": "gradient checkpointing of the UNet's blocks",
    "adam8bit": "bitsandbytes' 8-bit AdamW over the UNet (bare loop, DreamBooth; AdamW where it cannot be imported)",
    "channels_last": "the UNet's weights in channels_last memory format",
    "compile": "torch.compile of the UNet (nn.Module.compile; compilation falls in the warm-up)",
    "uncached": "bare loop only: images (VAE) and captions (text encoder) encoded every step, as diffusers' scripts do",
}
METHODS = ("textual_inversion", "pplus", "lora", "svdiff", "dreambooth_no_prior", "dreambooth")
"""The methods measured (``nbutils.recipes.build`` names): ``dreambooth`` has prior preservation, as in the study."""
SCRIPTS = {"textual_inversion": "textual_inversion.py", "lora": "train_dreambooth_lora.py",
           "dreambooth_no_prior": "train_dreambooth.py", "dreambooth": "train_dreambooth.py"}
"""The diffusers example script each method is compared with (``examples/textual_inversion``, ``examples/dreambooth``
of the diffusers repository); ``--diffusers-examples`` names a folder holding them."""
SCRIPT_FLAGS = {"bf16": ["--mixed_precision", "bf16"], "fp16": ["--mixed_precision", "fp16"],
                "ckpt": ["--gradient_checkpointing"], "adam8bit": ["--use_8bit_adam"]}
"""The scripts' own flags for the switches they have; a setting with any other switch runs no script."""
IMPLEMENTATION = frozenset({"classic", "channels_last", "compile"})
"""Switches that change how the project's step computes, not what: a method under them is compared with the script
at the same setting without them (the script as it ships, at the same precision, batch and size)."""
PROMPT = "a photo of sks person"
PEAK_SIZE = {"cpu": 1024, "cuda": 8192}  # side of the square matmul that measures the device's peak


@dataclass(frozen=True)
class Arm:
    """One loop to time: ``kind`` ``"bare"``, ``"method"`` or ``"script"``; ``method``: the method it is (or is
    compared with; ``""`` for the bare loop); ``unet_batch``: samples per UNet call; ``setting``: its switches."""

    kind: str
    method: str
    unet_batch: int
    setting: str

    @property
    def label(self) -> str:
        return {"bare": f"bare loop (UNet batch {self.unet_batch})", "method": self.method,
                "script": f"{SCRIPTS.get(self.method, '')} ({self.method})"}[self.kind]


def parse_setting(setting: str) -> frozenset[str]:
    """``"base"`` or switch names joined by ``+`` (``"bf16+ckpt"``); ``ValueError`` naming the known switches."""
    switches = frozenset() if setting == "base" else frozenset(setting.split("+"))
    unknown = sorted(switches - set(SWITCHES))
    if unknown:
        raise ValueError(f"Unknown switch {unknown} in setting {setting!r}: use 'base' or '+'-joined names from "
                         f"{', '.join(SWITCHES)}.")
    if {"bf16", "fp16"} <= switches:
        raise ValueError(f"Setting {setting!r} asks for both bf16 and fp16: pick one.")
    return switches


def script_setting(setting: str) -> str | None:
    """The setting of the script a method at ``setting`` is compared with: ``setting`` without the implementation
    switches (``"bf16+compile"`` -> ``"bf16"``); ``None`` where another switch has no script flag."""
    switches = parse_setting(setting) - IMPLEMENTATION
    if not switches <= set(SCRIPT_FLAGS):
        return None
    return "+".join(sorted(switches)) or "base"


def compute_dtype(switches: frozenset[str]) -> torch.dtype:
    """The dtype the UNet computes in under ``switches`` (autocast), float32 without bf16/fp16."""
    return torch.bfloat16 if "bf16" in switches else torch.float16 if "fp16" in switches else torch.float32


def arms_for(methods: list[str], settings: list[str], batch: int, scripts: bool) -> list[Arm]:
    """Every arm to run: per setting the bare loop (at each UNet batch a method needs), the methods a setting
    applies to (8-bit Adam: only DreamBooth's full UNet; ``uncached``: the bare loop only) and, with ``scripts``,
    the diffusers script of each method that has one, where the setting maps to the script's own flags."""
    arms = []
    for setting in settings:
        switches = parse_setting(setting)
        chosen = [m for m in methods if "uncached" not in switches
                  and ("adam8bit" not in switches or m.startswith("dreambooth"))]
        for unet_batch in sorted({2 * batch if m == "dreambooth" else batch for m in chosen} or {batch}):
            arms.append(Arm("bare", "", unet_batch, setting))
        arms += [Arm("method", m, 2 * batch if m == "dreambooth" else batch, setting) for m in chosen]
        if scripts and switches <= set(SCRIPT_FLAGS):
            arms += [Arm("script", m, 2 * batch if m == "dreambooth" else batch, setting) for m in chosen
                     if m in SCRIPTS and not ("adam8bit" in switches and m == "textual_inversion")]
    return arms


# --------------------------------------------------------------------------------------------------- in a child
class StepClock:
    """Reads the clock at every ``torch.optim.Optimizer.zero_grad`` call (once per optimizer step in every loop
    measured here) and, at call ``warmup + steps + 1``, writes the result to ``result_path`` and ends the process.

    The result: ``intervals_s`` (the ``steps`` step times after the warm-up, wall seconds), ``cpu_intervals_s``
    (the same in CPU seconds of this process: on a shared CPU, what other jobs' load inflates less), ``peak_bytes`` and
    ``peak_kind`` (memory from the first call on, see the module docstring), ``flops`` (set by the caller)."""

    def __init__(self, warmup: int, steps: int, result_path: Path):
        self.warmup, self.steps, self.result_path = warmup, steps, result_path
        self.cuda = torch.cuda.is_available()
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.flops: int | None = None

    def install(self) -> None:
        original = torch.optim.Optimizer.zero_grad

        @functools.wraps(original)
        def zero_grad(optimizer, *args, **kwargs):
            self.tick()
            return original(optimizer, *args, **kwargs)

        torch.optim.Optimizer.zero_grad = zero_grad

    def tick(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        self.cpu_times.append(time.process_time())
        if len(self.times) == 1:
            reset_peak_memory(self.cuda)
        if len(self.times) == self.warmup + self.steps + 1:
            self.finish()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)  # the step times are in: skip the loop's end (final save, inference)

    def finish(self, error: str | None = None) -> None:
        def intervals(times: list[float]) -> list[float]:
            return [b - a for a, b in zip(times, times[1:])][self.warmup:]

        peak, kind = peak_memory(self.cuda)
        result = {"intervals_s": intervals(self.times), "cpu_intervals_s": intervals(self.cpu_times),
                  "peak_bytes": peak, "peak_kind": kind, "flops": self.flops, "error": error}
        self.result_path.write_text(json.dumps(result))


def reset_peak_memory(cuda: bool) -> None:
    """Start a new peak: CUDA's allocator statistics, or the process's resident high-water mark on Linux."""
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    elif Path("/proc/self/clear_refs").exists():
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory(cuda: bool) -> tuple[int, str]:
    """(bytes, what they are): CUDA's peak allocated tensor memory, or the peak resident set size of the process."""
    if cuda:
        return torch.cuda.max_memory_allocated(), "CUDA max_memory_allocated"
    status = Path("/proc/self/status")
    if status.exists():
        line = next(row for row in status.read_text().splitlines() if row.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024, "peak resident set size (VmHWM)"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak resident set size since start-up"


def count_cpu_attention_flops() -> None:
    """Let ``FlopCounterMode`` count SDPA on the CPU: it knows the CUDA kernels' formulas, not the CPU flash
    kernel's, which takes the same (query, key, value, ...) and (grad_out, query, key, value, ...) arguments."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    same = {aten._scaled_dot_product_flash_attention_for_cpu: aten._scaled_dot_product_flash_attention,
            aten._scaled_dot_product_flash_attention_for_cpu_backward:
                aten._scaled_dot_product_flash_attention_backward}
    for cpu_op, cuda_op in same.items():
        if cpu_op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(cpu_op, get_raw=True)(flop_counter.flop_registry[cuda_op])


def model_flops(step_loss) -> int:
    """FLOPs of ``step_loss()`` (returns a scalar loss) and its backward, counted by ``FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    count_cpu_attention_flops()
    with FlopCounterMode(display=False) as counter:
        step_loss().backward()
    return counter.get_total_flops()


def classic_attention(unet) -> None:
    """Every attention layer of ``unet`` computes softmax(QK^T / sqrt(d)) V written out (diffusers'
    ``AttnProcessor``) instead of SDPA; a processor that wraps another (P+'s, ``.inner``) keeps its wrapper."""
    from diffusers.models.attention_processor import AttnProcessor

    processors = {}
    for name, processor in unet.attn_processors.items():
        if hasattr(processor, "inner"):
            processor.inner = AttnProcessor()
            processors[name] = processor
        else:
            processors[name] = AttnProcessor()
    unet.set_attn_processor(processors)


def apply_switches(unet, switches: frozenset[str]) -> None:
    """The switches that change the UNet itself (attention, checkpointing, memory format); ``compile`` comes last,
    after FLOPs are counted (``compile_unet``)."""
    if "classic" in switches:
        classic_attention(unet)
    if "ckpt" in switches:
        unet.enable_gradient_checkpointing()
    if "channels_last" in switches:
        unet.to(memory_format=torch.channels_last)


def mixed_precision(switches: frozenset[str]) -> str:
    """``TrainConfig.mixed_precision`` for ``switches``: ``"bf16"``, ``"fp16"`` or ``"no"`` (float32)."""
    return "bf16" if "bf16" in switches else "fp16" if "fp16" in switches else "no"


def training_pairs(spec: dict) -> list:
    """The instance photos of the run (``spec["instance_dir"]``) with the caption ``PROMPT``."""
    from PIL import Image

    return [(Image.open(p).convert("RGB"), PROMPT) for p in sorted(Path(spec["instance_dir"]).glob("*.png"))]


def run_method(spec: dict, clock: StepClock) -> None:
    """Train ``spec["method"]`` with ``nbutils.train.train`` (the project's step), built by ``nbutils.recipes``
    with its default recipe for the tier, at the benchmark's batch, resolution and precision."""
    from PIL import Image

    from nbutils.class_images import ClassImages
    from nbutils.models import model_tier
    from nbutils.recipes import build, default_recipe
    from nbutils.runs import new_run
    from nbutils.study import SubjectData
    from nbutils.train import adamw_class, encode_latents, make_batch, train

    switches = parse_setting(spec["setting"])
    name, folder = spec["method"], Path(spec["class_dir"])
    recipe, options = default_recipe(name, model_tier(spec["model"]))
    pairs = training_pairs(spec)
    subject = SubjectData(Path(spec["instance_dir"]), pairs, [image for image, _ in pairs], "sks")
    class_images = ClassImages(folder, spec["class_prompt"], spec["class_files"],
                               [Image.open(folder / f).convert("RGB") for f in spec["class_files"]],
                               spec["class_fingerprint"])
    built = build(name, spec["model"], subject, class_images=class_images, **options)
    method, unet = built.method, built.method.pipe.unet
    apply_switches(unet, switches)
    if "adam8bit" in switches:
        method.optimizer_class = adamw_class("adamw8bit-if-available")
    cfg = replace(recipe, steps=spec["warmup"] + spec["steps"] + 1, batch_size=spec["batch_size"],
                  gradient_accumulation=1, resolution=spec["resolution"], checkpoint_every=0, sample_every=0,
                  mixed_precision=mixed_precision(switches))
    latents = encode_latents(method.pipe, [image for image, _ in built.pairs], cfg.resolution)
    method.prepare(cfg)
    timesteps = method.noise_scheduler.config.num_train_timesteps
    batch = make_batch(latents, [caption for _, caption in built.pairs], cfg, 1, 0, timesteps)
    with autocast(unet.device, switches):
        clock.flops = model_flops(lambda: method.loss(batch))
    for p in method.trainable_parameters():
        p.grad = None
    if "compile" in switches:
        unet.compile()
    clock.install()
    train(method, built.pairs, cfg, new_run("benchmark", {}, out_dir=spec["workdir"] / "runs"))


def autocast(device: torch.device, switches: frozenset[str]) -> torch.autocast:
    """The autocast context of ``switches`` on ``device`` (disabled in float32), as ``nbutils.train.train`` sets it."""
    dtype = compute_dtype(switches)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def run_bare(spec: dict, clock: StepClock) -> None:
    """The bare loop: UNet forward (``diffusion_loss``) and backward, AdamW over every UNet weight as DreamBooth
    makes it (``make_adamw``), and nothing else; latents and text embeddings cached unless ``uncached``."""
    from diffusers import DDPMScheduler

    from nbutils.models import load_pipeline
    from nbutils.text import encode_captions
    from nbutils.train import Batch, adamw_class, diffusion_loss, encode_latents, make_adamw

    switches = parse_setting(spec["setting"])
    pipe = load_pipeline(spec["model"], dtype=torch.float32)
    pipe.vae.requires_grad_(False).eval()
    pipe.text_encoder.requires_grad_(False).eval()
    unet = pipe.unet.requires_grad_(True).eval()  # eval as every Method leaves it (the SD UNet has no dropout)
    apply_switches(unet, switches)
    pairs = training_pairs(spec)
    images = [pairs[i % len(pairs)][0] for i in range(spec["unet_batch"])]
    captions = [PROMPT] * len(images)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    choice = "adamw8bit-if-available" if "adam8bit" in switches else "adamw"
    optimizer = make_adamw(adamw_class(choice), [{"params": list(unet.parameters())}], 1e-5, 1e-2)
    scaler = torch.amp.GradScaler(unet.device.type, enabled="fp16" in switches)
    with torch.no_grad():
        latents, text = encode_latents(pipe, images, spec["resolution"]), encode_captions(pipe, captions)

    def loss() -> torch.Tensor:
        nonlocal latents, text
        if "uncached" in switches:
            with torch.no_grad():
                latents, text = encode_latents(pipe, images, spec["resolution"]), encode_captions(pipe, captions)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(images),), device=latents.device)
        with autocast(unet.device, switches):
            return diffusion_loss(unet, scheduler, Batch(latents, captions, noise, timesteps), text)

    clock.flops = model_flops(loss)
    optimizer.zero_grad(set_to_none=True)  # before the clock is installed: not a step
    if "compile" in switches:
        unet.compile()
    clock.install()
    for _ in range(spec["warmup"] + spec["steps"] + 1):
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss()).backward()
        scaler.step(optimizer)
        scaler.update()


def run_script(spec: dict, clock: StepClock) -> None:
    """Run a diffusers example script as ``python SCRIPT ARGS`` would, in this process, with the clock on."""
    clock.install()
    os.chdir(spec["workdir"])
    sys.argv = [spec["script"], *spec["argv"]]
    runpy.run_path(spec["script"], run_name="__main__")


def child(spec_path: str) -> None:
    """Run the arm described by the JSON file ``spec_path`` and write its result (``StepClock``)."""
    spec = json.loads(Path(spec_path).read_text())
    spec["workdir"] = Path(spec["workdir"])
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    clock = StepClock(spec["warmup"], spec["steps"], Path(spec["result"]))
    {"bare": run_bare, "method": run_method, "script": run_script}[spec["kind"]](spec, clock)
    clock.finish(error=f"the loop ended after {max(len(clock.times) - 1, 0)} steps, before "
                       f"{spec['warmup']} + {spec['steps']} were timed")


# --------------------------------------------------------------------------------------------------- the parent
def matmul_peak(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """The device's peak in FLOP/s for ``dtype``, measured: the best rate of a square dense matmul
    (``PEAK_SIZE[device.type]`` on a side) over ``repeats`` tries, on this process's threads."""
    n = PEAK_SIZE.get(device.type, 2048)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    best = math.inf
    for _ in range(repeats + 1):  # the first is a warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def prepare_model(model: str, device: torch.device, cache: Path) -> str:
    """The model folder to benchmark: ``"sd15-random"`` is SD1.5's architecture with random weights
    (``build_tiny_pipeline(0, sd15_shape=True)``, saved once under ``cache``, 4.3 GB); ``"auto"`` is that on
    CUDA and the toy model elsewhere; anything else as ``nbutils.models.resolve_model`` reads it."""
    from nbutils.dreambooth import save_pipeline
    from nbutils.models import build_tiny_pipeline, is_pipeline_folder, resolve_model

    if model == "auto":
        model = "sd15-random" if device.type == "cuda" else "toy"
    if model != "sd15-random":
        return resolve_model(model, device)
    folder = cache / "sd15-random"
    if not is_pipeline_folder(folder):
        print(f"building SD1.5's architecture with random weights into {folder} (once)")
        save_pipeline(build_tiny_pipeline(0, sd15_shape=True), folder)
    return str(folder)


def prepare_data(model_ref: str, device: torch.device, resolution: int, batch: int, workdir: Path) -> dict:
    """The images every arm trains on, as files: photos of the toy subject rendered at ``resolution``
    (``workdir/instance``; at least 5, rounded up to a multiple of ``batch``) and ``2 * batch`` class images drawn
    by the model (2 sampling steps; their content does not matter here) in ``workdir/class`` (with the cache files
    of ``ensure_class_images``) and, as bare PNGs for the scripts, ``workdir/class-png``. Returns the spec entries
    that name them.

    Whole batches only: diffusers' DreamBooth scripts keep a data loader's short last batch, so 5 photos at batch 4
    would give them steps of 4 and 1 images and time them at a smaller mean batch than the project's loops."""
    from nbutils.class_images import ensure_class_images
    from nbutils.models import load_pipeline
    from nbutils.prompts import CLASS_PROMPT
    from nbutils.toyworld import TOY_SUBJECT, portraits, render

    instance = workdir / "instance"
    instance.mkdir(parents=True)
    for i, person in enumerate(portraits(0, batch * math.ceil(5 / batch), identity=TOY_SUBJECT)):
        render(person, resolution).save(instance / f"{i:02d}.png")
    pipe = load_pipeline(model_ref, device=device, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    classes = ensure_class_images(pipe, 2 * batch, steps=2, guidance_scale=1.0, model=model_ref,
                                  resolution=resolution, cache_dir=workdir / "class")
    del pipe
    pngs = workdir / "class-png"
    pngs.mkdir()
    for name in classes.files:
        shutil.copy(classes.folder / name, pngs / name)
    return {"instance_dir": str(instance), "class_dir": str(classes.folder), "class_png_dir": str(pngs),
            "class_files": classes.files, "class_fingerprint": classes.fingerprint, "class_prompt": CLASS_PROMPT}


def script_argv(arm: Arm, spec: dict, examples: Path) -> tuple[str, list[str]]:
    """The diffusers script of ``arm.method`` and its arguments at the arm's settings: the same model, photos,
    resolution, batch, learning rate and options (LoRA's rank, the prior weight) as the project's step, no
    validation, no checkpoint within the run, trackers only where installed (``--report_to all``)."""
    from nbutils.models import model_tier
    from nbutils.recipes import default_recipe

    recipe, options = default_recipe(arm.method, model_tier(spec["model"]))
    options = {"rank": 4, "prior_loss_weight": 1.0} | options
    out = spec["workdir"] / f"out-{arm.method}-{time.monotonic_ns()}"
    steps = spec["warmup"] + spec["steps"] + 2  # the clock ends the script after the step before the last
    flags = [flag for switch in sorted(parse_setting(arm.setting)) for flag in SCRIPT_FLAGS[switch]]
    common = ["--pretrained_model_name_or_path", spec["model"], "--resolution", str(spec["resolution"]),
              "--train_batch_size", str(spec["batch_size"]), "--max_train_steps", str(steps),
              "--learning_rate", str(recipe.lr), "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
              "--output_dir", str(out), "--seed", "0", "--report_to", "all", "--checkpointing_steps", "1000000",
              "--mixed_precision", "no", *flags]
    if arm.method == "textual_inversion":
        argv = ["--train_data_dir", spec["instance_dir"], "--learnable_property", "object", "--placeholder_token",
                "<sks>", "--initializer_token", "person", "--save_steps", "1000000", "--dataloader_num_workers", "0"]
    else:
        argv = ["--instance_data_dir", spec["instance_dir"], "--instance_prompt", PROMPT]
    if arm.method == "lora":
        argv += ["--rank", str(options["rank"])]
    if arm.method == "dreambooth":
        argv += ["--with_prior_preservation", "--class_data_dir", spec["class_png_dir"], "--class_prompt",
                 spec["class_prompt"], "--num_class_images", str(len(spec["class_files"])), "--prior_loss_weight",
                 str(options["prior_loss_weight"])]
    return str(examples / SCRIPTS[arm.method]), common + argv  # a later --mixed_precision wins in argparse


def run_arm(arm: Arm, base_spec: dict, args: argparse.Namespace, index: int) -> dict:
    """One run of ``arm`` in a child process: ``{"step_s", "intervals_s", "peak_bytes", "peak_kind", "flops"}``,
    or ``{"error": ...}`` with the end of the child's output."""
    workdir = base_spec["workdir"]
    spec = base_spec | asdict(arm) | {"result": str(workdir / f"result-{index}.json")}
    python = sys.executable
    if arm.kind == "script":
        spec["script"], spec["argv"] = script_argv(arm, spec, Path(args.diffusers_examples))
        python = args.examples_python
    spec_path = workdir / f"spec-{index}.json"
    spec_path.write_text(json.dumps(spec | {"workdir": str(workdir)}))
    env = os.environ | {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if spec["threads"]:
        env |= {"OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"])}
    if spec["device"] == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    log = workdir / f"log-{index}.txt"
    try:
        with log.open("w") as out:
            code = subprocess.run([python, str(Path(__file__).resolve()), "--child", str(spec_path)], env=env,
                                  stdout=out, stderr=subprocess.STDOUT, timeout=args.child_timeout,
                                  check=False).returncode
        result = json.loads(Path(spec["result"]).read_text())
    except subprocess.TimeoutExpired:
        result = {"error": f"the child ran past --child-timeout ({args.child_timeout:g} s)"}
    except FileNotFoundError:
        result = {"error": f"the child exited with code {code} before it timed a step"}
    except json.JSONDecodeError as err:
        result = {"error": f"the child's result file is not JSON: {err}"}
    if not result.get("error") and len(result["intervals_s"]) == args.steps:
        return result | {"step_s": statistics.median(result["intervals_s"]),
                         "cpu_s": statistics.median(result["cpu_intervals_s"])}
    tail = log.read_text(errors="replace").splitlines()[-args.error_lines:] if log.exists() else []
    return {"error": result.get("error") or "no step times", "log_tail": tail}


def spread(values: list[float]) -> dict:
    """``{"median", "min", "max", "n"}`` of ``values``."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def paired_ratio(runs: list[dict], other: list[dict], key: str) -> dict | None:
    """The spread of ``runs[r][key] / other[r][key]`` (``"step_s"`` or ``"cpu_s"``) over the rounds where both arms
    ran."""
    ratios = [a[key] / b[key] for a, b in zip(runs, other) if key in a and key in b]
    return spread(ratios) if ratios else None


def summarise(arms: list[Arm], runs: dict[Arm, list[dict]], peaks: dict[str, float]) -> list[dict]:
    """One row per arm: step seconds (wall and CPU) and peak memory (median and range over runs), FLOPs per step,
    the share of the device's peak, and the paired ratios (wall and CPU time) to the bare loop and to the diffusers
    script of the same setting."""
    rows = []
    for arm in arms:
        done = [r for r in runs[arm] if "step_s" in r]
        row = {"setting": arm.setting, "arm": arm.label} | asdict(arm)
        row["errors"] = [r for r in runs[arm] if r.get("error")]
        if done:
            row |= {"step_s": spread([r["step_s"] for r in done]), "cpu_s": spread([r["cpu_s"] for r in done]),
                    "peak_bytes": spread([r["peak_bytes"] for r in done]),
                    "peak_kind": done[0]["peak_kind"], "flops": done[0]["flops"]}
            if row["flops"]:
                peak = peaks[str(compute_dtype(parse_setting(arm.setting)))]
                row["of_peak"] = row["flops"] / row["step_s"]["median"] / peak
        if arm.kind == "method":
            others = {"bare": Arm("bare", "", arm.unet_batch, arm.setting),
                      "script": Arm("script", arm.method, arm.unet_batch, script_setting(arm.setting) or "")}
            row["script_setting"] = script_setting(arm.setting)
            for name, other in others.items():
                row[f"vs_{name}"] = paired_ratio(runs[arm], runs.get(other, []), "step_s")
                row[f"vs_{name}_cpu"] = paired_ratio(runs[arm], runs.get(other, []), "cpu_s")
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    """The rows as a text table, one block per setting: wall seconds per step (median [min-max] over runs), CPU
    seconds, peak memory, GFLOP per step, share of the peak, and the ratios to the bare loop and to the script
    (wall median [min-max], then by CPU time)."""
    def ratio(r: dict | None, wide: bool = True) -> str:
        return "" if not r else f"{r['median']:.2f} [{r['min']:.2f}-{r['max']:.2f}]" if wide else f"{r['median']:.2f}"

    header = (f"{'arm':40} {'s/step [min-max]':>24} {'cpu s':>7} {'MiB':>6} {'GFLOP':>7} {'peak%':>6} "
              f"{'x bare [min-max]':>17} {'cpu':>5} {'x script [min-max]':>18} {'cpu':>5}")
    for setting in dict.fromkeys(row["setting"] for row in rows):
        against = {row.get("script_setting") for row in rows if row["setting"] == setting} - {None, setting}
        note = f" (x script: the scripts at setting {against.pop()})" if against else ""
        print(f"\nsetting {setting}{note}\n{header}")
        for row in (r for r in rows if r["setting"] == setting):
            if "step_s" not in row:
                print(f"{row['arm']:40} failed: {row['errors'][0]['error']}")
                continue
            s = row["step_s"]
            flops = f"{row['flops'] / 1e9:7.2f}" if row.get("flops") else f"{'':7}"
            share = f"{100 * row['of_peak']:5.1f}%" if row.get("of_peak") else f"{'':6}"
            print(f"{row['arm']:40} {s['median']:9.4f} [{s['min']:.4f}-{s['max']:.4f}] {row['cpu_s']['median']:7.4f} "
                  f"{row['peak_bytes']['median'] / 2**20:6.0f} {flops} {share} {ratio(row.get('vs_bare')):>17} "
                  f"{ratio(row.get('vs_bare_cpu'), False):>5} {ratio(row.get('vs_script')):>18} "
                  f"{ratio(row.get('vs_script_cpu'), False):>5}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="switches: " + "; ".join(f"{k}: {v}" for k, v in SWITCHES.items()))
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda where available)")
    p.add_argument("--model", default="auto", help="auto (CUDA: sd15-random, else toy), sd15-random, toy, tiny or "
                                                   "a pipeline folder")
    p.add_argument("--resolution", type=int, default=None, help="image side in px (default: the model's own)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default: 1 on CUDA, 4 on the CPU)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--settings", default=None,
                   help="comma-separated settings, each 'base' or switches joined by '+' (default on CUDA: base, "
                        "bf16, bf16+ckpt, bf16+channels_last, bf16+adam8bit, bf16+compile, fp16, bf16+classic, "
                        "bf16+uncached; on the CPU: base, classic, ckpt, channels_last, bf16, uncached)")
    p.add_argument("--runs", type=int, default=3, help="runs of every arm (rounds)")
    p.add_argument("--warmup", type=int, default=3, help="steps dropped at the start of each run")
    p.add_argument("--steps", type=int, default=10, help="steps timed in each run")
    p.add_argument("--threads", type=int, default=None, help="torch threads per child (default: 1 on the CPU)")
    p.add_argument("--diffusers-examples", default=None,
                   help=f"a folder with diffusers' {', '.join(sorted(set(SCRIPTS.values())))}: time them too")
    p.add_argument("--examples-python", default=sys.executable,
                   help="the Python that runs the scripts (they need torchvision; default: this one)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--child-timeout", type=float, default=3600, help="seconds before a child is stopped")
    p.add_argument("--error-lines", type=int, default=15, help="lines of a failed child's output to keep")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        p.error(f"unknown method(s) {unknown}: choose from {', '.join(METHODS)}")
    args.methods = methods
    if args.diffusers_examples:
        missing = [s for s in sorted(set(SCRIPTS.values())) if not (Path(args.diffusers_examples) / s).is_file()]
        if missing:
            p.error(f"--diffusers-examples {args.diffusers_examples} lacks {missing}: copy them from the diffusers "
                    "repository's examples/textual_inversion and examples/dreambooth")
    if min(args.runs, args.steps) < 1 or args.warmup < 0:
        p.error("--runs and --steps must be at least 1, --warmup at least 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns (and with ``--out`` writes) ``{"conditions", "peaks_flops", "rows"}``."""
    args = parse_args(argv)
    if args.child:
        child(args.child)
        return {}
    from nbutils.models import image_size, pick_device

    device = pick_device(args.device)
    cpu = device.type == "cpu"
    threads = args.threads or (1 if cpu else None)
    if threads:
        torch.set_num_threads(threads)
    default = "base,classic,ckpt,channels_last,bf16,uncached" if cpu else \
        "base,bf16,bf16+ckpt,bf16+channels_last,bf16+adam8bit,bf16+compile,fp16,bf16+classic,bf16+uncached"
    settings = (args.settings or default).split(",")
    for setting in settings:
        parse_setting(setting)
    cache = Path(os.environ.get("PORTRAIT_STUDIO_CACHE", Path.home() / ".cache" / "portrait-studio")) / "benchmark"
    model_ref = prepare_model(args.model, device, cache)
    resolution = args.resolution or image_size(model_ref)
    batch = args.batch_size or (4 if cpu else 1)
    arms = arms_for(args.methods, settings, batch, bool(args.diffusers_examples))
    workdir = Path(tempfile.mkdtemp(prefix="benchmark-"))
    try:
        base_spec = {"model": model_ref, "resolution": resolution, "batch_size": batch, "warmup": args.warmup,
                     "steps": args.steps, "threads": threads, "device": device.type, "workdir": workdir}
        base_spec |= prepare_data(model_ref, device, resolution, batch, workdir)
        dtypes = sorted({compute_dtype(parse_setting(s)) for s in settings}, key=str)
        peaks = {str(dtype): matmul_peak(device, dtype) for dtype in dtypes}
        print(f"{len(arms)} arms x {args.runs} runs on {device.type} ({threads or 'default'} threads), "
              f"{model_ref} at {resolution} px, batch {batch}; measured matmul peak: "
              + ", ".join(f"{k.removeprefix('torch.')} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()), flush=True)
        runs: dict[Arm, list[dict]] = {arm: [] for arm in arms}
        index = 0
        for r in range(args.runs):
            for arm in arms if r % 2 == 0 else arms[::-1]:
                runs[arm].append(run_arm(arm, base_spec, args, index))
                index += 1
                last = runs[arm][-1]
                status = f"{last['step_s']:.4f} s/step" if "step_s" in last else \
                    "FAILED: " + "\n    ".join([last["error"], *last["log_tail"]])
                print(f"run {r + 1}/{args.runs} [{arm.setting}] {arm.label}: {status}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = summarise(arms, runs, peaks)
    print_table(rows)
    conditions = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} "
                  "cores visible)", "threads": threads, "model": model_ref, "resolution": resolution,
                  "batch_size": batch, "runs": args.runs, "warmup": args.warmup, "steps": args.steps,
                  "settings": settings, "methods": args.methods, "diffusers_examples": args.diffusers_examples,
                  "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    result = {"conditions": conditions, "peaks_flops": peaks, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
