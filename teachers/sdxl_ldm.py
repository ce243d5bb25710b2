"""SDXL in its original (Stability / LDM) layout: the one `.safetensors` file A1111 and ComfyUI load, which
diffusers reads with `StableDiffusionXLPipeline.from_single_file`, and the module names kohya LoRAs use.

    model.diffusion_model.*          the UNet: input_blocks / middle_block / output_blocks
    first_stage_model.*              the VAE: encoder.down.{i}.block.{j}, mid.block_1, mid.attn_1, decoder.up.*
    conditioner.embedders.0.transformer.*   CLIP ViT-L, transformers' own names
    conditioner.embedders.1.model.*  OpenCLIP ViT-bigG: resblocks, fused q/k/v (in_proj), text_projection

The UNet's block numbering comes from the model's config, so any SDXL-shaped UNet (the real one, the tiny test
ones) maps; a name is renamed by its longest matching module prefix."""
from __future__ import annotations

from typing import Callable

import torch

UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_prefixes(config) -> dict[str, str]:
    """Every UNet module prefix (diffusers) -> its LDM prefix: the input blocks count resnet (+ attention)
    layers and downsamplers from 1, the output blocks count layers_per_block + 1 per up block from 0."""
    layers, down, up = config["layers_per_block"], config["down_block_types"], config["up_block_types"]
    names, block = dict(UNET_FIXED), 1
    for i, kind in enumerate(down):
        for j in range(layers):
            names[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{block}.0"
            if "CrossAttn" in kind:
                names[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{block}.1"
            block += 1
        if i < len(down) - 1:
            names[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{block}.0.op"
            block += 1
    names |= {"mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
              "mid_block.resnets.1": "middle_block.2"}
    for i, kind in enumerate(up):
        for j in range(layers + 1):
            block = i * (layers + 1) + j
            names[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{block}.0"
            if "CrossAttn" in kind:
                names[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{block}.1"
        if i < len(up) - 1:
            names[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{block}.{2 if 'CrossAttn' in kind else 1}.conv"
    return names


def vae_prefixes(config) -> dict[str, str]:
    """Every VAE module prefix (diffusers) -> its LDM prefix; the decoder's up blocks count down."""
    n, layers = len(config["block_out_channels"]), config["layers_per_block"]
    names = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
    for part in ("encoder", "decoder"):
        names |= {f"{part}.mid_block.resnets.{j}": f"{part}.mid.block_{j + 1}" for j in range(2)}
        names[f"{part}.mid_block.attentions.0"] = f"{part}.mid.attn_1"
    for i in range(n):
        names |= {f"encoder.down_blocks.{i}.resnets.{j}": f"encoder.down.{i}.block.{j}" for j in range(layers)}
        names |= {f"decoder.up_blocks.{i}.resnets.{j}": f"decoder.up.{n - 1 - i}.block.{j}" for j in range(layers + 1)}
        names[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
        names[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{n - 1 - i}.upsample.conv"
    return names


def rename(name: str, prefixes: dict[str, str], inner: dict[str, dict[str, str]]) -> str:
    """`name` with its longest module prefix in `prefixes` replaced, and the child of that module renamed by
    `inner[kind]` when the prefix is of that kind (a resnet's conv1 -> in_layers.2); names no prefix matches
    stay as they are."""
    best = max((p for p in prefixes if name == p or name.startswith(p + ".")), key=len, default=None)
    if best is None:
        return name
    rest = name[len(best):]
    children = next((m for kind, m in inner.items() if f".{kind}." in f".{best}."), {})
    for old, new in children.items():
        if rest == f".{old}" or rest.startswith(f".{old}."):
            rest = f".{new}{rest[len(old) + 1:]}"
            break
    return prefixes[best] + rest


def unet_names(config) -> Callable[[str], str]:
    """A function from a UNet parameter or module name to its LDM name."""
    prefixes = unet_prefixes(config)
    return lambda name: rename(name, prefixes, {"resnets": RESNET})


def _vae(state: dict, config) -> dict:
    prefixes, inner = vae_prefixes(config), {"resnets": {"conv_shortcut": "nin_shortcut"}, "attentions": VAE_ATTENTION}
    out = {}
    for k, v in state.items():
        if ".attentions." in k and v.ndim == 2:  # LDM's attention projections are 1x1 convolutions
            v = v[:, :, None, None]
        out[rename(k, prefixes, inner)] = v
    return out


def _text_model(model) -> dict:
    """transformers' names with the text_model wrapper that LDM keeps (newer CLIPTextModel drops it)."""
    state = model.state_dict()
    return state if hasattr(model, "text_model") else {f"text_model.{k}": v for k, v in state.items()}


def _open_clip(state: dict) -> dict:
    out, qkv = {}, {}
    for k, v in state.items():
        if k == "text_projection.weight":
            out["text_projection"] = v.T.contiguous()
            continue
        k = (k.replace("text_model.encoder.layers.", "transformer.resblocks.").replace(".self_attn.", ".attn.")
             .replace(".layer_norm1.", ".ln_1.").replace(".layer_norm2.", ".ln_2.")
             .replace(".mlp.fc1.", ".mlp.c_fc.").replace(".mlp.fc2.", ".mlp.c_proj.")
             .replace("text_model.final_layer_norm.", "ln_final.")
             .replace("text_model.embeddings.token_embedding.", "token_embedding."))
        if k == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = v
        elif any(f".{p}_proj." in k for p in "qkv"):  # q, k and v stacked into one in_proj
            block, proj, kind = k.rsplit(".", 2)  # transformer.resblocks.0.attn, q_proj, weight
            qkv.setdefault((block, kind), {})[proj[0]] = v
        else:
            out[k] = v
    for (block, kind), parts in qkv.items():
        out[f"{block}.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def single_file_state(pipe, unet) -> dict[str, torch.Tensor]:
    """The whole pipeline, with `unet` in place of its own, as one state dict in the original layout."""
    ldm = unet_names(unet.config)
    state = {f"model.diffusion_model.{ldm(k)}": v for k, v in unet.state_dict().items()}
    state |= {f"first_stage_model.{k}": v for k, v in _vae(pipe.vae.state_dict(), pipe.vae.config).items()}
    state |= {f"conditioner.embedders.0.transformer.{k}": v for k, v in _text_model(pipe.text_encoder).items()}
    state |= {f"conditioner.embedders.1.model.{k}": v for k, v in _open_clip(_text_model(pipe.text_encoder_2)).items()}
    return {k: v.contiguous() for k, v in state.items()}
