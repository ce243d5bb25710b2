"""The original (Stability / LDM) layouts: the one `.safetensors` file A1111 and ComfyUI load, which diffusers
reads with `from_single_file(path, config=<a diffusers folder>)`, and the module names kohya LoRAs use.

SDXL:
    model.diffusion_model.*          the UNet: input_blocks / middle_block / output_blocks
    first_stage_model.*              the VAE: encoder.down.{i}.block.{j}, mid.block_1, mid.attn_1, decoder.up.*
    conditioner.embedders.0.transformer.*   CLIP ViT-L, transformers' own names
    conditioner.embedders.1.model.*  OpenCLIP ViT-bigG: resblocks, fused q/k/v (in_proj), text_projection
SD3:
    model.diffusion_model.*          the MMDiT: joint_blocks.{i}.x_block / context_block, fused qkv, adaLN
    first_stage_model.*              the VAE, as SDXL's
    text_encoders.clip_l / clip_g / t5xxl.transformer.*   transformers' own names

Block numbering comes from the model's config, so any model of the family's shape (the real one, the tiny test
ones) maps; a name is renamed by its longest matching module prefix."""
from __future__ import annotations

from typing import Callable

import re

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


def _own_storage(state: dict) -> dict:
    """Contiguous tensors, each with storage of its own (safetensors refuses tied weights, e.g. T5's embeddings)."""
    seen, out = set(), {}
    for k, v in state.items():
        v = v.contiguous()
        out[k] = v.clone() if v.data_ptr() in seen else v
        seen.add(v.data_ptr())
    return out


def sdxl_single_file(pipe, unet) -> dict[str, torch.Tensor]:
    """An SDXL pipeline, with `unet` in place of its own, as one state dict in the original layout."""
    ldm = unet_names(unet.config)
    state = {f"model.diffusion_model.{ldm(k)}": v for k, v in unet.state_dict().items()}
    state |= {f"first_stage_model.{k}": v for k, v in _vae(pipe.vae.state_dict(), pipe.vae.config).items()}
    state |= {f"conditioner.embedders.0.transformer.{k}": v for k, v in _text_model(pipe.text_encoder).items()}
    state |= {f"conditioner.embedders.1.model.{k}": v for k, v in _open_clip(_text_model(pipe.text_encoder_2)).items()}
    return _own_storage(state)


MMDIT_FIXED = {"pos_embed.pos_embed": "pos_embed", "pos_embed.proj": "x_embedder.proj",
               "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
               "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
               "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
               "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
               "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"}
MMDIT_BLOCK = {"attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
               "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
               "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
               "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k",
               "attn2.to_out.0": "x_block.attn2.proj", "norm1.linear": "x_block.adaLN_modulation.1",
               "norm1_context.linear": "context_block.adaLN_modulation.1",
               "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
               "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2"}
QKV = re.compile(r"transformer_blocks\.(\d+)\.(attn2?)\.(to_|add_)([qkv])(?:_proj)?\.(weight|bias)")


def _swap_halves(v: torch.Tensor) -> torch.Tensor:
    """(shift, scale) <-> (scale, shift): the two layouts order the final adaLN outputs oppositely."""
    a, b = v.chunk(2, dim=0)
    return torch.cat([b, a])


def _mmdit(state: dict, config) -> dict:
    last = config["num_layers"] - 1
    prefixes = dict(MMDIT_FIXED)
    for i in range(config["num_layers"]):
        prefixes |= {f"transformer_blocks.{i}.{d}": f"joint_blocks.{i}.{o}" for d, o in MMDIT_BLOCK.items()}
    out, qkv = {}, {}
    for k, v in state.items():
        m = QKV.fullmatch(k)
        if m:  # q, k and v of one stream stacked into one qkv
            i, attn, stream, which, kind = m.groups()
            block = "context_block" if stream == "add_" else "x_block"
            qkv.setdefault(f"joint_blocks.{i}.{block}.{attn}.qkv.{kind}", {})[which] = v
            continue
        if k.startswith("norm_out.linear.") or k.startswith(f"transformer_blocks.{last}.norm1_context.linear."):
            v = _swap_halves(v)  # the last block's context stream ends in the same final-layer modulation
        out[rename(k, prefixes, {})] = v
    out |= {name: torch.cat([p["q"], p["k"], p["v"]]) for name, p in qkv.items()}
    return out


def sd3_single_file(pipe, transformer) -> dict[str, torch.Tensor]:
    """An SD3 pipeline, with `transformer` in place of its own, as one state dict in the original layout. The
    reader takes CLIP-L's text projection as the identity (so is SD3's own)."""
    state = {f"model.diffusion_model.{k}": v for k, v in _mmdit(transformer.state_dict(), transformer.config).items()}
    state |= {f"first_stage_model.{k}": v for k, v in _vae(pipe.vae.state_dict(), pipe.vae.config).items()}
    encoders = (("clip_l", pipe.text_encoder), ("clip_g", pipe.text_encoder_2), ("t5xxl", pipe.text_encoder_3))
    for name, encoder in encoders:
        own = _text_model(encoder) if name != "t5xxl" else encoder.state_dict()
        state |= {f"text_encoders.{name}.transformer.{k}": v for k, v in own.items()}
    return _own_storage(state)
