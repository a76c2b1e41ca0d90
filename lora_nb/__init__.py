"""lora-nb: learn to train LoRAs for Stable Diffusion, notebook by notebook.

Importing the package has no side effects: no seeding, no model loading, no
network access. Import the submodules you need (``lora_nb.config``,
``lora_nb.train`` ...).
"""

__version__ = "0.1.0"


class LoraNbError(Exception):
    """An error a learner can fix: the message names the file or setting and what to do."""
