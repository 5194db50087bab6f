"""``KVarNCache``: a transformers ``Cache`` that stores K/V the way a recipe says.

Per layer: the first tile (if the recipe keeps it) and the open tail in fp16, every completed tile
as a page record (Hadamard, normalization, RTN, packed codes + fp16 scales; the layout the vLLM
backend uses, written by the same store op). Nothing else is kept between steps: attention reads a
read view dequantized for the call. A tile is encoded when the first token *after* it arrives, so a
prefill chunk that ends exactly on a tile boundary still reads its own tile in fp16, as the runtime
rule says.

Passing ``model`` also routes the model's attention through kvarn (``kvarn.model_hook``), so that
a multi-token chunk spanning several tiles reads, for every query, completed tiles quantized and
its own tile in fp16 — exactly what token-by-token decoding would see and what ``kvarn eval``
measures. Without it, single-token decoding is still exact; multi-token prefill reads its own new
tokens in fp16. This is the reference runtime the vLLM backend and GPU kernels are checked against.

Departures: batch rows must share one length (a padded batch is refused in one line when the
model is routed through kvarn), and cropping/beam reordering are not supported (a
``NotImplementedError`` says so). When the model later runs with another cache (a plain
``generate()``), the hook removes itself and the model attends as before.
"""

from __future__ import annotations

import weakref

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
    """One layer's cache. What it holds: ``tiles`` — completed tiles as page records (packed codes +
    fp16 scales, ``kvarn.ops.layout.PageLayout``, written by the store op as the vLLM backend writes
    them), ``first`` — the fp16 first tile (when the recipe keeps it) and ``tail`` — the fp16 tokens
    after the last encoded tile. ``update`` returns a *transient* read view ``[B, H, T, D]``
    (tiles dequantized for this call, not kept), so memory is what ``nbytes`` counts."""

    is_croppable = False

    def __init__(self, fmt: LayerFormat, keep_first_tile: bool, k_log_std: torch.Tensor, v_log_std: torch.Tensor):
        super().__init__()
        self.fmt = fmt
        self.keep_first_tile = keep_first_tile
        self.k_log_std, self.v_log_std = k_log_std, v_log_std
        self.layout = PageLayout(fmt, k_log_std, v_log_std)
        self.tiles: list[torch.Tensor] = []  # per completed tile: records [B, layout.nbytes] uint8
        self.first: tuple[torch.Tensor, torch.Tensor] | None = None  # fp16 [B, H, G, D] K and V
        self.tail: tuple[torch.Tensor, torch.Tensor] | None = None  # fp16 [B, H, n, D] K and V
        self.length = 0
        self._view = None  # the keys tensor last returned by update (see KVarNCache.attend)

    # -- storage ----------------------------------------------------------------------------------
    @property
    def stored_end(self) -> int:
        """Token position where the encoded tiles end (tile-aligned)."""
        start = self.fmt.tile if self.keep_first_tile else 0
        return start + len(self.tiles) * self.fmt.tile

    def _flush(self) -> None:
        """Move completed tiles out of the fp16 tail: the first into ``first`` (if kept), the others
        encoded into records (the store op, all of them in one call)."""
        g = self.fmt.tile
        tk, tv = self.tail
        if self.keep_first_tile and self.first is None and self.length >= g:
            self.first = (tk[:, :, :g].clone(), tv[:, :, :g].clone())
            tk, tv = tk[:, :, g:], tv[:, :, g:]
        n = tk.shape[2] // g
        if n:
            b, h, _, d = tk.shape
            k = tk[:, :, : n * g].reshape(b, h, n, g, d).permute(2, 0, 1, 3, 4).reshape(n * b, h, g, d)
            v = tv[:, :, : n * g].reshape(b, h, n, g, d).permute(2, 0, 1, 3, 4).reshape(n * b, h, g, d)
            rec = torch.empty(n * b, self.layout.nbytes, dtype=torch.uint8, device=tk.device)
            store_tiles(self.layout, rec, k, v, torch.arange(n * b, device=tk.device))
            self.tiles.extend(rec.reshape(n, b, -1).unbind(0))
            tk, tv = tk[:, :, n * g:], tv[:, :, n * g:]
        self.tail = (tk.clone(), tv.clone())  # a copy: the views would keep the whole old buffer alive

    def _read_view(self, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``[B, H, T, D]``: first tile, decoded tiles, tail (transient)."""
        ks, vs = [], []
        if self.first is not None:
            ks.append(self.first[0])
            vs.append(self.first[1])
        if self.tiles:
            n, (b, _) = len(self.tiles), self.tiles[0].shape
            k_hat, v_hat = self.layout.decode(torch.cat(self.tiles))  # [H, n*B, G, D]
            h, _, g, d = k_hat.shape
            ks.append(k_hat.reshape(h, n, b, g, d).permute(2, 0, 1, 3, 4).reshape(b, h, n * g, d))
            vs.append(v_hat.reshape(h, n, b, g, d).permute(2, 0, 1, 3, 4).reshape(b, h, n * g, d))
        ks.append(self.tail[0])
        vs.append(self.tail[1])
        return torch.cat([x.to(dtype) for x in ks], 2), torch.cat([x.to(dtype) for x in vs], 2)

    def lazy_initialization(self, key_states, value_states, *args, **kwargs) -> None:
        self.device = key_states.device
        b, h, _, d = key_states.shape
        if h != self.fmt.num_kv_heads or d != self.fmt.head_dim:
            raise KvarnError(f"KVarNCache: layer gets {h} KV heads of dim {d}, recipe says {self.fmt.num_kv_heads} of {self.fmt.head_dim}")
        empty = key_states.new_zeros(b, h, 0, d, dtype=torch.float16)
        self.tail = (empty, empty.clone())
        self.keys = self.values = empty  # transformers' DynamicLayer fields: the stored form is above
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != self.tail[0].shape[0]:
            raise KvarnError(f"KVarNCache: a step brought {key_states.shape[0]} rows, the cache holds "
                             f"{self.tail[0].shape[0]}; use one KVarNCache per generate() call")
        # Tiles completed by earlier calls are stored now that a later token has arrived.
        self._flush()
        # an engine caches fp16/bf16 keys: the fp16 values are what the tail holds and tiles encode
        self.tail = (torch.cat([self.tail[0], key_states.to(torch.float32).half()], 2),
                     torch.cat([self.tail[1], value_states.to(torch.float32).half()], 2))
        self.length += key_states.shape[2]
        k, v = self._read_view(key_states.dtype)
        self._view = k
        return k, v

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.length if self.is_initialized else 0

    def held_tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer holds between steps (what ``nbytes`` counts)."""
        out = list(self.tiles)
        for pair in (self.first, self.tail):
            if pair is not None:
                out.extend(pair)
        return out

    def nbytes(self) -> int:
        """Bytes actually stored: encoded tiles + fp16 first tile and tail."""
        return sum(t.numel() * t.element_size() for t in self.held_tensors()) if self.is_initialized else 0

    def crop(self, *args, **kwargs):
        raise NotImplementedError("KVarNCache cannot crop: encoded tiles cannot be partially removed")

    def reorder_cache(self, *args, **kwargs):
        raise NotImplementedError("KVarNCache does not support beam search reordering")

    def batch_repeat_interleave(self, *args, **kwargs):
        raise NotImplementedError("KVarNCache does not support batch expansion; expand the inputs instead")

    def batch_select_indices(self, *args, **kwargs):
        raise NotImplementedError("KVarNCache does not support dropping batch rows")

    # -- reading (kvarn attention handler) -----------------------------------------------------
    def attend(self, q, k, v, bias, scaling, softcap=None):
        """Attention of new queries ``q [B, Hq, Tq, D]`` over this layer's read view ``k, v``
        (``softcap``: the model's attention-logit cap, applied to every score; None: none).

        Keys in tiles that completed inside the current chunk are read quantized by the chunk's
        later queries: their quantized form is computed here exactly as ``_flush`` will store it.
        """
        t = k.shape[-2]
        g = self.fmt.tile
        if bias is not None:  # a query's own key is never masked unless it is a padding token
            tq = q.shape[-2]
            own = bias[..., torch.arange(tq, device=bias.device), torch.arange(t - tq, t, device=bias.device)]
            if (own.float() < -1e4).any():
                raise KvarnError("KVarNCache: the batch is padded (a token's own key is masked), which a tiled cache "
                                 "would quantize together with the padding; generate prompts of one length or one "
                                 "at a time")
        s = self.stored_end
        k_hat, v_hat = k.float().clone(), v.float().clone()
        n = max(0, (t - s) // g)
        if n:
            e = s + n * g
            k_hat[:, :, s:e] = fake_quantize_sequence(k[:, :, s:e], self.fmt.k, g, False, self.k_log_std.to(k.device))
            v_hat[:, :, s:e] = fake_quantize_sequence(v[:, :, s:e], self.fmt.v, g, False, self.v_log_std.to(v.device))
        pos = torch.arange(t, device=k.device)
        mask = quantized_read_mask(pos[t - q.shape[-2]:], pos, g, self.keep_first_tile)
        return mixed_attention(q, k, v, k_hat, v_hat, mask, bias, scaling, softcap)


class KVarNCache(Cache):
    """A transformers ``Cache`` holding K/V as ``recipe`` (a ``Recipe`` or path) lays them out.

    ``model`` (optional but recommended): checked against the recipe's fingerprint and routed
    through kvarn's attention so prefill reads exactly like decoding. Use with
    ``model.generate(..., past_key_values=cache)``; one cache per generation.
    """

    def __init__(self, recipe, model=None):
        path = recipe if not isinstance(recipe, Recipe) else "recipe"
        r = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe, flag=None)  # Python API: no flag
        if model is not None:
            r.check_model(model.config, path)
        self.recipe = r
        layers = [KVarNLayer(f, r.keep_first_tile, r.k_log_std[i], r.v_log_std[i]) for i, f in enumerate(r.layer_formats())]
        super().__init__(layers=layers)
        self._model = weakref.ref(model) if model is not None else None
        if model is not None:
            from ..model_hook import install

            install(model, self)

    def attend(self, layer_idx, q, k, v, bias, scaling, softcap=None):
        layer = self.layers[layer_idx]
        if layer._view is not k:
            # the model runs with another cache (a later plain generate()): this one is finished, so
            # hand the model its own attention back and read exactly
            model = self._model() if self._model is not None else None
            if model is not None:
                from ..model_hook import uninstall

                uninstall(model)
            return mixed_attention(q, k, v, None, None, None, bias, scaling, softcap)
        return layer.attend(q, k, v, bias, scaling, softcap)

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
