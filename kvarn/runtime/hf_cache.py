"""``KVarNCache``: a transformers ``Cache`` that stores K/V the way a recipe says.

Per layer: the first tile (if the recipe keeps it) and the open tail in fp16, every completed tile
encoded (Hadamard, normalization, RTN, packed codes + fp16 scales) by ``kvarn.quant.codec``.
A tile is encoded when the first token *after* it arrives, so a prefill chunk that ends exactly on
a tile boundary still reads its own tile in fp16, as the runtime rule says.

Passing ``model`` also routes the model's attention through kvarn (``kvarn.model_hook``), so that
a multi-token chunk spanning several tiles reads, for every query, completed tiles quantized and
its own tile in fp16 — exactly what token-by-token decoding would see and what ``kvarn eval``
measures. Without it, single-token decoding is still exact; multi-token prefill reads its own new
tokens in fp16. This is the reference runtime the vLLM backend and GPU kernels are checked against.

Departures: batch rows must share one length (no padding), and cropping/beam reordering are not
supported (a ``NotImplementedError`` says so).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..errors import KvarnError
from ..quant.attention import mixed_attention, quantized_read_mask
from ..ops.layout import PageLayout
from ..ops.store import store_tiles
from ..quant.codec import fake_quantize_sequence
from ..quant.formats import LayerFormat, bytes_per_token
from ..recipe import Recipe


class KVarNLayer(DynamicLayer):
    """One layer's cache. ``self.keys``/``self.values`` hold the *read view* ``[B, H, T, D]``
    (decoded tiles + fp16 first tile and tail): a decode memo so tiles are decoded once, not per
    step. The stored form: ``tiles``, one page record per completed tile and batch row, laid out
    by ``kvarn.ops.layout.PageLayout`` and written by the store op (as the vLLM backend does)."""

    is_croppable = False

    def __init__(self, fmt: LayerFormat, keep_first_tile: bool, k_log_std: torch.Tensor, v_log_std: torch.Tensor):
        super().__init__()
        self.fmt = fmt
        self.keep_first_tile = keep_first_tile
        self.k_log_std, self.v_log_std = k_log_std, v_log_std
        self.layout = PageLayout(fmt, k_log_std, v_log_std)
        self.tiles: list[torch.Tensor] = []  # per completed tile: records [B, layout.nbytes] uint8
        self.length = 0

    # -- storage ----------------------------------------------------------------------------------
    @property
    def stored_end(self) -> int:
        """Token position where the encoded tiles end (tile-aligned)."""
        start = self.fmt.tile if self.keep_first_tile else 0
        return start + len(self.tiles) * self.fmt.tile

    def _flush(self) -> None:
        """Encode every completed tile still in the fp16 tail (the store op: one record per row)."""
        g = self.fmt.tile
        while self.length - self.stored_end >= g:
            s = self.stored_end
            k = self.keys[:, :, s : s + g]  # [B, H, G, D], fp16-exact float32
            v = self.values[:, :, s : s + g]
            rec = torch.empty(k.shape[0], self.layout.nbytes, dtype=torch.uint8, device=k.device)
            store_tiles(self.layout, rec, k, v, torch.arange(k.shape[0], device=k.device))
            self.tiles.append(rec)
            k_hat, v_hat = self.layout.decode(rec)  # [H, B, G, D]
            self.keys[:, :, s : s + g] = k_hat.transpose(0, 1).to(self.keys.dtype)
            self.values[:, :, s : s + g] = v_hat.transpose(0, 1).to(self.values.dtype)

    def lazy_initialization(self, key_states, value_states, *args, **kwargs) -> None:
        self.device = key_states.device
        b, h, _, d = key_states.shape
        if h != self.fmt.num_kv_heads or d != self.fmt.head_dim:
            raise KvarnError(f"KVarNCache: layer gets {h} KV heads of dim {d}, recipe says {self.fmt.num_kv_heads} of {self.fmt.head_dim}")
        self.keys = key_states.new_zeros(b, h, 0, d, dtype=torch.float32)
        self.values = value_states.new_zeros(b, h, 0, d, dtype=torch.float32)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        # Tiles completed by earlier calls are encoded now that a later token has arrived.
        self._flush()
        self.keys = torch.cat([self.keys, key_states.float().half().float()], dim=-2)
        self.values = torch.cat([self.values, value_states.float().half().float()], dim=-2)
        self.length = self.keys.shape[-2]
        return self.keys.to(key_states.dtype), self.values.to(value_states.dtype)

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.length if self.is_initialized else 0

    def nbytes(self) -> int:
        """Bytes actually stored: encoded tiles + fp16 first tile and tail."""
        if not self.is_initialized:
            return 0
        encoded = sum(rec.numel() for rec in self.tiles)
        b, h, _, d = self.keys.shape
        fp16_tokens = self.length - len(self.tiles) * self.fmt.tile
        return encoded + 2 * b * h * d * 2 * fp16_tokens

    def crop(self, *args, **kwargs):
        raise NotImplementedError("KVarNCache cannot crop: encoded tiles cannot be partially removed")

    def reorder_cache(self, *args, **kwargs):
        raise NotImplementedError("KVarNCache does not support beam search reordering")

    def batch_repeat_interleave(self, *args, **kwargs):
        raise NotImplementedError("KVarNCache does not support batch expansion; expand the inputs instead")

    def batch_select_indices(self, *args, **kwargs):
        raise NotImplementedError("KVarNCache does not support dropping batch rows")

    # -- reading (kvarn attention handler) -----------------------------------------------------
    def attend(self, q, k, v, bias, scaling):
        """Attention of new queries ``q [B, Hq, Tq, D]`` over this layer's read view ``k, v``.

        Keys in tiles that completed inside the current chunk are read quantized by the chunk's
        later queries: their quantized form is computed here exactly as ``_flush`` will store it.
        """
        t = k.shape[-2]
        g = self.fmt.tile
        s = self.stored_end
        k_hat, v_hat = k.float().clone(), v.float().clone()
        n = max(0, (t - s) // g)
        if n:
            e = s + n * g
            k_hat[:, :, s:e] = fake_quantize_sequence(k[:, :, s:e], self.fmt.k, g, False, self.k_log_std.to(k.device))
            v_hat[:, :, s:e] = fake_quantize_sequence(v[:, :, s:e], self.fmt.v, g, False, self.v_log_std.to(v.device))
        pos = torch.arange(t, device=k.device)
        mask = quantized_read_mask(pos[t - q.shape[-2]:], pos, g, self.keep_first_tile)
        return mixed_attention(q, k, v, k_hat, v_hat, mask, bias, scaling)


class KVarNCache(Cache):
    """A transformers ``Cache`` holding K/V as ``recipe`` (a ``Recipe`` or path) lays them out.

    ``model`` (optional but recommended): checked against the recipe's fingerprint and routed
    through kvarn's attention so prefill reads exactly like decoding. Use with
    ``model.generate(..., past_key_values=cache)``; one cache per generation.
    """

    def __init__(self, recipe, model=None):
        path = recipe if not isinstance(recipe, Recipe) else "recipe"
        r = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)
        if model is not None:
            r.check_model(model.config, path)
        self.recipe = r
        layers = [KVarNLayer(f, r.keep_first_tile, r.k_log_std[i], r.v_log_std[i]) for i, f in enumerate(r.layer_formats())]
        super().__init__(layers=layers)
        if model is not None:
            from ..model_hook import install

            install(model, self)

    def attend(self, layer_idx, q, k, v, bias, scaling):
        return self.layers[layer_idx].attend(q, k, v, bias, scaling)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def predicted_nbytes(self, batch: int, seq_len: int) -> int:
        """What ``nbytes`` should be after ``seq_len`` tokens, from ``bytes_per_token`` alone."""
        total = 0
        for layer in self.layers:
            f = layer.fmt
            start = f.tile if layer.keep_first_tile else 0
            n_tiles = max(0, (seq_len - start - 1) // f.tile)  # the last completed tile waits for a next token
            fp16 = seq_len - n_tiles * f.tile
            total += batch * (n_tiles * f.tile * bytes_per_token(f) + fp16 * 2 * f.num_kv_heads * f.head_dim * 2)
        return int(round(total))
