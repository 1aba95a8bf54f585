"""The toy tier's miniature Stable Diffusion: configurations of its parts, shaped like SD1.5 but tiny.

Images are 64 x 64 px; the VAE downsamples 4x to latents of shape ``(B, 4, 16, 16)``; the text encoder is a
2-layer CLIP text transformer (hidden 64) over the real CLIP BPE vocabulary, taken pretrained and frozen from the
toy CLIP as SD1.5 takes OpenAI's; the UNet has 7 cross-attention layers with 2 heads each.
``scripts/train_toy.py`` trains these on the procedural portrait world and saves a ``StableDiffusionPipeline`` folder.
"""
from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from nbutils.clip_bpe import VOCAB_SIZE

RESOLUTION = 64
TEXT_HIDDEN = 64
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def toy_vae() -> AutoencoderKL:
    """A 4x-downsampling KL autoencoder: ``(B, 3, 64, 64)`` in [-1, 1] <-> latents ``(B, 4, 16, 16)``."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        mid_block_add_attention=False,
        sample_size=RESOLUTION,
    )


def toy_text_encoder(pretrained: Path | None = None) -> CLIPTextModel:
    """A CLIP text transformer: token ids ``(B, 77)`` -> hidden states ``(B, 77, 64)``.

    ``pretrained``: a ``CLIPModel`` folder (the toy CLIP) whose text tower is loaded; ``None``: random weights.
    """
    if pretrained is not None:
        return CLIPTextModel.from_pretrained(pretrained)
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=TEXT_HIDDEN,
            intermediate_size=4 * TEXT_HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
        )
    )


def toy_unet() -> UNet2DConditionModel:
    """A conditional UNet on ``(B, 4, 16, 16)`` latents with cross-attention to ``(B, 77, 64)`` text states."""
    return UNet2DConditionModel(
        sample_size=RESOLUTION // 4,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=2,  # diffusers' name for the number of heads; few heads are 1.6x faster on a CPU
    )


def sd15_scheduler() -> DDIMScheduler:
    """SD1.5's own sampling scheduler: DDIM over its betas, epsilon prediction, "leading" timesteps. The tiny tier
    and the SD1.5-shaped builds of ``nbutils.models`` use it; the toy model has its own (``sample_scheduler``)."""
    return DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         prediction_type="epsilon")


def train_scheduler() -> DDPMScheduler:
    """The noise schedule used for training: SD1.5's scaled-linear betas rescaled to zero terminal SNR, predicting
    the velocity ``v`` (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed").

    SD1.5's own schedule keeps ``sqrt(alpha_bar) = 0.068`` of the image at its last step. On 16 x 16 latents that
    leak is loud: the channels' spatial means (which carry the scene) keep an amplitude SNR of 0.75 at ``t = 999``
    (measured in notebook 00), so a model trained on it reads the scene from the starting noise and the prompt
    matters less. At zero terminal SNR the last step is pure noise, as at sampling time, and only ``v`` (not the
    noise) is then a learnable target.
    """
    return DDPMScheduler(**SD_BETAS, prediction_type="v_prediction", rescale_betas_zero_snr=True)


def sample_scheduler() -> DDIMScheduler:
    """The scheduler shipped with the pipeline: SD1.5's (``sd15_scheduler``) over the training schedule, with
    "trailing" timesteps so that sampling starts from the pure-noise step ``t = 999`` (the paper's fix for samplers)."""
    return DDIMScheduler.from_config(sd15_scheduler().config, timestep_spacing="trailing",
                                     prediction_type="v_prediction", rescale_betas_zero_snr=True)
