"""The `omnilm` command line: thin wrappers over the library.

    omnilm demo                                   # ShapeWorld: CLIP -> align -> instruct -> eval, ~9 min on 2 cores
    omnilm demo-haystack [--needle image]         # long context: retrieval trained at 256 tokens, NIAH grids (~10 min)
    omnilm demo-video                             # ShapeWorld in time: clips, every family, controls, video haystack
    omnilm demo-audio                             # ShapeWorld you can hear: tones, silence control, audio haystack
    omnilm demo-icl                               # new words from the prompt alone: accuracy against shots
    omnilm data shapeworld --out DIR --n N --seed S --split train|test [--video | --audio]
    omnilm data haystack OUT --length L [--tokenizer DIR] [--keys K --questions Q] [--needle text|image]
    omnilm data icl OUT --n N [--ways 2,5] [--shots 0,1,4] [--variants novel,shuffled] [--words held-out]
    omnilm train --stage clip|align|instruct --data JSON --image-folder DIR (--preset NAME | --init CKPT) --out DIR
    omnilm eval CKPT --data JSON --image-folder DIR [--predictions FILE] [--json FILE]   # accuracy, MFU, J/token
    omnilm eval-clip CKPT --data JSON --image-folder DIR
    omnilm eval niah CKPT [--lengths 1x,4x] [--depths 11] [--samples N] [--rope-scaling yarn:4] [--logn]  # = eval-niah
    omnilm eval icl CKPT [--ways 2,5] [--shots 0,1,2,4,8] [--words held-out|train]           # = eval-icl
    omnilm chat CKPT --image a.png "question"     # without a question: a multi-turn chat (--video, --audio too)
    omnilm info CKPT | --preset NAME [--nproc N]  # architecture, parameter count, per-rank training memory
    omnilm inspect routing CKPT --image a.png "prompt"   # which experts each token of an MoE model went to
    omnilm inspect attention CKPT --image a.png "question" [--out DIR]   # where each answer token looked
    omnilm inspect attention-score CKPT [--n 200]   # how often the map peaks on a ShapeWorld object
    omnilm bench fusion                           # the four fusion modes and a text-only baseline, compared
    omnilm convert SRC DST --dtype bfloat16       # re-save a checkpoint (dtype, shard size)
    omnilm quantize CKPT OUT --int8 [--modules llm,lm_head]   # int8 weights, a 4x smaller file
    omnilm merge-lora BASE ADAPTER OUT            # fold a LoRA adapter (peft's format) into the weights
    omnilm serve CKPT [--port 8000] [--api-key KEY]   # OpenAI-compatible API, a chat page at /

The flags of `train`, `demo`, `bench fusion` and `serve` are generated from their settings
dataclasses (omnilm.train.args, omnilm.recipes, omnilm.serve.settings): `--help` lists every one.
`serve` needs the serve extra: pip install 'omnilm[serve]'.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from omnilm.config import PRESETS, OmniConfig
from omnilm.cost import describe_cost
from omnilm.data import Processor
from omnilm.data.collate import to_device
from omnilm.data.haystack import CHARS_PER_TOKEN, HaystackSpec
from omnilm.data.icl import IclSpec
from omnilm.data.image import load_image
from omnilm.data.llava_json import media_names, read_records
from omnilm.data.shapeworld import ShapeWorldSpec
from omnilm.errors import OmniInputError
from omnilm.eval.clip import evaluate_clip_checkpoint, format_clip_results
from omnilm.eval.icl import IclEvalArgs, run_icl_eval
from omnilm.eval.niah import NiahArgs, run_niah
from omnilm.eval.vqa import EvalArgs, evaluate_vqa, format_vqa_results, write_predictions
from omnilm.infer import Sampling
from omnilm.infer.chat import answer, chat_repl, user_message
from omnilm.interpret.attention import check_attends_to_media, format_maps, look, write_maps
from omnilm.interpret.grounding import format_grounding, grounding_score
from omnilm.interpret.routing import format_routes, moe_layer_ids, plot_load, route_prompt
from omnilm.model import OmniModel
from omnilm.model.hf import read_config, weights_size
from omnilm.model.layers import resolve_device
from omnilm.model.quantize import quantize_int8
from omnilm.recipes.demo import run_demo
from omnilm.recipes.fusion import BENCH_FLAGS, FusionBench, run_fusion_bench
from omnilm.recipes.haystack import HaystackRecipe, run_haystack
from omnilm.recipes.icl import ICL_FLAGS, IclRecipe, run_icl_recipe
from omnilm.recipes.audio import AUDIO_FLAGS, AudioRecipe, run_audio_recipe
from omnilm.recipes.video import VIDEO_FLAGS, VideoRecipe, run_video_recipe
from omnilm.recipes.recipe import Recipe
from omnilm.serve.settings import SERVE_FLAGS, ServeSettings
from omnilm.settings import add_flags, check_output_file, check_output_folder, from_flags
from omnilm.train import TrainArgs, train
from omnilm.train.lora import LoraSettings, apply_lora, load_adapter, lora_layers, lora_trainable, merge_lora
from omnilm.train.memory import memory_table

SERVE_EXTRA_MISSING: str | None = None  # the module the serve extra would bring, when it is not installed
try:
    from omnilm.serve.api import serve
except ModuleNotFoundError as e:
    if (e.name or "").startswith("omnilm"):
        raise
    serve, SERVE_EXTRA_MISSING = None, e.name

DTYPES = ("float32", "bfloat16", "float16")


def _load(path: str, device: str = "cpu", dtype: str | None = None) -> OmniModel:
    return OmniModel.from_pretrained(path, device=resolve_device(device), dtype=dtype).eval()


# --- commands ---------------------------------------------------------------------------------


def cmd_data(args) -> None:
    t0 = time.perf_counter()
    spec = from_flags(ShapeWorldSpec, args)
    path = spec.write()
    # Multi-image examples write one record each, and a clip one per question: count what was written.
    records = json.loads(path.read_text())
    kind = "audio" if spec.audio else "video" if spec.video else "image"
    n_media = len({name for r in records for name in media_names(r, kind)})
    print(f"wrote {spec.n} examples ({n_media} {kind}s, {len(records)} records) to {path} "
          f"in {time.perf_counter() - t0:.1f}s")


def cmd_data_haystack(args) -> None:
    t0 = time.perf_counter()
    spec = from_flags(HaystackSpec, args)
    path = spec.write()
    unit = "tokens" if spec.tokenizer is not None else f"tokens estimated as characters / {CHARS_PER_TOKEN}"
    print(f"wrote {spec.n} records of {spec.length} {unit} to {path} in {time.perf_counter() - t0:.1f}s")


def cmd_data_icl(args) -> None:
    t0 = time.perf_counter()
    spec = from_flags(IclSpec, args)
    path = spec.write()
    print(f"wrote {spec.n} episodes to {path} ({spec.pool} pool images under {spec.out / 'images'}) "
          f"in {time.perf_counter() - t0:.1f}s")


def cmd_train(args) -> None:
    train_args = from_flags(TrainArgs, args)
    summary = train(train_args)
    where = train_args.out / ("model" if summary["steps"] == train_args.steps else "checkpoints")
    print(f"stage {summary['stage']}: at step {summary['steps']} of {train_args.steps} after {summary['seconds']:.0f}s, "
          f"final loss {summary['final_loss']:.4f}; saved in {where}")
    if summary.get("cost"):  # a run finished from its last checkpoint did no steps here
        print(f"cost ({train_args.out / 'cost.json'}): {describe_cost(summary['cost'])}")


def cmd_eval(args) -> None:
    run = from_flags(EvalArgs, args)
    model = _load(run.checkpoint, run.device)
    summary, predictions = evaluate_vqa(model, Processor.for_model(model, run.checkpoint), read_records(run.data),
                                        run.image_folder, batch_size=run.batch_size, max_new_tokens=run.max_new_tokens,
                                        skip_bad=run.skip_bad, frames=run.frames, audio=run.audio)
    print(format_vqa_results(summary))
    print(f"cost of the answers ({summary['cost']['step_seconds']:.1f} s): {describe_cost(summary['cost'])}")
    if run.predictions:
        write_predictions(predictions, run.predictions)
        print(f"predictions: {run.predictions}")
    if run.json:
        Path(run.json).write_text(json.dumps(summary, indent=1) + "\n")
        print(f"summary: {run.json}")


def cmd_eval_niah(args) -> None:
    print(run_niah(from_flags(NiahArgs, args)))


def cmd_eval_icl(args) -> None:
    print(run_icl_eval(from_flags(IclEvalArgs, args))[0])


def cmd_eval_clip(args) -> None:
    print(format_clip_results(evaluate_clip_checkpoint(args.checkpoint, args.data, args.image_folder)))


def cmd_chat(args) -> None:
    sampling = from_flags(Sampling, args)
    if args.question is not None and not args.question.strip():
        raise OmniInputError("the question is empty: ask something, or leave it out for a chat")
    for image in args.image:  # before the model loads: a bad image costs nothing
        load_image(image)
    if args.video or args.audio:  # the same for videos and audio, and a model without them says so now
        config, _, _ = read_config(args.checkpoint)
        media_processor = Processor.for_model(config, args.checkpoint)
        for video in args.video:
            media_processor.read_video(video)
        for audio in args.audio:
            media_processor.read_audio(audio)
    model = _load(args.checkpoint, args.device, args.dtype)
    processor = Processor.for_model(model, args.checkpoint)
    if args.question is not None:
        answer(model, processor, [user_message(args.question, args.image, args.video, args.audio)], sampling)
        return
    chat_repl(model, processor, sampling, args.image, args.video, args.audio)


def cmd_info(args) -> None:
    if args.preset:
        if args.preset not in PRESETS:
            raise OmniInputError(f"unknown --preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
        model = OmniModel.from_preset(args.preset, device="meta")
    elif args.checkpoint:
        config, kind, _ = read_config(args.checkpoint)
        if kind == "clip":
            raise OmniInputError(f"{args.checkpoint} is a CLIP encoder; `omnilm info` describes language models")
        model = OmniModel.from_config(config, device="meta")  # reads no weights
    else:
        raise OmniInputError("give a checkpoint folder or --preset NAME")
    if args.expert_parallel != 1 and args.nproc is None:
        raise OmniInputError("--expert-parallel sizes the memory table: give --nproc N too")
    lines = [model.describe()]
    if (q := model.config.quantization) is not None:
        lines.append(f"{q.method + ':':<8}{', '.join(q.modules)} hold {q.method} weights, one float scale per output "
                     "channel (omnilm quantize)")
    lora = from_flags(LoraSettings, args, skip=("lora_dropout",))
    if lora.lora_r:
        apply_lora(model, lora)
        lora_trainable(model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        lines.append(f"lora:   rank {lora.lora_r} on {len(lora_layers(model))} linear layers: {trainable:,} LoRA "
                     f"parameters ({100 * trainable / model.num_parameters():.2f}% of the model)")
    if args.nproc is not None:
        lines += ["", memory_table(model, args.nproc, args.expert_parallel)]  # before printing: errors come alone
    print("\n".join(lines))


def cmd_merge_lora(args) -> None:
    check_output_folder(args.out, "OUT")
    model = _load(args.base, "cpu")
    settings = load_adapter(model, args.adapter)
    n_layers = len(lora_layers(model))
    merge_lora(model).save_pretrained(args.out)
    if (Path(args.base) / "tokenizer.json").is_file():
        Processor.for_model(model, args.base).save_pretrained(args.out)
    print(f"wrote {args.out}: {args.base} with the rank-{settings.lora_r} adapter {args.adapter} merged into "
          f"{n_layers} layers")


def cmd_inspect_routing(args) -> None:
    model = _load(args.checkpoint, args.device)
    if not model.config.text.n_experts:
        raise OmniInputError(f"{args.checkpoint} has a dense decoder (no experts): routing needs an MoE model "
                             "(e.g. one trained with --preset tiny-moe)")
    processor = Processor.for_model(model, args.checkpoint)
    batch = to_device(processor([user_message(args.prompt, args.image)]), next(model.parameters()).device)
    rows, load = route_prompt(model, processor.tokenizer, batch)
    layers = moe_layer_ids(model)
    print(format_routes(rows, layers))
    if args.png:
        plot_load(load, args.png, title=f"expert load over the {len(rows)} prompt tokens", layer_ids=layers)
        print(f"wrote {args.png}")


def _attending_config(checkpoint: str) -> OmniConfig:
    """The config of a model whose answer attends to its media, read without the weights; else one line."""
    config, kind, _ = read_config(checkpoint)
    if kind in ("clip", "whisper"):
        raise OmniInputError(f"{checkpoint} holds a {kind} encoder alone: attention maps need a model that answers")
    check_attends_to_media(config)
    return config


def cmd_inspect_attention(args) -> None:
    if not (args.image or args.video or args.audio):
        raise OmniInputError("give --image, --video or --audio: the maps show where the answer looks in them")
    check_output_folder(args.out, "--out")
    for image in args.image:  # before the model loads: a bad file costs nothing
        load_image(image)
    processor = Processor.for_model(_attending_config(args.checkpoint), args.checkpoint)
    for video in args.video:
        processor.read_video(video)
    for audio in args.audio:
        processor.read_audio(audio)
    model = _load(args.checkpoint, args.device)
    maps = look(model, processor, user_message(args.question, args.image, args.video, args.audio),
                args.max_new_tokens)
    written = write_maps(maps, args.out)
    print(format_maps(maps))
    print(f"wrote {len(written)} files to {args.out}: attention-K.png and heads-K.png per answer token K, "
          "attention.json")


def cmd_inspect_attention_score(args) -> None:
    if args.json:
        check_output_file(args.json, "--json")
    _attending_config(args.checkpoint)
    model = _load(args.checkpoint, args.device)
    summary = grounding_score(model, Processor.for_model(model, args.checkpoint), args.n, args.seed, args.objects)
    print(format_grounding(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
        print(f"wrote {args.json}")


def cmd_convert(args) -> None:
    check_output_folder(args.dst, "DST")
    model = _load(args.src, "cpu", args.dtype)
    processor = Processor.for_model(model, args.src) if (Path(args.src) / "tokenizer.json").is_file() else None
    model.save_pretrained(args.dst, max_shard_size=args.max_shard_size)
    if processor is not None:
        processor.save_pretrained(args.dst)
    print(f"wrote {args.dst} ({model.num_parameters():,} parameters)")


def cmd_quantize(args) -> None:
    check_output_folder(args.out, "OUT")
    if Path(args.out).resolve() == Path(args.checkpoint).resolve():
        raise OmniInputError(f"OUT is the checkpoint {args.checkpoint}: write the int8 model to a folder of its own")
    model = quantize_int8(_load(args.checkpoint, "cpu", "auto"), args.modules.split(",") if args.modules else None)
    processor = (Processor.for_model(model, args.checkpoint) if (Path(args.checkpoint) / "tokenizer.json").is_file()
                 else None)
    model.save_pretrained(args.out)
    if processor is not None:
        processor.save_pretrained(args.out)
    before, after = weights_size(args.checkpoint), weights_size(args.out)
    print(f"wrote {args.out}: int8 weights in {', '.join(model.config.quantization.modules)}; weights "
          f"{after / 1e6:,.1f} MB, {after / before:.2f}x the {before / 1e6:,.1f} MB of {args.checkpoint}")


def cmd_bench_fusion(args) -> None:
    run_fusion_bench(from_flags(FusionBench, args, FusionBench(), **BENCH_FLAGS))


def cmd_demo(args) -> None:
    run_demo(args.out, from_flags(Recipe, args))


def cmd_demo_haystack(args) -> None:
    result = run_haystack(args.out, from_flags(HaystackRecipe, args))
    if result["clip_eval"]:
        clip = result["clip_eval"]
        print(f"CLIP tower: zero-shot shape {clip['shape_acc']:.1%}, colour {clip['colour_acc']:.1%}")
    for name, report in result["reports"].items():
        print(f"\n== {name}\n{report}")
    print("\n" + ", ".join(f"{k} {v:.0f}s" for k, v in result["timings"].items()) + f". Model: {result['model']}")


def cmd_demo_video(args) -> None:
    result = run_video_recipe(args.out, from_flags(VideoRecipe, args, **VIDEO_FLAGS))
    print(result["report"])
    print(f"\nvideo haystack:\n{result['haystack_report']}")
    print("\n" + ", ".join(f"{k} {v:.0f}s" for k, v in result["timings"].items()) + f". Model: {result['model']}")


def cmd_demo_audio(args) -> None:
    result = run_audio_recipe(args.out, from_flags(AudioRecipe, args, **AUDIO_FLAGS))
    print(result["report"])
    print(f"\naudio haystack:\n{result['haystack_report']}")
    print("\n" + ", ".join(f"{k} {v:.0f}s" for k, v in result["timings"].items()) + f". Model: {result['model']}")


def cmd_demo_icl(args) -> None:
    result = run_icl_recipe(args.out, from_flags(IclRecipe, args, **ICL_FLAGS))
    before, after = (result["eval"][k] for k in ("before", "after"))
    print(f"Ordinary held-out questions: {100 * before['accuracy']:.1f}% before the episodes (the demo's model), "
          f"{100 * after['accuracy']:.1f}% after.\n\n{result['questions']}\n\nHeld-out words and images:\n"
          f"{result['report']}")
    print("\n" + ", ".join(f"{k} {v:.0f}s" for k, v in result["timings"].items()) + f". Model: {result['model']} "
          f"(omnilm eval icl {result['model']} --shots 0,1,2,4,8 measures it again)")


def cmd_serve(args) -> None:
    settings = from_flags(ServeSettings, args, **SERVE_FLAGS)
    if serve is None:
        raise OmniInputError(f"omnilm serve needs the serve extra ({SERVE_EXTRA_MISSING} is not installed): "
                             "pip install 'omnilm[serve]'")
    resolve_device(args.device)  # refused now rather than once the server listens
    serve(settings, lambda: _load(settings.checkpoint, args.device, args.dtype))


# --- parser -----------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line as every other omnilm error (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="omnilm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train and evaluate the tiny model on ShapeWorld (about 9 minutes on 2 cores)",
                       description="LLaVA-1.5's recipe on ShapeWorld: data, tokenizer, CLIP, align, instruct, then "
                                   "held-out exact-match accuracy per task family. Every recipe setting is a flag; "
                                   "a stage's training settings carry its name (--clip-steps, --instruct-lr).")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    add_flags(p, Recipe)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("demo-haystack", help="a small model learns to retrieve facts from its prompt; needle-in-a-"
                                             "haystack grids far past its training length (about 12 minutes)",
                       description="Long context on ShapeWorld: haystack records (omnilm data haystack), a BPE, a small "
                                   "decoder with token convolutions trained at 256 tokens with PoSE positions, then "
                                   "omnilm eval niah grids to 16x that length, with log-n attention scaling and each "
                                   "RoPE scaling, and with several keys and questions. --needle image trains a CLIP "
                                   "tower first and hides images among the captions. See docs/long-context.md.")
    p.add_argument("--out", default="runs/haystack", help="output folder (default runs/haystack)")
    add_flags(p, HaystackRecipe)
    p.set_defaults(func=cmd_demo_haystack)
    p = sub.add_parser("demo-video", help="a small model learns to read ShapeWorld clips: motion, appearance, "
                                          "counts, order and time, and a video haystack",
                       description="Video on ShapeWorld: clips of 4 to 8 frames (omnilm data shapeworld --video), a "
                                   "BPE, LLaVA-NeXT-Video's design at toy scale with motion features, trained in a "
                                   "look-up stage (direction questions and haystack clips) and a main stage, then "
                                   "held-out accuracy per family with the frames in order, shuffled and the first "
                                   "frame alone (controls: a model that reads time falls to chance on direction), and "
                                   "the video haystack (omnilm eval niah --needle video). See docs/video.md.")
    p.add_argument("--out", default="runs/video", help="output folder (default runs/video)")
    add_flags(p, VideoRecipe, **VIDEO_FLAGS)
    p.set_defaults(func=cmd_demo_video)
    p = sub.add_parser("demo-audio", help="a small model learns to hear ShapeWorld tones: how many, the pitch of the "
                                          "k-th, the melody's direction, the timbre; and an audio haystack",
                       description="Audio on ShapeWorld: 2 s clips of tones (omnilm data shapeworld --audio), a BPE, "
                                   "Voxtral's design at toy scale (a Whisper encoder trained from scratch, 4 frames a "
                                   "token) trained in an instruct stage and a short stage that also hears silence, "
                                   "then held-out accuracy per family with the audio heard and with silence in its "
                                   "place (the control), the cross-modal questions (--cross) and the audio haystack "
                                   "(omnilm eval niah --needle audio). See docs/audio.md.")
    p.add_argument("--out", default="runs/audio", help="output folder (default runs/audio)")
    add_flags(p, AudioRecipe, **AUDIO_FLAGS)
    p.set_defaults(func=cmd_demo_audio)

    p = sub.add_parser("demo-icl", help="a small model learns new words for colours and shapes from its prompt "
                                        "alone; accuracy against shots, with controls (about 49 minutes on 2 cores)",
                       description="In-context learning on ShapeWorld: the demo's recipe, then a token convolution and "
                                   "the made-up words (one token each, whose rows never train) grown onto its model, "
                                   "then four lessons of episodes (omnilm data icl): capital letters bound to colours "
                                   "or shapes named in words, the same with images, made-up words in words, then all "
                                   "of it, each turn asking for the attribute the episode names and each answer "
                                   "naming what the image shows before the word ('red dax'), a quarter of every "
                                   "lesson the demo's questions; then the ordinary questions before and after, and "
                                   "omnilm eval icl's grid on held-out words and images: 2- and 5-way, 0 to 8 shots, "
                                   "with the attributes' own names, shuffled labels and ambiguous shots as controls. "
                                   "See docs/icl.md.")
    p.add_argument("--out", default="runs/icl-demo", help="output folder (default runs/icl-demo)")
    add_flags(p, IclRecipe, **ICL_FLAGS)
    p.set_defaults(func=cmd_demo_icl)

    p = sub.add_parser("data", help="generate built-in datasets")
    data = p.add_subparsers(dest="dataset", required=True)
    q = data.add_parser("shapeworld", help="procedural shapes with exact answers, as LLaVA JSON + PNGs "
                                           "(single images, or 2 to 4 interleaved with --multi-image; clips with "
                                           "--video; sounds with --audio)",
                        description="Without flags beyond --out and --n, the world the demo trains and tests on.")
    add_flags(q, ShapeWorldSpec)
    q.set_defaults(func=cmd_data)
    q = data.add_parser("haystack", help="needle-in-a-haystack records: facts hidden in ShapeWorld captions (or "
                                         "images among them), asked after, at a given length in tokens",
                        description="Text needles 'remember: <key> is <colour> <shape>.' with nonsense keys (split "
                                    "test draws only held-out keys), asked 'What is <key>?', several keys and "
                                    "questions per record as a multi-turn chat; or image needles. --length counts "
                                    "the whole record in --tokenizer's tokens. See docs/long-context.md.")
    add_flags(q, HaystackSpec)
    q.set_defaults(func=cmd_data_haystack)
    q = data.add_parser("icl", help="in-context learning episodes: nonsense words bound to colours or shapes by "
                                    "a few examples, then a query (Frozen's fast binding)",
                        description="Each episode draws an attribute, N of its values and N nonsense words (afresh "
                                    "every episode), shows k single-object images of each, each a turn ('<image> "
                                    "What colour?') answered with its word (--describe: 'red dax'), then asks the "
                                    "same of one more. --variants real uses the attributes' own names, shuffled puts "
                                    "them on the wrong values, ambiguous confounds colour and shape in the first "
                                    "shots. --words held-out draws words no training episode uses, letters capital "
                                    "letters; --form text names each image's colour and shape in words instead. See "
                                    "docs/icl.md.")
    add_flags(q, IclSpec)
    q.set_defaults(func=cmd_data_icl)

    p = sub.add_parser("train", help="run one stage of the recipe (clip, align or instruct)")
    add_flags(p, TrainArgs)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="exact-match accuracy per task family on LLaVA-format questions",
                       description="Exact-match accuracy per task family (a record's `task`, or each turn's "
                                   "`turn_tasks`), and, for records with `n_objects` (ShapeWorld's), per number "
                                   "of objects in the scene. Needle-in-a-haystack recall over context lengths and "
                                   "depths is `omnilm eval niah CKPT` (the same as eval-niah; see its --help).")
    add_flags(p, EvalArgs)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("eval-niah", help="needle-in-a-haystack recall over context lengths x needle depths "
                                         "(also: omnilm eval niah CKPT)",
                       description="Gemini 1.5's needle-in-a-haystack grid: for each context length and depth, "
                                   "--samples prompts with one needle at that depth and a question after the "
                                   "haystack, answered greedily and scored by exact match. Writes niah.csv (length, "
                                   "depth, samples, correct, recall), the heatmap niah.png and predictions.jsonl to "
                                   "--out, and prints recall per length with its 95% Wilson interval. Prompts past "
                                   "the checkpoint's max_seq_len run with its RoPE as it is (or --rope-scaling). "
                                   "Works on Hugging Face LLaMA and LLaVA folders with their tokenizer.json too. "
                                   "See docs/long-context.md.")
    add_flags(p, NiahArgs)
    p.set_defaults(func=cmd_eval_niah)

    p = sub.add_parser("eval-icl", help="in-context learning: accuracy against shots on new words for colours and "
                                        "shapes (also: omnilm eval icl CKPT)",
                       description="Draws --n episodes per attribute, ways and shots on held-out images (and, by "
                                   "default, held-out words), answers each greedily, and prints accuracy with 95% "
                                   "Wilson intervals beside chance, with the controls: the attributes' own names "
                                   "(the perception ceiling), shuffled labels (does the answer follow the prompt or "
                                   "the image?) and ambiguous first shots. A model that names what it sees before "
                                   "the word (demo-icl's: 'red dax') is scored on the word, its shots named by its "
                                   "own answers about each image (--no-describe: the word alone). Writes icl.csv, "
                                   "icl.png (beside Frozen's figures) and predictions.jsonl to --out. See "
                                   "docs/icl.md.")
    add_flags(p, IclEvalArgs)
    p.set_defaults(func=cmd_eval_icl)

    p = sub.add_parser("eval-clip", help="zero-shot retrieval and attribute accuracy of a CLIP checkpoint")
    p.add_argument("checkpoint", help="CLIP folder (stage clip's model/)")
    p.add_argument("--data", required=True, help="LLaVA-format JSON with caption records (task 'caption')")
    p.add_argument("--image-folder", required=True)
    p.set_defaults(func=cmd_eval_clip)

    p = sub.add_parser("chat", help="answer a question about images, videos or audio, or chat turn by turn")
    p.add_argument("checkpoint", help="model folder with tokenizer.json (omnilm or Hugging Face LLaVA / LLaMA)")
    p.add_argument("question", nargs="?", help="answer this once and exit; without it, a multi-turn chat")
    p.add_argument("--image", action="append", default=[], help="image file for the (first) message; repeatable")
    p.add_argument("--video", action="append", default=[],
                   help="video for the (first) message, a file (mp4, webm, gif, avi, ...) or a folder of frames, "
                        "sampled as the model's video_preprocessor_config.json says; repeatable (video models)")
    p.add_argument("--audio", action="append", default=[],
                   help="audio file for the (first) message (wav, flac, mp3, ogg; any rate, resampled to 16 kHz), "
                        "cut into the encoder's windows; repeatable (audio models)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, ...")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="weight dtype (default float32)")
    add_flags(p, Sampling)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="print a model's architecture and parameter count (reads no weights)")
    p.add_argument("checkpoint", nargs="?", help="checkpoint folder")
    p.add_argument("--preset", help="a preset name instead of a folder (see omnilm.config.PRESETS)")
    add_flags(p, LoraSettings, skip=("lora_dropout",))
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="also print the training memory per rank (GiB) for stage instruct on one process and on N "
                        "ranks with --parallel ddp and fsdp: parameters, gradients, AdamW state and the layers FSDP "
                        "gathers, counted from the model's shapes (fp32 weights; activations not included)")
    p.add_argument("--expert-parallel", type=int, default=1, metavar="E",
                   help="with --nproc: each rank holds 1/E of every MoE layer's experts (as omnilm train "
                        "--expert-parallel splits them: E = N, dividing the number of experts)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("merge-lora", help="fold a LoRA adapter (peft's format) into its base model's weights",
                       description="Load BASE (an omnilm or Hugging Face LLaVA / LLaMA folder), put the adapter in "
                                   "ADAPTER on it (adapter_config.json + adapter_model.safetensors, as peft and "
                                   "omnilm train --lora-r write them), merge each update into its layer "
                                   "(W + scale * B @ A) and save the result, with BASE's tokenizer, to OUT.")
    p.add_argument("base", help="the model the adapter was trained on")
    p.add_argument("adapter", help="the adapter folder")
    p.add_argument("out", help="where to write the merged model")
    p.set_defaults(func=cmd_merge_lora)

    p = sub.add_parser("inspect", help="look inside a model: which experts an MoE model routes each token to, "
                                       "where each answer token looks in the images")
    what = p.add_subparsers(dest="what", required=True)
    q = what.add_parser("routing", help="per token, the experts each MoE layer chose and their weights")
    q.add_argument("checkpoint", help="an MoE model folder (omnilm, or Hugging Face Mixtral)")
    q.add_argument("prompt", help="the user message; rendered with the chat template, as chat would")
    q.add_argument("--image", action="append", default=[], help="image file for the message; repeatable")
    q.add_argument("--png", default=None, help="also draw the load per layer and expert over the prompt's tokens")
    q.add_argument("--device", default="auto", help="auto (default), cpu, cuda, ...")
    q.set_defaults(func=cmd_inspect_routing)
    q = what.add_parser("attention", help="per answer token, its attention to the image's (video's, audio's) tokens "
                                          "per layer and head, and aggregated: heatmaps over the image and a JSON",
                        description="Answers the question greedily, then records the decoder's attention over the "
                                    "prompt and the answer in one forward. For each answer token, read at the "
                                    "position whose logits chose it, writes to --out attention-K.png (attention "
                                    "rollout, gradient-weighted rollout and the last layer's head mean over each "
                                    "image, video frame or audio window), heads-K.png (every layer and head) and "
                                    "attention.json (every number, and how each aggregate is computed).")
    q.add_argument("checkpoint", help="a model folder (omnilm, or Hugging Face LLaVA)")
    q.add_argument("question", help="the user message; rendered with the chat template, as chat would")
    q.add_argument("--image", action="append", default=[], help="image file for the message; repeatable")
    q.add_argument("--video", action="append", default=[], help="video (a file or a folder of frames); repeatable")
    q.add_argument("--audio", action="append", default=[], help="audio file (wav, flac, mp3, ogg); repeatable")
    q.add_argument("--out", default="attention", help="folder for the PNGs and attention.json (default ./attention)")
    q.add_argument("--max-new-tokens", type=int, default=16, help="longest answer (default 16)")
    q.add_argument("--device", default="auto", help="auto (default), cpu, cuda, ...")
    q.set_defaults(func=cmd_inspect_attention)
    q = what.add_parser("attention-score", help="over held-out ShapeWorld questions, how often each aggregated "
                                                "attention map peaks on the cell of the object asked about")
    q.add_argument("checkpoint", help="a model trained on ShapeWorld (omnilm demo's, say)")
    q.add_argument("--n", type=int, default=200, help="questions (default 200), one from each of test examples "
                                                      "0..n-1")
    q.add_argument("--seed", type=int, default=0, help="seed of the test scenes (default 0, the demo's)")
    q.add_argument("--objects", type=int, default=1, help="objects per scene, 1-4 (default 1); with more, each "
                                                          "question is about one of them (colour, shape, position)")
    q.add_argument("--json", default=None, help="also write the figures and every question's peaks to this file")
    q.add_argument("--device", default="auto", help="auto (default), cpu, cuda, ...")
    q.set_defaults(func=cmd_inspect_attention_score)

    p = sub.add_parser("bench", help="measure: train the fusion modes on the same data and compare them")
    what = p.add_subparsers(dest="what", required=True)
    q = what.add_parser("fusion", help="joint, early, late and cross-attention fusion and a text-only baseline: "
                                       "same interleaved ShapeWorld data, steps and seed; accuracy, size, speed",
                        description="Trains every fusion mode (and a text-only baseline) with the demo's instruct "
                                    "stage on the same single- and multi-image ShapeWorld data, then prints per-task "
                                    "held-out accuracy, trainable/total parameters, tokens per image, seconds per "
                                    "training step and generation latency. Joint, late and cross-attention read one "
                                    "CLIP tower trained first. 17 to 26 minutes on 2 CPU cores at the defaults, by "
                                    "the machine's hour; the multi-image look-up needs more steps (docs/fusion.md).")
    add_flags(q, FusionBench, FusionBench(), **BENCH_FLAGS)
    q.set_defaults(func=cmd_bench_fusion)

    p = sub.add_parser("convert", help="load a checkpoint folder and save it again (dtype, sharding)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", choices=DTYPES, default=None)
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("quantize", help="store a checkpoint's weights in int8: a file about 4x smaller",
                       description="Load CHECKPOINT, give every linear layer of --modules int8 weights with one "
                                   "float scale per output channel (symmetric, weight-only; with llm the token "
                                   "embedding and MoE experts too, with vision the patch convolution) and save that "
                                   "model, with CHECKPOINT's tokenizer and processor files, to OUT. omnilm eval, "
                                   "chat and serve load OUT as any checkpoint; it does not train. Norms, position "
                                   "tables, MoE routers, Whisper's convolutions and the late and cross-attention "
                                   "fusion blocks stay float. On CPU the int8 matmul is fastest with bfloat16 "
                                   "activations (chat and serve --dtype bfloat16). See docs/quantization.md.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="the float model folder (omnilm, or Hugging Face LLaVA / "
                                                            "LLaMA)")
    p.add_argument("out", metavar="OUT", help="where to write the int8 model")
    p.add_argument("--int8", action="store_true", required=True,
                   help="int8 weight-only quantisation (the one method, named so that a later one can join it)")
    p.add_argument("--modules", default=None,
                   help="the parts to quantise, comma-separated: llm (the decoder), lm_head, vision (the CLIP "
                        "tower), audio (the Whisper encoder), projector (the image, video and audio projectors); "
                        "default every part the model has")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("serve", help="serve a model over OpenAI's chat completions API, with a chat page at /",
                       description="OpenAI's /v1/chat/completions (streamed or not), /v1/models, /health, /metrics "
                                   "and a chat page at /, for many clients at once (continuous batching). Listens "
                                   "on 127.0.0.1 unless --host says otherwise; images come as data: URLs unless "
                                   "--allowed-local-media-path or --allow-remote-media allow more. Needs the serve "
                                   "extra: pip install 'omnilm[serve]'.")
    add_flags(p, ServeSettings, **SERVE_FLAGS)
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, ...")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="weight dtype (default float32)")
    p.set_defaults(func=cmd_serve)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] in (["eval", "niah"], ["eval", "icl"]):  # `eval niah CKPT` is eval-niah (a folder named niah: ./niah)
        argv = [f"eval-{argv[1]}", *argv[2:]]
    # argparse binds chat's optional `question` before it sees options, so in
    # `chat CKPT --image a.png "question"` the question arrives as a leftover: take it there.
    args, leftover = parser.parse_known_args(argv)
    if leftover and args.command == "chat" and args.question is None and not any(w.startswith("-") for w in leftover):
        args.question, leftover = " ".join(leftover), []
    if leftover:
        parser.error(f"unrecognized arguments: {' '.join(leftover)}")
    return args


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> None:
    warnings.formatwarning = _one_line_warning  # skipped records and the like, as `warning: ...`
    args = parse_args(argv)
    try:
        args.func(args)
    except OmniInputError as e:
        # one write of the whole line: ranks under torchrun share one stderr, and print's two
        # writes (text, then newline) from two ranks can land as one joined line
        sys.stderr.write(f"error: {e}\n")
        sys.stderr.flush()
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
