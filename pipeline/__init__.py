"""sidecache's library: data specs, backbones, stage-one extraction and the CLI.

Data flow of stage one: :mod:`pipeline.data` (text) -> :mod:`pipeline.tokens` (token ids and a
batch plan) -> :mod:`pipeline.backbone` (hidden states) -> :mod:`pipeline.cache` (cast, gather,
hand to :mod:`storage`).
"""
