"""Load an mlx-lm MoE model with its experts streamed from the shards instead of resident.

mlx_lm builds the model lazily (`lazy=True`: every weight is an unevaluated array backed by
the safetensors files), we swap every SwitchGLU / SwitchMLP for a StreamingSwitch before
anything is evaluated, and only then evaluate the remaining (dense) parameters. The
stacked expert arrays are dropped unevaluated: they never occupy memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .cache import MX_DTYPES, ExpertCache
from .budget import slots_for_budget
from .config_check import check_config, load_tokenizer_checked
from .errors import ModelError, ShardError
from .io import IOPool, parse_io_sim
from .expert_list import ExpertListLayer, StreamingExpert, find_expert_lists, locate as locate_expert_list
from .layout import locate_expert_tensor, per_expert_sources
from . import resume
from .runtime import Runtime
from .shards import ShardIndex, ShardReader
from .streaming import SWITCH_TYPES, StreamingSwitch, projection_specs

DEFAULT_MODEL = Path(__file__).parent / "models" / "demo-moe-4bit"
_FLOATS = {mx.float16, mx.bfloat16, mx.float32}
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
# Every name mlx-lm's MoE blocks and configs use for experts per token.
_TOP_K_KEYS = (
    "num_experts_per_tok",
    "top_k",
    "moe_topk",
    "moe_top_k",
    "top_k_experts",
    "num_experts_per_token",
    "n_activated_experts",
    "num_activated_experts",
    "moe_k",
    "k",
)


def resolve_model_path(spec=None) -> Path:
    """A local checkpoint directory, or a Hugging Face repo id fetched the way mlx_lm does."""
    if spec is not None and not str(spec).strip():
        raise ModelError("--model is empty: give a model directory or a Hugging Face repo id (or leave it out for the demo model)")
    if spec is None or (str(spec) == "demo" and not Path("demo").exists()):  # ./demo, when there is one, wins
        return DEFAULT_MODEL
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{path}: not a model directory")
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(spec)) and not str(spec).startswith((".", "/")):
        try:
            from mlx_lm.utils import _download

            return Path(_download(str(spec)))
        except Exception as e:  # offline, unknown repo, auth: all end the same way for the user
            raise ModelError(
                f"cannot fetch '{spec}' from Hugging Face ({type(e).__name__}); "
                "pass a local mlx-lm model directory or check the network"
            ) from None
    raise ModelError(f"{spec}: no such model directory")


def compute_dtype(name=None):
    """float32 on MLX's CPU backend (bfloat16 is orders of magnitude slower there), else the file's."""
    if name is None or name == "auto":
        return mx.float32 if mx.default_device() == mx.cpu else None
    try:
        return DTYPES[name]
    except KeyError:
        raise ModelError(f"unknown dtype '{name}' (choose from auto, {', '.join(DTYPES)})") from None


def _layer_number(name: str):
    return [int(t) if t.isdigit() else t for t in name.split(".")]


@dataclass
class ModelPlan:
    """What loading will do: the lazily built model, its MoE layers and their expert sources."""

    path: Path
    model: object
    config: dict
    switches: list  # (module path, SwitchGLU/SwitchMLP)
    layers: list  # per MoE layer: {"gate_proj.weight": (ExpertTensor, resident dtype)}
    info: dict


def plan_model(spec=None, dtype=None) -> ModelPlan:
    """Validate the checkpoint and build the model lazily; nothing heavy is read."""
    path = resolve_model_path(spec)
    if not (path / "config.json").exists():
        raise ModelError(f"{path}: no config.json (not an mlx-lm model directory)")
    check_config(path)
    index = ShardIndex.open(path)
    try:
        from mlx_lm.utils import load_model

        model, config = load_model(path, lazy=True)
    except ShardError:
        raise
    except Exception as e:
        raise ModelError(f"{path}: mlx_lm cannot build this model ({type(e).__name__}: {e})") from None
    target = compute_dtype(dtype)
    switches = sorted(
        [(n, m) for n, m in model.named_modules() if isinstance(m, SWITCH_TYPES)] + find_expert_lists(model),
        key=lambda nm: _layer_number(nm[0]),
    )
    sources = per_expert_sources(index, model) if switches else {}
    layers = []
    for name, module in switches:
        spec_l = {}
        if isinstance(module, list):  # experts as a list of MLP modules (dbrx)
            for key, tensor in locate_expert_list(index, name, module).items():
                disk = MX_DTYPES.get(tensor.dtype)
                if disk is None:
                    raise ShardError(f"{tensor.slices[0].path}: expert tensor '{tensor.name}' has unsupported dtype {tensor.dtype}")
                spec_l[key] = (tensor, target if (target is not None and disk in _FLOATS) else disk)
            layers.append(spec_l)
            continue
        for ps in projection_specs(module):
            proj = getattr(module, ps.name)
            if proj.get("global_scale") is not None:
                raise ModelError(f"{path}: experts with a global scale (nvfp4) are not supported yet")
            for pname in ("weight", "scales", "biases", "bias"):
                arr = proj.get(pname)
                if arr is None:
                    continue
                tensor = locate_expert_tensor(
                    index, sources, f"{name}.{ps.name}.{pname}", arr.shape[0], arr.shape[1:]
                )
                disk = MX_DTYPES.get(tensor.dtype)
                if disk is None:
                    raise ShardError(f"{tensor.slices[0].path}: expert tensor '{name}.{ps.name}.{pname}' has unsupported dtype {tensor.dtype}")
                resident = target if (target is not None and disk in _FLOATS) else disk
                spec_l[f"{ps.name}.{pname}"] = (tensor, resident)
        layers.append(spec_l)
    info = _describe(path, config, model, switches, layers, target)
    return ModelPlan(path, model, config, switches, layers, info)


def _ints(value) -> list:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):  # per-layer values (hunyuan)
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _module_top_k(block) -> list:
    """Experts per token as the MoE block (or its router / the config object it keeps) says."""
    found = []
    holders = [block] + [m for _, m in block.children().items() if isinstance(m, dict)]
    for holder in holders:
        attrs = dict(vars(holder))
        if isinstance(holder, dict):
            attrs.update({k: v for k, v in holder.items() if not isinstance(v, (dict, list))})
        for name in _TOP_K_KEYS:
            found += _ints(attrs.get(name))
        for conf in ("config", "args"):
            obj = attrs.get(conf)
            for name in _TOP_K_KEYS:
                found += _ints(getattr(obj, name, None))
    return [k for k in found if k > 0]


def model_top_k(model, switches, config) -> int | None:
    """The largest number of experts a token can use in any MoE layer, read from the built
    model's MoE blocks, else from any config key mlx-lm uses for it."""
    found = []
    for name, _ in switches:
        parent = name.rsplit(".", 1)[0]
        block = model
        for part in parent.split("."):
            block = block[int(part)] if isinstance(block, list) else getattr(block, part, None)
            if block is None:
                break
        if block is not None:
            found += _module_top_k(block)
    if not found:
        for source in (config, config.get("text_config") or {}, config.get("ffn_config") or {}):
            for k in _TOP_K_KEYS:
                found += [v for v in _ints(source.get(k)) if v > 0]
    return max(found) if found else None


def decoder_layer_count(model, switches, config):
    """Decoder layers: the length of the list the MoE layers sit in, else config.json's."""
    from .resume import _decoder_list

    if switches:
        found = _decoder_list(model, switches[0][0])
        if found:
            node = model
            for part in found[0].split("."):
                node = getattr(node, part)
            return len(node)
    text = config.get("text_config", {})
    for key in ("num_hidden_layers", "n_layers", "num_layers"):
        if config.get(key, text.get(key)) is not None:
            return config.get(key, text.get(key))
    return None


def _describe(path, config, model, switches, layers, target) -> dict:
    top_k = model_top_k(model, switches, config)
    info = {
        "path": str(path),
        "model_type": config.get("model_type"),
        "num_hidden_layers": decoder_layer_count(model, switches, config),
        "moe_layers": len(switches),
        "dtype": str(target or "file").replace("mlx.core.", ""),
        "quantization": config.get("quantization"),
    }
    if not switches:
        return info
    num_experts = len(next(iter(layers[0].values()))[0].slices)
    per_expert = sum(
        _nbytes(t.shape, d) for t, d in layers[0].values()
    )
    per_expert_disk = sum(t.nbytes for t, _ in layers[0].values())
    # Resident size: floating weights take the compute dtype (set_dtype happens at load).
    prefixes = tuple(n + "." for n, _ in switches)
    dense = sum(
        v.size * (target.size if target is not None and v.dtype in _FLOATS else v.dtype.size)
        for k, v in tree_flatten(model.parameters())
        if not k.startswith(prefixes)
    )
    info.update(
        num_experts=num_experts,
        top_k=top_k or 1,
        bytes_per_expert=per_expert,
        bytes_per_expert_on_disk=per_expert_disk,
        expert_bytes_total=per_expert * num_experts * len(switches),
        dense_bytes=dense,
    )
    return info


def _nbytes(shape, dtype) -> int:
    n = dtype.size
    for d in shape:
        n *= d
    return n


def load(
    model=None,
    expert_budget=1.0,
    *,
    dtype=None,
    policy: str = "usage",
    direct_io: bool = False,
    prewarm: bool = True,
    io_sim=None,
    io_threads: int | None = None,
    split_reads: str = "auto",
):
    """Load `model` with its experts streamed under `expert_budget`.

    Returns (model, tokenizer, runtime). `model` is the mlx_lm model object with its
    SwitchGLU/SwitchMLP modules replaced: it works unchanged with `mlx_lm.generate` /
    `stream_generate` (per-layer synchronous routing, exact) and with
    `chronos_mlx.generate.stream_generate` (optimistic routing, the fast path).
    `io_sim` ("bandwidth=5GB/s,latency=80us") delays reads like an SSD of that speed;
    `io_threads` reader threads load experts in the background (0: inline reads).
    `split_reads` says how one batch's parallel reads go: "auto" (one `lio_listio` call
    where glibc has it, else Python threads) or "threads" (always Python threads).
    """
    if split_reads not in ("auto", "threads"):
        raise ValueError(f"split_reads={split_reads!r}: expected 'auto' or 'threads'")
    plan = plan_model(model, dtype)
    target = compute_dtype(dtype)
    tokenizer = load_tokenizer_checked(plan.path, eos_token_ids=plan.config.get("eos_token_id"))
    info = dict(plan.info)
    if not plan.switches:
        if target is not None:
            plan.model.set_dtype(target)
        mx.eval(plan.model.parameters())
        runtime = Runtime(None, info)
        runtime.notice = f"{plan.path.name} has no MoE layers: running it unchanged, nothing to stream"
        return plan.model, tokenizer, runtime

    slots = slots_for_budget(
        expert_budget,
        num_layers=len(plan.switches),
        num_experts=info["num_experts"],
        top_k=info["top_k"],
        bytes_per_expert=info["bytes_per_expert"],
    )
    reader = ShardReader(ShardIndex.open(plan.path), direct=direct_io)
    reader.lio = split_reads == "auto"
    reader.simulator = parse_io_sim(io_sim) if isinstance(io_sim, (str, type(None))) else io_sim
    runtime = Runtime(None, info, reader)
    replacements = []
    for i, (name, module) in enumerate(plan.switches):
        if isinstance(module, list):
            shared = ExpertListLayer(i, runtime)
            replacements += [(f"{name}.{e}", StreamingExpert(m, e, shared)) for e, m in enumerate(module)]
        else:
            replacements.append((name, StreamingSwitch(module, i, runtime)))
    plan.model.update_modules(tree_unflatten(replacements))
    runtime.resume = resume.install(plan.model, [name for name, _ in plan.switches])
    plan.switches.clear()  # drop the last references to the lazy stacked expert arrays
    if target is not None:
        plan.model.set_dtype(target)
    mx.eval(plan.model.parameters())
    if io_threads is None:  # waiting on a (simulated) drive is cheap in threads; copying is not
        io_threads = 16 if (reader.simulator is not None or direct_io) else 4
    runtime.cache = ExpertCache(plan.layers, slots, reader, policy, pool=IOPool(io_threads) if io_threads else None)
    runtime.cache.defer_prefetch = not io_threads  # inline reads: after the launch they overlap (cache.run_deferred)
    info.update(
        slots_per_layer=slots,
        expert_budget=str(expert_budget),
        expert_budget_bytes=runtime.cache.resident_bytes,
        budget_fraction=slots / info["num_experts"],
    )
    if prewarm and slots == info["num_experts"]:
        for layer in range(len(runtime.cache.layers)):
            runtime.cache.fill_identity(layer)
    return plan.model, tokenizer, runtime
