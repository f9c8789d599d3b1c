"""generation_config.json's sampling settings as defaults (vLLM's `--generation-config auto`): Qwen3.5's checkpoints
ship temperature 0.6 / top_p 0.95 / top_k 20, which a request that leaves them out used to ignore (it sampled at
temperature 1.0 over the whole vocabulary). The Python API, the server and the CLI; `generation_config="none"`
restores the built-in defaults."""
import asyncio
import json
import os
import shutil
import subprocess
import sys

import pytest

from deltaserve import LLM, SamplingParams, cli
from deltaserve.config import ConfigError, ModelConfig
from deltaserve.serve.async_engine import AsyncEngine
from deltaserve.serve.protocol import CompletionRequest, sampling_params
from deltaserve.tiny import make_tiny

QWEN_LIKE = {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95, "repetition_penalty": 1.0,
             "eos_token_id": [3, 4]}
PROMPTS = ["The quick brown fox", "Once upon a time"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(str(tmp_path_factory.mktemp("gencfg") / "tiny"))


def with_generation_config(tiny: str, path, gen: dict) -> str:
    """A copy of the tiny checkpoint with `gen` as its generation_config.json."""
    shutil.copytree(tiny, path)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(gen, f)
    return str(path)


@pytest.mark.parametrize("gen, expected", [
    (QWEN_LIKE, (("temperature", 0.6), ("top_p", 0.95), ("top_k", 20), ("repetition_penalty", 1.0))),
    ({"do_sample": False, "temperature": 0.7, "top_k": 5, "repetition_penalty": 1.1},
     (("top_k", 5), ("repetition_penalty", 1.1), ("temperature", 0.0))),
    ({"eos_token_id": 3}, ()),
    ({"max_new_tokens": 7, "top_k": 3}, (("top_k", 3), ("max_tokens", 7))),
], ids=["qwen3.5-release", "do-sample-false-is-greedy", "none-set", "max-new-tokens"])
def test_generation_config_sampling_fields_are_read(tiny, tmp_path, gen, expected):
    cfg = ModelConfig.from_hf_dir(with_generation_config(tiny, tmp_path / "m", gen))
    assert cfg.sampling_defaults == expected


def test_a_bad_sampling_value_names_the_file(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"generation_config.json .*'top_k' must be a number"):
        ModelConfig.from_hf_dir(with_generation_config(tiny, tmp_path / "m", {"top_k": "twenty"}))
    with pytest.raises(ConfigError, match=r"generation_config.json .*'top_k' must be a number"):  # json writes Infinity
        ModelConfig.from_hf_dir(with_generation_config(tiny, tmp_path / "inf", {"top_k": float("inf")}))
    path = with_generation_config(tiny, tmp_path / "n", {"top_p": 1.5})
    with pytest.raises(ConfigError, match="generation_config.json's sampling settings cannot be used.*top_p"):
        LLM(path, device="cpu", max_model_len=64)
    assert LLM(path, device="cpu", max_model_len=64, generation_config="none").get_default_sampling_params() == \
        SamplingParams()


def test_max_new_tokens_is_the_default_length(tiny, tmp_path):
    """vLLM's reading of generation_config.json's max_new_tokens: the max_tokens of a request that gives none (the
    offline default params, a server request without max_tokens, the CLI without --max-tokens); one that gives it
    wins."""
    path = with_generation_config(tiny, tmp_path / "m", {"max_new_tokens": 5})
    llm = LLM(path, device="cpu", max_model_len=64)
    assert llm.get_default_sampling_params().max_tokens == 5
    out = llm.generate(PROMPTS[:1], SamplingParams(**{**llm.sampling_defaults, "ignore_eos": True}), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 5
    req = CompletionRequest(model="m", prompt="x")
    assert sampling_params(req, None, None, defaults=llm.sampling_defaults).max_tokens == 5
    assert sampling_params(req, 9, None, defaults=llm.sampling_defaults).max_tokens == 9
    with pytest.raises(ConfigError, match="'max_new_tokens' must be at least 1"):
        ModelConfig.from_hf_dir(with_generation_config(tiny, tmp_path / "z", {"max_new_tokens": 0}))
    args = cli.build_parser().parse_args(["generate", "--prompt", "x"])
    assert cli._sampling_params(args, llm.sampling_defaults).max_tokens == 5
    assert cli._sampling_params(args, {}).max_tokens == 64
    assert cli._sampling_params(cli.build_parser().parse_args(["chat"]), {}).max_tokens == 1024
    args = cli.build_parser().parse_args(["generate", "--prompt", "x", "--max-tokens", "3"])
    assert cli._sampling_params(args, llm.sampling_defaults).max_tokens == 3
    # --min-tokens beyond the CLI's own fallback length passes the check made before loading: the checkpoint's
    # max_new_tokens (unknown then) bounds it (it was refused against the fallback, 64)
    args = cli.build_parser().parse_args(["generate", "--prompt", "x", "--min-tokens", "100"])
    cli._check_sampling_flags(args)
    assert cli._sampling_params(args, {"max_tokens": 200}).min_tokens == 100


def test_generate_without_params_samples_with_the_checkpoints_settings(tiny, tmp_path):
    """top_k 1 in generation_config.json: a call without sampling_params is greedy whatever the temperature; the
    same call with generation_config="none" samples at temperature 1 over everything."""
    path = with_generation_config(tiny, tmp_path / "m", {"do_sample": True, "temperature": 1.0, "top_k": 1})
    greedy = [o.outputs[0].token_ids for o in LLM(path, device="cpu", max_model_len=64).generate(
        PROMPTS, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)]
    llm = LLM(path, device="cpu", max_model_len=64)
    assert llm.get_default_sampling_params().top_k == 1
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, use_tqdm=False)]
    assert [g[:len(o)] for g, o in zip(greedy, got)] == got and any(got)
    plain = LLM(path, device="cpu", max_model_len=64, generation_config="none")
    assert plain.get_default_sampling_params() == SamplingParams()
    sampled = [o.outputs[0].token_ids for o in plain.generate(PROMPTS, use_tqdm=False)]
    assert sampled != got


def test_server_fields_a_request_leaves_out_come_from_the_defaults():
    defaults = {"temperature": 0.6, "top_k": 20, "top_p": 0.95}
    req = CompletionRequest(model="m", prompt="x", temperature=1.2)
    params = sampling_params(req, 8, None, defaults=defaults)
    assert (params.temperature, params.top_k, params.top_p, params.min_p) == (1.2, 20, 0.95, 0.0)
    assert sampling_params(req, 8, None).top_k == 0


def test_cli_generate_follows_the_checkpoint_unless_told_not_to(tiny, tmp_path):
    """deltaserve generate without sampling flags: generation_config.json's temperature 1.0 (sampled, seeded), or
    with --generation-config none the CLI's own default (greedy); a flag still wins."""
    path = with_generation_config(tiny, tmp_path / "m", {"do_sample": True, "temperature": 1.0})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def text(*flags):
        res = subprocess.run([sys.executable, "-m", "deltaserve.cli", "generate", "--model", path, "--prompt",
                              "The quick brown fox", "--max-tokens", "12", "--ignore-eos", "--device", "cpu",
                              "--seed", "7", *flags], capture_output=True, text=True, env=env, timeout=180)
        assert res.returncode == 0, res.stderr
        return res.stdout

    sampled, greedy = text(), text("--generation-config", "none")
    assert sampled != greedy and text("--temperature", "0") == greedy


EXTRA_EOS = 5  # an ordinary token that only generation_config.json names as an EOS


def _three_ways(llm: LLM, params: SamplingParams) -> dict:
    """One forced request through each entry point: LLM.generate, the llm_engine API and the server's AsyncEngine
    -> entry point: (token_ids, finish_reason, stop_reason) of its final output."""
    out = llm.generate(["hi"], params, use_tqdm=False)[0].outputs[0]
    got = {"generate": (out.token_ids, out.finish_reason, out.stop_reason)}
    eng, final = llm.llm_engine, []
    eng.add_request("e", "hi", params)
    while eng.has_unfinished_requests():
        final += [o.outputs[0] for o in eng.step() if o.finished]
    got["llm_engine"] = (final[0].token_ids, final[0].finish_reason, final[0].stop_reason)

    async def serve():
        engine = AsyncEngine(llm)
        engine.start()
        try:
            async for o in await engine.add_request(llm.tokenizer.encode("hi"), params, "s"):
                last = o.outputs[0]
            return last.token_ids, last.finish_reason, last.stop_reason
        finally:
            engine.stop()

    got["server"] = asyncio.run(serve())
    return got


@pytest.mark.parametrize("mode", ["auto", "none", "vllm"])
def test_generation_configs_eos_ids_stop_under_every_setting(tiny, tmp_path, mode):
    """vLLM's --generation-config vllm drops only generation_config.json's sampling defaults: the file's
    eos_token_id ids still end a request (vllm/config/model.py: ModelConfig.try_get_generation_config reads the file
    for "auto" and "vllm" alike, get_diff_sampling_param returns {} for "vllm"; the input processor hands those
    fields to SamplingParams.update_from_generation_config, which adds the EOS ids to stop_token_ids). Here too, in
    all three entry points, with the id as stop_reason; "vllm" is accepted as "none" (it was refused)."""
    own_eos = ModelConfig.from_hf_dir(tiny).eos_token_ids[0]
    path = with_generation_config(tiny, tmp_path / "m", {"do_sample": True, "temperature": 1.0, "top_k": 1,
                                                          "eos_token_id": [own_eos, EXTRA_EOS]})
    llm = LLM(path, device="cpu", max_model_len=64, generation_config=mode)
    assert llm.tokenizer.eos_token_id == own_eos != EXTRA_EOS
    assert (llm.get_default_sampling_params().top_k == 1) == (mode == "auto")
    params = SamplingParams(temperature=0, max_tokens=4, logit_bias={EXTRA_EOS: 100})
    got = _three_ways(llm, params)
    assert got == dict.fromkeys(got, ([EXTRA_EOS], "stop", EXTRA_EOS)), got
    # without the id in generation_config.json the same forced request runs to max_tokens
    plain = LLM(tiny, device="cpu", max_model_len=64, generation_config=mode)
    out = plain.generate(["hi"], params, use_tqdm=False)[0].outputs[0]
    assert (out.token_ids, out.finish_reason) == ([EXTRA_EOS] * 4, "length")


def test_generation_config_values(tiny):
    """The CLI takes vLLM's `--generation-config vllm` on generate, chat and serve (argparse refused it); a value
    LLM cannot take is one sentence naming the three it can."""
    for cmd in (["generate", "--prompt", "x"], ["chat"], ["serve"]):
        assert cli.build_parser().parse_args([*cmd, "--generation-config", "vllm"]).generation_config == "vllm"
    for bad in ("bogus", None, "/some/folder"):
        with pytest.raises(ValueError, match=r"^generation_config must be 'auto', 'none' or 'vllm' .*not supported$"):
            LLM(tiny, device="cpu", max_model_len=64, generation_config=bad)
