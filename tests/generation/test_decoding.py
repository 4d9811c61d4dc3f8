"""gemmatune's decode loop against transformers' model.generate, token for token (fp32, CPU).

The tiny model's tied LM head makes a random model repeat its last token forever, which would
let a wrong position, mask or cache pass; `varied_model` gives it its own random LM head so each
step's token depends on the whole context. Stop tokens are taken from the stock output itself,
so the compared runs really stop (one row early, one late, one never) and pad after the stop.
Most tests run with the kernels off (fast); `test_kernels_and_4bit_lora` runs the Triton kernels
in the interpreter inside the loop (NF4 + LoRA, the per-layer-embedding row gather).
"""
import contextlib
import dataclasses
import io

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gemmatune
import gemmatune.generation.decoding as generation_decoding
import gemmatune.model.patching as model_patching
from gemmatune.generation.decoding import generate
from gemmatune.generation.replies import left_padded, stop_token_ids
from gemmatune.kernels import nf4_gemv
from tests.helpers import load_tiny

LENGTHS = (5, 23, 40)  # one prompt shorter than the sliding window (16), two longer


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    monkeypatch.setenv("GEMMATUNE_KERNELS", "0")


def varied_model(lora=False, load_in_4bit=False, use_kernels=False, seed=0, **kwargs):
    model, tokenizer = load_tiny(load_in_4bit=load_in_4bit, use_kernels=use_kernels, **kwargs)
    g = torch.Generator().manual_seed(seed)
    head = model.lm_head.weight
    model.lm_head.weight = torch.nn.Parameter(torch.randn(head.shape, generator=g).to(head.device, head.dtype))
    if lora:
        model = gemmatune.add_lora(model, r=8)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=g) * 0.3)  # copy_ moves it to param's device
    return model, tokenizer


def prompts(lengths=LENGTHS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(20, 500, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def stock(model, input_ids, attention_mask, max_new_tokens, stops, **model_inputs):
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                         eos_token_id=stops, pad_token_id=0, do_sample=False, use_cache=True, **model_inputs)
    return out[:, input_ids.shape[1]:]


def stops_from(model, tokenizer, input_ids, attention_mask, max_new_tokens, **model_inputs):
    """<turn|>, <eos>, and a token the stock run emits early in row 0 but never in the other rows,
    so that row 0 stops there and the others run on."""
    base = stop_token_ids(tokenizer)
    first = stock(model, input_ids, attention_mask, max_new_tokens, base, **model_inputs)
    for i in range(2, min(8, first.shape[1])):
        token = first[0, i]
        if not (first[1:] == token).any() and not (first[0, :i] == token).any():
            return base + [int(token)]
    raise AssertionError(f"no token to stop row 0 early in {first}")


def assert_same_as_stock(model, tokenizer, rows, max_new_tokens=30, **model_inputs):
    input_ids, attention_mask = left_padded(rows, 0)
    stops = stops_from(model, tokenizer, input_ids, attention_mask, max_new_tokens, **model_inputs)
    expected = stock(model, input_ids, attention_mask, max_new_tokens, stops, **model_inputs)
    got = generate(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, stop_token_ids=stops,
                   pad_token_id=0, **model_inputs)
    assert torch.equal(got, expected), f"\n{got}\n{expected}"
    stopped_at = int(torch.isin(expected[0], torch.tensor(stops)).nonzero()[0])
    assert stopped_at < 8  # row 0 stopped early...
    if len(rows) > 1:  # ...and got pads while another row ran on
        assert expected.shape[1] > stopped_at + 1 and (expected[0, stopped_at + 1:] == 0).all()
    return got


def test_one_prompt_at_a_time_equals_stock_generate():
    model, tokenizer = varied_model()
    for row in prompts():
        assert_same_as_stock(model, tokenizer, [row])


def test_left_padded_batch_equals_stock_generate():
    model, tokenizer = varied_model()
    got = assert_same_as_stock(model, tokenizer, prompts(), max_new_tokens=40)
    assert got.shape[1] == 40  # the other rows ran to max_new_tokens


def test_with_lora_adapters_active_and_unmerged():
    model, tokenizer = varied_model(lora=True)
    assert_same_as_stock(model, tokenizer, prompts())
    assert_same_as_stock(model, tokenizer, prompts()[2:])
    plain = varied_model()[0]  # the adapters really change the output
    ids, mask = left_padded(prompts()[2:], 0)
    assert not torch.equal(generate(model, ids, mask, max_new_tokens=10), generate(plain, ids, mask, max_new_tokens=10))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_with_lora_equals_stock_generate(dtype):
    """fp16 (a T4's dtype) and bf16 on the CPU, with the same kernels in both loops."""
    model, tokenizer = varied_model(lora=True, dtype=dtype)
    assert generation_decoding.ModelParts.of(model).dtype == getattr(torch, dtype)
    assert_same_as_stock(model, tokenizer, prompts())
    assert_same_as_stock(model, tokenizer, prompts()[1:2])


def test_after_load_adapter(tmp_path):
    model, tokenizer = varied_model(lora=True)
    saved = gemmatune.save_adapter(model, tokenizer, tmp_path / "adapter")
    base, _ = varied_model()
    reloaded = gemmatune.load_adapter(base, saved)
    ids, mask = left_padded(prompts(), 0)
    assert torch.equal(generate(reloaded, ids, mask, max_new_tokens=25), generate(model, ids, mask, max_new_tokens=25))
    assert_same_as_stock(reloaded, tokenizer, prompts())


def test_kernels_and_4bit_lora(monkeypatch):
    """Triton kernels on (the interpreter, slow: few tokens): NF4 + LoRA layers through the NF4
    GEMV with the adapters' decode copies, the fused norm + RoPE attention on the static cache, and
    the PLE rows gathered by the row-gather kernel inside each decode step. The stock generate runs
    the same patched model (its steps take the GEMV too; kernels/test_nf4_gemv.py checks it), and
    the decode steps' attention through kernels/decode_attention.py. A batch of two: the GEMV is
    allowed two rows here (it takes any number; MAX_ROWS = 1 on a GPU is a speed choice)."""
    monkeypatch.setenv("GEMMATUNE_KERNELS", "1")
    monkeypatch.setattr(nf4_gemv, "MAX_ROWS", 2)
    model, tokenizer = varied_model(lora=True, load_in_4bit=True, use_kernels=True)
    assert "KernelLoRALinear4bit" in {type(m).__name__ for m in model.modules()}
    parts = generation_decoding.ModelParts.of(model)
    assert generation_decoding.DecodeState(parts, 2, 256).ple_out is not None  # rows through the kernel
    calls = {"gemv": 0, "static attention": 0, "decode attention": 0}
    count(monkeypatch, model_patching, "nf4_gemv", calls, "gemv")
    count(monkeypatch, model_patching, "static_cache_attention", calls, "static attention")
    count(monkeypatch, model_patching, "decode_attention_forward", calls, "decode attention")
    input_ids, attention_mask = left_padded(prompts((9, 20)), 0)
    stops = stop_token_ids(tokenizer)
    got = generate(model, input_ids, attention_mask, max_new_tokens=4, stop_token_ids=stops)
    assert calls["gemv"] > 0 and calls["static attention"] > 0 and calls["decode attention"] > 0
    assert torch.equal(got, stock(model, input_ids, attention_mask, 4, stops))


def test_kernels_after_load_adapter_take_the_fast_path(monkeypatch, tmp_path):
    """A 4-bit model with a saved adapter loaded back (load_adapter) decodes through the same
    NF4 GEMV and decode attention as the model that was trained (chat's speed holds after a
    reload), with the same tokens. One prompt: the GEMV's own MAX_ROWS."""
    monkeypatch.setenv("GEMMATUNE_KERNELS", "1")
    model, tokenizer = varied_model(lora=True, load_in_4bit=True, use_kernels=True)
    saved = gemmatune.save_adapter(model, tokenizer, tmp_path / "adapter")
    base, _ = load_tiny(load_in_4bit=True, use_kernels=True)
    base.lm_head.weight = model.lm_head.weight  # varied_model's head (not part of the adapter)
    reloaded = gemmatune.load_adapter(base, saved)
    classes = [type(m).__name__ for m in reloaded.modules() if hasattr(m, "lora_A")]
    assert classes and set(classes) == {"KernelLoRALinear4bit"}  # the LoRA update inside the GEMV, not peft's
    calls = {"gemv": 0, "decode attention": 0}
    count(monkeypatch, model_patching, "nf4_gemv", calls, "gemv")
    count(monkeypatch, model_patching, "decode_attention_forward", calls, "decode attention")
    input_ids, attention_mask = left_padded(prompts((11,)), 0)
    got = generate(reloaded, input_ids, attention_mask, max_new_tokens=4)
    assert calls["gemv"] > 0 and calls["decode attention"] > 0
    assert torch.equal(got, generate(model, input_ids, attention_mask, max_new_tokens=4))


def count(monkeypatch, module, name, calls, key):
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls[key] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)


def test_images_and_audio_in_the_prompt():
    model, tokenizer = varied_model(modalities=("text", "image", "audio"))
    ids = {name: tokenizer.convert_tokens_to_ids(name)
           for name in ("<|image>", "<|image|>", "<image|>", "<|audio>", "<|audio|>", "<audio|>")}
    g = torch.Generator().manual_seed(3)
    image = dict(pixel_values=torch.randn(1, 36, 16 * 16 * 3, generator=g),  # 6 x 6 patches: 4 soft tokens
                 image_position_ids=torch.stack(torch.meshgrid(torch.arange(6), torch.arange(6), indexing="xy"),
                                                -1).reshape(1, 36, 2))
    with_image = [2, 5, 40, 41, ids["<|image>"]] + [ids["<|image|>"]] * 4 + [ids["<image|>"], 50, 51, 52]
    assert_same_as_stock(model, tokenizer, [with_image, prompts((18,))[0]], **image)
    audio = dict(input_features=torch.randn(1, 40, 32, generator=g),  # 40 frames: 10 audio tokens
                 input_features_mask=torch.ones(1, 40, dtype=torch.bool))
    with_audio = [2, 5, 40, ids["<|audio>"]] + [ids["<|audio|>"]] * 10 + [ids["<audio|>"], 50]
    assert_same_as_stock(model, tokenizer, [with_audio], **audio)


def test_streamed_text_equals_the_stock_streamers():
    from transformers import TextStreamer

    model, tokenizer = varied_model()
    input_ids = torch.tensor([prompts()[1]])
    printed = []
    for run in ("stock", "gemmatune"):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
            if run == "stock":
                model.generate(input_ids=input_ids, max_new_tokens=30, eos_token_id=stop_token_ids(tokenizer),
                               pad_token_id=0, do_sample=False, streamer=streamer)
            else:
                generate(model, input_ids, max_new_tokens=30, stop_token_ids=stop_token_ids(tokenizer),
                         streamer=streamer)
        printed.append(out.getvalue())
    assert printed[0] == printed[1] and len(printed[0].strip()) > 10


def test_chat_streams_what_it_returns_and_stops_at_turn_end():
    model, tokenizer = varied_model()
    turn_end = tokenizer.convert_tokens_to_ids("<turn|>")
    calls = []

    def end_the_turn_at_the_fourth_token(module, inputs, logits):
        calls.append(logits.shape[1])
        if len(calls) == 4:
            logits = logits.clone()
            logits[:, -1, turn_end] += 1e4
        return logits

    hook = model.get_output_embeddings().register_forward_hook(end_the_turn_at_the_fourth_token)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        reply = gemmatune.chat(model, tokenizer, "Say something.", max_new_tokens=50)
    hook.remove()
    assert len(calls) == 4  # stopped at <turn|>, long before max_new_tokens
    assert calls == [1, 1, 1, 1]  # the prompt's logits: only its last position
    assert reply and out.getvalue().split() == reply.split()


def test_generate_replies_equals_one_chat_per_prompt():
    model, tokenizer = varied_model()
    questions = ["Convert 5 km to miles.", "Hi", [{"role": "user", "content": "Name three colours of the sky."}],
                 "What is the capital of France, and why is it there?"]
    replies = gemmatune.generate_replies(model, tokenizer, questions, max_new_tokens=20, batch_size=3)
    assert replies == [gemmatune.chat(model, tokenizer, q, max_new_tokens=20, stream=False) for q in questions]


def test_static_cache_is_sized_from_the_request_not_the_model_maximum():
    model, tokenizer = varied_model()
    ids, mask = left_padded(prompts(), 0)
    generate(model, ids, mask, max_new_tokens=300)
    decoder = generation_decoding._DECODERS[generation_decoding.ModelParts.of(model).text_model]
    (state,) = decoder.states.values()
    assert state.length == 512  # 40 + 300 rounded up to LENGTH_BUCKET, not max_position_embeddings (4096)
    assert model.config.get_text_config().max_position_embeddings > state.length
    assert {k.shape[2] for k in state.cache.keys.values()} == {512}


def test_decoders_are_reused_and_replaced_when_the_model_changes():
    model, tokenizer = varied_model()
    ids, mask = left_padded(prompts(), 0)
    first = generate(model, ids, mask, max_new_tokens=12)
    text = generation_decoding.ModelParts.of(model).text_model
    decoder = generation_decoding._DECODERS[text]
    assert torch.equal(generate(model, ids, mask, max_new_tokens=12), first)  # buffers reused: same result
    assert generation_decoding._DECODERS[text] is decoder
    model = gemmatune.add_lora(model, r=4)
    generate(model, ids, mask, max_new_tokens=12)
    assert generation_decoding._DECODERS[text] is not decoder  # new modules: a new decoder, the old one dropped
    assert generation_decoding.describe(model) == "CUDA graphs: off (not on a CUDA GPU)"
    generation_decoding.release_decoders(model)
    assert text not in generation_decoding._DECODERS


def test_sampling_is_repeatable_and_top_k_1_is_greedy():
    model, tokenizer = varied_model()
    ids, mask = left_padded(prompts(), 0)
    greedy = generate(model, ids, mask, max_new_tokens=15)
    sampled = [generate(model, ids, mask, max_new_tokens=15, temperature=1.0, top_p=0.9, top_k=50, seed=s)
               for s in (0, 0, 1)]
    assert torch.equal(sampled[0], sampled[1]) and not torch.equal(sampled[0], sampled[2])
    assert not torch.equal(sampled[0], greedy)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=15, temperature=0.7, top_k=1, seed=5), greedy)


def test_choose_tokens_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    nucleus = generation_decoding.Sampling(1.0, 0, 0.7)
    seen = {int(generation_decoding.choose_tokens(logits, nucleus)) for _ in range(200)}
    assert seen == {0, 1}  # 0.5 < 0.7, so the second token is in; 0.8 >= 0.7, so the third is out
    top_3 = generation_decoding.Sampling(1.0, 3, 1.0)
    seen = {int(generation_decoding.choose_tokens(logits, top_3)) for _ in range(300)}
    assert seen == {0, 1, 2}


def test_right_padding_is_refused_with_what_to_do():
    model, _ = varied_model()
    ids = torch.tensor([[5, 6, 7], [5, 6, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, ids, torch.tensor([[1, 1, 1], [1, 1, 0]]), max_new_tokens=3)


def test_streaming_a_batch_is_refused():
    model, tokenizer = varied_model()
    ids, mask = left_padded(prompts(), 0)
    with pytest.raises(ValueError, match="one prompt"):
        generate(model, ids, mask, max_new_tokens=3, streamer=object())


def test_a_model_without_the_fast_path_uses_the_stock_generate(monkeypatch):
    model, tokenizer = varied_model()
    parts = generation_decoding.ModelParts.of(model)
    flash = dataclasses.replace(parts, attn_implementation="flash_attention_2")
    assert "flash_attention_2" in generation_decoding.why_not_fast(flash, {})
    calls = []
    monkeypatch.setattr(generation_decoding, "why_not_fast", lambda parts, inputs: "a test")
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append(kw) or stock_generate(**kw))
    stock_generate = type(model).generate.__get__(model)
    ids, mask = left_padded(prompts(), 0)
    got = generate(model, ids, mask, max_new_tokens=12, stop_token_ids=[1, 6])
    assert len(calls) == 1 and torch.equal(got, stock(model, ids, mask, 12, [1, 6]))


class ReplayedOps(TorchDispatchMode):
    """Records the ATen ops a step runs, so they can be run again on the same tensors."""

    SYNCS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
             torch.ops.aten.nonzero.default}

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.SYNCS:  # the host would read the GPU: a CUDA graph could not replay this
            raise RuntimeError(f"the step reads a value on the host ({func})")
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


class FakeGraph:
    """A CUDA graph's semantics on a CPU: the Python code of the step runs once (here, while the
    ops are recorded, which also runs the step: the replay() right after the capture is skipped,
    as a real capture runs nothing); every replay runs the same ops on the same tensors, writing
    each new result into the tensor the recording returned. Any step state kept in Python, or a
    value baked in at capture that should change (a prompt length, a position), shows up as
    tokens that differ from the stock generate."""

    def __init__(self, step):
        self.recorded = ReplayedOps()
        with self.recorded:
            step()
        self.ran_at_capture = True

    def replay(self):
        if self.ran_at_capture:
            self.ran_at_capture = False
            return
        for func, args, kwargs, out in self.recorded.ops:
            new = func(*args, **kwargs)
            aliases = [r.alias_info is not None for r in func._schema.returns]
            outs, news = (out, new) if isinstance(out, (tuple, list)) else ((out,), (new,))
            for o, n, alias in zip(outs, news, aliases):
                if torch.is_tensor(o) and not alias:  # views and in-place ops already wrote their tensors
                    o.copy_(n)


def test_decode_steps_replay_like_a_cuda_graph(monkeypatch):
    """The graph path on a CPU with FakeGraph: captured once, replayed for every later step of
    this call and of a later call with other prompts (same batch size and length bucket)."""
    model, tokenizer = varied_model(lora=True)
    captures = []
    monkeypatch.setattr(generation_decoding, "why_not_graphed", lambda parts: None)
    monkeypatch.setattr(generation_decoding, "capture", lambda step: captures.append(FakeGraph(step)) or captures[-1])
    monkeypatch.setattr(generation_decoding.Decoder, "warm_up", lambda self, parts, state, sampling:
                        generation_decoding.decode_step(parts, state, sampling))
    assert_same_as_stock(model, tokenizer, prompts(), max_new_tokens=30)
    assert len(captures) == 1 and len(captures[0].recorded.ops) > 100
    assert_same_as_stock(model, tokenizer, prompts((30, 7, 12), seed=4), max_new_tokens=30)  # replays the same graph
    assert len(captures) == 1
    sampled = [generate(model, *left_padded(prompts(), 0), max_new_tokens=12, temperature=1.0, top_k=20, seed=s)
               for s in (2, 2)]
    assert torch.equal(*sampled) and len(captures) == 2  # sampling: its own graph, and repeatable


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_gpu_graphed_decode_equals_eager_decode_and_stock(monkeypatch, dtype):
    """On CUDA: the decode steps replayed as a CUDA graph give the eager steps' tokens, a second
    call replays the kept graph, and in fp32 both equal the stock generate (in bf16/fp16 the fused
    norm + RoPE rounds differently from transformers' code, so only graph == eager is exact)."""
    monkeypatch.setenv("GEMMATUNE_KERNELS", "1")
    model, tokenizer = varied_model(lora=True, load_in_4bit=True, use_kernels=True, dtype=dtype)
    parts = generation_decoding.ModelParts.of(model)
    assert parts.device.type == "cuda" and generation_decoding.why_not_graphed(parts) is None
    input_ids, attention_mask = left_padded(prompts(), 0)
    stops = stop_token_ids(tokenizer)
    eager = generate(model, input_ids, attention_mask, max_new_tokens=40, stop_token_ids=stops, cuda_graphs=False)
    graphed = generate(model, input_ids, attention_mask, max_new_tokens=40, stop_token_ids=stops)
    (state,) = generation_decoding._DECODERS[parts.text_model].states.values()
    assert state.graph is not None
    again = generate(model, input_ids, attention_mask, max_new_tokens=40, stop_token_ids=stops)
    assert torch.equal(graphed, eager) and torch.equal(again, eager)
    if dtype == "float32":
        assert torch.equal(graphed, stock(model, input_ids.cuda(), attention_mask.cuda(), 40, stops).cpu())
    one = generate(model, input_ids[2:], attention_mask[2:], max_new_tokens=30, stop_token_ids=stops)
    assert torch.equal(one, generate(model, input_ids[2:], attention_mask[2:], max_new_tokens=30,
                                     stop_token_ids=stops, cuda_graphs=False))
    sampled = [generate(model, input_ids, attention_mask, max_new_tokens=20, temperature=1.0, top_k=50, seed=s)
               for s in (3, 3, 4)]
    assert torch.equal(sampled[0], sampled[1]) and not torch.equal(sampled[0], sampled[2])
