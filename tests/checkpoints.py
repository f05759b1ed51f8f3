"""Checkpoint folders shaped like real ones, for tests that must not rely on the tiny defaults.

The tiny offline models (``dataengine.models``) are built for speed, and they hide what
real checkpoints look like: a real tokenizer fills the LM's embedding table exactly (Vicuna
32,000 rows, SmolLM2 49,152), so the ``<video>`` placeholder that ``load_tokenizer`` adds
gets the id one past the last row; its special tokens are its own (not ``<s>``/``</s>``);
it carries a chat template; the embeddings may be tied to the output layer.

``write_tokenizer(folder, template)``
    A byte-level BPE tokenizer (a few hundred tokens, trained here) with its own
    BOS/EOS/PAD (three distinct ids, PAD != EOS), no ``<video>`` token and a chat template:
    ``chatml`` (``<|im_start|>role\\n...<|im_end|>\\n``, no BOS in the text, as SmolLM2 and
    Qwen2) or ``llama3`` (BOS first, ``<|start_header_id|>role<|end_header_id|>\\n\\n
    ...<|eot_id|>``, contents trimmed).
``write_llama(folder, template, tied)``
    That tokenizer plus a ``LlamaForCausalLM`` (2 layers, hidden 64, grouped-query
    attention) whose vocabulary equals the tokenizer's size, with tied or untied
    embeddings. Seeded: the same arguments give the same weights.
``real_lm`` (pytest fixture, session scope, parametrised ``tied``/``untied``)
    The folder of ``write_llama(..., template="chatml")``. Import it into a test module
    (``from checkpoints import real_lm``) to use it.
``vlmr(*args)``
    Runs ``python -m tools ARGS`` as a user would (one thread, offline), in a subprocess;
    a non-zero exit fails the test with the command and the tail of its output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TEMPLATES = {
    "chatml": {
        "bos": "<|startoftext|>", "eos": "<|im_end|>", "pad": "<|padding|>", "unk": None,
        "extra": ["<|im_start|>"],
        "chat_template": (
            "{% for message in messages %}"
            "{% if loop.first and message['role'] != 'system' %}"
            "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
            "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
            "{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    },
    "llama3": {
        "bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "pad": "<|finetune_right_pad_id|>", "unk": None,
        "extra": ["<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"],
        "chat_template": (
            "{{ bos_token }}"
            "{% for message in messages %}"
            "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
            " + '<|eot_id|>' }}"
            "{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    },
}

# Words of the synthetic world and the prompts, so that the tiny LM sees short sequences.
CORPUS = """
A chat between a curious user and an artificial intelligence assistant. You are a helpful assistant.
Describe this video in detail. What happens in the video? What colour is the shape? Which direction
does it move? How many shapes are there? Which answer is better, A or B? Answer: A B
In the beginning, in the middle, at the end of the video, a red green blue yellow white black orange
purple circle square triangle moves left right up down stays still grows shrinks appears disappears.
The video shows one two three shapes. Yes. No. Context: narrative of the video clip by clip. Question:
""".strip()

LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5)
VOCAB = 400
SEED = 4321
ROOT = Path(__file__).resolve().parents[1]


def write_tokenizer(folder: str | Path, template: str = "chatml") -> Path:
    """A real-shaped fast tokenizer saved into ``folder`` (see the module docstring)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = TEMPLATES[template]
    folder = Path(folder)
    specials = [spec["bos"], spec["eos"], spec["pad"], *spec["extra"]]
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=1, show_progress=False, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.splitlines() * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=spec["bos"], eos_token=spec["eos"],
                                   pad_token=spec["pad"], additional_special_tokens=spec["extra"],
                                   model_max_length=2048)
    fast.chat_template = spec["chat_template"]
    fast.save_pretrained(folder)
    return folder


def write_llama(folder: str | Path, template: str = "chatml", tied: bool = False) -> Path:
    """Tokenizer + a tiny ``LlamaForCausalLM`` with ``vocab_size == len(tokenizer)``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    write_tokenizer(folder, template)
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    ids = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    assert len(ids) == 3 and tok.pad_token_id != tok.eos_token_id, "bos/eos/pad must be distinct"
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=tied, **LLAMA)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "vlmr_fixture.json").write_text(json.dumps({"template": template, "tied": tied}) + "\n")
    return folder


@pytest.fixture(scope="session", params=["untied", "tied"])
def real_lm(request, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real-shaped Llama checkpoint folder (chatml template), tied or untied embeddings."""
    tied = request.param == "tied"
    return write_llama(tmp_path_factory.mktemp(f"real_lm_{request.param}"), "chatml", tied=tied)


def vlmr(*args: str | Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m tools ARGS`` in a subprocess (one thread, offline); asserts it exits 0."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               VLMR_LOG="WARNING")
    result = subprocess.run([sys.executable, "-m", "tools", *map(str, args)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"vlmr {' '.join(map(str, args))}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result
