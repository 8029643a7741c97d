"""Stage 2 scorers: one interface, four kinds, each turning instances into one number.

* ``sequence_classification``: a reward model's scalar logit (paper: OpenAssistant's
  Pythia-1.4B reward model, loaded by :func:`load_gpt_neox_reward_model`).
* ``yes_no``: UniEval-style P(Yes) / (P(Yes) + P(No)) for the first answer token, from a
  seq2seq model (paper: UniEval's T5) or a causal LM's next-token distribution.
* ``embedding_similarity``: cosine similarity of two sentence embeddings, mapped to [0, 1].
* ``lm_fluency``: a causal LM's mean token log-probability of the output given the
  prompt, mapped to [0, 1] as its exponential (the geometric-mean token probability).

Every scorer formats an :class:`InstanceText` with its template, truncates to its
``max_length`` (and counts what it truncated), scores in batches, refuses empty outputs
and non-finite scores with a message naming the scorer and the instance, and caches
scores per (formatted text, scorer) so a rerun recomputes nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from refine_af_utils.errors import RefineAFError
from refine_af_utils.files import append_jsonl, read_jsonl, truncate_torn_tail
from refine_af_utils.layout import SCORE_CACHE_FILE
from refine_af_utils.params import ScorerParams
from refine_af_utils.processes import process_device
from refine_af_utils.progress import tqdm


class ScoringError(RefineAFError, ValueError):
    """An instance a scorer cannot score, or a score that is not a finite number."""


@dataclass(frozen=True)
class InstanceText:
    """The text of one generated instance: an instruction, an optional input and an output."""

    instruction: str
    input: str
    output: str

    @property
    def prompt(self) -> str:
        """The instruction, then the input on its own line when there is one."""
        return f"{self.instruction}\n{self.input}" if self.input.strip() else self.instruction

    def fields(self) -> dict[str, str]:
        """Placeholders a template may use."""
        return {
            "instruction": self.instruction, "input": self.input, "output": self.output,
            "response": self.output, "prompt": self.prompt, "context": self.prompt,
        }


class Scorer:
    """Base class: formats, caches, batches and checks; subclasses implement :meth:`_score_batch`."""

    kind = ""
    #: a score is promised to lie in [0, 1]
    bounded = False
    #: whether the tokenizer adds its special tokens (BOS, </s>) around the formatted text
    adds_special_tokens = True

    def __init__(self, name: str, spec: ScorerParams, cache_path: Optional[Path] = None) -> None:
        self.name = name
        self.spec = spec
        #: instances of the last :meth:`score` call that were longer than ``max_length`` (and truncated)
        self.truncated = 0
        self.tokenizer: Any = None
        self.cache_path = cache_path
        self._cache: dict[str, tuple[float, bool]] = {}
        if cache_path is not None:
            truncate_torn_tail(cache_path)
            self._cache = {r["key"]: (r["score"], r["truncated"]) for r in read_jsonl(cache_path)}

    def format(self, instance: InstanceText) -> str:
        """The scorer's input text for ``instance``."""
        return self.spec.template.format(**instance.fields())

    def format_pair(self, instance: InstanceText) -> str:
        """The second text, for scorers that compare two texts."""
        return (self.spec.pair_template or "{output}").format(**instance.fields())

    def _key(self, instance: InstanceText) -> str:
        text = json.dumps([self.kind, self.spec.model, self.format(instance), self.format_pair(instance),
                           self.spec.max_length])
        return hashlib.sha256(text.encode()).hexdigest()

    def score(self, instances: Sequence[InstanceText], ids: Optional[Sequence[str]] = None,
              progress: bool = True) -> np.ndarray:
        """Scores of ``instances`` (float64), cached ones reused; ``ids`` name instances in errors."""
        ids = list(ids) if ids is not None else [f"#{i}" for i in range(len(instances))]
        for instance, instance_id in zip(instances, ids):
            if not instance.output.strip():
                raise ScoringError(f"scorer '{self.name}': instance {instance_id} has an empty output")
        keys = [self._key(i) for i in instances]
        first_index: dict[str, int] = {}
        for index, key in enumerate(keys):
            first_index.setdefault(key, index)
        todo_keys = [key for key in first_index if key not in self._cache]
        batch_size = self.spec.batch_size
        starts = range(0, len(todo_keys), batch_size)
        for start in tqdm(starts, desc=f"scoring {self.name}", disable=not progress or not todo_keys):
            batch_keys = todo_keys[start:start + batch_size]
            batch = [instances[first_index[k]] for k in batch_keys]
            values = np.asarray(self._score_batch(batch), dtype=np.float64)
            for key, value in zip(batch_keys, values):
                if not math.isfinite(value):
                    raise ScoringError(
                        f"scorer '{self.name}': non-finite score {value} for instance {ids[first_index[key]]}"
                    )
            new = {k: (v, self.token_length(i) > self.spec.max_length)
                   for k, v, i in zip(batch_keys, values.tolist(), batch)}
            self._cache.update(new)
            if self.cache_path is not None:
                append_jsonl(self.cache_path, [{"key": k, "score": v, "truncated": t} for k, (v, t) in new.items()])
        self.truncated = sum(self._cache[k][1] for k in first_index)
        return np.array([self._cache[k][0] for k in keys], dtype=np.float64)

    def _score_batch(self, batch: Sequence[InstanceText]) -> Sequence[float]:
        raise NotImplementedError

    def token_length(self, instance: InstanceText) -> int:
        """Tokens the model would see for ``instance`` before truncation to ``max_length``."""
        return len(self.tokenizer(self.format(instance), add_special_tokens=self.adds_special_tokens)["input_ids"])


def _dtype(spec: ScorerParams) -> torch.dtype:
    from refine_af_utils.models import torch_dtype

    return torch_dtype(spec.dtype, spec.device)


class GPTNeoXRewardModel(nn.Module):
    """OpenAssistant's ``gpt_neox_reward_model`` layout: a GPT-NeoX backbone and a linear head.

    The checkpoint's keys are ``gpt_neox.*`` and ``out_proj.{weight,bias}``; the score is the
    head applied to the last hidden state of the last attended token ("last" pooling), or the
    mean over attended tokens ("mean" pooling). transformers has no class for this model type.
    """

    base_model_prefix = "gpt_neox"

    def __init__(self, config: Any, pooling: str = "last") -> None:
        from transformers import GPTNeoXModel

        super().__init__()
        self.config = config
        self.gpt_neox = GPTNeoXModel(config)
        self.out_proj = nn.Linear(config.hidden_size, 1)
        self.pooling = pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Reward logits of shape (batch, 1)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.gpt_neox(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1)
        else:
            last = attention_mask.cumsum(dim=1).argmax(dim=1)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.out_proj(pooled)


def load_gpt_neox_reward_model(path: str | Path, dtype: torch.dtype = torch.float32) -> GPTNeoXRewardModel:
    """Load a ``gpt_neox_reward_model`` checkpoint folder (config.json + safetensors or .bin)."""
    from transformers import GPTNeoXConfig

    path = Path(path)
    config_data = json.loads((path / "config.json").read_text())
    pooling = config_data.pop("pooling", "last") or "last"
    config_data["model_type"] = "gpt_neox"
    config_data.pop("architectures", None)
    config = GPTNeoXConfig.from_dict(config_data)
    model = GPTNeoXRewardModel(config, pooling)
    state: dict[str, torch.Tensor] = {}
    safetensors_files = sorted(path.glob("*.safetensors"))
    if safetensors_files:
        from safetensors.torch import load_file

        for file in safetensors_files:
            state.update(load_file(file))
    else:
        bins = sorted(path.glob("pytorch_model*.bin"))
        if not bins:
            raise FileNotFoundError(f"{path}: no *.safetensors or pytorch_model*.bin weights")
        for file in bins:
            state.update(torch.load(file, map_location="cpu", weights_only=True))
    # Old GPT-NeoX checkpoints carry attention buffers (masks, rotary caches) that are not weights.
    state = {k: v for k, v in state.items() if not k.endswith((".attention.bias", ".attention.masked_bias",
                                                                ".rotary_emb.inv_freq"))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the gpt_neox_reward_model layout "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.to(dtype).eval()


def _model_folder(spec: ScorerParams) -> str:
    from refine_af_utils.models import resolve_model_path

    return resolve_model_path(spec.model)


def _config_model_type(folder: str, spec: ScorerParams) -> str:
    local = Path(folder) / "config.json"
    if local.is_file():
        return json.loads(local.read_text()).get("model_type", "")
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(folder, "config.json")).read_text()).get("model_type", "")


class SequenceClassificationScorer(Scorer):
    """A reward model's scalar logit for the formatted text."""

    kind = "sequence_classification"
    adds_special_tokens = False  # reward-model templates spell out their special tokens

    def __init__(self, name: str, spec: ScorerParams, cache_path: Optional[Path] = None) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        super().__init__(name, spec, cache_path)
        folder = _model_folder(spec)
        if not Path(folder).is_dir():
            from huggingface_hub import snapshot_download

            folder = snapshot_download(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=spec.trust_remote_code)
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if _config_model_type(folder, spec) == "gpt_neox_reward_model":
            self.model = load_gpt_neox_reward_model(folder, _dtype(spec))
            self._custom = True
        else:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                folder, num_labels=1, dtype=_dtype(spec), trust_remote_code=spec.trust_remote_code).eval()
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
            self._custom = False
        self.model.to(process_device(spec.device))

    @torch.inference_mode()
    def _score_batch(self, batch: Sequence[InstanceText]) -> Sequence[float]:
        texts = [self.format(i) for i in batch]
        device = next(self.model.parameters()).device  # the custom GPT-NeoX reward model has no .device
        encoded = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.spec.max_length, add_special_tokens=False).to(device)
        if self._custom:
            logits = self.model(encoded["input_ids"], encoded["attention_mask"])
        else:
            logits = self.model(**encoded).logits
        return logits[:, 0].float().cpu().tolist()


def _answer_token_ids(tokenizer: Any, word: str) -> list[int]:
    """First token id of ``word`` as the tokenizer spells it alone and after a space (deduplicated).

    A SentencePiece tokenizer may spell a word as a bare word-boundary piece ("▁") and then the word: the
    first token that decodes to some text is taken, so the answer is the word, not the boundary.
    """
    ids = []
    for variant in (word, " " + word):
        encoded = tokenizer(variant, add_special_tokens=False)["input_ids"]
        first = next((i for i in encoded if tokenizer.decode([i]).strip()), None)
        if first is not None and first not in ids:
            ids.append(first)
    return ids


_LANGUAGE_MODELS: dict[tuple, tuple[Any, Any]] = {}


def _language_model(spec: ScorerParams) -> tuple[Any, Any]:
    """A causal or seq2seq LM and its tokenizer for ``spec``, loaded once per (model, dtype, device).

    The default run's three yes/no stand-ins share one copy of the embedded model this way.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    key = (spec.model, spec.dtype, spec.device, spec.trust_remote_code)
    if key not in _LANGUAGE_MODELS:
        folder = _model_folder(spec)
        config = AutoConfig.from_pretrained(folder, trust_remote_code=spec.trust_remote_code)
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = auto.from_pretrained(folder, dtype=_dtype(spec), trust_remote_code=spec.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=spec.trust_remote_code)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        _LANGUAGE_MODELS[key] = (model.to(process_device(spec.device)).eval(), tokenizer)
    return _LANGUAGE_MODELS[key]


class YesNoScorer(Scorer):
    """UniEval's P(Yes) / (P(Yes) + P(No)) of the first answer token."""

    kind = "yes_no"
    bounded = True

    def __init__(self, name: str, spec: ScorerParams, cache_path: Optional[Path] = None) -> None:
        super().__init__(name, spec, cache_path)
        self.model, self.tokenizer = _language_model(spec)
        self.seq2seq = bool(self.model.config.is_encoder_decoder)
        self.adds_special_tokens = self.seq2seq  # UniEval's T5 input ends with </s>
        # UniEval takes tokenizer("Yes").input_ids[0]; a causal LM may answer with " Yes" too.
        self.yes_ids = _answer_token_ids(self.tokenizer, "Yes")
        self.no_ids = _answer_token_ids(self.tokenizer, "No")

    @torch.inference_mode()
    def _score_batch(self, batch: Sequence[InstanceText]) -> Sequence[float]:
        texts = [self.format(i) for i in batch]
        self.tokenizer.padding_side = "right"
        device = self.model.device
        encoded = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.spec.max_length, add_special_tokens=self.seq2seq).to(device)
        if self.seq2seq:
            start = torch.full((len(texts), 1), self.model.config.decoder_start_token_id, device=device)
            logits = self.model(**encoded, decoder_input_ids=start).logits[:, 0]
        else:
            logits = self.model(**encoded).logits
            last = encoded["attention_mask"].sum(dim=1) - 1
            logits = logits[torch.arange(len(texts), device=device), last]
        probs = torch.softmax(logits.float(), dim=-1)
        yes = probs[:, self.yes_ids].sum(dim=-1)
        no = probs[:, self.no_ids].sum(dim=-1)
        return (yes / (yes + no)).cpu().tolist()


class EmbeddingSimilarityScorer(Scorer):
    """(1 + cosine similarity) / 2 of the template text and the pair text, in [0, 1]."""

    kind = "embedding_similarity"
    bounded = True

    def __init__(self, name: str, spec: ScorerParams, cache_path: Optional[Path] = None) -> None:
        from sentence_transformers import SentenceTransformer

        super().__init__(name, spec, cache_path)
        self.model = SentenceTransformer(_model_folder(spec), device=process_device(spec.device),
                                         trust_remote_code=spec.trust_remote_code)
        self.model.max_seq_length = spec.max_length
        self.tokenizer = self.model.tokenizer

    def token_length(self, instance: InstanceText) -> int:
        """The longer of the two texts, in tokens."""
        return max(len(self.tokenizer(text)["input_ids"]) for text in (self.format(instance), self.format_pair(instance)))

    def _score_batch(self, batch: Sequence[InstanceText]) -> Sequence[float]:
        first = [self.format(i) for i in batch]
        second = [self.format_pair(i) for i in batch]
        embeddings = self.model.encode(first + second, batch_size=len(first + second), convert_to_tensor=True,
                                       normalize_embeddings=True, show_progress_bar=False)
        a, b = embeddings[: len(first)], embeddings[len(first):]
        cosine = (a * b).sum(dim=-1).clamp(-1.0, 1.0)
        return ((1.0 + cosine) / 2.0).float().cpu().tolist()


class LMFluencyScorer(Scorer):
    """exp(mean log-probability of the output tokens given the formatted prefix), in (0, 1]."""

    kind = "lm_fluency"
    bounded = True

    def __init__(self, name: str, spec: ScorerParams, cache_path: Optional[Path] = None) -> None:
        super().__init__(name, spec, cache_path)
        self.model, self.tokenizer = _language_model(spec)
        if self.model.config.is_encoder_decoder:
            raise ValueError(f"scorer '{name}': lm_fluency needs a causal LM, {spec.model} is a seq2seq model")

    def token_length(self, instance: InstanceText) -> int:
        """Prefix and output tokens together."""
        return sum(len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
                   for text in (self.format(instance), self.format_pair(instance)))

    @torch.inference_mode()
    def _score_batch(self, batch: Sequence[InstanceText]) -> Sequence[float]:
        prefixes = [self.format(i) for i in batch]
        outputs = [self.format_pair(i) for i in batch]
        rows, spans = [], []
        for prefix, output in zip(prefixes, outputs):
            prefix_ids = self.tokenizer(prefix, add_special_tokens=False)["input_ids"]
            output_ids = self.tokenizer(output, add_special_tokens=False)["input_ids"]
            ids = prefix_ids + output_ids
            if len(ids) > self.spec.max_length:  # keep the output, cut the prefix from the left
                ids = ids[-self.spec.max_length:]
            n_out = min(len(output_ids), len(ids) - 1)
            rows.append(ids)
            spans.append((len(ids) - n_out, len(ids)))
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.model.device)
        attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.model.device)
        logprobs = torch.log_softmax(self.model(input_ids=input_ids, attention_mask=attention).logits.float(), -1)
        scores = []
        for row, (start, end) in enumerate(spans):
            targets = input_ids[row, start:end]
            token_logprobs = logprobs[row, start - 1:end - 1].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            scores.append(math.exp(token_logprobs.mean().item()))
        return scores


SCORER_KINDS = {
    cls.kind: cls
    for cls in (SequenceClassificationScorer, YesNoScorer, EmbeddingSimilarityScorer, LMFluencyScorer)
}


def build_scorer(name: str, spec: ScorerParams, cache_dir: Optional[Path] = None) -> Scorer:
    """The scorer of ``spec.kind`` for component ``name``, with its score cache in ``cache_dir``."""
    cache_path = None
    if cache_dir is not None:
        digest = hashlib.sha256(json.dumps([spec.kind, spec.model, spec.template, spec.pair_template,
                                            spec.max_length]).encode()).hexdigest()[:12]
        cache_path = Path(cache_dir) / SCORE_CACHE_FILE.format(name=name, digest=digest)
    return SCORER_KINDS[spec.kind](name, spec, cache_path)
