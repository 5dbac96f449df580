"""Evaluation: held-out numbers for trained models.

    omnilm.eval.clip   zero-shot retrieval and attribute classification of a CLIP model
    omnilm.eval.vqa    exact-match visual question answering of a LLaVA model

Submodules are imported where used, so one's optional dependencies never burden another.
"""
