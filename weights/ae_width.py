"""The width experiment behind train_ae.AE (weights/README.md, "How wide the autoencoder must be"): the ae stage
(`train_ae.stage_ae`: phase 0's loss and lr, batch 16 crops of whole 256-pixel renders, seed 0) from scratch at
width CH and ch_mult MULT (default 1122); then weights/quality.autoencoder (8 scenes) on 256-pixel held-out renders
and flat colours, and the EMA weights written to OUT. (The runs recorded there used this loop written out in this
file; the stage is step for step the same: the same EMA weights after 3 steps, checked when it was folded in.)

    OMP_NUM_THREADS=1 python -m minidit.weights.ae_width CH STEPS CROP OUT.safetensors [MULT]   (e.g. 96 400 32 x 1111)
"""
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from minidit.autoencoder import AutoEncoderConfig

from . import quality as Q
from . import train_ae as A


def main() -> None:
    torch.set_num_threads(1)
    ch, steps, crop, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    mult = tuple(int(c) for c in (sys.argv[5] if len(sys.argv) > 5 else "1122"))
    t0 = time.time()
    with tempfile.TemporaryDirectory() as work:
        A.stage_ae(Path(work), steps, 0, batch=16, size=crop, lr=5e-4, crop_from=256, out="ae.safetensors",
                   ckpt_every_s=float("inf"), cfg=AutoEncoderConfig(ch=ch, ch_mult=mult, num_res_blocks=1))
        shutil.copyfile(Path(work) / "ae.safetensors", out)
    res = Q.autoencoder(trip=Q.ae_trip(A.load_ae(out).eval()), n=8)
    print("RESULT", json.dumps({"ch": ch, "mult": mult, "steps": steps, "crop": crop, "s": round(time.time() - t0),
                                **res}), flush=True)


if __name__ == "__main__":
    main()
