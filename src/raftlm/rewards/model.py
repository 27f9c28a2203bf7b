"""The reward-model term: a local HF sequence-classification model scoring prompt + completion."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from raftlm.config import RewardTerm


class ModelReward:
    """A local HF sequence-classification model scoring prompt + completion (logit 0)."""

    def __init__(self, path: str | Path, batch_size: int = 16):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.path = str(path)
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            self.path, local_files_only=True
        ).eval()
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # The model finds each sequence's last token through pad_token_id.
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    def models(self) -> list[Any]:
        """What an offload manager moves between devices for this term: the model itself."""
        return [self]

    def to(self, device: Any) -> ModelReward:
        """Move the model (an offload manager swaps it with the policy between phases)."""
        self.model.to(device)
        return self

    def _text(self, prompt: str | list[dict], completion: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            messages = [*messages, {"role": "assistant", "content": completion}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        if not isinstance(prompt, str):
            prompt = "\n".join(m["content"] for m in prompt)
        return prompt + completion

    def __call__(self, prompts: list, completions: list[str], **kwargs: Any) -> list[float]:
        texts = [self._text(p, c) for p, c in zip(prompts, completions, strict=True)]
        # A chat template writes its own special tokens; plain text gets the tokenizer's.
        templated = bool(getattr(self.tokenizer, "chat_template", None))
        return self.score_texts(texts, add_special_tokens=not templated)

    def score_texts(self, texts: list[str], add_special_tokens: bool = False) -> list[float]:
        """Logit 0 of each whole text: by default a conversation already templated, its special
        tokens in the text (OpenRLHF's `query`, scored as its reward-model server does)."""
        import torch
        from tqdm.auto import tqdm

        scores: list[float] = []
        starts = range(0, len(texts), self.batch_size)
        with torch.inference_mode():
            for start in tqdm(starts, desc="reward model", leave=False, disable=len(starts) < 2):
                batch = self.tokenizer(
                    texts[start : start + self.batch_size],
                    padding=True,
                    return_tensors="pt",
                    add_special_tokens=add_special_tokens,
                ).to(self.device)
                logits = self.model(**batch).logits
                scores += logits[:, 0].float().cpu().tolist()
        return scores


def build_model_term(term: RewardTerm) -> ModelReward:
    """`model:` a reward-model folder."""
    return ModelReward(term.model, term.batch_size)


def model_label(path: str) -> str:
    """A reward model's short name in metrics: its folder's name."""
    return Path(path.rstrip("/\\")).name or path
