"""The `omnilm` command line: thin wrappers over the library.

    omnilm demo                                   # ShapeWorld: CLIP -> align -> instruct -> eval, ~9 min on 2 cores
    omnilm data shapeworld --out DIR --n N --seed S --split train|test
    omnilm train --stage clip|align|instruct --data JSON --image-folder DIR (--preset NAME | --init CKPT) --out DIR
    omnilm eval CKPT --data JSON --image-folder DIR [--predictions FILE]
    omnilm eval-clip CKPT --data JSON --image-folder DIR
    omnilm chat CKPT --image a.png "question"     # without a question: a multi-turn chat
    omnilm info CKPT | --preset NAME              # architecture and parameter count (total and active)
    omnilm inspect routing CKPT --image a.png "prompt"   # which experts each token of an MoE model went to
    omnilm convert SRC DST --dtype bfloat16       # re-save a checkpoint (dtype, shard size)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from omnilm.errors import OmniInputError

DTYPES = ("float32", "bfloat16", "float16")


def _load(path: str, device: str = "cpu", dtype: str | None = None):
    from omnilm import OmniModel

    from omnilm.train.loop import resolve_device

    return OmniModel.from_pretrained(path, device=resolve_device(device), dtype=dtype).eval()


def _answer(model, processor, messages: list[dict], args) -> str:
    """Stream the model's reply to `messages` to stdout; return it."""
    from omnilm.data.collate import to_device
    from omnilm.infer import stream

    batch = to_device(processor(messages), next(model.parameters()).device)
    pieces = []
    for piece in stream(model, processor.tokenizer, batch["input_ids"], batch["pixel_values"],
                        batch["attention_mask"], max_new_tokens=args.max_new_tokens,
                        do_sample=args.temperature > 0, temperature=args.temperature or 1.0,
                        top_k=args.top_k, top_p=args.top_p):
        if not pieces:
            piece = piece.lstrip()  # the first token carries the space after "ASSISTANT:"
        print(piece, end="", flush=True)
        pieces.append(piece)
    print()
    return "".join(pieces).strip()


def _user(text: str, images: list[str]) -> dict:
    return {"role": "user", "content": [*({"type": "image", "image": p} for p in images),
                                        {"type": "text", "text": text}]}


# --- commands ---------------------------------------------------------------------------------


def cmd_data(args) -> None:
    import json

    from omnilm.data.shapeworld import write_shapeworld

    t0 = time.perf_counter()
    path = write_shapeworld(args.out, args.n, args.seed, args.split, image_size=args.image_size, jitter=args.jitter,
                            questions=args.questions, n_objects=args.n_objects, multi_image=args.multi_image)
    # Multi-image examples write one record each, so count what was written.
    records = json.loads(path.read_text())
    n_images = len({name for r in records for name in ([r["image"]] if isinstance(r["image"], str) else r["image"])})
    print(f"wrote {args.n} examples ({n_images} images, {len(records)} records) to {path} "
          f"in {time.perf_counter() - t0:.1f}s")


def cmd_train(args) -> None:
    from omnilm.train.loop import TrainArgs, train

    fields = {k: v for k, v in vars(args).items() if k not in ("command", "func", "fusion", "attend")}
    fields["tasks"] = fields["tasks"].split(",") if fields["tasks"] else None
    overrides = {k: getattr(args, k) for k in ("fusion", "attend") if getattr(args, k) is not None}
    if overrides and args.init is not None:
        raise OmniInputError(f"--{'/--'.join(overrides)} shape a fresh model; a model from --init keeps its own: drop it")
    train_args = TrainArgs(**fields, config_overrides=overrides)
    summary = train(train_args)
    where = Path(args.out) / ("model" if summary["steps"] == train_args.steps else "checkpoints")
    print(f"stage {summary['stage']}: at step {summary['steps']} of {train_args.steps} after {summary['seconds']:.0f}s, "
          f"final loss {summary['final_loss']:.4f}; saved in {where}")


def cmd_eval(args) -> None:
    from omnilm.data import Processor
    from omnilm.data.llava_json import read_records
    from omnilm.eval.vqa import evaluate_vqa, format_table, write_predictions

    model = _load(args.checkpoint, args.device)
    processor = Processor.for_model(model, args.checkpoint)
    records = read_records(args.data)
    summary, predictions = evaluate_vqa(model, processor, records, args.image_folder, batch_size=args.batch_size,
                                        max_new_tokens=args.max_new_tokens)
    print(format_table(summary))
    if args.predictions:
        write_predictions(predictions, args.predictions)
        print(f"predictions: {args.predictions}")


def cmd_eval_clip(args) -> None:
    from omnilm.eval.clip import evaluate_clip_checkpoint, format_clip_results

    print(format_clip_results(evaluate_clip_checkpoint(args.checkpoint, args.data, args.image_folder)))


def cmd_chat(args) -> None:
    from omnilm.data import Processor

    model = _load(args.checkpoint, args.device, args.dtype)
    processor = Processor.for_model(model, args.checkpoint)
    if args.question:
        _answer(model, processor, [_user(args.question, args.image)], args)
        return
    _repl(model, processor, args)


def _repl(model, processor, args) -> None:
    print("omnilm chat: type a message; /image PATH adds an image to your next message, /reset starts over, "
          "/quit (or Ctrl-D) leaves.")
    messages: list[dict] = []
    pending = list(args.image)
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            messages, pending = [], []
            print("(conversation cleared)")
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            if not Path(path).is_file():
                print(f"(no such file: {path})")
            else:
                pending.append(path)
                print(f"(image {path} will go with your next message)")
            continue
        turn = _user(line, pending)
        print("assistant> ", end="", flush=True)
        try:
            reply = _answer(model, processor, messages + [turn], args)
        except OmniInputError as e:
            print(f"\n(error: {e})")
            continue
        messages += [turn, {"role": "assistant", "content": reply}]
        pending = []


def cmd_info(args) -> None:
    from omnilm import OmniModel

    if args.preset:
        model = OmniModel.from_preset(args.preset, device="meta")
    elif args.checkpoint:
        from omnilm.model.hf import read_config

        config, kind, _ = read_config(args.checkpoint)
        if kind == "clip":
            raise SystemExit(f"error: {args.checkpoint} is a CLIP encoder; `omnilm info` describes language models")
        model = OmniModel.from_config(config, device="meta")  # reads no weights
    else:
        raise SystemExit("error: give a checkpoint folder or --preset NAME")
    c = model.config
    print(f"text:   {c.text.n_layers} layers, dim {c.text.dim}, {c.text.n_heads} heads / {c.text.n_kv_heads} kv heads, "
          f"mlp {c.text.mlp_dim}, vocab {c.text.vocab_size}, rope theta {c.text.rope_theta:g}")
    if c.vision is not None and c.fusion == "early":
        v = c.vision
        print(f"vision: none (early fusion): {v.image_size}px images in {v.patch_size}px patches, linearly embedded "
              f"with a row break per row, {c.image_seq_len} tokens per image")
    elif c.vision is not None:
        v = c.vision
        print(f"vision: CLIP ViT {v.n_layers} layers, dim {v.dim}, {v.image_size}px / {v.patch_size}px patches, "
              f"feature layer {c.vision_feature_layer}, {c.image_seq_len} tokens per image")
    if c.fusion == "late":
        print("fusion: late: pooled images join the last hidden states through a gate (the marker is 1 token)")
    elif c.fusion == "cross_attention":
        print(f"fusion: cross-attention: {c.n_latents} resampler latents per image ({c.resampler_layers} layers), "
              f"gated blocks before every {c.cross_attention_every} decoder layers, attend={c.attend}")
    t = c.text
    if t.n_experts:
        layers = "every layer" if t.moe_every == 1 else f"one layer in {t.moe_every}"
        print(f"moe:    {t.n_experts} experts of width {t.expert_dim} in {layers}, {t.router} routing, "
              f"{t.n_experts_per_token} per token" + (f", {t.n_shared_experts} shared" if t.n_shared_experts else "")
              + (f", capacity factor {t.capacity_factor:g}" if t.capacity_factor else ""))
        print(f"parameters: {model.num_parameters():,} ({model.num_parameters(active_only=True):,} active per token)")
    else:
        print(f"parameters: {model.num_parameters():,}")


def cmd_inspect_routing(args) -> None:
    from omnilm.data import Processor
    from omnilm.data.collate import to_device
    from omnilm.inspect.routing import format_routes, moe_layer_ids, plot_load, route_prompt

    model = _load(args.checkpoint, args.device)
    if not model.config.text.n_experts:
        raise OmniInputError(f"{args.checkpoint} has a dense decoder (no experts): routing needs an MoE model "
                             "(e.g. one trained with --preset tiny-moe)")
    processor = Processor.for_model(model, args.checkpoint)
    batch = to_device(processor([_user(args.prompt, args.image)]), next(model.parameters()).device)
    rows, load = route_prompt(model, batch)
    layers = moe_layer_ids(model)
    print(format_routes(rows, layers))
    if args.png:
        plot_load(load, args.png, title=f"expert load over the {len(rows)} prompt tokens", layer_ids=layers)
        print(f"wrote {args.png}")


def cmd_convert(args) -> None:
    model = _load(args.src, "cpu", args.dtype)
    model.save_pretrained(args.dst, max_shard_size=args.max_shard_size)
    print(f"wrote {args.dst} ({model.num_parameters():,} parameters)")


def cmd_bench_fusion(args) -> None:
    from omnilm.eval.fusion import FusionBench, run_fusion_bench

    modes = tuple(args.modes.split(",")) if args.modes else FusionBench.modes
    bench = FusionBench(out=Path(args.out), modes=modes, steps=args.steps, n_train=args.n_train, n_test=args.n_test,
                        lr=args.lr, optimizer=args.optimizer, connector_lr=args.connector_lr, gate_lr=args.gate_lr,
                        cross_attention_every=args.cross_attention_every, captions=args.captions,
                        group_by_length=not args.no_group_by_length, seed=args.seed,
                        llm_layers=args.llm_layers, clip_steps=args.clip_steps, clip_images=args.clip_images,
                        progress=not args.no_progress)
    run_fusion_bench(bench, docs=Path(args.docs) if args.docs else None)


def cmd_demo(args) -> None:
    from omnilm.demo import run_demo

    run_demo(args.out, preset=args.preset, seed=args.seed)


# --- parser -----------------------------------------------------------------------------------


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample from the smallest set with this much probability")


def _add_train(p: argparse.ArgumentParser) -> None:
    from omnilm.config import FUSIONS
    from omnilm.train.loop import STAGES, TrainArgs
    from omnilm.train.optim import OPTIMIZERS

    d = TrainArgs(stage="clip", data=Path("."), image_folder=Path("."), out=Path("."))  # the defaults
    p.add_argument("--stage", required=True, choices=STAGES,
                   help="clip: contrastive CLIP pretraining; align: stage 1, projector only, on captions; "
                        "instruct: stage 2, projector + LLM on questions")
    p.add_argument("--data", required=True, help="LLaVA-format JSON (e.g. from `omnilm data shapeworld`)")
    p.add_argument("--image-folder", required=True, help="folder the records' image paths are relative to")
    p.add_argument("--out", required=True, help="run folder: metrics.jsonl, loss.png, checkpoints/, model/")
    p.add_argument("--preset", default=d.preset, help=f"architecture for a fresh model (default {d.preset})")
    p.add_argument("--init", default=None, help="start from this checkpoint folder instead of a fresh model")
    p.add_argument("--fusion", default=None, choices=FUSIONS,
                   help="how a fresh model fuses images and text (default joint, LLaVA): early (raw patches in the "
                        "sequence), late (pooled images before the output head), cross_attention (Flamingo)")
    p.add_argument("--attend", default=None, choices=("previous", "all"),
                   help="cross_attention: a token reads the latest image (previous, default) or every image so far")
    p.add_argument("--vision", default=None, help="a CLIP folder (stage clip's model/) to take the vision encoder from")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder (default: from --init/--vision, else a BPE trained on the data)")
    p.add_argument("--tasks", default=None, help="comma-separated record `task`s to train on "
                                                 "(default: caption for clip/align, all but caption for instruct)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"records per micro-batch (default {d.batch_size})")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr:g})")
    p.add_argument("--projector-lr", type=float, default=None, help="peak learning rate of the projector (default --lr)")
    p.add_argument("--gate-lr", type=float, default=None,
                   help="peak learning rate of cross-attention's tanh gates (default: the projector's). Adam moves a "
                        "scalar about its LR a step, so a gate starting at 0 needs some 0.5/LR steps to open")
    p.add_argument("--warmup", type=int, default=d.warmup, help=f"linear warm-up steps before the cosine decay (default {d.warmup})")
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final LR as a fraction of the peak")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="weight decay on matrices (default 0)")
    p.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS,
                   help="adamw (default), or muon: Muon for the transformer blocks' weight matrices (each MoE "
                        "expert's one by one) and AdamW for the rest, at the same --lr (on ShapeWorld it learns "
                        "the question-to-object look-up far sooner)")
    p.add_argument("--clip-grad", type=float, default=d.clip_grad, help="gradient-norm clipping (default 1.0)")
    p.add_argument("--train-vision", action="store_true", help="instruct: also train the vision encoder (frozen by default)")
    p.add_argument("--vision-lr", type=float, default=None, help="peak learning rate of the vision encoder (default --lr)")
    p.add_argument("--patch-lr", type=float, default=None,
                   help="peak learning rate of the ViT's patch embedding where the tower trains (clip; instruct "
                        "with --train-vision); default: the tower's. A tenth of --lr keeps the learned positions "
                        "visible beside the patches (the recipe's stage clip uses it)")
    p.add_argument("--group-by-length", action="store_true",
                   help="align/instruct: batch records of similar length together, so less of each batch is padding "
                        "(as LLaVA's group_by_modality_length); batches stay a pure function of --seed")
    p.add_argument("--whiten-projector", action="store_true",
                   help="start a fresh projector by whitening the vision features, so that every feature "
                        "direction learns at the same speed (see omnilm.model.connector.whiten_)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps (default: at the end)")
    p.add_argument("--log-every", type=int, default=d.log_every, help="write metrics.jsonl out every N steps (default 10)")
    p.add_argument("--device", default=d.device, help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on where it is faster: CUDA, or CPUs with AVX512-BF16/AMX)")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed records instead of stopping")
    p.add_argument("--no-cache-images", dest="cache_images", action="store_false",
                   help="decode images every time instead of keeping them in memory (for datasets larger than RAM)")
    p.add_argument("--resume", action="store_true", help="continue exactly from OUT/checkpoints/latest")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _bench_defaults():
    from omnilm.eval.fusion import FusionBench

    return FusionBench()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnilm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train and evaluate the tiny model on ShapeWorld (about 9 minutes on 2 cores)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--preset", default="tiny", help="architecture: tiny (default) or tiny-moe (sparse decoder)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("data", help="generate built-in datasets")
    data = p.add_subparsers(dest="dataset", required=True)
    q = data.add_parser("shapeworld", help="procedural shapes with exact answers, as LLaVA JSON + PNGs "
                                           "(single images, or 2 to 4 interleaved with --multi-image)")
    q.add_argument("--out", required=True, help="folder for <split>.json and images/")
    q.add_argument("--n", type=int, required=True,
                   help="number of examples (a single-image one: a caption and a question record; a multi-image one: "
                        "one record)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--split", default="train",
                   help="train (default), test, or any other name: each split has its own scene seeds")
    q.add_argument("--image-size", type=int, default=96, help="pixels per side, 64-128 (default 96: the tiny preset's input)")
    q.add_argument("--jitter", type=float, default=1.0,
                   help="how far shapes stray from their cell's centre: 0 centred, 1 anywhere in the cell (default)")
    q.add_argument("--questions", choices=("mixed", "all"), default="mixed",
                   help="per image, a conversation of 1 to 4 question families (mixed, default) or of all of them; "
                        "all also follows each multi-image question with every other multi-image family its images answer")
    q.add_argument("--n-objects", type=int, default=None, help="objects per scene, 1-4 (default: a mix of 1 to 4)")
    q.add_argument("--multi-image", type=float, default=0.0, metavar="P",
                   help="fraction of examples with 2 to 4 interleaved images and multi-image questions, default 0")
    q.set_defaults(func=cmd_data)

    p = sub.add_parser("train", help="run one stage of the recipe (clip, align or instruct)")
    _add_train(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="exact-match accuracy per task family on LLaVA-format questions",
                       description="Exact-match accuracy per task family (a record's `task`, or each turn's "
                                   "`turn_tasks`), and, for records with `n_objects` (ShapeWorld's), per number "
                                   "of objects in the scene.")
    p.add_argument("checkpoint", help="model folder (omnilm or Hugging Face LLaVA)")
    p.add_argument("--data", required=True, help="LLaVA-format JSON; every assistant turn of a non-caption record is a question")
    p.add_argument("--image-folder", required=True)
    p.add_argument("--predictions", default=None, help="write one JSON line per question here")
    p.add_argument("--batch-size", type=int, default=64, help="questions per generation batch (default 64)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="longest answer generated (default 16)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("eval-clip", help="zero-shot retrieval and attribute accuracy of a CLIP checkpoint")
    p.add_argument("checkpoint", help="CLIP folder (stage clip's model/)")
    p.add_argument("--data", required=True, help="LLaVA-format JSON with caption records (task 'caption')")
    p.add_argument("--image-folder", required=True)
    p.set_defaults(func=cmd_eval_clip)

    p = sub.add_parser("chat", help="answer a question about images, or chat turn by turn")
    p.add_argument("checkpoint", help="model folder with tokenizer.json (omnilm or Hugging Face LLaVA / LLaMA)")
    p.add_argument("question", nargs="?", help="answer this once and exit; without it, a multi-turn chat")
    p.add_argument("--image", action="append", default=[], help="image file for the (first) message; repeatable")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, ...")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="weight dtype (default float32)")
    _add_sampling(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="print a model's architecture and parameter count (reads no weights)")
    p.add_argument("checkpoint", nargs="?", help="checkpoint folder")
    p.add_argument("--preset", help="a preset name instead of a folder (see omnilm.config.PRESETS)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("inspect", help="look inside a model: which experts an MoE model routes each token to")
    what = p.add_subparsers(dest="what", required=True)
    q = what.add_parser("routing", help="per token, the experts each MoE layer chose and their weights")
    q.add_argument("checkpoint", help="an MoE model folder (omnilm, or Hugging Face Mixtral)")
    q.add_argument("prompt", help="the user message; rendered with the chat template, as chat would")
    q.add_argument("--image", action="append", default=[], help="image file for the message; repeatable")
    q.add_argument("--png", default=None, help="also draw the load per layer and expert over the prompt's tokens")
    q.add_argument("--device", default="auto", help="auto (default), cpu, cuda, ...")
    q.set_defaults(func=cmd_inspect_routing)

    p = sub.add_parser("bench", help="measure: train the fusion modes on the same data and compare them")
    what = p.add_subparsers(dest="what", required=True)
    q = what.add_parser("fusion", help="joint, early, late and cross-attention fusion and a text-only baseline: "
                                       "same interleaved ShapeWorld data, steps and seed; accuracy, size, speed",
                        description="Trains every fusion mode (and a text-only baseline) with the instruct stage on "
                                    "the same single- and multi-image ShapeWorld data, then prints per-task held-out "
                                    "accuracy, trainable/total parameters, tokens per image, seconds per training "
                                    "step and generation latency. Joint, late and cross-attention read one CLIP tower "
                                    "trained first (--clip-steps). 17 to 26 minutes on 2 CPU cores at the defaults, "
                                    "by the machine's hour.")
    d = _bench_defaults()
    from omnilm.train.optim import OPTIMIZERS
    q.add_argument("--out", default=str(d.out), help=f"run folder (default {d.out})")
    q.add_argument("--steps", type=int, default=d.steps,
                   help=f"instruct steps per mode (default {d.steps}, what five modes get in 30 min on 2 CPU cores; "
                        "joint passes 85%% on multi-image questions at 4000: docs/fusion.md)")
    q.add_argument("--n-train", type=int, default=d.n_train, help=f"training examples (default {d.n_train})")
    q.add_argument("--n-test", type=int, default=d.n_test, help=f"held-out examples (default {d.n_test})")
    q.add_argument("--modes", default=None, help=f"comma-separated subset of {','.join(d.modes)} (default all)")
    q.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr:g})")
    q.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS,
                   help=f"every mode's optimizer (default {d.optimizer}; muon: see omnilm train --help)")
    q.add_argument("--connector-lr", type=float, default=d.connector_lr,
                   help="peak LR of each mode's connector (projector, patch embedding, late gate, resampler and "
                        "gated blocks); default: the decoder's")
    q.add_argument("--gate-lr", type=float, default=d.gate_lr,
                   help=f"peak LR of cross-attention's tanh gates (default {d.gate_lr:g}; they start at 0 and Adam "
                        "moves a scalar about its LR a step)")
    q.add_argument("--cross-attention-every", type=int, default=d.cross_attention_every, metavar="N",
                   help=f"a gated cross-attention block before every N-th decoder layer (default {d.cross_attention_every})")
    q.add_argument("--no-group-by-length", action="store_true",
                   help="batch records in random order (default: records of similar length together, less padding)")
    q.add_argument("--captions", action="store_true",
                   help="also train on the caption records (default: questions only, as the demo's instruct stage)")
    q.add_argument("--llm-layers", type=int, default=d.llm_layers, metavar="N",
                   help=f"decoder layers in every mode (default {d.llm_layers}, as the demo; the tiny preset has 4)")
    q.add_argument("--clip-steps", type=int, default=d.clip_steps, metavar="N",
                   help=f"train the vision tower of joint, late and cross-attention first with the demo's stage clip "
                        f"(default {d.clip_steps}); 0: the modes read a random frozen tower")
    q.add_argument("--clip-images", type=int, default=d.clip_images, metavar="N",
                   help=f"single-object scenes for stage clip (default {d.clip_images})")
    q.add_argument("--seed", type=int, default=d.seed)
    q.add_argument("--docs", default=None, help="also write fusion_table.md and fusion.png into this folder (e.g. docs)")
    q.add_argument("--no-progress", action="store_true", help="no progress bars")
    q.set_defaults(func=cmd_bench_fusion)

    p = sub.add_parser("convert", help="load a checkpoint folder and save it again (dtype, sharding)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", choices=DTYPES, default=None)
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.set_defaults(func=cmd_convert)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    # argparse binds chat's optional `question` before it sees options, so in
    # `chat CKPT --image a.png "question"` the question arrives as a leftover: take it there.
    args, leftover = parser.parse_known_args(argv)
    if leftover and args.command == "chat" and args.question is None and not any(w.startswith("-") for w in leftover):
        args.question, leftover = " ".join(leftover), []
    if leftover:
        parser.error(f"unrecognized arguments: {' '.join(leftover)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        args.func(args)
    except OmniInputError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
