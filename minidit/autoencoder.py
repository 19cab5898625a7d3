"""The FLUX autoencoder (`ae.safetensors`): a KL-VAE that maps images 8x down to 16 latent channels.

    ae = load_autoencoder("ae.safetensors")   # or a diffusers vae/ folder, or a FLUX repository root
    z = ae.encode(img)                        # (B, 3, H, W) in [-1, 1] -> (B, 16, H/8, W/8), normalised latents
    x = ae.decode(z)                          # -> (B, 3, H, W), roughly [-1, 1], NOT clamped (tensor_to_pil clamps)
    x = ae.decode(z, tile=512)                # tiled on 512x512-pixel tiles: exact, about half the memory

The network is the official one (black-forest-labs/flux, src/flux/modules/autoencoder.py) and its parameter names
are those of `ae.safetensors`, so loading is a strict `load_state_dict`:
  encoder: conv_in -> down[0..L-1] (num_res_blocks ResnetBlocks each, a stride-2 Downsample after every level
           but the last) -> mid (ResnetBlock, single-head spatial self-attention, ResnetBlock) -> norm_out, SiLU,
           conv_out with 2*z_channels outputs (posterior mean and log-variance; no quant_conv).
  decoder: conv_in -> mid -> up[L-1..0] (num_res_blocks+1 ResnetBlocks each, nearest 2x Upsample + conv after
           every level but level 0) -> norm_out, SiLU, conv_out. NB `decoder.up[i]` is the level at resolution
           2^-i: up[0] is the last one run (highest resolution, `ch` channels), as in the official code.
Latents are normalised as the transformer expects: z = scale_factor * (mean - shift_factor); decode undoes it.

Tiling (`tile=` pixels, for large images; inference only): exact, see tiling.py. Memory and FLOPs of tiling (measured and counted), and the earlier scheme it replaced: docs/methods.md.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .tiling import group_norm, identity, map_tiles, tiled_resnet
from .loading import (CheckpointError, Converted, LazyStateDict, check_config, default_device_dtype, load_streaming,
                      open_checkpoint, read_json)


@dataclass
class AutoEncoderConfig:
    resolution: int = 256  # unused by the network (kept for parity with the official params)
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    @classmethod
    def flux(cls) -> AutoEncoderConfig:
        """FLUX.1 [dev]/[schnell] `ae.safetensors` (83.8 M parameters)."""
        return cls()

    @classmethod
    def tiny(cls) -> AutoEncoderConfig:
        """A tiny AE for tests: same 8x downsampling (4 levels), 16 latent channels, channels 32/32/64/64."""
        return cls(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)

    @classmethod
    def from_checkpoint(cls, sd, scale_factor: float = 0.3611, shift_factor: float = 0.1159) -> AutoEncoderConfig:
        """Infer ch / ch_mult / num_res_blocks / channels from the tensor shapes of a BFL-named state dict
        (a dict, `LazyStateDict` or `Converted` view). scale/shift are not stored in the file: FLUX's by default."""
        def shape(key):
            if key not in sd:
                raise CheckpointError(f"autoencoder checkpoint has no {key!r}: not a FLUX autoencoder state dict")
            return tuple(sd.shape(key)) if hasattr(sd, "shape") else tuple(sd[key].shape)

        levels = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))), default=-1)
        blocks = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))),
                         default=-1)
        if levels == 0 or blocks == 0:
            raise CheckpointError("autoencoder checkpoint has no encoder.down.* blocks: not a FLUX autoencoder")
        ch_out, in_channels = shape("encoder.conv_in.weight")[:2]
        outs = [shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(levels)]
        if any(o % ch_out for o in outs):
            raise CheckpointError(f"autoencoder level widths {outs} are not multiples of ch={ch_out}")
        return cls(in_channels=in_channels, ch=ch_out, out_ch=shape("decoder.conv_out.weight")[0],
                   ch_mult=tuple(o // ch_out for o in outs), num_res_blocks=blocks,
                   z_channels=shape("encoder.conv_out.weight")[0] // 2,
                   scale_factor=scale_factor, shift_factor=shift_factor)


# --------------------------------------------------------------------------------------------------- layers
def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions; q/k/v/proj_out are 1x1 convs (as in ae.safetensors)."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        y = self.norm(x)
        q, k, v = (rearrange(p(y), "b c h w -> b 1 (h w) c").contiguous() for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), scale 1/sqrt(C); fused kernels are O(HW)
        return x + self.proj_out(rearrange(y, "b 1 (h w) c -> b c h w", h=h, w=w))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad: right and bottom only


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level (a container): `block` (ResnetBlocks), then `downsample` / `upsample` if present."""

    def __init__(self, c_in: int, c_out: int, n: int, downsample: bool = False, upsample: bool = False):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(c_in if j == 0 else c_out, c_out) for j in range(n))
        if downsample:
            self.downsample = Downsample(c_out)
        if upsample:
            self.upsample = Upsample(c_out)


class Encoder(nn.Module):
    def __init__(self, cfg: AutoEncoderConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList(
            Level(cfg.ch if i == 0 else widths[i - 1], widths[i], cfg.num_res_blocks, downsample=i != last)
            for i in range(len(widths)))
        self.mid = Mid(widths[-1])
        self.norm_out = _norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.z_channels, 3, padding=1)

    def features(self, x: Tensor, tile: int | None = None) -> Tensor:  # (B, 3, H, W) -> (B, C_last, H/f, W/f)
        """The full-resolution part; `tile`: each layer on tiles of tile x tile samples (tiling.map_tiles)."""
        if tile is None:
            x = self.conv_in(x)
            for level in self.down:
                for b in level.block:
                    x = b(x)
                if hasattr(level, "downsample"):
                    x = level.downsample(x)
            return x
        x = map_tiles(self.conv_in, x, tile, 1)
        for level in self.down:
            for b in level.block:
                x = tiled_resnet(b, x, tile)
            if hasattr(level, "downsample"):  # stride 2: tile and halo are even, so crops start on even samples
                x = map_tiles(level.downsample, x, tile, 2, scale=0.5)
        return x

    def head(self, h: Tensor) -> Tensor:  # (B, C_last, h, w) -> (B, 2*z, h, w): global (attention) part
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class Decoder(nn.Module):
    def __init__(self, cfg: AutoEncoderConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = Mid(widths[-1])
        # level i takes the width of level i+1 (the previous one run) to widths[i]; up[0] is run last
        self.up = nn.ModuleList(
            Level(widths[min(i + 1, len(widths) - 1)], widths[i], cfg.num_res_blocks + 1, upsample=i != 0)
            for i in range(len(widths)))
        self.norm_out = _norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], cfg.out_ch, 3, padding=1)

    def body(self, z: Tensor) -> Tensor:  # (B, z, h, w) -> (B, C_last, h, w): global (attention) part
        return self.mid(self.conv_in(z))

    def tail(self, h: Tensor, tile: int | None = None) -> Tensor:  # (B, C_last, h, w) -> (B, 3, h*f, w*f)
        """The full-resolution part; `tile`: each layer on tiles of tile x tile samples (tiling.map_tiles)."""
        if tile is None:
            for i in reversed(range(len(self.up))):
                if i < len(self.up) - 1:
                    h = self.up[i + 1].upsample(h)
                for b in self.up[i].block:
                    h = b(h)
            return self.conv_out(F.silu(self.norm_out(h)))
        for i in reversed(range(len(self.up))):
            if i < len(self.up) - 1:  # nearest 2x + 3x3 conv: a halo of 1 input sample; tile x tile outputs
                h = map_tiles(self.up[i + 1].upsample, h, tile // 2, 1, scale=2.0)
            for b in self.up[i].block:
                h = tiled_resnet(b, h, tile)
        if max(h.shape[-2:]) <= tile:
            return self.conv_out(F.silu(self.norm_out(h)))
        m = map_tiles(identity, h, tile, 0, moments=self.norm_out.num_groups)
        return map_tiles(lambda t: self.conv_out(F.silu(group_norm(self.norm_out, m, t), inplace=True)), h, tile, 1)

    def forward(self, z: Tensor) -> Tensor:
        return self.tail(self.body(z))


# ---------------------------------------------------------------------------------------------- autoencoder
class AutoEncoder(nn.Module):
    def __init__(self, cfg: AutoEncoderConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or AutoEncoderConfig.flux()
        for c in {cfg.ch * m for m in cfg.ch_mult}:
            if c % 32:
                raise ValueError(f"autoencoder widths must be multiples of 32 (GroupNorm(32)); got {c}")
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    @property
    def factor(self) -> int:
        """Downsampling factor image -> latent (8 for FLUX)."""
        return 2 ** (len(self.cfg.ch_mult) - 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    def encode(self, image: Tensor, sample: bool = False, generator: torch.Generator | None = None,
               tile: int | None = None) -> Tensor:
        """image (B, 3, H, W) in [-1, 1], H and W multiples of `factor` -> normalised latents (B, z, H/f, W/f).

        Returns scale_factor * (mean - shift_factor): the posterior mean (deterministic) unless `sample=True`,
        which draws mean + std * noise with the noise from `generator` (a CPU generator is reproducible across
        devices). `tile` (pixels, a multiple of `factor`) runs the full-resolution part on tiles (see module doc)."""
        f = self.factor
        if image.ndim != 4 or image.shape[1] != self.cfg.in_channels or image.shape[2] % f or image.shape[3] % f:
            raise ValueError(f"encode expects images (B, {self.cfg.in_channels}, H, W) with H and W multiples of "
                             f"{f}; got shape {tuple(image.shape)}")
        h = image.to(self.dtype)
        if tile is None:
            h = self.encoder.features(h)
        else:
            self._check_tile(tile, image)
            with torch.no_grad():
                h = self.encoder.features(h, tile)
        mean, logvar = self.encoder.head(h).chunk(2, dim=1)
        if sample:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # the clamp of ldm / diffusers' posterior
            dev = generator.device if generator is not None else mean.device
            noise = torch.randn(mean.shape, generator=generator, device=dev, dtype=mean.dtype).to(mean.device)
            mean = mean + std * noise
        return self.cfg.scale_factor * (mean - self.cfg.shift_factor)

    def decode(self, z: Tensor, tile: int | None = None) -> Tensor:
        """Normalised latents (B, z, h, w) -> images (B, 3, h*f, w*f), nominally in [-1, 1] but NOT clamped
        (as the official code and diffusers' `vae.decode`; `minidit.image.tensor_to_pil` clamps).
        `tile` (output pixels, a multiple of `factor`) runs the full-resolution part on tiles (see module doc)."""
        if z.ndim != 4 or z.shape[1] != self.cfg.z_channels:
            raise ValueError(f"decode expects latents (B, {self.cfg.z_channels}, h, w); got shape {tuple(z.shape)}")
        z = z.to(self.dtype) / self.cfg.scale_factor + self.cfg.shift_factor
        h = self.decoder.body(z)
        if tile is None:
            return self.decoder.tail(h)
        self._check_tile(tile, z)
        with torch.no_grad():
            return self.decoder.tail(h, tile)

    def _check_tile(self, tile: int, x: Tensor) -> None:
        if not isinstance(tile, int) or tile <= 0 or tile % self.factor:
            raise ValueError(f"tile must be a positive multiple of {self.factor} pixels, got {tile!r}")
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("tiled encode/decode is inference-only (GroupNorm statistics come from separate "
                               "passes, so no autograd): run it under torch.no_grad() or without tile=")

    def forward(self, image: Tensor) -> Tensor:
        return self.decode(self.encode(image))


# ------------------------------------------------------------------------------------------------ loading
def _from_diffusers_name(key: str, levels: int) -> str:
    """A diffusers AutoencoderKL key -> its ae.safetensors name (keys it does not know pass through)."""
    k = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", key)
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
    # diffusers numbers the decoder's up blocks in execution order; BFL by resolution (up.0 = run last)
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", k)
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
               lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", k)
    k = re.sub(r"\.mid_block\.resnets\.(\d)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", k)
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    k = re.sub(r"\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.",
               lambda m: f".mid.attn_1.{attn[m[1]]}.", k)
    return k.replace(".conv_shortcut.", ".nin_shortcut.")


def _diffusers_view(sd: LazyStateDict) -> Converted:
    """ae.safetensors-named view of a diffusers AutoencoderKL state dict (attention Linear -> 1x1 conv)."""
    levels = 1 + max((int(m[1]) for k in sd if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))), default=-1)
    if levels == 0:
        raise CheckpointError("no encoder.down_blocks.* tensors: not a diffusers AutoencoderKL checkpoint")
    plan = {}
    for k in sd:
        new = _from_diffusers_name(k, levels)
        linear = re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", new) and len(sd.shape(k)) == 2
        plan[new] = ("conv1x1" if linear else "copy", (k,))
    return Converted(sd, plan)


def _read_weights(path: Path) -> tuple:
    """-> (BFL-named state dict, scale_factor, shift_factor, description)."""
    flux = AutoEncoderConfig.flux()
    if path.is_dir():
        if (path / "ae.safetensors").exists():
            path = path / "ae.safetensors"
        elif (path / "vae").is_dir():
            path = path / "vae"
        elif not (path / "config.json").exists():
            raise CheckpointError(f"{path}: no ae.safetensors, vae/ folder or diffusers config.json in it")
    if not path.exists():
        raise CheckpointError(f"autoencoder checkpoint not found: {path}")
    if not path.is_dir():  # BFL file: FLUX's factors, unless the file's metadata states its own (minidit's tiny)
        sd = open_checkpoint(path)
        meta = sd.metadata() if hasattr(sd, "metadata") else {}
        try:
            scale = float(meta.get("scale_factor", flux.scale_factor))
            shift = float(meta.get("shift_factor", flux.shift_factor))
        except ValueError:
            raise CheckpointError(f"{path}: scale_factor/shift_factor metadata is not a number") from None
        return sd, scale, shift, f"autoencoder checkpoint {path}"
    config = path / "config.json"
    if not config.exists():
        raise CheckpointError(f"{path}: diffusers vae folder without config.json")
    cfg = read_json(config, "autoencoder config")
    if cfg.get("use_quant_conv", True) or cfg.get("use_post_quant_conv", True):
        raise CheckpointError(f"{config}: use_quant_conv/use_post_quant_conv are not false; FLUX's autoencoder has "
                              "no quant convs (is this a Stable Diffusion VAE?)")
    single = path / "diffusion_pytorch_model.safetensors"
    sd = LazyStateDict([single]) if single.exists() else open_checkpoint(path)
    scale = cfg.get("scaling_factor") or flux.scale_factor
    shift = cfg["shift_factor"] if cfg.get("shift_factor") is not None else flux.shift_factor
    return _diffusers_view(sd), scale, shift, f"diffusers autoencoder {path}"


def load_autoencoder(path: str | Path, device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None) -> AutoEncoder:
    """Load `ae.safetensors`, a diffusers `vae/` folder (keys converted on the fly), or a FLUX repository root
    holding either. The architecture is read from the tensor shapes, so tiny test files load the same way.
    Defaults: CUDA if available, bf16 there, fp32 on the CPU (minidit.loading.default_device_dtype)."""
    device, dtype = default_device_dtype(device, dtype)
    sd, scale, shift, what = _read_weights(Path(path))
    cfg = AutoEncoderConfig.from_checkpoint(sd, scale_factor=scale, shift_factor=shift)
    check_config(cfg, what)  # a NaN scaling_factor/shift_factor is an error here, not a black image later
    with torch.device("meta"):
        ae = AutoEncoder(cfg)
    load_streaming(ae, sd, device, dtype, what=what)
    return ae.eval().requires_grad_(False)


__all__ = ["AutoEncoder", "AutoEncoderConfig", "load_autoencoder"]
