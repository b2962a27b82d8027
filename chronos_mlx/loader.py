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
from .layout import locate_expert_tensor, per_expert_sources
from . import resume
from .runtime import Runtime
from .shards import ShardIndex, ShardReader
from .streaming import SWITCH_TYPES, StreamingSwitch, projection_specs

DEFAULT_MODEL = Path(__file__).parent / "models" / "demo-moe-4bit"
_FLOATS = {mx.float16, mx.bfloat16, mx.float32}
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
_TOP_K_KEYS = ("num_experts_per_tok", "top_k", "moe_top_k", "num_experts_per_token", "moe_k")


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
        ((n, m) for n, m in model.named_modules() if isinstance(m, SWITCH_TYPES)),
        key=lambda nm: _layer_number(nm[0]),
    )
    sources = per_expert_sources(index, model) if switches else {}
    layers = []
    for name, module in switches:
        spec_l = {}
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


def _describe(path, config, model, switches, layers, target) -> dict:
    text = config.get("text_config", {})
    top_k = next((config.get(k) or text.get(k) for k in _TOP_K_KEYS if config.get(k) or text.get(k)), None)
    info = {
        "path": str(path),
        "model_type": config.get("model_type"),
        "num_hidden_layers": config.get("num_hidden_layers", text.get("num_hidden_layers")),
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
    policy: str = "lru",
    direct_io: bool = False,
    prewarm: bool = True,
    io_sim=None,
    io_threads: int | None = None,
):
    """Load `model` with its experts streamed under `expert_budget`.

    Returns (model, tokenizer, runtime). `model` is the mlx_lm model object with its
    SwitchGLU/SwitchMLP modules replaced: it works unchanged with `mlx_lm.generate` /
    `stream_generate` (per-layer synchronous routing, exact) and with
    `chronos_mlx.generate.stream_generate` (optimistic routing, the fast path).
    `io_sim` ("bandwidth=5GB/s,latency=80us") delays reads like an SSD of that speed;
    `io_threads` reader threads load experts in the background (0: inline reads).
    """
    from mlx_lm.utils import load_tokenizer

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
    reader.simulator = parse_io_sim(io_sim) if isinstance(io_sim, (str, type(None))) else io_sim
    runtime = Runtime(None, info, reader)
    replacements = [
        (name, StreamingSwitch(module, i, runtime)) for i, (name, module) in enumerate(plan.switches)
    ]
    plan.model.update_modules(tree_unflatten(replacements))
    runtime.resume = resume.install(plan.model, [name for name, _ in replacements])
    plan.switches.clear()  # drop the last references to the lazy stacked expert arrays
    if target is not None:
        plan.model.set_dtype(target)
    mx.eval(plan.model.parameters())
    if io_threads is None:  # waiting on a (simulated) drive is cheap in threads; copying is not
        io_threads = 16 if (reader.simulator is not None or direct_io) else 4
    runtime.cache = ExpertCache(plan.layers, slots, reader, policy, pool=IOPool(io_threads) if io_threads else None)
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
