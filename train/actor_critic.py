"""PPO's models: policy, reference, reward and value as adapters on shared base(s).

The recipe (``train/ppo.py``) builds :class:`ActorCritic` with :meth:`ActorCritic.load`
and calls its forwards; nothing here knows about rollouts, steps or files of a run. On one
4-bit nf4 base when the SFT model and the reward model share their base LM (the usual
case: the RM is trained from the SFT model), as adapters of one peft model, switched per
forward:

    policy     base + SFT LoRA (frozen) + PPO LoRA "policy" (trainable, r=64, alpha=16)
    reference  base + SFT LoRA — the PPO adapter off; no second copy of any weight
    reward     base + RM LoRA "reward" (frozen) + RM projector + RM head       (frozen)
    value      base + LoRA "value" initialised from the RM's + RM projector + zero head

The projectors stay frozen (the policy's is the SFT one, so the reference is exactly SFT).
When the bases differ (e.g. a 13B RM for a 7B policy), the reward and value adapters share a
second base. Dropout is off everywhere. The saved policy (:meth:`ActorCritic.save`) is a
plain ``VideoLMM`` folder: the SFT and PPO LoRAs concatenated into one (:func:`concat_lora`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from train import rl
from train.model import ModelSettings, seeded

if TYPE_CHECKING:
    from train.ppo import PPOConfig

log = logging.getLogger(__name__)

SFT_ADAPTER, POLICY_ADAPTER, REWARD_ADAPTER, VALUE_ADAPTER = "default", "policy", "reward", "value"


def _reward_parts(folder: str | os.PathLike, hidden: int, dtype: torch.dtype):
    """The RM's projector, head, saved config and statistics, for the RM's adapter loaded onto
    a base PPO already holds (``RewardModel.load`` would load a second copy of the base).
    Read by the same functions ``RewardModel.load`` uses."""
    from train.model import load_projector
    from train.reward import RewardStats, load_head, read_reward_config

    data = read_reward_config(folder)
    stats = RewardStats(**data["stats"])
    if stats.count <= 0:
        raise ValueError(f"{folder}: the reward model has no reward statistics to normalise with "
                         "(a mid-run checkpoint?): use the final model folder written by `vlmr train rm`")
    # Shaped by the saved settings (its activation included: GELU for a model started from LLaVA).
    projector = load_projector(folder, hidden)
    return projector.to(dtype), load_head(folder, hidden, dtype), data, stats


class ActorCritic(nn.Module):
    """Policy, reference, reward and value model as adapters on shared base(s).

    Build with :meth:`load`. The forward used for training and for the rollout's old
    logprobs is :meth:`forward`; :meth:`reference_logprobs`, :meth:`score` and
    :meth:`generate` are the other uses. Every method switches the adapters it needs.
    Views (``policy``, ``reward``, ``value``) are VideoLMM / RewardModel objects over the
    shared modules, kept outside this module's registry so every weight is registered once.
    """

    def __init__(self, lm: nn.Module, critic_lm: nn.Module | None, policy_projector: nn.Module,
                 reward_projector: nn.Module, reward_head: nn.Linear, value_head: nn.Linear, tokenizer,
                 sft_settings: ModelSettings, rm_settings: ModelSettings, rm_config: dict[str, Any], stats,
                 temperature: float, reward_adapter: str, qlora: bool, dtype_name: str):
        from train.model import VideoLMM
        from train.reward import RewardModel

        super().__init__()
        self.lm = lm
        self.critic_lm = critic_lm  # None: the critic adapters live on self.lm
        self.policy_projector = policy_projector
        self.reward_projector = reward_projector
        self.reward_head = reward_head
        self.value_head = value_head
        self.temperature = temperature
        self.sft_settings = sft_settings
        self.qlora, self.dtype_name = qlora, dtype_name
        shared = critic_lm if critic_lm is not None else lm
        # Plain dict: the views reuse the modules above and must not register them twice.
        self.views = {
            "policy": VideoLMM(lm, policy_projector, tokenizer, dataclasses.replace(sft_settings)),
            "reward": RewardModel(VideoLMM(shared, reward_projector, tokenizer, dataclasses.replace(rm_settings)),
                                  reward_head, context=rm_config["context"],
                                  max_length=int(rm_config["max_length"]), stats=stats),
            "value": RewardModel(VideoLMM(shared, reward_projector, tokenizer, dataclasses.replace(rm_settings)),
                                 value_head),
        }
        self.adapters = {"policy": (lm, [SFT_ADAPTER, POLICY_ADAPTER]), "reference": (lm, [SFT_ADAPTER]),
                         "reward": (shared, [reward_adapter]), "value": (shared, [VALUE_ADAPTER])}
        self.layers = {id(m): [x for x in m.modules() if _is_tuner_layer(x)] for m in (lm, shared)}
        # The <video> placeholder is no word the policy may say (a second one in a sequence
        # cannot be spliced): its logit is -inf at every use of the LM head — sampling,
        # old/reference/update logprobs alike.
        head = lm.get_base_model().get_output_embeddings()
        self._suppress = head.register_forward_hook(SuppressToken(self.views["policy"].video_token_id))
        self.trainable = [p for p in self.parameters() if p.requires_grad]
        self.active: dict[int, tuple[str, ...]] = {}
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0

    # -- construction ----------------------------------------------------------------
    @classmethod
    def load(cls, config: PPOConfig) -> "ActorCritic":
        """The SFT model (4-bit base with ``qlora``) with a fresh seeded PPO adapter, and the
        reward model's adapter twice on the same base when the bases match: frozen
        ("reward") and trainable ("value", with a zero head)."""
        from peft import LoraConfig

        from dataengine.models import load_tokenizer, resolve_lm
        from train.model import VideoLMM, saved_settings

        dtype_name = "bfloat16" if config.precision == "bf16" else "float32"
        sft_settings = saved_settings(config.sft)
        rm_settings = saved_settings(config.reward_model)
        policy = VideoLMM.load(config.sft, qlora=config.qlora, dtype=dtype_name)
        if load_tokenizer(config.reward_model).get_vocab() != policy.tokenizer.get_vocab():
            raise ValueError(f"{config.reward_model}: the reward model's tokenizer is not the SFT model's "
                             f"({config.sft}); PPO scores the policy's token ids as they are")
        lm = policy.lm
        targets = list(config.lora_targets) or list(sft_settings.lora_targets)
        with seeded(config.seed):  # the caller's RNG state is left untouched
            lm.add_adapter(POLICY_ADAPTER, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                                                      lora_dropout=0.0, target_modules=targets, bias="none",
                                                      task_type="CAUSAL_LM"))
        same_base = resolve_lm(sft_settings.lm).resolve() == resolve_lm(rm_settings.lm).resolve()
        if same_base:
            lm.load_adapter(config.reward_model, adapter_name=REWARD_ADAPTER, is_trainable=False)
            critic_lm, reward_adapter = None, REWARD_ADAPTER
        else:
            log.info("the reward model's base (%s) is not the SFT model's (%s): the reward and value "
                     "adapters get a base of their own", rm_settings.lm, sft_settings.lm)
            critic = VideoLMM.load(config.reward_model, qlora=config.qlora, dtype=dtype_name)
            critic_lm, reward_adapter = critic.lm, SFT_ADAPTER  # the RM's LoRA is that model's "default"
        shared = critic_lm if critic_lm is not None else lm
        shared.load_adapter(config.reward_model, adapter_name=VALUE_ADAPTER, is_trainable=True)
        hidden = int(shared.get_base_model().config.hidden_size)
        reward_projector, reward_head, rm_config, stats = _reward_parts(config.reward_model, hidden, policy.dtype)
        value_head = nn.Linear(hidden, 1).to(policy.dtype)
        nn.init.zeros_(value_head.weight)
        nn.init.zeros_(value_head.bias)
        # Freeze everything, then open exactly the PPO adapter, the value adapter and the value head.
        for module in (lm, shared, policy.projector, reward_projector, reward_head):
            module.requires_grad_(False)
        for module in (lm, shared):
            for name, param in module.named_parameters():
                if _adapter_of(name) in (POLICY_ADAPTER, VALUE_ADAPTER):
                    param.requires_grad_(True)
        value_head.requires_grad_(True)
        model = cls(lm, critic_lm, policy.projector, reward_projector, reward_head, value_head, policy.tokenizer,
                    sft_settings, rm_settings, rm_config, stats, config.temperature, reward_adapter,
                    config.qlora, dtype_name)
        return model

    @property
    def tokenizer(self):
        return self.views["policy"].tokenizer

    @property
    def reward(self):
        return self.views["reward"]

    def use(self, role: str) -> None:
        """Make ``role``'s adapters the active ones (policy, reference, reward, value).

        peft's set_adapter also changes requires_grad; the trainable set is restored at once,
        so the optimizer's parameters keep receiving gradients.
        """
        lm, names = self.adapters[role]
        if self.active.get(id(lm)) == tuple(names):
            return
        for layer in self.layers[id(lm)]:
            layer.set_adapter(list(names), inference_mode=True)
        for param in self.trainable:
            param.requires_grad_(True)
        self.active[id(lm)] = tuple(names)

    # -- forwards ----------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, feat, attention_mask: torch.Tensor, positions: torch.Tensor,
                responses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Policy logprobs, values and (detached) entropy of the response tokens.

        input_ids, attention_mask (b, L): prompt + valid response tokens, right-padded
        (:func:`sequence_inputs`); positions (b, T): the spliced positions whose outputs
        predict each response token; responses (b, T) → three (b, T) float32 tensors.
        """
        logits = self._logits("policy", input_ids, feat, attention_mask, positions)
        logprobs = rl.logprobs_from_logits(logits, responses, self.temperature)
        entropy = rl.entropy_from_logits(logits.detach(), self.temperature)
        return logprobs, self.values(input_ids, feat, attention_mask, positions), entropy

    def _logits(self, role: str, input_ids, feat, attention_mask, positions) -> torch.Tensor:
        self.use(role)
        # logits_to_keep with (b, T) positions: the LM head runs on the response positions only.
        out = self.views["policy"](input_ids, feat, attention_mask, logits_to_keep=positions)
        return out.logits

    def values(self, input_ids, feat, attention_mask, positions) -> torch.Tensor:
        """The value head on the final hidden state at each response position (b, T)."""
        self.use("value")
        hidden, _ = self.views["value"].hidden_states(input_ids, feat, attention_mask)
        picked = torch.take_along_dim(hidden, positions.unsqueeze(-1), dim=1)
        return self.value_head(picked.to(self.value_head.weight.dtype)).squeeze(-1).float()

    @torch.no_grad()
    def reference_logprobs(self, input_ids, feat, attention_mask, positions, responses) -> torch.Tensor:
        """log π_ref of the response tokens: the same computation with the PPO adapter off."""
        logits = self._logits("reference", input_ids, feat, attention_mask, positions)
        return rl.logprobs_from_logits(logits, responses, self.temperature)

    @torch.no_grad()
    def score(self, feat, prompts: Sequence[str], responses: Sequence[Sequence[int]],
              narratives: Sequence[str] | None, batch_size: int) -> torch.Tensor:
        """Raw reward-model scores (B,) of generated responses (token ids, cut at EOS)."""
        self.use("reward")
        return self.reward.score(feat, prompts, responses, narratives=narratives, batch_size=batch_size)

    @torch.no_grad()
    def generate(self, feat, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int, seed: int):
        self.use("policy")
        return self.views["policy"].generate(feat, prompt_ids, max_new_tokens=max_new_tokens,
                                             temperature=self.temperature, do_sample=True, seed=seed)

    # -- saving --------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """CPU copies of what :meth:`save` writes: the SFT and PPO adapters (peft key format)
        and the policy's projector. (The value adapter and head travel in DeepSpeed's files.)"""
        from peft import get_peft_model_state_dict

        def cpu(state):
            return {k: v.detach().cpu().contiguous() for k, v in state.items()}

        return {"sft": cpu(get_peft_model_state_dict(self.lm, adapter_name=SFT_ADAPTER)),
                "policy": cpu(get_peft_model_state_dict(self.lm, adapter_name=POLICY_ADAPTER)),
                "projector": cpu(self.policy_projector.state_dict())}

    def save(self, folder: str | os.PathLike, state: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
        """Write the PPO policy as a ``VideoLMM`` folder: SFT and PPO LoRA concatenated.

        For each wrapped module, B_sft·A_sft·s_sft + B_ppo·A_ppo·s_ppo
        = [B_sft·s_sft | B_ppo·s_ppo]·[A_sft; A_ppo], a LoRA of rank r_sft + r_ppo with scaling 1
        (alpha = r). The value adapter and head
        are in the DeepSpeed part of a checkpoint (``deepspeed/``), which ``--resume`` reads.
        """
        from dataclasses import asdict

        from peft import LoraConfig
        from safetensors.torch import save_file

        from dataengine.schema import write_text_atomic
        from train.model import FORMAT, MODEL_CONFIG, PROJECTOR_FILE

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = state or self.trainable_state()
        adapter, rank, targets = concat_lora([state["sft"], state["policy"]], self._scalings())
        LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=sorted(targets), bias="none",
                   task_type="CAUSAL_LM").save_pretrained(str(folder))
        save_file(adapter, str(folder / "adapter_model.safetensors"))
        save_file(state["projector"], str(folder / PROJECTOR_FILE), metadata={"format": FORMAT})
        self.tokenizer.save_pretrained(str(folder))
        settings = dataclasses.replace(self.sft_settings, lora_r=rank, lora_alpha=rank, lora_dropout=0.0,
                                       lora_targets=sorted(targets), qlora=self.qlora, dtype=self.dtype_name)
        write_text_atomic(folder / MODEL_CONFIG, json.dumps({"format": FORMAT, "settings": asdict(settings)},
                                                            indent=1) + "\n")
        return folder

    def _scalings(self) -> list[dict[str, float]]:
        """Per wrapped module (peft key prefix): the scaling of the SFT and of the PPO adapter."""
        out: list[dict[str, float]] = [{}, {}]
        for name, module in self.lm.named_modules():
            scaling = getattr(module, "scaling", None)
            if _is_tuner_layer(module) and isinstance(scaling, dict):
                for k, adapter in enumerate((SFT_ADAPTER, POLICY_ADAPTER)):
                    if adapter in scaling:
                        out[k][name] = float(scaling[adapter])
        return out


class SuppressToken:
    """Forward hook for an LM head: the logit of ``token_id`` becomes -inf (never sampled)."""

    def __init__(self, token_id: int):
        self.token_id = token_id

    def __call__(self, module: nn.Module, inputs, logits: torch.Tensor) -> torch.Tensor:
        from train.model import suppress_token

        return suppress_token(logits, self.token_id)


def _is_tuner_layer(module: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


def _adapter_of(param_name: str) -> str | None:
    """'...q_proj.lora_A.policy.weight' → 'policy' (None for non-LoRA parameters)."""
    parts = param_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"):
            return parts[i + 1]
    return None


def concat_lora(adapters: Sequence[dict[str, torch.Tensor]], scalings: Sequence[dict[str, float]]
                ) -> tuple[dict[str, torch.Tensor], int, set[str]]:
    """One LoRA (scaling 1) computing the sum of several: A = [A_1; A_2; ...], B = [s_1·B_1 | s_2·B_2 | ...].

    ``adapters``: peft-format state dicts ('{module}.lora_A.weight' (r, in), '{module}.lora_B.weight'
    (out, r)); ``scalings``: per adapter, module → scaling. A module one adapter does not wrap
    gets zero blocks for it. Returns (state dict, total rank, wrapped module short names).
    """
    a_key, b_key = "{}.lora_A.weight", "{}.lora_B.weight"
    ranks = []
    for state in adapters:
        found = {v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight")}
        if len(found) != 1:
            raise ValueError(f"cannot concatenate an adapter with ranks {sorted(found)} (one rank per adapter)")
        ranks.append(found.pop())
    modules = sorted({k[: -len(".lora_A.weight")] for s in adapters for k in s if k.endswith(".lora_A.weight")})
    out: dict[str, torch.Tensor] = {}
    for module in modules:
        # in/out widths and dtype from any adapter that wraps this module
        a_any, b_any = next((s[a_key.format(module)], s[b_key.format(module)]) for s in adapters
                            if a_key.format(module) in s)
        blocks_a, blocks_b = [], []
        for state, scaling, rank in zip(adapters, scalings, ranks):
            if a_key.format(module) in state:
                blocks_a.append(state[a_key.format(module)].float())
                blocks_b.append(state[b_key.format(module)].float() * scaling[module])
            else:
                blocks_a.append(torch.zeros(rank, a_any.shape[1]))
                blocks_b.append(torch.zeros(b_any.shape[0], rank))
        out[a_key.format(module)] = torch.cat(blocks_a, 0).to(a_any.dtype).contiguous()
        out[b_key.format(module)] = torch.cat(blocks_b, 1).to(b_any.dtype).contiguous()
    return out, sum(ranks), {m.rsplit(".", 1)[-1] for m in modules}
