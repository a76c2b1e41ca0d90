"""The toy world: procedural scenes with known truth, the zorb concept, a judge, an oracle tagger.

Submodules (import the one you need; importing has no side effects):

- ``world``: draw scenes from a seed, with truth, captions and tags
- ``rich``: the busier world the toy VAE trains on
- ``concept``: the zorb concept dataset and its regularization set
- ``judge``: measure an image (shape, colour, background, zorb) and memorization
- ``oracle``: the toy tagger (true tags) and a noisy heuristic tagger
- ``quality``: prompt-adherence measurements of a pipeline
- ``build``: the toy base model's architecture, training stages and export
"""
