"""Shared fixtures: isolated caches, W&B disabled, tiny random models of every family."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAMILIES = ("llama", "gemma3_text", "gpt2", "gptj", "gpt_neox")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch, request):
    """Every test gets its own KELIGHT_CACHE, except real-model tests that reuse the model cache."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("KELIGHT_CACHE", str(tmp_path / "kelight-cache"))


@pytest.fixture
def no_shared_data(tmp_path, monkeypatch):
    """Key statistics without the shared data: KELIGHT_DATA is a folder without wikitext2/, the working
    directory (``tmp_path``) has no ../shared/data, and the cache is ``tmp_path/cache``."""
    monkeypatch.setenv("KELIGHT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "no-data").mkdir()
    monkeypatch.setenv("KELIGHT_DATA", str(tmp_path / "no-data"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture(params=FAMILIES)
def tiny(request):
    from kelight.models.tiny import tiny_model

    return tiny_model(request.param)

# Tiny-model forwards are dominated by thread hand-off on small CPUs; one thread is ~40x faster.
torch.set_num_threads(1)


# three requests in the counterfact_edit format (EasyEdit's), for regime and metric tests
COUNTERFACT_EDIT_CASES = [
    {"case_id": 0, "prompt": "The Eiffel Tower is in", "subject": "Eiffel Tower", "target_new": "Rome",
     "ground_truth": "Paris", "rephrase_prompt": "Where is the Eiffel Tower? In",
     "locality_prompt": "The Louvre is in", "locality_ground_truth": "Paris"},
    {"case_id": 1, "prompt": "Mount Fuji is in", "subject": "Mount Fuji", "target_new": "Peru",
     "ground_truth": "Japan", "rephrase_prompt": "Fuji, the mountain, is in",
     "locality_prompt": "Kyoto is in", "locality_ground_truth": "Japan"},
    {"case_id": 2, "prompt": "Danielle Darrieux speaks", "subject": "Danielle Darrieux", "target_new": "English",
     "ground_truth": "French", "rephrase_prompt": "The language of Danielle Darrieux is",
     "locality_prompt": "Michel Rocard speaks", "locality_ground_truth": "French"},
]
