"""pytest setup for the whole repository, unit tests and notebooks (nbval) alike, so `pytest notebooks/x.ipynb`
behaves as `make test` does. Set at import time, before anything imports ``huggingface_hub`` (which reads
``HF_HUB_OFFLINE`` once):

- ``PORTRAIT_STUDIO_QUICK=1`` unless already set: notebooks under test run their QUICK version;
- ``HF_HUB_OFFLINE=1``: tests never wait on the network.
"""
import os

os.environ.setdefault("PORTRAIT_STUDIO_QUICK", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
