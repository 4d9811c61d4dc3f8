"""The vision and audio towers of a multimodal Gemma 4: which are built, and how a batch
with images or audio becomes the language model's input embeddings.

Why gemmatune runs this step itself instead of `Gemma4Model.forward`: it splits the step
in two. First the towers turn pixels and mel features into soft tokens, which replace the
placeholder tokens' embeddings (`embed_inputs`); then the language model runs on those
embeddings. The split lets a frozen tower run under `torch.no_grad()` (it keeps no
activations: its output is a leaf for the language model) and lets gemmatune.training.step replay
the language-model half as a CUDA graph, with the towers run eagerly in front of it.

It computes exactly what `Gemma4Model.forward` computes for E2B/E4B (causal attention over
image tokens; tests/model/test_multimodal_model.py compares the two): placeholder ids become the
pad id for the token embedding and the per-layer embeddings, and the towers' soft tokens are
scattered into the placeholders' positions in order. Gemma 4 models that attend
bidirectionally over images (`use_bidirectional_attention="vision"`, the larger ones) are
refused rather than trained with the wrong mask.

A model without the tower for a row's or a prompt's images or audio would read their placeholders
as text and never see them: `require_towers` refuses such inputs before any work (train calls it
on the dataset, generation on every prompt), naming the modality and the load_model call that
builds the tower.
"""
import copy

import torch
from torch import nn

from gemmatune.data.batches import example_media_kinds
from gemmatune.errors import GemmatuneError, MissingTowerError

# modality -> (the tower, its embedder into the language model's space) in Gemma4Model
TOWERS = {"image": ("vision_tower", "embed_vision"), "audio": ("audio_tower", "embed_audio")}
CONFIG_OF = {"image": "vision_config", "audio": "audio_config"}
MEDIA_KEYS = ("pixel_values", "image_position_ids", "input_features", "input_features_mask")
MODALITIES = ("text", "image", "audio")
WHAT = {"image": ("images", "vision tower"), "audio": ("audio", "audio tower")}  # modality -> (media, tower)


def check_modalities(modalities) -> tuple[str, ...]:
    """("text", "image") and the like, in a fixed order; "text" is always included."""
    if isinstance(modalities, str):
        modalities = (modalities,)
    unknown = set(modalities) - set(MODALITIES)
    if unknown:
        raise ValueError(f"modalities={tuple(modalities)!r}: unknown {sorted(unknown)}; use a tuple of "
                         f"{', '.join(repr(m) for m in MODALITIES)}, e.g. ('text', 'image')")
    return tuple(m for m in MODALITIES if m == "text" or m in modalities)


def keep_towers(config, modalities: tuple[str, ...]):
    """The multimodal config with the towers of modalities not asked for removed, so that
    `from_pretrained` does not build them (a vision fine-tune needs no 300 M-parameter audio
    tower); their checkpoint keys are then ignored (see dropped_tower_keys)."""
    config = copy.deepcopy(config)  # the caller's config stays whole
    for modality, field in CONFIG_OF.items():
        if modality not in modalities:
            setattr(config, field, None)
    return config


def dropped_tower_keys(config) -> list[str]:
    """Checkpoint-key patterns of the towers this config does not build."""
    return [rf"^model\.({'|'.join(TOWERS[m])})\." for m, field in CONFIG_OF.items() if getattr(config, field) is None]


def towers_of(model: nn.Module) -> dict[str, nn.Module]:
    """{"image": vision tower, "audio": audio tower} of the towers this model has."""
    inner = multimodal_model(model)
    if inner is None:
        return {}
    return {m: getattr(inner, names[0]) for m, names in TOWERS.items() if getattr(inner, names[0], None) is not None}


def loaded_modalities(model: nn.Module) -> tuple[str, ...]:
    """("text",) plus the modality of each tower this model has, in MODALITIES order."""
    have = towers_of(model)
    return tuple(m for m in MODALITIES if m == "text" or m in have)


def require_towers(model: nn.Module, needed, what: str) -> None:
    """Refuse images or audio that this model has no tower for, before any work: without the tower
    their placeholders would be read as text and the media silently ignored.

    Args:
        model: a model from load_model (peft-wrapped or not).
        needed: the modalities the inputs hold ("image", "audio"; "text" is always there).
        what: the inputs, as the message names them ("the dataset", "the prompt", "prompt 3").

    Raises:
        MissingTowerError: naming the missing modality and the load_model call that builds its tower.
    """
    have = loaded_modalities(model)
    missing = [m for m in MODALITIES if m in set(needed) and m not in have]
    if not missing:
        return
    media = " and ".join(WHAT[m][0] for m in missing)
    towers = " and ".join(WHAT[m][1] for m in missing)
    def spelled(modalities) -> str:
        return "(" + ", ".join(f'"{m}"' for m in modalities) + ("," if len(modalities) == 1 else "") + ")"

    fix = spelled([m for m in MODALITIES if m in have or m in missing])
    raise MissingTowerError(
        f"{what} has {media}, but the model was loaded without its {towers} (modalities={spelled(have)}), so "
        f"it could not read them and would answer or train without them. Load the model with "
        f"gemmatune.load_model(..., modalities={fix}); an adapter trained without the tower loads onto it with "
        "gemmatune.load_adapter.")


def require_towers_for_examples(model: nn.Module, examples, what: str = "the dataset") -> None:
    """require_towers for prepared rows (prepare_dataset's examples): train's check before the first step."""
    require_towers(model, example_media_kinds(examples), what)


def multimodal_model(model: nn.Module):
    """The Gemma4Model inside a Gemma4ForConditionalGeneration (peft-wrapped or not), or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None)
    return inner if inner is not None and hasattr(inner, "language_model") else None


def is_trained(module: nn.Module | None) -> bool:
    return module is not None and any(p.requires_grad for p in module.parameters())


def has_media(batch: dict) -> bool:
    return any(batch.get(key) is not None for key in ("pixel_values", "input_features"))


def input_modalities(inputs: dict) -> set[str]:
    """The media kinds a batch of model inputs holds: "image" for pixel_values, "audio" for input_features."""
    return {kind for kind, key in (("image", "pixel_values"), ("audio", "input_features"))
            if inputs.get(key) is not None}


def placeholder_ids(config) -> list[int]:
    """The token ids the towers' soft tokens replace."""
    ids = [config.image_token_id, config.audio_token_id, getattr(config, "video_token_id", None)]
    return [i for i in ids if i is not None]


def text_token_ids(input_ids: torch.Tensor, config) -> torch.Tensor:
    """input_ids with every placeholder replaced by the pad id: what the token embedding and
    the per-layer embeddings read (as Gemma4Model.forward does). Works on CPU and GPU ids."""
    media = torch.zeros_like(input_ids, dtype=torch.bool)
    for token in placeholder_ids(config):  # scalar compares: nothing copied to the GPU (graph capture)
        media |= input_ids == token
    return input_ids.masked_fill(media, config.get_text_config().pad_token_id)


def embed_inputs(inner: nn.Module, batch: dict) -> torch.Tensor:
    """The language model's input embeddings for `batch`: token embeddings, with each image's
    and clip's soft tokens in place of its placeholders. `inner` is the Gemma4Model.

    A tower without trainable parameters runs under no_grad. Its embedder (the projection
    into the language model's width) keeps a graph only when it or its tower is trained."""
    config = inner.config
    if getattr(config.get_text_config(), "use_bidirectional_attention", None) == "vision":
        raise GemmatuneError("this Gemma 4 attends bidirectionally over image tokens, which gemmatune does not "
                             "train: use an E2B/E4B checkpoint")
    if batch.get("pixel_values_videos") is not None:
        raise GemmatuneError("video inputs are not supported: pass frames as images")
    input_ids = batch["input_ids"]
    embeds = inner.language_model.embed_tokens(text_token_ids(input_ids, config))
    if batch.get("pixel_values") is not None:
        soft = image_embeddings(inner, batch["pixel_values"], batch["image_position_ids"])
        embeds = _scatter(embeds, input_ids == config.image_token_id, soft, "image")
    if batch.get("input_features") is not None:
        soft = audio_embeddings(inner, batch["input_features"], batch["input_features_mask"])
        embeds = _scatter(embeds, input_ids == config.audio_token_id, soft, "audio")
    return embeds


def image_embeddings(inner: nn.Module, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """(soft tokens of all images in order, language-model width), as get_image_features."""
    if inner.vision_tower is None:
        raise GemmatuneError("the batch has images but the model was loaded without its vision tower: load it "
                             "with gemmatune.load_model(..., modalities=('text', 'image'))")
    with torch.set_grad_enabled(torch.is_grad_enabled() and is_trained(inner.vision_tower)):
        hidden = inner.vision_tower(pixel_values=pixel_values, pixel_position_ids=position_ids).last_hidden_state
    return _project(inner.embed_vision, hidden, inner.vision_tower)


def audio_embeddings(inner: nn.Module, features: torch.Tensor, features_mask: torch.Tensor) -> torch.Tensor:
    """(soft tokens of all clips' valid frames in order, language-model width), as
    Gemma4Model.forward: the tower's padding frames are dropped."""
    if inner.audio_tower is None:
        raise GemmatuneError("the batch has audio but the model was loaded without its audio tower: load it "
                             "with gemmatune.load_model(..., modalities=('text', 'audio'))")
    with torch.set_grad_enabled(torch.is_grad_enabled() and is_trained(inner.audio_tower)):
        output = inner.audio_tower(features, features_mask, return_dict=True)
    soft = _project(inner.embed_audio, output.last_hidden_state, inner.audio_tower)
    return soft[output.attention_mask.to(soft.device)]


def _project(embedder: nn.Module, hidden: torch.Tensor, tower: nn.Module) -> torch.Tensor:
    with torch.set_grad_enabled(torch.is_grad_enabled() and (is_trained(embedder) or is_trained(tower))):
        return embedder(inputs_embeds=hidden)


def _scatter(embeds: torch.Tensor, positions: torch.Tensor, soft: torch.Tensor, kind: str) -> torch.Tensor:
    """embeds with `soft` written, in order, at the placeholder `positions`."""
    n_slots = int(positions.sum())  # waits for the GPU (the towers have synchronised already)
    if n_slots != soft.shape[0]:
        raise GemmatuneError(f"the batch has {n_slots} {kind} placeholder tokens but its {kind} inputs give "
                             f"{soft.shape[0]} soft tokens: build batches with gemmatune.prepare_dataset and its "
                             "collator, which insert exactly as many placeholders as each image/clip needs")
    mask = positions.unsqueeze(-1).expand_as(embeds)
    return embeds.masked_scatter(mask, soft.to(embeds.dtype))
