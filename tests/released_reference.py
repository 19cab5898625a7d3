"""Independent re-implementations of the authors' released algorithms on minidit's FLUX weights, for the tests
of `preset="official"` (tests/test_presets.py). Written from the released code, not from minidit's:

- Personalize Anything (github.com/fenghora/personalize-anything): src/attn_processor.py
  `PersonalizeAnythingAttnProcessor` / `MultiPersonalizeAnythingAttnProcessor` (the *hidden states* entering
  each attention are overwritten before to_q/to_k/to_v; concept features are projected separately and appended
  to q/k/v of every batch item, rotated at the shift-mask positions; the extra rows are cut off after SDPA),
  src/pipeline.py `RFInversionParallelFluxPipeline.invert` / `__call__` (inversion grid i/len(sigmas), the
  reference update v̂ = v + η(v_cond - v) on latents[:-1], the target through the scheduler's `step`),
  src/utils.py `create_mask`, gradio_demo.py `predict_outpainting_mask`.
- FreeCus (github.com/Monalissaa/FreeCus): infer.py (two pipeline calls, the first swapping in the noised
  reference latents through callback_on_step_end), flux_utils.py `pil_to_latents_flux` (scale_noise over the
  -μ schedule, μ from the *latent* size), sa_handler_for_flux_clean.py (save: 1.1·K[:, :, 512:][indices] and
  V[...] after RoPE on every layer; use: text keys ×scale and [K_saved; K] on vital layers).

Only the FLUX building blocks (modulation, projections, QK-norm, RoPE tables, MLPs) are taken from
minidit's model object: the method logic is all here, and attention is torch's SDPA. The diffusers scheduler
(test dependency) supplies the sigmas/timesteps and the Euler `step`, as in the released pipelines.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

from minidit.rope import apply_rope, embed_nd
from minidit.transformer import timestep_embedding


def calculate_shift(seq, base_seq=256, max_seq=4096, base_shift=0.5, max_shift=1.15):
    m = (max_shift - base_shift) / (max_seq - base_seq)
    return seq * m + (base_shift - m * base_seq)


def flux_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler
    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096,
                                           base_shift=0.5, max_shift=1.15, shift=3.0)


def set_schedule(sched, n: int, image_seq_len: int):
    """RFInversionParallelFluxPipeline / FluxPipeline: sigmas = linspace(1, 1/n, n), mu = calculate_shift."""
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=calculate_shift(image_seq_len))
    sched.set_begin_index(0)
    return sched.timesteps, sched.sigmas


# ------------------------------------------------------------------------------------------- masks (src/utils.py)

def create_mask(mask_u8: np.ndarray, w: int, h: int) -> torch.Tensor:
    """src/utils.py create_mask: NEAREST resize to (w, h) tokens, 1 where == 255."""
    img = Image.fromarray(mask_u8).resize((w, h), Image.Resampling.NEAREST).convert("L")
    return torch.tensor(np.where(np.array(img) == 255, 1, 0)).int()


def shift_tensor(tensor: torch.Tensor, x: int) -> torch.Tensor:
    """src/utils.py shift_tensor: move a (h, w) token mask by x columns."""
    shifted = torch.zeros_like(tensor)
    if x > 0:
        shifted[:, x:] = tensor[:, :-x]
    elif x < 0:
        shifted[:, :x] = tensor[:, -x:]
    else:
        shifted = tensor
    return shifted


def outpainting_canvas(pil_image: Image.Image, r_x: int, r_y: int, full_w: int, full_h: int):
    """gradio_demo.py predict_outpainting_mask (the resize to the image's own size is a no-op)."""
    rw, rh = pil_image.size
    background = Image.new("RGB", (full_w, full_h), (0, 0, 0))
    mask = Image.new("L", (full_w, full_h), 0)
    paste_x, paste_y = max(r_x, 0), max(r_y, 0)
    paste_max_x, paste_max_y = min(r_x + rw, full_w), min(r_y + rh, full_h)
    src_left, src_top = max(-r_x, 0), max(-r_y, 0)
    src_right, src_bottom = min(rw, full_w - r_x), min(rh, full_h - r_y)
    if src_right > src_left and src_bottom > src_top:
        background.paste(pil_image.crop((src_left, src_top, src_right, src_bottom)), (paste_x, paste_y))
        mask.paste(255, (paste_x, paste_y, paste_max_x, paste_max_y))
    return background, np.array(mask)


# ------------------------------------------------------------------------------------------- the forward

def _sdpa(q, k, v):
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    return rearrange(out, "B H L D -> B L (H D)")


def flux_forward(model, img, img_ids, txt, txt_ids, timestep, y, guidance, proc) -> torch.Tensor:
    """FLUX.1 with a replaceable attention processor `proc`:
    proc.hidden(layer, h_img) -> (h_img for q/k/v, concept hidden states (K, C) or None);
    proc.attend(layer, q, k, v, pe, n_txt, n_img) -> attention output rows (B, n_txt + n_img, H·D)."""
    cfg = model.cfg
    vec = model.time_in(timestep_embedding(timestep, 256))
    if cfg.guidance_embed:
        vec = vec + model.guidance_in(timestep_embedding(guidance, 256))
    vec = vec + model.vector_in(y)
    img, txt = model.img_in(img), model.txt_in(txt)
    pe = embed_nd(torch.cat((txt_ids, img_ids), dim=1), cfg.axes_dim, cfg.theta)
    T, N, B = txt.shape[1], img.shape[1], img.shape[0]
    layer = 0
    for blk in model.double_blocks:
        im1, im2 = blk.img_mod(vec)
        tm1, tm2 = blk.txt_mod(vec)
        h_img = im1.apply(blk.img_norm1(img))
        h_txt = tm1.apply(blk.txt_norm1(txt))
        h_qkv, concept = proc.hidden(layer, h_img)
        qi, ki, vi = blk.img_attn.qkv_heads(h_qkv)
        qt, kt, vt = blk.txt_attn.qkv_heads(h_txt)
        q, k, v = torch.cat([qt, qi], 2), torch.cat([kt, ki], 2), torch.cat([vt, vi], 2)
        if concept is not None:  # to_q/to_k/to_v + norm_q/norm_k of the concept features, repeated per item
            cq, ck, cv = (x.expand(B, -1, -1, -1) for x in blk.img_attn.qkv_heads(concept[None]))
            q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        out = proc.attend(layer, q, k, v, pe, T, N)
        img = img + im1.gate * blk.img_attn.proj(out[:, T:T + N])
        img = img + im2.gate * blk.img_mlp(im2.apply(blk.img_norm2(img)))
        txt = txt + tm1.gate * blk.txt_attn.proj(out[:, :T])
        txt = txt + tm2.gate * blk.txt_mlp(tm2.apply(blk.txt_norm2(txt)))
        layer += 1
    x = torch.cat((txt, img), 1)
    for blk in model.single_blocks:
        mod, _ = blk.modulation(vec)
        h = mod.apply(blk.pre_norm(x))
        w, b, nq = blk.linear1.weight, blk.linear1.bias, 3 * blk.hidden_size
        mlp = blk.mlp_act(F.linear(h, w[nq:], b[nq:]))          # proj_mlp on the unmodified hidden states
        h_img, concept = proc.hidden(layer, h[:, T:])
        qkv = F.linear(torch.cat([h[:, :T], h_img], 1), w[:nq], b[:nq])
        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=blk.num_heads)
        if concept is not None:
            cq, ck, cv = rearrange(F.linear(concept[None], w[:nq], b[:nq]), "B L (K H D) -> K B H L D", K=3,
                                   H=blk.num_heads)
            q, k, v = torch.cat([q, cq.expand(B, -1, -1, -1)], 2), torch.cat([k, ck.expand(B, -1, -1, -1)], 2), \
                torch.cat([v, cv.expand(B, -1, -1, -1)], 2)
        q, k = blk.norm(q, k, v)
        out = proc.attend(layer, q, k, v, pe, T, N)
        x = x + mod.gate * blk.linear2(torch.cat((out[:, :T + N], mlp), 2))
        layer += 1
    return model.final_layer(x[:, T:], vec)


class PlainProcessor:
    def hidden(self, layer, h):
        return h, None

    def attend(self, layer, q, k, v, pe, n_txt, n_img):
        return _sdpa(apply_rope(q, pe), apply_rope(k, pe), v)


class PersonalizeAnythingProcessor:
    """src/attn_processor.py MultiPersonalizeAnythingAttnProcessor (= PersonalizeAnythingAttnProcessor for one
    reference): references are batch items 0..n-1, the target the last item."""

    def __init__(self, masks, shift_masks, tau: float, concept_process: bool = False):
        self.masks = [m.flatten().bool() for m in masks]
        self.shift_masks = [m.flatten().bool() for m in shift_masks]
        self.tau, self.concept_process, self.timestep = tau, concept_process, None

    def hidden(self, layer, h):
        t_flag = self.timestep > self.tau
        concept = [h[r, m] for r, m in enumerate(self.masks)]   # taken before the replacement (a copy)
        if t_flag:
            h = h.clone()
            for feat, sm in zip(concept, self.shift_masks):
                h[-1, sm] = feat
        return h, (torch.cat(concept) if self.concept_process else None)

    def attend(self, layer, q, k, v, pe, n_txt, n_img):
        if self.concept_process:  # get_concept_rotary_emb: [text, image, image[shift_masks]]
            img_pe = pe[:, :, n_txt:]
            pe = torch.cat([pe] + [img_pe[:, :, sm] for sm in self.shift_masks], 2)
        return _sdpa(apply_rope(q, pe), apply_rope(k, pe), v)[:, :n_txt + n_img]


@torch.no_grad()
def released_invert(model, y0, y1, timesteps_sigmas, txt, txt_ids, vec, img_ids, gamma=1.0,
                    source_guidance=0.0):
    """src/pipeline.py invert: t_i = i / N (N = len(sigmas)), Y += (u + γ(u_cond - u))·(σ_i - σ_{i+1}); the model
    is called even for γ = 1, as there."""
    _, sigmas = timesteps_sigmas
    N = len(sigmas)
    Y = y0.clone()
    g = torch.full([1], source_guidance)
    for i in range(N - 1):
        t_i = torch.tensor(i / N, dtype=Y.dtype)
        u = flux_forward(model, Y, img_ids, txt, txt_ids, t_i.repeat(1), vec, g, PlainProcessor())
        u_cond = (y1 - Y) / (1 - t_i)
        u_hat = u + gamma * (u_cond - u)
        Y = Y + u_hat * (sigmas[i] - sigmas[i + 1])
    return Y


@torch.no_grad()
def released_generate(model, sched, n_steps, image_seq_len, inverted, y_0, new_latents, txt, txt_ids, vec,
                      img_ids, proc, guidance=3.5, eta=1.0, start_timestep=0.0, stop_timestep=0.99,
                      decay_eta=False, eta_decay_power=1.0):
    """src/pipeline.py __call__ with inverted latents: batch [references; target]."""
    timesteps, sigmas = set_schedule(sched, n_steps, image_seq_len)
    start = int(start_timestep * n_steps)
    stop = min(int(stop_timestep * n_steps), n_steps)
    latents = torch.cat((inverted, new_latents), dim=0)
    B = latents.shape[0]
    g = torch.full([1], guidance).expand(B)
    for i, t in enumerate(timesteps):
        t_i = 1 - t / 1000
        timestep = t.expand(B).to(latents.dtype)
        proc.timestep = timestep[0].item() / 1000
        noise_pred = flux_forward(model, latents, img_ids, txt, txt_ids, timestep / 1000, vec, g, proc)
        v_t = -noise_pred[:-1]
        v_t_cond = (y_0 - latents[:-1]) / (1 - t_i)
        eta_t = eta if start <= i < stop else 0.0
        if decay_eta:
            eta_t = eta_t * (1 - i / n_steps) ** eta_decay_power
        v_hat_t = v_t + eta_t * (v_t_cond - v_t)
        latents = latents.clone()
        latents[:-1] = latents[:-1] + v_hat_t * (sigmas[i] - sigmas[i + 1])
        latents[-1] = sched.step(noise_pred[-1], t, latents[-1], return_dict=False)[0]
    return latents[-1:]


# ------------------------------------------------------------------------------------------- FreeCus

def released_seq_len(height, width, vae_scale_factor=8):
    """flux_utils.pil_to_latents_flux: height/width overwritten by the latent size before image_seq_len."""
    height = 2 * (int(height) // (vae_scale_factor * 2))
    width = 2 * (int(width) // (vae_scale_factor * 2))
    return (int(height) // vae_scale_factor // 2) * (int(width) // vae_scale_factor // 2)


def freecus_indices(mask01: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """infer.py: the mask (0..255) bilinearly resized to (H/16, W/16), flattened, indices where > 0."""
    m = (mask01 * 255).view(1, 1, *mask01.shape)
    m = F.interpolate(m, (height // 16, width // 16), mode="bilinear")
    m = m.view(1, 1, (height // 16) * (width // 16), 1)
    return (m > 0).nonzero(as_tuple=True)[-2]


def noised_references(x_ref, noise, n, height, width, shift_type="negative"):
    """flux_utils.pil_to_latents_flux: scale_noise(x_ref, t, noise) over the shifted schedule (packed)."""
    sched = flux_scheduler()
    sigmas = np.linspace(1.0, 1 / n, n)
    mu = calculate_shift(released_seq_len(height, width))
    factor = {"negative": -1.0, "half_negative": -0.5, "twice_negative": -2.0, "normal": 1.0}[shift_type]
    sched.set_timesteps(sigmas=sigmas, mu=factor * mu)
    return [sched.scale_noise(x_ref, torch.tensor([t], dtype=torch.float32), noise) for t in sched.timesteps]


class FreeCusProcessor:
    """sa_handler_for_flux_clean.py FluxShareAttnProcessor2_0 + Handler."""

    def __init__(self, mode, indices, vital_layers, scale=1.1, store=None):
        self.mode, self.indices, self.vital, self.scale = mode, indices, set(vital_layers), scale
        self.store = store if store is not None else {"key": [], "value": []}

    def hidden(self, layer, h):
        return h, None

    def attend(self, layer, q, k, v, pe, n_txt, n_img):
        q, k = apply_rope(q, pe), apply_rope(k, pe)
        if self.mode == "save":
            self.store["key"].append(self.scale * k[:, :, n_txt:][:, :, self.indices])
            self.store["value"].append(v[:, :, n_txt:][:, :, self.indices])
        elif self.mode == "use" and layer in self.vital:
            k = k.clone()
            k[:, :, :n_txt] = self.scale * k[:, :, :n_txt]
            index = self.step * self.n_layers + layer
            k = torch.cat((self.store["key"][index].expand(k.shape[0], -1, -1, -1), k), dim=-2)
            v = torch.cat((self.store["value"][index].expand(v.shape[0], -1, -1, -1), v), dim=-2)
        return _sdpa(q, k, v)


@torch.no_grad()
def released_freecus(model, x_ref, noise, indices, txt, txt_ids, vec, img_ids, n_steps, height, width,
                     vital_layers, extend_scale=1.1, guidance=3.5, shift_type="negative"):
    """infer.py: the "save" pipeline call over the noised reference latents (callback swap), then the "use"
    call from the same seed's noise (`noise`, = the reference's ε). Returns the target's latents."""
    n_layers = model.cfg.n_layers
    seq = (height // 16) * (width // 16)
    zts = noised_references(x_ref, noise, n_steps, height, width, shift_type)
    g = torch.full([1], guidance).expand(1)
    # save pass (Handler.register(mode="save") without scale: 1.1), FluxPipeline with latents=zT
    save = FreeCusProcessor("save", indices, vital_layers, scale=1.1)
    sched = flux_scheduler()
    timesteps, _ = set_schedule(sched, n_steps, seq)
    latents = zts[0]
    for i, t in enumerate(timesteps):
        pred = flux_forward(model, latents, img_ids, txt, txt_ids, t.expand(1) / 1000, vec, g, save)
        latents = sched.step(pred, t, latents, return_dict=False)[0]
        latents = zts[min(i + 1, n_steps - 1)]                  # callback_on_step_end
    # use pass (scale = --extend_scale)
    use = FreeCusProcessor("use", indices, vital_layers, scale=extend_scale, store=save.store)
    use.n_layers = n_layers
    sched = flux_scheduler()
    timesteps, _ = set_schedule(sched, n_steps, seq)
    latents = noise
    for i, t in enumerate(timesteps):
        use.step = i
        pred = flux_forward(model, latents, img_ids, txt, txt_ids, t.expand(1) / 1000, vec, g, use)
        latents = sched.step(pred, t, latents, return_dict=False)[0]
    return latents
