# Source on the GPU machine (device tool): puts fla (the peer we measure against) and, when the image's
# transformers lacks Qwen3.5, transformers 5.x on PYTHONPATH from the wheels carried in .whl/ (gitignored). Fetch
# them once on the CPU machine and pass carry=[".whl"]:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl \
#       fla-core==0.6.0 flash-linear-attention==0.6.0 transformers==5.24.0 huggingface_hub==2.4.0
set -u
mkdir -p /tmp/fla /tmp/tf
pip install -q --no-index --no-deps --target /tmp/fla .whl/fla_core-*.whl .whl/flash_linear_attention-*.whl 2>/dev/null
export PYTHONPATH="$PWD:/tmp/fla"
if ! python3 -c "import transformers as t; t.Qwen3_5ForCausalLM" 2>/dev/null; then
  pip install -q --no-index --no-deps --target /tmp/tf .whl/transformers-*.whl .whl/huggingface_hub-*.whl 2>/dev/null
  export PYTHONPATH="$PYTHONPATH:/tmp/tf"
fi
python3 - <<'PY'
import importlib
for m in ("torch", "triton", "transformers", "tokenizers", "safetensors", "fla"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:
        print(m, "unavailable:", type(e).__name__, e)
import torch
print("cuda", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
PY
