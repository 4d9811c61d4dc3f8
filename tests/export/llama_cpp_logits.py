"""llama.cpp's logits for token ids, through llama-cpp-python (tests/export/test_gguf.py runs it with the
Python that has llama_cpp installed: GEMMATUNE_LLAMA_CPP_PYTHON).

    python tests/export/llama_cpp_logits.py model.gguf ids.json out.npy [text]

With a text, also prints llama.cpp's tokenization of it (no BOS added, special tokens parsed) as JSON.
The KV cache is float32 so that only llama.cpp's own arithmetic differs from transformers'.
"""
import json
import sys

import numpy as np
from llama_cpp import Llama

GGML_TYPE_F32 = 0

llm = Llama(model_path=sys.argv[1], n_ctx=256, n_batch=256, logits_all=True, verbose=False, n_threads=1,
            type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
ids = json.loads(open(sys.argv[2]).read())
llm.eval(ids)
np.save(sys.argv[3], np.array(llm.scores[: len(ids)], dtype=np.float32))
if len(sys.argv) > 4:
    print(json.dumps(llm.tokenize(sys.argv[4].encode(), add_bos=False, special=True)))
