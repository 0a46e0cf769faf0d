"""The per-frame kind of run and the loop every kind trains with.

``trainer`` (model, loss, optimizer, the one optimizer step), ``loop`` (``fit``: epochs,
validation, checkpoints, the run log), ``evaluate`` (the validation pass and the one evaluation
report), ``frames`` (the per-frame kind: shards → backbone + heads). Starting a run of any kind:
``affpipe.runs.train``; evaluating and predicting one: ``affpipe.runs``.
"""
