"""Where models come from: a local checkpoint folder, or the tiny offline defaults.

Everywhere a model is taken, the spec is either ``tiny`` or a local path. Nothing ever
downloads: ``tiny`` builds random-weight models from configs (a small CLIP vision/text
model and a small Llama) and a byte-level BPE tokenizer trained offline with ``<video>`` as
a special token, once, into a cache folder keyed by their config, so tests and the demo
share them. A real checkpoint (say a saved CLIP ViT-L/14, or a LLaVA/Vicuna folder) is
loaded the same way, from its path.

The cache folder is ``$VLMR_CACHE`` or ``~/.cache/vlmr``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TINY = "tiny"
VIDEO_TOKEN = "<video>"
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"

# Used when a checkpoint folder carries no preprocessor_config.json (OpenAI CLIP's values).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Small enough to train in seconds on 2 CPU cores, big enough to learn the synthetic world.
TINY_CLIP_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                        num_attention_heads=4, image_size=64, patch_size=16, projection_dim=64)
TINY_CLIP_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=77, projection_dim=64)
TINY_LLAMA = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY_VOCAB = 1024
TINY_SEED = 1234

# The tokenizer's training text: the words of the synthetic world, the prompts and the chat
# template, so that the tiny LM sees short token sequences. Any text still tokenizes (the
# tokenizer is byte-level); unseen words just take more tokens.
_TOKENIZER_CORPUS = """
A chat between a curious user and an artificial intelligence assistant. The assistant gives
helpful, detailed, and polite answers to the user's questions. USER: ASSISTANT:
Describe this video in detail. What happens in the video? What colour is the shape? Which
direction does it move? What shape appears? What happens first, then, and at the end?
How many shapes are there? Is the answer grounded in the video, accurate and helpful?
Which answer is better, A or B? Answer A. Answer B. The better answer is A. The better answer is B.
In the beginning, in the middle, at the end of the video, a red green blue yellow white
black orange purple cyan magenta pink gray circle square triangle rectangle box disk ball
moves left right up down up-left up-right down-left down-right towards the left the right
the top the bottom stays still grows shrinks changes colour turns into appears disappears
spins bounces slides across the screen on a dark background. First, then, finally, after
that, meanwhile. The video shows one two three shapes. Yes. No. It is. It moves.
Context: narrative of the video clip by clip. Question: Answer:
""".strip()


@contextlib.contextmanager
def quiet_loading():
    """Silence transformers' per-load weight reports and progress bars (not warnings of ours)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def cache_root() -> Path:
    return Path(os.environ.get("VLMR_CACHE", Path.home() / ".cache" / "vlmr"))


def _key(config: dict[str, Any]) -> str:
    blob = json.dumps(config, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _build_once(name: str, config: dict[str, Any], build) -> Path:
    """Build into a temp folder and rename into place, so a crash leaves no half model."""
    target = cache_root() / "tiny" / f"{name}-{_key(config)}"
    if (target / "DONE").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build(tmp)
        (tmp / "DONE").write_text(json.dumps(config, sort_keys=True))
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process (another rank) finished first: its copy is identical.
            if not (target / "DONE").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built tiny %s at %s", name, target)
    return target


def _resolve(spec: str | os.PathLike, what: str, build_tiny) -> Path:
    if str(spec) == TINY:
        return build_tiny()
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{what} {str(spec)!r} is neither 'tiny' nor an existing local folder "
            "(nothing is downloaded: save the checkpoint locally and pass its path)")
    return path


# --------------------------------------------------------------------------- tokenizer

def tiny_tokenizer_path() -> Path:
    config = {"vocab": TINY_VOCAB, "corpus": hashlib.sha256(_TOKENIZER_CORPUS.encode()).hexdigest(),
              "specials": [UNK, BOS, EOS, PAD, VIDEO_TOKEN], "v": 1}

    def build(folder: Path) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=TINY_VOCAB, min_frequency=1, show_progress=False,
            special_tokens=[UNK, BOS, EOS, PAD, VIDEO_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        lines = _TOKENIZER_CORPUS.splitlines()
        tok.train_from_iterator(lines * 4, trainer=trainer)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
            additional_special_tokens=[VIDEO_TOKEN], model_max_length=4096)
        fast.padding_side = "right"
        fast.save_pretrained(folder)

    return _build_once("tokenizer", config, build)


def load_tokenizer(spec: str | os.PathLike = TINY):
    """A fast tokenizer with ``<video>`` registered as a special token, and a pad token."""
    from transformers import AutoTokenizer

    path = _resolve(spec, "tokenizer", tiny_tokenizer_path)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if VIDEO_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [VIDEO_TOKEN]})
    if tok.pad_token is None:
        # LLaMA-family tokenizers ship without one; unk is never a real target token.
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


# --------------------------------------------------------------------------- vision encoder

@dataclass(frozen=True)
class VisionSpec:
    """What the decoder must produce for an encoder: square frames of this size, normalised."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    hidden_size: int
    num_patches: int


def tiny_clip_path() -> Path:
    config = {"vision": TINY_CLIP_VISION, "text": TINY_CLIP_TEXT, "seed": TINY_SEED, "v": 1}

    def build(folder: Path) -> None:
        import torch
        from transformers import CLIPConfig, CLIPModel

        torch.manual_seed(TINY_SEED)
        text = dict(TINY_CLIP_TEXT, vocab_size=TINY_VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=3)
        cfg = CLIPConfig(text_config=text, vision_config=TINY_CLIP_VISION,
                         projection_dim=TINY_CLIP_VISION["projection_dim"])
        with quiet_loading():
            CLIPModel(cfg).save_pretrained(folder, safe_serialization=True)
        size = TINY_CLIP_VISION["image_size"]
        (folder / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": size},
            "crop_size": {"height": size, "width": size}, "do_center_crop": True,
            "do_normalize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
            "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255}, indent=1))
        # The text side is tokenised with the tiny tokenizer; ship it beside the model.
        shutil.copytree(tiny_tokenizer_path(), folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns("DONE"))

    return _build_once("clip", config, build)


def resolve_encoder(spec: str | os.PathLike = TINY) -> Path:
    return _resolve(spec, "encoder", tiny_clip_path)


def vision_spec(path: Path) -> VisionSpec:
    """Read frame size, normalisation and feature width from a CLIP checkpoint folder."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    vcfg = getattr(cfg, "vision_config", cfg)
    mean, std = CLIP_MEAN, CLIP_STD
    size = int(vcfg.image_size)
    pre = Path(path) / "preprocessor_config.json"
    if pre.exists():
        data = json.loads(pre.read_text())
        mean = tuple(data.get("image_mean", mean))
        std = tuple(data.get("image_std", std))
        crop = data.get("crop_size", size)
        size = int(crop["height"] if isinstance(crop, dict) else crop)
    patches = (int(vcfg.image_size) // int(vcfg.patch_size)) ** 2
    return VisionSpec(image_size=size, mean=mean, std=std, hidden_size=int(vcfg.hidden_size),
                      num_patches=patches)


def load_vision_encoder(spec: str | os.PathLike = TINY, device: str = "cpu", dtype=None):
    """A ``CLIPVisionModel`` in eval mode and its :class:`VisionSpec`.

    Works on a full CLIP folder (vision tower taken) or a vision-only one.
    """
    import torch
    from transformers import CLIPVisionModel

    path = resolve_encoder(spec)
    if dtype is None:
        dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    with quiet_loading():  # a full CLIP folder reports its unused text tower as "unexpected"
        model = CLIPVisionModel.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    model.to(device).eval().requires_grad_(False)
    return model, vision_spec(path)


def load_clip(spec: str | os.PathLike = TINY, device: str = "cpu"):
    """The full CLIP model (text + vision) and its tokenizer, for CLIP-score evaluation."""
    from transformers import AutoTokenizer, CLIPModel

    path = resolve_encoder(spec)
    with quiet_loading():
        model = CLIPModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model, tokenizer


# --------------------------------------------------------------------------- language model

def tiny_llama_path() -> Path:
    tok_path = tiny_tokenizer_path()
    config = {"llama": TINY_LLAMA, "seed": TINY_SEED, "tokenizer": tok_path.name, "v": 1}

    def build(folder: Path) -> None:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        tok = load_tokenizer(tok_path)
        torch.manual_seed(TINY_SEED)
        cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          **TINY_LLAMA)
        with quiet_loading():
            LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
        tok.save_pretrained(folder)

    return _build_once("llama", config, build)


def resolve_lm(spec: str | os.PathLike = TINY) -> Path:
    return _resolve(spec, "language model", tiny_llama_path)


def resolve_tokenizer(spec: str | os.PathLike = TINY) -> Path:
    return _resolve(spec, "tokenizer", tiny_tokenizer_path)
