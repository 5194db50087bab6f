"""vLLM attention backend for a kvarn cache (PyTorch path; runs the whole engine on CPU).

Roles, as in vLLM's own backends: ``KvarnMetadataBuilder`` turns a step's batch into a
``KvarnMetadata`` (the plan of ``kvarn.runtime.paged.StagingTable``, once per step for all
layers), ``KvarnImpl.forward`` stores the step's keys/values and attends
(``kvarn.runtime.paged.attend_layer``), and the backend classes declare the packed uint8 spec.

Cache layout: one block = one tile (``block_size == recipe.tile``). A layer's page is
``tile_bytes(layer)`` bytes (rounded up to whole bytes per token), so vLLM's capacity is the
recipe's bytes per token; layers with different bit allocations get different page sizes, which
vLLM keeps in one KV-cache group (``UniformTypeKVCacheSpecs``). The fp16 staging (open tiles and
first tiles) is a per-engine pool allocated when the model is built, so the engine's memory
accounting sees it (and an explicit ``kv_cache_memory_bytes`` is reduced by it at config time).

``KvarnCPUBackend`` replaces ``CPU_ATTN`` (the CPU platform always picks that one): for any other
cache dtype it hands out the stock CPU impl and builder, so registering it changes nothing unless
``--kv-cache-dtype kvarn`` is used. ``KvarnBackend`` is the same reader for the ``CUSTOM`` slot on
GPUs (run on an H200 with vLLM 0.26.0: the engine tests pass there; the GPU kernels issue replaces the
PyTorch path behind this interface).

Version-specific page sizing: 0.32+ ``customize_spec``; 0.26 ``get_kv_cache_shape`` plus a spec
subclass with the page size (``_install_layer_v026``; tested on the H200).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, replace

import torch

from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadata,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_interface import FullAttentionSpec

from ..errors import KvarnError
from ..parallel import rank_kv_heads
from . import decode_graphs
from .paged import (CacheSource, DecodeBatch, SeqStep, StagingTable, attend_layer, decode_batch, load_source,
                    staging_slots, tp_page_bytes)
from .vllm_plugin import CONFIG_KEY, KV_CACHE_DTYPE, _Compat, _model_shape

STORAGE_DTYPE = torch.uint8


# ---------------------------------------------------------------------------------------------
class EngineCache:
    """Per engine and process: the recipe's layouts, the staging pools and the step plan."""

    def __init__(self, vllm_config):
        spec = (vllm_config.additional_config or {}).get(CONFIG_KEY)
        if not spec:
            raise KvarnError(f"--kv-cache-dtype kvarn reached a worker without additional_config['{CONFIG_KEY}']; "
                             "create the engine through EngineArgs/LLM/the CLI so the plugin can resolve the recipe")
        self.vllm_config = vllm_config
        _Compat.track_finished_requests()  # finished requests release their staging slots
        self.source: CacheSource = load_source(spec, *_model_shape(vllm_config.model_config.hf_config))
        tp = vllm_config.parallel_config.tensor_parallel_size
        page_floor = [0] * self.source.num_layers
        if tp > 1:  # this rank's KV heads only: their widths, priors and pages
            from vllm.distributed import get_tensor_model_parallel_rank

            # vLLM needs one page size per layer on every rank: a rank's page is padded to the largest
            page_floor = tp_page_bytes(self.source, tp)
            self.source = self.source.shard(rank_kv_heads(self.source.formats[0].num_kv_heads, tp,
                                                          get_tensor_model_parallel_rank()))
        self.layouts = [self.source.layout(i) for i in range(self.source.num_layers)]
        self.page_bytes = [_round_page(max(lay.nbytes, floor), self.source.tile)
                           for lay, floor in zip(self.layouts, page_floor)]
        slots = staging_slots(vllm_config.scheduler_config.max_num_seqs, self.source.keep_first_tile)
        self.table = StagingTable(slots, self.source.tile, self.source.keep_first_tile)
        device = torch.device(vllm_config.device_config.device)
        self.graphs_on = decode_graphs.enabled() and device.type == "cuda"
        self.graphs = None  # made by the first forward, which knows the heads and dtype of this rank
        # allocated (and touched) now, while the engine builds the model: its memory is counted; with
        # decode graphs one more slot, where padded rows write (the table never hands it out)
        self.staging = [torch.zeros(slots + self.graphs_on, 2, f.num_kv_heads, f.tile, f.head_dim, dtype=torch.float16,
                                    device=device) for f in self.source.formats]
        self.device = device
        if device.type == "cuda":  # compile the kernels now, not in the first serving steps
            from ..ops.warmup import warm_up

            mc = vllm_config.model_config
            warm_up(self.layouts, mc.get_num_attention_heads(vllm_config.parallel_config), mc.dtype, device)
        self._last_common = None
        self._last_plan: list[SeqStep] = []
        self._last_batch: DecodeBatch | None = None
        _last_page_bytes[0] = max(self.page_bytes)

    def plan(self, common: CommonAttentionMetadata) -> tuple[list[SeqStep], DecodeBatch | None]:
        """The step's plan and its decode rows' device metadata; computed once per step (all
        builders see the same ``common``)."""
        if common is self._last_common:
            return self._last_plan, self._last_batch
        g = self.source.tile
        n = common.num_reqs
        qsl = common.query_start_loc_cpu[: n + 1].tolist()
        seq_lens, table = _Compat.host_step_inputs(common, n)  # host copies: no device sync
        rows = table[:, : max([-(-s // g) for s in seq_lens], default=0)].tolist()  # one conversion per step
        seqs, row_of = [], []
        for i in range(n):
            qs, qe, s = qsl[i], qsl[i + 1], seq_lens[i]
            if qe <= qs:
                continue
            seqs.append((qs, qe, s - (qe - qs), s, rows[i][: -(-s // g)]))
            row_of.append(i)
        self._last_plan = self.table.plan(seqs)
        for st, row in zip(self._last_plan, row_of):  # the sequence's row of the device block table
            st.row = row
        self._last_batch = decode_batch(self._last_plan, g, self.source.keep_first_tile, self.device)
        if self.graphs is not None and self._last_batch is not None:  # into the static buffers, once per step
            self.graphs.prepare(self._last_batch)
        self._last_common = common
        return self._last_plan, self._last_batch

    def decode_graphs_for(self, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype) -> "decode_graphs.DecodeGraphs | None":
        if not self.graphs_on:
            return None
        if self.graphs is None:
            width = -(-self.vllm_config.model_config.max_model_len // self.source.tile)
            self.graphs = decode_graphs.DecodeGraphs(width, num_q_heads, num_kv_heads, head_dim, dtype, self.device,
                                                     scratch_slot=self.table.num_slots)
        return self.graphs

    def staging_for(self, layer: int) -> torch.Tensor:
        return self.staging[layer]  # fixed size: the table never hands out a slot beyond it


_engines: dict[int, weakref.ref] = {}
_last_page_bytes = [0]  # the largest page of the last engine: for spec queries that name no layer


def engine_cache(vllm_config) -> EngineCache:
    ref = _engines.get(id(vllm_config))
    cache = ref() if ref is not None else None
    if cache is None or cache.vllm_config is not vllm_config:
        cache = EngineCache(vllm_config)
        _engines[id(vllm_config)] = weakref.ref(cache)
    return cache


def _round_page(nbytes: int, block_size: int) -> int:
    return math.ceil(nbytes / block_size) * block_size


def _kvarn_spec(spec, page_bytes: int):
    """0.32+: the layer's spec as packed bytes: one head slot, ``page_bytes / block_size`` per token."""
    return replace(spec, num_head_slots=1, state_content_bytes=math.ceil(page_bytes / spec.block_size))


# ---------------------------------------------------------------------------------------------
@dataclass
class KvarnMetadata(AttentionMetadata):
    num_actual_tokens: int
    steps: list  # [SeqStep], one per scheduled sequence
    cache: EngineCache
    decode: DecodeBatch | None = None  # the single-token rows' device metadata (built once per step)
    block_table: torch.Tensor | None = None  # vLLM's device block table (row = SeqStep.row)


class KvarnMetadataBuilder(AttentionMetadataBuilder[KvarnMetadata]):
    supports_update_block_table: bool = True

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.cache = engine_cache(vllm_config)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> KvarnMetadata:
        steps, batch = self.cache.plan(common_attn_metadata)
        return KvarnMetadata(common_attn_metadata.num_actual_tokens, steps, self.cache, batch,
                             common_attn_metadata.block_table_tensor)

    def update_block_table(self, metadata: KvarnMetadata, blk_table, slot_mapping) -> KvarnMetadata:
        return metadata  # one KV-cache group: every layer has the same block table and plan


class KvarnImpl(AttentionImpl[KvarnMetadata]):
    """Decoder self-attention over the kvarn cache. Checks run once, here and in the plugin."""

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                 logits_soft_cap=None, attn_type=AttentionType.DECODER, kv_sharing_target_layer_name=None,
                 sinks=None, **kwargs):
        from vllm.config import get_current_vllm_config

        unsupported = [name for name, bad in (
            ("ALiBi", alibi_slopes is not None), ("sliding window", sliding_window is not None),
            ("attention sinks", sinks is not None),
            (f"attention type {attn_type}", attn_type != AttentionType.DECODER),
            ("KV sharing across layers", kv_sharing_target_layer_name is not None)) if bad]
        if unsupported:
            raise KvarnError(f"--kv-cache-dtype kvarn does not support {', '.join(unsupported)} yet")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads, self.kv_cache_dtype = num_kv_heads, kv_cache_dtype
        self.attn_type, self.sliding_window = attn_type, None
        # Gemma-2-style attention-logit soft-capping: applied to every score (kvarn.runtime.paged)
        self.logits_soft_cap = float(logits_soft_cap) if logits_soft_cap else None
        self.kv_sharing_target_layer_name = None
        self.cache = engine_cache(get_current_vllm_config())
        self.layer_idx: int | None = None

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        """Find this impl's layer (index, page size) and give it a backend that knows its page size."""
        from vllm.model_executor.models.utils import extract_layer_index

        ctx = self.cache.vllm_config.compilation_config.static_forward_context
        for name, layer in ctx.items():
            if getattr(layer, "impl", None) is self:
                self.layer_idx = extract_layer_index(name)
                _install_layer(layer, self.cache, self.layer_idx)
                return

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        """query ``[T, Hq, D]``, key/value ``[T, H, D]``, kv_cache ``[num_blocks, 1, G, C]`` uint8."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by kvarn")
        if attn_metadata is None:  # profiling / warm-up
            return output
        if self.layer_idx is None:  # weights were loaded without process_weights_after_loading
            from vllm.model_executor.models.utils import extract_layer_index

            self.layer_idx = extract_layer_index(layer.layer_name)
        cache, i = attn_metadata.cache, self.layer_idx
        n = attn_metadata.num_actual_tokens
        pages = kv_cache.view(kv_cache.shape[0], -1) if kv_cache.is_contiguous() else kv_cache.flatten(1)
        out = output[:n].view(n, self.num_heads, self.head_size)
        attend_layer(cache.layouts[i], cache.source.keep_first_tile, pages, cache.staging_for(i),
                     attn_metadata.steps, query[:n].view(n, self.num_heads, self.head_size),
                     key[:n].view(n, self.num_kv_heads, self.head_size),
                     value[:n].view(n, self.num_kv_heads, self.head_size), self.scale, out,
                     batch=attn_metadata.decode, prefill="raw" if query.is_cuda else "tiled",
                     softcap=self.logits_soft_cap, block_table=attn_metadata.block_table,
                     graphs=cache.decode_graphs_for(self.num_heads, self.num_kv_heads, self.head_size, query.dtype),
                     layer=i)
        return output

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        """Nothing: ``forward`` stores (it needs the step's plan, which this hook does not get)."""


# ---------------------------------------------------------------------------------------------
class _KvarnSpecMixin:
    """Page sizing shared by both backends. ``_kvarn_page_bytes`` is set on per-layer subclasses."""

    _kvarn_page_bytes: int = 0

    @classmethod
    def customize_spec(cls, spec):
        if spec.dtype != STORAGE_DTYPE:
            return super().customize_spec(spec)
        return _kvarn_spec(spec, cls._kvarn_page_bytes or _last_page_bytes[0] or spec.page_size_bytes)

    @classmethod
    def full_cls_name(cls) -> tuple[str, str]:
        base = cls.__mro__[1] if cls._kvarn_page_bytes else cls  # per-layer subclasses group as one
        return (base.__module__, base.__qualname__)


class KvarnBackend(_KvarnSpecMixin, AttentionBackend):
    """kvarn only (``CUSTOM`` slot on GPUs)."""

    forward_includes_kv_cache_update: bool = False
    supported_dtypes = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes = [KV_CACHE_DTYPE]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        return KvarnImpl

    @staticmethod
    def get_builder_cls():
        return KvarnMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None):
        return [MultipleOf(16)]

    @staticmethod
    def get_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size, cache_dtype_str="auto"):
        """0.26 only: one head slot, the rest of the page per token (the page size is the spec's)."""
        return (num_blocks, 1, block_size, -1)


class _CPUImpl(CPUAttentionBackendImpl):
    """Hands out a ``KvarnImpl`` for ``kv_cache_dtype="kvarn"``, the stock CPU impl otherwise."""

    def __new__(cls, *args, **kwargs):
        dtype = kwargs.get("kv_cache_dtype", args[6] if len(args) > 6 else None)
        if dtype == KV_CACHE_DTYPE:
            return KvarnImpl(*args, **kwargs)
        return super().__new__(cls, *args, **kwargs)


class _CPUBuilder(CPUAttentionMetadataBuilder):
    """Hands out a ``KvarnMetadataBuilder`` for kvarn's uint8 spec, the stock CPU builder otherwise."""

    def __new__(cls, kv_cache_spec, *args, **kwargs):
        if getattr(kv_cache_spec, "dtype", None) == STORAGE_DTYPE:
            return KvarnMetadataBuilder(kv_cache_spec, *args, **kwargs)
        return super().__new__(cls)


class KvarnCPUBackend(_KvarnSpecMixin, CPUAttentionBackend):
    """``CPU_ATTN`` with kvarn added: identical to the stock backend for every other cache dtype."""

    supported_kv_cache_dtypes = [*CPUAttentionBackend.supported_kv_cache_dtypes, KV_CACHE_DTYPE]

    @staticmethod
    def get_impl_cls():
        return _CPUImpl

    @staticmethod
    def get_builder_cls():
        return _CPUBuilder

    @staticmethod
    def get_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size, cache_dtype_str="auto"):
        if cache_dtype_str == KV_CACHE_DTYPE:  # 0.26 only (see KvarnBackend.get_kv_cache_shape)
            return (num_blocks, 1, block_size, -1)
        return CPUAttentionBackend.get_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size,
                                                      cache_dtype_str)


# ---------------------------------------------------------------------------------------------
_layer_backends: dict[tuple[type, int], type] = {}


def _install_layer(layer, cache: EngineCache, idx: int) -> None:
    """Give ``layer`` a backend subclass that knows its page size (``customize_spec`` gets no layer)."""
    base = layer.attn_backend
    base = base.__mro__[1] if getattr(base, "_kvarn_page_bytes", 0) else base
    page = cache.page_bytes[idx]
    key = (base, page)
    if key not in _layer_backends:
        _layer_backends[key] = type(f"{base.__name__}_{page}B", (base,), {"_kvarn_page_bytes": page,
                                                                           "__module__": base.__module__})
    layer.attn_backend = _layer_backends[key]
    if _needs_v026_spec():
        _install_layer_v026(layer, page)


def _needs_v026_spec() -> bool:
    from .vllm_plugin import _state, _Compat

    return not _Compat(_state["version"] or "0.32").sizes_pages_with_customize_spec


def _install_layer_v026(layer, page_bytes: int) -> None:
    """0.26: the layer's spec carries the page size, since no backend hook sizes it."""
    def get_kv_cache_spec(vllm_config):
        return KvarnFullAttentionSpec(
            block_size=vllm_config.cache_config.block_size, num_kv_heads=layer.num_kv_heads,
            head_size=layer.head_size, dtype=STORAGE_DTYPE, kvarn_page_bytes=page_bytes)

    layer.get_kv_cache_spec = get_kv_cache_spec


@dataclass(frozen=True, kw_only=True)
class KvarnFullAttentionSpec(FullAttentionSpec):
    """0.26: a full-attention spec whose page is ``kvarn_page_bytes`` (one packed tile per block)."""

    kvarn_page_bytes: int = 0

    @property
    def real_page_size_bytes(self) -> int:
        return self.kvarn_page_bytes or super().real_page_size_bytes

    @classmethod
    def merge(cls, specs):
        # vLLM asks "can these layers share one spec?" by merging them and catching AssertionError;
        # layers with different bit allocations must answer no, so that each keeps its own page
        # (UniformTypeKVCacheSpecs) instead of all getting the first layer's page
        assert all(s.kvarn_page_bytes == specs[0].kvarn_page_bytes for s in specs), (
            "kvarn layers with different page sizes cannot share one KV-cache spec")
        merged = super().merge(specs)
        return replace(merged, kvarn_page_bytes=specs[0].kvarn_page_bytes)
