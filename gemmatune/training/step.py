"""One training micro-step (forward, fused loss, backward), replayed as a CUDA graph.

Why: at batch 1 x 2048 tokens a Gemma 4 E2B step issues about 17,000 kernels (35 layers,
7 LoRA projections each, norms, RoPE, recompute for checkpointing). Issuing them from
Python takes several times longer than the GPU needs to run them (benchmarks/profile_step.py).
A CUDA graph records the kernels once and
replays them with one launch, so the step runs at the GPU's speed.

How it works, per batch shape: the first micro-batch of a shape runs eagerly (it also
warms up Triton, cuBLAS and the workspaces); the second one is captured into a graph and
then replayed; every later one only copies its tokens into the graph's input buffers and
replays. Graphs of different shapes share one memory pool.

What stays outside the graph: the per-layer-embedding gather on the CPU (written into a
pinned buffer the graph copies from), the optimizer step and gradient clipping. LoRA
gradients accumulate in place into the `.grad` tensors seen at capture; zero them with
`zero_grad(set_to_none=False)` (a replay re-attaches them if they were set to None).

Images and audio: the towers run eagerly in front of the graph (gemmatune.model.towers: soft
tokens from pixels and mel features vary in count and need host syncs), and the graph,
keyed by the token shape, holds the language model run on the input embeddings they give
(gemmatune.training.loss.language_model_loss): the embeddings are copied into the graph's input
buffer before each replay. That needs the towers frozen (their output a leaf); with tower
adapters the whole step runs eagerly.

Packed micro-batches (gemmatune.data.packing, train's default) have one shape for the whole run,
so one capture: their position_ids, document_ids and cu_seq_lens are more input buffers of the
graph, copied in before each replay like the tokens (the masks built from them are in the graph).

When a step is not graphed (it runs eagerly, with the same result): no CUDA, the model
not in training mode, LoRA dropout (its random masks would be frozen into the graph),
the plain-PyTorch loss (fused=False), images/audio with a trained tower, or a left-padded
batch. A right-padded batch needs no attention mask, eager or graphed (see
gemmatune.training.loss.without_needless_mask), so the graph has no mask input.
"""
import torch
from torch import nn

from gemmatune.kernels import lora_nf4_linear
from gemmatune.model import towers
from gemmatune.model.activation_checkpointing import OffloadedCheckpoint
from gemmatune.model.ple import HostEmbedding
from gemmatune.training.loss import (
    PACKING_KEYS,
    causal_lm_loss,
    is_packed,
    is_right_padded,
    language_model_loss,
    unwrap,
    without_needless_mask,
)

MAX_GRAPHS = 8  # batch shapes kept; later new shapes run eagerly
TEXT_KEYS = {"input_ids", "labels", "attention_mask", *PACKING_KEYS}
MEDIA_KEYS = TEXT_KEYS | {"pixel_values", "image_position_ids", "input_features", "input_features_mask",
                          "mm_token_type_ids"}


def why_not_graphed(model: nn.Module, fused: bool) -> str | None:
    """The reason this model's steps cannot be graphed at all, or None."""
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    if not fused:
        return "the plain-PyTorch loss (fused_loss=False) is not graphed"
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable or not all(p.is_cuda for p in trainable):
        return "the trainable parameters are not on the GPU"
    dropout = [m for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0]
    if dropout:
        return f"{len(dropout)} dropout modules with p > 0 (their masks would be frozen into the graph)"
    return None


class _Graph:
    """One captured micro-step and the buffers it reads and writes."""

    def __init__(self, input_ids, labels, normalizer, staged, keep_alive, packing=None):
        self.graph = torch.cuda.CUDAGraph()
        self.input_ids, self.labels, self.normalizer = input_ids, labels, normalizer
        self.packing = packing or {}  # packed batches: position_ids, document_ids, cu_seq_lens buffers
        self.inputs_embeds = None     # image/audio graphs: the embeddings buffer the towers' output goes into
        self.staged = staged          # HostEmbedding -> pinned rows buffer the graph copies from
        self.keep_alive = keep_alive  # host/device buffers whose addresses the graph recorded
        self.loss = None
        self.grads: list[tuple[torch.nn.Parameter, torch.Tensor]] = []  # (param, the .grad it adds into)

    def reattach_grads(self) -> None:
        """Point every .grad back at the tensor the graph adds into. Someone may have set the
        grads to None (zero_grad's default) or replaced them: the graph would then add into
        tensors nobody reads. None restarts from zero; a replaced grad's values are kept."""
        for param, captured in self.grads:
            if param.grad is not captured:
                captured.zero_() if param.grad is None else captured.copy_(param.grad)
                param.grad = captured


class MicroStep:
    """`step(batch, normalizer)`: loss of one micro-batch, gradients accumulated into .grad.

    `batch` holds CPU tensors from gemmatune.data.batches.collate; `normalizer` is the label-token
    count of the whole optimizer step (see loss.py). Returns the detached loss on the device.
    """

    def __init__(self, model: nn.Module, fused: bool = True, cuda_graphs: bool = True):
        self.model = model
        self.fused = fused
        self.device = next(p for p in model.parameters() if p.requires_grad).device
        self.disabled_because = why_not_graphed(model, fused) if cuda_graphs else "cuda_graphs=False"
        self.inner = towers.multimodal_model(model)  # the Gemma4Model of an image/audio model, else None
        self.towers_trained = self.inner is not None and any(
            towers.is_trained(getattr(self.inner, name, None)) for names in towers.TOWERS.values() for name in names)
        self.graphs: dict[tuple, _Graph] = {}
        self.seen: set[tuple] = set()
        self.pool = None
        self.replay_done = None

    # -- eager -------------------------------------------------------------------------
    def eager(self, batch: dict, normalizer) -> torch.Tensor:
        batch = without_needless_mask(batch)  # checked on the CPU copy: no wait for the GPU
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        loss = causal_lm_loss(self.model, batch, normalizer=normalizer, fused=self.fused)
        loss.backward()
        return loss.detach()

    def __call__(self, batch: dict, normalizer) -> torch.Tensor:
        key = self._graph_key(batch)
        if key is None:
            return self.eager(batch, normalizer)
        if key in self.graphs:
            return self._replay(self.graphs[key], batch, normalizer)
        if key not in self.seen or len(self.graphs) >= MAX_GRAPHS:
            self.seen.add(key)
            return self.eager(batch, normalizer)  # first sight of a shape: warm-up, no capture
        try:
            self.graphs[key] = self._capture(batch)
        except Exception as error:  # never lose a training run to a capture problem: go eager
            self.disabled_because = f"capture failed ({type(error).__name__}: {str(error)[:200]})"
            print(f"gemmatune: CUDA graphs off, {self.disabled_because}; continuing without them")
            torch.cuda.synchronize()
            return self.eager(batch, normalizer)
        return self._replay(self.graphs[key], batch, normalizer)

    def _graph_key(self, batch: dict) -> tuple | None:
        if self.disabled_because or not self.model.training:
            return None
        if not is_right_padded(batch.get("attention_mask")):
            return None
        packed = ("packed", len(batch["cu_seq_lens"])) if is_packed(batch) else ()
        if towers.has_media(batch):
            if self.inner is None or self.towers_trained or set(batch) - MEDIA_KEYS:
                return None  # a trained tower's backward runs after the graph's: eager
            return ("embeds", *batch["input_ids"].shape, *packed)
        if set(batch) - TEXT_KEYS:
            return None
        return ("ids", *batch["input_ids"].shape, *packed)

    # -- graphs ------------------------------------------------------------------------
    def _capture(self, batch: dict) -> _Graph:
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:  # accumulate in place into .grad tensors that stay put
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grad_ptrs = [p.grad.data_ptr() for p in params]
        host_embeddings = [m for m in self.model.modules() if isinstance(m, HostEmbedding)]
        media = towers.has_media(batch)
        ids = self._text_ids(batch) if media else batch["input_ids"]
        staged = {m: m.gather(ids) for m in host_embeddings}
        g = _Graph(
            input_ids=ids.to(self.device), labels=batch["labels"].to(self.device),
            normalizer=torch.zeros((), dtype=torch.float32, device=self.device), staged=staged,
            keep_alive=[], packing={k: batch[k].to(self.device) for k in PACKING_KEYS if is_packed(batch)},
        )
        if media:
            g.inputs_embeds = self._media_embeddings(batch)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        torch.cuda.synchronize()
        for m, rows in staged.items():
            m.staged = rows
        try:
            with torch.cuda.graph(g.graph, pool=self.pool):
                if media:
                    loss = language_model_loss(unwrap(self.model), g.inputs_embeds, g.input_ids, g.labels,
                                               normalizer=g.normalizer, fused=True, batch=g.packing)
                else:
                    loss = causal_lm_loss(self.model, {"input_ids": g.input_ids, "labels": g.labels, **g.packing},
                                          normalizer=g.normalizer, fused=True)
                loss.backward()
        finally:
            for m in host_embeddings:
                m.staged = None
        if [p.grad.data_ptr() for p in params] != grad_ptrs:
            raise RuntimeError("the captured backward replaced .grad tensors instead of accumulating into them")
        g.loss = loss.detach()
        g.grads = [(p, p.grad) for p in params]
        g.keep_alive = [f.buffer for f in _checkpoint_functions(self.model)]
        g.keep_alive += lora_nf4_linear.workspace_buffers()
        return g

    def _text_ids(self, batch: dict) -> torch.Tensor:
        """The batch's ids with image/audio placeholders as the pad id (CPU)."""
        return towers.text_token_ids(batch["input_ids"], self.inner.config)

    def _media_embeddings(self, batch: dict) -> torch.Tensor:
        """The towers, eagerly and without gradients (they are frozen), on the GPU copy of the batch."""
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            return towers.embed_inputs(self.inner, inputs)

    def _replay(self, g: _Graph, batch: dict, normalizer) -> torch.Tensor:
        ids = batch["input_ids"]
        if g.inputs_embeds is not None:
            g.inputs_embeds.copy_(self._media_embeddings(batch))  # queued after the last replay: stream order
            ids = self._text_ids(batch)
        if self.replay_done is not None:
            self.replay_done.synchronize()  # the last replay has read the pinned rows buffers
        for m, rows in g.staged.items():
            m.gather(ids, out=rows)
        g.input_ids.copy_(ids, non_blocking=True)
        g.labels.copy_(batch["labels"], non_blocking=True)
        for key, buffer in g.packing.items():
            buffer.copy_(batch[key], non_blocking=True)
        g.normalizer.fill_(float(normalizer))
        g.reattach_grads()
        g.graph.replay()
        self.replay_done = torch.cuda.Event()
        self.replay_done.record()
        return g.loss.clone()

    def describe(self) -> str:
        if self.disabled_because:
            return f"CUDA graphs: off ({self.disabled_because})"
        return f"CUDA graphs: on ({len(self.graphs)} captured batch shapes)"


def _checkpoint_functions(model: nn.Module) -> list[OffloadedCheckpoint]:
    return [f for m in model.modules()
            if isinstance(f := getattr(m, "_gradient_checkpointing_func", None), OffloadedCheckpoint)
            and f.buffer is not None]
