"""Gradient checkpointing that keeps each layer's saved input in CPU memory.

Plain checkpointing keeps one tensor per layer on the GPU: the layer's input, batch x seq
x hidden (6 MiB per layer at 2048 tokens on E2B, 35 layers; more with longer sequences).
Here the input is copied to pinned CPU memory asynchronously during the forward and
copied back when the backward recomputes the layer.

Why it stays correct with Gemma 4's KV sharing: this is PyTorch's *non-reentrant*
checkpoint. The forward builds the real autograd graph (the K/V that later layers reuse
keep their graph, so gradients reach the layer that produced them); only the values the
graph saved are dropped and recomputed. Reentrant checkpointing runs the forward under
no_grad, so reused K/V carry no graph and their producer's adapters get wrong gradients.
The first call uses the GPU input directly; only the recompute reads the CPU copy.
"""
import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.models.gemma4 import modeling_gemma4 as hf_gemma4

from gemmatune.model import towers


def checkpoint_in_place(function, *args):
    """transformers' default, non-reentrant (see module docstring for why not reentrant)."""
    return checkpoint(function, *args, use_reentrant=False, preserve_rng_state=_preserve_rng())


class OffloadedCheckpoint:
    """One layer's checkpoint function, its saved input in a pinned CPU buffer that it keeps.

    The buffer is reused from one micro-batch to the next (grown when a longer batch comes):
    pinning memory is slow, and a CUDA-graph capture needs its host buffers to stay put. The
    reuse is safe because every copy runs on one stream: micro-batch m+1's forward writes
    the buffer after micro-batch m's backward has read it.

    On a CPU-only machine the "offloaded" copy is just another CPU tensor: the same code
    path runs in CI, where the tests compare its gradients with the uncheckpointed run.
    """

    def __init__(self):
        self.buffer: torch.Tensor | None = None

    def host_copy_of(self, hidden_states: torch.Tensor) -> torch.Tensor:
        n = hidden_states.numel()
        if self.buffer is None or self.buffer.numel() < n or self.buffer.dtype != hidden_states.dtype:
            self.buffer = torch.empty(n, dtype=hidden_states.dtype, device="cpu", pin_memory=hidden_states.is_cuda)
        host = self.buffer[:n].view(hidden_states.shape)
        host.copy_(hidden_states.detach(), non_blocking=True)
        return host

    def __call__(self, function, hidden_states: torch.Tensor, *args):
        host = self.host_copy_of(hidden_states)
        device, needs_grad = hidden_states.device, hidden_states.requires_grad
        first_call = {"input": hidden_states}  # dropped after the forward: the GPU copy can be freed

        def run(*rest):
            gpu_input = first_call.pop("input", None)
            if gpu_input is None:  # the backward's recompute: bring the input back
                # requires_grad as in the forward, so the recompute saves the same tensors
                gpu_input = host.to(device, non_blocking=True).detach().requires_grad_(needs_grad)
            return function(gpu_input, *rest)

        return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=_preserve_rng())


def _preserve_rng() -> bool:
    """Saving the RNG state for the recompute is not allowed inside a CUDA-graph capture;
    graphed steps run without dropout (gemmatune.training.step checks), so nothing random is lost."""
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def set_layer_checkpointing(layers, mode: str) -> None:
    """Give transformers' GradientCheckpointingLayer modules our checkpoint function."""
    if mode not in ("off", "on", "offload"):
        raise ValueError(f"gradient_checkpointing={mode!r}: use 'offload', 'on' or 'off'")
    for layer in layers:
        layer.gradient_checkpointing = mode != "off"
        if mode == "on":
            layer._gradient_checkpointing_func = checkpoint_in_place
        elif mode == "offload" and not isinstance(getattr(layer, "_gradient_checkpointing_func", None),
                                                  OffloadedCheckpoint):
            layer._gradient_checkpointing_func = OffloadedCheckpoint()


class CheckpointedAudioLayer(hf_gemma4.Gemma4AudioLayer):
    """Gemma4AudioLayer (a plain nn.Module in transformers, unlike the text and vision layers)
    with the same switch as transformers' GradientCheckpointingLayer: when
    `gradient_checkpointing` is set (set_layer_checkpointing), a
    training forward that needs gradients runs under the layer's checkpoint function."""

    gradient_checkpointing = False

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            layer = functools.partial(super().forward, attention_mask=attention_mask,
                                      position_embeddings=position_embeddings, **kwargs)
            return self._gradient_checkpointing_func(layer, hidden_states)
        return super().forward(hidden_states, attention_mask, position_embeddings, **kwargs)


def enable_gradient_checkpointing(model: nn.Module, mode: str = "offload") -> None:
    """Checkpoint every decoder layer of the language model ("offload": saved inputs in CPU
    memory; "on"; "off"). A tower's layers are checkpointed ("on", in place: they are short)
    only while the tower has trainable adapters: a frozen tower runs under no_grad
    (gemmatune.model.towers), keeps nothing, and copying its layers' inputs would be wasted work.
    Call it after add_lora (gemmatune.train does)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if mode is True:
        mode = "on"
    elif mode in (False, None):
        mode = "off"
    tower_layers = set()
    for tower in towers.towers_of(model).values():
        layers = [m for m in tower.modules() if isinstance(m, (GradientCheckpointingLayer, CheckpointedAudioLayer))]
        tower_layers.update(id(m) for m in layers)
        set_layer_checkpointing(layers, "on" if mode != "off" and towers.is_trained(tower) else "off")
    set_layer_checkpointing([m for m in model.modules()
                             if isinstance(m, GradientCheckpointingLayer) and id(m) not in tower_layers], mode)
