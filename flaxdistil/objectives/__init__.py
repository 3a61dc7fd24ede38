"""The distillation objectives: pure functions of model outputs, `(sum, count)` pairs, float32.

Modules: `losses` (the DistilBERT triple loss, MSE, sparse top-k KL, task terms, counts),
`chunked_vocab` (the vocabulary terms without [B, T, V] logits), `intermediate` (TinyBERT/MiniLM
terms), `cached_teacher` (a teacher cache's targets in the shape of a model output), `positions`
(masked positions that get MLM logits) and `objective` (the typed objective of a run).
Nothing here imports config, data or I/O code.
"""

# Label of positions (MLM) or rows (classification, eval padding) without a target: torch
# CrossEntropyLoss's default ignore_index, as HF's data collators write it. Defined here, with no
# import, so data pipelines can use it without importing jax.
IGNORE_INDEX = -100
