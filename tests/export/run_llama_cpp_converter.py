"""Run llama.cpp's own convert_hf_to_gguf.py on a folder (tests/export/test_gguf.py, where a llama.cpp source
tree is at hand: GEMMATUNE_LLAMA_CPP_SRC).

    python tests/export/run_llama_cpp_converter.py LLAMA_CPP_DIR MODEL_DIR --outtype q8_0 --outfile out.gguf \
        [--gpt2-vocab]

It uses the llama.cpp tree's own gguf-py. With --gpt2-vocab (the tiny model's byte-level BPE): the
converter reads Gemma 4's tokenizer only, and names a byte-level BPE's pre-tokenizer by a hash of its
output on a fixed text, refusing one it does not know; it is told to write it as "gpt2" / "gpt-2".
"""
import sys
from pathlib import Path

llama_cpp = Path(sys.argv.pop(1))
sys.path.insert(0, str(llama_cpp))
sys.path.insert(1, str(llama_cpp / "gguf-py"))
import conversion.base as base  # noqa: E402
import conversion.gemma as gemma  # noqa: E402

if "--gpt2-vocab" in sys.argv:
    sys.argv.remove("--gpt2-vocab")
    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    gemma.Gemma4Model.set_vocab = base.TextModel._set_vocab_gpt2
import convert_hf_to_gguf  # noqa: E402

convert_hf_to_gguf.main()
