"""`deltaserve quantize SRC DST --method awq|fp8`: write an AutoAWQ-layout (version "gemm") int4 checkpoint, or a
block-wise FP8 one in the layout of the official Qwen FP8 releases (e4m3 `weight` + fp32 `weight_scale_inv` per
128 x 128 block, `quant_method: "fp8"`, dynamic activation scales).

Round-to-nearest, asymmetric, one scale and zero point per `group_size` input channels; with a calibration text,
activation-aware per-input-channel scales are searched first and folded into the norms (calibrate.py). The decoder
layers' projections (q/k/v/o, in_proj_qkv/z, out_proj, gate/up/down of MLPs, experts and the shared expert) become int4;
everything else stays 16-bit in the source dtype and is listed in `modules_to_not_convert` (substrings, then every
kept module's full name: see _kept_modules): in_proj_a/b (HV outputs, too few for int4 kernels), the MoE router
`mlp.gate`, `shared_expert_gate`, norms, embeddings, lm_head, conv1d, A_log, dt_bias. Streams one source shard at a
time.

FP8 quantizes the same projections (amax / 448 per block, round-to-nearest) and keeps the same modules 16-bit,
listed the same way.

`write_dequantized` is the inverse view: a 16-bit checkpoint holding exactly the weights a quantized checkpoint
decodes to (the reference the quantized engine is tested against).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .calibrate import CONSUMERS, NormScale, collect_inputs, fold, search_scales
from .config import ModelConfig
from .kernels.fp8_gemm import dequant_blocks
from .layers.fp8 import quantize_blocks
from .layers.quant import QUANT_SUFFIXES, check_shapes, dequantize, to_awq
from .models.weights import WeightsError, check_weights, checkpoint_files, read_formats, strip_name

logger = logging.getLogger("deltaserve")

QUANTIZABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "out_proj", "gate_proj",
               "up_proj", "down_proj")
ALWAYS_16BIT = ["in_proj_a", "in_proj_b", "shared_expert_gate", "conv1d", "norm", "embed_tokens", "lm_head",
                "A_log", "dt_bias", "visual", "mtp"]
LAYER = re.compile(r"\.layers\.(\d+)\.|^layers\.(\d+)\.")
FP8_BLOCK = (128, 128)  # the official releases' weight_block_size, the one deltaserve reads


def not_convert_list(cfg: ModelConfig, extra: list[str]) -> list[str]:
    """modules_to_not_convert: the always-16-bit parts, the MoE router, and the user's own substrings."""
    router = ["mlp.gate"] if cfg.is_moe else []  # "mlp.gate" would also match a dense model's mlp.gate_proj
    if any(not e for e in extra):  # an empty substring matches every module: nothing would be quantized
        raise ValueError("--not-convert takes non-empty module-name substrings, got an empty one")
    return ALWAYS_16BIT + router + [e for e in extra if e not in ALWAYS_16BIT]


def quantize_checkpoint(src: str, dst: str, method: str = "awq", group_size: int = 128,
                        not_convert: list[str] | None = None, progress: bool = True, calib: str | None = None) -> str:
    """Write the int4 (method "awq") or block-FP8 ("fp8") checkpoint of `src` into `dst` (created); returns dst.
    calib: a text file for activation-aware scales (calibrate.py; AWQ only; None: plain RTN). Raises ValueError
    on a bad request."""
    src, dst, calib = (os.path.expanduser(p) if p else p for p in (src, dst, calib))
    if method not in ("awq", "fp8"):
        raise ValueError(f"--method {method!r} is not supported; deltaserve quantize writes 'awq' or 'fp8'")
    if method == "fp8" and (calib or group_size != FP8_BLOCK[1]):
        raise ValueError("--method fp8 uses fixed 128 x 128 blocks and no calibration; drop --group-size and --calib")
    if group_size < 8 or group_size % 8:
        raise ValueError(f"--group-size must be a positive multiple of 8, got {group_size}")
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):  # also dst == src: never overwrite
        raise ValueError(f"{dst} already exists and is not an empty directory; write the quantized checkpoint to a "
                         f"new or empty one")
    _check_writable(dst)  # before --calib's calibration run, not at the first write after it
    cfg = ModelConfig.from_hf_dir(src)
    if cfg.quantization is not None:
        raise ValueError(f"{src} is already quantized ({cfg.quantization.method}); quantize a 16-bit checkpoint")
    skip = not_convert_list(cfg, not_convert or [])
    files = checkpoint_files(src)
    try:  # as the loader checks it, from the headers: a SRC that would not load was quantized into a DST that did not
        # either (tensors config.json has no place for, or of other shapes; quantized tensors without a
        # quantization_config, which were quantized as if 16-bit)
        check_weights(cfg, src)
    except WeightsError as e:
        raise WeightsError(f"{src} does not load as it is, so it is not quantized: {str(e)[:1].lower()}{str(e)[1:]}") \
            from None
    headers = _headers(files)  # checked before anything is written
    _check_experts_uniform(headers, skip)
    _check_not_convert(headers, skip, not_convert or [])
    _warn_split_fused(headers, skip)
    if method == "awq":
        _check_shapes_first(headers, skip, group_size)
    scales = calibrate(src, cfg, files, calib, skip, group_size) if calib else {}
    created = not os.path.exists(dst)
    try:
        _write_quantized(src, dst, cfg, files, method, group_size, skip, scales, headers, progress)
    except BaseException:  # e.g. a full disk or Ctrl-C: no half-written checkpoint (a 16-bit config.json beside
        # quantized shards) is left in dst to be mistaken for a checkpoint or refused as not empty by the next run
        if os.path.isdir(dst):
            if created:
                shutil.rmtree(dst, ignore_errors=True)
            else:  # it was empty: remove what we wrote, keep the directory
                for name in os.listdir(dst):
                    path = os.path.join(dst, name)
                    if os.path.isdir(path):
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        os.remove(path)
        raise
    return dst


def _write_quantized(src: str, dst: str, cfg: ModelConfig, files: list[str], method: str, group_size: int,
                     skip: list[str], scales: dict[str, NormScale], headers: list[tuple[str, list[int]]],
                     progress: bool) -> None:
    _copy_side_files(src, dst)
    weight_map = {}
    for file in files:
        out = {}
        with safe_open(file, framework="pt", device="cpu") as f:
            tensors = {name: read for name, _, read in _tensors(f)}
            for name in _layer_progress(sorted(tensors, key=_layer_key), cfg, progress):
                module = name[: -len(".weight")] if name.endswith(".weight") else None
                t = fold(strip_name(name, cfg) or name, tensors[name](), scales)
                if module and _should_quantize(module, t.shape, skip):
                    out.update(_quantize_tensor(method, module, t, group_size))
                else:
                    out[name] = t
        save_file(out, os.path.join(dst, os.path.basename(file)), metadata={"format": "pt"})
        weight_map.update({n: os.path.basename(file) for n in out})
    _write_index(dst, files, weight_map)
    listed = skip + _kept_modules(headers, skip)
    qcfg = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": listed}
    if method == "fp8":
        qcfg = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": list(FP8_BLOCK), "modules_to_not_convert": listed}
    _update_config(dst, qcfg)


def _kept_modules(headers: list[tuple[str, list[int]]], skip: list[str]) -> list[str]:
    """The full checkpoint name of every module with a 2-D weight that stays 16-bit, listed after the substrings.
    Readers match modules_to_not_convert differently: vLLM's AWQ by substring; vLLM's FP8 against whole module
    prefixes (after renaming `model.language_model.` as it renames the weights), as the official Qwen FP8 configs
    list them; transformers from the start of a module name or as its suffix, so neither "visual" nor a
    --not-convert "layers.1." matched there. Full names match in all of them."""
    modules = [(name[: -len(".weight")], shape) for name, shape in headers if name.endswith(".weight")
               and len(shape) == 2]
    return [m for m, shape in modules if m not in skip and not _should_quantize(m, shape, skip)]


def _check_writable(dst: str) -> None:
    """dst, or the directory it would be created in, is a directory we may write to."""
    parent = os.path.abspath(dst)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write the quantized checkpoint to {dst}: {parent} is not a writable directory")


def _quantize_tensor(method: str, module: str, w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """One Linear's 16-bit weight [out, in] -> its checkpoint tensors, named in full."""
    if method == "fp8":
        q, scale_inv = quantize_blocks(w, FP8_BLOCK)
        return {f"{module}.weight": q, f"{module}.weight_scale_inv": scale_inv}
    return {f"{module}.{k}": v for k, v in to_awq(w, group_size).items()}


def calibrate(src: str, cfg: ModelConfig, files: list[str], calib: str, skip: list[str], group: int
              ) -> dict[str, NormScale]:
    """Activation-aware scales for every norm with a quantized consumer (see calibrate.py)."""
    if not os.path.isfile(calib):
        raise ValueError(f"--calib file {calib} " + ("is a directory" if os.path.isdir(calib) else "does not exist"))
    inputs = collect_inputs(src, calib)
    weights, quantized = {}, set()
    consumer = re.compile(rf"^layers\.\d+\.({'|'.join(CONSUMERS.values())})$")
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for name, _, read in _tensors(f):
                stripped = strip_name(name, cfg)
                if not stripped or not stripped.endswith(".weight") or not consumer.match(stripped[:-7]):
                    continue
                t = read()
                weights[stripped[:-7]] = t
                if _should_quantize(name[:-7], t.shape, skip):
                    quantized.add(stripped[:-7])
    scales = search_scales(inputs, weights, quantized, group)
    if scales:
        gain = sum(s.loss for s in scales.values()) / max(1e-30, sum(s.loss_rtn for s in scales.values()))
        logger.info("activation-aware scales for %d norms: mean alpha %.2f, calibration error %.3f x RTN's",
                    len(scales), sum(s.alpha for s in scales.values()) / len(scales), gain)
    return scales


def _should_quantize(module: str, shape, skip: list[str]) -> bool:
    return (len(shape) == 2 and LAYER.search(module) is not None and module.rsplit(".", 1)[-1] in QUANTIZABLE
            and not any(s in module for s in skip))


def _headers(files: list[str]) -> list[tuple[str, list[int]]]:
    """(name, shape) of every tensor quantize will read (packed experts split, as _tensors does); no tensor data."""
    out = []
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            out += [(name, shape) for name, shape, _ in _tensors(f)]
    return out


def _check_shapes_first(headers: list[tuple[str, list[int]]], skip: list[str], group: int) -> None:
    """Every Linear to quantize fits AWQ at this group size."""
    for name, shape in headers:
        module = name[: -len(".weight")]
        if name.endswith(".weight") and _should_quantize(module, shape, skip):
            reason = check_shapes("awq", shape[1], shape[0], group, module)
            if reason:
                raise ValueError(f"cannot quantize {name}: {reason}; pick a --group-size that divides it "
                                 f"(e.g. 32 or 64) or keep it 16-bit with --not-convert")


def _check_not_convert(headers: list[tuple[str, list[int]]], skip: list[str], extra: list[str]) -> None:
    """Each --not-convert substring names some tensor of the checkpoint (a typo would quantize what it meant to
    keep), and something is still left to quantize."""
    names = [name for name, _ in headers]
    quantized = any(name.endswith(".weight") and _should_quantize(name[: -len(".weight")], shape, skip)
                    for name, shape in headers)
    unmatched = [e for e in extra if e not in ALWAYS_16BIT and not any(e in n for n in names)]
    if unmatched:
        raise ValueError(f"--not-convert {unmatched[0]!r} matches no tensor of the checkpoint; module names look "
                         f"like {next((n for n in names if LAYER.search(n)), names[0])!r}")
    if not quantized and extra:
        raise ValueError("--not-convert keeps every quantizable Linear 16-bit, so nothing would be quantized; "
                         "narrow the patterns")


# checkpoint Linears that vLLM and SGLang load as one fused Linear (qkv_proj, gate_up_proj, in_proj_qkvz, in_proj_ba)
FUSED_ELSEWHERE = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("in_proj_qkv", "in_proj_z"),
                   ("in_proj_b", "in_proj_a"))


def _warn_split_fused(headers: list[tuple[str, list[int]]], skip: list[str]) -> None:
    """A --not-convert pattern that keeps some pieces of a fused Linear 16-bit and quantizes the others: deltaserve
    loads that, vLLM refuses it ("some but not all shards ... are quantized"), so say so before writing."""
    kinds: dict[tuple[str, int], dict[bool, str]] = {}  # (parent module, fused group) -> {quantized?: a module}
    for name, shape in headers:
        parent, _, leaf = name[: -len(".weight")].rpartition(".")
        group = next((i for i, g in enumerate(FUSED_ELSEWHERE) if leaf in g), None)
        if name.endswith(".weight") and group is not None and ".experts." not in name:
            module = name[: -len(".weight")]
            kinds.setdefault((parent, group), {}).setdefault(_should_quantize(module, shape, skip), module)
    split = next((seen for seen in kinds.values() if len(seen) == 2), None)
    if split:
        logger.warning("--not-convert keeps %s 16-bit but quantizes %s, which vLLM and SGLang load as one fused "
                       "Linear and refuse when only some of its pieces are quantized (deltaserve loads it); to "
                       "write a checkpoint they read, keep all of %s or none of them", split[False], split[True],
                       "/".join(next(g for g in FUSED_ELSEWHERE if split[True].rsplit(".", 1)[1] in g)))


# keyed by the whole experts module: an MTP head's `mtp.layers.0.mlp.experts` (always 16-bit) is not layer 0's
_EXPERT = re.compile(r"^(?P<moe>(?:.*\.)?layers\.(?P<layer>\d+)\.mlp\.experts)\.\d+\.")


def _check_experts_uniform(headers: list[tuple[str, list[int]]], skip: list[str]) -> None:
    """A layer's experts are all quantized or all 16-bit (what the MoE kernels read): a --not-convert pattern that
    splits them is refused here, not when the written checkpoint is loaded."""
    kinds: dict[tuple[str, str], dict[bool, str]] = {}  # (experts module, layer) -> {quantized?: an example module}
    for name, shape in headers:
        m = _EXPERT.match(name)
        if m and name.endswith(".weight"):
            module = name[: -len(".weight")]
            kinds.setdefault((m["moe"], m["layer"]), {}).setdefault(_should_quantize(module, shape, skip), module)
    for (_, layer), seen in kinds.items():
        if len(seen) == 2:
            raise ValueError(f"--not-convert keeps {seen[False]} 16-bit but quantizes {seen[True]}: the experts "
                             f"of layer {layer} must be all quantized or all 16-bit (match e.g. "
                             f"'layers.{layer}.mlp.experts.' or none of them)")


_PACKED = re.compile(r"^(?P<experts>.+\.mlp\.experts)\.(?P<proj>gate_up_proj|down_proj)$")


def _tensors(f) -> list[tuple[str, list[int], Callable[[], torch.Tensor]]]:
    """An open safetensors file's tensors as (name, shape, read). Packed experts (transformers' layout: gate_up_proj
    [E, 2I, H] with gate first, down_proj [E, H, I]) come out one expert's gate / up / down Linear at a time, named
    as a per-expert checkpoint names them (`mlp.experts.E.gate_proj.weight`): they are quantized, calibrated and
    written like those (AWQ and FP8 checkpoints hold experts one by one)."""
    out = []
    for name in f.keys():
        sl = f.get_slice(name)
        shape, m = sl.get_shape(), _PACKED.match(name)
        if m is None or len(shape) != 3:
            out.append((name, shape, functools.partial(f.get_tensor, name)))
            continue
        rows = shape[1] // 2 if m["proj"] == "gate_up_proj" else shape[1]
        pieces = [("gate_proj", 0), ("up_proj", rows)] if m["proj"] == "gate_up_proj" else [("down_proj", 0)]
        for e in range(shape[0]):
            for proj, start in pieces:
                read = functools.partial(_expert_rows, sl, e, start, start + rows)
                out.append((f"{m['experts']}.{e}.{proj}.weight", [rows, shape[2]], read))
    return out


def _expert_rows(sl, e: int, start: int, stop: int) -> torch.Tensor:
    return sl[e: e + 1, start:stop][0].contiguous()


def _layer_key(name: str) -> tuple[int, str]:
    m = LAYER.search(name)
    return (int(m.group(1) or m.group(2)) if m else -1, name)


def _layer_progress(names: list[str], cfg: ModelConfig, enabled: bool):
    """Yield names (sorted by layer), ticking a tqdm bar once per decoder layer finished."""
    if not enabled:
        yield from names
        return
    from tqdm import tqdm

    bar, current = tqdm(total=cfg.num_hidden_layers, desc="Quantizing layers", unit="layer"), None
    for name in names:
        layer = _layer_key(name)[0]
        if layer != current and current is not None and current >= 0:
            bar.update(1)
        current = layer
        yield name
    bar.update(bar.total - bar.n)
    bar.close()


def write_dequantized(src: str, dst: str, dtype: torch.dtype = torch.float32) -> str:
    """Write `src` (an int4 or FP8 checkpoint we read) as a 16-bit checkpoint holding the dequantized weights."""
    cfg = ModelConfig.from_hf_dir(src)
    read_formats(cfg, src)  # validates the checkpoint (every quantized Linear complete)
    group = cfg.quantization.group_size if cfg.quantization else 0
    _copy_side_files(src, dst)
    files, weight_map = checkpoint_files(src), {}
    for file in files:
        out, pending = {}, {}
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                module, _, suffix = name.rpartition(".")
                if suffix in QUANT_SUFFIXES or suffix == "weight_scale_inv" or (
                        suffix == "weight" and f.get_slice(name).get_dtype().startswith("F8")):
                    pending.setdefault(module, {})[suffix] = f.get_tensor(name)
                elif suffix != "weight_shape":
                    out[name] = f.get_tensor(name)
        for module, tensors in pending.items():
            if "weight_scale_inv" in tensors:
                block = cfg.quantization.weight_block_size
                out[f"{module}.weight"] = dequant_blocks(tensors["weight"], tensors["weight_scale_inv"], block,
                                                         dtype).contiguous()
                continue
            fmt = "awq" if "qweight" in tensors else ("ct_zp" if "weight_zero_point" in tensors else "ct")
            out[f"{module}.weight"] = dequantize(fmt, tensors, group, dtype).contiguous()
        save_file(out, os.path.join(dst, os.path.basename(file)), metadata={"format": "pt"})
        weight_map.update({n: os.path.basename(file) for n in out})
    _write_index(dst, files, weight_map)
    _update_config(dst, None)
    return dst


def _write_index(dst: str, files: list[str], weight_map: dict[str, str]) -> None:
    # tensor names changed: an index copied from the source (one shard or several) would be stale
    if len(files) > 1 or os.path.exists(os.path.join(dst, "model.safetensors.index.json")):
        _write_json(os.path.join(dst, "model.safetensors.index.json"), {"metadata": {}, "weight_map": weight_map})


def _copy_side_files(src: str, dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        path = os.path.join(src, name)
        # quant_config.json: AutoAWQ's settings of the source's tensors (config._quant_config_json), not of dst's
        if os.path.isfile(path) and not name.endswith(".safetensors") and name != "quant_config.json":
            shutil.copy(path, os.path.join(dst, name))


def _update_config(dst: str, qcfg: dict | None) -> None:
    path = os.path.join(dst, "config.json")
    with open(path) as f:
        raw = json.load(f)
    # every place a reader looks for quantization settings (config._quantization): one left behind would describe
    # tensors this checkpoint no longer holds
    for where in (raw, raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}):
        where.pop("quantization_config", None)
        where.pop("compression_config", None)
    if qcfg is not None:
        raw["quantization_config"] = qcfg
    _write_json(path, raw)


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")

