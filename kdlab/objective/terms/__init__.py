"""Builders that turn ``config.objective`` entries into terms (see :mod:`kdlab.objective`).

Common options of a term spec:
  * ``student`` / ``teacher``: the tap each side reads (``"logits"`` or a ``feats`` key). Feature
    terms also take a list of taps per side, paired elementwise, with the loss summed over the
    pairs (``student=["stage1", "stage2"]``); ``teacher`` defaults to the same names as
    ``student``. ``fsp`` takes pairs of taps (``student=[["stage1", "stage2"], ...]``).
  * ``from_teacher``: which teacher (index into ``config.teachers`` or its name; default 0).
  * connector options where a term has one: ``feat_dim`` (embedding heads of crd, info_nce, cc),
    ``init_var`` (vid), ``rate`` and ``reconstruction_weight`` (ft).
  * ``pool=True`` (at, nst, ft): maps whose resolutions differ by integer factors are compared
    after average-pooling the larger to the smaller (RepDistiller; vid always does this).
Any other key is the loss function's keyword hyperparameter.

Token logits (language models, ``[B, L, V]``, text batches): ``ce`` compares with
``batch["targets"]`` and the logit terms with the teacher's logits position by position; each
per-token loss is averaged over the sequence's real tokens (``batch["token_mask"]``), giving one
loss per sequence (:mod:`kdlab.losses.sequence`); under ``config.train.token_normalization="global"`` the
train step adds ``batch["token_weights"]`` and that mean becomes the weighted sum (one mean per token over
the global batch). ``kd``, ``reverse_kl``, ``jsd`` and ``tvd`` take
``impl="plain" | "chunked" | "fused"`` (and ``chunk_size``, tokens per chunk): ``chunked`` never
holds more than one chunk of ``[tokens, V]`` probabilities; ``fused`` computes the logits chunk by
chunk from ``feats["final"]`` and each model's unembedding (``ModelOutput.unembedding``) inside
the loss (same value; the models' own logits are still computed for the other terms and metrics).
The logit terms also take ``length_normalize=False``: the sum over the sequence's tokens instead
of their mean (the per-sequence loss scales with the generated length; MiniLLM's option).
``attention_kl`` / ``value_relation`` (MiniLM) average over the query positions with a real target.

Cross-tokenizer terms (teacher and student with different vocabularies): ``uld`` and ``aligned_kd``;
:mod:`kdlab.objective.terms.cross_tokenizer` lists the batch keys they read.

Connectors (:mod:`kdlab.models.connectors`) are built here from the tap shapes and called with
``train=True`` inside the train step; a term whose taps they cannot connect fails at start-up
with a message naming the taps.
"""


from kdlab.objective.terms import cross_tokenizer, features, logits  # noqa: F401  (registering is importing)
