"""Experiments that combine the layers below: train, evaluate, compare.

    omnilm.recipes.recipe   LLaVA-1.5's stages on ShapeWorld (`Recipe`, one `Hyperparams` per stage)
    omnilm.recipes.demo     `omnilm demo`: the recipe, then the accuracy table and three answers
    omnilm.recipes.fusion   `omnilm bench fusion`: the four fusion modes and a text-only baseline
"""
