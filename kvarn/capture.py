"""Capture: run a causal LM over calibration windows and stream K/V statistics.

The capture is a ``model_hook`` handler, so it sees keys (post-RoPE) and values exactly as an
inference engine caches them, without editing model code. Nothing per-token is kept across
windows: per layer and KV head it accumulates

* per-channel sums and squares of K and V after the Hadamard rotation (→ log-std priors), and
* for every candidate code width of K (V kept exact) and of V (K kept exact), the error it causes
  in the attention output, read the way the runtime reads the cache (completed tiles quantized,
  first tile and open tail fp16): the plain squared error, and the squared first-order change of
  the calibration loss ``(g · δ)²`` per token, where ``g`` is the loss gradient at the attention
  output. The latter is the allocation objective: it weighs an error by how much the rest of the
  network amplifies it. The per-window ``δ`` tensors live only until the backward pass of their
  window has used them.

Models with attention-logit soft-capping (Gemma-2) are captured with their cap applied to every
score, exact and candidate alike (``softcap``, see ``kvarn.model_hook``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import KvarnError
from .model_hook import attached
from .quant.attention import mixed_attention, quantized_read_mask
from .quant.codec import NORMALIZE_ITERS, fake_quantize_sequence
from .quant.formats import LOG_STD_MAX, LOG_STD_MIN, TensorFormat
from .quant.hadamard import rotate

CANDIDATE_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class CaptureConfig:
    """What the candidate errors are measured for (bits are filled in per candidate)."""

    tile: int
    keep_first_tile: bool
    k: TensorFormat
    v: TensorFormat
    candidate_bits: tuple[int, ...] = CANDIDATE_BITS
    iters: int = NORMALIZE_ITERS
    # Candidate errors are measured on every ``query_stride``-th query that reads quantized
    # tiles: the candidate attention passes dominate capture time, and a strided subset of queries
    # gives the same per-head ranking at a quarter of the cost.
    query_stride: int = 4


class KVCapture:
    """Streaming accumulator; use as a ``model_hook`` handler (see ``capture_kv``)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, cfg: CaptureConfig):
        L, H, D, nb = num_layers, num_kv_heads, head_dim, len(cfg.candidate_bits)
        self.cfg = cfg
        self.shape = (L, H, D)
        f64 = dict(dtype=torch.float64)
        self.count = torch.zeros(L, **f64)
        self.sums = {kind: torch.zeros(L, H, D, **f64) for kind in "kv"}
        self.squares = {kind: torch.zeros(L, H, D, **f64) for kind in "kv"}
        self.mse = {kind: torch.zeros(L, H, nb, **f64) for kind in "kv"}
        self.fisher = {kind: torch.zeros(L, H, nb, **f64) for kind in "kv"}
        self.out_energy = torch.zeros(L, H, **f64)
        self.tokens = 0

    # -- statistics ---------------------------------------------------------------------------
    def log_std(self, kind: str, layer: int | None = None) -> torch.Tensor:
        """Per-channel log-std after rotation, ``[L, H, D]`` (or ``[H, D]`` for one layer)."""
        n = self.count.clamp_min(1)[:, None, None]
        mean = self.sums[kind] / n
        var = (self.squares[kind] / n - mean**2).clamp_min(1e-12)
        # within the range a recipe's priors must lie in (a dead channel gets fp16's smallest normal std)
        out = (0.5 * torch.log(var).float()).clamp(LOG_STD_MIN, LOG_STD_MAX)
        return out if layer is None else out[layer]

    def to(self, device) -> "KVCapture":
        """Move the accumulators (float64) to ``device``: the capture sums on the model's device,
        so a GPU window does not wait on ~20 device→host copies per layer, and hands them to the
        statistics on the host at the end."""
        self.count, self.out_energy = self.count.to(device), self.out_energy.to(device)
        for acc in (self.sums, self.squares, self.mse, self.fisher):
            for kind in acc:
                acc[kind] = acc[kind].to(device)
        return self

    def _acc(self, x: torch.Tensor) -> torch.Tensor:
        """An increment in float64 on the accumulators' device (a layer of a model split over
        devices sends its sums there without a host round trip)."""
        dev = self.count.device
        return x.double().to(dev, non_blocking=dev.type != "cpu")  # into host memory: a blocking copy

    def _check_finite(self, layer: int, name: str, x: torch.Tensor) -> None:
        if not torch.isfinite(x).all():
            raise KvarnError(
                f"layer {layer} {name}: captured activations contain NaN/inf; the model overflows on "
                f"this text in its current dtype — load it in float32 or check the calibration text"
            )

    def _group(self, x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
        """Sum ``[B, Hq, T]`` over the query heads of each KV head → ``[B, H, T]``."""
        b, hq, t = x.shape
        return x.reshape(b, num_kv_heads, hq // num_kv_heads, t).sum(2)

    # -- handler ------------------------------------------------------------------------------
    def attend(self, layer_idx, q, k, v, bias, scaling, softcap=None):
        cfg, li = self.cfg, layer_idx
        L, H, D = self.shape
        if self.tokens == 0 and self.count.device != q.device:  # the first layer's device holds the sums
            self.to(q.device)
        for name, x in (("queries", q), ("keys", k), ("values", v)):
            self._check_finite(li, name, x)
        k16, v16 = k.float().half().float(), v.float().half().float()
        out = mixed_attention(q, k16, v16, None, None, None, bias, scaling, softcap)
        with torch.no_grad():
            kd, vd, qd = k16.detach(), v16.detach(), q.detach().float()
            for kind, x, fmt in (("k", kd, cfg.k), ("v", vd, cfg.v)):
                xr = rotate(x) if fmt.hadamard else x
                self.sums[kind][li] += self._acc(xr.sum(dim=(0, 2)))
                self.squares[kind][li] += self._acc((xr * xr).sum(dim=(0, 2)))
            self.count[li] += kd.shape[0] * kd.shape[2]
            if li == 0:
                self.tokens += kd.shape[0] * kd.shape[2]
            t = kd.shape[-2]
            pos = torch.arange(t, device=kd.device)
            q_pos = pos[t - qd.shape[-2]:]
            first_read = 0 if cfg.tile == 1 else cfg.tile * (2 if cfg.keep_first_tile else 1)
            q_idx = torch.nonzero((q_pos >= first_read) & (q_pos % cfg.query_stride == 0)).flatten()
            mask = quantized_read_mask(q_pos[q_idx], pos, cfg.tile, cfg.keep_first_tile)
            qd = qd[:, :, q_idx]
            if bias is not None:
                bias = bias.expand(*bias.shape[:-2], len(q_pos), bias.shape[-1])[..., q_idx, :]
            base = out.detach()[:, :, q_idx]
            self.out_energy[li] += self._acc(self._group((base * base).sum(-1), H).sum(dim=(0, 2)))
            deltas = []
            for kind, x, fmt in (("k", kd, cfg.k), ("v", vd, cfg.v)):
                prior = self.log_std(kind, li)
                for j, bits in enumerate(cfg.candidate_bits):
                    x_hat = fake_quantize_sequence(x, fmt.with_bits((bits,) * H), cfg.tile, cfg.keep_first_tile, prior, cfg.iters)
                    k_hat, v_hat = (x_hat, None) if kind == "k" else (None, x_hat)
                    delta = mixed_attention(qd, k16.detach(), v16.detach(), k_hat, v_hat, mask, bias, scaling, softcap) - base
                    err = self._group((delta * delta).sum(-1), H).sum(dim=(0, 2))
                    self.mse[kind][li, :, j] += self._acc(err)
                    deltas.append((kind, j, delta.to(torch.bfloat16)))
        if out.requires_grad:
            out.register_hook(lambda g, li=li, deltas=deltas, q_idx=q_idx: self._on_grad(li, g[:, :, q_idx], deltas))
        return out

    def _on_grad(self, li, g, deltas):
        H = self.shape[1]
        g = g.detach().float()
        for kind, j, delta in deltas:
            first_order = self._group((g * delta.float()).sum(-1), H)  # [B, H, T]
            self.fisher[kind][li, :, j] += self._acc((first_order**2).sum(dim=(0, 2)))
        deltas.clear()


def capture_kv(model, windows: torch.Tensor, cfg: CaptureConfig, batch_size: int = 1, progress: bool = True) -> KVCapture:
    """Run ``windows [N, T]`` through ``model`` (forward + backward of the summed next-token loss)
    and return the filled ``KVCapture``. Model weights are not changed and get no gradients."""
    from tqdm.auto import tqdm

    mc = model.config
    cfg_text = mc.get_text_config() if hasattr(mc, "get_text_config") else mc
    num_layers = cfg_text.num_hidden_layers
    num_kv = getattr(cfg_text, "num_key_value_heads", None) or cfg_text.num_attention_heads
    head_dim = getattr(cfg_text, "head_dim", None) or cfg_text.hidden_size // cfg_text.num_attention_heads
    cap = KVCapture(num_layers, num_kv, head_dim, cfg)
    embed = model.get_input_embeddings()
    was_grad = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        with attached(model, cap):
            for i in tqdm(range(0, len(windows), batch_size), desc="calibrating", unit="batch", disable=not progress):
                ids = windows[i : i + batch_size].to(model.device)
                with torch.no_grad():
                    emb = embed(ids)
                emb = emb.detach().float().requires_grad_(True)
                logits = model(inputs_embeds=emb.to(model.dtype)).logits
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum"
                )
                if not torch.isfinite(loss):
                    raise KvarnError("calibration loss is NaN/inf: the model overflows on the calibration text; load it in float32")
                loss.backward()
    finally:
        for p, g in zip(model.parameters(), was_grad):
            p.requires_grad_(g)
    return cap.to("cpu")
