"""Scorers that are models: the LLM judge (requests dealt to all ranks, replies cached) and
CLIP text embeddings for retrieval and action recognition. See :mod:`train.eval`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from train.eval.configs import JudgedEvalConfig

if TYPE_CHECKING:
    from dataengine.dist import Ranks

# =========================================================================== judging

def user_message(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


class LLMJudge:
    """The LLM judge of a run, with its cache; requests are dealt to all ranks."""

    def __init__(self, config: JudgedEvalConfig, ranks: "Ranks"):
        from dataengine.models import cache_root
        from train.llm_client import make_client

        self.config = config
        self.ranks = ranks
        cache = config.judge_cache or str(cache_root() / "llm")
        self.client = make_client(config.judge, model=config.judge_model, cache_dir=cache,
                                  device=config.judge_device, **config.client_kwargs())

    def ask(self, requests: list[dict[str, Any]] | None) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """Replies to rank 0's ``requests`` (``{"messages", "label"}``), in order, on every rank:
        ``{"text"}`` or ``{"error"}``; and the request counts (sent, cached, failed).

        Every rank answers its share (request i goes to rank i % world), so all ranks must
        call this together. Failures are gathered before anyone raises, so that every rank
        raises together rather than leaving the others waiting.
        """
        from tqdm import tqdm

        from dataengine import dist
        from train.llm_client import ChatRequest, LLMError, complete_many

        requests = dist.broadcast_json(requests)
        mine = requests[self.ranks.rank::self.ranks.world_size]
        hits, misses = self.client.hits, self.client.misses
        chats = (ChatRequest(r["messages"], temperature=0.0, seed=self.config.seed,
                             max_tokens=self.config.judge_max_tokens, label=r["label"]) for r in mine)
        replies: list[dict[str, Any]] = []
        fatal = ""
        try:
            for reply in tqdm(complete_many(self.client, chats, on_error="skip"), total=len(mine), desc="judge",
                              unit="request", disable=not (self.ranks.is_main and self.config.progress)):
                replies.append({"error": str(reply)} if isinstance(reply, LLMError) else {"text": reply.text})
        except LLMError as exc:  # fatal: bad URL, key or model name; retrying cannot help
            fatal = str(exc)
        counts = [self.client.misses - misses, self.client.hits - hits]
        parts = dist.all_gather_json({"replies": replies, "fatal": fatal, "counts": counts})
        fatal_errors = [p["fatal"] for p in parts if p["fatal"]]
        if fatal_errors:
            raise RuntimeError(f"judge {self.config.judge}: {fatal_errors[0]}")
        ordered: list[dict[str, Any]] = [{}] * len(requests)
        for rank, part in enumerate(parts):
            ordered[rank::self.ranks.world_size] = part["replies"]
        failed = [(r["label"], o["error"]) for r, o in zip(requests, ordered) if "error" in o]
        if failed and self.config.on_error == "raise":
            raise RuntimeError(f"{len(failed)} judge request(s) failed after retries; first: {failed[0][0]}: "
                               f"{failed[0][1]} (--on-error skip counts them instead)")
        sent = sum(p["counts"][0] for p in parts)
        cached = sum(p["counts"][1] for p in parts)
        return ordered, {"sent": sent, "cached": cached, "failed": len(failed)}


# =========================================================================== CLIP text scoring

class ClipText:
    """Unit-norm CLIP text embeddings, loaded on first use.

    The embedding is CLIP's: the text tower's hidden state at the end-of-text token, through
    the text projection. The end-of-text position is taken here rather than by
    transformers' pooling, which for configs with ``eos_token_id == 2`` (a legacy rule, and
    the tiny model's) takes the position of the *highest token id*: right for OpenAI's
    tokenizer, whose end-of-text token has the highest id, but an arbitrary word for any
    other, giving texts with a common prefix the same embedding. Each text is ended with
    the tokenizer's EOS when the tokenizer did not add it, and pooled at its last token.
    """

    def __init__(self, spec: str, device: Any):
        self.spec, self.device = spec, device
        self._model = self._tokenizer = None

    def embed(self, texts: Sequence[str], batch: int = 64):
        import numpy as np
        import torch

        from dataengine.models import load_clip
        from train.model import pad_sequences

        if self._model is None:
            self._model, self._tokenizer = load_clip(self.spec, device=self.device)
        model, tokenizer = self._model, self._tokenizer
        context = int(model.config.text_config.max_position_embeddings)
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
        rows = []
        with torch.no_grad():
            for start in range(0, len(texts), batch):
                # An empty answer still gets an embedding (of a lone full stop).
                chunk = [t if t.strip() else "." for t in texts[start:start + batch]]
                encoded = tokenizer(chunk, truncation=True, max_length=context - 1)["input_ids"]
                ids = [list(e) + ([eos] if eos is not None and (not e or e[-1] != eos) else []) for e in encoded]
                input_ids, mask = pad_sequences(ids, pad, side="right")
                hidden = model.text_model(input_ids=input_ids.to(self.device),
                                          attention_mask=mask.to(self.device)).last_hidden_state
                last = (mask.sum(1) - 1).to(self.device)
                features = model.text_projection(hidden[torch.arange(hidden.shape[0], device=self.device), last])
                rows.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy())
        width = int(model.config.projection_dim)
        return np.concatenate(rows) if rows else np.zeros((0, width), np.float32)


def text_similarity(embed, queries: Sequence[str], documents: Sequence[str]):
    """(Q, D) similarity of query texts to document texts, ``embed`` giving unit rows.

    Equal texts get bit-equal scores: each distinct text is embedded once and each
    distinct (query, document) product computed once, then spread back. Embedded in
    different batches or multiplied in different matrix tiles, equal inputs need not give
    bit-equal floats (it depends on the CPU's kernels and thread count), and the rankings
    count exact ties against the target (``metrics.target_ranks``).
    """
    import numpy as np

    query_texts, query_index = np.unique(np.asarray(list(queries), dtype=object), return_inverse=True)
    doc_texts, doc_index = np.unique(np.asarray(list(documents), dtype=object), return_inverse=True)
    distinct = embed(list(query_texts)) @ embed(list(doc_texts)).T
    return distinct[np.ix_(query_index.reshape(-1), doc_index.reshape(-1))]
