"""Weight loading: clean loads, sharded / packed-expert / CausalLM layouts, skipped towers, one-sentence errors.

Every checkpoint here is a `make_tiny` one (dense and MoE), copied and rewritten per test with safetensors.
"""
import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltaserve import LLM, SamplingParams
from deltaserve.config import ModelConfig
from deltaserve.models.weights import WeightsError, build_model, checkpoint_files, load_weights
from deltaserve.tiny import hf_state_dict, make_tiny

LM = "model.language_model."
ST = "model.safetensors"
INDEX = "model.safetensors.index.json"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
PROMPTS = ["hello world, this is a test", "def f(x): return x"]


@pytest.fixture(scope="module")
def tiny_dense(tmp_path_factory):
    return make_tiny(str(tmp_path_factory.mktemp("dense")), moe=False)


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    return make_tiny(str(tmp_path_factory.mktemp("moe")), moe=True)


@pytest.fixture
def tiny(request, tiny_dense, tiny_moe):
    """Indirectly parametrized with "dense" / "moe"."""
    return {"dense": tiny_dense, "moe": tiny_moe}[request.param]


# ---------------------------------------------------------------- helpers

def load(path: str) -> tuple[ModelConfig, torch.nn.Module]:
    cfg = ModelConfig.from_hf_dir(path)
    model = build_model(cfg, torch.device("cpu"), torch.float32)
    load_weights(model, cfg, path)
    return cfg, model


def make_llm(path: str) -> LLM:
    return LLM(model=path, device="cpu", dtype="float32", max_model_len=64, num_kv_blocks=8)


def variant(src: str, dst, edit=None, config_edit=None) -> str:
    """Copy checkpoint `src` to `dst`, then edit its tensors dict and/or its config.json dict in place."""
    dst = str(dst)
    shutil.copytree(src, dst)
    if edit is not None:
        sd = load_file(os.path.join(dst, ST))
        edit(sd)
        save_file(sd, os.path.join(dst, ST), metadata={"format": "pt"})
    if config_edit is not None:
        with open(os.path.join(dst, "config.json")) as f:
            raw = json.load(f)
        raw = config_edit(raw) or raw
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(raw, f)
    return dst


def shard(path: str) -> None:
    """Split model.safetensors of `path` into two shards + an index, as save_pretrained does for big models."""
    sd = load_file(os.path.join(path, ST))
    names = sorted(sd)
    half = len(names) // 2
    weight_map = {}
    for fname, part in zip(SHARDS, (names[:half], names[half:])):
        save_file({n: sd[n] for n in part}, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    with open(os.path.join(path, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    os.remove(os.path.join(path, ST))


def pack_experts(sd: dict) -> None:
    """Per-expert gate/up/down tensors -> packed gate_up_proj [E, 2I, H] (gate first) and down_proj [E, H, I]."""
    bases = sorted({m[1] for n in sd if (m := re.match(r"^(.*\.mlp\.experts\.)\d+\.gate_proj\.weight$", n))})
    for base in bases:
        n_exp = len([n for n in sd if n.startswith(base) and n.endswith(".gate_proj.weight")])
        gate_up = [torch.cat([sd.pop(f"{base}{e}.gate_proj.weight"), sd.pop(f"{base}{e}.up_proj.weight")])
                   for e in range(n_exp)]
        down = [sd.pop(f"{base}{e}.down_proj.weight") for e in range(n_exp)]
        sd[f"{base}gate_up_proj"] = torch.stack(gate_up).contiguous()
        sd[f"{base}down_proj"] = torch.stack(down).contiguous()


def to_causal_lm(raw: dict) -> dict:
    arch = raw["architectures"][0].replace("ConditionalGeneration", "CausalLM")
    return {**raw["text_config"], "architectures": [arch], "tie_word_embeddings": raw["tie_word_embeddings"]}


def rename_to_causal_lm(sd: dict) -> None:
    for n in [n for n in sd if n.startswith(LM)]:
        sd["model." + n[len(LM):]] = sd.pop(n)


def assert_same_params(a: torch.nn.Module, b: torch.nn.Module) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


def assert_same_outputs(path_a: str, path_b: str) -> None:
    """Greedy tokens and prompt logprobs of LLM on both checkpoints agree (same weights: bit-identical)."""
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=3)
    outs = [make_llm(p).generate(PROMPTS, sp, use_tqdm=False) for p in (path_a, path_b)]
    for a, b in zip(*outs):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert len(a.outputs[0].token_ids) == 6
        assert a.prompt_logprobs[0] is None and b.prompt_logprobs[0] is None
        for la, lb in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            assert la.keys() == lb.keys()
            torch.testing.assert_close(torch.tensor(list(la.values())), torch.tensor([lb[k] for k in la]),
                                       rtol=0, atol=1e-6)


def assert_one_sentence(msg: str, *needles: str) -> None:
    assert "\n" not in msg, msg
    assert not re.search(r"[.!?]\s+[A-Z]", msg), f"more than one sentence: {msg}"
    for n in needles:
        assert n in msg, f"{n!r} not named in: {msg}"


# ---------------------------------------------------------------- clean loads

@pytest.mark.parametrize("tiny", ["dense", "moe"], indirect=True)
def test_loads_cleanly_and_round_trips(tiny):
    """Every parameter is filled from the file: mapping the model back to HF names reproduces the file exactly."""
    cfg, model = load(tiny)
    on_disk = load_file(os.path.join(tiny, ST))
    back = hf_state_dict(model, cfg)
    assert back.keys() == on_disk.keys()
    for name, t in on_disk.items():
        assert torch.equal(back[name], t), name
    assert checkpoint_files(tiny) == [os.path.join(tiny, ST)]


@pytest.mark.parametrize("tiny", ["dense", "moe"], indirect=True)
def test_sharded_checkpoint_loads_same_weights(tiny, tmp_path):
    path = variant(tiny, tmp_path / "sharded")
    shard(path)
    assert checkpoint_files(path) == [os.path.join(path, s) for s in SHARDS]
    assert_same_params(load(tiny)[1], load(path)[1])


def test_model_safetensors_beside_an_index_wins(tiny_dense, tmp_path):
    """Both model.safetensors and a shard index in one directory (a checkpoint rewritten in place): transformers
    loads model.safetensors, and so must we, or the engine runs other weights than the reference."""
    path = variant(tiny_dense, tmp_path / "both")
    shard(path)  # the index and its shards hold the original weights
    sd = {}
    for f in SHARDS:
        sd.update(load_file(os.path.join(path, f)))
    name = next(n for n in sorted(sd) if n.endswith("mlp.down_proj.weight"))
    sd[name] = sd[name] * 2
    save_file(sd, os.path.join(path, ST), metadata={"format": "pt"})
    assert checkpoint_files(path) == [os.path.join(path, ST)]
    loaded = dict(load(path)[1].named_parameters())
    key = next(k for k in loaded if k.endswith(name.split("layers.", 1)[1]))
    torch.testing.assert_close(loaded[key], sd[name])


@pytest.mark.parametrize("tiny", ["dense", "moe"], indirect=True)
def test_visual_and_mtp_tensors_skipped(tiny, tmp_path):
    def add_towers(sd):
        sd["model.visual.blocks.0.attn.qkv.weight"] = torch.randn(96, 32)
        sd["model.visual.patch_embed.proj.weight"] = torch.randn(32, 3, 2, 16, 16)
        sd["mtp.fc.weight"] = torch.randn(128, 256)
        sd["mtp.layers.0.mlp.gate_proj.weight"] = torch.randn(7, 5)
        sd["mtp.norm.weight"] = torch.randn(128)

    path = variant(tiny, tmp_path / "towers", add_towers)
    assert_same_params(load(tiny)[1], load(path)[1])


@pytest.mark.parametrize("tiny", ["dense", "moe"], indirect=True)
def test_quantization_config_under_text_config_loads(tiny, tmp_path):
    """An FP8 checkpoint whose quantization_config sits in text_config (as some multimodal exports write it) loads
    and runs as the same checkpoint with it at the top level; it used to be refused as having no
    quantization_config."""
    from deltaserve.quantize import quantize_checkpoint

    top = quantize_checkpoint(tiny, str(tmp_path / "top"), method="fp8", progress=False)

    def nest(raw):
        raw["text_config"]["quantization_config"] = raw.pop("quantization_config")

    nested = variant(top, tmp_path / "nested", config_edit=nest)
    assert ModelConfig.from_hf_dir(nested).quantization.method == "fp8"
    assert_same_params(load_quantized(top), load_quantized(nested))
    assert_same_outputs(top, nested)


@pytest.mark.parametrize("scales", [True, False], ids=["with_scales", "without_scales"])
def test_packed_fp8_experts_are_refused_in_one_sentence(tiny_moe, tmp_path, scales):
    """FP8 experts packed as transformers holds them (gate_up_proj [E, 2I, H] e4m3, gate_up_proj_scale_inv): the
    e4m3 tensors were cast into the 16-bit experts without their scales (a wrong model, silently, when no scale was
    beside them), or the scales were reported as tensors of another checkpoint's config.json."""
    from deltaserve.quantize import quantize_checkpoint

    fp8 = quantize_checkpoint(tiny_moe, str(tmp_path / "fp8"), method="fp8", progress=False)

    def pack(sd):
        bases = sorted({m[1] for n in sd if (m := re.match(r"^(.*\.mlp\.experts\.)\d+\.gate_proj\.weight$", n))})
        for base in bases:
            n_exp = len([n for n in sd if n.startswith(base) and n.endswith(".gate_proj.weight")])
            for kind, suffix in (("weight", ""), ("weight_scale_inv", "_scale_inv")):
                gate_up = [torch.cat([sd.pop(f"{base}{e}.gate_proj.{kind}"), sd.pop(f"{base}{e}.up_proj.{kind}")])
                           for e in range(n_exp)]
                down = [sd.pop(f"{base}{e}.down_proj.{kind}") for e in range(n_exp)]
                if kind == "weight" or scales:
                    sd[f"{base}gate_up_proj{suffix}"] = torch.stack(gate_up).contiguous()
                    sd[f"{base}down_proj{suffix}"] = torch.stack(down).contiguous()

    path = variant(fp8, tmp_path / "packed", pack)
    with pytest.raises(WeightsError) as e:
        make_llm(path)
    assert_one_sentence(str(e.value), "FP8", ".mlp.experts.", "one per expert")


def load_quantized(path: str) -> torch.nn.Module:
    from deltaserve.models.weights import read_formats

    cfg = ModelConfig.from_hf_dir(path)
    model = build_model(cfg, torch.device("cpu"), torch.float32, formats=read_formats(cfg, path))
    load_weights(model, cfg, path)
    return model


def test_packed_experts_give_identical_model(tiny_moe, tmp_path):
    path = variant(tiny_moe, tmp_path / "packed", pack_experts)
    names = load_file(os.path.join(path, ST)).keys()
    assert not any(re.search(r"experts\.\d+\.", n) for n in names)
    assert f"{LM}layers.0.mlp.experts.gate_up_proj" in names
    assert_same_params(load(tiny_moe)[1], load(path)[1])
    assert_same_outputs(tiny_moe, path)


@pytest.mark.parametrize("tiny", ["dense", "moe"], indirect=True)
def test_causal_lm_naming_loads(tiny, tmp_path):
    path = variant(tiny, tmp_path / "causal", rename_to_causal_lm, to_causal_lm)
    cfg, model = load(path)
    assert cfg.architecture in ("Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM") and not cfg.nested
    assert not any(n.startswith(LM) for n in load_file(os.path.join(path, ST)))
    assert_same_params(load(tiny)[1], model)


def test_causal_lm_naming_generates_identically(tiny_dense, tmp_path):
    path = variant(tiny_dense, tmp_path / "causal", rename_to_causal_lm, to_causal_lm)
    assert_same_outputs(tiny_dense, path)


@pytest.mark.parametrize("keep_lm_head", [False, True], ids=["no_lm_head", "lm_head_ignored"])
def test_tied_embeddings_need_no_lm_head(tiny_dense, tmp_path, keep_lm_head):
    def edit(sd):
        if keep_lm_head:
            sd["lm_head.weight"] = torch.zeros_like(sd["lm_head.weight"])  # would zero the logits if used
        else:
            del sd["lm_head.weight"]

    path = variant(tiny_dense, tmp_path / "tied", edit, lambda raw: raw.update(tie_word_embeddings=True))
    cfg, model = load(path)
    assert cfg.tie_word_embeddings
    hidden = torch.randn(3, cfg.hidden_size)
    torch.testing.assert_close(model.compute_logits(hidden), hidden @ model.embed_tokens.weight.T)


# ---------------------------------------------------------------- broken checkpoints

def _missing_shard(path):
    shard(path)
    os.remove(os.path.join(path, SHARDS[1]))


def _bad_index(path):
    shard(path)
    with open(os.path.join(path, INDEX), "w") as f:
        json.dump({"metadata": {}}, f)


def _no_safetensors(path):
    os.remove(os.path.join(path, ST))


def _index_not_object(path):
    shard(path)
    with open(os.path.join(path, INDEX), "w") as f:
        json.dump([], f)


def _index_value_not_a_name(path):
    """A weight_map value that is not a file name (e.g. an int): it was a TypeError from os.path.join."""
    shard(path)
    with open(os.path.join(path, INDEX)) as f:
        index = json.load(f)
    index["weight_map"] = {name: 1 for name in index["weight_map"]}
    with open(os.path.join(path, INDEX), "w") as f:
        json.dump(index, f)


def _truncated(path):
    with open(os.path.join(path, ST), "r+b") as f:
        f.truncate(5000)


def _truncated_data(path):
    """Cut in the tensors' data, the header whole: safetensors said "incomplete metadata, file not fully covered"."""
    file = os.path.join(path, ST)
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) - 1000)


def _empty(path):
    open(os.path.join(path, ST), "w").close()


def _lfs_pointer(path):
    """What `git clone` without git-lfs leaves; safetensors said "header too large"."""
    with open(os.path.join(path, ST), "w") as f:
        f.write("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 3510336\n")


def _not_safetensors(path):
    with open(os.path.join(path, ST), "w") as f:
        f.write("<html><body>404 Not Found</body></html>\n")


def _set(name, shape):
    return lambda sd: sd.__setitem__(name, torch.zeros(shape))


def _drop(name):
    return lambda sd: sd.pop(name)


# (checkpoint, file edit, tensor edit, substrings the one-sentence message must contain)
BROKEN = {
    "missing_shard": ("dense", _missing_shard, None, [SHARDS[1], "missing"]),
    "bad_index": ("dense", _bad_index, None, [INDEX, "weight_map"]),
    "no_safetensors": ("dense", _no_safetensors, None, [ST, INDEX]),
    "index_not_object": ("dense", _index_not_object, None, [INDEX, "weight_map"]),
    "index_value_not_a_name": ("dense", _index_value_not_a_name, None, [INDEX, "weight_map", "1"]),
    "truncated_safetensors": ("dense", _truncated, None, [ST, "not a readable safetensors file", "truncated (5000 of"]),
    "truncated_data": ("dense", _truncated_data, None, [ST, "not a readable safetensors file", "truncated", "again"]),
    "empty_safetensors": ("dense", _empty, None, [ST, "not a readable safetensors file", "empty (0 bytes)"]),
    "lfs_pointer": ("dense", _lfs_pointer, None, [ST, "Git LFS pointer", "git lfs pull"]),
    "not_safetensors": ("dense", _not_safetensors, None, [ST, "not a readable safetensors file"]),
    "wrong_shape": ("dense", None, _set(f"{LM}layers.0.linear_attn.in_proj_qkv.weight", (255, 128)),
                    [f"{LM}layers.0.linear_attn.in_proj_qkv.weight", "[255, 128]", "[256, 128]"]),
    "wrong_shape_transposed": ("dense", None, _set(f"{LM}layers.3.mlp.down_proj.weight", (256, 128)),
                               [f"{LM}layers.3.mlp.down_proj.weight", "[256, 128]", "[128, 256]"]),
    "wrong_shape_conv": ("dense", None, _set(f"{LM}layers.1.linear_attn.conv1d.weight", (256, 1, 3)),
                         [f"{LM}layers.1.linear_attn.conv1d.weight", "[256, 1, 3]", "[256, 4]"]),
    "wrong_shape_conv_channels": ("dense", None, _set(f"{LM}layers.1.linear_attn.conv1d.weight", (128, 2, 4)),
                                  [f"{LM}layers.1.linear_attn.conv1d.weight", "[128, 2, 4]", "[256, 4]"]),
    "wrong_shape_expert": ("moe", None, _set(f"{LM}layers.2.mlp.experts.5.up_proj.weight", (64, 64)),
                           [f"{LM}layers.2.mlp.experts.5.up_proj.weight", "[64, 64]", "[64, 128]"]),
    "wrong_shape_embed": ("moe", None, _set(f"{LM}embed_tokens.weight", (100, 128)),
                          [f"{LM}embed_tokens.weight", "[100, 128]"]),
    "missing_tensor": ("dense", None, _drop(f"{LM}layers.1.post_attention_layernorm.weight"),
                       [f"{LM}layers.1.post_attention_layernorm.weight", "missing", "incomplete download"]),
    # pieces of what we fuse were named by our keys ("layers.3.self_attn.qkv_proj.weight.k_proj"), not the file's
    "missing_fused_piece": ("dense", None, _drop(f"{LM}layers.3.self_attn.k_proj.weight"),
                            [f"{LM}layers.3.self_attn.k_proj.weight", "missing"]),
    "missing_gdn_piece": ("dense", None, _drop(f"{LM}layers.0.linear_attn.in_proj_b.weight"),
                          [f"{LM}layers.0.linear_attn.in_proj_b.weight", "missing"]),
    "missing_lm_head": ("dense", None, _drop("lm_head.weight"), ["lm_head.weight", "missing"]),
    "missing_attn_tensor": ("moe", None, _drop(f"{LM}layers.3.self_attn.q_norm.weight"),
                            ["layers.3.self_attn.q_norm.weight", "missing"]),
    "missing_expert": ("moe", None, _drop(f"{LM}layers.2.mlp.experts.3.up_proj.weight"),
                       [f"{LM}layers.2.mlp.experts.3.up_proj.weight", "missing"]),
    "extra_tensor": ("dense", None, _set(f"{LM}layers.0.mlp.extra_proj.weight", (4, 4)),
                     [f"{LM}layers.0.mlp.extra_proj.weight"]),
    "extra_layer": ("dense", None, _set(f"{LM}layers.4.input_layernorm.weight", (128,)),
                    [f"{LM}layers.4.input_layernorm.weight"]),
    "experts_in_dense": ("dense", None, _set(f"{LM}layers.0.mlp.experts.0.gate_proj.weight", (256, 128)),
                         [f"{LM}layers.0.mlp.experts.0.gate_proj.weight"]),
    "expert_out_of_range": ("moe", None, _set(f"{LM}layers.0.mlp.experts.8.gate_proj.weight", (64, 128)),
                            [f"{LM}layers.0.mlp.experts.8.gate_proj.weight"]),
}


@pytest.fixture(params=list(BROKEN), ids=list(BROKEN))
def broken(request, tiny_dense, tiny_moe, tmp_path):
    """(checkpoint dir with one defect, substrings its WeightsError must contain)."""
    which, file_edit, tensor_edit, needles = BROKEN[request.param]
    path = variant(tiny_dense if which == "dense" else tiny_moe, tmp_path / request.param, tensor_edit)
    if file_edit is not None:
        file_edit(path)
    return path, needles


def test_load_weights_rejects_broken_checkpoint(broken):
    path, needles = broken
    cfg = ModelConfig.from_hf_dir(path)
    model = build_model(cfg, torch.device("cpu"), torch.float32)
    with pytest.raises(WeightsError) as e:
        load_weights(model, cfg, path)
    assert_one_sentence(str(e.value), *needles)


def test_llm_surfaces_weights_error(broken):
    """Users of LLM(...) get the same WeightsError (one sentence), not a torch traceback."""
    path, needles = broken
    with pytest.raises(WeightsError) as e:
        make_llm(path)
    assert_one_sentence(str(e.value), *needles)


def test_llm_surfaces_config_error(tiny_dense, tmp_path):
    from deltaserve.config import ConfigError

    path = variant(tiny_dense, tmp_path / "badcfg", config_edit=lambda raw: raw.update(architectures=["GPT2"]))
    with pytest.raises(ConfigError) as e:
        make_llm(path)
    assert_one_sentence(str(e.value), "'GPT2'", "Qwen3_5ForCausalLM")


@pytest.mark.parametrize("kwargs, needle", [
    ({"tokenizer": "/nonexistent/tok"}, "'/nonexistent/tok' is not a directory holding tokenizer.json"),
    ({"max_model_len": 0}, "max_model_len must be a positive integer, got 0"),
    ({"num_kv_blocks": 0}, "num_kv_blocks must be a positive integer, got 0"),
    ({"block_size": True}, "block_size must be a positive integer, got True"),
    # sizes the caches cannot be allocated at: one sentence, not the allocator's stack trace
    ({"num_kv_blocks": 10**9}, "the model and its caches do not fit in memory (an allocation of"),
    ({"max_num_batched_tokens": 10**12}, "the model and its caches do not fit in memory (an allocation of"),
    ({"block_size": 10**9}, "block_size 1000000000 is more tokens than a sequence may hold (4096); use a block_size "
                            "of at most 4096"),
    # a short max_model_len with the default block_size: the advice was "use 16 (the default) to 256", what was used
    ({"max_model_len": 10}, "block_size 16 is more tokens than a sequence may hold (10); use a block_size of at most "
                            "10 or raise max_model_len"),
    # every request was refused (and on CUDA the warm-up's one-token prompts failed building the engine); a prompt
    # may fill max_model_len now, but one token of prompt and one of answer is no use
    ({"max_model_len": 1, "block_size": 1}, "max_model_len 1 holds only a one-token prompt, answered by one token "
                                            "whatever max_tokens asks; use at least 2"),
    ({"seed": 2**64}, "an integer in [0, 2**63); got 18446744073709551616"),
    ({"async_scheduling": "no"}, "async_scheduling must be True or False, got 'no'"),
], ids=["tokenizer-path", "max-model-len-0", "kv-blocks-0", "block-size-bool", "kv-blocks-huge", "batched-huge",
        "block-size-huge", "block-size-over-max-model-len", "max-model-len-1", "seed-overflow", "flag-string"])
def test_llm_refuses_bad_engine_arguments(tiny_dense, kwargs, needle):
    """0 is not 'auto', a tokenizer path that is not there is not 'no tokenizer', and a size nothing can hold is
    refused in a sentence."""
    with pytest.raises(ValueError, match=re.escape(needle)):
        LLM(model=tiny_dense, device="cpu", **kwargs)



def test_llm_takes_a_torch_device_and_refuses_odd_inputs(tiny_dense):
    """vLLM users pass torch.device; a model that is not a path and a prompt that is not a prompt get one
    sentence (they were AttributeError / TypeError from deep inside)."""
    llm = LLM(model=tiny_dense, device=torch.device("cpu"))
    assert llm.device == torch.device("cpu")
    with pytest.raises(ValueError, match="model must be the path of a checkpoint directory"):
        LLM(model=None, device="cpu")
    with pytest.raises(ValueError, match="each prompt must be a string"):
        llm.generate(5)

def test_prompt_dicts_as_vllm_takes_them(tiny_dense):
    """vLLM's text prompt {'prompt': str} was refused ("a dict with a 'prompt_token_ids' list"); a dict with keys
    deltaserve does not read (multi_modal_data, a typo) was run with them ignored. Now the first is the string, the
    second one sentence, as is a dict with neither key (one with both is vLLM's TokensPrompt carrying its text:
    test_vllm_compat.py::test_a_tokens_prompt_may_carry_its_text)."""
    llm = LLM(model=tiny_dense, device="cpu")
    sp = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    prompts = ["Hello", {"prompt": "Hello"}, {"prompt_token_ids": llm.tokenizer.encode("Hello")}]
    text, as_dict, ids = llm.generate(prompts, sp, use_tqdm=False)
    assert as_dict.prompt == "Hello" and as_dict.outputs[0].token_ids == text.outputs[0].token_ids
    assert ids.outputs[0].token_ids == text.outputs[0].token_ids
    for bad, needle in (({"prompt": "Hi", "multi_modal_data": {}}, "'multi_modal_data' is not supported"),
                        ({"prompt_token_ids": [1], "prompt_tokens": [2]}, "'prompt_tokens' is not supported"),
                        ({}, "takes one of 'prompt'"),
                        ({"prompt": 5}, "each prompt must be a string, {'prompt': str}")):
        with pytest.raises(ValueError, match=re.escape(needle)):
            llm.generate([bad], sp, use_tqdm=False)


def _poke(name, value, index=(0, 0)):
    def edit(sd):
        sd[name] = sd[name].clone()
        sd[name][index] = value
    return edit


@pytest.mark.parametrize("name, value, index", [
    (f"{LM}layers.3.self_attn.o_proj.weight", float("nan"), (0, 0)),
    (f"{LM}embed_tokens.weight", float("inf"), (100, 3)),
    ("lm_head.weight", float("-inf"), (5, 0)),
    (f"{LM}layers.0.linear_attn.A_log", float("nan"), (1,)),
], ids=["nan_proj", "inf_embed", "ninf_lm_head", "nan_a_log"])
def test_non_finite_weights_are_refused(tiny_dense, tmp_path, name, value, index):
    """A NaN / inf weight loaded silently and the model wrote token 0 ('!!!') with nan logprobs."""
    path = variant(tiny_dense, tmp_path / "nonfinite", _poke(name, value, index))
    with pytest.raises(WeightsError) as e:
        make_llm(path)
    assert_one_sentence(str(e.value), name, "NaN or infinite")


def test_values_past_float16_range_are_refused_in_float16(tiny_dense, tmp_path):
    name = f"{LM}layers.3.mlp.down_proj.weight"
    path = variant(tiny_dense, tmp_path / "big", _poke(name, 1e5))
    make_llm(path)  # float32: fine
    cfg = ModelConfig.from_hf_dir(path)
    model = build_model(cfg, torch.device("cpu"), torch.float16)
    with pytest.raises(WeightsError) as e:
        load_weights(model, cfg, path)
    assert_one_sentence(str(e.value), name, "float16", "bfloat16")


def _both_prefixes(value):
    def edit(sd):
        sd["model.norm.weight"] = sd[f"{LM}norm.weight"].clone() if value is None else torch.full_like(
            sd[f"{LM}norm.weight"], value)
    return edit


def _packed_and_per_expert(sd):
    packed = dict(sd)
    pack_experts(packed)
    sd[f"{LM}layers.0.mlp.experts.down_proj"] = torch.zeros_like(packed[f"{LM}layers.0.mlp.experts.down_proj"])


def _duplicate_in_shards(value):
    def edit(path):
        shard(path)
        second = os.path.join(path, SHARDS[1])
        sd = load_file(second)
        head = load_file(os.path.join(path, SHARDS[0]))["lm_head.weight"]
        sd["lm_head.weight"] = head.clone() if value is None else torch.full_like(head, value)
        save_file(sd, second, metadata={"format": "pt"})
    return edit


@pytest.mark.parametrize("which, edit, file_edit, needles", [
    ("dense", None, _duplicate_in_shards(0.0), ["lm_head.weight", "twice"]),
    ("dense", _both_prefixes(-1.0), None, [f"{LM}norm.weight", "model.norm.weight", "twice"]),
    ("moe", _packed_and_per_expert, None, [f"{LM}layers.0.mlp.experts.down_proj", "twice"]),
], ids=["across_shards", "both_prefixes", "packed_and_per_expert"])
def test_conflicting_copies_of_a_tensor_are_refused(tiny_dense, tiny_moe, tmp_path, which, edit, file_edit, needles):
    """Two tensors filling the same parameter with different values: the one read last won, silently."""
    path = variant(tiny_dense if which == "dense" else tiny_moe, tmp_path / "dup", edit)
    if file_edit is not None:
        file_edit(path)
    with pytest.raises(WeightsError) as e:
        make_llm(path)
    assert_one_sentence(str(e.value), *needles)


@pytest.mark.parametrize("edit, file_edit", [(None, _duplicate_in_shards(None)), (_both_prefixes(None), None)],
                         ids=["across_shards", "both_prefixes"])
def test_identical_copies_of_a_tensor_load(tiny_dense, tmp_path, edit, file_edit):
    """transformers loads these; so do we, the same model."""
    path = variant(tiny_dense, tmp_path / "dup", edit)
    if file_edit is not None:
        file_edit(path)
    assert_same_params(load(path)[1], load(tiny_dense)[1])


def make_unreadable(file: str, monkeypatch) -> None:
    """chmod 000 `file`; as root, where the mode is not enforced, Python's open() of it is refused as the OS would
    (so the test runs either way; code that reads it without Python's open() is not covered as root)."""
    os.chmod(file, 0)
    if os.access(file, os.R_OK):
        import builtins

        real_open = builtins.open

        def denying_open(path, *args, **kwargs):
            if isinstance(path, (str, os.PathLike)) and os.fspath(path) == file:
                raise PermissionError(13, "Permission denied", file)
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", denying_open)


def test_unreadable_safetensors_is_named_as_unreadable(tiny_dense, tmp_path, monkeypatch):
    """safetensors said "No such file or directory" for a file that is there but may not be read (mode 000)."""
    path = variant(tiny_dense, tmp_path / "unreadable")
    st = os.path.join(path, ST)
    make_unreadable(st, monkeypatch)
    with pytest.raises(WeightsError) as e:
        checkpoint_files(path)
    assert_one_sentence(str(e.value), st, "cannot be read", "Permission denied")
    assert "No such file" not in str(e.value)


def test_unreadable_safetensors_index_is_named_as_unreadable(tiny_dense, tmp_path, monkeypatch):
    """A sharded checkpoint whose index may not be read: a PermissionError's trace."""
    path = variant(tiny_dense, tmp_path / "unreadable")
    shard(path)
    index = os.path.join(path, INDEX)
    make_unreadable(index, monkeypatch)
    with pytest.raises(WeightsError) as e:
        checkpoint_files(path)
    assert_one_sentence(str(e.value), index, "cannot be read", "Permission denied")


@pytest.mark.parametrize("stray", ["ghost", "moved"])
def test_an_index_that_does_not_match_its_shards_is_said(tiny_dense, tmp_path, caplog, stray):
    """weight_map naming a tensor no shard holds (ghost), or a shard that does not hold it (moved): the model loads
    from the shards' own headers (a tensor it needs and no shard holds is a missing tensor), with a warning naming
    the first mismatch; before, nothing was said."""
    path = variant(tiny_dense, tmp_path / stray)
    shard(path)
    with open(os.path.join(path, INDEX)) as f:
        index = json.load(f)
    name = f"{LM}layers.0.mlp.ghost.weight" if stray == "ghost" else \
        next(n for n, s in index["weight_map"].items() if s == SHARDS[1])
    index["weight_map"][name] = SHARDS[0]
    with open(os.path.join(path, INDEX), "w") as f:
        json.dump(index, f)
    with caplog.at_level("WARNING", logger="deltaserve"):
        _, model = load(path)
    _, clean = load(tiny_dense)
    assert_same_params(model, clean)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1, warned
    where = "held by no shard" if stray == "ghost" else f"found in {SHARDS[1]}"
    assert_one_sentence(warned[0], INDEX, "1 tensor(s)", f"{name}, listed in {SHARDS[0]} but {where}")
