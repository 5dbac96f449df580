"""ShapeWorld: procedurally generated images of coloured shapes, with exact ground truth.

No data can be downloaded where omnilm trains, so it makes its own: 1 to 4 objects (shape,
colour, size) on a 3x3 grid, drawn with PIL, plus a caption and questions whose short canonical
answers make exact-match accuracy a real, repeatable number. One world is the default: images of
IMAGE_SIZE pixels with shapes near their cells' centres (JITTER). Read top to bottom:

    scenes     the vocabulary, Obj and scenes, the renderer and the caption
    questions  single-image question families: ask(family, scene, rng) -> (question, answer)
    multi      multi-image questions and examples: make_multi_example(index, seed, split)
    records    LLaVA records and files: make_example(index, seed, split), write_shapeworld(...)

Later tasks (video, needles) build on the same small pieces: a scene model, a renderer, and
one question generator per family.
"""

from omnilm.data.shapeworld.multi import (IMAGE_LAYOUTS, MAX_TOTAL, MULTI_FAMILIES, MULTI_TEMPLATES, NEW_IMAGE_TURNS,
                                          P_MULTI_CHAT, P_THIRD_IMAGE, MultiExample, Slots, ask_multi, can_ask_multi,
                                          follow_up_questions, is_multi_image, make_multi_example, multi_rng)
from omnilm.data.shapeworld.questions import (FAMILIES, FAMILY_WEIGHTS, P_SINGLE_TURN, QUESTION_MIXES, TEMPLATES, ask,
                                              can_ask, pick_families, refer, subject)
from omnilm.data.shapeworld.records import CAPTION_PROMPTS, Example, ShapeWorldSpec, make_example, write_shapeworld
from omnilm.data.shapeworld.scenes import (ANSWERS, CELLS, COLOUR_RGB, COLOURS, IMAGE_SIZE, JITTER, MAX_OBJECTS,
                                           ORDINALS, PLURALS, SHAPES, SIZE_FRACTION, SIZES, Obj, Scene, caption,
                                           example_rng, generate_scene, render)

__all__ = [
    "ANSWERS",
    "CAPTION_PROMPTS",
    "CELLS",
    "COLOUR_RGB",
    "COLOURS",
    "Example",
    "FAMILIES",
    "FAMILY_WEIGHTS",
    "IMAGE_LAYOUTS",
    "IMAGE_SIZE",
    "JITTER",
    "MAX_OBJECTS",
    "MAX_TOTAL",
    "MULTI_FAMILIES",
    "MULTI_TEMPLATES",
    "MultiExample",
    "NEW_IMAGE_TURNS",
    "Obj",
    "ORDINALS",
    "P_MULTI_CHAT",
    "P_SINGLE_TURN",
    "P_THIRD_IMAGE",
    "PLURALS",
    "QUESTION_MIXES",
    "SHAPES",
    "SIZE_FRACTION",
    "SIZES",
    "Scene",
    "ShapeWorldSpec",
    "Slots",
    "TEMPLATES",
    "ask",
    "ask_multi",
    "can_ask",
    "can_ask_multi",
    "caption",
    "example_rng",
    "follow_up_questions",
    "generate_scene",
    "is_multi_image",
    "make_example",
    "make_multi_example",
    "multi_rng",
    "pick_families",
    "refer",
    "render",
    "subject",
    "write_shapeworld",
]
