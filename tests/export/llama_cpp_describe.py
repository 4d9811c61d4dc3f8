"""llama.cpp answers about an image or an audio clip: the text GGUF + the projector GGUF through
llama-cpp-python's mtmd API (tests/export/test_mmproj.py runs it with the Python that has llama_cpp
installed: GEMMATUNE_LLAMA_CPP_PYTHON).

    python tests/export/llama_cpp_describe.py model.gguf mmproj.gguf image.png|clip.wav

What llama-mtmd-cli does, step by step: load both files, put the medium where mtmd's marker stands in a
Gemma 4 user turn, let mtmd tokenize it (text chunks + the medium's soft tokens), evaluate the chunks (the
medium through the projector: llama.cpp's Gemma 4 vision or audio tower), then decode greedily. Prints
JSON with the medium's token count, the generated tokens and their text.
"""
import ctypes
import json
import sys

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd
from llama_cpp import Llama

MAX_NEW_TOKENS = 8

model_path, mmproj_path, media_path = sys.argv[1:4]
llm = Llama(model_path=model_path, n_ctx=1024, n_batch=512, n_threads=1, verbose=False)
params = mtmd.mtmd_context_params_default()
params.use_gpu = False
params.n_threads = 1
ctx = mtmd.mtmd_init_from_file(mmproj_path.encode(), llm.model, params)
assert ctx is not None, "llama.cpp could not load the projector"
assert mtmd.mtmd_support_vision(ctx) and mtmd.mtmd_support_audio(ctx), "the projector lacks a tower"

bitmap = mtmd.mtmd_helper_bitmap_init_from_file(ctx, media_path.encode(), False)  # decoded, not a placeholder
assert bitmap is not None, "llama.cpp could not read the file"
is_audio = bool(mtmd.mtmd_bitmap_is_audio(bitmap))
marker = mtmd.mtmd_default_marker().decode()
prompt = f"<|turn>user\n{marker}Describe or transcribe this.<turn|>\n<|turn>model\n".encode()
text = mtmd.mtmd_input_text()
text.text, text.text_len, text.add_special, text.parse_special = prompt, len(prompt), True, True
chunks = mtmd.mtmd_input_chunks_init()
bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
assert mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 1) == 0, "mtmd could not tokenize the prompt"

media_tokens, n_past = 0, 0
for i in range(mtmd.mtmd_input_chunks_size(chunks)):
    chunk = mtmd.mtmd_input_chunks_get(chunks, i)
    if mtmd.mtmd_input_chunk_get_type(chunk) != mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
        media_tokens += mtmd.mtmd_input_chunk_get_n_tokens(chunk)
new_n_past = llama_cpp.llama_pos(0)
assert mtmd.mtmd_helper_eval_chunks(ctx, llm._ctx.ctx, chunks, 0, 0, llm.n_batch, True,
                                    ctypes.byref(new_n_past)) == 0, "llama.cpp could not evaluate the prompt"
n_past = new_n_past.value
logits = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
generated = []
vocab = llm.n_vocab()
for _ in range(MAX_NEW_TOKENS):
    token = max(range(vocab), key=lambda t: logits[t])
    generated.append(token)
    batch = llama_cpp.llama_batch_get_one((llama_cpp.llama_token * 1)(token), 1)
    assert llama_cpp.llama_decode(llm._ctx.ctx, batch) == 0, "llama.cpp could not decode"
    n_past += 1
    logits = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
mtmd.mtmd_input_chunks_free(chunks)
mtmd.mtmd_bitmap_free(bitmap)
mtmd.mtmd_free(ctx)
print(json.dumps({"audio": is_audio, "media_tokens": media_tokens, "n_past": n_past, "generated_tokens": len(generated),
                  "text": llm.detokenize(generated).decode("utf-8", errors="replace")}))
