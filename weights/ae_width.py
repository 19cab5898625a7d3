"""The width experiment behind train_ae.AE (weights/README.md, "How wide the autoencoder must be"), the procedure as
it ran: phase 0's loss and lr, batch 16 crops of whole 256-pixel renders, from scratch at width CH and ch_mult MULT
(default 1122); then weights/quality.autoencoder (8 scenes) on 256-pixel held-out renders and flat colours, and
the EMA weights written to OUT.

    OMP_NUM_THREADS=1 python -m minidit.weights.ae_width CH STEPS CROP OUT.safetensors [MULT]   (e.g. 96 400 32 x 1111)
"""
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from minidit.autoencoder import AutoEncoder, AutoEncoderConfig

from . import quality as Q
from . import train_ae as A
from .train_common import lr_factor, optimize


def main() -> None:
    torch.set_num_threads(1)
    ch, steps, crop, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    mult = tuple(int(c) for c in (sys.argv[5] if len(sys.argv) > 5 else "1122"))
    torch.manual_seed(0)
    ae = AutoEncoder(AutoEncoderConfig(ch=ch, ch_mult=mult, num_res_blocks=1))
    with torch.no_grad():
        ae.encoder.conv_out.bias[ae.cfg.z_channels:] = -8.0
    opt = torch.optim.AdamW(ae.parameters(), lr=5e-4, weight_decay=0.0)
    ema = {k: v.detach().clone() for k, v in ae.state_dict().items()}
    rng, g, t0, avg = random.Random(1), torch.Generator().manual_seed(0), time.time(), None
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 5e-4 * lr_factor(step, steps, warmup=50)
        x = A.crop_batch(A.world_images(rng, 16, 256)[1], crop, rng)
        mean, logvar = ae.encoder(x).chunk(2, dim=1)
        y = ae.decoder(mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn(mean.shape, generator=g))
        rec = (y - x).abs().mean() + F.mse_loss(y, x)
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
        optimize(ae, opt, ema, rec + 1e-4 * kl, step)
        avg = rec.item() if avg is None else 0.98 * avg + 0.02 * rec.item()
        if step % 25 == 0 or step == steps - 1:
            print(f"ch{ch} step {step} rec {avg:.4f} {time.time() - t0:.0f}s", flush=True)
    ae.load_state_dict(ema)
    ae.eval()
    res = Q.autoencoder(trip=Q.ae_trip(ae), n=8)
    print("RESULT", json.dumps({"ch": ch, "mult": mult, "steps": steps, "crop": crop, "s": round(time.time() - t0),
                                **res}), flush=True)
    save_file({k: v.contiguous() for k, v in ema.items()}, str(out))


if __name__ == "__main__":
    main()
