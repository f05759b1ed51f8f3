"""The video LMM: a causal LM, a projector from CLIP width to LM width, LoRA or QLoRA.

    feat (N, D_clip) float16 ──► projector: Linear(D_clip, H) → ReLU|GELU → Linear(H, H) ─┐
                                                                                          ▼
    "... USER: <video>\\n{q} ASSISTANT:"  → token embeddings, the <video> token replaced by
                                            the N projected rows (``splice``) → causal LM

The prompt is rendered with the model's chat template (``settings.template``: vicuna v1, as
drawn, or the checkpoint's own; :mod:`train.conversation`).

The LM is any ``AutoModelForCausalLM`` folder (``tiny`` or a local path such as a Vicuna
checkpoint) or a LLaVA-1.5 folder (either layout, :func:`llava_layout`: its language model,
and its pretrained GELU projector to start from); it stays frozen under LoRA adapters (peft;
default r=32, alpha=32 on the attention and MLP projections) while the projector is trained
in full. The ``<video>`` placeholder exists only in the tokenizer (:func:`suppress_token`). A
random-init base (the tiny demo LM) also needs an adapter on ``lm_head``
(:func:`default_lora_targets`): its frozen head caps the logits.
With ``qlora`` the base is loaded 4-bit nf4 through bitsandbytes; on CPU every
``Linear4bit`` gets ``support_avx512bf16_for_cpu = False`` right after loading, because on
CPUs with AVX512-BF16 one eval-mode forward otherwise repacks the weights into an
inference-only layout and the LoRA gradients silently vanish afterwards.

A saved model is a folder::

    vlmr_model.json              base LM spec, feature width, LoRA/QLoRA settings, chat template
    adapter_config.json          peft's adapter config
    adapter_model.safetensors    LoRA weights (peft's key format)
    projector.safetensors        projector weights (activation in vlmr_model.json)
    tokenizer files              the tokenizer the model was trained with

``VideoLMM.load(folder)`` rebuilds it (base from its spec, adapter, projector) for training
or inference; logits after save → load equal the ones before, and saving the same model
twice gives the same bytes. Nothing here is pickled. What this relies on in the libraries
and checkpoint formats: ``docs/model.md``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from dataengine.models import is_preset, load_tokenizer, quiet_loading, resolve_lm
from dataengine.schema import write_text_atomic
from train import conversation
from train.conversation import IGNORE_INDEX

log = logging.getLogger(__name__)

MODEL_CONFIG = "vlmr_model.json"
PROJECTOR_FILE = "projector.safetensors"
FORMAT = "vlmr-model/1"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


@dataclass
class ModelSettings:
    """What a video LMM is made of; saved as ``vlmr_model.json`` beside its weights."""

    lm: str = "tiny"
    """Base causal LM: 'tiny' or a local checkpoint folder (never a hub id)."""
    feat_dim: int = 64
    """Width D of the video features (CLIP hidden size: 64 tiny, 1024 ViT-L/14)."""
    lora_r: int = 32
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    qlora: bool = False
    """Load the base LM 4-bit nf4 (bitsandbytes) under the LoRA adapters."""
    dtype: str = "float32"
    """Dtype of the frozen base weights and compute: float32 or bfloat16."""
    template: str = conversation.DEFAULT_TEMPLATE
    """Chat template: 'vicuna_v1' (LLaVA-1.5/Vicuna) or 'tokenizer' (the checkpoint's own)."""
    projector_act: str = "relu"
    """The projector's activation: relu (paper §4.1) or gelu (LLaVA-1.5's mlp2x_gelu; set
    when the base is a LLaVA folder, whose pretrained projector is loaded)."""

    def __post_init__(self) -> None:
        problems = []
        if self.dtype not in DTYPES:
            problems.append(f"dtype {self.dtype!r} not one of {sorted(DTYPES)}")
        if self.lora_r < 1 or self.lora_alpha <= 0:
            problems.append("lora_r must be >= 1 and lora_alpha > 0")
        if not 0 <= self.lora_dropout < 1:
            problems.append("lora_dropout must be in [0, 1)")
        if self.feat_dim < 1:
            problems.append("feat_dim must be >= 1")
        if self.projector_act not in ACTIVATIONS:
            problems.append(f"projector_act {self.projector_act!r} not one of {sorted(ACTIVATIONS)}")
        if self.template not in conversation.TEMPLATES:
            problems.append(f"template {self.template!r} not one of {sorted(conversation.TEMPLATES)}")
        if problems:
            raise ValueError("invalid model settings: " + "; ".join(problems))


@dataclass
class Generation:
    """What ``VideoLMM.generate`` returns, one entry per prompt."""

    texts: list[str]
    token_ids: list[list[int]]
    """Generated ids, up to and including EOS when one was generated."""
    ended: list[bool]
    """Whether EOS was generated within ``max_new_tokens``."""


# ------------------------------------------------------------------------------ loading

def _load_base(settings: ModelSettings):
    from transformers import AutoModelForCausalLM

    path = str(resolve_lm(settings.lm))
    llava = None if is_preset(settings.lm) else llava_layout(path)
    dtype = DTYPES[settings.dtype]
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    if settings.qlora:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": "cuda" if torch.cuda.is_available() else "cpu"}
    if llava is None:
        base = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    else:
        # The LM of a LLaVA folder: its text config and weights under the layout's names. The
        # vision tower and projector are reported as unexpected (quiet); a missing LM weight
        # would be left at random init, so that is an error naming it.
        kwargs.update(config=llava.text_config(), key_mapping=llava.key_mapping or None, output_loading_info=True)
        with quiet_loading():
            base, info = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        if info.get("missing_keys"):
            raise ValueError(f"{path}: {llava.name} LLaVA layout, but the LM weights "
                             f"{sorted(info['missing_keys'])[:5]} were not found in it")
    # Dropout off in the base: two identical forwards must agree (PPO and exact resume).
    for name in ("attention_dropout", "hidden_dropout", "dropout"):
        if isinstance(getattr(base.config, name, None), float):
            setattr(base.config, name, 0.0)
    for module in base.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    if settings.qlora:
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        disable_cpu_bf16_repack(base)
    base.requires_grad_(False)
    return base


def disable_cpu_bf16_repack(model: nn.Module) -> int:
    """Turn off bitsandbytes' CPU inference repacking on every ``Linear4bit`` (docs/model.md).

    Returns the number of layers changed. Must run before any eval-mode forward.
    """
    import bitsandbytes as bnb

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def default_lora_targets(lm: str | os.PathLike) -> list[str]:
    """The modules that get LoRA adapters when none are named.

    The attention and MLP projections (the paper's choice for a pretrained LM), and for the
    random-init ``tiny`` LM also ``lm_head``: its frozen random output layer (std 0.02) after
    the frozen final norm bounds every logit near ±3, so no answer token can get more than a
    few per cent of probability (≥ 4.1 nats per token however long it trains); an adapter
    on the head lifts that cap.
    """
    targets = list(LORA_TARGETS)
    if str(lm) == "tiny":
        targets.append("lm_head")
    return targets


def _lora_config(settings: ModelSettings):
    from peft import LoraConfig

    return LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha,
                      lora_dropout=settings.lora_dropout,
                      target_modules=list(settings.lora_targets), bias="none",
                      task_type="CAUSAL_LM")


@contextlib.contextmanager
def seeded(seed: int):
    """Deterministic initialisation that leaves the caller's RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ------------------------------------------------------------------------------ the model

class VideoLMM(nn.Module):
    """Causal LM + projector; ``<video>`` tokens are replaced by projected features.

    Build a fresh one with :meth:`build`, a saved one with :meth:`load`. ``forward`` takes
    a padded batch (see :func:`collate`) and returns the LM's output (``loss``, ``logits``).
    """

    def __init__(self, lm: nn.Module, projector: nn.Module, tokenizer, settings: ModelSettings):
        super().__init__()
        self.lm = lm
        self.projector = projector
        self.tokenizer = tokenizer
        self.settings = settings
        self.video_token_id = conversation.video_token_id(tokenizer)
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.chat = conversation.chat_template(settings.template, tokenizer)
        # Where an answer ends: the template's end-of-turn token (vicuna v1: the tokenizer's EOS).
        self.eos_token_id = self.chat.end_of_turn_id

    # -- construction ----------------------------------------------------------------
    @classmethod
    def build(cls, settings: ModelSettings, tokenizer=None, seed: int = 0) -> "VideoLMM":
        """Base LM from ``settings.lm`` with fresh LoRA adapters and projector (seeded)."""
        from peft import get_peft_model

        if not is_preset(settings.lm):
            # Recorded in vlmr_model.json: absolute, so the saved model loads from any folder
            # (a preset stays a name: it resolves into each machine's own model cache).
            settings.lm = str(Path(settings.lm).expanduser().resolve())
        if tokenizer is None:
            tokenizer = load_tokenizer(resolve_lm(settings.lm))
        llava = None if is_preset(settings.lm) else llava_layout(settings.lm)
        if llava is not None:
            settings.projector_act = llava.activation
        base = _load_base(settings)
        hidden = int(base.config.hidden_size)
        with seeded(seed):
            lm = get_peft_model(base, _lora_config(settings))
            projector = make_projector(settings.feat_dim, hidden, settings.projector_act)
        if llava is not None:
            # Start from LLaVA-1.5: its pretrained projector, trained further from there.
            projector.load_state_dict(llava.projector_state(settings.feat_dim, hidden))
            log.info("projector loaded from the LLaVA checkpoint %s (%s layout)", settings.lm, llava.name)
        model = cls(lm, projector.to(_compute_dtype(settings)), tokenizer, settings)
        model.check_vocab()
        return model

    @classmethod
    def load(cls, folder: str | os.PathLike, *, trainable: bool = False, qlora: bool | None = None,
             dtype: str | None = None) -> "VideoLMM":
        """A saved model: base from its recorded spec, then adapter and projector.

        ``trainable`` keeps the adapter and projector trainable (to continue training);
        ``qlora``/``dtype`` override how the base is loaded (e.g. 4-bit for PPO).
        """
        from peft import PeftModel

        folder = Path(folder)
        settings = saved_settings(folder)
        if qlora is not None:
            settings.qlora = qlora
        if dtype is not None:
            settings.dtype = dtype
        tokenizer = load_tokenizer(folder)
        base = _load_base(settings)
        lm = PeftModel.from_pretrained(base, str(folder), is_trainable=trainable)
        projector = load_projector(folder, int(base.config.hidden_size))
        projector.to(_compute_dtype(settings)).requires_grad_(trainable)
        model = cls(lm, projector, tokenizer, settings)
        model.check_vocab()
        return model

    def check_vocab(self) -> None:
        """Every token id but ``<video>`` must have an embedding row (see :func:`suppress_token`)."""
        weight = self.lm.get_input_embeddings().weight
        if hasattr(weight, "ds_id"):  # ZeRO-3 partitions the table: its local shape says nothing
            return
        rows = weight.shape[0]
        largest = max((i for i in self.tokenizer.get_vocab().values() if i != self.video_token_id), default=0)
        if largest >= rows:
            raise ValueError(f"the tokenizer has token ids up to {largest} but the LM {self.settings.lm} has "
                             f"{rows} embedding rows: tokenizer and LM do not belong together")

    # -- saving ------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{"adapter": peft-format LoRA weights, "projector": projector weights}`` (CPU copies)."""
        from peft import get_peft_model_state_dict

        # The base head/embeddings stay frozen and come back from the base spec: with lm_head
        # among the targets peft would otherwise copy the whole base head into the adapter.
        adapter = get_peft_model_state_dict(self.lm, save_embedding_layers=False)
        return {
            "adapter": {k: v.detach().cpu().contiguous() for k, v in adapter.items()},
            "projector": {k: v.detach().cpu().contiguous() for k, v in self.projector.state_dict().items()},
        }

    def save(self, folder: str | os.PathLike, state: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
        """Write the adapter, projector, tokenizer and ``vlmr_model.json`` into ``folder``.

        ``state`` is a :meth:`trainable_state` gathered elsewhere (e.g. from ZeRO-3
        partitions); by default it is taken from this module. The caller makes the folder
        atomic (write to a temp folder, rename) where it matters.
        """
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = state or self.trainable_state()
        self.lm.save_pretrained(str(folder), state_dict=state["adapter"], safe_serialization=True,
                                save_embedding_layers=False)
        sets = {key for config in self.lm.peft_config.values() for key, value in config.to_dict().items()
                if isinstance(value, set)}
        sort_adapter_config(folder / "adapter_config.json", sets)
        save_file(state["projector"], str(folder / PROJECTOR_FILE), metadata={"format": FORMAT})
        self.tokenizer.save_pretrained(str(folder))
        write_text_atomic(folder / MODEL_CONFIG, json.dumps(
            {"format": FORMAT, "settings": asdict(self.settings)}, indent=1) + "\n")
        return folder

    # -- forward -----------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.projector[0].weight.dtype

    def splice(self, input_ids: torch.Tensor, feat: torch.Tensor | Sequence[torch.Tensor],
               attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
               padding_side: str = "right"):
        """Replace each row's ``<video>`` token by its projected features.

        input_ids, attention_mask, labels: (B, L), padded on ``padding_side``; feat: (B, N, D)
        or B tensors (N_b, D). A row holds at most one ``<video>`` token (rows without one
        are text only). Returns ``(inputs_embeds (B, L', H), attention_mask (B, L'),
        labels (B, L') or None, position_ids (B, L'))``, padded on the same side; video
        rows get label ``IGNORE_INDEX``.
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
        batch = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        is_video = input_ids == self.video_token_id
        per_row = is_video.sum(1)
        if bool((per_row > 1).any()):
            raise ValueError("a row holds more than one <video> token; one video per sample")
        embed = self.lm.get_input_embeddings()
        # The placeholder id need not exist in the LM's vocabulary: look up pad instead.
        text = embed(input_ids.masked_fill(is_video, self.pad_token_id))
        if isinstance(feat, torch.Tensor) and feat.dim() == 3:
            video = self.projector(feat.to(device=text.device, dtype=self.dtype)).to(text.dtype)
            videos = list(video.unbind(0))
        else:
            if len(feat) != batch:
                raise ValueError(f"{len(feat)} feature tensors for a batch of {batch}")
            videos = [self.projector(f.to(device=text.device, dtype=self.dtype)).to(text.dtype) for f in feat]

        rows_e, rows_l = [], []
        for b in range(batch):
            keep = attention_mask[b].bool()
            e = text[b][keep]
            lab = labels[b][keep] if labels is not None else None
            if per_row[b]:
                at = int(is_video[b][keep].nonzero()[0, 0])
                v = videos[b]
                e = torch.cat([e[:at], v, e[at + 1:]])
                if lab is not None:
                    lab = torch.cat([lab[:at], lab.new_full((v.shape[0],), IGNORE_INDEX), lab[at + 1:]])
            rows_e.append(e)
            rows_l.append(lab)
        length = max(e.shape[0] for e in rows_e)
        hidden = text.shape[-1]
        out_e = text.new_zeros((batch, length, hidden))
        out_m = attention_mask.new_zeros((batch, length))
        out_l = input_ids.new_full((batch, length), IGNORE_INDEX) if labels is not None else None
        for b, e in enumerate(rows_e):
            n = e.shape[0]
            sl = slice(0, n) if padding_side == "right" else slice(length - n, length)
            out_e[b, sl] = e
            out_m[b, sl] = 1
            if out_l is not None:
                out_l[b, sl] = rows_l[b]
        return out_e, out_m, out_l, position_ids_from_mask(out_m)

    def forward(self, input_ids: torch.Tensor, feat, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, padding_side: str = "right", **lm_kwargs) -> "LMMOutput":
        """Splice, then run the LM. With ``labels``, ``loss`` is the mean NLL of the target
        tokens (0, still attached to the graph, when the batch has none)."""
        embeds, mask, spliced_labels, positions = self.splice(input_ids, feat, attention_mask, labels, padding_side)
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False,
                      **lm_kwargs)
        loss = None
        if spliced_labels is not None:
            total, count = token_nll(out.logits, spliced_labels)
            loss = total / max(count, 1)
        return LMMOutput(loss=loss, logits=out.logits, labels=spliced_labels, attention_mask=mask,
                         hidden_states=getattr(out, "hidden_states", None))

    # -- generation ----------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, feat, prompts: Sequence[str] | Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                 temperature: float = 1.0, top_p: float = 1.0, do_sample: bool = False,
                 seed: int = 0) -> Generation:
        """Answer a batch of prompts about their videos, with a KV cache.

        ``prompts`` are questions (templated with the model's chat template, ``self.chat``)
        or token-id lists of such prompts; ``feat`` is (B, N, D) or B tensors.
        Sampling (``do_sample``) uses temperature and nucleus (``top_p``) filtering with a
        generator seeded by ``seed``, so the same call gives the same answers; otherwise
        greedy. A row stops at the end-of-turn token (``eos_token_id``).
        """
        if do_sample and temperature <= 0:
            raise ValueError("temperature must be > 0 when sampling")
        ids = [list(p) if not isinstance(p, str) else self.chat.prompt_ids(p) for p in prompts]
        device = self.projector[0].weight.device
        input_ids, mask = pad_sequences(ids, self.pad_token_id, side="left")
        input_ids, mask = input_ids.to(device), mask.to(device)
        was_training = self.training
        self.eval()
        generator = torch.Generator(device=device).manual_seed(seed) if do_sample else None
        try:
            embeds, mask, _, positions = self.splice(input_ids, feat, mask, None, padding_side="left")
            out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
            cache, logits = out.cache, out.logits[:, -1]
            batch = len(ids)
            tokens = [[] for _ in range(batch)]
            ended = torch.zeros(batch, dtype=torch.bool, device=device)
            next_pos = positions[:, -1:] + 1
            embed = self.lm.get_input_embeddings()
            for _ in range(max_new_tokens):
                # The placeholder is not text: a generated <video> would be spliced as a second
                # video when the answer is fed back (judge prompts, RM inputs) and fail there.
                logits = suppress_token(logits.float(), self.video_token_id)
                nxt = sample_next(logits, temperature, top_p, do_sample, generator)
                nxt = torch.where(ended, torch.full_like(nxt, self.pad_token_id), nxt)
                for b in range(batch):
                    if not ended[b]:
                        tokens[b].append(int(nxt[b]))
                ended |= nxt == self.eos_token_id
                if bool(ended.all()):
                    break
                mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=1)
                out = self.lm(inputs_embeds=embed(nxt[:, None]), attention_mask=mask, position_ids=next_pos,
                              cache=cache, use_cache=True)
                cache, logits = out.cache, out.logits[:, -1]
                next_pos = next_pos + 1
        finally:
            self.train(was_training)
        texts = [self.tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
        return Generation(texts=texts, token_ids=tokens, ended=[bool(e) for e in ended])


@dataclass
class LMMOutput:
    """``VideoLMM.forward``'s result; tensors are over the spliced sequence (B, L')."""

    loss: torch.Tensor | None
    logits: torch.Tensor
    labels: torch.Tensor | None
    attention_mask: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over target positions and their count.

    logits (B, L, V), labels (B, L) with ``IGNORE_INDEX`` where there is no target; the
    token at t is predicted from position t-1. E.g. labels [[-100, 5, 7]] sum the NLL of 5
    from logits[:, 0] and of 7 from logits[:, 1]: count 2.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    count = int((shift_labels != IGNORE_INDEX).sum())
    total = nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                        shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    if count == 0:
        # Keep the graph: every rank must run the same backward even on a batch without targets.
        total = shift_logits.sum() * 0.0
    return total, count


def sort_adapter_config(path: Path, keys: set[str]) -> None:
    """Sort the fields ``keys`` of peft's ``adapter_config.json``: peft holds them as sets
    (``target_modules``) and writes them in hash order, which changes every run. Sorted, the
    same model saved twice gives byte-identical folders. Rewritten as peft writes it."""
    data = json.loads(path.read_text())
    for key in keys:
        if isinstance(data.get(key), list):
            data[key] = sorted(data[key])
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True))


def suppress_token(logits: torch.Tensor, token_id: int) -> torch.Tensor:
    """``logits`` (..., V) with the logit of ``token_id`` set to -inf (a new tensor).

    The one rule for the ``<video>`` placeholder: it exists only in the tokenizer. The LM
    never embeds it (``VideoLMM.splice`` replaces it) and never says it. A real checkpoint's
    tokenizer fills the LM's vocabulary exactly (Vicuna 32,000 rows, SmolLM2 49,152), so the
    added ``<video>`` gets id V and has no logit to suppress: the logits come back unchanged.
    The tiny LM was built with a row for it, which is suppressed.
    """
    if token_id >= logits.shape[-1]:
        return logits
    return logits.index_fill(-1, torch.tensor([token_id], device=logits.device), float("-inf"))


def make_projector(feat_dim: int, hidden: int, activation: str = "relu") -> nn.Sequential:
    """Two linear layers with an activation between: (…, D_clip) → (…, H). ReLU as in the
    paper (§4.1); GELU for LLaVA-1.5's projector (its ``mlp2x_gelu``). The parameter names
    (``0.*``, ``2.*``) are those of LLaVA's ``mm_projector``."""
    return nn.Sequential(nn.Linear(feat_dim, hidden), ACTIVATIONS[activation](), nn.Linear(hidden, hidden))


def read_saved_json(folder: str | os.PathLike, name: str, fmt: str, what: str) -> dict[str, Any]:
    """A saved folder's JSON file ``name``, checked to be there and to hold format ``fmt``."""
    config_path = Path(folder) / name
    if not config_path.exists():
        raise FileNotFoundError(f"{folder}: no {name} (not a saved {what})")
    data = json.loads(config_path.read_text())
    if data.get("format") != fmt:
        raise ValueError(f"{config_path}: unknown format {data.get('format')!r}, expected {fmt!r}")
    return data


def saved_settings(folder: str | os.PathLike) -> ModelSettings:
    """The :class:`ModelSettings` of a saved model folder (its ``vlmr_model.json``)."""
    return ModelSettings(**read_saved_json(folder, MODEL_CONFIG, FORMAT, "VideoLMM")["settings"])


def load_projector(folder: str | os.PathLike, hidden: int) -> nn.Sequential:
    """The trained projector of a saved model folder (float32, CPU), shaped by its settings."""
    from safetensors.torch import load_file

    settings = saved_settings(folder)
    projector = make_projector(settings.feat_dim, hidden, settings.projector_act)
    projector.load_state_dict(load_file(str(Path(folder) / PROJECTOR_FILE)))
    return projector


# ------------------------------------------------------------------------------ LLaVA checkpoints

@dataclass(frozen=True)
class LlavaLayout:
    """How a LLaVA-1.5 folder stores its language model and its pretrained projector.

    ``hf``: transformers' ``LlavaForConditionalGeneration`` (``llava-hf/llava-1.5-7b-hf``):
    ``config.json`` with ``model_type: llava`` and a ``text_config``; weights
    ``language_model.model.*``/``language_model.lm_head.*`` (as converted for the hub) or
    ``model.language_model.*``/``lm_head.*`` (as transformers 5 saves it), the projector
    ``[model.]multi_modal_projector.linear_1|linear_2.*`` with ``projector_hidden_act``.
    ``original``: haotian-liu/LLaVA (``liuhaotian/llava-v1.5-7b``, or a pretraining output
    with ``mm_projector.bin``): a Llama ``config.json`` with ``mm_projector_type:
    mlp2x_gelu`` and ``mm_hidden_size``; weights under the plain Llama names plus
    ``model.mm_projector.0|2.*``, in the weight files or in ``mm_projector.bin``.
    """

    name: str
    folder: Path
    config: dict
    key_mapping: dict[str, str]
    """Checkpoint key pattern → ``LlamaForCausalLM`` key prefix (regex, for from_pretrained)."""
    projector_keys: tuple[str, str]
    """Regexes of the first and second linear layer's parameter prefixes."""
    activation: str

    def text_config(self):
        """The LM's transformers config (a ``LlamaConfig`` for LLaVA-1.5)."""
        from transformers import AutoConfig

        text = dict(self.config.get("text_config", {}) if self.name == "hf" else self.config)
        model_type = text.pop("model_type", "llama")
        if model_type not in ("llama", "mistral", "qwen2") and model_type.endswith("llama"):
            model_type = "llama"  # the original code's llava_llama is a Llama
        for key in ("architectures", "auto_map", "_name_or_path", "transformers_version"):
            text.pop(key, None)
        return AutoConfig.for_model(model_type, **text)

    def projector_state(self, feat_dim: int, hidden: int) -> dict[str, torch.Tensor]:
        """The pretrained projector as this module's ``make_projector`` names it (``0.*``, ``2.*``).

        Errors name the folder and the widths when the features do not fit the projector.
        """
        import re

        found: dict[str, torch.Tensor] = {}
        patterns = [(re.compile(rf"^{prefix}\.(weight|bias)$"), index)
                    for prefix, index in zip(self.projector_keys, ("0", "2"))]
        for name, tensor in _weights_matching(self.folder, [p for p, _ in patterns]):
            for pattern, index in patterns:
                match = pattern.match(name)
                if match:
                    found.setdefault(f"{index}.{match.group(1)}", tensor.float())
        expected = {"0.weight", "0.bias", "2.weight", "2.bias"}
        if set(found) != expected:
            raise ValueError(f"{self.folder}: {self.name} LLaVA layout, but the projector weights "
                             f"{sorted(expected - set(found))} were not found")
        shape = tuple(found["0.weight"].shape)
        if shape != (hidden, feat_dim):
            raise ValueError(f"{self.folder}: the pretrained projector maps {shape[1]}-wide features to {shape[0]}, "
                             f"but the features are {feat_dim} wide and the LM {hidden} (build the shards with "
                             "the encoder this LLaVA was trained with, e.g. CLIP ViT-L/14-336: 1024)")
        return found


def llava_layout(folder: str | os.PathLike) -> LlavaLayout | None:
    """The :class:`LlavaLayout` of a checkpoint folder, or None for a plain causal LM."""
    folder = Path(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    if config.get("model_type") == "llava":
        return LlavaLayout(
            name="hf", folder=folder, config=config,
            key_mapping={r"^language_model\.model\.": "model.", r"^language_model\.lm_head\.": "lm_head.",
                         r"^model\.language_model\.": "model."},
            projector_keys=(r"(?:model\.)?multi_modal_projector\.linear_1", r"(?:model\.)?multi_modal_projector\.linear_2"),
            activation=_activation(config.get("projector_hidden_act", "gelu"), config_path))
    if "mm_projector_type" in config or (folder / "mm_projector.bin").exists():
        kind = config.get("mm_projector_type", "linear")
        if kind != "mlp2x_gelu":
            raise ValueError(f"{config_path}: mm_projector_type {kind!r}: only mlp2x_gelu (LLaVA-1.5's two-layer "
                             "projector) has this model's projector shape")
        return LlavaLayout(name="original", folder=folder, config=config, key_mapping={},
                           projector_keys=(r"(?:model\.)?mm_projector\.0", r"(?:model\.)?mm_projector\.2"),
                           activation="gelu")
    return None


def _activation(name: str, where: Path) -> str:
    # transformers' "gelu" is the exact (erf) GELU, as torch's nn.GELU().
    if name not in ACTIVATIONS:
        raise ValueError(f"{where}: projector activation {name!r} is not one of {sorted(ACTIVATIONS)}")
    return name


def _weights_matching(folder: Path, patterns) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every weight in the folder whose name matches one of ``patterns``.

    Reads ``mm_projector.bin`` first, then ``*.safetensors`` (only the matching tensors) and
    ``*.bin`` files (memory-mapped, weights only: nothing is unpickled but tensors).
    """
    from safetensors import safe_open

    out = []
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    files.sort(key=lambda f: f.name != "mm_projector.bin")
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                out += [(k, f.get_tensor(k)) for k in f.keys() if any(p.match(k) for p in patterns)]
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            out += [(k, v) for k, v in state.items() if any(p.match(k) for p in patterns)]
    return out


def _compute_dtype(settings: ModelSettings) -> torch.dtype:
    return DTYPES[settings.dtype]


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions 0.. over the real tokens of each row (pads get 1, as HF generate does)."""
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 1)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, do_sample: bool,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row from (B, V) logits: argmax, or temperature + nucleus sampling."""
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ------------------------------------------------------------------------------ batching

def pad_sequences(rows: Sequence[Sequence[int]], pad: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids padded with ``pad`` on ``side`` and the (B, L) attention mask."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row)
        sl = slice(0, n) if side == "right" else slice(length - n, length)
        ids[b, sl] = torch.as_tensor(row, dtype=torch.long)
        mask[b, sl] = 1
    return ids, mask


def collate(samples: Sequence[dict[str, Any]], tokenizer, *, max_length: int | None = None,
            padding_side: str = "right", template: str = conversation.DEFAULT_TEMPLATE) -> dict[str, Any]:
    """A training batch from reader samples (``json`` with ``conversations``, ``feat``).

    Samples that carry ``input_ids``/``labels`` already (tokenized while reading, see
    :func:`tokenize_sample`, with the model's ``template``) are only padded. A sample marked ``substitute_for`` (the
    reader's stand-in for a skipped one, so that every rank keeps the same count) keeps
    its place in the batch but gets no target tokens: it adds nothing to the loss.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (B, L), ``feat`` ((B, N, D) when
    all samples have the same N, else a list), ``tokens`` (real positions once spliced),
    ``targets`` (target tokens), ``substitutes`` and ``keys``.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    ids, labels, feats = [], [], []
    substitutes = 0
    for sample in samples:
        if "input_ids" not in sample:
            sample = tokenize_sample(sample, tokenizer, max_length=max_length, template=template)
        lab = sample["labels"]
        if sample.get("substitute_for"):
            lab = [IGNORE_INDEX] * len(lab)
            substitutes += 1
        ids.append(sample["input_ids"])
        labels.append(lab)
        feats.append(torch.as_tensor(sample["feat"]))
    input_ids, mask = pad_sequences(ids, int(tokenizer.pad_token_id), side=padding_side)
    label_ids, _ = pad_sequences(labels, IGNORE_INDEX, side=padding_side)
    video_id = conversation.video_token_id(tokenizer)
    tokens = sum(conversation.spliced_length(len(i), i.count(video_id), f.shape[0]) for i, f in zip(ids, feats))
    same = all(f.shape == feats[0].shape for f in feats)
    return {
        "input_ids": input_ids, "attention_mask": mask, "labels": label_ids,
        "feat": torch.stack(feats) if same else feats, "tokens": tokens,
        "targets": int((label_ids != IGNORE_INDEX).sum()), "substitutes": substitutes,
        "keys": [s.get("key", "") for s in samples],
    }


def tokenize_sample(sample: dict[str, Any], tokenizer, *, max_length: int | None = None,
                    template: str = conversation.DEFAULT_TEMPLATE) -> dict[str, Any]:
    """The sample with ``input_ids`` and ``labels`` of its conversation added (a new dict),
    rendered with the chat ``template`` (the model's ``settings.template``).

    Errors name the sample's key.
    """
    feat = sample["feat"]
    try:
        ids, labels = conversation.tokenize(sample["json"]["conversations"], tokenizer, max_length=max_length,
                                            feat_rows=int(feat.shape[0]), template=template)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"sample {sample.get('key', '?')}: {exc}") from exc
    return dict(sample, input_ids=ids, labels=labels)
